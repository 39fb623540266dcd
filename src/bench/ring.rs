//! `butler bench allreduce`: the TCP ring's all-reduce (sum, f32), one process per rank on loopback
//! (`bench/allreduce.sh`, vs gloo).

use super::util::{file_rendezvous, spawn_ranks};
use anyhow::{bail, Result};
use butler_worker::collective::ring::bus_bandwidth_gbps;
use butler_worker::collective::RingConfig;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(clap::Args, Clone)]
pub struct AllreduceArgs {
    #[arg(long, default_value_t = 2)]
    world: usize,
    /// Buffer size in bytes (rounded down to whole f32 values).
    #[arg(long, default_value_t = 64 << 20)]
    bytes: usize,
    #[arg(long, default_value_t = 10)]
    iters: usize,
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    /// Internal: this process's rank (set by the launching process).
    #[arg(long, hide = true)]
    rank: Option<usize>,
    /// Internal: where ranks publish their addresses.
    #[arg(long, hide = true)]
    dir: Option<PathBuf>,
}

pub fn allreduce(a: &AllreduceArgs) -> Result<()> {
    match (a.rank, a.dir.clone()) {
        (Some(rank), Some(dir)) => allreduce_rank(a, rank, &dir),
        _ => allreduce_launch(a),
    }
}

fn allreduce_launch(a: &AllreduceArgs) -> Result<()> {
    if a.world == 0 || a.iters == 0 {
        bail!("--world and --iters must be positive");
    }
    let dir = std::env::temp_dir().join(format!("butler-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let result = spawn_ranks(a.world, |rank| {
        vec![
            "bench".into(),
            "allreduce".into(),
            "--world".into(),
            a.world.to_string(),
            "--bytes".into(),
            a.bytes.to_string(),
            "--iters".into(),
            a.iters.to_string(),
            "--warmup".into(),
            a.warmup.to_string(),
            "--rank".into(),
            rank.to_string(),
            "--dir".into(),
            dir.display().to_string(),
        ]
    });
    let _ = std::fs::remove_dir_all(&dir);
    result?;
    Ok(())
}

fn allreduce_rank(a: &AllreduceArgs, rank: usize, dir: &Path) -> Result<()> {
    let mut ring = file_rendezvous(rank, a.world, dir, RingConfig::default())?;
    let n = a.bytes / 4;
    let mut buf: Vec<f32> = (0..n).map(|i| (i % 1000) as f32).collect();
    for _ in 0..a.warmup {
        ring.all_reduce_sum_f32(&mut buf)?;
    }
    ring.barrier()?;
    let t0 = Instant::now();
    for _ in 0..a.iters {
        ring.all_reduce_sum_f32(&mut buf)?;
    }
    let secs = t0.elapsed().as_secs_f64() / a.iters as f64;
    if rank == 0 {
        let algbw = (n * 4) as f64 / secs / 1e9;
        println!(
            "{}",
            serde_json::json!({
                "impl": "butler-tcp-ring", "world": a.world, "bytes": n * 4, "iters": a.iters,
                "seconds_per_iter": secs, "algbw_gbps": algbw, "busbw_gbps": bus_bandwidth_gbps(n * 4, a.world, secs),
            })
        );
    }
    Ok(())
}
