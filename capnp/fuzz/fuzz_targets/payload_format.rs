//! Arbitrary bytes through payload detection, the first thing `runBytes`
//! does with a caller's bytes in the host and in the agent: it never
//! panics, and what it calls an ELF or WASM has that header.
#![no_main]

use capsa_schema::format::{detect, Format};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match detect(data) {
        Ok(Format::Elf) => assert!(data.starts_with(b"\x7fELF")),
        Ok(Format::Component | Format::Module) => assert!(data.starts_with(b"\0asm")),
        Err(e) => drop(e.to_string()),
    }
});
