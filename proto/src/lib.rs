//! The gRPC contract between butler's coordinator and its workers, generated from `butler.proto`.

#![allow(clippy::all)]

pub mod v1 {
    tonic::include_proto!("butler.v1");
}

pub use v1::*;

/// Metadata key that carries the job token on every RPC.
pub const AUTH_METADATA_KEY: &str = "authorization";
