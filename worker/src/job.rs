//! What every driver trains with once the worker has joined: the loaded job (`Job`: labeled subset,
//! test split, device, labeled-batch augmentation), the epoch loop (`run_epochs`), the unlabeled stream
//! and the views it yields.

use crate::checkpoint::{self, PointOf, ResumeMeta};
use crate::collective::Collective;
use crate::data::InMemorySplit;
use crate::error::rpc;
use crate::session::Ctx;
use crate::timing::Phase;
use crate::trainer::{self, Trainer};
use crate::{augment, loader, rounds, streams, Error, Result};
use butler_common::config::CheckpointConfig;
use butler_common::config::JobConfig;
use butler_common::sampler::{labeled_subset, DistributedSampler};
use butler_data::JobDataCheck;
use butler_proto::{AssignmentRequest, CommitRequest, MetricsReport, Stream};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tch::Device;
use tracing::{info, warn};

/// What every phase of a job shares once the data is loaded and the ring is up.
pub(crate) struct Job<'a> {
    pub(crate) ctx: &'a Ctx<'a>,
    pub(crate) cfg: &'a JobConfig,
    pub(crate) manifest: butler_data::manifest::Manifest,
    pub(crate) manifest_file: PathBuf,
    pub(crate) train_set: InMemorySplit,
    pub(crate) test_set: InMemorySplit,
    /// `data.val_split`: evaluated while training; the test split then only at the end.
    pub(crate) val_set: Option<InMemorySplit>,
    pub(crate) per_rank_batch: u64,
    pub(crate) steps_per_epoch: u64,
    /// Per-sample augmentation of labeled batches.
    pub(crate) labeled_aug: Option<LabeledAug>,
    /// Where the model and its steps live; batches are built on the host and copied there.
    pub(crate) device: Device,
}

/// A pipeline applied to every labeled sample, with the generator view it draws from.
pub(crate) struct LabeledAug {
    pub(crate) pipeline: augment::Pipeline,
    pub(crate) view: u64,
}

/// The generator view of `[augment] labeled` (the loader's views are 0 and 1).
const LABELED_VIEW: u64 = 2;

