//! The objectives behind butler's data-regularization methods, as pure tensor functions with PyTorch's
//! exact semantics, so that a recipe ported from a PyTorch paper trains the same here.
//!
//! Mixing methods (mixup, CutMix) turn hard labels into soft target distributions, so every loss that can
//! follow a mixing step takes probability targets `[B, K]`; the hard-label cross-entropy exists for the
//! plain path and is torch's own kernel. The losses work in the dtype of their inputs (the golden tests
//! check f32 and f64 against PyTorch), and no function changes its arguments.

use tch::{Kind, Reduction, Tensor};

/// Mean over the batch of `−Σ_k q_k · log softmax(z)_k` with `q = (1 − ε)·p + ε/K`.
///
/// This is `torch.nn.functional.cross_entropy(logits, probs, label_smoothing=ε)` with probability
/// targets: torch smooths a probability target the same way it smooths a one-hot one (mixing the
/// target with the uniform distribution), and `reduction="mean"` divides by the batch size, not by
/// `B·K`. `logits` and `target_probs` are `[B, K]`; the class dimension is the last one.
///
/// # Panics
/// If the shapes differ or are not two-dimensional, or if `label_smoothing` is outside `[0, 1]`.
pub fn soft_cross_entropy(logits: &Tensor, target_probs: &Tensor, label_smoothing: f64) -> Tensor {
    assert_eq!(
        logits.dim(),
        2,
        "soft_cross_entropy: logits must be [B, K], got {:?}",
        logits.size()
    );
    assert_eq!(
        logits.size(),
        target_probs.size(),
        "soft_cross_entropy: logits and target probabilities must have the same shape"
    );
    assert!(
        (0.0..=1.0).contains(&label_smoothing),
        "soft_cross_entropy: label_smoothing {label_smoothing} is outside [0, 1]"
    );
    let (batch, classes) = (logits.size()[0], logits.size()[1]);
    let log_p = logits.log_softmax(-1, None);
    let q = if label_smoothing > 0.0 {
        target_probs * (1.0 - label_smoothing) + label_smoothing / classes as f64
    } else {
        target_probs.shallow_clone()
    };
    // One sum over all B·K terms divided by B, rather than a mean of per-sample sums: the same value,
    // but torch's probability-target kernel sums this way, and matching its order makes f32 results
    // agree with torch to the last bit instead of within a few ulps.
    -(log_p * q).sum(None) / batch as f64
}

/// Cross-entropy with hard labels, torch semantics: `F.cross_entropy(logits, labels,
/// label_smoothing=ε)` with `reduction="mean"` and `ignore_index=-100`.
///
/// It calls libtorch's own kernel rather than restating the formula, because torch's conventions for
/// ignored labels are subtle: an ignored sample contributes neither to the sum nor to the count the mean
/// divides by, and with smoothing the uniform term is averaged over the same non-ignored samples.
pub fn cross_entropy(logits: &Tensor, labels: &Tensor, label_smoothing: f64) -> Tensor {
    logits.cross_entropy_loss::<Tensor>(labels, None, Reduction::Mean, -100, label_smoothing)
}

/// One-hot encoding of integer labels `[B]` as f32 `[B, classes]`, the form the mixing methods and
/// [`soft_cross_entropy`] expect.
///
/// # Panics
/// If a label is outside `0..classes` (libtorch's check).
pub fn one_hot(labels: &Tensor, classes: i64) -> Tensor {
    labels.one_hot(classes).to_kind(Kind::Float)
}

/// Knowledge-distillation weights (Hinton, Vinyals, Dean 2015).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct KdConfig {
    /// Weight of the cross-entropy against the data's targets; `1 − alpha` weighs the distillation term.
    pub alpha: f64,
    /// Softmax temperature applied to both student and teacher logits in the distillation term.
    pub temperature: f64,
}

