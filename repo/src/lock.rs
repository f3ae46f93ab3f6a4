//! Locks: who is using the repository, so that prune never deletes what a
//! running backup relies on.
//!
//! Backups, restores, checks and forgets take a shared lock; prune takes an
//! exclusive one. A lock is an object in `locks/`; taking one means writing it,
//! then listing: if a conflicting lock that is not stale is there, ours is
//! removed again and the caller waits or fails. Two lockers that race both see
//! each other and both back off; neither proceeds wrongly.
//!
//! Holders refresh their lock every [`Timing::refresh`]. A lock is stale when
//! the store has not seen it refreshed for [`Timing::stale`] (judged with the
//! store's clock, not the hosts'), or at once when it belongs to a process on
//! this host that no longer exists. A holder checks before and after every
//! write that must not follow a prune ([`Lock::check_fresh`]): a process paused
//! longer than [`Timing::valid`] (well under `stale`) stops instead of writing,
//! and what it wrote while paused is taken back (`Repository::save_snapshot`).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::backend::Backend;
use crate::crypto::MasterKey;
use crate::error::{Error, Result};
use crate::repository::{Dir, Kind, Repository, open_object, seal_object};
use crate::snapshot;

/// Lock lifetimes.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    pub refresh: Duration,
    pub valid: Duration,
    pub stale: Duration,
}

impl Timing {
    /// 5 minutes between refreshes, writes allowed for 20 minutes after the
    /// last one, stale after 30. `BACKER_LOCK_STALE_SECS` shortens all three in
    /// proportion, for tests that pause a process.
    pub fn from_env() -> Self {
        let stale = std::env::var("BACKER_LOCK_STALE_SECS")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .filter(|v| *v >= 3)
            .unwrap_or(30 * 60);
        let stale = Duration::from_secs(stale);
        Timing {
            refresh: stale / 6,
            valid: stale * 2 / 3,
            stale,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LockInfo {
    pub exclusive: bool,
    pub hostname: String,
    pub pid: u32,
    pub username: String,
    /// What the holder is doing (`backup`, `prune`, …), for messages.
    pub purpose: String,
    pub created: DateTime<Utc>,
    /// Random, so two locks never share a name.
    pub nonce: u64,
    /// The holder's PID namespace and boot ([`pid_space`]): its PID says
    /// whether it is gone only to a process of the same. Empty in locks of
    /// older versions.
    pub pid_space: String,
}

/// [`LockInfo`] as older versions wrote it, without `pid_space`: still
/// read, so their running commands' locks keep counting.
#[derive(Deserialize)]
struct LockInfoV1 {
    exclusive: bool,
    hostname: String,
    pid: u32,
    username: String,
    purpose: String,
    created: DateTime<Utc>,
    nonce: u64,
}

/// Opens the lock object `name`, in either form.
pub fn open_lock(key: &MasterKey, name: &str, bytes: &[u8]) -> Result<LockInfo> {
    match open_object::<LockInfo>(key, Kind::Lock, name, bytes) {
        Err(Error::Decode { .. }) => {
            let v1 = open_object::<LockInfoV1>(key, Kind::Lock, name, bytes)?;
            Ok(LockInfo {
                exclusive: v1.exclusive,
                hostname: v1.hostname,
                pid: v1.pid,
                username: v1.username,
                purpose: v1.purpose,
                created: v1.created,
                nonce: v1.nonce,
                pid_space: String::new(),
            })
        }
        r => r,
    }
}

/// This process's PID namespace and boot, e.g. `pid:[4026531836]
/// 0d5f…`; empty when either is unknown. Two hosts may share a name (VMs
/// left as `localhost`), and so do a host and its containers (host
/// network): a PID alone would then judge a live holder elsewhere gone.
pub fn pid_space() -> &'static str {
    // Read once: it cannot change while the process runs, and every lock
    // judged asks for it.
    static SPACE: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    SPACE.get_or_init(|| {
        let ns = std::fs::read_link("/proc/self/ns/pid").map(|p| p.display().to_string());
        let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id");
        match (ns, boot) {
            (Ok(ns), Ok(boot)) if !boot.trim().is_empty() => format!("{ns} {}", boot.trim()),
            _ => String::new(),
        }
    })
}

/// A lock found in the repository.
#[derive(Debug, Clone)]
pub struct FoundLock {
    pub name: String,
    /// `None` for a lock that cannot be read (damaged, or not a lock at
    /// all): it is stale, since no holder could refresh it either.
    pub info: Option<LockInfo>,
    /// Last write as the store saw it.
    pub modified: DateTime<Utc>,
    pub stale: Option<String>,
}

impl FoundLock {
    pub fn describe(&self) -> String {
        let Some(info) = &self.info else {
            return format!(
                "an unreadable lock locks/{} (written {})",
                self.name,
                self.modified.format("%Y-%m-%d %H:%M:%S UTC")
            );
        };
        format!(
            "{} lock held by {} (pid {}) on {} for {}, last refreshed {}",
            if info.exclusive {
                "an exclusive"
            } else {
                "a shared"
            },
            info.username,
            info.pid,
            info.hostname,
            info.purpose,
            self.modified.format("%Y-%m-%d %H:%M:%S UTC")
        )
    }

    fn exclusive(&self) -> bool {
        self.info.as_ref().is_some_and(|i| i.exclusive)
    }
}

/// Time since boot, counting time suspended ([`Instant`] stops then): a
/// laptop that slept or a VM that was paused past a lock's validity must not
/// wake up believing its lock fresh while others judged it stale.
fn boot_clock() -> Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Boottime);
    Duration::new(
        u64::try_from(t.tv_sec).unwrap_or(0),
        u32::try_from(t.tv_nsec).unwrap_or(0),
    )
}

