//! backer-server: the repository's only holder, the CA of its clients, and
//! the place where jobs run. Standalone schedules and (later) Kubernetes
//! `BackupJob`s end in the same job machinery.

pub mod config;
pub mod datapath;
pub mod error;
pub mod grpc;
pub mod jobs;
pub mod login;
pub mod metrics;
pub mod rest;
pub mod runner;
pub mod schedule;
pub mod server;
pub mod state;
pub mod storage;
pub mod tls;