impl<'a> Job<'a> {
    /// Validates the config against the world and loads the labeled (sub)set and the test split.
    pub(crate) fn load(ctx: &'a Ctx<'a>, cfg: &'a JobConfig, device: Device) -> Result<Job<'a>> {
        cfg.validate_world(ctx.world)?;
        let (manifest, manifest_file) = cfg.check_data()?;
        let mut train_set = InMemorySplit::load(&manifest_file, &manifest, &cfg.data.train_split)?;
        if let Some(k) = cfg.data.labels_per_class {
            let labels = Vec::<i64>::try_from(&train_set.y)?;
            train_set = train_set.subset(&labeled_subset(&labels, k, cfg.subset_seed()));
        }
        let test_set = InMemorySplit::load(&manifest_file, &manifest, &cfg.data.test_split)?;
        let val_set = match &cfg.data.val_split {
            Some(v) => Some(InMemorySplit::load(&manifest_file, &manifest, v)?),
            None => None,
        };
        let per_rank_batch = (cfg.train.batch_size / ctx.world as usize) as u64;
        // Every rank runs the same number of steps: ceil(ceil(n / world) / per-rank batch).
        let steps_per_epoch = train_set
            .len
            .div_ceil(ctx.world as u64)
            .div_ceil(per_rank_batch);
        let labeled_aug = labeled_augmentation(cfg, &manifest.sample_shape)?;
        Ok(Job {
            ctx,
            cfg,
            manifest,
            manifest_file,
            train_set,
            test_set,
            val_set,
            per_rank_batch,
            steps_per_epoch,
            labeled_aug,
            device,
        })
    }

    pub(crate) fn new_trainer(&self) -> Result<Trainer> {
        Trainer::new_on(
            self.cfg,
            &self.manifest.sample_shape,
            self.manifest.num_classes(),
            self.cfg.job.seed,
            self.steps_per_epoch * self.cfg.train.epochs,
            self.device,
        )
    }
}

/// What [`run_epochs`] did.
pub(crate) struct EpochsRun {
    /// The last evaluation.
    pub(crate) eval: trainer::Evaluation,
    /// The last evaluation of the validation split (`data.val_split`).
    pub(crate) val: Option<trainer::Evaluation>,
    /// This rank's mean labeled loss per epoch.
    pub(crate) losses: Vec<f64>,
    /// Labeled samples this rank trained on.
    pub(crate) samples: u64,
}

/// Trains the (global) epochs `epochs` — labeled batches from the coordinator's assignment, the
/// unlabeled stream's batches when there is one, pseudo-labeled samples picked from them when a table
/// is given — reporting metrics after each; returns the last evaluation.
pub(crate) fn run_epochs(
    job: &Job,
    trainer: &mut Trainer,
    ring: &mut dyn Collective,
    mut unlabeled: Option<&mut streams::UnlabeledStream>,
    pseudo: Option<&rounds::PseudoTable>,
    epochs: std::ops::Range<u64>,
    durable: Option<Durable<'_>>,
) -> Result<EpochsRun> {
    let (ctx, cfg) = (job.ctx, job.cfg);
    let shape = &job.manifest.sample_shape;
    let (mut last_eval, mut last_val) = (None, None);
    let mut skipped_total = 0usize;
    let (mut losses, mut samples) = (Vec::new(), 0u64);
    let last_epoch = epochs.end.saturating_sub(1);
    // The evaluation cadence counts from the range's start, also when a resumed job starts later.
    let first_epoch = epochs.start;
    let resumed = durable.as_ref().and_then(|d| d.resumed);
    let mut trace = SampleTrace::open(ctx)?;
    let mut last_commit = resumed.map(|m| m.step);
    let start_epoch = resumed.map_or(epochs.start, |m| m.epoch.max(epochs.start));
    // The unlabeled split's size (FlexMatch's N), looked up once.
    let pool_len = (cfg.data.unlabeled_split.as_ref())
        .and_then(|s| job.manifest.splits.get(s))
        .map_or(0, |s| s.num_samples);
    for epoch in start_epoch..epochs.end {
        ctx.progress.epoch.store(epoch, Ordering::Relaxed);
        let a = ctx
            .rt
            .block_on(ctx.client.clone().get_assignment(AssignmentRequest {
                rank: ctx.rank,
                generation: ctx.generation,
                epoch,
                stream: Stream::Labeled as i32,
            }))
            .map_err(rpc("get_assignment"))?
            .into_inner();
        if !a.has_epoch {
            break;
        }
        if a.dataset_len != job.train_set.len {
            return Err(Error::Setup(format!(
                "the coordinator assigns a training set of {} samples but this worker has {} (different data or config?)",
                a.dataset_len, job.train_set.len
            )));
        }
        let sampler = DistributedSampler {
            dataset_len: a.dataset_len,
            seed: a.seed,
            epoch: a.epoch,
            shuffle: a.shuffle,
            world_size: a.world_size,
            rank: a.rank,
            start: a.start,
        };
        let t0 = Instant::now();
        // A resumed epoch carries on the running loss of its first part.
        let resumed_here = resumed.filter(|m| m.epoch == epoch);
        let (mut loss_sum, mut seen) = match resumed_here {
            Some(m) if m.world_size == ctx.world => m
                .epoch_losses
                .get(ctx.rank as usize)
                .map_or((0.0, 0u64), |&[l, n]| (l, n as u64)),
            // Another world: rank 0 carries the whole epoch's running loss.
            Some(m) if ctx.rank == 0 => m
                .epoch_losses
                .iter()
                .fold((0.0, 0u64), |(l, n), e| (l + e[0], n + e[1] as u64)),
            _ => (0.0, 0),
        };
        let steps_before = resumed_here.map_or(0, |m| m.steps_in_epoch);
        let lr = trainer.learning_rate();
        let per_rank_batch = job.per_rank_batch;
        for (k, batch) in sampler.batches(per_rank_batch).iter().enumerate() {
            ctx.check_stop()?;
            if durable.is_none() {
                terminate_if_asked(ctx)?;
            }
            if let Some(d) = &durable {
                // Every rank takes the same decision at the same step: a stop requested on any rank
                // (SIGTERM) is agreed through one tiny all-reduce, and the step counter is shared.
                let stop = agree_to_stop(ctx, ring)?;
                let step = trainer.steps_taken();
                let every = d.cfg.every_steps;
                let due = every > 0 && step > 0 && step.is_multiple_of(every);
                if (stop || due) && last_commit != Some(step) {
                    let at = Boundary {
                        epoch,
                        steps_in_epoch: steps_before + k as u64,
                        labeled_start: sampler.position_after(k as u64, per_rank_batch),
                        unlabeled: unlabeled.as_deref().map(|u| u.cursor()),
                        unlabeled_periods: periods_of(unlabeled.as_deref()),
                        loss_sum,
                        seen,
                        round: d.round,
                        ..Boundary::default()
                    };
                    commit(job, ring, &at, step, || trainer.training_state())?;
                    last_commit = Some(step);
                }
                if stop {
                    ring.barrier()?;
                    return Err(stopped_at(ctx, step));
                }
            }
            let timing = &ctx.progress.timing;
            let t_data = Instant::now();
            timing.enter(Phase::Data);
            if let Some(d) = crate::timing::slow_data_delay(ctx.rank, ctx.world) {
                std::thread::sleep(d);
            }
            let (x, y) = match &job.labeled_aug {
                Some(a) => {
                    job.train_set
                        .batch_augmented(batch, &a.pipeline, cfg.job.seed, epoch, a.view)
                }
                None => job.train_set.batch(batch),
            };
            let global = sampler.global_batch_len(k as u64, per_rank_batch);
            let mut pseudo_batch = None;
            let mut unlabeled_ids: Vec<u64> = Vec::new();
            let u = match unlabeled.as_deref_mut() {
                Some(stream) => {
                    let (b, global_u) = stream.next_batch()?;
                    if trace.is_some() {
                        // (stream epoch, sample id) pairs, flattened.
                        let e = stream.cursor().epoch;
                        unlabeled_ids = b.ids.iter().flat_map(|&id| [e, id]).collect();
                    }
                    for s in &b.skipped {
                        warn!(shard = %s.shard.display(), index = s.index, reason = %s.reason, "skipped a corrupt unlabeled sample");
                    }
                    skipped_total += b.skipped.len();
                    match pseudo {
                        // Pseudo-label rounds train on the selected samples only, as a labeled term.
                        Some(table) => {
                            pseudo_batch = Some(table.batch(&b, shape));
                            None
                        }
                        None => Some((view_tensors(&b, shape), global_u, b.ids.clone())),
                    }
                }
                None => None,
            };
            let u_batch = u.as_ref().map(|(views, g, ids)| trainer::UnlabeledBatch {
                views,
                global_len: *g,
                ids,
                pool_len,
            });
            let data_time = t_data.elapsed();
            timing.enter(Phase::Compute);
            let (comm_before, t_step) = (timing.comm_total(), Instant::now());
            let loss = trainer.step_with(&x, &y, global, u_batch, pseudo_batch.as_ref(), ring)?;
            let (wall, optimizer) = (t_step.elapsed(), trainer.last_optimizer_time());
            let comm = timing.comm_total().saturating_sub(comm_before);
            timing.step_done(
                data_time,
                wall.saturating_sub(comm).saturating_sub(optimizer),
                optimizer,
                batch.len() as u64,
            );
            report_step_if_due(ctx, cfg, trainer, ring, epoch)?;
            if !loss.is_finite() {
                return Err(Error::Setup(format!(
                    "training diverged: loss is {loss} at epoch {epoch} step {}",
                    trainer.steps_taken()
                )));
            }
            if let Some(t) = trace.as_mut() {
                t.record(
                    ctx.generation,
                    epoch,
                    trainer.steps_taken() - 1,
                    batch,
                    &unlabeled_ids,
                )?;
            }
            loss_sum += loss * batch.len() as f64;
            seen += batch.len() as u64;
            ctx.progress
                .step
                .store(trainer.steps_taken(), Ordering::Relaxed);
            ctx.progress.advanced();
            fault_hooks(ctx, trainer.steps_taken());
        }
        let seconds = t0.elapsed().as_secs_f64();
        samples += seen;
        losses.push(if seen > 0 {
            loss_sum / seen as f64
        } else {
            0.0
        });
        let last = epoch == last_epoch;
        let due = last || (epoch - first_epoch + 1).is_multiple_of(cfg.train.eval_every);
        // With a validation split the periodic evaluations use it, and the test split is evaluated
        // once, after the last epoch; without one the test split is the periodic curve.
        ctx.progress.timing.enter(Phase::Eval);
        let val = match &job.val_set {
            Some(v) if due => Some(trainer.evaluate(&v.x, &v.y, ring, 1000)?),
            _ => None,
        };
        if val.is_some() {
            last_val = val;
        }
        let eval = if last || (due && job.val_set.is_none()) {
            let e = trainer.evaluate(&job.test_set.x, &job.test_set.y, ring, 1000)?;
            last_eval = Some(e);
            Some(e)
        } else {
            None
        };
        if due {
            ctx.progress.advanced();
        }
        ctx.progress.timing.enter(Phase::Idle);
        let report = MetricsReport {
            rank: ctx.rank,
            generation: ctx.generation,
            epoch,
            step: trainer.steps_taken(),
            train_loss: *losses.last().expect("pushed above"),
            train_samples: seen,
            train_seconds: seconds,
            learning_rate: lr,
            test_accuracy: eval.filter(|_| ctx.rank == 0).map(|e| e.accuracy),
            test_loss: eval.filter(|_| ctx.rank == 0).map(|e| e.loss),
            val_accuracy: val.filter(|_| ctx.rank == 0).map(|e| e.accuracy),
            val_loss: val.filter(|_| ctx.rank == 0).map(|e| e.loss),
        };
        ctx.rt
            .block_on(ctx.client.clone().report_metrics(report))
            .map_err(rpc("report_metrics"))?;
        if let Some(d) = &durable {
            let every = d.cfg.every_epochs;
            let step = trainer.steps_taken();
            if every > 0
                && (epoch + 1).is_multiple_of(every)
                && epoch != last_epoch
                && last_commit != Some(step)
            {
                let at = Boundary {
                    epoch: epoch + 1,
                    steps_in_epoch: 0,
                    labeled_start: 0,
                    unlabeled: unlabeled.as_deref().map(|u| u.cursor()),
                    unlabeled_periods: periods_of(unlabeled.as_deref()),
                    round: d.round,
                    ..Boundary::default()
                };
                commit(job, ring, &at, step, || trainer.training_state())?;
                last_commit = Some(step);
            }
        }
    }
    if skipped_total > 0 {
        warn!(skipped_total, "corrupt unlabeled samples were skipped");
    }
    let eval = last_eval.ok_or_else(|| Error::Setup("the job ran no epoch".into()))?;
    Ok(EpochsRun {
        eval,
        val: last_val,
        losses,
        samples,
    })
}

/// Every `metrics.every_steps` optimizer steps (the count every rank shares): the step's scalars averaged
/// over the ranks, sent by rank 0. A coordinator that cannot take them fails the step like any RPC.
pub(crate) fn report_step_if_due(
    ctx: &Ctx,
    cfg: &JobConfig,
    trainer: &Trainer,
    ring: &mut dyn Collective,
    epoch: u64,
) -> Result<()> {
    let every = cfg.metrics.every_steps;
    let step = trainer.steps_taken();
    if every == 0 || step == 0 || !step.is_multiple_of(every) {
        return Ok(());
    }
    let t = ctx.progress.timing.snapshot();
    let mine = [
        t.steps as f64,
        t.samples as f64,
        t.data_seconds,
        t.compute_seconds,
        t.comm_seconds,
        t.optimizer_seconds,
    ];
    let (scalars, per_rank) = trainer.step_scalars(ring, &mine)?;
    if ctx.rank == 0 {
        let ranks = per_rank
            .iter()
            .map(|v| butler_proto::StepTiming {
                steps: v[0] as u64,
                samples: v[1] as u64,
                data_seconds: v[2],
                compute_seconds: v[3],
                comm_seconds: v[4],
                optimizer_seconds: v[5],
            })
            .collect();
        ctx.rt
            .block_on(ctx.client.clone().report_step(butler_proto::StepReport {
                rank: ctx.rank,
                generation: ctx.generation,
                epoch,
                step,
                scalars: scalars.into_iter().collect(),
                ranks,
            }))
            .map_err(rpc("report_step"))?;
    }
    Ok(())
}

/// Test switch `BUTLER_TRACE_SAMPLES=DIR`: every rank appends the labeled samples (positions in the
/// labeled set) of each step it trains to `DIR/rank<r>-gen<g>.jsonl`, so fault tests can count that
/// every sample is trained exactly once per epoch across failures.
struct SampleTrace(std::io::BufWriter<std::fs::File>);

impl SampleTrace {
    fn open(ctx: &Ctx) -> Result<Option<SampleTrace>> {
        let Some(dir) = std::env::var_os("BUTLER_TRACE_SAMPLES") else {
            return Ok(None);
        };
        let path = Path::new(&dir).join(format!("rank{}-gen{}.jsonl", ctx.rank, ctx.generation));
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| butler_common::Error::io(&path, e))?;
        Ok(Some(SampleTrace(std::io::BufWriter::new(f))))
    }

