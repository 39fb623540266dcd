//! Files to batches of raw buffers: the dataset manifest and the shard formats (safetensors, WebDataset
//! tar), the job config checked against a dataset, the sharded order each rank reads in, the streaming
//! loader with its shard cache, and per-sample augmentation on `f32` buffers with the seeded generator
//! behind it. Everything here can be tested and benchmarked on its own.
//!
//! Architecture Invariant: this crate never links libtorch and never opens a network connection. It
//! reads and writes files and hands out plain `Vec<f32>` / `Vec<i64>` batches; turning a batch into a
//! tensor is the worker's job, on its training thread.
//!
//! It depends on `butler-common` (the config, the sampler's mixing function, atomic writes); `common`
//! never depends on it. Its own [`Error`] carries the file, shard or input in every variant; the
//! coordinator's and the worker's errors wrap it transparently.

pub mod assign;
pub mod augment;
pub mod check;
pub mod error;
pub mod import;
pub mod loader;
pub mod manifest;
pub mod regions;
pub mod rng;
pub mod samples;
pub mod shard;
pub mod streams;
pub mod webdataset;

pub use check::JobDataCheck;
pub use error::{Error, Result};
