//! Contrastive pretraining: losses and LARS against PyTorch, and data-parallel ≡ single-process with
//! negatives from the global batch.
//!
//! Fixtures come from `scripts/fixtures_contrastive.py` (committed; tests never run Python). The
//! equivalence tests train W replicas on in-process TCP rings for a few steps and compare every
//! replica's parameters with one process holding the whole global batch (≤ 1e-5), including a batch
//! that does not divide evenly over 3 ranks and a step where one rank holds no sample. The `detached_*`
//! tests run the common bug (other ranks' negatives gathered without gradient) and assert that the same
//! comparison rejects it, so a pass means something.

mod common;

use butler_common::config::{OptimConfig, OptimKind, ScheduleConfig, ScheduleKind};
use butler_common::pretrain::{PretrainConfig, PretrainMethod};
use butler_worker::collective::TcpRing;
use butler_worker::contrastive::cpc::{cpc_sum, info_nce_sum, predictions_per_sample};
use butler_worker::contrastive::encoder::{copy_encoder_into, l2_normalize};
use butler_worker::contrastive::ntxent::{
    global_nt_xent, nt_xent, nt_xent_sum, two_view_positives,
};
use butler_worker::contrastive::pretrain::Pretrainer;
use butler_worker::contrastive::GatherGrad;
use butler_worker::models::ConvBase;
use butler_worker::optim::{Lars, LarsConfig};
use std::collections::HashMap;
use std::time::Duration;
use tch::{nn, Device, Kind, Tensor};

static SEEDED: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn fixture() -> HashMap<String, Tensor> {
    let path = format!(
        "{}/tests/fixtures/contrastive.safetensors",
        env!("CARGO_MANIFEST_DIR")
    );
    Tensor::read_safetensors(&path)
        .unwrap_or_else(|e| panic!("cannot read {path} (scripts/fixtures_contrastive.py): {e}"))
        .into_iter()
        .collect()
}

fn get<'a>(f: &'a HashMap<String, Tensor>, k: &str) -> &'a Tensor {
    f.get(k).unwrap_or_else(|| panic!("fixture has no {k}"))
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a.to_kind(Kind::Double) - b.to_kind(Kind::Double))
        .abs()
        .max()
        .double_value(&[])
}

#[test]
fn l2_normalize_matches_torch() {
    let f = fixture();
    let d = max_diff(&l2_normalize(get(&f, "raw1")), get(&f, "norm1"));
    assert!(d < 1e-6, "{d}");
}

#[test]
fn nt_xent_matches_torch_in_f32_and_f64() {
    let f = fixture();
    for tau in ["0.1", "0.5"] {
        for (name, kind, tol) in [("f32", Kind::Float, 1e-5), ("f64", Kind::Double, 1e-12)] {
            let z1 = l2_normalize(&get(&f, "raw1").to_kind(kind));
            let z2 = l2_normalize(&get(&f, "raw2").to_kind(kind));
            let got = nt_xent(&z1, &z2, tau.parse().unwrap()).double_value(&[]);
            let want = get(&f, &format!("ntxent/tau{tau}/{name}")).double_value(&[]);
            assert!((got - want).abs() < tol, "τ={tau} {name}: {got} vs {want}");
        }
    }
}

#[test]
fn nt_xent_gradient_matches_torch() {
    let f = fixture();
    let a = get(&f, "raw1")
        .to_kind(Kind::Double)
        .set_requires_grad(true);
    let b = get(&f, "raw2")
        .to_kind(Kind::Double)
        .set_requires_grad(true);
    nt_xent(&l2_normalize(&a), &l2_normalize(&b), 0.5).backward();
    assert!(max_diff(&a.grad(), get(&f, "ntxent/grad1")) < 1e-12);
    assert!(max_diff(&b.grad(), get(&f, "ntxent/grad2")) < 1e-12);
}

