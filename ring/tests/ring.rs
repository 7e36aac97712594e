//! Ring and iothread behaviour against real files, pipes and eventfds.

use std::cell::RefCell;
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use ringvm_ring::{Completion, Fd, IoThread, Op, Ring, RingOptions};

const T: Duration = Duration::from_secs(20);

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn tmpfile(len: u64) -> File {
    let f = tempfile::tempfile().unwrap();
    f.set_len(len).unwrap();
    f
}

type Results = Rc<RefCell<Vec<(usize, std::io::Result<usize>, Option<Vec<u8>>)>>>;

fn recorder(results: &Results, i: usize) -> impl FnMut(&mut Ring, Completion) + 'static {
    let r = results.clone();
    move |_, c: Completion| {
        let buf = c.op.and_then(|op| match op {
            Op::Read { buf, .. } | Op::Write { buf, .. } => buf.into_vec(),
            _ => None,
        });
        r.borrow_mut().push((i, c.result, buf));
    }
}

/// Property: random batches of concurrent, non-overlapping reads and writes
/// through the ring give the same file and the same read data as a model
/// kept with pread/pwrite semantics.
#[test]
fn random_ops_match_pread_pwrite() {
    const LEN: u64 = 1 << 20;
    for seed in 1..=8u64 {
        let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let file = tmpfile(LEN);
        let mut model = vec![0u8; LEN as usize];
        let mut ring = Ring::new(64, None).unwrap();
        let fd = if seed % 2 == 0 { ring.register_fd(file.as_raw_fd()).unwrap() } else { Fd::Raw(file.as_raw_fd()) };
        for _batch in 0..20 {
            // Non-overlapping ranges within a batch, so order inside it doesn't matter.
            let n = 1 + rng.below(100) as usize;
            let slot = LEN / n as u64;
            let results: Results = Rc::new(RefCell::new(Vec::new()));
            let mut expected_reads = Vec::new();
            for i in 0..n {
                let off = i as u64 * slot + rng.below(slot / 2);
                let len = 1 + rng.below(slot / 2) as usize;
                if rng.below(2) == 0 {
                    let data: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
                    model[off as usize..off as usize + len].copy_from_slice(&data);
                    ring.submit(ringvm_ring::SourceId::fixed(7), Op::write(fd, data, off), recorder(&results, i));
                    expected_reads.push(None);
                } else {
                    ring.submit(ringvm_ring::SourceId::fixed(7), Op::read(fd, vec![0; len], off), recorder(&results, i));
                    expected_reads.push(Some(model[off as usize..off as usize + len].to_vec()));
                }
            }
            ring.run_until(T, |r| r.in_flight() == 0).unwrap();
            let res = results.borrow();
            assert_eq!(res.len(), n);
            for (i, result, buf) in res.iter() {
                let want = expected_reads[*i].as_ref();
                match want {
                    Some(w) => {
                        assert_eq!(*result.as_ref().unwrap(), w.len());
                        assert_eq!(buf.as_ref().unwrap(), w, "seed {seed} read {i}");
                    }
                    None => assert!(result.is_ok()),
                }
            }
        }
        let mut on_disk = vec![0u8; LEN as usize];
        file.read_exact_at(&mut on_disk, 0).unwrap();
        assert!(on_disk == model, "seed {seed}: file differs from the pwrite model");
    }
}

