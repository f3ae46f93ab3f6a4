//! Trees: one per directory, listing its entries with full metadata. Names and
//! symlink targets are bytes, kept exactly as the file system gave them.

use serde::{Deserialize, Serialize};

use crate::id::BlobId;

#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeKind {
    File,
    Dir,
    Symlink,
    Fifo,
    CharDevice,
    BlockDevice,
    Socket,
}

/// Seconds and nanoseconds since the Unix epoch.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Time {
    pub secs: i64,
    pub nanos: u32,
}

/// A run of a file's bytes: a chunk, or a hole of a sparse file.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Extent {
    Data { id: BlobId, len: u32 },
    Hole { len: u64 },
}

impl Extent {
    pub fn len(&self) -> u64 {
        match self {
            Extent::Data { len, .. } => u64::from(*len),
            Extent::Hole { len } => *len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Node {
    #[serde(with = "serde_bytes")]
    pub name: Vec<u8>,
    pub kind: NodeKind,
    /// Permission bits, setuid/setgid/sticky included (no file type bits).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub mtime: Time,
    pub atime: Time,
    pub ctime: Time,
    pub inode: u64,
    pub dev: u64,
    pub nlink: u64,
    pub rdev: u64,
    pub link_target: Option<serde_bytes::ByteBuf>,
    pub xattrs: Vec<Xattr>,
    pub content: Vec<Extent>,
    pub subtree: Option<BlobId>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Xattr {
    #[serde(with = "serde_bytes")]
    pub name: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub value: Vec<u8>,
}

/// A directory's entries, sorted by name bytes.
#[derive(Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq)]
pub struct Tree {
    pub nodes: Vec<Node>,
}

impl Tree {
    pub fn find(&self, name: &[u8]) -> Option<&Node> {
        self.nodes
            .binary_search_by(|n| n.name.as_slice().cmp(name))
            .ok()
            .map(|i| &self.nodes[i])
    }
}

impl Node {
    pub fn name_lossy(&self) -> String {
        String::from_utf8_lossy(&self.name).into_owned()
    }

    /// A name that is safe to create inside a directory: not empty, not `.` or
    /// `..`, no `/` and no NUL. Anything else in a tree is hostile or corrupt.
    pub fn has_safe_name(&self) -> bool {
        !self.name.is_empty()
            && self.name != b"."
            && self.name != b".."
            && !self.name.contains(&b'/')
            && !self.name.contains(&0)
    }

    /// Short `ls -l`-style type and permission string.
    pub fn mode_string(&self) -> String {
        let t = match self.kind {
            NodeKind::File => '-',
            NodeKind::Dir => 'd',
            NodeKind::Symlink => 'l',
            NodeKind::Fifo => 'p',
            NodeKind::CharDevice => 'c',
            NodeKind::BlockDevice => 'b',
            NodeKind::Socket => 's',
        };
        let mut s = String::with_capacity(10);
        s.push(t);
        for (i, c) in "rwxrwxrwx".chars().enumerate() {
            s.push(if self.mode & (1 << (8 - i)) != 0 { c } else { '-' });
        }
        s
    }
}

impl Tree {
    /// The bytes a tree blob holds (before compression), as stored.
    pub fn to_bytes(&self) -> crate::Result<Vec<u8>> {
        crate::repository::encode(self)
    }

    /// A tree from the bytes of a tree blob; `what` names it in errors.
    pub fn from_bytes(bytes: &[u8], what: &str) -> crate::Result<Tree> {
        crate::repository::decode(bytes, what)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &[u8]) -> Node {
        Node {
            name: name.to_vec(),
            kind: NodeKind::File,
            mode: 0o644,
            uid: 0,
            gid: 0,
            size: 0,
            mtime: Time::default(),
            atime: Time::default(),
            ctime: Time::default(),
            inode: 0,
            dev: 0,
            nlink: 1,
            rdev: 0,
            link_target: None,
            xattrs: vec![],
            content: vec![],
            subtree: None,
        }
    }

    #[test]
    fn names_and_lookup() {
        for bad in [&b""[..], b".", b"..", b"a/b", b"a\0"] {
            assert!(!node(bad).has_safe_name(), "{bad:?}");
        }
        assert!(node(b"\xff\xfe not utf8").has_safe_name());
        let t = Tree {
            nodes: vec![node(b"a"), node(b"b"), node(b"c")],
        };
        assert!(t.find(b"b").is_some());
        assert!(t.find(b"d").is_none());
        let enc = postcard::to_stdvec(&t).unwrap();
        assert_eq!(postcard::from_bytes::<Tree>(&enc).unwrap(), t);
        assert_eq!(node(b"x").mode_string(), "-rw-r--r--");
    }
}
