//! Pseudo-label rounds, the parts both sides share: the per-shard **sidecar** a worker writes when it
//! labels a shard (INFER), the per-class **confidence histogram** it reports, and the **selection** the
//! coordinator makes from the histograms alone (SELECT) — it never sees a sample.
//!
//! A selection is a rule, not a list: sample (predicted class c, confidence p, margin m) is selected iff
//! `p ≥ threshold` and `bin(m) ≥ min_bin[c]`. The margin `m = −ln(1 − p)` is computed from the logits
//! in f64 (`−logsumexp` of the other classes' log-probabilities), so it keeps ordering the samples whose
//! f32 confidence has rounded to 1.0 — the crowd a top-k cap must cut through. Workers histogram only the
//! samples at or above the threshold (the rest are counted per class, unbinned), so the threshold is
//! exact; the bins serve the per-class caps (top-k, balance), taken in whole bins from the most
//! confident down. Bins are uniform in log10(m) over [1e-3, 1e3] nats: each spans 1.4 % of the margin.
//! The coordinator picks `min_bin` per class from the merged
//! histograms, so the rule selects exactly the counts it recorded, and a worker applies it to the
//! sidecars while training. The rule being a pure function of the histograms makes SELECT deterministic
//! and idempotent: a restarted coordinator re-derives the same set from the same persisted histograms.

use crate::{fsutil, Error, Result};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::path::Path;

/// Confidence bins of the histograms.
pub const BINS: usize = 1000;

/// The most classes a sidecar, histogram or selection may have: a histogram holds `classes × BINS`
/// counters, so an unbounded class count read from a file or a message would size an allocation.
pub const MAX_CLASSES: usize = 100_000;

/// The bin of a margin `m = −ln(1 − p)`: `⌊B · (log10 m + 3) / 6⌋`, clamped to the bins; monotone in m.
pub fn bin_of(margin: f32) -> usize {
    let u = (margin as f64).max(1e-3).log10();
    let b = ((u + 3.0) / 6.0 * BINS as f64).floor();
    if b.is_nan() {
        return 0;
    }
    (b.max(0.0) as usize).min(BINS - 1)
}

/// `−ln(1 − p)` from a probability (for tests and tools; workers compute it from the logits, which keeps
/// the precision f32 probabilities lose near 1).
pub fn margin_of(p: f32) -> f32 {
    -(1.0 - p as f64).max(1e-300).ln() as f32
}

/// One shard's predictions: for each sample, its id, the predicted class, its probability and margin
/// `−ln(1 − p)`, and optionally the whole probability vector (`[n, classes]`, for soft pseudo-labels).
#[derive(Clone, Debug, PartialEq)]
pub struct Sidecar {
    pub ids: Vec<u64>,
    pub class: Vec<u32>,
    pub confidence: Vec<f32>,
    pub margin: Vec<f32>,
    pub probs: Option<Vec<f32>>,
    pub classes: usize,
}

