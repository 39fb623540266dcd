//! The state-carrying parts of the USB algorithm set (Wang et al. 2022's unified semi-supervised
//! benchmark): distribution alignment (ReMixMatch), FlexMatch's curriculum thresholds, FreeMatch's
//! self-adaptive thresholds, SoftMatch's truncated Gaussian weights, and the Π-model's / Mean Teacher's
//! squared error between softmax outputs.
//!
//! Each stateful piece takes the target probabilities of this rank's share of the unlabeled batch
//! (`[n, K]` f32, detached, possibly `n = 0`) and the step's collective. The statistics the reference
//! code computes on its (single-process) batch — mean prediction, mean and variance of the confidence,
//! the newly confident samples — are reduced over every rank, so each rank updates its copy of the state
//! exactly as one process holding the global batch would, and all copies stay identical. Every rank
//! makes the same collective calls in the same order whatever its share (the decisions to skip a call
//! depend only on globally reduced counts).
//!
//! The functions are public so that `tests/usb_golden.rs` can compare them, step by step and state
//! included, with an independent PyTorch implementation (`scripts/fixtures_usb.py`).

use crate::collective::Collective;
use crate::losses::cross_entropy_per_example;
use crate::{Error, Result};
use std::collections::BTreeMap;
use tch::{Device, Kind, Tensor};

/// The target distribution on view 0: softmax of the detached logits, in f32 whatever the logits'
/// dtype (the statistics below accumulate over many steps).
pub fn target_probs(logits: &Tensor) -> Tensor {
    logits
        .detach()
        .to_kind(Kind::Float)
        .softmax(-1, Kind::Float)
}

/// Cross-entropy of the student logits with the hard pseudo-label `argmax probs` (a constant), `[n]`.
pub fn hard_label_loss(probs: &Tensor, student_logits: &Tensor) -> Tensor {
    cross_entropy_per_example(student_logits, &probs.argmax(-1, false), 0.0)
}

/// UDA's consistency term against an already computed target distribution (after distribution
/// alignment): `KL(sharpen(p) ‖ softmax(student))` with `sharpen(p) ∝ p^(1/T)`, `[n]`. Probabilities
/// are clamped at 1e-30 before the log, so an exact zero gives a vanishing term rather than NaN.
pub fn sharpened_kl(probs: &Tensor, student_logits: &Tensor, temperature: f64) -> Tensor {
    let log_target = (probs.clamp_min(1e-30).log() / temperature).log_softmax(-1, Kind::Float);
    let log_q = student_logits.log_softmax(-1, Kind::Float);
    (log_target.exp() * (&log_target - log_q))
        .sum_dim_intlist(-1, false, Kind::Float)
        .to_kind(student_logits.kind())
}

/// The Π-model's and Mean Teacher's term per example (Laine & Aila 2017, eq. in §2.1):
/// `(1/K)·‖softmax(student) − softmax(target)‖²` with the target a constant, `[n]`.
pub fn softmax_mse(student_logits: &Tensor, target_logits: &Tensor) -> Tensor {
    let p = student_logits.softmax(-1, None);
    let q = target_logits.detach().softmax(-1, p.kind());
    (p - q).square().mean_dim(-1, false, None)
}

/// Sums over the global batch: `local` (per-rank sums, 1-D) all-reduced, as an f32 host tensor.
fn global_sum(comm: &mut dyn Collective, parts: &[Tensor]) -> Result<Tensor> {
    let mut t = Tensor::cat(
        &parts
            .iter()
            .map(|p| p.to_device(Device::Cpu).to_kind(Kind::Float).reshape([-1]))
            .collect::<Vec<_>>(),
        0,
    );
    comm.all_reduce_sum(&mut t)?;
    Ok(t)
}

fn scalar_f32(v: f64) -> Tensor {
    Tensor::from_slice(&[v as f32])
}

fn take(state: &mut Vec<(String, Tensor)>, name: &str) -> Option<Tensor> {
    let i = state.iter().position(|(n, _)| n == name)?;
    Some(state.remove(i).1)
}

fn expect_shape(name: &str, t: &Tensor, shape: &[i64]) -> std::result::Result<(), String> {
    if t.size() == shape {
        Ok(())
    } else {
        Err(format!(
            "objective state {name} has shape {:?}, expected {shape:?}",
            t.size()
        ))
    }
}

