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
//! `repair`) do not use it, so a restore that succeeds from the cache says
//! nothing about storage: `check --read-data` does.
//!
//! A cache directory is trusted no more than it must be: its root and the
//! repository's directory must be the user's own and closed to others,
//! nothing in it is followed through a symlink, and only regular files of
//! the expected size are read, so a planted link, FIFO or huge file can
//! neither redirect a write or a removal nor hang or exhaust a command.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use bytes::Bytes;

use crate::id::storage_hash;

/// Repository caches not opened for this long are removed when another is
/// opened, as restic does: a repository given up should not keep its copies
/// for ever.
const UNUSED_FOR: Duration = Duration::from_secs(90 * 24 * 3600);

/// Marks the directory as a cache, so backup tools that honour the mark
/// (restic, Borg, tar with `--exclude-caches`) skip it:
/// https://bford.info/cachedir/
const CACHEDIR_TAG: &str = "Signature: 8a477f597d28d172789f06886806bc55\n\
# This file marks a cache directory created by backer.\n\
# For information about cache directory tags see https://bford.info/cachedir/\n";

/// In each repository's cache directory: what [`remove_unused`] looks for,
/// so a directory Backer did not make is never removed.
const MARKER: &str = "backer-cache";

/// The largest object read back when its size is not known beforehand.
const MAX_UNSIZED: u64 = 1 << 30;

/// Temporary files younger than this may still be being written by
/// another process sharing the cache.
const TEMP_GRACE: Duration = Duration::from_secs(600);

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
        if std::fs::symlink_metadata(&tag).is_err() {
            write_replacing(&tag, CACHEDIR_TAG.as_bytes())?;
        }
        let dir = root.join(repo_id);
        create_private_dir(&dir)?;
        let marker = dir.join(MARKER);
        if std::fs::symlink_metadata(&marker).is_err() {
            write_replacing(
                &marker,
                b"a cache of the Backer repository named by this directory\n",
            )?;
        }
        // Its time says when it was last used (see `remove_unused`); not
        // being able to say so is no reason to go without the cache.
        if let Err(e) = std::fs::File::open(&dir).and_then(|d| d.set_modified(SystemTime::now())) {
            tracing::debug!("failed to mark {} as used: {e}", dir.display());
        }
        remove_unused(root, repo_id);
        Ok(Cache {
            dir,
            warned: AtomicBool::new(false),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The cached copy of `name`, if there is one and it is intact; `size`
    /// is the object's size when known (any other is not read).
    pub fn get(&self, name: &str, size: Option<u64>) -> Option<Bytes> {
        if !cacheable(name) || !self.real_dirs_to(name) {
            return None;
        }
        let path = self.dir.join(name);
        let bytes = read_regular(&path, size.unwrap_or(MAX_UNSIZED), size.is_some())?;
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
        let written = path.parent().map_or(Ok(()), create_private_dir).and_then(|()| {
            if self.real_dirs_to(name) {
                write_replacing(&path, bytes)
            } else {
                Err(std::io::Error::other(
                    "a folder in it is not a directory (a symlink?)",
                ))
            }
        });
        if let Err(e) = written
            && !self.warned.swap(true, Ordering::Relaxed)
        {
            tracing::warn!(
                "failed to write to the cache {} ({e}); what is not in it is read from the repository",
                self.dir.display()
            );
        }
    }

    /// Whether every folder between the repository's directory and `name`
    /// is a directory, not a link to one elsewhere.
    fn real_dirs_to(&self, name: &str) -> bool {
        let mut at = self.dir.clone();
        let folders = name.split('/').collect::<Vec<_>>();
        folders[..folders.len().saturating_sub(1)].iter().all(|f| {
            at.push(f);
            std::fs::symlink_metadata(&at).is_ok_and(|m| m.file_type().is_dir())
        })
    }

    /// Removes the copies in `folder` (`index`, `snapshots` or `data`) of
    /// objects for which `keep` says no, given the object's name, and
    /// whatever else is there but a directory or another process's
    /// temporary file. Never follows a link: a link is removed itself.
    pub fn retain(&self, folder: &str, keep: impl Fn(&str) -> bool) {
        let entries = |dir: &Path| -> Vec<std::fs::DirEntry> {
            match std::fs::symlink_metadata(dir) {
                Ok(m) if m.file_type().is_dir() => std::fs::read_dir(dir)
                    .map(|r| r.flatten().collect())
                    .unwrap_or_default(),
                _ => Vec::new(),
            }
        };
        let mut files = Vec::new();
        for e in entries(&self.dir.join(folder)) {
            match e.file_type() {
                Ok(t) if t.is_dir() && folder == "data" => files.extend(entries(&e.path())),
                Ok(t) if t.is_dir() => {}
                _ => files.push(e),
            }
        }
        let now = SystemTime::now();
        for f in files {
            if f.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let path = f.path();
            let Ok(rel) = path.strip_prefix(&self.dir) else {
                continue;
            };
            let name = rel.to_string_lossy();
            if cacheable(&name) && keep(&name) {
                continue;
            }
            let fresh_temp = name.contains(".tmp-")
                && f.metadata()
                    .and_then(|m| m.modified())
                    .is_ok_and(|t| now.duration_since(t).unwrap_or_default() < TEMP_GRACE);
            if !fresh_temp {
                let _ = std::fs::remove_file(&path);
            }
        }
    }
}

/// Makes `dir` (0700) if missing, and makes sure it is a directory of this
/// user that no one else may write to: others could plant links in it.
fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    match std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    let m = std::fs::symlink_metadata(dir)?;
    let refuse = |why: &str| {
        Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!("{} {why}; give a private directory", dir.display()),
        ))
    };
    if !m.file_type().is_dir() {
        return refuse("is not a directory (a symlink?)");
    }
    if m.uid() != rustix::process::geteuid().as_raw() {
        return refuse("belongs to another user");
    }
    if m.mode() & 0o022 != 0 {
        return refuse("may be written by other users");
    }
    Ok(())
}

