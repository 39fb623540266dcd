//! The seeded generator behind every random decision on raw samples and batches: augmentation draws
//! and the mixing regularizers' λ and regions. Our own SplitMix64-based generator, so a run is
//! reproducible from its seed in any process or language.

use butler_common::sampler::SplitMix64;

/// The seeded generator behind every mixing decision: λ from a Beta distribution, region centres, hole
/// positions.
#[derive(Clone, Debug)]
pub struct MixRng {
    inner: SplitMix64,
}

impl MixRng {
    pub fn new(seed: u64) -> Self {
        MixRng {
            inner: SplitMix64::new(seed),
        }
    }

    /// Uniform in `[0, 1)`: the top 53 bits of one draw, so every value is an exact multiple of 2⁻⁵³.
    pub fn uniform(&mut self) -> f64 {
        (self.inner.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in `0..n` without modulo bias.
    ///
    /// # Panics
    /// If `n` is 0.
    pub fn below(&mut self, n: u64) -> u64 {
        self.inner.below(n)
    }

    /// A standard normal draw (Box–Muller, one of the pair; simplicity over speed, since a step draws
    /// only a handful).
    pub fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.uniform(); // (0, 1]: the logarithm stays finite
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    /// A Gamma(`shape`, 1) draw (Marsaglia & Tsang 2000; for `shape < 1`, Gamma(shape + 1)·U^(1/shape)).
    ///
    /// # Panics
    /// If `shape` is not positive and finite.
    pub fn gamma(&mut self, shape: f64) -> f64 {
        self.ln_gamma(shape).exp()
    }

    /// Beta(`a`, `b`) as X / (X + Y) with X ~ Gamma(a), Y ~ Gamma(b).
    ///
    /// The ratio is taken in log space, 1 / (1 + e^(ln Y − ln X)), because for the small shapes mixup
    /// uses (α = 0.2 gives Beta(0.2, 0.2)) the boosted Gamma draws can underflow to 0 in linear space,
    /// which would make X / (X + Y) undefined exactly when the draw should be near 0 or 1.
    ///
    /// # Panics
    /// If a shape is not positive and finite.
    pub fn beta(&mut self, a: f64, b: f64) -> f64 {
        let ln_x = self.ln_gamma(a);
        let ln_y = self.ln_gamma(b);
        1.0 / (1.0 + (ln_y - ln_x).exp())
    }

    /// The logarithm of a Gamma(`shape`, 1) draw.
    fn ln_gamma(&mut self, shape: f64) -> f64 {
        assert!(
            shape > 0.0 && shape.is_finite(),
            "gamma: shape {shape} must be positive and finite"
        );
        if shape < 1.0 {
            // Boost: if G ~ Gamma(a + 1) and U ~ U(0, 1], then G·U^(1/a) ~ Gamma(a).
            let u = 1.0 - self.uniform();
            return self.ln_gamma(shape + 1.0) + u.ln() / shape;
        }
        let d = shape - 1.0 / 3.0;
        let c = 1.0 / (9.0 * d).sqrt();
        loop {
            let x = self.normal();
            let v = 1.0 + c * x;
            if v <= 0.0 {
                continue;
            }
            let v = v * v * v;
            let u = self.uniform();
            let x2 = x * x;
            if u < 1.0 - 0.0331 * x2 * x2 || u.ln() < 0.5 * x2 + d * (1.0 - v + v.ln()) {
                return d.ln() + v.ln();
            }
        }
    }
}
