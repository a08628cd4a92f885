//! A local folder as a `Directory` capability.
//!
//! Every path is resolved by `cap-std` beneath the folder's own descriptor,
//! so `..`, absolute paths and symbolic links cannot lead outside it,
//! whatever the client races; paths are also checked here first, so such
//! attempts fail with `badPath` before any system call.
//!
//! Every Directory made through one [`Directories`] is recognised when it
//! comes back (a [`CapabilityServerSet`]): the host then hands a WASM child
//! the same descriptor as a wasmtime-wasi preopen, without a Cap'n Proto
//! call per file operation.
//!
//! Filesystem calls run on tokio's blocking threads: a slow disk holds back
//! the caller, never the thread that serves RPC.

use std::cell::{Cell as Counter, RefCell};
use std::io;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use cap_std::fs::{Dir, Metadata, OpenOptions};
use capnp_rpc::CapabilityServerSet;
use capsa_schema::capsa_capnp::{byte_sink, directory, EntryKind, WriteMode};
use capsa_schema::error::{self as kinds, error};
use capsa_schema::stream::{ByteSourceServer, ByteStream};
use capsa_schema::ErrorKind;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Most entries one `list` returns.
pub const MAX_ENTRIES: usize = 100_000;
/// Most files open at once through one grant's capabilities (the grant and
/// every view and file taken from it).
pub const MAX_OPEN_FILES: u32 = 1024;
/// Most bytes one `ByteSource.read` of a file returns.
pub const MAX_READ: usize = 4 << 20;
/// How long `runBytes` waits for a granted Directory capability to resolve.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(10);

/// What every Directory of one host (or agent) shares: the set that
/// recognises them.
#[derive(Clone, Default)]
pub struct Directories(Rc<Registry>);

#[derive(Default)]
struct Registry {
    set: RefCell<CapabilityServerSet<DirectoryImpl, directory::Client>>,
    /// Clients made since the set last forgot its dropped servers.
    since_gc: Counter<u32>,
}

/// The set forgets dropped servers after this many new clients.
const GC_EVERY: u32 = 1024;

impl Directories {
    /// Serves the folder at `path` (an embedder's grant, a machine's root).
    /// Fails if it is not a directory.
    pub fn open(
        &self,
        path: &std::path::Path,
        read_only: bool,
    ) -> io::Result<(directory::Client, Rc<DirectoryImpl>)> {
        let dir = Dir::open_ambient_dir(path, cap_std::ambient_authority())?;
        let server = Rc::new(DirectoryImpl {
            dir: Arc::new(dir),
            read_only,
            tree: Rc::new(Tree::default()),
            set: self.clone(),
        });
        Ok((self.client(server.clone()), server))
    }

    fn client(&self, dir: Rc<DirectoryImpl>) -> directory::Client {
        let mut set = self.0.set.borrow_mut();
        // Forget the servers whose clients are all gone, now and then.
        let made = self.0.since_gc.get() + 1;
        if made >= GC_EVERY {
            set.gc();
        }
        self.0.since_gc.set(made % GC_EVERY);
        set.new_client_from_rc(dir)
    }

    /// The server behind `client` if it is one of this set's, once it has
    /// resolved (a promise for a Directory is waited for, up to a bound).
    pub async fn local(
        &self,
        client: &directory::Client,
    ) -> capnp::Result<Option<Rc<DirectoryImpl>>> {
        let resolved = tokio::time::timeout(RESOLVE_TIMEOUT, client.client.when_resolved())
            .await
            .map_err(|_| {
                error(
                    ErrorKind::Failed,
                    format_args!(
                        "a granted directory did not resolve within {} s",
                        RESOLVE_TIMEOUT.as_secs()
                    ),
                )
            });
        resolved??;
        let resolved: directory::Client = capnp::capability::get_resolved_cap(client.clone()).await;
        Ok(self.0.set.borrow().get_local_server_of_resolved(&resolved))
    }
}

/// What a grant and everything taken from it share.
#[derive(Default)]
struct Tree {
    open_files: Counter<u32>,
}

/// One open file of a tree; gives its place back when dropped.
struct OpenFile(Rc<Tree>);

impl OpenFile {
    fn take(tree: &Rc<Tree>) -> capnp::Result<OpenFile> {
        let open = tree.open_files.get();
        if open >= MAX_OPEN_FILES {
            return Err(error(
                ErrorKind::Quota,
                format_args!("{MAX_OPEN_FILES} files are open through this directory already"),
            ));
        }
        tree.open_files.set(open + 1);
        Ok(OpenFile(tree.clone()))
    }
}

