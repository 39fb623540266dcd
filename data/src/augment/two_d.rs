//! 2-D image augmentations on `[C, H, W]` samples with values in `[0, 1]`: random resized crop,
//! horizontal flip, padded random crop (translation), colour jitter, grayscale, Gaussian blur, Cutout, and
//! the sampling and colour primitives that RandAugment shares.
//!
//! Formulas follow torchvision's tensor kernels (`torchvision.transforms.v2.functional`), which is what
//! the benchmark compares against; the colour operations clamp to `[0, 1]` as they do, so every
//! transform here maps `[0, 1]` images to `[0, 1]` images. Colour operations that only make sense for RGB
//! (saturation, hue, grayscale) are identities on one-channel images, as in torchvision.
//!
//! Coordinates: pixel `(y, x)` has its centre at integer coordinates `(y, x)`; the image covers
//! `[−½, H − ½) × [−½, W − ½)`.

use super::transform::{check_len, reflect_index, uniform_in, Transform};
use crate::regions::{cutout_regions_2d, Box2d};
use crate::rng::MixRng;

/// ITU-R BT.601 luma weights for R, G, B (torchvision's `rgb_to_grayscale`, PIL's `L` mode).
pub const LUMA: [f32; 3] = [0.299, 0.587, 0.114];

/// `(C, H, W)` of an image shape.
///
/// # Panics
/// Unless the shape is `[C, H, W]`.
pub fn chw(shape: &[usize]) -> (usize, usize, usize) {
    match *shape {
        [c, h, w] => (c, h, w),
        _ => panic!("2-D augmentation: a sample must be [C, H, W], got {shape:?}"),
    }
}

/// How positions outside the image are filled by [`shift`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Padding {
    /// Mirror without repeating the edge (`reflect` in PyTorch and torchvision).
    Reflect,
    /// A constant value.
    Constant(f32),
}

/// How [`warp`] samples between pixels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Interpolation {
    /// The nearest pixel (round half up); torchvision's RandAugment default.
    Nearest,
    /// Bilinear between the four neighbours; neighbours outside the image count as the fill value
    /// (`grid_sample` with zero padding when the fill is 0).
    Bilinear,
}

/// Mirrors every row: `out[c][y][x] = x[c][y][W − 1 − x]`.
pub fn hflip(x: &mut [f32], shape: &[usize]) {
    check_len(x, shape);
    let (_, _, w) = chw(shape);
    if w > 0 {
        x.chunks_exact_mut(w).for_each(|row| row.reverse());
    }
}

/// `out[c][y][x] = x[c][y + dy][x + dx]`, positions outside the image filled per `padding`. With
/// `dy = i − p`, `dx = j − p` this is torchvision's `RandomCrop(size, padding=p)` cropping the padded
/// image at `(i, j)`.
pub fn shift(
    x: &mut [f32],
    shape: &[usize],
    dy: isize,
    dx: isize,
    padding: Padding,
    scratch: &mut Vec<f32>,
) {
    check_len(x, shape);
    let (_, h, w) = chw(shape);
    if (dy == 0 && dx == 0) || h == 0 || w == 0 {
        return;
    }
    scratch.clear();
    scratch.extend_from_slice(x);
    for (out, src) in x.chunks_exact_mut(h * w).zip(scratch.chunks_exact(h * w)) {
        for y in 0..h {
            let sy = y as isize + dy;
            let row = &mut out[y * w..(y + 1) * w];
            for (xx, o) in row.iter_mut().enumerate() {
                let sx = xx as isize + dx;
                *o = match padding {
                    Padding::Reflect => src[reflect_index(sy, h) * w + reflect_index(sx, w)],
                    Padding::Constant(v) => {
                        if (0..h as isize).contains(&sy) && (0..w as isize).contains(&sx) {
                            src[sy as usize * w + sx as usize]
                        } else {
                            v
                        }
                    }
                };
            }
        }
    }
}

