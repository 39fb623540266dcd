//! Config of the semi-supervised methods: consistency training (`[ssl]`: UDA, FixMatch, FlexMatch,
//! FreeMatch, SoftMatch, Π-model, Mean Teacher, optionally with distribution alignment), per-sample
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
    /// ReMixMatch's distribution alignment of the target prediction (UDA, FixMatch, FlexMatch,
    /// FreeMatch; SoftMatch's "uniform alignment" is the same operation): p ← Normalize(p · p_labeled /
    /// p̃), with a uniform p_labeled and p̃ an EMA of the mean prediction on the unlabeled batches.
    #[serde(default)]
    pub distribution_alignment: bool,
    /// Momentum of distribution alignment's running mean prediction p̃ (USB's `DistAlignEMAHook`).
    #[serde(default = "default_momentum")]
    pub da_momentum: f64,
    /// FreeMatch, SoftMatch: momentum λ of the EMAs of the confidence statistics.
    #[serde(default = "default_momentum")]
    pub adaptive_momentum: f64,
    /// Ramp-up of the unsupervised weight: λ·exp(−5(1 − t/T)²) for the first T steps (Laine & Aila
    /// 2017), λ afterwards; 0 = no ramp-up. Meant for the Π-model and Mean Teacher.
    #[serde(default)]
    pub rampup_steps: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SslMethod {
    /// Xie et al. 2020: KL(p(y|x) ‖ p(y|aug(x))), clean prediction as the (sharpened, detached) target.
    Uda,
    /// Sohn et al. 2020: hard pseudo-label from the weak view, cross-entropy on the strong view.
    Fixmatch,
    /// Laine & Aila 2017: mean squared error between the softmax outputs of the two views, the target
    /// (view 0) from the model being trained, detached.
    PiModel,
    /// Tarvainen & Valpola 2017: the Π-model's loss with the target from the EMA of the weights
    /// (`[train] ema`) as the teacher.
    MeanTeacher,
    /// Zhang et al. 2021: FixMatch with class-wise curriculum thresholds τ·M(β_c) from the learning
    /// status of every unlabeled sample (the warmup variant, convex M(x) = x/(2 − x)).
    Flexmatch,
    /// Wang et al. 2023: FixMatch with the self-adaptive threshold τ_t·MaxNorm(p̃_t)(c) (EMAs of the
    /// mean confidence and of the mean prediction); without the fairness term.
    Freematch,
    /// Chen et al. 2023: every pseudo-label weighted by a truncated Gaussian of its confidence with
    /// EMAs of the confidence's mean and variance.
    Softmatch,
}

impl SslMethod {
    /// The key's value in a config (`method = "…"`).
    pub fn name(self) -> &'static str {
        match self {
            SslMethod::Uda => "uda",
            SslMethod::Fixmatch => "fixmatch",
            SslMethod::PiModel => "pi_model",
            SslMethod::MeanTeacher => "mean_teacher",
            SslMethod::Flexmatch => "flexmatch",
            SslMethod::Freematch => "freematch",
            SslMethod::Softmatch => "softmatch",
        }
    }

    /// Whether the method's target is a pseudo-label (hard or sharpened) with a confidence mask or
    /// weight, which distribution alignment can act on; false for the Π-model and Mean Teacher.
    pub fn pseudo_labels(self) -> bool {
        !matches!(self, SslMethod::PiModel | SslMethod::MeanTeacher)
    }

    /// Whether `ssl.threshold` means something for the method (the others adapt their own).
    pub fn takes_threshold(self) -> bool {
        matches!(
            self,
            SslMethod::Uda | SslMethod::Fixmatch | SslMethod::Flexmatch
        )
    }
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
            SslMethod::Fixmatch | SslMethod::Flexmatch => 0.95,
            _ => 0.0,
        })
    }

    /// The checks that need `[train] ema`, which `JobFacts` does not carry: Mean Teacher's teacher is
    /// the EMA of the weights. Returns the key and the reason on failure.
    pub fn check_ema(&self, ema: Option<f64>) -> Result<(), (&'static str, String)> {
        if self.method == SslMethod::MeanTeacher && ema.is_none() {
            return Err((
                "train.ema",
                "ssl.method = \"mean_teacher\" needs [train] ema (the teacher is the EMA of the weights)"
                    .into(),
            ));
        }
        Ok(())
    }

    /// The weight of the unsupervised term at `step`: λ times the sigmoid ramp-up.
    pub fn unsupervised_weight(&self, step: u64) -> f64 {
        self.lambda_u * sigmoid_rampup(step, self.rampup_steps)
    }
}