/// Distribution alignment (Berthelot et al. 2020, ReMixMatch §3.2): `p ← Normalize(p · p_labeled / p̃)`.
///
/// `p_labeled` is uniform (the labeled class prior is not known to the objective; SoftMatch's "uniform
/// alignment" is exactly this). `p̃` is an EMA with momentum `momentum` of the mean prediction over the
/// global unlabeled batch, started at the first batch's mean, updated before the batch is aligned, with
/// USB's 1e-6 guard on both sides of the ratio (USB's `DistAlignEMAHook`).
pub struct DistAlign {
    momentum: f64,
    classes: i64,
    /// `[K]` f32 on the host; `None` until the first non-empty global batch.
    p_model: Option<Tensor>,
}

impl DistAlign {
    pub fn new(classes: usize, momentum: f64) -> DistAlign {
        DistAlign {
            momentum,
            classes: classes as i64,
            p_model: None,
        }
    }

    /// Updates `p̃` with the global batch's mean of `probs` and returns `probs` aligned.
    pub fn align(&mut self, probs: &Tensor, comm: &mut dyn Collective) -> Result<Tensor> {
        let k = self.classes;
        let n = probs.size()[0];
        let sums = global_sum(
            comm,
            &[
                probs.sum_dim_intlist(0, false, Kind::Float),
                scalar_f32(n as f64),
            ],
        )?;
        let count = sums.double_value(&[k]);
        if count > 0.0 {
            let mean = sums.narrow(0, 0, k) / count;
            self.p_model = Some(match self.p_model.take() {
                None => mean,
                Some(p) => p * self.momentum + mean * (1.0 - self.momentum),
            });
        }
        let Some(p_model) = &self.p_model else {
            return Ok(probs.shallow_clone());
        };
        let p_target = Tensor::full([k], 1.0 / k as f64, (Kind::Float, Device::Cpu));
        let dev = probs.device();
        let aligned = probs * (p_target + 1e-6).to_device(dev) / (p_model + 1e-6).to_device(dev);
        let total = aligned.sum_dim_intlist(-1, true, Kind::Float);
        Ok(aligned / total)
    }

    /// The running mean prediction `p̃` (`None` before the first batch).
    pub fn p_model(&self) -> Option<&Tensor> {
        self.p_model.as_ref()
    }

    pub(crate) fn state(&self, out: &mut Vec<(String, Tensor)>) {
        if let Some(p) = &self.p_model {
            out.push(("da.p_model".into(), p.copy()));
        }
    }

    pub(crate) fn load_state(
        &mut self,
        state: &mut Vec<(String, Tensor)>,
    ) -> std::result::Result<(), String> {
        self.p_model = match take(state, "da.p_model") {
            Some(t) => {
                expect_shape("da.p_model", &t, &[self.classes])?;
                Some(t.to_kind(Kind::Float))
            }
            None => None,
        };
        Ok(())
    }
}

/// FlexMatch's curriculum pseudo-labeling (Zhang et al. 2021, eqs. 6–7 with the threshold warm-up):
/// the learning status `σ_c` counts the unlabeled samples whose latest prediction above `τ` was class
/// `c`; `β_c = σ_c / max(max_c σ_c, N − Σ_c σ_c)` and a sample predicted as `c` passes when its
/// confidence is at least `τ·M(β_c)` with the convex `M(x) = x / (2 − x)`.
///
/// The mask of a step uses the status before the step (USB computes the thresholds, then records the
/// step's confident samples); the record is global: each rank's newly confident samples are gathered
/// and applied by every rank in rank order, then position order.
pub struct FlexMatch {
    threshold: f64,
    /// Latest confident class of every sample that ever passed `τ`, by stable sample id.
    selected: BTreeMap<u64, i64>,
    /// σ_c.
    counts: Vec<u64>,
}

/// Bits per f32 chunk of a gathered sample id: integers below 2^24 are exact in f32.
const ID_CHUNK: u32 = 22;

impl FlexMatch {
    pub fn new(classes: usize, threshold: f64) -> FlexMatch {
        FlexMatch {
            threshold,
            selected: BTreeMap::new(),
            counts: vec![0; classes],
        }
    }

    /// σ_c, the learning status of each class.
    pub fn counts(&self) -> &[u64] {
        &self.counts
    }

    /// The latest confident class of each recorded sample, by id.
    pub fn selected(&self) -> &BTreeMap<u64, i64> {
        &self.selected
    }

