//! What the server's core (registry, jobs, runner, data path) answers when
//! it refuses or fails: kinds a caller acts on, not transport codes. The
//! adapters map them, once each: `grpc/` to `tonic::Status`
//! (`From<CoreError>`), so no core module names a transport type.

use backer_repo::error::Chain;

#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    /// The request is wrong as given (a path, an id, a field): fix it.
    #[error("{0}")]
    Invalid(String),
    /// No such client, job or snapshot.
    #[error("{0}")]
    NotFound(String),
    /// Not in this state: a revoked client, a job of the other kind, an
    /// upload still open, a backup that is incomplete.
    #[error("{0}")]
    Refused(String),
    /// Not now: a client not connected, a job that could not start.
    #[error("{0}")]
    Unavailable(String),
    /// The caller may not read this.
    #[error("{0}")]
    Denied(String),
    /// The job ended under the call (its lock lost or released).
    #[error("{0}")]
    Aborted(String),
    /// The repository failed.
    #[error("failed to {what}")]
    Repo {
        what: String,
        #[source]
        source: backer_repo::Error,
    },
    /// The server's state directory failed.
    #[error("failed to {what}")]
    State {
        what: String,
        #[source]
        source: crate::state::StateError,
    },
}

pub type CoreResult<T> = Result<T, CoreError>;

impl CoreError {
    /// `failed to {what}: {source}` as one message, each cause said once.
    pub fn message(&self) -> String {
        Chain(self).to_string()
    }

    /// A repository failure while doing `what` (`"read tree X"`).
    pub fn repo(what: impl Into<String>) -> impl FnOnce(backer_repo::Error) -> CoreError {
        let what = what.into();
        move |source| CoreError::Repo { what, source }
    }

    /// A repository error that is the caller's fault (bad bytes it sent).
    pub fn invalid(e: backer_repo::Error) -> CoreError {
        CoreError::Invalid(Chain(&e).to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_says_what_failed_and_why_once() {
        let e = CoreError::repo("read tree ab12")(backer_repo::Error::Corrupt {
            what: "pack 01 is short".into(),
        });
        let m = e.message();
        assert!(m.starts_with("failed to read tree ab12: "), "{m}");
        assert_eq!(m.matches("pack 01 is short").count(), 1, "{m}");
    }
}