#[test]
fn thousands_in_flight_with_backlog_and_verification() {
    const N: usize = 5000;
    let file = tmpfile((N * 4096) as u64);
    let mut ring = Ring::new(32, None).unwrap(); // far fewer CQEs than ops: exercises the backlog
    let fd = Fd::Raw(file.as_raw_fd());
    let done = Rc::new(RefCell::new(0usize));
    for i in 0..N {
        let d = done.clone();
        ring.submit(ringvm_ring::SourceId::fixed(1), Op::write(fd, vec![(i % 251) as u8; 4096], (i * 4096) as u64), move |_, c| {
            assert_eq!(c.result.unwrap(), 4096);
            *d.borrow_mut() += 1;
        });
    }
    assert!(ring.stats().max_backlog > 0, "the backlog was used");
    ring.run_until(T, |r| r.in_flight() == 0).unwrap();
    assert_eq!(*done.borrow(), N);
    let bad = Rc::new(RefCell::new(0usize));
    for i in 0..N {
        let b = bad.clone();
        ring.submit(ringvm_ring::SourceId::fixed(1), Op::read(fd, vec![0; 4096], (i * 4096) as u64), move |_, c| {
            let buf = c.op.and_then(|o| match o {
                Op::Read { buf, .. } => buf.into_vec(),
                _ => None,
            });
            if buf.unwrap().iter().any(|&x| x != (i % 251) as u8) {
                *b.borrow_mut() += 1;
            }
        });
    }
    ring.run_until(T, |r| r.in_flight() == 0).unwrap();
    assert_eq!(*bad.borrow(), 0);
    assert_eq!(ring.stats().stale, 0);
}

/// Streams of reads where each completion queues the stream's next read
/// (the shape of a benchmark or a restore): with eager submission every
/// follow-up goes to the kernel from inside its handler, and the data is
/// the same as without.
#[test]
fn eager_submission_hands_follow_ups_to_the_kernel_at_once() {
    const BLOCKS: usize = 512;
    const STREAMS: usize = 8;
    let file = tmpfile((BLOCKS * 4096) as u64);
    for b in 0..BLOCKS {
        file.write_all_at(&[(b % 253) as u8; 4096], (b * 4096) as u64).unwrap();
    }
    for eager in [false, true] {
        let mut ring = Ring::with_options(RingOptions::new(16).eager(eager)).unwrap();
        let fd = Fd::Raw(file.as_raw_fd());
        let next = Rc::new(RefCell::new(0usize));
        let bad = Rc::new(RefCell::new(0usize));
        fn issue(ring: &mut Ring, fd: Fd, next: &Rc<RefCell<usize>>, bad: &Rc<RefCell<usize>>) {
            let b = {
                let mut n = next.borrow_mut();
                if *n >= BLOCKS {
                    return;
                }
                *n += 1;
                *n - 1
            };
            let (next2, bad2) = (next.clone(), bad.clone());
            ring.submit(ringvm_ring::SourceId::fixed(1), Op::read(fd, vec![0; 4096], (b * 4096) as u64), move |ring, c| {
                let buf = c.op.and_then(|o| match o {
                    Op::Read { buf, .. } => buf.into_vec(),
                    _ => None,
                });
                if c.result.ok() != Some(4096) || buf.unwrap().iter().any(|&x| x != (b % 253) as u8) {
                    *bad2.borrow_mut() += 1;
                }
                issue(ring, fd, &next2, &bad2);
            });
        }
        for _ in 0..STREAMS {
            issue(&mut ring, fd, &next, &bad);
        }
        ring.run_until(T, |r| r.in_flight() == 0).unwrap();
        assert_eq!(*next.borrow(), BLOCKS);
        assert_eq!(*bad.borrow(), 0, "eager={eager}");
        let st = ring.stats();
        assert_eq!(st.completed, BLOCKS as u64);
        if eager {
            assert_eq!(st.eager_submits, BLOCKS as u64, "one io_uring_enter per queued read");
        } else {
            assert_eq!(st.eager_submits, 0);
        }
    }
}

