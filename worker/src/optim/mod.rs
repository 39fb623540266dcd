//! Optimizers: libtorch's SGD / Adam / AdamW through tch, and LARS (tch has none), behind one type so
//! trainers switch on the config.

pub mod lars;

pub use lars::{Lars, LarsConfig};

use crate::Result;
use butler_common::config::{OptimConfig, OptimKind};
use tch::nn::{self, OptimizerConfig};

pub enum Optim {
    Torch(nn::Optimizer),
    Lars(Lars),
}

impl Optim {
    /// The configured optimizer over the trainable variables of `vs`.
    pub fn build(o: &OptimConfig, vs: &nn::VarStore) -> Result<Optim> {
        Ok(match o.kind {
            OptimKind::Sgd => Optim::Torch(
                nn::Sgd {
                    momentum: o.momentum,
                    dampening: 0.0,
                    wd: o.weight_decay,
                    nesterov: o.nesterov,
                }
                .build(vs, o.lr)?,
            ),
            OptimKind::Adam => Optim::Torch(
                nn::Adam {
                    beta1: o.betas[0],
                    beta2: o.betas[1],
                    wd: o.weight_decay,
                    eps: o.eps,
                    amsgrad: false,
                }
                .build(vs, o.lr)?,
            ),
            OptimKind::Adamw => Optim::Torch(
                nn::AdamW {
                    beta1: o.betas[0],
                    beta2: o.betas[1],
                    wd: o.weight_decay,
                    eps: o.eps,
                    amsgrad: false,
                }
                .build(vs, o.lr)?,
            ),
            OptimKind::Lars => Optim::Lars(Lars::new(
                vs.trainable_variables(),
                LarsConfig {
                    lr: o.lr,
                    momentum: o.momentum,
                    weight_decay: o.weight_decay,
                    trust_coefficient: o.trust_coefficient,
                },
            )),
        })
    }

    pub fn set_lr(&mut self, lr: f64) {
        match self {
            Optim::Torch(o) => o.set_lr(lr),
            Optim::Lars(o) => o.set_lr(lr),
        }
    }

    /// One update from the gradients the parameters hold (they are not zeroed).
    pub fn step(&mut self) {
        match self {
            Optim::Torch(o) => o.step(),
            Optim::Lars(o) => o.step(),
        }
    }
}
