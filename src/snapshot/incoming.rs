//! The incoming side of a restore (`migrate-incoming`): its status, and the
//! opener thread that reads and checks a state file's header off the
//! control thread.
//!
//! Opening a state file can block for as long as its filesystem likes (a
//! stalled FUSE or NFS server, a file that is really a device): the control
//! thread must keep serving QMP and signals meanwhile, so the open, the
//! header and bitmap checks, the machine comparison and the state section's
//! parse all run on a short-lived thread, which hands the result back
//! through a slot and a [`VmEvent`]. The control side answers the waiting
//! client then, or when its deadline passes first.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use crate::events::{EventQueue, VmEvent};
use crate::snapshot::format::Checked;
use crate::snapshot::StateSection;

/// QEMU's MigrationStatus values an incoming VM goes through.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum IncomingStatus {
    /// No migrate-incoming yet (or the last one failed before any RAM was
    /// touched: it may be given again).
    #[default]
    None,
    /// The state file is being opened and checked.
    Setup,
    /// The loader is reading RAM.
    Active,
    /// Lazy restore: the guest runs while RAM streams in.
    PostcopyActive,
    Completed,
    Failed,
}

impl IncomingStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            IncomingStatus::None => "none",
            IncomingStatus::Setup => "setup",
            IncomingStatus::Active => "active",
            IncomingStatus::PostcopyActive => "postcopy-active",
            IncomingStatus::Completed => "completed",
            IncomingStatus::Failed => "failed",
        }
    }
}

/// What the VM the file is loaded into looks like.
#[derive(Clone, Debug)]
pub struct Target {
    pub cpus: u8,
    pub mem_size: u64,
    /// Its disks' paths, in LUN order.
    pub disks: Vec<String>,
    /// And their (bytes, read-only).
    pub media: Vec<(u64, bool)>,
    /// Boot options from its command line.
    pub boot: crate::snapshot::GivenBoot,
}

/// A state file opened, checked against the target and parsed.
pub struct Opened {
    pub path: PathBuf,
    pub checked: Checked,
    pub section: StateSection,
    /// An incremental file's bases, newest first.
    pub bases: Vec<(PathBuf, Checked)>,
}

/// Why a state file cannot be loaded into this VM.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The file (or a base of it) is unreadable or malformed; the message
    /// names the file.
    #[error(transparent)]
    Chain(#[from] super::chain::ChainError),
    #[error("state file {file}: {source}")]
    Mismatch { file: String, source: super::Mismatch },
    /// The state section does not parse or has another version.
    #[error(transparent)]
    Section(crate::Error),
}

/// Where the opener leaves its result: (attempt, outcome).
pub type Slot = Arc<Mutex<Option<(u64, Result<Opened, OpenError>)>>>;

/// Opens and checks `path` for `target`, as the control thread would if it
/// could afford to wait. Every error names the file.
pub fn open(path: &std::path::Path, target: &Target) -> Result<Opened, OpenError> {
    let mismatch = |source| OpenError::Mismatch { file: path.display().to_string(), source };
    let mut chain = super::chain::open_chain(path)?;
    let checked = chain.remove(0).1;
    let m = &checked.header.machine;
    crate::snapshot::check_machine(m, target.cpus, target.mem_size).map_err(mismatch)?;
    crate::snapshot::check_disks(&m.disks, &target.disks).map_err(mismatch)?;
    crate::snapshot::check_disk_media(&m.disks, &target.media).map_err(mismatch)?;
    crate::snapshot::check_boot(m, &target.boot).map_err(mismatch)?;
    let section = crate::snapshot::parse_section(path, &checked).map_err(OpenError::Section)?;
    Ok(Opened { path: path.to_path_buf(), checked, section, bases: chain })
}

/// Runs [`open`] on a new thread; its result lands in `slot` tagged with
/// `attempt`, and `events` gets [`VmEvent::IncomingOpened`]. The thread is
/// never joined: if the file never answers, it waits alone (the control
/// side has given up on it by then and ignores a late result).
pub fn spawn_open(path: PathBuf, target: Target, attempt: u64, slot: Slot, events: Arc<EventQueue>) -> std::io::Result<()> {
    std::thread::Builder::new().name("incoming-open".into()).spawn(move || {
        let r = open(&path, &target);
        *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some((attempt, r));
        events.push(VmEvent::IncomingOpened(attempt));
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_use_qemus_names() {
        let all = [
            IncomingStatus::None,
            IncomingStatus::Setup,
            IncomingStatus::Active,
            IncomingStatus::PostcopyActive,
            IncomingStatus::Completed,
            IncomingStatus::Failed,
        ];
        let names: Vec<&str> = all.iter().map(|s| s.as_str()).collect();
        assert_eq!(names, ["none", "setup", "active", "postcopy-active", "completed", "failed"]);
    }

    #[test]
    fn a_missing_file_is_an_error_naming_it() {
        let t = Target { cpus: 1, mem_size: 64 << 20, disks: vec![], media: vec![], boot: Default::default() };
        let Err(e) = open(std::path::Path::new("/nonexistent/ringvm.state"), &t) else { panic!("opened a missing file") };
        let e = e.to_string();
        assert!(e.starts_with("state file /nonexistent/ringvm.state: "), "{e}");
    }

    #[test]
    fn the_opener_reports_through_the_slot_and_an_event() {
        let events = Arc::new(EventQueue::new().unwrap());
        let slot: Slot = Arc::default();
        let t = Target { cpus: 1, mem_size: 64 << 20, disks: vec![], media: vec![], boot: Default::default() };
        spawn_open("/nonexistent/x.state".into(), t, 7, slot.clone(), events.clone()).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let ev = loop {
            if let Some(ev) = events.pop() {
                break ev;
            }
            assert!(std::time::Instant::now() < deadline, "no event from the opener");
            std::thread::sleep(std::time::Duration::from_millis(1));
        };
        assert_eq!(ev, VmEvent::IncomingOpened(7));
        let (attempt, r) = slot.lock().unwrap().take().unwrap();
        assert_eq!(attempt, 7);
        assert!(r.is_err());
    }
}
