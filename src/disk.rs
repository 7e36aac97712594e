//! Disks: `--disk` parsing, opening files, and virtio-scsi controllers on
//! the PCI bus with their queues spread over iothreads.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use devices::dirty::DmaDirtyLog;
use devices::scsi::Lun;
use devices::virtio::pci::{VirtioPci, VirtioPciState, BAR_SIZE};
use devices::virtio::scsi::{disk_size, Disk, ErrorAction, ErrorControl, Hotplug, VirtioScsi};
use kvm_ioctls::{IoEventAddress, NoDatamatch};

/// What can go wrong with the VM's disks after start-up (reflinks for a
/// snapshot, unplugging, loading their controllers' saved state).
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("{path}: {source}")]
    Open {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot reflink {src} to {dst}: the filesystem does not support it ({source}); use XFS or Btrfs, or leave 'disks' out")]
    ReflinkUnsupported {
        src: String,
        dst: String,
        #[source]
        source: std::io::Error,
    },
    #[error("reflink {src} to {dst}: {source}")]
    Reflink {
        src: String,
        dst: String,
        #[source]
        source: std::io::Error,
    },
    #[error("Device '{0}' not found")]
    NotFound(String),
    #[error("device_del {device}: {source}")]
    Unplug {
        device: String,
        #[source]
        source: devices::Error,
    },
    #[error("{found} virtio-scsi controller(s) in the state, {have} here")]
    Controllers { found: usize, have: usize },
    #[error("virtio-scsi controller {index}: {reason}")]
    ControllerState { index: usize, reason: String },
}
use ring::{IoThread, Remote};

use crate::error::{self, Error, Result};
use crate::irq::KvmMsiRouter;
use crate::layout;
use crate::machine::Machine;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskSpec {
    pub path: PathBuf,
    pub readonly: bool,
    /// cache=none: O_DIRECT.
    pub direct: bool,
    /// Pin this disk's controller to one iothread.
    pub iothread: Option<usize>,
    /// Request queues of this disk's controller (disks sharing a
    /// controller must agree).
    pub queues: Option<u32>,
    /// The slot of a disk unplugged before the snapshot this VM comes
    /// from: not opened, its LUN answers as absent (never from `--disk`).
    pub removed: bool,
    /// QEMU's werror= (default enospc) and rerror= (default report).
    pub werror: ErrorAction,
    pub rerror: ErrorAction,
}

/// Request queues per controller at most.
pub const MAX_QUEUES: u32 = 64;

fn on_off(key: &str, v: &str) -> std::result::Result<bool, String> {
    match v {
        "on" | "true" | "yes" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        _ => Err(format!("{key}={v}: expected on or off")),
    }
}

/// `path=FILE[,readonly=on|off][,cache=none|writeback][,iothread=N][,queues=N]`
/// (a bare FILE is taken as path=FILE).
pub fn parse_disk(s: &str) -> std::result::Result<DiskSpec, String> {
    let mut d = DiskSpec {
        path: PathBuf::new(),
        readonly: false,
        direct: false,
        iothread: None,
        queues: None,
        removed: false,
        werror: ErrorAction::Enospc,
        rerror: ErrorAction::Report,
    };
    for (i, part) in s.split(',').enumerate() {
        let (k, v) = match part.split_once('=') {
            Some(kv) => kv,
            None if i == 0 => ("path", part),
            None => return Err(format!("'{part}': expected key=value")),
        };
        match k {
            "path" | "file" => d.path = PathBuf::from(v),
            "readonly" => d.readonly = on_off(k, v)?,
            "cache" => {
                d.direct = match v {
                    "none" | "directsync" => true,
                    "writeback" | "writethrough" | "unsafe" => false,
                    _ => return Err(format!("cache={v}: expected none or writeback")),
                }
            }
            "iothread" => d.iothread = Some(v.trim_start_matches("iothread").parse().map_err(|_| format!("iothread={v}: expected a number"))?),
            "queues" | "num_queues" => {
                let n: u32 = v.parse().map_err(|_| format!("queues={v}: expected a number"))?;
                if !(1..=MAX_QUEUES).contains(&n) {
                    return Err(format!("queues={v}: expected 1 to {MAX_QUEUES}"));
                }
                d.queues = Some(n);
            }
            "werror" => d.werror = ErrorAction::parse(v, true).map_err(|e| format!("werror={v}: {e}"))?,
            "rerror" => d.rerror = ErrorAction::parse(v, false).map_err(|e| format!("rerror={v}: {e}"))?,
            _ => return Err(format!("unknown disk option '{k}'")),
        }
    }
    if d.path.as_os_str().is_empty() {
        return Err("missing path=FILE".into());
    }
    Ok(d)
}

