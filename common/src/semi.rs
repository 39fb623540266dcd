//! Config of the semi-supervised methods: consistency training (`[ssl]`: UDA, FixMatch), per-sample
//! augmentation of the labeled batch (`[augment]`), and pseudo-label refresh rounds (`[pseudo_label]`).
//! Each section is optional; `JobConfig::validate` calls [`validate`] for the cross-section rules.

use serde::{Deserialize, Serialize};

/// Consistency regularization on the unlabeled stream (`data.unlabeled_split`, μ = `data.unlabeled_ratio`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SslConfig {
    pub method: SslMethod,
    /// λ: weight of the unsupervised term.
    #[serde(default = "one_f")]
    pub lambda_u: f64,
    /// Confidence threshold on the target prediction; examples below it are masked out of the
    /// unsupervised term. Default: 0.95 for FixMatch (τ), none (0) for UDA (β).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threshold: Option<f64>,
    /// UDA: sharpening temperature of the target distribution, softmax(z/T); 1 = no sharpening.
    #[serde(default = "one_f")]
    pub temperature: f64,
    /// UDA: Training Signal Annealing of the supervised term.
    #[serde(default)]
    pub tsa: TsaSchedule,
    /// How the masked unsupervised term is averaged: over the whole unlabeled batch ("batch", as the
    /// UDA and FixMatch reference code) or over the unmasked examples only ("masked").
    #[serde(default)]
    pub normalize: UnsupNorm,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SslMethod {
    /// Xie et al. 2020: KL(p(y|x) ‖ p(y|aug(x))), clean prediction as the (sharpened, detached) target.
    Uda,
    /// Sohn et al. 2020: hard pseudo-label from the weak view, cross-entropy on the strong view.
    Fixmatch,
}

/// TSA (Xie et al. 2020, §3.2): at step t of T, a labeled example whose correct-class probability
/// exceeds η_t = α_t·(1 − 1/K) + 1/K is masked out of the supervised loss.
/// α_t: linear t/T, log 1 − exp(−5t/T), exp exp(5(t/T − 1)).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TsaSchedule {
    #[default]
    None,
    Linear,
    Log,
    Exp,
}

