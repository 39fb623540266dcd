//! Sample-mixing data regularization — mixup (Zhang et al. 2018), CutMix (Yun et al. 2019) and cutout
//! (DeVries & Taylor 2017) — as pure tensor functions plus the seeded randomness that drives them.
//!
//! Randomness and tensor work are kept apart: the caller draws λ and the regions from a [`MixRng`] (our
//! own SplitMix64-based generator, so a run is reproducible from its seed in any process or language),
//! and the tensor functions are deterministic in their arguments, which is what lets the golden tests
//! compare them with PyTorch for given regions.
//!
//! **Pairing.** A batch is mixed with itself reversed: sample `i` is paired with sample `B − 1 − i`. The
//! data order is already a seeded shuffle, so reversing gives random pairs without drawing a permutation,
//! it works for every batch size, and a rank needs nothing from the other ranks. In an odd batch the
//! middle sample is paired with itself, so it comes out unchanged (its targets too); a batch of one is
//! returned as it came.
//!
//! **Layouts.** Samples are 1-D (`x` is `[B, L]` or `[B, C, L]`) or 2-D (`[B, C, H, W]`); the regions
//! refer to the last one or two (spatial) dimensions and cover every channel. Targets are soft, `[B, K]`
//! probabilities (see [`crate::losses::one_hot`]). No function modifies its inputs.

pub use butler_data::regions::{cutout_regions_1d, cutout_regions_2d, Box2d, Span};
pub use butler_data::rng::MixRng;
use tch::Tensor;

/// A region of one sample, 1-D or 2-D. One type lets [`cutmix_apply`] and [`cutout`] serve both kinds
/// of data; the region's kind must match the layout of `x` (a [`Span`] for `[B, L]`/`[B, C, L]`, a
/// [`Box2d`] for `[B, C, H, W]`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CutRegion {
    Span(Span),
    Box(Box2d),
}

impl From<Span> for CutRegion {
    fn from(s: Span) -> Self {
        CutRegion::Span(s)
    }
}

impl From<Box2d> for CutRegion {
    fn from(b: Box2d) -> Self {
        CutRegion::Box(b)
    }
}

impl CutRegion {
    /// Number of spatial positions covered (per channel).
    pub fn area(&self) -> i64 {
        match self {
            CutRegion::Span(s) => s.len(),
            CutRegion::Box(b) => b.area(),
        }
    }

    fn spatial_dims(&self) -> usize {
        match self {
            CutRegion::Span(_) => 1,
            CutRegion::Box(_) => 2,
        }
    }
}

/// The label weight a CutMix region implies: `1 − area / total`, the fraction of the sample that still
/// comes from itself (`total` is `L` or `H·W`).
pub fn lam_from_region(region: impl Into<CutRegion>, total: i64) -> f64 {
    assert!(total > 0, "lam_from_region: the sample has no positions");
    1.0 - region.into().area() as f64 / total as f64
}

/// `λ·a + (1 − λ)·a.flip(0)`: every sample blended with its partner in the reversed batch.
fn blend_with_reversed(a: &Tensor, lam: f64) -> Tensor {
    a * lam + a.flip(0) * (1.0 - lam)
}

/// mixup: `x' = λ·x + (1 − λ)·x.flip(0)` and the same for the soft targets `y` (`[B, K]`). λ is usually
/// drawn per batch as `rng.beta(α, α)`.
///
/// # Panics
/// If `x` and `y` disagree on the batch size.
pub fn mixup(x: &Tensor, y: &Tensor, lam: f64) -> (Tensor, Tensor) {
    check_batch(x, y, "mixup");
    (blend_with_reversed(x, lam), blend_with_reversed(y, lam))
}

/// A 1-D CutMix span for a sample of `len` positions: `round(len·(1 − λ))` positions (the 1-D analogue
/// of the box's area fraction 1 − λ; `f64::round`, halves away from zero) centred at a uniform position
/// in `[0, len)`, clipped (see [`Span::centred`]).
///
/// # Panics
/// If `len` is not positive or `lam` is outside `[0, 1]`.
pub fn cutmix_span_1d(len: i64, lam: f64, rng: &mut MixRng) -> Span {
    assert!(len > 0, "cutmix_span_1d: empty sample");
    assert!(
        (0.0..=1.0).contains(&lam),
        "cutmix_span_1d: lambda {lam} is outside [0, 1]"
    );
    let size = (len as f64 * (1.0 - lam)).round() as i64;
    let centre = rng.below(len as u64) as i64;
    Span::centred(centre, size, len)
}

