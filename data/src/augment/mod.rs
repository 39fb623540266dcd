//! Per-sample data augmentation for the data-loader threads: 1-D signals (MNIST-1D's generator turned
//! into augmentations) and 2-D images (crops, flips, colour, blur, Cutout, RandAugment), plus the two-view
//! wrappers that consistency methods (UDA, FixMatch: a weak and a strong view) and contrastive methods
//! (SimCLR: two independent views) consume.
//!
//! **Raw buffers, no libtorch.** A sample is a flat row-major `[f32]` with a shape: `[L]` or `[C, L]` for
//! 1-D transforms, `[C, H, W]` with values in `[0, 1]` for 2-D ones. Loader threads run these functions
//! on bytes they read from shards, so nothing here creates a `tch::Tensor`; the batch is turned into a
//! tensor once, on the training thread. Every transform keeps the shape.
//!
//! **Design.** A [`Transform`] mutates one sample in place and may use a caller-owned scratch buffer, so a
//! loader thread allocates nothing per sample once its buffers have grown. A [`Pipeline`] is a list of
//! boxed transforms applied in order. Each transform draws its random parameters from a [`MixRng`] and
//! hands them to a deterministic public function (`one_d::roll`, `two_d::hflip`, …) that does the work;
//! tests check those functions on hand-made inputs, as `mixing.rs` does for the batch regularizers.
//! Every transform documents its formula, its source, and the order in which it draws from the
//! generator (part of the reproducibility contract: changing it changes every augmented sample).
//!
//! **Seeding.** The randomness of one view of one sample is a pure function of
//! (job seed, epoch, sample id, view), see [`sample_rng`]: any batch can be rebuilt regardless of which
//! worker, loader thread or prefetch order produced it, and changing the number of workers or threads
//! does not change the data.

pub mod one_d;
pub mod randaugment;
mod transform;
pub mod two_d;

use crate::rng::MixRng;
use butler_common::sampler::mix;

pub use randaugment::{Op, RandAugment};
use transform::check_len;
pub use transform::Transform;

/// Separates augmentation streams from the other users of `mix(seed, ·)` (the epoch permutation uses
/// `mix(seed, epoch)` directly). The bytes spell "augment\0".
pub const AUGMENT_DOMAIN: u64 = 0x6175_676d_656e_7400;

/// The generator for view `view` of sample `sample_id` in epoch `epoch` of a job seeded with `seed`:
/// `MixRng::new(mix(mix(mix(mix(seed, AUGMENT_DOMAIN), epoch), sample_id), view))`, with
/// [`butler_common::sampler::mix`]. `sample_id` is the sample's index in its split (the dataset index,
/// not its position in the batch), so the result does not depend on the data order either.
pub fn sample_rng(seed: u64, epoch: u64, sample_id: u64, view: u64) -> MixRng {
    let s = mix(seed, AUGMENT_DOMAIN);
    let s = mix(s, epoch);
    let s = mix(s, sample_id);
    MixRng::new(mix(s, view))
}

/// Which sample is being augmented: everything [`sample_rng`] needs except the view.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SampleKey {
    pub seed: u64,
    pub epoch: u64,
    pub sample_id: u64,
}

impl SampleKey {
    pub fn new(seed: u64, epoch: u64, sample_id: u64) -> Self {
        SampleKey {
            seed,
            epoch,
            sample_id,
        }
    }

    /// The generator of view `view` of this sample (see [`sample_rng`]).
    pub fn rng(&self, view: u64) -> MixRng {
        sample_rng(self.seed, self.epoch, self.sample_id, view)
    }
}

/// One random augmentation of one sample.
///
/// Transforms applied in order; itself a [`Transform`]. `Sync`, so loader threads share one by reference.
#[derive(Debug, Default)]
pub struct Pipeline(pub Vec<Box<dyn Transform>>);

