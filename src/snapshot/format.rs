//! The state file, version 1 (docs/state-format.md): a header block, RAM at
//! fixed 1 MiB-aligned offsets (pages rewritten in later passes overwrite
//! their own place), per-region presence bitmaps and page checksums, the
//! vCPU/device state section, and a completion record written last.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use serde::{Deserialize, Serialize};

pub const MAGIC: &[u8; 8] = b"RINGVMST";
pub const STATE_MAGIC: &[u8; 8] = b"RVSTATE\0";
pub const COMPLETE_MAGIC: &[u8; 8] = b"RINGVMOK";
pub const VERSION: u32 = 1;
pub const HEADER_SIZE: u64 = 64 << 10;
pub const RAM_ALIGN: u64 = 1 << 20;
pub const PAGE: u64 = 4096;
const JSON_AT: usize = 32;

/// What is wrong with a state file, as the format sees it (the callers
/// add which file).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    #[error("not a ringvm state file (bad magic)")]
    BadMagic,
    #[error("state format version {0} is not supported (this ringvm reads version {VERSION})")]
    Version(u32),
    #[error("header of {0} bytes does not fit in {HEADER_SIZE}")]
    HeaderTooBig(usize),
    #[error("header length runs past the header block")]
    HeaderLength,
    #[error("header checksum mismatch")]
    HeaderChecksum,
    #[error("header: {0}")]
    Header(String),
    #[error("no completion record: the snapshot never finished")]
    NoCompletion,
    #[error("completion record checksum mismatch")]
    CompletionChecksum,
    #[error("completion record belongs to another header")]
    CompletionHeader,
    #[error("state section does not match the completion record")]
    StateMismatch,
    #[error("page bitmaps or checksums do not match the completion record")]
    MetaMismatch,
    #[error("device state of {size} bytes exceeds its section ({max})")]
    StateTooBig { size: usize, max: u64 },
    #[error("state section: {0}")]
    StateSection(String),
    #[error("state section checksum mismatch")]
    StateChecksum,
    #[error("file is truncated{0}")]
    Truncated(String),
    /// Reading the file failed (its errno).
    #[error("{0}")]
    Io(String),
    #[error(transparent)]
    Nfs(#[from] crate::nfs::NfsError),
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct DiskDesc {
    pub path: String,
    pub readonly: bool,
    /// cache=none.
    #[serde(default)]
    pub direct: bool,
    /// The iothread its controller is pinned to, if any.
    #[serde(default)]
    pub iothread: Option<usize>,
    /// A reflink of the disk taken during the final pause (`"disks":
    /// "clone"`): what a restore uses, as it matches the RAM.
    #[serde(default)]
    pub clone: Option<String>,
    /// Its `queues=` option, if given.
    #[serde(default)]
    pub queues: Option<u32>,
    /// Unplugged before the snapshot: a restore keeps its LUN slot empty
    /// (so the LUNs after it keep their numbers) and never opens it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub removed: bool,
    /// Its size in bytes when saved (files written before this field have
    /// none, and are not checked).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct MachineDesc {
    pub cpus: u8,
    pub mem_size: u64,
    pub disks: Vec<DiskDesc>,
    /// What a guest reset reloads after a restore.
    #[serde(default)]
    pub kernel: Option<String>,
    #[serde(default)]
    pub initrd: Option<String>,
    #[serde(default)]
    pub cmdline: String,
    /// Request queues per virtio-scsi controller and iothreads: the
    /// controllers a loader rebuilds must have the saved queue count.
    #[serde(default)]
    pub scsi_queues: u32,
    #[serde(default)]
    pub iothreads: usize,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct RegionDesc {
    pub gpa: u64,
    pub size: u64,
    /// File offset of the region's first page.
    pub offset: u64,
    /// One bit per page: present in the file (absent pages are zero).
    pub bitmap_offset: u64,
    /// One crc32c per page (0 for absent pages).
    pub crc_offset: u64,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub format: String,
    pub version: u32,
    pub created_unix: u64,
    pub machine: MachineDesc,
    pub regions: Vec<RegionDesc>,
    pub state_offset: u64,
    pub state_max: u64,
    pub completion_offset: u64,
    pub file_size: u64,
    /// This file's unique id (random; 0 in files written before it).
    #[serde(default)]
    pub id: u64,
    /// An incremental file: the file it builds on. Pages absent here come
    /// from the base (newest file wins); a page present here that is zero
    /// was written as zeros.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<BaseRef>,
}

/// The file an incremental snapshot builds on, and how to know it is the
/// very same file: its id and the checksum of its completion record.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct BaseRef {
    pub path: String,
    pub id: u64,
    pub completion_crc: u32,
    /// The base's own bases, newest first, as far as the snapshot that
    /// wrote this file knew them (a hint only: each link is still checked
    /// by id and completion checksum): a restore starts reading every
    /// file's header at once instead of one after the other.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ancestors: Vec<String>,
}

/// A new random file id.
pub fn new_file_id() -> u64 {
    let mut b = [0u8; 8];
    // SAFETY: getrandom fills our local buffer.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n != 8 {
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0);
        return t ^ (u64::from(std::process::id()) << 32) | 1;
    }
    u64::from_le_bytes(b) | 1
}

