//! What `runBytes` and `Program.run` carry, read and checked once for every
//! implementation (the capsa host and the microVM agent) into one
//! [`Request`], so the same request is refused the same way whoever serves
//! it, and every field is read, whether or not the side uses it.
//!
//! Text becomes a program's C strings (WASI's `args_get` and `environ_get`,
//! `execve`'s argv and envp, a WASI preopen's name): each must be UTF-8 and
//! free of NUL bytes, which would silently cut it short; an environment
//! variable's name must be non-empty and free of `=`; a granted
//! directory's path must be non-empty.

use std::time::Duration;

use crate::argv;
use crate::capsa_capnp::{
    byte_sink, directory, env_var, executor, grant, network, options, program, StdioMode,
};
use crate::error::error;
use crate::format::Format;
use crate::ErrorKind;

/// Most directories one request may grant.
pub const MAX_GRANTS: u32 = 64;

/// A `runBytes` or `Program.run` request, read and checked.
pub struct Request {
    /// What the payload is; what it was read for.
    pub format: Format,
    /// argv[1..].
    pub args: Vec<String>,
    /// The whole environment, as name and value pairs.
    pub env: Vec<(String, String)>,
    /// `Options.name`: argv[0] and the log label; empty when none was given
    /// (see [`Request::argv0`]).
    pub name: String,
    pub limits: Limits,
    pub stdio: Stdio,
    /// `Options.directories`, each at its path.
    pub grants: Vec<(String, directory::Client)>,
    /// `Options.vm` for an ELF payload; the defaults for WebAssembly.
    pub vm: Vm,
    /// `Options.network`: what the child may reach; unset, nothing.
    pub network: Option<network::Client>,
}

/// The limits the caller asked for; `None` (zero in the request) inherits
/// its own.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Limits {
    pub memory_bytes: Option<u64>,
    pub deadline: Option<Duration>,
    pub cpu_budget: Option<Duration>,
}

/// What the child's stdio carries.
pub enum Stdio {
    /// Its own Cap'n Proto connection (WebAssembly only), which bootstraps
    /// this.
    Rpc(Bootstrap),
    /// Plain byte streams. An ELF's stdio is always data: it has no
    /// connection of its own.
    Data(Pushed),
}

/// What a child in RPC mode gets when it bootstraps its connection.
pub enum Bootstrap {
    /// An Executor with the parent's limits and one less level of nesting.
    Inherit,
    /// No capability.
    None,
    /// Exactly this capability.
    Capability(capnp::capability::Client),
}

/// The caller's sinks for the streams it wants pushed (`Options.stdoutTo`,
/// `stderrTo`); the others are pulled through the Process.
#[derive(Default)]
pub struct Pushed {
    pub stdout: Option<byte_sink::Client>,
    pub stderr: Option<byte_sink::Client>,
}

/// The microVM an ELF asks for; zero and `None` leave it to the host.
#[derive(Default)]
pub struct Vm {
    pub vcpus: u32,
    pub memory_mib: u32,
    pub kernel: Option<Vec<u8>>,
    pub initramfs: Option<Vec<u8>>,
}

impl Request {
    /// `runBytes`' request for a payload of `format`.
    pub fn run_bytes(
        p: executor::run_bytes_params::Reader<'_>,
        format: Format,
    ) -> capnp::Result<Self> {
        Request::read(p.get_args()?, p.get_env()?, p.get_options()?, format)
    }

    /// `Program.run`'s request for a program of `format`.
    pub fn program_run(p: program::run_params::Reader<'_>, format: Format) -> capnp::Result<Self> {
        Request::read(p.get_args()?, p.get_env()?, p.get_options()?, format)
    }

    /// Reads and checks a request for a payload of `format`. An unset
    /// `options` reads as its defaults: every limit inherited.
    pub fn read(
        args: capnp::text_list::Reader<'_>,
        env: capnp::struct_list::Reader<'_, env_var::Owned>,
        options: options::Reader<'_>,
        format: Format,
    ) -> capnp::Result<Request> {
        let elf = format == Format::Elf;
        Ok(Request {
            format,
            args: self::args(args)?,
            env: self::env(env)?,
            name: text(options.get_name()?, || "options.name".to_string())?,
            limits: Limits::read(options),
            stdio: Stdio::read(options, elf)?,
            grants: grants(options.get_directories()?)?,
            vm: Vm::read(options.get_vm(), elf)?,
            network: options
                .has_network()
                .then(|| options.get_network())
                .transpose()?,
        })
    }

    /// argv[0]: the name given, or the default every side shares.
    pub fn argv0(&self) -> &str {
        argv::argv0(&self.name)
    }
}