#[test]
fn drift_nt_xent_without_masking_self_or_with_wrong_positives_is_rejected() {
    let f = fixture();
    let z1 = l2_normalize(&get(&f, "raw1").to_kind(Kind::Double));
    let z2 = l2_normalize(&get(&f, "raw2").to_kind(Kind::Double));
    let want = get(&f, "ntxent/tau0.5/f64").double_value(&[]);
    let n = z1.size()[0];
    let z = Tensor::cat(&[&z1, &z2], 0);
    // Self not masked: cross-entropy over the raw similarity matrix.
    let unmasked = (z.matmul(&z.tr()) / 0.5)
        .cross_entropy_loss::<Tensor>(
            &two_view_positives(0, n),
            None,
            tch::Reduction::Mean,
            -100,
            0.0,
        )
        .double_value(&[]);
    assert!((unmasked - want).abs() > 1e-3);
    // Positives shifted by one sample.
    let wrong: Vec<i64> = (0..2 * n).map(|a| (a + n + 1) % (2 * n)).collect();
    let shifted = (nt_xent_sum(&z, &z, 0, &Tensor::from_slice(&wrong), 0.5) / (2 * n) as f64)
        .double_value(&[]);
    assert!((shifted - want).abs() > 1e-3);
}

#[test]
fn cpc_info_nce_matches_torch_in_f32_and_f64() {
    let f = fixture();
    for (name, kind, tol) in [("f32", Kind::Float, 1e-5), ("f64", Kind::Double, 1e-12)] {
        let z = get(&f, "cpc/z").to_kind(kind);
        let preds: Vec<Tensor> = (1..=2)
            .map(|h| get(&f, &format!("cpc/pred{h}")).to_kind(kind))
            .collect();
        let (n, t) = (z.size()[0], z.size()[1]);
        let got =
            (cpc_sum(&preds, &z, 0) / (n * predictions_per_sample(t, 2)) as f64).double_value(&[]);
        let want = get(&f, &format!("cpc/loss/{name}")).double_value(&[]);
        assert!((got - want).abs() < tol, "{name}: {got} vs {want}");
        // Drift: each prediction scored one step too far ahead (z_{t+h+1}) must miss.
        if name == "f64" {
            let wrong = (1..=2i64)
                .map(|h| {
                    info_nce_sum(
                        &preds[h as usize - 1].narrow(1, 0, t - h - 1),
                        &z.narrow(1, h + 1, t - h - 1),
                        0,
                    )
                })
                .reduce(|a, b| a + b)
                .unwrap();
            let wrong = (wrong / (n * predictions_per_sample(t - 1, 2)) as f64).double_value(&[]);
            assert!((wrong - want).abs() > 1e-3);
        }
    }
}

fn lars_run(f: &HashMap<String, Tensor>, adapt_biases: bool) -> (Tensor, Tensor) {
    let mut w = get(f, "lars/w0").copy().set_requires_grad(true);
    // A 1-D parameter is excluded; reshaping it to [4, 1] makes LARS treat it as a weight (drift check).
    let b_shape: Vec<i64> = if adapt_biases { vec![4, 1] } else { vec![4] };
    let mut b = get(f, "lars/b0")
        .reshape(b_shape.as_slice())
        .copy()
        .set_requires_grad(true);
    let mut opt = Lars::new(
        vec![w.shallow_clone(), b.shallow_clone()],
        LarsConfig {
            lr: 0.0,
            momentum: 0.9,
            weight_decay: 0.01,
            trust_coefficient: 0.02,
        },
    );
    let lrs = Vec::<f32>::try_from(get(f, "lars/lrs")).unwrap();
    for (i, lr) in lrs.iter().enumerate() {
        w.zero_grad();
        b.zero_grad();
        let gw = get(f, &format!("lars/gw{i}"));
        let gb = get(f, &format!("lars/gb{i}")).reshape(b_shape.as_slice());
        ((&w * gw).sum(Kind::Float) + (&b * gb).sum(Kind::Float)).backward();
        opt.set_lr(*lr as f64);
        opt.step();
        if !adapt_biases {
            let dw = max_diff(&w, get(f, &format!("lars/w{}", i + 1)));
            let db = max_diff(&b, get(f, &format!("lars/b{}", i + 1)));
            assert!(dw < 1e-6 && db < 1e-6, "step {i}: |Δw| {dw}, |Δb| {db}");
        }
    }
    (w.detach(), b.detach().reshape([4]))
}

#[test]
fn lars_matches_the_pytorch_reference() {
    let f = fixture();
    let (w, _) = lars_run(&f, false);
    assert!(
        max_diff(&w, get(&f, "lars/w0")) > 1e-3,
        "LARS did not move the weights; the test would prove nothing"
    );
}

#[test]
fn drift_lars_adapting_biases_is_rejected() {
    let f = fixture();
    let (_, b) = lars_run(&f, true);
    assert!(max_diff(&b, get(&f, "lars/b3")) > 1e-3);
}

