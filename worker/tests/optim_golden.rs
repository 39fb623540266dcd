//! butler's SGD, Adam and AdamW against `torch.optim` (fixtures from `scripts/fixtures_optim.py`,
//! committed; tests never run Python), and the optimizer state's round trip: an optimizer rebuilt from
//! its saved state continues exactly as the one that never stopped.

use butler_worker::optim::{Adam, AdamConfig, OptimState, Sgd, SgdConfig};
use std::collections::HashMap;
use tch::{Kind, Tensor};

fn fixtures() -> HashMap<String, Tensor> {
    let path = format!(
        "{}/tests/fixtures/optim.safetensors",
        env!("CARGO_MANIFEST_DIR")
    );
    Tensor::read_safetensors(&path)
        .unwrap_or_else(|e| panic!("cannot read {path} (scripts/fixtures_optim.py): {e}"))
        .into_iter()
        .collect()
}

/// The optimizers under test, over the same (w, b) parameters.
enum Opt {
    Sgd(Sgd),
    Adam(Adam),
}

impl Opt {
    fn new(case: &str, params: Vec<Tensor>) -> Opt {
        let sgd = |momentum, weight_decay, nesterov| {
            Opt::Sgd(Sgd::new(
                share(&params),
                SgdConfig {
                    lr: 0.1,
                    momentum,
                    weight_decay,
                    nesterov,
                },
            ))
        };
        let adam = |beta1, beta2, eps, weight_decay, decoupled| {
            Opt::Adam(Adam::new(
                share(&params),
                AdamConfig {
                    lr: 0.1,
                    beta1,
                    beta2,
                    eps,
                    weight_decay,
                    decoupled,
                },
            ))
        };
        match case {
            "sgd" => sgd(0.9, 5e-4, false),
            "sgd_plain" => sgd(0.0, 0.0, false),
            "sgd_nesterov" => sgd(0.9, 1e-3, true),
            "adam" => adam(0.9, 0.999, 1e-8, 0.0, false),
            "adam_l2" => adam(0.8, 0.99, 1e-6, 1e-2, false),
            "adamw" => adam(0.9, 0.999, 1e-8, 0.05, true),
            _ => unreachable!("{case}"),
        }
    }
    fn set_lr(&mut self, lr: f64) {
        match self {
            Opt::Sgd(o) => o.set_lr(lr),
            Opt::Adam(o) => o.set_lr(lr),
        }
    }
    fn step(&mut self) {
        match self {
            Opt::Sgd(o) => o.step(),
            Opt::Adam(o) => o.step(),
        }
    }
    fn state(&self) -> OptimState {
        match self {
            Opt::Sgd(o) => o.state(),
            Opt::Adam(o) => o.state(),
        }
    }
    fn load_state(&mut self, s: &OptimState) {
        match self {
            Opt::Sgd(o) => o.load_state(s).unwrap(),
            Opt::Adam(o) => o.load_state(s).unwrap(),
        }
    }
}

/// The same tensors (shared storage), as an optimizer holds them.
fn share(ps: &[Tensor]) -> Vec<Tensor> {
    ps.iter().map(Tensor::shallow_clone).collect()
}

const CASES: [&str; 6] = [
    "sgd",
    "sgd_plain",
    "sgd_nesterov",
    "adam",
    "adam_l2",
    "adamw",
];

fn params(f: &HashMap<String, Tensor>) -> Vec<Tensor> {
    vec![
        f["w0"].copy().set_requires_grad(true),
        f["b0"].copy().set_requires_grad(true),
    ]
}