struct Held {
    name: String,
    /// When the refresh that wrote the current lock started (by [`boot_clock`]).
    last_refresh: Duration,
    refresh_error: Option<String>,
    /// Set once a refresh came too late: others may have judged the lock
    /// stale meanwhile, so refreshing it now would not undo that.
    expired: bool,
    /// Set once a refresh found the lock it replaces removed by someone else.
    removed: bool,
    /// Set by [`Lock::release`]: work still checking the lock (a server's
    /// upload of a job that ended) hears that, not of someone else.
    released: bool,
    /// Earlier names of this lock whose delete failed after a refresh:
    /// deleted again at each refresh and on release, or they would hold
    /// others off until they went stale.
    leftover: Vec<String>,
}

/// Deletes `held`'s leftover names; those that fail stay listed.
async fn delete_leftovers(backend: &Backend, held: &Mutex<Held>) {
    let names = held.lock().leftover.clone();
    for name in names {
        if backend.delete(&lock_path(&name)).await.is_ok() {
            held.lock().leftover.retain(|n| *n != name);
        }
    }
}

/// A lock this process holds. Release it with [`Lock::release`]; a process that
/// dies leaves it behind, where it is recognised as stale, and one that is
/// interrupted removes it with [`release_held`].
pub struct Lock {
    backend: Backend,
    key: Arc<MasterKey>,
    info: LockInfo,
    held: Arc<Mutex<Held>>,
    timing: Timing,
    refresher: Option<tokio::task::JoinHandle<()>>,
    /// Held while this lock is written anew (see [`Registered::gate`]).
    gate: Gate,
    /// Its entry in [`HELD`].
    registered: u64,
}

type Gate = Arc<tokio::sync::Mutex<()>>;

/// Every lock this process holds, by a number of its own, so an
/// interrupted command can remove them on its way out whatever it was
/// doing (see [`release_held`]).
static HELD: Mutex<std::collections::BTreeMap<u64, Registered>> =
    Mutex::new(std::collections::BTreeMap::new());
static NEXT_REGISTERED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

struct Registered {
    backend: Backend,
    held: Arc<Mutex<Held>>,
    refresher: Option<tokio::task::AbortHandle>,
    /// Held while the lock is written until its name is recorded (or, for
    /// [`Lock::release`], until its refresher is stopped), through each
    /// write made under the lock ([`LockCheck::hold_for_write`]), and by
    /// [`release_held`]: an interrupt cannot fall between a lock's write and
    /// its record, and leave a lock no one knows of, nor remove a lock while
    /// a write it covers may still land. One per lock: a slow
    /// store delays only its own locks' refreshes, not a server's others.
    gate: Gate,
}

