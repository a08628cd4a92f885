//! Compiled guests on disk: a host that starts again, or another host of the
//! same user, loads what was compiled before instead of compiling it again.
//!
//! An entry is named by the SHA-256 of the guest's bytes (a content hash no
//! one can make collide, so an entry can never stand for other bytes) in a
//! folder named by everything that changes the code wasmtime generates
//! (wasmtime's own compatibility hash: its version, the engine's settings,
//! the target), so a host with other settings never sees them.
//!
//! Why an entry is not trusted blindly: wasmtime runs a deserialized
//! artifact's machine code as it is. So
//! - the folder must be the user's own: a directory owned by this user,
//!   not readable or writable by anyone else (it is created 0700; one that
//!   is not so is refused, and the host compiles without it);
//! - entries are written whole to a temporary name and renamed into place,
//!   so a reader sees a complete entry or none;
//! - each entry holds its key and a 128-bit checksum of its contents,
//!   checked before wasmtime sees a byte: a truncated or damaged entry is
//!   removed and the guest compiled again;
//! - wasmtime itself checks the artifact's header against the engine.
//!
//! Someone who can write in the user's private folder could forge an
//! entry with a good checksum; they could as well replace the `capsa`
//! binary, which runs with the same rights.

use std::fs;
use std::hash::Hash;
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use sha2::{Digest, Sha256};
use wasmtime::Engine;

/// The first bytes of every entry, with the layout's version.
const MAGIC: &[u8; 8] = b"capsa\x00c1";
/// MAGIC, the key (32 bytes), the payload's length (8) and checksum (16).
const HEADER: usize = 8 + 32 + 8 + 16;

/// A guest's content hash: what entries are named by.
pub type Key = [u8; 32];

pub fn key_of(bytes: &[u8]) -> Key {
    Sha256::digest(bytes).into()
}

/// The default folder: `$XDG_CACHE_HOME/capsa`, else `~/.cache/capsa`.
pub fn default_dir() -> Option<PathBuf> {
    let base = match std::env::var_os("XDG_CACHE_HOME") {
        Some(dir) if Path::new(&dir).is_absolute() => PathBuf::from(dir),
        _ => PathBuf::from(std::env::var_os("HOME")?).join(".cache"),
    };
    Some(base.join("capsa"))
}

/// The folder of compiled guests for one engine configuration.
pub struct DiskCache {
    dir: PathBuf,
}

impl DiskCache {
    /// Opens (creating it 0700 if need be) `root` for `engine`'s code.
    pub fn open(root: &Path, engine: &Engine) -> io::Result<DiskCache> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(root)?;
        private(root)?;
        let mut hasher = xxhash_rust::xxh3::Xxh3Default::new();
        engine.precompile_compatibility_hash().hash(&mut hasher);
        let dir = root.join(format!("wasmtime-{:016x}", hasher.digest()));
        match fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => private(&dir)?,
            Err(e) => return Err(e),
        }
        Ok(DiskCache { dir })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, key: &Key) -> PathBuf {
        let mut name = String::with_capacity(64);
        for b in key {
            name.push_str(&format!("{b:02x}"));
        }
        self.dir.join(name)
    }

    /// The entry for `key`, checked whole; `None` if there is none or it
    /// does not check out (then it is removed).
    pub fn load(&self, key: &Key) -> Option<Vec<u8>> {
        let path = self.path(key);
        let mut entry = fs::read(&path).ok()?;
        match checked(&entry, key) {
            Some(()) => {
                entry.drain(..HEADER);
                Some(entry)
            }
            None => {
                tracing::warn!("{}: a damaged compile cache entry, removed", path.display());
                let _ = fs::remove_file(&path);
                None
            }
        }
    }

    /// Stores `artifact` (wasmtime's serialized code) for `key`. Failing to
    /// is only logged: the cache saves time, it is never needed.
    pub fn store(&self, key: &Key, artifact: &[u8]) {
        if let Err(e) = self.write(key, artifact) {
            tracing::warn!(
                "cannot write to the compile cache {}: {e}",
                self.dir.display()
            );
        }
    }

    fn write(&self, key: &Key, artifact: &[u8]) -> io::Result<()> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let path = self.path(key);
        let temporary = self.dir.join(format!(
            ".tmp-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&temporary)?;
        let written = (|| {
            file.write_all(MAGIC)?;
            file.write_all(key)?;
            file.write_all(&(artifact.len() as u64).to_le_bytes())?;
            file.write_all(&xxhash_rust::xxh3::xxh3_128(artifact).to_le_bytes())?;
            file.write_all(artifact)?;
            file.sync_data()?;
            fs::rename(&temporary, &path)
        })();
        if written.is_err() {
            let _ = fs::remove_file(&temporary);
        }
        written
    }
}

