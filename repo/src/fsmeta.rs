//! File metadata between the file system and [`Node`]s: read on backup, applied
//! on restore. Everything here works on paths without following a final
//! symlink, or on already-opened descriptors.

use std::ffi::OsStr;
use std::fs::{File, Metadata};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use rustix::fs::{AtFlags, FileType, Gid, Mode, OFlags, Stat, Timespec, Timestamps, Uid};

use crate::tree::{Node, NodeKind, Time, Xattr};

/// Stack for the threads that walk a tree (backup and restore): they recurse
/// once per directory level, [`MAX_DEPTH`] levels at most, about 18 KiB a
/// level in a debug build (a few in a release build). Only what is touched
/// is ever allocated.
pub const WALK_STACK: usize = 128 << 20;

/// Directory levels a backup reads and a restore writes at most. Far beyond
/// real trees (and twice what paths allow with one-letter names), yet well
/// inside [`WALK_STACK`], so a hostile tree is refused, not a crash.
pub const MAX_DEPTH: usize = 4096;

/// Builds a node from `lstat` data. Content, subtree and link target are
/// filled in by the caller.
// The field types of `Stat` differ between architectures: the casts are
// needed on some and no-ops on others.
#[allow(clippy::unnecessary_cast)]
pub fn node_from_stat(name: Vec<u8>, st: &Stat) -> Node {
    let kind = match FileType::from_raw_mode(st.st_mode) {
        FileType::RegularFile => NodeKind::File,
        FileType::Directory => NodeKind::Dir,
        FileType::Symlink => NodeKind::Symlink,
        FileType::Fifo => NodeKind::Fifo,
        FileType::CharacterDevice => NodeKind::CharDevice,
        FileType::BlockDevice => NodeKind::BlockDevice,
        _ => NodeKind::Socket,
    };
    Node {
        name,
        kind,
        mode: st.st_mode as u32 & 0o7777,
        uid: st.st_uid as u32,
        gid: st.st_gid as u32,
        size: if kind == NodeKind::File {
            st.st_size as u64
        } else {
            0
        },
        mtime: Time {
            secs: st.st_mtime as i64,
            nanos: st.st_mtime_nsec as u32,
        },
        atime: Time {
            secs: st.st_atime as i64,
            nanos: st.st_atime_nsec as u32,
        },
        ctime: Time {
            secs: st.st_ctime as i64,
            nanos: st.st_ctime_nsec as u32,
        },
        inode: st.st_ino as u64,
        dev: st.st_dev as u64,
        nlink: st.st_nlink as u64,
        rdev: st.st_rdev as u64,
        link_target: None,
        xattrs: Vec::new(),
        content: Vec::new(),
        subtree: None,
    }
}

/// True when `/proc/self/fd/N/` reaches the open directory N: /proc is not
/// mounted in every container, nor readable by every process.
fn proc_fd_works() -> bool {
    static WORKS: OnceLock<bool> = OnceLock::new();
    *WORKS.get_or_init(|| {
        let Ok(root) = rustix::fs::open("/", OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty()) else {
            return false;
        };
        let via_proc = format!("/proc/self/fd/{}/", root.as_raw_fd());
        matches!(
            (rustix::fs::stat(via_proc.as_str()), rustix::fs::fstat(&root)),
            (Ok(a), Ok(b)) if a.st_dev == b.st_dev && a.st_ino == b.st_ino
        )
    })
}

/// Extended attributes of the entry `name` of the open directory `dir`, not
/// following a final symlink. Read through `/proc/self/fd`, so the directory
/// is the one opened whatever was renamed above it, and however long its
/// path; through `path` where /proc is missing.
pub fn read_xattrs_at(dir: BorrowedFd<'_>, name: &[u8], path: &Path) -> io::Result<Vec<Xattr>> {
    if proc_fd_works() {
        let at = PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd())).join(OsStr::from_bytes(name));
        read_xattrs(&at)
    } else {
        read_xattrs(path)
    }
}