fn rings(world: usize) -> Vec<TcpRing> {
    common::rings_with_timeout(world, Duration::from_secs(30))
}

#[test]
fn global_nt_xent_on_one_rank_equals_the_single_process_loss() {
    let f = fixture();
    // Embeddings as the encoder produces them: part of a graph.
    let raw1 = get(&f, "raw1").copy().set_requires_grad(true);
    let raw2 = get(&f, "raw2").copy().set_requires_grad(true);
    let (z1, z2) = (l2_normalize(&raw1), l2_normalize(&raw2));
    let mut ring = rings(1).remove(0);
    let (surrogate, value) = global_nt_xent(&z1, &z2, 0.5, GatherGrad::Exact, &mut ring).unwrap();
    let want = get(&f, "ntxent/tau0.5/f32").double_value(&[]);
    assert!((value - want).abs() < 1e-5, "{value} vs {want}");
    // The surrogate's gradient is the loss's (W = 1: the mean over all 2N anchors).
    surrogate.unwrap().backward();
    assert!(max_diff(&raw1.grad(), get(&f, "ntxent/grad1")) < 1e-5);
    assert!(max_diff(&raw2.grad(), get(&f, "ntxent/grad2")) < 1e-5);
}

fn pretrain_config(method: PretrainMethod, optim: OptimKind) -> PretrainConfig {
    PretrainConfig {
        method,
        epochs: 1,
        batch_size: 12,
        temperature: 0.2,
        projection_hidden: 16,
        projection_dim: 8,
        cpc_horizons: 2,
        cpc_context: 12,
        optim: OptimConfig {
            kind: optim,
            lr: if optim == OptimKind::Lars { 0.5 } else { 0.05 },
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
    }
}

const STEPS: usize = 4;

/// Per step, the global batch of `sizes[step]` samples (two views each); rank r takes a contiguous share.
fn batches(sizes: &[i64]) -> Vec<[Tensor; 2]> {
    tch::manual_seed(77);
    sizes
        .iter()
        .map(|&n| {
            [
                Tensor::randn([n, 40], (Kind::Float, Device::Cpu)),
                Tensor::randn([n, 40], (Kind::Float, Device::Cpu)),
            ]
        })
        .collect()
}

/// Contiguous near-equal shares of `n` over `world` ranks (the first ranks take one more).
fn share(n: i64, world: usize, rank: usize) -> (i64, i64) {
    let w = world as i64;
    let (q, r) = (n / w, n % w);
    let start = rank as i64 * q + (rank as i64).min(r);
    (start, q + i64::from((rank as i64) < r))
}

fn pretrain(world: usize, cfg: &PretrainConfig, sizes: &[i64], grad: GatherGrad) -> Vec<Vec<f32>> {
    let guard = SEEDED.lock().unwrap_or_else(|p| p.into_inner());
    let data = batches(sizes);
    let trainers: Vec<Pretrainer> = (0..world)
        .map(|rank| {
            let mut p = Pretrainer::new(cfg, 40, 6, 5 + rank as u64 * 1000, 3 * STEPS as u64, 4096)
                .unwrap();
            p.set_gather_grad(grad);
            p
        })
        .collect();
    drop(guard);
    let handles: Vec<_> = trainers
        .into_iter()
        .zip(rings(world))
        .enumerate()
        .map(|(rank, (mut t, mut ring))| {
            let data: Vec<[Tensor; 2]> = data
                .iter()
                .map(|[a, b]| [a.shallow_clone(), b.shallow_clone()])
                .collect();
            std::thread::spawn(move || {
                t.broadcast_parameters(&mut ring).unwrap();
                for [a, b] in &data {
                    let (start, len) = share(a.size()[0], world, rank);
                    let views: Vec<Tensor> = [a, b]
                        .iter()
                        .take(t.num_views())
                        .map(|v| v.narrow(0, start, len))
                        .collect();
                    let loss = t.step(&views, &mut ring).unwrap();
                    assert!(loss.is_finite());
                }
                t.flat_parameters()
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

fn max_abs(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Largest difference between any replica of `world` ranks and the single process.
fn distance(
    method: PretrainMethod,
    optim: OptimKind,
    world: usize,
    sizes: &[i64],
    grad: GatherGrad,
) -> f32 {
    let cfg = pretrain_config(method, optim);
    let single = pretrain(1, &cfg, sizes, GatherGrad::Exact).remove(0);
    let initial = {
        let _g = SEEDED.lock().unwrap_or_else(|p| p.into_inner());
        Pretrainer::new(&cfg, 40, 6, 5, 1, 4096)
            .unwrap()
            .flat_parameters()
    };
    assert!(
        max_abs(&single, &initial) > 1e-3,
        "training did not move the parameters; the test would prove nothing"
    );
    let d = pretrain(world, &cfg, sizes, grad)
        .iter()
        .map(|p| max_abs(&single, p))
        .fold(0.0, f32::max);
    eprintln!("{method:?} {optim:?} W={world} {grad:?}: max |Δ| vs 1 worker = {d:e}");
    d
}

const EVEN: [i64; STEPS] = [12, 12, 12, 12];
/// Not divisible by 3 (shares 4/4/3, 3/3/2), and a last step where rank 2 holds nothing (shares 1/1/0).
const UNEVEN: [i64; STEPS] = [12, 11, 8, 2];

#[test]
fn simclr_two_workers_equal_one_with_lars() {
    let d = distance(
        PretrainMethod::Simclr,
        OptimKind::Lars,
        2,
        &EVEN,
        GatherGrad::Exact,
    );
    assert!(d <= 1e-5, "2 ranks differ from 1 by {d}");
}

#[test]
fn simclr_three_workers_equal_one_with_uneven_and_empty_shares() {
    let d = distance(
        PretrainMethod::Simclr,
        OptimKind::Sgd,
        3,
        &UNEVEN,
        GatherGrad::Exact,
    );
    assert!(d <= 1e-5, "3 ranks differ from 1 by {d}");
}

#[test]
fn detached_simclr_negatives_break_equivalence() {
    let d = distance(
        PretrainMethod::Simclr,
        OptimKind::Sgd,
        2,
        &EVEN,
        GatherGrad::Detached,
    );
    assert!(
        d > 1e-4,
        "gathering without gradient should change the update, differs by only {d}"
    );
}

#[test]
fn cpc_two_workers_equal_one_with_lars() {
    let d = distance(
        PretrainMethod::Cpc,
        OptimKind::Lars,
        2,
        &EVEN,
        GatherGrad::Exact,
    );
    assert!(d <= 1e-5, "2 ranks differ from 1 by {d}");
}

#[test]
fn cpc_three_workers_equal_one_with_uneven_and_empty_shares() {
    let d = distance(
        PretrainMethod::Cpc,
        OptimKind::Adamw,
        3,
        &UNEVEN,
        GatherGrad::Exact,
    );
    assert!(d <= 1e-5, "3 ranks differ from 1 by {d}");
}

#[test]
fn detached_cpc_negatives_break_equivalence() {
    let d = distance(
        PretrainMethod::Cpc,
        OptimKind::Sgd,
        2,
        &EVEN,
        GatherGrad::Detached,
    );
    assert!(
        d > 1e-4,
        "gathering without gradient should change the update, differs by only {d}"
    );
}

#[test]
fn pretrained_encoder_loads_into_conv_base() {
    let _g = SEEDED.lock().unwrap_or_else(|p| p.into_inner());
    let cfg = pretrain_config(PretrainMethod::Simclr, OptimKind::Sgd);
    let p = Pretrainer::new(&cfg, 40, 6, 1, 1, 4096).unwrap();
    let vs = nn::VarStore::new(Device::Cpu);
    let model = ConvBase::new(&vs.root(), 40, 6, 10);
    assert_eq!(copy_encoder_into(&p.vs, &vs).unwrap(), 6);
    let x = Tensor::randn([3, 40], (Kind::Float, Device::Cpu));
    // ConvBase's classifier reads exactly the encoder's features.
    let feats = p.encoder.features(&x);
    let lin = &vs.variables()["linear.weight"];
    let bias = &vs.variables()["linear.bias"];
    let want = feats.matmul(&lin.tr()) + bias;
    use butler_worker::models::Model;
    assert!(max_diff(&model.forward_t(&x, false), &want) < 1e-5);
    // A model with other channels is refused with the cause.
    let other = nn::VarStore::new(Device::Cpu);
    let _m = ConvBase::new(&other.root(), 40, 7, 10);
    let e = copy_encoder_into(&p.vs, &other).unwrap_err();
    assert!(e.contains("model.channels"), "{e}");
}