    fn record(
        &mut self,
        generation: u64,
        epoch: u64,
        step: u64,
        ids: &[u64],
        unlabeled: &[u64],
    ) -> Result<()> {
        use std::io::Write;
        let line = serde_json::json!({
            "generation": generation, "epoch": epoch, "step": step, "ids": ids, "unlabeled": unlabeled,
        });
        writeln!(self.0, "{line}")
            .and_then(|()| self.0.flush())
            .map_err(|e| Error::Setup(format!("BUTLER_TRACE_SAMPLES: {e}")))
    }
}

/// A plain job's epochs are durable: rank 0 commits resumable checkpoints as `[checkpoint]` says and
/// when any rank is asked to terminate; `resumed` is the state the job continues from.
pub(crate) struct Durable<'m> {
    pub(crate) cfg: &'m CheckpointConfig,
    pub(crate) resumed: Option<&'m ResumeMeta>,
    /// Pseudo-label rounds: the round being trained (recorded in each commit).
    pub(crate) round: u32,
}

/// A step boundary as a commit records it.
#[derive(Default)]
pub(crate) struct Boundary {
    pub(crate) epoch: u64,
    pub(crate) steps_in_epoch: u64,
    pub(crate) labeled_start: u64,
    pub(crate) unlabeled: Option<streams::Cursor>,
    /// The unlabeled stream's epoch as membership periods (see `UnlabeledStream::periods`).
    pub(crate) unlabeled_periods: Vec<(u32, Vec<u64>)>,
    /// This rank's running loss sum and sample count in the epoch.
    pub(crate) loss_sum: f64,
    pub(crate) seen: u64,
    /// Staged jobs: the stage, and pretraining's per-epoch losses so far.
    pub(crate) stage: u32,
    pub(crate) history: Vec<f64>,
    pub(crate) round: u32,
}

