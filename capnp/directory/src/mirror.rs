//! A Directory that is not this host's (served by a guest, by another
//! `capsa serve` host, by a client) granted to a WASM child: copied into a
//! private host folder before the child starts, preopened from there, and
//! written back when the child ends, before its exit status is given.
//!
//! Why a copy and not live calls: wasmtime-wasi's filesystem works on host
//! descriptors, and a WASI program expects `read` and `stat` at the cost of
//! a system call, not of a round trip each. The cost is paid up front
//! instead, in proportion to the tree (see `cargo xtask bench`), and
//! bounded: at most [`MAX_BYTES`] and [`MAX_ENTRIES`] per grant.
//!
//! Semantics: the child sees the tree as it was when it started. At its
//! end, every file it created or changed (size or modification time
//! differs from the copy) is written back, directories it made are made,
//! and what it removed is removed; what others changed meanwhile in the
//! same places is overwritten. Symbolic links and special files are not
//! copied. Each call to the Directory is bounded in time
//! ([`CALL_TIMEOUT`] unless the host is configured otherwise); a Directory
//! that fails or does not answer fails `runBytes` (copy) or leaves the
//! write-back incomplete, which is logged. A read-only Directory refuses
//! the write-back: the child's changes stay in its copy and go with it.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use capsa_schema::capsa_capnp::{directory, EntryKind, WriteMode};
use capsa_schema::error::error;
use capsa_schema::ErrorKind;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// What a write-back could not do, path by path; everything else was
/// written.
#[derive(Debug)]
pub struct WriteBackError {
    pub failures: Vec<(String, WriteBackFailure)>,
}

/// Why one path was not written back.
#[derive(Debug)]
pub enum WriteBackFailure {
    /// Reading the local copy failed.
    Local(std::io::Error),
    /// The Directory refused or did not answer.
    Remote(capnp::Error),
}

impl From<std::io::Error> for WriteBackFailure {
    fn from(e: std::io::Error) -> Self {
        WriteBackFailure::Local(e)
    }
}

impl From<capnp::Error> for WriteBackFailure {
    fn from(e: capnp::Error) -> Self {
        WriteBackFailure::Remote(e)
    }
}

impl std::fmt::Display for WriteBackFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WriteBackFailure::Local(e) => e.fmt(f),
            WriteBackFailure::Remote(e) => e.fmt(f),
        }
    }
}

impl std::fmt::Display for WriteBackError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, (path, why)) in self.failures.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{path}: {why}")?;
        }
        Ok(())
    }
}

impl std::error::Error for WriteBackError {}

/// Most bytes copied in for one grant.
pub const MAX_BYTES: u64 = 256 << 20;
/// Most files and directories copied in for one grant.
pub const MAX_ENTRIES: usize = 10_000;
/// How long one call to a granted Directory may take by default
/// (`HostConfig::directory_timeout`).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Bytes per `write` when writing back.
const CHUNK: usize = 1 << 20;

/// A private folder (mode 0700) in `scratch`, removed with its contents
/// when dropped.
pub struct Folder(PathBuf);

