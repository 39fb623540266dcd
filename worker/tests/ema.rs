//! `[train] ema`: the average follows its recurrence exactly, is identical on every rank (W workers ≡ one
//! process), is what evaluation and checkpoints see, and leaves the trained parameters untouched.

mod common;

use butler_common::config::JobConfig;
use butler_worker::collective::SingleProcess;
use butler_worker::trainer::Trainer;
use std::path::Path;
use std::time::Duration;
use tch::{Device, Kind, Tensor};

const BATCH: i64 = 24;
const STEPS: i64 = 6;

/// libtorch's RNG is process-global: seeded construction happens under this lock.
static SEEDED: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn config(ema: &str) -> JobConfig {
    let text = format!(
        "[job]\nname='ema'\nseed=3\n[data]\nmanifest='unused'\n[model]\nkind='conv_base'\nchannels=6\n\
         [optim]\nkind='sgd'\nlr=0.1\nmomentum=0.9\n[train]\nepochs=1\nbatch_size={BATCH}\n{ema}\n\
         [cluster]\nbucket_mb=0.01\n"
    );
    JobConfig::from_toml(&text, Path::new("ema.toml")).unwrap()
}

fn data() -> (Tensor, Tensor) {
    tch::manual_seed(21);
    (
        Tensor::randn([BATCH * STEPS, 40], (Kind::Float, Device::Cpu)),
        Tensor::randint(10, [BATCH * STEPS], (Kind::Int64, Device::Cpu)),
    )
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn the_average_follows_its_recurrence_and_leaves_the_parameters_alone() {
    let cfg = config("ema=0.8");
    let (x, y, mut t) = {
        let _g = SEEDED.lock().unwrap_or_else(|p| p.into_inner());
        let (x, y) = data();
        (x, y, Trainer::new(&cfg, &[40], 10, 3, 100).unwrap())
    };
    let mut comm = SingleProcess;
    t.broadcast_parameters(&mut comm).unwrap();
    let mut expected = t.flat_parameters();
    assert_eq!(
        t.flat_ema().unwrap(),
        expected,
        "the average starts at the parameters"
    );
    for s in 0..STEPS {
        let (xb, yb) = (x.narrow(0, s * BATCH, BATCH), y.narrow(0, s * BATCH, BATCH));
        t.step(&xb, &yb, BATCH as u64, None, &mut comm).unwrap();
        let p = t.flat_parameters();
        for (e, v) in expected.iter_mut().zip(&p) {
            *e = 0.8 * *e + 0.2 * v;
        }
    }
    let ema = t.flat_ema().unwrap();
    let d = max_abs_diff(&ema, &expected);
    assert!(d < 1e-6, "EMA off its recurrence by {d}");
    let params = t.flat_parameters();
    assert!(
        max_abs_diff(&ema, &params) > 1e-3,
        "the EMA should lag the parameters"
    );
    // Evaluation uses the EMA and restores the parameters afterwards.
    let on_ema = t.evaluate(&x, &y, &mut comm, 50).unwrap();
    assert_eq!(
        t.flat_parameters(),
        params,
        "evaluation must not change the parameters"
    );
    let raw = {
        let _g = SEEDED.lock().unwrap_or_else(|p| p.into_inner());
        let mut plain = Trainer::new(&config(""), &[40], 10, 3, 100).unwrap();
        plain.vs.copy(&t.vs).unwrap();
        plain
    };
    let on_raw = raw.evaluate(&x, &y, &mut comm, 50).unwrap();
    assert_ne!(
        on_ema.loss, on_raw.loss,
        "evaluation did not use the EMA weights"
    );
}

#[test]
fn two_workers_keep_the_same_average_as_one() {
    let cfg = config("ema=0.9");
    let (x, y, trainers) = {
        let _g = SEEDED.lock().unwrap_or_else(|p| p.into_inner());
        let (x, y) = data();
        let single = Trainer::new(&cfg, &[40], 10, 3, 100).unwrap();
        // Rank 1 draws other initial weights: the broadcast (and the EMA restart) must override them.
        let r0 = Trainer::new(&cfg, &[40], 10, 3, 100).unwrap();
        let r1 = Trainer::new(&cfg, &[40], 10, 1003, 100).unwrap();
        (x, y, vec![single, r0, r1])
    };
    let mut trainers = trainers.into_iter();
    let mut single = trainers.next().unwrap();
    let mut comm = SingleProcess;
    single.broadcast_parameters(&mut comm).unwrap();
    for s in 0..STEPS {
        let (xb, yb) = (x.narrow(0, s * BATCH, BATCH), y.narrow(0, s * BATCH, BATCH));
        single
            .step(&xb, &yb, BATCH as u64, None, &mut comm)
            .unwrap();
    }
    let want = single.flat_ema().unwrap();
    let handles: Vec<_> = trainers
        .zip(common::rings_with_timeout(2, Duration::from_secs(20)))
        .enumerate()
        .map(|(rank, (mut t, mut ring))| {
            let (x, y) = (x.shallow_clone(), y.shallow_clone());
            std::thread::spawn(move || {
                t.broadcast_parameters(&mut ring).unwrap();
                let half = BATCH / 2;
                for s in 0..STEPS {
                    // Rank r takes positions r, r+2, … of the step's global batch (the sampler's stride).
                    let idx = Tensor::arange_start_step(
                        s * BATCH + rank as i64,
                        (s + 1) * BATCH,
                        2,
                        (Kind::Int64, Device::Cpu),
                    );
                    assert_eq!(idx.size()[0], half);
                    let (xb, yb) = (x.index_select(0, &idx), y.index_select(0, &idx));
                    t.step(&xb, &yb, BATCH as u64, None, &mut ring).unwrap();
                }
                assert_eq!(ring.world_size(), 2);
                t.flat_ema().unwrap()
            })
        })
        .collect();
    for (rank, h) in handles.into_iter().enumerate() {
        let got = h.join().unwrap();
        let d = max_abs_diff(&got, &want);
        assert!(
            d <= 1e-5,
            "rank {rank}'s EMA differs from one process's by {d}"
        );
    }
}

#[test]
fn a_decay_outside_zero_one_is_refused_by_name() {
    for bad in ["ema=1.0", "ema=0.0", "ema=-0.5", "ema=1.5"] {
        let text = format!(
            "[job]\nname='ema'\nseed=3\n[data]\nmanifest='unused'\n[model]\nkind='conv_base'\n\
             [optim]\nkind='sgd'\nlr=0.1\n[train]\nepochs=1\nbatch_size=8\n{bad}\n"
        );
        let e = JobConfig::from_toml(&text, Path::new("ema.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("train.ema") && e.contains("between 0 and 1"),
            "{bad}: {e}"
        );
    }
}
