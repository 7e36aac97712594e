//! Events from vCPUs and devices to the control thread.
//!
//! Producers push and signal an eventfd; they never block on the consumer.
//! The control thread polls the eventfd from its io_uring.

use std::collections::VecDeque;
use std::sync::Mutex;

use vmm_sys_util::eventfd::EventFd;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmEvent {
    /// The guest wrote `code` to the debug-exit port.
    Exit(u8),
    /// The guest asked for a reset (i8042, KVM system event).
    Reset,
    /// The guest asked to power off.
    Shutdown,
    /// A vCPU hit a triple fault.
    TripleFault { cpu: usize, at: String },
    /// A vCPU stopped on a fatal error.
    Error(String),
    /// The saving iothread asks the control thread for the next step.
    Snapshot(SnapshotStep),
    /// The loader thread finished reading RAM (bytes) or failed; for a
    /// lazy restore, the fault thread is ready (0 bytes).
    Restored(Result<u64, String>),
    /// A lazy restore has all of RAM in (bytes).
    Streamed(u64),
    /// A disk's unplug completed (its query-block name).
    DeviceDeleted(String),
    /// The incoming state file's opener finished attempt N (the result
    /// is in the incoming slot).
    IncomingOpened(u64),
    /// A disk request hit a host error under a `stop` policy and is held
    /// (BLOCK_IO_ERROR; the VM stops until `cont`).
    BlockIoError { device: String, write: bool, errno: i32 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotStep {
    /// Pause the vCPUs and send the final phase.
    Pause,
    /// The final pages are written: resume the vCPUs, send the state.
    Resume,
    /// The snapshot ended (completed or failed); clean up.
    Done,
    /// A live pass ended (for the SAVEVM_PROGRESS event; the figures are
    /// in the shared status).
    Pass,
    /// Set the vCPUs' CPU throttle to this percentage (auto-converge).
    Throttle(u32),
    /// Set each vCPU's dirty-rate limit to the status's `dirty_limits`.
    DirtyLimit,
}

pub struct EventQueue {
    queue: Mutex<VecDeque<VmEvent>>,
    evt: EventFd,
}

impl EventQueue {
    pub fn new() -> std::io::Result<Self> {
        // Non-blocking: a multishot poll can report one write twice (a second
        // write lands before the first completion is handled), and the
        // consumer must then find the counter already drained, not block.
        Ok(Self { queue: Mutex::new(VecDeque::new()), evt: EventFd::new(libc::EFD_CLOEXEC | libc::EFD_NONBLOCK)? })
    }

    pub fn push(&self, e: VmEvent) {
        self.queue.lock().unwrap_or_else(|e| e.into_inner()).push_back(e);
        if let Err(err) = self.evt.write(1) {
            log::error!("event queue: eventfd write: {err}");
        }
    }

    pub fn pop(&self) -> Option<VmEvent> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner()).pop_front()
    }

    /// Clears the eventfd's counter (never blocks); call before popping so
    /// an event pushed meanwhile signals again.
    pub fn clear(&self) {
        let _ = self.evt.read();
    }

    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }
}

/// Adapter for devices' requests to the VM.
pub struct DeviceRequests(pub std::sync::Arc<EventQueue>);

impl devices::VmRequests for DeviceRequests {
    fn reset(&self) {
        self.0.push(VmEvent::Reset);
    }
    fn exit(&self, code: u8) {
        self.0.push(VmEvent::Exit(code));
    }
    fn shutdown(&self) {
        self.0.push(VmEvent::Shutdown);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The control thread may be told twice about one batch of events
    /// (multishot poll); the second clear finds nothing and must return.
    #[test]
    fn a_second_clear_does_not_block() {
        let q = EventQueue::new().unwrap();
        q.push(VmEvent::Reset);
        q.push(VmEvent::Shutdown);
        q.clear();
        assert_eq!(q.pop(), Some(VmEvent::Reset));
        assert_eq!(q.pop(), Some(VmEvent::Shutdown));
        q.clear();
        assert_eq!(q.pop(), None);
    }
}