fn align(v: u64, a: u64) -> u64 {
    v.div_ceil(a) * a
}

impl RegionDesc {
    pub fn pages(&self) -> u64 {
        self.size / PAGE
    }
    pub fn bitmap_len(&self) -> u64 {
        self.pages().div_ceil(64) * 8
    }
    pub fn crc_len(&self) -> u64 {
        self.pages() * 4
    }
}

impl Header {
    /// Lays out a file for `ram` regions (gpa, size) and `machine`.
    pub fn layout(machine: MachineDesc, ram: &[(u64, u64)]) -> Header {
        let mut off = align(HEADER_SIZE, RAM_ALIGN);
        let mut regions = Vec::new();
        for &(gpa, size) in ram {
            let offset = align(off, RAM_ALIGN);
            off = offset + size;
            regions.push(RegionDesc { gpa, size, offset, bitmap_offset: 0, crc_offset: 0 });
        }
        off = align(off, PAGE);
        for r in &mut regions {
            r.bitmap_offset = off;
            off = align(off + r.bitmap_len(), PAGE);
            r.crc_offset = off;
            off = align(off + r.crc_len(), PAGE);
        }
        let state_offset = off;
        let state_max = (1 << 20) + 128 * 1024 * u64::from(machine.cpus);
        let completion_offset = align(state_offset + state_max, PAGE);
        let created_unix = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        Header {
            format: "ringvm-state".into(),
            version: VERSION,
            created_unix,
            machine,
            regions,
            state_offset,
            state_max,
            completion_offset,
            file_size: completion_offset + PAGE,
            id: new_file_id(),
            base: None,
        }
    }

    /// The header block: magic, version, JSON length and crc, JSON.
    pub fn encode(&self) -> Result<Vec<u8>, FormatError> {
        let json = serde_json::to_vec(self).map_err(|e| FormatError::Header(e.to_string()))?;
        if JSON_AT + json.len() > HEADER_SIZE as usize {
            return Err(FormatError::HeaderTooBig(json.len()));
        }
        let mut b = vec![0u8; HEADER_SIZE as usize];
        b[0..8].copy_from_slice(MAGIC);
        b[8..12].copy_from_slice(&VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&(json.len() as u32).to_le_bytes());
        b[16..20].copy_from_slice(&crc32c::crc32c(&json).to_le_bytes());
        b[JSON_AT..JSON_AT + json.len()].copy_from_slice(&json);
        Ok(b)
    }

