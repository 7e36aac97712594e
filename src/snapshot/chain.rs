//! Incremental chains: a state file and the files it builds on, newest
//! first (see docs/state-format.md, "Incremental files").

use std::path::{Path, PathBuf};

use super::format::{self, Checked, FormatError, Header};

/// The most files a chain may have; a longer one is merged first.
pub const MAX_CHAIN: usize = 64;

/// A chain that cannot be loaded. Every message names the file.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ChainError {
    #[error("state file {file}: {source}")]
    File {
        file: String,
        #[source]
        source: FormatError,
    },
    #[error("state file {child}: its base {base} is not the file it was taken from (id {found:#x}, expected {want:#x}); it was replaced or rewritten")]
    NotItsBase { child: String, base: String, found: u64, want: u64 },
    #[error("state file {child}: its base {base} holds a guest of another size")]
    OtherSize { child: String, base: String },
    #[error("state file {0}: the chain of bases loops back to it")]
    Loop(String),
    #[error("state file {0}: the chain of incremental files is longer than {MAX_CHAIN}; merge it (ringvm state merge)")]
    TooLong(String),
}

/// `path` and, if it is incremental, every file it builds on, newest
/// first, each fully checked and linked by id and completion checksum;
/// all must describe the same machine. Every error names the file.
pub fn open_chain(path: &Path) -> Result<Vec<(PathBuf, Checked)>, ChainError> {
    // First every file's header, following the base links (the id each
    // names is checked at once, so a replaced base is not followed); each
    // open starts the reads of that file's metadata. Then each file's full
    // check, its metadata in memory or on its way by then.
    let mut opening: Vec<(PathBuf, format::Opening)> = Vec::new();
    let mut ids = std::collections::HashSet::new();
    let mut next = Some(path.to_path_buf());
    while let Some(p) = next.take() {
        let o = format::open_header(&p).map_err(|source| ChainError::File { file: p.display().to_string(), source })?;
        if opening.is_empty() {
            if let Some(b) = &o.header.base {
                // Every header the chain will need, read from now on.
                let names: Vec<&str> = std::iter::once(b.path.as_str()).chain(b.ancestors.iter().map(String::as_str)).take(MAX_CHAIN).collect();
                format::prefetch_headers(&names);
            }
        }
        if let Some((child, co)) = opening.last() {
            let want = co.header.base.as_ref().expect("a base was named");
            if o.header.id != want.id {
                return Err(ChainError::NotItsBase { child: child.display().to_string(), base: p.display().to_string(), found: o.header.id, want: want.id });
            }
        }
        if !ids.insert(o.header.id) {
            return Err(ChainError::Loop(p.display().to_string()));
        }
        if opening.len() >= MAX_CHAIN {
            return Err(ChainError::TooLong(path.display().to_string()));
        }
        next = o.header.base.as_ref().map(|b| PathBuf::from(&b.path));
        opening.push((p, o));
    }
    let mut chain: Vec<(PathBuf, Checked)> = Vec::new();
    for (p, o) in opening {
        let c = o.check().map_err(|source| ChainError::File { file: p.display().to_string(), source })?;
        if let Some((child, cc)) = chain.last() {
            let want = cc.header.base.as_ref().expect("a base was named");
            // (The ids were matched as the headers were read.)
            if c.completion.record_crc() != want.completion_crc {
                return Err(ChainError::NotItsBase { child: child.display().to_string(), base: p.display().to_string(), found: c.header.id, want: want.id });
            }
            let same = |a: &Header, b: &Header| {
                a.machine.mem_size == b.machine.mem_size
                    && a.regions.iter().zip(&b.regions).all(|(x, y)| x.gpa == y.gpa && x.size == y.size)
                    && a.regions.len() == b.regions.len()
            };
            if !same(&c.header, &cc.header) {
                return Err(ChainError::OtherSize { child: child.display().to_string(), base: p.display().to_string() });
            }
        }
        chain.push((p, c));
    }
    Ok(chain)
}

