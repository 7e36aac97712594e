//! A SCSI block target (SBC-3/SPC-4 subset), independent of the transport:
//! it decodes CDBs into actions (data to return, or file I/O to perform)
//! and builds fixed-format sense data. Every CDB field is validated.

pub mod sense;

use std::sync::atomic::{AtomicBool, Ordering};

pub use sense::Sense;

/// SCSI status codes.
pub const GOOD: u8 = 0x00;
pub const CHECK_CONDITION: u8 = 0x02;

/// Limits advertised in the Block Limits VPD page, in blocks.
pub const MAX_TRANSFER_BLOCKS: u32 = 0x8000; // 16 MiB at 512 B
pub const MAX_UNMAP_BLOCKS: u32 = 0x20_0000; // 1 GiB at 512 B
pub const MAX_UNMAP_DESCRIPTORS: u32 = 256;
pub const MAX_WRITE_SAME_BLOCKS: u64 = 0x20_0000;
/// Largest parameter list (UNMAP, MODE SELECT) or WRITE SAME block taken.
pub const MAX_PARAM_LEN: usize = 64 << 10;

/// One logical unit backed by a file or block device.
#[derive(Debug)]
pub struct Lun {
    pub blocks: u64,
    pub block_size: u32,
    pub readonly: bool,
    /// Write cache enabled (MODE SELECT caching page). When off, every
    /// write is followed by fdatasync before it completes.
    wce: AtomicBool,
    pub serial: String,
    /// Whether the backing file can punch holes (UNMAP, WRITE SAME).
    pub discard: bool,
}

impl Lun {
    pub fn new(size_bytes: u64, block_size: u32, readonly: bool, serial: &str) -> Lun {
        Lun {
            blocks: size_bytes / u64::from(block_size),
            block_size,
            readonly,
            wce: AtomicBool::new(true),
            serial: serial.chars().filter(|c| c.is_ascii_graphic()).take(20).collect(),
            discard: true,
        }
    }

    pub fn wce(&self) -> bool {
        self.wce.load(Ordering::Relaxed)
    }

    pub fn set_wce(&self, on: bool) {
        self.wce.store(on, Ordering::Relaxed);
    }
}

/// What the transport must do for a command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Finished: status, sense (for CHECK CONDITION) and data-in bytes
    /// (truncated by the transport to the buffer the initiator gave).
    Done { status: u8, sense: Option<Sense>, data: Vec<u8> },
    /// Read `len` bytes at `offset` into the data-in buffer.
    Read { offset: u64, len: u64 },
    /// Write `len` bytes at `offset` from the data-out buffer; `sync`:
    /// fdatasync before completing (FUA or write cache disabled).
    Write { offset: u64, len: u64, sync: bool },
    /// Write `data` (built here, e.g. WRITE SAME) at `offset`.
    WriteBuf { offset: u64, data: Vec<u8>, sync: bool },
    /// fdatasync.
    Flush,
    /// Punch holes (offset, len) in bytes; reads of them return zeros.
    Discard { ranges: Vec<(u64, u64)> },
}

impl Action {
    pub fn good(data: Vec<u8>) -> Action {
        Action::Done { status: GOOD, sense: None, data }
    }
    pub fn check(sense: Sense) -> Action {
        Action::Done { status: CHECK_CONDITION, sense: Some(sense), data: Vec::new() }
    }
}

