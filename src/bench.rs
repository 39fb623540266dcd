//! `butler bench`: micro-benchmarks that print JSON lines for the scripts in `bench/` to compare against
//! named peers. Never run by the tests.

use anyhow::{bail, Context, Result};
use butler_worker::collective::ring::bus_bandwidth_gbps;
use butler_worker::collective::{RingConfig, RingListener};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

#[derive(clap::Subcommand)]
pub enum BenchCommand {
    /// All-reduce (sum, f32) over the TCP ring, one process per rank on loopback.
    Allreduce(AllreduceArgs),
}

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

pub fn run(cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::Allreduce(a) => match (a.rank, a.dir.clone()) {
            (Some(rank), Some(dir)) => allreduce_rank(&a, rank, &dir),
            _ => allreduce_launch(&a),
        },
    }
}

fn allreduce_launch(a: &AllreduceArgs) -> Result<()> {
    if a.world == 0 || a.iters == 0 {
        bail!("--world and --iters must be positive");
    }
    let dir = std::env::temp_dir().join(format!("butler-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let exe = std::env::current_exe()?;
    let children: Vec<_> = (0..a.world)
        .map(|rank| {
            Command::new(&exe)
                .args([
                    "bench",
                    "allreduce",
                    "--world",
                    &a.world.to_string(),
                    "--bytes",
                    &a.bytes.to_string(),
                ])
                .args([
                    "--iters",
                    &a.iters.to_string(),
                    "--warmup",
                    &a.warmup.to_string(),
                    "--rank",
                    &rank.to_string(),
                ])
                .arg("--dir")
                .arg(&dir)
                .spawn()
                .context("starting a bench rank")
        })
        .collect::<Result<_>>()?;
    let mut failed = Vec::new();
    for (rank, mut c) in children.into_iter().enumerate() {
        if !c.wait()?.success() {
            failed.push(rank);
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    if !failed.is_empty() {
        bail!("bench ranks {failed:?} failed");
    }
    Ok(())
}

fn allreduce_rank(a: &AllreduceArgs, rank: usize, dir: &Path) -> Result<()> {
    let listener = RingListener::bind("127.0.0.1:0".parse().expect("a valid address"))?;
    let mine = dir.join(format!("rank{rank}.addr"));
    butler_common::fsutil::write_atomic(&mine, listener.local_addr().to_string().as_bytes())?;
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut peers = Vec::with_capacity(a.world);
    for r in 0..a.world {
        let f = dir.join(format!("rank{r}.addr"));
        loop {
            if let Ok(s) = std::fs::read_to_string(&f) {
                peers.push(s.parse::<SocketAddr>()?);
                break;
            }
            if Instant::now() > deadline {
                bail!("rank {r} never published its address");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    let mut ring = listener.connect(rank, &peers, RingConfig::default())?;
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
