//! GPU benchmarks (`bench/gpu_vs_torch.py` runs them next to the same work in plain PyTorch and prints
//! the ratios):
//!
//! - `nccl`: all-reduce (sum, f32) on a world-1 NCCL communicator, 1–256 MiB.
//! - `train`: training samples/s of ConvBase on MNIST-1D-shaped data through butler's `Trainer` (host
//!   batches copied to the device each step, as a worker does), fp32 or bf16.

use anyhow::{bail, Result};
use butler_common::config::JobConfig;
use butler_worker::collective::{nccl, SingleProcess};
use butler_worker::trainer::Trainer;
use std::path::Path;
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};

#[derive(clap::Args, Clone)]
pub struct NcclArgs {
    /// Buffer sizes in MiB.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16,64,256")]
    sizes_mib: Vec<usize>,
    #[arg(long, default_value_t = 20)]
    iters: usize,
    #[arg(long, default_value_t = 5)]
    warmup: usize,
    #[arg(long, default_value_t = 0)]
    gpu: usize,
}

#[derive(clap::Args, Clone)]
pub struct TrainArgs {
    #[arg(long, default_value = "cuda")]
    device: String,
    #[arg(long, default_value = "fp32")]
    precision: String,
    #[arg(long, default_value_t = 512)]
    batch: i64,
    /// ConvBase channels.
    #[arg(long, default_value_t = 32)]
    channels: usize,
    #[arg(long, default_value_t = 300)]
    steps: usize,
    #[arg(long, default_value_t = 30)]
    warmup: usize,
}

pub fn nccl(a: &NcclArgs) -> Result<()> {
    if !tch::Cuda::is_available() {
        bail!(
            "bench nccl needs a CUDA device ({})",
            butler_worker::device::cuda_missing_reason()
        );
    }
    let id = nccl::create_unique_id()?;
    let mut comm = nccl::NcclCollective::init(0, 1, &id, a.gpu, Duration::from_secs(60), None)?;
    for &mib in &a.sizes_mib {
        let n = (mib << 20) / 4;
        let t = Tensor::ones([n as i64], (Kind::Float, Device::Cuda(a.gpu)));
        // Out of place: at world 1 NCCL skips an in-place reduction; this one is a device copy, so the
        // figure is call overhead plus one copy, not a reduction across GPUs.
        for _ in 0..a.warmup {
            let _ = comm.all_reduce_sum_out_of_place(&t)?;
        }
        // Every call waits for its completion on the device (the deadline poll), so wall time is the
        // operation's time.
        let start = Instant::now();
        for _ in 0..a.iters {
            let _ = comm.all_reduce_sum_out_of_place(&t)?;
        }
        let seconds = start.elapsed().as_secs_f64() / a.iters as f64;
        println!(
            "{}",
            serde_json::json!({
                "bench": "nccl_allreduce", "world": 1, "bytes": n * 4,
                "seconds": seconds, "algbw_gbps": (n * 4) as f64 / seconds / 1e9,
            })
        );
    }
    Ok(())
}

pub fn train(a: &TrainArgs) -> Result<()> {
    let device = match a.device.as_str() {
        "cpu" => Device::Cpu,
        "cuda" if tch::Cuda::is_available() => Device::Cuda(0),
        "cuda" => bail!(
            "no CUDA device ({})",
            butler_worker::device::cuda_missing_reason()
        ),
        other => bail!("--device {other:?}: expected cpu or cuda"),
    };
    if !matches!(a.precision.as_str(), "fp32" | "bf16") {
        bail!("--precision {:?}: expected fp32 or bf16", a.precision);
    }
    let text = format!(
        "[job]\nname='bench'\nseed=0\n[data]\nmanifest='unused'\n[model]\nkind='conv_base'\nchannels={}\n\
         [optim]\nkind='adam'\nlr=0.01\n[train]\nepochs=1\nbatch_size={}\nprecision='{}'\n",
        a.channels, a.batch, a.precision
    );
    let cfg = JobConfig::from_toml(&text, Path::new("bench-train.toml"))?;
    let mut trainer = Trainer::new_on(&cfg, &[40], 10, 0, (a.steps + a.warmup) as u64, device)?;
    tch::manual_seed(0);
    // A pool of host batches, cycled (the data plane hands the trainer host tensors).
    let pool: Vec<(Tensor, Tensor)> = (0..8)
        .map(|_| {
            (
                Tensor::randn([a.batch, 40], (Kind::Float, Device::Cpu)),
                Tensor::randint(10, [a.batch], (Kind::Int64, Device::Cpu)),
            )
        })
        .collect();
    let mut comm = SingleProcess;
    let mut step = |i: usize| -> Result<f64> {
        let (x, y) = &pool[i % pool.len()];
        Ok(trainer.step(x, y, a.batch as u64, None, &mut comm)?)
    };
    for i in 0..a.warmup {
        step(i)?;
    }
    if device.is_cuda() {
        tch::Cuda::synchronize(0);
    }
    let start = Instant::now();
    let mut loss = 0.0;
    for i in 0..a.steps {
        // The step reads its loss back (a host sync per step, as every training loop that logs does).
        loss = step(i)?;
    }
    if device.is_cuda() {
        tch::Cuda::synchronize(0);
    }
    let seconds = start.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({
            "bench": "train_convbase", "device": a.device, "precision": a.precision,
            "batch": a.batch, "channels": a.channels, "steps": a.steps,
            "step_seconds": seconds / a.steps as f64,
            "samples_per_s": (a.steps as i64 * a.batch) as f64 / seconds,
            "last_loss": loss,
        })
    );
    Ok(())
}
