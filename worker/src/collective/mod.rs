//! The transport-agnostic collective interface the training loop talks to. The TCP ring implements it
//! on any device (CUDA tensors are staged through host memory); NCCL implements it on CUDA. Objectives
//! and the optimizer never see sockets or communicators.

//!
//! This module only declares and re-exports: the trait lives in `api`, the ring's tensor adapter in
//! `host`, and each transport imports from those, never from here.

mod api;
pub mod error;
mod host;
pub mod nccl;
pub mod ring;

pub use api::{Collective, Observed, SingleProcess};
pub use error::{CollectiveError, Result};
pub use nccl::NcclCollective;
pub use ring::{RingConfig, RingListener, RingSecret, TcpRing};
