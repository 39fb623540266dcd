//! `butler bench`: micro-benchmarks that print JSON lines for the scripts in `bench/` to compare against
//! named peers. Never run by the tests.
//!
//! - `allreduce`: the TCP ring, one process per rank (`bench/allreduce.sh`, vs gloo).
//! - `augment`: per-sample augmentation in loader threads (`bench/augment.sh`, vs torchvision v2).
//! - `simclr`: time per SimCLR step at a large global batch (`bench/simclr.sh`, vs PyTorch DDP).
//! - `nccl`, `train`: on a GPU (`bench/gpu_vs_torch.py`, vs torch.distributed NCCL and plain PyTorch).

use anyhow::{bail, Context, Result};
use butler_worker::augment::{Pipeline, SampleKey, TwoViews, WeakStrong};
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
    /// Per-sample augmentation throughput on raw f32 buffers, in loader threads.
    Augment(AugmentArgs),
    /// Stream a sharded split through the loader (weak+strong views), one process per rank.
    Stream(crate::bench_stream::StreamArgs),
    /// Load time and memory of a manifest with many shards.
    Manifest(crate::bench_stream::ManifestArgs),
    /// Time per SimCLR step (global negatives, exact gradients, LARS), one process per rank.
    Simclr(crate::bench_simclr::SimclrArgs),
    /// All-reduce on a world-1 NCCL communicator (needs a GPU).
    Nccl(crate::bench_gpu::NcclArgs),
    /// Training samples/s of ConvBase through the Trainer on one device.
    Train(crate::bench_gpu::TrainArgs),
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

#[derive(clap::Args, Clone)]
pub struct AugmentArgs {
    /// Sample shape, comma-separated: `C,H,W` for images (values in [0, 1]), `L` or `C,L` for signals.
    #[arg(long, default_value = "3,32,32", value_delimiter = ',')]
    shape: Vec<usize>,
    /// Samples to augment in the timed run.
    #[arg(long, default_value_t = 20_000)]
    samples: u64,
    /// Loader threads (each with its own scratch buffers; samples are split into contiguous ranges).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// weak | strong (FixMatch's views; one view per sample), simclr (SimCLR's view, one per sample;
    /// `TwoViews::default_1d` for signals), weak-strong (both views per sample).
    #[arg(long, default_value = "strong")]
    pipeline: String,
    /// RandAugment ops and magnitude (0..=30) of the strong 2-D view.
    #[arg(long, default_value_t = 2)]
    ra_n: usize,
    #[arg(long, default_value_t = 10)]
    ra_m: u32,
    /// Distinct random input samples the timed run cycles through.
    #[arg(long, default_value_t = 256)]
    distinct: usize,
}

