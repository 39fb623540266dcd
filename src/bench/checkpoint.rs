//! `bench checkpoint`: size, write time (atomic write + fsync + SHA-256, what a commit costs rank 0) and
//! load time of a resumable checkpoint (weights, Adam moments, EMA), and the training-time overhead of
//! committing every N steps, measured on the `Trainer` in one process (the coordinator's commit RPC is a
//! few hundred bytes and not included). `bench/checkpoint.sh` runs it next to `torch.save`/`torch.load`
//! of the same tensors.

use anyhow::{bail, Result};
use butler_common::config::JobConfig;
use butler_worker::checkpoint::{load_resumable, save_resumable, ResumeMeta};
use butler_worker::collective::SingleProcess;
use butler_worker::trainer::Trainer;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::{Device, Kind, Tensor};

#[derive(clap::Args, Clone)]
pub struct CheckpointArgs {
    /// `conv_base` or `mlp`.
    #[arg(long, default_value = "conv_base")]
    model: String,
    /// ConvBase channels.
    #[arg(long, default_value_t = 25)]
    channels: usize,
    /// MLP hidden widths.
    #[arg(long, value_delimiter = ',', default_value = "4096,4096")]
    hidden: Vec<usize>,
    #[arg(long, default_value_t = 128)]
    batch: i64,
    /// Training steps timed for the overhead (with and without commits).
    #[arg(long, default_value_t = 200)]
    steps: usize,
    /// Commit every this many steps in the overhead run.
    #[arg(long, default_value_t = 50)]
    every: usize,
    /// Write/load repetitions (the median is reported).
    #[arg(long, default_value_t = 5)]
    repeat: usize,
    /// Where the checkpoint is written (kept, for `bench/checkpoint.sh`'s PyTorch side).
    #[arg(long, default_value = "target/bench-checkpoint")]
    dir: PathBuf,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

pub fn checkpoint(a: &CheckpointArgs) -> Result<()> {
    let model = match a.model.as_str() {
        "conv_base" => format!("kind='conv_base'\nchannels={}", a.channels),
        "mlp" => format!("kind='mlp'\nhidden={:?}", a.hidden),
        other => bail!("--model {other:?}: expected conv_base or mlp"),
    };
    let text = format!(
        "[job]\nname='bench'\nseed=0\n[data]\nmanifest='unused'\n[model]\n{model}\n\
         [optim]\nkind='adam'\nlr=0.001\n[train]\nepochs=1\nbatch_size={}\nema=0.99\n",
        a.batch
    );
    let cfg = JobConfig::from_toml(&text, Path::new("bench-checkpoint.toml"))?;
    let total = (2 * a.steps + 10) as u64;
    let mut trainer = Trainer::new(&cfg, &[40], 10, 0, total)?;
    tch::manual_seed(0);
    let x = Tensor::randn([a.batch, 40], (Kind::Float, Device::Cpu));
    let y = Tensor::randint(10, [a.batch], (Kind::Int64, Device::Cpu));
    let mut comm = SingleProcess;
    let mut step = |t: &mut Trainer| -> Result<()> {
        t.step(&x, &y, a.batch as u64, None, &mut comm)?;
        Ok(())
    };
    for _ in 0..5 {
        step(&mut trainer)?;
    }
    std::fs::create_dir_all(&a.dir)?;
    let path = a.dir.join("step.safetensors");
    let meta = |step: u64| ResumeMeta {
        format: 0,
        job: "bench".into(),
        step,
        epoch: 0,
        steps_in_epoch: step,
        labeled_start: 0,
        unlabeled: None,
        world_size: 1,
        generation: 1,
        epoch_losses: vec![[0.0, 0.0]],
        ..ResumeMeta::default()
    };
    let commit = |t: &Trainer| -> Result<u64> {
        save_resumable(t, &meta(t.steps_taken()), &path)?;
        Ok(butler_common::fsutil::sha256_file(&path)?.1)
    };
    let mut writes = Vec::new();
    let mut bytes = 0;
    for _ in 0..a.repeat {
        let t0 = Instant::now();
        bytes = commit(&trainer)?;
        writes.push(t0.elapsed().as_secs_f64());
    }
    let mut loads = Vec::new();
    for _ in 0..a.repeat {
        let t0 = Instant::now();
        load_resumable(&mut trainer, &path)?;
        loads.push(t0.elapsed().as_secs_f64());
    }
    let params: i64 = trainer
        .vs
        .trainable_variables()
        .iter()
        .map(Tensor::numel)
        .map(|n| n as i64)
        .sum();

    // Overhead: the same steps, without and with a commit every `every` steps.
    let t0 = Instant::now();
    for _ in 0..a.steps {
        step(&mut trainer)?;
    }
    let plain = t0.elapsed().as_secs_f64();
    let t0 = Instant::now();
    for i in 1..=a.steps {
        step(&mut trainer)?;
        if i % a.every == 0 {
            commit(&trainer)?;
        }
    }
    let with = t0.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({
            "bench": "checkpoint", "model": a.model, "parameters": params, "bytes": bytes,
            "write_seconds": median(writes), "load_seconds": median(loads),
            "step_seconds": plain / a.steps as f64, "every": a.every,
            "overhead_pct": 100.0 * (with - plain) / plain,
            "file": path.display().to_string(),
        })
    );
    Ok(())
}