/// Why a rank stops after the agreed stop at `step` (committed): the rank that got SIGTERM leaves; the
/// others regroup without it (with `cluster.max_restarts` the job goes on once a replacement joins).
pub(crate) fn stopped_at(ctx: &Ctx, step: u64) -> Error {
    if ctx.progress.regroup_at_boundary.load(Ordering::Relaxed)
        && !ctx.progress.terminate.load(Ordering::Relaxed)
    {
        return Error::Regroup(format!(
            "admitting a new worker at the checkpoint of step {step} (committed)"
        ));
    }
    if ctx.progress.terminate.load(Ordering::Relaxed) {
        Error::Terminated(format!(
            "asked to terminate (SIGTERM); the checkpoint of step {step} is committed: continue the \
             job with --resume"
        ))
    } else {
        Error::Regroup(format!(
            "another rank was asked to terminate (SIGTERM); the checkpoint of step {step} is committed"
        ))
    }
}

/// Outside a checkpointed loop (fine-tuning of a staged job), SIGTERM stops the rank at once: the job
/// resumes from its last commit point.
pub(crate) fn terminate_if_asked(ctx: &Ctx) -> Result<()> {
    if ctx.progress.terminate.load(Ordering::Relaxed) {
        return Err(Error::Terminated(
            "asked to terminate (SIGTERM) in a phase that writes no checkpoints; continue the job \
             with --resume (from its last commit point)"
                .into(),
        ));
    }
    Ok(())
}

