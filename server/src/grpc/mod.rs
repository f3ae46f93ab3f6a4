//! The gRPC services, one module each, and how callers are identified.

pub mod agent;
pub mod auth;
pub mod enrollment;
pub mod management;

/// Seconds since the Unix epoch, now.
pub(crate) fn now() -> i64 {
    chrono::Utc::now().timestamp()
}