fn open(spec: &DiskSpec, index: usize) -> Result<Disk> {
    let serial = format!("ringvm{index:04}");
    if spec.removed {
        return Ok(Disk::removed_slot(spec.path.display().to_string(), Lun::new(512, 512, spec.readonly, &serial)));
    }
    let mut o = OpenOptions::new();
    o.read(true).write(!spec.readonly);
    if spec.direct {
        o.custom_flags(libc::O_DIRECT);
    }
    let file: File = o.open(&spec.path).map_err(|source| Error::OpenFile { what: "disk", path: spec.path.clone(), source })?;
    let size = disk_size(&file).map_err(|source| Error::OpenFile { what: "disk", path: spec.path.clone(), source })?;
    if size < 512 {
        return Err(Error::Config(format!("disk {}: {size} bytes is smaller than one 512-byte block", spec.path.display())));
    }
    if size % 512 != 0 {
        // QEMU rounds such a file up and reads zeros past its end; ringvm
        // refuses rather than hide the last bytes or invent a block.
        return Err(Error::Config(format!(
            "disk {}: {size} bytes is not a whole number of 512-byte blocks ({} bytes past the last one); resize it, e.g. truncate -s {} (or -s {} to drop them)",
            spec.path.display(),
            size % 512,
            size.div_ceil(512) * 512,
            size / 512 * 512
        )));
    }
    Ok(Disk::new(spec.path.display().to_string(), file, Lun::new(size, 512, spec.readonly, &serial), spec.direct).with_error_policy(spec.werror, spec.rerror))
}

/// What `query-block` reports for one disk.
#[derive(Clone, Debug)]
pub struct BlockInfo {
    pub device: String,
    pub path: String,
    pub readonly: bool,
    pub direct: bool,
    pub controller: usize,
    pub lun: usize,
    pub iothreads: Vec<String>,
    pub size: u64,
    /// Position in the VM's disk list, its iothread pin and queues= option.
    pub index: usize,
    pub pin: Option<usize>,
    pub queues: Option<u32>,
    /// Unplugged (`device_del`): its LUN slot stays, so the LUNs after
    /// it keep their numbers, here and in a snapshot.
    pub removed: bool,
}

pub struct Storage {
    pub iothreads: Vec<IoThread>,
    pub controllers: Vec<Arc<Mutex<VirtioPci>>>,
    pub blocks: Vec<BlockInfo>,
    /// Each controller's hot-unplug handle.
    pub hotplug: Vec<Hotplug>,
    /// What the controllers' queues wrote into guest RAM (live snapshots).
    pub dirty: Arc<DmaDirtyLog>,
    /// Each controller's handle to retry requests a `stop` policy held.
    pub errors: Vec<ErrorControl>,
}

impl Storage {
    /// Issues every request held by a `stop` error policy again (`cont`).
    pub fn retry_held(&self) {
        for e in &self.errors {
            e.retry();
        }
    }

    /// Remotes of the iothreads, for other sources (snapshots).
    pub fn remotes(&self) -> Vec<Remote> {
        self.iothreads.iter().map(IoThread::remote).collect()
    }

    /// Stops every controller's queues with nothing in flight, keeping
    /// their state (the vCPUs are out). On failure the ones already paused
    /// are resumed.
    pub fn pause(&self) -> Result<()> {
        for (i, c) in self.controllers.iter().enumerate() {
            if let Err(e) = c.lock().unwrap_or_else(|e| e.into_inner()).pause() {
                self.resume();
                return Err(Error::Config(format!("virtio-scsi controller {i} did not quiesce: {e}")));
            }
        }
        Ok(())
    }

