//! RandAugment (Cubuk, Zoph, Shlens & Le, "RandAugment: Practical automated data augmentation with a
//! reduced search space", CVPR-W 2020): `N` operations drawn uniformly with replacement from a fixed list,
//! each at the global magnitude `M`.
//!
//! The list, the magnitude ranges and their signs are torchvision's (`transforms.v2.RandAugment`, 31
//! magnitude bins, so `M ∈ 0..=30`; a range `[a, b]` gives `a + (b − a)·M/30`):
//!
//! | op | magnitude at M | signed |
//! |---|---|---|
//! | Identity | — | |
//! | ShearX, ShearY | 0.3·M/30 (shear coefficient) | yes |
//! | TranslateX, TranslateY | (150/331)·W·M/30 (H for Y) pixels, truncated to an integer | yes |
//! | Rotate | 30·M/30 degrees | yes |
//! | Brightness, Color, Contrast, Sharpness | factor 1 + 0.9·M/30 | yes (on the 0.9·M/30 part) |
//! | Posterize | 8 − round(M/7.5) bits (8 … 4) | no |
//! | Solarize | threshold 1 − M/30 | no |
//! | AutoContrast, Equalize | — | no |
//!
//! Geometric ops fill with 0 outside the image, as torchvision's default; the interpolation is
//! selectable (torchvision's default is nearest).

use super::transform::{check_len, Transform};
use super::two_d::{brightness, chw, contrast, saturation, warp, Interpolation};
use crate::rng::MixRng;

/// One RandAugment operation. [`Op::ALL`] lists them in torchvision's order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    Identity,
    ShearX,
    ShearY,
    TranslateX,
    TranslateY,
    Rotate,
    Brightness,
    Color,
    Contrast,
    Sharpness,
    Posterize,
    Solarize,
    AutoContrast,
    Equalize,
}

/// The number of magnitude levels (torchvision's `num_magnitude_bins = 31`): `M ∈ 0..=MAX_MAGNITUDE`.
pub const MAX_MAGNITUDE: u32 = 30;

impl Op {
    /// All 14 operations of the paper (with Identity), in torchvision's order.
    pub const ALL: [Op; 14] = [
        Op::Identity,
        Op::ShearX,
        Op::ShearY,
        Op::TranslateX,
        Op::TranslateY,
        Op::Rotate,
        Op::Brightness,
        Op::Color,
        Op::Contrast,
        Op::Sharpness,
        Op::Posterize,
        Op::Solarize,
        Op::AutoContrast,
        Op::Equalize,
    ];

    /// The unsigned magnitude of this op at level `m` for an `h × w` image (see the module table).
    pub fn magnitude(self, m: u32, h: usize, w: usize) -> f64 {
        assert!(
            m <= MAX_MAGNITUDE,
            "RandAugment: magnitude {m} is above {MAX_MAGNITUDE}"
        );
        let t = m as f64 / MAX_MAGNITUDE as f64;
        match self {
            Op::ShearX | Op::ShearY => 0.3 * t,
            Op::TranslateX => 150.0 / 331.0 * w as f64 * t,
            Op::TranslateY => 150.0 / 331.0 * h as f64 * t,
            Op::Rotate => 30.0 * t,
            Op::Brightness | Op::Color | Op::Contrast | Op::Sharpness => 0.9 * t,
            Op::Posterize => 8.0 - (m as f64 / 7.5).round(),
            Op::Solarize => 1.0 - t,
            Op::Identity | Op::AutoContrast | Op::Equalize => 0.0,
        }
    }

    /// Whether the magnitude gets a random sign (probability ½).
    pub fn signed(self) -> bool {
        matches!(
            self,
            Op::ShearX
                | Op::ShearY
                | Op::TranslateX
                | Op::TranslateY
                | Op::Rotate
                | Op::Brightness
                | Op::Color
                | Op::Contrast
                | Op::Sharpness
        )
    }

