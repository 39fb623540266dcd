//! One replica's training state and the synchronous step: forward → loss → backward → gradient
//! all-reduce → optimizer step. It is transport-agnostic (it sees a `Collective`) and free of RPC, so
//! tests drive it directly to prove data-parallel ≡ single-process.

use crate::collective::Collective;
use crate::ddp::GradSync;
use crate::device::{to_step_device, with_precision};
use crate::mixing::MixRng;
use crate::models::{self, Model};
use crate::objectives::{self, Objective, PseudoBatch, StepCtx};
use crate::optim::Optim;
use crate::Result;
use butler_common::config::JobConfig;
use butler_common::sampler::{eval_indices, mix};
use tch::nn;
use tch::{Device, Kind, Reduction, Tensor};

pub struct Trainer {
    pub vs: nn::VarStore,
    model: Box<dyn Model>,
    objective: Box<dyn Objective>,
    opt: Optim,
    sync: GradSync,
    cfg: JobConfig,
    step: u64,
    total_steps: u64,
    device: Device,
    /// The weights' exponential moving average (`[train] ema`): one tensor per trainable variable, on
    /// the parameters' device.
    ema: Option<Ema>,
    last: StepRecord,
}

struct Ema {
    decay: f64,
    params: Vec<Tensor>,
    averages: Vec<Tensor>,
}

impl Ema {
    fn new(decay: f64, params: Vec<Tensor>) -> Ema {
        let averages = params.iter().map(|p| p.detach().copy()).collect();
        Ema {
            decay,
            params,
            averages,
        }
    }

    /// average ← decay·average + (1 − decay)·parameter (timm's `ModelEmaV2`, torch's
    /// `AveragedModel` with an EMA function), after each optimizer step.
    fn update(&mut self) {
        let _guard = tch::no_grad_guard();
        for (a, p) in self.averages.iter_mut().zip(&self.params) {
            let _ = a.g_mul_scalar_(self.decay);
            let _ = a.g_add_(&(p.detach() * (1.0 - self.decay)));
        }
    }

    /// Restarts the average at the current parameters (after the broadcast from rank 0, or a load).
    fn reset(&mut self) {
        let _guard = tch::no_grad_guard();
        for (a, p) in self.averages.iter_mut().zip(&self.params) {
            a.copy_(&p.detach());
        }
    }

    /// Runs `f` with the averages in place of the parameters, then puts the parameters back.
    fn swapped<T>(&self, f: impl FnOnce() -> T) -> T {
        let _guard = tch::no_grad_guard();
        let saved: Vec<Tensor> = self.params.iter().map(|p| p.detach().copy()).collect();
        for (p, a) in self.params.iter().zip(&self.averages) {
            p.detach().copy_(a);
        }
        let out = f();
        for (p, s) in self.params.iter().zip(&saved) {
            p.detach().copy_(s);
        }
        out
    }
}

/// A trainer's resumable state, on the host (see [`Trainer::training_state`]).
pub struct TrainingState {
    pub variables: Vec<(String, Tensor)>,
    pub ema: Option<Vec<Tensor>>,
    pub optim: crate::optim::OptimState,
    pub step: u64,
    /// The objective's own state ([`Objective::state`]: running statistics, per-sample records).
    pub objective: Vec<(String, Tensor)>,
}

