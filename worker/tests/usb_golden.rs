//! Golden tests of the USB methods: butler's unsupervised term and method state, step by step, against
//! an independent PyTorch implementation (`scripts/fixtures_usb.py`, committed output in
//! `tests/fixtures/usb.safetensors`).
//!
//! Each case runs `Consistency::unsupervised` — the function the training step calls, with the step's
//! collective a world of one — over the fixture's weak/strong logits and sample ids, and compares after
//! every step the batch-averaged loss, the per-sample mask or weight, and every tensor of
//! `Objective::state` (names included) to 1e-5. The `drift` tensors are deliberately wrong variants
//! (FlexMatch without the threshold warm-up, FreeMatch updating its EMAs after masking, SoftMatch with
//! USB's n_sigma = 2); the test checks that they differ from what butler computes, so a pass means the
//! comparison can see those details.

use butler_common::config::JobConfig;
use butler_common::semi::SslConfig;
use butler_worker::collective::SingleProcess;
use butler_worker::objectives::consistency::Consistency;
use butler_worker::objectives::Objective;
use std::collections::HashMap;
use std::path::Path;
use tch::{Kind, Tensor};

const TOL: f64 = 1e-5;
const STEPS: usize = 6;
const CLASSES: usize = 5;

fn fixture() -> HashMap<String, Tensor> {
    let path = format!(
        "{}/tests/fixtures/usb.safetensors",
        env!("CARGO_MANIFEST_DIR")
    );
    Tensor::read_safetensors(&path)
        .unwrap_or_else(|e| {
            panic!("cannot read {path} (regenerate with scripts/fixtures_usb.py): {e}")
        })
        .into_iter()
        .collect()
}

fn get<'a>(f: &'a HashMap<String, Tensor>, key: &str) -> &'a Tensor {
    f.get(key)
        .unwrap_or_else(|| panic!("usb.safetensors has no tensor {key:?}"))
}

fn max_diff(got: &Tensor, want: &Tensor) -> f64 {
    assert_eq!(got.size(), want.size(), "shapes differ");
    (got.to_kind(Kind::Double) - want.to_kind(Kind::Double))
        .abs()
        .max()
        .double_value(&[])
}

/// The config of a case, as a user would write its `[ssl]` section (in a job config, which validates it).
fn config(ssl: &str) -> SslConfig {
    let text = format!(
        "[job]\nname='usb'\n[data]\nmanifest='unused'\nunlabeled_split='u'\n[model]\nkind='mlp'\nhidden=[8]\n\
         [optim]\nkind='sgd'\nlr=0.1\n[train]\nepochs=1\nbatch_size=4\n[ssl]\n{ssl}\n"
    );
    JobConfig::from_toml(&text, Path::new("usb.toml"))
        .unwrap()
        .ssl
        .expect("an [ssl] section")
}

/// Runs one case; returns the masks butler computed, per step.
fn run_case(case: &str, ssl: &str) -> Vec<Tensor> {
    let f = fixture();
    let mut method = Consistency::new(&config(ssl), 0.0, CLASSES, 100);
    let pool = get(&f, &format!("{case}/pool")).int64_value(&[]) as u64;
    let mut masks = Vec::new();
    for t in 0..STEPS {
        let p = format!("{case}/step{t}");
        let ids: Vec<u64> = Vec::<i64>::try_from(get(&f, &format!("{p}/ids")))
            .unwrap()
            .into_iter()
            .map(|i| i as u64)
            .collect();
        let (loss, mask) = method
            .unsupervised(
                get(&f, &format!("{p}/weak")),
                get(&f, &format!("{p}/strong")),
                &ids,
                pool,
                &mut SingleProcess,
            )
            .unwrap();
        let batch_loss = (loss * &mask).mean(Kind::Float);
        let d = max_diff(&batch_loss, get(&f, &format!("{p}/loss")));
        assert!(d <= TOL, "{p}: loss differs by {d}");
        let d = max_diff(&mask, get(&f, &format!("{p}/mask")));
        assert!(d <= TOL, "{p}: mask differs by {d}: {mask:?}");
        let prefix = format!("{p}/state/");
        let mut want: Vec<&str> = f.keys().filter_map(|k| k.strip_prefix(&prefix)).collect();
        want.sort_unstable();
        let state = method.state();
        let mut names: Vec<&str> = state.iter().map(|(n, _)| n.as_str()).collect();
        names.sort_unstable();
        assert_eq!(names, want, "{p}: state names");
        for (name, value) in &state {
            let d = max_diff(value, get(&f, &format!("{prefix}{name}")));
            assert!(d <= TOL, "{p}: state {name} differs by {d}: {value:?}");
        }
        masks.push(mask);
    }
    masks
}

