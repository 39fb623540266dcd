//! 1-D signal augmentations: the transformations of the MNIST-1D generator (Greydanus & Steinbach,
//! `mnist1d/transform.py`) turned into per-sample augmentations, plus 1-D Cutout.
//!
//! Samples are `[L]` or `[C, L]`; every transform acts along the last axis and draws its parameters once
//! per sample, so all channels of a sample move together (noise excepted: it is drawn per value).

use super::transform::{check_len, symmetric_index, Transform};
use crate::regions::cutout_regions_1d;
use crate::rng::MixRng;

/// `(channels, length)` of a 1-D sample shape.
///
/// # Panics
/// Unless the shape is `[L]` or `[C, L]`.
pub fn channels_len(shape: &[usize]) -> (usize, usize) {
    match *shape {
        [l] => (1, l),
        [c, l] => (c, l),
        _ => panic!("1-D augmentation: a sample must be [L] or [C, L], got {shape:?}"),
    }
}

/// Circular shift of every channel by `k` positions to the right: `out[i] = x[(i − k) mod L]`
/// (`np.roll(x, k)`; MNIST-1D's `translate` is `concat(x[−k:], x[:−k])`, the same for `0 ≤ k < L`).
/// Negative `k` shifts left.
pub fn roll(x: &mut [f32], shape: &[usize], k: i64) {
    check_len(x, shape);
    let (_, l) = channels_len(shape);
    if l == 0 {
        return;
    }
    let k = k.rem_euclid(l as i64) as usize;
    for row in x.chunks_exact_mut(l) {
        row.rotate_right(k);
    }
}

/// Multiplies every value by `factor` (MNIST-1D's scale step, `x · (1 + coeff·(u − ½))`).
pub fn scale(x: &mut [f32], factor: f64) {
    let f = factor as f32;
    x.iter_mut().for_each(|v| *v *= f);
}

/// Subtracts the ramp `coeff · linspace(−½, ½, L)` from every channel (MNIST-1D's `shear`):
/// `out[i] = x[i] − coeff·(i/(L − 1) − ½)`; for `L = 1` the ramp is `[−½]`, as NumPy's `linspace`.
pub fn shear(x: &mut [f32], shape: &[usize], coeff: f64) {
    check_len(x, shape);
    let (_, l) = channels_len(shape);
    if l == 0 {
        return;
    }
    let step = if l > 1 { 1.0 / (l - 1) as f64 } else { 0.0 };
    for row in x.chunks_exact_mut(l) {
        for (i, v) in row.iter_mut().enumerate() {
            *v -= (coeff * (i as f64 * step - 0.5)) as f32;
        }
    }
}

/// The normalized Gaussian kernel `exp(−t²/(2σ²))`, `t = −r..=r`, with SciPy's radius
/// `r = ⌊4σ + ½⌋` (`gaussian_filter`'s default `truncate = 4`).
pub fn gaussian_kernel_1d(sigma: f64) -> Vec<f32> {
    assert!(
        sigma > 0.0 && sigma.is_finite(),
        "gaussian kernel: sigma {sigma} must be positive"
    );
    let r = (4.0 * sigma + 0.5) as isize;
    let w: Vec<f64> = (-r..=r)
        .map(|t| (-0.5 * (t as f64 / sigma).powi(2)).exp())
        .collect();
    let sum: f64 = w.iter().sum();
    w.iter().map(|v| (v / sum) as f32).collect()
}

/// Smooths every channel with `kernel` (odd length, centred), SciPy's `reflect` boundary
/// (`c b a | a b c | c b a`). `scratch` receives the unsmoothed copy.
pub fn smooth(x: &mut [f32], shape: &[usize], kernel: &[f32], scratch: &mut Vec<f32>) {
    check_len(x, shape);
    scratch.clear();
    scratch.extend_from_slice(x);
    x.fill(0.0);
    add_smoothed(x, scratch, channels_len(shape).1, kernel);
}