/// Extended attributes of `path` (not following a final symlink). File
/// systems without xattr support give an empty list.
pub fn read_xattrs(path: &Path) -> io::Result<Vec<Xattr>> {
    let names = match xattr::list(path) {
        Ok(n) => n,
        Err(e) if e.raw_os_error() == Some(rustix::io::Errno::OPNOTSUPP.raw_os_error()) => {
            return Ok(Vec::new());
        }
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for name in names {
        if let Some(value) = xattr::get(path, &name)? {
            out.push(Xattr {
                name: std::os::unix::ffi::OsStrExt::as_bytes(name.as_os_str()).to_vec(),
                value,
            });
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// The data regions of a file as `(offset, length)`, using SEEK_DATA and
/// SEEK_HOLE so that a sparse file's holes are never read. `None` when the
/// file is not sparse (read it straight through).
pub fn data_regions(file: &File, md: &Metadata) -> io::Result<Option<Vec<(u64, u64)>>> {
    let size = md.size();
    if size == 0 || md.blocks() * 512 >= size {
        return Ok(None);
    }
    let mut regions = Vec::new();
    let mut pos = 0u64;
    while pos < size {
        let start = match rustix::fs::seek(file, rustix::fs::SeekFrom::Data(pos)) {
            Ok(s) => s,
            Err(rustix::io::Errno::NXIO) => break,
            Err(rustix::io::Errno::INVAL) => return Ok(None), // not supported here
            Err(e) => return Err(e.into()),
        };
        if start >= size {
            break;
        }
        let end = rustix::fs::seek(file, rustix::fs::SeekFrom::Hole(start))?.min(size);
        regions.push((start, end - start));
        pos = end;
    }
    rustix::fs::seek(file, rustix::fs::SeekFrom::Start(0))?;
    Ok(Some(regions))
}

fn ts(t: Time) -> Timespec {
    Timespec {
        tv_sec: t.secs,
        tv_nsec: i64::from(t.nanos),
    }
}

fn timestamps(atime: Time, mtime: Time) -> Timestamps {
    Timestamps {
        last_access: ts(atime),
        last_modification: ts(mtime),
    }
}

/// What a restore sets on an opened file or directory once it is written:
/// the part of its [`Node`] kept while its content arrives (a restore holds
/// one for every file of a batch).
#[derive(Debug)]
pub struct Meta {
    pub uid: u32,
    pub gid: u32,
    pub mode: u32,
    pub atime: Time,
    pub mtime: Time,
    pub xattrs: Box<[Xattr]>,
}

impl Meta {
    pub fn of(node: &mut Node) -> Meta {
        Meta {
            uid: node.uid,
            gid: node.gid,
            mode: node.mode,
            atime: node.atime,
            mtime: node.mtime,
            xattrs: std::mem::take(&mut node.xattrs).into_boxed_slice(),
        }
    }
}

/// True when restored files should get their recorded owners.
pub fn can_chown() -> bool {
    rustix::process::geteuid().is_root()
}

/// Applies owner, mode, xattrs and times to an open file or directory.
/// Owner first: chown clears setuid bits that the mode then sets again.
pub fn apply_to_fd(fd: impl AsFd, meta: &Meta, xattr_errors: &mut Vec<String>) -> io::Result<()> {
    let fd = fd.as_fd();
    if can_chown() {
        rustix::fs::fchown(fd, Some(Uid::from_raw(meta.uid)), Some(Gid::from_raw(meta.gid)))?;
    }
    rustix::fs::fchmod(fd, Mode::from_raw_mode(meta.mode))?;
    for x in &meta.xattrs {
        if let Err(e) =
            rustix::fs::fsetxattr(fd, x.name.as_slice(), &x.value, rustix::fs::XattrFlags::empty())
        {
            xattr_errors.push(format!("xattr {}: {e}", String::from_utf8_lossy(&x.name)));
        }
    }
    rustix::fs::futimens(fd, &timestamps(meta.atime, meta.mtime))?;
    Ok(())
}

/// Changes the mode of `name` in `dir`, refusing a symlink found there:
/// `chmodat` would follow one put at that name meanwhile, and Linux has no
/// non-following one before `fchmodat2` (6.6). So the entry is opened as a
/// path, checked, and changed through its descriptor's /proc name.
fn chmod_nofollow(dir: BorrowedFd<'_>, name: &[u8], mode: u32) -> io::Result<()> {
    let fd = rustix::fs::openat(
        dir,
        name,
        OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    if FileType::from_raw_mode(rustix::fs::fstat(&fd)?.st_mode) == FileType::Symlink {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "it was replaced by a symlink; its mode is not set",
        ));
    }
    let by_fd = format!("/proc/self/fd/{}", fd.as_raw_fd());
    rustix::fs::chmodat(
        rustix::fs::CWD,
        by_fd.as_str(),
        Mode::from_raw_mode(mode),
        AtFlags::empty(),
    )?;
    Ok(())
}

/// Applies owner and times to an entry that cannot be opened (a symlink, a
/// device, a fifo), without following it.
pub fn apply_at(dir: impl AsFd, node: &Node) -> io::Result<()> {
    let dir = dir.as_fd();
    let name = node.name.as_slice();
    if can_chown() {
        rustix::fs::chownat(
            dir,
            name,
            Some(Uid::from_raw(node.uid)),
            Some(Gid::from_raw(node.gid)),
            AtFlags::SYMLINK_NOFOLLOW,
        )?;
    }
    if node.kind != NodeKind::Symlink {
        chmod_nofollow(dir, name, node.mode)?;
    }
    rustix::fs::utimensat(
        dir,
        name,
        &timestamps(node.atime, node.mtime),
        AtFlags::SYMLINK_NOFOLLOW,
    )?;
    Ok(())
}

/// Walks and restores hold a descriptor per directory level (and a restore
/// one per file of a batch); lift the soft limit to the hard one so deep
/// trees do not run out. Returns the limit now in force.
pub fn raise_fd_limit() -> u64 {
    let lim = rustix::process::getrlimit(rustix::process::Resource::Nofile);
    if lim.current < lim.maximum {
        let _ = rustix::process::setrlimit(
            rustix::process::Resource::Nofile,
            rustix::process::Rlimit {
                current: lim.maximum,
                maximum: lim.maximum,
            },
        );
    }
    rustix::process::getrlimit(rustix::process::Resource::Nofile)
        .current
        .unwrap_or(1024)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn a_mode_is_never_set_through_a_symlink() {
        let tmp = tempfile::tempdir().unwrap();
        let victim = tmp.path().join("victim");
        std::fs::write(&victim, b"x").unwrap();
        std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o600)).unwrap();
        // A fifo the restore made, replaced by a symlink before its mode is set.
        std::os::unix::fs::symlink(&victim, tmp.path().join("p")).unwrap();
        let dir = File::open(tmp.path()).unwrap();
        let err = chmod_nofollow(dir.as_fd(), b"p", 0o666).unwrap_err();
        assert!(err.to_string().contains("replaced by a symlink"), "{err}");
        let mode = std::fs::metadata(&victim).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);

        rustix::fs::mknodat(dir.as_fd(), "q", FileType::Fifo, Mode::from_raw_mode(0o600), 0).unwrap();
        chmod_nofollow(dir.as_fd(), b"q", 0o640).unwrap();
        let mode = std::fs::symlink_metadata(tmp.path().join("q"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o640);
    }
}
