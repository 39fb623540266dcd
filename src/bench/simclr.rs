//! `butler bench simclr`: time per SimCLR step (forward of both views, NT-Xent over the global batch with
//! the exact-gradient gather, backward, gradient all-reduce, LARS) on W local processes over the TCP
//! ring — the same model, loss and optimizer as `bench/simclr_vs_ddp.py` runs under PyTorch DDP (gloo).
//! Inputs are fixed random views, so neither side pays for loading or augmentation.

use anyhow::{bail, Result};
use butler_common::config::{OptimConfig, OptimKind, ScheduleConfig};
use butler_common::pretrain::{PretrainConfig, PretrainMethod};
use butler_worker::collective::RingConfig;
use butler_worker::contrastive::pretrain::Pretrainer;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};

#[derive(clap::Args, Clone)]
pub struct SimclrArgs {
    #[arg(long, default_value_t = 2)]
    world: usize,
    /// Global batch (samples; two views each).
    #[arg(long, default_value_t = 4096)]
    batch: usize,
    #[arg(long, default_value_t = 10)]
    iters: usize,
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// Intra-op threads per rank.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Internal: this process's rank (set by the launching process).
    #[arg(long, hide = true)]
    rank: Option<usize>,
    /// Internal: where ranks publish their addresses.
    #[arg(long, hide = true)]
    dir: Option<PathBuf>,
}

pub fn simclr(a: &SimclrArgs) -> Result<()> {
    match (a.rank, a.dir.clone()) {
        (Some(rank), Some(dir)) => rank_main(a, rank, &dir),
        _ => launch(a),
    }
}

fn launch(a: &SimclrArgs) -> Result<()> {
    if a.world == 0 || a.iters == 0 || !a.batch.is_multiple_of(a.world) {
        bail!("--world and --iters must be positive and --batch divisible by --world");
    }
    let dir = std::env::temp_dir().join(format!("butler-bench-simclr-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let result = super::util::spawn_ranks(a.world, |rank| {
        vec![
            "bench".into(),
            "simclr".into(),
            "--world".into(),
            a.world.to_string(),
            "--batch".into(),
            a.batch.to_string(),
            "--iters".into(),
            a.iters.to_string(),
            "--warmup".into(),
            a.warmup.to_string(),
            "--threads".into(),
            a.threads.to_string(),
            "--rank".into(),
            rank.to_string(),
            "--dir".into(),
            dir.display().to_string(),
        ]
    });
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// The configuration both sides run: ConvBase encoder (25 channels), projection 128 → 64, τ = 0.2, LARS.
fn config(batch: usize) -> PretrainConfig {
    PretrainConfig {
        method: PretrainMethod::Simclr,
        epochs: 1,
        batch_size: batch,
        temperature: 0.2,
        projection_hidden: 128,
        projection_dim: 64,
        cpc_horizons: 2,
        cpc_context: 64,
        optim: OptimConfig {
            kind: OptimKind::Lars,
            lr: 0.3 * batch as f64 / 256.0,
            momentum: 0.9,
            nesterov: false,
            weight_decay: 1e-6,
            betas: [0.9, 0.999],
            eps: 1e-8,
            trust_coefficient: 0.01,
        },
        schedule: ScheduleConfig::default(),
        probe_epochs: 1,
        probe_lr: 0.01,
        finetune_augment: false,
        finetune_from_probe: false,
        distill: None,
    }
}

fn rank_main(a: &SimclrArgs, rank: usize, dir: &Path) -> Result<()> {
    tch::set_num_threads(a.threads as i32);
    let mut ring = super::util::file_rendezvous(
        rank,
        a.world,
        dir,
        RingConfig {
            timeout: Duration::from_secs(300),
            ..Default::default()
        },
    )?;
    let cfg = config(a.batch);
    let mut model = Pretrainer::new(&cfg, 40, 25, 0, 1_000_000, 25 << 20)?;
    model.broadcast_parameters(&mut ring)?;
    tch::manual_seed(1 + rank as i64);
    let n = (a.batch / a.world) as i64;
    let views = [
        Tensor::randn([n, 40], (Kind::Float, Device::Cpu)),
        Tensor::randn([n, 40], (Kind::Float, Device::Cpu)),
    ];
    let mut loss = 0.0;
    for _ in 0..a.warmup {
        loss = model.step(&views, &mut ring)?;
    }
    ring.barrier()?;
    let t0 = Instant::now();
    for _ in 0..a.iters {
        loss = model.step(&views, &mut ring)?;
    }
    let secs = t0.elapsed().as_secs_f64() / a.iters as f64;
    if rank == 0 {
        println!(
            "{}",
            serde_json::json!({
                "impl": "butler", "world": a.world, "global_batch": a.batch, "iters": a.iters,
                "threads": a.threads, "seconds_per_step": secs, "loss": loss,
                "peak_rss_mib": super::util::proc_status_mib("VmHWM:"),
            })
        );
    }
    Ok(())
}
