//! Reads the world guests are linked against (`wit/world.wit`, world
//! `guest`) into the list of imports the host gives components, so that
//! `runBytes` can refuse any other import by name. wit/ stays the one place
//! that says what a guest may import.

use std::fmt::Write;
use std::path::PathBuf;

use wit_parser::{Resolve, WorldItem};

fn main() {
    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let wit = manifest.join("../wit");
    println!("cargo:rerun-if-changed={}", wit.display());
    // The platform this crate is built for, for the test that finds
    // wasmtime-wasi's sources with `cargo metadata --filter-platform`.
    let target = std::env::var("TARGET").expect("set by cargo");
    println!("cargo:rustc-env=CAPSA_BUILD_TARGET={target}");

    let mut resolve = Resolve::default();
    let (package, _) = resolve
        .push_dir(&wit)
        .unwrap_or_else(|e| panic!("cannot read wit/: {e:?}"));
    let world = resolve
        .select_world(&[package], Some("guest"))
        .unwrap_or_else(|e| panic!("wit/world.wit has no world `guest`: {e:?}"));
    let mut imports: Vec<String> = resolve.worlds[world]
        .imports
        .iter()
        .map(|(key, item)| {
            let name = resolve.name_world_key(key);
            match item {
                WorldItem::Interface { .. } => name,
                _ => panic!(
                    "wit/world.wit: world `guest` imports `{name}`, which is not an interface"
                ),
            }
        })
        .collect();
    imports.sort();

    let mut out = String::from(
        "/// The interfaces of the world `guest` in wit/world.wit, sorted: what a\n\
         /// component may import.\n\
         pub const IMPORTS: &[&str] = &[\n",
    );
    for name in &imports {
        writeln!(out, "    {name:?},").unwrap();
    }
    out.push_str("];\n");
    let dest = PathBuf::from(std::env::var_os("OUT_DIR").expect("set by cargo")).join("world.rs");
    std::fs::write(&dest, out).unwrap_or_else(|e| panic!("writing {}: {e}", dest.display()));
}
