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

/// A collective that reports every operation it enters (before it may block) to `on_enter`: the worker
/// counts them into its heartbeat's progress, so when a job stalls the coordinator can tell the ranks
/// blocked inside the latest collective from those that never entered it. It also times each operation
/// into `clock` (the step's communication share, the `comm` phase, the collective sequence number).
pub struct Observed {
    inner: Box<dyn Collective>,
    on_enter: Box<dyn Fn() + Send>,
    clock: std::sync::Arc<crate::timing::StepClock>,
}

impl Observed {
    pub fn new(
        inner: Box<dyn Collective>,
        on_enter: Box<dyn Fn() + Send>,
        clock: std::sync::Arc<crate::timing::StepClock>,
    ) -> Observed {
        Observed {
            inner,
            on_enter,
            clock,
        }
    }

    fn timed<T>(&mut self, op: impl FnOnce(&mut dyn Collective) -> T) -> T {
        (self.on_enter)();
        let before = self.clock.collective_entered();
        let t0 = std::time::Instant::now();
        let out = op(self.inner.as_mut());
        self.clock.collective_left(t0.elapsed(), before);
        out
    }
}

impl Collective for Observed {
    fn rank(&self) -> usize {
        self.inner.rank()
    }

    fn world_size(&self) -> usize {
        self.inner.world_size()
    }

    fn all_reduce_sum(&mut self, t: &mut Tensor) -> Result<()> {
        self.timed(|c| c.all_reduce_sum(t))
    }

    fn all_gather(&mut self, t: &Tensor) -> Result<Tensor> {
        self.timed(|c| c.all_gather(t))
    }

    fn broadcast(&mut self, t: &mut Tensor, root: usize) -> Result<()> {
        self.timed(|c| c.broadcast(t, root))
    }

    fn barrier(&mut self) -> Result<()> {
        self.timed(|c| c.barrier())
    }
}