impl Pipeline {
    pub fn new() -> Self {
        Pipeline(Vec::new())
    }

    /// Appends `t` (builder style).
    pub fn then(mut self, t: impl Transform + 'static) -> Self {
        self.0.push(Box::new(t));
        self
    }

    /// Appends `t`, applied with probability `p` (see [`RandomApply`]).
    pub fn then_maybe(self, p: f64, t: impl Transform + 'static) -> Self {
        self.then(RandomApply::new(p, t))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Augments `x` in place with the given generator.
    pub fn apply_in_place(
        &self,
        x: &mut [f32],
        shape: &[usize],
        rng: &mut MixRng,
        scratch: &mut Vec<f32>,
    ) {
        check_len(x, shape);
        for t in &self.0 {
            t.apply(x, shape, rng, scratch);
        }
    }

    /// An augmented copy of `x` (convenience: allocates the result and a scratch buffer).
    pub fn apply(&self, x: &[f32], shape: &[usize], rng: &mut MixRng) -> Vec<f32> {
        let mut out = x.to_vec();
        self.apply_in_place(&mut out, shape, rng, &mut Vec::new());
        out
    }

    /// View `view` of sample `key`: [`Pipeline::apply`] with [`SampleKey::rng`]`(view)`.
    pub fn apply_seeded(&self, x: &[f32], shape: &[usize], key: SampleKey, view: u64) -> Vec<f32> {
        self.apply(x, shape, &mut key.rng(view))
    }
}

impl Transform for Pipeline {
    fn apply(&self, x: &mut [f32], shape: &[usize], rng: &mut MixRng, scratch: &mut Vec<f32>) {
        self.apply_in_place(x, shape, rng, scratch);
    }
}

/// Applies the inner transform with probability `p` (torchvision's `RandomApply`). Draws one uniform `u`
/// always, then the inner transform's draws only when `u < p`.
#[derive(Debug)]
pub struct RandomApply {
    pub p: f64,
    pub inner: Box<dyn Transform>,
}

impl RandomApply {
    pub fn new(p: f64, t: impl Transform + 'static) -> Self {
        assert!(
            (0.0..=1.0).contains(&p),
            "RandomApply: probability {p} is not in [0, 1]"
        );
        RandomApply {
            p,
            inner: Box::new(t),
        }
    }
}

impl Transform for RandomApply {
    fn apply(&self, x: &mut [f32], shape: &[usize], rng: &mut MixRng, scratch: &mut Vec<f32>) {
        if rng.uniform() < self.p {
            self.inner.apply(x, shape, rng, scratch);
        }
    }
}

/// The identity (a named no-op, handy as a placeholder in configs and tests).
#[derive(Clone, Copy, Debug, Default)]
pub struct Identity;

impl Transform for Identity {
    fn apply(&self, _: &mut [f32], _: &[usize], _: &mut MixRng, _: &mut Vec<f32>) {}
}

/// A weak and a strong view of the same sample, for consistency regularization: the model's prediction
/// on the weak view is the (pseudo-)target for the strong view (UDA, Xie et al. 2020; FixMatch, Sohn et
/// al. 2020). The weak view uses generator view 0, the strong view view 1 (independent draws).
#[derive(Debug)]
pub struct WeakStrong {
    pub weak: Pipeline,
    pub strong: Pipeline,
}

impl WeakStrong {
    /// MNIST-1D-style signals of length `len` (`[L]` or `[C, L]`): weak = a circular shift by at most
    /// `max(1, len/10)` positions; strong = a shift by at most `len/4`, then the MNIST-1D generator's
    /// amplitude scale (0.4), shear (0.75) and i.i.d. noise (0.02, in units of the signal: the data
    /// should be standardized or close to it).
    pub fn default_1d(len: usize) -> Self {
        WeakStrong {
            weak: Pipeline::new().then(one_d::Roll::new((len / 10).max(1))),
            strong: Pipeline::new()
                .then(one_d::Roll::new((len / 4).max(1)))
                .then(one_d::AmplitudeScale::new(0.4))
                .then(one_d::Shear::new(0.75))
                .then(one_d::GaussianNoise::new(0.02)),
        }
    }

