//! Staged jobs (`[pretrain]`): contrastive pretraining on the unlabeled stream → linear probe on the
//! frozen encoder → fine-tuning on the labeled subset. The coordinator owns the plan: each rank asks it
//! for the next stage (`NextStage`) and reports the one it finished, with its metrics and, from rank 0,
//! its checkpoint, which the coordinator records in `summary.json`.
//!
//! - **pretrain**: SimCLR (two augmented views per sample, `ContrastiveViews`) or CPC (the raw
//!   sequence) on `data.unlabeled_split`, global batch `pretrain.batch_size`, negatives and exact
//!   gradients over all ranks (`crate::contrastive`), `[pretrain.optim]` (LARS or any other) with
//!   `[pretrain.schedule]`.
//! - **probe**: a linear classifier on the frozen encoder's features of the labeled subset,
//!   full-batch Adam for `probe_epochs`. It is tiny, so every rank computes the same one (no
//!   communication); the test accuracy is the probe's.
//! - **finetune**: ConvBase with the pretrained conv stack (`copy_encoder_into`) and a classifier
//!   (initialised from the probe, `finetune_from_probe`, else fresh), trained like a supervised job (`[optim]`, `[schedule]`, `[train]`, the coordinator's labeled
//!   assignments and per-epoch metrics), each labeled sample optionally replaced by one view of the
//!   pretraining augmentation (`finetune_augment`). With `method = "none"` this is the only stage: the
//!   supervised baseline through the same code.

use crate::augment::TwoViews;
use crate::collective::TcpRing;
use crate::contrastive::encoder::copy_encoder_into;
use crate::contrastive::pretrain::Pretrainer;
use crate::data::InMemorySplit;
use crate::loader::{self, ContrastiveViews, ViewMaker};
use crate::trainer::Trainer;
use crate::{rpc, save_checkpoint, streams, Ctx, Error, Result, WorkerOptions};
use butler_common::assign::ShardedOrder;
use butler_common::config::{JobConfig, ModelConfig};
use butler_common::fsutil;
use butler_common::manifest::Manifest;
use butler_common::pretrain::{PretrainConfig, PretrainMethod};
use butler_common::sampler::{labeled_subset, DistributedSampler};
use butler_proto::{AssignmentRequest, MetricsReport, Stage, StageRequest, StageResult, Stream};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tch::nn::{self, Module, OptimizerConfig};
use tch::{Kind, Reduction, Tensor};
use tracing::{info, warn};

/// The staged job; returns (test accuracy, test loss, final checkpoint) of the fine-tuned model.
pub(crate) fn train(
    ctx: &Ctx,
    cfg: &JobConfig,
    opts: &WorkerOptions,
) -> Result<(f64, f64, String)> {
    let p = cfg
        .pretrain
        .as_ref()
        .expect("stages::train runs only for jobs with a [pretrain] section");
    cfg.validate_world(ctx.world)?;
    let (manifest, manifest_file) = cfg.check_data()?;
    let mut train_set = InMemorySplit::load(&manifest_file, &manifest, &cfg.data.train_split)?;
    if let Some(k) = cfg.data.labels_per_class {
        let labels = Vec::<i64>::try_from(&train_set.y)?;
        train_set = train_set.subset(&labeled_subset(&labels, k, cfg.subset_seed()));
    }
    let test_set = InMemorySplit::load(&manifest_file, &manifest, &cfg.data.test_split)?;
    let mut ring = crate::join_ring(ctx, cfg, &opts.advertise_host)?;
    info!(labeled = train_set.len, test = test_set.len, method = ?p.method, "staged job: data loaded; ring connected");

    let mut pretrained: Option<Pretrainer> = None;
    let mut probe_head: Option<(Tensor, Tensor)> = None;
    let mut finished: Option<StageResult> = None;
    let mut outcome = None;
    loop {
        let next = ctx
            .rt
            .block_on(ctx.client.clone().next_stage(StageRequest {
                rank: ctx.rank,
                generation: ctx.generation,
                finished: finished.take(),
            }))
            .map_err(rpc("next_stage"))?
            .into_inner();
        let stage = Stage::try_from(next.next).map_err(|_| {
            Error::Setup(format!(
                "the coordinator named an unknown stage {}",
                next.next
            ))
        })?;
        info!(stage = stage.as_str_name(), "stage starts");
        finished = Some(match stage {
            Stage::Done => break,
            Stage::Pretrain => {
                let (r, model) = pretrain(ctx, cfg, p, &manifest, &manifest_file, &mut ring)?;
                pretrained = Some(model);
                r
            }
            Stage::Probe => {
                let model = pretrained.as_ref().ok_or_else(|| {
                    Error::Setup("the coordinator asked for a probe before pretraining".into())
                })?;
                let classes = manifest.num_classes();
                let (r, head) = probe(
                    ctx, cfg, p, model, classes, &train_set, &test_set, &mut ring,
                )?;
                probe_head = Some(head);
                r
            }
            Stage::Finetune => {
                let (r, result) = finetune(
                    ctx,
                    cfg,
                    p,
                    pretrained.as_ref(),
                    probe_head.as_ref().filter(|_| p.finetune_from_probe),
                    &manifest,
                    &train_set,
                    &test_set,
                    &mut ring,
                )?;
                outcome = Some(result);
                r
            }
        });
    }
    outcome.ok_or_else(|| Error::Setup("the stage plan ended without fine-tuning".into()))
}