impl Sidecar {
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Writes atomically; returns the file's hex SHA-256.
    pub fn write(&self, path: &Path) -> Result<String> {
        let n = self.len();
        let bad = |m: String| Error::Shard {
            path: path.into(),
            message: m,
        };
        if self.class.len() != n || self.confidence.len() != n || self.margin.len() != n {
            return Err(bad(
                "ids, class, confidence and margin differ in length".into()
            ));
        }
        let ids: Vec<u8> = self.ids.iter().flat_map(|v| v.to_le_bytes()).collect();
        let class: Vec<u8> = self.class.iter().flat_map(|v| v.to_le_bytes()).collect();
        let conf: Vec<u8> = self
            .confidence
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let margin: Vec<u8> = self.margin.iter().flat_map(|v| v.to_le_bytes()).collect();
        let probs: Option<Vec<u8>> = self
            .probs
            .as_ref()
            .map(|p| p.iter().flat_map(|v| v.to_le_bytes()).collect());
        fn view<'a>(
            dtype: Dtype,
            shape: Vec<usize>,
            bytes: &'a [u8],
            path: &Path,
        ) -> Result<TensorView<'a>> {
            TensorView::new(dtype, shape, bytes).map_err(|e| Error::Shard {
                path: path.into(),
                message: format!("cannot encode the sidecar: {e}"),
            })
        }
        let mut tensors = vec![
            ("id".to_string(), view(Dtype::U64, vec![n], &ids, path)?),
            (
                "class".to_string(),
                view(Dtype::U32, vec![n], &class, path)?,
            ),
            (
                "confidence".to_string(),
                view(Dtype::F32, vec![n], &conf, path)?,
            ),
            (
                "margin".to_string(),
                view(Dtype::F32, vec![n], &margin, path)?,
            ),
        ];
        if let Some(p) = &probs {
            tensors.push((
                "probs".to_string(),
                view(Dtype::F32, vec![n, self.classes], p, path)?,
            ));
        }
        let meta = [("classes".to_string(), self.classes.to_string())]
            .into_iter()
            .collect();
        let bytes = safetensors::serialize(tensors, Some(meta))
            .map_err(|e| bad(format!("cannot encode the sidecar: {e}")))?;
        fsutil::write_atomic(path, &bytes)?;
        Ok(hex::encode(Sha256::digest(&bytes)))
    }

    /// Reads and checks a sidecar; every error names the file.
    pub fn read(path: &Path) -> Result<Sidecar> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        Self::parse(&bytes).map_err(|m| Error::Shard {
            path: path.into(),
            message: format!("corrupt pseudo-label sidecar: {m}"),
        })
    }

    /// Parses and checks a sidecar's bytes (what [`Sidecar::read`] does after reading the file).
    pub fn parse(bytes: &[u8]) -> std::result::Result<Sidecar, String> {
        let (_, meta) = SafeTensors::read_metadata(bytes).map_err(|e| e.to_string())?;
        let classes: usize = meta
            .metadata()
            .as_ref()
            .and_then(|m| m.get("classes"))
            .and_then(|c| c.parse().ok())
            .ok_or("no `classes` in its metadata")?;
        if classes == 0 || classes > MAX_CLASSES {
            return Err(format!(
                "{classes} classes (a sidecar has 1 to {MAX_CLASSES})"
            ));
        }
        let st = SafeTensors::deserialize(bytes).map_err(|e| e.to_string())?;
        let get = |name: &str, dtype: Dtype| -> std::result::Result<TensorView<'_>, String> {
            let t = st.tensor(name).map_err(|_| format!("no `{name}` tensor"))?;
            if t.dtype() != dtype {
                return Err(format!("`{name}` is {:?}, expected {dtype:?}", t.dtype()));
            }
            Ok(t)
        };
        fn words<const N: usize, T>(b: &[u8], f: impl Fn([u8; N]) -> T) -> Vec<T> {
            b.chunks_exact(N)
                .map(|c| f(c.try_into().expect("exact chunk")))
                .collect()
        }
        let ids = words(get("id", Dtype::U64)?.data(), u64::from_le_bytes);
        let class = words(get("class", Dtype::U32)?.data(), u32::from_le_bytes);
        let confidence = words(get("confidence", Dtype::F32)?.data(), f32::from_le_bytes);
        let margin = words(get("margin", Dtype::F32)?.data(), f32::from_le_bytes);
        let n = ids.len();
        if class.len() != n || confidence.len() != n || margin.len() != n {
            return Err("id, class, confidence and margin differ in length".into());
        }
        if let Some(c) = class.iter().find(|&&c| c as usize >= classes) {
            return Err(format!("class {c} is out of range for {classes} classes"));
        }
        if let Some(p) = confidence.iter().find(|p| !(0.0..=1.0).contains(*p)) {
            return Err(format!("confidence {p} is outside [0, 1]"));
        }
        let probs = match st.tensor("probs") {
            Ok(t) if t.dtype() == Dtype::F32 && t.shape() == [n, classes] => {
                Some(words(t.data(), f32::from_le_bytes))
            }
            Ok(t) => {
                return Err(format!(
                    "`probs` is {:?} {:?}, expected F32 [{n}, {classes}]",
                    t.dtype(),
                    t.shape()
                ))
            }
            Err(_) => None,
        };
        Ok(Sidecar {
            ids,
            class,
            confidence,
            margin,
            probs,
            classes,
        })
    }

    /// The histogram of this sidecar's predictions for a selection with this confidence threshold.
    pub fn histogram(&self, threshold: f64) -> Histogram {
        let mut h = Histogram::new(self.classes);
        for i in 0..self.len() {
            h.add(
                self.class[i] as usize,
                self.confidence[i],
                self.margin[i],
                threshold,
            );
        }
        h
    }
}