impl Folder {
    pub fn new(scratch: &Path) -> std::io::Result<Folder> {
        use std::os::unix::fs::DirBuilderExt;
        use std::sync::atomic::{AtomicU64, Ordering};
        static NEXT: AtomicU64 = AtomicU64::new(0);
        loop {
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let path = scratch.join(format!("capsa-grant-{}-{n}", std::process::id()));
            match std::fs::DirBuilder::new().mode(0o700).create(&path) {
                Ok(()) => return Ok(Folder(path)),
                // Left by an earlier host with this pid: take another name.
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        }
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Folder {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What was copied in, to tell afterwards what the child changed.
pub struct Mirror {
    remote: directory::Client,
    /// Bound on each call to `remote`.
    timeout: Duration,
    local: PathBuf,
    /// Relative path → (size, modification time) of each file as copied.
    files: HashMap<String, (u64, Option<SystemTime>)>,
    dirs: HashSet<String>,
}

async fn call<T>(
    timeout: Duration,
    what: &str,
    promise: impl std::future::Future<Output = capnp::Result<T>>,
) -> capnp::Result<T> {
    tokio::time::timeout(timeout, promise).await.map_err(|_| {
        error(
            ErrorKind::Failed,
            format_args!("the granted directory did not answer {what} within {timeout:?}"),
        )
    })?
}

fn join(base: &str, name: &str) -> String {
    match base {
        "" => name.to_string(),
        _ => format!("{base}/{name}"),
    }
}

fn local_error(e: &std::io::Error, path: &Path) -> capnp::Error {
    error(
        ErrorKind::Failed,
        format_args!("copying a granted directory: {}: {e}", path.display()),
    )
}

impl Mirror {
    /// Copies `remote` into `local` (an empty folder of this host's).
    pub async fn copy_in(
        remote: directory::Client,
        local: PathBuf,
        timeout: Duration,
    ) -> capnp::Result<Mirror> {
        let mut mirror = Mirror {
            remote,
            timeout,
            local,
            files: HashMap::new(),
            dirs: HashSet::new(),
        };
        let mut bytes = 0u64;
        let mut pending = vec![String::new()];
        while let Some(dir) = pending.pop() {
            let mut req = mirror.remote.list_request();
            req.get().set_path(dir.as_str());
            let listing = call(mirror.timeout, "list", req.send().promise).await?;
            for entry in listing.get()?.get_entries()? {
                let name = entry.get_name()?.to_str()?;
                if name.is_empty() || name.contains('/') || name == "." || name == ".." {
                    return Err(error(
                        ErrorKind::Failed,
                        format_args!("the granted directory listed a bad name {name:?}"),
                    ));
                }
                let path = join(&dir, name);
                if mirror.files.len() + mirror.dirs.len() >= MAX_ENTRIES {
                    return Err(error(
                        ErrorKind::TooLarge,
                        format_args!(
                            "a directory from elsewhere is copied for the child, and this \
                             one has more than {MAX_ENTRIES} entries"
                        ),
                    ));
                }
                let info = entry.get_info()?;
                match info.get_kind()? {
                    EntryKind::Directory => {
                        let at = mirror.local.join(&path);
                        tokio::fs::create_dir(&at)
                            .await
                            .map_err(|e| local_error(&e, &at))?;
                        mirror.dirs.insert(path.clone());
                        pending.push(path);
                    }
                    EntryKind::File => {
                        bytes = bytes.saturating_add(info.get_size());
                        if bytes > MAX_BYTES {
                            return Err(error(
                                ErrorKind::TooLarge,
                                format_args!(
                                    "a directory from elsewhere is copied for the child, and \
                                     this one holds more than {} MiB",
                                    MAX_BYTES >> 20
                                ),
                            ));
                        }
                        let stamp = mirror.fetch(&path, info.get_size(), &mut bytes).await?;
                        mirror.files.insert(path, stamp);
                    }
                    EntryKind::Symlink | EntryKind::Other => {}
                }
            }
        }
        Ok(mirror)
    }

    /// Copies one file in; its local size and modification time. `listed`
    /// is its size in the listing, already counted in `total`; bytes past
    /// it (a file that grows while copied) are counted as they come.
    async fn fetch(
        &self,
        path: &str,
        listed: u64,
        total: &mut u64,
    ) -> capnp::Result<(u64, Option<SystemTime>)> {
        let at = self.local.join(path);
        let mut file = tokio::fs::File::create(&at)
            .await
            .map_err(|e| local_error(&e, &at))?;
        let mut req = self.remote.read_request();
        req.get().set_path(path);
        let source = req.send().pipeline.get_source();
        let mut got = 0u64;
        loop {
            let mut read = source.read_request();
            read.get().set_max_bytes(CHUNK as u32);
            let response = call(self.timeout, "read", read.send().promise).await?;
            let chunk = response.get()?;
            let data = chunk.get_data()?;
            let before = got;
            got += data.len() as u64;
            *total += got.max(listed) - before.max(listed);
            if *total > MAX_BYTES {
                return Err(error(
                    ErrorKind::TooLarge,
                    format_args!("{path:?} grew past {} MiB while copied", MAX_BYTES >> 20),
                ));
            }
            file.write_all(data)
                .await
                .map_err(|e| local_error(&e, &at))?;
            if chunk.get_eof() {
                break;
            }
        }
        file.flush().await.map_err(|e| local_error(&e, &at))?;
        drop(file);
        let meta = tokio::fs::metadata(&at)
            .await
            .map_err(|e| local_error(&e, &at))?;
        Ok((meta.len(), meta.modified().ok()))
    }

    /// The local copy the child gets as its preopen.
    pub fn local(&self) -> &Path {
        &self.local
    }

    /// Writes back what the child changed. Returns what failed, if
    /// anything did (the rest is still written).
    pub async fn write_back(&self) -> Result<(), WriteBackError> {
        let mut failures = Vec::new();
        let mut seen_files = HashSet::new();
        let mut seen_dirs = HashSet::new();
        let mut pending = vec![String::new()];
        while let Some(dir) = pending.pop() {
            let at = self.local.join(&dir);
            let mut entries = match tokio::fs::read_dir(&at).await {
                Ok(entries) => entries,
                Err(e) => {
                    failures.push((at.display().to_string(), e.into()));
                    continue;
                }
            };
            loop {
                let entry = match entries.next_entry().await {
                    Ok(Some(entry)) => entry,
                    Ok(None) => break,
                    Err(e) => {
                        failures.push((at.display().to_string(), e.into()));
                        break;
                    }
                };
                let Some(name) = entry.file_name().to_str().map(str::to_string) else {
                    continue;
                };
                let path = join(&dir, &name);
                let Ok(meta) = entry.metadata().await else {
                    continue;
                };
                if meta.is_dir() {
                    if !self.dirs.contains(&path) {
                        if let Err(e) = self.mkdir(&path).await {
                            failures.push((path, e.into()));
                            continue;
                        }
                    }
                    seen_dirs.insert(path.clone());
                    pending.push(path);
                } else if meta.is_file() {
                    let stamp = (meta.len(), meta.modified().ok());
                    if self.files.get(&path) != Some(&stamp) {
                        if let Err(e) = self.put(&path).await {
                            failures.push((path.clone(), e.into()));
                        }
                    }
                    seen_files.insert(path);
                }
            }
        }
        // What the child removed: files first, then directories deepest
        // first, so that each is empty when its turn comes.
        let mut gone: Vec<&String> = self
            .files
            .keys()
            .filter(|p| !seen_files.contains(*p))
            .collect();
        let mut gone_dirs: Vec<&String> = self
            .dirs
            .iter()
            .filter(|p| !seen_dirs.contains(*p))
            .collect();
        gone_dirs.sort_by_key(|p| std::cmp::Reverse(p.matches('/').count()));
        gone.extend(gone_dirs);
        for path in gone {
            let mut req = self.remote.remove_request();
            req.get().set_path(path.as_str());
            match call(self.timeout, "remove", req.send().promise).await {
                // Already gone there too is as good.
                Err(e) if capsa_schema::error::kind(&e) == ErrorKind::NotFound => {}
                Err(e) => failures.push((path.clone(), e.into())),
                Ok(_) => {}
            }
        }
        match failures.is_empty() {
            true => Ok(()),
            false => Err(WriteBackError { failures }),
        }
    }

    async fn mkdir(&self, path: &str) -> capnp::Result<()> {
        let mut req = self.remote.mkdir_request();
        req.get().set_path(path);
        match call(self.timeout, "mkdir", req.send().promise).await {
            Err(e) if capsa_schema::error::kind(&e) == ErrorKind::Exists => Ok(()),
            other => other.map(drop),
        }
    }

    /// Writes one local file to the remote directory.
    async fn put(&self, path: &str) -> capnp::Result<()> {
        let at = self.local.join(path);
        let mut file = tokio::fs::File::open(&at)
            .await
            .map_err(|e| local_error(&e, &at))?;
        let mut req = self.remote.write_request();
        req.get().set_path(path);
        req.get().set_mode(WriteMode::Truncate);
        // The sink is waited for, not pipelined on: calls queued on an
        // unresolved capability can be dispatched out of order when it
        // resolves (capnp-rpc 0.27), and the close could overtake a write.
        let opened = call(self.timeout, "write", req.send().promise).await?;
        let sink = opened.get()?.get_sink()?;
        let mut buffer = vec![0; CHUNK];
        loop {
            let n = file
                .read(&mut buffer)
                .await
                .map_err(|e| local_error(&e, &at))?;
            if n == 0 {
                break;
            }
            let mut write = sink.write_request();
            write.get().set_data(&buffer[..n]);
            call(self.timeout, "write", write.send()).await?;
        }
        call(self.timeout, "close", sink.close_request().send().promise)
            .await
            .map(drop)
    }
}