/// The unlabeled stream's membership periods, for a commit.
fn periods_of(stream: Option<&streams::UnlabeledStream>) -> Vec<(u32, Vec<u64>)> {
    stream.map_or(Vec::new(), |s| {
        s.periods()
            .into_iter()
            .map(|p| (p.world, p.consumed))
            .collect()
    })
}

/// `x` as three f32 whose sum in f64 is `x` again (each residual is exact in f64; 3 × 24 bits cover
/// f64's 53).
fn split_f64(x: f64) -> [f32; 3] {
    let a = x as f32;
    let r = x - a as f64;
    let b = r as f32;
    let c = (r - b as f64) as f32;
    [a, b, c]
}

/// True on every rank when any rank was asked to terminate.
pub(crate) fn agree_to_stop(ctx: &Ctx, ring: &mut dyn Collective) -> Result<bool> {
    let mine = ctx.progress.terminate.load(Ordering::Relaxed)
        || ctx.progress.regroup_at_boundary.load(Ordering::Relaxed);
    let mut flag = tch::Tensor::from_slice(&[mine as u8 as f32]);
    ring.all_reduce_sum(&mut flag)?;
    Ok(flag.double_value(&[0]) > 0.0)
}

/// Every rank: share the epoch's running losses; rank 0: write the resumable checkpoint, then have
/// the coordinator record it as the commit point (it checks the file's hash and size).
pub(crate) fn commit(
    job: &Job,
    ring: &mut dyn Collective,
    at: &Boundary,
    step: u64,
    state: impl FnOnce() -> trainer::TrainingState,
) -> Result<()> {
    let ctx = job.ctx;
    let before = ctx.progress.timing.enter(Phase::Checkpoint);
    let out = commit_inner(job, ring, at, step, state);
    ctx.progress.timing.enter(before);
    out
}

