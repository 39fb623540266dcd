//! Regions of one sample — 1-D spans and 2-D boxes — and the seeded cutout holes drawn from them. Pure
//! geometry on positions, shared by the raw-buffer augmentations here and the tensor mixing functions
//! of the worker (`butler_worker::mixing`).

use crate::rng::MixRng;

/// A half-open interval `start..end` of a 1-D sample's positions (the last dimension).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Span {
    pub start: i64,
    pub end: i64,
}

impl Span {
    /// The span of `size` positions starting at `centre − ⌊size/2⌋`, clipped to `[0, len)`: a region
    /// of exactly `size` positions wherever it fits, and its part inside the sample otherwise. This is
    /// the rule for 1-D CutMix and for cutout holes.
    pub fn centred(centre: i64, size: i64, len: i64) -> Span {
        let start = centre - size / 2;
        Span {
            start: start.clamp(0, len),
            end: (start + size).clamp(0, len),
        }
    }

    pub fn len(&self) -> i64 {
        (self.end - self.start).max(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A half-open box `y1..y2` × `x1..x2` of a 2-D sample's positions (rows are dimension −2, columns −1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Box2d {
    pub y1: i64,
    pub y2: i64,
    pub x1: i64,
    pub x2: i64,
}

impl Box2d {
    /// Exact-size rule (cutout holes): `size_h × size_w` positions starting at
    /// `(cy − ⌊size_h/2⌋, cx − ⌊size_w/2⌋)`, clipped to the `h × w` sample.
    pub fn centred(cy: i64, cx: i64, size_h: i64, size_w: i64, h: i64, w: i64) -> Box2d {
        let rows = Span::centred(cy, size_h, h);
        let cols = Span::centred(cx, size_w, w);
        Box2d {
            y1: rows.start,
            y2: rows.end,
            x1: cols.start,
            x2: cols.end,
        }
    }

    /// The CutMix reference implementation's rule: `x1 = clip(cx − ⌊cut_w/2⌋)`,
    /// `x2 = clip(cx + ⌊cut_w/2⌋)`, the same for rows. It is kept as published so that results compare
    /// with the paper's; note that an odd cut covers `cut − 1` positions before clipping (λ is corrected
    /// from the true area anyway, see `butler_worker::mixing::cutmix_apply`).
    pub fn cutmix_reference(cy: i64, cx: i64, cut_h: i64, cut_w: i64, h: i64, w: i64) -> Box2d {
        Box2d {
            y1: (cy - cut_h / 2).clamp(0, h),
            y2: (cy + cut_h / 2).clamp(0, h),
            x1: (cx - cut_w / 2).clamp(0, w),
            x2: (cx + cut_w / 2).clamp(0, w),
        }
    }

    pub fn area(&self) -> i64 {
        (self.y2 - self.y1).max(0) * (self.x2 - self.x1).max(0)
    }
}

/// `n_holes` cutout holes of `size` positions for one 1-D sample of `len` positions, each centred at a
/// uniform position in `[0, len)` and clipped (see [`Span::centred`]); holes may overlap. Call it once
/// per sample: the worker's `mixing::cutout` takes one list per sample.
pub fn cutout_regions_1d(len: i64, n_holes: usize, size: i64, rng: &mut MixRng) -> Vec<Span> {
    assert!(len > 0, "cutout_regions_1d: empty sample");
    (0..n_holes)
        .map(|_| Span::centred(rng.below(len as u64) as i64, size, len))
        .collect()
}

/// `n_holes` square `size × size` cutout holes for one `h × w` sample, centres uniform over the whole
/// sample (`cy` drawn before `cx`), clipped at the borders (see [`Box2d::centred`]). Call it once per
/// sample.
pub fn cutout_regions_2d(
    h: i64,
    w: i64,
    n_holes: usize,
    size: i64,
    rng: &mut MixRng,
) -> Vec<Box2d> {
    assert!(h > 0 && w > 0, "cutout_regions_2d: empty sample {h}×{w}");
    (0..n_holes)
        .map(|_| {
            let cy = rng.below(h as u64) as i64;
            let cx = rng.below(w as u64) as i64;
            Box2d::centred(cy, cx, size, size, h, w)
        })
        .collect()
}
