//! Consistency training on the unlabeled stream: UDA (Xie et al. 2020), FixMatch (Sohn et al. 2020),
//! FlexMatch, FreeMatch, SoftMatch, the Π-model and Mean Teacher (their stateful parts in `usb.rs`).
//!
//! One forward pass over `[labeled; view 0; view 1]` (the reference implementations do the same, which
//! matters for models with batch statistics), split back into the three parts:
//!
//! - supervised: cross-entropy on the labeled batch; with UDA's Training Signal Annealing the examples
//!   the model already gets right with probability above η_t are masked out and the loss is
//!   `Σ mask·CE / max(Σ mask, 1)` over the global batch (a [`Counted`] part);
//! - unsupervised, per example: UDA's `KL(sharpen(p(y|view 0)) ‖ p(y|view 1))`, or the cross-entropy of
//!   view 1 with the hard pseudo-label `argmax p(y|view 0)` (FixMatch, FlexMatch, FreeMatch, SoftMatch),
//!   times a confidence mask — a fixed threshold, FlexMatch's class-wise curriculum thresholds,
//!   FreeMatch's self-adaptive ones — or SoftMatch's soft weight; the target optionally
//!   distribution-aligned first. The Π-model and Mean Teacher take `(1/K)·‖softmax(view 1) −
//!   softmax(target on view 0)‖²` without mask, the target from the model itself (Π) or from the EMA
//!   teacher (Mean Teacher, whose forward runs before the student's and is therefore not part of the
//!   concatenated pass). Averaged over the whole unlabeled batch ("batch", the reference code's choice)
//!   or over the unmasked examples ("masked", for soft weights their sum), times λ and the ramp-up.
//!
//! View 0 is the clean sample for UDA and the weak view otherwise; view 1 the strong view (the worker
//! builds the views per sample in the loader threads).

use super::api::{non_empty, Counted, LossParts, Objective, StepCtx};
use super::usb::{self, DistAlign, FlexMatch, FreeMatch, Selection, SoftMatch};
use crate::collective::Collective;
use crate::losses::{
    cross_entropy, cross_entropy_per_example, fixmatch_consistency, tsa_mask, uda_consistency,
};
use crate::{Error, Result};
use butler_common::semi::{SslConfig, SslMethod, TsaSchedule, UnsupNorm};
use tch::{Kind, Tensor};

pub struct Consistency {
    cfg: SslConfig,
    threshold: f64,
    label_smoothing: f64,
    classes: usize,
    total_steps: u64,
    align: Option<DistAlign>,
    selection: Selection,
    /// The last step's mask (or weights) on this rank's unlabeled samples, and the pool size it saw:
    /// read only when metrics are due ([`Objective::signals`]).
    last_mask: Option<Tensor>,
    last_pool: u64,
}

impl Consistency {
    pub fn new(cfg: &SslConfig, label_smoothing: f64, classes: usize, total_steps: u64) -> Self {
        let threshold = cfg.threshold();
        let selection = match cfg.method {
            SslMethod::Flexmatch => Selection::Flex(FlexMatch::new(classes, threshold)),
            SslMethod::Freematch => Selection::Free(FreeMatch::new(classes, cfg.adaptive_momentum)),
            SslMethod::Softmatch => Selection::Soft(SoftMatch::new(classes, cfg.adaptive_momentum)),
            _ => Selection::Fixed,
        };
        Consistency {
            threshold,
            cfg: cfg.clone(),
            label_smoothing,
            classes,
            total_steps,
            align: cfg
                .distribution_alignment
                .then(|| DistAlign::new(classes, cfg.da_momentum)),
            selection,
            last_mask: None,
            last_pool: 0,
        }
    }

    /// The stateful selection (FlexMatch, FreeMatch, SoftMatch) for inspection.
    pub fn selection(&self) -> &Selection {
        &self.selection
    }

    /// Distribution alignment's state, when it is on.
    pub fn alignment(&self) -> Option<&DistAlign> {
        self.align.as_ref()
    }

    fn tsa(&self) -> bool {
        self.cfg.tsa != TsaSchedule::None
    }

    fn masked_norm(&self) -> bool {
        self.cfg.normalize == UnsupNorm::Masked
    }

    /// The per-example unsupervised loss and its mask (or weight), `[n]` each, from the target logits on
    /// view 0 (the model's own, or the EMA teacher's) and the student's logits on view 1, updating the
    /// method's state with the global batch. `ids` are the samples' stable ids (FlexMatch), `pool` the
    /// size of the unlabeled split. Every rank calls it every step, with `n = 0` for an empty share.
    pub fn unsupervised(
        &mut self,
        target: &Tensor,
        student: &Tensor,
        ids: &[u64],
        pool: u64,
        comm: &mut dyn Collective,
    ) -> Result<(Tensor, Tensor)> {
        let method = self.cfg.method;
        if !method.pseudo_labels() {
            let loss = usb::softmax_mse(student, target);
            let mask = loss.ones_like();
            return Ok((loss, mask));
        }
        let Some(align) = &mut self.align else {
            // Without alignment UDA and FixMatch keep their original (golden-tested) functions.
            match method {
                SslMethod::Uda => {
                    return Ok(uda_consistency(
                        target,
                        student,
                        self.cfg.temperature,
                        self.threshold,
                    ))
                }
                SslMethod::Fixmatch => {
                    return Ok(fixmatch_consistency(target, student, self.threshold))
                }
                _ => return self.select(&usb::target_probs(target), student, ids, pool, comm),
            }
        };
        let probs = align.align(&usb::target_probs(target), comm)?;
        self.select(&probs, student, ids, pool, comm)
    }

