//! Backer's wire protocol. See `proto/backer/v1/backer.proto` for every
//! message and field.

#![allow(clippy::all, missing_docs, unreachable_pub)]

pub mod v1 {
    tonic::include_proto!("backer.v1");
}