fn channels(cfg: &JobConfig) -> Result<usize> {
    match cfg.model {
        ModelConfig::ConvBase { channels, .. } => Ok(channels),
        _ => Err(Error::Setup(
            "staged pretraining needs model.kind = \"conv_base\"".into(),
        )),
    }
}

fn sample_len(manifest: &Manifest) -> Result<usize> {
    match manifest.sample_shape.as_slice() {
        [len] => Ok(*len),
        s => Err(Error::Setup(format!(
            "contrastive pretraining is implemented for 1-D samples (MNIST-1D); this dataset's samples are {s:?}"
        ))),
    }
}

/// Writes `vs` to `rel` under the run directory (atomically); returns `rel`.
fn save_store(vs: &nn::VarStore, run_dir: &Path, rel: &str) -> Result<String> {
    let path = run_dir.join(rel);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| butler_common::Error::io(dir, e))?;
    }
    fsutil::write_atomic_with(&path, |tmp| {
        vs.save(tmp).map_err(|e| {
            butler_common::Error::invalid(format!("checkpoint {}", tmp.display()), e.to_string())
        })
    })?;
    if let Err(e) = fsutil::sync_parent(&path) {
        warn!(error = %e, "cannot fsync checkpoint directory");
    }
    Ok(rel.to_string())
}