    /// The loss and mask for target probabilities `probs` (already aligned when asked).
    fn select(
        &mut self,
        probs: &Tensor,
        student: &Tensor,
        ids: &[u64],
        pool: u64,
        comm: &mut dyn Collective,
    ) -> Result<(Tensor, Tensor)> {
        let kind = student.kind();
        if self.cfg.method == SslMethod::Uda {
            let confidence = probs.amax(-1, false);
            let loss = usb::sharpened_kl(probs, student, self.cfg.temperature);
            return Ok((loss, confidence.gt(self.threshold).to_kind(kind)));
        }
        let mask = match &mut self.selection {
            Selection::Fixed => probs.amax(-1, false).ge(self.threshold),
            Selection::Flex(f) => f.mask(probs, ids, pool, comm)?,
            Selection::Free(f) => f.mask(probs, comm)?,
            Selection::Soft(s) => s.weights(probs, comm)?,
        };
        Ok((usb::hard_label_loss(probs, student), mask.to_kind(kind)))
    }
}

impl Objective for Consistency {
    fn name(&self) -> &'static str {
        self.cfg.method.name()
    }

    fn state(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        if let Some(a) = &self.align {
            a.state(&mut out);
        }
        self.selection.state(&mut out);
        out
    }

    fn load_state(&mut self, mut state: Vec<(String, Tensor)>) -> std::result::Result<(), String> {
        if let Some(a) = &mut self.align {
            a.load_state(&mut state)?;
        }
        self.selection.load_state(&mut state)?;
        match state.first() {
            None => Ok(()),
            Some((name, _)) => Err(format!(
                "objective state {name:?} does not belong to {} with these options",
                self.name()
            )),
        }
    }

    fn counted_terms(&self) -> usize {
        self.tsa() as usize + self.masked_norm() as usize
    }

    fn signals(&self) -> Vec<(String, f64)> {
        let mut out = Vec::new();
        // The same names on every rank (the trainer all-reduces them): an empty share reports 0.
        let ratio = match self.last_mask.as_ref().filter(|m| m.numel() > 0) {
            Some(m) => m.mean(Kind::Double).double_value(&[]),
            None => 0.0,
        };
        out.push(("ssl/mask_ratio".to_string(), ratio));
        let thresholds = match &self.selection {
            Selection::Flex(f) => f.class_thresholds(self.last_pool),
            Selection::Free(f) => f.class_thresholds(),
            _ => Vec::new(),
        };
        for (c, t) in thresholds.into_iter().enumerate() {
            out.push((format!("ssl/threshold/class_{c}"), t as f64));
        }
        out
    }

    fn loss(&mut self, ctx: StepCtx) -> Result<LossParts> {
        let nl = ctx.x.size()[0];
        let views = match ctx.unlabeled {
            [a, b] if non_empty(a) => Some((a, b)),
            _ => None,
        };
        let nu = views.map_or(0, |(a, _)| a.size()[0]);
        let mean_teacher = self.cfg.method == SslMethod::MeanTeacher;
        // The teacher swaps the averaged weights into the parameters in place: it must run before the
        // student's forward pass saves them for backward.
        let teacher_logits = match views {
            Some((a, _)) if mean_teacher => {
                let teacher = ctx.teacher.ok_or_else(|| {
                    Error::Setup("mean_teacher: no EMA teacher ([train] ema) in this step".into())
                })?;
                Some(teacher(a))
            }
            _ => None,
        };
        let mut inputs: Vec<&Tensor> = Vec::with_capacity(3);
        if nl > 0 {
            inputs.push(ctx.x);
        }
        if let Some((a, b)) = views {
            if !mean_teacher {
                inputs.push(a);
            }
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

        // Stateful methods reduce statistics over every rank: an empty share takes part with no rows.
        let (target, student, ids) = match views {
            Some(_) => {
                let student_at = if mean_teacher { nl } else { nl + nu };
                (
                    teacher_logits.unwrap_or_else(|| split(nl, nu).expect("forwarded")),
                    split(student_at, nu).expect("forwarded"),
                    ctx.unlabeled_ids,
                )
            }
            None => {
                let empty = Tensor::zeros([0, self.classes as i64], (Kind::Float, ctx.x.device()));
                (empty.shallow_clone(), empty, &[][..])
            }
        };
        let (loss, mask) =
            self.unsupervised(&target, &student, ids, ctx.unlabeled_pool, ctx.comm)?;
        let weight = self.cfg.unsupervised_weight(ctx.step);
        self.last_mask = views.map(|_| mask.detach());
        self.last_pool = ctx.unlabeled_pool;
        let unsup = views.map(|_| {
            let count = mask.sum(Kind::Double).double_value(&[]);
            ((loss * mask) * weight, count)
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
        Ok(parts)
    }
}
