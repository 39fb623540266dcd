//! The [`Collective`] interface (PyTorch `torch.distributed` semantics) and its world-of-one
//! implementation.

use super::error::Result;
use tch::Tensor;

/// Process-group operations over tensors (PyTorch `torch.distributed` semantics, sum reduction).
/// Implementations must never hang: a dead or silent peer is an error naming its rank.
pub trait Collective: Send {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// In-place sum across ranks.
    fn all_reduce_sum(&mut self, t: &mut Tensor) -> Result<()>;
    /// Concatenation of every rank's `t` along dimension 0 (all ranks pass the same shape).
    fn all_gather(&mut self, t: &Tensor) -> Result<Tensor>;
    /// Root's `t` overwrites everyone's.
    fn broadcast(&mut self, t: &mut Tensor, root: usize) -> Result<()>;
    fn barrier(&mut self) -> Result<()>;
}

/// The collective of a world of one: every operation is the identity (a single-process run, tests, the
/// self-checks).
pub struct SingleProcess;

impl Collective for SingleProcess {
    fn rank(&self) -> usize {
        0
    }

    fn world_size(&self) -> usize {
        1
    }

    fn all_reduce_sum(&mut self, _t: &mut Tensor) -> Result<()> {
        Ok(())
    }

    fn all_gather(&mut self, t: &Tensor) -> Result<Tensor> {
        Ok(if t.dim() == 0 {
            t.reshape([1])
        } else {
            t.copy()
        })
    }

    fn broadcast(&mut self, _t: &mut Tensor, _root: usize) -> Result<()> {
        Ok(())
    }

    fn barrier(&mut self) -> Result<()> {
        Ok(())
    }
}
