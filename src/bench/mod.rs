//! `butler bench`: micro-benchmarks that print JSON lines for the scripts in `bench/` to compare against
//! named peers. Never run by the tests.
//!
//! - `allreduce`: the TCP ring, one process per rank (`bench/allreduce.sh`, vs gloo).
//! - `augment`: per-sample augmentation in loader threads (`bench/augment.sh`, vs torchvision v2).
//! - `simclr`: time per SimCLR step at a large global batch (`bench/simclr.sh`, vs PyTorch DDP).
//! - `checkpoint`: size, write and load time of a resumable checkpoint and the overhead of committing
//!   every N steps (`bench/checkpoint.sh`, vs torch.save / torch.load of the same tensors).
//! - `nccl`, `train`: on a GPU (`bench/gpu_vs_torch.py`, vs torch.distributed NCCL and plain PyTorch).
//!
//! This module is the command's dispatch only. Each bench is a leaf that imports nothing from its
//! siblings but `util` (rank processes, the file rendezvous, memory figures), so no two bench modules
//! import each other; `gpu` imports none of them.

mod augment;
mod checkpoint;
mod gpu;
mod ring;
mod simclr;
mod stream;
mod util;

use anyhow::Result;

#[derive(clap::Subcommand)]
pub enum BenchCommand {
    /// All-reduce (sum, f32) over the TCP ring, one process per rank on loopback.
    Allreduce(ring::AllreduceArgs),
    /// Per-sample augmentation throughput on raw f32 buffers, in loader threads.
    Augment(augment::AugmentArgs),
    /// Stream a sharded split through the loader (weak+strong views), one process per rank.
    Stream(stream::StreamArgs),
    /// Load time and memory of a manifest with many shards.
    Manifest(stream::ManifestArgs),
    /// Time per SimCLR step (global negatives, exact gradients, LARS), one process per rank.
    Simclr(simclr::SimclrArgs),
    /// All-reduce on a world-1 NCCL communicator (needs a GPU).
    Nccl(gpu::NcclArgs),
    /// Training samples/s of ConvBase through the Trainer on one device.
    Train(gpu::TrainArgs),
    /// Resumable checkpoint size, write/load time and the overhead of committing every N steps.
    Checkpoint(checkpoint::CheckpointArgs),
}

pub fn run(cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::Allreduce(a) => ring::allreduce(&a),
        BenchCommand::Augment(a) => augment::augment(&a),
        BenchCommand::Stream(a) => stream::stream(&a),
        BenchCommand::Manifest(a) => stream::manifest(&a),
        BenchCommand::Simclr(a) => simclr::simclr(&a),
        BenchCommand::Nccl(a) => gpu::nccl(&a),
        BenchCommand::Train(a) => gpu::train(&a),
        BenchCommand::Checkpoint(a) => checkpoint::checkpoint(&a),
    }
}