impl Drop for OpenFile {
    fn drop(&mut self) {
        self.0
            .open_files
            .set(self.0.open_files.get().saturating_sub(1));
    }
}

/// A local folder, or a view of one.
pub struct DirectoryImpl {
    dir: Arc<Dir>,
    read_only: bool,
    tree: Rc<Tree>,
    set: Directories,
}

impl DirectoryImpl {
    /// The descriptor everything is resolved beneath.
    pub fn dir(&self) -> &Arc<Dir> {
        &self.dir
    }

    pub fn read_only(&self) -> bool {
        self.read_only
    }

    fn writable(&self, path: &str) -> capnp::Result<()> {
        if self.read_only {
            return Err(error(
                ErrorKind::ReadOnly,
                format_args!("{path:?}: this directory is read-only"),
            ));
        }
        Ok(())
    }
}

/// A relative path as the schema defines it; `None` for the directory
/// itself ("" or ".").
fn relative(path: &str) -> capnp::Result<Option<PathBuf>> {
    let bad = |why: &str| error(ErrorKind::BadPath, format_args!("{path:?}: {why}"));
    if path.contains('\0') {
        return Err(bad("a path must not contain NUL"));
    }
    if path.starts_with('/') {
        return Err(bad("paths are relative to the directory"));
    }
    let mut clean = PathBuf::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => return Err(bad("`..` is not allowed")),
            name => clean.push(name),
        }
    }
    Ok((!clean.as_os_str().is_empty()).then_some(clean))
}

/// A relative path that names something inside the directory.
fn inside(path: &str) -> capnp::Result<PathBuf> {
    relative(path)?.ok_or_else(|| {
        error(
            ErrorKind::BadPath,
            format_args!("{path:?} names the directory itself"),
        )
    })
}

/// A failed filesystem call as an exception of its kind; cap-std's refusal
/// of a link that leads outside is `badPath`.
fn io_error(e: &io::Error, path: &str) -> capnp::Error {
    if e.kind() == io::ErrorKind::PermissionDenied
        && e.to_string().contains("outside of the filesystem")
    {
        return error(
            ErrorKind::BadPath,
            format_args!("{path:?} leads outside the directory"),
        );
    }
    if e.raw_os_error() == Some(libc::EMFILE) || e.raw_os_error() == Some(libc::ENFILE) {
        return error(
            ErrorKind::Quota,
            format_args!("{path:?}: this machine has too many files open"),
        );
    }
    kinds::io(e, path)
}

/// Runs a filesystem call on a blocking thread.
async fn blocking<T, F>(path: &str, f: F) -> capnp::Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> io::Result<T> + Send + 'static,
{
    match tokio::task::spawn_blocking(f).await {
        Ok(result) => result.map_err(|e| io_error(&e, path)),
        Err(e) => Err(error(ErrorKind::Failed, format_args!("{path:?}: {e}"))),
    }
}

fn set_info(
    mut info: capsa_schema::capsa_capnp::info::Builder<'_>,
    meta: &Metadata,
    kind: EntryKind,
) {
    info.set_kind(kind);
    info.set_size(meta.len());
    let nanos = meta
        .modified()
        .ok()
        .and_then(|t| t.into_std().duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX));
    info.set_modified_nanos(nanos);
}

fn kind_of(file_type: cap_std::fs::FileType) -> EntryKind {
    if file_type.is_symlink() {
        EntryKind::Symlink
    } else if file_type.is_dir() {
        EntryKind::Directory
    } else if file_type.is_file() {
        EntryKind::File
    } else {
        EntryKind::Other
    }
}