/// Runs this binary once per rank with the arguments `args(rank)`, waits for all, and fails naming the
/// ranks that failed.
pub fn spawn_ranks(world: usize, args: impl Fn(usize) -> Vec<String>) -> Result<()> {
    let exe = std::env::current_exe()?;
    let children: Vec<_> = (0..world)
        .map(|rank| {
            Command::new(&exe)
                .args(args(rank))
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
    if !failed.is_empty() {
        bail!("bench ranks {failed:?} failed");
    }
    Ok(())
}

pub fn run(cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::Allreduce(a) => match (a.rank, a.dir.clone()) {
            (Some(rank), Some(dir)) => allreduce_rank(&a, rank, &dir),
            _ => allreduce_launch(&a),
        },
        BenchCommand::Augment(a) => augment(&a),
        BenchCommand::Stream(a) => crate::bench_stream::stream(&a),
        BenchCommand::Manifest(a) => crate::bench_stream::manifest(&a),
        BenchCommand::Simclr(a) => crate::bench_simclr::simclr(&a),
        BenchCommand::Nccl(a) => crate::bench_gpu::nccl(&a),
        BenchCommand::Train(a) => crate::bench_gpu::train(&a),
    }
}

/// What the augment bench runs per sample: one pipeline (one view) or weak + strong (two views).
enum AugmentJob {
    One(Pipeline),
    Two(WeakStrong),
}

fn augment(a: &AugmentArgs) -> Result<()> {
    if a.samples == 0 || a.threads == 0 || a.distinct == 0 {
        bail!("--samples, --threads and --distinct must be positive");
    }
    let shape = a.shape.clone();
    let image = match *shape.as_slice() {
        [c, h, w] if c > 0 && h > 0 && w > 0 => Some((h, w)),
        [l] | [_, l] if l > 0 => None,
        _ => bail!("--shape must be C,H,W or L or C,L with positive sizes, got {shape:?}"),
    };
    let job = match (a.pipeline.as_str(), image) {
        ("weak", Some((h, w))) => {
            AugmentJob::One(WeakStrong::default_2d(h, w, a.ra_n, a.ra_m).weak)
        }
        ("strong", Some((h, w))) => {
            AugmentJob::One(WeakStrong::default_2d(h, w, a.ra_n, a.ra_m).strong)
        }
        ("simclr", Some((h, w))) => AugmentJob::One(TwoViews::simclr_2d(h, w, 0.5, false).0),
        ("weak-strong", Some((h, w))) => {
            AugmentJob::Two(WeakStrong::default_2d(h, w, a.ra_n, a.ra_m))
        }
        ("weak", None) => AugmentJob::One(WeakStrong::default_1d(*shape.last().unwrap()).weak),
        ("strong", None) => AugmentJob::One(WeakStrong::default_1d(*shape.last().unwrap()).strong),
        ("simclr", None) => AugmentJob::One(TwoViews::default_1d(*shape.last().unwrap()).0),
        ("weak-strong", None) => AugmentJob::Two(WeakStrong::default_1d(*shape.last().unwrap())),
        (p, _) => bail!("--pipeline must be weak, strong, simclr or weak-strong, got {p:?}"),
    };
    let numel: usize = shape.iter().product();
    // Inputs: uniform [0, 1) values (images) or a standardized-looking signal, from a fixed seed.
    let mut g = butler_worker::mixing::MixRng::new(0xBE_4C);
    let inputs: Vec<Vec<f32>> = (0..a.distinct)
        .map(|_| {
            (0..numel)
                .map(|_| {
                    if image.is_some() {
                        g.uniform() as f32
                    } else {
                        g.normal() as f32
                    }
                })
                .collect()
        })
        .collect();
    // Each thread augments ids lo..hi into reused buffers; the checksum keeps the work observable.
    let run_range = |lo: u64, hi: u64| -> f64 {
        let (mut out, mut out2, mut scratch) = (Vec::new(), Vec::new(), Vec::new());
        let mut checksum = 0.0f64;
        for id in lo..hi {
            let x = &inputs[(id % a.distinct as u64) as usize];
            let key = SampleKey::new(1, 0, id);
            match &job {
                AugmentJob::One(p) => {
                    out.clear();
                    out.extend_from_slice(x);
                    p.apply_in_place(&mut out, &shape, &mut key.rng(0), &mut scratch);
                }
                AugmentJob::Two(ws) => {
                    ws.views_into(x, &shape, key, &mut out, &mut out2, &mut scratch);
                    checksum += out2[(id as usize * 7) % numel] as f64;
                }
            }
            checksum += out[(id as usize * 13) % numel] as f64;
        }
        checksum
    };
    let run_all = |n: u64| -> (f64, f64) {
        let t0 = Instant::now();
        let per = n.div_ceil(a.threads as u64);
        let checksum = std::thread::scope(|s| {
            let handles: Vec<_> = (0..a.threads as u64)
                .map(|t| {
                    let (lo, hi) = ((t * per).min(n), ((t + 1) * per).min(n));
                    let run_range = &run_range;
                    s.spawn(move || run_range(lo, hi))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("an augment thread panicked"))
                .sum::<f64>()
        });
        (t0.elapsed().as_secs_f64(), checksum)
    };
    run_all((a.samples / 10).clamp(1, 2_000)); // warm-up: page in buffers, grow scratch
    let (secs, checksum) = run_all(a.samples);
    let views = match job {
        AugmentJob::One(_) => 1,
        AugmentJob::Two(_) => 2,
    };
    println!(
        "{}",
        serde_json::json!({
            "impl": "butler", "bench": "augment", "pipeline": a.pipeline, "shape": shape,
            "threads": a.threads, "samples": a.samples, "views_per_sample": views,
            "ra_n": a.ra_n, "ra_m": a.ra_m, "seconds": secs,
            "samples_per_s": a.samples as f64 / secs,
            "views_per_s": (a.samples * views) as f64 / secs,
            "checksum": checksum,
        })
    );
    Ok(())
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

/// Joins a loopback ring of `world` bench processes that publish their addresses as files in `dir`
/// (the benches run without a coordinator).
pub(crate) fn file_rendezvous(
    rank: usize,
    world: usize,
    dir: &Path,
    cfg: RingConfig,
) -> Result<butler_worker::collective::TcpRing> {
    let listener = RingListener::bind("127.0.0.1:0".parse().expect("a valid address"))?;
    let mine = dir.join(format!("rank{rank}.addr"));
    butler_common::fsutil::write_atomic(&mine, listener.local_addr().to_string().as_bytes())?;
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut peers = Vec::with_capacity(world);
    for r in 0..world {
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
    Ok(listener.connect(rank, &peers, cfg)?)
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