#[test]
fn readv_writev_into_caller_memory_and_short_reads_continue() {
    let file = tmpfile(0);
    let mut ring = Ring::new(8, None).unwrap();
    let fd = Fd::Raw(file.as_raw_fd());
    let mut a = vec![1u8; 3000];
    let mut b = vec![2u8; 5000];
    let iov = vec![libc::iovec { iov_base: a.as_mut_ptr().cast(), iov_len: a.len() }, libc::iovec { iov_base: b.as_mut_ptr().cast(), iov_len: b.len() }];
    let got = Rc::new(RefCell::new(None));
    let g = got.clone();
    // SAFETY: a and b outlive the operation (we run the ring to completion below).
    ring.submit(ringvm_ring::SourceId::fixed(2), unsafe { Op::writev(fd, iov, 100) }, move |_, c| *g.borrow_mut() = Some(c.result.unwrap()));
    ring.run_until(T, |r| r.in_flight() == 0).unwrap();
    assert_eq!(got.borrow_mut().take(), Some(8000));
    // Read past the end of the file: a short read that ends at EOF.
    let mut out = vec![0u8; 10000];
    let iov = vec![libc::iovec { iov_base: out.as_mut_ptr().cast(), iov_len: out.len() }];
    let g = got.clone();
    // SAFETY: as above.
    ring.submit(ringvm_ring::SourceId::fixed(2), unsafe { Op::readv(fd, iov, 0) }, move |_, c| *g.borrow_mut() = Some(c.result.unwrap()));
    ring.run_until(T, |r| r.in_flight() == 0).unwrap();
    assert_eq!(got.borrow_mut().take(), Some(8100));
    assert!(out[..100].iter().all(|&x| x == 0));
    assert!(out[100..3100].iter().all(|&x| x == 1));
    assert!(out[3100..8100].iter().all(|&x| x == 2));
    // A pipe delivers in pieces: the ring continues the read until full.
    let (r, w) = pipe();
    let got_buf = Rc::new(RefCell::new(None));
    let g = got_buf.clone();
    ring.submit(ringvm_ring::SourceId::fixed(3), Op::read(Fd::Raw(r.as_raw_fd()), vec![0; 6], 0), move |_, c| {
        *g.borrow_mut() = Some((
            c.result.unwrap(),
            c.op.and_then(|o| match o {
                Op::Read { buf, .. } => buf.into_vec(),
                _ => None,
            }),
        ));
    });
    ring.run_once(false).unwrap();
    write_all(&w, b"abc");
    ring.run_once(true).unwrap();
    write_all(&w, b"def");
    ring.run_until(T, |r| r.in_flight() == 0).unwrap();
    let (n, buf) = got_buf.borrow_mut().take().unwrap();
    assert_eq!((n, buf.unwrap()), (6, b"abcdef".to_vec()));
    assert!(ring.stats().continued >= 1);
}

fn pipe() -> (File, File) {
    let mut fds = [0; 2];
    // SAFETY: fds is a valid 2-element array.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: pipe2 returned two fresh descriptors we now own.
    unsafe { (std::os::fd::FromRawFd::from_raw_fd(fds[0]), std::os::fd::FromRawFd::from_raw_fd(fds[1])) }
}

fn write_all(f: &File, b: &[u8]) {
    use std::io::Write;
    (&*f).write_all(b).unwrap();
}

#[test]
fn errors_surface_on_the_right_operation() {
    let mut ring = Ring::new(8, None).unwrap();
    let results: Results = Rc::new(RefCell::new(Vec::new()));
    let file = tmpfile(4096);
    ring.submit(ringvm_ring::SourceId::fixed(1), Op::read(Fd::Raw(file.as_raw_fd()), vec![0; 10], 0), recorder(&results, 0));
    ring.submit(ringvm_ring::SourceId::fixed(1), Op::read(Fd::Raw(9999), vec![0; 10], 0), recorder(&results, 1));
    ring.submit(ringvm_ring::SourceId::fixed(1), Op::Fsync { fd: Fd::Raw(-1), datasync: true }, recorder(&results, 2));
    ring.submit(ringvm_ring::SourceId::fixed(1), Op::Fsync { fd: Fd::Raw(file.as_raw_fd()), datasync: true }, recorder(&results, 3));
    ring.run_until(T, |r| r.in_flight() == 0).unwrap();
    let mut res = results.borrow_mut();
    res.sort_by_key(|r| r.0);
    assert_eq!(*res[0].1.as_ref().unwrap(), 10);
    assert_eq!(res[1].1.as_ref().unwrap_err().raw_os_error(), Some(libc::EBADF), "negated errno");
    assert_eq!(res[2].1.as_ref().unwrap_err().raw_os_error(), Some(libc::EBADF));
    assert!(res[3].1.is_ok());
}