/// The region `top..top + ch` × `left..left + cw` resized to the full `H × W` with bilinear
/// interpolation, PyTorch's `interpolate(mode="bilinear", align_corners=False)` rule: the source
/// coordinate of output row `y` is `max(0, (y + ½)·ch/H − ½)`, neighbours `⌊s⌋` and `min(⌊s⌋ + 1, ch − 1)`.
/// A region the size of the image comes back unchanged.
#[allow(clippy::too_many_arguments)]
pub fn crop_resize(
    x: &mut [f32],
    shape: &[usize],
    top: usize,
    left: usize,
    ch: usize,
    cw: usize,
    scratch: &mut Vec<f32>,
) {
    check_len(x, shape);
    let (_, h, w) = chw(shape);
    assert!(
        ch > 0 && cw > 0 && top + ch <= h && left + cw <= w,
        "crop_resize: region {ch}×{cw} at ({top}, {left}) is not inside the {h}×{w} image"
    );
    let taps = |out_n: usize, in_n: usize, offset: usize| -> Vec<(usize, usize, f32)> {
        let scale = in_n as f64 / out_n as f64;
        (0..out_n)
            .map(|o| {
                let s = ((o as f64 + 0.5) * scale - 0.5).max(0.0);
                let i0 = (s as usize).min(in_n - 1);
                let i1 = (i0 + 1).min(in_n - 1);
                (offset + i0, offset + i1, (s - i0 as f64) as f32)
            })
            .collect()
    };
    let rows = taps(h, ch, top);
    let cols = taps(w, cw, left);
    scratch.clear();
    scratch.extend_from_slice(x);
    for (out, src) in x.chunks_exact_mut(h * w).zip(scratch.chunks_exact(h * w)) {
        for (y, &(y0, y1, ly)) in rows.iter().enumerate() {
            let (r0, r1) = (&src[y0 * w..(y0 + 1) * w], &src[y1 * w..(y1 + 1) * w]);
            for (xx, &(x0, x1, lx)) in cols.iter().enumerate() {
                let top_v = r0[x0] + lx * (r0[x1] - r0[x0]);
                let bot_v = r1[x0] + lx * (r1[x1] - r1[x0]);
                out[y * w + xx] = top_v + ly * (bot_v - top_v);
            }
        }
    }
}

/// Resamples the image through the inverse affine map `a`: output pixel `(y, x)` takes the source value
/// at `(sx, sy) = (a[0]·x + a[1]·y + a[2], a[3]·x + a[4]·y + a[5])`, sampled per `interp`, with `fill`
/// outside the image. Rotations, shears and translations (RandAugment's geometric ops) are all this.
pub fn warp(
    x: &mut [f32],
    shape: &[usize],
    a: [f64; 6],
    interp: Interpolation,
    fill: f32,
    scratch: &mut Vec<f32>,
) {
    check_len(x, shape);
    let (_, h, w) = chw(shape);
    if h == 0 || w == 0 {
        return;
    }
    scratch.clear();
    scratch.extend_from_slice(x);
    let (hi, wi) = (h as isize, w as isize);
    for (out, src) in x.chunks_exact_mut(h * w).zip(scratch.chunks_exact(h * w)) {
        let at = |yy: isize, xx: isize| -> f32 {
            if (0..hi).contains(&yy) && (0..wi).contains(&xx) {
                src[yy as usize * w + xx as usize]
            } else {
                fill
            }
        };
        for y in 0..h {
            for xx in 0..w {
                let (xf, yf) = (xx as f64, y as f64);
                let sx = a[0] * xf + a[1] * yf + a[2];
                let sy = a[3] * xf + a[4] * yf + a[5];
                out[y * w + xx] = match interp {
                    Interpolation::Nearest => {
                        at((sy + 0.5).floor() as isize, (sx + 0.5).floor() as isize)
                    }
                    Interpolation::Bilinear => {
                        let (fx, fy) = (sx.floor(), sy.floor());
                        let (lx, ly) = ((sx - fx) as f32, (sy - fy) as f32);
                        let (x0, y0) = (fx as isize, fy as isize);
                        let t = at(y0, x0) + lx * (at(y0, x0 + 1) - at(y0, x0));
                        let b = at(y0 + 1, x0) + lx * (at(y0 + 1, x0 + 1) - at(y0 + 1, x0));
                        t + ly * (b - t)
                    }
                };
            }
        }
    }
}

