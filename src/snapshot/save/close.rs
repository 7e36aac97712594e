//! The end of a snapshot: state section, metadata, fdatasync, completion
//! record, fdatasync, then the rename that publishes the file.

use std::os::fd::AsRawFd;
use std::rc::Rc;

use ring::{Fd, Op, Ring};

use super::{nfs, JobRef, Phase, SaveError, SaveState, Target, SNAPSHOT_SOURCE};
use crate::events::{SnapshotStep, VmEvent};
use crate::snapshot::format::{self, Completion};
use crate::snapshot::target::NewFile;

/// State section, metadata, fdatasync, completion record, fdatasync.
pub(super) fn finish(job: &JobRef, ring: &mut Ring, state_json: Vec<u8>) -> Result<(), SaveError> {
    let mut j = job.borrow_mut();
    let (state, state_crc) = format::encode_state(&state_json, j.p.header.state_max)?;
    let mut writes = vec![(state, j.p.header.state_offset, "state")];
    let mut metas = Vec::new();
    // The job ends with this close: its checksums go as they are.
    let all_crcs = std::mem::take(&mut j.crcs);
    for ((region, present), crcs) in j.p.header.regions.iter().zip(&j.present).zip(all_crcs) {
        let bm: Vec<u8> = present.iter().flat_map(|w| w.to_le_bytes()).take(region.bitmap_len() as usize).collect();
        metas.push((bm, crcs, region.bitmap_offset, region.crc_offset));
    }
    let parts: Vec<(&[u8], &[u8])> = metas.iter().map(|(a, b, _, _)| (a.as_slice(), b.as_slice())).collect();
    let comp = Completion { header_crc: j.header_crc, state_crc, meta_crc: format::meta_crc(&parts), ram_bytes: j.ram_bytes };
    for (bm, crcs, bo, co) in metas {
        writes.extend(nonzero_parts(bm, bo).into_iter().map(|(b, o)| (b, o, "bitmap")));
        writes.extend(nonzero_parts(crcs, co).into_iter().map(|(b, o)| (b, o, "checksums")));
    }
    let record = comp.encode();
    let (file_id, record_crc) = (j.p.header.id, comp.record_crc());
    j.shared.update(|s| {
        s.file_id = file_id;
        s.record_crc = record_crc;
    });
    let at = j.p.header.completion_offset;
    if let Target::Nfs { conn, .. } = &j.target {
        // Every RAM WRITE has been answered. The closing records go
        // synchronously (a few MiB); the ring stops watching the socket
        // first so it never services a reply these calls take.
        nfs::Conn::close(conn, ring);
        let conn = conn.clone();
        let mut c = conn.borrow_mut();
        for (b, off, _) in &writes {
            c.nfs.write_all_at(b, *off)?;
        }
        // COMMIT the UNSTABLE writes, then the record, then COMMIT it: a
        // file without a durable record is never loadable.
        c.nfs.commit()?;
        c.nfs.write_all_at(&record, at)?;
        c.nfs.commit()?;
        drop(c);
        drop(j);
        end(job, ring);
        return Ok(());
    }
    let Target::File { new: NewFile { file: buffered, .. }, punt, .. } = &j.target else { unreachable!("the NFS target returned above") };
    let (fd, punt) = (Fd::Raw(buffered.as_raw_fd()), *punt);
    drop(j);
    // State and metadata through the ring too (punted where the filesystem
    // would block the submitter): the iothread stays free to take a cancel
    // while a slow target works through them.
    let pending = Rc::new(std::cell::Cell::new(writes.len()));
    for (b, off, what) in writes {
        let (job2, pending2, mut record) = (job.clone(), pending.clone(), record.clone());
        let done = move |ring: &mut Ring, c: ring::Completion| {
            if let Err(e) = c.result {
                job2.borrow_mut().fail(SaveError::io(what)(e));
            }
            pending2.set(pending2.get() - 1);
            if pending2.get() == 0 {
                commit(&job2, ring, fd, std::mem::take(&mut record), at);
            }
        };
        if punt {
            ring.submit_async(SNAPSHOT_SOURCE, Op::write(fd, b, off), done);
        } else {
            ring.submit(SNAPSHOT_SOURCE, Op::write(fd, b, off), done);
        }
    }
    Ok(())
}

/// Zero gaps in the metadata this many bytes or longer are not written.
const HOLE_MIN: usize = 256 << 10;

/// The parts of `buf` (to go at file offset `at`) that must be written:
/// the file was just made `file_size` long (a new file, or an NFS file
/// created new), so what is not written reads back as zeros, and an
/// incremental file's bitmap and checksum table (a guest's worth, 4 MiB
/// per 4 GiB, almost all zero) stay holes: no disk space, and a chain
/// restore reads each table's holes without touching the disk. Zero runs
/// shorter than [`HOLE_MIN`] or not 4 KiB-aligned are written as they are
/// (a full file's table goes in one write, without a copy).
fn nonzero_parts(buf: Vec<u8>, at: u64) -> Vec<(Vec<u8>, u64)> {
    const BLOCK: usize = 4096;
    if !at.is_multiple_of(BLOCK as u64) {
        return vec![(buf, at)];
    }
    // Runs of blocks holding a non-zero byte, [start, end) in bytes, with
    // zero gaps shorter than HOLE_MIN folded in.
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for (i, block) in buf.chunks(BLOCK).enumerate() {
        if block.iter().all(|&b| b == 0) {
            continue;
        }
        let (s, e) = (i * BLOCK, i * BLOCK + block.len());
        match runs.last_mut() {
            Some(last) if s - last.1 < HOLE_MIN => last.1 = e,
            _ => runs.push((s, e)),
        }
    }
    if runs.len() == 1 && runs[0] == (0, buf.len()) {
        return vec![(buf, at)];
    }
    runs.into_iter().map(|(s, e)| (buf[s..e].to_vec(), at + s as u64)).collect()
}

