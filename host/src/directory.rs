//! `Directory`: a host directory as a capability, and the grants that put
//! directories in a guest's hands.
//!
//! A directory is reachable only through a grant: the embedder's
//! ([`DirGrant`], `capsa run --dir`, `capsa serve --dir`) or a parent's
//! (`Options.directories`). The capability itself is `capsa-directory`'s
//! (shared with the microVM agent): every path resolved beneath the
//! directory's own descriptor.
//!
//! A Directory served by this host is recognised when it comes back in
//! `runBytes`: a WASM child then gets the same descriptor as a
//! wasmtime-wasi preopen ([`Preopen`]) and works at full speed, without a
//! Cap'n Proto call per file operation.

use std::io;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::Arc;

use cap_std::fs::Dir;
use capsa_schema::capsa_capnp::directory;
use capsa_schema::error::error;
use capsa_schema::ErrorKind;

pub use capsa_directory::server::{Directories, DirectoryImpl, MAX_ENTRIES, MAX_OPEN_FILES};

/// A host directory an embedder grants: to PID0 (as a WASI preopen and in
/// its Executor's `directories`) or to the clients of `capsa serve`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirGrant {
    /// Where the grantee sees it (a preopen's guest path, a served name).
    pub path: String,
    pub host_path: PathBuf,
    pub read_only: bool,
}

impl DirGrant {
    /// Parses `HOST[::GUEST][:ro]`, as `capsa run --dir` and `wasmtime run
    /// --dir` take it; without `::GUEST` the guest sees the host's path.
    pub fn parse_run(spec: &str) -> Result<DirGrant, String> {
        let (rest, read_only) = match spec.strip_suffix(":ro") {
            Some(rest) => (rest, true),
            None => (spec, false),
        };
        let (host, guest) = match rest.split_once("::") {
            Some((host, guest)) => (host, guest),
            None => (rest, rest),
        };
        DirGrant::checked(guest, host, read_only, spec)
    }

    /// Parses `NAME=HOST[:ro]`, as `capsa serve --dir` takes it.
    pub fn parse_named(spec: &str) -> Result<DirGrant, String> {
        let (rest, read_only) = match spec.strip_suffix(":ro") {
            Some(rest) => (rest, true),
            None => (spec, false),
        };
        let Some((name, host)) = rest.split_once('=') else {
            return Err(format!("{spec:?}: expected NAME=HOST_PATH[:ro]"));
        };
        DirGrant::checked(name, host, read_only, spec)
    }

    fn checked(path: &str, host: &str, read_only: bool, spec: &str) -> Result<DirGrant, String> {
        if host.is_empty() || path.is_empty() {
            return Err(format!(
                "{spec:?}: the host path and the guest path must not be empty"
            ));
        }
        check_grant_path(path).map_err(|e| format!("{spec:?}: {e}"))?;
        Ok(DirGrant {
            path: path.to_string(),
            host_path: PathBuf::from(host),
            read_only,
        })
    }
}

/// A grant's guest path: any non-empty text without NUL (a WASI preopen
/// may be named "/data", "." or "out").
fn check_grant_path(path: &str) -> Result<(), String> {
    if path.is_empty() || path.contains('\0') {
        return Err("a granted directory needs a non-empty path without NUL".into());
    }
    Ok(())
}

/// Directories at the paths they were granted at.
pub type Grants = Rc<[(String, directory::Client)]>;

/// Serves an embedder's grant from `directories`.
pub fn open(
    directories: &Directories,
    grant: &DirGrant,
) -> io::Result<(directory::Client, Rc<DirectoryImpl>)> {
    directories.open(&grant.host_path, grant.read_only)
}

/// A local directory as a child gets it: the same descriptor, preopened.
#[derive(Clone)]
pub struct Preopen {
    pub guest_path: String,
    dir: Arc<Dir>,
    pub read_only: bool,
}

impl Preopen {
    /// A Directory of this host's, preopened at `guest_path`: the same
    /// descriptor and the same read-only view.
    pub fn of(dir: &DirectoryImpl, guest_path: &str) -> capnp::Result<Preopen> {
        check_grant_path(guest_path).map_err(|e| error(ErrorKind::BadRequest, e))?;
        Ok(Preopen {
            guest_path: guest_path.to_string(),
            dir: dir.dir().clone(),
            read_only: dir.read_only(),
        })
    }

    /// A folder of this host's own (not a grant), preopened for a child.
    pub fn folder(
        guest_path: &str,
        folder: &std::path::Path,
        read_only: bool,
    ) -> io::Result<Preopen> {
        let dir = Dir::open_ambient_dir(folder, cap_std::ambient_authority())?;
        Ok(Preopen {
            guest_path: guest_path.to_string(),
            dir: Arc::new(dir),
            read_only,
        })
    }

    /// A path that opens this very directory, for wasmtime-wasi's
    /// `preopened_dir` (which takes a path): the descriptor's entry in
    /// `/proc/self/fd`, so a rename or a symlink swapped in on the host
    /// cannot change which directory the child gets.
    pub fn host_path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", self.dir.as_raw_fd()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grants_parse_as_wasmtime_and_serve_take_them() {
        let g = DirGrant::parse_run("/srv/data").unwrap();
        assert_eq!((g.path.as_str(), g.read_only), ("/srv/data", false));
        let g = DirGrant::parse_run("/srv/data::/data:ro").unwrap();
        assert_eq!(g.host_path, PathBuf::from("/srv/data"));
        assert_eq!((g.path.as_str(), g.read_only), ("/data", true));
        let g = DirGrant::parse_run("out::.").unwrap();
        assert_eq!(g.path, ".");
        assert!(DirGrant::parse_run("::/data").is_err());
        assert!(DirGrant::parse_run("/x::").is_err());
        let g = DirGrant::parse_named("logs=/var/log:ro").unwrap();
        assert_eq!((g.path.as_str(), g.read_only), ("logs", true));
        assert!(DirGrant::parse_named("/var/log").is_err());
        assert!(DirGrant::parse_named("=/var/log").is_err());
    }
}