    /// Parses and checks a header block (untrusted input).
    pub fn decode(b: &[u8]) -> Result<(Header, u32), FormatError> {
        if b.len() < JSON_AT || &b[0..8] != MAGIC {
            return Err(FormatError::BadMagic);
        }
        let version = u32::from_le_bytes(b[8..12].try_into().unwrap_or_default());
        if version != VERSION {
            return Err(FormatError::Version(version));
        }
        let len = u32::from_le_bytes(b[12..16].try_into().unwrap_or_default()) as usize;
        let crc = u32::from_le_bytes(b[16..20].try_into().unwrap_or_default());
        let json = b.get(JSON_AT..JSON_AT + len).ok_or(FormatError::HeaderLength)?;
        if crc32c::crc32c(json) != crc {
            return Err(FormatError::HeaderChecksum);
        }
        let h: Header = serde_json::from_slice(json).map_err(|e| FormatError::Header(e.to_string()))?;
        h.validate()?;
        Ok((h, crc))
    }

    /// Internal consistency: every section inside the file, in order,
    /// aligned, non-overlapping.
    pub fn validate(&self) -> Result<(), FormatError> {
        if self.format != "ringvm-state" || self.version != VERSION {
            return Err(FormatError::Header("names another format".into()));
        }
        if self.machine.cpus == 0 || self.regions.is_empty() {
            return Err(FormatError::Header("no CPUs or no RAM regions".into()));
        }
        if self.regions.len() > 64 {
            return Err(FormatError::Header("too many RAM regions".into()));
        }
        let total = self.regions.iter().try_fold(0u64, |a, r| a.checked_add(r.size)).ok_or(FormatError::Header("region sizes overflow".into()))?;
        if total != self.machine.mem_size {
            return Err(FormatError::Header(format!("regions total {total} bytes but memory is {}", self.machine.mem_size)));
        }
        let mut end = HEADER_SIZE;
        for r in &self.regions {
            if r.size % PAGE != 0 || r.offset % RAM_ALIGN != 0 || r.offset < end {
                return Err(FormatError::Header(format!("region at {:#x} is misplaced", r.gpa)));
            }
            end = r.offset.checked_add(r.size).ok_or(FormatError::Header("region overflows".into()))?;
        }
        let bad = |what: String| Err(FormatError::Header(format!("{what} is misplaced")));
        for r in &self.regions {
            let bm_end = r.bitmap_offset.checked_add(r.bitmap_len());
            if r.bitmap_offset < end || bm_end.is_none_or(|e| r.crc_offset < e) {
                return bad(format!("metadata of region {:#x}", r.gpa));
            }
            match r.crc_offset.checked_add(r.crc_len()) {
                Some(e) => end = e,
                None => return bad(format!("metadata of region {:#x}", r.gpa)),
            }
        }
        let state_end = self.state_offset.checked_add(self.state_max);
        if self.state_offset < end
            || state_end.is_none_or(|e| self.completion_offset < e)
            || self.completion_offset.checked_add(PAGE) != Some(self.file_size)
            || self.state_max > 1 << 30
        {
            return bad("a section".into());
        }
        Ok(())
    }
}

/// The completion record: written last, after everything else is durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    pub header_crc: u32,
    pub state_crc: u32,
    pub meta_crc: u32,
    pub ram_bytes: u64,
}

impl Completion {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; PAGE as usize];
        b[0..8].copy_from_slice(COMPLETE_MAGIC);
        b[8..12].copy_from_slice(&VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&self.header_crc.to_le_bytes());
        b[16..20].copy_from_slice(&self.state_crc.to_le_bytes());
        b[20..24].copy_from_slice(&self.meta_crc.to_le_bytes());
        b[24..32].copy_from_slice(&self.ram_bytes.to_le_bytes());
        let crc = crc32c::crc32c(&b[0..32]);
        b[32..36].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// The checksum of this record (what an incremental file's base
    /// reference names).
    pub fn record_crc(&self) -> u32 {
        crc32c::crc32c(&self.encode()[0..32])
    }

    pub fn decode(b: &[u8]) -> Result<Completion, FormatError> {
        if b.len() < 36 || &b[0..8] != COMPLETE_MAGIC {
            return Err(FormatError::NoCompletion);
        }
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap_or_default());
        if crc32c::crc32c(&b[0..32]) != u32_at(32) {
            return Err(FormatError::CompletionChecksum);
        }
        Ok(Completion {
            header_crc: u32_at(12),
            state_crc: u32_at(16),
            meta_crc: u32_at(20),
            ram_bytes: u64::from_le_bytes(b[24..32].try_into().unwrap_or_default()),
        })
    }
}