/// `clamp(f·x + (1 − f)·other, 0, 1)` (torchvision's `_blend`).
#[inline]
fn blend(x: f32, other: f32, f: f32) -> f32 {
    (f * x + (1.0 - f) * other).clamp(0.0, 1.0)
}

/// Brightness: `clamp(f·x, 0, 1)` (blend with black; torchvision `adjust_brightness`).
pub fn brightness(x: &mut [f32], f: f64) {
    let f = f as f32;
    x.iter_mut().for_each(|v| *v = blend(*v, 0.0, f));
}

/// The mean of the image's luma (RGB) or of all its values (other channel counts).
fn mean_luma(x: &[f32], c: usize, hw: usize) -> f32 {
    if hw == 0 {
        return 0.0;
    }
    if c == 3 {
        let (r, rest) = x.split_at(hw);
        let (g, b) = rest.split_at(hw);
        let s: f64 = (0..hw)
            .map(|i| (LUMA[0] * r[i] + LUMA[1] * g[i] + LUMA[2] * b[i]) as f64)
            .sum();
        (s / hw as f64) as f32
    } else {
        (x.iter().map(|&v| v as f64).sum::<f64>() / x.len() as f64) as f32
    }
}

/// Contrast: blend with the mean luma `m` of the whole image, `clamp(f·x + (1 − f)·m, 0, 1)`
/// (torchvision `adjust_contrast`; for channel counts other than 3, `m` is the mean of all values).
pub fn contrast(x: &mut [f32], shape: &[usize], f: f64) {
    check_len(x, shape);
    let (c, h, w) = chw(shape);
    let m = mean_luma(x, c, h * w);
    let f = f as f32;
    x.iter_mut().for_each(|v| *v = blend(*v, m, f));
}

/// Saturation: blend every RGB pixel with its luma, `clamp(f·x + (1 − f)·gray, 0, 1)` (torchvision
/// `adjust_saturation`, RandAugment's "Color"); the identity unless `C = 3`.
pub fn saturation(x: &mut [f32], shape: &[usize], f: f64) {
    check_len(x, shape);
    let (c, h, w) = chw(shape);
    if c != 3 {
        return;
    }
    let hw = h * w;
    let f = f as f32;
    let (r, rest) = x.split_at_mut(hw);
    let (g, b) = rest.split_at_mut(hw);
    for i in 0..hw {
        let gray = LUMA[0] * r[i] + LUMA[1] * g[i] + LUMA[2] * b[i];
        r[i] = blend(r[i], gray, f);
        g[i] = blend(g[i], gray, f);
        b[i] = blend(b[i], gray, f);
    }
}

/// Replaces every channel of an RGB image by its luma `0.299 R + 0.587 G + 0.114 B` (keeping 3
/// channels, as torchvision's `RandomGrayscale`); the identity for `C = 1`.
///
/// # Panics
/// For channel counts other than 1 and 3.
pub fn grayscale(x: &mut [f32], shape: &[usize]) {
    check_len(x, shape);
    let (c, h, w) = chw(shape);
    assert!(
        c == 1 || c == 3,
        "grayscale: needs 1 or 3 channels, got {c}"
    );
    if c == 1 {
        return;
    }
    let hw = h * w;
    let (r, rest) = x.split_at_mut(hw);
    let (g, b) = rest.split_at_mut(hw);
    for i in 0..hw {
        let gray = LUMA[0] * r[i] + LUMA[1] * g[i] + LUMA[2] * b[i];
        (r[i], g[i], b[i]) = (gray, gray, gray);
    }
}

