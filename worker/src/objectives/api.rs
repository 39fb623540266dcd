//! The objective interface: what a step's loss receives ([`StepCtx`]) and returns ([`LossParts`],
//! [`Counted`] masked means), and the [`Objective`] trait every method implements.
//!
//! **Collectives inside a loss.** Methods whose statistics the reference implementations compute on
//! the whole (single-process) batch — FreeMatch's and SoftMatch's confidence EMAs, distribution
//! alignment's mean prediction, FlexMatch's per-sample learning status — reduce them over every rank
//! through [`StepCtx::comm`] while they compute the loss, so W workers hold the state one process
//! holding the global batch would. Every rank must make the same calls in the same order, whatever its
//! share: an empty share contributes zeros and still calls.
//!
//! **State.** Such statistics are part of the training state: [`Objective::state`] lists them as named
//! host tensors for a resumable checkpoint and [`Objective::load_state`] restores them.

use crate::collective::Collective;
use crate::mixing::MixRng;
use crate::models::Model;
use crate::Result;
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
    /// The stable sample ids of `unlabeled`'s rows (empty when the caller does not know them).
    pub unlabeled_ids: &'a [u64],
    /// How many samples the unlabeled split holds (FlexMatch's N); 0 when unknown.
    pub unlabeled_pool: u64,
    /// This rank's pseudo-labeled samples of the step (refresh rounds after the first).
    pub pseudo: Option<&'a PseudoBatch>,
    /// The step's collective, for statistics of the global batch (see the module documentation).
    pub comm: &'a mut dyn Collective,
    /// The EMA of the weights as a teacher (`[train] ema`): its logits on a batch, in training mode,
    /// without gradient. It swaps the averages into the parameters in place, so it must be called before
    /// the student's forward pass of the step (after it, autograd's saved tensors would be overwritten).
    pub teacher: Option<&'a dyn Fn(&Tensor) -> Tensor>,
}

/// Pseudo-labeled samples with their targets.
pub struct PseudoBatch {
    pub x: Tensor,
    pub targets: PseudoTargets,
}

impl PseudoBatch {
    /// The same batch on `device` (the path host batches take to the step, see `to_step_device`).
    pub fn to_device(&self, device: tch::Device) -> PseudoBatch {
        use crate::device::to_step_device;
        PseudoBatch {
            x: to_step_device(&self.x, device),
            targets: match &self.targets {
                PseudoTargets::Hard(t) => PseudoTargets::Hard(to_step_device(t, device)),
                PseudoTargets::Soft(t) => PseudoTargets::Soft(to_step_device(t, device)),
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
    /// The loss parts for this rank's batches; fails only when a collective does, or when the step lacks
    /// something the method needs (sample ids).
    fn loss(&mut self, ctx: StepCtx) -> Result<LossParts>;
    /// How many [`Counted`] parts every call returns (the same on every rank and every step).
    fn counted_terms(&self) -> usize {
        0
    }
    /// The method's signals after the last step, on this rank (host values, read only when metrics are
    /// due): e.g. `ssl/mask_ratio`, the fraction of unlabeled samples above the threshold, and the
    /// per-class thresholds of the curriculum methods. The trainer averages them over the ranks.
    fn signals(&self) -> Vec<(String, f64)> {
        Vec::new()
    }
    /// The method's own training state (running statistics, per-sample records) as named host tensors,
    /// identical on every rank; empty for stateless methods.
    fn state(&self) -> Vec<(String, Tensor)> {
        Vec::new()
    }
    /// Restores [`Objective::state`]; every name must belong to the method.
    fn load_state(&mut self, state: Vec<(String, Tensor)>) -> std::result::Result<(), String> {
        match state.first() {
            None => Ok(()),
            Some((name, _)) => Err(format!(
                "objective state {name:?} does not belong to {}",
                self.name()
            )),
        }
    }
}

/// True when `t` holds at least one sample.
pub(crate) fn non_empty(t: &Tensor) -> bool {
    t.size().first().is_some_and(|&n| n > 0)
}
