//! Telling what a `runBytes` payload is from its first bytes. Shared by
//! every side that accepts `runBytes`, so they refuse the same bytes with
//! the same words.

use std::fmt;

/// What a payload turned out to be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// A WebAssembly component (WASI preview 2).
    Component,
    /// A WebAssembly core module (WASI preview 1).
    Module,
    /// An x86-64 ELF executable (static, dynamic or position-independent).
    Elf,
}

impl Format {
    /// Its name in `Program.info`: "component", "module" or "elf".
    pub fn name(self) -> &'static str {
        match self {
            Format::Component => "component",
            Format::Module => "module",
            Format::Elf => "elf",
        }
    }
}

/// Why bytes were not recognised.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FormatError {
    Unknown(String),
    Truncated(usize),
    WasmVersion(u16, u16),
    ElfClass(u8),
    ElfMachine(u16),
    ElfType(u16),
}

impl fmt::Display for FormatError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FormatError::Unknown(what) => {
                write!(
                    f,
                    "not a WASM component, WASM module or ELF executable: {what}"
                )
            }
            FormatError::Truncated(n) => {
                write!(
                    f,
                    "truncated: {n} bytes is too short for a WASM or ELF header"
                )
            }
            FormatError::WasmVersion(v, l) => {
                write!(f, "unsupported WASM binary version {v:#x} (layer {l})")
            }
            FormatError::ElfClass(c) => write!(
                f,
                "ELF executable of class {c} (32-bit or unknown); only 64-bit x86-64 is supported"
            ),
            FormatError::ElfMachine(m) => write!(
                f,
                "ELF executable for another machine (e_machine {m:#x}); only x86-64 is supported"
            ),
            FormatError::ElfType(t) => write!(
                f,
                "ELF file of type {t} is not an executable (wanted ET_EXEC or ET_DYN)"
            ),
        }
    }
}

impl std::error::Error for FormatError {}

const WASM_MAGIC: &[u8; 4] = b"\0asm";
const ELF_MAGIC: &[u8; 4] = b"\x7fELF";
/// e_ident through e_machine.
const ELF_HEADER_PREFIX: usize = 20;
const ELFCLASS64: u8 = 2;
const ET_EXEC: u16 = 2;
const ET_DYN: u16 = 3;
const EM_X86_64: u16 = 0x3e;

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
        let header = bytes
            .get(..ELF_HEADER_PREFIX)
            .ok_or(FormatError::Truncated(bytes.len()))?;
        if header[4] != ELFCLASS64 {
            return Err(FormatError::ElfClass(header[4]));
        }
        // Only little-endian x86-64 is run, so these fields of a runnable
        // binary are little-endian.
        match u16::from_le_bytes([header[18], header[19]]) {
            EM_X86_64 => {}
            m => return Err(FormatError::ElfMachine(m)),
        }
        return match u16::from_le_bytes([header[16], header[17]]) {
            ET_EXEC | ET_DYN => Ok(Format::Elf),
            t => Err(FormatError::ElfType(t)),
        };
    }
    if WASM_MAGIC.starts_with(bytes) || ELF_MAGIC.starts_with(bytes) {
        return Err(FormatError::Truncated(bytes.len()));
    }
    Err(FormatError::Unknown(describe(bytes)))
}

/// "first bytes 47 45 54 20 ... (\"GET \"), N bytes in all".
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

/// A minimal ELF header with these fields, for tests.
#[doc(hidden)]
pub fn elf_header(class: u8, kind: u16, machine: u16) -> Vec<u8> {
    let mut h = vec![0u8; 64];
    h[..4].copy_from_slice(ELF_MAGIC);
    h[4] = class;
    h[5] = 1;
    h[16..18].copy_from_slice(&kind.to_le_bytes());
    h[18..20].copy_from_slice(&machine.to_le_bytes());
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_the_formats() {
        assert_eq!(detect(b"\0asm\x01\0\0\0"), Ok(Format::Module));
        assert_eq!(detect(b"\0asm\x0d\0\x01\0"), Ok(Format::Component));
        assert_eq!(detect(&elf_header(2, ET_EXEC, EM_X86_64)), Ok(Format::Elf));
        assert_eq!(detect(&elf_header(2, ET_DYN, EM_X86_64)), Ok(Format::Elf));
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
        assert_eq!(detect(b"\x7fELF\x02"), Err(FormatError::Truncated(5)));
        assert_eq!(
            detect(b"\0asm\x02\0\0\0"),
            Err(FormatError::WasmVersion(2, 0))
        );
        assert!(detect(b"").is_err());
        assert_eq!(
            detect(&elf_header(1, ET_EXEC, 3)),
            Err(FormatError::ElfClass(1))
        );
        assert_eq!(
            detect(&elf_header(2, ET_EXEC, 0xb7)),
            Err(FormatError::ElfMachine(0xb7))
        );
        assert_eq!(
            detect(&elf_header(2, 1, EM_X86_64)),
            Err(FormatError::ElfType(1))
        );
    }

    /// Seeded stand-in for the `payload_format` fuzz target: random bytes,
    /// and random bytes behind each magic, never panic detection, and what
    /// it names ELF or WASM has that magic.
    #[test]
    fn random_bytes_never_panic_detection() {
        let mut state: u64 = 0x5eed_f00d;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for round in 0..100_000 {
            let len = (next() % 80) as usize;
            let mut bytes: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            let magic: &[u8] = match round % 3 {
                0 => ELF_MAGIC,
                1 => WASM_MAGIC,
                _ => b"",
            };
            bytes.splice(0..0, magic.iter().copied());
            match detect(&bytes) {
                Ok(Format::Elf) => assert!(bytes.starts_with(ELF_MAGIC)),
                Ok(Format::Component | Format::Module) => assert!(bytes.starts_with(WASM_MAGIC)),
                Err(e) => assert!(!e.to_string().is_empty()),
            }
        }
    }
}