/// RGB in `[0, 1]` to HSV (hue in `[0, 1)`), the hexcone model (Smith 1978; Python's `colorsys`).
pub fn rgb_to_hsv(r: f32, g: f32, b: f32) -> (f32, f32, f32) {
    let max = r.max(g).max(b);
    let min = r.min(g).min(b);
    let chroma = max - min;
    let s = if max > 0.0 { chroma / max } else { 0.0 };
    if chroma <= 0.0 {
        return (0.0, s, max);
    }
    let h = if max == r {
        (g - b) / chroma
    } else if max == g {
        2.0 + (b - r) / chroma
    } else {
        4.0 + (r - g) / chroma
    };
    ((h / 6.0).rem_euclid(1.0), s, max)
}

/// HSV (hue in turns) to RGB, the inverse of [`rgb_to_hsv`].
pub fn hsv_to_rgb(h: f32, s: f32, v: f32) -> (f32, f32, f32) {
    let h6 = h.rem_euclid(1.0) * 6.0;
    let i = h6.floor();
    let f = h6 - i;
    let p = v * (1.0 - s);
    let q = v * (1.0 - s * f);
    let t = v * (1.0 - s * (1.0 - f));
    match i as i32 % 6 {
        0 => (v, t, p),
        1 => (q, v, p),
        2 => (p, v, t),
        3 => (p, q, v),
        4 => (t, p, v),
        _ => (v, p, q),
    }
}

/// Hue: rotates every RGB pixel's hue by `shift` turns (`shift ∈ [−½, ½]`; torchvision `adjust_hue`);
/// the identity unless `C = 3`.
pub fn hue(x: &mut [f32], shape: &[usize], shift: f64) {
    check_len(x, shape);
    let (c, h, w) = chw(shape);
    if c != 3 || shift == 0.0 {
        return;
    }
    let hw = h * w;
    let shift = shift as f32;
    let (r, rest) = x.split_at_mut(hw);
    let (g, b) = rest.split_at_mut(hw);
    for i in 0..hw {
        let (hh, s, v) = rgb_to_hsv(r[i], g[i], b[i]);
        let (nr, ng, nb) = hsv_to_rgb(hh + shift, s, v);
        (r[i], g[i], b[i]) = (nr.clamp(0.0, 1.0), ng.clamp(0.0, 1.0), nb.clamp(0.0, 1.0));
    }
}

/// torchvision's Gaussian blur kernel: `exp(−t²/(2σ²))` at `t = linspace(−(k−1)/2, (k−1)/2, k)`,
/// normalized to sum 1.
///
/// # Panics
/// Unless `size` is odd and `sigma` positive.
pub fn blur_kernel(size: usize, sigma: f64) -> Vec<f32> {
    assert!(
        size % 2 == 1,
        "gaussian blur: kernel size {size} must be odd"
    );
    assert!(
        sigma > 0.0 && sigma.is_finite(),
        "gaussian blur: sigma {sigma} must be positive"
    );
    let half = (size / 2) as f64;
    let w: Vec<f64> = (0..size)
        .map(|i| (-0.5 * ((i as f64 - half) / sigma).powi(2)).exp())
        .collect();
    let sum: f64 = w.iter().sum();
    w.iter().map(|v| (v / sum) as f32).collect()
}

/// Separable convolution of every channel with `kernel` along rows, then columns, `reflect` padding
/// (torchvision `gaussian_blur`). A constant image stays constant.
pub fn blur(x: &mut [f32], shape: &[usize], kernel: &[f32], scratch: &mut Vec<f32>) {
    check_len(x, shape);
    let (_, h, w) = chw(shape);
    if h == 0 || w == 0 {
        return;
    }
    let r = (kernel.len() / 2) as isize;
    scratch.clear();
    scratch.resize(x.len(), 0.0);
    // Rows: x → scratch.
    for (src, dst) in x.chunks_exact(w).zip(scratch.chunks_exact_mut(w)) {
        for (i, d) in dst.iter_mut().enumerate() {
            let mut acc = 0.0;
            for (t, &k) in kernel.iter().enumerate() {
                acc += k * src[reflect_index(i as isize + t as isize - r, w)];
            }
            *d = acc;
        }
    }
    // Columns: scratch → x.
    for (src, dst) in scratch.chunks_exact(h * w).zip(x.chunks_exact_mut(h * w)) {
        for y in 0..h {
            let row = &mut dst[y * w..(y + 1) * w];
            row.fill(0.0);
            for (t, &k) in kernel.iter().enumerate() {
                let sy = reflect_index(y as isize + t as isize - r, h);
                let s = &src[sy * w..(sy + 1) * w];
                for (d, &v) in row.iter_mut().zip(s) {
                    *d += k * v;
                }
            }
        }
    }
}

