//! Storage behind the repository, through `object_store`: a local directory
//! (the embedded default and the PVC case), S3 and compatible stores, and
//! memory for tests. The engine only ever creates objects (never overwrites),
//! reads them whole or by range, lists them, and deletes them.
//!
//! Every call is retried when it fails in a way that may pass (a dropped
//! connection, a hung call, a read cut short), and a write retried after
//! a lost reply is recognised by reading the object back. [`faults`] injects
//! exactly those failures for tests.

pub mod faults;
mod staging;

pub use staging::Spool;
use staging::{DIRECT_PIECE, stale_staging, write_local};

use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::aws::{AmazonS3, AmazonS3Builder, AmazonS3ConfigKey};
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::{
    ClientOptions, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, RetryConfig,
};

use crate::error::{Chain, Error, Result};

/// A repository's storage: an object store and the prefix the repository
/// lives under.
#[derive(Clone, Debug)]
pub struct Backend {
    store: Arc<dyn ObjectStore>,
    root: Path,
    /// Where this is, for messages; never holds credentials.
    location: String,
    /// Local directory backends create their root on `init`.
    local_dir: Option<std::path::PathBuf>,
    /// Whether a local directory is read and written directly, bypassing
    /// `store` (off when `store` is wrapped, so the wrapper sees every call).
    direct: bool,
    /// Whether local writes are made durable before they count as done.
    /// Off only with `BACKER_UNSAFE_NO_FSYNC=1` (docs/FORMAT.md says why not).
    durable: bool,
    retry: Retry,
    /// For an S3 location: the client and its region, to create the bucket.
    s3: Option<(Arc<AmazonS3>, String)>,
    /// Whether `prepare_for_init` created the bucket.
    bucket_created: bool,
    /// Where a repository here may keep local copies of what it re-reads
    /// (see [`crate::cache`]); used only for remote locations.
    cache_root: Option<std::path::PathBuf>,
}

/// Chooses where an S3 client's credentials come from, in the usual order:
/// `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY` (and `AWS_SESSION_TOKEN`),
/// web identity (`AWS_WEB_IDENTITY_TOKEN_FILE` and `AWS_ROLE_ARN`: IRSA,
/// workload identity), container credentials (ECS, EKS Pod Identity), the
/// profile file (`AWS_SHARED_CREDENTIALS_FILE` or `~/.aws/credentials`,
/// profile `AWS_PROFILE` or `default`). The instance metadata service only
/// when asked (`credentials=instance`): a probe of it elsewhere hangs or, on
/// someone else's cloud machine, borrows that machine's role.
fn s3_credentials(builder: AmazonS3Builder, instance: bool) -> std::result::Result<AmazonS3Builder, String> {
    let set = |k: &str| std::env::var_os(k).is_some_and(|v| !v.is_empty());
    if set("AWS_ACCESS_KEY_ID") || set("AWS_SECRET_ACCESS_KEY") {
        if !(set("AWS_ACCESS_KEY_ID") && set("AWS_SECRET_ACCESS_KEY")) {
            return Err("set both AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or neither".into());
        }
        return Ok(builder);
    }
    if (set("AWS_WEB_IDENTITY_TOKEN_FILE") && set("AWS_ROLE_ARN"))
        || set("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI")
        || (set("AWS_CONTAINER_CREDENTIALS_FULL_URI") && set("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE"))
    {
        return Ok(builder);
    }
    if let Some(found) = profile_credentials()? {
        let mut b = builder
            .with_access_key_id(found.key_id)
            .with_secret_access_key(found.secret);
        if let Some(token) = found.token {
            b = b.with_token(token);
        }
        return Ok(b);
    }
    if instance {
        return Ok(builder);
    }
    Err(
        "no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE with a \
         profile in ~/.aws/credentials, or AWS_WEB_IDENTITY_TOKEN_FILE and AWS_ROLE_ARN; to use the \
         machine's instance role, add credentials=instance to the URL"
            .into(),
    )
}

struct ProfileCredentials {
    key_id: String,
    secret: String,
    token: Option<String>,
}