/// Whether `entry` is whole and for `key`.
fn checked(entry: &[u8], key: &Key) -> Option<()> {
    let (header, payload) = entry.split_at_checked(HEADER)?;
    let (magic, rest) = header.split_at(8);
    let (stored_key, rest) = rest.split_at(32);
    let (len, sum) = rest.split_at(8);
    let len = u64::from_le_bytes(len.try_into().ok()?);
    let sum = u128::from_le_bytes(sum.try_into().ok()?);
    (magic == MAGIC
        && stored_key == key
        && len == payload.len() as u64
        && sum == xxhash_rust::xxh3::xxh3_128(payload))
    .then_some(())
}

/// Refuses a folder that is not this user's alone.
fn private(dir: &Path) -> io::Result<()> {
    let meta = fs::symlink_metadata(dir)?;
    let me = rustix::process::geteuid().as_raw();
    if !meta.is_dir() || meta.uid() != me || meta.permissions().mode() & 0o077 != 0 {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "{} must be a directory of this user's that no one else can read or write \
                 (mode 0700)",
                dir.display()
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(label: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("capsa-cache-{label}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn entries_round_trip_and_damaged_ones_are_dropped() {
        let root = scratch("entries");
        let engine = Engine::default();
        let cache = DiskCache::open(&root, &engine).unwrap();
        let mode = fs::metadata(&root).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        let key = key_of(b"a guest");
        assert_eq!(cache.load(&key), None);
        cache.store(&key, b"compiled code");
        assert_eq!(cache.load(&key).as_deref(), Some(&b"compiled code"[..]));
        // Another guest's key never finds it.
        assert_eq!(cache.load(&key_of(b"another guest")), None);

        // Truncated, or one byte changed: removed, not returned.
        let path = cache.path(&key);
        let whole = fs::read(&path).unwrap();
        for damaged in [
            whole[..whole.len() - 1].to_vec(),
            whole[..10].to_vec(),
            {
                let mut w = whole.clone();
                *w.last_mut().unwrap() ^= 1;
                w
            },
            {
                let mut w = whole.clone();
                w[9] ^= 1; // the key
                w
            },
        ] {
            fs::write(&path, &damaged).unwrap();
            assert_eq!(cache.load(&key), None);
            assert!(!path.exists(), "a damaged entry was kept");
        }
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn a_folder_others_can_reach_is_refused() {
        let root = scratch("shared");
        fs::create_dir_all(&root).unwrap();
        fs::set_permissions(&root, fs::Permissions::from_mode(0o777)).unwrap();
        let e = DiskCache::open(&root, &Engine::default()).err().unwrap();
        assert_eq!(e.kind(), io::ErrorKind::PermissionDenied);
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn engines_with_other_settings_use_other_folders() {
        let root = scratch("engines");
        let a = DiskCache::open(&root, &Engine::default()).unwrap();
        let mut config = wasmtime::Config::new();
        config.epoch_interruption(true);
        let b = DiskCache::open(&root, &Engine::new(&config).unwrap()).unwrap();
        assert_ne!(a.dir(), b.dir());
        fs::remove_dir_all(&root).unwrap();
    }
}
