//! The `[pretrain]` section: contrastive pretraining on the unlabeled split, then a linear probe on the
//! frozen encoder, then fine-tuning on the labeled subset (`data.labels_per_class`) with the job's
//! `[optim]`, `[schedule]` and `[train]`. `method = "none"` skips the first two stages: the same
//! fine-tuning recipe from a random encoder, i.e. the supervised baseline. An optional
//! `[pretrain.distill]` adds a fourth stage (SimCLRv2's third step, Chen et al. 2020b): the fine-tuned
//! model, frozen, teaches a fresh student on the labeled subset and the unlabeled pool through the KD
//! objective.

use crate::model::ModelConfig;
use crate::optim::{OptimConfig, OptimKind, ScheduleConfig};
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PretrainMethod {
    /// SimCLR: NT-Xent over the global batch of two augmented views.
    Simclr,
    /// Contrastive Predictive Coding: InfoNCE on future latent steps, negatives from the global batch.
    Cpc,
    /// No pretraining (the supervised baseline through the same fine-tuning stage).
    None,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PretrainConfig {
    pub method: PretrainMethod,
    /// Passes over the unlabeled split.
    #[serde(default = "one")]
    pub epochs: u64,
    /// Global pretraining batch (samples; SimCLR sees two views of each).
    #[serde(default = "default_batch")]
    pub batch_size: usize,
    /// NT-Xent's τ.
    #[serde(default = "default_temperature")]
    pub temperature: f64,
    #[serde(default = "default_projection_hidden")]
    pub projection_hidden: usize,
    #[serde(default = "default_projection_dim")]
    pub projection_dim: usize,
    /// CPC's prediction horizons k = 1..=cpc_horizons.
    #[serde(default = "default_horizons")]
    pub cpc_horizons: usize,
    /// CPC's GRU context size.
    #[serde(default = "default_context")]
    pub cpc_context: usize,
    pub optim: OptimConfig,
    #[serde(default)]
    pub schedule: ScheduleConfig,
    /// Full-batch Adam epochs of the linear probe on frozen features.
    #[serde(default = "default_probe_epochs")]
    pub probe_epochs: u64,
    #[serde(default = "default_probe_lr")]
    pub probe_lr: f64,
    /// Augment each labeled fine-tuning batch with one view of the pretraining augmentation.
    #[serde(default)]
    pub finetune_augment: bool,
    /// Start fine-tuning from the linear probe's classifier (LP-FT) rather than a random one.
    #[serde(default = "yes")]
    pub finetune_from_probe: bool,
    /// `[pretrain.distill]`: a distillation stage after fine-tuning.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub distill: Option<DistillStageConfig>,
}

/// What the distillation stage's teacher sees of an unlabeled sample.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TeacherView {
    /// The student's input (augmented when `augment = true`).
    #[default]
    Same,
    /// The un-augmented sample, while the student sees the augmented one (noisy student).
    Clean,
}

/// `[pretrain.distill]`: after fine-tuning, a student (the job's `[model]` unless `model` is given)
/// trained from scratch with the job's `[optim]`/`[schedule]`/`[train]` batch on
/// - labeled batches: α·CE(y) + (1 − α)·T²·KL(teacher ‖ student),
/// - unlabeled batches of `unlabeled_ratio`× the labeled batch: λ·T²·KL(teacher ‖ student),
///
/// where the teacher is the fine-tuned model, frozen.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DistillStageConfig {
    /// Epochs of the labeled set; give this or `steps`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epochs: Option<u64>,
    /// Optimizer steps, rounded up to whole epochs of the labeled set (like `train.steps`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steps: Option<u64>,
    /// Softmax temperature T of both models in the KL term.
    #[serde(default = "one_f")]
    pub temperature: f64,
    /// Weight of the labeled cross-entropy; 1 − α weighs the KL term on labeled batches.
    #[serde(default = "half")]
    pub alpha: f64,
    /// λ: weight of the KL term on the unlabeled batches.
    #[serde(default = "one_f")]
    pub unlabeled_weight: f64,
    /// Unlabeled samples per labeled one in a step (μ).
    #[serde(default = "seven")]
    pub unlabeled_ratio: u64,
    /// Strong augmentation of the unlabeled samples the student sees (the `[augment]` strong pipeline).
    #[serde(default)]
    pub augment: bool,
    #[serde(default)]
    pub teacher_view: TeacherView,
    /// The student's architecture (default: the job's `[model]`, which is also the teacher's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<ModelConfig>,
}