/// Sets the boxes to `value` in every channel.
pub fn erase(x: &mut [f32], shape: &[usize], boxes: &[Box2d], value: f32) {
    check_len(x, shape);
    let (_, h, w) = chw(shape);
    for plane in x.chunks_exact_mut(h * w) {
        for b in boxes {
            for y in b.y1.max(0) as usize..(b.y2.max(0) as usize).min(h) {
                let row = &mut plane[y * w..(y + 1) * w];
                row[(b.x1.max(0) as usize).min(w)..(b.x2.max(0) as usize).min(w)].fill(value);
            }
        }
    }
}

/// The crop box of torchvision's `RandomResizedCrop.get_params` for an `h × w` image: up to 10 tries of
/// area `s·h·w` with `s ~ U(scale)` and aspect ratio `exp(U(ln ratio.0, ln ratio.1))`, width
/// `round(√(area·ratio))`, height `round(√(area/ratio))`; the first box that fits is placed uniformly
/// (`top ~ below(h − ch + 1)`, then `left ~ below(w − cw + 1)`). If none fits, the largest centred box
/// whose ratio is clamped to the range. Returns `(top, left, ch, cw)`. Draws: two uniforms per try, then
/// two `below`s.
pub fn resized_crop_box(
    h: usize,
    w: usize,
    scale: (f64, f64),
    ratio: (f64, f64),
    rng: &mut MixRng,
) -> (usize, usize, usize, usize) {
    let area = (h * w) as f64;
    let (lr0, lr1) = (ratio.0.ln(), ratio.1.ln());
    for _ in 0..10 {
        let target = area * uniform_in(rng, scale.0, scale.1);
        let aspect = uniform_in(rng, lr0, lr1).exp();
        let cw = (target * aspect).sqrt().round() as usize;
        let ch = (target / aspect).sqrt().round() as usize;
        if 0 < cw && cw <= w && 0 < ch && ch <= h {
            let top = rng.below((h - ch + 1) as u64) as usize;
            let left = rng.below((w - cw + 1) as u64) as usize;
            return (top, left, ch, cw);
        }
    }
    let in_ratio = w as f64 / h as f64;
    let (ch, cw) = if in_ratio < ratio.0.min(ratio.1) {
        (
            ((w as f64 / ratio.0.min(ratio.1)).round() as usize).clamp(1, h),
            w,
        )
    } else if in_ratio > ratio.0.max(ratio.1) {
        (
            h,
            ((h as f64 * ratio.0.max(ratio.1)).round() as usize).clamp(1, w),
        )
    } else {
        (h, w)
    };
    ((h - ch) / 2, (w - cw) / 2, ch, cw)
}

/// Random resized crop (Szegedy et al. 2015, "Inception" crops; torchvision `RandomResizedCrop`): a box
/// from [`resized_crop_box`], resized back to the input size with [`crop_resize`]. SimCLR uses scale
/// 0.08–1, ratio 3/4–4/3.
#[derive(Clone, Copy, Debug)]
pub struct RandomResizedCrop {
    pub scale: (f64, f64),
    pub ratio: (f64, f64),
}

impl RandomResizedCrop {
    pub fn new(scale: (f64, f64), ratio: (f64, f64)) -> Self {
        assert!(
            0.0 < scale.0 && scale.0 <= scale.1 && scale.1 <= 1.0,
            "RandomResizedCrop: scale {scale:?} must satisfy 0 < lo ≤ hi ≤ 1"
        );
        assert!(
            0.0 < ratio.0 && ratio.0 <= ratio.1,
            "RandomResizedCrop: ratio {ratio:?} must satisfy 0 < lo ≤ hi"
        );
        RandomResizedCrop { scale, ratio }
    }
}

