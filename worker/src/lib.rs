//! butler's worker: the process that registers with the coordinator, joins the collective and runs
//! synchronous data-parallel training on its shard of every global batch (`process`), and the training
//! toolbox its drivers share — job and epoch loop, trainer, objectives, models, optimizers,
//! collectives (TCP ring, NCCL), device placement, checkpoints.
//!
//! Architecture Invariant: training runs on one plain thread (tch `Tensor` is `Send` but not `Sync`);
//! the async runtime only carries RPCs and the heartbeat. The training loop sees `&mut dyn Collective`,
//! never a transport. The worker never reads a dataset format itself (that is `butler-data`) and never
//! decides membership or assignments (the coordinator does).

pub mod checkpoint;
pub mod client;
pub mod collective;
pub mod contrastive;
pub mod data;
pub mod ddp;
pub mod device;
mod error;
mod job;
pub mod losses;
pub mod mixing;
pub mod models;
pub mod objectives;
pub mod optim;
mod process;
pub mod rounds;
pub mod selfcheck;
mod session;
mod stages;
pub mod timing;
pub mod trainer;

pub use butler_data::{augment, loader, streams};
pub use error::{Error, Result};
pub use process::{run, WorkerOptions, WorkerReport};
