//! Objectives: one file per method, all behind the same trait, so the trainer's step stays
//! forward → loss → backward → all-reduce → update whatever the method.
//!
//! - `supervised.rs`: cross-entropy with label smoothing and the input regularizers (Cutout, Mixup,
//!   CutMix, Manifold Mixup);
//! - `kd.rs`: knowledge distillation from a frozen teacher, composing with the same input regularizers;
//! - `consistency.rs`: UDA and FixMatch on the unlabeled stream's weak/strong views;
//! - `pseudo.rs`: supervised loss plus a term on the pseudo-labeled samples of a refresh round.
//!
//! Randomness (which batch is mixed, λ, boxes, holes) comes from a `MixRng` seeded by
//! (job seed, step, rank): reproducible, and each rank mixes within its own batch.
//!
//! **Normalisation across ranks.** A loss part is either a mean over this rank's share of one stream
//! (`labeled`, `unlabeled`: the trainer weights it by local·W/global with the stream's known global
//! batch) or a [`Counted`] sum whose denominator is only known globally (a masked mean: TSA, UDA's and
//! FixMatch's "masked" normalisation, the pseudo-labeled samples of a step). For those the trainer
//! all-reduces the local counts once per step and divides by the global count, so data-parallel
//! training normalises exactly like one process holding the whole batch.

mod batch_aug;
pub mod consistency;
pub mod kd;
pub mod pseudo;
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
    /// This rank's unlabeled batch `[u, ...sample_shape]`, one tensor per view (weak/clean then strong
    /// for the consistency methods, the raw samples otherwise); empty when the job streams none.
    pub unlabeled: &'a [Tensor],
    /// This rank's pseudo-labeled samples of the step (refresh rounds after the first).
    pub pseudo: Option<&'a PseudoBatch>,
}

/// Pseudo-labeled samples with their targets.
pub struct PseudoBatch {
    pub x: Tensor,
    pub targets: PseudoTargets,
}

impl PseudoBatch {
    /// The same batch on `device`.
    pub fn to_device(&self, device: tch::Device) -> PseudoBatch {
        PseudoBatch {
            x: self.x.to_device(device),
            targets: match &self.targets {
                PseudoTargets::Hard(t) => PseudoTargets::Hard(t.to_device(device)),
                PseudoTargets::Soft(t) => PseudoTargets::Soft(t.to_device(device)),
            },
        }
    }
}

pub enum PseudoTargets {
    /// Hard labels `[n]` (int64).
    Hard(Tensor),
    /// Stored probability vectors `[n, K]` of the previous round's model.
    Soft(Tensor),
}

/// A loss normalised by a count known only across ranks: the contribution is `sum / max(Σ_ranks count, 1)`.
pub struct Counted {
    /// Sum of the per-example losses on this rank; `None` for an empty share.
    pub sum: Option<Tensor>,
    pub count: f64,
    /// Whether this is the labeled loss (reported as the step's training loss).
    pub labeled: bool,
}

/// A step's loss in parts, each averaged over its own batch; the trainer weights each part by this rank's
/// share of the global batch of that stream before backward.
#[derive(Default)]
pub struct LossParts {
    /// Absent when this rank's labeled share is empty.
    pub labeled: Option<Tensor>,
    /// Absent when the method uses no unlabeled data or this rank's unlabeled share is empty.
    pub unlabeled: Option<Tensor>,
    /// Exactly [`Objective::counted_terms`] entries, in a fixed order, on every rank.
    pub counted: Vec<Counted>,
}

pub trait Objective: Send {
    fn name(&self) -> &'static str;
    /// The loss parts for this rank's batches.
    fn loss(&mut self, ctx: StepCtx) -> LossParts;
    /// How many [`Counted`] parts every call returns (the same on every rank and every step).
    fn counted_terms(&self) -> usize {
        0
    }
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
    total_steps: u64,
    device: tch::Device,
) -> Result<Box<dyn Objective>> {
    let aug = BatchAug::new(&cfg.regularize, sample_shape, classes, model_mix_points)?;
    if let Some(s) = &cfg.ssl {
        return Ok(Box::new(consistency::Consistency::new(
            s,
            cfg.train.label_smoothing,
            classes,
            total_steps,
        )));
    }
    if let Some(p) = &cfg.pseudo_label {
        return Ok(Box::new(pseudo::PseudoLabel::new(
            supervised::Supervised::new(aug, cfg.train.label_smoothing),
            p,
        )));
    }
    Ok(match &cfg.regularize.distill {
        Some(d) => Box::new(kd::Distill::new(
            cfg,
            d,
            aug,
            sample_shape,
            classes,
            device,
        )?),
        None => Box::new(supervised::Supervised::new(aug, cfg.train.label_smoothing)),
    })
}