/// `α·CE(student, targets; ε) + (1 − α)·T²·KL(softmax(t/T) ‖ softmax(s/T))`, or `T²·KL` alone when
/// `targets` is `None` (unlabeled data: there is nothing to take a cross-entropy against, so `α` is
/// ignored rather than silently scaling the only term).
///
/// The KL term is `F.kl_div(F.log_softmax(s/T), F.softmax(t/T), reduction="batchmean")`: summed over
/// classes and samples and divided by the batch size, which is the mathematically correct KL per sample
/// (torch's `"mean"` would also divide by K). The `T²` factor keeps the distillation gradients' magnitude
/// independent of the temperature, as Hinton et al. prescribe. `targets` are probabilities `[B, K]`, so
/// distillation composes with mixup and CutMix. The teacher is a constant: its logits are detached, so
/// no gradient reaches a teacher that happens to require one.
///
/// # Panics
/// If the shapes differ or are not `[B, K]`, or if `temperature` is not positive.
pub fn kd_loss(
    student_logits: &Tensor,
    teacher_logits: &Tensor,
    targets: Option<&Tensor>,
    cfg: &KdConfig,
    label_smoothing: f64,
) -> Tensor {
    assert!(
        cfg.temperature > 0.0,
        "kd_loss: temperature {} must be positive",
        cfg.temperature
    );
    assert_eq!(
        student_logits.dim(),
        2,
        "kd_loss: student logits must be [B, K], got {:?}",
        student_logits.size()
    );
    assert_eq!(
        student_logits.size(),
        teacher_logits.size(),
        "kd_loss: student and teacher logits must have the same shape"
    );
    let t = cfg.temperature;
    let kl = distillation_kl(student_logits, &teacher_logits.detach(), t);
    match targets {
        None => kl * (t * t),
        Some(y) => {
            let ce = soft_cross_entropy(student_logits, y, label_smoothing);
            ce * cfg.alpha + kl * ((1.0 - cfg.alpha) * t * t)
        }
    }
}

/// `KL(softmax(t/T) ‖ softmax(s/T))` averaged over the batch (torch's `"batchmean"`). libtorch has no
/// batch-mean reduction (torch's Python layer divides a sum by the batch size), so neither do we.
fn distillation_kl(student_logits: &Tensor, teacher_logits: &Tensor, temperature: f64) -> Tensor {
    let batch = student_logits.size()[0];
    let log_q = (student_logits / temperature).log_softmax(-1, None);
    let p = (teacher_logits / temperature).softmax(-1, None);
    log_q.kl_div(&p, Reduction::Sum, false) / batch as f64
}

/// Training Signal Annealing mask (Xie et al. 2020, §3.2): 1 for the labeled examples whose probability
/// of the correct class is at most `threshold` (they still teach something), 0 for the others, which
/// are left out of the supervised loss. `[B]` in the logits' dtype; no gradient flows through the mask.
pub fn tsa_mask(logits: &Tensor, labels: &Tensor, threshold: f64) -> Tensor {
    let p_correct = logits
        .detach()
        .softmax(-1, None)
        .gather(1, &labels.unsqueeze(1), false)
        .squeeze_dim(1);
    p_correct.le(threshold).to_kind(logits.kind())
}

/// Per-example distillation loss against stored probabilities (soft pseudo-labels):
/// `T²·KL(softmax(log p / T) ‖ softmax(z / T))`, `[B]`. With `p = softmax(t)` this is exactly the KD term
/// `T²·KL(softmax(t/T) ‖ softmax(z/T))` of a teacher with logits `t` (log p = t − logsumexp t, and the
/// shift cancels in the softmax). Probabilities are clamped at 1e-12 before the log.
pub fn soft_pseudo_label_loss(logits: &Tensor, probs: &Tensor, temperature: f64) -> Tensor {
    let t = temperature;
    let log_target = (probs.clamp_min(1e-12).log() / t).log_softmax(-1, None);
    let log_q = (logits / t).log_softmax(-1, None);
    (log_target.exp() * (&log_target - log_q)).sum_dim_intlist(-1, false, None) * (t * t)
}

/// Per-example cross-entropy with hard labels, `F.cross_entropy(..., reduction="none",
/// label_smoothing=ε)`, `[B]`.
pub fn cross_entropy_per_example(logits: &Tensor, labels: &Tensor, label_smoothing: f64) -> Tensor {
    logits.cross_entropy_loss::<Tensor>(labels, None, Reduction::None, -100, label_smoothing)
}

