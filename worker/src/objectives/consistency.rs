//! Consistency training on the unlabeled stream: UDA (Xie et al. 2020) and FixMatch (Sohn et al. 2020).
//!
//! One forward pass over `[labeled; view 0; view 1]` (the reference implementations do the same, which
//! matters for models with batch statistics), split back into the three parts:
//!
//! - supervised: cross-entropy on the labeled batch; with UDA's Training Signal Annealing the examples
//!   the model already gets right with probability above η_t are masked out and the loss is
//!   `Σ mask·CE / max(Σ mask, 1)` over the global batch (a [`Counted`] part);
//! - unsupervised, per example: UDA's `KL(sharpen(p(y|view 0)) ‖ p(y|view 1))` or FixMatch's
//!   `CE(p(y|strong), argmax p(y|weak))`, both with a confidence mask and a constant target; averaged
//!   over the whole unlabeled batch ("batch", the reference code's choice) or over the unmasked
//!   examples ("masked"), times λ.
//!
//! View 0 is the clean sample for UDA and the weak view for FixMatch; view 1 the strong view (the worker
//! builds the views per sample in the loader threads).

use super::api::{non_empty, Counted, LossParts, Objective, StepCtx};
use crate::losses::{
    cross_entropy, cross_entropy_per_example, fixmatch_consistency, tsa_mask, uda_consistency,
};
use butler_common::semi::{SslConfig, SslMethod, TsaSchedule, UnsupNorm};
use tch::{Kind, Tensor};

pub struct Consistency {
    cfg: SslConfig,
    threshold: f64,
    label_smoothing: f64,
    classes: usize,
    total_steps: u64,
}

impl Consistency {
    pub fn new(cfg: &SslConfig, label_smoothing: f64, classes: usize, total_steps: u64) -> Self {
        Consistency {
            threshold: cfg.threshold(),
            cfg: cfg.clone(),
            label_smoothing,
            classes,
            total_steps,
        }
    }

    fn tsa(&self) -> bool {
        self.cfg.tsa != TsaSchedule::None
    }

    fn masked_norm(&self) -> bool {
        self.cfg.normalize == UnsupNorm::Masked
    }

    /// The per-example unsupervised loss and its mask.
    pub fn unsupervised(&self, view0: &Tensor, view1: &Tensor) -> (Tensor, Tensor) {
        match self.cfg.method {
            SslMethod::Uda => uda_consistency(view0, view1, self.cfg.temperature, self.threshold),
            SslMethod::Fixmatch => fixmatch_consistency(view0, view1, self.threshold),
        }
    }
}

impl Objective for Consistency {
    fn name(&self) -> &'static str {
        match self.cfg.method {
            SslMethod::Uda => "uda",
            SslMethod::Fixmatch => "fixmatch",
        }
    }

    fn counted_terms(&self) -> usize {
        self.tsa() as usize + self.masked_norm() as usize
    }

    fn loss(&mut self, ctx: StepCtx) -> LossParts {
        let nl = ctx.x.size()[0];
        let views = match ctx.unlabeled {
            [a, b] if non_empty(a) => Some((a, b)),
            _ => None,
        };
        let nu = views.map_or(0, |(a, _)| a.size()[0]);
        let mut inputs: Vec<&Tensor> = Vec::with_capacity(3);
        if nl > 0 {
            inputs.push(ctx.x);
        }
        if let Some((a, b)) = views {
            inputs.push(a);
            inputs.push(b);
        }
        let mut parts = LossParts::default();
        let logits =
            (!inputs.is_empty()).then(|| ctx.model.forward_t(&Tensor::cat(&inputs, 0), true));
        let split = |from: i64, len: i64| logits.as_ref().map(|l| l.narrow(0, from, len));

        if self.tsa() {
            let term = split(0, nl).filter(|_| nl > 0).map(|l| {
                let eta = self
                    .cfg
                    .tsa
                    .threshold(ctx.step, self.total_steps, self.classes);
                let mask = tsa_mask(&l, ctx.y, eta);
                let ce = cross_entropy_per_example(&l, ctx.y, self.label_smoothing);
                let count = mask.sum(Kind::Double).double_value(&[]);
                ((ce * &mask).sum(Kind::Float), count)
            });
            parts.counted.push(match term {
                Some((sum, count)) => Counted {
                    sum: Some(sum),
                    count,
                    labeled: true,
                },
                None => Counted {
                    sum: None,
                    count: 0.0,
                    labeled: true,
                },
            });
        } else if nl > 0 {
            let l = split(0, nl).expect("the labeled batch was forwarded");
            parts.labeled = Some(cross_entropy(&l, ctx.y, self.label_smoothing));
        }

        let unsup = views.map(|_| {
            let (v0, v1) = (
                split(nl, nu).expect("forwarded"),
                split(nl + nu, nu).expect("forwarded"),
            );
            let (loss, mask) = self.unsupervised(&v0, &v1);
            let count = mask.sum(Kind::Double).double_value(&[]);
            ((loss * mask) * self.cfg.lambda_u, count)
        });
        if self.masked_norm() {
            parts.counted.push(match unsup {
                Some((l, count)) => Counted {
                    sum: Some(l.sum(Kind::Float)),
                    count,
                    labeled: false,
                },
                None => Counted {
                    sum: None,
                    count: 0.0,
                    labeled: false,
                },
            });
        } else {
            parts.unlabeled = unsup.map(|(l, _)| l.mean(Kind::Float));
        }
        parts
    }
}
