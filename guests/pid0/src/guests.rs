//! The guests PID0 carries, embedded when it is built.

/// The RPC-mode child: echoes through its host, forwards `runBytes`.
pub const CHILD_ECHO: &[u8] = include_bytes!(env!(
    "CAPSA_CHILD_ECHO_WASM",
    "set CAPSA_CHILD_ECHO_WASM to the built child-echo component"
));

/// A plain WASI program, as a component (WASI preview 2).
pub const HELLO: &[u8] = include_bytes!(env!(
    "CAPSA_HELLO_WASM",
    "set CAPSA_HELLO_WASM to the built hello component"
));

/// The same program as a core module (WASI preview 1).
pub const HELLO_P1: &[u8] = include_bytes!(env!(
    "CAPSA_HELLO_P1_WASM",
    "set CAPSA_HELLO_P1_WASM to the built hello core module (wasm32-wasip1)"
));

/// A plain WASI program that works on files (`guests/files`).
pub const FILES: &[u8] = include_bytes!(env!(
    "CAPSA_FILES_WASM",
    "set CAPSA_FILES_WASM to the built files component"
));

/// An x86-64 ELF executable for the `microvm` mode (Debian's static busybox
/// when the xtask builds PID0); empty when none was given at build time.
pub const DEMO_ELF: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/demo.elf"));
