//! The `capsa` command line.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use capsa::client::Spawn;
use capsa::serve::{Address, ServeConfig, Server, Token};
use capsa::{DirGrant, Host, HostConfig, Limits, VmBackend, VmSettings};
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "capsa",
    version,
    about = "A capability host for sandboxed code"
)]
struct Cli {
    /// More log output: -v for debug, -vv for trace.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run PID0, a WebAssembly component, serving it the root Executor over
    /// its stdin/stdout. Exits with PID0's exit code.
    Run {
        /// The PID0 component.
        pid0: PathBuf,
        /// Grant PID0 a host directory, at GUEST (default: the host path)
        /// as a WASI preopen and in its Executor's `directories`; `:ro`
        /// makes it read-only. Repeatable.
        #[arg(long = "dir", value_name = "HOST[::GUEST][:ro]", value_parser = DirGrant::parse_run)]
        dirs: Vec<DirGrant>,
        #[command(flatten)]
        limits: GuestLimits,
        #[command(flatten)]
        host: HostArgs,
        /// Arguments for PID0.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Serve the root Executor over a socket: each connection gets its own,
    /// with its own quotas, and all of a connection's processes are killed
    /// when it closes. Stops on SIGINT or SIGTERM.
    Serve {
        /// unix:PATH (created mode 0600), tcp:HOST:PORT (loopback only) or
        /// tls:HOST:PORT (loopback, or any address with --allow-remote).
        #[arg(long, default_value = "unix:capsa.sock")]
        listen: Address,
        /// Accept connections from other machines; needs a tls: listener
        /// and --token-file.
        #[arg(long)]
        allow_remote: bool,
        /// The certificate chain a tls: listener presents (PEM); with
        /// --tls-key. Without both, a self-signed certificate is made once
        /// and kept in $XDG_STATE_HOME/capsa/tls (else
        /// ~/.local/state/capsa/tls), and its fingerprint printed.
        #[arg(long, requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        /// The private key of --tls-cert (PEM, mode 0600).
        #[arg(long, requires = "tls_cert")]
        tls_key: Option<PathBuf>,
        /// File holding a shared secret (16 to 1024 characters, mode 0600)
        /// that clients must send before they get any capability.
        #[arg(long)]
        token_file: Option<PathBuf>,
        /// Connections served at once; more are closed as soon as accepted.
        #[arg(long, default_value_t = capsa::serve::DEFAULT_MAX_CONNECTIONS)]
        max_connections: usize,
        /// Guests one connection may run at once, at every nesting level
        /// together [default: --max-cells / --max-connections].
        #[arg(long)]
        connection_cells: Option<u32>,
        /// Guest memory one connection may hold at once, in MiB: WASM
        /// memories as they grow, machines' RAM while they run [default:
        /// this machine's RAM / --max-connections, at least --memory-mib].
        #[arg(long)]
        connection_memory_mib: Option<u64>,
        /// Offer every client a host directory under NAME (its Executor's
        /// `directories`); `:ro` makes it read-only. Repeatable.
        #[arg(long = "dir", value_name = "NAME=HOST[:ro]", value_parser = DirGrant::parse_named)]
        dirs: Vec<DirGrant>,
        #[command(flatten)]
        limits: GuestLimits,
        #[command(flatten)]
        host: HostArgs,
    },
    /// Run one program in data mode: this command's stdin goes to the
    /// program, the program's stdout and stderr come back to this
    /// command's, and it exits with the program's exit code. The program
    /// runs in a host of this command's own, or with --connect on a serving
    /// host (`capsa serve`).
    Exec {
        /// unix:PATH, tcp:HOST:PORT or tls:HOST:PORT of a serving host;
        /// without it the program runs in a host of this command's own,
        /// set up by the host options below.
        #[arg(long)]
        connect: Option<Address>,
        /// File holding the server's shared secret, if it has one.
        #[arg(long, requires = "connect")]
        token_file: Option<PathBuf>,
        /// tls: trust the server whose chain leads to a certificate in
        /// this PEM file (its CA), for the host name connected to.
        #[arg(long, requires = "connect", conflicts_with = "tls_fingerprint")]
        tls_ca: Option<PathBuf>,
        /// tls: trust exactly the server certificate with this SHA-256
        /// fingerprint (as `capsa serve` prints it; colons optional).
        #[arg(long, requires = "connect", value_name = "SHA256")]
        tls_fingerprint: Option<capsa::tls::Fingerprint>,
        /// Grant the program a directory of this machine at GUEST
        /// (default: the same path); `:ro` makes it read-only. A serving
        /// host copies it in and writes the program's changes back when it
        /// ends (unless `:ro`). Repeatable.
        #[arg(long = "dir", value_name = "HOST[::GUEST][:ro]", value_parser = DirGrant::parse_run)]
        dirs: Vec<DirGrant>,
        /// Set NAME in the program's environment; NAME alone passes this
        /// command's own value of NAME. Nothing else is passed: the
        /// program's environment is exactly these. Repeatable.
        #[arg(long = "env", value_name = "NAME[=VALUE]", value_parser = EnvArg::parse)]
        env: Vec<EnvArg>,
        #[command(flatten)]
        limits: GuestLimits,
        #[command(flatten)]
        host: HostArgs,
        /// The program: a WASM component, a WASI preview 1 module, or an
        /// x86-64 ELF executable if the host runs microVMs.
        file: PathBuf,
        /// Arguments for the program.
        #[arg(last = true)]
        args: Vec<String>,
    },
}

/// What each guest may use: shared by `run`, `serve` and `exec` (with
/// `exec --connect`, asked of the serving host for the one program).
#[derive(Args)]
struct GuestLimits {
    /// Memory limit of every guest, in MiB [default: 512; with `exec
    /// --connect`, the serving host's].
    #[arg(long)]
    memory_mib: Option<u64>,
    /// Wall-clock deadline, in seconds: PID0's (and so everything it
    /// runs), each process a client of `serve` starts, `exec`'s program.
    #[arg(long)]
    deadline: Option<f64>,
    /// CPU budget of each guest, in milliseconds of execution.
    #[arg(long)]
    cpu_ms: Option<u64>,
}

/// A guest's memory limit unless `--memory-mib` says otherwise.
const DEFAULT_MEMORY_MIB: u64 = 512;

impl GuestLimits {
    fn deadline(&self) -> anyhow::Result<Option<Duration>> {
        self.deadline
            .map(|s| {
                Duration::try_from_secs_f64(s)
                    .context("--deadline must be a positive number of seconds")
            })
            .transpose()
    }

