//! The job config: one TOML file, parsed strictly (an unknown or missing key is an error that names it),
//! validated once by the coordinator and handed verbatim to every worker.

pub use crate::model::{conv1d_out_len, ModelConfig};
pub use crate::optim::{OptimConfig, OptimKind, ScheduleConfig, ScheduleKind};
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobConfig {
    pub job: JobSection,
    pub data: DataConfig,
    pub model: ModelConfig,
    pub optim: OptimConfig,
    #[serde(default)]
    pub schedule: ScheduleConfig,
    pub train: TrainConfig,
    /// Data regularizers (all off by default); they compose.
    #[serde(default)]
    pub regularize: RegularizeConfig,
    #[serde(default)]
    pub loader: LoaderConfig,
    #[serde(default)]
    pub cluster: ClusterConfig,
    /// Resumable checkpoints (plain, semi-supervised and distillation jobs).
    #[serde(default)]
    pub checkpoint: CheckpointConfig,
    /// Per-step metrics (TensorBoard, steps.jsonl, Prometheus).
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// Consistency training on the unlabeled stream (UDA, FixMatch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssl: Option<crate::semi::SslConfig>,
    /// Per-sample augmentation of the labeled batch.
    #[serde(default)]
    pub augment: crate::semi::AugmentConfig,
    /// Pseudo-label refresh rounds, run by the coordinator.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pseudo_label: Option<crate::semi::PseudoLabelConfig>,
    /// Staged contrastive pretraining → linear probe → fine-tuning (`crate::pretrain`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pretrain: Option<crate::pretrain::PretrainConfig>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegularizeConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mix: Option<MixConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifold_mixup: Option<ManifoldMixupConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cutout: Option<CutoutConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub distill: Option<DistillConfig>,
}

/// Input mixing: Mixup (Zhang et al. 2018) and/or CutMix (Yun et al. 2019). With both alphas set, each
/// mixed batch uses CutMix with probability `switch_prob`, Mixup otherwise.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MixConfig {
    /// λ ~ Beta(α, α) for Mixup; 0 disables Mixup.
    #[serde(default)]
    pub mixup_alpha: f64,
    /// λ ~ Beta(α, α) for CutMix; 0 disables CutMix.
    #[serde(default)]
    pub cutmix_alpha: f64,
    #[serde(default = "half")]
    pub switch_prob: f64,
    /// Probability that a batch is mixed at all.
    #[serde(default = "one_f")]
    pub prob: f64,
}

/// Manifold Mixup (Verma et al. 2019): mix hidden states at a mix point drawn uniformly from `layers`
/// (0 = the input; the model's blocks are numbered from 1).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManifoldMixupConfig {
    pub alpha: f64,
    pub layers: Vec<usize>,
    #[serde(default = "one_f")]
    pub prob: f64,
}

/// Cutout (DeVries & Taylor 2017): `holes` zeroed regions of `size` (a segment in 1-D, a square in 2-D),
/// centred anywhere in the sample and clipped at its borders.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CutoutConfig {
    pub holes: usize,
    pub size: usize,
    #[serde(default = "one_f")]
    pub prob: f64,
}

/// Knowledge distillation (Hinton et al. 2015):
/// loss = α·CE(student, y) + (1 − α)·T²·KL(softmax(t/T) ‖ softmax(s/T)).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DistillConfig {
    /// A butler checkpoint (`.safetensors`, built with `teacher_model`) or a TorchScript file (`.pt`, `.ts`).
    pub teacher: PathBuf,
    /// Architecture of a safetensors teacher (default: the student's `[model]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub teacher_model: Option<ModelConfig>,
    pub alpha: f64,
    pub temperature: f64,
    /// Weight of the distillation term on the unlabeled stream (`data.unlabeled_split`), which has no CE
    /// term: λ·T²·KL(softmax(t/T) ‖ softmax(s/T)) over each unlabeled batch.
    #[serde(default = "one_f")]
    pub unlabeled_weight: f64,
}

