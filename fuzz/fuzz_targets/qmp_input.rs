//! The QMP stream splitter and request parser on arbitrary bytes fed in
//! arbitrary chunks: no panic, bounded buffering.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ringvm::qmp::stream::{Frame, Splitter};

fuzz_target!(|data: &[u8]| {
    let mut s = Splitter::new(4096, 64);
    let mut out = Vec::new();
    let step = data.first().map_or(1, |b| usize::from(*b % 17) + 1);
    for chunk in data.chunks(step) {
        s.feed(chunk, &mut out);
        assert!(s.pending() <= 4096 + 1);
    }
    for f in out {
        if let Frame::Message(m) = f {
            assert!(m.len() <= 4097);
            if let Ok(r) = ringvm::qmp::parse_request(&m) {
                let _ = ringvm::qmp::check_args(&r.arguments, &[ringvm::qmp::req("uri", ringvm::qmp::ArgType::Str)]);
            }
        }
    }
});