pub mod op {
    pub const TEST_UNIT_READY: u8 = 0x00;
    pub const REQUEST_SENSE: u8 = 0x03;
    pub const READ_6: u8 = 0x08;
    pub const WRITE_6: u8 = 0x0a;
    pub const INQUIRY: u8 = 0x12;
    pub const MODE_SELECT_6: u8 = 0x15;
    pub const MODE_SENSE_6: u8 = 0x1a;
    pub const START_STOP_UNIT: u8 = 0x1b;
    pub const PREVENT_ALLOW: u8 = 0x1e;
    pub const READ_CAPACITY_10: u8 = 0x25;
    pub const READ_10: u8 = 0x28;
    pub const WRITE_10: u8 = 0x2a;
    pub const VERIFY_10: u8 = 0x2f;
    pub const SYNCHRONIZE_CACHE_10: u8 = 0x35;
    pub const WRITE_SAME_10: u8 = 0x41;
    pub const UNMAP: u8 = 0x42;
    pub const MODE_SELECT_10: u8 = 0x55;
    pub const MODE_SENSE_10: u8 = 0x5a;
    pub const READ_16: u8 = 0x88;
    pub const WRITE_16: u8 = 0x8a;
    pub const VERIFY_16: u8 = 0x8f;
    pub const SYNCHRONIZE_CACHE_16: u8 = 0x91;
    pub const WRITE_SAME_16: u8 = 0x93;
    pub const SERVICE_ACTION_IN_16: u8 = 0x9e;
    pub const REPORT_LUNS: u8 = 0xa0;
    pub const MAINTENANCE_IN: u8 = 0xa3;
    pub const READ_12: u8 = 0xa8;
    pub const WRITE_12: u8 = 0xaa;
}

/// Opcodes (and service actions) reported by REPORT SUPPORTED OPERATION
/// CODES, with their CDB lengths.
const SUPPORTED: &[(u8, Option<u16>, u16)] = &[
    (op::TEST_UNIT_READY, None, 6),
    (op::REQUEST_SENSE, None, 6),
    (op::READ_6, None, 6),
    (op::WRITE_6, None, 6),
    (op::INQUIRY, None, 6),
    (op::MODE_SELECT_6, None, 6),
    (op::MODE_SENSE_6, None, 6),
    (op::START_STOP_UNIT, None, 6),
    (op::PREVENT_ALLOW, None, 6),
    (op::READ_CAPACITY_10, None, 10),
    (op::READ_10, None, 10),
    (op::WRITE_10, None, 10),
    (op::VERIFY_10, None, 10),
    (op::SYNCHRONIZE_CACHE_10, None, 10),
    (op::WRITE_SAME_10, None, 10),
    (op::UNMAP, None, 10),
    (op::MODE_SELECT_10, None, 10),
    (op::MODE_SENSE_10, None, 10),
    (op::READ_16, None, 16),
    (op::WRITE_16, None, 16),
    (op::VERIFY_16, None, 16),
    (op::SYNCHRONIZE_CACHE_16, None, 16),
    (op::WRITE_SAME_16, None, 16),
    (op::SERVICE_ACTION_IN_16, Some(0x10), 16),
    (op::REPORT_LUNS, None, 12),
    (op::MAINTENANCE_IN, Some(0x0c), 12),
    (op::READ_12, None, 12),
    (op::WRITE_12, None, 12),
];

/// Commands whose data-out buffer the target itself must read (parameter
/// lists, the WRITE SAME block); the transport copies it, bounded.
pub fn wants_data_out(cdb: &[u8]) -> bool {
    matches!(cdb.first(), Some(&(op::UNMAP | op::MODE_SELECT_6 | op::MODE_SELECT_10 | op::WRITE_SAME_10 | op::WRITE_SAME_16)))
}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}
fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}
fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
}

/// The CDB length for an opcode's group, or None for reserved groups.
pub fn cdb_len(opcode: u8) -> Option<usize> {
    match opcode >> 5 {
        0 => Some(6),
        1 | 2 => Some(10),
        4 => Some(16),
        5 => Some(12),
        _ => None,
    }
}

/// Context a command runs in: the unit and the target's LUN list.
pub struct Target<'a> {
    pub lun: Option<&'a Lun>,
    pub luns: &'a [u16],
}

/// Decodes `cdb` (length already checked by the transport against its
/// cdb_size) into an action. `data_out_len` is the initiator's data-out
/// length, `data_in_len` its data-in length; `params` is the copied
/// data-out for [`wants_data_out`] commands.
pub fn execute(t: &Target, cdb: &[u8], data_out_len: u64, data_in_len: u64, params: &[u8]) -> Action {
    let mut a = decode(t, cdb, data_out_len, data_in_len, params);
    // Data-in never exceeds the driver's buffer, whatever the command's
    // own length (READ CAPACITY(10) has none): the transport reports the
    // rest as residual.
    if let Action::Done { data, .. } = &mut a {
        data.truncate(usize::try_from(data_in_len).unwrap_or(usize::MAX));
    }
    a
}