fn half() -> f64 {
    0.5
}
fn one_f() -> f64 {
    1.0
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSection {
    pub name: String,
    /// Seeds parameter init, data order and every random choice of the job.
    #[serde(default)]
    pub seed: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// The manifest file or the directory holding `manifest.json`. Relative paths resolve against the
    /// process's working directory (the launcher starts every process in the same one).
    pub manifest: PathBuf,
    #[serde(default = "default_train_split")]
    pub train_split: String,
    #[serde(default = "default_test_split")]
    pub test_split: String,
    /// A labeled split the job evaluates on while it trains (every `train.eval_every` epochs), keeping
    /// the test split for one evaluation at the end — choose hyper-parameters on this, never on test.
    /// `butler data prepare … --val N` holds one out of train as `val`. Absent: the periodic
    /// evaluations use the test split (a curve to watch, not to select on).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub val_split: Option<String>,
    /// Few-label experiments: train on this many labeled samples per class of the train split.
    #[serde(default)]
    pub labels_per_class: Option<u64>,
    /// Seed of the labeled subset (default: `job.seed`, so each seed also draws its own subset).
    #[serde(default)]
    pub subset_seed: Option<u64>,
    /// A split streamed as unlabeled data (its labels, if any, are ignored) by the methods that use
    /// unlabeled data; read shard by shard through the streaming loader, so it may be far larger than RAM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unlabeled_split: Option<String>,
    /// μ: unlabeled samples per labeled sample in a step (default 7 for FixMatch, as in the paper,
    /// else 1); see [`JobConfig::unlabeled_ratio`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unlabeled_ratio: Option<u64>,
}

/// The streaming loader (unlabeled stream).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoaderConfig {
    #[serde(default = "one_usize")]
    pub threads: usize,
    /// Batches each loader thread builds ahead.
    #[serde(default = "two_usize")]
    pub prefetch: usize,
    /// Decoded shards kept in memory.
    #[serde(default = "four_usize")]
    pub cache_shards: usize,
    /// Within-rank shuffle window, in samples.
    #[serde(default = "default_window")]
    pub shuffle_window: usize,
    /// What to do with a corrupt sample: "skip" (count it, warn naming shard and index) or "fail".
    #[serde(default)]
    pub corrupt: CorruptSamples,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CorruptSamples {
    #[default]
    Skip,
    Fail,
}

impl Default for LoaderConfig {
    fn default() -> Self {
        LoaderConfig {
            threads: 1,
            prefetch: 2,
            cache_shards: 4,
            shuffle_window: default_window(),
            corrupt: CorruptSamples::Skip,
        }
    }
}

fn one_usize() -> usize {
    1
}
fn two_usize() -> usize {
    2
}
fn four_usize() -> usize {
    4
}
fn default_window() -> usize {
    10_000
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

fn default_train_split() -> String {
    "train".into()
}
fn default_test_split() -> String {
    "test".into()
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// Epochs of the labeled set. Give this or `steps`.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub epochs: u64,
    /// Optimizer steps instead of epochs — the natural unit when the labeled set is tiny (40 per class
    /// is 6 steps an epoch). Rounded up to whole epochs of the labeled set before the job starts
    /// ([`TrainConfig::resolve_steps`]); the run directory's config then says `epochs`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steps: Option<u64>,
    /// Global batch size; each of the W workers takes `batch_size / W`, so results do not depend on W.
    pub batch_size: usize,
    /// torch's `label_smoothing`: target (1 − ε)·onehot + ε/K.
    #[serde(default)]
    pub label_smoothing: f64,
    /// Evaluate on the test split every this many epochs (and always after the last one).
    #[serde(default = "one")]
    pub eval_every: u64,
    #[serde(default = "yes")]
    pub shuffle: bool,
    /// Intra-op threads per worker; 0 lets the launcher split the machine's cores among the workers.
    #[serde(default)]
    pub threads: usize,
    /// Numeric precision of the forward pass: `fp32`, or `bf16` autocast (master weights, gradients
    /// and optimizer state stay fp32, as in `torch.autocast(dtype=torch.bfloat16)`).
    #[serde(default)]
    pub precision: Precision,
    /// Decay of an exponential moving average of the weights, kept identically on every rank and used
    /// for evaluation, pseudo-labelling and the final checkpoint (FixMatch, USB and timm evaluate the
    /// EMA model); e.g. 0.999. Absent: no EMA.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ema: Option<f64>,
}

impl TrainConfig {
    /// Turns `steps` into `epochs` for a labeled set of `labeled_len` samples: the fewest whole epochs
    /// of `⌈labeled_len / batch_size⌉` steps that make at least `steps` steps (so a job runs at least
    /// the steps asked for, and every epoch stays whole — the assignments, commits and metrics count
    /// in epochs). No-op when `epochs` is given.
    pub fn resolve_steps(&mut self, labeled_len: u64) {
        if let Some(steps) = self.steps.take() {
            let per_epoch = labeled_len.div_ceil(self.batch_size.max(1) as u64).max(1);
            self.epochs = steps.div_ceil(per_epoch).max(1);
        }
    }
}

/// `[train] precision`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    Fp32,
    Bf16,
}

/// `[cluster] device`: where a worker keeps its model and runs its steps.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceChoice {
    /// CUDA when this worker's libtorch sees a GPU, else the CPU.
    #[default]
    Auto,
    Cpu,
    Cuda,
}

