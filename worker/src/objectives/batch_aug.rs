//! The batch-level input regularizers shared by every labeled objective: Cutout, then at most one
//! mixing method per batch (Mixup or CutMix on the input, or Manifold Mixup at a hidden layer). The
//! result says how the model must be run and what the targets are.

use crate::losses::one_hot;
use crate::mixing::{self, MixRng};
use crate::models::Model;
use crate::{Error, Result};
use butler_common::config::{CutoutConfig, ManifoldMixupConfig, MixConfig, RegularizeConfig};
use tch::Tensor;

/// The spatial layout of one sample, which decides whether regions are spans or boxes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Spatial {
    /// `[L]` or `[C, L]` samples.
    OneD { len: i64 },
    /// `[C, H, W]` samples.
    TwoD { h: i64, w: i64 },
}

impl Spatial {
    pub fn of(sample_shape: &[usize]) -> Result<Spatial> {
        match sample_shape {
            [l] | [_, l] => Ok(Spatial::OneD { len: *l as i64 }),
            [_, h, w] => Ok(Spatial::TwoD {
                h: *h as i64,
                w: *w as i64,
            }),
            other => Err(Error::Setup(format!(
                "regularizers support samples [L], [C, L] or [C, H, W], not {other:?}"
            ))),
        }
    }
}

pub struct BatchAug {
    mix: Option<MixConfig>,
    manifold: Option<ManifoldMixupConfig>,
    cutout: Option<CutoutConfig>,
    spatial: Option<Spatial>,
    classes: i64,
}

/// A batch after the input regularizers.
pub struct Prepared {
    pub x: Tensor,
    /// Soft targets `[b, K]` when the batch was mixed, else `None` (use the hard labels).
    pub soft_targets: Option<Tensor>,
    /// Manifold Mixup: mix the hidden state at this point with this λ.
    pub manifold: Option<(usize, f64)>,
}

impl Prepared {
    /// Runs the model as the preparation requires (mixing hidden states for Manifold Mixup).
    pub fn forward(&self, model: &dyn Model) -> Tensor {
        match self.manifold {
            Some((k, lam)) => {
                let f = move |h: &Tensor| h * lam + h.flip([0]) * (1.0 - lam);
                model.forward_mix(&self.x, true, Some((k, &f)))
            }
            None => model.forward_t(&self.x, true),
        }
    }
}

impl BatchAug {
    pub fn new(
        r: &RegularizeConfig,
        sample_shape: &[usize],
        classes: usize,
        mix_points: usize,
    ) -> Result<BatchAug> {
        let needs_regions =
            r.cutout.is_some() || r.mix.as_ref().is_some_and(|m| m.cutmix_alpha > 0.0);
        let spatial = if needs_regions {
            Some(Spatial::of(sample_shape)?)
        } else {
            None
        };
        if let Some(m) = &r.manifold_mixup {
            if let Some(bad) = m.layers.iter().find(|&&k| k > mix_points) {
                return Err(Error::Setup(format!(
                    "regularize.manifold_mixup.layers: mix point {bad} does not exist; this model has points 0..={mix_points} (0 = input)"
                )));
            }
        }
        Ok(BatchAug {
            mix: r.mix.clone(),
            manifold: r.manifold_mixup.clone(),
            cutout: r.cutout.clone(),
            spatial,
            classes: classes as i64,
        })
    }

    pub fn is_identity(&self) -> bool {
        self.mix.is_none() && self.manifold.is_none() && self.cutout.is_none()
    }

    pub fn apply(&self, x: &Tensor, y: &Tensor, rng: &mut MixRng) -> Prepared {
        let mut x = x.shallow_clone();
        if let (Some(c), Some(spatial)) = (&self.cutout, self.spatial) {
            if rng.uniform() < c.prob {
                x = cutout(&x, spatial, c, rng);
            }
        }
        if let Some(m) = &self.mix {
            if rng.uniform() < m.prob {
                let use_cutmix = match (m.mixup_alpha > 0.0, m.cutmix_alpha > 0.0) {
                    (true, true) => rng.uniform() < m.switch_prob,
                    (false, true) => true,
                    _ => false,
                };
                let targets = one_hot(y, self.classes);
                if use_cutmix {
                    let lam = rng.beta(m.cutmix_alpha, m.cutmix_alpha);
                    let (xm, ym, _) = match self
                        .spatial
                        .expect("CutMix enabled implies a spatial layout")
                    {
                        Spatial::OneD { len } => mixing::cutmix_apply(
                            &x,
                            &targets,
                            mixing::cutmix_span_1d(len, lam, rng),
                        ),
                        Spatial::TwoD { h, w } => mixing::cutmix_apply(
                            &x,
                            &targets,
                            mixing::cutmix_box_2d(h, w, lam, rng),
                        ),
                    };
                    return Prepared {
                        x: xm,
                        soft_targets: Some(ym),
                        manifold: None,
                    };
                }
                let lam = rng.beta(m.mixup_alpha, m.mixup_alpha);
                let (xm, ym) = mixing::mixup(&x, &targets, lam);
                return Prepared {
                    x: xm,
                    soft_targets: Some(ym),
                    manifold: None,
                };
            }
        }
        if let Some(m) = &self.manifold {
            if rng.uniform() < m.prob {
                let k = m.layers[rng.below(m.layers.len() as u64) as usize];
                let lam = rng.beta(m.alpha, m.alpha);
                // The targets mix with the same λ and the same reversed-batch partner as the hidden state.
                let targets = one_hot(y, self.classes);
                let soft = &targets * lam + targets.flip([0]) * (1.0 - lam);
                return Prepared {
                    x,
                    soft_targets: Some(soft),
                    manifold: Some((k, lam)),
                };
            }
        }
        Prepared {
            x,
            soft_targets: None,
            manifold: None,
        }
    }
}

fn cutout(x: &Tensor, spatial: Spatial, c: &CutoutConfig, rng: &mut MixRng) -> Tensor {
    let b = x.size()[0] as usize;
    match spatial {
        Spatial::OneD { len } => {
            let holes: Vec<_> = (0..b)
                .map(|_| mixing::cutout_regions_1d(len, c.holes, c.size as i64, rng))
                .collect();
            mixing::cutout(x, &holes)
        }
        Spatial::TwoD { h, w } => {
            let holes: Vec<_> = (0..b)
                .map(|_| mixing::cutout_regions_2d(h, w, c.holes, c.size as i64, rng))
                .collect();
            mixing::cutout(x, &holes)
        }
    }
}
