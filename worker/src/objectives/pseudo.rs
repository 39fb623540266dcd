//! A TRAIN phase of pseudo-label refresh rounds: the supervised objective on the labeled batch, plus
//! λ times the mean loss over the step's pseudo-labeled samples across all ranks — cross-entropy with
//! the hard labels, or with `soft` the distillation loss T²·KL(softmax(log p / T) ‖ softmax(z / T))
//! against the stored probability vectors p (the previous round's model as a teacher). Round 0 has
//! no pseudo-labeled samples; the term is then empty on every rank.

use super::api::{non_empty, Counted, LossParts, Objective, PseudoTargets, StepCtx};
use super::supervised::Supervised;
use crate::losses::{cross_entropy_per_example, soft_pseudo_label_loss};
use crate::Result;
use butler_common::semi::PseudoLabelConfig;
use tch::Kind;

pub struct PseudoLabel {
    supervised: Supervised,
    weight: f64,
    temperature: f64,
}

impl PseudoLabel {
    pub fn new(supervised: Supervised, cfg: &PseudoLabelConfig) -> Self {
        PseudoLabel {
            supervised,
            weight: cfg.weight,
            temperature: cfg.temperature,
        }
    }
}

impl Objective for PseudoLabel {
    fn name(&self) -> &'static str {
        "pseudo-label"
    }

    fn counted_terms(&self) -> usize {
        1
    }

    fn loss(&mut self, ctx: StepCtx) -> Result<LossParts> {
        let pseudo = ctx.pseudo.filter(|p| non_empty(&p.x));
        let model = ctx.model;
        let mut parts = self.supervised.loss(StepCtx {
            pseudo: None,
            unlabeled: &[],
            unlabeled_ids: &[],
            ..ctx
        })?;
        let term = match pseudo {
            None => Counted {
                sum: None,
                count: 0.0,
                labeled: false,
            },
            Some(p) => {
                let logits = model.forward_t(&p.x, true);
                let per_example = match &p.targets {
                    PseudoTargets::Hard(y) => cross_entropy_per_example(&logits, y, 0.0),
                    PseudoTargets::Soft(probs) => {
                        soft_pseudo_label_loss(&logits, probs, self.temperature)
                    }
                };
                Counted {
                    sum: Some(per_example.sum(Kind::Float) * self.weight),
                    count: p.x.size()[0] as f64,
                    labeled: false,
                }
            }
        };
        parts.counted.push(term);
        Ok(parts)
    }
}
