//! Objectives: one file per method, all behind the same trait, so the trainer's step stays
//! forward → loss → backward → all-reduce → update whatever the method.
//!
//! - `supervised.rs`: cross-entropy with label smoothing and the input regularizers (Cutout, Mixup,
//!   CutMix, Manifold Mixup);
//! - `kd.rs`: knowledge distillation from a frozen teacher, composing with the same input regularizers.
//!
//! Randomness (which batch is mixed, λ, boxes, holes) comes from a `MixRng` seeded by
//! (job seed, step, rank): reproducible, and each rank mixes within its own batch.

mod batch_aug;
pub mod kd;
pub mod supervised;

pub use batch_aug::{BatchAug, Prepared, Spatial};

use crate::mixing::MixRng;
use crate::models::Model;
use crate::Result;
use butler_common::config::JobConfig;
use tch::Tensor;

/// Everything one step's loss may need.
pub struct StepCtx<'a> {
    pub model: &'a dyn Model,
    /// This rank's inputs `[b, ...sample_shape]`.
    pub x: &'a Tensor,
    /// This rank's labels `[b]`.
    pub y: &'a Tensor,
    pub rng: &'a mut MixRng,
    pub step: u64,
    /// This rank's unlabeled batch `[u, ...sample_shape]`, when the job streams unlabeled data.
    pub unlabeled: Option<&'a Tensor>,
}

/// A step's loss in parts, each averaged over its own batch; the trainer weights each part by this rank's
/// share of the global batch of that stream before backward.
pub struct LossParts {
    /// Absent when this rank's labeled share is empty.
    pub labeled: Option<Tensor>,
    /// Absent when the method uses no unlabeled data or this rank's unlabeled share is empty.
    pub unlabeled: Option<Tensor>,
}

pub trait Objective: Send {
    fn name(&self) -> &'static str;
    /// The loss parts for this rank's batches.
    fn loss(&mut self, ctx: StepCtx) -> LossParts;
}

/// True when `t` holds at least one sample.
pub(crate) fn non_empty(t: &Tensor) -> bool {
    t.size().first().is_some_and(|&n| n > 0)
}

/// Builds the objective the config asks for.
pub fn build(
    cfg: &JobConfig,
    sample_shape: &[usize],
    classes: usize,
    model_mix_points: usize,
) -> Result<Box<dyn Objective>> {
    let aug = BatchAug::new(&cfg.regularize, sample_shape, classes, model_mix_points)?;
    Ok(match &cfg.regularize.distill {
        Some(d) => Box::new(kd::Distill::new(cfg, d, aug, sample_shape, classes)?),
        None => Box::new(supervised::Supervised::new(aug, cfg.train.label_smoothing)),
    })
}
