//! The run states a VM can be in (QEMU's names).

/// QEMU's run states (qapi/run-state.json) that ringvm can be in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunState {
    Prelaunch,
    Running,
    Paused,
    Shutdown,
    InternalError,
    InMigrate,
    PostMigrate,
    FinishMigrate,
    SaveVm,
    RestoreVm,
    /// Stopped by a disk error under a `stop` policy (QEMU's io-error).
    IoError,
}

impl RunState {
    pub fn as_str(self) -> &'static str {
        match self {
            RunState::Prelaunch => "prelaunch",
            RunState::Running => "running",
            RunState::Paused => "paused",
            RunState::Shutdown => "shutdown",
            RunState::InternalError => "internal-error",
            RunState::InMigrate => "inmigrate",
            RunState::PostMigrate => "postmigrate",
            RunState::FinishMigrate => "finish-migrate",
            RunState::SaveVm => "save-vm",
            RunState::RestoreVm => "restore-vm",
            RunState::IoError => "io-error",
        }
    }
}
