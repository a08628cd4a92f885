//! Checking that a `runBytes` payload is something the agent can run: an
//! x86-64 ELF executable. The detection is the one the host uses
//! (`capsa_schema::format`), so both refuse bytes with the same words.

use capsa_schema::format::{detect, Format, FormatError};

/// Why the agent will not run a payload.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum NotRunnable {
    #[error("the microVM agent runs ELF executables only; run WebAssembly on the host's Executor")]
    WebAssembly,
    /// Not an x86-64 executable, or nothing known: says what the bytes were.
    #[error(transparent)]
    Format(#[from] FormatError),
}

/// Accepts an x86-64 ELF executable; anything else is refused with what
/// the bytes were.
pub fn check_elf(bytes: &[u8]) -> Result<(), NotRunnable> {
    match detect(bytes)? {
        Format::Elf => Ok(()),
        Format::Component | Format::Module => Err(NotRunnable::WebAssembly),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use capsa_schema::format::elf_header;

    #[test]
    fn accepts_x86_64_executables_only() {
        assert_eq!(check_elf(&elf_header(2, 2, 0x3e)), Ok(()));
        assert_eq!(check_elf(&elf_header(2, 3, 0x3e)), Ok(()));
        let wasm = check_elf(b"\0asm\x01\0\0\0").unwrap_err();
        assert_eq!(wasm, NotRunnable::WebAssembly);
        assert!(wasm.to_string().contains("ELF executables only"), "{wasm}");
        let arm = check_elf(&elf_header(2, 2, 0xb7)).unwrap_err().to_string();
        assert!(arm.contains("another machine"), "{arm}");
        let garbage = check_elf(b"GET / HTTP/1.1").unwrap_err().to_string();
        assert!(garbage.starts_with("not a WASM component, WASM module or ELF executable"));
    }
}