impl directory::Server for DirectoryImpl {
    async fn list(
        self: Rc<Self>,
        params: directory::ListParams,
        mut results: directory::ListResults,
    ) -> Result<(), capnp::Error> {
        let path = params.get()?.get_path()?.to_str()?.to_string();
        let at = relative(&path)?;
        let dir = self.dir.clone();
        let entries = blocking(&path, move || {
            let listing = match &at {
                Some(at) => dir.read_dir(at)?,
                None => dir.entries()?,
            };
            let mut entries = Vec::new();
            for entry in listing {
                let entry = entry?;
                if entries.len() == MAX_ENTRIES {
                    return Err(io::Error::other(TooMany));
                }
                let kind = kind_of(entry.file_type()?);
                // An entry removed meanwhile is left out.
                let Ok(meta) = entry.metadata() else { continue };
                entries.push((entry.file_name(), kind, meta));
            }
            Ok(entries)
        })
        .await
        .map_err(|e| match e.extra.contains(TooMany::TEXT) {
            true => error(
                ErrorKind::TooLarge,
                format_args!("{path:?} has more than {MAX_ENTRIES} entries"),
            ),
            false => e,
        })?;
        let mut list = results.get().init_entries(entries.len() as u32);
        for (i, (name, kind, meta)) in entries.iter().enumerate() {
            let mut entry = list.reborrow().get(i as u32);
            entry.set_name(name.to_string_lossy().as_ref());
            set_info(entry.init_info(), meta, *kind);
        }
        Ok(())
    }

    async fn stat(
        self: Rc<Self>,
        params: directory::StatParams,
        mut results: directory::StatResults,
    ) -> Result<(), capnp::Error> {
        let path = params.get()?.get_path()?.to_str()?.to_string();
        let at = relative(&path)?;
        let dir = self.dir.clone();
        let meta = blocking(&path, move || match &at {
            Some(at) => dir.metadata(at),
            None => dir.dir_metadata(),
        })
        .await?;
        set_info(results.get().init_info(), &meta, kind_of(meta.file_type()));
        Ok(())
    }

    async fn read(
        self: Rc<Self>,
        params: directory::ReadParams,
        mut results: directory::ReadResults,
    ) -> Result<(), capnp::Error> {
        let path = params.get()?.get_path()?.to_str()?.to_string();
        let at = inside(&path)?;
        let open = OpenFile::take(&self.tree)?;
        let dir = self.dir.clone();
        let file = blocking(&path, move || {
            let file = dir.open(&at)?.into_std();
            if file.metadata()?.is_dir() {
                return Err(io::Error::from(io::ErrorKind::IsADirectory));
            }
            Ok(file)
        })
        .await?;
        results
            .get()
            .set_source(ByteSourceServer::client(FileSource {
                file: tokio::sync::Mutex::new(tokio::fs::File::from_std(file)),
                _open: open,
            }));
        Ok(())
    }

    async fn write(
        self: Rc<Self>,
        params: directory::WriteParams,
        mut results: directory::WriteResults,
    ) -> Result<(), capnp::Error> {
        let params = params.get()?;
        let path = params.get_path()?.to_str()?.to_string();
        let mode = params.get_mode()?;
        let at = inside(&path)?;
        self.writable(&path)?;
        let open = OpenFile::take(&self.tree)?;
        let dir = self.dir.clone();
        let file = blocking(&path, move || {
            let mut options = OpenOptions::new();
            options.write(true);
            match mode {
                WriteMode::Truncate => options.create(true).truncate(true),
                WriteMode::Append => options.create(true).append(true),
                WriteMode::CreateNew => options.create_new(true),
            };
            Ok(dir.open_with(&at, &options)?.into_std())
        })
        .await?;
        results.get().set_sink(capnp_rpc::new_client(FileSink {
            path,
            file: tokio::sync::Mutex::new(Some(tokio::fs::File::from_std(file))),
            _open: open,
        }));
        Ok(())
    }

    async fn mkdir(
        self: Rc<Self>,
        params: directory::MkdirParams,
        _: directory::MkdirResults,
    ) -> Result<(), capnp::Error> {
        let path = params.get()?.get_path()?.to_str()?.to_string();
        let at = inside(&path)?;
        self.writable(&path)?;
        let dir = self.dir.clone();
        blocking(&path, move || dir.create_dir(&at)).await
    }

    async fn remove(
        self: Rc<Self>,
        params: directory::RemoveParams,
        _: directory::RemoveResults,
    ) -> Result<(), capnp::Error> {
        let path = params.get()?.get_path()?.to_str()?.to_string();
        let at = inside(&path)?;
        self.writable(&path)?;
        let dir = self.dir.clone();
        blocking(&path, move || {
            // The link itself, never what it points at.
            if dir.symlink_metadata(&at)?.is_dir() {
                dir.remove_dir(&at)
            } else {
                dir.remove_file(&at)
            }
        })
        .await
    }

