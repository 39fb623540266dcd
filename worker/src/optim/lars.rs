//! LARS (You, Gitman & Ginsburg 2017) as SimCLR uses it for large-batch pretraining.
//!
//! For a weight `w` with gradient `g`: `u = g + λ·w`, `trust = η·‖w‖ / ‖u‖` (1 when either norm is 0),
//! `v ← m·v + trust·u`, `w ← w − lr·v`. Parameters with fewer than two dimensions — biases and
//! normalisation scales/shifts — are excluded from both the adaptation and the weight decay (`u = g`,
//! `trust = 1`), as in SimCLR. The trust ratio uses the norm of the decayed gradient (SimCLR's
//! implementation), not `‖g‖ + λ‖w‖` (the paper's formula).

use super::state::{OptimState, StateError};
use tch::Tensor;

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LarsConfig {
    pub lr: f64,
    pub momentum: f64,
    pub weight_decay: f64,
    /// η.
    pub trust_coefficient: f64,
}

pub struct Lars {
    params: Vec<Tensor>,
    velocity: Vec<Option<Tensor>>,
    cfg: LarsConfig,
}

impl Lars {
    /// `params` share storage with the model's variables (e.g. `VarStore::trainable_variables`).
    pub fn new(params: Vec<Tensor>, cfg: LarsConfig) -> Lars {
        let velocity = params.iter().map(|_| None).collect();
        Lars {
            params,
            velocity,
            cfg,
        }
    }

    pub fn set_lr(&mut self, lr: f64) {
        self.cfg.lr = lr;
    }

    /// True for parameters LARS leaves unadapted and undecayed (biases, normalisation parameters).
    pub fn is_excluded(p: &Tensor) -> bool {
        p.dim() < 2
    }

    /// One update; parameters without a gradient are skipped.
    pub fn step(&mut self) {
        let c = self.cfg;
        tch::no_grad(|| {
            for (p, v) in self.params.iter_mut().zip(self.velocity.iter_mut()) {
                let g = p.grad();
                if !g.defined() {
                    continue;
                }
                let update = if Self::is_excluded(p) {
                    g.copy()
                } else {
                    let u = &g + &*p * c.weight_decay;
                    let w_norm = p.norm().double_value(&[]);
                    let u_norm = u.norm().double_value(&[]);
                    let trust = if w_norm > 0.0 && u_norm > 0.0 {
                        c.trust_coefficient * w_norm / u_norm
                    } else {
                        1.0
                    };
                    u * trust
                };
                let vel = match v.take() {
                    Some(old) => old * c.momentum + update,
                    None => update,
                };
                let _ = p
                    .f_sub_(&(&vel * c.lr))
                    .expect("a parameter and its update share a shape");
                *v = Some(vel);
            }
        });
    }

    /// The velocity buffers, one slot per parameter (absent before its first update).
    pub fn state(&self) -> OptimState {
        let mut s = OptimState::default();
        for (i, v) in self.velocity.iter().enumerate() {
            if let Some(v) = v {
                s.put(i, "velocity", v);
            }
        }
        s
    }

    /// Restores [`Lars::state`]; shapes are checked against the parameters.
    pub fn load_state(&mut self, s: &OptimState) -> Result<(), StateError> {
        s.check_params(&self.params, &["velocity"])?;
        for (i, v) in self.velocity.iter_mut().enumerate() {
            *v = s.take(i, "velocity", &self.params[i]);
        }
        Ok(())
    }
}