fn decode(t: &Target, cdb: &[u8], data_out_len: u64, data_in_len: u64, params: &[u8]) -> Action {
    let Some(&opcode) = cdb.first() else { return Action::check(Sense::INVALID_OPCODE) };
    match cdb_len(opcode) {
        Some(n) if cdb.len() >= n => {}
        _ => return Action::check(Sense::INVALID_OPCODE),
    }
    // Commands valid without a unit (SPC-4 8.2: INQUIRY, REPORT LUNS,
    // REQUEST SENSE report a missing LUN their own way).
    let Some(lun) = t.lun else {
        return match opcode {
            op::INQUIRY => inquiry_no_lun(cdb),
            op::REPORT_LUNS => report_luns(t.luns, cdb),
            op::REQUEST_SENSE => Action::good(alloc(Sense::LUN_NOT_SUPPORTED.fixed().to_vec(), cdb[4] as usize)),
            _ => Action::check(Sense::LUN_NOT_SUPPORTED),
        };
    };
    match opcode {
        op::TEST_UNIT_READY | op::START_STOP_UNIT | op::PREVENT_ALLOW => Action::good(vec![]),
        op::REQUEST_SENSE => Action::good(alloc(Sense::NO_SENSE.fixed().to_vec(), cdb[4] as usize)),
        op::INQUIRY => inquiry(lun, cdb),
        op::REPORT_LUNS => report_luns(t.luns, cdb),
        op::READ_CAPACITY_10 => {
            let last = lun.blocks.saturating_sub(1).min(0xffff_ffff) as u32;
            let mut d = last.to_be_bytes().to_vec();
            d.extend_from_slice(&lun.block_size.to_be_bytes());
            Action::good(d)
        }
        op::SERVICE_ACTION_IN_16 if cdb[1] & 0x1f == 0x10 => {
            let mut d = vec![0u8; 32];
            d[0..8].copy_from_slice(&lun.blocks.saturating_sub(1).to_be_bytes());
            d[8..12].copy_from_slice(&lun.block_size.to_be_bytes());
            if lun.discard {
                d[14] = 0x80 | 0x40; // LBPME, LBPRZ
            }
            Action::good(alloc(d, be32(&cdb[10..14]) as usize))
        }
        op::READ_6 | op::READ_10 | op::READ_12 | op::READ_16 | op::WRITE_6 | op::WRITE_10 | op::WRITE_12 | op::WRITE_16 => {
            rw(lun, cdb, data_out_len, data_in_len)
        }
        op::VERIFY_10 | op::VERIFY_16 => {
            if cdb[1] & 0x06 != 0 {
                return Action::check(Sense::INVALID_FIELD); // BYTCHK: no compare support
            }
            let (lba, n) = if opcode == op::VERIFY_10 {
                (u64::from(be32(&cdb[2..6])), u64::from(be16(&cdb[7..9])))
            } else {
                (be64(&cdb[2..10]), u64::from(be32(&cdb[10..14])))
            };
            match range(lun, lba, n) {
                Ok(_) => Action::good(vec![]),
                Err(s) => Action::check(s),
            }
        }
        op::SYNCHRONIZE_CACHE_10 | op::SYNCHRONIZE_CACHE_16 => Action::Flush,
        op::UNMAP => unmap(lun, params, data_out_len),
        op::WRITE_SAME_10 | op::WRITE_SAME_16 => write_same(lun, cdb, params),
        op::MODE_SENSE_6 | op::MODE_SENSE_10 => mode_sense(lun, cdb),
        op::MODE_SELECT_6 | op::MODE_SELECT_10 => mode_select(lun, cdb, params),
        op::MAINTENANCE_IN if cdb[1] & 0x1f == 0x0c => report_opcodes(cdb),
        _ => Action::check(Sense::INVALID_OPCODE),
    }
}