impl TrainingState {
    /// Copies the state into a replica's variables (checked by name and shape), its EMA averages (which
    /// must be present exactly when the replica keeps an EMA) and its optimizer; returns the step.
    pub fn apply(
        self,
        vs: &nn::VarStore,
        ema: Option<&mut [Tensor]>,
        opt: &mut Optim,
    ) -> std::result::Result<u64, String> {
        let mut saved: std::collections::HashMap<String, Tensor> =
            self.variables.into_iter().collect();
        let _guard = tch::no_grad_guard();
        for (name, mut var) in vs.variables() {
            let t = saved
                .remove(&name)
                .ok_or_else(|| format!("variable {name} is missing"))?;
            if t.size() != var.size() {
                return Err(format!(
                    "variable {name} has shape {:?}, the model has {:?}",
                    t.size(),
                    var.size()
                ));
            }
            var.copy_(&t);
        }
        if let Some(extra) = saved.keys().next() {
            return Err(format!("variable {extra} does not belong to this model"));
        }
        match (ema, self.ema) {
            (Some(averages), Some(saved)) => {
                if saved.len() != averages.len() {
                    return Err(format!(
                        "{} EMA tensors for {} parameters",
                        saved.len(),
                        averages.len()
                    ));
                }
                for (a, t) in averages.iter_mut().zip(saved) {
                    if a.size() != t.size() {
                        return Err("an EMA tensor does not match its parameter".into());
                    }
                    a.copy_(&t);
                }
            }
            (None, None) => {}
            (Some(_), None) => {
                return Err("the job keeps an EMA ([train] ema) but the checkpoint has none".into())
            }
            (None, Some(_)) => {
                return Err("the checkpoint has an EMA but the job sets no [train] ema".into())
            }
        }
        opt.load_state(&self.optim).map_err(|e| e.to_string())?;
        Ok(self.step)
    }
}

/// This rank's share of a step's unlabeled batch (one tensor per view), and the size of that batch over
/// all ranks.
pub struct UnlabeledBatch<'a> {
    pub views: &'a [Tensor],
    pub global_len: u64,
    /// The stable ids of the share's samples (FlexMatch's per-sample record); may be empty for methods
    /// that do not need them.
    pub ids: &'a [u64],
    /// How many samples the unlabeled split holds (FlexMatch's N); 0 when unknown.
    pub pool_len: u64,
}

/// Named scalars of a step, e.g. `("train/loss", 0.52)`.
pub type Scalars = Vec<(String, f64)>;

/// What the last step left for the metrics: each part's contribution (detached) and the optimizer time.
#[derive(Default)]
struct StepRecord {
    labeled: Option<Tensor>,
    unlabeled: Option<Tensor>,
    optimizer: std::time::Duration,
}

/// Result of evaluating on a split, summed over all ranks.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Evaluation {
    pub accuracy: f64,
    pub loss: f64,
    pub samples: u64,
}

impl Trainer {
    /// Builds the model on the CPU with parameters drawn from `seed` (only rank 0's draw matters after
    /// the broadcast) and the configured optimizer.
    pub fn new(
        cfg: &JobConfig,
        sample_shape: &[usize],
        classes: usize,
        seed: u64,
        total_steps: u64,
    ) -> Result<Trainer> {
        Trainer::new_on(cfg, sample_shape, classes, seed, total_steps, Device::Cpu)
    }

    /// [`Trainer::new`] with the replica on `device`.
    pub fn new_on(
        cfg: &JobConfig,
        sample_shape: &[usize],
        classes: usize,
        seed: u64,
        total_steps: u64,
        device: Device,
    ) -> Result<Trainer> {
        cfg.model.check_input(sample_shape)?;
        // Parameters are drawn on the host from the seed and then moved, so a CUDA replica starts from
        // exactly the CPU replica's weights (CUDA's generator would draw different ones).
        tch::manual_seed(seed as i64);
        let mut vs = nn::VarStore::new(Device::Cpu);
        let model = models::build(&vs.root(), &cfg.model, sample_shape, classes);
        vs.set_device(device);
        let objective = objectives::build(
            cfg,
            sample_shape,
            classes,
            model.mix_points(),
            total_steps,
            device,
        )?;
        let opt = Optim::build(&cfg.optim, vs.trainable_variables());
        let bucket_bytes = (cfg.cluster.bucket_mb * 1024.0 * 1024.0) as usize;
        let sync = GradSync::new(vs.trainable_variables(), bucket_bytes);
        let ema = cfg
            .train
            .ema
            .map(|decay| Ema::new(decay, vs.trainable_variables()));
        Ok(Trainer {
            vs,
            model,
            objective,
            opt,
            sync,
            cfg: cfg.clone(),
            step: 0,
            total_steps,
            device,
            ema,
            last: StepRecord::default(),
        })
    }

    /// Where this replica's parameters live.
    pub fn device(&self) -> Device {
        self.device
    }