/// The content of `path` if it is a regular file (not followed through a
/// link) of at most `max` bytes, or exactly `max` when `exact`.
fn read_regular(path: &Path, max: u64, exact: bool) -> Option<Vec<u8>> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc_flags())
        .open(path)
        .ok()?;
    let m = file.metadata().ok()?;
    if !m.file_type().is_file() || m.len() > max || (exact && m.len() != max) {
        return None;
    }
    let mut bytes = Vec::with_capacity(m.len() as usize);
    file.take(max).read_to_end(&mut bytes).ok()?;
    Some(bytes)
}

/// `O_NOFOLLOW | O_NONBLOCK`: a link is not followed and a FIFO does not
/// block the open.
fn libc_flags() -> i32 {
    (rustix::fs::OFlags::NOFOLLOW | rustix::fs::OFlags::NONBLOCK).bits() as i32
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

/// Removes caches of other repositories not opened for [`UNUSED_FOR`]:
/// only directories holding the [`MARKER`], so a cache root given by mistake
/// (`--cache-dir ~`) loses nothing of anyone else's.
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
        let ours = e.file_type().is_ok_and(|t| t.is_dir())
            && std::fs::symlink_metadata(e.path().join(MARKER)).is_ok_and(|m| m.file_type().is_file());
        if old && ours {
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
        assert_eq!(c.get(&a, None).as_deref(), Some(&b"first"[..]));
        assert_eq!(c.get(&p, Some(4)).as_deref(), Some(&b"pack"[..]));

        // Bytes that do not match the name are never kept…
        let other = name_of("index", b"other");
        c.put(&other, b"not other");
        assert_eq!(c.get(&other, None), None);
        // …and a copy damaged on disk is dropped, not returned.
        std::fs::write(c.dir().join(&a), b"firsT").unwrap();
        assert_eq!(c.get(&a, None), None);
        assert!(!c.dir().join(&a).exists());

        // Names that are not objects' names never reach the file system.
        for bad in ["../x", "index/../../etc", "config", "keys/00", "data/zz/00"] {
            c.put(bad, b"x");
            assert_eq!(c.get(bad, None), None);
        }

        c.put(&a, b"first");
        c.retain("index", |_| false);
        c.retain("data", |n| n == p);
        assert_eq!(c.get(&a, None), None);
        assert!(c.get(&p, Some(4)).is_some());
    }

    #[test]
    fn removes_other_repositories_caches_unused_for_long() {
        let tmp = tempfile::tempdir().unwrap();
        let old = tmp.path().join("ffeeddccbbaa99887766554433221100");
        std::fs::create_dir_all(old.join("index")).unwrap();
        std::fs::write(old.join(MARKER), "").unwrap();
        // Named like a cache and as old, but not made by Backer: kept.
        let foreign = tmp.path().join("0000000000000000000000000000000f");
        std::fs::create_dir_all(&foreign).unwrap();
        let recent = tmp.path().join("0123456789abcdef0123456789abcdef");
        std::fs::create_dir_all(&recent).unwrap();
        let long_ago = SystemTime::now() - UNUSED_FOR - Duration::from_secs(3600);
        std::fs::File::open(&old).unwrap().set_modified(long_ago).unwrap();
        std::fs::File::open(&foreign)
            .unwrap()
            .set_modified(long_ago)
            .unwrap();
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
        assert!(foreign.exists(), "only directories Backer made are removed");
    }

    #[test]
    fn planted_links_fifos_and_huge_files_are_not_followed_read_or_written_through() {
        use std::os::unix::fs::{PermissionsExt, symlink};
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("cache");
        let id = "00112233445566778899aabbccddeeff";
        let c = Cache::open(&root, id).unwrap();
        // Someone else's files, and links to them planted in the cache.
        let victim = tmp.path().join("victim");
        std::fs::create_dir_all(victim.join("sub")).unwrap();
        std::fs::write(victim.join("notes.txt"), "mine").unwrap();
        std::fs::write(victim.join("sub/thesis.tex"), "mine too").unwrap();
        symlink(&victim, c.dir().join("snapshots")).unwrap();
        std::fs::create_dir_all(c.dir().join("data")).unwrap();
        symlink(victim.join("sub"), c.dir().join("data/ab")).unwrap();

        let snap = name_of("snapshots", b"snapshot");
        c.put(&snap, b"snapshot");
        assert_eq!(c.get(&snap, None), None);
        c.retain("snapshots", |_| false);
        c.retain("data", |_| false);
        let mut left: Vec<_> = std::fs::read_dir(&victim)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        left.sort();
        assert_eq!(
            left,
            ["notes.txt", "sub"],
            "nothing written or removed through a link"
        );
        assert!(victim.join("sub/thesis.tex").exists());

        // A FIFO does not block a read; a file larger than the object's
        // size is not read.
        let idx = name_of("index", b"index");
        std::fs::create_dir_all(c.dir().join("index")).unwrap();
        rustix::fs::mknodat(
            rustix::fs::CWD,
            c.dir().join(&idx),
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        assert_eq!(c.get(&idx, None), None);
        std::fs::remove_file(c.dir().join(&idx)).unwrap();
        c.put(&idx, b"index");
        assert_eq!(c.get(&idx, Some(4)), None, "not the size the repository says");
        assert!(c.get(&idx, Some(5)).is_some());

        // A root others may write to is refused.
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = Cache::open(&root, id).unwrap_err();
        assert!(err.to_string().contains("may be written by other users"), "{err}");
    }

    #[test]
    fn refuses_an_id_that_is_not_one() {
        let tmp = tempfile::tempdir().unwrap();
        assert!(Cache::open(tmp.path(), "../../etc").is_err());
    }
}
