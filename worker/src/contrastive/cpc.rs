//! Contrastive Predictive Coding (van den Oord et al. 2018) for sequences: the strided conv encoder maps
//! a sequence to `T` latent steps `z_t`, a GRU summarises `z_{≤t}` into a context `c_t`, and a linear map
//! `W_k` per horizon predicts `z_{t+k}` from `c_t` for `k = 1..K`. InfoNCE scores the prediction against
//! the latents at step `t+k` of **every** sample of the global batch (`f = ẑ·z`), the sample's own being
//! the positive, so each prediction has `N − 1` negatives from all workers. The loss is the mean over all
//! (sample, t, k) predictions of the global batch.

use crate::collective::Collective;
use crate::contrastive::encoder::ConvEncoder;
use crate::contrastive::global::{GatherGrad, GlobalRows};
use crate::Result;
use tch::nn::{self, Module, RNN};
use tch::{Kind, Reduction, Tensor};

/// Σ over this rank's predictions of the InfoNCE terms: `preds` `[n, L, c]` against `candidates`
/// `[N, L, c]` (the latents at the predicted steps), the positive of sample `i` being candidate
/// `offset + i` at the same step.
pub fn info_nce_sum(preds: &Tensor, candidates: &Tensor, offset: i64) -> Tensor {
    let (n, l) = (preds.size()[0], preds.size()[1]);
    let m = candidates.size()[0];
    // logits[t, i, j] = preds[i, t] · candidates[j, t]
    let logits = Tensor::einsum("itc,jtc->tij", &[preds, candidates], None::<i64>);
    let targets =
        Tensor::arange_start(offset, offset + n, (Kind::Int64, preds.device())).repeat([l]);
    logits.reshape([l * n, m]).cross_entropy_loss::<Tensor>(
        &targets,
        None,
        Reduction::Sum,
        -100,
        0.0,
    )
}

/// Number of (t, k) predictions per sample with `steps` latents and horizons `1..=k`.
pub fn predictions_per_sample(steps: i64, k: i64) -> i64 {
    (1..=k).map(|h| (steps - h).max(0)).sum()
}

/// Σ of InfoNCE over horizons: `preds[h-1]` `[n, T-h, c]` predicts `candidates[:, h:]` (`[N, T, c]`).
pub fn cpc_sum(preds: &[Tensor], candidates: &Tensor, offset: i64) -> Tensor {
    let t = candidates.size()[1];
    preds
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let h = i as i64 + 1;
            info_nce_sum(p, &candidates.narrow(1, h, t - h), offset)
        })
        .reduce(|a, b| a + b)
        .expect("at least one horizon")
}

/// The autoregressive context and the per-horizon predictors.
pub struct CpcHead {
    gru: nn::GRU,
    predictors: Vec<nn::Linear>,
}

impl CpcHead {
    pub fn new(p: &nn::Path, latent: i64, context: i64, horizons: i64) -> Self {
        let gru = nn::gru(p / "gru", latent, context, Default::default());
        let predictors = (1..=horizons)
            .map(|h| {
                nn::linear(
                    p / format!("w{h}"),
                    context,
                    latent,
                    nn::LinearConfig {
                        bias: false,
                        ..Default::default()
                    },
                )
            })
            .collect();
        CpcHead { gru, predictors }
    }

    pub fn horizons(&self) -> i64 {
        self.predictors.len() as i64
    }

    /// Latents `[b, T, c]` of the inputs.
    pub fn latents(encoder: &ConvEncoder, xs: &Tensor) -> Tensor {
        encoder.feature_maps(xs).transpose(1, 2)
    }

    /// Predictions `[b, T-h, c]` for each horizon `h = 1..=K` from the contexts of latents `[b, T, c]`.
    pub fn predictions(&self, z: &Tensor) -> Vec<Tensor> {
        let t = z.size()[1];
        let (ctx, _) = self.gru.seq(z);
        self.predictors
            .iter()
            .enumerate()
            .map(|(i, w)| w.forward(&ctx.narrow(1, 0, t - (i as i64 + 1))))
            .collect()
    }
}

/// This rank's part of the global CPC loss for one backward pass: `(loss, value)` as in
/// `ntxent::global_nt_xent` (scaled by `W / (global predictions)`, plus the candidate-role term of the
/// gathered latents; `value` is the global mean, the same on every rank).
pub fn global_cpc(
    head: &CpcHead,
    z: &Tensor,
    grad: GatherGrad,
    comm: &mut dyn Collective,
) -> Result<(Option<Tensor>, f64)> {
    let n = z.size()[0];
    let steps = z.size()[1];
    let rows = GlobalRows::gather(z, comm)?;
    let world = comm.world_size() as f64;
    let per_sample = predictions_per_sample(steps, head.horizons());
    let denominator = (rows.total() * per_sample).max(1) as f64;
    let anchor = (n > 0)
        .then(|| cpc_sum(&head.predictions(z), &rows.all, rows.offset()) * (world / denominator));
    let candidate = rows.candidate_term(anchor.as_ref(), z, grad, comm)?;
    let mut value =
        Tensor::from_slice(&[anchor.as_ref().map_or(0.0, |l| l.double_value(&[]) / world) as f32]);
    if comm.world_size() > 1 {
        comm.all_reduce_sum(&mut value)?;
    }
    let value = value.double_value(&[0]);
    Ok((
        match (anchor, candidate) {
            (Some(a), Some(c)) => Some(a + c),
            (a, c) => a.or(c),
        },
        value,
    ))
}