    /// A frozen copy of the evaluated weights (the EMA's with `[train] ema`) as a distillation teacher
    /// on this replica's device: the staged job's fine-tuned model teaching the distillation stage.
    pub fn frozen_teacher(
        &self,
        sample_shape: &[usize],
        classes: usize,
    ) -> Result<objectives::kd::Teacher> {
        let mut vs = nn::VarStore::new(self.device);
        let model = models::build(&vs.root(), &self.cfg.model, sample_shape, classes);
        self.with_eval_weights(|| vs.copy(&self.vs))
            .map_err(|e| crate::Error::Setup(format!("cannot copy the teacher's weights: {e}")))?;
        vs.freeze();
        Ok(objectives::kd::Teacher::Native { _vs: vs, model })
    }

    /// Trains with knowledge distillation from `teacher` instead of the config's objective (the
    /// staged job's distillation stage), with the job's input regularizers on labeled batches.
    pub fn distill_from(
        &mut self,
        teacher: objectives::kd::Teacher,
        kd: crate::losses::KdConfig,
        unlabeled_weight: f64,
        sample_shape: &[usize],
        classes: usize,
    ) -> Result<()> {
        let aug = objectives::BatchAug::new(
            &self.cfg.regularize,
            sample_shape,
            classes,
            self.model.mix_points(),
        )?;
        self.objective = Box::new(objectives::kd::Distill::with_teacher(
            teacher,
            aug,
            kd,
            self.cfg.train.label_smoothing,
            classes,
            unlabeled_weight,
        ));
        Ok(())
    }

    pub fn steps_taken(&self) -> u64 {
        self.step
    }

    /// What a resumable checkpoint holds besides the schedule position: the model's variables by
    /// name (the trained weights, not the EMA), the EMA's averages (by trainable-variable index) and
    /// the optimizer's state.
    pub fn training_state(&self) -> TrainingState {
        TrainingState {
            variables: self
                .vs
                .variables()
                .into_iter()
                .map(|(n, t)| (n, t.detach().to_device(Device::Cpu)))
                .collect(),
            ema: self.ema.as_ref().map(|e| {
                e.averages
                    .iter()
                    .map(|a| a.detach().to_device(Device::Cpu))
                    .collect()
            }),
            optim: self.opt.state(),
            step: self.step,
            objective: self.objective.state(),
        }
    }

    /// Restores [`Trainer::training_state`]: every variable must be present with its shape, the EMA
    /// must match `[train] ema`, the optimizer state must fit the parameters, the objective's state must
    /// belong to the objective.
    pub fn load_training_state(&mut self, mut s: TrainingState) -> std::result::Result<(), String> {
        self.objective
            .load_state(std::mem::take(&mut s.objective))?;
        let ema = self.ema.as_mut().map(|e| e.averages.as_mut_slice());
        self.step = s.apply(&self.vs, ema, &mut self.opt)?;
        Ok(())
    }

    pub fn num_buckets(&self) -> usize {
        self.sync.num_buckets()
    }

    /// Replaces every rank's parameters by rank 0's (and restarts the EMA there, so it is identical on
    /// every rank).
    pub fn broadcast_parameters(&mut self, comm: &mut dyn Collective) -> Result<()> {
        self.sync.broadcast_parameters(comm)?;
        self.reset_ema();
        Ok(())
    }

    /// Restarts the EMA, if any, at the current parameters (after loading weights).
    pub fn reset_ema(&mut self) {
        if let Some(e) = &mut self.ema {
            e.reset();
        }
    }

    /// Runs `f` with the weights the job evaluates and saves: the EMA when `[train] ema` is set, else the
    /// parameters.
    pub fn with_eval_weights<T>(&self, f: impl FnOnce() -> T) -> T {
        match &self.ema {
            Some(e) => e.swapped(f),
            None => f(),
        }
    }

    /// The EMA weights flattened as [`Trainer::flat_parameters`] (None without `[train] ema`).
    pub fn flat_ema(&self) -> Option<Vec<f32>> {
        self.ema
            .as_ref()
            .map(|e| e.swapped(|| flat_parameters(&self.vs)))
    }