/// `[cluster] backend`: the collective that averages gradients.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendChoice {
    /// NCCL when every rank is on CUDA and has NCCL, else the TCP ring.
    #[default]
    Auto,
    Nccl,
    Ring,
}

fn one() -> u64 {
    1
}
fn yes() -> bool {
    true
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    #[serde(default = "default_heartbeat_interval_ms")]
    pub heartbeat_interval_ms: u64,
    /// A worker silent for this long is declared dead and the job fails (elastic recovery comes later).
    #[serde(default = "default_heartbeat_timeout_ms")]
    pub heartbeat_timeout_ms: u64,
    /// Every blocking collective operation fails with an error naming the peer rank after this long.
    #[serde(default = "default_collective_timeout_ms")]
    pub collective_timeout_ms: u64,
    /// How long registration and rendezvous wait for the whole world to show up.
    #[serde(default = "default_rendezvous_timeout_ms")]
    pub rendezvous_timeout_ms: u64,
    /// Gradient bucket size in MiB (PyTorch DDP's default is 25).
    #[serde(default = "default_bucket_mb")]
    pub bucket_mb: f64,
    /// A job whose ranks still send heartbeats but make no progress (no collective entered, no step,
    /// evaluation or inference shard completed) for this long is stalled: it fails naming the ranks
    /// behind the others (those that never entered the collective the others wait in). 0 disables.
    #[serde(default = "default_stall_timeout_ms")]
    pub stall_timeout_ms: u64,
    /// Where each worker trains (`auto`: CUDA when available; rank r of a host on GPU
    /// `local_rank mod devices`).
    #[serde(default)]
    pub device: DeviceChoice,
    /// The gradient collective (`auto`: NCCL when every rank is on CUDA, else the TCP ring).
    #[serde(default)]
    pub backend: BackendChoice,
    /// How many times a plain job regroups after a lost worker (dead, partitioned, or its collective
    /// failed) instead of failing: every rank registers again under a new generation and the job
    /// continues from its newest commit point once the world is full. 0: a lost worker fails the job.
    #[serde(default)]
    pub max_restarts: u32,
    /// How long a regroup waits for the world to be full again (a replacement worker to register).
    #[serde(default = "default_rendezvous_timeout_ms")]
    pub rejoin_timeout_ms: u64,
    /// Elastic shrinking: when no replacement registers within `rejoin_timeout_ms`, the job continues
    /// with the workers it has if they are at least this many (each unconsumed sample of the epoch
    /// still trained exactly once). Absent: the full world is required.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_workers: Option<u32>,
    /// Elastic growth: workers that register while the job runs below this many are admitted at the
    /// next step boundary. Default: the world size the job starts with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_workers: Option<u32>,
}