#[test]
fn enospc_on_a_small_tmpfs() {
    let dir = tempfile::tempdir().unwrap();
    let path = std::ffi::CString::new(dir.path().to_str().unwrap()).unwrap();
    let opts = std::ffi::CString::new("size=64k").unwrap();
    // SAFETY: valid C strings; mounting a tmpfs on our own temp dir.
    let rc = unsafe { libc::mount(c"tmpfs".as_ptr(), path.as_ptr(), c"tmpfs".as_ptr(), 0, opts.as_ptr().cast()) };
    if rc != 0 {
        assert_ne!(std::env::var("CI").as_deref(), Ok("true"), "CI must be able to mount a tmpfs");
        eprintln!("SKIP enospc_on_a_small_tmpfs: cannot mount tmpfs");
        return;
    }
    let file = OpenOptions::new().create(true).truncate(true).read(true).write(true).open(dir.path().join("f")).unwrap();
    let mut ring = Ring::new(8, None).unwrap();
    let results: Results = Rc::new(RefCell::new(Vec::new()));
    ring.submit(ringvm_ring::SourceId::fixed(1), Op::write(Fd::Raw(file.as_raw_fd()), vec![7; 1 << 20], 0), recorder(&results, 0));
    ring.run_until(T, |r| r.in_flight() == 0).unwrap();
    drop(file);
    // SAFETY: unmounting what we mounted.
    unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) };
    let res = results.borrow();
    assert_eq!(res[0].1.as_ref().unwrap_err().raw_os_error(), Some(libc::ENOSPC), "{:?}", res[0].1);
}

#[test]
fn cancel_keeps_buffer_until_completion() {
    let (r, _w) = pipe();
    let mut ring = Ring::new(8, None).unwrap();
    let results: Results = Rc::new(RefCell::new(Vec::new()));
    let id = ring.submit(ringvm_ring::SourceId::fixed(1), Op::read(Fd::Raw(r.as_raw_fd()), vec![0xaa; 64], 0), recorder(&results, 0));
    ring.run_once(false).unwrap();
    assert_eq!(ring.in_flight(), 1);
    ring.cancel(id);
    ring.run_until(T, |r| r.in_flight() == 0).unwrap();
    let res = results.borrow();
    assert_eq!(res[0].1.as_ref().unwrap_err().raw_os_error(), Some(libc::ECANCELED));
    assert_eq!(res[0].2.as_ref().unwrap(), &vec![0xaa; 64], "buffer handed back intact");
    // Cancelling a finished op is harmless.
    drop(res);
    ring.cancel(id);
    ring.run_once(false).unwrap();
    assert_eq!(ring.stats().stale, 0);
}

#[test]
fn timeouts_and_linked_write_then_fsync() {
    let mut ring = Ring::new(8, None).unwrap();
    let t0 = Instant::now();
    let fired = Rc::new(RefCell::new(None));
    let f = fired.clone();
    ring.submit(ringvm_ring::SourceId::fixed(1), Op::Timeout { after: Duration::from_millis(30) }, move |_, c| *f.borrow_mut() = Some(c.result));
    ring.run_until(T, |r| r.in_flight() == 0).unwrap();
    assert!(t0.elapsed() >= Duration::from_millis(30));
    let r = fired.borrow_mut().take().unwrap();
    assert_eq!(r.unwrap_err().raw_os_error(), Some(libc::ETIME));

    let file = tmpfile(0);
    let fd = Fd::Raw(file.as_raw_fd());
    let order = Rc::new(RefCell::new(Vec::new()));
    let (o1, o2) = (order.clone(), order.clone());
    ring.submit_linked(
        ringvm_ring::SourceId::fixed(1),
        vec![
            (Op::write(fd, b"durable".to_vec(), 0), Box::new(move |_: &mut Ring, c: Completion| o1.borrow_mut().push(("write", c.result.is_ok())))),
            (Op::Fsync { fd, datasync: true }, Box::new(move |_: &mut Ring, c: Completion| o2.borrow_mut().push(("fsync", c.result.is_ok())))),
        ],
    );
    ring.run_until(T, |r| r.in_flight() == 0).unwrap();
    assert_eq!(*order.borrow(), vec![("write", true), ("fsync", true)]);
    let mut b = [0u8; 7];
    file.read_exact_at(&mut b, 0).unwrap();
    assert_eq!(&b, b"durable");
    // A failing first link cancels the second.
    let order2 = Rc::new(RefCell::new(Vec::new()));
    let (o1, o2) = (order2.clone(), order2.clone());
    ring.submit_linked(
        ringvm_ring::SourceId::fixed(1),
        vec![
            (
                Op::write(Fd::Raw(9999), vec![1], 0),
                Box::new(move |_: &mut Ring, c: Completion| o1.borrow_mut().push(c.result.err().and_then(|e| e.raw_os_error()))),
            ),
            (
                Op::Fsync { fd, datasync: true },
                Box::new(move |_: &mut Ring, c: Completion| o2.borrow_mut().push(c.result.err().and_then(|e| e.raw_os_error()))),
            ),
        ],
    );
    ring.run_until(T, |r| r.in_flight() == 0).unwrap();
    assert_eq!(*order2.borrow(), vec![Some(libc::EBADF), Some(libc::ECANCELED)]);
}

