//! What both sides of butler need and nothing else: the job config (serde), the shard manifest and
//! format, the seeded sampler that turns (seed, epoch, world size) into an order, atomic file writes,
//! and the error type that carries file, key and shard context.

pub mod config;
pub mod error;
pub mod fsutil;
pub mod model;
pub mod optim;
pub mod pretrain;
pub mod pseudo;
pub mod sampler;
pub mod semi;

pub use error::{Error, Result};
