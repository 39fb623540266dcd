//! [`GlobalRows`]: one step's embeddings of every rank, gathered as a leaf that collects the gradient of
//! this rank's loss, and the two ways of handing each row its candidate-role gradient (see the
//! `contrastive` module's front page).

use crate::collective::Collective;
use crate::Result;
use tch::{Kind, Tensor};

/// Whether the gathered candidates carry gradient back to the ranks that produced them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GatherGrad {
    /// The exact gradient of the global loss (what jobs always use).
    Exact,
    /// Other ranks' candidates treated as constants (this rank's own rows keep their gradient) — the
    /// common silent bug, an all-gather without gradient. Kept only to show, in tests, what it costs.
    Detached,
}

/// Every rank's rows of one step, gathered in rank order, as a leaf that collects the gradient of this
/// rank's loss.
pub struct GlobalRows {
    /// `[Σ counts, ...]`: rank 0's rows, then rank 1's, …; a leaf requiring grad.
    pub all: Tensor,
    /// Rows per rank.
    pub counts: Vec<i64>,
    pub rank: usize,
}

impl GlobalRows {
    /// Gathers `local` (`[n_r, ...]`; only its values are used) from every rank. Ranks may hold different
    /// numbers of rows (an epoch's short last batch), including none.
    pub fn gather(local: &Tensor, comm: &mut dyn Collective) -> Result<GlobalRows> {
        let world = comm.world_size();
        let size = local.size();
        let n = size[0];
        let local = local.detach().to_kind(Kind::Float).contiguous();
        let counts: Vec<i64> = if world == 1 {
            vec![n]
        } else {
            // Counts travel as f32: exact below 2^24 rows per rank.
            let c = comm.all_gather(&Tensor::from_slice(&[n as f32]))?;
            Vec::<f32>::try_from(&c)
                .expect("a 1-D f32 tensor converts to Vec<f32>")
                .into_iter()
                .map(|v| v.round() as i64)
                .collect()
        };
        let max = counts.iter().copied().max().unwrap_or(0);
        let gathered = if world == 1 {
            local
        } else {
            let padded = if n < max {
                let device = local.device();
                let mut pad_shape = size.clone();
                pad_shape[0] = max - n;
                Tensor::cat(
                    &[
                        local,
                        Tensor::zeros(pad_shape.as_slice(), (Kind::Float, device)),
                    ],
                    0,
                )
            } else {
                local
            };
            let all = comm.all_gather(&padded)?;
            if counts.iter().all(|&c| c == max) {
                all
            } else {
                let rows: Vec<i64> = counts
                    .iter()
                    .enumerate()
                    .flat_map(|(r, &c)| (0..c).map(move |j| r as i64 * max + j))
                    .collect();
                all.index_select(0, &Tensor::from_slice(&rows).to_device(all.device()))
            }
        };
        Ok(GlobalRows {
            all: gathered.detach().set_requires_grad(true),
            counts,
            rank: comm.rank(),
        })
    }

    /// Index of this rank's first row in `all`.
    pub fn offset(&self) -> i64 {
        self.counts[..self.rank].iter().sum()
    }

    pub fn local_len(&self) -> i64 {
        self.counts[self.rank]
    }

    pub fn total(&self) -> i64 {
        self.counts.iter().sum()
    }

    /// The whole gradient of the global loss with respect to `local`, for losses in which `local` enters
    /// only directly (as anchors; no parameters between `local` and `loss` — SimCLR's NT-Xent on the
    /// embeddings). One backward pass through the loss gives the anchor-role gradient and the gradient
    /// on the gathered matrix together; the latter is all-reduced and this rank's slice added. The caller
    /// backpropagates `(local · g).sum()` through the encoder once. `None` when this rank holds no rows.
    /// Every rank must call this, in the same step order: it all-reduces.
    pub fn local_gradient(
        &self,
        loss: Option<&Tensor>,
        local: &Tensor,
        mode: GatherGrad,
        comm: &mut dyn Collective,
    ) -> Result<Option<Tensor>> {
        let (anchor, mut grad) = match loss {
            Some(l) => {
                let mut g =
                    Tensor::run_backward(&[l], &[local, &self.all], false, false).into_iter();
                let anchor = g.next().expect("two inputs, two gradients");
                (
                    Some(anchor),
                    g.next().expect("two inputs, two gradients").contiguous(),
                )
            }
            None => (None, self.all.zeros_like()),
        };
        let mine = self.reduce_to_local(&mut grad, mode, comm)?;
        Ok(anchor.zip(mine).map(|(a, g)| a + g))
    }

    /// Sums `grad`, the gradient this rank's loss puts on the gathered matrix, over all ranks (unless
    /// `mode` is `Detached`) and returns this rank's rows of it, or `None` when it holds no rows.
    fn reduce_to_local(
        &self,
        grad: &mut Tensor,
        mode: GatherGrad,
        comm: &mut dyn Collective,
    ) -> Result<Option<Tensor>> {
        if comm.world_size() > 1 && mode == GatherGrad::Exact {
            comm.all_reduce_sum(grad)?;
        }
        let n = self.local_len();
        Ok((n > 0).then(|| grad.narrow(0, self.offset(), n)))
    }

    /// The candidate-role term for `local` (the live tensor whose detached values were gathered):
    /// all-reduces the gradient that `loss` (this rank's loss, computed from `self.all`; `None` for a rank
    /// without anchors) puts on the gathered matrix, and returns `(local · G_local).sum()`, or `None` when
    /// this rank holds no rows. Every rank must call this, in the same step order: it all-reduces (with
    /// `GatherGrad::Detached` it does not, and the rows keep only this rank's own candidate gradient).
    pub fn candidate_term(
        &self,
        loss: Option<&Tensor>,
        local: &Tensor,
        mode: GatherGrad,
        comm: &mut dyn Collective,
    ) -> Result<Option<Tensor>> {
        let mut grad = match loss {
            Some(l) => {
                // Restricted to the leaf: the encoder's graph is kept for the one full backward pass.
                let g = Tensor::run_backward(&[l], &[&self.all], true, false);
                g.into_iter()
                    .next()
                    .expect("one input, one gradient")
                    .contiguous()
            }
            None => self.all.zeros_like(),
        };
        let mine = self.reduce_to_local(&mut grad, mode, comm)?;
        Ok(mine.map(|g| (local * g.detach()).sum(Kind::Float)))
    }
}
