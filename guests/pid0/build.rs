//! Embeds the ELF executable of the `microvm` mode, when the build names one
//! in `CAPSA_DEMO_ELF` (the xtask passes Debian's static busybox); otherwise
//! that mode reports that nothing was embedded.

use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=CAPSA_DEMO_ELF");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR")).join("demo.elf");
    let bytes = match std::env::var_os("CAPSA_DEMO_ELF") {
        Some(path) => {
            println!("cargo:rerun-if-changed={}", PathBuf::from(&path).display());
            std::fs::read(&path).unwrap_or_else(|e| {
                panic!("CAPSA_DEMO_ELF {}: {e}", PathBuf::from(&path).display())
            })
        }
        None => Vec::new(),
    };
    std::fs::write(&out, bytes).expect("writing the embedded ELF");
}
