//! NT-Xent (SimCLR's normalised temperature-scaled cross-entropy, Chen et al. 2020) over a global batch.
//!
//! With `2N` L2-normalised embeddings (two views of `N` samples) and temperature τ, anchor `i` with
//! positive `p(i)` contributes `ℓ_i = −s_{i,p(i)} + log Σ_{j≠i} exp(s_{ij})`, `s_{ij} = z_i·z_j / τ`, so
//! every anchor sees its positive and `2N − 2` negatives; the loss is the mean over the `2N` anchors.

use crate::collective::Collective;
use crate::contrastive::global::{GatherGrad, GlobalRows};
use crate::Result;
use tch::{Kind, Reduction, Tensor};

/// Σ over `anchors` (`[k, d]`, row `a` being row `self_offset + a` of `candidates`) of the NT-Xent terms
/// against `candidates` (`[M, d]`), the positive of anchor `a` being candidate `positives[a]`.
pub fn nt_xent_sum(
    anchors: &Tensor,
    candidates: &Tensor,
    self_offset: i64,
    positives: &Tensor,
    tau: f64,
) -> Tensor {
    let k = anchors.size()[0];
    let mut logits = anchors.matmul(&candidates.tr()) / tau;
    // Each anchor's similarity with itself is excluded: −∞ written in place (no [k, M] mask, no copy —
    // at a global batch of 4096 the logits are 4096 × 8192 per rank).
    let rows = Tensor::arange(k, (Kind::Int64, anchors.device()));
    let own = &rows + self_offset;
    let _ = logits.index_put_(
        &[Some(rows), Some(own)],
        &Tensor::from(f64::NEG_INFINITY).to_kind(logits.kind()),
        false,
    );
    let positives = positives.to_device(logits.device());
    logits.cross_entropy_loss::<Tensor>(&positives, None, Reduction::Sum, -100, 0.0)
}

/// Positives of one rank's anchors laid out as `[view 1 of its n samples; view 2 of them]`, starting at
/// row `offset` of the global matrix.
pub fn two_view_positives(offset: i64, n: i64) -> Tensor {
    let idx: Vec<i64> = (0..2 * n).map(|a| offset + (a + n) % (2 * n)).collect();
    Tensor::from_slice(&idx)
}

/// Single-process NT-Xent: the mean over the `2N` anchors of `z1, z2` (`[N, d]` each, already normalised).
pub fn nt_xent(z1: &Tensor, z2: &Tensor, tau: f64) -> Tensor {
    let n = z1.size()[0];
    let z = Tensor::cat(&[z1, z2], 0);
    nt_xent_sum(&z, &z, 0, &two_view_positives(0, n), tau) / (2 * n) as f64
}

/// This rank's part of the global NT-Xent, ready for one backward pass: `(loss, value)` where `loss` is
/// the surrogate `(z · g).sum()` whose gradient `g` is that of `W · Σ_{local anchors} ℓ / 2N` plus the
/// candidate-role gradient from every rank (see the module docs of `contrastive`), and `value` the
/// global mean loss (all-reduced, the same on every rank). `z1, z2` are this rank's live,
/// normalised embeddings of the two views (`[n_r, d]`, possibly `n_r = 0`).
pub fn global_nt_xent(
    z1: &Tensor,
    z2: &Tensor,
    tau: f64,
    grad: GatherGrad,
    comm: &mut dyn Collective,
) -> Result<(Option<Tensor>, f64)> {
    let n = z1.size()[0];
    let local = Tensor::cat(&[z1, z2], 0);
    let rows = GlobalRows::gather(&local, comm)?;
    let total = rows.total();
    let world = comm.world_size() as f64;
    let anchor = (n > 0).then(|| {
        nt_xent_sum(
            &local,
            &rows.all,
            rows.offset(),
            &two_view_positives(rows.offset(), n),
            tau,
        ) * (world / total.max(1) as f64)
    });
    let value = anchor.as_ref().map_or(0.0, |l| l.double_value(&[]) / world);
    let surrogate = rows
        .local_gradient(anchor.as_ref(), &local, grad, comm)?
        .map(|g| (&local * g).sum(Kind::Float));
    let mut value = Tensor::from_slice(&[value as f32]);
    if comm.world_size() > 1 {
        comm.all_reduce_sum(&mut value)?;
    }
    let value = value.double_value(&[0]);
    Ok((surrogate, value))
}
