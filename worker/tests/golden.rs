//! Golden tests: butler's losses and mixing functions against outputs PyTorch computed.
//!
//! The fixtures in `tests/fixtures/` are written by `scripts/fixtures.py` with the venv's torch (inputs
//! from `torch.manual_seed`, references from `F.cross_entropy`, `F.kl_div` and plain Python indexing) and
//! committed, so these tests never run Python. Losses are compared in f32 (the training dtype) to 1e-6
//! absolute and in f64 (the same inputs cast up) to 1e-12, which pins the formula far below f32 rounding.
//! The `drift_*` tests compute deliberately wrong variants (T instead of T², the wrong KL reduction,
//! uncorrected CutMix λ, …) and assert that the comparison rejects them, so a pass means something.

use butler_common::semi::TsaSchedule;
use butler_worker::losses::{
    cross_entropy, cross_entropy_per_example, fixmatch_consistency, kd_loss, one_hot,
    soft_cross_entropy, soft_pseudo_label_loss, tsa_mask, uda_consistency, KdConfig,
};
use butler_worker::mixing::{cutmix_apply, cutout, mixup, Box2d, CutRegion, Span};
use std::collections::HashMap;
use tch::{Kind, Tensor};

const F32_TOL: f64 = 1e-6;
const F64_TOL: f64 = 1e-12;
/// A drifted formula must miss the reference by far more than the tolerance, not just by rounding.
const DRIFT_MIN: f64 = 1e-3;

const EPS_HARD: [&str; 3] = ["0", "0.1", "0.3"];
const EPS_SOFT: [&str; 2] = ["0", "0.1"];
const TEMPS: [&str; 3] = ["1", "2", "4"];
const ALPHAS: [&str; 3] = ["0", "0.5", "0.9"];

struct Fixture {
    file: &'static str,
    tensors: HashMap<String, Tensor>,
}

impl Fixture {
    fn load(file: &'static str) -> Fixture {
        let path = format!("{}/tests/fixtures/{file}", env!("CARGO_MANIFEST_DIR"));
        let tensors = Tensor::read_safetensors(&path)
            .unwrap_or_else(|e| {
                panic!("cannot read {path} (regenerate with scripts/fixtures.py): {e}")
            })
            .into_iter()
            .collect();
        Fixture { file, tensors }
    }

    fn get(&self, key: &str) -> &Tensor {
        self.tensors
            .get(key)
            .unwrap_or_else(|| panic!("{} has no tensor {key:?}", self.file))
    }

    fn scalar(&self, key: &str) -> f64 {
        self.get(key).double_value(&[])
    }

    fn ints(&self, key: &str) -> Vec<i64> {
        Vec::<i64>::try_from(self.get(key).reshape([-1])).expect("an int64 tensor")
    }

    /// Rows of an int64 `[n, m]` tensor.
    fn rows(&self, key: &str) -> Vec<Vec<i64>> {
        let t = self.get(key);
        let m = t.size()[1] as usize;
        self.ints(key).chunks(m).map(<[i64]>::to_vec).collect()
    }
}

/// Largest absolute difference; NaN (which every comparison below rejects) when either side has one.
fn max_diff(got: &Tensor, want: &Tensor) -> f64 {
    assert_eq!(got.size(), want.size(), "shapes differ");
    assert_eq!(got.kind(), want.kind(), "dtypes differ");
    let d = (got.to_kind(Kind::Double) - want.to_kind(Kind::Double)).abs();
    if d.isnan().any().int64_value(&[]) != 0 {
        return f64::NAN;
    }
    d.max().double_value(&[])
}

#[track_caller]
fn assert_close(got: &Tensor, want: &Tensor, tol: f64, what: &str) {
    let d = max_diff(got, want);
    assert!(d <= tol, "{what}: off by {d:e} (tolerance {tol:e})");
}