fn pretrain(
    ctx: &Ctx,
    cfg: &JobConfig,
    p: &PretrainConfig,
    manifest: &Manifest,
    manifest_file: &Path,
    ring: &mut TcpRing,
) -> Result<(StageResult, Pretrainer)> {
    let t0 = Instant::now();
    let len = sample_len(manifest)?;
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
    let per_rank = (p.batch_size / ctx.world as usize) as u64;
    let sizes: Vec<u64> = manifest
        .splits
        .get(&a.split)
        .ok_or_else(|| Error::Setup(format!("no split {:?} in the manifest", a.split)))?
        .shards
        .iter()
        .map(|s| s.num_samples)
        .collect();
    let steps_per_epoch = ShardedOrder {
        shard_sizes: &sizes,
        seed: a.seed,
        epoch: 0,
        shuffle_window: cfg.loader.shuffle_window,
        history: &[],
    }
    .steps(a.world_size, per_rank);
    let mut model = Pretrainer::new(
        p,
        len,
        channels(cfg)?,
        cfg.job.seed,
        steps_per_epoch * p.epochs,
        (cfg.cluster.bucket_mb * 1024.0 * 1024.0) as usize,
    )?;
    model.broadcast_parameters(ring)?;
    let views: Arc<dyn ViewMaker> = match p.method {
        PretrainMethod::Simclr => Arc::new(ContrastiveViews {
            seed: cfg.job.seed,
            aug: TwoViews::default_1d(len),
        }),
        _ => Arc::new(loader::Identity),
    };
    let l = &cfg.loader;
    let spec = loader::LoaderSpec {
        dir: manifest_file
            .parent()
            .unwrap_or(Path::new("."))
            .to_path_buf(),
        manifest: Arc::new(manifest.clone()),
        split: a.split.clone(),
        epoch: a.epoch,
        batch: per_rank as usize,
        threads: l.threads,
        prefetch: l.prefetch,
        cache_shards: l.cache_shards,
        policy: match l.corrupt {
            butler_common::config::CorruptSamples::Skip => {
                butler_common::shard::CorruptPolicy::Skip
            }
            butler_common::config::CorruptSamples::Fail => {
                butler_common::shard::CorruptPolicy::Fail
            }
        },
        timeout: Duration::from_millis(cfg.cluster.collective_timeout_ms),
    };
    let mut stream = streams::UnlabeledStream::new(
        spec,
        a.seed,
        l.shuffle_window,
        a.world_size,
        a.rank,
        views,
        streams::Cursor {
            epoch: a.epoch,
            step: a.start,
        },
    )?;
    info!(split = %a.split, samples = a.dataset_len, global_batch = p.batch_size, steps_per_epoch, "pretraining");
    let mut history = Vec::new();
    let mut samples = 0u64;
    for epoch in 0..p.epochs {
        ctx.progress.epoch.store(epoch, Ordering::Relaxed);
        let te = Instant::now();
        let mut sum = 0.0;
        for _ in 0..steps_per_epoch {
            ctx.check_stop()?;
            let (b, _global) = stream.next_batch()?;
            for s in &b.skipped {
                warn!(shard = %s.shard.display(), index = s.index, reason = %s.reason, "skipped a corrupt unlabeled sample");
            }
            let n = b.len() as i64;
            samples += n as u64;
            let x: Vec<Tensor> = b
                .views
                .iter()
                .map(|v| Tensor::from_slice(v).reshape([n, len as i64]))
                .collect();
            let loss = model.step(&x, ring)?;
            if !loss.is_finite() {
                return Err(Error::Setup(format!(
                    "pretraining diverged: loss is {loss} at epoch {epoch} step {}",
                    model.steps_taken()
                )));
            }
            sum += loss;
            ctx.progress
                .step
                .store(model.steps_taken(), Ordering::Relaxed);
        }
        let mean = sum / steps_per_epoch.max(1) as f64;
        info!(
            epoch,
            loss = mean,
            lr = model.learning_rate(),
            seconds = te.elapsed().as_secs_f64(),
            "pretraining epoch"
        );
        history.push(mean);
    }
    let checkpoint = if ctx.rank == 0 {
        save_store(&model.vs, &ctx.run_dir, "checkpoints/pretrain.safetensors")?
    } else {
        String::new()
    };
    ring.barrier()?;
    Ok((
        StageResult {
            stage: Stage::Pretrain as i32,
            train_loss: history.last().copied().unwrap_or(0.0),
            loss_history: history,
            steps: model.steps_taken(),
            samples,
            seconds: t0.elapsed().as_secs_f64(),
            test_accuracy: None,
            checkpoint,
        },
        model,
    ))
}

