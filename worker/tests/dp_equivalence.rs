//! Data-parallel training equals single-process training: W workers with per-worker batch B/W reach the
//! same parameters as 1 worker with batch B after 20 steps on the same data order.

mod common;

use butler_common::config::JobConfig;
use butler_common::sampler::DistributedSampler;
use butler_worker::collective::TcpRing;
use butler_worker::data::InMemorySplit;
use butler_worker::trainer::{Trainer, UnlabeledBatch};
use std::path::Path;
use std::time::Duration;
use tch::{Device, Kind, Tensor};

const STEPS: usize = 20;

/// libtorch's RNG is process-global and the test harness runs tests on parallel threads: seeded
/// construction happens under this lock so that each test's draws are its own.
static SEEDED: std::sync::Mutex<()> = std::sync::Mutex::new(());
const GLOBAL_BATCH: usize = 48;

/// `extra` is appended: further sections (e.g. `[ssl]`). With an `[ssl]` section the data section names
/// an unlabeled split, which the config requires. Keys before `extra`'s first section header go into
/// `[train]` (e.g. `ema=0.9` for Mean Teacher).
fn config_with(optim: &str, extra: &str) -> JobConfig {
    let (train, extra) = extra.split_at(extra.find('[').unwrap_or(extra.len()));
    let unlabeled = if extra.contains("[ssl]") {
        "unlabeled_split='u'\n"
    } else {
        ""
    };
    let text = format!(
        "[job]\nname='dp'\nseed=3\n[data]\nmanifest='unused'\n{unlabeled}[model]\nkind='conv_base'\nchannels=8\n\
         [optim]\n{optim}\n[schedule]\nkind='cosine'\nwarmup_steps=3\n[train]\nepochs=1\nbatch_size={GLOBAL_BATCH}\nlabel_smoothing=0.1\n{train}\
         [cluster]\nbucket_mb=0.01\n{extra}"
    );
    JobConfig::from_toml(&text, Path::new("dp.toml")).unwrap()
}

fn data(n: i64) -> InMemorySplit {
    tch::manual_seed(11);
    InMemorySplit::from_tensors(
        Tensor::randn([n, 40], (Kind::Float, Device::Cpu)),
        Tensor::randint(10, [n], (Kind::Int64, Device::Cpu)),
    )
}

fn rings(world: usize) -> Vec<TcpRing> {
    common::rings_with_timeout(world, Duration::from_secs(20))
}

/// The unlabeled samples of step `s`: a global batch of `UNLABELED` samples split unevenly across the
/// ranks (rank r of W takes a share that differs by rank), as (clean, perturbed) views, with sample
/// ids that come back every `POOL` samples (FlexMatch overwrites its records).
const UNLABELED: i64 = 36;
const POOL: u64 = 100;

fn unlabeled_share(
    pool: &Tensor,
    step: usize,
    world: usize,
    rank: usize,
) -> (Vec<Tensor>, u64, Vec<u64>) {
    // Uneven cut points: rank r ends at UNLABELED·(r+1)²/W² (all for W = 1).
    let end = |r: usize| UNLABELED * ((r * r) as i64) / ((world * world) as i64);
    let (a, b) = (end(rank), end(rank + 1));
    let base = step as i64 * UNLABELED;
    let clean = pool.narrow(0, base + a, b - a);
    let noise = pool.narrow(0, base + a + 1, b - a) * 0.3;
    let ids = (base + a..base + b).map(|i| i as u64 % POOL).collect();
    (
        vec![clean.shallow_clone(), &clean + noise],
        UNLABELED as u64,
        ids,
    )
}