fn commit_inner(
    job: &Job,
    ring: &mut dyn Collective,
    at: &Boundary,
    step: u64,
    state: impl FnOnce() -> trainer::TrainingState,
) -> Result<()> {
    let ctx = job.ctx;
    let world = ctx.world as usize;
    // Each rank fills its own slots (the others add zeros, so the sums are exact): the loss sum as
    // three f32 parts that add back to the f64 exactly, so a resumed epoch reports the same mean.
    let mut sums = vec![0f32; 4 * world];
    let parts = split_f64(at.loss_sum);
    let mine = 4 * ctx.rank as usize;
    sums[mine..mine + 3].copy_from_slice(&parts);
    sums[mine + 3] = at.seen as f32;
    let mut t = tch::Tensor::from_slice(&sums);
    ring.all_reduce_sum(&mut t)?;
    ctx.progress.advanced();
    if ctx.rank != 0 {
        return Ok(());
    }
    let all = Vec::<f32>::try_from(&t).expect("a 1-D f32 tensor");
    let meta = ResumeMeta {
        format: 0,
        job: job.cfg.job.name.clone(),
        step,
        epoch: at.epoch,
        steps_in_epoch: at.steps_in_epoch,
        labeled_start: at.labeled_start,
        unlabeled: at.unlabeled.map(|c| [c.epoch, c.step]),
        world_size: ctx.world,
        generation: ctx.generation,
        epoch_losses: all
            .chunks(4)
            .map(|c| [c[0] as f64 + c[1] as f64 + c[2] as f64, c[3] as f64])
            .collect(),
        stage: at.stage,
        history: at.history.clone(),
        round: at.round,
        unlabeled_periods: at.unlabeled_periods.clone(),
    };
    let rel = checkpoint::resumable_name(at.round, step);
    let path = ctx.run_dir.join(&rel);
    let t0 = Instant::now();
    checkpoint::save_state(state(), &meta, &path)?;
    let (sha256, bytes) = butler_common::fsutil::sha256_file(&path)?;
    ctx.rt
        .block_on(ctx.client.clone().commit(CommitRequest {
            rank: ctx.rank,
            generation: ctx.generation,
            point: Some(meta.point(&rel)),
            sha256,
            bytes,
        }))
        .map_err(rpc("commit"))?;
    info!(step, epoch = at.epoch, bytes, seconds = t0.elapsed().as_secs_f64(), checkpoint = %rel, "checkpoint committed");
    Ok(())
}

