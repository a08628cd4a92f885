//! Prints whether KVM runs guest code natively or emulates it.
//!
//! stdout gets one machine-readable line, `native <ns>` or `emulated <ns>`,
//! where `<ns>` is the measured cost of one guest loop iteration in
//! nanoseconds (`cargo xtask demo` reads it); stderr gets an explanation.

use std::process::ExitCode;

fn main() -> ExitCode {
    match capsa_microvm::probe() {
        Ok(p) => {
            let kind = if p.emulated { "emulated" } else { "native" };
            println!("{kind} {:.1}", p.ns_per_iteration);
            eprintln!(
                "KVM {kind}: {:.1} ns per guest loop iteration (hardware runs about 1 ns; \
                 above {} ns counts as emulated)",
                p.ns_per_iteration,
                capsa_microvm::probe::EMULATED_THRESHOLD_NS
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: the KVM probe could not run: {e}");
            ExitCode::FAILURE
        }
    }
}