/// Trains `world` replicas for STEPS steps and returns every replica's final parameters.
fn train_with(world: usize, optim: &str, extra: &str, n: i64) -> Vec<Vec<f32>> {
    let cfg = config_with(optim, extra);
    let ssl = cfg.ssl.is_some();
    let guard = SEEDED.lock().unwrap_or_else(|p| p.into_inner());
    let data = data(n);
    let pool = {
        tch::manual_seed(12);
        Tensor::randn(
            [UNLABELED * (STEPS as i64 + 1) + 1, 40],
            (Kind::Float, Device::Cpu),
        ) * 2.0
    };
    let n = data.len;
    // Replicas are built one after another: libtorch's seed is process-global. Ranks > 0 get deliberately
    // different initial parameters, which the broadcast from rank 0 must overwrite.
    let trainers: Vec<Trainer> = (0..world)
        .map(|rank| {
            Trainer::new(
                &cfg,
                &[40],
                10,
                cfg.job.seed + rank as u64 * 1000,
                // A schedule longer than the test, so the last (uneven) step still has a real learning rate.
                4 * STEPS as u64,
            )
            .unwrap()
        })
        .collect();
    drop(guard);
    let per_rank = GLOBAL_BATCH / world;
    let handles: Vec<_> = trainers
        .into_iter()
        .zip(rings(world))
        .enumerate()
        .map(|(rank, (mut trainer, mut ring))| {
            let (x, y) = (data.x.shallow_clone(), data.y.shallow_clone());
            let pool = pool.shallow_clone();
            std::thread::spawn(move || {
                let split = InMemorySplit::from_tensors(x, y);
                trainer.broadcast_parameters(&mut ring).unwrap();
                // STEPS steps, crossing into the next epoch when the first one is shorter.
                let mut taken = 0;
                for epoch in 0.. {
                    let sampler = DistributedSampler {
                        dataset_len: n,
                        seed: 5,
                        epoch,
                        shuffle: true,
                        world_size: world as u32,
                        rank: rank as u32,
                        start: 0,
                    };
                    for (k, batch) in sampler.batches(per_rank as u64).iter().enumerate() {
                        if taken == STEPS {
                            break;
                        }
                        let (xb, yb) = split.batch(batch);
                        let global = sampler.global_batch_len(k as u64, per_rank as u64);
                        let views = ssl.then(|| unlabeled_share(&pool, taken, world, rank));
                        let u = views.as_ref().map(|(v, g, ids)| UnlabeledBatch {
                            views: v,
                            global_len: *g,
                            ids,
                            pool_len: POOL,
                        });
                        trainer.step(&xb, &yb, global, u, &mut ring).unwrap();
                        taken += 1;
                    }
                    if taken == STEPS {
                        break;
                    }
                }
                trainer.flat_parameters()
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// `n` samples: a multiple of the global batch, or not (the 20th step is then short and uneven across
/// ranks, which the loss weighting must make exact).
fn check(optim: &str, world: usize, n: i64) {
    check_with(optim, "", world, n)
}

fn check_with(optim: &str, extra: &str, world: usize, n: i64) {
    let single = train_with(1, optim, extra, n).remove(0);
    let replicas = train_with(world, optim, extra, n);
    let initial = {
        let _guard = SEEDED.lock().unwrap_or_else(|p| p.into_inner());
        let cfg = config_with(optim, extra);
        Trainer::new(&cfg, &[40], 10, cfg.job.seed, 1)
            .unwrap()
            .flat_parameters()
    };
    assert!(
        max_abs_diff(&single, &initial) > 1e-3,
        "training did not move the parameters; the test would prove nothing"
    );
    for (rank, p) in replicas.iter().enumerate() {
        let d = max_abs_diff(&single, p);
        assert!(
            d <= 1e-5,
            "{optim}: rank {rank} of {world} differs from single-process training by {d}"
        );
    }
}

#[test]
fn two_workers_equal_one_with_sgd() {
    check(
        "kind='sgd'\nlr=0.05\nmomentum=0.9\nnesterov=true\nweight_decay=0.001",
        2,
        960,
    );
}

#[test]
fn three_workers_equal_one_with_sgd() {
    check("kind='sgd'\nlr=0.05\nmomentum=0.9", 3, 960);
}

#[test]
fn two_workers_equal_one_with_adamw() {
    check("kind='adamw'\nlr=0.003\nweight_decay=0.01", 2, 960);
}

#[test]
fn three_workers_equal_one_when_the_last_batch_is_short_and_uneven() {
    // 950 = 19 full global batches of 48 + 38: the ranks hold 13, 13 and 12 samples at the last step.
    check("kind='sgd'\nlr=0.05\nmomentum=0.9", 3, 950);
}

#[test]
fn three_workers_equal_one_when_two_ranks_have_nothing_at_the_last_step() {
    // 865 = 18 full global batches of 48 + 1: at step 18 only rank 0 holds a sample and ranks 1 and 2 run
    // no backward pass; the 20th step is in the next epoch, so optimizer state after it is compared too.
    check(
        "kind='sgd'\nlr=0.05\nmomentum=0.9\nweight_decay=0.001",
        3,
        865,
    );
}

// Consistency methods: the unlabeled term and the masked means (TSA, "masked" normalisation) divide by
// counts known only across ranks; the shares are uneven, and the last labeled step too.

#[test]
fn three_workers_equal_one_with_uda_tsa_and_masked_normalisation() {
    check_with(
        "kind='sgd'\nlr=0.05\nmomentum=0.9",
        "[ssl]\nmethod='uda'\nlambda_u=2.0\ntemperature=0.5\nthreshold=0.12\ntsa='linear'\nnormalize='masked'\n",
        3,
        950,
    );
}

#[test]
fn two_workers_equal_one_with_fixmatch() {
    check_with(
        "kind='adamw'\nlr=0.003",
        "[ssl]\nmethod='fixmatch'\nthreshold=0.15\n",
        2,
        950,
    );
}

// The USB methods: their statistics (mean prediction, confidence moments, FlexMatch's learning status)
// are reduced over the global unlabeled batch, so every rank holds the state one process would. Fast
// momenta make the state move within the test's 20 steps.

const ADAMW: &str = "kind='adamw'\nlr=0.003";
const FLEXMATCH: &str = "[ssl]\nmethod='flexmatch'\nthreshold=0.5\n";
const FREEMATCH: &str = "[ssl]\nmethod='freematch'\nadaptive_momentum=0.7\n";
const SOFTMATCH: &str = "[ssl]\nmethod='softmatch'\nadaptive_momentum=0.7\ndistribution_alignment=true\nda_momentum=0.5\n";
const FIXMATCH_DA: &str =
    "[ssl]\nmethod='fixmatch'\nthreshold=0.15\ndistribution_alignment=true\nda_momentum=0.5\n";
const MEAN_TEACHER: &str = "ema=0.9\n[ssl]\nmethod='mean_teacher'\nrampup_steps=10\n";
const PI_MODEL: &str = "[ssl]\nmethod='pi_model'\nnormalize='masked'\n";

#[test]
fn two_workers_equal_one_with_flexmatch() {
    check_with(ADAMW, FLEXMATCH, 2, 950);
}

#[test]
fn three_workers_equal_one_with_flexmatch() {
    check_with(ADAMW, FLEXMATCH, 3, 950);
}

#[test]
fn two_workers_equal_one_with_freematch() {
    check_with(ADAMW, FREEMATCH, 2, 950);
}

#[test]
fn three_workers_equal_one_with_freematch() {
    check_with(ADAMW, FREEMATCH, 3, 950);
}

#[test]
fn three_workers_equal_one_with_softmatch_and_uniform_alignment() {
    check_with(ADAMW, SOFTMATCH, 3, 950);
}

#[test]
fn two_workers_equal_one_with_fixmatch_and_distribution_alignment() {
    check_with(ADAMW, FIXMATCH_DA, 2, 950);
}

#[test]
fn two_workers_equal_one_with_mean_teacher() {
    check_with(ADAMW, MEAN_TEACHER, 2, 950);
}

#[test]
fn three_workers_equal_one_with_the_pi_model() {
    check_with(ADAMW, PI_MODEL, 3, 950);
}

/// The equivalence tests above prove something only if the unlabeled term moves the parameters at these
/// thresholds (a mask that is all zeros would make the consistency term vanish).
#[test]
fn the_unlabeled_terms_of_the_equivalence_tests_are_active() {
    for (optim, ssl) in [
        ("kind='sgd'\nlr=0.05\nmomentum=0.9", "[ssl]\nmethod='uda'\ntemperature=0.5\nthreshold=0.12\ntsa='linear'\nnormalize='masked'\nlambda_u=".to_string()),
        ("kind='adamw'\nlr=0.003", "[ssl]\nmethod='fixmatch'\nthreshold=0.15\nlambda_u=".to_string()),
        (ADAMW, format!("{FLEXMATCH}lambda_u=")),
        (ADAMW, format!("{FREEMATCH}lambda_u=")),
        (ADAMW, format!("{SOFTMATCH}lambda_u=")),
        (ADAMW, format!("{FIXMATCH_DA}lambda_u=")),
        (ADAMW, format!("{MEAN_TEACHER}lambda_u=")),
        (ADAMW, format!("{PI_MODEL}lambda_u=")),
    ] {
        let on = train_with(1, optim, &format!("{ssl}2.0\n"), 950).remove(0);
        let off = train_with(1, optim, &format!("{ssl}0.0\n"), 950).remove(0);
        let d = max_abs_diff(&on, &off);
        assert!(d > 1e-4, "{ssl}: the unlabeled term changed the parameters by only {d}");
    }
}

/// The methods' state matters: with a slow and a fast momentum (FreeMatch, SoftMatch, alignment) or
/// another threshold (FlexMatch's curriculum) training ends elsewhere, so an equivalence that held only
/// for a state that never moved would be caught.
#[test]
fn the_state_of_the_usb_methods_changes_the_training() {
    for (a, b) in [
        (FREEMATCH.to_string(), FREEMATCH.replace("0.7", "0.999")),
        (
            SOFTMATCH.to_string(),
            SOFTMATCH.replace("adaptive_momentum=0.7", "adaptive_momentum=0.999"),
        ),
        (
            FIXMATCH_DA.to_string(),
            FIXMATCH_DA.replace("\ndistribution_alignment=true\nda_momentum=0.5", ""),
        ),
        (
            FLEXMATCH.to_string(),
            FLEXMATCH.replace("flexmatch", "fixmatch"),
        ),
    ] {
        let x = train_with(1, ADAMW, &a, 950).remove(0);
        let y = train_with(1, ADAMW, &b, 950).remove(0);
        let d = max_abs_diff(&x, &y);
        assert!(d > 1e-4, "{a} vs {b}: only {d} apart");
    }
}

#[test]
fn two_workers_equal_one_with_lars() {
    check(
        "kind='lars'\nlr=0.5\nmomentum=0.9\nweight_decay=0.001\ntrust_coefficient=0.01",
        2,
        960,
    );
}
