//! The gRPC contract between butler's coordinator and its workers, generated from `butler.proto`.
//!
//! Architecture Invariant: this is the only thing that crosses the coordinator/worker boundary, and it
//! never carries tensors or sample bytes — ranks, generations, cursors, endpoints, scalars, and opaque
//! transport ids (the NCCL unique id) that the coordinator relays without reading.

#[allow(clippy::all)]
pub mod v1 {
    tonic::include_proto!("butler.v1");
}

pub use v1::*;

pub mod transport;

/// Metadata key that carries the job token on every RPC.
pub const AUTH_METADATA_KEY: &str = "authorization";