    pub fn learning_rate(&self) -> f64 {
        self.cfg
            .schedule
            .lr_at(self.cfg.optim.lr, self.step, self.total_steps)
    }

    /// One synchronous data-parallel step on this rank's share of the global batch; returns the local
    /// (unweighted) mean labeled loss, or 0 for an empty share.
    ///
    /// `global_len` is the number of labeled samples all ranks together hold at this step. Each rank scales
    /// its mean loss by `local·world / global` before the gradients are averaged, so the update is the
    /// gradient of the mean over the global batch even when the last batches of an epoch are uneven. The
    /// unlabeled part, when there is one, is weighted the same way with its own stream's counts.
    pub fn step(
        &mut self,
        x: &Tensor,
        y: &Tensor,
        global_len: u64,
        unlabeled: Option<UnlabeledBatch<'_>>,
        comm: &mut dyn Collective,
    ) -> Result<f64> {
        self.step_with(x, y, global_len, unlabeled, None, comm)
    }

    /// [`Trainer::step`] with the step's pseudo-labeled samples (refresh rounds). Parts whose
    /// denominator is a count over all ranks (masked means) are divided by that global count, which
    /// costs one small all-reduce per step for the objectives that have such parts.
    pub fn step_with(
        &mut self,
        x: &Tensor,
        y: &Tensor,
        global_len: u64,
        unlabeled: Option<UnlabeledBatch<'_>>,
        pseudo: Option<&PseudoBatch>,
        comm: &mut dyn Collective,
    ) -> Result<f64> {
        self.opt.set_lr(self.learning_rate());
        self.sync.zero_grad();
        let world = comm.world_size() as f64;
        let share = |local: i64, global: u64| local as f64 * world / global.max(1) as f64;
        // Batches are built on the host; the step runs where the parameters are.
        let dev = self.device;
        let (x, y) = (&to_step_device(x, dev), &to_step_device(y, dev));
        let views: Vec<Tensor> = unlabeled.as_ref().map_or(Vec::new(), |u| {
            u.views.iter().map(|v| to_step_device(v, dev)).collect()
        });
        let pseudo = pseudo.map(|p| p.to_device(dev));
        // Per (seed, step, rank): reproducible, and each rank draws its own mixing within its own batch.
        let mut rng = MixRng::new(mix(mix(self.cfg.job.seed, self.step), comm.rank() as u64));
        let (model, objective) = (self.model.as_ref(), self.objective.as_mut());
        // The EMA as a teacher (Mean Teacher): the averaged weights' logits in training mode. butler's
        // models keep no batch-norm buffers, so the teacher's forward changes no state of the student.
        let teacher = self
            .ema
            .as_ref()
            .map(|e| move |u: &Tensor| e.swapped(|| model.forward_t(u, true)));
        let (ids, pool_len) = unlabeled
            .as_ref()
            .map_or((&[][..], 0), |u| (u.ids, u.pool_len));
        let parts = with_precision(self.cfg.train.precision, dev, || {
            objective.loss(StepCtx {
                model,
                x,
                y,
                rng: &mut rng,
                step: self.step,
                unlabeled: &views,
                unlabeled_ids: ids,
                unlabeled_pool: pool_len,
                pseudo: pseudo.as_ref(),
                comm: &mut *comm,
                teacher: teacher.as_ref().map(|t| t as &dyn Fn(&Tensor) -> Tensor),
            })
        })?;
        let mut value = 0.0;
        let mut total: Option<Tensor> = None;
        // Each part's contribution to this rank's loss, detached: their mean over the ranks is the
        // global loss of that part (read only when metrics are due).
        let mut record = StepRecord::default();
        let mut add = |t: Tensor, labeled: bool| {
            let slot = if labeled {
                &mut record.labeled
            } else {
                &mut record.unlabeled
            };
            let d = t.detach();
            *slot = Some(match slot.take() {
                Some(sum) => sum + d,
                None => d,
            });
            total = Some(match total.take() {
                Some(sum) => sum + t,
                None => t,
            })
        };
        if let Some(l) = parts.labeled {
            value = l.double_value(&[]);
            add(l * share(x.size()[0], global_len), true);
        }
        if let (Some(l), Some(u)) = (parts.unlabeled, &unlabeled) {
            let local = views.first().map_or(0, |v| v.size()[0]);
            add(l * share(local, u.global_len), false);
        }
        let expected = self.objective.counted_terms();
        assert_eq!(
            parts.counted.len(),
            expected,
            "objective {} returned {} counted parts, declared {expected}",
            self.objective.name(),
            parts.counted.len()
        );
        if expected > 0 {
            let local: Vec<f32> = parts.counted.iter().map(|c| c.count as f32).collect();
            // Host tensors: the collective stages them wherever it reduces (the ring on the host).
            let mut counts = Tensor::from_slice(&local);
            comm.all_reduce_sum(&mut counts)?;
            let global = Vec::<f32>::try_from(&counts).expect("a 1-D f32 tensor");
            for (c, g) in parts.counted.into_iter().zip(global) {
                if let Some(sum) = c.sum {
                    if c.labeled && c.count > 0.0 {
                        value = sum.double_value(&[]) / c.count;
                    }
                    add(sum * (world / (g as f64).max(1.0)), c.labeled);
                }
            }
        }
        if let Some(t) = total {
            t.backward();
        }
        self.sync.all_reduce_gradients(comm)?;
        let t_opt = std::time::Instant::now();
        self.opt.step();
        if let Some(e) = &mut self.ema {
            e.update();
        }
        record.optimizer = t_opt.elapsed();
        self.last = record;
        self.step += 1;
        Ok(value)
    }

