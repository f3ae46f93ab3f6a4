//! Commands on a repository opened directly (local directory or object store).

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use backer_repo::archiver::{self, BackupOptions, ParentChoice, Progress};
use backer_repo::check::{self, CheckOptions, CheckProgress};
use backer_repo::crypto::KdfParams;
use backer_repo::id::SnapshotId;
use backer_repo::lock::{self, Lock};
use backer_repo::prune::{PruneOptions, PruneReport};
use backer_repo::repository::Dir;
use backer_repo::restorer::{self, RestoreOptions, RestoreProgress};
use backer_repo::retention::{Grouping, RetentionPolicy};
use backer_repo::snapshot::SnapshotFilter;
use backer_repo::text::escape;
use backer_repo::tree::{Node, NodeKind};
use backer_repo::{Backend, Repository};
use clap::{Args, Subcommand};
use serde::Serialize;

use crate::output::{bar, duration, size};
use crate::terminal::prompt_hidden;
use crate::{EXIT_INCOMPLETE, Global};

#[derive(Args, Debug)]
pub struct BackupArgs {
    /// Files and directories to back up. With --server: CLIENT, then its paths
    /// (none: the backups configured for it)
    #[arg(required = true, value_name = "PATH")]
    pub(crate) paths: Vec<PathBuf>,
    /// Leave out matching paths: a pattern with a `/` matches the whole path
    /// (`/home/*/.cache`), one without matches any name (`*.tmp`)
    #[arg(short = 'e', long = "exclude", value_name = "GLOB")]
    pub(crate) excludes: Vec<String>,
    /// Tag the snapshot (repeatable)
    #[arg(long = "tag", value_name = "TAG")]
    pub(crate) tags: Vec<String>,
    /// With --server: wait for the job to end, showing its progress
    #[arg(long)]
    pub(crate) wait: bool,
    /// Host name to record (default: this machine's)
    #[arg(long)]
    host: Option<String>,
    /// Compare against this snapshot instead of the latest one of the same host and paths
    #[arg(long, conflicts_with = "force")]
    parent: Option<String>,
    /// Read every file, even those unchanged since the parent snapshot
    #[arg(long)]
    force: bool,
}

#[derive(Args, Debug)]
pub struct SnapshotsArgs {
    /// Only snapshots of this client (a host name, in a local repository)
    pub(crate) client: Option<String>,
    /// Only snapshots of this host
    #[arg(long)]
    host: Option<String>,
    /// Only snapshots with this tag
    #[arg(long)]
    tag: Option<String>,
}

#[derive(Args, Debug)]
pub struct LsArgs {
    /// Snapshot id (or a unique prefix), or `latest`
    pub(crate) snapshot: String,
    /// Directory or file inside the snapshot to list (default: everything)
    pub(crate) path: Option<String>,
    /// The client whose snapshot is meant (needed for `latest` with --server;
    /// in a repository, the same as --host)
    #[arg(long)]
    pub(crate) client: Option<String>,
    /// Only this host's snapshots (for `latest`: default this machine's,
    /// when the repository holds several hosts')
    #[arg(long, conflicts_with = "client")]
    pub(crate) host: Option<String>,
    /// Show type, permissions, owner, size and time
    #[arg(short, long)]
    pub(crate) long: bool,
}

#[derive(Args, Debug)]
pub struct RestoreArgs {
    /// Snapshot id (or a unique prefix), or `latest`
    pub(crate) snapshot: String,
    /// Directory to restore into; created if missing. Nothing is written outside it.
    /// With --server: a directory on the client (`/` restores in place)
    #[arg(short, long)]
    pub(crate) target: PathBuf,
    /// Restore only this path of the snapshot and what is below it (repeatable)
    #[arg(short, long = "include", value_name = "PATH")]
    pub(crate) includes: Vec<String>,
    /// Replace files that already exist in the target
    #[arg(long)]
    pub(crate) overwrite: bool,
    /// The client whose snapshot is meant (needed for `latest` with --server;
    /// in a repository, the same as --host)
    #[arg(long)]
    pub(crate) client: Option<String>,
    /// Only this host's snapshots (for `latest`: default this machine's,
    /// when the repository holds several hosts')
    #[arg(long, conflicts_with = "client")]
    pub(crate) host: Option<String>,
    /// With --server: restore onto this client instead of the snapshot's
    #[arg(long)]
    pub(crate) to_client: Option<String>,
    /// With --server: wait for the job to end, showing its progress
    #[arg(long)]
    pub(crate) wait: bool,
}

#[derive(Args, Debug)]
pub struct CheckArgs {
    /// Also read and verify every byte of every pack
    #[arg(long)]
    read_data: bool,
    /// Read only part N of M of the packs (e.g. 2/7); implies --read-data
    #[arg(long, value_name = "N/M", value_parser = parse_subset)]
    read_data_subset: Option<(u32, u32)>,
}

fn parse_subset(s: &str) -> std::result::Result<(u32, u32), String> {
    let (n, m) = s.split_once('/').ok_or("expected N/M, for example 1/5")?;
    let n: u32 = n.parse().map_err(|_| format!("{n:?} is not a number"))?;
    let m: u32 = m.parse().map_err(|_| format!("{m:?} is not a number"))?;
    if m == 0 || n == 0 || n > m {
        return Err(format!("need 1 <= N <= M, got {n}/{m}"));
    }
    Ok((n, m))
}