/// Set by [`release_held`]: no lock is written after it.
static CLOSING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn register(backend: &Backend, held: &Arc<Mutex<Held>>, gate: &Gate) -> u64 {
    let n = NEXT_REGISTERED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let entry = Registered {
        backend: backend.clone(),
        held: Arc::clone(held),
        refresher: None,
        gate: Arc::clone(gate),
    };
    HELD.lock().insert(n, entry);
    n
}

fn unregister(n: u64) {
    HELD.lock().remove(&n);
}

/// Removes every lock this process holds and stops refreshing them: for a
/// command interrupted by a signal, so the repository is not left locked
/// until the lock goes stale. Returns how many were removed.
pub async fn release_held() -> usize {
    CLOSING.store(true, std::sync::atomic::Ordering::SeqCst);
    let all = std::mem::take(&mut *HELD.lock());
    let mut removed = 0;
    for r in all.into_values() {
        // Kept: the process ends after this, and must write no lock meanwhile.
        std::mem::forget(r.gate.lock_owned().await);
        if let Some(a) = &r.refresher {
            a.abort();
        }
        let name = r.held.lock().name.clone();
        if !name.is_empty() && r.backend.delete(&lock_path(&name)).await.is_ok() {
            removed += 1;
        }
        delete_leftovers(&r.backend, &r.held).await;
    }
    removed
}

impl std::fmt::Debug for Lock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lock").field("info", &self.info).finish()
    }
}

fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    crate::crypto::random_fill(&mut b);
    u64::from_le_bytes(b)
}

fn lock_path(name: &str) -> String {
    format!("locks/{name}")
}

async fn write_lock(backend: &Backend, key: &MasterKey, info: &LockInfo) -> Result<String> {
    let (name, bytes) = seal_object(key, Kind::Lock, info)?;
    backend.put_new(&name, bytes).await?;
    Ok(name.trim_start_matches("locks/").to_string())
}