    /// `τ·M(β_c)` for an unlabeled pool of `pool` samples.
    pub fn class_thresholds(&self, pool: u64) -> Vec<f32> {
        let used: u64 = self.counts.iter().sum();
        let most = self.counts.iter().copied().max().unwrap_or(0);
        let denominator = most.max(pool.saturating_sub(used));
        self.counts
            .iter()
            .map(|&c| {
                let beta = if denominator == 0 {
                    0.0
                } else {
                    c as f64 / denominator as f64
                };
                (self.threshold * beta / (2.0 - beta)) as f32
            })
            .collect()
    }

    /// The mask of this rank's samples (`probs` `[n, K]`, `ids` their sample ids) under the current
    /// status, then the status updated with the confident samples of every rank.
    pub fn mask(
        &mut self,
        probs: &Tensor,
        ids: &[u64],
        pool: u64,
        comm: &mut dyn Collective,
    ) -> Result<Tensor> {
        let n = probs.size()[0];
        if ids.len() as i64 != n {
            return Err(Error::Setup(format!(
                "flexmatch: {n} unlabeled samples but {} sample ids",
                ids.len()
            )));
        }
        if pool == 0 && n > 0 {
            return Err(Error::Setup(
                "flexmatch: the size of the unlabeled split is unknown".into(),
            ));
        }
        let (confidence, pseudo) = probs.max_dim(-1, false);
        let thresholds = Tensor::from_slice(&self.class_thresholds(pool)).to_device(probs.device());
        let mask = confidence
            .ge_tensor(&thresholds.index_select(0, &pseudo))
            .to_kind(Kind::Float);
        let confident = confidence.ge(self.threshold).to_device(Device::Cpu);
        let confident = Vec::<bool>::try_from(&confident).expect("a 1-D bool tensor");
        let classes =
            Vec::<i64>::try_from(&pseudo.to_device(Device::Cpu)).expect("a 1-D int64 tensor");
        let mine: Vec<(u64, i64)> = ids
            .iter()
            .zip(classes)
            .zip(confident)
            .filter(|(_, ok)| *ok)
            .map(|((&id, c), _)| (id, c))
            .collect();
        for (id, class) in gather_records(comm, &mine)? {
            self.record(id, class);
        }
        Ok(mask)
    }

    fn record(&mut self, id: u64, class: i64) {
        if let Some(old) = self.selected.insert(id, class) {
            self.counts[old as usize] -= 1;
        }
        self.counts[class as usize] += 1;
    }

    fn state(&self, out: &mut Vec<(String, Tensor)>) {
        if self.selected.is_empty() {
            return;
        }
        // Ids are stored bit for bit in an int64 tensor (safetensors has no u64 in tch).
        let ids: Vec<i64> = self.selected.keys().map(|&id| id as i64).collect();
        let classes: Vec<i64> = self.selected.values().copied().collect();
        out.push(("flexmatch.ids".into(), Tensor::from_slice(&ids)));
        out.push(("flexmatch.classes".into(), Tensor::from_slice(&classes)));
    }

    fn load_state(&mut self, state: &mut Vec<(String, Tensor)>) -> std::result::Result<(), String> {
        self.selected.clear();
        self.counts.iter_mut().for_each(|c| *c = 0);
        let (ids, classes) = match (
            take(state, "flexmatch.ids"),
            take(state, "flexmatch.classes"),
        ) {
            (None, None) => return Ok(()),
            (Some(i), Some(c)) => (i, c),
            _ => return Err("flexmatch: sample ids without classes, or the reverse".into()),
        };
        let ids = Vec::<i64>::try_from(&ids.to_kind(Kind::Int64).reshape([-1]))
            .map_err(|e| e.to_string())?;
        let classes = Vec::<i64>::try_from(&classes.to_kind(Kind::Int64).reshape([-1]))
            .map_err(|e| e.to_string())?;
        if ids.len() != classes.len() {
            return Err(format!(
                "flexmatch: {} sample ids for {} classes",
                ids.len(),
                classes.len()
            ));
        }
        let k = self.counts.len() as i64;
        for (id, class) in ids.into_iter().zip(classes) {
            if !(0..k).contains(&class) {
                return Err(format!("flexmatch: class {class} outside 0..{k}"));
            }
            self.record(id as u64, class);
        }
        Ok(())
    }
}