#[allow(clippy::too_many_arguments)]
fn probe(
    ctx: &Ctx,
    cfg: &JobConfig,
    p: &PretrainConfig,
    model: &Pretrainer,
    classes: usize,
    train_set: &InMemorySplit,
    test_set: &InMemorySplit,
    ring: &mut TcpRing,
) -> Result<(StageResult, (Tensor, Tensor))> {
    let t0 = Instant::now();
    // Raw features, not standardised: the probe's classifier is then exactly ConvBase's, ready for LP-FT
    // (folding a standardisation into it divides by the σ of near-dead features and blows up).
    let (train_f, test_f) = tch::no_grad(|| {
        (
            model.encoder.features(&train_set.x),
            model.encoder.features(&test_set.x),
        )
    });
    let classes = classes as i64;
    tch::manual_seed(cfg.job.seed as i64);
    let vs = nn::VarStore::new(tch::Device::Cpu);
    let head = nn::linear(
        vs.root() / "probe",
        train_f.size()[1],
        classes,
        Default::default(),
    );
    let mut opt = nn::Adam::default().build(&vs, p.probe_lr)?;
    let mut history = Vec::new();
    for _ in 0..p.probe_epochs {
        ctx.check_stop()?;
        let loss = head.forward(&train_f).cross_entropy_loss::<Tensor>(
            &train_set.y,
            None,
            Reduction::Mean,
            -100,
            0.0,
        );
        opt.backward_step(&loss);
        history.push(loss.double_value(&[]));
    }
    let accuracy = tch::no_grad(|| {
        head.forward(&test_f)
            .argmax(-1, false)
            .eq_tensor(&test_set.y)
            .to_kind(Kind::Double)
            .mean(Kind::Double)
            .double_value(&[])
    });
    info!(
        test_accuracy = accuracy,
        train_loss = history.last().copied().unwrap_or(0.0),
        "linear probe"
    );
    let checkpoint = if ctx.rank == 0 {
        save_store(&vs, &ctx.run_dir, "checkpoints/probe.safetensors")?
    } else {
        String::new()
    };
    ring.barrier()?;
    let folded = (
        head.ws.detach().copy(),
        head.bs
            .as_ref()
            .expect("nn::linear has a bias")
            .detach()
            .copy(),
    );
    Ok((
        StageResult {
            stage: Stage::Probe as i32,
            train_loss: history.last().copied().unwrap_or(0.0),
            // One entry per tenth of the run keeps the summary short.
            loss_history: history
                .iter()
                .step_by((history.len() / 10).max(1))
                .copied()
                .collect(),
            steps: p.probe_epochs,
            samples: train_set.len * p.probe_epochs,
            seconds: t0.elapsed().as_secs_f64(),
            test_accuracy: (ctx.rank == 0).then_some(accuracy),
            checkpoint,
        },
        folded,
    ))
}

/// One view of the pretraining augmentation per labeled sample, seeded by (job seed, epoch, position of
/// the sample in the labeled subset).
fn augment_batch(aug: &ContrastiveViews, x: &Tensor, ids: &[u64], epoch: u64) -> Result<Tensor> {
    let len = x.size()[1] as usize;
    let values = Vec::<f32>::try_from(&x.contiguous().reshape([-1]))?;
    let mut out = Vec::with_capacity(values.len());
    for (row, &id) in values.chunks(len).zip(ids) {
        out.extend(aug.views(row, &[len], epoch, id).swap_remove(0));
    }
    Ok(Tensor::from_slice(&out).reshape([ids.len() as i64, len as i64]))
}