/// Asserts that the drifted variant `label` differs from butler's masks at some step.
fn assert_drift_seen(case: &str, label: &str, masks: &[Tensor]) {
    let f = fixture();
    let worst = masks
        .iter()
        .enumerate()
        .map(|(t, m)| max_diff(m, get(&f, &format!("{case}/step{t}/drift/{label}"))))
        .fold(0.0, f64::max);
    assert!(
        worst > 1e-3,
        "{case}: the {label} variant is indistinguishable ({worst})"
    );
}

#[test]
fn fixmatch_with_distribution_alignment_matches_pytorch() {
    run_case(
        "fixmatch_da",
        "method = 'fixmatch'\nthreshold = 0.6\ndistribution_alignment = true\nda_momentum = 0.9",
    );
}

#[test]
fn uda_with_distribution_alignment_matches_pytorch() {
    run_case(
        "uda_da",
        "method = 'uda'\nthreshold = 0.5\ntemperature = 0.5\ndistribution_alignment = true\nda_momentum = 0.9",
    );
}

#[test]
fn flexmatch_matches_pytorch_with_the_threshold_warmup() {
    let masks = run_case("flexmatch", "method = 'flexmatch'\nthreshold = 0.6");
    assert_drift_seen("flexmatch", "no_warmup", &masks);
}

#[test]
fn flexmatch_matches_pytorch_once_the_pool_is_learned() {
    let masks = run_case("flexmatch_small", "method = 'flexmatch'\nthreshold = 0.6");
    // The class-wise thresholds reject samples here, so the comparison covers τ·M(β_c) itself.
    assert!(masks.iter().any(|m| m.min().double_value(&[]) == 0.0));
}

#[test]
fn freematch_matches_pytorch() {
    let masks = run_case("freematch", "method = 'freematch'\nadaptive_momentum = 0.5");
    assert_drift_seen("freematch", "update_after", &masks);
}

#[test]
fn softmatch_matches_pytorch() {
    let masks = run_case("softmatch", "method = 'softmatch'\nadaptive_momentum = 0.5");
    assert_drift_seen("softmatch", "n_sigma_2", &masks);
}

#[test]
fn softmatch_with_uniform_alignment_matches_pytorch() {
    run_case(
        "softmatch_ua",
        "method = 'softmatch'\nadaptive_momentum = 0.5\ndistribution_alignment = true\nda_momentum = 0.9",
    );
}

#[test]
fn the_pi_model_term_matches_pytorch() {
    // Mean Teacher computes the same term with the teacher's logits as the target.
    run_case("pi_model", "method = 'pi_model'");
}

#[test]
fn a_state_that_does_not_belong_to_the_method_is_refused() {
    let mut free = Consistency::new(&config("method = 'freematch'"), 0.0, CLASSES, 100);
    let soft = Consistency::new(&config("method = 'softmatch'"), 0.0, CLASSES, 100);
    let e = free.load_state(soft.state()).unwrap_err();
    assert!(e.contains("missing"), "{e}");
    let mut fix = Consistency::new(&config("method = 'fixmatch'"), 0.0, CLASSES, 100);
    let e = fix.load_state(soft.state()).unwrap_err();
    assert!(e.contains("softmatch.moments"), "{e}");
}