    async fn rename(
        self: Rc<Self>,
        params: directory::RenameParams,
        _: directory::RenameResults,
    ) -> Result<(), capnp::Error> {
        let params = params.get()?;
        let from = params.get_from()?.to_str()?.to_string();
        let to = params.get_to()?.to_str()?.to_string();
        let (from_at, to_at) = (inside(&from)?, inside(&to)?);
        self.writable(&from)?;
        let dir = self.dir.clone();
        blocking(&format!("{from} -> {to}"), move || {
            dir.rename(&from_at, &dir, &to_at)
        })
        .await
    }

    async fn sub(
        self: Rc<Self>,
        params: directory::SubParams,
        mut results: directory::SubResults,
    ) -> Result<(), capnp::Error> {
        let params = params.get()?;
        let path = params.get_path()?.to_str()?.to_string();
        let read_only = self.read_only || params.get_read_only();
        let dir = match relative(&path)? {
            Some(at) => {
                let dir = self.dir.clone();
                Arc::new(blocking(&path, move || dir.open_dir(&at)).await?)
            }
            None => self.dir.clone(),
        };
        results
            .get()
            .set_directory(self.set.client(Rc::new(DirectoryImpl {
                dir,
                read_only,
                tree: self.tree.clone(),
                set: self.set.clone(),
            })));
        Ok(())
    }
}

/// Marks a listing cut short at [`MAX_ENTRIES`].
#[derive(Debug)]
struct TooMany;

impl TooMany {
    const TEXT: &'static str = "too many entries";
}

impl std::fmt::Display for TooMany {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(Self::TEXT)
    }
}

impl std::error::Error for TooMany {}

/// A file being read through `Directory.read`.
struct FileSource {
    file: tokio::sync::Mutex<tokio::fs::File>,
    _open: OpenFile,
}

impl ByteStream for FileSource {
    const MAX_READ: usize = MAX_READ;
    type Chunk = Vec<u8>;

    async fn read(&self, max: usize) -> capnp::Result<(Vec<u8>, bool)> {
        let mut file = self.file.lock().await;
        let mut chunk = vec![0; max];
        let mut filled = 0;
        // Fill what was asked unless the file ends: tokio reads a file in
        // pieces smaller than a large `max`.
        while filled < max {
            let n = file
                .read(&mut chunk[filled..])
                .await
                .map_err(|e| io_error(&e, "read"))?;
            if n == 0 {
                break;
            }
            filled += n;
        }
        // Short only where the file ended: the end comes with its last bytes.
        let ended = filled < max;
        chunk.truncate(filled);
        Ok((chunk, ended))
    }
}

/// A file being written through `Directory.write`.
struct FileSink {
    path: String,
    /// `None` once closed.
    file: tokio::sync::Mutex<Option<tokio::fs::File>>,
    _open: OpenFile,
}

impl byte_sink::Server for FileSink {
    async fn write(self: Rc<Self>, params: byte_sink::WriteParams) -> Result<(), capnp::Error> {
        let data = params.get()?.get_data()?;
        let mut file = self.file.lock().await;
        let Some(file) = file.as_mut() else {
            return Err(error(
                ErrorKind::BadRequest,
                format_args!("{:?} is closed", self.path),
            ));
        };
        file.write_all(data)
            .await
            .map_err(|e| io_error(&e, &self.path))
    }

    async fn close(
        self: Rc<Self>,
        _: byte_sink::CloseParams,
        _: byte_sink::CloseResults,
    ) -> Result<(), capnp::Error> {
        let mut file = self.file.lock().await;
        if let Some(mut f) = file.take() {
            // tokio writes in the background: the last write's failure
            // shows up here.
            f.flush().await.map_err(|e| io_error(&e, &self.path))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_relative_and_stay_inside() {
        assert_eq!(relative("").unwrap(), None);
        assert_eq!(relative(".").unwrap(), None);
        assert_eq!(relative("./").unwrap(), None);
        assert_eq!(relative("a").unwrap(), Some(PathBuf::from("a")));
        assert_eq!(relative("a//b/./c/").unwrap(), Some(PathBuf::from("a/b/c")));
        for bad in ["/etc", "..", "a/../b", "a/..", "a\0b", "/"] {
            let e = relative(bad).unwrap_err();
            assert_eq!(kinds::kind(&e), ErrorKind::BadPath, "{bad:?}");
        }
        assert_eq!(kinds::kind(&inside(".").unwrap_err()), ErrorKind::BadPath);
    }
}
