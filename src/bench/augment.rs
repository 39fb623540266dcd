//! `butler bench augment`: per-sample augmentation throughput on raw f32 buffers, in loader threads
//! (`bench/augment.sh`, vs torchvision v2).

use anyhow::{bail, Result};
use butler_worker::augment::{Pipeline, SampleKey, TwoViews, WeakStrong};
use std::time::Instant;

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

/// What the augment bench runs per sample: one pipeline (one view) or weak + strong (two views).
enum AugmentJob {
    One(Pipeline),
    Two(WeakStrong),
}

pub fn augment(a: &AugmentArgs) -> Result<()> {
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
