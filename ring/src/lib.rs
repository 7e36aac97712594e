//! ringvm's iothread: one io_uring event loop per thread.
//!
//! An [`IoThread`] is a named OS thread that owns exactly one [`Ring`] and
//! does all its work through it: polls on ioeventfds, reads and writes on
//! files and guest buffers, fsyncs, timeouts, and closures sent by other
//! threads through a [`Remote`]. There is no epoll beside it.
//!
//! # The invariant that makes the savevm-async deadlock impossible
//!
//! QEMU once deadlocked when a vCPU resetting a device drained all I/O
//! while the snapshot's state-file I/O could only progress in the main
//! loop that the vCPU was blocking. Here:
//!
//! 1. every source's I/O (a device's queues, a snapshot's state file) lives
//!    on exactly one iothread and is advanced only by that thread's ring;
//! 2. an iothread never waits on any other thread: it blocks only in
//!    `io_uring_enter`, and messages to it are queued without blocking;
//! 3. a thread that needs a source's I/O finished calls [`Remote::quiesce`]
//!    and waits, with a deadline, on an event that the iothread sets when
//!    that source's in-flight count reaches zero. It never runs or polls the
//!    iothread's ring itself.
//!
//! So a waiter can only wait on progress its iothread makes on its own, and
//! no cycle of waits can form. `tests/quiesce` checks that quiescing one
//! source does not wait on another's stuck operation.
//!
//! # Operations and ownership
//!
//! Every in-flight operation lives in a slab slot that owns what the kernel
//! points at (buffers, iovec arrays, timespecs) and its completion handler.
//! `user_data` is `index | generation << 32 | kind << 56`: a stale or
//! duplicate completion is detected and dropped, never misrouted. A slot is
//! freed only when its final CQE is reaped, cancellation included.
//!
//! # Submission
//!
//! By default queued operations reach the kernel together, when the loop
//! next enters it to wait (one `io_uring_enter` per batch). A ring built
//! with [`RingOptions::eager`] hands each operation over as it is queued:
//! a completion handler's follow-up (the next read of a stream) is in flight
//! before the next completion is handled, which keeps a device's queue full
//! at the price of a system call per operation. On this project's virtio
//! test disk that is the difference between 0.88 and 1.04-1.12 of fio for
//! 4 KiB random reads at depth 32 (`ringvm-perf ring`); ringvm's
//! iothreads use it.
//!
//! # Polling and sleeping
//!
//! A ring with a poll window ([`RingOptions::polling`]) spins for that long
//! before it sleeps, running its pollers ([`Ring::add_poller`]: a look at a
//! virtqueue's avail ring, say). Sleep checks ([`Ring::add_sleep_check`])
//! run every time, just before the thread blocks: a source can keep its
//! wake-ups off while the thread is awake (a virtqueue's notifications)
//! and turn them back on there, looking once more for work that arrived
//! in between.

mod event;
mod op;
mod options;
mod ring;
mod thread;
mod token;

use std::io;

pub use ring::{Buf, Completion, Fd, Op, OpId, Poller, Ring, RingOptions, RingStats, SourceId, OPCODES, STREAM};
pub use thread::{IoThread, QuiesceWaiter, Remote};
pub use token::{Kind, Token};

/// Errors of the ring crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("io_uring setup")]
    Setup(#[source] io::Error),
    #[error("io_uring lacks IORING_FEAT_NODROP (kernel too old)")]
    NoDrop,
    #[error("io_uring opcode {0} is not supported by this kernel")]
    Unsupported(&'static str),
    #[error("io_uring probe")]
    Probe(#[source] io::Error),
    #[error("io_uring_enter")]
    Enter(#[source] io::Error),
    #[error("registering files")]
    RegisterFiles(#[source] io::Error),
    #[error("no free fixed-file slot")]
    FixedFilesFull,
    #[error("registering buffers")]
    RegisterBuffers(#[source] io::Error),
    #[error("no free fixed-buffer slot")]
    FixedBuffersFull,
    #[error("restricting the io_uring")]
    Restrict(#[source] io::Error),
    #[error("eventfd")]
    EventFd(#[source] io::Error),
    #[error("cannot spawn iothread {name}")]
    Spawn { name: String, source: io::Error },
    #[error("iothread {0} has stopped")]
    Stopped(String),
    #[error("timed out after {0:?} waiting for {1}")]
    Timeout(std::time::Duration, &'static str),
}

pub type Result<T> = std::result::Result<T, Error>;
