//! butler's control plane. It admits workers (token), gives them rank, world size and generation, relays
//! collective endpoints (rendezvous), hands out per-epoch data assignments as sampler descriptions,
//! watches heartbeats, aggregates metrics and writes the job summary.
//!
//! Architecture Invariant: the coordinator never touches tensors or sample bytes — it reads the manifest
//! (counts, shapes) and deals in ranks, generations, epochs, cursors and scalar metrics.

pub mod commits;
pub mod metrics;
pub mod observe;
pub mod rounds;
pub mod security;
mod service;
mod stages;
mod state;
mod summary;
pub mod tb;

pub use service::{serve, status_rpc, CoordinatorOptions, Outcome};
pub use state::JobState;
pub use summary::{EpochRecord, StageRecord, Summary};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Common(#[from] butler_common::Error),
    /// The job's dataset (manifest, splits, shards) as the coordinator checks it.
    #[error(transparent)]
    Data(#[from] butler_data::Error),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: String,
        source: std::io::Error,
    },
    #[error("gRPC server: {0}")]
    Serve(#[from] tonic::transport::Error),
    #[error("TLS configuration: {0}")]
    Tls(String),
    #[error("job failed: {0}")]
    JobFailed(String),
}

pub type Result<T> = std::result::Result<T, Error>;
