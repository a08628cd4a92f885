//! Helpers for capsa's end-to-end tests: the built guests, a host on a
//! current-thread runtime, and a Cap'n Proto connection to it over in-memory
//! pipes that records every message crossing it.

pub mod served;

pub use capsa_schema::ErrorKind;
use std::cell::RefCell;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};

use capnp_rpc::rpc_twoparty_capnp::Side;
use capnp_rpc::{twoparty, RpcSystem};
pub use capsa::schema::StdioMode;
use capsa::schema::{directory, executor, process, program};
use capsa::{ExitStatus, Host, HostConfig};
use futures::io::{AsyncRead, AsyncWrite};

/// Folder of the built guests: `$CAPSA_GUESTS`, set by `cargo xtask`, or
/// the xtask's output folder in this workspace.
pub fn guests_dir() -> PathBuf {
    match std::env::var_os("CAPSA_GUESTS") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/guests/out"),
    }
}

/// The `capsa` binary built beside this test (the same profile).
pub fn capsa_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("the test's own path");
    exe.parent()
        .and_then(Path::parent)
        .expect("a test binary lives in target/PROFILE/deps")
        .join("capsa")
}

/// The bytes of a built guest, e.g. `guest("child-echo")`.
pub fn guest(name: &str) -> Vec<u8> {
    let path = guests_dir().join(format!("{name}.wasm"));
    std::fs::read(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}; build the guests with `cargo xtask test`",
            path.display()
        )
    })
}

/// Ends the test process with a report if it is still alive `limit` after
/// being armed and not yet dropped: each thread's name, the kernel
/// function it waits in and its kernel stack (where readable), and every
/// live microVM's vCPU samples and kernel log, so that a
/// hang fails at once and says where, instead of running into a job's
/// timeout with nothing to show.
pub struct Watchdog(Option<std::sync::mpsc::Sender<()>>);

impl Watchdog {
    pub fn arm(what: &str, limit: std::time::Duration) -> Watchdog {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let what = what.to_string();
        std::thread::spawn(move || {
            if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(limit) {
                use std::io::Write;
                // Straight to fd 2: the test harness captures `eprintln!`,
                // and its capture dies with the process.
                let mut err = std::io::stderr().lock();
                let _ = writeln!(
                    err,
                    "watchdog: {what} still running after {limit:?}; threads:"
                );
                let tasks = std::fs::read_dir("/proc/self/task").into_iter().flatten();
                for task in tasks.flatten() {
                    let dir = task.path();
                    let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap_or_default();
                    // utime and stime (clock ticks): who is spinning.
                    let stat = read("stat");
                    let times: Vec<&str> = stat
                        .rsplit_once(") ")
                        .map(|(_, rest)| rest.split(' ').skip(11).take(2).collect())
                        .unwrap_or_default();
                    let _ = writeln!(
                        err,
                        "  {} {} cpu {:?} waiting in {}\n{}",
                        task.file_name().to_string_lossy(),
                        read("comm").trim(),
                        times,
                        read("wchan"),
                        read("stack")
                    );
                }
                // Where KVM's exits are traced (the nested test machine
                // does so), the last ones say where a spinning guest is.
                let trace =
                    std::fs::read_to_string("/sys/kernel/tracing/trace").unwrap_or_default();
                let exits: Vec<&str> = trace.lines().filter(|l| l.contains(" kvm_")).collect();
                if !exits.is_empty() {
                    let from = exits.len().saturating_sub(60);
                    let _ = writeln!(
                        err,
                        "KVM's last traced events:\n{}",
                        exits[from..].join("\n")
                    );
                }
                // Where each microVM's vCPUs are, a second apart, and what
                // its kernel logged.
                let _ = writeln!(err, "{}", capsa::report_live_machines());
                std::process::abort();
            }
        });
        Watchdog(Some(tx))
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        if let Some(tx) = self.0.take() {
            let _ = tx.send(());
        }
    }
}

/// A fresh folder under the system's temporary one, removed with
/// everything in it when dropped.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(label: &str) -> TempDir {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("capsa-{label}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }

    pub fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// This process's thread count once it has stopped changing: a thread
/// that has finished its work (tokio's blocking pool, a joined vCPU thread)
/// can stay listed for a moment after its owner let go of it. A thread
/// left running stays counted, so comparisons still catch a leak.
pub fn settled_thread_count() -> usize {
    use std::time::{Duration, Instant};
    let count = || thread_count_of("self");
    let mut last = count();
    let mut stable_since = Instant::now();
    let start = Instant::now();
    while stable_since.elapsed() < Duration::from_secs(1)
        && start.elapsed() < Duration::from_secs(15)
    {
        std::thread::sleep(Duration::from_millis(50));
        let now = count();
        if now != last {
            last = now;
            stable_since = Instant::now();
        }
    }
    last
}

