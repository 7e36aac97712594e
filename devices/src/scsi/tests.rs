use super::*;

fn lun(blocks: u64) -> Lun {
    Lun::new(blocks * 512, 512, false, "SER123")
}

fn run(l: &Lun, cdb: &[u8]) -> Action {
    execute(&Target { lun: Some(l), luns: &[0, 1] }, cdb, 1 << 30, 1 << 30, &[])
}

fn check_sense(a: Action) -> Sense {
    match a {
        Action::Done { status: CHECK_CONDITION, sense: Some(s), .. } => s,
        other => panic!("expected CHECK CONDITION, got {other:?}"),
    }
}

fn data(a: Action) -> Vec<u8> {
    match a {
        Action::Done { status: GOOD, data, .. } => data,
        other => panic!("expected GOOD, got {other:?}"),
    }
}

#[test]
fn read_write_decode_and_range_checks() {
    let l = lun(1000);
    let mut r10 = [0u8; 10];
    r10[0] = op::READ_10;
    r10[2..6].copy_from_slice(&990u32.to_be_bytes());
    r10[7..9].copy_from_slice(&10u16.to_be_bytes());
    assert_eq!(run(&l, &r10), Action::Read { offset: 990 * 512, len: 10 * 512 });
    r10[7..9].copy_from_slice(&11u16.to_be_bytes());
    assert_eq!(check_sense(run(&l, &r10)), Sense::LBA_OUT_OF_RANGE);
    // Overflowing LBA + length.
    let mut r16 = [0u8; 16];
    r16[0] = op::READ_16;
    r16[2..10].copy_from_slice(&u64::MAX.to_be_bytes());
    r16[10..14].copy_from_slice(&2u32.to_be_bytes());
    assert_eq!(check_sense(run(&l, &r16)), Sense::LBA_OUT_OF_RANGE);
    // READ(6): 21-bit LBA, length 0 means 256.
    let r6 = [op::READ_6, 0x00, 0x01, 0x00, 0x00, 0];
    assert_eq!(run(&l, &r6), Action::Read { offset: 256 * 512, len: 256 * 512 });
    // WRITE(10) with FUA syncs; with WCE off every write syncs.
    let mut w10 = [0u8; 10];
    w10[0] = op::WRITE_10;
    w10[1] = 0x08;
    w10[7..9].copy_from_slice(&1u16.to_be_bytes());
    assert_eq!(run(&l, &w10), Action::Write { offset: 0, len: 512, sync: true });
    w10[1] = 0;
    assert_eq!(run(&l, &w10), Action::Write { offset: 0, len: 512, sync: false });
    l.set_wce(false);
    assert_eq!(run(&l, &w10), Action::Write { offset: 0, len: 512, sync: true });
    // Too small a buffer for the transfer asked.
    let t = Target { lun: Some(&l), luns: &[0] };
    assert_eq!(check_sense(execute(&t, &w10, 100, 0, &[])), Sense::INVALID_FIELD);
    // Write protect.
    let ro = Lun::new(512 * 1000, 512, true, "RO");
    assert_eq!(check_sense(run(&ro, &w10)), Sense::WRITE_PROTECTED);
    // Protection information requested.
    w10[1] = 0x20;
    assert_eq!(check_sense(run(&l, &w10)), Sense::INVALID_FIELD);
    // Truncated CDB and unknown opcodes.
    assert_eq!(check_sense(run(&l, &[op::READ_10, 0, 0])), Sense::INVALID_OPCODE);
    assert_eq!(check_sense(run(&l, &[0xc0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])), Sense::INVALID_OPCODE);
    assert_eq!(check_sense(run(&l, &[0x04, 0, 0, 0, 0, 0])), Sense::INVALID_OPCODE);
    // FORMAT UNIT
}

#[test]
fn inquiry_capacity_and_vpd() {
    let l = lun(5 << 30);
    let std = data(run(&l, &[op::INQUIRY, 0, 0, 0, 96, 0]));
    assert_eq!(std.len(), 36);
    assert_eq!(&std[8..16], b"RINGVM  ");
    assert_eq!(std[0], 0);
    let pages = data(run(&l, &[op::INQUIRY, 1, 0, 0, 255, 0]));
    assert_eq!(&pages[4..], &[0x00, 0x80, 0x83, 0xb0, 0xb1, 0xb2]);
    let sn = data(run(&l, &[op::INQUIRY, 1, 0x80, 0, 255, 0]));
    assert_eq!(&sn[4..], b"SER123");
    let bl = data(run(&l, &[op::INQUIRY, 1, 0xb0, 0, 255, 0]));
    assert_eq!(u32::from_be_bytes(bl[8..12].try_into().unwrap()), MAX_TRANSFER_BLOCKS);
    assert_eq!(check_sense(run(&l, &[op::INQUIRY, 1, 0x99, 0, 255, 0])), Sense::INVALID_FIELD);
    assert_eq!(check_sense(run(&l, &[op::INQUIRY, 0, 0x80, 0, 255, 0])), Sense::INVALID_FIELD);
    // Allocation length truncates.
    assert_eq!(data(run(&l, &[op::INQUIRY, 0, 0, 0, 5, 0])).len(), 5);
    // READ CAPACITY(10) saturates above 2^32 blocks; (16) has the truth.
    let rc = data(run(&l, &[op::READ_CAPACITY_10, 0, 0, 0, 0, 0, 0, 0, 0, 0]));
    assert_eq!(&rc[0..4], &[0xff; 4]);
    let mut c16 = [0u8; 16];
    c16[0] = op::SERVICE_ACTION_IN_16;
    c16[1] = 0x10;
    c16[13] = 32;
    let rc = data(run(&l, &c16));
    assert_eq!(u64::from_be_bytes(rc[0..8].try_into().unwrap()), (5u64 << 30) - 1);
    assert_eq!(rc[14] & 0xc0, 0xc0, "LBPME and LBPRZ");
    // A missing LUN: INQUIRY says so, other commands fail.
    let t = Target { lun: None, luns: &[0] };
    assert_eq!(data(execute(&t, &[op::INQUIRY, 0, 0, 0, 36, 0], 0, 36, &[]))[0], 0x7f);
    assert_eq!(check_sense(execute(&t, &[op::TEST_UNIT_READY, 0, 0, 0, 0, 0], 0, 0, &[])), Sense::LUN_NOT_SUPPORTED);
    let rl = data(execute(&t, &[op::REPORT_LUNS, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0], 0, 256, &[]));
    assert_eq!(rl.len(), 16);
}

