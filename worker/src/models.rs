//! The model zoo. Each model is a plain struct over a `VarStore` path with an explicit forward, so
//! methods can reach inside: Manifold Mixup mixes the hidden state at one of the model's *mix points*
//! (point 0 is the input, point k the output of the k-th block).

use butler_common::config::{conv1d_out_len, ModelConfig};
use tch::nn::{self, Module};
use tch::Tensor;

/// A transformation applied to the hidden state at a mix point (e.g. mixing it with its reversed batch).
pub type HiddenFn<'a> = &'a dyn Fn(&Tensor) -> Tensor;

/// What training needs from a model.
pub trait Model: Send {
    /// Logits `[batch, classes]` for inputs `[batch, ...sample_shape]`.
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        self.forward_mix(xs, train, None)
    }

    /// Forward pass that applies `f` to the hidden state at mix point `k` (0 = the input,
    /// `1..=mix_points()` after each block).
    fn forward_mix(&self, xs: &Tensor, train: bool, at: Option<(usize, HiddenFn)>) -> Tensor;

    /// The largest mix point (the number of blocks before the classifier).
    fn mix_points(&self) -> usize;
}

fn maybe_mix(h: Tensor, point: usize, at: Option<(usize, HiddenFn)>) -> Tensor {
    match at {
        Some((k, f)) if k == point => f(&h),
        _ => h,
    }
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
    fn forward_mix(&self, xs: &Tensor, _train: bool, at: Option<(usize, HiddenFn)>) -> Tensor {
        let mut h = maybe_mix(xs.flatten(1, -1), 0, at);
        let last = self.layers.len() - 1;
        for (i, l) in self.layers.iter().enumerate() {
            h = l.forward(&h);
            if i < last {
                h = maybe_mix(h.relu(), i + 1, at);
            }
        }
        h
    }

    fn mix_points(&self) -> usize {
        self.layers.len() - 1
    }
}

/// MNIST-1D's ConvBase (Greydanus 2020): three strided conv1d layers with ReLU, then one linear layer.
pub struct ConvBase {
    convs: [nn::Conv1D; 3],
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
            convs: [
                nn::conv1d(p / "conv1", 1, c, 5, cfg(1)),
                nn::conv1d(p / "conv2", c, c, 3, cfg(1)),
                nn::conv1d(p / "conv3", c, c, 3, cfg(1)),
            ],
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
    fn forward_mix(&self, xs: &Tensor, _train: bool, at: Option<(usize, HiddenFn)>) -> Tensor {
        let len = *xs.size().last().expect("inputs have a length dimension");
        let mut h = maybe_mix(xs.reshape([-1, 1, len]), 0, at);
        for (i, conv) in self.convs.iter().enumerate() {
            h = maybe_mix(conv.forward(&h).relu(), i + 1, at);
        }
        self.linear.forward(&h.flatten(1, -1))
    }

    fn mix_points(&self) -> usize {
        self.convs.len()
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
        assert_eq!(m.mix_points(), 2);
    }

    /// Mixing at point k equals mixing, by hand, the hidden state that the first k blocks compute.
    #[test]
    fn manifold_mix_at_each_point_equals_mixing_the_hidden_state_by_hand() {
        tch::manual_seed(0);
        let vs = nn::VarStore::new(Device::Cpu);
        let m = ConvBase::new(&vs.root(), 40, 6, 10);
        let x = Tensor::randn([5, 40], (Kind::Float, Device::Cpu));
        let lam = 0.3;
        let mix = |h: &Tensor| h * lam + h.flip([0]) * (1.0 - lam);
        for k in 0..=m.mix_points() {
            let got = m.forward_mix(&x, true, Some((k, &mix)));
            // By hand: run the blocks up to k, mix, run the rest.
            let mut h = x.reshape([-1, 1, 40]);
            if k == 0 {
                h = mix(&h);
            }
            for (i, conv) in m.convs.iter().enumerate() {
                h = conv.forward(&h).relu();
                if i + 1 == k {
                    h = mix(&h);
                }
            }
            let want = m.linear.forward(&h.flatten(1, -1));
            let diff = (&got - &want).abs().max().double_value(&[]);
            assert!(diff < 1e-6, "mix point {k}: differs by {diff}");
            let unmixed = m.forward_t(&x, true);
            assert!(
                (&got - &unmixed).abs().max().double_value(&[]) > 1e-4,
                "mix point {k} changed nothing"
            );
        }
    }
}