/// exp(−5(1 − t/T)²) for t < T, 1 from T on (Laine & Aila 2017, appendix A); 1 for T = 0.
pub fn sigmoid_rampup(step: u64, rampup_steps: u64) -> f64 {
    if rampup_steps == 0 || step >= rampup_steps {
        return 1.0;
    }
    let phase = 1.0 - step as f64 / rampup_steps as f64;
    (-5.0 * phase * phase).exp()
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
fn default_momentum() -> f64 {
    0.999
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
        if s.method != SslMethod::Uda && (s.temperature != 1.0 || s.tsa != TsaSchedule::None) {
            return Err(bad(
                "ssl",
                format!(
                    "temperature and tsa are UDA options; {} does not use them",
                    s.method.name()
                ),
            ));
        }
        if s.threshold.is_some() && !s.method.takes_threshold() {
            return Err(bad(
                "ssl.threshold",
                format!(
                    "{} sets no fixed threshold (only uda, fixmatch and flexmatch take one)",
                    s.method.name()
                ),
            ));
        }
        if s.distribution_alignment && !s.method.pseudo_labels() {
            return Err(bad(
                "ssl.distribution_alignment",
                format!(
                    "{} has no pseudo-label to align (uda, fixmatch, flexmatch, freematch, softmatch)",
                    s.method.name()
                ),
            ));
        }
        let momentum = |key: &str, m: f64| {
            if (0.0..1.0).contains(&m) {
                Ok(())
            } else {
                Err(bad(key, format!("{m} is outside [0, 1)")))
            }
        };
        momentum("ssl.da_momentum", s.da_momentum)?;
        momentum("ssl.adaptive_momentum", s.adaptive_momentum)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn ssl(extra: &str) -> SslConfig {
        toml::from_str(extra).unwrap()
    }

    fn check(s: &SslConfig) -> std::result::Result<(), String> {
        let facts = JobFacts {
            unlabeled_split: true,
            ..JobFacts::default()
        };
        let bad = |key: &str, why: String| crate::Error::invalid(key, why);
        validate(Some(s), None, &facts, &bad).map_err(|e| e.to_string())
    }

    #[test]
    fn the_usb_methods_parse_with_their_defaults() {
        for (name, method) in [
            ("pi_model", SslMethod::PiModel),
            ("mean_teacher", SslMethod::MeanTeacher),
            ("flexmatch", SslMethod::Flexmatch),
            ("freematch", SslMethod::Freematch),
            ("softmatch", SslMethod::Softmatch),
        ] {
            let s = ssl(&format!("method = '{name}'"));
            assert_eq!(s.method, method);
            assert_eq!(s.method.name(), name);
            assert_eq!((s.da_momentum, s.adaptive_momentum), (0.999, 0.999));
            assert_eq!((s.rampup_steps, s.distribution_alignment), (0, false));
            check(&s).unwrap();
        }
        assert_eq!(ssl("method = 'flexmatch'").threshold(), 0.95);
        check(&ssl("method = 'fixmatch'\ndistribution_alignment = true")).unwrap();
    }

    #[test]
    fn misplaced_usb_options_are_refused_naming_the_key() {
        for (text, key) in [
            ("method = 'freematch'\nthreshold = 0.9", "ssl.threshold"),
            ("method = 'softmatch'\nthreshold = 0.9", "ssl.threshold"),
            (
                "method = 'pi_model'\ndistribution_alignment = true",
                "ssl.distribution_alignment",
            ),
            ("method = 'fixmatch'\nda_momentum = 1.0", "ssl.da_momentum"),
            (
                "method = 'softmatch'\nadaptive_momentum = -0.1",
                "ssl.adaptive_momentum",
            ),
            ("method = 'flexmatch'\ntsa = 'linear'", "UDA options"),
        ] {
            let e = check(&ssl(text)).unwrap_err();
            assert!(e.contains(key), "{text}: {e}");
        }
    }

    #[test]
    fn mean_teacher_needs_the_weight_average() {
        let s = ssl("method = 'mean_teacher'");
        let (key, why) = s.check_ema(None).unwrap_err();
        assert_eq!(key, "train.ema");
        assert!(why.contains("mean_teacher"), "{why}");
        s.check_ema(Some(0.99)).unwrap();
        ssl("method = 'pi_model'").check_ema(None).unwrap();
    }

    #[test]
    fn the_rampup_is_the_sigmoid_shape_then_one() {
        assert_eq!(sigmoid_rampup(5, 0), 1.0);
        assert!((sigmoid_rampup(0, 10) - (-5.0f64).exp()).abs() < 1e-15);
        assert!((sigmoid_rampup(5, 10) - (-1.25f64).exp()).abs() < 1e-15);
        assert_eq!(sigmoid_rampup(10, 10), 1.0);
        let s = ssl("method = 'pi_model'\nlambda_u = 2.0\nrampup_steps = 4");
        assert!((s.unsupervised_weight(2) - 2.0 * (-1.25f64).exp()).abs() < 1e-15);
    }
}
