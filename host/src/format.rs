//! Telling what a `runBytes` payload is from its first bytes.

/// What a payload given to `runBytes` turned out to be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// A WebAssembly component (WASI preview 2).
    Component,
    /// A WebAssembly core module (WASI preview 1).
    Module,
    /// An x86-64 ELF executable, for a microVM.
    Elf,
}

/// Why bytes were not recognised.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FormatError {
    #[error("not a WASM component, WASM module or ELF executable: {0}")]
    Unknown(String),
    #[error("truncated: {0} bytes is too short for a WASM or ELF header")]
    Truncated(usize),
    #[error("unsupported WASM binary version {0:#x} (layer {1})")]
    WasmVersion(u16, u16),
    #[error("ELF executable for another machine (e_machine {0:#x}); only x86-64 is supported")]
    ElfMachine(u16),
}

const WASM_MAGIC: &[u8; 4] = b"\0asm";
const ELF_MAGIC: &[u8; 4] = b"\x7fELF";

pub fn detect(bytes: &[u8]) -> Result<Format, FormatError> {
    if bytes.is_empty() {
        return Err(FormatError::Unknown("the payload is empty".into()));
    }
    if bytes.starts_with(WASM_MAGIC) {
        let header = bytes.get(4..8).ok_or(FormatError::Truncated(bytes.len()))?;
        let version = u16::from_le_bytes([header[0], header[1]]);
        let layer = u16::from_le_bytes([header[2], header[3]]);
        return match (version, layer) {
            (1, 0) => Ok(Format::Module),
            (_, 1) => Ok(Format::Component),
            _ => Err(FormatError::WasmVersion(version, layer)),
        };
    }
    if bytes.starts_with(ELF_MAGIC) {
        let machine = bytes
            .get(18..20)
            .ok_or(FormatError::Truncated(bytes.len()))?;
        return match u16::from_le_bytes([machine[0], machine[1]]) {
            0x3e => Ok(Format::Elf),
            m => Err(FormatError::ElfMachine(m)),
        };
    }
    if WASM_MAGIC.starts_with(bytes) || ELF_MAGIC.starts_with(bytes) {
        return Err(FormatError::Truncated(bytes.len()));
    }
    Err(FormatError::Unknown(describe(bytes)))
}

/// "first bytes 47 45 54 20 ... (\"GET \")", for error messages.
fn describe(bytes: &[u8]) -> String {
    let head = &bytes[..bytes.len().min(8)];
    let hex: Vec<String> = head.iter().map(|b| format!("{b:02x}")).collect();
    let text: String = head
        .iter()
        .map(|&b| {
            if b.is_ascii_graphic() || b == b' ' {
                b as char
            } else {
                '.'
            }
        })
        .collect();
    format!(
        "first bytes {} ({:?}), {} bytes in all",
        hex.join(" "),
        text,
        bytes.len()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_the_formats() {
        assert_eq!(detect(b"\0asm\x01\0\0\0"), Ok(Format::Module));
        assert_eq!(detect(b"\0asm\x0d\0\x01\0"), Ok(Format::Component));
        let mut elf = vec![0u8; 64];
        elf[..4].copy_from_slice(b"\x7fELF");
        elf[18] = 0x3e;
        assert_eq!(detect(&elf), Ok(Format::Elf));
        elf[18] = 0xb7;
        assert_eq!(detect(&elf), Err(FormatError::ElfMachine(0xb7)));
    }

    #[test]
    fn says_what_the_bytes_were() {
        let e = detect(b"GET / HTTP/1.1").unwrap_err().to_string();
        assert!(
            e.starts_with("not a WASM component, WASM module or ELF executable"),
            "{e}"
        );
        assert!(e.contains("47 45 54 20"), "{e}");
        assert_eq!(detect(b"\0as"), Err(FormatError::Truncated(3)));
        assert_eq!(detect(b"\0asm\x01"), Err(FormatError::Truncated(5)));
        assert!(detect(b"").is_err());
    }
}