#[allow(clippy::too_many_arguments)]
fn finetune(
    ctx: &Ctx,
    cfg: &JobConfig,
    p: &PretrainConfig,
    pretrained: Option<&Pretrainer>,
    probe_head: Option<&(Tensor, Tensor)>,
    manifest: &Manifest,
    train_set: &InMemorySplit,
    test_set: &InMemorySplit,
    ring: &mut TcpRing,
) -> Result<(StageResult, (f64, f64, String))> {
    let t0 = Instant::now();
    let len = sample_len(manifest)?;
    let per_rank_batch = (cfg.train.batch_size / ctx.world as usize) as u64;
    let steps_per_epoch = train_set
        .len
        .div_ceil(ctx.world as u64)
        .div_ceil(per_rank_batch);
    let mut trainer = Trainer::new(
        cfg,
        &manifest.sample_shape,
        manifest.num_classes(),
        cfg.job.seed,
        steps_per_epoch * cfg.train.epochs,
    )?;
    match (pretrained, p.method) {
        (Some(m), _) => {
            copy_encoder_into(&m.vs, &trainer.vs).map_err(Error::Setup)?;
        }
        (None, PretrainMethod::None) => {}
        (None, _) => {
            return Err(Error::Setup(
                "fine-tuning was asked for before the pretraining stage ran".into(),
            ))
        }
    }
    if let Some((w, b)) = probe_head {
        // LP-FT (Kumar et al. 2022): start from the probe rather than a random classifier, which would
        // distort the pretrained features in the first steps.
        let mut vars = trainer.vs.variables();
        for (name, value) in [("linear.weight", w), ("linear.bias", b)] {
            let var = vars
                .get_mut(name)
                .ok_or_else(|| Error::Setup(format!("the fine-tuning model has no {name}")))?;
            if var.size() != value.size() {
                return Err(Error::Setup(format!(
                    "{name}: the probe has shape {:?}, the model {:?} (different class counts?)",
                    value.size(),
                    var.size()
                )));
            }
            tch::no_grad(|| var.copy_(value));
        }
    }
    trainer.broadcast_parameters(ring)?;
    let aug = p.finetune_augment.then(|| ContrastiveViews {
        seed: cfg.job.seed,
        aug: TwoViews::default_1d(len),
    });
    let mut history = Vec::new();
    let mut last_eval = None;
    let mut samples = 0u64;
    for epoch in 0.. {
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
        if a.dataset_len != train_set.len {
            return Err(Error::Setup(format!(
                "the coordinator assigns a training set of {} samples but this worker has {} (different data or config?)",
                a.dataset_len, train_set.len
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
        let te = Instant::now();
        let (mut loss_sum, mut seen) = (0.0, 0u64);
        let lr = trainer.learning_rate();
        for (k, batch) in sampler.batches(per_rank_batch).iter().enumerate() {
            ctx.check_stop()?;
            let (mut x, y) = train_set.batch(batch);
            if let (Some(aug), false) = (&aug, batch.is_empty()) {
                x = augment_batch(aug, &x, batch, epoch)?;
            }
            let global = sampler.global_batch_len(k as u64, per_rank_batch);
            let loss = trainer.step(&x, &y, global, None, ring)?;
            if !loss.is_finite() {
                return Err(Error::Setup(format!(
                    "fine-tuning diverged: loss is {loss} at epoch {epoch}"
                )));
            }
            loss_sum += loss * batch.len() as f64;
            seen += batch.len() as u64;
            ctx.progress
                .step
                .store(trainer.steps_taken(), Ordering::Relaxed);
        }
        samples += seen;
        let last = epoch + 1 == cfg.train.epochs;
        let eval = if last || (epoch + 1) % cfg.train.eval_every == 0 {
            let e = trainer.evaluate(&test_set.x, &test_set.y, ring, 1000)?;
            last_eval = Some(e);
            Some(e)
        } else {
            None
        };
        let train_loss = if seen > 0 {
            loss_sum / seen as f64
        } else {
            0.0
        };
        history.push(train_loss);
        ctx.rt
            .block_on(ctx.client.clone().report_metrics(MetricsReport {
                rank: ctx.rank,
                generation: ctx.generation,
                epoch,
                step: trainer.steps_taken(),
                train_loss,
                train_samples: seen,
                train_seconds: te.elapsed().as_secs_f64(),
                learning_rate: lr,
                test_accuracy: eval.filter(|_| ctx.rank == 0).map(|e| e.accuracy),
                test_loss: eval.filter(|_| ctx.rank == 0).map(|e| e.loss),
            }))
            .map_err(rpc("report_metrics"))?;
    }
    let eval = last_eval.ok_or_else(|| Error::Setup("fine-tuning ran no epoch".into()))?;
    let checkpoint = if ctx.rank == 0 {
        save_checkpoint(&trainer, &ctx.run_dir)?
    } else {
        String::new()
    };
    ring.barrier()?;
    info!(test_accuracy = eval.accuracy, "fine-tuning finished");
    Ok((
        StageResult {
            stage: Stage::Finetune as i32,
            train_loss: history.last().copied().unwrap_or(0.0),
            loss_history: history,
            steps: trainer.steps_taken(),
            samples,
            seconds: t0.elapsed().as_secs_f64(),
            test_accuracy: (ctx.rank == 0).then_some(eval.accuracy),
            checkpoint: checkpoint.clone(),
        },
        (eval.accuracy, eval.loss, checkpoint),
    ))
}