/// The profile's keys from the shared credentials file, if it has them. A
/// profile named by `AWS_PROFILE` that is not there is an error, not a
/// silent fall-through.
fn profile_credentials() -> std::result::Result<Option<ProfileCredentials>, String> {
    let named = std::env::var("AWS_PROFILE").ok().filter(|p| !p.is_empty());
    let profile = named.clone().unwrap_or_else(|| "default".into());
    let file = match std::env::var_os("AWS_SHARED_CREDENTIALS_FILE") {
        Some(f) => std::path::PathBuf::from(f),
        None => match std::env::var_os("HOME") {
            Some(home) => std::path::Path::new(&home).join(".aws/credentials"),
            None => return Ok(None),
        },
    };
    let text = match std::fs::read_to_string(&file) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && named.is_none() => return Ok(None),
        Err(e) => {
            return Err(format!(
                "failed to read {} for profile {profile}: {e}",
                file.display()
            ));
        }
    };
    let mut in_profile = false;
    let (mut key_id, mut secret, mut token) = (None, None, None);
    for line in text.lines().map(str::trim) {
        if line.starts_with('#') || line.starts_with(';') || line.is_empty() {
            continue;
        }
        if let Some(section) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            in_profile = section.trim() == profile;
            continue;
        }
        if !in_profile {
            continue;
        }
        if let Some((k, v)) = line.split_once('=') {
            let v = v.trim().to_string();
            match k.trim() {
                "aws_access_key_id" => key_id = Some(v),
                "aws_secret_access_key" => secret = Some(v),
                "aws_session_token" => token = Some(v),
                _ => {}
            }
        }
    }
    match (key_id, secret) {
        (Some(key_id), Some(secret)) => Ok(Some(ProfileCredentials {
            key_id,
            secret,
            token,
        })),
        _ if named.is_some() => Err(format!(
            "profile {profile} (AWS_PROFILE) has no aws_access_key_id and aws_secret_access_key in {}",
            file.display()
        )),
        _ => Ok(None),
    }
}

/// `BACKER_UNSAFE_NO_FSYNC=1` skips making local writes durable: faster on
/// some disks, and a power cut may then leave snapshots naming data that
/// never reached the disk.
fn durable_from_env() -> bool {
    !matches!(
        std::env::var("BACKER_UNSAFE_NO_FSYNC").as_deref(),
        Ok("1") | Ok("true")
    )
}

/// How calls that may pass on a second try are retried.
#[derive(Clone, Copy, Debug)]
struct Retry {
    /// Retries after a transient error. S3's client retries its own requests,
    /// so on S3 this layer only retries what that client cannot see.
    errors: u32,
    /// Retries after a read that came back shorter than asked.
    short_reads: u32,
    /// Longest one call may take before it counts as hung.
    call_timeout: Duration,
}

impl Retry {
    const LOCAL: Retry = Retry {
        errors: 4,
        short_reads: 3,
        call_timeout: Duration::from_secs(300),
    };
    const S3: Retry = Retry {
        errors: 0,
        short_reads: 3,
        call_timeout: Duration::from_secs(300),
    };

    fn allows(&self, e: &Error, attempt: u32) -> bool {
        match e {
            Error::Truncated { .. } => attempt < self.short_reads,
            Error::Backend { source, .. } => attempt < self.errors && transient(source),
            _ => false,
        }
    }
}

/// Key files hold the wrapped master key: readable by the owner only.
/// Other objects are sealed, but none is writable by group or others.
fn object_mode(name: &str) -> u32 {
    if name.starts_with("keys/") { 0o600 } else { 0o644 }
}

/// Makes the directory durable: after an fsync of a directory, the names
/// created or removed in it survive a power cut.
fn sync_dir(dir: &std::path::Path) -> Result<()> {
    let fd = std::fs::File::open(dir).map_err(|e| Error::io("open", dir, e))?;
    fd.sync_all().map_err(|e| Error::io("sync", dir, e))
}

/// Creates `dir` and any missing parents below `root`, each made durable in
/// its parent before anything is written into it.
fn ensure_dir(root: &std::path::Path, dir: &std::path::Path, durable: bool) -> Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent()
        && parent != dir
        && dir.starts_with(root)
        && dir != root
    {
        ensure_dir(root, parent, durable)?;
    }
    match std::fs::create_dir(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Ok(()),
        Err(e) => return Err(Error::io("create", dir, e)),
    }
    match dir.parent() {
        Some(parent) if durable => sync_dir(parent),
        _ => Ok(()),
    }
}

