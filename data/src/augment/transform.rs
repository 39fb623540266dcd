//! What every transform shares: the [`Transform`] trait and the index and draw helpers, in a leaf the
//! transform modules depend on (so none of them imports from the module that declares it).

use crate::rng::MixRng;
use std::fmt;

/// `x.len()` must equal the product of `shape`; the transform rewrites `x` in place and keeps the shape.
/// `scratch` is a buffer owned by the caller (one per loader thread) that the transform may resize and
/// overwrite; its contents on entry mean nothing. Transforms panic on a shape they do not support (a
/// configuration error, caught by the first sample).
pub trait Transform: Send + Sync + fmt::Debug {
    fn apply(&self, x: &mut [f32], shape: &[usize], rng: &mut MixRng, scratch: &mut Vec<f32>);
}

/// Panics unless `x` holds exactly `shape`'s elements.
pub(crate) fn check_len(x: &[f32], shape: &[usize]) {
    let n: usize = shape.iter().product();
    assert_eq!(
        x.len(),
        n,
        "augment: a sample of shape {shape:?} has {n} values, got {}",
        x.len()
    );
}

/// `lo + (hi − lo)·u` with one uniform draw: exactly `lo` when `lo == hi`.
pub(crate) fn uniform_in(rng: &mut MixRng, lo: f64, hi: f64) -> f64 {
    lo + (hi - lo) * rng.uniform()
}

/// Index into `0..n` for a position `i` outside it, mirroring about the edge samples without repeating
/// them (`d c b | a b c d | c b a`; PyTorch's `reflect` padding, NumPy's `reflect` mode).
pub(crate) fn reflect_index(i: isize, n: usize) -> usize {
    if n == 1 {
        return 0;
    }
    let period = 2 * (n as isize - 1);
    let m = i.rem_euclid(period);
    (if m >= n as isize { period - m } else { m }) as usize
}

/// Index into `0..n` mirroring about the edges with the edge samples repeated (`c b a | a b c | c b a`;
/// SciPy's `reflect` mode, NumPy's `symmetric`).
pub(crate) fn symmetric_index(i: isize, n: usize) -> usize {
    let period = 2 * n as isize;
    let m = i.rem_euclid(period);
    (if m >= n as isize { period - 1 - m } else { m }) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reflect_modes() {
        let r: Vec<usize> = (-3..7).map(|i| reflect_index(i, 4)).collect();
        assert_eq!(r, vec![3, 2, 1, 0, 1, 2, 3, 2, 1, 0]);
        let s: Vec<usize> = (-3..7).map(|i| symmetric_index(i, 4)).collect();
        assert_eq!(s, vec![2, 1, 0, 0, 1, 2, 3, 3, 2, 1]);
        assert_eq!(reflect_index(-5, 1), 0);
        assert_eq!(symmetric_index(-5, 1), 0);
    }
}
