//! The world guests are linked against, `wit/world.wit`, as the host holds
//! guests to it.
//!
//! The world `guest` names every interface a component may import; the build
//! script reads it into [`IMPORTS`]. Before a component is linked, each of
//! its imports is checked against that list, so a component that wants more
//! than the world (`wasi:http`, an interface of its own) is refused with the
//! import's name rather than a linker's message, and nothing the linker might
//! define beyond the world is within a guest's reach. The tests below hold
//! the component linker to the world the other way round: it provides every
//! import of the world, with the world's types, and nothing else WASI knows.
//!
//! A WASI preview 1 module may import from [`P1_MODULE`] only.

use wasmtime::component::Component;
use wasmtime::{Engine, Module};

use crate::SpawnError;

include!(concat!(env!("OUT_DIR"), "/world.rs"));

/// The only module a WASI preview 1 module may import from.
pub const P1_MODULE: &str = "wasi_snapshot_preview1";

/// Names of refused imports given in an error; the rest are counted.
const NAMES_SHOWN: usize = 5;

/// Whether the host resolves a component import named `name` to an
/// interface of the world: that very name, or the same interface at a
/// semver-compatible version, as wasmtime's linker resolves names (a
/// component built against `wasi:cli/stdout@0.2.0` gets the world's
/// `@0.2.12`).
pub fn provides(name: &str) -> bool {
    IMPORTS.contains(&name)
        || compatible_track(name)
            .is_some_and(|track| IMPORTS.iter().any(|i| compatible_track(i) == Some(track)))
}

/// The prefix of `name` that its semver-compatible versions share:
/// `a:b/c@1.2.3` → `a:b/c@1`, `a:b/c@0.2.3` → `a:b/c@0.2`. `None` without a
/// version, for a pre-release and for `0.0.x`, which match only exactly.
fn compatible_track(name: &str) -> Option<&str> {
    let (_, version_text) = name.split_once('@')?;
    let version = semver::Version::parse(version_text).ok()?;
    let fields = match (version.pre.is_empty(), version.major, version.minor) {
        (false, _, _) | (true, 0, 0) => return None,
        (true, 0, _) => 2,
        (true, _, _) => 1,
    };
    let end = version_text.match_indices('.').nth(fields - 1)?.0;
    Some(&name[..name.len() - version_text.len() + end])
}

/// Refuses a component that imports anything outside the world, and says
/// what.
pub fn check_component(component: &Component, engine: &Engine) -> Result<(), SpawnError> {
    let ty = component.component_type();
    let outside: Vec<String> = ty
        .imports(engine)
        .map(|(name, _)| name)
        .filter(|name| !provides(name))
        .map(quoted)
        .collect();
    if outside.is_empty() {
        return Ok(());
    }
    Err(SpawnError::Link(format!(
        "the component imports {}, which capsa does not provide (a component may import \
         only the world in wit/world.wit: {})",
        listed(&outside),
        summary()
    )))
}

/// Refuses a WASI preview 1 module that imports from any other module than
/// [`P1_MODULE`], and says what.
pub fn check_module(module: &Module) -> Result<(), SpawnError> {
    let outside: Vec<String> = module
        .imports()
        .filter(|import| import.module() != P1_MODULE)
        .map(|import| format!("{} {}", quoted(import.module()), quoted(import.name())))
        .collect();
    if outside.is_empty() {
        return Ok(());
    }
    Err(SpawnError::Link(format!(
        "the module imports {}, which capsa does not provide (a WASI preview 1 module \
         may import only from {P1_MODULE:?})",
        listed(&outside)
    )))
}

/// A guest's name in quotes, cut short if it is long: it goes into an error
/// message.
fn quoted(name: &str) -> String {
    const MAX_CHARS: usize = 100;
    match name.char_indices().nth(MAX_CHARS) {
        Some((cut, _)) => format!("{:?}...", &name[..cut]),
        None => format!("{name:?}"),
    }
}

/// `a`, `a and b`, `a, b and c`, ..., `a, b, c, d, e and 3 more`.
fn listed(names: &[String]) -> String {
    let shown = &names[..names.len().min(NAMES_SHOWN)];
    let more = names.len() - shown.len();
    match (shown, more) {
        ([only], 0) => only.clone(),
        ([init @ .., last], 0) => format!("{} and {last}", init.join(", ")),
        _ => format!("{} and {more} more", shown.join(", ")),
    }
}

