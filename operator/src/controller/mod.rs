//! One module per resource the operator reconciles.

pub mod backupjob;
pub mod client;
pub mod csr;
pub mod restorejob;
pub mod snapshot;
