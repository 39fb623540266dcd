//! SGD with momentum, as `torch.optim.SGD` computes it (single-tensor path, `dampening = 0`):
//! `g ← g + λ·w`; `b ← g` on the first step, else `b ← m·b + g`; `g ← g + m·b` (Nesterov) or `g ← b`;
//! `w ← w − lr·g`. Written here rather than taken from libtorch because libtorch's C++ optimizers expose
//! no state, and a resumed job needs the momentum buffers.

use super::state::{OptimState, StateError};
use tch::Tensor;

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SgdConfig {
    pub lr: f64,
    pub momentum: f64,
    pub weight_decay: f64,
    pub nesterov: bool,
}

pub struct Sgd {
    params: Vec<Tensor>,
    /// Momentum buffers; `None` before a parameter's first update (torch's lazy initialisation).
    momentum: Vec<Option<Tensor>>,
    cfg: SgdConfig,
}

impl Sgd {
    /// `params` share storage with the model's variables (e.g. `VarStore::trainable_variables`).
    pub fn new(params: Vec<Tensor>, cfg: SgdConfig) -> Sgd {
        let momentum = params.iter().map(|_| None).collect();
        Sgd {
            params,
            momentum,
            cfg,
        }
    }

    pub fn set_lr(&mut self, lr: f64) {
        self.cfg.lr = lr;
    }

    /// One update; parameters without a gradient are skipped.
    pub fn step(&mut self) {
        let c = self.cfg;
        tch::no_grad(|| {
            for (p, buf) in self.params.iter_mut().zip(self.momentum.iter_mut()) {
                let g = p.grad();
                if !g.defined() {
                    continue;
                }
                let mut d = if c.weight_decay != 0.0 {
                    &g + &*p * c.weight_decay
                } else {
                    g.copy()
                };
                if c.momentum != 0.0 {
                    let b = match buf.take() {
                        Some(mut b) => {
                            let _ = b.g_mul_scalar_(c.momentum);
                            let _ = b.g_add_(&d);
                            b
                        }
                        None => d.copy(),
                    };
                    d = if c.nesterov {
                        &d + &b * c.momentum
                    } else {
                        b.copy()
                    };
                    *buf = Some(b);
                }
                let _ = p.g_sub_(&(d * c.lr));
            }
        });
    }

    /// The momentum buffers, one slot per parameter (absent before its first update).
    pub fn state(&self) -> OptimState {
        let mut s = OptimState::default();
        for (i, b) in self.momentum.iter().enumerate() {
            if let Some(b) = b {
                s.put(i, "momentum", b);
            }
        }
        s
    }

    /// Restores [`Sgd::state`]; shapes are checked against the parameters.
    pub fn load_state(&mut self, s: &OptimState) -> Result<(), StateError> {
        s.check_params(&self.params, &["momentum"])?;
        for (i, buf) in self.momentum.iter_mut().enumerate() {
            *buf = s.take(i, "momentum", &self.params[i]);
        }
        Ok(())
    }
}
