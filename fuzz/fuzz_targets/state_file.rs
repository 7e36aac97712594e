//! State-file parsers on arbitrary bytes: header block (both raw, and with
//! the fuzzer's bytes as a correctly framed and checksummed header JSON so
//! the validation itself is reached), completion record, state section.
//! No panic; whatever is accepted is self-consistent.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ringvm::snapshot::format::{decode_state, Completion, Header, MAGIC, VERSION};

fuzz_target!(|data: &[u8]| {
    if let Ok((h, _)) = Header::decode(data) {
        h.validate().expect("decode validates");
    }
    let mut framed = vec![0u8; 32];
    framed[0..8].copy_from_slice(MAGIC);
    framed[8..12].copy_from_slice(&VERSION.to_le_bytes());
    framed[12..16].copy_from_slice(&(data.len() as u32).to_le_bytes());
    framed[16..20].copy_from_slice(&crc32c::crc32c(data).to_le_bytes());
    framed.extend_from_slice(data);
    if let Ok((h, _)) = Header::decode(&framed) {
        assert!(h.completion_offset < h.file_size);
        assert!(h.regions.iter().all(|r| r.offset % (1 << 20) == 0));
    }
    let _ = Completion::decode(data);
    if let Ok((json, _)) = decode_state(data, 1 << 20) {
        let _ = serde_json::from_slice::<ringvm::snapshot::StateSection>(&json);
    }
});
