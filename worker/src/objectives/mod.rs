//! Objectives: one file per method, all behind the same trait, so the trainer's step stays
//! forward → loss → backward → all-reduce → update whatever the method.
//!
//! - `supervised.rs`: cross-entropy with label smoothing and the input regularizers (Cutout, Mixup,
//!   CutMix, Manifold Mixup);
//! - `kd.rs`: knowledge distillation from a frozen teacher, composing with the same input regularizers;
//! - `consistency.rs`: UDA, FixMatch, FlexMatch, FreeMatch, SoftMatch, Π-model and Mean Teacher on the
//!   unlabeled stream's weak/strong views, with `usb.rs` holding the stateful pieces (distribution
//!   alignment, curriculum / self-adaptive thresholds, soft weights), whose statistics are reduced over
//!   the global batch through the step's collective and saved in resumable checkpoints;
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
//!
//! This module is the list and the factory ([`build`]); the interface lives in `api`, which the method
//! files import (never this module).

mod api;
mod batch_aug;
pub mod consistency;
pub mod kd;
pub mod pseudo;
pub mod supervised;
pub mod usb;

pub use api::{Counted, LossParts, Objective, PseudoBatch, PseudoTargets, StepCtx};
pub use batch_aug::{BatchAug, Prepared, Spatial};

use crate::Result;
use butler_common::config::JobConfig;

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
        s.check_ema(cfg.train.ema)
            .map_err(|(key, why)| butler_common::Error::invalid(key, why))?;
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
