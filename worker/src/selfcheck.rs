//! The GPU self-checks behind `butler doctor --check`. They live in the library (not only in `cargo
//! test`) because the GPU machine has no Rust toolchain: a binary built elsewhere runs them there.
//!
//! Each check compares a device against the CPU on the same seeded work — training replicas after
//! [`STEPS`] steps for supervised, FixMatch and SimCLR (fp32, to 1e-4), NCCL's collectives on a world-1
//! communicator, the TCP ring carrying CUDA tensors for two ranks that share a GPU, and a bf16 run — and
//! reports pass, fail or skip with its reason (a check that cannot run here is never reported as passed).

use crate::collective::{nccl, Collective, RingConfig, RingListener, SingleProcess};
use crate::contrastive::pretrain::Pretrainer;
use crate::trainer::{Trainer, UnlabeledBatch};
use butler_common::config::{JobConfig, Precision};
use serde::Serialize;
use std::path::Path;
use std::time::Duration;
use tch::{Device, Kind, Tensor};

/// Training steps of the equivalence checks.
pub const STEPS: usize = 20;
/// fp32 parameters of a CUDA replica and a CPU replica after [`STEPS`] steps agree to this.
pub const TOLERANCE: f64 = 1e-4;
const BATCH: i64 = 48;
const UNLABELED: i64 = 36;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Pass,
    Fail,
    Skip,
}