/// How much of a state section a check reads first (see [`Opening::check`]).
const STATE_HEAD: u64 = 64 << 10;

/// The state section: magic, JSON length, crc, JSON.
pub fn encode_state(json: &[u8], max: u64) -> Result<(Vec<u8>, u32), FormatError> {
    if 24 + json.len() as u64 > max {
        return Err(FormatError::StateTooBig { size: json.len(), max });
    }
    let crc = crc32c::crc32c(json);
    let mut b = Vec::with_capacity(24 + json.len());
    b.extend_from_slice(STATE_MAGIC);
    b.extend_from_slice(&(json.len() as u64).to_le_bytes());
    b.extend_from_slice(&crc.to_le_bytes());
    b.extend_from_slice(&[0; 4]);
    b.extend_from_slice(json);
    Ok((b, crc))
}

pub fn decode_state(b: &[u8], max: u64) -> Result<(Vec<u8>, u32), FormatError> {
    if b.len() < 24 || &b[0..8] != STATE_MAGIC {
        return Err(FormatError::StateSection("bad magic".into()));
    }
    let len = u64::from_le_bytes(b[8..16].try_into().unwrap_or_default());
    let crc = u32::from_le_bytes(b[16..20].try_into().unwrap_or_default());
    match len.checked_add(24) {
        Some(end) if end <= max && end <= b.len() as u64 => {}
        _ => return Err(FormatError::StateSection(format!("length {len} out of range"))),
    }
    let json = &b[24..24 + len as usize];
    if crc32c::crc32c(json) != crc {
        return Err(FormatError::StateChecksum);
    }
    Ok((json.to_vec(), crc))
}

/// crc32c over all regions' bitmaps and crc tables, in order.
pub fn meta_crc(parts: &[(&[u8], &[u8])]) -> u32 {
    let mut c = 0u32;
    for (bm, crcs) in parts {
        c = crc32c::crc32c_append(c, bm);
        c = crc32c::crc32c_append(c, crcs);
    }
    c
}

/// Where a state file is read from: a local file or an `nfs://` URI.
pub enum Source {
    File(File),
    Nfs(crate::nfs::Nfs),
}

/// Opens a local state file for reading without blocking (a FIFO named as
/// a state file would hang the open); anything but a regular file is refused.
pub fn open_regular(path: &Path) -> Result<File, FormatError> {
    crate::boot::open_regular("state file", path).map_err(|e| {
        FormatError::Io(match e {
            crate::error::Error::OpenFile { source, .. } => format!("cannot open: {source}"),
            other => other.to_string(),
        })
    })
}

impl Source {
    pub fn open(path: &Path) -> Result<Source, FormatError> {
        match path.to_str() {
            Some(uri) if crate::nfs::is_uri(uri) => crate::nfs::Nfs::open(uri, false).map(Source::Nfs).map_err(FormatError::Nfs),
            _ => open_regular(path).map(Source::File),
        }
    }

    /// The state file's size: fallible, so no `is_empty` beside it.
    #[allow(clippy::len_without_is_empty)]
    pub fn len(&mut self) -> Result<u64, FormatError> {
        match self {
            Source::File(f) => f.metadata().map(|m| m.len()).map_err(|e| FormatError::Io(e.to_string())),
            Source::Nfs(n) => n.len().map_err(FormatError::Nfs),
        }
    }

    /// Reads up to `buf.len()` bytes at `offset` (fewer only at the end).
    pub fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<usize, FormatError> {
        match self {
            Source::File(f) => {
                let mut done = 0;
                while done < buf.len() {
                    match f.read_at(&mut buf[done..], offset + done as u64) {
                        Ok(0) => break,
                        Ok(n) => done += n,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(FormatError::Io(e.to_string())),
                    }
                }
                Ok(done)
            }
            Source::Nfs(n) => n.read_at(buf, offset).map_err(FormatError::Nfs),
        }
    }

