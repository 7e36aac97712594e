//! How a ring is set up, and the opcodes it may use.

use std::os::fd::RawFd;
use std::time::Duration;

use io_uring::opcode;

/// Every opcode the ring can submit, probed at set-up and allowed in a
/// restricted ring.
pub const OPCODES: &[(u8, &str)] = &[
    (opcode::Read::CODE, "READ"),
    (opcode::Write::CODE, "WRITE"),
    (opcode::Readv::CODE, "READV"),
    (opcode::Writev::CODE, "WRITEV"),
    (opcode::ReadFixed::CODE, "READ_FIXED"),
    (opcode::WriteFixed::CODE, "WRITE_FIXED"),
    (opcode::Fsync::CODE, "FSYNC"),
    (opcode::Fallocate::CODE, "FALLOCATE"),
    (opcode::PollAdd::CODE, "POLL_ADD"),
    (opcode::Timeout::CODE, "TIMEOUT"),
    (opcode::AsyncCancel::CODE, "ASYNC_CANCEL"),
    (opcode::Accept::CODE, "ACCEPT"),
    (opcode::Nop::CODE, "NOP"),
];

// io_uring_register opcodes a running ring may use once restricted.
pub(crate) const REGISTER_FILES_UPDATE: u8 = 6;
pub(crate) const REGISTER_BUFFERS_UPDATE: u8 = 16;

/// How a ring is set up.
#[derive(Clone, Debug)]
pub struct RingOptions {
    /// SQ entries (the CQ has twice as many).
    pub entries: u32,
    /// An eventfd whose readiness sets [`Ring::take_woken`].
    pub wake_fd: Option<RawFd>,
    /// Restrict the ring (IORING_SETUP_R_DISABLED + register_restrictions)
    /// to these opcodes, the IO_LINK and FIXED_FILE flags and updates of
    /// registered files and buffers. `None`: unrestricted.
    pub allowed_opcodes: Option<Vec<u8>>,
    /// Before sleeping, keep looking for completions and run the pollers
    /// (see [`Ring::add_poller`]) for up to this long: work that arrives
    /// within the window costs no sleep and wake-up. Zero: never.
    pub poll: Duration,
    /// Hand every operation to the kernel as it is queued (one
    /// io_uring_enter each) instead of batching until the loop next waits.
    /// A handler that queues follow-up work (the next read of a stream, a
    /// request the guest just made) then has it in flight before the next
    /// completion is even looked at: a device queue is never left short
    /// while a batch of completions is handled. Costs a system call per
    /// operation. Measured here: it lifts a stream of reads resubmitted
    /// from their completions (the ring benchmark, 4 KiB at depth 32) from
    /// 0.88 to 1.04-1.12 of fio, and virtio-scsi 4 KiB random reads at
    /// depth 32 from 0.77-0.82 to 0.91-1.06 of fio (once the guest no
    /// longer notifies for every request: see the virtio-scsi worker's
    /// sleep check), so ringvm's iothreads use it. The restore loader's
    /// 2 MiB reads showed no difference beyond the noise.
    pub eager_submit: bool,
}

impl RingOptions {
    pub fn new(entries: u32) -> RingOptions {
        RingOptions { entries, wake_fd: None, allowed_opcodes: None, poll: Duration::ZERO, eager_submit: false }
    }

    /// Submits each operation as it is queued (see [`RingOptions::eager_submit`]).
    pub fn eager(mut self, on: bool) -> RingOptions {
        self.eager_submit = on;
        self
    }

    /// Sets the poll window (see [`RingOptions::poll`]).
    pub fn polling(mut self, window: Duration) -> RingOptions {
        self.poll = window;
        self
    }

    /// Restricted to exactly the opcodes in [`OPCODES`].
    pub fn restricted(mut self) -> RingOptions {
        self.allowed_opcodes = Some(OPCODES.iter().map(|(c, _)| *c).collect());
        self
    }
}