/// For a chain (newest first): which file each page comes from, per
/// region (None: in no file, so zero).
pub fn page_owners(chain: &[&Checked]) -> Vec<Vec<Option<u8>>> {
    let owned = owned_pages(chain);
    let regions = &chain[0].header.regions;
    regions
        .iter()
        .enumerate()
        .map(|(ri, r)| (0..r.pages()).map(|p| owned.iter().position(|f| f[ri][(p / 64) as usize] & (1 << (p % 64)) != 0).map(|i| i as u8)).collect())
        .collect()
}

/// A bitmap's bytes as 64-bit little-endian words (a short last word is
/// padded with zeros).
fn words(bytes: &[u8]) -> Vec<u64> {
    bytes
        .chunks(8)
        .map(|c| {
            let mut w = [0u8; 8];
            w[..c.len()].copy_from_slice(c);
            u64::from_le_bytes(w)
        })
        .collect()
}

/// For a chain (newest first): per file, per region, the pages that file
/// is the newest to hold, one bit per page in 64-bit words. A word at a
/// time: a 4 GiB guest is 16 384 words per file, where a page at a time
/// was a million lookups per file.
pub fn owned_pages(chain: &[&Checked]) -> Vec<Vec<Vec<u64>>> {
    let pages: Vec<u64> = chain[0].header.regions.iter().map(|r| r.pages()).collect();
    owned_from(&chain.iter().map(|c| c.bitmaps.as_slice()).collect::<Vec<_>>(), &pages)
}