/// Per predicted class, how many samples at or above the threshold fall in each confidence bin
/// (`counts[c·BINS + bin]`), and how many are below it (`below[c]`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Histogram {
    pub classes: usize,
    pub counts: Vec<u64>,
    pub below: Vec<u64>,
}

/// `p ≥ threshold`, compared in f32 (the confidences' type), so a threshold of 0.95 keeps 0.95f32.
pub fn passes(p: f32, threshold: f64) -> bool {
    p >= threshold as f32
}

impl Histogram {
    pub fn new(classes: usize) -> Self {
        Histogram {
            classes,
            counts: vec![0; classes * BINS],
            below: vec![0; classes],
        }
    }

    pub fn add(&mut self, class: usize, p: f32, margin: f32, threshold: f64) {
        if passes(p, threshold) {
            self.counts[class * BINS + bin_of(margin)] += 1;
        } else {
            self.below[class] += 1;
        }
    }

    pub fn merge(&mut self, other: &Histogram) -> Result<()> {
        if other.classes != self.classes
            || other.counts.len() != self.counts.len()
            || other.below.len() != self.below.len()
        {
            return Err(Error::invalid(
                "pseudo-label histogram",
                format!(
                    "cannot merge {} classes into {}",
                    other.classes, self.classes
                ),
            ));
        }
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a = a.saturating_add(*b);
        }
        for (a, b) in self.below.iter_mut().zip(&other.below) {
            *a = a.saturating_add(*b);
        }
        Ok(())
    }

    /// Checks a histogram that came from outside (a worker's report, a persisted state): at most
    /// [`MAX_CLASSES`] classes, `classes × BINS` counts and `classes` below-threshold counts. Every
    /// method indexes by these lengths.
    pub fn check(&self) -> std::result::Result<(), String> {
        if self.classes == 0 || self.classes > MAX_CLASSES {
            return Err(format!(
                "{} classes (a histogram has 1 to {MAX_CLASSES})",
                self.classes
            ));
        }
        if self.counts.len() != self.classes * BINS || self.below.len() != self.classes {
            return Err(format!(
                "{} counts and {} below-threshold counts for {} classes (expected {} and {})",
                self.counts.len(),
                self.below.len(),
                self.classes,
                self.classes * BINS,
                self.classes
            ));
        }
        Ok(())
    }

    /// Samples of class `c` in bins `from..`.
    pub fn at_or_above(&self, c: usize, from: usize) -> u64 {
        saturating_sum(&self.counts[c * BINS + from.min(BINS)..(c + 1) * BINS])
    }

    /// Every sample counted, above and below the threshold (saturating: counts from a hostile
    /// report may sum past `u64::MAX`).
    pub fn total(&self) -> u64 {
        saturating_sum(&self.counts).saturating_add(saturating_sum(&self.below))
    }
}

fn saturating_sum(v: &[u64]) -> u64 {
    v.iter().fold(0u64, |acc, &x| acc.saturating_add(x))
}

impl Histogram {}

/// How to choose (see `PseudoLabelConfig`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SelectRule {
    pub threshold: f64,
    pub top_k_per_class: Option<u64>,
    pub balance: bool,
}

/// A pseudo-label set: the threshold and per class the lowest selected confidence bin (`BINS` = none
/// selected), with the counts it selects. Recorded by the coordinator as `rounds/set-K/selection.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Selection {
    /// The set's version: the round whose TRAIN phase uses it (set 1 is made after round 0).
    pub round: u32,
    pub threshold: f64,
    pub bins: usize,
    pub min_bin: Vec<usize>,
    /// Samples selected per class.
    pub selected: Vec<u64>,
    /// Samples predicted as each class (before selection).
    pub predicted: Vec<u64>,
}