#[derive(Args, Debug)]
pub struct ForgetArgs {
    /// Snapshots to remove by id (in addition to what a policy removes)
    snapshots: Vec<String>,
    /// Keep the N newest snapshots
    #[arg(long, value_name = "N")]
    keep_last: Option<u32>,
    /// Keep the newest snapshot of each of the N newest hours that have one
    #[arg(long, value_name = "N")]
    keep_hourly: Option<u32>,
    /// … of each of the N newest days (UTC)
    #[arg(long, value_name = "N")]
    keep_daily: Option<u32>,
    /// … of each of the N newest ISO weeks
    #[arg(long, value_name = "N")]
    keep_weekly: Option<u32>,
    /// … of each of the N newest months
    #[arg(long, value_name = "N")]
    keep_monthly: Option<u32>,
    /// … of each of the N newest years
    #[arg(long, value_name = "N")]
    keep_yearly: Option<u32>,
    /// Keep every snapshot this recent, relative to the group's newest (e.g. 7d, 36h, 1y)
    #[arg(long, value_name = "DURATION")]
    keep_within: Option<String>,
    /// Keep every snapshot with this tag (repeatable)
    #[arg(long = "keep-tag", value_name = "TAG")]
    keep_tags: Vec<String>,
    /// Apply the policy per group of these fields: host, paths, tags (comma-separated; empty: one group)
    #[arg(long, default_value = "host,paths")]
    group_by: String,
    /// Only consider snapshots of this host
    #[arg(long)]
    host: Option<String>,
    /// Show what would be removed and why the rest is kept; change nothing
    #[arg(short = 'n', long)]
    dry_run: bool,
    /// Prune afterwards
    #[arg(long)]
    prune: bool,
    /// With --prune: unused space allowed to remain, in percent of used data
    #[arg(long, value_name = "PERCENT", default_value = "2%", value_parser = parse_percent)]
    max_unused: f64,
}

#[derive(Args, Debug)]
pub struct PruneArgs {
    /// Unused space allowed to remain, in percent of used data: more is faster, less is smaller
    #[arg(long, value_name = "PERCENT", default_value = "2%", value_parser = parse_percent)]
    max_unused: f64,
    /// Show what would be removed; change nothing
    #[arg(short = 'n', long)]
    dry_run: bool,
}

#[derive(Subcommand, Debug)]
pub enum RepairCommand {
    /// Rebuild the index from the packs' own headers (after an index file was
    /// damaged or deleted); with --read-data also verify every blob and copy
    /// the good blobs out of damaged packs
    Index {
        /// Read every pack whole and verify every blob
        #[arg(long)]
        read_data: bool,
        /// Say what would change; change nothing
        #[arg(short = 'n', long)]
        dry_run: bool,
    },
    /// Remove snapshot files that cannot be read, and rewrite snapshots whose
    /// files or directories lost data, leaving out only what is gone (run
    /// `repair index` first)
    Snapshots {
        /// Say what would change; change nothing
        #[arg(short = 'n', long)]
        dry_run: bool,
    },
    /// Write a new config object when it is damaged or missing (every field
    /// but the repository's random id follows from the format)
    Config,
}

#[derive(Args, Debug)]
pub struct UnlockArgs {
    /// Remove every lock, not only stale ones (only when no backer process uses the repository)
    #[arg(long)]
    remove_all: bool,
}

fn parse_percent(s: &str) -> std::result::Result<f64, String> {
    let v: f64 = s
        .trim_end_matches('%')
        .parse()
        .map_err(|_| format!("{s:?} is not a percentage; use e.g. 5%"))?;
    if !(0.0..=10_000.0).contains(&v) {
        return Err(format!("{s:?} is out of range"));
    }
    Ok(v / 100.0)
}

#[derive(Subcommand, Debug)]
pub enum KeyCommand {
    /// Add a password that opens the repository
    Add {
        /// File holding the new password (first line)
        #[arg(long)]
        new_password_file: PathBuf,
    },
    /// List the key files (the one in use is marked, damaged ones are named)
    List,
    /// Remove a key file (by id or unique prefix): its password no longer opens the repository
    Remove {
        /// Key id or unique prefix, as `key list` shows it
        id: String,
    },
}

fn location(g: &Global) -> Result<Backend> {
    let repo = g
        .repo
        .as_deref()
        .ok_or_else(|| anyhow!("no repository given: use --repo or set BACKER_REPO"))?;
    let cache = match (&g.cache_dir, g.no_cache) {
        (_, true) => None,
        (Some(dir), false) => Some(dir.clone()),
        (None, false) => backer_repo::cache::default_root(),
    };
    Ok(Backend::open(repo)?.with_cache(cache))
}

fn read_password_file(path: &PathBuf) -> Result<Vec<u8>> {
    let raw =
        std::fs::read(path).with_context(|| format!("failed to read password file {}", path.display()))?;
    let line = raw.split(|b| *b == b'\n').next().unwrap_or(&[]);
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if line.is_empty() {
        bail!("password file {} is empty", path.display());
    }
    Ok(line.to_vec())
}