/// Every rank's `(id, class)` records, concatenated in rank order (two all-gathers: the counts, then the
/// records padded to the largest count; none when no rank has one). Ids travel as three 22-bit chunks,
/// each exact in the collective's f32.
fn gather_records(comm: &mut dyn Collective, mine: &[(u64, i64)]) -> Result<Vec<(u64, i64)>> {
    let counts = comm.all_gather(&Tensor::from_slice(&[mine.len() as f32]))?;
    let most = Vec::<f32>::try_from(&counts.reshape([-1]))
        .expect("a 1-D f32 tensor")
        .into_iter()
        .fold(0.0f32, f32::max) as usize;
    if most == 0 {
        return Ok(Vec::new());
    }
    let chunk = |id: u64, i: u32| ((id >> (ID_CHUNK * i)) & ((1 << ID_CHUNK) - 1)) as f32;
    let mut rows = vec![-1.0f32; most * 4];
    for (row, &(id, class)) in rows.chunks_mut(4).zip(mine) {
        row.copy_from_slice(&[chunk(id, 2), chunk(id, 1), chunk(id, 0), class as f32]);
    }
    let all = comm.all_gather(&Tensor::from_slice(&rows).reshape([most as i64, 4]))?;
    let all = Vec::<f32>::try_from(&all.reshape([-1])).expect("a 1-D f32 tensor");
    Ok(all
        .chunks(4)
        .filter(|r| r[3] >= 0.0)
        .map(|r| {
            let id = ((r[0] as u64) << (2 * ID_CHUNK)) | ((r[1] as u64) << ID_CHUNK) | r[2] as u64;
            (id, r[3] as i64)
        })
        .collect())
}

/// FreeMatch's self-adaptive thresholds (Wang et al. 2023, eqs. 5–8): the global threshold
/// `τ_t = λ·τ_{t−1} + (1 − λ)·mean(max p)` and the local class-wise `p̃_t = λ·p̃_{t−1} + (1 − λ)·mean(p)`
/// over the global batch, both started at `1/K`, updated before the mask; a sample predicted as `c`
/// passes when its confidence is at least `MaxNorm(p̃_t)(c)·τ_t`. The self-adaptive fairness term is
/// left out.
pub struct FreeMatch {
    momentum: f64,
    /// `[1]` f32 on the host.
    time_p: Tensor,
    /// `[K]` f32 on the host.
    p_model: Tensor,
}

impl FreeMatch {
    pub fn new(classes: usize, momentum: f64) -> FreeMatch {
        let p_model = Tensor::ones([classes as i64], (Kind::Float, Device::Cpu)) / classes as f64;
        FreeMatch {
            momentum,
            time_p: p_model.mean(Kind::Float).reshape([1]),
            p_model,
        }
    }

    /// τ_t.
    pub fn time_p(&self) -> &Tensor {
        &self.time_p
    }

    /// p̃_t.
    pub fn p_model(&self) -> &Tensor {
        &self.p_model
    }

    pub fn mask(&mut self, probs: &Tensor, comm: &mut dyn Collective) -> Result<Tensor> {
        let (n, k) = (probs.size()[0], self.p_model.size()[0]);
        let (confidence, pseudo) = probs.max_dim(-1, false);
        let sums = global_sum(
            comm,
            &[
                confidence.sum(Kind::Float),
                probs.sum_dim_intlist(0, false, Kind::Float),
                scalar_f32(n as f64),
            ],
        )?;
        let count = sums.double_value(&[k + 1]);
        if count > 0.0 {
            let m = self.momentum;
            let mean_confidence = sums.narrow(0, 0, 1) / count;
            let mean_probs = sums.narrow(0, 1, k) / count;
            self.time_p = &self.time_p * m + mean_confidence * (1.0 - m);
            self.p_model = &self.p_model * m + mean_probs * (1.0 - m);
        }
        let modulation = &self.p_model / self.p_model.max();
        let thresholds = (modulation * &self.time_p).to_device(probs.device());
        Ok(confidence
            .ge_tensor(&thresholds.index_select(0, &pseudo))
            .to_kind(Kind::Float))
    }

    /// The current per-class thresholds `τ_t(c) = MaxNorm(p̃_t)(c) · τ_t` (the next step's, before its
    /// update).
    pub fn class_thresholds(&self) -> Vec<f32> {
        let t = (&self.p_model / self.p_model.max()) * &self.time_p;
        Vec::<f32>::try_from(t.to_kind(Kind::Float).reshape([-1])).unwrap_or_default()
    }

    fn state(&self, out: &mut Vec<(String, Tensor)>) {
        out.push(("freematch.time_p".into(), self.time_p.copy()));
        out.push(("freematch.p_model".into(), self.p_model.copy()));
    }