impl Selection {
    /// Applies `rule` to the merged histogram (made with `rule.threshold`). Whole bins only: a class's
    /// cut-off is the lowest bin whose inclusion keeps the class within its cap, so a class never exceeds
    /// `top_k_per_class` (or, with `balance`, the rarest class's count above the threshold).
    pub fn choose(round: u32, h: &Histogram, rule: &SelectRule) -> Selection {
        let above: Vec<u64> = (0..h.classes).map(|c| h.at_or_above(c, 0)).collect();
        let mut cap = rule.top_k_per_class.unwrap_or(u64::MAX);
        if rule.balance {
            cap = cap.min(above.iter().copied().min().unwrap_or(0));
        }
        let mut min_bin = Vec::with_capacity(h.classes);
        let mut selected = Vec::with_capacity(h.classes);
        for c in 0..h.classes {
            // Walk down from the most confident bin while the total stays within the cap.
            let (mut b, mut n) = (BINS, 0u64);
            while b > 0 {
                let next = n.saturating_add(h.counts[c * BINS + b - 1]);
                if next > cap {
                    break;
                }
                n = next;
                b -= 1;
            }
            min_bin.push(b);
            selected.push(n);
        }
        Selection {
            round,
            threshold: rule.threshold,
            bins: BINS,
            min_bin,
            selected,
            predicted: (0..h.classes)
                .map(|c| h.at_or_above(c, 0).saturating_add(h.below[c]))
                .collect(),
        }
    }

    /// Whether a sample predicted as `class` with probability `p` and margin `margin` is in the set.
    pub fn selects(&self, class: u32, p: f32, margin: f32) -> bool {
        passes(p, self.threshold)
            && self
                .min_bin
                .get(class as usize)
                .is_some_and(|&m| m < BINS && bin_of(margin) >= m)
    }

    pub fn total_selected(&self) -> u64 {
        saturating_sum(&self.selected)
    }