/// A process's thread count (`pid` as in `/proc`: a number or `self`).
pub fn thread_count_of(pid: &str) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task")).map_or(0, |d| d.count())
}

/// This process's resident memory in KiB.
pub fn rss_kib() -> u64 {
    rss_kib_of("self")
}

/// This process's resident memory in KiB once the allocator has given
/// back the free memory it keeps (glibc's `malloc_trim`): memory still in
/// use, for leak checks across many short-lived hosts.
#[expect(unsafe_code, reason = "malloc_trim is a C function")]
pub fn trimmed_rss_kib() -> u64 {
    // SAFETY: malloc_trim only releases free heap memory; it takes no
    // pointer and is safe to call at any time.
    unsafe {
        libc::malloc_trim(0);
    }
    rss_kib()
}

/// A process's resident memory in KiB (`pid` as in `/proc`: a number or
/// `self`); 0 if it is gone.
pub fn rss_kib_of(pid: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// This process's open files, sorted, without those under `/proc`.
pub fn open_fds() -> Vec<String> {
    open_fds_of("self")
}

/// A process's open files (`pid` as in `/proc`), sorted, without those
/// under `/proc`.
pub fn open_fds_of(pid: &str) -> Vec<String> {
    let mut fds: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.filter_map(|f| std::fs::read_link(f.ok()?.path()).ok())
                .map(|p| p.display().to_string())
                .filter(|p| !p.starts_with("/proc/"))
                .collect()
        })
        .unwrap_or_default();
    fds.sort();
    fds
}