impl Transform for RandomResizedCrop {
    fn apply(&self, x: &mut [f32], shape: &[usize], rng: &mut MixRng, scratch: &mut Vec<f32>) {
        let (_, h, w) = chw(shape);
        if h == 0 || w == 0 {
            return;
        }
        let (top, left, ch, cw) = resized_crop_box(h, w, self.scale, self.ratio, rng);
        crop_resize(x, shape, top, left, ch, cw, scratch);
    }
}

/// Horizontal flip with probability `p` (one uniform draw; flips when `u < p`).
#[derive(Clone, Copy, Debug)]
pub struct HorizontalFlip {
    pub p: f64,
}

impl HorizontalFlip {
    pub fn new(p: f64) -> Self {
        HorizontalFlip { p }
    }
}

impl Transform for HorizontalFlip {
    fn apply(&self, x: &mut [f32], shape: &[usize], rng: &mut MixRng, _: &mut Vec<f32>) {
        if rng.uniform() < self.p {
            hflip(x, shape);
        }
    }
}

/// Random translation as a padded random crop (torchvision `RandomCrop(size, padding)`; FixMatch's weak
/// augmentation with 12.5 % reflect padding): `i ~ below(2·pad_h + 1)`, then `j ~ below(2·pad_w + 1)`,
/// and [`shift`] by `(i − pad_h, j − pad_w)`.
#[derive(Clone, Copy, Debug)]
pub struct PadCrop {
    pub pad_h: usize,
    pub pad_w: usize,
    pub padding: Padding,
}

impl PadCrop {
    pub fn reflect(pad_h: usize, pad_w: usize) -> Self {
        PadCrop {
            pad_h,
            pad_w,
            padding: Padding::Reflect,
        }
    }

    pub fn zeros(pad_h: usize, pad_w: usize) -> Self {
        PadCrop {
            pad_h,
            pad_w,
            padding: Padding::Constant(0.0),
        }
    }
}

impl Transform for PadCrop {
    fn apply(&self, x: &mut [f32], shape: &[usize], rng: &mut MixRng, scratch: &mut Vec<f32>) {
        let i = rng.below(2 * self.pad_h as u64 + 1) as isize;
        let j = rng.below(2 * self.pad_w as u64 + 1) as isize;
        shift(
            x,
            shape,
            i - self.pad_h as isize,
            j - self.pad_w as isize,
            self.padding,
            scratch,
        );
    }
}

/// Colour jitter (torchvision `ColorJitter`): factors brightness `~ U(max(0, 1 − b), 1 + b)`, contrast
/// and saturation likewise, hue shift `~ U(−h, h)`, applied in a random order. Draws: a Fisher–Yates
/// permutation of the four operations (three `below`s), then four uniforms (brightness, contrast,
/// saturation, hue), whether or not an operation is enabled. A parameter of 0 disables its operation;
/// saturation and hue are identities on one-channel images.
#[derive(Clone, Copy, Debug)]
pub struct ColorJitter {
    pub brightness: f64,
    pub contrast: f64,
    pub saturation: f64,
    pub hue: f64,
}

impl ColorJitter {
    pub fn new(brightness: f64, contrast: f64, saturation: f64, hue: f64) -> Self {
        assert!(
            brightness >= 0.0 && contrast >= 0.0 && saturation >= 0.0,
            "ColorJitter: strengths must be non-negative"
        );
        assert!(
            (0.0..=0.5).contains(&hue),
            "ColorJitter: hue {hue} must be in [0, 0.5]"
        );
        ColorJitter {
            brightness,
            contrast,
            saturation,
            hue,
        }
    }
}

