//! The repository the server owns. Only the server holds its password and the
//! storage credentials; agents send compressed chunks and the server seals
//! them at rest.

use std::path::Path;
use std::sync::Arc;

use backer_repo::crypto::KdfParams;
use backer_repo::{Backend, Repository};
use parking_lot::RwLock;

use crate::state::{StateDir, StateError};

/// The repository password, kept beside the CA unless `BACKER_PASSWORD` is set.
pub const PASSWORD_FILE: &str = "repository-password";

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("failed to open the repository at {location}")]
    Open {
        location: String,
        #[source]
        source: backer_repo::Error,
    },
    #[error(
        "the repository at {location} exists but this server has no password for it: put it in {password_file} or in BACKER_PASSWORD"
    )]
    NoPassword { location: String, password_file: String },
    #[error(transparent)]
    State(#[from] StateError),
}

pub struct Storage {
    current: RwLock<Arc<Repository>>,
    /// One refresh at a time, so a later one always installs a newer index.
    refreshing: tokio::sync::Mutex<()>,
    pub location: String,
}

impl std::fmt::Debug for Storage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Storage({})", self.location)
    }
}

impl Storage {
    /// Opens the repository at `location`, creating it on first start with
    /// a new random password written to the state directory (0600). The
    /// password is what recovers the data if the server is lost: back it up.
    pub async fn open(location: &str, state: &StateDir) -> Result<Storage, StorageError> {
        let err = |source| StorageError::Open {
            location: location.to_string(),
            source,
        };
        // An S3 repository's index, snapshots and trees are kept beside the
        // server's state, so a restart does not fetch them all again.
        let backend = Backend::open(location)
            .map_err(err)?
            .with_cache(Some(state.dir.join("cache")));
        let password_path = state.dir.join(PASSWORD_FILE);
        let password = match std::env::var("BACKER_PASSWORD") {
            Ok(p) if !p.is_empty() => Some(p),
            _ => read_password(&password_path)?,
        };
        let repo = match password {
            Some(p) => match Repository::open(backend.clone(), p.as_bytes()).await {
                Err(backer_repo::Error::NoRepository(_)) => {
                    tracing::info!(%location, "no repository yet: creating it");
                    let repo = Repository::init(backend, p.as_bytes(), KdfParams::default())
                        .await
                        .map_err(err)?;
                    if repo.backend().bucket_created() {
                        tracing::info!(%location, "created the bucket");
                    }
                    repo
                }
                r => r.map_err(err)?,
            },
            None => {
                let mut raw = [0u8; 32];
                backer_repo::crypto::random_fill(&mut raw);
                let p = hex::encode(raw);
                let repo = match Repository::init(backend, p.as_bytes(), KdfParams::default()).await {
                    Err(backer_repo::Error::RepositoryExists(_)) => {
                        return Err(StorageError::NoPassword {
                            location: location.to_string(),
                            password_file: password_path.display().to_string(),
                        });
                    }
                    r => r.map_err(err)?,
                };
                state.write(PASSWORD_FILE, &p, true)?;
                tracing::info!(%location, password_file = %password_path.display(), "created the repository; back up its password file");
                repo
            }
        };
        Ok(Storage {
            current: RwLock::new(Arc::new(repo)),
            refreshing: tokio::sync::Mutex::new(()),
            location: location.to_string(),
        })
    }

    /// The repository as last refreshed. Holders keep their handle; a
    /// refresh gives later callers a new one.
    pub fn repo(&self) -> Arc<Repository> {
        Arc::clone(&self.current.read())
    }

    /// Takes in the blobs other writers stored (and a prune removed) since
    /// the index was loaded; returns the new handle.
    pub async fn refresh(&self) -> Result<Arc<Repository>, backer_repo::Error> {
        let _one = self.refreshing.lock().await;
        let fresh = Arc::new(self.repo().refreshed().await?);
        *self.current.write() = Arc::clone(&fresh);
        Ok(fresh)
    }
}

fn read_password(path: &Path) -> Result<Option<String>, StateError> {
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(Some(s.trim().to_string())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(StateError::Io {
            what: "read",
            path: path.to_path_buf(),
            source,
        }),
    }
}