fn password(g: &Global, confirm: bool) -> Result<Vec<u8>> {
    if let Some(p) = &g.password_file {
        return read_password_file(p);
    }
    if let Some(p) = std::env::var_os("BACKER_PASSWORD") {
        if p.is_empty() {
            bail!("BACKER_PASSWORD is set but empty");
        }
        return Ok(std::os::unix::ffi::OsStrExt::as_bytes(p.as_os_str()).to_vec());
    }
    if std::io::stdin().is_terminal() {
        // Off the runtime's worker, which may be its only one: the signal
        // that ends a prompt is delivered by the runtime.
        let p = tokio::task::block_in_place(|| -> Result<String> {
            let p = prompt_hidden("repository password: ").context("failed to read the password")?;
            if confirm {
                let again = prompt_hidden("again: ").context("failed to read the password")?;
                if again != p {
                    bail!("the passwords differ");
                }
            }
            Ok(p)
        })?;
        if p.is_empty() {
            bail!("the password is empty");
        }
        return Ok(p.into_bytes());
    }
    bail!("no password: set BACKER_PASSWORD, use --password-file, or run on a terminal to be asked")
}

/// Opens the repository with its index (for commands that take no lock).
async fn open(g: &Global) -> Result<Repository> {
    let backend = location(g)?;
    let pw = password(g, false)?;
    Ok(Repository::open(backend, &pw).await?)
}

/// Opens the repository without its index: [`locked`] reads it once the
/// lock is held.
async fn open_for_lock(g: &Global) -> Result<Repository> {
    let backend = location(g)?;
    let pw = password(g, false)?;
    Ok(Repository::open_without_index(backend, &pw).await?)
}

/// Whether a command changes the repository (and so may not skip the lock).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Access {
    Read,
    Write,
}

/// Which index a command works with once locked.
#[derive(Clone, Copy, PartialEq, Eq)]
enum IndexOf {
    /// Every pack the index files name (check reports the missing ones).
    AllPacks,
    /// Only packs storage still holds: a backup stores again what lost
    /// packs held, a restore reads a blob stored twice from the copy left.
    StoredPacks,
}

/// Runs `f` under a lock on `repo` (none with --no-lock, for a command that
/// only reads), with the index read after the lock is held, and releases
/// the lock whatever `f` returns.
async fn locked<T>(
    g: &Global,
    repo: &mut Repository,
    exclusive: bool,
    access: Access,
    index: IndexOf,
    purpose: &str,
    f: impl AsyncFnOnce(&mut Repository, Option<&Lock>) -> Result<T>,
) -> Result<T> {
    let load = async |repo: &mut Repository| match index {
        IndexOf::AllPacks => repo.reload_index().await,
        IndexOf::StoredPacks => repo.reload_index_of_stored_packs().await.map(|_| ()),
    };
    if g.no_lock {
        if access == Access::Write {
            bail!(
                "--no-lock is only for commands that read (snapshots, ls, restore, check, stats): {purpose} writes"
            );
        }
        load(repo).await?;
        return f(repo, None).await;
    }
    let wait = g.retry_lock.unwrap_or_default();
    let lock = match Lock::acquire(repo, exclusive, purpose, wait).await {
        Ok(l) => l,
        Err(e @ backer_repo::Error::Locked(_)) => return Err(e.into()),
        Err(e) if access == Access::Read => {
            return Err(anyhow::Error::from(e).context(format!(
                "failed to lock the repository for {purpose}; on read-only or full storage, --no-lock reads without a lock"
            )));
        }
        Err(e) => {
            return Err(
                anyhow::Error::from(e).context(format!("failed to lock the repository for {purpose}"))
            );
        }
    };
    let result = match load(repo).await {
        Ok(()) => f(repo, Some(&lock)).await,
        Err(e) => Err(e.into()),
    };
    if let Err(e) = lock.release().await {
        tracing::warn!("failed to remove our lock: {e}; `backer unlock` clears it");
    }
    result
}

/// The lock a writing command was given (always, since [`locked`] refuses
/// --no-lock for writes).
fn held(lock: Option<&Lock>) -> Result<&Lock> {
    lock.ok_or_else(|| anyhow!("this command needs a lock"))
}

/// Which snapshots `--host`/`--client` mean in a repository: in one a server
/// writes, a client's snapshots carry its name as host.
fn host_filter(host: Option<&String>, client: Option<&String>) -> SnapshotFilter {
    SnapshotFilter {
        host: host.or(client).cloned(),
        ..Default::default()
    }
}

fn print_json<T: Serialize>(v: &T) -> Result<()> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer(&mut out, v)?;
    writeln!(out)?;
    Ok(())
}

pub async fn init(g: &Global) -> Result<u8> {
    refuse_no_lock(g, "init")?;
    let backend = location(g)?;
    let pw = password(g, true)?;
    let repo = Repository::init(backend, &pw, KdfParams::default()).await?;
    if g.json {
        print_json(&serde_json::json!({
            "id": repo.config().id,
            "location": repo.backend().location(),
            "bucket_created": repo.backend().bucket_created(),
        }))?;
    } else if !g.quiet {
        if repo.backend().bucket_created() {
            outln!("created the bucket of {}", repo.backend().location())?;
        }
        outln!(
            "created repository {} at {}",
            repo.config().id,
            repo.backend().location()
        )?;
        outln!("keep the password safe: without it the data cannot be read")?;
    }
    Ok(0)
}

/// Updates a progress bar from the pipeline's counters until dropped.
struct Ticker(tokio::task::JoinHandle<()>);

