//! The `[model]` section: which network of the zoo, and the checks of its input shape against a
//! dataset's sample shape. A leaf module, so the sections that embed a model (`config`, `pretrain`)
//! import it without importing each other.

use crate::{Error, Result};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum ModelConfig {
    /// Flattens the sample, then Linear→ReLU per hidden width, then Linear to the classes.
    Mlp {
        hidden: Vec<usize>,
        /// Optional: the input size the model is built for; must match the data.
        #[serde(default)]
        input_dim: Option<usize>,
    },
    /// The MNIST-1D paper's ConvBase: conv1d 1→c k5 s2 p1, c→c k3 s2 p1, c→c k3 s2 p1, ReLU after each,
    /// then Linear(c·L', classes). For length 40 and c = 25 that is Linear(125, 10).
    ConvBase {
        #[serde(default = "default_channels")]
        channels: usize,
        /// Optional: the sequence length the model is built for; must match the data.
        #[serde(default)]
        input_length: Option<usize>,
    },
}

fn default_channels() -> usize {
    25
}

/// Output length of a conv1d layer.
pub fn conv1d_out_len(len: usize, kernel: usize, stride: usize, padding: usize) -> Option<usize> {
    (len + 2 * padding)
        .checked_sub(kernel)
        .map(|v| v / stride + 1)
}

impl ModelConfig {
    pub fn kind(&self) -> &'static str {
        match self {
            ModelConfig::Mlp { .. } => "mlp",
            ModelConfig::ConvBase { .. } => "conv_base",
        }
    }

    /// Checks that this model can consume samples of `sample_shape`; the error says what each side has.
    pub fn check_input(&self, sample_shape: &[usize]) -> Result<()> {
        let mismatch =
            |message: String| Error::invalid(format!("model {} vs data", self.kind()), message);
        match self {
            ModelConfig::Mlp { input_dim, .. } => {
                let numel: usize = sample_shape.iter().product();
                if let Some(d) = input_dim {
                    if *d != numel {
                        return Err(mismatch(format!(
                            "model.input_dim = {d} but the data's samples have shape {sample_shape:?} ({numel} values)"
                        )));
                    }
                }
            }
            ModelConfig::ConvBase { input_length, .. } => {
                let len = match sample_shape {
                    [l] | [1, l] => *l,
                    other => {
                        return Err(mismatch(format!(
                            "conv_base takes 1-D sequences ([length] or [1, length]) but the data's samples have shape {other:?}"
                        )))
                    }
                };
                if let Some(l) = input_length {
                    if *l != len {
                        return Err(mismatch(format!(
                            "model.input_length = {l} but the data's sequences have length {len}"
                        )));
                    }
                }
                let out = conv1d_out_len(len, 5, 2, 1)
                    .and_then(|l| conv1d_out_len(l, 3, 2, 1))
                    .and_then(|l| conv1d_out_len(l, 3, 2, 1));
                if out.is_none_or(|l| l == 0) {
                    return Err(mismatch(format!(
                        "sequence length {len} is too short for conv_base"
                    )));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_shape_checks() {
        let conv = ModelConfig::ConvBase {
            channels: 25,
            input_length: None,
        };
        assert!(conv.check_input(&[40]).is_ok());
        assert!(conv
            .check_input(&[1, 8, 8])
            .unwrap_err()
            .to_string()
            .contains("[1, 8, 8]"));
        let mlp = ModelConfig::Mlp {
            hidden: vec![8],
            input_dim: Some(64),
        };
        assert!(mlp.check_input(&[1, 8, 8]).is_ok());
        assert!(mlp
            .check_input(&[40])
            .unwrap_err()
            .to_string()
            .contains("input_dim = 64"));
    }
}
