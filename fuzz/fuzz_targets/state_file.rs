//! State-file parsers on arbitrary bytes: header block (both raw, and with
//! the fuzzer's bytes as a correctly framed and checksummed header JSON so
//! the validation itself is reached), completion record, state section.
//! No panic; whatever is accepted is self-consistent and encodes back to
//! what decodes to it again (header, completion record, state section).
#![no_main]

use libfuzzer_sys::fuzz_target;
use ringvm::snapshot::format::{decode_state, encode_state, Completion, Header, MAGIC, VERSION};

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
        let again = h.encode().expect("an accepted header encodes");
        let (h2, _) = Header::decode(&again).expect("an encoded header decodes");
        assert_eq!(h2, h, "header round trip");
    }
    if let Ok(c) = Completion::decode(data) {
        assert_eq!(Completion::decode(&c.encode()).expect("round trip"), c, "completion round trip");
    }
    if let Ok((json, crc)) = decode_state(data, 1 << 20) {
        let (b, crc2) = encode_state(&json, 1 << 20).expect("an accepted section encodes");
        assert_eq!(crc2, crc);
        assert_eq!(decode_state(&b, 1 << 20).expect("round trip"), (json.clone(), crc), "state section round trip");
        let _ = serde_json::from_slice::<ringvm::snapshot::StateSection>(&json);
    }
});
