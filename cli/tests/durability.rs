//! Durable writes, shown by the system calls themselves: `backer backup`
//! and `backer forget` run under strace, and the trace must show, for a
//! local repository, what docs/FORMAT.md promises before a power cut can
//! be survived:
//! - every object's data is synced (`fdatasync`) before it is linked to its
//!   name, and its directory is synced after;
//! - every pack is durable (data and name) before the index file naming it
//!   is linked, and the index before the snapshot;
//! - a forgotten snapshot's removal is synced before forget returns.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

use backer_testkit::{figures, pseudo_random};

#[derive(Debug, Clone, PartialEq, Eq)]
enum Event {
    /// fsync or fdatasync of this path.
    Sync(String),
    /// linkat(from, to).
    Link(String, String),
    /// unlink(at) of this path.
    Unlink(String),
}

/// Runs `backer ARGS` under strace; returns the events on `repo`, in order.
fn traced(repo: &Path, args: &[&str], out: &Path) -> Vec<Event> {
    let status = Command::new("strace")
        .args(["-f", "-qq", "-e", "signal=none", "-e"])
        .arg("trace=open,openat,close,fsync,fdatasync,link,linkat,unlink,unlinkat")
        .arg("-o")
        .arg(out)
        .arg(env!("CARGO_BIN_EXE_backer"))
        .args(args)
        .env("BACKER_REPO", repo)
        .env("BACKER_PASSWORD", "pw")
        .env_remove("BACKER_UNSAFE_NO_FSYNC")
        .status()
        .expect("strace is needed by this test (Debian: apt-get install strace); scripts/test installs it");
    assert!(status.success(), "backer {args:?} under strace failed");
    parse(&std::fs::read_to_string(out).unwrap(), &repo.to_string_lossy())
}

/// The quoted arguments of a call, in order.
fn quoted(s: &str) -> Vec<String> {
    s.split('"').skip(1).step_by(2).map(String::from).collect()
}

fn parse(trace: &str, repo: &str) -> Vec<Event> {
    // Calls interrupted by another thread's line are joined back.
    let mut pending: HashMap<&str, String> = HashMap::new();
    let mut fds: HashMap<i64, String> = HashMap::new();
    let mut events = Vec::new();
    for line in trace.lines() {
        let Some((pid, rest)) = line.split_once(' ') else {
            continue;
        };
        let call = if let Some(head) = rest.strip_suffix(" <unfinished ...>") {
            pending.insert(pid, head.to_string());
            continue;
        } else if rest.trim_start().starts_with("<... ") {
            let tail = rest.split_once("resumed>").map(|(_, t)| t).unwrap_or("");
            format!("{}{}", pending.remove(pid).unwrap_or_default(), tail)
        } else {
            rest.to_string()
        };
        let ret: i64 = call
            .rsplit_once("= ")
            .and_then(|(_, r)| r.split_whitespace().next())
            .and_then(|r| r.parse().ok())
            .unwrap_or(-1);
        let name = call.split('(').next().unwrap_or("").trim();
        let fd_arg = || -> Option<i64> {
            call.split_once('(')?
                .1
                .split([',', ')', ' '])
                .next()?
                .parse()
                .ok()
        };
        match name {
            "open" | "openat" if ret >= 0 => {
                if let Some(p) = quoted(&call).into_iter().next() {
                    fds.insert(ret, p);
                }
            }
            "close" => {
                if let Some(fd) = fd_arg() {
                    fds.remove(&fd);
                }
            }
            "fsync" | "fdatasync" if ret == 0 => {
                if let Some(p) = fd_arg().and_then(|fd| fds.get(&fd)) {
                    events.push(Event::Sync(p.clone()));
                }
            }
            "link" | "linkat" if ret == 0 => {
                let q = quoted(&call);
                if q.len() == 2 {
                    events.push(Event::Link(q[0].clone(), q[1].clone()));
                }
            }
            "unlink" | "unlinkat" if ret == 0 => {
                if let Some(p) = quoted(&call).into_iter().next() {
                    events.push(Event::Unlink(p));
                }
            }
            _ => {}
        }
    }
    events.retain(|e| match e {
        Event::Sync(p) | Event::Unlink(p) | Event::Link(_, p) => p.starts_with(repo),
    });
    events
}