    /// Asks the kernel to start reading `ranges` ((offset, length)) now,
    /// in parallel (a local file; an NFS file is read as asked).
    pub fn prefetch(&self, ranges: &[(u64, u64)]) {
        if let Source::File(f) = self {
            for &(offset, len) in ranges {
                let (Ok(o), Ok(l)) = (i64::try_from(offset), i64::try_from(len)) else { continue };
                // SAFETY: advice on our own open descriptor; it never
                // changes the file or our memory.
                unsafe { libc::posix_fadvise(std::os::fd::AsRawFd::as_raw_fd(f), o, l, libc::POSIX_FADV_WILLNEED) };
            }
        }
    }

    /// The parts of `[offset, offset + len)` that hold data, as (offset,
    /// length): a local file's holes are left out (SEEK_DATA/SEEK_HOLE);
    /// where that cannot be told (NFS, a filesystem without it, an
    /// error), all of it.
    pub fn data_in(&self, offset: u64, len: u64) -> Vec<(u64, u64)> {
        let all = vec![(offset, len)];
        let Source::File(f) = self else { return all };
        let fd = std::os::fd::AsRawFd::as_raw_fd(f);
        let end = offset.saturating_add(len);
        let seek = |at: u64, whence| -> Option<u64> {
            let at = i64::try_from(at).ok()?;
            // SAFETY: lseek on our own descriptor; reads here use pread,
            // so the file position it moves is not used.
            let r = unsafe { libc::lseek(fd, at, whence) };
            u64::try_from(r).ok()
        };
        let mut parts = Vec::new();
        let mut at = offset;
        while at < end {
            let Some(data) = seek(at, libc::SEEK_DATA) else {
                // ENXIO: no data from here to the end of the file.
                if std::io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO) {
                    break;
                }
                return all;
            };
            if data >= end {
                break;
            }
            let Some(hole) = seek(data, libc::SEEK_HOLE) else { return all };
            let stop = hole.min(end);
            if stop <= data {
                return all;
            }
            parts.push((data, stop - data));
            at = stop;
        }
        parts
    }

    /// Reads a metadata table of `len` bytes at `offset`, only the parts
    /// [`Self::data_in`] finds: the rest of the buffer stays zero and
    /// untouched (a large zeroed allocation is mapped on demand).
    fn read_table(&mut self, offset: u64, len: u64) -> Result<Table, FormatError> {
        let mut bytes = vec![0u8; len as usize];
        let mut data = Vec::new();
        for (o, n) in self.data_in(offset, len) {
            let s = (o - offset) as usize;
            self.read_exact_at(&mut bytes[s..s + n as usize], o)?;
            data.push((s, s + n as usize));
        }
        Ok(Table { bytes, data })
    }

    pub fn read_exact_at(&mut self, buf: &mut [u8], offset: u64) -> Result<(), FormatError> {
        let n = self.read_at(buf, offset)?;
        if n < buf.len() {
            return Err(FormatError::Truncated(format!(": {} bytes at offset {offset:#x} missing", buf.len() - n)));
        }
        Ok(())
    }
}

/// A metadata table as read: its bytes, and the parts of them the file
/// held data for (start, end); the rest were holes, zero.
struct Table {
    bytes: Vec<u8>,
    data: Vec<(usize, usize)>,
}

impl Table {
    /// `crc` extended over the table, its holes as zeros (from a small
    /// static block, so the buffer's untouched pages stay untouched).
    fn crc_append(&self, mut crc: u32) -> u32 {
        static ZEROS: [u8; 64 << 10] = [0; 64 << 10];
        let zeros = |mut c: u32, mut n: usize| {
            while n > 0 {
                let k = n.min(ZEROS.len());
                c = crc32c::crc32c_append(c, &ZEROS[..k]);
                n -= k;
            }
            c
        };
        let mut at = 0;
        for &(s, e) in &self.data {
            crc = zeros(crc, s - at);
            crc = crc32c::crc32c_append(crc, &self.bytes[s..e]);
            at = e;
        }
        zeros(crc, self.bytes.len() - at)
    }
}