impl Ticker {
    fn start(
        pb: &indicatif::ProgressBar,
        update: impl Fn(&indicatif::ProgressBar) + Send + 'static,
    ) -> Ticker {
        let pb = pb.clone();
        Ticker(tokio::spawn(async move {
            loop {
                update(&pb);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }))
    }
}

/// Shows `done` of `total` bytes (the total may still be growing while files are counted).
fn show_bytes(
    pb: &indicatif::ProgressBar,
    total: &std::sync::atomic::AtomicU64,
    done: &std::sync::atomic::AtomicU64,
) {
    let done = done.load(Ordering::Relaxed);
    pb.set_length(total.load(Ordering::Relaxed).max(done));
    pb.set_position(done);
}

impl Drop for Ticker {
    fn drop(&mut self) {
        self.0.abort();
    }
}

pub async fn backup(g: &Global, a: BackupArgs) -> Result<u8> {
    let mut repo = open_for_lock(g).await?;
    let parent = match (&a.parent, a.force) {
        (_, true) => ParentChoice::None,
        (Some(p), _) => ParentChoice::Id(repo.find_snapshot(p, &SnapshotFilter::default()).await?.id),
        (None, false) => ParentChoice::Auto,
    };
    let pb = bar(g, "backup");
    let progress = Arc::new(Progress::default());
    let p = Arc::clone(&progress);
    let ticker = Ticker::start(&pb, move |pb| {
        show_bytes(pb, &p.bytes_total, &p.bytes_done);
        let scanning = if p.scan_done.load(Ordering::Relaxed) {
            ""
        } else {
            " (counting)"
        };
        let errors = match p.errors.load(Ordering::Relaxed) {
            0 => String::new(),
            n => format!(", {n} errors"),
        };
        // The total may be the parent's, an estimate the backup can pass.
        let done = p.files_done.load(Ordering::Relaxed);
        pb.set_message(format!(
            "{done}/{} files{scanning}{errors}",
            p.files_total.load(Ordering::Relaxed).max(done),
        ));
    });
    let opts = BackupOptions {
        root: PathBuf::from("/"),
        paths: a.paths,
        excludes: a.excludes,
        tags: a.tags,
        parent,
        hostname: a.host,
        threads: 0,
        scan: !pb.is_hidden(),
        // Ctrl-C ends the process (see on_interrupt in main.rs), lock released.
        ..Default::default()
    };
    let outcome = locked(
        g,
        &mut repo,
        false,
        Access::Write,
        IndexOf::StoredPacks,
        "backup",
        async |repo, lock| Ok(archiver::backup(repo, held(lock)?, opts, progress).await?),
    )
    .await;
    drop(ticker);
    pb.finish_and_clear();
    let outcome = outcome?;
    let s = &outcome.snapshot;
    let sum = &s.summary;
    if g.json {
        print_json(&serde_json::json!({
            "id": outcome.id.to_hex(),
            "snapshot": s,
            "messages": outcome.messages,
        }))?;
    } else {
        for m in &outcome.messages {
            eprintln!("warning: {}", escape(m));
        }
        if !g.quiet {
            outln!(
                "files: {} ({} read, {} unchanged), dirs: {}, other: {}",
                sum.files,
                sum.files_read,
                sum.files.saturating_sub(sum.files_read),
                sum.dirs,
                sum.others
            )?;
            outln!(
                "added: {} of new data, {} stored after compression and encryption",
                size(sum.new_bytes),
                size(sum.stored_bytes)
            )?;
            outln!("processed {} in {}", size(sum.bytes), duration(sum.duration_secs))?;
        }
        if s.partial {
            outln!(
                "snapshot {} saved, but partial: {} entries could not be read (listed above)",
                outcome.id.short(),
                sum.errors
            )?;
        } else {
            outln!("snapshot {} saved", outcome.id.short())?;
        }
    }
    Ok(if s.partial { EXIT_INCOMPLETE } else { 0 })
}

pub async fn snapshots(g: &Global, a: SnapshotsArgs) -> Result<u8> {
    let backend = location(g)?;
    let pw = password(g, false)?;
    // Listing needs no index.
    let repo = Repository::open_without_index(backend, &pw).await?;
    let mut filter = host_filter(a.host.as_ref(), a.client.as_ref());
    filter.tags.extend(a.tag);
    let loaded = repo.load_snapshots().await?;
    for d in &loaded.damaged {
        eprintln!(
            "warning: snapshot file {} is damaged and left out ({}); `backer repair snapshots` removes it",
            d.name,
            escape(&d.reason)
        );
    }
    let code = if loaded.damaged.is_empty() {
        0
    } else {
        EXIT_INCOMPLETE
    };
    let list: Vec<_> = loaded
        .snapshots
        .into_iter()
        .filter(|s| filter.matches(&s.snapshot))
        .collect();
    if g.json {
        print_json(&list)?;
        return Ok(code);
    }
    outln!(
        "{:<10} {:<20} {:<16} {:>9} {:>11}  {:<12} paths",
        "id",
        "time",
        "host",
        "files",
        "size",
        "tags"
    )?;
    for s in &list {
        let sn = &s.snapshot;
        outln!(
            "{:<10} {:<20} {:<16} {:>9} {:>11}  {:<12} {}{}",
            s.id.short(),
            sn.time.with_timezone(&chrono::Local).format("%Y-%m-%d %H:%M:%S"),
            escape(&sn.hostname),
            sn.summary.files,
            size(sn.summary.bytes),
            escape(&sn.tags.join(",")),
            escape(&sn.paths.join(" ")),
            if sn.partial { "  (partial)" } else { "" }
        )?;
    }
    outln!("{} snapshots", list.len())?;
    Ok(code)
}

#[derive(Serialize)]
struct LsEntry<'a> {
    path: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    mode: u32,
    uid: u32,
    gid: u32,
    size: u64,
    mtime: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    link_target: Option<String>,
}

