//! virtio-scsi (virtio 1.x, 5.6). Request queues are served by iothreads:
//! each queue is owned by exactly one iothread's ring (no lock between
//! queues); a notify wakes it through a multishot poll on the queue's
//! ioeventfd; each request's data is one readv/writev straight between the
//! disk file and guest memory; completion writes the response, the used
//! ring and (unless EVENT_IDX suppresses it) the queue's MSI-X irqfd.

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use ring::{Fd, Op, OpId, Remote, Ring, SourceId};
use smallvec::SmallVec;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::{ActiveQueue, VirtioDevice, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

mod device;
mod eventq;
mod hotplug;
mod persist;
mod policy;
mod request;
mod tmf;
mod worker;

use crate::dirty::DmaDirtyLog;
use crate::scsi::{self, Action, Lun, Sense, Target};
pub use device::VirtioScsi;
use device::*;
use eventq::*;
pub use hotplug::Hotplug;
use policy::Io;
pub use policy::{retry_held, ErrorAction, ErrorControl, ErrorSink, IoError};
use request::{layout, total, Chain, Layout, Req};
use worker::*;

use virtio_bindings::virtio_scsi as vs;

pub const DEVICE_TYPE: u16 = virtio_bindings::virtio_ids::VIRTIO_ID_SCSI as u16;
pub const QUEUE_SIZE: u16 = 256;
pub const SEG_MAX: u32 = 254;
pub const DEFAULT_CDB_SIZE: u32 = vs::VIRTIO_SCSI_CDB_DEFAULT_SIZE;
pub const DEFAULT_SENSE_SIZE: u32 = vs::VIRTIO_SCSI_SENSE_DEFAULT_SIZE;
const MAX_CDB_SIZE: u32 = 256;
const MAX_SENSE_SIZE: u32 = 256;
/// How long a reset waits for in-flight requests.
const QUIESCE_DEADLINE: Duration = Duration::from_secs(30);

// virtio-scsi response codes (virtio-bindings' virtio_scsi.h).
pub const S_OK: u8 = vs::VIRTIO_SCSI_S_OK as u8;
pub const S_ABORTED: u8 = vs::VIRTIO_SCSI_S_ABORTED as u8;
pub const S_FUNCTION_SUCCEEDED: u8 = vs::VIRTIO_SCSI_S_FUNCTION_SUCCEEDED as u8;
pub const S_FUNCTION_REJECTED: u8 = vs::VIRTIO_SCSI_S_FUNCTION_REJECTED as u8;
pub const S_INCORRECT_LUN: u8 = vs::VIRTIO_SCSI_S_INCORRECT_LUN as u8;
pub const S_BAD_TARGET: u8 = vs::VIRTIO_SCSI_S_BAD_TARGET as u8;
pub const S_FAILURE: u8 = vs::VIRTIO_SCSI_S_FAILURE as u8;

/// The driver may be told of LUNs coming and going (5.6.3).
pub const VIRTIO_SCSI_F_HOTPLUG: u64 = 1 << vs::VIRTIO_SCSI_F_HOTPLUG;
/// virtio_scsi_event.event values and the reason of a removal.
pub const T_TRANSPORT_RESET: u32 = vs::VIRTIO_SCSI_T_TRANSPORT_RESET;
pub const T_EVENTS_MISSED: u32 = vs::VIRTIO_SCSI_T_EVENTS_MISSED;
pub const EVT_RESET_REMOVED: u32 = vs::VIRTIO_SCSI_EVT_RESET_REMOVED;
/// Events kept for a driver that has no event buffer posted; beyond
/// this the next one delivered carries EVENTS_MISSED.
const MAX_PENDING_EVENTS: usize = 64;

/// One disk, exposed as LUN `index` of target 0. Its file can be closed
/// while the device runs (hot-unplug): the LUN then answers as absent.
pub struct Disk {
    pub path: String,
    pub lun: Lun,
    pub direct: bool,
    /// What a host write / read error does (QEMU's werror / rerror).
    pub werror: ErrorAction,
    pub rerror: ErrorAction,
    /// The open file, -1 once closed.
    fd: AtomicI32,
    removed: AtomicBool,
}

impl Disk {
    pub fn new(path: impl Into<String>, file: File, lun: Lun, direct: bool) -> Disk {
        Disk {
            path: path.into(),
            lun,
            direct,
            werror: ErrorAction::Enospc,
            rerror: ErrorAction::Report,
            fd: AtomicI32::new(file.into_raw_fd()),
            removed: AtomicBool::new(false),
        }
    }

    /// QEMU's `werror=` and `rerror=` (defaults: enospc, report).
    pub fn with_error_policy(mut self, werror: ErrorAction, rerror: ErrorAction) -> Disk {
        self.werror = werror;
        self.rerror = rerror;
        self
    }

    /// The slot of a LUN that was unplugged before a snapshot: it keeps
    /// the LUN numbers of the ones after it, and answers as absent.
    pub fn removed_slot(path: impl Into<String>, lun: Lun) -> Disk {
        Disk {
            path: path.into(),
            lun,
            direct: false,
            werror: ErrorAction::Enospc,
            rerror: ErrorAction::Report,
            fd: AtomicI32::new(-1),
            removed: AtomicBool::new(true),
        }
    }

    pub fn is_removed(&self) -> bool {
        self.removed.load(Ordering::Acquire)
    }

    /// The file to do I/O on, None once the LUN was unplugged.
    fn fd(&self) -> Option<RawFd> {
        if self.is_removed() {
            return None;
        }
        let fd = self.fd.load(Ordering::Acquire);
        (fd >= 0).then_some(fd)
    }

    fn close(&self) {
        let fd = self.fd.swap(-1, Ordering::AcqRel);
        if fd >= 0 {
            // SAFETY: the fd came from into_raw_fd and is closed only here
            // (swapped out above, so once); no request can still pick it
            // up (see Hotplug::unplug).
            drop(unsafe { OwnedFd::from_raw_fd(fd) });
        }
    }
}

impl Drop for Disk {
    fn drop(&mut self) {
        self.close();
    }
}

/// A disk's size in bytes (files and block devices).
pub fn disk_size(f: &File) -> std::io::Result<u64> {
    use std::io::{Seek, SeekFrom};
    let mut f = f;
    f.seek(SeekFrom::End(0))
}