impl Transform for ColorJitter {
    fn apply(&self, x: &mut [f32], shape: &[usize], rng: &mut MixRng, _: &mut Vec<f32>) {
        check_len(x, shape);
        let mut order = [0usize, 1, 2, 3];
        for i in (1..4).rev() {
            let j = rng.below(i as u64 + 1) as usize;
            order.swap(i, j);
        }
        let range = |s: f64| ((1.0 - s).max(0.0), 1.0 + s);
        let (b0, b1) = range(self.brightness);
        let (c0, c1) = range(self.contrast);
        let (s0, s1) = range(self.saturation);
        let fb = uniform_in(rng, b0, b1);
        let fc = uniform_in(rng, c0, c1);
        let fs = uniform_in(rng, s0, s1);
        let fh = uniform_in(rng, -self.hue, self.hue);
        for op in order {
            match op {
                0 if self.brightness > 0.0 => brightness(x, fb),
                1 if self.contrast > 0.0 => contrast(x, shape, fc),
                2 if self.saturation > 0.0 => saturation(x, shape, fs),
                3 if self.hue > 0.0 => hue(x, shape, fh),
                _ => {}
            }
        }
    }
}

/// Grayscale with probability `p` (torchvision `RandomGrayscale`; one uniform, converts when `u < p`),
/// see [`grayscale`].
#[derive(Clone, Copy, Debug)]
pub struct Grayscale {
    pub p: f64,
}

impl Grayscale {
    pub fn new(p: f64) -> Self {
        Grayscale { p }
    }
}

impl Transform for Grayscale {
    fn apply(&self, x: &mut [f32], shape: &[usize], rng: &mut MixRng, _: &mut Vec<f32>) {
        if rng.uniform() < self.p {
            grayscale(x, shape);
        }
    }
}

/// Gaussian blur (torchvision `GaussianBlur`): `σ ~ U(sigma)` (one uniform), the same σ along both
/// axes, kernel [`blur_kernel`]`(kernel_size, σ)`, [`blur`] with reflect padding.
#[derive(Clone, Copy, Debug)]
pub struct GaussianBlur {
    pub kernel_size: usize,
    pub sigma: (f64, f64),
}

impl GaussianBlur {
    pub fn new(kernel_size: usize, sigma: (f64, f64)) -> Self {
        assert!(
            kernel_size % 2 == 1,
            "GaussianBlur: kernel size {kernel_size} must be odd"
        );
        assert!(
            0.0 < sigma.0 && sigma.0 <= sigma.1,
            "GaussianBlur: sigma range {sigma:?} must satisfy 0 < lo ≤ hi"
        );
        GaussianBlur { kernel_size, sigma }
    }
}

impl Transform for GaussianBlur {
    fn apply(&self, x: &mut [f32], shape: &[usize], rng: &mut MixRng, scratch: &mut Vec<f32>) {
        let sigma = uniform_in(rng, self.sigma.0, self.sigma.1);
        blur(x, shape, &blur_kernel(self.kernel_size, sigma), scratch);
    }
}

/// Cutout (DeVries & Taylor 2017): `holes` squares of `size × size` set to 0 in every channel, centres
/// uniform over the image and clipped at the borders — the draws of the batch Cutout
/// ([`crate::regions::cutout_regions_2d`]: `cy` then `cx` per hole).
#[derive(Clone, Copy, Debug)]
pub struct Cutout {
    pub holes: usize,
    pub size: usize,
}

impl Cutout {
    pub fn new(holes: usize, size: usize) -> Self {
        Cutout { holes, size }
    }
}

