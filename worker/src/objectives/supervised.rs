//! Supervised cross-entropy with torch's label smoothing, after the batch regularizers. With no
//! regularizer active it is exactly `F.cross_entropy(logits, y, label_smoothing=ε)`.

use super::api::{non_empty, LossParts, Objective, StepCtx};
use super::batch_aug::BatchAug;
use crate::losses::{cross_entropy, soft_cross_entropy};
use crate::Result;

pub struct Supervised {
    aug: BatchAug,
    label_smoothing: f64,
}

impl Supervised {
    pub fn new(aug: BatchAug, label_smoothing: f64) -> Self {
        Supervised {
            aug,
            label_smoothing,
        }
    }
}

impl Objective for Supervised {
    fn name(&self) -> &'static str {
        "supervised"
    }

    fn loss(&mut self, ctx: StepCtx) -> Result<LossParts> {
        if !non_empty(ctx.x) {
            return Ok(LossParts::default());
        }
        let prepared = self.aug.apply(ctx.x, ctx.y, ctx.rng);
        let logits = prepared.forward(ctx.model);
        let loss = match &prepared.soft_targets {
            Some(q) => soft_cross_entropy(&logits, q, self.label_smoothing),
            None => cross_entropy(&logits, ctx.y, self.label_smoothing),
        };
        Ok(LossParts {
            labeled: Some(loss),
            ..Default::default()
        })
    }
}
