//! Directories granted to an ELF (`Options.directories`): each copied into
//! the machine at its guest path before the program starts, and written
//! back when it ends, before its exit status is given.
//!
//! Why a copy: a Linux program wants files, and the machine has no
//! filesystem that reaches the host (no 9p, no virtiofs: the only channel
//! out is the agent's vsock connection). The copy is `capsa-directory`'s
//! [`Mirror`], the same one the host uses for a WASM child's Directory from
//! elsewhere, with the same bounds (256 MiB and 10,000 entries per grant,
//! 30 s per call) and semantics: the program sees the tree as it was when
//! it started; at its end what it created, changed or removed there is
//! written back, and the copy is removed from the machine.
//!
//! Where a guest path lands: in a machine, where it says (an absolute path,
//! or one relative to `/`, the program's working directory). An agent
//! running as a host process has no root of its own: its machine's "root"
//! is a folder in its work folder, the program's working directory, and
//! guest paths land beneath it (`/data` and `data` alike), so a program run
//! there reaches its grants by relative paths.
//!
//! A guest path must be free: missing, or an empty directory. Two grants
//! in use at once may not overlap (one inside the other): each would write
//! back the other's files.

use std::cell::RefCell;
use std::collections::HashSet;
use std::path::{Component, Path, PathBuf};
use std::rc::Rc;

use capsa_directory::mirror::{Mirror, CALL_TIMEOUT};
use capsa_schema::capsa_capnp::directory;
use capsa_schema::error::error;
use capsa_schema::ErrorKind;

/// The guest paths granted to programs now running, shared by every
/// connection.
pub type InUse = Rc<RefCell<HashSet<PathBuf>>>;

/// One grant copied in; [`Granted::finish`] writes it back.
pub struct Granted {
    /// Where the copy is.
    at: PathBuf,
    /// The outermost folder the agent made for it, if it made any (these
    /// go afterwards; else only what is in the folder).
    created: Option<PathBuf>,
    mirror: Mirror,
    in_use: InUse,
    /// Set once `finish` has removed the copy.
    finished: bool,
}

/// Where `guest` (text of the request, so without NUL) lands beneath
/// `root`: no `..`, not the root itself.
fn place(root: &Path, guest: &str) -> capnp::Result<PathBuf> {
    let mut at = root.to_path_buf();
    let mut depth = 0;
    for part in Path::new(guest).components() {
        match part {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(name) => {
                at.push(name);
                depth += 1;
            }
            Component::ParentDir | Component::Prefix(_) => {
                return Err(error(
                    ErrorKind::BadPath,
                    format_args!("{guest:?}: `..` is not allowed in a guest path"),
                ))
            }
        }
    }
    if depth == 0 {
        return Err(error(
            ErrorKind::BadRequest,
            format_args!("{guest:?}: a directory cannot be granted at the machine's root"),
        ));
    }
    Ok(at)
}

/// Copies each of `grants` into the machine beneath `root`, at its guest
/// path. Nothing is left behind if one fails.
pub async fn copy_in(
    root: &Path,
    grants: Vec<(String, directory::Client)>,
    in_use: &InUse,
) -> capnp::Result<Vec<Granted>> {
    let mut granted = Vec::with_capacity(grants.len());
    for (guest, remote) in grants {
        let guest = guest.as_str();
        let at = place(root, guest)?;
        let taken = in_use
            .borrow()
            .iter()
            .find(|other| other.starts_with(&at) || at.starts_with(other))
            .cloned();
        if let Some(other) = taken {
            return Err(error(
                ErrorKind::Exists,
                format_args!(
                    "{guest:?} overlaps {} granted to a program still running",
                    other.display()
                ),
            ));
        }
        let created = match std::fs::read_dir(&at) {
            Ok(mut entries) => {
                if entries.next().is_some() {
                    return Err(error(
                        ErrorKind::Exists,
                        format_args!("{guest:?} is not empty in the machine"),
                    ));
                }
                None
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut outermost = at.as_path();
                while let Some(parent) = outermost.parent() {
                    if parent.exists() {
                        break;
                    }
                    outermost = parent;
                }
                let outermost = outermost.to_path_buf();
                std::fs::create_dir_all(&at).map_err(|e| capsa_schema::error::io(&e, guest))?;
                Some(outermost)
            }
            Err(e) => return Err(capsa_schema::error::io(&e, guest)),
        };
        in_use.borrow_mut().insert(at.clone());
        // Held from here on, so a failed copy is cleaned up too.
        let mut entry = Cleanup {
            at: Some(at),
            created: created.clone(),
            in_use: in_use.clone(),
        };
        let mirror = Mirror::copy_in(remote, entry.path().to_path_buf(), CALL_TIMEOUT).await?;
        granted.push(Granted {
            at: entry.at.take().expect("set above"),
            created,
            mirror,
            in_use: in_use.clone(),
            finished: false,
        });
    }
    Ok(granted)
}

impl Granted {
    /// Writes back what the program changed, then removes the copy.
    pub async fn finish(mut self) {
        if let Err(e) = self.mirror.write_back().await {
            eprintln!(
                "capsa-agent: writing back the directory granted at {}: {e}",
                self.at.display()
            );
        }
        let (at, created) = (self.at.clone(), self.created.clone());
        // Removing a large tree is blocking work.
        let _ = tokio::task::spawn_blocking(move || remove(&at, created.as_deref())).await;
        self.finished = true;
    }
}

impl Drop for Granted {
    fn drop(&mut self) {
        // Not finished: the program never ran (or the agent is going).
        if !self.finished {
            remove(&self.at, self.created.as_deref());
        }
        self.in_use.borrow_mut().remove(&self.at);
    }
}

/// A grant's folder while it is being copied in.
struct Cleanup {
    at: Option<PathBuf>,
    created: Option<PathBuf>,
    in_use: InUse,
}

impl Cleanup {
    fn path(&self) -> &Path {
        self.at.as_deref().unwrap_or(Path::new(""))
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(at) = self.at.take() {
            remove(&at, self.created.as_deref());
            self.in_use.borrow_mut().remove(&at);
        }
    }
}

/// Removes a copy: the folders the agent made for it (up to `created`, the
/// outermost; a parent another grant now uses too stays, being not empty),
/// else what is in the folder.
fn remove(at: &Path, created: Option<&Path>) {
    if let Some(outermost) = created {
        let _ = std::fs::remove_dir_all(at);
        for parent in at.ancestors().skip(1) {
            if !parent.starts_with(outermost) || std::fs::remove_dir(parent).is_err() {
                break;
            }
        }
        return;
    }
    if let Ok(entries) = std::fs::read_dir(at) {
        for entry in entries.flatten() {
            let path = entry.path();
            match entry.file_type() {
                Ok(t) if t.is_dir() => {
                    let _ = std::fs::remove_dir_all(&path);
                }
                _ => {
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_paths_land_beneath_the_root() {
        let root = Path::new("/r");
        assert_eq!(place(root, "/data").unwrap(), PathBuf::from("/r/data"));
        assert_eq!(place(root, "data/x/").unwrap(), PathBuf::from("/r/data/x"));
        assert_eq!(place(root, "./a//b").unwrap(), PathBuf::from("/r/a/b"));
        for bad in ["/", ".", "", "/a/../b", ".."] {
            assert!(place(root, bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            capsa_schema::error::kind(&place(root, "a/..").unwrap_err()),
            ErrorKind::BadPath
        );
    }
}
