//! The slice of the i8042 keyboard controller a Linux guest uses to reboot:
//! writing `0xfe` (pulse the reset line) to the command port 0x64. capsa
//! treats that as "the guest is done" and ends the VM cleanly. Everything
//! else reads as an idle controller with no keyboard.

/// Data port.
pub const DATA_PORT: u16 = 0x60;
/// Status/command port.
pub const COMMAND_PORT: u16 = 0x64;
/// Command: pulse the CPU reset line.
pub const CMD_RESET_CPU: u8 = 0xfe;

/// The i8042 controller.
#[derive(Debug, Default)]
pub struct I8042 {
    reset_requested: bool,
}

impl I8042 {
    /// A controller that has not seen a reset.
    pub fn new() -> Self {
        Self::default()
    }

    /// A guest read from `port`.
    pub fn read(&self, _port: u16) -> u8 {
        // Status 0: output buffer empty, input buffer empty.
        0
    }

    /// A guest write to `port`; returns true when the guest asked for a reset.
    pub fn write(&mut self, port: u16, value: u8) -> bool {
        if port == COMMAND_PORT && value == CMD_RESET_CPU {
            self.reset_requested = true;
        }
        self.reset_requested
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_only_on_fe_to_command_port() {
        let mut d = I8042::new();
        assert!(!d.write(DATA_PORT, CMD_RESET_CPU));
        assert!(!d.write(COMMAND_PORT, 0xaa));
        assert_eq!(d.read(COMMAND_PORT), 0);
        assert!(d.write(COMMAND_PORT, CMD_RESET_CPU));
    }
}
