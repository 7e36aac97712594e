//! The QMP stream splitter and request parser on arbitrary bytes fed in
//! arbitrary chunks: no panic, bounded buffering, and the same frames
//! whether the bytes arrive whole or in pieces.
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
    // The same bytes in one piece: the same frames.
    let mut whole = Splitter::new(4096, 64);
    let mut once = Vec::new();
    whole.feed(data, &mut once);
    assert_eq!(once, out, "frames depend on how the bytes were split");
    assert_eq!(whole.pending(), s.pending());
    for f in out {
        if let Frame::Message(m) = f {
            assert!(m.len() <= 4097);
            if let Ok(r) = ringvm::qmp::parse_request(&m) {
                let _ = ringvm::qmp::check_args(&r.arguments, &[ringvm::qmp::req("uri", ringvm::qmp::ArgType::Str)]);
            }
        }
    }
});
