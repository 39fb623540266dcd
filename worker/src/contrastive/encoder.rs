//! The encoder contrastive methods pretrain, and SimCLR's projection head.
//!
//! The encoder is MNIST-1D's ConvBase without its classifier: three strided conv1d + ReLU blocks with the
//! same variable names and shapes (`conv1`, `conv2`, `conv3`), so a pretrained encoder loads into a
//! ConvBase for fine-tuning (`copy_encoder_into`).

use tch::nn::{self, Module};
use tch::Tensor;

pub struct ConvEncoder {
    convs: [nn::Conv1D; 3],
    channels: i64,
    steps: i64,
}

impl ConvEncoder {
    /// `length` must be long enough for three stride-2 convolutions (ModelConfig::check_input).
    pub fn new(p: &nn::Path, length: usize, channels: usize) -> Self {
        let c = channels as i64;
        let cfg = |padding| nn::ConvConfig {
            stride: 2,
            padding,
            ..Default::default()
        };
        let steps = butler_common::config::conv1d_out_len(length, 5, 2, 1)
            .and_then(|l| butler_common::config::conv1d_out_len(l, 3, 2, 1))
            .and_then(|l| butler_common::config::conv1d_out_len(l, 3, 2, 1))
            .expect("the config check rejects inputs too short for the conv encoder");
        ConvEncoder {
            convs: [
                nn::conv1d(p / "conv1", 1, c, 5, cfg(1)),
                nn::conv1d(p / "conv2", c, c, 3, cfg(1)),
                nn::conv1d(p / "conv3", c, c, 3, cfg(1)),
            ],
            channels: c,
            steps: steps as i64,
        }
    }

    /// `[b, channels, steps]` feature maps of `[b, length]` (or `[b, 1, length]`) inputs.
    pub fn feature_maps(&self, xs: &Tensor) -> Tensor {
        let len = *xs.size().last().expect("inputs have a length dimension");
        let mut h = xs.reshape([-1, 1, len]);
        for conv in &self.convs {
            h = conv.forward(&h).relu();
        }
        h
    }

    /// Flattened features `[b, channels · steps]` (what ConvBase's classifier reads).
    pub fn features(&self, xs: &Tensor) -> Tensor {
        self.feature_maps(xs).flatten(1, -1)
    }

    pub fn channels(&self) -> i64 {
        self.channels
    }

    /// Output time steps for the configured input length.
    pub fn steps(&self) -> i64 {
        self.steps
    }

    pub fn feature_dim(&self) -> i64 {
        self.channels * self.steps
    }
}

/// SimCLR's projection MLP: linear → ReLU → linear, followed by L2 normalisation in `embed`.
pub struct Projection {
    l1: nn::Linear,
    l2: nn::Linear,
}

impl Projection {
    pub fn new(p: &nn::Path, input: i64, hidden: i64, out: i64) -> Self {
        Projection {
            l1: nn::linear(p / "fc1", input, hidden, Default::default()),
            l2: nn::linear(p / "fc2", hidden, out, Default::default()),
        }
    }

    /// L2-normalised projections `[b, out]`.
    pub fn embed(&self, features: &Tensor) -> Tensor {
        l2_normalize(&self.l2.forward(&self.l1.forward(features).relu()))
    }
}

/// Rows scaled to unit L2 norm (`F.normalize(x, dim=1)`, eps 1e-12).
pub fn l2_normalize(x: &Tensor) -> Tensor {
    let norm = x
        .norm_scalaropt_dim(2, [1i64].as_slice(), true)
        .clamp_min(1e-12);
    x / norm
}

/// Copies the encoder variables (`encoder.conv*` in `from`) onto the same-named ConvBase variables
/// (`conv*` in `to`); returns how many tensors were copied. Errors name a missing or mis-shaped variable.
pub fn copy_encoder_into(from: &nn::VarStore, to: &nn::VarStore) -> Result<usize, String> {
    let src = from.variables();
    let mut dst = to.variables();
    let mut copied = 0;
    for name in [
        "conv1.weight",
        "conv1.bias",
        "conv2.weight",
        "conv2.bias",
        "conv3.weight",
        "conv3.bias",
    ] {
        let s = src
            .get(&format!("encoder.{name}"))
            .ok_or_else(|| format!("the pretrained store has no encoder.{name}"))?;
        let d = dst.get_mut(name).ok_or_else(|| {
            format!("the fine-tuning model has no {name} (model.kind must be conv_base)")
        })?;
        if s.size() != d.size() {
            return Err(format!(
                "{name}: pretrained shape {:?} but the fine-tuning model has {:?} (same model.channels?)",
                s.size(),
                d.size()
            ));
        }
        tch::no_grad(|| d.copy_(s));
        copied += 1;
    }
    Ok(copied)
}