    /// FixMatch's CIFAR recipe for `[C, h, w]` images: weak = horizontal flip (p = 0.5) and a random
    /// translation by up to 12.5 % of each side (reflect-padded crop, as the reference code's
    /// `RandomCrop(padding=4, padding_mode='reflect')` for 32 × 32); strong = weak, then RandAugment with
    /// `ra_n` ops at magnitude `ra_m` (0..=30) and one Cutout hole of half the shorter side.
    pub fn default_2d(h: usize, w: usize, ra_n: usize, ra_m: u32) -> Self {
        Self::images(h, w, ra_n, ra_m, true)
    }

    /// [`WeakStrong::default_2d`] with the horizontal flip optional (digits and text are not
    /// mirror-symmetric).
    pub fn images(h: usize, w: usize, ra_n: usize, ra_m: u32, flip: bool) -> Self {
        let weak = || {
            let p = if flip {
                Pipeline::new().then(two_d::HorizontalFlip::new(0.5))
            } else {
                Pipeline::new()
            };
            p.then(two_d::PadCrop::reflect(
                (h as f64 * 0.125).ceil() as usize,
                (w as f64 * 0.125).ceil() as usize,
            ))
        };
        WeakStrong {
            weak: weak(),
            strong: weak()
                .then(RandAugment::new(ra_n, ra_m))
                .then(two_d::Cutout::new(1, (h.min(w) / 2).max(1))),
        }
    }

    /// The weak/strong pair butler uses for a dataset's sample shape: [`WeakStrong::default_1d`] for
    /// `[L]` and `[C, L]` signals, [`WeakStrong::images`] (RandAugment 2 ops at magnitude 10) for
    /// `[C, H, W]` images.
    pub fn for_sample_shape(shape: &[usize], flip: bool) -> Result<Self, String> {
        match shape {
            [l] | [_, l] => Ok(Self::default_1d(*l)),
            [_, h, w] => Ok(Self::images(*h, *w, 2, 10, flip)),
            _ => Err(format!(
                "no augmentation is defined for samples of shape {shape:?} (expected [L], [C, L] or [C, H, W])"
            )),
        }
    }

    /// (weak, strong) views of sample `key`.
    pub fn views(&self, x: &[f32], shape: &[usize], key: SampleKey) -> (Vec<f32>, Vec<f32>) {
        (
            self.weak.apply_seeded(x, shape, key, 0),
            self.strong.apply_seeded(x, shape, key, 1),
        )
    }

    /// (weak, strong) views of sample `key` into caller-owned buffers (no allocation once they have
    /// grown); `x` is left untouched.
    pub fn views_into(
        &self,
        x: &[f32],
        shape: &[usize],
        key: SampleKey,
        weak: &mut Vec<f32>,
        strong: &mut Vec<f32>,
        scratch: &mut Vec<f32>,
    ) {
        for (out, p, view) in [(weak, &self.weak, 0), (strong, &self.strong, 1)] {
            out.clear();
            out.extend_from_slice(x);
            p.apply_in_place(out, shape, &mut key.rng(view), scratch);
        }
    }
}

/// Two independently drawn views of the same sample through the same pipeline, for contrastive methods
/// (SimCLR, Chen et al. 2020): views 0 and 1 of [`sample_rng`].
#[derive(Debug)]
pub struct TwoViews(pub Pipeline);

impl TwoViews {
    /// SimCLR's augmentation for `[C, h, w]` images (Chen et al. 2020, appendix A): random resized crop
    /// (scale 0.08–1, ratio 3/4–4/3), horizontal flip (0.5), colour jitter with strength `s`
    /// (brightness, contrast, saturation 0.8·s, hue 0.2·s) applied with probability 0.8, grayscale with
    /// probability 0.2, and, when `blur`, a Gaussian blur with probability 0.5 (kernel 10 % of the
    /// shorter side, made odd; σ in 0.1–2.0). The paper uses s = 0.5 and no blur on CIFAR-10, s = 1 with
    /// blur on ImageNet.
    pub fn simclr_2d(h: usize, w: usize, s: f64, blur: bool) -> Self {
        let mut p = Pipeline::new()
            .then(two_d::RandomResizedCrop::new(
                (0.08, 1.0),
                (3.0 / 4.0, 4.0 / 3.0),
            ))
            .then(two_d::HorizontalFlip::new(0.5))
            .then_maybe(
                0.8,
                two_d::ColorJitter::new(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s),
            )
            .then(two_d::Grayscale::new(0.2));
        if blur {
            let k = ((h.min(w) as f64 * 0.1) as usize) | 1;
            p = p.then_maybe(0.5, two_d::GaussianBlur::new(k.max(3), (0.1, 2.0)));
        }
        TwoViews(p)
    }