/// A 2-D CutMix box for an `h × w` sample, the paper's rule: cut ratio `r = √(1 − λ)`,
/// `cut_w = ⌊w·r⌋`, `cut_h = ⌊h·r⌋`, centre uniform (`cx` drawn first in `[0, w)`, then `cy` in
/// `[0, h)`), clipped as the reference implementation does (see [`Box2d::cutmix_reference`]).
///
/// # Panics
/// If a side is not positive or `lam` is outside `[0, 1]`.
pub fn cutmix_box_2d(h: i64, w: i64, lam: f64, rng: &mut MixRng) -> Box2d {
    assert!(h > 0 && w > 0, "cutmix_box_2d: empty sample {h}×{w}");
    assert!(
        (0.0..=1.0).contains(&lam),
        "cutmix_box_2d: lambda {lam} is outside [0, 1]"
    );
    let r = (1.0 - lam).sqrt();
    let cut_w = (w as f64 * r).floor() as i64;
    let cut_h = (h as f64 * r).floor() as i64;
    let cx = rng.below(w as u64) as i64;
    let cy = rng.below(h as u64) as i64;
    Box2d::cutmix_reference(cy, cx, cut_h, cut_w, h, w)
}

/// CutMix: pastes `region` of every sample's partner (the reversed batch) into a copy of `x`, and mixes
/// the soft targets with the λ the region actually realizes, `1 − area/total`: after clipping at the
/// border the pasted area is smaller than the drawn λ asked for, and the labels must follow the pixels.
/// Returns `(mixed x, mixed targets, λ)`.
///
/// # Panics
/// If the region's kind does not match the layout of `x` (see [`CutRegion`]), lies outside the sample,
/// or `x` and `y` disagree on the batch size.
pub fn cutmix_apply(x: &Tensor, y: &Tensor, region: impl Into<CutRegion>) -> (Tensor, Tensor, f64) {
    let region = region.into();
    check_batch(x, y, "cutmix_apply");
    let spatial = spatial_shape(x, region.spatial_dims(), "cutmix_apply");
    let mut mask = vec![false; spatial.iter().product::<i64>() as usize];
    mark(&mut mask, &region, &spatial, "cutmix_apply");
    let mask = Tensor::from_slice(&mask)
        .reshape(&spatial)
        .to_device(x.device());
    // `where_self` broadcasts the spatial mask over batch and channels and allocates a new tensor.
    let mixed = x.flip(0).where_self(&mask, x);
    let lam = lam_from_region(region, spatial.iter().product());
    (mixed, blend_with_reversed(y, lam), lam)
}

/// cutout: a copy of `x` with every sample's holes set to zero in all channels. `holes` has one list per
/// sample, because per-sample holes are the method as published (each image gets its own mask) and a
/// batch-wide hole would erase the same positions from every sample of a step; an empty list leaves its
/// sample unchanged.
///
/// # Panics
/// If `holes.len()` is not the batch size, or a hole's kind does not match the layout of `x` or lies
/// outside the sample.
pub fn cutout<R: Into<CutRegion> + Copy>(x: &Tensor, holes: &[Vec<R>]) -> Tensor {
    assert!(
        x.dim() >= 2,
        "cutout: x must be batched, got {:?}",
        x.size()
    );
    let batch = x.size()[0];
    assert_eq!(
        holes.len() as i64,
        batch,
        "cutout: one list of holes per sample is required"
    );
    let dims = match x.dim() {
        4 => 2,
        _ => 1,
    };
    let spatial = spatial_shape(x, dims, "cutout");
    let per_sample = spatial.iter().product::<i64>() as usize;
    let mut mask = vec![false; per_sample * batch as usize];
    for (sample, regions) in mask.chunks_mut(per_sample).zip(holes) {
        for &r in regions {
            mark(sample, &r.into(), &spatial, "cutout");
        }
    }
    // [B, 1, spatial…] when there is a channel dimension, so the mask covers every channel.
    let mut shape = vec![batch];
    if x.dim() == dims + 2 {
        shape.push(1);
    }
    shape.extend_from_slice(&spatial);
    let mask = Tensor::from_slice(&mask)
        .reshape(&shape)
        .to_device(x.device());
    x.masked_fill(&mask, 0.0)
}

fn check_batch(x: &Tensor, y: &Tensor, what: &str) {
    assert!(
        x.dim() >= 1 && y.dim() == 2,
        "{what}: x must be batched and y must be [B, K] soft targets, got {:?} and {:?}",
        x.size(),
        y.size()
    );
    assert_eq!(
        x.size()[0],
        y.size()[0],
        "{what}: x and y disagree on the batch size"
    );
}

