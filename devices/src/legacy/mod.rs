//! Legacy PC devices: 16550A UART, i8042, isa-debug-exit, ACPI PM registers.

mod acpi_pm;
mod debug_exit;
mod i8042;
mod serial;

pub use acpi_pm::AcpiPm;
pub use debug_exit::DebugExit;
pub use i8042::I8042;
pub use serial::{Serial, SerialOutput};
