//! One error type for the reconcilers, with a category for metrics and for
//! deciding whether retrying can help.

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The Kubernetes API failed or refused.
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// backer-server could not be reached or failed.
    #[error("{0}")]
    Server(String),
    /// backer-server refused the request as given: retrying the same will not help.
    #[error("{0}")]
    Refused(String),
    /// The object asks for something that cannot be done as written.
    #[error("{0}")]
    Invalid(String),
    /// The CA or a certificate could not be made or read.
    #[error("{0}")]
    Pki(String),
    #[error("failed to finalize: {0}")]
    Finalizer(String),
}

impl Error {
    /// A label for metrics.
    pub fn category(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::Server(_) => "server",
            Error::Refused(_) => "refused",
            Error::Invalid(_) => "invalid",
            Error::Pki(_) => "pki",
            Error::Finalizer(_) => "finalizer",
        }
    }
}

impl<E: std::error::Error + 'static> From<kube::runtime::finalizer::Error<E>> for Error {
    fn from(e: kube::runtime::finalizer::Error<E>) -> Self {
        Error::Finalizer(e.to_string())
    }
}