#[test]
fn multishot_poll_serves_every_notification() {
    let efd = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let mut ring = Ring::new(8, None).unwrap();
    let total = Rc::new(RefCell::new(0u64));
    let events = Rc::new(RefCell::new(0u64));
    let (t, e) = (total.clone(), events.clone());
    let raw = efd.as_raw_fd();
    let id = ring.submit(ringvm_ring::SourceId::fixed(5), Op::Poll { fd: raw, events: libc::POLLIN as u32, multishot: true }, move |_, c| {
        if c.result.is_ok() {
            let mut v = 0u64;
            // SAFETY: 8-byte read from an eventfd into a u64.
            if unsafe { libc::read(raw, (&mut v as *mut u64).cast(), 8) } == 8 {
                *t.borrow_mut() += v;
            }
            *e.borrow_mut() += 1;
        }
    });
    let submitted = ring.stats().submitted;
    for i in 1..=200u64 {
        efd.write(i).unwrap();
        ring.run_until(T, |_| *total.borrow() == i * (i + 1) / 2).unwrap();
    }
    assert_eq!(*total.borrow(), 200 * 201 / 2);
    assert!(*events.borrow() >= 200);
    assert!(ring.stats().submitted - submitted <= 2, "one submission served all (plus a rearm at most)");
    assert_eq!(ring.source_in_flight(ringvm_ring::SourceId::fixed(5)), 0, "multishot polls don't hold a source busy");
    ring.cancel(id);
    ring.run_until(T, |r| r.in_flight() == 0).unwrap();
}