    /// Checks a selection read from outside (a persisted state): `BINS` bins, one `min_bin` (at most
    /// `BINS`), `selected` and `predicted` per class, at most [`MAX_CLASSES`] classes, a threshold
    /// in [0, 1].
    pub fn check(&self) -> std::result::Result<(), String> {
        let k = self.min_bin.len();
        if self.bins != BINS {
            return Err(format!("{} bins, this butler uses {BINS}", self.bins));
        }
        if k == 0 || k > MAX_CLASSES || self.selected.len() != k || self.predicted.len() != k {
            return Err(format!(
                "min_bin, selected and predicted have {k}, {} and {} classes (1 to {MAX_CLASSES}, \
                 all equal)",
                self.selected.len(),
                self.predicted.len()
            ));
        }
        if let Some(b) = self.min_bin.iter().find(|&&b| b > BINS) {
            return Err(format!("min_bin {b} is past the {BINS} bins"));
        }
        if !(0.0..=1.0).contains(&self.threshold) {
            return Err(format!("threshold {} is outside [0, 1]", self.threshold));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hist_at(samples: &[(usize, f32)], threshold: f64) -> Histogram {
        let mut h = Histogram::new(3);
        for &(c, p) in samples {
            h.add(c, p, margin_of(p), threshold);
        }
        h
    }

    fn rule(threshold: f64, top_k: Option<u64>, balance: bool) -> SelectRule {
        SelectRule {
            threshold,
            top_k_per_class: top_k,
            balance,
        }
    }

    /// Applying the rule to the samples selects exactly the counts recorded.
    fn check_counts(samples: &[(usize, f32)], s: &Selection) {
        let mut n = [0u64; 3];
        for &(c, p) in samples {
            if s.selects(c as u32, p, margin_of(p)) {
                n[c] += 1;
            }
        }
        assert_eq!(n.to_vec(), s.selected);
    }

    #[test]
    fn threshold_keeps_confident_samples() {
        let samples = [
            (0, 0.99),
            (0, 0.95),
            (0, 0.5),
            (1, 0.949),
            (1, 0.97),
            (2, 0.2),
        ];
        let s = Selection::choose(1, &hist_at(&samples, 0.95), &rule(0.95, None, false));
        assert_eq!(s.selected, vec![2, 1, 0]);
        assert_eq!(s.predicted, vec![3, 2, 1]);
        assert!(
            s.selects(0, 0.95, margin_of(0.95))
                && !s.selects(1, 0.949, margin_of(0.949))
                && !s.selects(2, 0.2, margin_of(0.2))
        );
        check_counts(&samples, &s);
        // Threshold 0 with no cap keeps everything.
        let all = Selection::choose(1, &hist_at(&samples, 0.0), &rule(0.0, None, false));
        assert_eq!(all.total_selected(), samples.len() as u64);
        check_counts(&samples, &all);
    }

    #[test]
    fn top_k_takes_the_most_confident_whole_bins() {
        let samples = [
            (0, 0.99),
            (0, 0.98),
            (0, 0.97),
            (0, 0.97),
            (1, 0.6),
            (1, 0.7),
        ];
        let s = Selection::choose(2, &hist_at(&samples, 0.5), &rule(0.5, Some(3), false));
        // Class 0: 0.99, 0.98 fit; the 0.97 bin holds two, which would make 4 > 3: the bin is left out.
        assert_eq!(s.selected, vec![2, 2, 0]);
        check_counts(&samples, &s);
        let s1 = Selection::choose(2, &hist_at(&samples, 0.5), &rule(0.5, Some(1), false));
        assert_eq!(s1.selected, vec![1, 1, 0]);
        assert!(
            s1.selects(0, 0.99, margin_of(0.99))
                && !s1.selects(0, 0.98, margin_of(0.98))
                && s1.selects(1, 0.7, margin_of(0.7))
        );
        check_counts(&samples, &s1);
    }

    #[test]
    fn balance_caps_every_class_at_the_rarest() {
        let samples = [
            (0, 0.99),
            (0, 0.98),
            (0, 0.97),
            (1, 0.9),
            (1, 0.95),
            (2, 0.91),
            (2, 0.3),
        ];
        let s = Selection::choose(1, &hist_at(&samples, 0.8), &rule(0.8, None, true));
        assert_eq!(s.selected, vec![1, 1, 1]);
        assert!(
            s.selects(0, 0.99, margin_of(0.99))
                && s.selects(1, 0.95, margin_of(0.95))
                && s.selects(2, 0.91, margin_of(0.91))
        );
        check_counts(&samples, &s);
    }

    #[test]
    fn bins_are_monotone_and_resolve_margins_beyond_f32_confidence() {
        let ps = [0.1f32, 0.5, 0.9, 0.99, 0.999, 0.9999, 0.99999];
        let bins: Vec<usize> = ps.iter().map(|&p| bin_of(margin_of(p))).collect();
        assert!(bins.windows(2).all(|w| w[0] < w[1]), "{bins:?}");
        // Margins of 20 and 25 nats both round to p = 1.0 in f32, yet fall in different bins.
        assert_eq!(1.0f32 - (-20f64).exp() as f32, 1.0);
        assert!(bin_of(20.0) < bin_of(25.0));
        assert_eq!(bin_of(f32::INFINITY), BINS - 1);
        assert_eq!(bin_of(f32::NAN), 0);
    }

    #[test]
    fn selection_is_deterministic_and_order_free() {
        let mut samples: Vec<(usize, f32)> = (0..500)
            .map(|i| (i % 3, ((i * 7919) % 1000) as f32 / 1000.0))
            .collect();
        let a = Selection::choose(1, &hist_at(&samples, 0.3), &rule(0.3, Some(40), true));
        samples.reverse();
        let b = Selection::choose(1, &hist_at(&samples, 0.3), &rule(0.3, Some(40), true));
        assert_eq!(a, b);
        assert!(a.selected.iter().all(|&n| n <= 40));
        check_counts(&samples, &a);
        // Merging per-shard histograms equals one histogram of everything.
        let mut merged = hist_at(&samples[..200], 0.3);
        merged.merge(&hist_at(&samples[200..], 0.3)).unwrap();
        assert_eq!(merged, hist_at(&samples, 0.3));
    }

    #[test]
    fn sidecar_round_trips_and_rejects_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.plab");
        let s = Sidecar {
            ids: vec![10, 11, 12],
            class: vec![2, 0, 1],
            confidence: vec![0.5, 0.9, 1.0],
            margin: vec![0.69, 2.3, 30.0],
            probs: Some(vec![0.2, 0.3, 0.5, 0.9, 0.05, 0.05, 0.0, 1.0, 0.0]),
            classes: 3,
        };
        s.write(&path).unwrap();
        assert_eq!(Sidecar::read(&path).unwrap(), s);
        assert_eq!(s.histogram(0.6).total(), 3);
        assert_eq!(s.histogram(0.6).below, vec![0, 0, 1]);
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 5]).unwrap();
        let e = Sidecar::read(&path).unwrap_err().to_string();
        assert!(e.contains("s.plab") && e.contains("corrupt"), "{e}");
        let bad = Sidecar {
            class: vec![3, 0, 1],
            probs: None,
            ..s
        };
        bad.write(&path).unwrap();
        let e = Sidecar::read(&path).unwrap_err().to_string();
        assert!(e.contains("out of range"), "{e}");
    }

    fn sidecar_bytes(classes: &str) -> Vec<u8> {
        let ids = 7u64.to_le_bytes();
        let class = 0u32.to_le_bytes();
        let p = 0.9f32.to_le_bytes();
        let tensors = vec![
            ("id", TensorView::new(Dtype::U64, vec![1], &ids).unwrap()),
            (
                "class",
                TensorView::new(Dtype::U32, vec![1], &class).unwrap(),
            ),
            (
                "confidence",
                TensorView::new(Dtype::F32, vec![1], &p).unwrap(),
            ),
            ("margin", TensorView::new(Dtype::F32, vec![1], &p).unwrap()),
        ];
        let meta = [("classes".to_string(), classes.to_string())]
            .into_iter()
            .collect();
        safetensors::serialize(tensors, Some(meta)).unwrap()
    }

    // Regression (hostile-input property tests): a sidecar's `classes` was unbounded, and
    // `Sidecar::histogram` allocates `classes × BINS` counters from it.
    #[test]
    fn a_sidecar_with_a_huge_class_count_is_an_error() {
        assert_eq!(Sidecar::parse(&sidecar_bytes("3")).unwrap().classes, 3);
        let e = Sidecar::parse(&sidecar_bytes("1000000000000")).unwrap_err();
        assert!(e.contains("1000000000000 classes"), "{e}");
        assert!(Sidecar::parse(&sidecar_bytes("0")).is_err());
    }

    // Regression: counts summing past u64::MAX panicked in `total`, `merge` and `choose` (debug).
    #[test]
    fn histogram_sums_saturate() {
        let mut h = Histogram::new(2);
        h.counts[5] = u64::MAX;
        h.counts[BINS + 5] = u64::MAX;
        h.below[0] = 3;
        assert_eq!(h.total(), u64::MAX);
        let other = h.clone();
        h.merge(&other).unwrap();
        assert_eq!(h.counts[5], u64::MAX);
        let s = Selection::choose(1, &h, &rule(0.0, None, false));
        assert_eq!(s.total_selected(), u64::MAX);
        assert_eq!(s.predicted[0], u64::MAX);
    }

    // Regression: a histogram or selection from outside was used without checking its lengths
    // (`at_or_above` indexes `counts` by `classes × BINS`).
    #[test]
    fn malformed_histograms_and_selections_are_refused() {
        assert!(Histogram::new(3).check().is_ok());
        let mut h = Histogram::new(3);
        h.counts.pop();
        assert!(h.check().unwrap_err().contains("counts"));
        let huge = Histogram {
            classes: MAX_CLASSES + 1,
            counts: Vec::new(),
            below: Vec::new(),
        };
        assert!(huge.check().is_err());
        let s = Selection::choose(1, &hist_at(&[(0, 0.9)], 0.5), &rule(0.5, None, false));
        assert!(s.check().is_ok());
        let bad = |f: fn(&mut Selection)| {
            let mut t = s.clone();
            f(&mut t);
            t.check().is_err()
        };
        assert!(bad(|t| t.bins = 10));
        assert!(bad(|t| t.min_bin[0] = BINS + 1));
        assert!(bad(|t| {
            t.selected.pop();
        }));
        assert!(bad(|t| t.threshold = f64::NAN));
        assert!(bad(|t| t.min_bin.clear()));
    }
}