fn kind_name(k: NodeKind) -> &'static str {
    match k {
        NodeKind::File => "file",
        NodeKind::Dir => "dir",
        NodeKind::Symlink => "symlink",
        NodeKind::Fifo => "fifo",
        NodeKind::CharDevice => "chardev",
        NodeKind::BlockDevice => "blockdev",
        NodeKind::Socket => "socket",
    }
}

fn print_node(g: &Global, long: bool, path: &str, n: &Node) -> Result<()> {
    let mtime = chrono::DateTime::from_timestamp(n.mtime.secs, n.mtime.nanos)
        .map(|t| {
            t.with_timezone(&chrono::Local)
                .format("%Y-%m-%d %H:%M:%S")
                .to_string()
        })
        .unwrap_or_default();
    let target = n
        .link_target
        .as_ref()
        .map(|t| String::from_utf8_lossy(t).into_owned());
    if g.json {
        return print_json(&LsEntry {
            path,
            kind: kind_name(n.kind),
            mode: n.mode,
            uid: n.uid,
            gid: n.gid,
            size: n.size,
            mtime,
            link_target: target,
        });
    }
    let mut out = std::io::stdout().lock();
    if long {
        write!(
            out,
            "{} {:>5}/{:<5} {:>12} {} ",
            n.mode_string(),
            n.uid,
            n.gid,
            n.size,
            mtime
        )?;
    }
    let path = escape(path);
    match target {
        Some(t) if long => writeln!(out, "{path} -> {}", escape(&t))?,
        _ => writeln!(out, "{path}")?,
    }
    Ok(())
}

pub async fn ls(g: &Global, a: LsArgs) -> Result<u8> {
    let repo = open(g).await?;
    let snap = repo
        .find_snapshot(&a.snapshot, &host_filter(a.host.as_ref(), a.client.as_ref()))
        .await?;
    let mut lister = backer_repo::listing::Lister::new(&repo, snap.snapshot.tree, a.path.as_deref()).await?;
    while let Some(batch) = lister.next_batch().await? {
        for (path, node) in &batch {
            print_node(g, a.long, path, node)?;
        }
    }
    Ok(0)
}

pub async fn restore(g: &Global, a: RestoreArgs) -> Result<u8> {
    let mut repo = open_for_lock(g).await?;
    let snap = repo
        .find_snapshot(&a.snapshot, &host_filter(a.host.as_ref(), a.client.as_ref()))
        .await?;
    if !g.quiet && !g.json {
        eprintln!(
            "restoring snapshot {} of {} from {}",
            snap.id.short(),
            escape(&snap.snapshot.hostname),
            snap.snapshot
                .time
                .with_timezone(&chrono::Local)
                .format("%Y-%m-%d %H:%M:%S")
        );
    }
    let pb = bar(g, "restore");
    let progress = Arc::new(RestoreProgress::default());
    let p = Arc::clone(&progress);
    let ticker = Ticker::start(&pb, move |pb| {
        show_bytes(pb, &p.bytes_total, &p.bytes_done);
        pb.set_message(format!("{} files", p.files_done.load(Ordering::Relaxed)));
    });
    let started = std::time::Instant::now();
    let opts = RestoreOptions {
        target: a.target.clone(),
        includes: a.includes,
        overwrite: a.overwrite,
        ..Default::default()
    };
    let outcome = locked(
        g,
        &mut repo,
        false,
        Access::Read,
        IndexOf::StoredPacks,
        "restore",
        async |repo, _| Ok(restorer::restore(repo, &snap.snapshot, &opts, progress).await?),
    )
    .await;
    drop(ticker);
    pb.finish_and_clear();
    let outcome = outcome?;
    if g.json {
        print_json(&serde_json::json!({
            "snapshot": snap.id.to_hex(),
            "target": a.target,
            "files": outcome.files,
            "dirs": outcome.dirs,
            "others": outcome.others,
            "bytes": outcome.bytes,
            "errors": outcome.errors,
            "incomplete": outcome.incomplete,
        }))?;
    } else {
        for e in &outcome.errors {
            eprintln!("error: {}", escape(e));
        }
        if !outcome.incomplete.is_empty() {
            eprintln!(
                "{} files could not be restored whole and are not in the target: {}{}",
                outcome.incomplete.len(),
                outcome
                    .incomplete
                    .iter()
                    .take(10)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", "),
                if outcome.incomplete.len() > 10 {
                    ", …"
                } else {
                    ""
                }
            );
        }
        if !g.quiet {
            outln!(
                "restored snapshot {} into {}: {} files, {} dirs, {} other, {} in {}",
                snap.id.short(),
                a.target.display(),
                outcome.files,
                outcome.dirs,
                outcome.others,
                size(outcome.bytes),
                duration(started.elapsed().as_secs_f64())
            )?;
        }
        if !outcome.errors.is_empty() {
            outln!(
                "{} entries were not restored (listed above)",
                outcome.errors.len()
            )?;
            if !repo.index_damage().is_empty() {
                outln!(
                    "{} index files are damaged: `backer repair index` rebuilds the index from the packs, \
                     which may bring what is missing back",
                    repo.index_damage().len()
                )?;
            }
        }
    }
    Ok(if outcome.errors.is_empty() {
        0
    } else {
        EXIT_INCOMPLETE
    })
}

