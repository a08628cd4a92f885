//! Telling components, modules and ELF files apart: the detection shared
//! with the agent (`capsa_schema::format`), and the check that a WASM guest
//! is a program this host can run, made before anything is compiled.

pub use capsa_schema::format::{detect, Format};

use crate::SpawnError;

/// Refuses WebAssembly that is not a WASI command (a component exporting
/// `wasi:cli/run`, a module exporting `_start`), saying what it is instead.
/// It reads only the top level's export names, so a large guest is refused
/// in microseconds, not after seconds of compiling. Bytes it cannot parse
/// pass: compiling them says what is wrong.
pub fn check_command(kind: Format, bytes: &[u8]) -> Result<(), SpawnError> {
    let Ok(exports) = top_level_exports(bytes) else {
        return Ok(());
    };
    let has = |name: &str| exports.iter().any(|e| e == name);
    let listed = || match exports.is_empty() {
        true => "nothing".to_string(),
        false => exports
            .iter()
            .take(8)
            .map(|e| format!("`{e}`"))
            .collect::<Vec<_>>()
            .join(", "),
    };
    match kind {
        Format::Module if has("_start") => Ok(()),
        Format::Module if has("_initialize") => Err(SpawnError::NotACommand(
            "a WASI reactor: exports `_initialize` but no `_start`".into(),
        )),
        Format::Module => Err(SpawnError::NotACommand(format!(
            "a module that exports no `_start`: not a WASI command (it exports {})",
            listed()
        ))),
        Format::Component
            if exports
                .iter()
                .any(|e| e == "wasi:cli/run" || e.starts_with("wasi:cli/run@")) =>
        {
            Ok(())
        }
        Format::Component => Err(SpawnError::NotACommand(format!(
            "a component that exports no `wasi:cli/run`: not a WASI command (it exports {})",
            listed()
        ))),
        Format::Elf => Ok(()),
    }
}

/// The export names of the outermost module or component.
fn top_level_exports(bytes: &[u8]) -> Result<Vec<String>, wasmparser::BinaryReaderError> {
    use wasmparser::{Parser, Payload};
    let mut exports = Vec::new();
    let mut depth = 0usize;
    for payload in Parser::new(0).parse_all(bytes) {
        match payload? {
            Payload::ModuleSection { .. } | Payload::ComponentSection { .. } => depth += 1,
            Payload::End(_) => depth = depth.saturating_sub(1),
            Payload::ExportSection(section) if depth == 0 => {
                for export in section {
                    exports.push(export?.name.to_string());
                }
            }
            Payload::ComponentExportSection(section) if depth == 0 => {
                for export in section {
                    exports.push(export?.name.name.to_string());
                }
            }
            // Code bodies are not read: only the sections above matter.
            _ => {}
        }
    }
    Ok(exports)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn module(wat: &str) -> Vec<u8> {
        wat::parse_str(wat).unwrap()
    }

    #[test]
    fn commands_pass_and_reactors_are_named() {
        let command = module(r#"(module (func (export "_start")))"#);
        assert!(check_command(Format::Module, &command).is_ok());
        let reactor = module(r#"(module (func (export "_initialize")) (func (export "work")))"#);
        let e = check_command(Format::Module, &reactor)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("a WASI reactor: exports `_initialize` but no `_start`"),
            "{e}"
        );
        let library = module(r#"(module (func (export "add")))"#);
        let e = check_command(Format::Module, &library)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("exports no `_start`") && e.contains("`add`"),
            "{e}"
        );
        // A nested module's `_start` is not the component's run.
        let component = module(r#"(component (core module (func (export "_start"))))"#);
        let e = check_command(Format::Component, &component)
            .unwrap_err()
            .to_string();
        assert!(e.contains("no `wasi:cli/run`"), "{e}");
        // Garbage is left for the compiler to explain.
        assert!(check_command(Format::Module, b"\0asm\x01\0\0\0\xff\xff").is_ok());
    }
}
