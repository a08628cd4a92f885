//! The host crate's modules are layered: each imports only modules of the
//! layers below its own, so there is no cycle and a reader can learn the
//! crate bottom up. ARCHITECTURE.md's code map shows the same layers.
//!
//! The check reads the sources: every `crate::NAME` path and `use crate::{..}`
//! group outside comments and outside the `#[cfg(test)] mod tests` block
//! (tests may reach anywhere), with the crate root's re-exports
//! (`crate::SpawnError` is `error`'s) resolved through `lib.rs`. A module
//! that is a folder (`vm/`) is one module: its submodules' files count as
//! its own.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Bottom to top. A module may import modules of lower layers only.
const LAYERS: &[&[&str]] = &[
    // Leaves: statuses, pipes, flow control, the disk cache, TLS and
    // admission policy, host directories, the epoch ticker, the byte-bounded
    // LRU, what a network view allows.
    &[
        "status",
        "pipe",
        "transport",
        "cache",
        "tls",
        "admission",
        "directory",
        "ticker",
        "lru",
        "netpolicy",
    ],
    &["error"],
    // Formats, the WIT world, byte streams, network views served,
    // quotas, the process registry, the compile cache in memory.
    &[
        "format",
        "world",
        "stream",
        "network",
        "quota",
        "registry",
        "memory_cache",
    ],
    &["engine"],
    // One running guest: a WASM cell or a machine.
    &["cell", "vm"],
    &["program", "scope"],
    // Compiling, loading and starting guests, and the registry of them all.
    &["spawner"],
    // The capabilities.
    &["process"],
    &["executor"],
    // The faces: the embedder's host, `capsa serve`, `capsa exec`, and a
    // host on a thread of its own.
    &["host"],
    &["serve", "exec"],
    &["embed"],
];

/// The part of `source` that is the module's own code: no comments, no
/// unit tests.
fn code_of(source: &str) -> String {
    let lines: Vec<&str> = source.lines().collect();
    let mut out = String::new();
    for (i, line) in lines.iter().enumerate() {
        let trimmed = line.trim_start();
        if trimmed == "#[cfg(test)]"
            && lines[i + 1..]
                .iter()
                .find(|l| !l.trim().is_empty())
                .is_some_and(|l| l.trim_start().starts_with("mod tests"))
        {
            break;
        }
        if trimmed.starts_with("//") {
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// Names the crate root re-exports, and the module each comes from
/// (`pub use error::SpawnError;`, `pub use host::{Host, HostConfig};`).
fn root_reexports(lib: &str) -> BTreeMap<String, String> {
    let mut map = BTreeMap::new();
    for line in lib.lines() {
        let Some(path) = line.trim().strip_prefix("pub use ") else {
            continue;
        };
        let path = path.trim_end_matches(';');
        let Some((module, names)) = path.split_once("::") else {
            continue;
        };
        let names = names.trim_start_matches('{').trim_end_matches('}');
        for name in names.split(',') {
            let name = name.trim().rsplit("::").next().unwrap_or_default();
            if !name.is_empty() {
                map.insert(name.to_string(), module.to_string());
            }
        }
    }
    map
}

/// Every `.rs` file of a module that is a folder (`vm/mod.rs`, `vm/kvm.rs`,
/// ...): its submodules are part of it.
fn sources_under(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(sources_under(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        }
    }
    files
}

/// The crate-level names `code` uses: `crate::NAME` and `use crate::{A, B}`.
fn crate_names(code: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    for (at, _) in code.match_indices("crate::") {
        let rest = &code[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let group = &group[..group.find('}').unwrap_or(group.len())];
            for item in group.split(',') {
                let name = ident(item.trim());
                if !name.is_empty() {
                    names.insert(name);
                }
            }
        } else {
            let name = ident(rest);
            if !name.is_empty() {
                names.insert(name);
            }
        }
    }
    names
}

#[test]
fn no_module_imports_one_above_or_beside_it() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let layer_of: BTreeMap<&str, usize> = LAYERS
        .iter()
        .enumerate()
        .flat_map(|(i, layer)| layer.iter().map(move |m| (*m, i)))
        .collect();
    let lib = std::fs::read_to_string(src.join("lib.rs")).unwrap();
    let reexports = root_reexports(&lib);

    let mut problems = Vec::new();
    let mut seen = BTreeSet::new();
    for entry in std::fs::read_dir(&src).unwrap() {
        let path = entry.unwrap().path();
        let Some(module) = path.file_stem().and_then(|s| s.to_str()) else {
            continue;
        };
        let files = if path.join("mod.rs").is_file() {
            sources_under(&path)
        } else if path.extension().is_some_and(|e| e == "rs") {
            vec![path.clone()]
        } else {
            continue;
        };
        if module == "lib" || module == "main" {
            continue;
        }
        seen.insert(module.to_string());
        let Some(&own) = layer_of.get(module) else {
            problems.push(format!("{module}: in no layer (add it to LAYERS)"));
            continue;
        };
        let code: String = files
            .iter()
            .map(|file| code_of(&std::fs::read_to_string(file).unwrap()))
            .collect();
        for name in crate_names(&code) {
            let target = match layer_of.get(name.as_str()) {
                Some(_) => name.clone(),
                None => match reexports.get(&name) {
                    Some(module) => module.clone(),
                    // Another crate's, re-exported at the root (`mirror`,
                    // `client`, `schema`).
                    None => continue,
                },
            };
            let Some(&theirs) = layer_of.get(target.as_str()) else {
                continue;
            };
            if target != module && theirs >= own {
                problems.push(format!(
                    "{module} (layer {own}) uses crate::{name}, of {target} (layer {theirs})"
                ));
            }
        }
    }
    for module in layer_of.keys() {
        if !seen.contains(*module) {
            problems.push(format!("{module}: in LAYERS but not in src/"));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn the_check_sees_what_it_must() {
    let code = code_of(
        "use crate::engine::Runtime;\nuse crate::{world, SpawnError};\n\
         // crate::host in a comment\nfn f() { crate::vm::start(); }\n\
         #[cfg(test)]\nmod tests {\n    use crate::serve;\n}\n",
    );
    let names = crate_names(&code);
    let want: BTreeSet<String> = ["engine", "world", "SpawnError", "vm"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(names, want);
    let map = root_reexports("pub use error::SpawnError;\npub use host::{Host, HostConfig};\n");
    assert_eq!(map.get("HostConfig").map(String::as_str), Some("host"));
    assert_eq!(map.get("SpawnError").map(String::as_str), Some("error"));
}
