//! backer-operator: reconciles Backer's custom resources into jobs on
//! `backer-server`, keeps the CA and the server's certificate in Secrets, and
//! signs node agents' certificates once they prove which node they run on.

pub mod backer;
pub mod context;
pub mod controller;
/// The API types, from their own crate (the kubectl plugin uses them too).
pub use backer_k8s_api as crd;
pub mod error;
pub mod http;
pub mod leader;
pub mod metrics;
pub mod pki;
pub mod status;
pub mod volume;

/// The field manager of every server-side apply.
pub const MANAGER: &str = "backer-operator";

/// The CRDs as one multi-document YAML, as `crds/backer.dev.yaml` holds them.
pub use backer_k8s_api::crds_yaml;