impl Outcome {
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Pass => "PASS",
            Outcome::Fail => "FAIL",
            Outcome::Skip => "SKIP",
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct CheckResult {
    pub name: String,
    pub outcome: Outcome,
    pub detail: String,
}

fn result(name: &str, outcome: Outcome, detail: String) -> CheckResult {
    CheckResult {
        name: name.to_string(),
        outcome,
        detail,
    }
}

/// Runs every check on this machine's first GPU; without one, each is skipped with the reason.
pub fn run_all() -> Vec<CheckResult> {
    let names = [
        "cuda ≡ cpu: supervised (fp32)",
        "cuda ≡ cpu: fixmatch (fp32)",
        "cuda ≡ cpu: simclr (fp32)",
        "nccl world 1: all_reduce/gather/bcast",
        "ring: 2 ranks sharing one GPU",
        "bf16 autocast on cuda",
        "checkpoint: cuda-trained loads on cpu",
    ];
    if !tch::Cuda::is_available() {
        let why = format!("no CUDA device: {}", crate::device::cuda_missing_reason());
        return names
            .iter()
            .map(|n| result(n, Outcome::Skip, why.clone()))
            .collect();
    }
    let gpu = Device::Cuda(0);
    // libtorch runs CUDA convolutions in TF32 by default (~1e-3 relative error): the CPU comparison needs
    // IEEE fp32 and deterministic algorithms.
    crate::device::set_cuda_fp32_ieee(true);
    let compare = |name: &str, run: &dyn Fn(Device) -> std::result::Result<Vec<f32>, String>| {
        let (cpu, cuda) = match (run(Device::Cpu), run(gpu)) {
            (Ok(c), Ok(g)) => (c, g),
            (Err(e), _) | (_, Err(e)) => return result(name, Outcome::Fail, e),
        };
        let d = max_abs_diff(&cpu, &cuda);
        let outcome = if d <= TOLERANCE {
            Outcome::Pass
        } else {
            Outcome::Fail
        };
        result(
            name,
            outcome,
            format!("max |Δparam| after {STEPS} steps = {d:.2e} (tolerance {TOLERANCE:.0e})"),
        )
    };
    let mut out = vec![
        compare(names[0], &|d| train_supervised(d, "", Precision::Fp32)),
        compare(names[1], &|d| {
            train_supervised(
                d,
                "[ssl]\nmethod='fixmatch'\nthreshold=0.15\n",
                Precision::Fp32,
            )
        }),
        compare(names[2], &|d| train_simclr(d)),
    ];
    out.push(match nccl_world_one(0) {
        Ok(detail) => result(names[3], Outcome::Pass, detail),
        Err(CheckError::Skip(why)) => result(names[3], Outcome::Skip, why),
        Err(CheckError::Fail(why)) => result(names[3], Outcome::Fail, why),
    });
    out.push(match ring_on_cuda(gpu) {
        Ok(detail) => result(names[4], Outcome::Pass, detail),
        Err(why) => result(names[4], Outcome::Fail, why),
    });
    out.push(match (
        train_supervised(gpu, "", Precision::Fp32),
        train_supervised(gpu, "", Precision::Bf16),
    ) {
        (Err(e), _) | (_, Err(e)) => result(names[5], Outcome::Fail, e),
        (Ok(fp32), Ok(bf16)) => {
        let d = max_abs_diff(&fp32, &bf16);
        let finite = bf16.iter().all(|v| v.is_finite());
        let outcome = if finite && d < 0.1 {
            Outcome::Pass
        } else {
            Outcome::Fail
        };
        result(
            names[5],
            outcome,
            format!("max |Δparam| bf16 vs fp32 after {STEPS} steps = {d:.2e} (expected < 0.1, finite: {finite})"),
        )
        }
    });
    out.push(match checkpoint_round_trip(gpu, Device::Cpu) {
        Ok(detail) => result(names[6], Outcome::Pass, detail),
        Err(why) => result(names[6], Outcome::Fail, why),
    });
    crate::device::set_cuda_fp32_ieee(false);
    out
}

/// Trains a replica on `from`, writes its checkpoint, loads it into a fresh replica on `to`: the
/// parameters must be equal bit for bit (checkpoints are written from host copies).
pub fn checkpoint_round_trip(from: Device, to: Device) -> std::result::Result<String, String> {
    let cfg = config("", Precision::Fp32);
    let mut trained =
        Trainer::new_on(&cfg, &[40], 10, cfg.job.seed, 4, from).map_err(|e| e.to_string())?;
    tch::manual_seed(1);
    let (x, y) = (
        Tensor::randn([BATCH, 40], (Kind::Float, Device::Cpu)),
        Tensor::randint(10, [BATCH], (Kind::Int64, Device::Cpu)),
    );
    trained
        .step(&x, &y, BATCH as u64, None, &mut SingleProcess)
        .map_err(|e| e.to_string())?;
    let dir = std::env::temp_dir().join(format!("butler-selfcheck-{}", std::process::id()));
    let path = dir.join("model.safetensors");
    crate::checkpoint::save_model(&trained, &path).map_err(|e| e.to_string())?;
    let mut fresh =
        Trainer::new_on(&cfg, &[40], 10, cfg.job.seed + 1, 4, to).map_err(|e| e.to_string())?;
    let loaded = fresh
        .vs
        .load(&path)
        .map_err(|e| format!("loading {}: {e}", path.display()));
    let _ = std::fs::remove_dir_all(&dir);
    loaded?;
    let d = max_abs_diff(&trained.flat_parameters(), &fresh.flat_parameters());
    if d == 0.0 {
        Ok(format!(
            "trained on {from:?}, loaded on {to:?}: parameters identical"
        ))
    } else {
        Err(format!("parameters differ by {d:.2e} after the round trip"))
    }
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f64 {
    if a.len() != b.len() {
        return f64::INFINITY;
    }
    a.iter()
        .zip(b)
        .map(|(x, y)| f64::from((x - y).abs()))
        .fold(0.0, f64::max)
}

/// The job config of the training checks: ConvBase, AdamW, cosine schedule, label smoothing, Mixup
/// unless `extra` has an `[ssl]` section, plus `extra`.
pub fn config(extra: &str, precision: Precision) -> JobConfig {
    // SSL methods take no batch regularizer (the config refuses the combination).
    let (unlabeled, regularize) = if extra.contains("[ssl]") {
        ("unlabeled_split='u'\n", "")
    } else {
        ("", "[regularize.mix]\nmixup_alpha=0.2\n")
    };
    let precision = match precision {
        Precision::Fp32 => "fp32",
        Precision::Bf16 => "bf16",
    };
    let text = format!(
        "[job]\nname='selfcheck'\nseed=3\n[data]\nmanifest='unused'\n{unlabeled}[model]\nkind='conv_base'\nchannels=8\n\
         [optim]\nkind='adamw'\nlr=0.003\nweight_decay=0.01\n[schedule]\nkind='cosine'\nwarmup_steps=3\n\
         [train]\nepochs=1\nbatch_size={BATCH}\nlabel_smoothing=0.1\nprecision='{precision}'\n\
         {regularize}[cluster]\nbucket_mb=0.01\n{extra}"
    );
    JobConfig::from_toml(&text, Path::new("selfcheck.toml"))
        .expect("the self-check config is valid")
}

/// One replica on `device`, trained [`STEPS`] steps on seeded host data (plus an unlabeled stream of
/// (weak, strong) views when `extra` has an `[ssl]` section); its final parameters.
pub fn train_supervised(
    device: Device,
    extra: &str,
    precision: Precision,
) -> std::result::Result<Vec<f32>, String> {
    let cfg = config(extra, precision);
    let ssl = cfg.ssl.is_some();
    tch::manual_seed(11);
    let x = Tensor::randn([BATCH * STEPS as i64, 40], (Kind::Float, Device::Cpu));
    let y = Tensor::randint(10, [BATCH * STEPS as i64], (Kind::Int64, Device::Cpu));
    let pool = Tensor::randn(
        [UNLABELED * STEPS as i64 + 1, 40],
        (Kind::Float, Device::Cpu),
    ) * 2.0;
    let mut trainer = Trainer::new_on(&cfg, &[40], 10, cfg.job.seed, 4 * STEPS as u64, device)
        .map_err(|e| format!("building the trainer on {device:?}: {e}"))?;
    let mut comm = SingleProcess;
    for s in 0..STEPS as i64 {
        let (xb, yb) = (x.narrow(0, s * BATCH, BATCH), y.narrow(0, s * BATCH, BATCH));
        let clean = pool.narrow(0, s * UNLABELED, UNLABELED);
        let views = vec![
            clean.shallow_clone(),
            &clean + pool.narrow(0, s * UNLABELED + 1, UNLABELED) * 0.3,
        ];
        let u = ssl.then(|| UnlabeledBatch {
            views: &views,
            global_len: UNLABELED as u64,
            ids: &[],
            pool_len: 0,
        });
        trainer
            .step(&xb, &yb, BATCH as u64, u, &mut comm)
            .map_err(|e| format!("step {s} on {device:?}: {e}"))?;
    }
    Ok(trainer.flat_parameters())
}

/// A SimCLR pretrainer on `device`, [`STEPS`] steps over seeded pairs of views.
pub fn train_simclr(device: Device) -> std::result::Result<Vec<f32>, String> {
    use butler_common::config::{OptimConfig, OptimKind, ScheduleConfig, ScheduleKind};
    use butler_common::pretrain::{PretrainConfig, PretrainMethod};
    let cfg = PretrainConfig {
        method: PretrainMethod::Simclr,
        epochs: 1,
        batch_size: 32,
        temperature: 0.2,
        projection_hidden: 16,
        projection_dim: 8,
        cpc_horizons: 2,
        cpc_context: 12,
        optim: OptimConfig {
            kind: OptimKind::Lars,
            lr: 0.5,
            momentum: 0.9,
            nesterov: false,
            weight_decay: 1e-3,
            betas: [0.9, 0.999],
            eps: 1e-8,
            trust_coefficient: 0.01,
        },
        schedule: ScheduleConfig {
            kind: ScheduleKind::Cosine,
            warmup_steps: 2,
            min_lr_ratio: 0.0,
        },
        probe_epochs: 1,
        probe_lr: 0.01,
        finetune_augment: false,
        finetune_from_probe: true,
        distill: None,
    };
    tch::manual_seed(77);
    let data: Vec<[Tensor; 2]> = (0..STEPS)
        .map(|_| {
            [
                Tensor::randn([32, 40], (Kind::Float, Device::Cpu)),
                Tensor::randn([32, 40], (Kind::Float, Device::Cpu)),
            ]
        })
        .collect();
    let mut p = Pretrainer::new_on(
        &cfg,
        40,
        6,
        5,
        3 * STEPS as u64,
        4096,
        device,
        Precision::Fp32,
    )
    .expect("the self-check pretrainer builds");
    let mut comm = SingleProcess;
    for [a, b] in &data {
        p.step(&[a.shallow_clone(), b.shallow_clone()], &mut comm)
            .map_err(|e| format!("a SimCLR step on {device:?}: {e}"))?;
    }
    Ok(p.flat_parameters())
}

enum CheckError {
    Skip(String),
    Fail(String),
}

/// A world-1 NCCL communicator on GPU `gpu`: all-reduce, all-gather and broadcast against the CPU
/// result, on device tensors and on host tensors staged through the device. At world 1 this proves the
/// plumbing (loading, init, pointers, types, staging, completion), not NCCL's reduction across GPUs.
fn nccl_world_one(gpu: usize) -> std::result::Result<String, CheckError> {
    let version = match nccl::probe() {
        nccl::NcclProbe::Available { version } => nccl::version_string(version),
        nccl::NcclProbe::Missing(why) => return Err(CheckError::Skip(why)),
    };
    let fail = |e: crate::collective::CollectiveError| CheckError::Fail(e.to_string());
    let id = nccl::create_unique_id().map_err(fail)?;
    let mut comm =
        nccl::NcclCollective::init(0, 1, &id, gpu, Duration::from_secs(30), None).map_err(fail)?;
    tch::manual_seed(5);
    let host = Tensor::randn([1000, 7], (Kind::Float, Device::Cpu));
    // Out of place: at world 1 NCCL skips an in-place reduction, and this moves the data.
    let dev = comm
        .all_reduce_sum_out_of_place(&host.to_device(Device::Cuda(gpu)))
        .map_err(fail)?;
    let mut staged = host.copy();
    comm.all_reduce_sum(&mut staged).map_err(fail)?;
    let gathered = comm
        .all_gather(&host.to_device(Device::Cuda(gpu)))
        .map_err(fail)?;
    let mut b = host.to_device(Device::Cuda(gpu));
    comm.broadcast(&mut b, 0).map_err(fail)?;
    comm.barrier().map_err(fail)?;
    let mut half = host.to_kind(Kind::BFloat16).to_device(Device::Cuda(gpu));
    comm.all_reduce_sum(&mut half).map_err(fail)?;
    let diffs = [
        (
            "all_reduce",
            (dev.to_device(Device::Cpu) - &host)
                .abs()
                .max()
                .double_value(&[]),
        ),
        (
            "all_reduce (host tensor)",
            (&staged - &host).abs().max().double_value(&[]),
        ),
        (
            "all_gather",
            (gathered.to_device(Device::Cpu) - &host)
                .abs()
                .max()
                .double_value(&[]),
        ),
        (
            "broadcast",
            (b.to_device(Device::Cpu) - &host)
                .abs()
                .max()
                .double_value(&[]),
        ),
        (
            "all_reduce bf16",
            (half.to_device(Device::Cpu).to_kind(Kind::Float)
                - host.to_kind(Kind::BFloat16).to_kind(Kind::Float))
            .abs()
            .max()
            .double_value(&[]),
        ),
    ];
    let bad: Vec<String> = diffs
        .iter()
        .filter(|(_, d)| *d != 0.0)
        .map(|(op, d)| format!("{op} off by {d:.2e}"))
        .collect();
    if bad.is_empty() {
        Ok(format!(
            "NCCL {version}: every result equals the CPU's exactly"
        ))
    } else {
        Err(CheckError::Fail(bad.join("; ")))
    }
}

/// Two ranks in this process, both on `device`, joined by the TCP ring over loopback: the ring stages
/// CUDA tensors through host memory.
fn ring_on_cuda(device: Device) -> std::result::Result<String, String> {
    let listeners: Vec<RingListener> = (0..2)
        .map(|_| RingListener::bind("127.0.0.1:0".parse().expect("a socket address")))
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| e.to_string())?;
    let peers: Vec<_> = listeners.iter().map(|l| l.local_addr()).collect();
    let handles: Vec<_> = listeners
        .into_iter()
        .enumerate()
        .map(|(rank, l)| {
            let peers = peers.clone();
            std::thread::spawn(move || -> std::result::Result<(f64, f64), String> {
                let mut ring = l
                    .connect(rank, &peers, RingConfig::default())
                    .map_err(|e| e.to_string())?;
                let mine = Tensor::full([4096], (rank + 1) as f64, (Kind::Float, device));
                let mut sum = mine.copy();
                ring.all_reduce_sum(&mut sum).map_err(|e| e.to_string())?;
                let all = ring.all_gather(&mine).map_err(|e| e.to_string())?;
                if sum.device() != device || all.device() != device {
                    return Err("results left the device".into());
                }
                let want_sum = Tensor::full([4096], 3.0, (Kind::Float, Device::Cpu));
                let want_all = Tensor::cat(
                    &[
                        Tensor::full([4096], 1.0, (Kind::Float, Device::Cpu)),
                        Tensor::full([4096], 2.0, (Kind::Float, Device::Cpu)),
                    ],
                    0,
                );
                Ok((
                    (sum.to_device(Device::Cpu) - want_sum)
                        .abs()
                        .max()
                        .double_value(&[]),
                    (all.to_device(Device::Cpu) - want_all)
                        .abs()
                        .max()
                        .double_value(&[]),
                ))
            })
        })
        .collect();
    let mut worst = 0.0f64;
    for h in handles {
        let (a, b) = h.join().map_err(|_| "a rank panicked".to_string())??;
        worst = worst.max(a).max(b);
    }
    if worst == 0.0 {
        Ok(format!(
            "all_reduce and all_gather of {device:?} tensors exact on both ranks"
        ))
    } else {
        Err(format!("results off by {worst:.2e}"))
    }
}
