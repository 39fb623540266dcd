//! Optimizers: SGD, Adam, AdamW and LARS, written on tensors (libtorch's C++ optimizers keep their
//! state out of reach, and a resumed job needs it) behind one type so trainers switch on the config.
//! Each follows PyTorch's update formula and is checked against `torch.optim` by
//! `worker/tests/optim_golden.rs`.

pub mod adam;
pub mod lars;
pub mod sgd;
pub mod state;

pub use adam::{Adam, AdamConfig};
pub use lars::{Lars, LarsConfig};
pub use sgd::{Sgd, SgdConfig};
pub use state::{OptimState, StateError};

use butler_common::config::{OptimConfig, OptimKind};
use tch::Tensor;

pub enum Optim {
    Sgd(Sgd),
    Adam(Adam),
    Lars(Lars),
}

impl Optim {
    /// The configured optimizer over `params` (the trainable variables, in the VarStore's order).
    pub fn build(o: &OptimConfig, params: Vec<Tensor>) -> Optim {
        let adam = |decoupled| AdamConfig {
            lr: o.lr,
            beta1: o.betas[0],
            beta2: o.betas[1],
            eps: o.eps,
            weight_decay: o.weight_decay,
            decoupled,
        };
        match o.kind {
            OptimKind::Sgd => Optim::Sgd(Sgd::new(
                params,
                SgdConfig {
                    lr: o.lr,
                    momentum: o.momentum,
                    weight_decay: o.weight_decay,
                    nesterov: o.nesterov,
                },
            )),
            OptimKind::Adam => Optim::Adam(Adam::new(params, adam(false))),
            OptimKind::Adamw => Optim::Adam(Adam::new(params, adam(true))),
            OptimKind::Lars => Optim::Lars(Lars::new(
                params,
                LarsConfig {
                    lr: o.lr,
                    momentum: o.momentum,
                    weight_decay: o.weight_decay,
                    trust_coefficient: o.trust_coefficient,
                },
            )),
        }
    }

    pub fn set_lr(&mut self, lr: f64) {
        match self {
            Optim::Sgd(o) => o.set_lr(lr),
            Optim::Adam(o) => o.set_lr(lr),
            Optim::Lars(o) => o.set_lr(lr),
        }
    }

    /// One update from the gradients the parameters hold (they are not zeroed).
    pub fn step(&mut self) {
        match self {
            Optim::Sgd(o) => o.step(),
            Optim::Adam(o) => o.step(),
            Optim::Lars(o) => o.step(),
        }
    }

    /// The state a resumed job needs (momentum, moments, step counts, velocities), on the host.
    pub fn state(&self) -> OptimState {
        match self {
            Optim::Sgd(o) => o.state(),
            Optim::Adam(o) => o.state(),
            Optim::Lars(o) => o.state(),
        }
    }

    pub fn load_state(&mut self, s: &OptimState) -> Result<(), StateError> {
        match self {
            Optim::Sgd(o) => o.load_state(s),
            Optim::Adam(o) => o.load_state(s),
            Optim::Lars(o) => o.load_state(s),
        }
    }
}