    /// How long the last step's optimizer update (and EMA) took.
    pub fn last_optimizer_time(&self) -> std::time::Duration {
        self.last.optimizer
    }

    /// The last step's scalars, averaged over the ranks (one small all-reduce; every rank must call it
    /// at the same step): `train/loss` and its `train/loss_labeled` / `train/loss_unlabeled` parts (the
    /// global objective, exactly), `train/lr`, and the method's signals ([`Objective::signals`]).
    ///
    /// `mine` is this rank's own vector of per-rank values (every rank the same length); the result's
    /// second part holds every rank's, gathered through the same all-reduce.
    pub fn step_scalars(
        &self,
        comm: &mut dyn Collective,
        mine: &[f64],
    ) -> Result<(Scalars, Vec<Vec<f64>>)> {
        let value = |t: &Option<Tensor>| t.as_ref().map_or(0.0, |t| t.double_value(&[]));
        let (l, u) = (value(&self.last.labeled), value(&self.last.unlabeled));
        let mut names = vec![
            "train/loss".to_string(),
            "train/loss_labeled".to_string(),
            "train/loss_unlabeled".to_string(),
        ];
        let mut values = vec![l + u, l, u];
        for (name, v) in self.objective.signals() {
            names.push(name);
            values.push(v);
        }
        // Scalars first, then one slot of `mine.len()` values per rank (the others add zeros).
        let (n, k, rank) = (values.len(), mine.len(), comm.rank());
        let mut local = values;
        local.resize(n + k * comm.world_size(), 0.0);
        local[n + k * rank..n + k * (rank + 1)].copy_from_slice(mine);
        let mut t = Tensor::from_slice(&local);
        comm.all_reduce_sum(&mut t)?;
        let world = comm.world_size() as f64;
        let mut sums = Vec::<f64>::try_from(&t).expect("a 1-D f64 tensor");
        let per_rank: Vec<Vec<f64>> = if k == 0 {
            Vec::new()
        } else {
            sums[n..].chunks(k).map(<[f64]>::to_vec).collect()
        };
        sums.truncate(n);
        let mut out: Vec<(String, f64)> = names
            .into_iter()
            .zip(sums)
            .map(|(n, s)| (n, s / world))
            .collect();
        if self.cfg.ssl.is_none() {
            out.retain(|(n, _)| n != "train/loss_unlabeled");
        }
        out.push(("train/lr".to_string(), self.learning_rate()));
        Ok((out, per_rank))
    }