/// `out += src` smoothed row by row (rows of `l` values) with `kernel`, as [`smooth`].
fn add_smoothed(out: &mut [f32], src: &[f32], l: usize, kernel: &[f32]) {
    assert!(
        kernel.len() % 2 == 1,
        "smooth: the kernel length must be odd"
    );
    if l == 0 {
        return;
    }
    let r = (kernel.len() / 2) as isize;
    for (o_row, s_row) in out.chunks_exact_mut(l).zip(src.chunks_exact(l)) {
        for (i, o) in o_row.iter_mut().enumerate() {
            let mut acc = 0.0f32;
            for (t, &k) in kernel.iter().enumerate() {
                acc += k * s_row[symmetric_index(i as isize + t as isize - r, l)];
            }
            *o += acc;
        }
    }
}

/// Random circular shift (MNIST-1D's `translate`), symmetric: `k` uniform in `−max_shift..=max_shift`
/// (one draw, `below(2·max_shift + 1)`), then [`roll`]. The generator's own translate shifts right by
/// `0..max_translation`, which is the same family once `max_translation ≥ L`.
#[derive(Clone, Copy, Debug)]
pub struct Roll {
    pub max_shift: usize,
}

impl Roll {
    pub fn new(max_shift: usize) -> Self {
        Roll { max_shift }
    }
}

impl Transform for Roll {
    fn apply(&self, x: &mut [f32], shape: &[usize], rng: &mut MixRng, _: &mut Vec<f32>) {
        let m = self.max_shift as u64;
        let k = rng.below(2 * m + 1) as i64 - m as i64;
        roll(x, shape, k);
    }
}

/// Random amplitude scale (MNIST-1D's scale step): factor `1 + coeff·(u − ½)` from one uniform draw, so
/// in `[1 − coeff/2, 1 + coeff/2)`; the generator uses coeff = 0.4.
#[derive(Clone, Copy, Debug)]
pub struct AmplitudeScale {
    pub coeff: f64,
}

impl AmplitudeScale {
    pub fn new(coeff: f64) -> Self {
        AmplitudeScale { coeff }
    }
}

impl Transform for AmplitudeScale {
    fn apply(&self, x: &mut [f32], shape: &[usize], rng: &mut MixRng, _: &mut Vec<f32>) {
        check_len(x, shape);
        scale(x, 1.0 + self.coeff * (rng.uniform() - 0.5));
    }
}

/// Random shear ramp (MNIST-1D's `shear`): slope `coeff = scale·(u − ½)` from one uniform draw, then
/// [`shear`]; the generator uses scale = 0.75.
#[derive(Clone, Copy, Debug)]
pub struct Shear {
    pub scale: f64,
}

impl Shear {
    pub fn new(scale: f64) -> Self {
        Shear { scale }
    }
}

impl Transform for Shear {
    fn apply(&self, x: &mut [f32], shape: &[usize], rng: &mut MixRng, _: &mut Vec<f32>) {
        shear(x, shape, self.scale * (rng.uniform() - 0.5));
    }
}

/// Adds i.i.d. Gaussian noise `std·N(0, 1)` to every value (MNIST-1D's `iid_noise_like`, scale 0.02),
/// drawn in memory order (channel-major).
#[derive(Clone, Copy, Debug)]
pub struct GaussianNoise {
    pub std: f64,
}

impl GaussianNoise {
    pub fn new(std: f64) -> Self {
        GaussianNoise { std }
    }
}

impl Transform for GaussianNoise {
    fn apply(&self, x: &mut [f32], shape: &[usize], rng: &mut MixRng, _: &mut Vec<f32>) {
        check_len(x, shape);
        for v in x.iter_mut() {
            *v += (self.std * rng.normal()) as f32;
        }
    }
}

/// Adds correlated noise (MNIST-1D's `corr_noise_like`): i.i.d. `std·N(0, 1)` values, drawn in memory
/// order, smoothed along the length with a Gaussian of standard deviation `sigma` positions
/// (`scipy.ndimage.gaussian_filter(noise, 2)`, SciPy's radius and `reflect` boundary). The generator uses
/// std 0.25, σ = 2, and adds it only where the signal is padding; as an augmentation it is added
/// everywhere. Differences from SciPy for `[C, L]`: channels are smoothed independently (SciPy would also
/// smooth across channels).
#[derive(Clone, Debug)]
pub struct CorrelatedNoise {
    pub std: f64,
    pub sigma: f64,
    kernel: Vec<f32>,
}