    /// Applies the op with the (signed) magnitude `mag` to a `[C, H, W]` image in `[0, 1]`.
    pub fn apply(
        self,
        x: &mut [f32],
        shape: &[usize],
        mag: f64,
        interp: Interpolation,
        fill: f32,
        scratch: &mut Vec<f32>,
    ) {
        check_len(x, shape);
        match self {
            Op::Identity => {}
            // Output (x, y) reads the input at (x + m·(y + ½), y): the AutoAugment/PIL matrix
            // (1, m, 0, 0, 1, 0) about the image's top-left corner (torchvision's `center=[0, 0]`).
            Op::ShearX => warp(
                x,
                shape,
                [1.0, mag, 0.5 * mag, 0.0, 1.0, 0.0],
                interp,
                fill,
                scratch,
            ),
            Op::ShearY => warp(
                x,
                shape,
                [1.0, 0.0, 0.0, mag, 1.0, 0.5 * mag],
                interp,
                fill,
                scratch,
            ),
            // Content moves by trunc(mag) pixels (right / down for positive values).
            Op::TranslateX => warp(
                x,
                shape,
                [1.0, 0.0, -mag.trunc(), 0.0, 1.0, 0.0],
                interp,
                fill,
                scratch,
            ),
            Op::TranslateY => warp(
                x,
                shape,
                [1.0, 0.0, 0.0, 0.0, 1.0, -mag.trunc()],
                interp,
                fill,
                scratch,
            ),
            Op::Rotate => rotate(x, shape, mag, interp, fill, scratch),
            Op::Brightness => brightness(x, 1.0 + mag),
            Op::Color => saturation(x, shape, 1.0 + mag),
            Op::Contrast => contrast(x, shape, 1.0 + mag),
            Op::Sharpness => sharpness(x, shape, 1.0 + mag, scratch),
            Op::Posterize => posterize(x, mag as u32),
            Op::Solarize => solarize(x, mag),
            Op::AutoContrast => autocontrast(x, shape),
            Op::Equalize => equalize(x, shape),
        }
    }
}

/// Rotation by `degrees` counter-clockwise about the image centre `((W − 1)/2, (H − 1)/2)`
/// (torchvision `rotate`): output `(x, y)` reads the input at `c + R(θ)·((x, y) − c)` with
/// `R(θ) = [[cos θ, −sin θ], [sin θ, cos θ]]` in image coordinates (y down).
pub fn rotate(
    x: &mut [f32],
    shape: &[usize],
    degrees: f64,
    interp: Interpolation,
    fill: f32,
    scratch: &mut Vec<f32>,
) {
    let (_, h, w) = chw(shape);
    let (s, c) = degrees.to_radians().sin_cos();
    let (cx, cy) = ((w as f64 - 1.0) / 2.0, (h as f64 - 1.0) / 2.0);
    let a = [c, -s, cx - c * cx + s * cy, s, c, cy - s * cx - c * cy];
    warp(x, shape, a, interp, fill, scratch);
}

/// Solarize (torchvision `solarize`): values `≥ threshold` become `1 − x`, the others are kept.
pub fn solarize(x: &mut [f32], threshold: f64) {
    let t = threshold as f32;
    x.iter_mut().for_each(|v| {
        if *v >= t {
            *v = 1.0 - *v
        }
    });
}

/// Posterize to `bits` bits (torchvision's float kernel): `min(⌊x·2^bits⌋, 2^bits − 1) / 2^bits`.
pub fn posterize(x: &mut [f32], bits: u32) {
    assert!(bits <= 8, "posterize: {bits} bits is above 8");
    let levels = (1u32 << bits) as f32;
    x.iter_mut()
        .for_each(|v| *v = (*v * levels).floor().clamp(0.0, levels - 1.0) / levels);
}

/// Sharpness (torchvision `adjust_sharpness`, PIL's `ImageEnhance.Sharpness`): blend with a "degenerate"
/// image that is the input smoothed by `[[1, 1, 1], [1, 5, 1], [1, 1, 1]]/13` on interior pixels and the
/// input itself on the border: `clamp(f·x + (1 − f)·degenerate, 0, 1)`. Images with a side ≤ 2 are
/// unchanged.
pub fn sharpness(x: &mut [f32], shape: &[usize], f: f64, scratch: &mut Vec<f32>) {
    check_len(x, shape);
    let (_, h, w) = chw(shape);
    if h <= 2 || w <= 2 {
        return;
    }
    let f = f as f32;
    scratch.clear();
    scratch.extend_from_slice(x);
    for (out, src) in x.chunks_exact_mut(h * w).zip(scratch.chunks_exact(h * w)) {
        for y in 1..h - 1 {
            for xx in 1..w - 1 {
                let i = y * w + xx;
                let ring = src[i - w - 1]
                    + src[i - w]
                    + src[i - w + 1]
                    + src[i - 1]
                    + src[i + 1]
                    + src[i + w - 1]
                    + src[i + w]
                    + src[i + w + 1];
                let degenerate = (ring + 5.0 * src[i]) / 13.0;
                out[i] = (f * src[i] + (1.0 - f) * degenerate).clamp(0.0, 1.0);
            }
        }
    }
}

