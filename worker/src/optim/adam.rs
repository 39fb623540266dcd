//! Adam (Kingma & Ba 2015) and AdamW (Loshchilov & Hutter 2019) as `torch.optim.Adam`/`AdamW` compute
//! them (single-tensor path, no AMSGrad): with `t` the parameter's step count,
//! `g ← g + λ·w` (Adam's L2) or `w ← w·(1 − lr·λ)` (AdamW's decoupled decay); `m ← m + (1 − β1)(g − m)`;
//! `v ← β2·v + (1 − β2)·g²`; `w ← w − (lr / (1 − β1^t)) · m / (√v / √(1 − β2^t) + ε)`.
//! Written here because libtorch's C++ optimizers expose no state, and a resumed job needs the moments.

use super::state::{OptimState, StateError};
use tch::Tensor;

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// AdamW: decay the weights directly instead of adding λ·w to the gradient.
    pub decoupled: bool,
}

struct Moments {
    step: u64,
    m: Tensor,
    v: Tensor,
}

pub struct Adam {
    params: Vec<Tensor>,
    /// Per parameter; `None` before its first update (torch's lazy initialisation).
    moments: Vec<Option<Moments>>,
    cfg: AdamConfig,
}

impl Adam {
    /// `params` share storage with the model's variables (e.g. `VarStore::trainable_variables`).
    pub fn new(params: Vec<Tensor>, cfg: AdamConfig) -> Adam {
        let moments = params.iter().map(|_| None).collect();
        Adam {
            params,
            moments,
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
            for (p, slot) in self.params.iter_mut().zip(self.moments.iter_mut()) {
                let g = p.grad();
                if !g.defined() {
                    continue;
                }
                let st = slot.get_or_insert_with(|| Moments {
                    step: 0,
                    m: p.zeros_like(),
                    v: p.zeros_like(),
                });
                st.step += 1;
                let g = if c.weight_decay != 0.0 && !c.decoupled {
                    &g + &*p * c.weight_decay
                } else {
                    g
                };
                if c.weight_decay != 0.0 && c.decoupled {
                    let _ = p.g_mul_scalar_(1.0 - c.lr * c.weight_decay);
                }
                let _ = st.m.lerp_(&g, 1.0 - c.beta1);
                let _ = st.v.g_mul_scalar_(c.beta2);
                // addcmul computes v + (value·g)·g; pre-scaling g by value keeps that order.
                let _ = st.v.addcmul_(&(&g * (1.0 - c.beta2)), &g);
                let t = st.step as i32;
                let bias1 = 1.0 - c.beta1.powi(t);
                let bias2_sqrt = (1.0 - c.beta2.powi(t)).sqrt();
                let step_size = c.lr / bias1;
                let mut denom = st.v.sqrt() / bias2_sqrt;
                let _ = denom.g_add_scalar_(c.eps);
                let _ = p.addcdiv_(&(&st.m * -step_size), &denom);
            }
        });
    }

    /// Per parameter: `step` (its update count), `exp_avg` (m) and `exp_avg_sq` (v), torch's names.
    pub fn state(&self) -> OptimState {
        let mut s = OptimState::default();
        for (i, st) in self.moments.iter().enumerate() {
            if let Some(st) = st {
                s.put(i, "step", &Tensor::from_slice(&[st.step as i64]));
                s.put(i, "exp_avg", &st.m);
                s.put(i, "exp_avg_sq", &st.v);
            }
        }
        s
    }

    /// Restores [`Adam::state`]; shapes are checked against the parameters.
    pub fn load_state(&mut self, s: &OptimState) -> Result<(), StateError> {
        s.check_params(&self.params, &["exp_avg", "exp_avg_sq"])?;
        for (i, slot) in self.moments.iter_mut().enumerate() {
            let p = &self.params[i];
            *slot = match (
                s.scalar(i, "step"),
                s.take(i, "exp_avg", p),
                s.take(i, "exp_avg_sq", p),
            ) {
                (Some(step), Some(m), Some(v)) => Some(Moments {
                    step: step as u64,
                    m,
                    v,
                }),
                (None, None, None) => None,
                _ => {
                    return Err(StateError(format!(
                        "parameter {i} has only part of its Adam state (step, exp_avg, exp_avg_sq)"
                    )))
                }
            };
        }
        Ok(())
    }
}