fn parent(p: &str) -> String {
    Path::new(p).parent().unwrap().to_string_lossy().into_owned()
}

/// Where in `events` the object `to` was linked, and where its directory
/// was synced after; checks its data was synced before.
fn durable_at(events: &[Event], to: &str) -> (usize, usize) {
    let at = events
        .iter()
        .position(|e| matches!(e, Event::Link(_, t) if t == to))
        .unwrap_or_else(|| panic!("{to} was never linked into place"));
    let Event::Link(from, _) = &events[at] else {
        unreachable!()
    };
    assert!(
        events[..at].contains(&Event::Sync(from.clone())),
        "{to}: its data was not synced before it was linked to its name"
    );
    let dir = parent(to);
    let synced = events[at..]
        .iter()
        .position(|e| *e == Event::Sync(dir.clone()))
        .map(|i| at + i)
        .unwrap_or_else(|| panic!("{to}: its directory was not synced after the link"));
    (at, synced)
}

#[test]
fn every_step_is_durable_before_the_next() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = tmp.path().join("repo");
    let src = tmp.path().join("src");
    std::fs::create_dir_all(src.join("sub")).unwrap();
    // Two data packs (16 MiB each at most) and a tree pack.
    std::fs::write(src.join("big"), pseudo_random(24 << 20, 5)).unwrap();
    for i in 0..20 {
        std::fs::write(src.join(format!("sub/f{i}")), pseudo_random(10_000, i)).unwrap();
    }
    let init = Command::new(env!("CARGO_BIN_EXE_backer"))
        .args(["init"])
        .env("BACKER_REPO", &repo)
        .env("BACKER_PASSWORD", "pw")
        .output()
        .unwrap();
    assert!(init.status.success());

    let events = traced(
        &repo,
        &["backup", src.to_str().unwrap()],
        &tmp.path().join("backup.trace"),
    );
    let linked = |dir: &str| -> Vec<String> {
        events
            .iter()
            .filter_map(|e| match e {
                Event::Link(_, to) if to.contains(&format!("/{dir}/")) => Some(to.clone()),
                _ => None,
            })
            .collect()
    };
    let packs = linked("data");
    let index = linked("index");
    let snaps = linked("snapshots");
    assert!(
        packs.len() >= 3,
        "expected 2 data packs and a tree pack: {packs:?}"
    );
    assert_eq!((index.len(), snaps.len()), (1, 1), "{events:#?}");
    let (index_at, index_synced) = durable_at(&events, &index[0]);
    for p in &packs {
        let (_, synced) = durable_at(&events, p);
        assert!(
            synced < index_at,
            "{p} was not durable before the index naming it was linked"
        );
    }
    let (snap_at, _) = durable_at(&events, &snaps[0]);
    assert!(
        index_synced < snap_at,
        "the index was not durable before the snapshot was linked"
    );
    for l in linked("locks") {
        durable_at(&events, &l);
    }

    // Forgetting: the removal is synced, so it cannot come back.
    let id = Path::new(&snaps[0])
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let events = traced(&repo, &["forget", &id[..8]], &tmp.path().join("forget.trace"));
    let gone = events
        .iter()
        .position(|e| *e == Event::Unlink(snaps[0].clone()))
        .expect("forget did not remove the snapshot file");
    assert!(
        events[gone..].contains(&Event::Sync(parent(&snaps[0]))),
        "the snapshot's removal was not synced"
    );
    figures(
        "durability",
        format!(
            "{} packs, 1 index, 1 snapshot: each synced, linked, its directory synced, in order; forget synced",
            packs.len()
        ),
    );
}