impl DistillStageConfig {
    /// The stage's epochs of the labeled set; `steps` is resolved with `per_epoch` steps an epoch.
    pub fn epochs_for(&self, per_epoch: u64) -> u64 {
        match (self.epochs, self.steps) {
            (Some(e), _) => e,
            (None, Some(s)) => s.div_ceil(per_epoch.max(1)).max(1),
            (None, None) => 0,
        }
    }

    fn validate(&self) -> std::result::Result<(), (&'static str, String)> {
        match (self.epochs, self.steps) {
            (None, None) => return Err(("epochs", "give epochs or steps".into())),
            (Some(_), Some(_)) => return Err(("steps", "give epochs or steps, not both".into())),
            (Some(0), _) | (_, Some(0)) => {
                return Err(("epochs", "epochs / steps must be at least 1".into()))
            }
            _ => {}
        }
        if !(self.temperature > 0.0 && self.temperature.is_finite()) {
            return Err(("temperature", "must be a finite number > 0".into()));
        }
        if !(0.0..=1.0).contains(&self.alpha) {
            return Err(("alpha", format!("{} is outside [0, 1]", self.alpha)));
        }
        if !(self.unlabeled_weight >= 0.0 && self.unlabeled_weight.is_finite()) {
            return Err(("unlabeled_weight", "must be a finite number ≥ 0".into()));
        }
        if self.unlabeled_ratio == 0 {
            return Err(("unlabeled_ratio", "must be at least 1".into()));
        }
        if self.teacher_view == TeacherView::Clean && !self.augment {
            return Err((
                "teacher_view",
                "\"clean\" differs from \"same\" only when the student's view is augmented: set augment = true".into(),
            ));
        }
        Ok(())
    }
}

fn half() -> f64 {
    0.5
}
fn one_f() -> f64 {
    1.0
}
fn seven() -> u64 {
    7
}

fn yes() -> bool {
    true
}

fn one() -> u64 {
    1
}
fn default_batch() -> usize {
    256
}
fn default_temperature() -> f64 {
    0.5
}
fn default_projection_hidden() -> usize {
    128
}
fn default_projection_dim() -> usize {
    64
}
fn default_horizons() -> usize {
    2
}
fn default_context() -> usize {
    64
}
fn default_probe_epochs() -> u64 {
    300
}
fn default_probe_lr() -> f64 {
    0.01
}

impl PretrainConfig {
    /// Checks that need no data and no world size (called from `JobConfig::validate` with the job's
    /// model, `data.labels_per_class` and `data.unlabeled_split`).
    pub fn validate(
        &self,
        model: &ModelConfig,
        labels_per_class: Option<u64>,
        unlabeled_split: Option<&str>,
        origin: &Path,
    ) -> Result<()> {
        let bad = |key: &str, why: String| Error::Config {
            path: origin.into(),
            message: format!("pretrain.{key}: {why}"),
        };
        if !matches!(model, ModelConfig::ConvBase { .. }) {
            return Err(bad(
                "method",
                format!(
                    "staged pretraining needs model.kind = \"conv_base\" (its encoder is ConvBase's conv stack), not {:?}",
                    model.kind()
                ),
            ));
        }
        if labels_per_class.is_none() {
            return Err(bad(
                "method",
                "the fine-tuning stage trains on data.labels_per_class labels per class; set it"
                    .into(),
            ));
        }
        if let Some(d) = &self.distill {
            d.validate()
                .map_err(|(k, why)| bad(&format!("distill.{k}"), why))?;
            if unlabeled_split.is_none() {
                return Err(bad(
                    "distill",
                    "the distillation stage reads data.unlabeled_split; set it".into(),
                ));
            }
            match &d.model {
                Some(ModelConfig::Mlp { hidden, .. }) if hidden.contains(&0) => {
                    return Err(bad(
                        "distill.model.hidden",
                        "widths must be positive".into(),
                    ))
                }
                Some(ModelConfig::ConvBase { channels: 0, .. }) => {
                    return Err(bad("distill.model.channels", "must be positive".into()))
                }
                _ => {}
            }
        }
        if self.method == PretrainMethod::None {
            return Ok(());
        }
        if unlabeled_split.is_none() {
            return Err(bad(
                "method",
                "contrastive pretraining reads data.unlabeled_split; set it".into(),
            ));
        }
        if self.epochs == 0 {
            return Err(bad("epochs", "must be at least 1".into()));
        }
        if self.batch_size < 2 {
            return Err(bad(
                "batch_size",
                "contrastive losses need at least 2 samples per global batch".into(),
            ));
        }
        if !(self.temperature > 0.0 && self.temperature.is_finite()) {
            return Err(bad("temperature", "must be a finite number > 0".into()));
        }
        if self.projection_hidden == 0 || self.projection_dim == 0 || self.cpc_context == 0 {
            return Err(bad(
                "projection_hidden",
                "projection_hidden, projection_dim and cpc_context must be at least 1".into(),
            ));
        }
        if self.cpc_horizons == 0 {
            return Err(bad("cpc_horizons", "must be at least 1".into()));
        }
        check_optim(&self.optim).map_err(|(k, why)| bad(&format!("optim.{k}"), why))?;
        if self.probe_epochs == 0 || !(self.probe_lr > 0.0 && self.probe_lr.is_finite()) {
            return Err(bad(
                "probe_epochs",
                "probe_epochs must be ≥ 1 and probe_lr a positive number".into(),
            ));
        }
        Ok(())
    }