/// Autocontrast (torchvision `autocontrast`): every channel stretched to `[0, 1]`,
/// `(x − min)/(max − min)`; a constant channel is unchanged.
pub fn autocontrast(x: &mut [f32], shape: &[usize]) {
    check_len(x, shape);
    let (_, h, w) = chw(shape);
    if h * w == 0 {
        return;
    }
    for plane in x.chunks_exact_mut(h * w) {
        let (lo, hi) = plane
            .iter()
            .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| {
                (lo.min(v), hi.max(v))
            });
        if hi > lo {
            let inv = 1.0 / (hi - lo);
            plane
                .iter_mut()
                .for_each(|v| *v = ((*v - lo) * inv).clamp(0.0, 1.0));
        }
    }
}

/// Histogram equalization per channel, PIL's `ImageOps.equalize` as torchvision applies it to float
/// images: values binned to `b = min(⌊x·255.999⌋, 255)`; with `hist` the 256-bin histogram and `step =
/// ⌊(pixels − hist[last non-empty bin]) / 255⌋`, bin `b` maps to
/// `min((cumhist[b − 1] + ⌊step/2⌋) / step, 255) / 255` (integer division, `cumhist[−1] = 0`). A channel
/// with `step = 0` (one value, or fewer than 256 pixels outside the top bin) is unchanged; torchvision
/// returns it quantized to `b/255` instead (a difference below 1/255).
pub fn equalize(x: &mut [f32], shape: &[usize]) {
    check_len(x, shape);
    let (_, h, w) = chw(shape);
    let hw = h * w;
    if hw == 0 {
        return;
    }
    let bin = |v: f32| ((v * 255.999).max(0.0) as usize).min(255);
    for plane in x.chunks_exact_mut(hw) {
        let mut hist = [0usize; 256];
        plane.iter().for_each(|&v| hist[bin(v)] += 1);
        let last = hist.iter().rev().find(|&&n| n > 0).copied().unwrap_or(0);
        let step = (hw - last) / 255;
        if step == 0 {
            continue;
        }
        let mut lut = [0f32; 256];
        let mut cum = 0usize;
        for (b, l) in lut.iter_mut().enumerate() {
            *l = ((cum + step / 2) / step).min(255) as f32 / 255.0;
            cum += hist[b];
        }
        plane.iter_mut().for_each(|v| *v = lut[bin(*v)]);
    }
}

/// RandAugment: `n` ops drawn uniformly with replacement from `ops`, each at magnitude `m` (`0..=30`),
/// or, with `random_magnitude` (FixMatch's variant), at a level drawn uniformly from `0..=m` per op.
/// Draws per op: `below(ops.len())`, then `below(m + 1)` if `random_magnitude`, then one uniform for the
/// sign if the op is signed (negative when `u < ½`).
#[derive(Clone, Debug)]
pub struct RandAugment {
    pub n: usize,
    pub m: u32,
    pub ops: Vec<Op>,
    pub interpolation: Interpolation,
    pub fill: f32,
    pub random_magnitude: bool,
}

impl RandAugment {
    /// The paper's and torchvision's defaults: all 14 ops, nearest interpolation, fill 0, fixed `m`.
    pub fn new(n: usize, m: u32) -> Self {
        assert!(
            m <= MAX_MAGNITUDE,
            "RandAugment: magnitude {m} is above {MAX_MAGNITUDE}"
        );
        RandAugment {
            n,
            m,
            ops: Op::ALL.to_vec(),
            interpolation: Interpolation::Nearest,
            fill: 0.0,
            random_magnitude: false,
        }
    }

    pub fn with_ops(mut self, ops: &[Op]) -> Self {
        assert!(!ops.is_empty(), "RandAugment: the op list is empty");
        self.ops = ops.to_vec();
        self
    }

    pub fn with_interpolation(mut self, interp: Interpolation) -> Self {
        self.interpolation = interp;
        self
    }

    pub fn with_random_magnitude(mut self, yes: bool) -> Self {
        self.random_magnitude = yes;
        self
    }
}