#[track_caller]
fn assert_drift_detected(got: &Tensor, want: &Tensor, what: &str) {
    let d = max_diff(got, want);
    assert!(
        d > DRIFT_MIN,
        "{what}: a deliberately wrong formula matched the reference (off by only {d:e})"
    );
}

fn as_f64(t: &Tensor) -> Tensor {
    t.to_kind(Kind::Double)
}

/// The fixture's inputs in f32 as stored, and cast to f64, with the reference key suffix for each.
fn both_dtypes(t: &Tensor) -> [(Tensor, &'static str, f64); 2] {
    [
        (t.shallow_clone(), "f32", F32_TOL),
        (as_f64(t), "f64", F64_TOL),
    ]
}

#[test]
fn hard_label_cross_entropy_matches_torch() {
    let f = Fixture::load("losses.safetensors");
    for (logits, dtype, tol) in both_dtypes(f.get("logits")) {
        for eps in EPS_HARD {
            let e: f64 = eps.parse().unwrap();
            for (case, labels) in [("ce_hard", "labels"), ("ce_hard_ignore", "labels_ignore")] {
                let got = cross_entropy(&logits, f.get(labels), e);
                let want = f.get(&format!("{case}/eps{eps}/{dtype}"));
                assert_close(&got, want, tol, &format!("{case} eps {eps} {dtype}"));
            }
            // One-hot probability targets give the same loss through the soft path. Checked in f64
            // only: torch's hard-label kernel sums in another order, so in f32 the two paths differ
            // by an ulp or two (2.4e-7 here), which is rounding, not formula.
            if dtype == "f64" {
                let probs = one_hot(f.get("labels"), 10).to_kind(Kind::Double);
                let got = soft_cross_entropy(&logits, &probs, e);
                let want = f.get(&format!("ce_hard/eps{eps}/f64"));
                assert_close(&got, want, tol, &format!("one-hot soft CE eps {eps}"));
            }
        }
    }
}

#[test]
fn soft_target_cross_entropy_matches_torch() {
    let f = Fixture::load("losses.safetensors");
    for (logits, dtype, tol) in both_dtypes(f.get("logits")) {
        let probs = f.get("probs").to_kind(logits.kind());
        for eps in EPS_SOFT {
            let got = soft_cross_entropy(&logits, &probs, eps.parse().unwrap());
            let want = f.get(&format!("ce_soft/eps{eps}/{dtype}"));
            assert_close(&got, want, tol, &format!("ce_soft eps {eps} {dtype}"));
        }
    }
}

fn kd_cfg(alpha: &str, temp: &str) -> KdConfig {
    KdConfig {
        alpha: alpha.parse().unwrap(),
        temperature: temp.parse().unwrap(),
    }
}

#[test]
fn distillation_loss_matches_torch() {
    let f = Fixture::load("kd.safetensors");
    for (student, dtype, tol) in both_dtypes(f.get("student")) {
        let teacher = f.get("teacher").to_kind(student.kind());
        let targets = f.get("targets").to_kind(student.kind());
        for temp in TEMPS {
            for alpha in ALPHAS {
                for eps in EPS_SOFT {
                    let cfg = kd_cfg(alpha, temp);
                    let got = kd_loss(
                        &student,
                        &teacher,
                        Some(&targets),
                        &cfg,
                        eps.parse().unwrap(),
                    );
                    let key = format!("kd/T{temp}/a{alpha}/eps{eps}/{dtype}");
                    assert_close(&got, f.get(&key), tol, &key);
                }
            }
            // Unlabeled: T²·KL alone, whatever α and the smoothing say.
            let got = kd_loss(&student, &teacher, None, &kd_cfg("0.9", temp), 0.1);
            let key = format!("kd_unlabeled/T{temp}/{dtype}");
            assert_close(&got, f.get(&key), tol, &key);
        }
    }
}

#[test]
fn drift_in_the_loss_formulas_is_detected() {
    let f = Fixture::load("kd.safetensors");
    let (s, t, y) = (
        as_f64(f.get("student")),
        as_f64(f.get("teacher")),
        as_f64(f.get("targets")),
    );
    for temp in TEMPS {
        let tv: f64 = temp.parse().unwrap();
        // KL per sample, recovered from the unlabeled loss T²·KL.
        let kl = kd_loss(&s, &t, None, &kd_cfg("0", temp), 0.0) / (tv * tv);
        // Not α = 0.5: swapping α and 1 − α is invisible there.
        for alpha in ["0", "0.9"] {
            let a: f64 = alpha.parse().unwrap();
            let want = f.get(&format!("kd/T{temp}/a{alpha}/eps0/f64"));
            let ce = soft_cross_entropy(&s, &y, 0.0);
            // The right formula assembled from its parts matches: the drifted ones below differ only
            // in the one factor they name.
            let right = &ce * a + &kl * ((1.0 - a) * tv * tv);
            assert_close(&right, want, F64_TOL, "KD reassembled");
            let t_not_t2 = &ce * a + &kl * ((1.0 - a) * tv);
            let kl_mean_over_classes = &ce * a + &kl * ((1.0 - a) * tv * tv / 10.0);
            let swapped_alpha = &ce * (1.0 - a) + &kl * (a * tv * tv);
            let what = format!("T {temp} alpha {alpha}");
            if temp != "1" {
                assert_drift_detected(&t_not_t2, want, &format!("T instead of T², {what}"));
            } else {
                // At T = 1 the two agree, which is why the grid includes T = 2 and 4.
                assert_close(&t_not_t2, want, F64_TOL, "T = T² at T = 1");
            }
            assert_drift_detected(
                &kl_mean_over_classes,
                want,
                &format!("KL reduced as 'mean', {what}"),
            );
            assert_drift_detected(
                &swapped_alpha,
                want,
                &format!("α and 1 − α swapped, {what}"),
            );
        }
        // Unlabeled data must not pick up an α factor.
        let want = f.get(&format!("kd_unlabeled/T{temp}/f64"));
        let scaled = kd_loss(&s, &t, None, &kd_cfg("0.5", temp), 0.0) * 0.5;
        assert_drift_detected(&scaled, want, "unlabeled KD scaled by 1 − α");
    }

    let f = Fixture::load("losses.safetensors");
    let logits = as_f64(f.get("logits"));
    let probs = as_f64(f.get("probs"));
    let want = f.get("ce_soft/eps0.1/f64");
    assert_drift_detected(
        &soft_cross_entropy(&logits, &probs, 0.0),
        want,
        "smoothing ignored",
    );
    assert_drift_detected(
        &soft_cross_entropy(&logits, &probs, 0.2),
        want,
        "smoothing doubled",
    );
    // torch's "mean" over B·K instead of B.
    assert_drift_detected(
        &(soft_cross_entropy(&logits, &probs, 0.1) / 10.0),
        want,
        "mean over classes too",
    );
    // Ignored labels counted in the mean's denominator: sum over the 5 kept samples divided by 6.
    let want = f.get("ce_hard_ignore/eps0.1/f64");
    let counted = cross_entropy(&logits, f.get("labels_ignore"), 0.1) * (5.0 / 6.0);
    assert_drift_detected(&counted, want, "ignored label counted in the mean");
}

#[test]
fn mixup_matches_torch_for_odd_batches() {
    let f = Fixture::load("mixing.safetensors");
    for case in ["b5", "b1"] {
        let k = |name: &str| format!("mixup/{case}/{name}");
        let lam = f.scalar(&k("lam"));
        let (x, y) = (f.get(&k("x")), f.get(&k("y")));
        let (xm, ym) = mixup(x, y, lam);
        assert_close(&xm, f.get(&k("x_out")), F32_TOL, &k("x_out"));
        assert_close(&ym, f.get(&k("y_out")), F32_TOL, &k("y_out"));
        assert_eq!(x.size()[0] % 2, 1, "the fixture exercises odd batches");
    }
}

#[test]
fn cutmix_1d_matches_torch() {
    let f = Fixture::load("mixing.safetensors");
    let y = f.get("cutmix/y");
    for i in 0..5 {
        let k = |name: &str| format!("cutmix1d/c{i}/{name}");
        let cs = f.ints(&k("centre_size"));
        let span = Span::centred(cs[0], cs[1], 16);
        let want_span = f.ints(&k("span"));
        assert_eq!(
            [span.start, span.end],
            want_span[..],
            "span for centre {} size {}",
            cs[0],
            cs[1]
        );
        for layout in ["bcl", "bl"] {
            let x = f.get(&format!("cutmix1d/x_{layout}"));
            let before = x.copy();
            let (xm, ym, lam) = cutmix_apply(x, y, span);
            assert!(x.equal(&before), "cutmix_apply modified its input");
            assert_close(&xm, f.get(&k(&format!("{layout}/x_out"))), 0.0, &k(layout));
            assert_close(&ym, f.get(&k("y_out")), F32_TOL, &k("y_out"));
            assert!((lam - f.scalar(&k("lam"))).abs() < 1e-15, "{}", k("lam"));
        }
    }
}

#[test]
fn cutmix_2d_matches_torch_including_boxes_clipped_at_the_border() {
    let f = Fixture::load("mixing.safetensors");
    let (x, y) = (f.get("cutmix2d/x"), f.get("cutmix/y"));
    let (h, w) = (x.size()[2], x.size()[3]);
    for i in 0..4 {
        let k = |name: &str| format!("cutmix2d/c{i}/{name}");
        let c = f.ints(&k("centre_cut"));
        let b = Box2d::cutmix_reference(c[0], c[1], c[2], c[3], h, w);
        assert_eq!(
            [b.y1, b.y2, b.x1, b.x2],
            f.ints(&k("box"))[..],
            "{}",
            k("box")
        );
        let (xm, ym, lam) = cutmix_apply(x, y, b);
        assert_close(&xm, f.get(&k("x_out")), 0.0, &k("x_out"));
        assert_close(&ym, f.get(&k("y_out")), F32_TOL, &k("y_out"));
        assert!((lam - f.scalar(&k("lam"))).abs() < 1e-15, "{}", k("lam"));
    }
}

#[test]
fn cutout_matches_torch_with_per_sample_holes() {
    let f = Fixture::load("mixing.safetensors");

    let x = f.get("cutout1d/x");
    let (batch, len) = (x.size()[0], x.size()[2]);
    let mut holes: Vec<Vec<Span>> = vec![Vec::new(); batch as usize];
    for (hole, want) in f
        .rows("cutout1d/holes")
        .iter()
        .zip(f.rows("cutout1d/spans"))
    {
        let s = Span::centred(hole[1], hole[2], len);
        assert_eq!(vec![hole[0], s.start, s.end], want, "hole {hole:?}");
        holes[hole[0] as usize].push(s);
    }
    assert!(
        holes[1].is_empty(),
        "the fixture leaves a sample without holes"
    );
    assert_close(
        &cutout(x, &holes),
        f.get("cutout1d/x_out"),
        0.0,
        "cutout 1-D",
    );

    let x = f.get("cutout2d/x");
    let (batch, h, w) = (x.size()[0], x.size()[2], x.size()[3]);
    let mut holes: Vec<Vec<CutRegion>> = vec![Vec::new(); batch as usize];
    for (hole, want) in f
        .rows("cutout2d/holes")
        .iter()
        .zip(f.rows("cutout2d/boxes"))
    {
        let b = Box2d::centred(hole[1], hole[2], hole[3], hole[3], h, w);
        assert_eq!(vec![hole[0], b.y1, b.y2, b.x1, b.x2], want, "hole {hole:?}");
        holes[hole[0] as usize].push(b.into());
    }
    assert_close(
        &cutout(x, &holes),
        f.get("cutout2d/x_out"),
        0.0,
        "cutout 2-D",
    );
}

#[test]
fn drift_in_the_mixing_methods_is_detected() {
    let f = Fixture::load("mixing.safetensors");
    let (x, y) = (f.get("mixup/b5/x"), f.get("mixup/b5/y"));
    let lam = f.scalar("mixup/b5/lam");
    let want = f.get("mixup/b5/x_out");
    let (swapped, _) = mixup(x, y, 1.0 - lam);
    assert_drift_detected(&swapped, want, "mixup with λ and 1 − λ swapped");
    // Pairing by rolling the batch instead of reversing it.
    let rolled = x * lam + x.roll([1], [0]) * (1.0 - lam);
    assert_drift_detected(&rolled, want, "mixup paired by rolling");

    // CutMix at the border: the drawn (unclipped) λ is not the one the pixels realize.
    let (x, y) = (f.get("cutmix2d/x"), f.get("cutmix/y"));
    let c = f.ints("cutmix2d/c1/centre_cut");
    let b = Box2d::cutmix_reference(c[0], c[1], c[2], c[3], 8, 10);
    let (_, _, lam) = cutmix_apply(x, y, b);
    let nominal = 1.0 - (c[2] * c[3]) as f64 / 80.0;
    assert!(
        (lam - nominal).abs() > 0.05,
        "the fixture's border box must be clipped"
    );
    let uncorrected = y * nominal + y.flip(0) * (1.0 - nominal);
    assert_drift_detected(&uncorrected, f.get("cutmix2d/c1/y_out"), "uncorrected λ");
    // A box off by one row does not reproduce the pixels.
    let shifted = Box2d {
        y1: b.y1 - 1,
        y2: b.y2 - 1,
        ..b
    };
    let (xm, _, _) = cutmix_apply(x, y, shifted);
    assert_drift_detected(&xm, f.get("cutmix2d/c1/x_out"), "box shifted by a row");
}

// ---- semi-supervised losses: UDA (TSA, consistency) and FixMatch ----

fn masked_means(per_example: &Tensor, mask: &Tensor) -> (Tensor, Tensor) {
    let masked = per_example * mask;
    let count = mask.sum(None).clamp_min(1.0);
    (masked.mean(None), masked.sum(None) / count)
}

fn dtype_of(name: &str) -> (Kind, f64) {
    if name == "f32" {
        (Kind::Float, F32_TOL)
    } else {
        (Kind::Double, F64_TOL)
    }
}

#[test]
fn tsa_thresholds_masks_and_loss_match_pytorch() {
    let f = Fixture::load("ssl.safetensors");
    let labels = f.get("labels");
    for (name, schedule) in [
        ("linear", TsaSchedule::Linear),
        ("log", TsaSchedule::Log),
        ("exp", TsaSchedule::Exp),
    ] {
        for step in [0u64, 30, 60, 100] {
            let key = format!("tsa/{name}/{step}");
            let eta = schedule.threshold(step, 100, 10);
            assert!(
                (eta - f.scalar(&format!("{key}/eta"))).abs() < 1e-12,
                "{key}"
            );
            for dt in ["f32", "f64"] {
                let (kind, tol) = dtype_of(dt);
                let z = f.get("logits").to_kind(kind);
                let mask = tsa_mask(&z, labels, eta);
                assert_close(&mask, f.get(&format!("{key}/mask/{dt}")), 0.0, &key);
                let ce = cross_entropy_per_example(&z, labels, 0.0);
                let (_, loss) = masked_means(&ce, &mask);
                assert_close(&loss, f.get(&format!("{key}/loss/{dt}")), tol, &key);
            }
        }
    }
}

#[test]
fn uda_consistency_matches_pytorch() {
    let f = Fixture::load("ssl.safetensors");
    for temp in ["1", "0.4"] {
        for beta in ["0", "0.8"] {
            for dt in ["f32", "f64"] {
                let (kind, tol) = dtype_of(dt);
                let key = format!("uda/T{temp}/b{beta}/{dt}");
                let (kl, mask) = uda_consistency(
                    &f.get("clean").to_kind(kind),
                    &f.get("aug").to_kind(kind),
                    temp.parse().unwrap(),
                    beta.parse().unwrap(),
                );
                assert_close(&mask, f.get(&format!("{key}/mask")), 0.0, &key);
                let (batch, masked) = masked_means(&kl, &mask);
                assert_close(&batch, f.get(&format!("{key}/batch")), tol, &key);
                assert_close(&masked, f.get(&format!("{key}/masked")), tol, &key);
            }
        }
    }
    // The mask at β = 0.8 must leave some examples out, or the masked fixtures test nothing.
    let m = f
        .get("uda/T1/b0.8/f64/mask")
        .sum(Kind::Double)
        .double_value(&[]);
    assert!(m > 0.0 && m < 12.0, "{m}");
}

#[test]
fn fixmatch_loss_matches_pytorch() {
    let f = Fixture::load("ssl.safetensors");
    for tau in ["0.5", "0.95"] {
        for dt in ["f32", "f64"] {
            let (kind, tol) = dtype_of(dt);
            let key = format!("fixmatch/tau{tau}/{dt}");
            let (ce, mask) = fixmatch_consistency(
                &f.get("clean").to_kind(kind),
                &f.get("aug").to_kind(kind),
                tau.parse().unwrap(),
            );
            assert_close(&mask, f.get(&format!("{key}/mask")), 0.0, &key);
            let (batch, masked) = masked_means(&ce, &mask);
            assert_close(&batch, f.get(&format!("{key}/batch")), tol, &key);
            assert_close(&masked, f.get(&format!("{key}/masked")), tol, &key);
        }
    }
}

#[test]
fn drift_ssl_variants_are_rejected() {
    let f = Fixture::load("ssl.safetensors");
    let (clean, aug) = (
        f.get("clean").to_kind(Kind::Double),
        f.get("aug").to_kind(Kind::Double),
    );
    // Sharpening the *augmented* side instead of the target, or forgetting the temperature.
    let (kl, mask) = uda_consistency(&clean, &aug, 1.0, 0.0);
    let (wrong, _) = masked_means(&kl, &mask);
    let d = max_diff(&wrong, f.get("uda/T0.4/b0/f64/batch"));
    assert!(d > DRIFT_MIN, "temperature had no visible effect: {d}");
    // Masked normalisation instead of the batch mean.
    let (kl, mask) = uda_consistency(&clean, &aug, 1.0, 0.8);
    let (_, masked) = masked_means(&kl, &mask);
    let d = max_diff(&masked, f.get("uda/T1/b0.8/f64/batch"));
    assert!(d > DRIFT_MIN, "the two normalisations coincide: {d}");
    // FixMatch with a soft target would differ from the hard pseudo-label loss.
    let soft = soft_cross_entropy(&aug, &clean.softmax(-1, None), 0.0);
    let d = max_diff(&soft, f.get("fixmatch/tau0.5/f64/batch"));
    assert!(d > DRIFT_MIN, "{d}");
}

#[test]
fn soft_pseudo_labels_are_distillation_from_the_stored_probabilities() {
    // Stored probabilities p = softmax(teacher): the per-example loss averaged over the batch is the
    // batch-mean KD term T²·KL PyTorch computed from the teacher's logits.
    let f = Fixture::load("kd.safetensors");
    for temp in TEMPS {
        let t: f64 = temp.parse().unwrap();
        let key = format!("kd_unlabeled/T{temp}/f64");
        let student = f.get("student").to_kind(Kind::Double);
        let probs = f.get("teacher").to_kind(Kind::Double).softmax(-1, None);
        let got = soft_pseudo_label_loss(&student, &probs, t).mean(None);
        assert_close(&got, f.get(&key), 1e-9, &key);
    }
}
