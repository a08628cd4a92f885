//! Checking that a `runBytes` payload is something the agent can run: an
//! x86-64 ELF executable. Anything else is refused with a message that says
//! what the bytes were.

/// Why bytes were refused.
#[derive(Debug, PartialEq, Eq)]
pub enum FormatError {
    Unknown(String),
    Truncated(usize),
    Wasm,
    ElfClass(u8),
    ElfMachine(u16),
    ElfType(u16),
}

impl std::fmt::Display for FormatError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FormatError::Unknown(what) => {
                write!(f, "not a WASM component, WASM module or ELF executable: {what}")
            }
            FormatError::Truncated(n) => {
                write!(f, "truncated: {n} bytes is too short for an ELF header")
            }
            FormatError::Wasm => write!(
                f,
                "the microVM agent runs ELF executables only; run WebAssembly on the host's Executor"
            ),
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

const WASM_MAGIC: &[u8; 4] = b"\0asm";
const ELF_MAGIC: &[u8; 4] = b"\x7fELF";
/// e_ident through e_machine.
const ELF_HEADER_PREFIX: usize = 20;
const ELFCLASS64: u8 = 2;
const ET_EXEC: u16 = 2;
const ET_DYN: u16 = 3;
const EM_X86_64: u16 = 0x3e;

/// Accepts an x86-64 ELF executable (static, dynamic or position-independent).
pub fn check_elf(bytes: &[u8]) -> Result<(), FormatError> {
    if bytes.is_empty() {
        return Err(FormatError::Unknown("the payload is empty".into()));
    }
    if bytes.starts_with(WASM_MAGIC) {
        return Err(FormatError::Wasm);
    }
    if !bytes.starts_with(ELF_MAGIC) {
        if ELF_MAGIC.starts_with(bytes) {
            return Err(FormatError::Truncated(bytes.len()));
        }
        return Err(FormatError::Unknown(describe(bytes)));
    }
    let header = bytes
        .get(..ELF_HEADER_PREFIX)
        .ok_or(FormatError::Truncated(bytes.len()))?;
    if header[4] != ELFCLASS64 {
        return Err(FormatError::ElfClass(header[4]));
    }
    // The agent only runs on little-endian x86-64, so e_type and e_machine
    // of a binary it can run are little-endian.
    match u16::from_le_bytes([header[18], header[19]]) {
        EM_X86_64 => {}
        m => return Err(FormatError::ElfMachine(m)),
    }
    match u16::from_le_bytes([header[16], header[17]]) {
        ET_EXEC | ET_DYN => Ok(()),
        t => Err(FormatError::ElfType(t)),
    }
}

/// "first bytes 47 45 54 20 ... (\"GET \"), N bytes in all", for error messages.
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

    fn elf(class: u8, kind: u16, machine: u16) -> Vec<u8> {
        let mut h = vec![0u8; 64];
        h[..4].copy_from_slice(ELF_MAGIC);
        h[4] = class;
        h[16..18].copy_from_slice(&kind.to_le_bytes());
        h[18..20].copy_from_slice(&machine.to_le_bytes());
        h
    }

    #[test]
    fn accepts_x86_64_executables() {
        assert_eq!(check_elf(&elf(2, ET_EXEC, EM_X86_64)), Ok(()));
        assert_eq!(check_elf(&elf(2, ET_DYN, EM_X86_64)), Ok(()));
    }

    #[test]
    fn refuses_everything_else() {
        assert_eq!(
            check_elf(b""),
            Err(FormatError::Unknown("the payload is empty".into()))
        );
        assert_eq!(check_elf(b"\0asm\x01\0\0\0"), Err(FormatError::Wasm));
        assert_eq!(check_elf(b"\x7fEL"), Err(FormatError::Truncated(3)));
        assert_eq!(check_elf(b"\x7fELF\x02"), Err(FormatError::Truncated(5)));
        assert_eq!(
            check_elf(&elf(1, ET_EXEC, 3)),
            Err(FormatError::ElfClass(1))
        );
        assert_eq!(
            check_elf(&elf(2, ET_EXEC, 0xb7)),
            Err(FormatError::ElfMachine(0xb7))
        );
        assert_eq!(
            check_elf(&elf(2, 1, EM_X86_64)),
            Err(FormatError::ElfType(1))
        );
        let err = check_elf(b"GET / HTTP/1.1").unwrap_err().to_string();
        assert!(
            err.starts_with(
                "not a WASM component, WASM module or ELF executable: first bytes 47 45 54 20"
            ),
            "{err}"
        );
    }
}