impl Limits {
    fn read(options: options::Reader<'_>) -> Limits {
        let positive = |n: u64| (n > 0).then_some(n);
        Limits {
            memory_bytes: positive(options.get_memory_limit_bytes()),
            deadline: positive(options.get_deadline_millis()).map(Duration::from_millis),
            cpu_budget: positive(options.get_cpu_budget_millis()).map(Duration::from_millis),
        }
    }
}

impl Stdio {
    fn read(options: options::Reader<'_>, elf: bool) -> capnp::Result<Stdio> {
        let pushed = Pushed {
            stdout: options
                .has_stdout_to()
                .then(|| options.get_stdout_to())
                .transpose()?,
            stderr: options
                .has_stderr_to()
                .then(|| options.get_stderr_to())
                .transpose()?,
        };
        let bootstrap = match options.get_bootstrap().which()? {
            options::bootstrap::Inherit(()) => Bootstrap::Inherit,
            options::bootstrap::None(()) => Bootstrap::None,
            options::bootstrap::Capability(cap) => Bootstrap::Capability(cap.get_as_capability()?),
        };
        match options.get_stdio()? {
            StdioMode::Rpc if !elf => match pushed.any() {
                true => Err(error(
                    ErrorKind::WrongMode,
                    "stdoutTo and stderrTo need data mode: in RPC mode stdout carries the \
                     child's connection and stderr goes to the host log",
                )),
                false => Ok(Stdio::Rpc(bootstrap)),
            },
            _ => Ok(Stdio::Data(pushed)),
        }
    }
}

impl Stdio {
    /// The streams to push: none in RPC mode.
    pub fn into_pushed(self) -> Pushed {
        match self {
            Stdio::Data(pushed) => pushed,
            Stdio::Rpc(_) => Pushed::default(),
        }
    }
}

impl Pushed {
    /// Whether any stream is pushed.
    pub fn any(&self) -> bool {
        self.stdout.is_some() || self.stderr.is_some()
    }
}

impl Vm {
    /// The machine's options, for an ELF; checked and dropped otherwise.
    fn read(vm: options::vm::Reader<'_>, elf: bool) -> capnp::Result<Vm> {
        let (kernel, initramfs) = (vm.get_kernel()?, vm.get_initramfs()?);
        if !elf {
            return Ok(Vm::default());
        }
        let non_empty = |d: &[u8]| (!d.is_empty()).then(|| d.to_vec());
        Ok(Vm {
            vcpus: vm.get_vcpus(),
            memory_mib: vm.get_memory_mib(),
            kernel: non_empty(kernel),
            initramfs: non_empty(initramfs),
        })
    }
}

fn invalid(what: String) -> capnp::Error {
    error(ErrorKind::BadRequest, what)
}

/// One string of the request, checked.
fn text(reader: capnp::text::Reader<'_>, what: impl Fn() -> String) -> capnp::Result<String> {
    let s = reader
        .to_str()
        .map_err(|_| invalid(format!("{} is not valid UTF-8", what())))?;
    if s.contains('\0') {
        return Err(invalid(format!("{} contains a NUL byte", what())));
    }
    Ok(s.to_string())
}

/// The arguments after `argv[0]`.
fn args(list: capnp::text_list::Reader<'_>) -> capnp::Result<Vec<String>> {
    list.iter()
        .enumerate()
        .map(|(i, arg)| text(arg?, || format!("argument {i}")))
        .collect()
}

/// The whole environment, as name and value pairs.
fn env(
    list: capnp::struct_list::Reader<'_, env_var::Owned>,
) -> capnp::Result<Vec<(String, String)>> {
    list.iter()
        .enumerate()
        .map(|(i, var)| {
            let name = text(var.get_name()?, || {
                format!("environment variable {i}'s name")
            })?;
            if name.is_empty() || name.contains('=') {
                return Err(invalid(format!(
                    "environment variable name {name:?} is empty or contains '='"
                )));
            }
            let value = text(var.get_value()?, || format!("environment variable {name}"))?;
            Ok((name, value))
        })
        .collect()
}