    /// Serves the paused queues again.
    pub fn resume(&self) {
        for c in &self.controllers {
            c.lock().unwrap_or_else(|e| e.into_inner()).resume();
        }
    }

    /// Each controller's state, in attach order (take it paused).
    pub fn save_state(&self) -> Vec<VirtioPciState> {
        self.controllers.iter().map(|c| c.lock().unwrap_or_else(|e| e.into_inner()).save_state()).collect()
    }

    /// Loads saved controller states (after guest RAM was loaded).
    pub fn restore_state(&self, states: &[VirtioPciState]) -> std::result::Result<(), DiskError> {
        if states.len() != self.controllers.len() {
            return Err(DiskError::Controllers { found: states.len(), have: self.controllers.len() });
        }
        for (i, (c, st)) in self.controllers.iter().zip(states).enumerate() {
            c.lock().unwrap_or_else(|e| e.into_inner()).restore_state(st).map_err(|reason| DiskError::ControllerState { index: i, reason })?;
        }
        Ok(())
    }

    /// Starts unplugging the disk `device` (its query-block name): see
    /// [`Hotplug::unplug_async`]; `done` runs when it is complete. The
    /// disk is gone from `blocks` (and from snapshots' disk lists, as an
    /// empty slot) from now on.
    pub fn unplug(&mut self, device: &str, done: impl FnOnce() + Send + 'static) -> std::result::Result<BlockInfo, DiskError> {
        let i = self.blocks.iter().position(|b| b.device == device && !b.removed).ok_or_else(|| DiskError::NotFound(device.to_string()))?;
        let b = &self.blocks[i];
        self.hotplug[b.controller].unplug_async(b.lun, done).map_err(|source| DiskError::Unplug { device: device.to_string(), source })?;
        self.blocks[i].removed = true;
        Ok(self.blocks[i].clone())
    }

    /// Stops the iothreads (after the vCPUs stopped).
    pub fn stop(&mut self) {
        for c in &self.controllers {
            // Resetting quiesces each controller's queues on their iothreads.
            c.lock().unwrap_or_else(|e| e.into_inner()).device_reset();
        }
        for t in &mut self.iothreads {
            t.stop();
        }
    }
}

/// Makes `dst` a reflink (FICLONE) of `src`: same content, shared extents.
pub fn reflink(src: &str, dst: &str) -> std::result::Result<(), DiskError> {
    use std::os::fd::AsRawFd;
    let open_err = |path: &str| {
        let path = path.to_string();
        move |source| DiskError::Open { path, source }
    };
    let s = File::open(src).map_err(open_err(src))?;
    let d = OpenOptions::new().write(true).create(true).truncate(false).mode(0o600).open(dst).map_err(open_err(dst))?;
    // SAFETY: FICLONE takes the source fd as its argument; both fds are open.
    let r = unsafe { libc::ioctl(d.as_raw_fd(), libc::FICLONE, s.as_raw_fd()) };
    if r != 0 {
        let source = std::io::Error::last_os_error();
        let (src, dst) = (src.to_string(), dst.to_string());
        return Err(match source.raw_os_error() {
            Some(libc::EOPNOTSUPP) | Some(libc::EXDEV) | Some(libc::EINVAL) | Some(libc::ENOTTY) => DiskError::ReflinkUnsupported { src, dst, source },
            _ => DiskError::Reflink { src, dst, source },
        });
    }
    Ok(())
}

/// Creates `iothreads` iothreads and one virtio-scsi controller per group
/// of disks (disks without `iothread=` share one whose `queues` request
/// queues are spread over all iothreads; `iothread=N` pins a disk's own
/// controller to iothread N).
/// `poll`: each iothread's poll window (see ring::RingOptions::poll).
/// Opens every disk's file (before any thread exists: an open that blocks
/// can still be ended by a signal's default action).
pub fn open_all(disks: &[DiskSpec]) -> Result<Vec<Disk>> {
    disks.iter().enumerate().map(|(i, d)| open(d, i)).collect()
}

