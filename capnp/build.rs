fn main() {
    println!("cargo:rerun-if-changed=schema/capsa.capnp");
    if let Err(e) = capnpc::CompilerCommand::new()
        .src_prefix("schema")
        .file("schema/capsa.capnp")
        .run()
    {
        panic!(
            "compiling schema/capsa.capnp failed: {e}\n\
             The Cap'n Proto compiler `capnp` must be on PATH \
             (`cargo xtask test` installs Debian's `capnproto` package when it is missing)."
        );
    }
}