impl TsaSchedule {
    /// η_t for `classes` classes at `step` of `total` steps; 1 (nothing masked) for `None`.
    pub fn threshold(self, step: u64, total: u64, classes: usize) -> f64 {
        let frac = (step as f64 / total.max(1) as f64).min(1.0);
        let alpha = match self {
            TsaSchedule::None => return 1.0,
            TsaSchedule::Linear => frac,
            TsaSchedule::Log => 1.0 - (-5.0 * frac).exp(),
            TsaSchedule::Exp => (5.0 * (frac - 1.0)).exp(),
        };
        let k = classes as f64;
        alpha * (1.0 - 1.0 / k) + 1.0 / k
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UnsupNorm {
    #[default]
    Batch,
    Masked,
}

impl SslConfig {
    pub fn threshold(&self) -> f64 {
        self.threshold.unwrap_or(match self.method {
            SslMethod::Fixmatch => 0.95,
            SslMethod::Uda => 0.0,
        })
    }
}

/// Per-sample augmentation of the labeled batch, with the same weak/strong pipelines the consistency
/// methods use on unlabeled data (so a supervised baseline can get exactly the SSL methods' augmentation).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AugmentConfig {
    #[serde(default)]
    pub labeled: AugmentLevel,
    /// 2-D images only: horizontal flips in the weak view (off for digits and other non-symmetric data).
    #[serde(default)]
    pub flip: bool,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AugmentLevel {
    #[default]
    None,
    Weak,
    Strong,
}

/// Pseudo-label refresh rounds, run by the coordinator: TRAIN → INFER → SELECT → TRAIN → … with
/// `rounds` TRAIN phases (so `rounds − 1` pseudo-label sets).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PseudoLabelConfig {
    pub rounds: u32,
    /// Minimum confidence (max class probability) of a selected sample.
    #[serde(default)]
    pub threshold: f64,
    /// Keep at most this many samples per class, the most confident first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_k_per_class: Option<u64>,
    /// Balance classes: keep at most as many per class as the rarest class has above the threshold.
    #[serde(default)]
    pub balance: bool,
    /// Re-initialise the student each round (else continue from the previous round's weights).
    #[serde(default = "yes")]
    pub reinit: bool,
    /// Noisy student: strong augmentation on the pseudo-labeled inputs.
    #[serde(default)]
    pub noisy: bool,
    /// Train on the stored probability vectors (softened with `temperature`, λ·T²·KL) instead of hard
    /// labels (CE).
    #[serde(default)]
    pub soft: bool,
    #[serde(default = "one_f")]
    pub temperature: f64,
    /// λ: weight of the pseudo-labeled term.
    #[serde(default = "one_f")]
    pub weight: f64,
}

fn one_f() -> f64 {
    1.0
}
fn yes() -> bool {
    true
}

/// What the cross-section checks need to know of the rest of the job (`JobConfig::validate` fills it
/// in), so that this module does not import the config that embeds its sections.
#[derive(Clone, Copy, Debug, Default)]
pub struct JobFacts {
    /// A `[pretrain]` section is present.
    pub pretrain: bool,
    /// `data.unlabeled_split` is set.
    pub unlabeled_split: bool,
    /// `regularize.distill` is set.
    pub distill: bool,
    /// Any of `regularize.mix`, `manifold_mixup` or `cutout` is set.
    pub batch_regularizers: bool,
}

/// Cross-section checks of `[ssl]` and `[pseudo_label]`; `bad(key, why)` builds the config error.
pub fn validate(
    ssl: Option<&SslConfig>,
    pseudo_label: Option<&PseudoLabelConfig>,
    job: &JobFacts,
    bad: &dyn Fn(&str, String) -> crate::Error,
) -> crate::Result<()> {
    let unit = |key: &str, p: f64| {
        if (0.0..=1.0).contains(&p) {
            Ok(())
        } else {
            Err(bad(key, format!("{p} is outside [0, 1]")))
        }
    };
    let positive = |key: &str, v: f64| {
        if v > 0.0 && v.is_finite() {
            Ok(())
        } else {
            Err(bad(key, format!("{v} must be a finite number > 0")))
        }
    };
    if job.pretrain && (ssl.is_some() || pseudo_label.is_some()) {
        return Err(bad(
            "pretrain",
            "cannot be combined with [ssl] or [pseudo_label] (a staged job fine-tunes on labels only)"
                .into(),
        ));
    }
    if let Some(s) = ssl {
        if !job.unlabeled_split {
            return Err(bad(
                "ssl",
                "needs data.unlabeled_split (the unlabeled stream it regularizes on)".into(),
            ));
        }
        if job.distill {
            return Err(bad(
                "ssl",
                "cannot be combined with regularize.distill (both own the unlabeled stream)".into(),
            ));
        }
        if job.batch_regularizers {
            return Err(bad(
                "ssl",
                "cannot be combined with regularize.mix, manifold_mixup or cutout (use [augment] for the labeled batch)".into(),
            ));
        }
        if !(s.lambda_u >= 0.0 && s.lambda_u.is_finite()) {
            return Err(bad("ssl.lambda_u", "must be a finite number ≥ 0".into()));
        }
        unit("ssl.threshold", s.threshold())?;
        positive("ssl.temperature", s.temperature)?;
        if s.method == SslMethod::Fixmatch && (s.temperature != 1.0 || s.tsa != TsaSchedule::None) {
            return Err(bad(
                "ssl",
                "temperature and tsa are UDA options; FixMatch uses hard pseudo-labels".into(),
            ));
        }
    }
    if let Some(p) = pseudo_label {
        if p.rounds < 2 {
            return Err(bad(
                "pseudo_label.rounds",
                format!(
                    "{} must be at least 2 (round 0 trains on labels only)",
                    p.rounds
                ),
            ));
        }
        if !job.unlabeled_split {
            return Err(bad(
                "pseudo_label",
                "needs data.unlabeled_split (the pool it labels)".into(),
            ));
        }
        if ssl.is_some() || job.distill {
            return Err(bad(
                "pseudo_label",
                "cannot be combined with ssl or regularize.distill (each owns the unlabeled stream)"
                    .into(),
            ));
        }
        unit("pseudo_label.threshold", p.threshold)?;
        if p.top_k_per_class == Some(0) {
            return Err(bad(
                "pseudo_label.top_k_per_class",
                "must be at least 1".into(),
            ));
        }
        positive("pseudo_label.temperature", p.temperature)?;
        if !(p.weight >= 0.0 && p.weight.is_finite()) {
            return Err(bad(
                "pseudo_label.weight",
                "must be a finite number ≥ 0".into(),
            ));
        }
    }
    Ok(())
}