impl CorrelatedNoise {
    pub fn new(std: f64, sigma: f64) -> Self {
        CorrelatedNoise {
            std,
            sigma,
            kernel: gaussian_kernel_1d(sigma),
        }
    }
}

impl Transform for CorrelatedNoise {
    fn apply(&self, x: &mut [f32], shape: &[usize], rng: &mut MixRng, scratch: &mut Vec<f32>) {
        check_len(x, shape);
        scratch.clear();
        scratch.extend((0..x.len()).map(|_| (self.std * rng.normal()) as f32));
        add_smoothed(x, scratch, channels_len(shape).1, &self.kernel);
    }
}

/// 1-D Cutout (DeVries & Taylor 2017 on signals): `holes` spans of `size` positions set to zero in every
/// channel, centres uniform, clipped at the ends — the same draws as the batch Cutout
/// ([`crate::regions::cutout_regions_1d`]).
#[derive(Clone, Copy, Debug)]
pub struct Cutout1d {
    pub holes: usize,
    pub size: usize,
}

impl Cutout1d {
    pub fn new(holes: usize, size: usize) -> Self {
        Cutout1d { holes, size }
    }
}

impl Transform for Cutout1d {
    fn apply(&self, x: &mut [f32], shape: &[usize], rng: &mut MixRng, _: &mut Vec<f32>) {
        check_len(x, shape);
        let (_, l) = channels_len(shape);
        let spans = cutout_regions_1d(l as i64, self.holes, self.size as i64, rng);
        for row in x.chunks_exact_mut(l) {
            for s in &spans {
                row[s.start as usize..s.end as usize].fill(0.0);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roll_matches_numpy_roll() {
        let mut x: Vec<f32> = (0..5).map(|v| v as f32).collect();
        roll(&mut x, &[5], 2);
        assert_eq!(x, [3.0, 4.0, 0.0, 1.0, 2.0]);
        roll(&mut x, &[5], -2);
        assert_eq!(x, [0.0, 1.0, 2.0, 3.0, 4.0]);
        let mut y = vec![0.0, 1.0, 2.0, 10.0, 11.0, 12.0];
        roll(&mut y, &[2, 3], 7);
        assert_eq!(y, [2.0, 0.0, 1.0, 12.0, 10.0, 11.0]);
    }

    #[test]
    fn shear_subtracts_a_centred_ramp() {
        let mut x = vec![0.0f32; 5];
        shear(&mut x, &[5], 2.0);
        assert_eq!(x, [1.0, 0.5, 0.0, -0.5, -1.0]);
        let mut one = vec![0.0f32];
        shear(&mut one, &[1], 2.0);
        assert_eq!(one, [1.0]);
    }

    #[test]
    fn gaussian_kernel_matches_scipy_radius_and_sums_to_one() {
        let k = gaussian_kernel_1d(2.0);
        assert_eq!(k.len(), 17);
        assert!((k.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!(k[8] > k[7] && (k[7] - k[9]).abs() < 1e-9);
        let mut c = vec![3.0f32; 10];
        smooth(&mut c, &[10], &k, &mut Vec::new());
        assert!(c.iter().all(|v| (v - 3.0).abs() < 1e-5));
    }

    #[test]
    fn correlated_noise_is_smoother_than_iid_noise() {
        let mut rng = MixRng::new(3);
        let (mut a, mut b) = (vec![0.0f32; 4000], vec![0.0f32; 4000]);
        CorrelatedNoise::new(1.0, 2.0).apply(&mut a, &[4000], &mut rng, &mut Vec::new());
        GaussianNoise::new(1.0).apply(&mut b, &[4000], &mut rng, &mut Vec::new());
        let lag1 = |v: &[f32]| {
            let var: f32 = v.iter().map(|x| x * x).sum();
            v.windows(2).map(|w| w[0] * w[1]).sum::<f32>() / var
        };
        assert!(lag1(&a) > 0.8, "{}", lag1(&a));
        assert!(lag1(&b).abs() < 0.1, "{}", lag1(&b));
    }
}