    /// The limits as one process's options ask for them (0: the host's).
    fn per_process(&self) -> anyhow::Result<(u64, u64, u64)> {
        let memory = self.memory_mib.map_or(0, |m| m.saturating_mul(1 << 20));
        let deadline = self
            .deadline()?
            .map_or(0, |d| d.as_millis().clamp(1, u64::MAX as u128) as u64);
        Ok((memory, deadline, self.cpu_ms.unwrap_or(0)))
    }
}

/// A variable given with `exec --env`: NAME=VALUE, or NAME to pass this
/// command's own.
#[derive(Clone, Debug, PartialEq, Eq)]
struct EnvArg {
    name: String,
    value: Option<String>,
}

impl EnvArg {
    fn parse(spec: &str) -> Result<EnvArg, String> {
        let (name, value) = match spec.split_once('=') {
            Some((name, value)) => (name, Some(value.to_string())),
            None => (spec, None),
        };
        if name.is_empty() {
            return Err(format!("{spec:?}: expected NAME=VALUE or NAME"));
        }
        Ok(EnvArg {
            name: name.to_string(),
            value,
        })
    }

    /// The pair the program gets: NAME alone takes this process's value.
    fn resolve(&self) -> anyhow::Result<(String, String)> {
        let value = match &self.value {
            Some(value) => value.clone(),
            None => std::env::var(&self.name).map_err(|e| {
                anyhow::anyhow!("--env {}: {e} in this command's environment", self.name)
            })?,
        };
        Ok((self.name.clone(), value))
    }
}

/// How a host of this command's own runs guests: shared by `run`,
/// `serve` and `exec` (not with `--connect`: the serving host has its own).
#[derive(Args)]
struct HostArgs {
    /// Deepest nesting level a child may have.
    #[arg(long, default_value_t = 8)]
    max_depth: u32,
    /// Most children one Executor may have running at once.
    #[arg(long, default_value_t = 64)]
    max_children: u32,
    /// Run ELF executables in KVM microVMs.
    #[arg(long)]
    allow_vm: bool,
    /// Guest kernel (vmlinux or bzImage) for microVMs.
    #[arg(long, env = "CAPSA_KERNEL")]
    kernel: Option<PathBuf>,
    /// Initramfs whose /init is the capsa agent.
    #[arg(long, env = "CAPSA_INITRAMFS")]
    initramfs: Option<PathBuf>,
    /// Instead of microVMs, run ELF executables through this agent
    /// binary as an ordinary host process (no isolation: for machines
    /// whose KVM cannot run Linux user space, and for testing).
    #[arg(long, value_name = "AGENT")]
    vm_as_process: Option<PathBuf>,
    /// Seconds a microVM may take to boot until its agent answers. A
    /// kernel that panics or a VM that stops fails at once; this bounds a
    /// machine that boots but whose agent never answers. Hardware boots in
    /// well under a second; nested virtualization can take 15.
    #[arg(long, default_value_t = 60.0)]
    vm_ready_timeout: f64,
    /// Most guests alive at once in the host. Each may cost six memory
    /// mappings: past about 9,500 raise `vm.max_map_count` (the host
    /// refuses to start and says to what).
    #[arg(long, default_value_t = 1024)]
    max_cells: u32,
    /// Most memory all microVMs hold at once, in MiB [default: this
    /// machine's RAM].
    #[arg(long)]
    vm_memory_total_mib: Option<u64>,
    /// Where directories granted from elsewhere are copied for the child
    /// that uses them [default: the system's temporary folder]. Its
    /// filesystem bounds what such children can write.
    #[arg(long)]
    scratch_dir: Option<PathBuf>,
    /// Run WASM guests' file system calls on blocking threads instead of
    /// the host's thread: slower calls (a `stat` costs about 8x), but a
    /// slow filesystem no longer holds every guest back.
    #[arg(long)]
    files_off_host_thread: bool,
    /// Keep compiled guests in DIR (created 0700; it must be this user's
    /// alone), so the next start loads them instead of compiling again
    /// [default: $XDG_CACHE_HOME/capsa, else ~/.cache/capsa].
    #[arg(long, value_name = "DIR", conflicts_with = "no_cache")]
    cache_dir: Option<PathBuf>,
    /// Keep compiled guests in memory only: every start compiles again.
    #[arg(long)]
    no_cache: bool,
    /// Most MiB of guests (bytes and compiled code) kept in memory; the
    /// least recently used go first.
    #[arg(long, default_value_t = 512)]
    memory_cache_mib: u64,
    /// The network granted to PID0 (run), to every client (serve) or to
    /// the program (exec), as its Executor's `network`: terms separated
    /// by commas, each a host (NAME, *.DOMAIN or *), an address or CIDR
    /// range, port=N or port=N-M, loopback, private, link-local (address
    /// classes never reachable otherwise), max=N (connections at once),
    /// pin:NAME=IP[+IP...] (resolved without DNS), or any (every name and
    /// public address). Repeatable. Without it there is no network at all.
    #[arg(long = "net", value_name = "RULES")]
    net: Vec<String>,
}

fn main() -> ExitCode {
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    init_logging(cli.verbose);
    if let Some(("exec", exec)) = matches.subcommand() {
        if let Err(e) = host_options_need_a_host_of_our_own(exec) {
            eprintln!("capsa: {e}");
            return ExitCode::from(2);
        }
    }
    match run(cli.command) {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => {
            eprintln!("capsa: {e:#}");
            ExitCode::from(125)
        }
    }
}

fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn,capsa::guest=info",
        1 => "debug,cranelift=info,wasmtime=info",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("CAPSA_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .without_time()
        .init();
}

fn run(command: Command) -> anyhow::Result<i32> {
    match command {
        Command::Run {
            pid0,
            dirs,
            limits,
            host,
            args,
        } => {
            let config = HostConfig {
                directories: dirs,
                ..host.config(&limits)?
            };
            let bytes =
                std::fs::read(&pid0).with_context(|| format!("reading {}", pid0.display()))?;
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let local = tokio::task::LocalSet::new();
            let status = local.block_on(&rt, async move {
                let host = Host::new(config)?;
                anyhow::Ok(host.run_pid0(&bytes, args).await?)
            })?;
            if !status.success() {
                eprintln!("capsa: pid0 {status}");
            }
            Ok(status.code())
        }
        Command::Serve {
            listen,
            allow_remote,
            tls_cert,
            tls_key,
            token_file,
            max_connections,
            connection_cells,
            connection_memory_mib,
            dirs,
            limits,
            host,
        } => {
            let config = HostConfig {
                directories: dirs,
                ..host.config(&limits)?
            };

            let token = token_file.as_deref().map(Token::from_file).transpose()?;
            let tls = match (&listen, tls_cert, tls_key) {
                (Address::Tls(_), Some(cert), Some(key)) => {
                    Some(capsa::tls::ServerTls::from_pem(&cert, &key)?)
                }
                (Address::Tls(hostport), _, _) => {
                    let dir = capsa::tls::default_dir().context(
                        "no folder for a generated certificate (neither XDG_STATE_HOME nor \
                         HOME is set); pass --tls-cert and --tls-key",
                    )?;
                    let host = hostport.rsplit_once(':').map_or("", |(h, _)| h);
                    Some(capsa::tls::ServerTls::load_or_generate(&dir, host)?)
                }
                (_, Some(_), _) => anyhow::bail!("--tls-cert and --tls-key are for tls: listeners"),
                _ => None,
            };
            if let Some(tls) = &tls {
                // Clients pin this (`--tls-fingerprint`).
                eprintln!(
                    "capsa: TLS certificate SHA-256 fingerprint {}",
                    tls.fingerprint()
                );
            }
            let server = Server::bind(ServeConfig {
                listen,
                allow_remote,
                token,
                tls,
                max_connections,
                connection_cells,
                connection_memory_bytes: connection_memory_mib.map(|m| m.saturating_mul(1 << 20)),
            })?;
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let local = tokio::task::LocalSet::new();
            local.block_on(&rt, async move {
                let host = Host::new(config)?;
                let shutdown = signals()?;
                // The line scripts wait for: the server accepts from here on.
                eprintln!("capsa: serving on {}", server.address());
                server.run(&host, shutdown).await?;
                eprintln!("capsa: stopped");
                anyhow::Ok(0)
            })
        }
        Command::Exec {
            connect,
            token_file,
            tls_ca,
            tls_fingerprint,
            dirs,
            env,
            limits,
            host,
            file,
            args,
        } => {
            let token = token_file.as_deref().map(Token::from_file).transpose()?;
            let trust = match (tls_ca, tls_fingerprint) {
                (Some(ca), _) => Some(capsa::tls::Trust::Ca(ca)),
                (_, Some(pin)) => Some(capsa::tls::Trust::Fingerprint(pin)),
                _ => None,
            };
            let bytes =
                std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
            let env = env
                .iter()
                .map(EnvArg::resolve)
                .collect::<anyhow::Result<Vec<_>>>()?;
            let name = file
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            let (memory_limit, deadline_ms, cpu_ms) = limits.per_process()?;
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let local = tokio::task::LocalSet::new();
            let result = local.block_on(&rt, async move {
                let env: Vec<(&str, &str)> =
                    env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                let spawn = |dirs, network| Spawn {
                    args: &args,
                    env: &env,
                    name: &name,
                    memory_limit,
                    deadline_ms,
                    cpu_ms,
                    dirs,
                    network,
                    ..Spawn::default()
                };
                match connect {
                    Some(connect) => {
                        let connection =
                            capsa::serve::connect(&connect, token.as_ref(), trust.as_ref()).await?;
                        // Served from this process, for as long as the program runs.
                        let served = capsa::directory::Directories::default();
                        let mut grants = Vec::new();
                        for grant in &dirs {
                            let (dir, _) =
                                capsa::directory::open(&served, grant).with_context(|| {
                                    format!("cannot grant {}", grant.host_path.display())
                                })?;
                            grants.push((grant.path.clone(), dir));
                        }
                        let grants: Vec<(&str, &_)> =
                            grants.iter().map(|(p, d)| (p.as_str(), d)).collect();
                        let status =
                            capsa::exec::run(&connection.executor, &bytes, spawn(&grants, None))
                                .await?;
                        anyhow::Ok(status)
                    }
                    None => {
                        // The grants are the host's own: the program gets
                        // them as preopens, no copy.
                        let host = Host::new(HostConfig {
                            directories: dirs,
                            ..host.config(&limits)?
                        })?;
                        let executor = host.root_executor();
                        let grants = capsa::client::directories(&executor).await?;
                        let grants: Vec<(&str, &_)> =
                            grants.iter().map(|(p, d)| (p.as_str(), d)).collect();
                        // `--net`: the program gets the host's network.
                        let network = capsa::client::network(&executor).await.ok();
                        let status =
                            capsa::exec::run(&executor, &bytes, spawn(&grants, network.as_ref()))
                                .await;
                        host.shutdown().await;
                        Ok(status?)
                    }
                }
            });
            drop(local);
            // Our stdin may still be blocked in a read nobody needs any more.
            rt.shutdown_background();
            let status = result?;
            // Like a shell: an exit code speaks for itself (a search
            // tool's "no match" is 1); anything else is said.
            if !matches!(status, capsa::ExitStatus::Exited(_)) {
                eprintln!("capsa: process {status}");
            }
            Ok(status.code())
        }
    }
}

/// `exec --connect` runs on a host set up by someone else: options that
/// would set up a host of this command's own are refused, not ignored.
/// Only what is on the command line counts (`CAPSA_KERNEL` in the
/// environment is no request).
fn host_options_need_a_host_of_our_own(exec: &clap::ArgMatches) -> anyhow::Result<()> {
    use clap::parser::ValueSource;
    if exec.value_source("connect") != Some(ValueSource::CommandLine) {
        return Ok(());
    }
    let host_options = HostArgs::augment_args(clap::Command::new("host"));
    for arg in host_options.get_arguments() {
        if exec.value_source(arg.get_id().as_str()) == Some(ValueSource::CommandLine) {
            anyhow::bail!(
                "--{} sets up a host of this command's own; with --connect the serving \
                 host's settings apply",
                arg.get_long().unwrap_or(arg.get_id().as_str())
            );
        }
    }
    Ok(())
}

/// Resolves at the first SIGINT or SIGTERM.
fn signals() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut int = signal(SignalKind::interrupt())?;
    let mut term = signal(SignalKind::terminate())?;
    Ok(async move {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
    })
}