/// Gives the parameters the fixture's gradients of step `k` (through a backward pass, as training does).
fn set_grads(f: &HashMap<String, Tensor>, ps: &mut [Tensor], k: usize) {
    for p in ps.iter_mut() {
        p.zero_grad();
    }
    let loss = (&ps[0] * &f[&format!("grad/{k}/w")]).sum(Kind::Float)
        + (&ps[1] * &f[&format!("grad/{k}/b")]).sum(Kind::Float);
    loss.backward();
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

#[test]
fn every_optimizer_matches_torch_optim_step_by_step() {
    let f = fixtures();
    let lrs = Vec::<f64>::try_from(&f["lrs"]).unwrap();
    for case in CASES {
        let mut ps = params(&f);
        let mut opt = Opt::new(case, share(&ps));
        for (k, &lr) in lrs.iter().enumerate() {
            set_grads(&f, &mut ps, k);
            opt.set_lr(lr);
            opt.step();
            for (i, n) in ["w", "b"].iter().enumerate() {
                let want = &f[&format!("{case}/{k}/{n}")];
                let d = max_diff(&ps[i], want);
                assert!(d < 1e-6, "{case} step {k} parameter {n}: max |Δ| = {d:e}");
            }
            // The state torch keeps, under torch's names (SGD's momentum_buffer is our momentum).
            let named: HashMap<String, Tensor> = opt.state().named().into_iter().collect();
            for (i, n) in ["w", "b"].iter().enumerate() {
                for (ours, theirs) in [
                    ("momentum", "momentum_buffer"),
                    ("exp_avg", "exp_avg"),
                    ("exp_avg_sq", "exp_avg_sq"),
                ] {
                    let key = format!("{case}/{k}/{n}/{theirs}");
                    match (named.get(&format!("{i}.{ours}")), f.get(&key)) {
                        (Some(a), Some(b)) => {
                            let d = max_diff(a, b);
                            assert!(d < 1e-6, "{key}: max |Δ| = {d:e}");
                        }
                        (None, None) => {}
                        (a, b) => panic!(
                            "{key}: butler has it: {}, torch has it: {}",
                            a.is_some(),
                            b.is_some()
                        ),
                    }
                }
            }
        }
    }
}

#[test]
fn an_optimizer_restored_from_its_state_continues_exactly() {
    let f = fixtures();
    let lrs = Vec::<f64>::try_from(&f["lrs"]).unwrap();
    for case in CASES {
        let mut straight = params(&f);
        let mut opt = Opt::new(case, share(&straight));
        let mut resumed = params(&f);
        let mut first = Opt::new(case, share(&resumed));
        for (k, &lr) in lrs.iter().enumerate() {
            set_grads(&f, &mut straight, k);
            opt.set_lr(lr);
            opt.step();
            if k == 2 {
                // Stop after 2 steps: save the state through its names, rebuild on fresh tensors.
                let saved = OptimState::from_named(first.state().named()).unwrap();
                let copies: Vec<Tensor> = resumed
                    .iter()
                    .map(|p| p.detach().copy().set_requires_grad(true))
                    .collect();
                resumed = copies;
                first = Opt::new(case, share(&resumed));
                first.load_state(&saved);
            }
            set_grads(&f, &mut resumed, k);
            first.set_lr(lr);
            first.step();
        }
        for (a, b) in straight.iter().zip(&resumed) {
            assert_eq!(
                max_diff(a, b),
                0.0,
                "{case}: the resumed optimizer diverged"
            );
        }
    }
}

#[test]
fn state_that_does_not_fit_is_refused() {
    let f = fixtures();
    let mut ps = params(&f);
    let mut opt = Opt::new("adam", share(&ps));
    set_grads(&f, &mut ps, 0);
    opt.step();
    let named = opt.state().named();
    // Swapped parameters: shapes differ.
    let swapped: Vec<(String, Tensor)> = named
        .iter()
        .map(|(n, t)| {
            let n = if let Some(r) = n.strip_prefix("0.") {
                format!("1.{r}")
            } else {
                format!("0.{}", &n[2..])
            };
            (n, t.shallow_clone())
        })
        .collect();
    let mut fresh = Adam::new(
        params(&f),
        AdamConfig {
            lr: 0.1,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            decoupled: false,
        },
    );
    let e = fresh
        .load_state(&OptimState::from_named(swapped).unwrap())
        .unwrap_err();
    assert!(e.to_string().contains("shape"), "{e}");
    // SGD state into Adam: an unknown slot.
    let mut sgd = Opt::new("sgd", share(&ps));
    sgd.step();
    let e = fresh.load_state(&sgd.state()).unwrap_err();
    assert!(e.to_string().contains("unknown slot"), "{e}");
}