/// Truncates to the CDB's allocation length.
fn alloc(mut d: Vec<u8>, len: usize) -> Vec<u8> {
    d.truncate(len);
    d
}

/// Checks `lba..lba+n` against the capacity; returns the byte range.
fn range(lun: &Lun, lba: u64, n: u64) -> Result<(u64, u64), Sense> {
    match lba.checked_add(n) {
        Some(end) if end <= lun.blocks => Ok((lba * u64::from(lun.block_size), n * u64::from(lun.block_size))),
        _ => Err(Sense::LBA_OUT_OF_RANGE),
    }
}

fn rw(lun: &Lun, cdb: &[u8], data_out_len: u64, data_in_len: u64) -> Action {
    let opcode = cdb[0];
    let write = matches!(opcode, op::WRITE_6 | op::WRITE_10 | op::WRITE_12 | op::WRITE_16);
    let (lba, n, fua) = match opcode {
        op::READ_6 | op::WRITE_6 => {
            let lba = u64::from(be32(&cdb[0..4]) & 0x1f_ffff);
            let n = if cdb[4] == 0 { 256 } else { u64::from(cdb[4]) };
            (lba, n, false)
        }
        op::READ_10 | op::WRITE_10 => (u64::from(be32(&cdb[2..6])), u64::from(be16(&cdb[7..9])), cdb[1] & 0x08 != 0),
        op::READ_12 | op::WRITE_12 => (u64::from(be32(&cdb[2..6])), u64::from(be32(&cdb[6..10])), cdb[1] & 0x08 != 0),
        _ => (be64(&cdb[2..10]), u64::from(be32(&cdb[10..14])), cdb[1] & 0x08 != 0),
    };
    // RDPROTECT/WRPROTECT need protection information we do not have.
    if opcode != op::READ_6 && opcode != op::WRITE_6 && cdb[1] & 0xe0 != 0 {
        return Action::check(Sense::INVALID_FIELD);
    }
    if write && lun.readonly {
        return Action::check(Sense::WRITE_PROTECTED);
    }
    if n > u64::from(MAX_TRANSFER_BLOCKS) {
        return Action::check(Sense::INVALID_FIELD);
    }
    let (offset, len) = match range(lun, lba, n) {
        Ok(r) => r,
        Err(s) => return Action::check(s),
    };
    if len == 0 {
        return Action::good(vec![]);
    }
    let have = if write { data_out_len } else { data_in_len };
    if have < len {
        // The initiator's buffer cannot hold the transfer it asked for.
        return Action::check(Sense::INVALID_FIELD);
    }
    if write {
        Action::Write { offset, len, sync: fua || !lun.wce() }
    } else {
        Action::Read { offset, len }
    }
}

fn inquiry_no_lun(cdb: &[u8]) -> Action {
    let mut d = vec![0u8; 36];
    d[0] = 0x7f; // peripheral qualifier 3: no unit here
    d[2] = 0x06;
    d[3] = 0x02;
    d[4] = 31;
    Action::good(alloc(d, be16(&cdb[3..5]) as usize))
}

fn pad(s: &str, n: usize) -> Vec<u8> {
    let mut v: Vec<u8> = s.bytes().take(n).collect();
    v.resize(n, b' ');
    v
}