/// Builds the virtio-scsi controllers for `disks` (opened by [`open_all`],
/// in the same order) and their iothreads.
pub fn attach(
    machine: &Machine,
    disks: &[DiskSpec],
    opened: Vec<Disk>,
    iothreads: usize,
    queues: u32,
    poll: std::time::Duration,
    events: Arc<crate::events::EventQueue>,
) -> Result<Storage> {
    if opened.len() != disks.len() {
        return Err(Error::Config(format!("{} disk(s) opened for {} given", opened.len(), disks.len())));
    }
    let mut files: Vec<Option<Disk>> = opened.into_iter().map(Some).collect();
    let iothreads = iothreads.max(1);
    let mut threads = Vec::new();
    if !disks.is_empty() {
        for i in 0..iothreads {
            let opts = ring::RingOptions::new(256).restricted().polling(poll).eager(true);
            let t = IoThread::spawn_with(&format!("iothread{i}"), opts).map_err(|e| Error::Config(format!("iothread{i}: {e}")))?;
            t.remote().send(|_| crate::seccomp::apply_or_exit(crate::seccomp::Role::IoThread)).map_err(|e| Error::Config(format!("iothread{i}: {e}")))?;
            threads.push(t);
        }
    }
    // (iothread of the disks' own controller, or None for the shared one; (index, disk) each).
    type Group<'a> = (Option<usize>, Vec<(usize, &'a DiskSpec)>);
    let mut groups: Vec<Group> = Vec::new();
    for (i, d) in disks.iter().enumerate() {
        if let Some(t) = d.iothread {
            if t >= iothreads {
                return Err(Error::Config(format!("disk {}: iothread={t} but only {iothreads} iothread(s) (--iothreads)", d.path.display())));
            }
        }
        match groups.iter_mut().find(|g| g.0 == d.iothread) {
            Some(g) => g.1.push((i, d)),
            None => groups.push((d.iothread, vec![(i, d)])),
        }
    }
    let router = Arc::new(KvmMsiRouter::new(machine.vm.clone()));
    let ram: Vec<(u64, u64)> = machine.slots().iter().map(|&(_, g, s)| (g, s)).collect();
    let dirty = Arc::new(DmaDirtyLog::new(&ram));
    let mut controllers = Vec::new();
    let mut hotplug = Vec::new();
    let mut errors = Vec::new();
    let mut blocks = Vec::new();
    for (ci, (pin, members)) in groups.into_iter().enumerate() {
        let remotes: Vec<Remote> = match pin {
            Some(t) => vec![threads[t].remote()],
            None => threads.iter().map(IoThread::remote).collect(),
        };
        // The controller's queue count: what its disks ask for (they must
        // agree), else --scsi-queues (at most 4 for a pinned controller).
        let asked: Vec<u32> = members.iter().filter_map(|(_, d)| d.queues).collect();
        if asked.windows(2).any(|w| w[0] != w[1]) {
            return Err(Error::Config(format!("disks sharing a virtio-scsi controller ask for different queue counts: {asked:?}")));
        }
        let nq = asked.first().copied().unwrap_or(if pin.is_some() { queues.min(4) } else { queues });
        let mut opened = Vec::new();
        for (lun, (i, spec)) in members.iter().enumerate() {
            let d = files[*i].take().ok_or_else(|| Error::Config(format!("disk {}: listed twice", spec.path.display())))?;
            blocks.push(BlockInfo {
                device: format!("scsi{ci}-lun{lun}"),
                path: spec.path.display().to_string(),
                readonly: spec.readonly,
                direct: spec.direct,
                controller: ci,
                lun,
                iothreads: remotes.iter().map(|r| r.name().to_string()).collect(),
                size: d.lun.blocks * u64::from(d.lun.block_size),
                index: *i,
                pin,
                queues: spec.queues,
                removed: spec.removed,
            });
            opened.push(d);
        }
        let bar = layout::PCI_MMIO_START + ci as u64 * BAR_SIZE;
        let sink_events = events.clone();
        let sink: devices::virtio::scsi::ErrorSink = Arc::new(move |e: devices::virtio::scsi::IoError| {
            sink_events.push(crate::events::VmEvent::BlockIoError { device: format!("scsi{ci}-lun{}", e.lun), write: e.write, errno: e.errno });
        });
        let dev = VirtioScsi::new(opened, remotes, nq).with_dirty_log(dirty.clone()).with_error_sink(sink);
        hotplug.push(dev.hotplug());
        errors.push(dev.error_control());
        let pci = VirtioPci::new(Box::new(dev), machine.mem.clone(), router.clone(), bar)?;
        for (addr, evt) in pci.notify_events() {
            machine.vm.register_ioevent(evt, &IoEventAddress::Mmio(addr), NoDatamatch).map_err(error::kvm("KVM_IOEVENTFD"))?;
        }
        let pci = Arc::new(Mutex::new(pci));
        machine.mmio.insert(pci.clone(), bar, BAR_SIZE)?;
        let relocator = BarMover { vm: machine.vm.clone(), mmio: machine.mmio.clone(), dev: Arc::downgrade(&pci) };
        pci.lock().unwrap_or_else(|e| e.into_inner()).set_relocator(Arc::new(relocator));
        machine.pci.lock().unwrap_or_else(|e| e.into_inner()).add(pci.clone())?;
        controllers.push(pci);
    }
    Ok(Storage { iothreads: threads, controllers, blocks, hotplug, dirty, errors })
}