pub async fn check(g: &Global, a: CheckArgs) -> Result<u8> {
    let mut repo = open_for_lock(g).await?;
    let opts = CheckOptions {
        read_data: a.read_data || a.read_data_subset.is_some(),
        subset: a.read_data_subset,
    };
    let pb = bar(g, "check");
    let progress = Arc::new(CheckProgress::default());
    let p = Arc::clone(&progress);
    let ticker = Ticker::start(&pb, move |pb| {
        pb.set_length(p.packs_total.load(Ordering::Relaxed));
        pb.set_position(p.packs_done.load(Ordering::Relaxed));
    });
    if opts.read_data && !pb.is_hidden() {
        pb.set_style(crate::output::count_style("packs"));
    }
    let report = locked(
        g,
        &mut repo,
        false,
        Access::Read,
        IndexOf::AllPacks,
        "check",
        async |repo, _| Ok(check::check(repo, &opts, progress).await?),
    )
    .await;
    drop(ticker);
    pb.finish_and_clear();
    let report = report?;
    if g.json {
        print_json(&serde_json::json!({
            "ok": report.ok(),
            "errors": report.errors,
            "warnings": report.warnings,
            "snapshots": report.snapshots,
            "trees": report.trees,
            "packs": report.packs,
            "packs_read": report.packs_read,
            "blobs_read": report.blobs_read,
        }))?;
    } else {
        for w in &report.warnings {
            eprintln!("warning: {}", escape(w));
        }
        for e in &report.errors {
            eprintln!("error: {}", escape(e));
        }
        outln!(
            "checked {} snapshots, {} trees, {} packs{}",
            report.snapshots,
            report.trees,
            report.packs,
            if opts.read_data {
                format!("; read {} packs, {} blobs", report.packs_read, report.blobs_read)
            } else {
                String::new()
            }
        )?;
        if report.ok() {
            outln!("no errors found")?;
        } else {
            outln!("{} errors found", report.errors.len())?;
        }
    }
    Ok(if report.ok() { 0 } else { 1 })
}

pub async fn stats(g: &Global) -> Result<u8> {
    let repo = open(g).await?;
    let s = backer_repo::stats::stats(&repo).await?;
    if g.json {
        print_json(&s)?;
    } else {
        outln!("snapshots:          {}", s.snapshots)?;
        outln!("packs:              {} ({})", s.packs, size(s.stored_bytes))?;
        outln!(
            "chunks:             {} ({} unique bytes)",
            s.data_blobs,
            size(s.unique_bytes)
        )?;
        outln!("trees:              {}", s.tree_blobs)?;
        outln!("all snapshots hold: {}", size(s.snapshot_bytes))?;
        outln!("dedup ratio:        {:.2}x", s.dedup_ratio)?;
        outln!("compression ratio:  {:.2}x", s.compression_ratio)?;
    }
    Ok(0)
}

/// Commands that write without taking a lock refuse --no-lock rather than
/// ignore it.
fn refuse_no_lock(g: &Global, what: &str) -> Result<()> {
    if g.no_lock {
        bail!(
            "--no-lock is only for commands that read (snapshots, ls, restore, check, stats): {what} writes"
        );
    }
    Ok(())
}

pub async fn key(g: &Global, k: KeyCommand) -> Result<u8> {
    if !matches!(k, KeyCommand::List) {
        refuse_no_lock(g, "key")?;
    }
    let backend = location(g)?;
    let pw = password(g, false)?;
    // Keys need no index.
    let repo = Repository::open_without_index(backend, &pw).await?;
    match k {
        KeyCommand::Add { new_password_file } => {
            let pw = read_password_file(&new_password_file)?;
            let id = repo.add_key(&pw, KdfParams::default()).await?;
            outln!("added key {}", id.short())?;
        }
        KeyCommand::List => {
            let damaged: std::collections::HashMap<String, &str> = repo
                .key_damage()
                .iter()
                .map(|d| (d.name.trim_start_matches("keys/").to_string(), d.reason.as_str()))
                .collect();
            let current = repo.key_id().map(|k| k.to_hex());
            let mut rows = Vec::new();
            for l in repo.list(Dir::Keys).await? {
                let state = if current.as_deref() == Some(l.name.as_str()) {
                    "in use".to_string()
                } else if let Some(why) = damaged.get(&l.name) {
                    format!("damaged: {why}")
                } else {
                    String::new()
                };
                rows.push(serde_json::json!({"id": l.name, "modified": l.modified, "state": state}));
                if !g.json {
                    outln!(
                        "{}  {}  {}",
                        l.name,
                        l.modified.format("%Y-%m-%d %H:%M:%S UTC"),
                        escape(&state)
                    )?;
                }
            }
            if g.json {
                print_json(&rows)?;
            }
        }
        KeyCommand::Remove { id } => {
            let prefix = id.to_ascii_lowercase();
            let matches: Vec<String> = repo
                .list(Dir::Keys)
                .await?
                .into_iter()
                .map(|l| l.name)
                .filter(|n| n.starts_with(&prefix))
                .collect();
            let name = match matches.as_slice() {
                [one] if prefix.len() >= 4 => one.clone(),
                [] => bail!("no key file matches {id:?}; `backer key list` shows them"),
                [_] => bail!("give at least 4 hex digits of the key id"),
                _ => bail!("key prefix {id:?} is ambiguous; give more characters"),
            };
            repo.remove_key(&name.parse()?).await?;
            outln!("removed key {}", &name[..8])?;
        }
    }
    Ok(0)
}

