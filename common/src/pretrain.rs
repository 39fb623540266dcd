//! The `[pretrain]` section: contrastive pretraining on the unlabeled split, then a linear probe on the
//! frozen encoder, then fine-tuning on the labeled subset (`data.labels_per_class`) with the job's
//! `[optim]`, `[schedule]` and `[train]`. `method = "none"` skips the first two stages: the same
//! fine-tuning recipe from a random encoder, i.e. the supervised baseline.

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
