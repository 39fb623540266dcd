//! The `[optim]` and `[schedule]` sections: the optimizer and its hyper-parameters, and the learning-rate
//! schedule. A leaf module, so the sections that embed them (`config`, `pretrain`) import it without
//! importing each other.

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OptimKind {
    Sgd,
    Adam,
    Adamw,
    /// Layer-wise adaptive rate scaling (large-batch contrastive pretraining); uses `momentum`,
    /// `weight_decay` and `trust_coefficient`.
    Lars,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimConfig {
    pub kind: OptimKind,
    /// Peak learning rate (after warmup).
    pub lr: f64,
    #[serde(default)]
    pub momentum: f64,
    #[serde(default)]
    pub nesterov: bool,
    #[serde(default)]
    pub weight_decay: f64,
    #[serde(default = "default_betas")]
    pub betas: [f64; 2],
    #[serde(default = "default_eps")]
    pub eps: f64,
    /// LARS's η (only with `kind = "lars"`).
    #[serde(default = "default_trust_coefficient")]
    pub trust_coefficient: f64,
}

fn default_trust_coefficient() -> f64 {
    0.001
}

fn default_betas() -> [f64; 2] {
    [0.9, 0.999]
}
fn default_eps() -> f64 {
    1e-8
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScheduleKind {
    #[default]
    Constant,
    Cosine,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleConfig {
    #[serde(default)]
    pub kind: ScheduleKind,
    /// Linear warmup from 0 to `optim.lr` over this many optimizer steps.
    #[serde(default)]
    pub warmup_steps: u64,
    /// Floor of the cosine decay, as a fraction of `optim.lr`.
    #[serde(default)]
    pub min_lr_ratio: f64,
}

impl ScheduleConfig {
    /// Learning rate at optimizer step `step` (0-based) of `total` steps.
    pub fn lr_at(&self, base: f64, step: u64, total: u64) -> f64 {
        if step < self.warmup_steps {
            return base * (step + 1) as f64 / self.warmup_steps as f64;
        }
        match self.kind {
            ScheduleKind::Constant => base,
            ScheduleKind::Cosine => {
                let span = total.saturating_sub(self.warmup_steps).max(1) as f64;
                let t = ((step - self.warmup_steps) as f64 / span).min(1.0);
                let floor = base * self.min_lr_ratio;
                floor + (base - floor) * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules() {
        let s = ScheduleConfig {
            kind: ScheduleKind::Cosine,
            warmup_steps: 10,
            min_lr_ratio: 0.0,
        };
        assert!((s.lr_at(1.0, 0, 110) - 0.1).abs() < 1e-12);
        assert!((s.lr_at(1.0, 9, 110) - 1.0).abs() < 1e-12);
        assert!((s.lr_at(1.0, 10, 110) - 1.0).abs() < 1e-12);
        assert!((s.lr_at(1.0, 60, 110) - 0.5).abs() < 1e-12);
        assert!(s.lr_at(1.0, 109, 110) < 0.001);
    }
}