fn process_gone(info: &LockInfo) -> bool {
    // Unknown on either side (an older version's lock): not judged by PID,
    // it goes stale with time.
    if info.hostname != snapshot::hostname() || info.pid_space.is_empty() || info.pid_space != pid_space() {
        return false;
    }
    match i32::try_from(info.pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
    {
        Some(pid) => matches!(
            rustix::process::test_kill_process(pid),
            Err(rustix::io::Errno::SRCH)
        ),
        None => true,
    }
}

/// How many times [`list_locks`] lists again when locks go while being read.
const LIST_ROUNDS: usize = 10;

/// Every lock in the repository, with staleness judged against `now` (the
/// store's time of a lock written just before; this host's clock if `None`).
pub async fn list_locks(
    repo: &Repository,
    now: Option<DateTime<Utc>>,
    timing: Timing,
) -> Result<Vec<FoundLock>> {
    // A refresh writes its lock anew, then removes the old one: a lock
    // listed and gone when read may live on under a name that listing
    // lacks, and skipping it would let a prune start beside a backup. So
    // the locks are listed again until none went while being read.
    let mut read: HashMap<String, FoundLock> = HashMap::new();
    for _ in 0..LIST_ROUNDS {
        let mut out = Vec::new();
        let mut went = false;
        for l in repo.list(Dir::Locks).await? {
            if let Some(found) = read.remove(&l.name) {
                out.push(found);
                continue;
            }
            let info = match repo.backend().get(&lock_path(&l.name)).await {
                Ok(bytes) => match open_lock(repo.key(), &l.name, &bytes) {
                    Ok(info) => Some(info),
                    Err(e) if e.is_damage() => {
                        tracing::debug!("lock locks/{} cannot be read: {e}", l.name);
                        None
                    }
                    Err(e) => return Err(e),
                },
                Err(Error::NotFound(_)) => {
                    went = true;
                    continue;
                }
                Err(e) if e.is_unreadable() => None,
                Err(e) => return Err(e),
            };
            out.push(FoundLock {
                name: l.name,
                info,
                modified: l.modified,
                stale: None,
            });
        }
        if !went {
            judge(&mut out, now.unwrap_or_else(Utc::now), timing);
            return Ok(out);
        }
        read = out.into_iter().map(|f| (f.name.clone(), f)).collect();
    }
    Err(Error::Locked(format!(
        "other commands' locks changed each of the {LIST_ROUNDS} times they were read"
    )))
}

fn judge(locks: &mut [FoundLock], now: DateTime<Utc>, timing: Timing) {
    for l in locks {
        let age = now.signed_duration_since(l.modified).to_std().unwrap_or_default();
        let Some(info) = &l.info else {
            l.stale = Some("it cannot be read".into());
            continue;
        };
        l.stale = if process_gone(info) {
            Some(format!("process {} on this host is gone", info.pid))
        } else if age > timing.stale {
            Some(format!("not refreshed for {} s", age.as_secs()))
        } else {
            None
        };
    }
}

const REMOVED: &str = "the lock was removed by someone else";

/// Checks a [`Lock`] from where the lock itself is not at hand.
#[derive(Clone)]
pub struct LockCheck {
    backend: Backend,
    held: Arc<Mutex<Held>>,
    valid: Duration,
    gate: Gate,
}

impl LockCheck {
    /// Held through a write that must not outlive the lock: an interrupted
    /// process removes its locks ([`release_held`]) only once such a write
    /// has ended, never while it may still land.
    pub(crate) async fn hold_for_write(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.gate.lock().await
    }

    /// Fails when this lock may no longer be relied on: not refreshed within
    /// [`Timing::valid`] (the process was paused, or storage failed), or
    /// removed by someone else, or released. Call right before writes
    /// that a prune must not race: index files and snapshots.
    pub async fn check_fresh(&self) -> Result<()> {
        let (name, elapsed, err, expired, removed, released) = {
            let h = self.held.lock();
            (
                h.name.clone(),
                boot_clock().saturating_sub(h.last_refresh),
                h.refresh_error.clone(),
                h.expired,
                h.removed,
                h.released,
            )
        };
        if released {
            return Err(Error::LockExpired(
                "the lock was released: the job or command that held it ended".into(),
            ));
        }
        if removed {
            return Err(Error::LockExpired(REMOVED.into()));
        }
        if expired || elapsed > self.valid {
            return Err(Error::LockExpired(format!(
                "the lock was last refreshed {} s ago{}; another process may have pruned meanwhile",
                elapsed.as_secs(),
                err.map(|e| format!(" (refresh failed: {e})")).unwrap_or_default()
            )));
        }
        if self.backend.head(&lock_path(&name)).await?.is_none() {
            // A refresh may have replaced it meanwhile: then the new one counts.
            let now = self.held.lock().name.clone();
            if now == name || self.backend.head(&lock_path(&now)).await?.is_none() {
                return Err(Error::LockExpired(REMOVED.into()));
            }
        }
        Ok(())
    }
}

impl Lock {
    /// Takes a lock, waiting up to `wait` for conflicting ones to go away.
    pub async fn acquire(repo: &Repository, exclusive: bool, purpose: &str, wait: Duration) -> Result<Lock> {
        Self::acquire_with(repo, exclusive, purpose, wait, Timing::from_env()).await
    }

    /// [`Lock::acquire`] with explicit lifetimes.
    pub async fn acquire_with(
        repo: &Repository,
        exclusive: bool,
        purpose: &str,
        wait: Duration,
        timing: Timing,
    ) -> Result<Lock> {
        let started = Instant::now();
        loop {
            let info = LockInfo {
                exclusive,
                hostname: snapshot::hostname(),
                pid: std::process::id(),
                username: snapshot::username(),
                purpose: purpose.to_string(),
                created: Utc::now(),
                nonce: random_u64(),
                pid_space: pid_space().to_string(),
            };
            // Known before it exists: an interrupt while it is written, or
            // while others are looked at, must not leave it behind.
            let gate: Gate = Arc::default();
            let writing = Arc::clone(&gate).lock_owned().await;
            let held = Arc::new(Mutex::new(Held {
                name: String::new(),
                last_refresh: boot_clock(),
                refresh_error: None,
                expired: false,
                removed: false,
                released: false,
                leftover: Vec::new(),
            }));
            let registered = register(repo.backend(), &held, &gate);
            if CLOSING.load(std::sync::atomic::Ordering::SeqCst) {
                unregister(registered);
                return Err(Error::Interrupted("the process is ending".into()));
            }
            let name = match write_lock(repo.backend(), repo.key(), &info).await {
                Ok(name) => name,
                Err(e) => {
                    unregister(registered);
                    return Err(e);
                }
            };
            {
                let mut h = held.lock();
                h.name = name.clone();
                h.last_refresh = boot_clock();
            }
            drop(writing);
            // Why this attempt backs off, if it does.
            let refused = match list_locks(repo, None, timing).await {
                Ok(mut all) => {
                    // Judge others by the store's clock: the time it gave our own lock.
                    if let Some(now) = all.iter().find(|l| l.name == name).map(|l| l.modified) {
                        judge(&mut all, now, timing);
                    }
                    let conflicts: Vec<&FoundLock> = all
                        .iter()
                        .filter(|l| l.name != name && l.stale.is_none() && (exclusive || l.exclusive()))
                        .collect();
                    for l in all.iter().filter(|l| l.name != name && l.stale.is_some()) {
                        tracing::warn!(
                            "ignoring a stale lock ({}): {}; `backer unlock` removes it",
                            l.stale.as_deref().unwrap_or(""),
                            l.describe()
                        );
                    }
                    if conflicts.is_empty() {
                        let mut lock = Lock {
                            backend: repo.backend().clone(),
                            key: Arc::clone(repo.key()),
                            info,
                            held,
                            timing,
                            refresher: None,
                            gate,
                            registered,
                        };
                        lock.start_refresher();
                        return Ok(lock);
                    }
                    let described: Vec<String> = conflicts.iter().map(|l| l.describe()).collect();
                    format!(
                        "{}; wait for it to finish (or pass --retry-lock), and if its holder is gone \
                         run `backer unlock`",
                        described.join("; ")
                    )
                }
                // Others' locks kept changing while read: whether one
                // conflicts is unknown, so it is waited out as one that does.
                Err(Error::Locked(why)) => format!("{why}; try again, or pass --retry-lock"),
                Err(e) => {
                    // Not knowing who else holds the repository, we hold
                    // nothing: take our lock back rather than leave it.
                    let _ = repo.backend().delete(&lock_path(&name)).await;
                    unregister(registered);
                    return Err(e);
                }
            };
            // Deleted before it is forgotten: an interrupt meanwhile still
            // finds it to remove.
            let deleted = repo.backend().delete(&lock_path(&name)).await;
            unregister(registered);
            deleted?;
            if started.elapsed() >= wait {
                return Err(Error::Locked(refused));
            }
            let pause = Duration::from_secs(2).min(wait.saturating_sub(started.elapsed()));
            tokio::time::sleep(pause.max(Duration::from_millis(100))).await;
        }
    }

    fn start_refresher(&mut self) {
        let (backend, key, info, held, gate, every, valid) = (
            self.backend.clone(),
            Arc::clone(&self.key),
            self.info.clone(),
            Arc::clone(&self.held),
            Arc::clone(&self.gate),
            self.timing.refresh,
            self.timing.valid,
        );
        self.refresher = Some(tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                // A refresh counts from when it started: a pause in the middle
                // of writing must not make the lock look fresh afterwards.
                let started = boot_clock();
                delete_leftovers(&backend, &held).await;
                {
                    let mut h = held.lock();
                    if started.saturating_sub(h.last_refresh) > valid {
                        // We were paused (or storage failed) past the validity:
                        // never refresh again, the holder must stop.
                        h.expired = true;
                        return;
                    }
                }
                let mut fresh = info.clone();
                fresh.created = Utc::now();
                fresh.nonce = random_u64();
                let writing = gate.lock().await;
                let name = match write_lock(&backend, &key, &fresh).await {
                    Ok(name) => name,
                    Err(e) => {
                        held.lock().refresh_error = Some(e.to_string());
                        continue;
                    }
                };
                // Removed meanwhile (`backer unlock --remove-all`, or judged
                // stale by another): a prune may have started since, and
                // writing the lock anew would hide that from the holder.
                let old = held.lock().name.clone();
                let removed = match backend.head(&lock_path(&old)).await {
                    Ok(found) => found.is_none(),
                    // Not known: kept as it was, and tried again next time
                    // (taking the new name would hide a removal).
                    Err(e) => {
                        held.lock().refresh_error = Some(e.to_string());
                        let _ = backend.delete(&lock_path(&name)).await;
                        continue;
                    }
                };
                let lost = {
                    let mut h = held.lock();
                    // Landed more than `valid` after the one before it
                    // started (a pause while writing, slow storage): others
                    // may have judged the lock stale meanwhile, and this
                    // refresh cannot undo that.
                    let late = boot_clock().saturating_sub(h.last_refresh) > valid;
                    if removed || late {
                        h.expired = late;
                        h.removed = removed;
                    } else {
                        h.last_refresh = started;
                        h.refresh_error = None;
                        h.name = name.clone();
                    }
                    removed || late
                };
                if lost {
                    // Before the gate opens: a release then removes the
                    // held (old) name only. That one stays for it.
                    let _ = backend.delete(&lock_path(&name)).await;
                    return;
                }
                // The old name goes before the gate opens: a release after
                // that knows only the new one (and the leftovers).
                if backend.delete(&lock_path(&old)).await.is_err() {
                    held.lock().leftover.push(old);
                }
                drop(writing);
            }
        }));
        if let Some(r) = HELD.lock().get_mut(&self.registered) {
            r.refresher = self.refresher.as_ref().map(|h| h.abort_handle());
        }
    }

    /// Fails when this lock may no longer be relied on: see
    /// [`LockCheck::check_fresh`].
    pub async fn check_fresh(&self) -> Result<()> {
        self.check().check_fresh().await
    }

    /// What checks this lock, for work that does not hold it (a server's
    /// upload streams, while their job does).
    pub fn check(&self) -> LockCheck {
        LockCheck {
            backend: self.backend.clone(),
            held: Arc::clone(&self.held),
            valid: self.timing.valid,
            gate: Arc::clone(&self.gate),
        }
    }

    /// Stops refreshing and removes the lock.
    pub async fn release(mut self) -> Result<()> {
        {
            // Never stopped in the middle of writing the lock anew.
            let _writing = self.gate.lock().await;
            if let Some(r) = self.refresher.take() {
                r.abort();
            }
        }
        let name = {
            let mut h = self.held.lock();
            h.released = true;
            h.name.clone()
        };
        // Forgotten only once deleted: an interrupt meanwhile still finds it.
        let deleted = self.backend.delete(&lock_path(&name)).await;
        delete_leftovers(&self.backend, &self.held).await;
        unregister(self.registered);
        deleted
    }

    /// Simulates a process that stopped: refreshing ends, the lock stays.
    #[doc(hidden)]
    pub fn stop_refreshing_for_tests(&mut self) {
        if let Some(r) = self.refresher.take() {
            r.abort();
        }
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        if let Some(r) = self.refresher.take() {
            r.abort();
        }
        unregister(self.registered);
    }
}

/// Removes stale locks, or every lock with `all`. Returns what was removed.
pub async fn unlock(repo: &Repository, all: bool) -> Result<Vec<FoundLock>> {
    let timing = Timing::from_env();
    let mut removed = Vec::new();
    for l in list_locks(repo, None, timing).await? {
        if all || l.stale.is_some() {
            repo.backend().delete(&lock_path(&l.name)).await?;
            removed.push(l);
        }
    }
    Ok(removed)
}
