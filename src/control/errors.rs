//! The one place where the modules' typed errors become QMP errors.
//!
//! QEMU answers a failed migration or snapshot command with GenericError
//! and the reason; so does ringvm, for every error that reaches a client
//! (the classes QEMU uses for other cases, such as DeviceNotFound, are
//! chosen where those cases are found).

use crate::disk::DiskError;
use crate::nfs::NfsError;
use crate::qmp::{ErrorClass, QmpError};
use crate::snapshot::format::FormatError;
use crate::snapshot::incoming::OpenError;
use crate::snapshot::load_error::LoadError;
use crate::snapshot::uri::UriError;

macro_rules! generic {
    ($($t:ty),*) => {
        $(impl From<$t> for QmpError {
            fn from(e: $t) -> QmpError {
                QmpError::generic(e.to_string())
            }
        })*
    };
}

generic!(UriError, NfsError, FormatError, LoadError, OpenError);

impl From<DiskError> for QmpError {
    fn from(e: DiskError) -> QmpError {
        let class = match e {
            DiskError::NotFound(_) => ErrorClass::DeviceNotFound,
            _ => ErrorClass::GenericError,
        };
        QmpError { class, desc: e.to_string() }
    }
}