/// The unlabeled stream, when the job has one: its assignment comes from the coordinator (split, seed,
/// world, rank — never sample lists), the order and the reading happen here.
/// `batch` overrides the per-rank batch of μ·b samples (pseudo-label rounds read more of a pool the
/// fewer of its samples are selected; contrastive pretraining has its own batch).
pub(crate) fn open_unlabeled_stream(
    job: &Job,
    views: Arc<dyn loader::ViewMaker>,
    batch: Option<u64>,
    resumed: Option<&ResumeMeta>,
) -> Result<Option<streams::UnlabeledStream>> {
    let (ctx, cfg, manifest, manifest_file) =
        (job.ctx, job.cfg, &job.manifest, job.manifest_file.as_path());
    let per_rank_batch = job.per_rank_batch;
    if cfg.data.unlabeled_split.is_none() {
        return Ok(None);
    }
    let a = ctx
        .rt
        .block_on(ctx.client.clone().get_assignment(AssignmentRequest {
            rank: ctx.rank,
            generation: ctx.generation,
            epoch: 0,
            stream: Stream::Unlabeled as i32,
        }))
        .map_err(rpc("get_assignment(unlabeled)"))?
        .into_inner();
    let l = &cfg.loader;
    let spec = loader::LoaderSpec {
        dir: manifest_file
            .parent()
            .unwrap_or(Path::new("."))
            .to_path_buf(),
        manifest: Arc::new(manifest.clone()),
        split: a.split.clone(),
        epoch: a.epoch,
        batch: batch.unwrap_or(per_rank_batch * cfg.unlabeled_ratio()) as usize,
        threads: l.threads,
        prefetch: l.prefetch,
        cache_shards: l.cache_shards,
        policy: l.corrupt.into(),
        timeout: Duration::from_millis(cfg.cluster.collective_timeout_ms),
    };
    info!(split = %a.split, samples = a.dataset_len, per_rank_batch = spec.batch, "unlabeled stream assigned");
    // A job resumed with another world size re-cuts what is left of the stream's epoch: the commit's
    // periods become the history of a fresh period.
    let (from, history) = match resumed {
        Some(m) if m.world_size != a.world_size && !m.unlabeled_periods.is_empty() => {
            info!(
                periods = m.unlabeled_periods.len(),
                "the unlabeled stream re-cuts its epoch for this world size"
            );
            (
                streams::Cursor {
                    epoch: a.epoch,
                    step: 0,
                },
                m.unlabeled_periods
                    .iter()
                    .map(|(world, consumed)| butler_data::assign::Period {
                        world: *world,
                        consumed: consumed.clone(),
                    })
                    .collect(),
            )
        }
        _ => (
            streams::Cursor {
                epoch: a.epoch,
                step: a.start,
            },
            Vec::new(),
        ),
    };
    let stream = streams::UnlabeledStream::new(
        spec,
        a.seed,
        l.shuffle_window,
        a.world_size,
        a.rank,
        views,
        from,
        history,
    )?;
    Ok(Some(stream))
}

/// The views the unlabeled stream yields: (clean, strong) for UDA, (weak, strong) for FixMatch, the raw
/// sample otherwise.
pub(crate) fn unlabeled_views(
    cfg: &JobConfig,
    shape: &[usize],
) -> Result<Arc<dyn loader::ViewMaker>> {
    use butler_common::semi::SslMethod;
    let Some(ssl) = &cfg.ssl else {
        return Ok(Arc::new(loader::Identity));
    };
    let mut aug = augment::WeakStrong::for_sample_shape(shape, cfg.augment.flip)
        .map_err(|e| Error::Setup(format!("ssl: {e}")))?;
    if ssl.method == SslMethod::Uda {
        // UDA's target is the prediction on the original sample.
        aug.weak = augment::Pipeline::new();
    }
    Ok(Arc::new(loader::WeakStrongViews {
        seed: cfg.job.seed,
        aug,
    }))
}