/// The metadata is written: fdatasync, completion record, fdatasync.
fn commit(job: &JobRef, ring: &mut Ring, fd: Fd, record: Vec<u8>, at: u64) {
    {
        let j = job.borrow();
        if j.failed || j.phase == Phase::Done {
            drop(j);
            return end(job, ring);
        }
    }
    // Deleted or replaced while closing: no completion record.
    let checked = job.borrow().check_file();
    if let Err(e) = checked {
        job.borrow_mut().fail(e);
        return end(job, ring);
    }
    job.borrow_mut().mark("metadata written".into());
    // Durable data first, then the record, then the record durable: a file
    // without a durable record is never loadable.
    let (j1, j2, j3) = (job.clone(), job.clone(), job.clone());
    ring.submit_linked(
        SNAPSHOT_SOURCE,
        vec![
            (
                Op::Fsync { fd, datasync: true },
                Box::new(move |_: &mut Ring, c: ring::Completion| {
                    if let Err(e) = c.result {
                        j1.borrow_mut().fail(SaveError::io("fdatasync")(e));
                    }
                    j1.borrow_mut().mark("data durable".into());
                }),
            ),
            (
                Op::write(fd, record, at),
                Box::new(move |_: &mut Ring, c: ring::Completion| {
                    if let Err(e) = c.result {
                        if e.raw_os_error() != Some(libc::ECANCELED) {
                            j2.borrow_mut().fail(SaveError::io("write completion record")(e));
                        }
                    }
                }),
            ),
            (
                Op::Fsync { fd, datasync: true },
                Box::new(move |ring: &mut Ring, c: ring::Completion| {
                    if let Err(e) = c.result {
                        if e.raw_os_error() != Some(libc::ECANCELED) {
                            j3.borrow_mut().fail(SaveError::io("fdatasync")(e));
                        }
                    }
                    j3.borrow_mut().mark("record durable".into());
                    end(&j3, ring);
                }),
            ),
        ],
    );
}

/// Final status and the Done event; the job is dropped.
pub(super) fn end(job: &JobRef, ring: &mut Ring) {
    let mut j = job.borrow_mut();
    if j.phase == Phase::Done {
        return;
    }
    let was_paused = j.phase == Phase::Final || j.phase == Phase::WaitPause;
    j.phase = Phase::Done;
    let mut leftover = None;
    match &j.target {
        Target::File { new, .. } => {
            if j.failed {
                leftover = new.leftover();
            } else if let Err(e) = new.publish() {
                let (from, to) = (new.shown(), new.dest.display().to_string());
                leftover = new.leftover();
                j.fail(SaveError::Publish { from, to, source: e });
            }
        }
        Target::Nfs { conn, tmp, dest, .. } => {
            let (conn, tmp, dest) = (conn.clone(), tmp.clone(), dest.clone());
            // (The NFS URI travels as a path; the reaper knows the scheme.)
            if j.failed {
                leftover = Some(tmp.to_string().into());
            } else if let Err(e) = conn.borrow().nfs.rename(&tmp.file, &dest.file) {
                j.fail(e.into());
                leftover = Some(tmp.to_string().into());
            }
        }
    }
    let what = if j.failed { "ended" } else { "published" };
    j.mark(what.into());
    log::info!("snapshot timeline, ms since savevm-start: {}", j.timeline());
    let (failed, ram) = (j.failed, j.ram_bytes);
    j.shared.update(|s| {
        s.leftover = leftover;
        if !failed {
            s.state = SaveState::Completed;
        }
        s.bytes = ram;
        if let Some(t) = s.started {
            s.total_ms = t.elapsed().as_millis() as u64;
        }
    });
    if was_paused {
        // The control thread may be holding the vCPUs for us.
        j.events.push(VmEvent::Snapshot(SnapshotStep::Resume));
    }
    j.events.push(VmEvent::Snapshot(SnapshotStep::Done));
    drop(j);
    ring.disown(SNAPSHOT_SOURCE);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sparse metadata keeps its long zero gaps as holes, a dense table
    /// goes in one write, and what is written covers every non-zero byte.
    #[test]
    fn only_nonzero_metadata_is_written() {
        let mut b = vec![0u8; 4 << 20];
        b[5] = 1;
        b[(2 << 20) + 4097] = 2;
        b[(2 << 20) + 100_000] = 3;
        let parts = nonzero_parts(b.clone(), 1 << 30);
        assert_eq!(parts.iter().map(|(p, o)| (*o, p.len())).collect::<Vec<_>>(), [(1 << 30, 4096), ((1 << 30) + (2 << 20) + 4096, 98304)]);
        let mut back = vec![0u8; b.len()];
        for (p, o) in &parts {
            let s = (o - (1 << 30)) as usize;
            back[s..s + p.len()].copy_from_slice(p);
        }
        assert_eq!(back, b, "the zeros not written read back as zeros");
        assert!(nonzero_parts(vec![0; 8192], 0).is_empty());
        let dense = vec![7u8; 10_000];
        assert_eq!(nonzero_parts(dense.clone(), 4096), [(dense.clone(), 4096)]);
        assert_eq!(nonzero_parts(dense.clone(), 12), [(dense, 12)], "an unaligned offset is written whole");
    }
}
