//! Supervised cross-entropy with torch's label smoothing, after the batch regularizers. With no
//! regularizer active it is exactly `F.cross_entropy(logits, y, label_smoothing=ε)`.

use super::{BatchAug, Objective, StepCtx};
use crate::losses::{cross_entropy, soft_cross_entropy};
use tch::Tensor;

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

    fn loss(&mut self, ctx: StepCtx) -> Tensor {
        let prepared = self.aug.apply(ctx.x, ctx.y, ctx.rng);
        let logits = prepared.forward(ctx.model);
        match &prepared.soft_targets {
            Some(q) => soft_cross_entropy(&logits, q, self.label_smoothing),
            None => cross_entropy(&logits, ctx.y, self.label_smoothing),
        }
    }
}
