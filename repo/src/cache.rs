//! A local copy of what every command re-reads from a remote repository:
//! index files, snapshot files and tree packs. Over a network each costs a
//! round trip or more, and an unchanged re-run would otherwise fetch the
//! parent's trees again.
//!
//! Everything kept is an object exactly as stored (sealed, so the cache
//! holds nothing a reader of the repository could not see), under
//! `<root>/<repository id>/<object name>`. Every object is named by the hash
//! of its bytes, so a cached copy is checked on each read and a damaged one
//! is dropped and fetched again. Copies of objects the repository no longer
//! lists are removed when the listing is next read. The cache is never
//! needed: a failure to read or write it is logged and the repository is
//! used instead. Commands that must see storage as it is (`check`,
//! `repair`) do not use it.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use bytes::Bytes;

use crate::id::storage_hash;

/// Repository caches not opened for this long are removed when another is
/// opened, as restic does: a repository given up should not keep its copies
/// for ever.
const UNUSED_FOR: Duration = Duration::from_secs(90 * 24 * 3600);

/// Marks the directory as a cache for backup tools (and for Backer's own
/// backups) so its contents are not backed up: https://bford.info/cachedir/
const CACHEDIR_TAG: &str = "Signature: 8a477f597d28d172789f06886806bc55\n\
# This file marks a cache directory created by backer.\n\
# For information about cache directory tags see https://bford.info/cachedir/\n";

#[derive(Debug)]
pub struct Cache {
    /// `<root>/<repository id>`.
    dir: PathBuf,
    /// Whether a failure to write was already reported (once is enough).
    warned: AtomicBool,
}

/// Where caches go unless told otherwise: `$XDG_CACHE_HOME/backer`, else
/// `~/.cache/backer`.
pub fn default_root() -> Option<PathBuf> {
    let set = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    set("XDG_CACHE_HOME")
        .filter(|p| p.is_absolute())
        .map(|p| p.join("backer"))
        .or_else(|| set("HOME").map(|h| h.join(".cache/backer")))
}

/// Whether `name` is a name this cache keeps: `index/<id>`, `snapshots/<id>`
/// or `data/<xx>/<id>`, ids in lower-case hex, so no name can leave the
/// cache directory.
fn cacheable(name: &str) -> bool {
    let hex = |s: &str| {
        s.len() == 64
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    match name.split('/').collect::<Vec<_>>()[..] {
        ["index" | "snapshots", id] => hex(id),
        ["data", prefix, id] => hex(id) && id.starts_with(prefix) && prefix.len() == 2,
        _ => false,
    }
}

impl Cache {
    /// The cache of repository `repo_id` under `root`, made if missing.
    /// Also removes other repositories' caches left unused for long.
    pub fn open(root: &Path, repo_id: &str) -> std::io::Result<Cache> {
        if repo_id.len() < 16 || !repo_id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("the repository id {repo_id:?} is not one"),
            ));
        }
        create_private_dir(root)?;
        let tag = root.join("CACHEDIR.TAG");
        if !tag.exists() {
            write_replacing(&tag, CACHEDIR_TAG.as_bytes())?;
        }
        let dir = root.join(repo_id);
        create_private_dir(&dir)?;
        // Its time says when it was last used (see `remove_unused`).
        std::fs::File::open(&dir)?.set_modified(SystemTime::now())?;
        remove_unused(root, repo_id);
        Ok(Cache {
            dir,
            warned: AtomicBool::new(false),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The cached copy of `name`, if there is one and it is intact.
    pub fn get(&self, name: &str) -> Option<Bytes> {
        if !cacheable(name) {
            return None;
        }
        let path = self.dir.join(name);
        let bytes = std::fs::read(&path).ok()?;
        let id = name.rsplit('/').next().unwrap_or_default();
        if hex::encode(storage_hash(&bytes)) != id {
            tracing::warn!(
                "the cached copy of {name} in {} is damaged; removed, it is read from the repository",
                self.dir.display()
            );
            let _ = std::fs::remove_file(&path);
            return None;
        }
        Some(Bytes::from(bytes))
    }

    /// Keeps a copy of `name`, which holds `bytes` (checked against its
    /// name: a copy that would fail every read is not written).
    pub fn put(&self, name: &str, bytes: &[u8]) {
        let id = name.rsplit('/').next().unwrap_or_default();
        if !cacheable(name) || hex::encode(storage_hash(bytes)) != id {
            return;
        }
        let path = self.dir.join(name);
        let written = path
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|()| write_replacing(&path, bytes));
        if let Err(e) = written
            && !self.warned.swap(true, Ordering::Relaxed)
        {
            tracing::warn!(
                "failed to write to the cache {} ({e}); carrying on without it",
                self.dir.display()
            );
        }
    }

    /// Removes the copies in `folder` (`index`, `snapshots` or `data`) of
    /// objects for which `keep` says no, given the object's name.
    pub fn retain(&self, folder: &str, keep: impl Fn(&str) -> bool) {
        let top = self.dir.join(folder);
        let Ok(entries) = std::fs::read_dir(&top) else {
            return;
        };
        let mut files = Vec::new();
        for e in entries.flatten() {
            let p = e.path();
            if folder == "data" {
                if let Ok(inner) = std::fs::read_dir(&p) {
                    files.extend(inner.flatten().map(|e| e.path()));
                }
            } else {
                files.push(p);
            }
        }
        for f in files {
            let Ok(rel) = f.strip_prefix(&self.dir) else {
                continue;
            };
            let name = rel.to_string_lossy();
            if !cacheable(&name) || !keep(&name) {
                let _ = std::fs::remove_file(&f);
            }
        }
    }
}

fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    match std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}

/// Writes `path` whole or not at all: another process reading the cache
/// meanwhile sees the old file or the new one, never a part.
fn write_replacing(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut salt = [0u8; 8];
    crate::crypto::random_fill(&mut salt);
    let tmp = path.with_extension(format!("tmp-{}", hex::encode(salt)));
    std::fs::write(&tmp, bytes)
        .and_then(|()| std::fs::rename(&tmp, path))
        .inspect_err(|_| {
            let _ = std::fs::remove_file(&tmp);
        })
}

/// Removes caches of other repositories not opened for [`UNUSED_FOR`].
fn remove_unused(root: &Path, current: &str) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    let now = SystemTime::now();
    for e in entries.flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy();
        if name == current || name.len() < 16 || !name.bytes().all(|b| b.is_ascii_hexdigit()) {
            continue;
        }
        let old = e
            .metadata()
            .and_then(|m| m.modified())
            .is_ok_and(|t| now.duration_since(t).is_ok_and(|age| age > UNUSED_FOR));
        if old && e.path().is_dir() {
            tracing::info!("removing the cache {}: unused for 90 days", e.path().display());
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn name_of(dir: &str, bytes: &[u8]) -> String {
        let id = hex::encode(storage_hash(bytes));
        match dir {
            "data" => format!("data/{}/{id}", &id[..2]),
            d => format!("{d}/{id}"),
        }
    }

    #[test]
    fn keeps_checks_and_drops_copies() {
        let tmp = tempfile::tempdir().unwrap();
        let c = Cache::open(tmp.path(), "00112233445566778899aabbccddeeff").unwrap();
        assert!(tmp.path().join("CACHEDIR.TAG").exists());
        let a = name_of("index", b"first");
        let p = name_of("data", b"pack");
        c.put(&a, b"first");
        c.put(&p, b"pack");
        assert_eq!(c.get(&a).as_deref(), Some(&b"first"[..]));
        assert_eq!(c.get(&p).as_deref(), Some(&b"pack"[..]));

        // Bytes that do not match the name are never kept…
        let other = name_of("index", b"other");
        c.put(&other, b"not other");
        assert_eq!(c.get(&other), None);
        // …and a copy damaged on disk is dropped, not returned.
        std::fs::write(c.dir().join(&a), b"firsT").unwrap();
        assert_eq!(c.get(&a), None);
        assert!(!c.dir().join(&a).exists());

        // Names that are not objects' names never reach the file system.
        for bad in ["../x", "index/../../etc", "config", "keys/00", "data/zz/00"] {
            c.put(bad, b"x");
            assert_eq!(c.get(bad), None);
        }

        c.put(&a, b"first");
        c.retain("index", |_| false);
        c.retain("data", |n| n == p);
        assert_eq!(c.get(&a), None);
        assert!(c.get(&p).is_some());
    }

    #[test]
    fn removes_other_repositories_caches_unused_for_long() {
        let tmp = tempfile::tempdir().unwrap();
        let old = tmp.path().join("ffeeddccbbaa99887766554433221100");
        std::fs::create_dir_all(old.join("index")).unwrap();
        let recent = tmp.path().join("0123456789abcdef0123456789abcdef");
        std::fs::create_dir_all(&recent).unwrap();
        let long_ago = SystemTime::now() - UNUSED_FOR - Duration::from_secs(3600);
        std::fs::File::open(&old).unwrap().set_modified(long_ago).unwrap();
        let unrelated = tmp.path().join("notes");
        std::fs::create_dir_all(&unrelated).unwrap();
        std::fs::File::open(&unrelated)
            .unwrap()
            .set_modified(long_ago)
            .unwrap();

        Cache::open(tmp.path(), "00112233445566778899aabbccddeeff").unwrap();
        assert!(!old.exists());
        assert!(recent.exists());
        assert!(unrelated.exists(), "only repository caches are removed");
    }

    #[test]
    fn refuses_an_id_that_is_not_one() {
        let tmp = tempfile::tempdir().unwrap();
        assert!(Cache::open(tmp.path(), "../../etc").is_err());
    }
}
