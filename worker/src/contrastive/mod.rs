//! Contrastive pretraining over the **global** batch with exact gradients.
//!
//! The field's recurring failure is negatives kept per worker, or gathered without gradient: then the
//! gradient a sample receives for being some other worker's negative is lost and W workers train a
//! different model than one worker with the same global batch. Here every rank gathers all ranks'
//! embeddings, computes the loss of *its own* anchors against the whole gathered matrix, and hands every
//! row back the gradient of its role as a candidate in every rank's loss:
//!
//! 1. forward this rank's samples → live embeddings `z` (requires grad);
//! 2. [`GlobalRows::gather`]: all-gather `z.detach()` (rows may differ per rank: counts are gathered
//!    first, rows padded to the largest count and the padding dropped) into a leaf `Z` requiring grad;
//! 3. loss of this rank's anchors: anchors are the live `z`, candidates the leaf `Z`;
//! 4. [`GlobalRows::candidate_term`]: `∂loss/∂Z` (autograd restricted to the leaf), all-reduced (sum over
//!    ranks), this rank's slice `G` taken, and `(z · G).sum()` returned; backpropagating
//!    `loss + (z · G).sum()` once through the encoder gives each parameter the anchor-role gradient of
//!    this rank plus the candidate-role gradient from every rank. (CPC uses this form: its loss has
//!    parameters — the GRU and predictors — between `z` and the loss. SimCLR, whose loss reads the
//!    embeddings directly, uses [`GlobalRows::local_gradient`], which differentiates the similarity
//!    matrix once instead of twice.)
//!
//! With each rank's loss scaled by `W / (global anchors)`, the gradients the ranks hold sum to `W` times
//! the gradient of the global mean loss, which the data-parallel average (÷W) turns into exactly the
//! single-process gradient (`worker/tests/contrastive.rs` checks 1, 2 and 3 ranks to 1e-5).

pub mod cpc;
pub mod encoder;
mod global;
pub mod ntxent;
pub mod pretrain;

pub use global::{GatherGrad, GlobalRows};