impl HostArgs {
    fn config(self, limits: &GuestLimits) -> anyhow::Result<HostConfig> {
        let HostArgs {
            max_depth,
            max_children,
            allow_vm,
            kernel,
            initramfs,
            vm_as_process,
            vm_ready_timeout,
            max_cells,
            vm_memory_total_mib,
            scratch_dir,
            files_off_host_thread,
            cache_dir,
            no_cache,
            memory_cache_mib,
            net,
        } = self;
        let network = match net.is_empty() {
            true => None,
            false => Some(capsa::netpolicy::Rules::parse_cli(&net.join(",")).context("--net")?),
        };
        let backend = match (allow_vm, vm_as_process, kernel, initramfs) {
            (false, None, _, _) => None,
            (_, Some(agent), _, _) => Some(VmBackend::AgentProcess { agent }),
            (true, None, Some(kernel), Some(initramfs)) => {
                Some(VmBackend::Kvm { kernel, initramfs })
            }
            (true, None, _, _) => anyhow::bail!(
                "--allow-vm needs a guest kernel and an initramfs: pass --kernel and \
                 --initramfs (`cargo xtask kernel` and `cargo xtask initramfs` build them)"
            ),
        };
        let vm = backend
            .map(|backend| -> anyhow::Result<VmSettings> {
                Ok(VmSettings {
                    backend,
                    ready_timeout: Duration::try_from_secs_f64(vm_ready_timeout)
                        .context("--vm-ready-timeout must be a positive number of seconds")?,
                    vcpus: 1,
                    memory_mib: 256,
                    total_memory_mib: vm_memory_total_mib,
                })
            })
            .transpose()?;
        Ok(HostConfig {
            limits: Limits {
                memory_bytes: limits
                    .memory_mib
                    .unwrap_or(DEFAULT_MEMORY_MIB)
                    .saturating_mul(1 << 20),
                deadline: limits.deadline()?,
                cpu_ticks: limits.cpu_ms.map(capsa::executor::cpu_ticks),
            },
            max_depth,
            max_children,
            max_cells,
            vm,
            flow: capsa::FlowLimits::default(),
            directories: Vec::new(),
            network,
            directory_timeout: capsa::mirror::CALL_TIMEOUT,
            scratch_dir,
            files_on_host_thread: !files_off_host_thread,
            compile_cache: capsa::engine::CacheConfig {
                dir: match no_cache {
                    true => None,
                    false => cache_dir.or_else(capsa::cache::default_dir),
                },
                memory_bytes: memory_cache_mib.saturating_mul(1 << 20),
            },
        })
    }
}
