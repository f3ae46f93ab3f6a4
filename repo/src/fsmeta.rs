//! File metadata between the file system and [`Node`]s: read on backup, applied
//! on restore. Everything here works on paths without following a final
//! symlink, or on already-opened descriptors.

use std::fs::{File, Metadata};
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use rustix::fs::{AtFlags, Gid, Mode, Timespec, Timestamps, Uid};

use crate::tree::{Node, NodeKind, Time, Xattr};

/// Builds a node from `lstat` data. Content, subtree and link target are
/// filled in by the caller.
pub fn node_from_metadata(name: Vec<u8>, md: &Metadata) -> Node {
    let ft = md.file_type();
    let kind = if ft.is_file() {
        NodeKind::File
    } else if ft.is_dir() {
        NodeKind::Dir
    } else if ft.is_symlink() {
        NodeKind::Symlink
    } else if ft.is_fifo() {
        NodeKind::Fifo
    } else if ft.is_char_device() {
        NodeKind::CharDevice
    } else if ft.is_block_device() {
        NodeKind::BlockDevice
    } else {
        NodeKind::Socket
    };
    Node {
        name,
        kind,
        mode: md.mode() & 0o7777,
        uid: md.uid(),
        gid: md.gid(),
        size: if kind == NodeKind::File { md.size() } else { 0 },
        mtime: Time {
            secs: md.mtime(),
            nanos: md.mtime_nsec() as u32,
        },
        atime: Time {
            secs: md.atime(),
            nanos: md.atime_nsec() as u32,
        },
        ctime: Time {
            secs: md.ctime(),
            nanos: md.ctime_nsec() as u32,
        },
        inode: md.ino(),
        dev: md.dev(),
        nlink: md.nlink(),
        rdev: md.rdev(),
        link_target: None,
        xattrs: Vec::new(),
        content: Vec::new(),
        subtree: None,
    }
}

/// Extended attributes of `path` (not following a symlink). File systems
/// without xattr support give an empty list.
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

fn timestamps(node: &Node) -> Timestamps {
    Timestamps {
        last_access: ts(node.atime),
        last_modification: ts(node.mtime),
    }
}

/// True when restored files should get their recorded owners.
pub fn can_chown() -> bool {
    rustix::process::geteuid().is_root()
}

/// Applies owner, mode, xattrs and times to an open file or directory.
/// Owner first: chown clears setuid bits that the mode then sets again.
pub fn apply_to_fd(fd: impl AsFd, node: &Node, xattr_errors: &mut Vec<String>) -> io::Result<()> {
    let fd = fd.as_fd();
    if can_chown() {
        rustix::fs::fchown(fd, Some(Uid::from_raw(node.uid)), Some(Gid::from_raw(node.gid)))?;
    }
    rustix::fs::fchmod(fd, Mode::from_raw_mode(node.mode))?;
    for x in &node.xattrs {
        if let Err(e) =
            rustix::fs::fsetxattr(fd, x.name.as_slice(), &x.value, rustix::fs::XattrFlags::empty())
        {
            xattr_errors.push(format!("xattr {}: {e}", String::from_utf8_lossy(&x.name)));
        }
    }
    rustix::fs::futimens(fd, &timestamps(node))?;
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
        rustix::fs::chmodat(dir, name, Mode::from_raw_mode(node.mode), AtFlags::empty())?;
    }
    rustix::fs::utimensat(dir, name, &timestamps(node), AtFlags::SYMLINK_NOFOLLOW)?;
    Ok(())
}