/// Moves a virtio-pci function's BAR0 when the guest reprograms it (Linux
/// may reassign BARs, firmware does): the MMIO bus range and the doorbell
/// ioeventfds follow; the MSI-X table lives in the BAR and moves with it.
struct BarMover {
    vm: Arc<kvm_ioctls::VmFd>,
    mmio: Arc<devices::bus::Bus>,
    dev: std::sync::Weak<Mutex<VirtioPci>>,
}

impl devices::pci::BarRelocator for BarMover {
    fn move_bar(&self, old: u64, new: u64, len: u64, ioevents: &[(u64, &vmm_sys_util::eventfd::EventFd)]) -> std::result::Result<(), String> {
        let dev = self.dev.upgrade().ok_or("the device is gone")?;
        // The new range first: a clash (another device, an address past the
        // top) leaves everything where it was.
        self.mmio.insert(dev, new, len).map_err(|e| e.to_string())?;
        for (i, (off, evt)) in ioevents.iter().enumerate() {
            if let Err(e) = self.vm.register_ioevent(evt, &IoEventAddress::Mmio(new + off), NoDatamatch) {
                for (off, evt) in &ioevents[..i] {
                    let _ = self.vm.unregister_ioevent(evt, &IoEventAddress::Mmio(new + off), NoDatamatch);
                }
                self.mmio.remove(new);
                return Err(format!("KVM_IOEVENTFD at {:#x}: {e}", new + off));
            }
        }
        for (off, evt) in ioevents {
            if let Err(e) = self.vm.unregister_ioevent(evt, &IoEventAddress::Mmio(old + off), NoDatamatch) {
                log::warn!("virtio-pci: unregistering the doorbell at {:#x}: {e}", old + off);
            }
        }
        self.mmio.remove(old);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_specs() {
        let d = parse_disk("path=/x.img,readonly=on,cache=none,iothread=1").unwrap();
        assert_eq!(
            d,
            DiskSpec {
                path: "/x.img".into(),
                readonly: true,
                direct: true,
                iothread: Some(1),
                queues: None,
                removed: false,
                werror: ErrorAction::Enospc,
                rerror: ErrorAction::Report
            }
        );
        let p = parse_disk("path=/x,werror=stop,rerror=ignore").unwrap();
        assert_eq!((p.werror, p.rerror), (ErrorAction::Stop, ErrorAction::Ignore));
        assert!(parse_disk("path=/x,rerror=enospc").unwrap_err().contains("rerror=enospc"));
        assert!(parse_disk("path=/x,werror=maybe").is_err());
        assert_eq!(parse_disk("path=/x,queues=3").unwrap().queues, Some(3));
        assert!(parse_disk("path=/x,queues=0").is_err());
        assert!(parse_disk("path=/x,queues=65").is_err());
        assert_eq!(parse_disk("/y.img").unwrap().path, PathBuf::from("/y.img"));
        assert!(parse_disk("path=/x,cache=bogus").is_err());
        assert!(parse_disk("path=/x,speed=9").is_err());
        assert!(parse_disk("readonly=on").is_err());
        assert_eq!(parse_disk("path=/x,iothread=iothread0").unwrap().iothread, Some(0));
    }
}