pub async fn repair(g: &Global, c: RepairCommand) -> Result<u8> {
    refuse_no_lock(g, "repair")?;
    if let RepairCommand::Config = c {
        let backend = location(g)?;
        let pw = password(g, false)?;
        let (repo, current) = Repository::open_for_config_repair(backend, &pw).await?;
        if current.is_some() {
            outln!("the config object is sound; nothing to repair")?;
            return Ok(0);
        }
        // Exclusive: no other process may be using the repository while its
        // config is replaced.
        let lock = Lock::acquire(&repo, true, "repair config", g.retry_lock.unwrap_or_default()).await?;
        let written = repo.rewrite_config().await;
        if let Err(e) = lock.release().await {
            tracing::warn!("failed to remove our lock: {e}; `backer unlock` clears it");
        }
        written?;
        outln!(
            "wrote a new config object (repository id {}); every other field follows from the format",
            repo.config().id
        )?;
        return Ok(0);
    }
    let mut repo = open_for_lock(g).await?;
    match c {
        RepairCommand::Index { read_data, dry_run } => {
            let opts = backer_repo::repair::RepairIndexOptions { read_data, dry_run };
            let report = locked(
                g,
                &mut repo,
                true,
                Access::Write,
                IndexOf::AllPacks,
                "repair index",
                async |repo, lock| Ok(backer_repo::repair::repair_index(repo, held(lock)?, &opts).await?),
            )
            .await?;
            if g.json {
                print_json(&report)?;
                return Ok(0);
            }
            if g.quiet {
                return Ok(0);
            }
            for m in &report.messages {
                outln!("{m}")?;
            }
            let verb = if dry_run { "would" } else { "did" };
            if !report.changed {
                outln!("the index matches the packs; nothing to repair")?;
            } else {
                outln!(
                    "repair {verb}: keep {} packs as indexed, add {} from their headers, salvage {} ({} blobs), \
                     drop {} missing and {} unreadable; {} blobs lost; replace {} index files ({} damaged)",
                    report.packs_kept,
                    report.packs_added,
                    report.packs_salvaged,
                    report.blobs_salvaged,
                    report.packs_missing,
                    report.packs_unreadable,
                    report.blobs_lost,
                    report.index_files_replaced.max(report.index_files_damaged),
                    report.index_files_damaged
                )?;
                if report.blobs_lost > 0 && !dry_run {
                    outln!(
                        "next: `backer repair snapshots` rewrites the snapshots that used the lost blobs"
                    )?;
                }
            }
        }
        RepairCommand::Snapshots { dry_run } => {
            let opts = backer_repo::repair::RepairSnapshotsOptions { dry_run };
            let report = locked(
                g,
                &mut repo,
                true,
                Access::Write,
                IndexOf::AllPacks,
                "repair snapshots",
                async |repo, lock| Ok(backer_repo::repair::repair_snapshots(repo, held(lock)?, &opts).await?),
            )
            .await?;
            if g.json {
                print_json(&report)?;
                return Ok(0);
            }
            if g.quiet {
                return Ok(0);
            }
            let verb = if dry_run { "would remove" } else { "removed" };
            for r in &report.removed {
                outln!("{verb} damaged snapshot file {}", escape(r))?;
            }
            for r in &report.rewritten {
                match r.new {
                    Some(new) => outln!(
                        "snapshot {} rewritten as {} (tag `repaired`):",
                        r.old.short(),
                        new.short()
                    )?,
                    None => outln!("snapshot {} would be rewritten:", r.old.short())?,
                }
                for d in &r.dropped {
                    outln!("  {d}")?;
                }
            }
            outln!(
                "{} snapshots: {} intact, {} {}, {} {verb}",
                report.snapshots,
                report.intact,
                report.rewritten.len(),
                if dry_run { "to rewrite" } else { "rewritten" },
                report.removed.len()
            )?;
        }
        RepairCommand::Config => {}
    }
    Ok(0)
}

fn print_prune(g: &Global, r: &PruneReport) -> Result<()> {
    if g.json {
        return print_json(r);
    }
    if g.quiet {
        return Ok(());
    }
    let verb = if r.dry_run { "would" } else { "did" };
    outln!(
        "prune {verb}: delete {} unused packs and {} orphaned ones, repack {} ({} of used data moved)",
        r.packs_deleted,
        r.orphan_packs,
        r.packs_repacked,
        size(r.bytes_repacked)
    )?;
    if r.staging_files > 0 {
        outln!(
            "prune {verb}: remove {} staging files ({}) left by interrupted writes",
            r.staging_files,
            size(r.staging_bytes)
        )?;
    }
    outln!(
        "space: {} before, {} freed, {} unused left in partly used packs; {} blobs used by {} snapshots",
        size(r.bytes_before),
        size(r.bytes_freed),
        size(r.unused_bytes_kept),
        r.blobs_used,
        r.snapshots
    )?;
    Ok(())
}