/// The spatial sizes of `x` for a region of `dims` spatial dimensions, checking the layout.
fn spatial_shape(x: &Tensor, dims: usize, what: &str) -> Vec<i64> {
    let size = x.size();
    let ok = match dims {
        1 => size.len() == 2 || size.len() == 3,
        _ => size.len() == 4,
    };
    assert!(
        ok,
        "{what}: a {dims}-D region needs x as {}, got {size:?}",
        if dims == 1 {
            "[B, L] or [B, C, L]"
        } else {
            "[B, C, H, W]"
        }
    );
    size[size.len() - dims..].to_vec()
}

/// Sets the positions of `region` in a row-major mask of one sample's `spatial` shape.
fn mark(mask: &mut [bool], region: &CutRegion, spatial: &[i64], what: &str) {
    match (region, spatial) {
        (CutRegion::Span(s), &[len]) => {
            assert!(
                0 <= s.start && s.start <= s.end && s.end <= len,
                "{what}: {s:?} is outside a sample of {len} positions"
            );
            mask[s.start as usize..s.end as usize].fill(true);
        }
        (CutRegion::Box(b), &[h, w]) => {
            assert!(
                0 <= b.y1 && b.y1 <= b.y2 && b.y2 <= h && 0 <= b.x1 && b.x1 <= b.x2 && b.x2 <= w,
                "{what}: {b:?} is outside a {h}×{w} sample"
            );
            for row in b.y1..b.y2 {
                let at = (row * w) as usize;
                mask[at + b.x1 as usize..at + b.x2 as usize].fill(true);
            }
        }
        _ => panic!("{what}: {region:?} does not fit samples of spatial shape {spatial:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    fn moments(draws: &[f64]) -> (f64, f64) {
        let n = draws.len() as f64;
        let mean = draws.iter().sum::<f64>() / n;
        let var = draws.iter().map(|d| (d - mean).powi(2)).sum::<f64>() / (n - 1.0);
        (mean, var)
    }

    #[test]
    fn beta_has_the_right_mean_and_variance() {
        let mut rng = MixRng::new(42);
        for (a, b) in [(0.2, 0.2), (0.4, 0.4), (1.0, 1.0), (2.0, 5.0), (0.5, 3.0)] {
            let draws: Vec<f64> = (0..200_000).map(|_| rng.beta(a, b)).collect();
            assert!(draws.iter().all(|d| (0.0..=1.0).contains(d)));
            let (mean, var) = moments(&draws);
            let want_mean = a / (a + b);
            let want_var = a * b / ((a + b) * (a + b) * (a + b + 1.0));
            assert!(
                (mean - want_mean).abs() < 0.005,
                "Beta({a}, {b}) mean {mean} vs {want_mean}"
            );
            assert!(
                (var / want_var - 1.0).abs() < 0.03,
                "Beta({a}, {b}) variance {var} vs {want_var}"
            );
        }
    }

    #[test]
    fn gamma_has_mean_and_variance_equal_to_its_shape() {
        let mut rng = MixRng::new(3);
        for shape in [0.3, 1.0, 4.5] {
            let draws: Vec<f64> = (0..200_000).map(|_| rng.gamma(shape)).collect();
            let (mean, var) = moments(&draws);
            assert!(
                (mean / shape - 1.0).abs() < 0.02,
                "shape {shape}: mean {mean}"
            );
            assert!((var / shape - 1.0).abs() < 0.05, "shape {shape}: var {var}");
        }
    }

    #[test]
    fn tiny_beta_shapes_stay_defined() {
        let mut rng = MixRng::new(8);
        let draws: Vec<f64> = (0..10_000).map(|_| rng.beta(0.01, 0.01)).collect();
        assert!(draws.iter().all(|d| (0.0..=1.0).contains(d)));
        // P(X < ε) ≈ ε^a / (a·B(a, a)) for small a; B(0.01, 0.01) ≈ 199.97, so with ε = 1e-6 each end
        // holds ≈ 0.4356 of the mass — draws that underflow in linear space.
        let near_ends = draws
            .iter()
            .filter(|&&d| !(1e-6..=1.0 - 1e-6).contains(&d))
            .count() as f64
            / draws.len() as f64;
        assert!(
            (near_ends - 0.871).abs() < 0.015,
            "near the ends: {near_ends}"
        );
        let (mean, _) = moments(&draws);
        assert!((mean - 0.5).abs() < 0.02, "mean {mean}");
    }

    #[test]
    fn same_seed_same_draws() {
        let run = |seed| {
            let mut r = MixRng::new(seed);
            (0..50)
                .map(|i| match i % 3 {
                    0 => r.uniform(),
                    1 => r.beta(0.4, 0.4),
                    _ => r.below(17) as f64,
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(run(5), run(5));
        assert_ne!(run(5), run(6));
        let mut r = MixRng::new(1);
        assert!((0..10_000)
            .map(|_| r.uniform())
            .all(|u| (0.0..1.0).contains(&u)));
    }

    #[test]
    fn spans_have_the_asked_size_unless_clipped() {
        let mut rng = MixRng::new(11);
        for len in [1i64, 7, 40] {
            for lam in [0.0, 0.3, 0.5, 0.99, 1.0] {
                for _ in 0..200 {
                    let s = cutmix_span_1d(len, lam, &mut rng);
                    assert!(0 <= s.start && s.start <= s.end && s.end <= len);
                    let want = (len as f64 * (1.0 - lam)).round() as i64;
                    assert!(s.len() <= want);
                    if s.start > 0 && s.end < len {
                        assert_eq!(s.len(), want);
                    }
                }
            }
        }
        assert_eq!(Span::centred(0, 4, 10), Span { start: 0, end: 2 });
        assert_eq!(Span::centred(9, 4, 10), Span { start: 7, end: 10 });
        assert_eq!(Span::centred(5, 3, 10), Span { start: 4, end: 7 });
    }

    #[test]
    fn boxes_follow_the_reference_rule_and_stay_inside() {
        let mut rng = MixRng::new(12);
        for _ in 0..500 {
            let b = cutmix_box_2d(8, 10, 0.4, &mut rng);
            assert!(0 <= b.y1 && b.y1 <= b.y2 && b.y2 <= 8);
            assert!(0 <= b.x1 && b.x1 <= b.x2 && b.x2 <= 10);
            // r = √0.6 ≈ 0.775: cut 6 × 7, which the reference rule makes at most 6 × 6.
            assert!(b.y2 - b.y1 <= 6 && b.x2 - b.x1 <= 6);
        }
        assert_eq!(
            Box2d::cutmix_reference(4, 4, 5, 4, 8, 8),
            Box2d {
                y1: 2,
                y2: 6,
                x1: 2,
                x2: 6
            }
        );
        assert_eq!(cutmix_box_2d(5, 5, 1.0, &mut rng).area(), 0);
    }

    #[test]
    fn odd_batches_pair_the_middle_sample_with_itself() {
        for b in [1i64, 3, 5] {
            let x = Tensor::randn([b, 2, 6], (Kind::Float, Device::Cpu));
            let y = Tensor::randn([b, 3], (Kind::Float, Device::Cpu)).softmax(-1, None);
            let keep = (x.copy(), y.copy());
            let mid = b / 2;
            let (xm, ym) = mixup(&x, &y, 0.3);
            let (xc, yc, lam) = cutmix_apply(&x, &y, Span { start: 1, end: 4 });
            assert!((lam - 0.5).abs() < 1e-15);
            for (got, want) in [(&xm, &x), (&xc, &x), (&ym, &y), (&yc, &y)] {
                let diff = (got.get(mid) - want.get(mid)).abs().max().double_value(&[]);
                assert!(diff < 1e-6, "B = {b}: the middle sample changed by {diff}");
            }
            assert!(x.equal(&keep.0) && y.equal(&keep.1), "inputs were modified");
        }
    }

    #[test]
    fn cutout_holes_are_per_sample_and_cover_all_channels() {
        let x = Tensor::ones([2, 3, 4, 5], (Kind::Float, Device::Cpu));
        let holes = vec![
            vec![Box2d::centred(0, 0, 2, 2, 4, 5)],
            vec![
                Box2d::centred(3, 4, 1, 1, 4, 5),
                Box2d::centred(3, 4, 1, 1, 4, 5),
            ],
        ];
        let out = cutout(&x, &holes);
        let zeros = |n: i64| (out.get(n).eq(0.0)).sum(Kind::Int64).int64_value(&[]);
        assert_eq!(
            zeros(0),
            3,
            "a 1 × 1 corner (the 2 × 2 hole clipped) in 3 channels"
        );
        assert_eq!(zeros(1), 3);
        assert_eq!(x.sum(Kind::Float).double_value(&[]), 120.0);
        let mut rng = MixRng::new(4);
        let a = cutout_regions_2d(4, 5, 2, 2, &mut rng);
        let b = cutout_regions_2d(4, 5, 2, 2, &mut rng);
        assert_eq!(a.len(), 2);
        assert_ne!(a, b, "each call draws fresh holes");
        assert_eq!(cutout_regions_1d(9, 3, 4, &mut rng).len(), 3);
    }

    #[test]
    #[should_panic(expected = "does not fit")]
    fn a_box_on_1d_samples_is_refused() {
        let x = Tensor::zeros([2, 8], (Kind::Float, Device::Cpu));
        let _ = cutout(
            &x,
            &vec![
                vec![Box2d {
                    y1: 0,
                    y2: 1,
                    x1: 0,
                    x2: 1,
                }];
                2
            ],
        );
    }
}