    /// Two views of a 1-D signal of length `len`: a shift by at most `len/4`, amplitude scale (0.4),
    /// shear (0.75), correlated noise (0.25 before smoothing with σ = 2 positions) and i.i.d. noise
    /// (0.02) — the MNIST-1D generator's transformations and scales, with its correlated noise added
    /// everywhere rather than only in the padding.
    pub fn default_1d(len: usize) -> Self {
        TwoViews(
            Pipeline::new()
                .then(one_d::Roll::new((len / 4).max(1)))
                .then(one_d::AmplitudeScale::new(0.4))
                .then(one_d::Shear::new(0.75))
                .then(one_d::CorrelatedNoise::new(0.25, 2.0))
                .then(one_d::GaussianNoise::new(0.02)),
        )
    }

    /// Views 0 and 1 of sample `key`.
    pub fn views(&self, x: &[f32], shape: &[usize], key: SampleKey) -> (Vec<f32>, Vec<f32>) {
        (
            self.0.apply_seeded(x, shape, key, 0),
            self.0.apply_seeded(x, shape, key, 1),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_rng_is_a_pure_function_of_its_key() {
        let a = sample_rng(1, 2, 3, 0).uniform();
        assert_eq!(a, sample_rng(1, 2, 3, 0).uniform());
        for other in [
            sample_rng(9, 2, 3, 0),
            sample_rng(1, 9, 3, 0),
            sample_rng(1, 2, 9, 0),
            sample_rng(1, 2, 3, 1),
        ] {
            assert_ne!(a, other.clone().uniform());
        }
    }

    #[test]
    fn random_apply_respects_its_probability() {
        #[derive(Debug)]
        struct AddOne;
        impl Transform for AddOne {
            fn apply(&self, x: &mut [f32], _: &[usize], _: &mut MixRng, _: &mut Vec<f32>) {
                x.iter_mut().for_each(|v| *v += 1.0);
            }
        }
        let mut rng = MixRng::new(0);
        let (never, always, half) = (
            RandomApply::new(0.0, AddOne),
            RandomApply::new(1.0, AddOne),
            RandomApply::new(0.5, AddOne),
        );
        let mut x = [0.0f32];
        for _ in 0..1000 {
            never.apply(&mut x, &[1], &mut rng, &mut Vec::new());
        }
        assert_eq!(x[0], 0.0);
        for _ in 0..1000 {
            always.apply(&mut x, &[1], &mut rng, &mut Vec::new());
        }
        assert_eq!(x[0], 1000.0);
        let mut y = [0.0f32];
        for _ in 0..4000 {
            half.apply(&mut y, &[1], &mut rng, &mut Vec::new());
        }
        assert!((1800.0..2200.0).contains(&y[0]), "{}", y[0]);
    }
}