fn inquiry(lun: &Lun, cdb: &[u8]) -> Action {
    let evpd = cdb[1] & 0x01 != 0;
    let page = cdb[2];
    let len = be16(&cdb[3..5]) as usize;
    if !evpd {
        if page != 0 {
            return Action::check(Sense::INVALID_FIELD);
        }
        let mut d = vec![0u8; 36];
        d[0] = 0x00; // direct-access block device
        d[2] = 0x06; // SPC-4
        d[3] = 0x02; // response data format 2
        d[4] = 31;
        d[7] = 0x02; // CmdQue
        d[8..16].copy_from_slice(&pad("RINGVM", 8));
        d[16..32].copy_from_slice(&pad("RINGVM DISK", 16));
        d[32..36].copy_from_slice(&pad(&env!("CARGO_PKG_VERSION").replace('.', ""), 4));
        return Action::good(alloc(d, len));
    }
    let body: Vec<u8> = match page {
        0x00 => vec![0x00, 0x80, 0x83, 0xb0, 0xb1, 0xb2],
        0x80 => lun.serial.as_bytes().to_vec(),
        0x83 => {
            // One T10 vendor ID designator: vendor + serial.
            let mut id = pad("RINGVM", 8);
            id.extend_from_slice(lun.serial.as_bytes());
            let mut d = vec![0x02, 0x01, 0x00, id.len() as u8]; // ASCII, T10 vendor id, LU association
            d.extend_from_slice(&id);
            d
        }
        0xb0 => {
            let mut d = vec![0u8; 0x3c];
            d[1] = 0; // WSNZ=0
            d[4..8].copy_from_slice(&MAX_TRANSFER_BLOCKS.to_be_bytes());
            d[8..12].copy_from_slice(&(128u32).to_be_bytes()); // optimal transfer length
            if lun.discard {
                d[16..20].copy_from_slice(&MAX_UNMAP_BLOCKS.to_be_bytes());
                d[20..24].copy_from_slice(&MAX_UNMAP_DESCRIPTORS.to_be_bytes());
                d[24..28].copy_from_slice(&(8u32).to_be_bytes()); // optimal unmap granularity (4 KiB)
            }
            d[32..40].copy_from_slice(&MAX_WRITE_SAME_BLOCKS.to_be_bytes());
            d
        }
        0xb1 => {
            let mut d = vec![0u8; 0x3c];
            d[0..2].copy_from_slice(&1u16.to_be_bytes()); // non-rotating
            d
        }
        0xb2 => {
            let mut d = vec![0u8; 4];
            if lun.discard {
                d[1] = 0x80 | 0x40 | 0x20 | 0x04; // LBPU, LBPWS, LBPWS10, LBPRZ
                d[2] = 0x02; // thin provisioned
            }
            d
        }
        _ => return Action::check(Sense::INVALID_FIELD),
    };
    let mut d = vec![0x00, page];
    d.extend_from_slice(&(body.len() as u16).to_be_bytes());
    d.extend_from_slice(&body);
    Action::good(alloc(d, len))
}

/// LUN number in the single-level format virtio-scsi and Linux use.
pub fn encode_lun(lun: u16) -> [u8; 8] {
    let mut b = [0u8; 8];
    if lun < 256 {
        b[1] = lun as u8;
    } else {
        b[0] = 0x40 | (lun >> 8) as u8;
        b[1] = lun as u8;
    }
    b
}

fn report_luns(luns: &[u16], cdb: &[u8]) -> Action {
    let len = be32(&cdb[6..10]) as usize;
    if len < 16 {
        return Action::check(Sense::INVALID_FIELD);
    }
    let mut d = ((luns.len() * 8) as u32).to_be_bytes().to_vec();
    d.extend_from_slice(&[0; 4]);
    for &l in luns {
        d.extend_from_slice(&encode_lun(l));
    }
    Action::good(alloc(d, len))
}

fn unmap(lun: &Lun, params: &[u8], data_out_len: u64) -> Action {
    if lun.readonly {
        return Action::check(Sense::WRITE_PROTECTED);
    }
    if !lun.discard {
        return Action::check(Sense::INVALID_OPCODE);
    }
    if data_out_len == 0 {
        return Action::good(vec![]);
    }
    if params.len() < 8 || (params.len() as u64) < data_out_len.min(MAX_PARAM_LEN as u64) {
        return Action::check(Sense::INVALID_PARAM_LIST);
    }
    let desc_len = be16(&params[2..4]) as usize;
    if !desc_len.is_multiple_of(16) || 8 + desc_len > params.len() || desc_len / 16 > MAX_UNMAP_DESCRIPTORS as usize {
        return Action::check(Sense::INVALID_PARAM_LIST);
    }
    let mut ranges = Vec::with_capacity(desc_len / 16);
    for d in params[8..8 + desc_len].chunks_exact(16) {
        let (lba, n) = (be64(&d[0..8]), u64::from(be32(&d[8..12])));
        if n > u64::from(MAX_UNMAP_BLOCKS) {
            return Action::check(Sense::INVALID_PARAM_LIST);
        }
        match range(lun, lba, n) {
            Ok((_, 0)) => {}
            Ok(r) => ranges.push(r),
            Err(s) => return Action::check(s),
        }
    }
    Action::Discard { ranges }
}