/// `Options.directories`: at most [`MAX_GRANTS`], each at a path.
fn grants(
    list: capnp::struct_list::Reader<'_, grant::Owned>,
) -> capnp::Result<Vec<(String, directory::Client)>> {
    if list.len() > MAX_GRANTS {
        return Err(invalid(format!(
            "at most {MAX_GRANTS} directories may be granted to one program"
        )));
    }
    list.iter()
        .enumerate()
        .map(|(i, grant)| {
            let path = text(grant.get_path()?, || {
                format!("granted directory {i}'s path")
            })?;
            if path.is_empty() {
                return Err(invalid(format!("granted directory {i}'s path is empty")));
            }
            Ok((path, grant.get_directory()?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capsa_capnp::executor;
    use crate::error::kind;

    /// An Executor that answers nothing: requests are built on it, never
    /// sent.
    struct Nowhere;
    impl executor::Server for Nowhere {}
    impl directory::Server for Nowhere {}
    impl byte_sink::Server for Nowhere {}
    impl network::Server for Nowhere {}

    type RunBytes = capnp::capability::Request<
        executor::run_bytes_params::Owned,
        executor::run_bytes_results::Owned,
    >;

    fn request() -> RunBytes {
        capnp_rpc::new_client::<executor::Client, _>(Nowhere).run_bytes_request()
    }

    fn read(request: &mut RunBytes, format: Format) -> capnp::Result<Request> {
        Request::run_bytes(request.get().into_reader(), format)
    }

    /// A request with `args` and `env` only, read back.
    fn parsed(args_in: &[&[u8]], env_in: &[(&[u8], &[u8])]) -> capnp::Result<Request> {
        let mut request = request();
        let mut p = request.get();
        let mut a = p.reborrow().init_args(args_in.len() as u32);
        for (i, arg) in args_in.iter().enumerate() {
            a.set(i as u32, capnp::text::Reader::from(*arg));
        }
        let mut e = p.reborrow().init_env(env_in.len() as u32);
        for (i, (name, value)) in env_in.iter().enumerate() {
            let mut var = e.reborrow().get(i as u32);
            var.set_name(capnp::text::Reader::from(*name));
            var.set_value(capnp::text::Reader::from(*value));
        }
        read(&mut request, Format::Component)
    }

    fn message<T>(r: capnp::Result<T>) -> String {
        match r {
            Ok(_) => panic!("accepted"),
            Err(e) => e.extra,
        }
    }

    #[test]
    fn good_requests_read_back_whole() {
        let r = parsed(&[b"-c", b"echo hi"], &[(b"HOME", b"/"), (b"EMPTY", b"")]).unwrap();
        assert_eq!(r.args, ["-c", "echo hi"]);
        assert_eq!(
            r.env,
            [("HOME".into(), "/".into()), ("EMPTY".into(), String::new())]
        );
    }

    #[test]
    fn nul_bytes_bad_utf8_and_bad_names_are_refused_by_kind() {
        let m = message(parsed(&[b"ok", b"cut\0short"], &[]));
        assert!(
            m.starts_with("badRequest: argument 1 contains a NUL"),
            "{m}"
        );
        assert!(message(parsed(&[b"\xff"], &[])).contains("argument 0 is not valid UTF-8"));
        for (name, value, want) in [
            (&b"A\0B"[..], &b"v"[..], "variable 0's name contains a NUL"),
            (b"A", b"v\0", "variable A contains a NUL"),
            (b"", b"v", "is empty or contains '='"),
            (b"A=B", b"v", "is empty or contains '='"),
            (b"A", b"\xfe", "variable A is not valid UTF-8"),
        ] {
            let m = message(parsed(&[], &[(name, value)]));
            assert!(m.contains(want), "{m}");
            assert!(m.starts_with("badRequest: "), "{m}");
        }
    }

    #[test]
    fn unset_options_inherit_everything() {
        let mut request = request();
        let wasm = read(&mut request, Format::Component).unwrap();
        assert_eq!(wasm.name, "");
        assert_eq!(wasm.argv0(), argv::DEFAULT_ARGV0);
        assert_eq!(wasm.limits, Limits::default());
        assert!(matches!(wasm.stdio, Stdio::Rpc(Bootstrap::Inherit)));
        assert!(wasm.grants.is_empty());
        assert!(wasm.network.is_none());
        // An ELF has no connection: its stdio is data, whatever was asked.
        let elf = read(&mut request, Format::Elf).unwrap();
        assert!(matches!(elf.stdio, Stdio::Data(ref p) if !p.any()));
    }

    #[test]
    fn limits_are_read_with_zero_for_none() {
        let mut request = request();
        let mut o = request.get().init_options();
        o.set_memory_limit_bytes(1 << 20);
        o.set_deadline_millis(0);
        o.set_cpu_budget_millis(1500);
        let r = read(&mut request, Format::Module).unwrap();
        assert_eq!(
            r.limits,
            Limits {
                memory_bytes: Some(1 << 20),
                deadline: None,
                cpu_budget: Some(Duration::from_millis(1500)),
            }
        );
    }

    #[test]
    fn the_name_is_checked_as_any_text() {
        for (name, want) in [
            (&b"a\0b"[..], "options.name contains a NUL"),
            (b"\xff", "options.name is not valid UTF-8"),
        ] {
            let mut request = request();
            request
                .get()
                .init_options()
                .set_name(capnp::text::Reader::from(name));
            for format in [Format::Component, Format::Elf] {
                let e = read(&mut request, format).err().unwrap();
                assert_eq!(kind(&e), ErrorKind::BadRequest);
                assert!(e.extra.contains(want), "{}", e.extra);
            }
        }
        let mut request = request();
        request.get().init_options().set_name("my-tool");
        assert_eq!(read(&mut request, Format::Elf).unwrap().argv0(), "my-tool");
    }

    #[test]
    fn pushed_streams_need_data_mode_but_for_an_elf() {
        let mut request = request();
        let sink: byte_sink::Client = capnp_rpc::new_client(Nowhere);
        let mut o = request.get().init_options();
        o.set_stdio(StdioMode::Rpc);
        o.set_stdout_to(sink);
        let e = read(&mut request, Format::Component).err().unwrap();
        assert_eq!(kind(&e), ErrorKind::WrongMode);
        let elf = read(&mut request, Format::Elf).unwrap();
        assert!(
            matches!(elf.stdio, Stdio::Data(ref p) if p.stdout.is_some() && p.stderr.is_none())
        );
        request
            .get()
            .get_options()
            .unwrap()
            .set_stdio(StdioMode::Data);
        let wasm = read(&mut request, Format::Component).unwrap();
        assert!(matches!(wasm.stdio, Stdio::Data(ref p) if p.stdout.is_some()));
    }

    #[test]
    fn a_bootstrap_that_is_no_capability_is_refused_for_every_format() {
        let mut request = request();
        request
            .get()
            .init_options()
            .init_bootstrap()
            .init_capability()
            .set_as::<capnp::text::Owned>("not a capability")
            .unwrap();
        for format in [Format::Component, Format::Elf] {
            assert!(read(&mut request, format).is_err(), "{format:?}");
        }
    }

    #[test]
    fn grants_are_bounded_and_their_paths_checked() {
        let dir: directory::Client = capnp_rpc::new_client(Nowhere);
        let with = |paths: &[&[u8]]| {
            let mut request = request();
            let mut list = request
                .get()
                .init_options()
                .init_directories(paths.len() as u32);
            for (i, path) in paths.iter().enumerate() {
                let mut grant = list.reborrow().get(i as u32);
                grant.set_path(capnp::text::Reader::from(*path));
                grant.set_directory(dir.clone());
            }
            request
        };
        let good = read(&mut with(&[b"/data", b"out"]), Format::Elf).unwrap();
        let paths: Vec<&str> = good.grants.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(paths, ["/data", "out"]);
        for (paths, want) in [
            (&[&b""[..]][..], "granted directory 0's path is empty"),
            (
                &[b"ok", b"a\0b"],
                "granted directory 1's path contains a NUL",
            ),
            (&[b"\xff"], "granted directory 0's path is not valid UTF-8"),
        ] {
            for format in [Format::Component, Format::Elf] {
                let e = read(&mut with(paths), format).err().unwrap();
                assert_eq!(kind(&e), ErrorKind::BadRequest);
                assert!(e.extra.contains(want), "{}", e.extra);
            }
        }
        let many = vec![&b"d"[..]; MAX_GRANTS as usize + 1];
        let m = message(read(&mut with(&many), Format::Elf));
        assert!(m.contains("at most 64 directories"), "{m}");
    }

    #[test]
    fn a_network_is_carried_as_given() {
        let mut request = request();
        let network: network::Client = capnp_rpc::new_client(Nowhere);
        request.get().init_options().set_network(network);
        for format in [Format::Component, Format::Elf] {
            assert!(read(&mut request, format).unwrap().network.is_some());
        }
    }

    #[test]
    fn vm_options_are_an_elfs_only() {
        let mut request = request();
        let mut vm = request.get().init_options().init_vm();
        vm.set_vcpus(2);
        vm.set_memory_mib(64);
        vm.set_initramfs(b"cpio");
        let elf = read(&mut request, Format::Elf).unwrap().vm;
        assert_eq!((elf.vcpus, elf.memory_mib), (2, 64));
        assert_eq!(elf.kernel, None);
        assert_eq!(elf.initramfs.as_deref(), Some(&b"cpio"[..]));
        let wasm = read(&mut request, Format::Component).unwrap().vm;
        assert_eq!((wasm.vcpus, wasm.initramfs), (0, None));
    }
}