    /// Checks that depend on the world size.
    pub fn validate_world(&self, world_size: u32) -> Result<()> {
        if self.method != PretrainMethod::None
            && !self.batch_size.is_multiple_of(world_size.max(1) as usize)
        {
            return Err(Error::invalid(
                "pretrain.batch_size",
                format!(
                    "global batch {} is not divisible by {world_size} workers: the unlabeled stream gives each worker batch_size / workers samples per step (short, uneven last batches of an epoch are supported)",
                    self.batch_size
                ),
            ));
        }
        Ok(())
    }

    /// CPC needs `cpc_horizons` < the encoder's output steps; `steps` is that number for the data.
    pub fn check_steps(&self, steps: usize) -> Result<()> {
        if self.method == PretrainMethod::Cpc && self.cpc_horizons >= steps {
            return Err(Error::invalid(
                "pretrain.cpc_horizons",
                format!(
                    "{} horizons but the encoder yields only {steps} latent steps for this input length",
                    self.cpc_horizons
                ),
            ));
        }
        Ok(())
    }
}

/// The optimizer checks shared by `[optim]` and `[pretrain.optim]`: `Err((key, why))`.
pub fn check_optim(o: &OptimConfig) -> std::result::Result<(), (&'static str, String)> {
    if !(o.lr > 0.0 && o.lr.is_finite()) {
        return Err(("lr", format!("{} must be a positive number", o.lr)));
    }
    if !(0.0..1.0).contains(&o.momentum) {
        return Err(("momentum", format!("{} is outside [0, 1)", o.momentum)));
    }
    if o.nesterov && (o.kind != OptimKind::Sgd || o.momentum == 0.0) {
        return Err(("nesterov", "needs kind = \"sgd\" and momentum > 0".into()));
    }
    if !(o.weight_decay >= 0.0 && o.weight_decay.is_finite()) {
        return Err(("weight_decay", "must be a finite number ≥ 0".into()));
    }
    if !(o.trust_coefficient > 0.0 && o.trust_coefficient.is_finite()) {
        return Err(("trust_coefficient", "must be a finite number > 0".into()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn distill(text: &str) -> DistillStageConfig {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn distill_steps_round_up_to_whole_labeled_epochs_and_defaults_hold() {
        let d = distill("steps = 6000");
        // 400 labels at batch 64: 7 steps an epoch; 6000 steps → 858 epochs (6006 steps).
        assert_eq!(d.epochs_for(7), 858);
        assert_eq!(distill("steps = 7").epochs_for(7), 1);
        assert_eq!(distill("epochs = 3").epochs_for(7), 3);
        assert_eq!(
            (
                d.temperature,
                d.alpha,
                d.unlabeled_weight,
                d.unlabeled_ratio
            ),
            (1.0, 0.5, 1.0, 7)
        );
        assert!(!d.augment && d.teacher_view == TeacherView::Same && d.model.is_none());
        assert!(toml::from_str::<DistillStageConfig>("steps = 1\nlambda = 2").is_err());
    }
}