/// `[metrics]`: how often the job reports per-step scalars. Every `every_steps` optimizer steps the ranks
/// average the step's losses by part and the method's signals (one small all-reduce) and rank 0 sends them
/// to the coordinator, which writes them to `<run>/tb/` (TensorBoard), `<run>/steps.jsonl` and its
/// `/metrics` endpoint with the per-rank step-time split. Per-epoch metrics are always written.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Every this many optimizer steps (0: per-epoch metrics only).
    #[serde(default = "fifty")]
    pub every_steps: u64,
    /// Write TensorBoard event files under `<run>/tb/`.
    #[serde(default = "yes")]
    pub tensorboard: bool,
    /// A rank is named late when its arrival at the gradient all-reduce (data + compute per step) exceeds
    /// the median rank's by more than this fraction of the median step time, in this many consecutive
    /// windows.
    #[serde(default = "late_fraction")]
    pub late_fraction: f64,
    #[serde(default = "three")]
    pub late_windows: u32,
}

fn fifty() -> u64 {
    50
}

fn late_fraction() -> f64 {
    0.2
}

fn three() -> u32 {
    3
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            every_steps: fifty(),
            tensorboard: true,
            late_fraction: late_fraction(),
            late_windows: three(),
        }
    }
}

/// `[checkpoint]`: when rank 0 writes a resumable checkpoint (model, optimizer state, EMA, schedule
/// position, both streams' cursors) and the coordinator records it as the job's commit point.
/// A worker told to stop (SIGTERM) writes one at the next step boundary whatever these say.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointConfig {
    /// Every this many optimizer steps (0: never by step count).
    #[serde(default)]
    pub every_steps: u64,
    /// After every this many epochs (0: never at epoch ends).
    #[serde(default = "one")]
    pub every_epochs: u64,
    /// How many of the newest checkpoints to keep (at least 1); older ones are deleted once a newer
    /// one is committed.
    #[serde(default = "two_usize")]
    pub keep: usize,
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        CheckpointConfig {
            every_steps: 0,
            every_epochs: 1,
            keep: 2,
        }
    }
}

fn default_heartbeat_interval_ms() -> u64 {
    1000
}
fn default_heartbeat_timeout_ms() -> u64 {
    30_000
}
fn default_collective_timeout_ms() -> u64 {
    60_000
}
fn default_rendezvous_timeout_ms() -> u64 {
    120_000
}
fn default_stall_timeout_ms() -> u64 {
    600_000
}
fn default_bucket_mb() -> f64 {
    25.0
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            heartbeat_interval_ms: default_heartbeat_interval_ms(),
            heartbeat_timeout_ms: default_heartbeat_timeout_ms(),
            collective_timeout_ms: default_collective_timeout_ms(),
            rendezvous_timeout_ms: default_rendezvous_timeout_ms(),
            bucket_mb: default_bucket_mb(),
            stall_timeout_ms: default_stall_timeout_ms(),
            device: DeviceChoice::default(),
            backend: BackendChoice::default(),
            max_restarts: 0,
            rejoin_timeout_ms: default_rendezvous_timeout_ms(),
            min_workers: None,
            max_workers: None,
        }
    }
}

impl JobConfig {
    /// Parses TOML; `origin` names the file in errors.
    pub fn from_toml(text: &str, origin: &Path) -> Result<JobConfig> {
        let cfg: JobConfig = toml::from_str(text).map_err(|e| Error::Config {
            path: origin.into(),
            message: e.to_string(),
        })?;
        cfg.validate(origin)?;
        Ok(cfg)
    }