/// The per-sample augmentation of the labeled batch, when `[augment] labeled` asks for one.
fn labeled_augmentation(cfg: &JobConfig, shape: &[usize]) -> Result<Option<LabeledAug>> {
    use butler_common::semi::AugmentLevel;
    if cfg.augment.labeled == AugmentLevel::None {
        return Ok(None);
    }
    let aug = augment::WeakStrong::for_sample_shape(shape, cfg.augment.flip)
        .map_err(|e| Error::Setup(format!("augment.labeled: {e}")))?;
    Ok(Some(LabeledAug {
        pipeline: match cfg.augment.labeled {
            AugmentLevel::Strong => aug.strong,
            _ => aug.weak,
        },
        view: LABELED_VIEW,
    }))
}

/// One tensor `[n, ...shape]` per view of a loaded batch.
pub(crate) fn view_tensors(b: &loader::LoadedBatch, shape: &[usize]) -> Vec<tch::Tensor> {
    let mut dims = vec![b.len() as i64];
    dims.extend(shape.iter().map(|&d| d as i64));
    b.views
        .iter()
        .map(|v| tch::Tensor::from_slice(v).reshape(dims.as_slice()))
        .collect()
}

/// Test hooks, for the last rank after step N:
/// - `BUTLER_FAULT=worker-hang-at-step:N`: it stops working while its heartbeat goes on — a hung
///   device or a deadlock, as the coordinator sees it — until told to stop;
/// - `BUTLER_FAULT=worker-kill-at-step:N`: it sends itself SIGKILL (`kill -9`: no cleanup at all);
/// - `BUTLER_FAULT=worker-kill-after-steps:N`: the same after the process's N-th step in all (rounds
///   start each TRAIN phase's step count at 0);
/// - `BUTLER_FAULT=worker-sigterm-at-step:N`: it sends itself SIGTERM (what Kubernetes sends first).
pub(crate) fn fault_hooks(ctx: &Ctx, step: u64) {
    #[derive(Clone, Copy, PartialEq)]
    enum Fault {
        Hang,
        Kill,
        Term,
        /// After this process's N-th step, whatever the trainer's own count (rounds restart it).
        KillAfter,
    }
    static STEPS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let taken = STEPS.fetch_add(1, Ordering::Relaxed) + 1;
    // Read once: this runs after every step.
    static FAULT: std::sync::OnceLock<Option<(Fault, u64)>> = std::sync::OnceLock::new();
    let fault = FAULT.get_or_init(|| {
        let f = std::env::var("BUTLER_FAULT").ok()?;
        let (kind, n) = f.rsplit_once(':')?;
        let kind = match kind {
            "worker-hang-at-step" => Fault::Hang,
            "worker-kill-at-step" => Fault::Kill,
            "worker-sigterm-at-step" => Fault::Term,
            "worker-kill-after-steps" => Fault::KillAfter,
            _ => return None,
        };
        Some((kind, n.parse().ok()?))
    });
    let Some((kind, at)) = *fault else { return };
    let count = if kind == Fault::KillAfter {
        taken
    } else {
        step
    };
    // Only in the job's first generation: the rank that replaces a killed one must not die again.
    if at != count || ctx.rank + 1 != ctx.world || ctx.generation != 1 {
        return;
    }
    let signal = |sig: &str| {
        let _ = std::process::Command::new("kill")
            .args([sig, &std::process::id().to_string()])
            .status();
    };
    match kind {
        Fault::Hang => {
            warn!(step, "BUTLER_FAULT: hanging (test hook)");
            while ctx.check_stop().is_ok() {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Fault::Kill | Fault::KillAfter => {
            warn!(step, "BUTLER_FAULT: kill -9 of this worker (test hook)");
            signal("-KILL");
            // SIGKILL is not deliverable late; never go on training.
            loop {
                std::thread::sleep(Duration::from_secs(1));
            }
        }
        Fault::Term => {
            warn!(step, "BUTLER_FAULT: SIGTERM to this worker (test hook)");
            signal("-TERM");
            // Let the signal task see it before the next step boundary.
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_loss_sum_survives_its_f32_transport_exactly() {
        for x in [
            0.0,
            1.0 / 3.0,
            58.958_857_536_315_92,
            1e-30,
            123456.789012345,
            -2.5e7 / 7.0,
        ] {
            let [a, b, c] = super::split_f64(x);
            assert_eq!(a as f64 + b as f64 + c as f64, x, "{x}");
        }
    }
}
