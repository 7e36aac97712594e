//! Devices' snapshot state: each device saves its own typed struct, and
//! the object-safe device traits carry it as a JSON value, parsed back here
//! with unknown fields refused (Firecracker's `Persist`, without the
//! constructor arguments: ringvm rebuilds its devices from the command line
//! and the state file's machine description, then loads this into them).
//! The state section versions each kind of state (`devices_version`,
//! `serial_version`).

use serde::de::DeserializeOwned;
use serde::Serialize;

/// A device state that cannot be loaded (the file is untrusted input).
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    #[error("{device} state: {source}")]
    Parse {
        device: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("{device} state: {reason}")]
    Invalid { device: &'static str, reason: String },
}

/// One device's saved state.
pub trait DeviceState: Serialize + DeserializeOwned {
    /// Its name in errors.
    const DEVICE: &'static str;

    fn to_value(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or(serde_json::Value::Null)
    }

    fn from_value(v: &serde_json::Value) -> Result<Self, PersistError> {
        Self::deserialize(v).map_err(|source| PersistError::Parse { device: Self::DEVICE, source })
    }

    fn invalid(reason: String) -> PersistError {
        PersistError::Invalid { device: Self::DEVICE, reason }
    }
}