impl Transform for RandAugment {
    fn apply(&self, x: &mut [f32], shape: &[usize], rng: &mut MixRng, scratch: &mut Vec<f32>) {
        let (_, h, w) = chw(shape);
        for _ in 0..self.n {
            let op = self.ops[rng.below(self.ops.len() as u64) as usize];
            let level = if self.random_magnitude {
                rng.below(self.m as u64 + 1) as u32
            } else {
                self.m
            };
            let mut mag = op.magnitude(level, h, w);
            if op.signed() && rng.uniform() < 0.5 {
                mag = -mag;
            }
            op.apply(x, shape, mag, self.interpolation, self.fill, scratch);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn magnitudes_match_torchvision_tables() {
        assert_eq!(Op::Posterize.magnitude(0, 32, 32), 8.0);
        assert_eq!(Op::Posterize.magnitude(30, 32, 32), 4.0);
        assert_eq!(Op::Posterize.magnitude(9, 32, 32), 7.0);
        assert_eq!(Op::Solarize.magnitude(0, 32, 32), 1.0);
        assert_eq!(Op::Solarize.magnitude(30, 32, 32), 0.0);
        assert!((Op::Rotate.magnitude(9, 32, 32) - 9.0).abs() < 1e-12);
        assert!((Op::TranslateX.magnitude(30, 10, 331) - 150.0).abs() < 1e-9);
        assert!((Op::Brightness.magnitude(15, 32, 32) - 0.45).abs() < 1e-12);
        assert_eq!(Op::ALL.len(), 14);
    }

    #[test]
    fn rotate_by_90_degrees_is_counter_clockwise() {
        // 2×2 image [[a, b], [c, d]] rotated counter-clockwise is [[b, d], [a, c]].
        for interp in [Interpolation::Nearest, Interpolation::Bilinear] {
            let mut x = vec![1.0, 2.0, 3.0, 4.0];
            rotate(&mut x, &[1, 2, 2], 90.0, interp, 0.0, &mut Vec::new());
            let r: Vec<f32> = x.iter().map(|v| v.round()).collect();
            assert_eq!(r, [2.0, 4.0, 1.0, 3.0], "{interp:?}: {x:?}");
        }
    }

    #[test]
    fn posterize_and_autocontrast() {
        let mut x = vec![0.0, 0.3, 0.5, 0.74, 1.0];
        posterize(&mut x, 2);
        assert_eq!(x, [0.0, 0.25, 0.5, 0.5, 0.75]);
        let mut y = vec![0.2, 0.4, 0.6, 0.5, 0.5, 0.5];
        autocontrast(&mut y, &[2, 1, 3]);
        let r: Vec<f32> = y.iter().map(|v| (v * 1e5).round() / 1e5).collect();
        assert_eq!(r, [0.0, 0.5, 1.0, 0.5, 0.5, 0.5]);
    }

    #[test]
    fn equalize_spreads_a_narrow_histogram() {
        // 256 pixels on 4 adjacent levels, 64 each: step = (256 − 64)/255 = 0 → unchanged.
        let mut few: Vec<f32> = (0..256).map(|i| (100 + i % 4) as f32 / 255.0).collect();
        let keep = few.clone();
        equalize(&mut few, &[1, 16, 16]);
        assert_eq!(few, keep);
        // 1024 pixels on 4 levels: step = 768/255 = 3; luts 0, (256+1)/3 = 85, 171, 256 → 255.
        let mut many: Vec<f32> = (0..1024).map(|i| (100 + i % 4) as f32 / 255.0).collect();
        equalize(&mut many, &[1, 32, 32]);
        let levels: Vec<u32> = many[..4]
            .iter()
            .map(|v| (v * 255.0).round() as u32)
            .collect();
        assert_eq!(levels, [0, 85, 171, 255]);
    }

    #[test]
    fn sharpness_keeps_constant_images_and_borders() {
        let mut c = vec![0.4f32; 3 * 5 * 5];
        sharpness(&mut c, &[3, 5, 5], 1.9, &mut Vec::new());
        assert!(c.iter().all(|v| (v - 0.4).abs() < 1e-6));
        let mut x: Vec<f32> = (0..25).map(|i| ((i * 7) % 11) as f32 / 10.0).collect();
        let before = x.clone();
        sharpness(&mut x, &[1, 5, 5], 0.0, &mut Vec::new());
        assert_eq!(&x[..5], &before[..5], "the border row is kept");
        assert_ne!(
            &x[6..9],
            &before[6..9],
            "factor 0 is the smoothed image inside"
        );
    }
}
