//! `ringvm state merge`: an incremental chain folded into one stand-alone
//! state file (every page from the newest file that has it), written
//! beside the output name and renamed into place once complete.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::chain::ChainError;
use super::format::{self, Completion, FormatError, PAGE};
use super::target::NewFile;

/// Why a merge failed; every message names the file.
#[derive(Debug, thiserror::Error)]
pub enum MergeError {
    #[error(transparent)]
    Chain(#[from] ChainError),
    #[error("{file}: {source}")]
    Format {
        file: String,
        #[source]
        source: FormatError,
    },
    #[error("{file}: {what}: {source}")]
    Io {
        file: String,
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{file}: page at gpa {gpa:#x} fails its checksum")]
    Checksum { file: String, gpa: u64 },
    #[error("{0}: not a file name")]
    NotAFileName(String),
}

impl MergeError {
    /// For `map_err`: an I/O error on `file` while doing `what`.
    fn io(file: &Path, what: &'static str) -> impl FnOnce(std::io::Error) -> MergeError {
        let file = file.display().to_string();
        move |source| MergeError::Io { file, what, source }
    }
}

/// Pages read per request while copying.
const RUN_PAGES: u64 = 256;

/// Merges the chain ending in `path` into `out`; returns (files merged,
/// bytes of RAM in the result).
pub fn merge(path: &Path, out: &Path) -> Result<(usize, u64), MergeError> {
    let mut chain = super::chain::open_chain(path)?;
    let owners = {
        let files: Vec<&format::Checked> = chain.iter().map(|(_, c)| c).collect();
        super::chain::page_owners(&files)
    };
    let mut header = chain[0].1.header.clone();
    header.base = None;
    header.id = format::new_file_id();
    let shown = out.display().to_string();
    let hbytes = header.encode().map_err(|source| MergeError::Format { file: shown.clone(), source })?;
    let hcrc = u32::from_le_bytes(hbytes[16..20].try_into().unwrap_or_default());
    if out.file_name().is_none() {
        return Err(MergeError::NotAFileName(shown));
    }
    let io = MergeError::io;
    let new = NewFile::create(out).map_err(io(out, "create"))?;
    let tmp = PathBuf::from(new.shown());
    let r = write(&new.file, &tmp, &mut chain, &owners, &header, &hbytes, hcrc);
    let r = r.and_then(|bytes| {
        new.file.sync_all().map_err(io(&tmp, "fsync"))?;
        new.publish().map_err(io(out, "put into place"))?;
        Ok(bytes)
    });
    if r.is_err() {
        new.discard();
    }
    r.map(|bytes| (chain.len(), bytes))
}

fn write(
    f: &File,
    tmp: &Path,
    chain: &mut [(std::path::PathBuf, format::Checked)],
    owners: &[Vec<Option<u8>>],
    header: &format::Header,
    hbytes: &[u8],
    hcrc: u32,
) -> Result<u64, MergeError> {
    let io = |source| MergeError::io(tmp, "write")(source);
    f.set_len(header.file_size).map_err(io)?;
    f.write_all_at(hbytes, 0).map_err(io)?;
    let mut metas = Vec::new();
    let mut pages = 0u64;
    let mut buf = vec![0u8; (RUN_PAGES * PAGE) as usize];
    for (ri, r) in header.regions.iter().enumerate() {
        let mut bm = vec![0u8; r.bitmap_len() as usize];
        let mut crcs = vec![0u8; r.crc_len() as usize];
        let own = &owners[ri];
        let mut p = 0u64;
        while p < r.pages() {
            let Some(i) = own[p as usize] else {
                p += 1;
                continue;
            };
            let start = p;
            while p < r.pages() && p - start < RUN_PAGES && own[p as usize] == Some(i) {
                p += 1;
            }
            let n = p - start;
            let (src_path, src) = &mut chain[usize::from(i)];
            let b = &mut buf[..(n * PAGE) as usize];
            src.src.read_exact_at(b, r.offset + start * PAGE).map_err(|source| MergeError::Format { file: src_path.display().to_string(), source })?;
            for k in 0..n {
                let page = &b[(k * PAGE) as usize..((k + 1) * PAGE) as usize];
                let want = src.crc(ri, start + k);
                if crc32c::crc32c(page) != want {
                    return Err(MergeError::Checksum { file: src_path.display().to_string(), gpa: r.gpa + (start + k) * PAGE });
                }
                let q = start + k;
                bm[(q / 8) as usize] |= 1 << (q % 8);
                crcs[(q * 4) as usize..(q * 4 + 4) as usize].copy_from_slice(&want.to_le_bytes());
            }
            f.write_all_at(b, r.offset + start * PAGE).map_err(io)?;
            pages += n;
        }
        f.write_all_at(&bm, r.bitmap_offset).map_err(io)?;
        f.write_all_at(&crcs, r.crc_offset).map_err(io)?;
        metas.push((bm, crcs));
    }
    let (state, state_crc) =
        format::encode_state(&chain[0].1.state_json, header.state_max).map_err(|source| MergeError::Format { file: tmp.display().to_string(), source })?;
    f.write_all_at(&state, header.state_offset).map_err(io)?;
    let parts: Vec<(&[u8], &[u8])> = metas.iter().map(|(a, b)| (a.as_slice(), b.as_slice())).collect();
    let comp = Completion { header_crc: hcrc, state_crc, meta_crc: format::meta_crc(&parts), ram_bytes: pages * PAGE };
    // Everything durable before the record that makes the file valid.
    f.sync_data().map_err(MergeError::io(tmp, "fdatasync"))?;
    f.write_all_at(&comp.encode(), header.completion_offset).map_err(io)?;
    Ok(pages * PAGE)
}
