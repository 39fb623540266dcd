//! The model zoo. Each model is a plain struct over a `VarStore` path with an explicit forward, so later
//! methods (Manifold Mixup, feature taps for contrastive heads) can reach its layers.

use butler_common::config::{conv1d_out_len, ModelConfig};
use tch::nn::{self, Module};
use tch::Tensor;

/// What training needs from a model.
pub trait Model: Send {
    /// Logits `[batch, classes]` for inputs `[batch, ...sample_shape]`.
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor;
}

pub struct Mlp {
    layers: Vec<nn::Linear>,
}

impl Mlp {
    pub fn new(p: &nn::Path, input_dim: usize, hidden: &[usize], classes: usize) -> Self {
        let mut dims = vec![input_dim];
        dims.extend_from_slice(hidden);
        dims.push(classes);
        let layers = dims
            .windows(2)
            .enumerate()
            .map(|(i, w)| {
                nn::linear(
                    p / format!("fc{i}"),
                    w[0] as i64,
                    w[1] as i64,
                    Default::default(),
                )
            })
            .collect();
        Mlp { layers }
    }
}

impl Model for Mlp {
    fn forward_t(&self, xs: &Tensor, _train: bool) -> Tensor {
        let mut h = xs.flatten(1, -1);
        let last = self.layers.len() - 1;
        for (i, l) in self.layers.iter().enumerate() {
            h = l.forward(&h);
            if i < last {
                h = h.relu();
            }
        }
        h
    }
}

/// MNIST-1D's ConvBase (Greydanus 2020): three strided conv1d layers with ReLU, then one linear layer.
pub struct ConvBase {
    conv1: nn::Conv1D,
    conv2: nn::Conv1D,
    conv3: nn::Conv1D,
    linear: nn::Linear,
}

impl ConvBase {
    pub fn new(p: &nn::Path, length: usize, channels: usize, classes: usize) -> Self {
        let c = channels as i64;
        let cfg = |padding| nn::ConvConfig {
            stride: 2,
            padding,
            ..Default::default()
        };
        let out = conv1d_out_len(length, 5, 2, 1)
            .and_then(|l| conv1d_out_len(l, 3, 2, 1))
            .and_then(|l| conv1d_out_len(l, 3, 2, 1))
            .expect("ModelConfig::check_input rejected lengths too short for conv_base");
        ConvBase {
            conv1: nn::conv1d(p / "conv1", 1, c, 5, cfg(1)),
            conv2: nn::conv1d(p / "conv2", c, c, 3, cfg(1)),
            conv3: nn::conv1d(p / "conv3", c, c, 3, cfg(1)),
            linear: nn::linear(
                p / "linear",
                c * out as i64,
                classes as i64,
                Default::default(),
            ),
        }
    }
}

impl Model for ConvBase {
    fn forward_t(&self, xs: &Tensor, _train: bool) -> Tensor {
        let len = *xs.size().last().expect("inputs have a length dimension");
        let h = xs.reshape([-1, 1, len]);
        let h = self.conv1.forward(&h).relu();
        let h = self.conv2.forward(&h).relu();
        let h = self.conv3.forward(&h).relu();
        self.linear.forward(&h.flatten(1, -1))
    }
}

/// Builds the configured model under `p`. The config must already have passed `check_input`.
pub fn build(
    p: &nn::Path,
    cfg: &ModelConfig,
    sample_shape: &[usize],
    classes: usize,
) -> Box<dyn Model> {
    match cfg {
        ModelConfig::Mlp { hidden, .. } => {
            Box::new(Mlp::new(p, sample_shape.iter().product(), hidden, classes))
        }
        ModelConfig::ConvBase { channels, .. } => {
            let length = *sample_shape.last().expect("checked: 1-D samples");
            Box::new(ConvBase::new(p, length, *channels, classes))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    #[test]
    fn conv_base_has_the_papers_shapes() {
        let vs = nn::VarStore::new(Device::Cpu);
        let m = ConvBase::new(&vs.root(), 40, 25, 10);
        let out = m.forward_t(&Tensor::zeros([3, 40], (Kind::Float, Device::Cpu)), false);
        assert_eq!(out.size(), vec![3, 10]);
        let linear_in = vs.variables()["linear.weight"].size()[1];
        assert_eq!(linear_in, 125);
        let params: i64 = vs
            .trainable_variables()
            .iter()
            .map(|t| t.numel() as i64)
            .sum();
        // conv1 25·5+25, conv2/conv3 25·25·3+25 each, linear 125·10+10.
        assert_eq!(params, 150 + 2 * 1900 + 1260);
    }

    #[test]
    fn mlp_flattens() {
        let vs = nn::VarStore::new(Device::Cpu);
        let m = Mlp::new(&vs.root(), 64, &[32, 16], 10);
        let out = m.forward_t(
            &Tensor::zeros([2, 1, 8, 8], (Kind::Float, Device::Cpu)),
            true,
        );
        assert_eq!(out.size(), vec![2, 10]);
    }
}