#[test]
fn remote_wakes_the_iothread_from_many_threads() {
    let io = IoThread::spawn("iothread-test", 64).unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let names = Arc::new(std::sync::Mutex::new(std::collections::HashSet::new()));
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let (r, c, n) = (io.remote(), count.clone(), names.clone());
            std::thread::spawn(move || {
                for _ in 0..500 {
                    let (c, n) = (c.clone(), n.clone());
                    r.send(move |_| {
                        c.fetch_add(1, Ordering::SeqCst);
                        n.lock().unwrap().insert(std::thread::current().name().unwrap_or("").to_string());
                    })
                    .unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let deadline = Instant::now() + T;
    while count.load(Ordering::SeqCst) < 4000 {
        assert!(Instant::now() < deadline, "deadline waiting for remote tasks");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(*names.lock().unwrap(), ["iothread-test".to_string()].into_iter().collect());
}

/// The seed deadlock's shape: a caller waits for one source to drain while
/// another source's operation can't finish. The wait must resolve anyway.
#[test]
fn quiesce_waits_only_for_its_own_source() {
    let io = IoThread::spawn("iothread-q", 64).unwrap();
    let remote = io.remote();
    let (stuck_r, stuck_w) = pipe();
    let (slow_r, slow_w) = pipe();
    let (stuck_fd, slow_fd) = (stuck_r.as_raw_fd(), slow_r.as_raw_fd());
    let (tx, rx) = mpsc::channel();
    // Source 1: a read that never completes. Source 2: a read that completes later.
    remote
        .send(move |ring| {
            ring.submit(ringvm_ring::SourceId::fixed(1), Op::read(Fd::Raw(stuck_fd), vec![0; 8], 0), |_, _| {});
            ring.submit(ringvm_ring::SourceId::fixed(2), Op::read(Fd::Raw(slow_fd), vec![0; 4], 0), move |_, c| tx.send(c.result.unwrap()).unwrap());
        })
        .unwrap();
    let waiter = remote.quiesce(ringvm_ring::SourceId::fixed(2)).unwrap();
    // Not quiesced while source 2's read is pending.
    assert!(waiter.wait(Duration::from_millis(100)).is_err());
    write_all(&slow_w, b"done");
    waiter.wait(T).expect("source 2 quiesces although source 1 is stuck");
    assert_eq!(rx.recv_timeout(T).unwrap(), 4);
    // Source 1 is still stuck, and says so within a deadline.
    assert!(remote.quiesce(ringvm_ring::SourceId::fixed(1)).unwrap().wait(Duration::from_millis(100)).is_err());
    // Quiescing an idle source resolves at once.
    remote.quiesce(ringvm_ring::SourceId::fixed(3)).unwrap().wait(T).unwrap();
    drop((stuck_w, stuck_r, slow_r));
}

#[test]
fn stop_with_operations_in_flight_cancels_and_joins() {
    let mut io = IoThread::spawn("iothread-stop", 64).unwrap();
    let (r, w) = pipe();
    let fd = r.as_raw_fd();
    let cancelled = Arc::new(AtomicUsize::new(0));
    let c = cancelled.clone();
    io.remote()
        .send(move |ring| {
            for _ in 0..50 {
                let c = c.clone();
                ring.submit(ringvm_ring::SourceId::fixed(1), Op::read(Fd::Raw(fd), vec![0; 4096], 0), move |_, comp| {
                    if comp.result.as_ref().err().and_then(|e| e.raw_os_error()) == Some(libc::ECANCELED) {
                        c.fetch_add(1, Ordering::SeqCst);
                    }
                });
            }
        })
        .unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let t0 = Instant::now();
    let stats = io.stop();
    assert!(t0.elapsed() < Duration::from_secs(5));
    assert_eq!(cancelled.load(Ordering::SeqCst), 50);
    assert!(stats.submitted >= 50);
    assert!(io.remote().send(|_| {}).is_err(), "a stopped iothread refuses work");
    drop((r, w));
}

/// A short write inside a linked group (a pipe takes 64 KiB without
/// blocking, then the kernel breaks the link) is continued and the rest of
/// the chain resubmitted behind it: both ops succeed, in order, and every
/// byte arrives.
#[test]
fn short_write_in_a_chain_is_relinked() {
    let (r, w) = pipe();
    let mut ring = Ring::new(8, None).unwrap();
    let file = tmpfile(0);
    let data: Vec<u8> = (0..256 * 1024).map(|i| (i * 7 + i / 4096) as u8).collect();
    let expect = data.clone();
    let reader = std::thread::spawn(move || {
        use std::io::Read;
        std::thread::sleep(Duration::from_millis(200));
        let mut got = Vec::new();
        (&r).read_to_end(&mut got).unwrap();
        got
    });
    let order = Rc::new(RefCell::new(Vec::new()));
    let (o1, o2) = (order.clone(), order.clone());
    ring.submit_linked(
        ringvm_ring::SourceId::fixed(1),
        vec![
            (
                Op::write(Fd::Raw(w.as_raw_fd()), data, 0),
                Box::new(move |_: &mut Ring, c: Completion| o1.borrow_mut().push(("pipe", c.result.map_err(|e| e.raw_os_error())))),
            ),
            (
                Op::write(Fd::Raw(file.as_raw_fd()), b"after".to_vec(), 0),
                Box::new(move |_: &mut Ring, c: Completion| o2.borrow_mut().push(("file", c.result.map_err(|e| e.raw_os_error())))),
            ),
        ],
    );
    ring.run_until(T, |r| r.in_flight() == 0).unwrap();
    drop(w);
    assert_eq!(*order.borrow(), vec![("pipe", Ok(256 * 1024)), ("file", Ok(5))]);
    assert!(ring.stats().relinked >= 1, "the pipe write was expected to be short: {:?}", ring.stats());
    assert_eq!(reader.join().unwrap(), expect);
    let mut b = [0u8; 5];
    file.read_exact_at(&mut b, 0).unwrap();
    assert_eq!(&b, b"after");
}

/// Registered buffers: O_DIRECT-sized writes and reads through
/// READ_FIXED/WRITE_FIXED at random offsets match pread.
#[test]
fn fixed_buffers_read_and_write() {
    let mut ring = Ring::new(16, None).unwrap();
    let file = tmpfile(1 << 20);
    let mut arena = vec![0u8; 64 * 1024];
    // SAFETY: arena outlives the ring's use of it (unregistered below).
    let idx = unsafe { ring.register_buffer(arena.as_mut_ptr(), arena.len()) }.unwrap();
    for (i, b) in arena.iter_mut().enumerate() {
        *b = (i % 251) as u8;
    }
    let done = Rc::new(RefCell::new(Vec::new()));
    for k in 0..16u64 {
        let d = done.clone();
        // SAFETY: each op uses its own 4 KiB of the registered arena.
        let op = unsafe { Op::write_fixed(Fd::Raw(file.as_raw_fd()), idx, arena.as_mut_ptr().add(k as usize * 4096), 4096, k * 65536) };
        ring.submit(ringvm_ring::SourceId::fixed(1), op, move |_, c| d.borrow_mut().push(c.result.unwrap()));
    }
    ring.run_until(T, |r| r.in_flight() == 0).unwrap();
    assert_eq!(*done.borrow(), vec![4096; 16]);
    for k in 0..16u64 {
        let mut b = vec![0u8; 4096];
        file.read_exact_at(&mut b, k * 65536).unwrap();
        assert_eq!(b, arena[k as usize * 4096..(k as usize + 1) * 4096]);
    }
    arena.iter_mut().for_each(|b| *b = 0);
    let ptr = arena.as_mut_ptr();
    // SAFETY: as above, reading back into the registered arena.
    let op = unsafe { Op::read_fixed(Fd::Raw(file.as_raw_fd()), idx, ptr.add(8192), 4096, 65536) };
    ring.submit(ringvm_ring::SourceId::fixed(1), op, |_, c| assert_eq!(c.result.unwrap(), 4096));
    ring.run_until(T, |r| r.in_flight() == 0).unwrap();
    assert_eq!(arena[8192], (4096 % 251) as u8);
    assert_eq!(arena[8192 + 4095], ((4096 + 4095) % 251) as u8);
    ring.unregister_buffer(idx).unwrap();
    // A fixed op on an unregistered slot fails on that op, not the loop.
    // SAFETY: the slot is empty; the kernel rejects the op before touching memory.
    let op = unsafe { Op::read_fixed(Fd::Raw(file.as_raw_fd()), idx, ptr, 4096, 0) };
    let err = Rc::new(RefCell::new(None));
    let e = err.clone();
    ring.submit(ringvm_ring::SourceId::fixed(1), op, move |_, c| *e.borrow_mut() = c.result.err().and_then(|e| e.raw_os_error()));
    ring.run_until(T, |r| r.in_flight() == 0).unwrap();
    assert_eq!(*err.borrow(), Some(libc::EFAULT));
}

/// A restricted ring refuses an opcode outside its allowlist with EACCES on
/// that operation, and keeps serving the allowed ones.
#[test]
fn restricted_ring_refuses_opcodes_outside_the_allowlist() {
    use ringvm_ring::{RingOptions, OPCODES};
    let allowed: Vec<u8> = OPCODES.iter().filter(|(_, n)| *n != "WRITE").map(|(c, _)| *c).collect();
    let mut ring = Ring::with_options(RingOptions { allowed_opcodes: Some(allowed), ..RingOptions::new(8) }).unwrap();
    assert!(ring.is_restricted());
    let file = tmpfile(4096);
    let results: Results = Rc::new(RefCell::new(Vec::new()));
    ring.submit(ringvm_ring::SourceId::fixed(1), Op::write(Fd::Raw(file.as_raw_fd()), vec![1; 16], 0), recorder(&results, 0));
    ring.submit(ringvm_ring::SourceId::fixed(1), Op::read(Fd::Raw(file.as_raw_fd()), vec![0; 16], 0), recorder(&results, 1));
    ring.run_until(T, |r| r.in_flight() == 0).unwrap();
    let mut res = results.borrow_mut();
    res.sort_by_key(|r| r.0);
    assert_eq!(res[0].1.as_ref().unwrap_err().raw_os_error(), Some(libc::EACCES));
    assert_eq!(*res[1].1.as_ref().unwrap(), 16);
    // The full allowlist (what IoThread uses) takes fixed files too.
    let mut ring = Ring::with_options(RingOptions::new(8).restricted()).unwrap();
    let fd = ring.register_fd(file.as_raw_fd()).unwrap();
    ring.submit(ringvm_ring::SourceId::fixed(1), Op::write(fd, vec![1; 16], 0), |_, c| assert_eq!(c.result.unwrap(), 16));
    ring.run_until(T, |r| r.in_flight() == 0).unwrap();
}

/// With a poll window, work a poller finds ends the wait at once (no sleep
/// until the 5 s timeout in flight); a poller may remove itself; without
/// pollers the ring sleeps as before.
#[test]
fn pollers_end_the_wait_and_can_remove_themselves() {
    use ringvm_ring::RingOptions;
    let mut ring = Ring::with_options(RingOptions::new(8).polling(Duration::from_millis(2))).unwrap();
    let id = ring.submit(ringvm_ring::SourceId::fixed(1), Op::Timeout { after: Duration::from_secs(5) }, |_, _| {});
    let calls = Rc::new(RefCell::new(0u32));
    let c = calls.clone();
    ring.add_poller(ringvm_ring::SourceId::fixed(7), move |ring| {
        *c.borrow_mut() += 1;
        if *c.borrow() == 3 {
            ring.remove_pollers(ringvm_ring::SourceId::fixed(7));
            return true;
        }
        false
    });
    let t0 = Instant::now();
    ring.run_once(true).unwrap();
    assert!(t0.elapsed() < Duration::from_secs(2), "the found work did not end the wait");
    assert_eq!(*calls.borrow(), 3);
    assert_eq!(ring.stats().poll_hits, 1);
    // The poller is gone: the next wait runs it no more, and with no
    // pollers left the ring sleeps until a completion (the cancel's).
    ring.cancel(id);
    ring.run_until(T, |r| r.in_flight() == 0).unwrap();
    assert_eq!(*calls.borrow(), 3);
}

/// A sleep check runs every time the ring would block, with or without a
/// poll window: work it finds (here, the first two times) keeps the ring
/// from sleeping; once it finds none the ring blocks until a completion;
/// removing its source removes it.
#[test]
fn sleep_checks_run_before_every_block_and_their_work_prevents_it() {
    let mut ring = Ring::with_options(RingOptions::new(8)).unwrap();
    let id = ring.submit(ringvm_ring::SourceId::fixed(1), Op::Timeout { after: Duration::from_secs(5) }, |_, _| {});
    let calls = Rc::new(RefCell::new(0u32));
    let c = calls.clone();
    ring.add_sleep_check(ringvm_ring::SourceId::fixed(9), move |_| {
        *c.borrow_mut() += 1;
        *c.borrow() <= 2
    });
    for n in 1..=2 {
        let t0 = Instant::now();
        ring.run_once(true).unwrap();
        assert!(t0.elapsed() < Duration::from_secs(2), "work found by the check did not stop the block");
        assert_eq!(*calls.borrow(), n);
    }
    // Third time: nothing found, so the ring blocks until the timer (cut
    // short by a cancel from a Timeout of its own).
    ring.submit(ringvm_ring::SourceId::fixed(1), Op::Timeout { after: Duration::from_millis(50) }, |_, _| {});
    let t0 = Instant::now();
    ring.run_once(true).unwrap();
    assert!(t0.elapsed() >= Duration::from_millis(40), "the ring did not block once the check found nothing");
    assert_eq!(*calls.borrow(), 3);
    ring.remove_pollers(ringvm_ring::SourceId::fixed(9));
    ring.cancel(id);
    ring.run_until(T, |r| r.in_flight() == 0).unwrap();
    assert_eq!(*calls.borrow(), 3, "a removed sleep check still ran");
}