fn write_same(lun: &Lun, cdb: &[u8], params: &[u8]) -> Action {
    if lun.readonly {
        return Action::check(Sense::WRITE_PROTECTED);
    }
    let sixteen = cdb[0] == op::WRITE_SAME_16;
    let (lba, n) = if sixteen { (be64(&cdb[2..10]), u64::from(be32(&cdb[10..14]))) } else { (u64::from(be32(&cdb[2..6])), u64::from(be16(&cdb[7..9]))) };
    let ndob = sixteen && cdb[1] & 0x01 != 0;
    if cdb[1] & 0xe0 != 0 || n == 0 || n > MAX_WRITE_SAME_BLOCKS {
        return Action::check(Sense::INVALID_FIELD);
    }
    let (offset, len) = match range(lun, lba, n) {
        Ok(r) => r,
        Err(s) => return Action::check(s),
    };
    let bs = lun.block_size as usize;
    let zero = ndob || (params.len() >= bs && params[..bs].iter().all(|&b| b == 0));
    if !ndob && params.len() < bs {
        return Action::check(Sense::INVALID_FIELD);
    }
    // Zeroes on a LUN that discards (reads back as zeroes, LBPRZ) become a
    // discard whether or not the UNMAP bit (cdb[1] & 0x08) asked for one.
    if zero && lun.discard {
        return Action::Discard { ranges: vec![(offset, len)] };
    }
    let block = if ndob { vec![0u8; bs] } else { params[..bs].to_vec() };
    let data = block.repeat(n as usize);
    Action::WriteBuf { offset, data, sync: !lun.wce() }
}

fn caching_page(lun: &Lun, changeable: bool) -> Vec<u8> {
    let mut p = vec![0u8; 20];
    p[0] = 0x08;
    p[1] = 18;
    // WCE: changeable (the mask), or on.
    if changeable || lun.wce() {
        p[2] = 0x04;
    }
    p
}

fn control_page() -> Vec<u8> {
    let mut p = vec![0u8; 12];
    p[0] = 0x0a;
    p[1] = 10;
    p
}

fn mode_sense(lun: &Lun, cdb: &[u8]) -> Action {
    let six = cdb[0] == op::MODE_SENSE_6;
    let dbd = cdb[1] & 0x08 != 0;
    let pc = cdb[2] >> 6;
    let page = cdb[2] & 0x3f;
    let subpage = cdb[3];
    let len = if six { cdb[4] as usize } else { be16(&cdb[7..9]) as usize };
    if pc == 3 {
        return Action::check(Sense::SAVING_NOT_SUPPORTED);
    }
    if subpage != 0 && subpage != 0xff {
        return Action::check(Sense::INVALID_FIELD);
    }
    let changeable = pc == 1;
    let mut pages = Vec::new();
    match page {
        0x08 => pages.extend(caching_page(lun, changeable)),
        0x0a => pages.extend(if changeable { vec![0x0a, 10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0] } else { control_page() }),
        0x3f => {
            pages.extend(caching_page(lun, changeable));
            pages.extend(if changeable { vec![0x0a, 10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0] } else { control_page() });
        }
        _ => return Action::check(Sense::INVALID_FIELD),
    }
    let mut bd = Vec::new();
    if !dbd {
        bd = vec![0u8; 8];
        bd[0..4].copy_from_slice(&(lun.blocks.min(0xffff_ffff) as u32).to_be_bytes());
        bd[4..8].copy_from_slice(&lun.block_size.to_be_bytes());
        bd[4] = 0; // density code byte
    }
    let dsp = if lun.readonly { 0x80 } else { 0 } | 0x10; // WP, DPOFUA
    let mut d = if six {
        vec![0, 0, dsp, bd.len() as u8]
    } else {
        let mut h = vec![0u8; 8];
        h[3] = dsp;
        h[6..8].copy_from_slice(&(bd.len() as u16).to_be_bytes());
        h
    };
    d.extend(bd);
    d.extend(pages);
    if six {
        d[0] = (d.len() - 1).min(255) as u8;
    } else {
        let l = (d.len() - 2) as u16;
        d[0..2].copy_from_slice(&l.to_be_bytes());
    }
    Action::good(alloc(d, len))
}