    fn load_state(&mut self, state: &mut Vec<(String, Tensor)>) -> std::result::Result<(), String> {
        let k = self.p_model.size()[0];
        let time_p = take(state, "freematch.time_p").ok_or("freematch.time_p is missing")?;
        let p_model = take(state, "freematch.p_model").ok_or("freematch.p_model is missing")?;
        expect_shape("freematch.time_p", &time_p, &[1])?;
        expect_shape("freematch.p_model", &p_model, &[k])?;
        self.time_p = time_p.to_kind(Kind::Float);
        self.p_model = p_model.to_kind(Kind::Float);
        Ok(())
    }
}

/// SoftMatch's sample weights (Chen et al. 2023, eqs. 7–8): a truncated Gaussian of the confidence,
/// `1` when `max p ≥ μ_t`, else `exp(−(max p − μ_t)² / (2σ_t²))`, with `μ_t` and `σ_t²` EMAs (momentum λ)
/// of the global batch's mean and unbiased variance of `max p`, started at `1/K` and `1` and updated
/// before the weights. USB keeps the two in double precision (Python floats), and so do we. A global
/// batch of one sample has no unbiased variance: `σ_t²` then stays as it was.
pub struct SoftMatch {
    momentum: f64,
    mu: f64,
    var: f64,
}

impl SoftMatch {
    pub fn new(classes: usize, momentum: f64) -> SoftMatch {
        SoftMatch {
            momentum,
            mu: 1.0 / classes as f64,
            var: 1.0,
        }
    }

    /// (μ_t, σ_t²).
    pub fn moments(&self) -> (f64, f64) {
        (self.mu, self.var)
    }

    pub fn weights(&mut self, probs: &Tensor, comm: &mut dyn Collective) -> Result<Tensor> {
        let n = probs.size()[0];
        let confidence = probs.amax(-1, false);
        let sums = global_sum(comm, &[confidence.sum(Kind::Float), scalar_f32(n as f64)])?;
        let (total, count) = (sums.double_value(&[0]), sums.double_value(&[1]));
        if count > 0.0 {
            let m = self.momentum;
            let mean = total / count;
            // The variance around the global mean: a second reduction, so no rank needs the others' samples.
            let squares = global_sum(comm, &[(&confidence - mean).square().sum(Kind::Float)])?;
            self.mu = m * self.mu + (1.0 - m) * mean;
            if count > 1.0 {
                let var = squares.double_value(&[0]) / (count - 1.0);
                self.var = m * self.var + (1.0 - m) * var;
            }
        }
        let below = (confidence - self.mu).clamp_max(0.0);
        Ok((-(below.square()) / (2.0 * self.var)).exp())
    }

    fn state(&self, out: &mut Vec<(String, Tensor)>) {
        out.push((
            "softmatch.moments".into(),
            Tensor::from_slice(&[self.mu, self.var]),
        ));
    }

    fn load_state(&mut self, state: &mut Vec<(String, Tensor)>) -> std::result::Result<(), String> {
        let t = take(state, "softmatch.moments").ok_or("softmatch.moments is missing")?;
        expect_shape("softmatch.moments", &t, &[2])?;
        let v = Vec::<f64>::try_from(&t.to_kind(Kind::Double)).map_err(|e| e.to_string())?;
        (self.mu, self.var) = (v[0], v[1]);
        Ok(())
    }
}

/// The stateful part of a method: how its pseudo-labels are masked or weighted.
pub enum Selection {
    /// A fixed threshold (UDA's β, FixMatch's τ) or none at all (Π-model, Mean Teacher).
    Fixed,
    Flex(FlexMatch),
    Free(FreeMatch),
    Soft(SoftMatch),
}

impl Selection {
    pub(crate) fn state(&self, out: &mut Vec<(String, Tensor)>) {
        match self {
            Selection::Fixed => {}
            Selection::Flex(f) => f.state(out),
            Selection::Free(f) => f.state(out),
            Selection::Soft(s) => s.state(out),
        }
    }

    pub(crate) fn load_state(
        &mut self,
        state: &mut Vec<(String, Tensor)>,
    ) -> std::result::Result<(), String> {
        match self {
            Selection::Fixed => Ok(()),
            Selection::Flex(f) => f.load_state(state),
            Selection::Free(f) => f.load_state(state),
            Selection::Soft(s) => s.load_state(state),
        }
    }
}
