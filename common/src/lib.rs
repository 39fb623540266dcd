//! What butler's coordinator and workers must agree on, and nothing else: the job config (serde, parsed
//! strictly; its sections in `config`, `model`, `optim`, `semi`, `pretrain`), the seeded sampler that
//! turns (seed, epoch, world size) into an order, the pseudo-label rules, atomic file writes, and the
//! error type that carries file, key and shard context.
//!
//! Architecture Invariant: no tensors, no async, no network, and no dataset format — the manifest,
//! shards, loaders and augmentation are `butler-data`, which depends on this crate, never the reverse.
//! The data order is a pure function here.

pub mod config;
pub mod error;
pub mod fsutil;
#[cfg(any(test, feature = "proptest"))]
pub mod hostile;
pub mod model;
pub mod optim;
pub mod pretrain;
pub mod pseudo;
pub mod resume;
pub mod sampler;
pub mod semi;

pub use error::{Error, Result};