impl Transform for Cutout {
    fn apply(&self, x: &mut [f32], shape: &[usize], rng: &mut MixRng, _: &mut Vec<f32>) {
        let (_, h, w) = chw(shape);
        if h == 0 || w == 0 {
            return;
        }
        let boxes = cutout_regions_2d(h as i64, w as i64, self.holes, self.size as i64, rng);
        erase(x, shape, &boxes, 0.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ramp(c: usize, h: usize, w: usize) -> Vec<f32> {
        let n = c * h * w;
        (0..n).map(|i| i as f32 / n as f32).collect()
    }

    #[test]
    fn hsv_round_trips() {
        for &(r, g, b) in &[
            (1.0, 0.0, 0.0),
            (0.2, 0.7, 0.4),
            (0.9, 0.9, 0.1),
            (0.3, 0.3, 0.3),
            (0.1, 0.2, 0.95),
        ] {
            let (h, s, v) = rgb_to_hsv(r, g, b);
            let (r2, g2, b2) = hsv_to_rgb(h, s, v);
            assert!((r - r2).abs() + (g - g2).abs() + (b - b2).abs() < 1e-5);
        }
        // Pure red shifted by a third of a turn is pure green.
        let mut x = vec![1.0, 0.0, 0.0];
        hue(&mut x, &[3, 1, 1], 1.0 / 3.0);
        assert!((x[0]).abs() < 1e-5 && (x[1] - 1.0).abs() < 1e-5 && x[2].abs() < 1e-5);
    }

    #[test]
    fn shift_reflect_and_constant() {
        // One row 0 1 2 3 shifted by dx = −2 (content moves right): reflect gives 2 1 0 1.
        let mut x = vec![0.0, 1.0, 2.0, 3.0];
        shift(&mut x, &[1, 1, 4], 0, -2, Padding::Reflect, &mut Vec::new());
        assert_eq!(x, [2.0, 1.0, 0.0, 1.0]);
        let mut y = vec![0.0, 1.0, 2.0, 3.0];
        shift(
            &mut y,
            &[1, 1, 4],
            0,
            1,
            Padding::Constant(0.5),
            &mut Vec::new(),
        );
        assert_eq!(y, [1.0, 2.0, 3.0, 0.5]);
    }

    #[test]
    fn crop_resize_of_the_full_image_is_the_identity_and_upsamples_bilinearly() {
        let x = ramp(2, 5, 7);
        let mut y = x.clone();
        crop_resize(&mut y, &[2, 5, 7], 0, 0, 5, 7, &mut Vec::new());
        assert_eq!(x, y);
        // A 1×2 region [a, b] upsampled to width 4: sources max(0, (o + ½)/2 − ½) = 0, 0.25, 0.75, 1.25→
        // clamped neighbours: a, a + ¼(b − a), a + ¾(b − a), b.
        let mut z = vec![0.0, 1.0, 0.0, 0.0];
        crop_resize(&mut z, &[1, 1, 4], 0, 0, 1, 2, &mut Vec::new());
        assert_eq!(z, [0.0, 0.25, 0.75, 1.0]);
    }

    #[test]
    fn warp_identity_and_integer_translation() {
        let x = ramp(1, 4, 4);
        for interp in [Interpolation::Nearest, Interpolation::Bilinear] {
            let mut y = x.clone();
            warp(
                &mut y,
                &[1, 4, 4],
                [1.0, 0.0, 0.0, 0.0, 1.0, 0.0],
                interp,
                0.0,
                &mut Vec::new(),
            );
            assert_eq!(x, y);
            let mut t = x.clone();
            // Source x = x − 1: content moves right by one, column 0 filled.
            warp(
                &mut t,
                &[1, 4, 4],
                [1.0, 0.0, -1.0, 0.0, 1.0, 0.0],
                interp,
                0.0,
                &mut Vec::new(),
            );
            for r in 0..4 {
                assert_eq!(t[r * 4], 0.0);
                assert_eq!(&t[r * 4 + 1..r * 4 + 4], &x[r * 4..r * 4 + 3]);
            }
        }
    }

    #[test]
    fn color_ops_keep_the_unit_interval() {
        let mut rng = MixRng::new(5);
        let jitter = ColorJitter::new(0.8, 0.8, 0.8, 0.5);
        for _ in 0..50 {
            let mut x: Vec<f32> = (0..3 * 8 * 8).map(|_| rng.uniform() as f32).collect();
            jitter.apply(&mut x, &[3, 8, 8], &mut rng, &mut Vec::new());
            assert!(x.iter().all(|v| (0.0..=1.0).contains(v)));
        }
    }

    #[test]
    fn resized_crop_box_falls_back_to_a_centred_box() {
        // An impossible scale range never fits in 10 tries: the fallback clamps the ratio.
        let mut rng = MixRng::new(0);
        let b = resized_crop_box(4, 16, (1.0, 1.0), (1.0, 1.0), &mut rng);
        assert_eq!(b, (0, 6, 4, 4));
    }
}
