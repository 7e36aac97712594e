//! virtio-scsi in a snapshot: the config fields the driver set, typed and
//! versioned through [`DeviceState`] (unknown fields refused). Requests in
//! flight are never saved: the device is quiesced first, so every one has
//! completed into the used ring, which is guest RAM.

use super::*;
use crate::persist::{DeviceState, PersistError};

#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ScsiState {
    sense_size: u32,
    cdb_size: u32,
}

impl DeviceState for ScsiState {
    const DEVICE: &'static str = "virtio-scsi";
}

impl VirtioScsi {
    pub(super) fn saved_state(&self) -> serde_json::Value {
        ScsiState { sense_size: self.sense_size, cdb_size: self.cdb_size }.to_value()
    }

    /// Takes a saved state, each value checked as the driver's writes are.
    pub(super) fn restore_state(&mut self, state: &serde_json::Value) -> Result<(), PersistError> {
        let s = ScsiState::from_value(state)?;
        if s.sense_size > MAX_SENSE_SIZE || !(6..=MAX_CDB_SIZE).contains(&s.cdb_size) {
            return Err(ScsiState::invalid(format!("sense_size {} or cdb_size {} out of range", s.sense_size, s.cdb_size)));
        }
        self.sense_size = s.sense_size;
        self.cdb_size = s.cdb_size;
        Ok(())
    }
}