/// Every regular file below `dir/folder`, names relative to `dir/folder`
/// with `/` between components. Read directly, not through object_store,
/// whose listing fails as a whole on one name it cannot represent (a
/// control character, bytes that are not UTF-8): such names cannot be
/// objects and are skipped, as are staging names (`#`), symlinks (never
/// followed, so a loop cannot hang a listing) and anything not a file. A
/// directory that cannot be read is an error, never a short listing.
fn list_local(dir: &std::path::Path, folder: &str) -> Result<Vec<Listed>> {
    let base = if folder.is_empty() {
        dir.to_path_buf()
    } else {
        dir.join(folder)
    };
    let mut out = Vec::new();
    let mut stack = vec![(base.clone(), String::new())];
    while let Some((path, rel)) = stack.pop() {
        let entries = match std::fs::read_dir(&path) {
            Ok(e) => e,
            // A folder no object was ever written to.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && path == base => return Ok(out),
            Err(e) => return Err(Error::io("list", &path, e)),
        };
        for entry in entries {
            let entry = entry.map_err(|e| Error::io("list", &path, e))?;
            let Some(name) = entry.file_name().to_str().map(str::to_string) else {
                tracing::debug!("ignoring a name that is not UTF-8 in {}", path.display());
                continue;
            };
            if name.contains('#') || name.chars().any(char::is_control) {
                continue;
            }
            let file_type = entry
                .file_type()
                .map_err(|e| Error::io("inspect", entry.path(), e))?;
            let child = if rel.is_empty() {
                name
            } else {
                format!("{rel}/{name}")
            };
            if file_type.is_dir() {
                stack.push((entry.path(), child));
            } else if file_type.is_file() {
                let md = entry
                    .metadata()
                    .map_err(|e| Error::io("inspect", entry.path(), e))?;
                let modified = md
                    .modified()
                    .map(chrono::DateTime::<chrono::Utc>::from)
                    .unwrap_or_default();
                out.push(Listed {
                    name: child,
                    size: md.len(),
                    modified,
                });
            }
        }
    }
    Ok(out)
}

/// Failures that say nothing about the object itself: the next try may work.
fn transient(e: &object_store::Error) -> bool {
    matches!(
        e,
        object_store::Error::Generic { .. } | object_store::Error::JoinError { .. }
    )
}

/// The waits between retries of one storage call: 100 ms doubling to 3.2 s.
/// How many retries there are is [`Retry`]'s to say. (No jitter here: the
/// S3 client's own retries below this one have it.)
fn retry_delays() -> backon::ExponentialBackoff {
    use backon::BackoffBuilder;
    backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(MAX_RETRY_DELAY)
        .without_max_times()
        .build()
}

const MAX_RETRY_DELAY: Duration = Duration::from_millis(3200);

/// An object found by [`Backend::list`]: its name relative to the listed
/// folder, and its size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    pub name: String,
    pub size: u64,
    /// When the store says the object was written (the store's clock).
    pub modified: chrono::DateTime<chrono::Utc>,
}

impl Backend {
    /// Opens a location: a path, `file:///path`, `s3://bucket/prefix`
    /// (options as query parameters: `endpoint`, `region`, `path_style`,
    /// `allow_http`, `retries`; credentials from the usual `AWS_*` variables), or
    /// `memory:` (a fresh, empty in-memory store).
    pub fn open(url: &str) -> Result<Self> {
        let bad = |reason: &str| Error::BadLocation {
            url: url.to_string(),
            reason: reason.to_string(),
        };
        if url.is_empty() {
            return Err(bad("it is empty; give a path, file://PATH or s3://BUCKET/PREFIX"));
        }
        if url == "memory:" {
            return Ok(Backend::in_memory());
        }
        if let Some(rest) = url.strip_prefix("s3://") {
            return Self::open_s3(url, rest);
        }
        let path = if let Some(rest) = url.strip_prefix("file://") {
            std::path::PathBuf::from(rest)
        } else if url.contains("://") {
            return Err(bad(
                "unknown scheme; use a path, file://PATH or s3://BUCKET/PREFIX",
            ));
        } else {
            std::path::PathBuf::from(url)
        };
        let abs = if path.is_absolute() {
            path
        } else {
            std::env::current_dir()
                .map_err(|e| Error::io("read the current directory", ".", e))?
                .join(path)
        };
        Ok(Backend {
            // The store is built lazily in `local_store` because
            // LocalFileSystem needs the directory to exist.
            store: Arc::new(InMemory::new()),
            root: Path::default(),
            location: abs.display().to_string(),
            local_dir: Some(abs),
            direct: true,
            durable: durable_from_env(),
            retry: Retry::LOCAL,
            s3: None,
            bucket_created: false,
            cache_root: None,
        }
        .with_local_store_if_present())
    }

    fn with_local_store_if_present(mut self) -> Self {
        if let Some(dir) = &self.local_dir
            && dir.is_dir()
            && let Ok(fs) = LocalFileSystem::new_with_prefix(dir)
        {
            self.store = Arc::new(fs);
        }
        self
    }