    /// Accuracy and mean cross-entropy (without smoothing) of the evaluated weights (the EMA when set) on
    /// `x, y`, each rank taking a strided share and
    /// the counts summed across ranks, so every sample counts exactly once.
    pub fn evaluate(
        &self,
        x: &Tensor,
        y: &Tensor,
        comm: &mut dyn Collective,
        batch: i64,
    ) -> Result<Evaluation> {
        let n = x.size()[0] as u64;
        let mine = eval_indices(n, comm.world_size() as u32, comm.rank() as u32);
        let (mut correct, mut loss_sum) = (0f64, 0f64);
        self.with_eval_weights(|| {
            tch::no_grad(|| {
                for chunk in mine.chunks(batch.max(1) as usize) {
                    let idx =
                        Tensor::from_slice(&chunk.iter().map(|&i| i as i64).collect::<Vec<_>>())
                            .to_device(x.device());
                    let (xb, yb) = (
                        to_step_device(&x.index_select(0, &idx), self.device),
                        to_step_device(&y.index_select(0, &idx), self.device),
                    );
                    // Loss and argmax in fp32 whatever the forward's precision (a bf16 sum of ~1000 losses
                    // would round in steps of 8).
                    let logits = with_precision(self.cfg.train.precision, self.device, || {
                        self.model.forward_t(&xb, false)
                    })
                    .to_kind(Kind::Float);
                    loss_sum += logits
                        .cross_entropy_loss::<Tensor>(&yb, None, Reduction::Sum, -100, 0.0)
                        .double_value(&[]);
                    correct += logits
                        .argmax(-1, false)
                        .eq_tensor(&yb)
                        .sum(Kind::Float)
                        .double_value(&[]);
                }
            })
        });
        // f64 sums travel as f32; exact for counts below 2^24 samples per evaluation.
        let mut totals = Tensor::from_slice(&[correct as f32, loss_sum as f32, mine.len() as f32]);
        comm.all_reduce_sum(&mut totals)?;
        let t: Vec<f32> =
            Vec::<f32>::try_from(&totals).expect("a 1-D f32 tensor converts to Vec<f32>");
        let samples = t[2].round() as u64;
        Ok(Evaluation {
            accuracy: if samples > 0 {
                t[0] as f64 / samples as f64
            } else {
                0.0
            },
            loss: if samples > 0 {
                t[1] as f64 / samples as f64
            } else {
                0.0
            },
            samples,
        })
    }

    /// Log-probabilities `[n, K]` (f64, for precision near p = 1) of the model in evaluation mode,
    /// computed `batch` samples at a time without gradient (pseudo-labeling).
    pub fn log_probabilities(&self, x: &Tensor, batch: i64) -> Tensor {
        let n = x.size()[0];
        self.with_eval_weights(|| {
            tch::no_grad(|| {
                let parts: Vec<Tensor> = (0..n)
                    .step_by(batch.max(1) as usize)
                    .map(|s| {
                        let xb = to_step_device(&x.narrow(0, s, batch.min(n - s)), self.device);
                        let logits = with_precision(self.cfg.train.precision, self.device, || {
                            self.model.forward_t(&xb, false)
                        });
                        logits
                            .to_device(Device::Cpu)
                            .to_kind(Kind::Double)
                            .log_softmax(-1, Kind::Double)
                    })
                    .collect();
                if parts.is_empty() {
                    Tensor::zeros([0, 0], (Kind::Double, tch::Device::Cpu))
                } else {
                    Tensor::cat(&parts, 0)
                }
            })
        })
    }

    /// Flat copy of all parameters, in a fixed order (for tests and checksums).
    pub fn flat_parameters(&self) -> Vec<f32> {
        flat_parameters(&self.vs)
    }
}

/// All variables of `vs` flattened into one vector, in name order (for tests and checksums).
pub fn flat_parameters(vs: &nn::VarStore) -> Vec<f32> {
    let mut named: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    let flat = Tensor::cat(
        &named
            .iter()
            .map(|(_, t)| t.detach().to_device(Device::Cpu).reshape([-1]))
            .collect::<Vec<_>>(),
        0,
    );
    Vec::<f32>::try_from(&flat).expect("parameters are f32")
}