    pub fn load(path: &Path) -> Result<JobConfig> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::Config {
            path: path.into(),
            message: format!("cannot read: {e}"),
        })?;
        Self::from_toml(&text, path)
    }

    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("a JobConfig is always representable as TOML")
    }

    /// SHA-256 (hex) of everything that decides the training trajectory — the config less what only
    /// decides how it is carried out (`[cluster]`, `[checkpoint]`, loader threads and caches,
    /// `train.threads`) — so a resumed job can refuse to continue under a different recipe.
    pub fn trajectory_fingerprint(&self) -> String {
        use sha2::{Digest, Sha256};
        let mut c = self.clone();
        c.cluster = ClusterConfig::default();
        c.checkpoint = CheckpointConfig::default();
        c.metrics = MetricsConfig::default();
        c.train.threads = 0;
        c.loader = LoaderConfig {
            shuffle_window: c.loader.shuffle_window,
            corrupt: c.loader.corrupt,
            ..LoaderConfig::default()
        };
        hex::encode(Sha256::digest(c.to_toml().as_bytes()))
    }

    /// Checks that need no data and no world size.
    pub fn validate(&self, origin: &Path) -> Result<()> {
        let bad = |key: &str, why: String| Error::Config {
            path: origin.into(),
            message: format!("{key}: {why}"),
        };
        if !(self.metrics.late_fraction > 0.0 && self.metrics.late_fraction.is_finite()) {
            return Err(bad(
                "metrics.late_fraction",
                format!(
                    "must be a positive number, got {}",
                    self.metrics.late_fraction
                ),
            ));
        }
        if self.metrics.late_windows == 0 {
            return Err(bad("metrics.late_windows", "must be at least 1".into()));
        }
        match (self.train.epochs, self.train.steps) {
            (0, None) => {
                return Err(bad(
                    "train.epochs",
                    "must be at least 1 (or give train.steps instead)".into(),
                ))
            }
            (_, Some(0)) => return Err(bad("train.steps", "must be at least 1".into())),
            (e, Some(_)) if e > 0 => {
                return Err(bad(
                    "train.steps",
                    "give train.epochs or train.steps, not both".into(),
                ))
            }
            _ => {}
        }
        if let Some(v) = &self.data.val_split {
            if v == &self.data.train_split || v == &self.data.test_split {
                return Err(bad(
                    "data.val_split",
                    format!("{v:?} is also the train or test split; name a held-out split (`butler data prepare … --val N` writes \"val\")"),
                ));
            }
        }
        if self.train.batch_size == 0 {
            return Err(bad("train.batch_size", "must be at least 1".into()));
        }
        if self.checkpoint.keep == 0 {
            return Err(bad(
                "checkpoint.keep",
                "must be at least 1 (the newest checkpoint is the job's commit point)".into(),
            ));
        }
        if let Some(d) = self.train.ema {
            if !(d > 0.0 && d < 1.0) {
                return Err(bad(
                    "train.ema",
                    format!(
                        "{d} is not a decay: it must lie strictly between 0 and 1 (e.g. 0.999)"
                    ),
                ));
            }
        }
        if self.cluster.backend == BackendChoice::Nccl && self.cluster.device == DeviceChoice::Cpu {
            return Err(bad(
                "cluster.backend",
                "\"nccl\" needs cluster.device = \"cuda\" or \"auto\" (NCCL runs on CUDA tensors only)"
                    .into(),
            ));
        }
        if self.data.unlabeled_ratio == Some(0) {
            return Err(bad("data.unlabeled_ratio", "must be at least 1".into()));
        }
        if self.loader.threads == 0 || self.loader.prefetch == 0 || self.loader.cache_shards == 0 {
            return Err(bad(
                "loader",
                "threads, prefetch and cache_shards must be at least 1".into(),
            ));
        }
        if self.train.eval_every == 0 {
            return Err(bad("train.eval_every", "must be at least 1".into()));
        }
        if !(0.0..1.0).contains(&self.train.label_smoothing) {
            return Err(bad(
                "train.label_smoothing",
                format!("{} is outside [0, 1)", self.train.label_smoothing),
            ));
        }
        if !(self.optim.lr > 0.0 && self.optim.lr.is_finite()) {
            return Err(bad(
                "optim.lr",
                format!("{} must be a positive number", self.optim.lr),
            ));
        }
        if !(0.0..1.0).contains(&self.optim.momentum) {
            return Err(bad(
                "optim.momentum",
                format!("{} is outside [0, 1)", self.optim.momentum),
            ));
        }
        if self.optim.nesterov && (self.optim.kind != OptimKind::Sgd || self.optim.momentum == 0.0)
        {
            return Err(bad(
                "optim.nesterov",
                "needs kind = \"sgd\" and momentum > 0".into(),
            ));
        }
        if !(self.optim.weight_decay >= 0.0 && self.optim.weight_decay.is_finite()) {
            return Err(bad(
                "optim.weight_decay",
                "must be a finite number ≥ 0".into(),
            ));
        }
        if !(self.optim.eps > 0.0 && self.optim.eps.is_finite()) {
            return Err(bad("optim.eps", "must be a finite number > 0".into()));
        }
        if self.optim.betas.iter().any(|b| !(0.0..1.0).contains(b)) {
            return Err(bad(
                "optim.betas",
                format!("{:?} must lie in [0, 1)", self.optim.betas),
            ));
        }
        if !(self.optim.trust_coefficient > 0.0 && self.optim.trust_coefficient.is_finite()) {
            return Err(bad(
                "optim.trust_coefficient",
                "must be a finite number > 0".into(),
            ));
        }
        if let Some(p) = &self.pretrain {
            p.validate(
                &self.model,
                self.data.labels_per_class,
                self.data.unlabeled_split.as_deref(),
                origin,
            )?;
        }
        if !(0.0..=1.0).contains(&self.schedule.min_lr_ratio) {
            return Err(bad("schedule.min_lr_ratio", "must lie in [0, 1]".into()));
        }
        if !(self.cluster.bucket_mb > 0.0 && self.cluster.bucket_mb.is_finite()) {
            return Err(bad("cluster.bucket_mb", "must be positive".into()));
        }
        for (key, ms) in [
            (
                "cluster.heartbeat_interval_ms",
                self.cluster.heartbeat_interval_ms,
            ),
            (
                "cluster.heartbeat_timeout_ms",
                self.cluster.heartbeat_timeout_ms,
            ),
            (
                "cluster.collective_timeout_ms",
                self.cluster.collective_timeout_ms,
            ),
            (
                "cluster.rendezvous_timeout_ms",
                self.cluster.rendezvous_timeout_ms,
            ),
        ] {
            if ms == 0 {
                return Err(bad(key, "must be at least 1 ms".into()));
            }
        }
        if self.cluster.heartbeat_timeout_ms <= self.cluster.heartbeat_interval_ms {
            return Err(bad(
                "cluster.heartbeat_timeout_ms",
                "must exceed cluster.heartbeat_interval_ms".into(),
            ));
        }
        if let ModelConfig::Mlp { hidden, .. } = &self.model {
            if hidden.contains(&0) {
                return Err(bad("model.hidden", "widths must be positive".into()));
            }
        }
        self.validate_regularizers(&bad)?;
        let r = &self.regularize;
        let facts = crate::semi::JobFacts {
            pretrain: self.pretrain.is_some(),
            unlabeled_split: self.data.unlabeled_split.is_some(),
            distill: r.distill.is_some(),
            batch_regularizers: r.mix.is_some() || r.manifold_mixup.is_some() || r.cutout.is_some(),
        };
        crate::semi::validate(self.ssl.as_ref(), self.pseudo_label.as_ref(), &facts, &bad)?;
        if let Some(ssl) = &self.ssl {
            ssl.check_ema(self.train.ema)
                .map_err(|(key, why)| bad(key, why))?;
        }
        if let ModelConfig::ConvBase { channels: 0, .. } = &self.model {
            return Err(bad("model.channels", "must be positive".into()));
        }
        Ok(())
    }

    fn validate_regularizers(&self, bad: &dyn Fn(&str, String) -> Error) -> Result<()> {
        let prob = |key: &str, p: f64| {
            if (0.0..=1.0).contains(&p) {
                Ok(())
            } else {
                Err(bad(key, format!("{p} is outside [0, 1]")))
            }
        };
        let r = &self.regularize;
        if let Some(m) = &r.mix {
            if !(m.mixup_alpha >= 0.0
                && m.mixup_alpha.is_finite()
                && m.cutmix_alpha >= 0.0
                && m.cutmix_alpha.is_finite())
            {
                return Err(bad("regularize.mix", "alphas must be ≥ 0".into()));
            }
            if m.mixup_alpha == 0.0 && m.cutmix_alpha == 0.0 {
                return Err(bad(
                    "regularize.mix",
                    "set mixup_alpha and/or cutmix_alpha > 0".into(),
                ));
            }
            prob("regularize.mix.switch_prob", m.switch_prob)?;
            prob("regularize.mix.prob", m.prob)?;
        }
        if let Some(m) = &r.manifold_mixup {
            if !(m.alpha > 0.0 && m.alpha.is_finite()) {
                return Err(bad("regularize.manifold_mixup.alpha", "must be > 0".into()));
            }
            if m.layers.is_empty() {
                return Err(bad(
                    "regularize.manifold_mixup.layers",
                    "must list at least one mix point (0 = input)".into(),
                ));
            }
            prob("regularize.manifold_mixup.prob", m.prob)?;
            if r.mix.is_some() {
                return Err(bad(
                    "regularize.manifold_mixup",
                    "cannot be combined with regularize.mix (both mix the batch)".into(),
                ));
            }
            if r.distill.is_some() {
                return Err(bad("regularize.manifold_mixup", "cannot be combined with distill (the teacher cannot see the student's mixed hidden state)".into()));
            }
        }
        if let Some(c) = &r.cutout {
            if c.holes == 0 || c.size == 0 {
                return Err(bad(
                    "regularize.cutout",
                    "holes and size must be ≥ 1".into(),
                ));
            }
            prob("regularize.cutout.prob", c.prob)?;
        }
        if let Some(d) = &r.distill {
            prob("regularize.distill.alpha", d.alpha)?;
            if !(d.unlabeled_weight >= 0.0 && d.unlabeled_weight.is_finite()) {
                return Err(bad(
                    "regularize.distill.unlabeled_weight",
                    "must be a finite number ≥ 0".into(),
                ));
            }
            if !(d.temperature > 0.0 && d.temperature.is_finite()) {
                return Err(bad("regularize.distill.temperature", "must be > 0".into()));
            }
        }
        Ok(())
    }

    /// Checks that depend on the world size.
    pub fn validate_world(&self, world_size: u32) -> Result<()> {
        if world_size == 0 {
            return Err(Error::invalid("world size", "must be at least 1"));
        }
        if !self.train.batch_size.is_multiple_of(world_size as usize) {
            return Err(Error::invalid(
                "train.batch_size",
                format!(
                    "global batch {} is not divisible by {world_size} workers (each worker takes batch_size / workers)",
                    self.train.batch_size
                ),
            ));
        }
        if let Some(p) = &self.pretrain {
            p.validate_world(world_size)?;
        }
        if let Some(max) = self.cluster.max_workers {
            if max < world_size {
                return Err(Error::invalid(
                    "cluster.max_workers",
                    format!("{max} is below the world size {world_size} the job starts with"),
                ));
            }
            if max > world_size && self.cluster.min_workers.is_none() {
                return Err(Error::invalid(
                    "cluster.max_workers",
                    "growing past the starting world needs an elastic job: set cluster.min_workers",
                ));
            }
        }
        if let Some(min) = self.cluster.min_workers {
            let bad = |why: String| Error::invalid("cluster.min_workers", why);
            if min == 0 || min > world_size {
                return Err(bad(format!(
                    "{min} must lie between 1 and the world size {world_size}"
                )));
            }
            if self.cluster.max_restarts == 0 {
                return Err(bad(
                    "an elastic job regroups when it loses a worker: set cluster.max_restarts to at \
                     least 1"
                        .into(),
                ));
            }
            let max = self.cluster.max_workers.unwrap_or(world_size);
            if min < max && (self.pretrain.is_some() || self.pseudo_label.is_some()) {
                return Err(bad(format!(
                    "the world may change ({min}..={max} workers), but staged jobs and pseudo-label \
                     rounds cannot change their world yet; remove cluster.min_workers / max_workers"
                )));
            }
            if min < max {
                for w in (min..=max).filter(|&w| w != world_size) {
                    let carry = Self {
                        cluster: ClusterConfig {
                            min_workers: None,
                            max_workers: None,
                            ..self.cluster.clone()
                        },
                        ..self.clone()
                    };
                    carry.validate_world(w).map_err(|e| {
                        bad(format!(
                            "the job may run with {w} workers (cluster.min_workers..=max_workers), \
                             which cannot carry it: {e}"
                        ))
                    })?;
                }
            }
        }
        Ok(())
    }

    /// μ: `data.unlabeled_ratio`, or the method's default (FixMatch 7, otherwise 1).
    pub fn unlabeled_ratio(&self) -> u64 {
        self.data
            .unlabeled_ratio
            .unwrap_or(match self.ssl.as_ref().map(|s| s.method) {
                // FixMatch's μ = 7, which USB keeps for its threshold family.
                Some(
                    crate::semi::SslMethod::Fixmatch
                    | crate::semi::SslMethod::Flexmatch
                    | crate::semi::SslMethod::Freematch
                    | crate::semi::SslMethod::Softmatch,
                ) => 7,
                _ => 1,
            })
    }

    pub fn subset_seed(&self) -> u64 {
        self.data.subset_seed.unwrap_or(self.job.seed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[job]
name = "t"
[data]
manifest = "data/mnist1d"
[model]
kind = "conv_base"
[optim]
kind = "adam"
lr = 0.01
[train]
epochs = 2
batch_size = 100
"#;

    fn parse(text: &str) -> Result<JobConfig> {
        JobConfig::from_toml(text, Path::new("job.toml"))
    }

    #[test]
    fn good_config_round_trips_through_toml() {
        let c = parse(GOOD).unwrap();
        assert_eq!(
            c.model,
            ModelConfig::ConvBase {
                channels: 25,
                input_length: None
            }
        );
        assert_eq!(parse(&c.to_toml()).unwrap(), c);
    }

    #[test]
    fn unknown_key_is_named() {
        let e = parse(&GOOD.replace("lr = 0.01", "lr = 0.01\nlearning_rate = 0.1"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("job.toml") && e.contains("learning_rate"), "{e}");
        let e = parse(&GOOD.replace("kind = \"conv_base\"", "kind = \"conv_base\"\nchanels = 3"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("chanels"), "{e}");
    }

    #[test]
    fn missing_key_is_named() {
        let e = parse(&GOOD.replace("epochs = 2\n", ""))
            .unwrap_err()
            .to_string();
        assert!(e.contains("epochs"), "{e}");
    }

    #[test]
    fn bad_values_are_named() {
        let e = parse(&GOOD.replace("lr = 0.01", "lr = -1.0"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("optim.lr"), "{e}");
        let c = parse(GOOD).unwrap();
        assert!(c
            .validate_world(3)
            .unwrap_err()
            .to_string()
            .contains("not divisible by 3"));
        assert!(c.validate_world(4).is_ok());
    }

    #[test]
    fn non_finite_and_zero_values_are_named() {
        for (from, to, key) in [
            ("lr = 0.01", "lr = nan", "optim.lr"),
            ("lr = 0.01", "lr = 0.01\neps = 0.0", "optim.eps"),
            (
                "lr = 0.01",
                "lr = 0.01\nweight_decay = inf",
                "optim.weight_decay",
            ),
            (
                "batch_size = 100\n",
                "batch_size = 100\n[regularize.mix]\nmixup_alpha = inf\n",
                "regularize.mix",
            ),
            (
                "batch_size = 100\n",
                "batch_size = 100\n[cluster]\ncollective_timeout_ms = 0\n",
                "cluster.collective_timeout_ms",
            ),
        ] {
            let e = parse(&GOOD.replace(from, to)).unwrap_err().to_string();
            assert!(e.contains(key), "{to}: {e}");
        }
    }
}