/// [`owned_pages`] of the files' bitmaps (newest first, per region) for
/// regions of `pages` pages; bits past a region's last page are dropped.
fn owned_from(bitmaps: &[&[Vec<u8>]], pages: &[u64]) -> Vec<Vec<Vec<u64>>> {
    let mut taken: Vec<Vec<u64>> = pages.iter().map(|n| vec![0u64; n.div_ceil(64) as usize]).collect();
    bitmaps
        .iter()
        .map(|bms| {
            taken
                .iter_mut()
                .zip(pages)
                .enumerate()
                .map(|(ri, (t, &n))| {
                    let have = words(bms.get(ri).map(Vec::as_slice).unwrap_or_default());
                    let last = t.len().saturating_sub(1);
                    t.iter_mut()
                        .enumerate()
                        .map(|(i, tw)| {
                            let mut w = have.get(i).copied().unwrap_or(0);
                            if i == last && n % 64 != 0 {
                                w &= (1u64 << (n % 64)) - 1;
                            }
                            let own = w & !*tw;
                            *tw |= own;
                            own
                        })
                        .collect()
                })
                .collect()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::fs::File;

    use super::*;
    use crate::snapshot::format::{encode_state, meta_crc, BaseRef, Completion, MachineDesc, PAGE};

    /// Writes a complete state file of `mem` bytes of RAM (every page
    /// present, filled with `fill`) naming `base`; returns its header.
    fn write_file(path: &Path, mem: u64, fill: u8, base: Option<BaseRef>) -> (Header, Completion) {
        write_some(path, mem, fill, base, |_| true)
    }

    /// [`write_file`] with only the pages `present` picks, the rest of the
    /// file never written (holes where the filesystem makes them).
    fn write_some(path: &Path, mem: u64, fill: u8, base: Option<BaseRef>, present: impl Fn(u64) -> bool) -> (Header, Completion) {
        use std::os::unix::fs::FileExt;
        let mut h = Header::layout(
            MachineDesc { cpus: 1, mem_size: mem, disks: vec![], kernel: None, initrd: None, cmdline: String::new(), scsi_queues: 0, iothreads: 0 },
            &[(0, mem)],
        );
        h.base = base;
        let hb = h.encode().unwrap();
        let hcrc = u32::from_le_bytes(hb[16..20].try_into().unwrap());
        let f = File::create(path).unwrap();
        f.set_len(h.file_size).unwrap();
        f.write_all_at(&hb, 0).unwrap();
        let r = &h.regions[0];
        let page = vec![fill; PAGE as usize];
        let mut bm = vec![0u8; r.bitmap_len() as usize];
        let mut crcs = Vec::new();
        for p in 0..r.pages() {
            if !present(p) {
                crcs.extend_from_slice(&[0; 4]);
                continue;
            }
            f.write_all_at(&page, r.offset + p * PAGE).unwrap();
            bm[(p / 8) as usize] |= 1 << (p % 8);
            crcs.extend_from_slice(&crc32c::crc32c(&page).to_le_bytes());
        }
        // Only the 4 KiB blocks with something in them, as a save writes.
        for (table, at) in [(&bm, r.bitmap_offset), (&crcs, r.crc_offset)] {
            for (i, b) in table.chunks(4096).enumerate() {
                if b.iter().any(|&x| x != 0) {
                    f.write_all_at(b, at + i as u64 * 4096).unwrap();
                }
            }
        }
        let (state, state_crc) = encode_state(b"{}", h.state_max).unwrap();
        f.write_all_at(&state, h.state_offset).unwrap();
        let c = Completion { header_crc: hcrc, state_crc, meta_crc: meta_crc(&[(&bm, &crcs)]), ram_bytes: mem };
        f.write_all_at(&c.encode(), h.completion_offset).unwrap();
        (h, c)
    }

    fn chain_err(r: Result<Vec<(PathBuf, Checked)>, ChainError>) -> String {
        match r {
            Err(e) => e.to_string(),
            Ok(c) => panic!("a bad chain of {} file(s) opened", c.len()),
        }
    }

    fn link(path: &Path, h: &Header, c: &Completion) -> BaseRef {
        BaseRef { path: path.display().to_string(), id: h.id, completion_crc: c.record_crc(), ancestors: vec![] }
    }

    /// The chain rules, on small hand-made files: a good chain opens newest
    /// first and the newest page wins; a missing base, a replaced base, a
    /// base of another size and a chain past the limit are each one error
    /// naming the file. (A loop needs two files each carrying the other's
    /// completion checksum, which a checksum collision alone could make;
    /// the id check stops one anyway.)
    /// Each page belongs to the newest file whose bitmap has it, checked
    /// a word at a time against a page at a time, on random bitmaps whose
    /// regions end mid-word (with stray bits past the end).
    #[test]
    fn owned_pages_are_the_newest_holders() {
        let pages = [1000u64, 77];
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut rnd = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let files: Vec<Vec<Vec<u8>>> = (0..5)
            .map(|f| pages.iter().map(|n| (0..n.div_ceil(64) * 8).map(|_| if f == 4 { 0xff } else { (rnd() & rnd()) as u8 }).collect()).collect())
            .collect();
        let refs: Vec<&[Vec<u8>]> = files.iter().map(Vec::as_slice).collect();
        let owned = owned_from(&refs, &pages);
        for (ri, &n) in pages.iter().enumerate() {
            for p in 0..n.div_ceil(64) * 64 {
                let bit = |b: &[u8]| b[(p / 8) as usize] & (1 << (p % 8)) != 0;
                let want = if p < n { files.iter().position(|f| bit(&f[ri])) } else { None };
                let got = owned.iter().position(|o| o[ri][(p / 64) as usize] & (1 << (p % 64)) != 0);
                assert_eq!(got, want, "region {ri} page {p}");
                assert!(owned.iter().filter(|o| o[ri][(p / 64) as usize] & (1 << (p % 64)) != 0).count() <= 1);
            }
        }
    }

    /// Metadata with holes (an incremental file's) is read only where it
    /// has data, checks out the same, and a byte written into a hole
    /// afterwards is caught by the completion record's checksum.
    #[test]
    fn sparse_metadata_is_read_and_checked() {
        use std::os::unix::fs::FileExt;
        let dir = std::env::temp_dir().join(format!("ringvm-sparse-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("sparse");
        let (h, _) = write_some(&p, 64 << 20, 9, None, |p| p < 10);
        let c = format::open_checked(&p).unwrap();
        let r = &h.regions[0];
        assert!((0..r.pages()).all(|q| c.present(0, q) == (q < 10)));
        assert_ne!(c.crc(0, 3), 0);
        assert_eq!(c.crc(0, 5000), 0);
        let parts = c.src.data_in(r.crc_offset, r.crc_len());
        // (A filesystem without holes reports it all as data.)
        assert!(parts == [(r.crc_offset, 4096)] || parts == [(r.crc_offset, r.crc_len())], "{parts:?}");
        File::options().write(true).open(&p).unwrap().write_all_at(&[1], r.crc_offset + 8192).unwrap();
        match format::open_checked(&p) {
            Err(e) => assert!(e.to_string().contains("checksum") || e.to_string().contains("metadata"), "{e}"),
            Ok(_) => panic!("a byte written into the crc table's hole went unnoticed"),
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn chains_follow_their_links_and_refuse_bad_ones() {
        let dir = std::env::temp_dir().join(format!("ringvm-chain-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = |n: &str| dir.join(n);
        let (hb, cb) = write_file(&p("base"), 1 << 20, 1, None);
        let (hi, ci) = write_file(&p("inc"), 1 << 20, 2, Some(link(&p("base"), &hb, &cb)));
        let chain = open_chain(&p("inc")).unwrap();
        assert_eq!(chain.len(), 2);
        assert_eq!(chain[0].1.header.id, hi.id);
        let owners = page_owners(&chain.iter().map(|(_, c)| c).collect::<Vec<_>>());
        assert!(owners[0].iter().all(|o| *o == Some(0)), "the newest file's pages win");
        // The ancestors list is a read-ahead hint only: wrong or missing
        // names in it change nothing.
        let mut hint = link(&p("inc"), &hi, &ci);
        hint.ancestors = vec![p("gone").display().to_string(), p("inc").display().to_string()];
        write_file(&p("hinted"), 1 << 20, 7, Some(hint));
        let chain = open_chain(&p("hinted")).unwrap();
        assert_eq!(chain.iter().map(|(p, _)| p.file_name().unwrap().to_string_lossy().into_owned()).collect::<Vec<_>>(), ["hinted", "inc", "base"]);
        // A base that is not the file the increment was taken from.
        write_file(&p("inc2"), 1 << 20, 3, Some(link(&p("inc"), &hi, &ci)));
        write_file(&p("inc"), 1 << 20, 2, Some(link(&p("base"), &hb, &cb)));
        let e = chain_err(open_chain(&p("inc2")));
        assert!(e.contains("inc2") && e.contains("not the file it was taken from"), "{e}");
        // Missing base.
        write_file(&p("orphan"), 1 << 20, 4, Some(BaseRef { path: p("gone").display().to_string(), id: 7, completion_crc: 7, ancestors: vec![] }));
        let e = chain_err(open_chain(&p("orphan")));
        assert!(e.contains("gone") && e.contains("cannot open"), "{e}");
        // A base of another size.
        let (hs, cs) = write_file(&p("small"), 2 << 20, 5, None);
        write_file(&p("mixed"), 1 << 20, 6, Some(link(&p("small"), &hs, &cs)));
        let e = chain_err(open_chain(&p("mixed")));
        assert!(e.contains("another size"), "{e}");
        // Too long: 65 files.
        let mut prev = write_file(&p("c0"), 1 << 20, 0, None);
        for i in 1..=MAX_CHAIN {
            let base = link(&p(&format!("c{}", i - 1)), &prev.0, &prev.1);
            prev = write_file(&p(&format!("c{i}")), 1 << 20, i as u8, Some(base));
        }
        let e = chain_err(open_chain(&p(&format!("c{MAX_CHAIN}"))));
        assert!(e.contains("longer than 64") && e.contains("merge"), "{e}");
        assert!(open_chain(&p(&format!("c{}", MAX_CHAIN - 1))).is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