/// The world's imports by package: `wasi:io/{error, poll, streams}@0.2.12, ...`.
fn summary() -> String {
    let mut packages: Vec<(&str, &str, Vec<&str>)> = Vec::new();
    for name in IMPORTS {
        let (path, version) = name.split_once('@').unwrap_or((name, ""));
        let (package, interface) = path.split_once('/').unwrap_or((path, ""));
        match packages.last_mut() {
            Some((p, v, interfaces)) if *p == package && *v == version => {
                interfaces.push(interface)
            }
            _ => packages.push((package, version, vec![interface])),
        }
    }
    let packages: Vec<String> = packages
        .into_iter()
        .map(|(package, version, interfaces)| {
            let at = if version.is_empty() { "" } else { "@" };
            format!("{package}/{{{}}}{at}{version}", interfaces.join(", "))
        })
        .collect();
    packages.join(", ")
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::path::{Path, PathBuf};

    use wasmtime::component::Component;
    use wasmtime::{Engine, Store};
    use wasmtime_wasi::p2::bindings::CommandPre;
    use wasmtime_wasi::WasiCtxBuilder;
    use wit_component::{ComponentEncoder, StringEncoding};
    use wit_parser::{LiftLowerAbi, ManglingAndAbi, Resolve, WorldId};

    use super::*;
    use crate::engine::{self, CellState, MemoryLimiter};

    fn wit_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../wit")
    }

    /// A component that imports all of `world` (each of its functions and
    /// resources used) and exports what it exports.
    fn component_of(resolve: &Resolve, world: WorldId) -> Vec<u8> {
        let mut module =
            wit_component::dummy_module(resolve, world, ManglingAndAbi::Legacy(LiftLowerAbi::Sync));
        wit_component::embed_component_metadata(&mut module, resolve, world, StringEncoding::UTF8)
            .unwrap();
        ComponentEncoder::default()
            .module(&module)
            .unwrap()
            .validate(true)
            .encode()
            .unwrap()
    }

    #[test]
    fn the_linker_provides_the_whole_world() {
        let engine = Engine::default();
        let linker = engine::component_linker(&engine).unwrap();
        let mut resolve = Resolve::default();
        let (package, _) = resolve.push_dir(wit_dir()).unwrap();
        let world = resolve.select_world(&[package], Some("guest")).unwrap();
        let component = Component::new(&engine, component_of(&resolve, world)).unwrap();
        let ty = component.component_type();
        let imports: BTreeSet<&str> = ty.imports(&engine).map(|(name, _)| name).collect();
        assert_eq!(
            imports,
            IMPORTS.iter().copied().collect(),
            "the component made from wit/ imports what the build read from it"
        );
        check_component(&component, &engine).unwrap();
        let pre = linker
            .instantiate_pre(&component)
            .unwrap_or_else(|e| panic!("the linker lacks part of wit/world.wit: {e:#}"));
        CommandPre::new(pre).expect("the world's export is a WASI command");
    }

    /// Every interface of every WASI package in wit/deps, unstable ones
    /// included, is probed with a component that imports it (and what it
    /// uses): the linker must define it exactly when the world imports it.
    /// An interface is probed with its stable items if it has any, as the
    /// linker defines no unstable ones. (wasmtime's component linker cannot
    /// list its names, so a definition of an interface that no package in
    /// wit/deps describes escapes this test; the check at `runBytes` keeps it
    /// from guests all the same.)
    #[test]
    fn the_linker_provides_nothing_outside_the_world() {
        let engine = Engine::default();
        let linker = engine::component_linker(&engine).unwrap();
        let mut stable = Resolve::default();
        stable.push_dir(wit_dir()).unwrap();
        let mut all = Resolve {
            all_features: true,
            ..Resolve::default()
        };
        all.push_dir(wit_dir()).unwrap();
        let names = |resolve: &Resolve| -> BTreeSet<String> {
            let ids = resolve.interfaces.iter().map(|(id, _)| id);
            ids.filter_map(|id| resolve.id_of(id)).collect()
        };
        let stable_names = names(&stable);
        let candidates = names(&all);
        assert!(candidates.len() > IMPORTS.len(), "{candidates:?}");

        let mut wrong = Vec::new();
        for (i, name) in candidates.iter().enumerate() {
            let resolve = match stable_names.contains(name) {
                true => &mut stable,
                false => &mut all,
            };
            let package = resolve
                .push_str(
                    format!("probe{i}.wit"),
                    &format!("package capsa:probe{i}; world probe {{ import {name}; }}"),
                )
                .unwrap();
            let world = resolve.select_world(&[package], Some("probe")).unwrap();
            let probe = Component::new(&engine, component_of(resolve, world)).unwrap();
            assert!(
                probe.component_type().get_import(&engine, name).is_some(),
                "{name} has nothing a probe can import"
            );
            let linked = linker.instantiate_pre(&probe).is_ok();
            match (linked, IMPORTS.contains(&name.as_str())) {
                (true, false) => wrong.push(format!("{name} is linked, not in the world")),
                (false, true) => wrong.push(format!("{name} is in the world, not linked")),
                _ => {}
            }
        }
        assert!(wrong.is_empty(), "{wrong:#?}");
    }

    /// wit/deps is what the linked wasmtime-wasi implements: when wasmtime is
    /// upgraded, its WASI comes in here too, and the probe above sees what it
    /// added.
    ///
    /// `cargo metadata` resolves the lock file for the platform this test
    /// was built for only: without `--filter-platform` it wants every
    /// platform's crates (Windows' too), which a machine that only built
    /// for this one has never downloaded, and `--offline` must not reach
    /// the network from a test.
    #[test]
    fn the_vendored_wasi_is_the_linked_wasmtime_wasi() {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let out = std::process::Command::new(cargo)
            .args(["metadata", "--format-version=1", "--offline"])
            .args(["--filter-platform", env!("CAPSA_BUILD_TARGET")])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "cargo metadata: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let metadata: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let package = metadata["packages"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == "wasmtime-wasi")
            .expect("the host depends on wasmtime-wasi");
        let manifest = Path::new(package["manifest_path"].as_str().unwrap());
        let theirs = manifest.parent().unwrap().join("src/p2/wit/deps");
        let ours = wit_dir().join("deps");
        let names = |dir: &Path| -> BTreeSet<String> {
            std::fs::read_dir(dir)
                .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        };
        let stale = format!(
            "wit/deps is not the WASI of wasmtime-wasi {}: copy {} into wit/deps and \
             update wit/world.wit",
            package["version"],
            theirs.display()
        );
        assert_eq!(names(&ours), names(&theirs), "{stale}");
        for name in names(&theirs) {
            assert!(
                std::fs::read(ours.join(&name)).unwrap()
                    == std::fs::read(theirs.join(&name)).unwrap(),
                "{name}: {stale}"
            );
        }
    }

    #[test]
    fn compatible_versions_are_the_world_too() {
        assert!(provides("wasi:cli/stdout@0.2.12"));
        assert!(provides("wasi:cli/stdout@0.2.0"));
        assert!(provides("wasi:io/streams@0.2.99+build"));
        assert!(!provides("wasi:cli/stdout@0.3.0"));
        assert!(!provides("wasi:cli/stdout@0.2.0-rc-2023-11-10"));
        assert!(!provides("wasi:cli/stdout"));
        assert!(!provides("wasi:cli/run@0.2.12"));
        assert!(!provides("wasi:clocks/timezone@0.2.12"));
        assert!(!provides("wasi:http/outgoing-handler@0.2.0"));
        assert_eq!(compatible_track("a:b/c@1.2.3"), Some("a:b/c@1"));
        assert_eq!(compatible_track("a:b/c@0.2.3"), Some("a:b/c@0.2"));
        assert_eq!(compatible_track("a:b/c@0.0.3"), None);
    }

    #[test]
    fn imports_outside_the_world_are_named() {
        let engine = Engine::default();
        let component = wat::parse_str(
            r#"(component
                (import "wasi:cli/stdout@0.2.0" (instance))
                (import "wasi:http/outgoing-handler@0.2.0" (instance))
                (import "capsa:own/thing" (instance)))"#,
        )
        .unwrap();
        let component = Component::new(&engine, component).unwrap();
        let err = check_component(&component, &engine)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(
                r#"the component imports "wasi:http/outgoing-handler@0.2.0" and "capsa:own/thing", which capsa does not provide"#
            ),
            "{err}"
        );
        assert!(
            err.contains("wasi:io/{error, poll, streams}@0.2.12"),
            "{err}"
        );
        assert!(!err.contains("wasi:cli/stdout@0.2.0"), "{err}");

        let module = wat::parse_str(
            r#"(module
                (import "wasi_snapshot_preview1" "fd_write" (func (param i32 i32 i32 i32) (result i32)))
                (import "env" "callback" (func)))"#,
        )
        .unwrap();
        let module = Module::new(&engine, module).unwrap();
        let err = check_module(&module).unwrap_err().to_string();
        assert!(
            err.contains(r#"the module imports "env" "callback", which capsa does not provide"#),
            "{err}"
        );

        let names: Vec<String> = (0..8).map(|i| quoted(&format!("x{i}"))).collect();
        assert_eq!(listed(&names), r#""x0", "x1", "x2", "x3", "x4" and 3 more"#);
        assert_eq!(quoted(&"y".repeat(300)).len(), 100 + 2 + 3);
    }

    /// The preview 1 linker defines only [`P1_MODULE`] (its definitions can be
    /// listed, unlike the component linker's).
    #[test]
    fn the_preview1_linker_defines_only_preview1() {
        let engine = Engine::default();
        let linker = engine::module_linker(&engine).unwrap();
        let mut store = Store::new(
            &engine,
            CellState {
                wasi: WasiCtxBuilder::new().build_p1(),
                limiter: MemoryLimiter::new(1 << 20),
                ticks: 0,
                cpu_budget: None,
            },
        );
        let modules: BTreeSet<&str> = linker.iter(&mut store).map(|(m, _, _)| m).collect();
        assert_eq!(modules, BTreeSet::from([P1_MODULE]));
    }
}