fn mode_select(lun: &Lun, cdb: &[u8], params: &[u8]) -> Action {
    let six = cdb[0] == op::MODE_SELECT_6;
    if cdb[1] & 0x01 != 0 {
        return Action::check(Sense::SAVING_NOT_SUPPORTED); // SP
    }
    let len = if six { cdb[4] as usize } else { be16(&cdb[7..9]) as usize };
    if len == 0 {
        return Action::good(vec![]);
    }
    let hdr = if six { 4 } else { 8 };
    if params.len() < len || len < hdr {
        return Action::check(Sense::INVALID_PARAM_LIST);
    }
    let p = &params[..len];
    let bdl = if six { p[3] as usize } else { be16(&p[6..8]) as usize };
    let mut i = hdr + bdl;
    if i > p.len() {
        return Action::check(Sense::INVALID_PARAM_LIST);
    }
    let mut new_wce = None;
    while i < p.len() {
        if i + 2 > p.len() {
            return Action::check(Sense::INVALID_PARAM_LIST);
        }
        let (code, plen) = (p[i] & 0x3f, p[i + 1] as usize);
        if p[i] & 0x40 != 0 || i + 2 + plen > p.len() {
            return Action::check(Sense::INVALID_PARAM_LIST); // subpage format or truncated
        }
        let body = &p[i + 2..i + 2 + plen];
        match code {
            0x08 if plen >= 1 => {
                // Only WCE may change; everything else must match.
                let cur = caching_page(lun, false);
                let mut want = body.to_vec();
                want[0] &= !0x04;
                let mut have = cur[2..2 + plen.min(18)].to_vec();
                have[0] &= !0x04;
                if want[..have.len()] != have[..] {
                    return Action::check(Sense::INVALID_PARAM_LIST);
                }
                new_wce = Some(body[0] & 0x04 != 0);
            }
            0x0a if body.iter().all(|&b| b == 0) => {}
            _ => return Action::check(Sense::INVALID_PARAM_LIST),
        }
        i += 2 + plen;
    }
    if let Some(w) = new_wce {
        lun.set_wce(w);
    }
    Action::good(vec![])
}

fn report_opcodes(cdb: &[u8]) -> Action {
    let options = cdb[2] & 0x07;
    let len = be32(&cdb[6..10]) as usize;
    match options {
        0 => {
            let mut d = vec![0u8; 4];
            for &(opc, sa, l) in SUPPORTED {
                let mut e = vec![opc, 0, 0, 0, 0, 0, 0, 0];
                if let Some(sa) = sa {
                    e[2..4].copy_from_slice(&sa.to_be_bytes());
                    e[5] = 0x01; // SERVACTV
                }
                e[6..8].copy_from_slice(&l.to_be_bytes());
                d.extend(e);
            }
            let n = (d.len() - 4) as u32;
            d[0..4].copy_from_slice(&n.to_be_bytes());
            Action::good(alloc(d, len))
        }
        1 | 2 => {
            let (opc, sa) = (cdb[3], be16(&cdb[4..6]));
            let found = SUPPORTED.iter().find(|(o, s, _)| *o == opc && (options == 1 || *s == Some(sa)));
            let mut d = vec![0, if found.is_some() { 3 } else { 1 }, 0, 0];
            if let Some((_, _, l)) = found {
                d[2..4].copy_from_slice(&l.to_be_bytes());
                let mut usage = vec![0xffu8; *l as usize];
                usage[0] = opc;
                d.extend(usage);
            }
            Action::good(alloc(d, len))
        }
        _ => Action::check(Sense::INVALID_FIELD),
    }
}

#[cfg(test)]
mod tests;