/// The number of cycles a soak test runs: `var` if set (the long runs
/// whose figures PLAN.md keeps), else `default` (the short run every
/// `cargo xtask test` makes).
pub fn soak_cycles(var: &str, default: usize) -> usize {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A small deterministic random source for the seeded stand-ins of the
/// fuzz targets (xorshift64*).
pub struct XorShift(u64);

impl XorShift {
    pub fn new(seed: u64) -> XorShift {
        XorShift(seed.max(1))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number below `n` (0 when `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next_u64() % n as u64) as usize
        }
    }

    /// Changes `bytes` the way a fuzzer would: flips bytes, cuts the end,
    /// repeats a slice or inserts noise.
    pub fn mutate(&mut self, bytes: &mut Vec<u8>) {
        for _ in 0..=self.below(4) {
            match self.below(4) {
                0 => {
                    for _ in 0..=self.below(8) {
                        let i = self.below(bytes.len());
                        if let Some(b) = bytes.get_mut(i) {
                            *b ^= 1 << self.below(8);
                        }
                    }
                }
                1 => {
                    let keep = self.below(bytes.len() + 1);
                    bytes.truncate(keep);
                }
                2 => {
                    let start = self.below(bytes.len());
                    let end = (start + self.below(64)).min(bytes.len());
                    let slice = bytes[start..end].to_vec();
                    let at = self.below(bytes.len() + 1);
                    bytes.splice(at..at, slice);
                }
                _ => {
                    let at = self.below(bytes.len() + 1);
                    let noise: Vec<u8> =
                        (0..self.below(16)).map(|_| self.next_u64() as u8).collect();
                    bytes.splice(at..at, noise);
                }
            }
        }
    }
}

/// Sends `bytes` to `host` as the whole of one client connection (what
/// `capsa serve` does with a socket, over an in-memory pipe), reads and
/// drops whatever comes back, and checks the connection's end: an error if
/// the host panicked serving it or kept it after its client left.
pub async fn feed_connection(host: &Host, bytes: &[u8]) -> Result<(), String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (client, server) = tokio::io::duplex(1 << 16);
    let served_by = host.clone();
    let served = tokio::task::spawn_local(async move {
        capsa::serve::serve_connection(&served_by, server, None, None).await
    });
    let (mut from_host, mut to_host) = tokio::io::split(client);
    let talk = async {
        let _ = to_host.write_all(bytes).await;
        let _ = to_host.shutdown().await;
        let mut sink = vec![0u8; 1 << 16];
        while let Ok(n) = from_host.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), talk).await;
    drop((from_host, to_host));
    match tokio::time::timeout(std::time::Duration::from_secs(10), served).await {
        Ok(Err(e)) if e.is_panic() => Err(format!("the host panicked: {e}")),
        Ok(_) => Ok(()),
        Err(_) => Err("the connection outlived its client".into()),
    }
}

/// Sends the host's logs to stderr when `CAPSA_LOG` names an env-filter
/// (e.g. `CAPSA_LOG=debug`), as the `capsa` binary does; else nothing.
pub fn init_logs() {
    if let Ok(filter) = std::env::var("CAPSA_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_writer(std::io::stderr)
            .try_init();
    }
}

/// Runs `f` with a fresh host on a current-thread runtime.
pub fn with_host<F, Fut, T>(config: HostConfig, f: F) -> T
where
    F: FnOnce(Host) -> Fut,
    Fut: Future<Output = T>,
{
    init_logs();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        let host = Host::new(config).expect("host");
        let out = f(host.clone()).await;
        host.shutdown().await;
        out
    })
}

/// Options of a run: the client layer's [`capsa_client::Spawn`].
pub use capsa_client::Spawn as Run;
pub use capsa_client::{exported_executor, load_request};

/// Sends `runBytes` for `bytes` with `opts` and returns the request's
/// promise.
pub fn run_request(
    exec: &executor::Client,
    bytes: &[u8],
    opts: Run<'_>,
) -> capnp::capability::RemotePromise<executor::run_bytes_results::Owned> {
    opts.run_bytes(exec, bytes).send()
}

/// `Program.run` with `opts`, as [`run_request`] for `runBytes`.
pub fn program_run_request(
    program: &program::Client,
    opts: Run<'_>,
) -> capnp::capability::RemotePromise<program::run_results::Owned> {
    opts.program_run(program).send()
}

/// Starts `bytes` and returns its Process, or the exception's text.
pub async fn run(
    exec: &executor::Client,
    bytes: &[u8],
    opts: Run<'_>,
) -> Result<process::Client, String> {
    opts.start(exec, bytes).await.map_err(|e| e.to_string())
}

/// Loads `bytes` as a Program, or the exception's text.
pub async fn load(exec: &executor::Client, bytes: &[u8]) -> Result<program::Client, String> {
    capsa_client::load(exec, bytes)
        .await
        .map_err(|e| e.to_string())
}

/// The Program of this hash (`Executor.program`), or the exception's text.
pub async fn by_hash(exec: &executor::Client, hash: &[u8]) -> Result<program::Client, String> {
    capsa_client::program_by_hash(exec, hash)
        .await
        .map_err(|e| e.to_string())
}

/// Runs a Program, as [`run`] does bytes.
pub async fn run_program(
    program: &program::Client,
    opts: Run<'_>,
) -> Result<process::Client, String> {
    opts.start_program(program).await.map_err(|e| e.to_string())
}

/// Asserts that `err` (an exception's text) is of `kind`, and that its
/// message says `says`.
#[track_caller]
pub fn assert_kind(err: &str, kind: ErrorKind, says: &str) {
    let found = capsa_schema::error::kind_of(err);
    assert_eq!(found, kind, "{err}");
    assert!(err.contains(says), "{err} does not say {says:?}");
}

/// Waits (up to five seconds) until the host runs nothing, else panics with
/// `what` and the count of survivors.
pub async fn until_nothing_runs(host: &Host, what: &str) {
    for _ in 0..500 {
        if host.live_guests() == 0 {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("{} {what}", host.live_guests());
}

pub async fn wait(p: &process::Client) -> ExitStatus {
    capsa_client::wait(p).await.expect("wait")
}

/// Reads a data-mode stream to its end.
pub async fn read_all(source: capsa::schema::byte_source::Client) -> Vec<u8> {
    capsa_client::read_to_end(&source).await.expect("read")
}

/// One `read` of at most `max` bytes: its data and its `eof`.
pub async fn read_once(source: &capsa::schema::byte_source::Client, max: u32) -> (Vec<u8>, bool) {
    let mut request = source.read_request();
    request.get().set_max_bytes(max);
    let response = request.send().promise.await.expect("read");
    let chunk = response.get().expect("read");
    (chunk.get_data().expect("read").to_vec(), chunk.get_eof())
}

pub async fn stdout_of(p: &process::Client) -> Vec<u8> {
    read_all(p.stdout_request().send().pipeline.get_source()).await
}

pub async fn echo(exec: &executor::Client, msg: &str) -> Result<String, String> {
    capsa_client::echo(exec, msg)
        .await
        .map_err(|e| e.to_string())
}

/// Which way a message crossed the recorded connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dir {
    /// Client to host.
    Out,
    /// Host to client.
    In,
}

/// Every byte a client wrote and read, in the order it happened.
#[derive(Default)]
pub struct Wire {
    pub events: Vec<(Dir, Vec<u8>)>,
}

impl Wire {
    /// The Cap'n Proto RPC messages that crossed, in order, with their
    /// direction: `(Dir, "call" | "return" | ...)`, and the interface and
    /// method ids of calls.
    pub fn messages(&self) -> Vec<(Dir, String)> {
        use capnp_rpc::rpc_capnp::message;
        let mut out = Vec::new();
        for dir in [Dir::Out, Dir::In] {
            let bytes: Vec<u8> = self
                .events
                .iter()
                .filter(|(d, _)| *d == dir)
                .flat_map(|(_, b)| b.clone())
                .collect();
            // Position (in this direction's bytes) at which each message
            // ended, to order the two directions against each other.
            let mut slice = &bytes[..];
            let mut offset = 0;
            while !slice.is_empty() {
                let before = slice.len();
                let msg = capnp::serialize::read_message(&mut slice, Default::default())
                    .expect("well-formed message");
                offset += before - slice.len();
                let root: message::Reader<'_> = msg.get_root().unwrap();
                let kind = match root.which().unwrap() {
                    message::Call(c) => {
                        let c = c.unwrap();
                        format!("call {:x}/{}", c.get_interface_id(), c.get_method_id())
                    }
                    message::Return(_) => "return".into(),
                    message::Bootstrap(_) => "bootstrap".into(),
                    message::Finish(_) => "finish".into(),
                    message::Resolve(_) => "resolve".into(),
                    message::Release(_) => "release".into(),
                    message::Disembargo(_) => "disembargo".into(),
                    _ => "other".into(),
                };
                out.push((dir, offset, kind));
            }
        }
        // Rebuild the interleaving from the event log.
        let mut seen = [0usize; 2];
        let mut order = Vec::new();
        for (dir, chunk) in &self.events {
            let i = (*dir == Dir::In) as usize;
            seen[i] += chunk.len();
            for (d, off, kind) in &out {
                if d == dir && *off <= seen[i] && *off > seen[i] - chunk.len() {
                    order.push((*d, kind.clone()));
                }
            }
        }
        order
    }
}

struct Recorded<T> {
    inner: T,
    dir: Dir,
    wire: Rc<RefCell<Wire>>,
}

impl<T: AsyncRead + Unpin> AsyncRead for Recorded<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            if n > 0 {
                self.wire
                    .borrow_mut()
                    .events
                    .push((self.dir, buf[..n].to_vec()));
            }
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Recorded<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            if n > 0 {
                self.wire
                    .borrow_mut()
                    .events
                    .push((self.dir, buf[..n].to_vec()));
            }
        }
        r
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_close(cx)
    }
}

/// Serves `bootstrap` over a pair of in-memory pipes and returns the
/// client's view of it, plus the record of everything that crossed.
pub fn connect(bootstrap: capnp::capability::Client) -> (executor::Client, Rc<RefCell<Wire>>) {
    let (c2s_w, c2s_r) = capsa::pipe::pipe(1 << 20);
    let (s2c_w, s2c_r) = capsa::pipe::pipe(1 << 20);
    let server = twoparty::VatNetwork::new(c2s_r, s2c_w, Side::Server, Default::default());
    tokio::task::spawn_local(RpcSystem::new(Box::new(server), Some(bootstrap)));
    let wire = Rc::new(RefCell::new(Wire::default()));
    let client = twoparty::VatNetwork::new(
        Recorded {
            inner: s2c_r,
            dir: Dir::In,
            wire: wire.clone(),
        },
        Recorded {
            inner: c2s_w,
            dir: Dir::Out,
            wire: wire.clone(),
        },
        Side::Client,
        Default::default(),
    );
    let mut rpc = RpcSystem::new(Box::new(client), None);
    let exec: executor::Client = rpc.bootstrap(Side::Server);
    tokio::task::spawn_local(rpc);
    (exec, wire)
}

/// A child that answers echo: the "host keeps serving the others" witness.
pub async fn healthy(exec: &capsa::schema::executor::Client) -> capsa::schema::process::Client {
    let p = run(
        exec,
        &guest("child-echo"),
        Run {
            args: &["witness"],
            ..Run::default()
        },
    )
    .await
    .expect("spawn witness");
    let reply = echo(&exported_executor(&p), "still there?").await.unwrap();
    assert!(reply.contains("still there?"), "{reply}");
    p
}

pub async fn still_healthy(witness: &capsa::schema::process::Client) {
    let reply = echo(&exported_executor(witness), "after the fault").await;
    assert!(reply.unwrap().contains("after the fault"));
}

/// An Executor's grants (`Executor.directories`), at their paths.
pub async fn granted(exec: &executor::Client) -> Vec<(String, directory::Client)> {
    capsa_client::directories(exec).await.expect("directories")
}

/// What a [`Collector`] has been given.
#[derive(Default)]
pub struct Collected {
    pub bytes: Vec<u8>,
    pub writes: usize,
    pub closed: bool,
}

/// A `ByteSink` the test holds: it keeps what is pushed into it, can hold
/// every write back until [`Collector::release`], and can fail its writes.
pub struct Collector {
    pub collected: Rc<RefCell<Collected>>,
    gate: Rc<tokio::sync::Semaphore>,
    fail: bool,
}

impl Collector {
    /// A sink taking every write at once.
    pub fn open() -> (capsa::schema::byte_sink::Client, Rc<Self>) {
        Self::make(true, false)
    }

    /// A sink holding every write back until released.
    pub fn held() -> (capsa::schema::byte_sink::Client, Rc<Self>) {
        Self::make(false, false)
    }

    /// A sink whose writes fail.
    pub fn failing() -> (capsa::schema::byte_sink::Client, Rc<Self>) {
        Self::make(true, true)
    }

    fn make(open: bool, fail: bool) -> (capsa::schema::byte_sink::Client, Rc<Self>) {
        let gate = tokio::sync::Semaphore::new(0);
        if open {
            gate.close();
        }
        let me = Rc::new(Collector {
            collected: Rc::default(),
            gate: Rc::new(gate),
            fail,
        });
        let server = CollectorServer(me.clone());
        (capnp_rpc::new_client(server), me)
    }

    /// Lets every held and later write through.
    pub fn release(&self) {
        self.gate.close();
    }
}

struct CollectorServer(Rc<Collector>);

impl capsa::schema::byte_sink::Server for CollectorServer {
    async fn write(
        self: Rc<Self>,
        params: capsa::schema::byte_sink::WriteParams,
    ) -> Result<(), capnp::Error> {
        // A closed semaphore is the open gate.
        let _ = self.0.gate.acquire().await;
        if self.0.fail {
            return Err(capnp::Error::failed("this sink fails its writes".into()));
        }
        let data = params.get()?.get_data()?;
        let mut c = self.0.collected.borrow_mut();
        c.bytes.extend_from_slice(data);
        c.writes += 1;
        Ok(())
    }

    async fn close(
        self: Rc<Self>,
        _: capsa::schema::byte_sink::CloseParams,
        _: capsa::schema::byte_sink::CloseResults,
    ) -> Result<(), capnp::Error> {
        self.0.collected.borrow_mut().closed = true;
        Ok(())
    }
}

/// Waits for `p` in a task of its own, before anyone reads or writes.
pub fn wait_in_background(p: &process::Client) -> tokio::task::JoinHandle<ExitStatus> {
    let p = p.clone();
    tokio::task::spawn_local(async move { wait(&p).await })
}

/// Whether `p` is still running 300 ms from now: held back, not done.
pub async fn held_back(p: &process::Client) -> bool {
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    tokio::time::timeout(std::time::Duration::from_millis(10), wait(p))
        .await
        .is_err()
}

/// `hello emit`: a data-mode child writing `total` bytes to stdout in 64 KiB
/// writes, pushed into `stdout_to` if given.
pub async fn emitting(
    exec: &executor::Client,
    total: usize,
    stdout_to: Option<&capsa::schema::byte_sink::Client>,
) -> process::Client {
    let total = total.to_string();
    run(
        exec,
        &guest("hello"),
        Run {
            args: &["emit", &total, "65536"],
            stdio: StdioMode::Data,
            stdout_to,
            ..Run::default()
        },
    )
    .await
    .unwrap()
}

/// Asserts that `p`'s stdout, pushed into a sink given at the start,
/// cannot also be pulled.
pub async fn assert_stdout_is_pushed(p: &process::Client) {
    let pulled = p
        .stdout_request()
        .send()
        .promise
        .await
        .map(drop)
        .unwrap_err();
    assert_kind(&pulled.to_string(), ErrorKind::WrongMode, "is pushed");
}