/// A state file whose header, completion record, state section and
/// metadata all checked out; RAM pages are checked as they are read.
pub struct Checked {
    pub src: Source,
    pub header: Header,
    pub state_json: Vec<u8>,
    /// Per region: the presence bitmap.
    pub bitmaps: Vec<Vec<u8>>,
    /// Per region: every page's checksum, shared with the loaders.
    pub crcs: CrcTables,
    pub completion: Completion,
    pub len: u64,
}

impl Checked {
    pub fn present(&self, r: usize, p: u64) -> bool {
        self.bitmaps[r][(p / 8) as usize] & (1 << (p % 8)) != 0
    }
    pub fn crc(&self, r: usize, p: u64) -> u32 {
        self.crcs.get(r, p)
    }
}

/// A state file's crc tables (per region, one little-endian crc32c per
/// page, as in the file), shared: the loaders check pages against them
/// where they are, without a copy per loader (a 4 GiB guest's table is
/// 4 MiB, and a 17-file chain has 17).
#[derive(Clone, Default)]
pub struct CrcTables(std::sync::Arc<Vec<Vec<u8>>>);

impl CrcTables {
    pub fn new(tables: Vec<Vec<u8>>) -> CrcTables {
        CrcTables(std::sync::Arc::new(tables))
    }