pub async fn prune(g: &Global, a: PruneArgs) -> Result<u8> {
    if g.no_lock {
        bail!("--no-lock is only for commands that read: prune writes");
    }
    let mut repo = open_for_lock(g).await?;
    let opts = PruneOptions {
        max_unused: a.max_unused,
        dry_run: a.dry_run,
    };
    run_prune(g, &mut repo, &opts).await?;
    Ok(0)
}

/// Prune under an exclusive lock (prune needs `&mut` the repository to
/// reload its index, so this does not go through `locked`).
async fn run_prune(g: &Global, repo: &mut Repository, opts: &PruneOptions) -> Result<()> {
    let lock = Lock::acquire(repo, true, "prune", g.retry_lock.unwrap_or_default()).await?;
    let result = backer_repo::prune::prune(repo, &lock, opts).await;
    if let Err(e) = lock.release().await {
        tracing::warn!("failed to remove our lock: {e}; `backer unlock` clears it");
    }
    print_prune(g, &result?)
}

pub async fn forget(g: &Global, a: ForgetArgs) -> Result<u8> {
    let mut repo = open_for_lock(g).await?;
    let policy = RetentionPolicy {
        keep_last: a.keep_last,
        keep_hourly: a.keep_hourly,
        keep_daily: a.keep_daily,
        keep_weekly: a.keep_weekly,
        keep_monthly: a.keep_monthly,
        keep_yearly: a.keep_yearly,
        keep_within_secs: a
            .keep_within
            .as_deref()
            .map(backer_repo::retention::parse_duration)
            .transpose()?,
        keep_tags: a.keep_tags,
    };
    if policy.is_empty() && a.snapshots.is_empty() {
        bail!("nothing to forget: give snapshot ids or a keep rule (--keep-last, --keep-daily, …)");
    }
    let grouping = Grouping::parse(&a.group_by)?;
    let removed = locked(
        g,
        &mut repo,
        false,
        Access::Write,
        IndexOf::AllPacks,
        "forget",
        async |repo, lock| {
            let lock = held(lock)?;
            let loaded = repo.load_snapshots().await?;
            let filter = host_filter(a.host.as_ref(), None);
            let mut remove = Vec::new();
            for spec in &a.snapshots {
                // A damaged snapshot file can be forgotten by its id too.
                let damaged: Vec<SnapshotId> = loaded
                    .damaged
                    .iter()
                    .filter_map(|d| d.name.strip_prefix("snapshots/"))
                    .filter(|n| spec.len() >= 4 && n.starts_with(&spec.to_ascii_lowercase()))
                    .filter_map(|n| n.parse().ok())
                    .collect();
                match (
                    backer_repo::snapshot::find(loaded.snapshots.clone(), spec, &filter),
                    damaged.as_slice(),
                ) {
                    (Ok(s), []) => remove.push(s.id),
                    (Err(backer_repo::Error::NoSuchSnapshot(_)), [one]) => remove.push(*one),
                    (Ok(_), _) | (Err(_), [_, ..]) => {
                        return Err(backer_repo::Error::AmbiguousSnapshot(spec.clone()).into());
                    }
                    (Err(e), []) => return Err(e.into()),
                }
            }
            let all: Vec<_> = loaded
                .snapshots
                .into_iter()
                .filter(|s| filter.matches(&s.snapshot))
                .collect();
            let decisions = if policy.is_empty() {
                Vec::new()
            } else {
                let plan = policy.plan_forget(&all, grouping)?;
                remove.extend(plan.remove);
                plan.groups
            };
            remove.sort();
            remove.dedup();
            if g.json {
                print_json(&serde_json::json!({
                    "dry_run": a.dry_run,
                    "groups": decisions,
                    "remove": remove.iter().map(|id| id.to_hex()).collect::<Vec<_>>(),
                }))?;
            } else if !g.quiet {
                for group in &decisions {
                    outln!(
                        "host {} paths {}:",
                        group.group.host.as_deref().unwrap_or("*"),
                        group
                            .group
                            .paths
                            .as_ref()
                            .map(|p| p.join(" "))
                            .unwrap_or_else(|| "*".into())
                    )?;
                    for d in &group.snapshots {
                        outln!(
                            "  {:<6} {}  {}  {}",
                            if d.keep { "keep" } else { "remove" },
                            d.id.short(),
                            d.time.format("%Y-%m-%d %H:%M:%S"),
                            d.reasons.join(", ")
                        )?;
                    }
                }
                outln!(
                    "{} {} snapshots",
                    if a.dry_run { "would remove" } else { "removing" },
                    remove.len()
                )?;
            }
            if !a.dry_run {
                repo.forget(&remove, lock).await?;
            }
            Ok(remove)
        },
    )
    .await?;
    if a.prune && (!removed.is_empty() || !a.dry_run) {
        let opts = PruneOptions {
            max_unused: a.max_unused,
            dry_run: a.dry_run,
        };
        run_prune(g, &mut repo, &opts).await?;
    }
    Ok(0)
}

pub async fn unlock(g: &Global, a: UnlockArgs) -> Result<u8> {
    refuse_no_lock(g, "unlock")?;
    let repo = open(g).await?;
    let removed = lock::unlock(&repo, a.remove_all).await?;
    if g.json {
        print_json(&removed.iter().map(|l| l.describe()).collect::<Vec<_>>())?;
    } else {
        for l in &removed {
            outln!(
                "removed {} ({})",
                l.describe(),
                l.stale.as_deref().unwrap_or("removed on request")
            )?;
        }
        outln!("{} locks removed", removed.len())?;
    }
    Ok(0)
}
