//! One error type for the engine. Messages are lower-case and say what failed;
//! the source is attached, not repeated.

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("failed to access the storage backend at {location}")]
    Backend {
        location: String,
        #[source]
        source: object_store::Error,
    },
    #[error(
        "the bucket of {location} does not exist: `backer init` creates it, or check the bucket's name and the endpoint"
    )]
    NoSuchBucket { location: String },
    #[error(
        "the S3 server refused the credentials for {location} ({code}): check AWS_ACCESS_KEY_ID and \
         AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), and that they may use this bucket"
    )]
    Refused { location: String, code: String },
    #[error("object {0} already exists; objects are written once and never replaced")]
    AlreadyExists(String),
    #[error("object {0} not found in the repository")]
    NotFound(String),
    #[error("invalid repository location {url:?}: {reason}")]
    BadLocation { url: String, reason: String },
    #[error("no repository at {0}: run `backer init` first")]
    NoRepository(String),
    #[error("a repository already exists at {0}")]
    RepositoryExists(String),
    #[error("{0} is not empty; `backer init` needs an empty or missing location")]
    NotEmpty(String),
    #[error("wrong password: no key in the repository opens with it{}", damaged_keys_note(.damaged))]
    WrongPassword {
        /// Key files that could not be tried because they are damaged.
        damaged: Vec<String>,
    },
    #[error(
        "{name} is shorter than expected: read {got} of {wanted} bytes (truncated, or the read was cut off)"
    )]
    Truncated { name: String, wanted: u64, got: u64 },
    #[error("data failed authentication ({what}): it was altered, truncated or belongs elsewhere")]
    Corrupt { what: String },
    #[error(
        "blob {0} is in no index: an index file may be damaged or missing (`backer check` says; \
         `backer repair index` rebuilds the index from the packs)"
    )]
    NotIndexed(crate::id::BlobId),
    #[error("unsupported repository format version {0}; upgrade backer")]
    UnsupportedVersion(u32),
    #[error("failed to decode {what}")]
    Decode {
        what: String,
        #[source]
        source: postcard::Error,
    },
    #[error("failed to {op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no snapshot matches {0:?}")]
    NoSuchSnapshot(String),
    #[error("there is no snapshot{0} to take as `latest`")]
    NoLatest(String),
    #[error("snapshot prefix {0:?} is ambiguous; give more characters")]
    AmbiguousSnapshot(String),
    #[error(
        "`latest` is ambiguous: the repository holds snapshots of several hosts ({0}); name one with --host"
    )]
    AmbiguousLatest(String),
    #[error("the repository needs repair: {0}")]
    NeedsRepair(String),
    #[error("path {0:?} is not in the snapshot")]
    NoSuchPath(String),
    #[error("invalid exclude pattern {pattern:?}")]
    BadPattern {
        pattern: String,
        #[source]
        source: globset::Error,
    },
    #[error("invalid argument: {0}")]
    Invalid(String),
    #[error("the repository is locked: {0}")]
    Locked(String),
    #[error("stopped before writing: {0}")]
    LockExpired(String),
    #[error("the operation was interrupted: {0}")]
    Interrupted(String),
    /// Stopped on request (the options' `cancel` token): not a fault.
    #[error("cancelled")]
    Cancelled,
}

impl Error {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            op,
            path: path.into(),
            source,
        }
    }

    pub(crate) fn corrupt(what: impl Into<String>) -> Self {
        Error::Corrupt { what: what.into() }
    }

    /// Whether this says the object read is damaged (altered, truncated,
    /// undecodable), rather than that storage could not be reached: damage
    /// is reported and skipped where that is safe, a storage failure stops
    /// the command. A read that came back short is not damage: an object
    /// cut short at rest reads whole at its new size and fails its hash;
    /// a short read is storage cutting a transfer off (after retries).
    pub fn is_damage(&self) -> bool {
        matches!(
            self,
            Error::Corrupt { .. }
                | Error::Decode { .. }
                | Error::UnsupportedVersion(_)
                | Error::NotIndexed(_)
        )
    }

    /// Damaged, or not readable by this user (its permissions): an object
    /// that is passed over where that is safe (a key file, a lock), as a
    /// damaged one is.
    pub fn is_unreadable(&self) -> bool {
        self.is_damage()
            || matches!(self, Error::Io { source, .. } if source.kind() == std::io::ErrorKind::PermissionDenied)
    }
}

fn damaged_keys_note(damaged: &[String]) -> String {
    if damaged.is_empty() {
        String::new()
    } else {
        format!(
            " (key files that could not be read: {}; if your password was in one of them, \
             open the repository with another password and `backer key remove` the damaged ones)",
            damaged.join(", ")
        )
    }
}

/// Shows an error with every cause behind it, `a: b: c`, for messages kept
/// as text (a restore's or a check's list of problems), where the chain
/// would otherwise be lost.
pub struct Chain<'a>(pub &'a (dyn std::error::Error + 'static));

impl std::fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Some errors (object_store's) print their source inside their own
        // text: a source already said is not said again.
        let mut said = self.0.to_string();
        let mut source = self.0.source();
        while let Some(s) = source {
            let text = s.to_string();
            if !said.contains(&text) {
                said.push_str(": ");
                said.push_str(&text);
            }
            source = s.source();
        }
        f.write_str(&said)
    }
}