    /// Page `p` of region `r`'s checksum (0 for a page past the table:
    /// callers only ask for pages the header lays out, which the table
    /// covers once checked).
    pub fn get(&self, r: usize, p: u64) -> u32 {
        let Some(t) = self.0.get(r) else { return 0 };
        let at = (p as usize).saturating_mul(4);
        t.get(at..at.saturating_add(4)).map_or(0, |b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
}

/// The checked header of an open state file (and the file's length): the
/// machine it describes, without reading the rest.
fn header_of(src: &mut Source) -> Result<(Header, u32, u64), FormatError> {
    let len = src.len()?;
    let mut hb = vec![0u8; HEADER_SIZE as usize];
    let n = src.read_at(&mut hb, 0)?;
    if n < JSON_AT {
        return Err(FormatError::Truncated(" (no header)".into()));
    }
    let (header, hcrc) = Header::decode(&hb[..n])?;
    if len < header.file_size {
        return Err(FormatError::Truncated(format!(": {len} bytes, its layout needs {}", header.file_size)));
    }
    Ok((header, hcrc, len))
}

/// Reads and checks only the header of `path` (what machine to build);
/// [`open_checked`] does the full check before anything is loaded.
pub fn read_header(path: &Path) -> Result<Header, FormatError> {
    header_of(&mut Source::open(path)?).map(|h| h.0)
}

/// Opens `path` (a file or an `nfs://` URI) and checks everything but the RAM pages.
pub fn open_checked(path: &Path) -> Result<Checked, FormatError> {
    open_header(path)?.check()
}

/// A state file opened, its header checked, and the reads of the rest of
/// its checks (state section, metadata, completion record) already
/// started ([`Opening::check`] finishes them): a chain's files are opened
/// this way first, so their metadata is read all at once rather than file
/// after file, 128 KiB of readahead at a time.
pub struct Opening {
    src: Source,
    pub header: Header,
    hcrc: u32,
    len: u64,
}

/// Starts reading the headers of local state files `names` (names that do
/// not open as regular files are skipped, at once: a FIFO never blocks
/// here, and the walk that follows reports what is wrong).
pub fn prefetch_headers(names: &[&str]) {
    for n in names.iter().filter(|n| !crate::nfs::is_uri(n)) {
        if let Ok(f) = open_regular(Path::new(n)) {
            Source::File(f).prefetch(&[(0, HEADER_SIZE)]);
        }
    }
}

pub fn open_header(path: &Path) -> Result<Opening, FormatError> {
    let mut src = Source::open(path)?;
    let (header, hcrc, len) = header_of(&mut src)?;
    let mut ranges = vec![(header.completion_offset, PAGE), (header.state_offset, header.state_max.min(STATE_HEAD))];
    for r in &header.regions {
        ranges.extend(src.data_in(r.bitmap_offset, r.bitmap_len()));
        ranges.extend(src.data_in(r.crc_offset, r.crc_len()));
    }
    src.prefetch(&ranges);
    Ok(Opening { src, header, hcrc, len })
}

impl Opening {
    /// The completion record, state section and metadata, checked.
    pub fn check(self) -> Result<Checked, FormatError> {
        let Opening { mut src, header, hcrc, len } = self;
        let mut cb = vec![0u8; PAGE as usize];
        src.read_exact_at(&mut cb, header.completion_offset)?;
        let completion = Completion::decode(&cb)?;
        if completion.header_crc != hcrc {
            return Err(FormatError::CompletionHeader);
        }
        // The state section is laid out for its largest size (a MiB and
        // more); read its first 64 KiB, and the rest only if its JSON is
        // longer (decode_state checks the length against the layout).
        let mut sb = vec![0u8; header.state_max.min(STATE_HEAD) as usize];
        src.read_exact_at(&mut sb, header.state_offset)?;
        if sb.len() >= 24 && &sb[0..8] == STATE_MAGIC {
            let want = u64::from_le_bytes(sb[8..16].try_into().unwrap_or_default()).saturating_add(24).min(header.state_max);
            if want > sb.len() as u64 {
                let have = sb.len();
                sb.resize(want as usize, 0);
                src.read_exact_at(&mut sb[have..], header.state_offset + have as u64)?;
            }
        }
        let (state_json, scrc) = decode_state(&sb, header.state_max)?;
        if scrc != completion.state_crc {
            return Err(FormatError::StateMismatch);
        }
        // Each region's bitmap and crc table, only where the file holds
        // data: an incremental file's are almost all holes (see the save's
        // close), which read as zeros without the disk or a page touched.
        let (mut bitmaps, mut crcs, mut meta) = (Vec::new(), Vec::new(), 0u32);
        for r in &header.regions {
            let bm = src.read_table(r.bitmap_offset, r.bitmap_len())?;
            let c = src.read_table(r.crc_offset, r.crc_len())?;
            meta = c.crc_append(bm.crc_append(meta));
            bitmaps.push(bm.bytes);
            crcs.push(c.bytes);
        }
        if meta != completion.meta_crc {
            return Err(FormatError::MetaMismatch);
        }
        Ok(Checked { src, header, state_json, bitmaps, crcs: CrcTables::new(crcs), completion, len })
    }
}

/// What `state inspect` found.
pub struct Report {
    pub header: Header,
    pub lines: Vec<String>,
    pub ok: bool,
}

/// Reads `path` and checks every checksum: header, completion record,
/// state section, metadata, and every present page.
pub fn inspect(path: &Path) -> Result<Report, FormatError> {
    let mut c = open_checked(path)?;
    let h = c.header.clone();
    let mut lines = vec![
        format!("format: ringvm-state v{} (created {} unix)", h.version, h.created_unix),
        format!("machine: {} vCPU(s), {} MiB RAM, {} disk(s)", h.machine.cpus, h.machine.mem_size >> 20, h.machine.disks.len()),
        format!("file: {} bytes on disk, {} bytes laid out", c.len, h.file_size),
        format!("state section: {} bytes at {:#x}, crc ok", c.state_json.len(), h.state_offset),
    ];
    if let Some(b) = &h.base {
        lines.push(format!("incremental: pages not in this file come from {} (id {:#x})", b.path, b.id));
    }
    let mut ok = true;
    let mut page = vec![0u8; PAGE as usize];
    let mut total_present = 0u64;
    for (ri, r) in h.regions.iter().enumerate() {
        let mut present = 0u64;
        for p in 0..r.pages() {
            if !c.present(ri, p) {
                continue;
            }
            present += 1;
            c.src.read_exact_at(&mut page, r.offset + p * PAGE)?;
            if crc32c::crc32c(&page) != c.crc(ri, p) {
                if ok {
                    lines.push(format!("BAD: page at gpa {:#x} (file offset {:#x}) fails its checksum", r.gpa + p * PAGE, r.offset + p * PAGE));
                }
                ok = false;
            }
        }
        total_present += present;
        lines.push(format!("region gpa {:#x} size {} MiB at file {:#x}: {present} of {} pages present", r.gpa, r.size >> 20, r.offset, r.pages()));
    }
    lines.push(format!("completion record: ok ({} RAM bytes written in all passes; {} MiB present)", c.completion.ram_bytes, (total_present * PAGE) >> 20));
    lines.push(format!("checksums: {}", if ok { "all ok" } else { "FAILED" }));
    if h.base.is_some() {
        drop(c);
        match super::chain::open_chain(path) {
            Ok(chain) => {
                let names: Vec<String> = chain.iter().map(|(p, _)| p.display().to_string()).collect();
                lines.push(format!("chain: {} file(s), newest first: {}", chain.len(), names.join(" <- ")));
            }
            Err(e) => {
                ok = false;
                lines.push(format!("chain BROKEN: {e}"));
            }
        }
    }
    Ok(Report { header: h, lines, ok })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> Header {
        Header::layout(
            MachineDesc { cpus: 2, mem_size: 4 << 30, disks: vec![], kernel: None, initrd: None, cmdline: String::new(), scsi_queues: 0, iothreads: 0 },
            &[(0, 3 << 30), (4 << 30, 1 << 30)],
        )
    }

    #[test]
    fn layout_is_aligned_and_round_trips() {
        let h = header();
        h.validate().unwrap();
        assert_eq!(h.regions[0].offset, RAM_ALIGN);
        assert_eq!(h.regions[1].offset % RAM_ALIGN, 0);
        let b = h.encode().unwrap();
        let (h2, _) = Header::decode(&b).unwrap();
        assert_eq!(h, h2);
    }

    #[test]
    fn corrupt_headers_are_refused() {
        let mut b = header().encode().unwrap();
        b[40] ^= 1;
        assert_eq!(Header::decode(&b).unwrap_err(), FormatError::HeaderChecksum);
        let mut b = header().encode().unwrap();
        b[8] = 9;
        assert_eq!(Header::decode(&b).unwrap_err(), FormatError::Version(9));
        assert_eq!(Header::decode(b"garbage").unwrap_err(), FormatError::BadMagic);
        let mut h = header();
        h.regions[1].offset = h.regions[0].offset;
        assert!(h.validate().is_err());
        let mut h = header();
        h.machine.mem_size += 4096;
        assert!(h.validate().is_err());
    }

    #[test]
    fn completion_and_state_records() {
        let c = Completion { header_crc: 1, state_crc: 2, meta_crc: 3, ram_bytes: 4 };
        assert_eq!(Completion::decode(&c.encode()).unwrap(), c);
        let mut b = c.encode();
        b[20] ^= 1;
        assert!(Completion::decode(&b).is_err());
        assert_eq!(Completion::decode(&[0u8; 4096]).unwrap_err(), FormatError::NoCompletion);
        let (s, crc) = encode_state(b"{\"a\":1}", 4096).unwrap();
        assert_eq!(decode_state(&s, 4096).unwrap(), (b"{\"a\":1}".to_vec(), crc));
        let mut bad = s.clone();
        bad[25] ^= 1;
        assert!(decode_state(&bad, 4096).is_err());
        assert!(encode_state(&[0u8; 5000], 4096).is_err());
        // Found by fuzzing (fuzz/state_file): a length that wraps 24 + len.
        let mut wrap = s.clone();
        wrap[8..16].copy_from_slice(&(u64::MAX - 1).to_le_bytes());
        assert!(matches!(decode_state(&wrap, 4096).unwrap_err(), FormatError::StateSection(m) if m.contains("out of range")));
    }
}