#[test]
fn unmap_write_same_and_mode_pages() {
    let l = lun(1000);
    let t = Target { lun: Some(&l), luns: &[0] };
    let mut p = vec![0u8; 8 + 32];
    p[2..4].copy_from_slice(&32u16.to_be_bytes());
    p[8..16].copy_from_slice(&10u64.to_be_bytes());
    p[16..20].copy_from_slice(&4u32.to_be_bytes());
    p[24..32].copy_from_slice(&100u64.to_be_bytes());
    p[32..36].copy_from_slice(&1u32.to_be_bytes());
    let cdb = [op::UNMAP, 0, 0, 0, 0, 0, 0, 0, 40, 0];
    assert_eq!(execute(&t, &cdb, 40, 0, &p), Action::Discard { ranges: vec![(5120, 2048), (51200, 512)] });
    p[24..32].copy_from_slice(&999u64.to_be_bytes());
    p[32..36].copy_from_slice(&2u32.to_be_bytes());
    assert_eq!(check_sense(execute(&t, &cdb, 40, 0, &p)), Sense::LBA_OUT_OF_RANGE);
    p[2..4].copy_from_slice(&33u16.to_be_bytes());
    assert_eq!(check_sense(execute(&t, &cdb, 40, 0, &p)), Sense::INVALID_PARAM_LIST);
    // WRITE SAME(16) with UNMAP of zeros punches; a pattern is written.
    let mut ws = [0u8; 16];
    ws[0] = op::WRITE_SAME_16;
    ws[1] = 0x08;
    ws[2..10].copy_from_slice(&8u64.to_be_bytes());
    ws[10..14].copy_from_slice(&4u32.to_be_bytes());
    assert_eq!(execute(&t, &ws, 512, 0, &[0u8; 512]), Action::Discard { ranges: vec![(4096, 2048)] });
    match execute(&t, &ws, 512, 0, &[7u8; 512]) {
        Action::WriteBuf { offset: 4096, data, .. } => assert!(data.len() == 2048 && data.iter().all(|&b| b == 7)),
        o => panic!("{o:?}"),
    }
    // MODE SENSE caching page, then MODE SELECT turns WCE off.
    let ms = data(execute(&t, &[op::MODE_SENSE_6, 0x08, 0x08, 0, 255, 0], 0, 255, &[]));
    assert_eq!(ms[3], 0, "no block descriptor with DBD");
    assert_eq!(&ms[4..6], &[0x08, 18]);
    assert_eq!(ms[6] & 0x04, 0x04, "WCE on");
    let mut sel = vec![0u8; 4];
    sel.extend_from_slice(&ms[4..24]);
    sel[6] &= !0x04;
    assert_eq!(data(execute(&t, &[op::MODE_SELECT_6, 0x10, 0, 0, 24, 0], 24, 0, &sel)), Vec::<u8>::new());
    assert!(!l.wce());
    // Changing another caching bit is refused.
    sel[7] = 0xff;
    assert_eq!(check_sense(execute(&t, &[op::MODE_SELECT_6, 0x10, 0, 0, 24, 0], 24, 0, &sel)), Sense::INVALID_PARAM_LIST);
    // Saved values are not supported; an unknown page is an invalid field.
    assert_eq!(check_sense(run(&l, &[op::MODE_SENSE_6, 0, 0xc8, 0, 255, 0])), Sense::SAVING_NOT_SUPPORTED);
    assert_eq!(check_sense(run(&l, &[op::MODE_SENSE_6, 0, 0x1c, 0, 255, 0])), Sense::INVALID_FIELD);
    // REPORT SUPPORTED OPERATION CODES lists READ(16).
    let rs = data(run(&l, &[op::MAINTENANCE_IN, 0x0c, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0]));
    assert!(rs[4..].chunks(8).any(|e| e[0] == op::READ_16));
}

#[test]
fn sense_format_and_errno_mapping() {
    let s = Sense::LBA_OUT_OF_RANGE.fixed();
    assert_eq!((s[0], s[2], s[7], s[12], s[13]), (0x70, 0x05, 10, 0x21, 0x00));
    assert_eq!(Sense::from_errno(libc::EIO, false), Sense::READ_ERROR);
    assert_eq!(Sense::from_errno(libc::EIO, true), Sense::WRITE_ERROR);
    assert_eq!(Sense::from_errno(libc::ENOSPC, true), Sense::SPACE_ALLOC_FAILED);
}
