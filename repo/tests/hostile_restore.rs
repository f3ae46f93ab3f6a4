//! Restore never writes outside its target, whatever a snapshot holds and
//! whatever is planted in the target.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use backer_repo::Repository;
use backer_repo::pack::BlobType;
use backer_repo::packer::store_blobs;
use backer_repo::restorer::{RestoreOptions, RestoreProgress, restore};
use backer_repo::snapshot::Snapshot;
use backer_repo::tree::{Node, NodeKind, Time, Tree};
use backer_repo::{Backend, id::BlobId};

mod common;
use common::{cheap, snapshot_of_tree};

fn node(name: &[u8], kind: NodeKind) -> Node {
    Node {
        name: name.to_vec(),
        kind,
        mode: if kind == NodeKind::Dir { 0o755 } else { 0o644 },
        uid: 0,
        gid: 0,
        size: 0,
        mtime: Time {
            secs: 1_600_000_000,
            nanos: 0,
        },
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

fn encode(t: &Tree) -> Vec<u8> {
    postcard::to_stdvec(t).unwrap()
}

async fn snapshot_of(repo: &mut Repository, root_nodes: Vec<Node>) -> Snapshot {
    let ids = store_blobs(repo, vec![(BlobType::Tree, encode(&Tree { nodes: root_nodes }))])
        .await
        .unwrap();
    snapshot_of_tree(ids[0])
}

async fn subtree(repo: &mut Repository, nodes: Vec<Node>) -> BlobId {
    store_blobs(repo, vec![(BlobType::Tree, encode(&Tree { nodes }))])
        .await
        .unwrap()[0]
}

fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_names_and_symlinks_never_escape() {
    let tmp = tempfile::tempdir().unwrap();
    let outside = tmp.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    let target = tmp.path().join("target");
    let mut repo = Repository::init(Backend::in_memory(), b"pw", cheap())
        .await
        .unwrap();

    // A directory whose tree tries `..`, absolute and slashed names.
    // Its file is hard-linked (same dev and inode) to `linked` at the top:
    // were the restore to link to wherever the first copy went, `linked`
    // would be a way out.
    let hardlinked = |name: &[u8]| {
        let mut f = node(name, NodeKind::File);
        f.size = 0;
        f.dev = 7;
        f.inode = 7;
        f.nlink = 2;
        f
    };
    let evil_child = hardlinked(b"pwned");
    let evil_sub = subtree(&mut repo, vec![evil_child]).await;
    let mut dotdot = node(b"..", NodeKind::Dir);
    dotdot.subtree = Some(evil_sub);
    let mut slashed = node(b"a/../../b", NodeKind::File);
    slashed.size = 0;
    let mut absolute = node(b"/etc/passwd-copy", NodeKind::File);
    absolute.size = 0;
    let mut empty = node(b"", NodeKind::File);
    empty.size = 0;
    let mut nul = node(b"x\0y", NodeKind::File);
    nul.size = 0;
    // A symlink pointing outside, then a directory of the same name whose
    // content would land outside if the restore followed the link.
    let mut link = node(b"escape", NodeKind::Symlink);
    link.link_target = Some(serde_bytes::ByteBuf::from(
        outside.as_os_str().as_encoded_bytes().to_vec(),
    ));
    let mut through = node(b"escape", NodeKind::Dir);
    through.subtree = Some(evil_sub);
    let fine = node(b"fine", NodeKind::File);
    let linked = hardlinked(b"linked");
    let snap = snapshot_of(
        &mut repo,
        vec![dotdot, slashed, absolute, empty, nul, link, through, fine, linked],
    )
    .await;

    let opts = RestoreOptions {
        target: target.clone(),
        ..Default::default()
    };
    let out = restore(&repo, &snap, &opts, Default::default()).await.unwrap();

    assert_eq!(
        entries(&outside),
        Vec::<String>::new(),
        "something was written outside the target"
    );
    assert!(!tmp.path().join("pwned").exists());
    assert!(!tmp.path().join("b").exists());
    assert_eq!(entries(&target), vec!["escape", "fine", "linked"]);
    let linked = std::fs::symlink_metadata(target.join("linked")).unwrap();
    assert!(linked.is_file(), "the hard link became a file of its own");
    assert_eq!(std::os::unix::fs::MetadataExt::nlink(&linked), 1);
    assert!(
        std::fs::symlink_metadata(target.join("escape"))
            .unwrap()
            .is_symlink()
    );
    let joined = out.errors.join("\n");
    for expected in [
        "unsafe name \"..\"",
        "unsafe name \"a/../../b\"",
        "unsafe name \"/etc/passwd-copy\"",
        "unsafe name \"\"",
        "unsafe name \"x\\0y\"",
        "refused /escape",
    ] {
        assert!(
            joined.contains(expected),
            "missing refusal {expected:?} in:\n{joined}"
        );
    }
    backer_testkit::figures(
        "hostile_restore",
        format!(
            "9 crafted entries, {} refused with a reason, 0 bytes written outside the target",
            out.errors.len()
        ),
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn planted_symlink_in_target_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let outside = tmp.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    let target = tmp.path().join("target");
    std::fs::create_dir(&target).unwrap();
    // Someone planted `target/data -> outside` before the restore.
    std::os::unix::fs::symlink(&outside, target.join("data")).unwrap();
    let mut repo = Repository::init(Backend::in_memory(), b"pw", cheap())
        .await
        .unwrap();
    let sub = subtree(&mut repo, vec![node(b"secret.txt", NodeKind::File)]).await;
    let mut data = node(b"data", NodeKind::Dir);
    data.subtree = Some(sub);
    let snap = snapshot_of(&mut repo, vec![data]).await;

    let out = restore(
        &repo,
        &snap,
        &RestoreOptions {
            target: target.clone(),
            overwrite: true,
            ..Default::default()
        },
        Default::default(),
    )
    .await
    .unwrap();
    assert_eq!(entries(&outside), Vec::<String>::new());
    assert!(
        out.errors.iter().any(|e| e.contains("refused /data")),
        "{:?}",
        out.errors
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn device_nodes_need_root() {
    let tmp = tempfile::tempdir().unwrap();
    let target = tmp.path().join("target");
    let mut repo = Repository::init(Backend::in_memory(), b"pw", cheap())
        .await
        .unwrap();
    let mut dev = node(b"null", NodeKind::CharDevice);
    dev.rdev = rustix::fs::makedev(1, 3);
    let snap = snapshot_of(&mut repo, vec![dev]).await;
    let _ = RestoreProgress::default();
    let out = restore(
        &repo,
        &snap,
        &RestoreOptions {
            target: target.clone(),
            ..Default::default()
        },
        Default::default(),
    )
    .await
    .unwrap();
    if backer_testkit::is_root() {
        assert!(out.errors.is_empty(), "{:?}", out.errors);
        assert!(std::os::unix::fs::FileTypeExt::is_char_device(
            &std::fs::symlink_metadata(target.join("null"))
                .unwrap()
                .file_type()
        ));
    } else {
        assert!(
            out.errors.iter().any(|e| e.contains("needs root")),
            "{:?}",
            out.errors
        );
    }
}

/// A source that, before it hands out any content, does what a hostile
/// user of the target could do to files the restore created and then
/// closed to stay within its descriptor budget.
struct Swapping<'a> {
    inner: backer_repo::store::LocalStore<'a>,
    dir: std::path::PathBuf,
}

impl backer_repo::store::RestoreSource for Swapping<'_> {
    fn load_tree(&self, id: &BlobId) -> backer_repo::Result<Tree> {
        self.inner.load_tree(id)
    }

    fn fetch_chunks(
        &self,
        ids: &[BlobId],
        cancel: &tokio_util::sync::CancellationToken,
        each: &backer_repo::store::ChunkSink<'_>,
    ) -> Vec<(BlobId, String)> {
        // A FIFO, which a plain open for writing would block on for ever…
        let fifo = self.dir.join("f00000");
        std::fs::remove_file(&fifo).unwrap();
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &fifo,
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        // …a file of someone else's making (perhaps on the freed inode)…
        let planted = self.dir.join("f00001");
        std::fs::remove_file(&planted).unwrap();
        std::fs::write(&planted, b"planted, with a long tail that must not survive").unwrap();
        // …and a symlink to a file outside.
        let link = self.dir.join("f00002");
        std::fs::remove_file(&link).unwrap();
        std::os::unix::fs::symlink(self.dir.parent().unwrap().join("outside.txt"), &link).unwrap();
        self.inner.fetch_chunks(ids, cancel, each)
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn files_reopened_by_name_are_refused_once_replaced() {
    let tmp = tempfile::tempdir().unwrap();
    let target = tmp.path().join("target");
    std::fs::write(tmp.path().join("outside.txt"), b"outside").unwrap();
    let mut repo = Repository::init(Backend::in_memory(), b"pw", cheap())
        .await
        .unwrap();
    let content = b"restored".to_vec();
    let blob = store_blobs(&mut repo, vec![(BlobType::Data, content.clone())])
        .await
        .unwrap()[0];
    // More files in one directory than a batch keeps open whatever the
    // descriptor limit (8,192 at most), all sharing one chunk: the first
    // ones are closed before their content comes, and opened again.
    let files: Vec<Node> = (0..8300)
        .map(|i| {
            let mut n = node(format!("f{i:05}").as_bytes(), NodeKind::File);
            n.size = content.len() as u64;
            n.content = vec![backer_repo::tree::Extent::Data {
                id: blob,
                len: content.len() as u32,
            }];
            n
        })
        .collect();
    let sub = subtree(&mut repo, files).await;
    let mut dir = node(b"d", NodeKind::Dir);
    dir.subtree = Some(sub);
    let snap = snapshot_of(&mut repo, vec![dir]).await;
    let source = Swapping {
        inner: backer_repo::store::LocalStore {
            repo: &repo,
            lock: None,
            handle: tokio::runtime::Handle::current(),
        },
        dir: target.join("d"),
    };
    let opts = RestoreOptions {
        target: target.clone(),
        ..Default::default()
    };
    let out = tokio::task::block_in_place(|| {
        backer_repo::restorer::restore_tree(&source, snap.tree, &opts, Default::default())
    })
    .unwrap();

    for name in ["f00000", "f00001", "f00002"] {
        assert!(
            out.incomplete.iter().any(|p| p.ends_with(name)),
            "{name} is reported incomplete: {:?}",
            out.errors
        );
    }
    assert!(
        out.errors
            .iter()
            .any(|e| e.contains("was replaced in the target meanwhile")),
        "{:?}",
        out.errors
    );
    assert_eq!(std::fs::read(tmp.path().join("outside.txt")).unwrap(), b"outside");
    assert_eq!(
        std::fs::read(target.join("d/f00001")).ok().as_deref(),
        None,
        "the planted file is not given the snapshot's content"
    );
    assert_eq!(out.incomplete.len(), 3, "{:?}", out.errors);
    assert_eq!(std::fs::read(target.join("d/f08299")).unwrap(), content);
}

#[tokio::test(flavor = "multi_thread")]
async fn entries_created_on_several_threads_come_back_whole_and_in_order() {
    let tmp = tempfile::tempdir().unwrap();
    let target = tmp.path().join("target");
    let mut repo = Repository::init(Backend::in_memory(), b"pw", cheap())
        .await
        .unwrap();
    // Directories of more entries than one creator's job, a subdirectory
    // between a directory's files (its files come in two runs), a symlink
    // in each, and a name given twice in the first: its first entry must
    // win, as when files were created one at a time.
    let (dirs, files) = (24, 100);
    let mut contents = Vec::new();
    for d in 0..dirs {
        for f in 0..files {
            contents.push((BlobType::Data, format!("d{d:02}/f{f:04}").into_bytes()));
        }
        contents.push((BlobType::Data, format!("d{d:02}/m/inner").into_bytes()));
    }
    contents.push((BlobType::Data, b"the second f0000".to_vec()));
    let ids = store_blobs(&mut repo, contents.clone()).await.unwrap();
    let file = |name: String, i: usize| {
        let mut n = node(name.as_bytes(), NodeKind::File);
        n.size = contents[i].1.len() as u64;
        n.content = vec![backer_repo::tree::Extent::Data {
            id: ids[i],
            len: contents[i].1.len() as u32,
        }];
        n
    };
    let mut root = Vec::new();
    for d in 0..dirs {
        let base = d * (files + 1);
        let inner = subtree(&mut repo, vec![file("inner".into(), base + files)]).await;
        let mut m = node(b"m", NodeKind::Dir);
        m.subtree = Some(inner);
        let mut nodes: Vec<Node> = (0..files / 2)
            .map(|f| file(format!("f{f:04}"), base + f))
            .collect();
        nodes.push(m);
        nodes.extend((files / 2..files).map(|f| file(format!("f{f:04}"), base + f)));
        let mut link = node(b"l", NodeKind::Symlink);
        link.link_target = Some(b"f0001".to_vec().into());
        nodes.push(link);
        if d == 0 {
            nodes.push(file("f0000".into(), contents.len() - 1));
        }
        let sub = subtree(&mut repo, nodes).await;
        let mut dir = node(format!("d{d:02}").as_bytes(), NodeKind::Dir);
        dir.subtree = Some(sub);
        root.push(dir);
    }
    let snap = snapshot_of(&mut repo, root).await;
    let opts = RestoreOptions {
        target: target.clone(),
        ..Default::default()
    };
    let out = restore(&repo, &snap, &opts, RestoreProgress::default().into())
        .await
        .unwrap();

    assert_eq!(out.files, (dirs * (files + 1)) as u64, "{:?}", out.errors);
    assert_eq!(out.others, dirs as u64);
    assert_eq!(out.errors.len(), 1, "{:?}", out.errors);
    assert!(
        out.errors[0].contains("/d00/f0000") && out.errors[0].contains("exists in the target"),
        "{:?}",
        out.errors
    );
    for d in 0..dirs {
        let dir = target.join(format!("d{d:02}"));
        for f in 0..files {
            let want = format!("d{d:02}/f{f:04}");
            assert_eq!(
                std::fs::read(dir.join(format!("f{f:04}"))).unwrap(),
                want.as_bytes()
            );
        }
        assert_eq!(
            std::fs::read(dir.join("m/inner")).unwrap(),
            format!("d{d:02}/m/inner").as_bytes()
        );
        assert_eq!(std::fs::read_link(dir.join("l")).unwrap(), Path::new("f0001"));
    }
}
