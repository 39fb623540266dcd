//! `butler bench stream`: stream a split through the real loader (planned order, shard cache, weak+strong
//! augmentation) on W local processes, and report samples/s and peak RSS per rank — the data plane's
//! throughput and its memory bound, measured apart from training.
//! `butler bench manifest`: load time and memory of a manifest with many shards.

use super::util::{proc_status_mib, spawn_ranks};
use anyhow::Result;
use butler_data::assign::ShardedOrder;
use butler_data::augment::WeakStrong;
use butler_data::loader::{LoaderSpec, StreamLoader, ViewMaker, WeakStrongViews};
use butler_data::manifest::Manifest;
use butler_data::shard::CorruptPolicy;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(clap::Args, Clone)]
pub struct StreamArgs {
    /// Dataset directory or manifest.
    #[arg(long, default_value = "data/mnist1d")]
    manifest: PathBuf,
    #[arg(long, default_value = "unlabeled")]
    split: String,
    #[arg(long, default_value_t = 2)]
    world: u32,
    /// Per-rank batch size.
    #[arg(long, default_value_t = 512)]
    batch: usize,
    /// Loader threads per rank.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    #[arg(long, default_value_t = 10_000)]
    shuffle_window: usize,
    #[arg(long, default_value_t = 4)]
    cache_shards: usize,
    /// Stop after this many samples per rank (0: the whole epoch).
    #[arg(long, default_value_t = 0)]
    limit: u64,
    #[arg(long, hide = true)]
    rank: Option<u32>,
}

pub fn stream(a: &StreamArgs) -> Result<()> {
    match a.rank {
        Some(rank) => stream_rank(a, rank),
        None => spawn_ranks(a.world as usize, |rank| {
            let mut args: Vec<String> = [
                "bench",
                "stream",
                "--split",
                &a.split,
                "--world",
                &a.world.to_string(),
            ]
            .map(String::from)
            .to_vec();
            args.extend(["--manifest".into(), a.manifest.display().to_string()]);
            args.extend([
                "--batch".into(),
                a.batch.to_string(),
                "--threads".into(),
                a.threads.to_string(),
            ]);
            args.extend([
                "--shuffle-window".into(),
                a.shuffle_window.to_string(),
                "--cache-shards".into(),
                a.cache_shards.to_string(),
            ]);
            args.extend([
                "--limit".into(),
                a.limit.to_string(),
                "--rank".into(),
                rank.to_string(),
            ]);
            args
        }),
    }
}

fn stream_rank(a: &StreamArgs, rank: u32) -> Result<()> {
    let rss_start = proc_status_mib("VmHWM:");
    let (manifest, file) = Manifest::load(&a.manifest)?;
    let split = manifest.split(&a.split, &file)?;
    let sizes: Vec<u64> = split.shards.iter().map(|s| s.num_samples).collect();
    let order = ShardedOrder {
        shard_sizes: &sizes,
        seed: 0,
        epoch: 0,
        shuffle_window: a.shuffle_window,
        history: &[],
    };
    let seq = order.rank_sequence(a.world, rank);
    let samples = if a.limit > 0 {
        seq.len().min(a.limit)
    } else {
        seq.len()
    };
    let steps = samples.div_ceil(a.batch as u64);
    let len = *manifest
        .sample_shape
        .last()
        .expect("manifests have a sample shape");
    let views: Arc<dyn ViewMaker> = Arc::new(WeakStrongViews {
        seed: 0,
        aug: WeakStrong::default_1d(len),
    });
    let spec = LoaderSpec {
        dir: file.parent().unwrap_or(Path::new(".")).to_path_buf(),
        manifest: Arc::new(manifest.clone()),
        split: a.split.clone(),
        epoch: 0,
        batch: a.batch,
        threads: a.threads,
        prefetch: 2,
        // As the worker's stream sizes it: at least the shards a shuffle window spans.
        cache_shards: butler_data::streams::cache_for_window(
            a.cache_shards,
            a.shuffle_window,
            &sizes,
            a.threads,
        ),
        policy: CorruptPolicy::Skip,
        timeout: Duration::from_secs(600),
    };
    let t0 = Instant::now();
    let mut samples = 0u64;
    let mut checksum = 0f64;
    for batch in StreamLoader::start(spec, Arc::new(seq), 0, steps, views)? {
        let batch = batch?;
        samples += batch.len() as u64;
        checksum += batch.views[1].first().copied().unwrap_or(0.0) as f64;
    }
    let secs = t0.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({
            "bench": "stream", "rank": rank, "world": a.world, "split": a.split, "pool": order.total(),
            "samples": samples, "seconds": secs, "samples_per_second": samples as f64 / secs,
            "loader_threads": a.threads, "views": "weak+strong (1-D)",
            "rss_before_mib": rss_start, "peak_rss_mib": proc_status_mib("VmHWM:"), "checksum": checksum,
        })
    );
    Ok(())
}

#[derive(clap::Args, Clone)]
pub struct ManifestArgs {
    /// Shards in the synthetic manifest.
    #[arg(long, default_value_t = 5000)]
    shards: usize,
    /// Samples per shard.
    #[arg(long, default_value_t = 2000)]
    shard_samples: u64,
}

/// Writes a manifest of `shards` unlabeled shards, then times `Manifest::load` on it and reports RSS.
pub fn manifest(a: &ManifestArgs) -> Result<()> {
    let dir = std::env::temp_dir().join(format!("butler-bench-manifest-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let shards: Vec<serde_json::Value> = (0..a.shards)
        .map(|k| {
            serde_json::json!({"path": format!("pool-{k:06}.safetensors"), "num_samples": a.shard_samples,
                "sha256": format!("{:064x}", k), "first_id": k as u64 * a.shard_samples})
        })
        .collect();
    let total = a.shards as u64 * a.shard_samples;
    let m = serde_json::json!({"format": "butler-shards", "version": 1, "name": "synthetic", "sample_shape": [40],
        "dtype": "f32", "classes": (0..10).map(|c| c.to_string()).collect::<Vec<_>>(),
        "splits": {"unlabeled": {"num_samples": total, "labeled": false, "shards": shards}}});
    let path = dir.join("manifest.json");
    std::fs::write(&path, serde_json::to_vec(&m)?)?;
    let bytes = std::fs::metadata(&path)?.len();
    let rss0 = proc_status_mib("VmRSS:");
    let t0 = Instant::now();
    let (loaded, _) = Manifest::load(&path)?;
    let secs = t0.elapsed().as_secs_f64();
    let rss1 = proc_status_mib("VmRSS:");
    let _ = std::fs::remove_dir_all(&dir);
    println!(
        "{}",
        serde_json::json!({"bench": "manifest", "shards": a.shards, "samples": loaded.splits["unlabeled"].num_samples,
            "file_bytes": bytes, "load_seconds": secs, "rss_growth_mib": rss1 - rss0})
    );
    Ok(())
}