    fn open_s3(url: &str, rest: &str) -> Result<Self> {
        let bad = |reason: String| Error::BadLocation {
            url: url.to_string(),
            reason,
        };
        let (path_part, query) = match rest.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (rest, None),
        };
        let (bucket, prefix) = match path_part.split_once('/') {
            Some((b, p)) => (b, p.trim_matches('/')),
            None => (path_part, ""),
        };
        if bucket.is_empty() {
            return Err(bad("no bucket name; use s3://BUCKET/PREFIX".into()));
        }
        // Transient failures are retried with backoff; an endpoint that stays
        // down fails within about a minute instead of hanging.
        let mut retry = RetryConfig {
            max_retries: 6,
            retry_timeout: Duration::from_secs(60),
            ..Default::default()
        };
        let mut builder = AmazonS3Builder::from_env()
            .with_bucket_name(bucket)
            .with_client_options(ClientOptions::new().with_connect_timeout(Duration::from_secs(10)));
        if std::env::var_os("AWS_REGION").is_none() && std::env::var_os("AWS_DEFAULT_REGION").is_none() {
            builder = builder.with_region("us-east-1");
        }
        let mut instance_credentials = false;
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, "true"));
            let flag = |v: &str| -> Result<bool> {
                match v {
                    "true" | "1" | "yes" => Ok(true),
                    "false" | "0" | "no" => Ok(false),
                    _ => Err(bad(format!("option {k} takes true or false, not {v:?}"))),
                }
            };
            builder = match k {
                "endpoint" => {
                    if v.starts_with("http://") {
                        builder = builder.with_allow_http(true);
                    }
                    builder.with_endpoint(v)
                }
                "region" => builder.with_region(v),
                "credentials" => match v {
                    "instance" => {
                        instance_credentials = true;
                        builder
                    }
                    _ => return Err(bad(format!("option credentials takes \"instance\", not {v:?}"))),
                },
                "path_style" => builder.with_virtual_hosted_style_request(!flag(v)?),
                "allow_http" => builder.with_allow_http(flag(v)?),
                "retries" => {
                    retry.max_retries = v
                        .parse()
                        .map_err(|_| bad(format!("option retries takes a number, not {v:?}")))?;
                    builder
                }
                _ => {
                    return Err(bad(format!(
                        "unknown option {k:?}; known: endpoint, region, path_style, allow_http, retries, credentials"
                    )));
                }
            };
        }
        let builder = s3_credentials(builder, instance_credentials).map_err(bad)?;
        let region = builder
            .get_config_value(&AmazonS3ConfigKey::Region)
            .unwrap_or_else(|| "us-east-1".into());
        let store = Arc::new(
            builder
                .with_retry(retry)
                .build()
                .map_err(|e| bad(e.to_string()))?,
        );
        Ok(Backend {
            s3: Some((Arc::clone(&store), region)),
            bucket_created: false,
            cache_root: None,
            store,
            root: Path::from(prefix),
            location: format!("s3://{bucket}/{prefix}"),
            local_dir: None,
            direct: false,
            durable: true,
            retry: Retry::S3,
        })
    }

    /// Creates the bucket of an S3 location if it does not exist; says
    /// whether it did. Other locations: nothing to do.
    async fn create_bucket_if_missing(&self) -> Result<bool> {
        let Some((s3, region)) = &self.s3 else {
            return Ok(false);
        };
        match self.store.list_with_delimiter(Some(&self.root)).await {
            Ok(_) => return Ok(false),
            Err(e) => match self.err(e) {
                Error::NoSuchBucket { .. } => {}
                other => return Err(other),
            },
        }
        // object_store has no call for it: a signed PUT of the bucket's URL.
        let url = object_store::signer::Signer::signed_url(
            s3.as_ref(),
            http::Method::PUT,
            &Path::default(),
            Duration::from_secs(300),
        )
        .await
        .map_err(|e| self.err(e))?;
        let body = if region == "us-east-1" {
            // us-east-1 takes no location; every other region must be named.
            String::new()
        } else {
            format!(
                "<CreateBucketConfiguration xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\">\
                 <LocationConstraint>{region}</LocationConstraint></CreateBucketConfiguration>"
            )
        };
        let reply = reqwest::Client::new()
            .put(url.as_str())
            .header(reqwest::header::CONTENT_LENGTH, body.len())
            .body(body)
            .send()
            .await
            .map_err(|e| {
                Error::Invalid(format!(
                    "failed to create the bucket of {}: {}",
                    self.location,
                    Chain(&e)
                ))
            })?;
        let status = reply.status();
        if status.is_success() {
            return Ok(true);
        }
        let text = reply.text().await.unwrap_or_default();
        // Made by someone else meanwhile: as good.
        if text.contains("BucketAlreadyOwnedByYou") {
            return Ok(false);
        }
        Err(Error::Invalid(format!(
            "failed to create the bucket of {}: the server answered {status}: {}",
            self.location,
            text.trim()
        )))
    }

    /// A fresh, empty in-memory store.
    pub fn in_memory() -> Self {
        Backend {
            store: Arc::new(InMemory::new()),
            root: Path::default(),
            location: "memory:".into(),
            local_dir: None,
            direct: false,
            durable: true,
            retry: Retry::LOCAL,
            s3: None,
            bucket_created: false,
            cache_root: None,
        }
    }

    /// This backend behind a [`faults::FaultyStore`] that injects failures
    /// as `plan` says, counted in the returned [`faults::FaultCounts`]. For
    /// tests: a call hung longer than `call_timeout` is abandoned and retried.
    pub fn with_faults(
        &self,
        plan: faults::FaultPlan,
        call_timeout: Duration,
    ) -> (Backend, Arc<faults::FaultCounts>) {
        let counts = Arc::new(faults::FaultCounts::default());
        let store = faults::FaultyStore::new(Arc::clone(&self.store), plan, Arc::clone(&counts));
        let mut b = self.clone();
        b.store = Arc::new(store);
        b.direct = false;
        b.retry.call_timeout = call_timeout;
        (b, counts)
    }

    /// Runs `call` until it succeeds, fails for good, or runs out of retries.
    async fn retrying<T, F, Fut>(&self, what: &str, name: &str, mut call: F) -> Result<T>
    where
        F: FnMut(u32) -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        let mut attempt = 0;
        let mut delays = retry_delays();
        loop {
            let r = match tokio::time::timeout(self.retry.call_timeout, call(attempt)).await {
                Ok(r) => r,
                Err(_) => Err(self.err(object_store::Error::Generic {
                    store: "backer",
                    source: format!("{what} {name} took longer than {:?}", self.retry.call_timeout).into(),
                })),
            };
            match r {
                Err(e) if self.retry.allows(&e, attempt) => {
                    attempt += 1;
                    tracing::debug!("retrying {what} {name} (attempt {attempt}): {e}");
                    tokio::time::sleep(delays.next().unwrap_or(MAX_RETRY_DELAY)).await;
                }
                r => return r,
            }
        }
    }

    pub fn location(&self) -> &str {
        &self.location
    }

    /// Whether this is an object store across a network (each request
    /// costs a round trip), rather than a local directory or memory.
    pub fn is_remote(&self) -> bool {
        self.local_dir.is_none() && self.location != "memory:"
    }

    /// Blobs of one pack this close together are read in one request: over
    /// a network a request costs far more than the bytes between them.
    pub fn read_merge_gap(&self) -> u64 {
        if self.is_remote() { 1 << 20 } else { 64 << 10 }
    }

    /// How many reads a restore keeps in flight: more over a network, where
    /// each waits on a round trip, than on a disk, where each costs a core
    /// to decrypt and decompress.
    pub fn read_parallelism(&self) -> usize {
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2);
        if self.is_remote() { 8 } else { (cores * 2).max(2) }
    }

    /// Makes sure the location can hold a new repository: a local directory is
    /// created if missing. Fails if anything is already there.
    pub async fn prepare_for_init(&mut self) -> Result<()> {
        if let Some(dir) = self.local_dir.clone() {
            if !dir.is_dir() {
                std::fs::create_dir_all(&dir).map_err(|e| Error::io("create", &dir, e))?;
                if let Some(parent) = dir.parent().filter(|_| self.durable) {
                    sync_dir(parent)?;
                }
            }
            let fs = LocalFileSystem::new_with_prefix(&dir).map_err(|e| self.err(e))?;
            self.store = Arc::new(fs);
            let mut entries = std::fs::read_dir(&dir).map_err(|e| Error::io("read", &dir, e))?;
            if entries.next().is_some() {
                return Err(Error::NotEmpty(self.location.clone()));
            }
        }
        self.bucket_created = self.create_bucket_if_missing().await?;
        if !self.list_all("").await?.is_empty() {
            return Err(Error::NotEmpty(self.location.clone()));
        }
        Ok(())
    }

    /// This location with local copies of what is re-read kept under
    /// `root` (none with `None`), when it is remote: see [`crate::cache`].
    pub fn with_cache(mut self, root: Option<std::path::PathBuf>) -> Self {
        self.cache_root = root;
        self
    }

    /// Where copies of this remote location's objects may be kept.
    pub fn cache_root(&self) -> Option<&std::path::Path> {
        self.cache_root.as_deref().filter(|_| self.is_remote())
    }

    /// Whether `init` created the bucket (to say so).
    pub fn bucket_created(&self) -> bool {
        self.bucket_created
    }

    /// True when a local repository directory does not exist at all.
    pub fn missing_local_dir(&self) -> bool {
        self.local_dir.as_ref().is_some_and(|d| !d.is_dir())
    }

    fn path(&self, name: &str) -> Path {
        if self.root.as_ref().is_empty() {
            Path::from(name)
        } else {
            Path::from(format!("{}/{}", self.root, name))
        }
    }

    fn err(&self, source: object_store::Error) -> Error {
        // S3 says what is wrong in an error code inside the reply's text;
        // the two a new user meets first get a message of their own.
        let text = Chain(&source).to_string();
        if text.contains("<Code>NoSuchBucket</Code>") {
            return Error::NoSuchBucket {
                location: self.location.clone(),
            };
        }
        for code in [
            "InvalidAccessKeyId",
            "SignatureDoesNotMatch",
            "AccessDenied",
            "NotSignedUp",
            "InvalidToken",
            "ExpiredToken",
        ] {
            if text.contains(&format!("<Code>{code}</Code>")) {
                return Error::Refused {
                    location: self.location.clone(),
                    code: code.into(),
                };
            }
        }
        Error::Backend {
            location: self.location.clone(),
            source,
        }
    }

    /// Creates `name`; fails with [`Error::AlreadyExists`] if it exists.
    pub async fn put_new(&self, name: &str, bytes: Bytes) -> Result<()> {
        self.retrying("write", name, |attempt| {
            let bytes = bytes.clone();
            async move {
                match self.create(name, &bytes).await {
                    // A retry finding the object may find our own write,
                    // whose reply was lost: it is ours if it holds our bytes.
                    // If it cannot be read back, that failure is the answer.
                    Err(Error::AlreadyExists(_)) if attempt > 0 => match self.get(name).await {
                        Ok(stored) if stored == bytes => Ok(()),
                        Ok(_) => Err(Error::AlreadyExists(name.into())),
                        Err(e) => Err(e),
                    },
                    r => r,
                }
            }
        })
        .await
    }

    /// For a local directory written directly: a [`Spool`] that writes an
    /// object under `folder` as it is produced and names it at the end (a
    /// pack, whose name is its hash). Elsewhere `None`: the object is built
    /// in memory and stored with [`Backend::put_new`].
    pub fn spool(&self, folder: &str, handle: &tokio::runtime::Handle) -> Option<Spool> {
        let dir = self.local_dir.clone().filter(|_| self.direct)?;
        Some(Spool::new(dir, folder, self.durable, handle.clone()))
    }

    /// Staging files in a local directory (`NAME#DIGITS`, which listings
    /// skip) left by writers that died before naming them: how many and
    /// their bytes, removed when `remove`. Only safe to remove while no
    /// writer runs (under the exclusive lock). An object store has none.
    pub async fn stale_staging(&self, remove: bool) -> Result<(usize, u64)> {
        let Some(dir) = self.local_dir.clone() else {
            return Ok((0, 0));
        };
        tokio::task::spawn_blocking(move || stale_staging(&dir, remove))
            .await
            .map_err(|e| Error::Interrupted(format!("listing task failed: {e}")))?
    }

    /// One attempt at creating `name`: written durably by this module in a
    /// local directory, through the store otherwise.
    async fn create(&self, name: &str, bytes: &Bytes) -> Result<()> {
        if let Some(dir) = self.local_dir.clone().filter(|_| self.direct) {
            let (owned, data, durable) = (name.to_string(), bytes.clone(), self.durable);
            return tokio::task::spawn_blocking(move || write_local(&dir, &owned, &data, durable))
                .await
                .map_err(|e| Error::Interrupted(format!("write task failed: {e}")))?;
        }
        let opts = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        match self
            .store
            .put_opts(&self.path(name), PutPayload::from_bytes(bytes.clone()), opts)
            .await
        {
            Ok(_) => Ok(()),
            Err(object_store::Error::AlreadyExists { .. }) => Err(Error::AlreadyExists(name.into())),
            Err(e) => Err(self.err(e)),
        }
    }

    pub async fn get(&self, name: &str) -> Result<Bytes> {
        if let Some(dir) = self.local_dir.as_ref().filter(|_| self.direct) {
            let path = dir.join(name);
            let owned = name.to_string();
            return tokio::task::spawn_blocking(move || match std::fs::read(&path) {
                Ok(b) => Ok(Bytes::from(b)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(Error::NotFound(owned)),
                Err(e) => Err(Error::io("read", &path, e)),
            })
            .await
            .map_err(|e| Error::Interrupted(format!("read task failed: {e}")))?;
        }
        self.retrying("read", name, |_| async move {
            let r = match self.store.get(&self.path(name)).await {
                Ok(r) => r,
                Err(object_store::Error::NotFound { .. }) => return Err(Error::NotFound(name.into())),
                Err(e) => return Err(self.err(e)),
            };
            let want = r.meta.size;
            let bytes = r.bytes().await.map_err(|e| self.err(e))?;
            if (bytes.len() as u64) < want {
                return Err(Error::Truncated {
                    name: name.into(),
                    wanted: want,
                    got: bytes.len() as u64,
                });
            }
            Ok(bytes)
        })
        .await
    }

    pub async fn get_range(&self, name: &str, range: Range<u64>) -> Result<Bytes> {
        if self.local_dir.is_some() && self.direct {
            let this = self.clone();
            let owned = name.to_string();
            return tokio::task::spawn_blocking(move || this.pread(&owned, range))
                .await
                .map_err(|e| Error::Interrupted(format!("read task failed: {e}")))?;
        }
        let want = range.end - range.start;
        self.retrying("read", name, |_| {
            let range = range.clone();
            async move {
                match self.store.get_range(&self.path(name), range).await {
                    Ok(b) if b.len() as u64 == want => Ok(b),
                    Ok(b) => Err(Error::Truncated {
                        name: name.into(),
                        wanted: want,
                        got: b.len() as u64,
                    }),
                    Err(object_store::Error::NotFound { .. }) => Err(Error::NotFound(name.into())),
                    Err(e) => Err(self.err(e)),
                }
            }
        })
        .await
    }

    /// [`Backend::get_range`] for a thread outside the async runtime. A
    /// local directory is read directly (one `pread`), skipping the hop to a
    /// blocking pool that object_store makes for every call: restores do
    /// tens of thousands of small reads.
    pub fn read_range_blocking(
        &self,
        handle: &tokio::runtime::Handle,
        name: &str,
        range: Range<u64>,
    ) -> Result<Bytes> {
        if self.local_dir.is_none() || !self.direct {
            return handle.block_on(self.get_range(name, range));
        }
        self.pread(name, range)
    }

    /// One `pread` of a local object's range.
    fn pread(&self, name: &str, range: Range<u64>) -> Result<Bytes> {
        let dir = self
            .local_dir
            .as_ref()
            .ok_or_else(|| Error::Invalid("not a local directory".into()))?;
        let path = dir.join(name);
        let file = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(Error::NotFound(name.into())),
            Err(e) => return Err(Error::io("open", &path, e)),
        };
        let mut buf = vec![0u8; (range.end - range.start) as usize];
        match std::os::unix::fs::FileExt::read_exact_at(&file, &mut buf, range.start) {
            Ok(()) => Ok(Bytes::from(buf)),
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(Error::Truncated {
                name: name.into(),
                wanted: range.end - range.start,
                got: file
                    .metadata()
                    .map(|m| m.len().saturating_sub(range.start))
                    .unwrap_or(0),
            }),
            Err(e) => Err(Error::io("read", &path, e)),
        }
    }

    /// Reads `range` of `name` and hands it to `each` piece by piece as it
    /// arrives, so a whole pack can be read in one request without being
    /// held in memory. For a thread outside the async runtime: `each` runs
    /// on the calling thread, where it may block. A local directory is read
    /// with `pread` in pieces of [`DIRECT_PIECE`].
    pub fn stream_range_blocking(
        &self,
        handle: &tokio::runtime::Handle,
        name: &str,
        range: Range<u64>,
        each: &mut dyn FnMut(Bytes),
    ) -> Result<()> {
        if self.local_dir.is_some() && self.direct {
            let mut at = range.start;
            while at < range.end {
                let end = (at + DIRECT_PIECE as u64).min(range.end);
                each(self.pread(name, at..end)?);
                at = end;
            }
            return Ok(());
        }
        // The transfer runs on the runtime; its pieces cross to this thread
        // through a short queue, so a slow `each` holds back the download.
        let (tx, mut rx) = tokio::sync::mpsc::channel(4);
        let this = self.clone();
        let owned = name.to_string();
        let task = handle.spawn(async move { this.stream_range(&owned, range, tx).await });
        while let Some(piece) = rx.blocking_recv() {
            each(piece);
        }
        handle
            .block_on(task)
            .map_err(|e| Error::Interrupted(format!("read task failed: {e}")))?
    }

    /// Sends `range` of a remote object to `pieces` as it arrives. A
    /// transfer cut off part-way is resumed from where it stopped (a few
    /// times).
    async fn stream_range(
        &self,
        name: &str,
        range: Range<u64>,
        pieces: tokio::sync::mpsc::Sender<Bytes>,
    ) -> Result<()> {
        let mut at = range.start;
        let mut attempt = 0;
        let mut delays = retry_delays();
        while at < range.end {
            let opts = object_store::GetOptions {
                range: Some(object_store::GetRange::Bounded(at..range.end)),
                ..Default::default()
            };
            let got = match self.store.get_opts(&self.path(name), opts).await {
                Ok(r) => r,
                Err(object_store::Error::NotFound { .. }) => return Err(Error::NotFound(name.into())),
                Err(e) => return Err(self.err(e)),
            };
            let mut stream = got.into_stream();
            let mut failed = None;
            while let Some(piece) = stream.next().await {
                match piece {
                    Ok(b) => {
                        at += b.len() as u64;
                        if pieces.send(b).await.is_err() {
                            return Err(Error::Interrupted("the reader stopped".into()));
                        }
                    }
                    Err(e) => {
                        failed = Some(e);
                        break;
                    }
                }
            }
            match failed {
                None if at < range.end => {
                    return Err(Error::Truncated {
                        name: name.into(),
                        wanted: range.end - range.start,
                        got: at - range.start,
                    });
                }
                None => {}
                Some(e) if attempt < self.retry.short_reads => {
                    attempt += 1;
                    tracing::debug!("resuming the read of {name} at {at} (attempt {attempt}): {e}");
                    tokio::time::sleep(delays.next().unwrap_or(MAX_RETRY_DELAY)).await;
                }
                Some(e) => return Err(self.err(e)),
            }
        }
        Ok(())
    }

    /// Size of `name`, or `None` if it does not exist.
    pub async fn head(&self, name: &str) -> Result<Option<u64>> {
        if let Some(dir) = self.local_dir.as_ref().filter(|_| self.direct) {
            let path = dir.join(name);
            return match std::fs::symlink_metadata(&path) {
                Ok(md) if md.is_file() => Ok(Some(md.len())),
                Ok(_) => Ok(None),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(Error::io("inspect", &path, e)),
            };
        }
        self.retrying("look up", name, |_| async move {
            match self.store.head(&self.path(name)).await {
                Ok(m) => Ok(Some(m.size)),
                Err(object_store::Error::NotFound { .. }) => Ok(None),
                Err(e) => Err(self.err(e)),
            }
        })
        .await
    }

    /// Every object under `folder` (recursively), with names relative to it.
    /// A listing that fails part-way is an error, never a short list.
    pub async fn list_all(&self, folder: &str) -> Result<Vec<Listed>> {
        if let Some(dir) = self.local_dir.clone().filter(|_| self.direct) {
            let folder = folder.to_string();
            return tokio::task::spawn_blocking(move || list_local(&dir, &folder))
                .await
                .map_err(|e| Error::Interrupted(format!("list task failed: {e}")))?;
        }
        let prefix = if folder.is_empty() {
            if self.root.as_ref().is_empty() {
                None
            } else {
                Some(self.root.clone())
            }
        } else {
            Some(self.path(folder))
        };
        let strip = prefix.as_ref().map(|p| p.as_ref().len() + 1).unwrap_or(0);
        let metas: Vec<_> = self
            .retrying("list", folder, |_| async {
                self.store
                    .list(prefix.as_ref())
                    .try_collect::<Vec<_>>()
                    .await
                    .map_err(|e| self.err(e))
            })
            .await?;
        Ok(metas
            .into_iter()
            .filter_map(|m| {
                let full = m.location.as_ref();
                full.get(strip..).map(|n| Listed {
                    name: n.to_string(),
                    size: m.size,
                    modified: m.last_modified,
                })
            })
            .collect())
    }

    /// Removes `name`; one that is already gone is not an error. In a local
    /// directory the removal is durable when this returns, so a forgotten
    /// snapshot cannot come back after a power cut to name pruned data.
    pub async fn delete(&self, name: &str) -> Result<()> {
        if let Some(dir) = self.local_dir.as_ref().filter(|_| self.direct) {
            let path = dir.join(name);
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
                Err(e) => return Err(Error::io("remove", &path, e)),
            }
            if self.durable
                && let Some(parent) = path.parent().map(|p| p.to_path_buf())
            {
                tokio::task::spawn_blocking(move || sync_dir(&parent))
                    .await
                    .map_err(|e| Error::Interrupted(format!("sync task failed: {e}")))??;
            }
            return Ok(());
        }
        self.retrying("delete", name, |_| async move {
            match self.store.delete(&self.path(name)).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                Err(e) => Err(self.err(e)),
            }
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_locations() {
        assert!(Backend::open("").is_err());
        assert!(Backend::open("ftp://x").is_err());
        assert!(Backend::open("s3://").is_err());
        assert!(Backend::open("s3://b/p?bogus=1").is_err());
        // Credentials are only looked for, not fetched, when a location opens.
        let b = Backend::open(
            "s3://bucket/some/prefix?endpoint=http://127.0.0.1:9&path_style=true&credentials=instance",
        )
        .unwrap();
        assert_eq!(b.location(), "s3://bucket/some/prefix");
        assert_eq!(b.path("config").as_ref(), "some/prefix/config");
        let l = Backend::open("file:///tmp/does-not-exist-backer").unwrap();
        assert!(l.missing_local_dir());
    }
}
