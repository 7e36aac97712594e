//! The SCSI CDB decoder with arbitrary CDBs, buffer lengths and parameter
//! lists (the bytes a guest controls). It must never panic, and whatever
//! it asks the transport to do must stay inside the disk.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ringvm_devices::scsi::{execute, Action, Lun, Target};

fuzz_target!(|data: &[u8]| {
    if data.len() < 6 {
        return;
    }
    let cdb_len = (data[0] as usize % 32) + 1;
    let out_len = u64::from(u16::from_le_bytes([data[1], data[2]])) << (data[3] % 20);
    let in_len = u64::from(u16::from_le_bytes([data[4], data[5]])) << (data[3] % 20);
    let rest = &data[6..];
    let (cdb, params) = rest.split_at(cdb_len.min(rest.len()));
    let lun = Lun::new(64 << 20, 512, data[3] & 0x80 != 0, "FUZZ");
    let size = lun.blocks * u64::from(lun.block_size);
    let t = Target { lun: Some(&lun), luns: &[0, 1] };
    match execute(&t, cdb, out_len, in_len, params) {
        Action::Read { offset, len } => assert!(offset + len <= size && len <= in_len),
        Action::Write { offset, len, .. } => assert!(offset + len <= size && len <= out_len && !lun.readonly),
        Action::WriteBuf { offset, data, .. } => assert!(offset + data.len() as u64 <= size && !lun.readonly),
        Action::Discard { ranges } => assert!(ranges.iter().all(|(o, l)| o + l <= size) && !lun.readonly),
        Action::Done { data, .. } => assert!(data.len() as u64 <= in_len, "{} bytes for a {in_len}-byte buffer", data.len()),
        Action::Flush => {}
    }
    let none = Target { lun: None, luns: &[0] };
    let _ = execute(&none, cdb, out_len, in_len, params);
});