/// UDA's consistency term per unlabeled example (Xie et al. 2020, eq. 1 with the paper's sharpening and
/// confidence masking): `KL(p̃(y|x) ‖ p(y|aug(x)))` where `p̃ = softmax(clean/T)` is the sharpened
/// prediction on the clean input, a constant (stop-gradient). The mask is 1 where the clean prediction's
/// largest probability (before sharpening) exceeds `threshold` (β; 0 keeps every example).
///
/// Returns `(kl [B], mask [B])`. The KL is computed from log-probabilities on both sides, so a
/// sharpened target with exact zeros gives 0·(−∞ − x) = 0 rather than NaN.
pub fn uda_consistency(
    clean_logits: &Tensor,
    aug_logits: &Tensor,
    temperature: f64,
    threshold: f64,
) -> (Tensor, Tensor) {
    assert!(
        temperature > 0.0,
        "uda_consistency: temperature must be positive"
    );
    let clean = clean_logits.detach();
    let log_target = (&clean / temperature).log_softmax(-1, None);
    let log_q = aug_logits.log_softmax(-1, None);
    let kl = (log_target.exp() * (&log_target - log_q)).sum_dim_intlist(-1, false, None);
    let confidence = clean.softmax(-1, None).amax(-1, false);
    let mask = confidence.gt(threshold).to_kind(aug_logits.kind());
    (kl, mask)
}

/// FixMatch's unlabeled term per example (Sohn et al. 2020, eq. 4): the hard pseudo-label
/// `argmax softmax(weak)` (a constant) as the cross-entropy target of the strong view, masked where
/// the weak prediction's largest probability is below `threshold` (τ). Returns `(ce [B], mask [B])`.
pub fn fixmatch_consistency(
    weak_logits: &Tensor,
    strong_logits: &Tensor,
    threshold: f64,
) -> (Tensor, Tensor) {
    let probs = weak_logits.detach().softmax(-1, None);
    let (confidence, pseudo) = probs.max_dim(-1, false);
    let mask = confidence.ge(threshold).to_kind(strong_logits.kind());
    (cross_entropy_per_example(strong_logits, &pseudo, 0.0), mask)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn close(a: &Tensor, b: &Tensor) -> f64 {
        (a - b).abs().max().double_value(&[])
    }

    #[test]
    fn soft_cross_entropy_of_one_hot_targets_is_the_hard_label_loss() {
        let logits = Tensor::randn([7, 5], (Kind::Double, Device::Cpu));
        let labels = Tensor::from_slice(&[0i64, 4, 2, 2, 1, 3, 0]);
        let probs = one_hot(&labels, 5).to_kind(Kind::Double);
        for eps in [0.0, 0.1, 0.3] {
            let soft = soft_cross_entropy(&logits, &probs, eps);
            let hard = cross_entropy(&logits, &labels, eps);
            assert!(close(&soft, &hard) < 1e-12, "eps {eps}");
        }
    }

    #[test]
    fn one_hot_is_f32_with_one_one_per_row() {
        let oh = one_hot(&Tensor::from_slice(&[2i64, 0]), 3);
        assert_eq!(oh.kind(), Kind::Float);
        assert_eq!(
            Vec::<f32>::try_from(oh.reshape([-1])).unwrap(),
            vec![0.0, 0.0, 1.0, 1.0, 0.0, 0.0]
        );
    }

    #[test]
    fn kd_without_teacher_disagreement_is_the_cross_entropy_share() {
        // Identical student and teacher: the KL term vanishes and only α·CE remains.
        let logits = Tensor::randn([4, 6], (Kind::Double, Device::Cpu));
        let y = Tensor::randn([4, 6], (Kind::Double, Device::Cpu)).softmax(-1, None);
        let cfg = KdConfig {
            alpha: 0.3,
            temperature: 2.0,
        };
        let kd = kd_loss(&logits, &logits, Some(&y), &cfg, 0.1);
        let ce = soft_cross_entropy(&logits, &y, 0.1) * 0.3;
        assert!(close(&kd, &ce) < 1e-12);
        let unlabeled = kd_loss(&logits, &logits, None, &cfg, 0.1);
        assert!(unlabeled.double_value(&[]).abs() < 1e-12);
    }

    #[test]
    fn kd_gradient_reaches_the_student_only() {
        let s = Tensor::randn([3, 4], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let t = Tensor::randn([3, 4], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let cfg = KdConfig {
            alpha: 0.5,
            temperature: 4.0,
        };
        kd_loss(&s, &t, None, &cfg, 0.0).backward();
        assert!(s.grad().defined());
        assert!(
            !t.grad().defined(),
            "the teacher must be treated as a constant"
        );
    }
}
