//! Legacy PC devices on port I/O: the 8250 UART at 0x3f8 and the i8042
//! controller's reset line.

pub mod i8042;
pub mod serial;
