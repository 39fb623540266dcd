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
//! - **distill** (`[pretrain.distill]`, SimCLRv2's third step): the fine-tuned model, frozen, teaches a
//!   fresh student (the job's `[model]` or `distill.model`) through the KD objective
//!   (`objectives::kd`): α·CE + (1 − α)·T²·KL on the labeled batches (the fine-tuning stage's
//!   augmentation), λ·T²·KL on `unlabeled_ratio`× as many unlabeled samples, raw or strongly augmented
//!   (`augment`; `OneView`), the teacher seeing the same input or the clean sample (`teacher_view`).
//!   Its labeled epochs follow fine-tuning's in the coordinator's numbering; its evaluation is the
//!   job's result. Neither fine-tuning nor distillation commits mid-stage: a resumed job restarts them
//!   from the pretraining commit.

use crate::augment::TwoViews;
use crate::checkpoint::{save_checkpoint, PointOf};
use crate::collective::Collective;
use crate::contrastive::encoder::copy_encoder_into;
use crate::contrastive::pretrain::Pretrainer;
use crate::error::rpc;
use crate::job::{Job, LabeledAug};
use crate::loader::{self, ContrastiveViews, OneView, ViewMaker, WeakStrongViews};
use crate::{Error, Result};
use butler_common::config::{JobConfig, ModelConfig};
use butler_common::pretrain::{DistillStageConfig, PretrainConfig, PretrainMethod, TeacherView};
use butler_data::manifest::Manifest;
use butler_proto::{Stage, StageRequest, StageResult};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;
use tch::nn::{self, Module, OptimizerConfig};
use tch::{Kind, Reduction, Tensor};
use tracing::{info, warn};

/// The staged job; returns (test accuracy, test loss, final checkpoint) of the fine-tuned model, or of
/// the distilled student when the plan ends with distillation.
pub(crate) fn train(job: &mut Job, ring: &mut dyn Collective) -> Result<(f64, f64, String)> {
    let (ctx, cfg) = (job.ctx, job.cfg);
    let p = cfg
        .pretrain
        .as_ref()
        .expect("stages::train runs only for jobs with a [pretrain] section");
    info!(method = ?p.method, "staged job");

    let mut pretrained: Option<Pretrainer> = None;
    let mut probe_head: Option<(Tensor, Tensor)> = None;
    let mut finetuned: Option<crate::trainer::Trainer> = None;
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
                let (r, model) = pretrain(job, p, ring)?;
                pretrained = Some(model);
                r
            }
            Stage::Probe => {
                let model = pretrained.as_ref().ok_or_else(|| {
                    Error::Setup("the coordinator asked for a probe before pretraining".into())
                })?;
                let (r, head) = probe(job, p, model, ring)?;
                probe_head = Some(head);
                r
            }
            Stage::Finetune => {
                let (r, result, trainer) = finetune(
                    job,
                    p,
                    pretrained.as_ref(),
                    probe_head.as_ref().filter(|_| p.finetune_from_probe),
                    ring,
                )?;
                outcome = Some(result);
                finetuned = Some(trainer);
                r
            }
            Stage::Distill => {
                let (teacher, d) = finetuned.as_ref().zip(p.distill.as_ref()).ok_or_else(|| {
                    Error::Setup(
                        "the coordinator asked for distillation before fine-tuning, or the job has no [pretrain.distill]".into(),
                    )
                })?;
                let (r, result) = distill(job, d, teacher, ring)?;
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
    crate::checkpoint::save_vars(vs, &run_dir.join(rel))?;
    Ok(rel.to_string())
}

fn pretrain(
    job: &Job,
    p: &PretrainConfig,
    ring: &mut dyn Collective,
) -> Result<(StageResult, Pretrainer)> {
    let (ctx, cfg) = (job.ctx, job.cfg);
    let t0 = Instant::now();
    let len = sample_len(&job.manifest)?;
    let per_rank = (p.batch_size / ctx.world as usize) as u64;
    let views: Arc<dyn ViewMaker> = match p.method {
        PretrainMethod::Simclr => Arc::new(ContrastiveViews {
            seed: cfg.job.seed,
            aug: TwoViews::default_1d(len),
        }),
        _ => Arc::new(loader::Identity),
    };
    let mut stream = crate::job::open_unlabeled_stream(job, views, Some(per_rank), None)?
        .ok_or_else(|| Error::Setup("pretraining needs data.unlabeled_split".into()))?;
    let steps_per_epoch = stream.steps_per_epoch();
    let mut model = Pretrainer::new_on(
        p,
        len,
        channels(cfg)?,
        cfg.job.seed,
        steps_per_epoch * p.epochs,
        (cfg.cluster.bucket_mb * 1024.0 * 1024.0) as usize,
        job.device,
        cfg.train.precision,
    )?;
    model.broadcast_parameters(ring)?;
    let mut history = Vec::new();
    // A resumed job continues from its commit point inside pretraining (every rank reads the file).
    let resumed = match ctx
        .resume
        .as_ref()
        .filter(|r| r.stage == Stage::Pretrain as u32)
    {
        Some(point) => {
            let path = ctx.run_dir.join(&point.checkpoint);
            let (state, meta) = crate::checkpoint::read_state(&path)?;
            model
                .load_training_state(state)
                .map_err(|reason| Error::Checkpoint {
                    file: path.clone(),
                    reason,
                })?;
            if meta.point(&point.checkpoint) != *point {
                return Err(Error::Checkpoint {
                    file: path,
                    reason: format!(
                        "it holds step {} but the coordinator's commit names step {}",
                        meta.step, point.step
                    ),
                });
            }
            info!(step = meta.step, checkpoint = %point.checkpoint, "resumed from the commit point");
            history = meta.history.clone();
            Some(meta)
        }
        None => None,
    };
    info!(global_batch = p.batch_size, steps_per_epoch, "pretraining");
    let mut samples = 0u64;
    let start = model.steps_taken();
    let first_epoch = start / steps_per_epoch.max(1);
    let mut last_commit = resumed.as_ref().map(|m| m.step);
    let every = (cfg.checkpoint.every_steps, cfg.checkpoint.every_epochs);
    let pretrain_stage = Stage::Pretrain as u32;
    for epoch in first_epoch..p.epochs {
        ctx.progress.epoch.store(epoch, Ordering::Relaxed);
        let te = Instant::now();
        let first_k = if epoch == first_epoch {
            start % steps_per_epoch.max(1)
        } else {
            0
        };
        // The epoch's running loss (a global mean per step, the same on every rank) across a resume.
        let mut sum = resumed
            .as_ref()
            .filter(|_| epoch == first_epoch)
            .and_then(|m| m.epoch_losses.get(ctx.rank as usize))
            .map_or(0.0, |l| l[0]);
        for k in first_k..steps_per_epoch {
            ctx.check_stop()?;
            let stop = crate::job::agree_to_stop(ctx, ring)?;
            let step = model.steps_taken();
            let due = every.0 > 0 && step > 0 && step.is_multiple_of(every.0);
            if (stop || due) && last_commit != Some(step) {
                let at = crate::job::Boundary {
                    epoch,
                    steps_in_epoch: k,
                    unlabeled: Some(stream.cursor()),
                    loss_sum: sum,
                    seen: k,
                    stage: pretrain_stage,
                    history: history.clone(),
                    ..Default::default()
                };
                crate::job::commit(job, ring, &at, step, || model.training_state())?;
                last_commit = Some(step);
            }
            if stop {
                ring.barrier()?;
                return Err(crate::job::stopped_at(ctx, step));
            }
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
            ctx.progress.advanced();
            crate::job::fault_hooks(ctx, model.steps_taken());
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
        // After every `every_epochs` epochs, and always at the end of pretraining (a job lost in the
        // probe or fine-tuning resumes from there: both are short and run again).
        let step = model.steps_taken();
        let last = epoch + 1 == p.epochs;
        if (last || (every.1 > 0 && (epoch + 1).is_multiple_of(every.1)))
            && last_commit != Some(step)
        {
            let at = crate::job::Boundary {
                epoch: epoch + 1,
                unlabeled: Some(stream.cursor()),
                stage: pretrain_stage,
                history: history.clone(),
                ..Default::default()
            };
            crate::job::commit(job, ring, &at, step, || model.training_state())?;
            last_commit = Some(step);
        }
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
            val_accuracy: None,
            checkpoint,
        },
        model,
    ))
}

/// The record of a stage trained by [`crate::job::run_epochs`]; the accuracies are rank 0's (the
/// one that evaluates).
fn trained_stage(
    stage: Stage,
    run: crate::job::EpochsRun,
    steps: u64,
    t0: Instant,
    rank: u32,
    checkpoint: String,
) -> StageResult {
    StageResult {
        stage: stage as i32,
        train_loss: run.losses.last().copied().unwrap_or(0.0),
        loss_history: run.losses,
        steps,
        samples: run.samples,
        seconds: t0.elapsed().as_secs_f64(),
        test_accuracy: (rank == 0).then_some(run.eval.accuracy),
        val_accuracy: run.val.filter(|_| rank == 0).map(|v| v.accuracy),
        checkpoint,
    }
}

fn probe(
    job: &Job,
    p: &PretrainConfig,
    model: &Pretrainer,
    ring: &mut dyn Collective,
) -> Result<(StageResult, (Tensor, Tensor))> {
    let (ctx, cfg) = (job.ctx, job.cfg);
    let (train_set, test_set) = (&job.train_set, &job.test_set);
    let classes = job.manifest.num_classes();
    let t0 = Instant::now();
    // Raw features, not standardised: the probe's classifier is then exactly ConvBase's, ready for LP-FT
    // (folding a standardisation into it divides by the σ of near-dead features and blows up).
    let dev = job.device;
    let (train_f, test_f) = tch::no_grad(|| {
        (
            model.encoder.features(&train_set.x.to_device(dev)),
            model.encoder.features(&test_set.x.to_device(dev)),
        )
    });
    let (train_y, test_y) = (train_set.y.to_device(dev), test_set.y.to_device(dev));
    let classes = classes as i64;
    tch::manual_seed(cfg.job.seed as i64);
    let mut vs = nn::VarStore::new(tch::Device::Cpu);
    let head = nn::linear(
        vs.root() / "probe",
        train_f.size()[1],
        classes,
        Default::default(),
    );
    vs.set_device(dev);
    let mut opt = nn::Adam::default().build(&vs, p.probe_lr)?;
    let mut history = Vec::new();
    for _ in 0..p.probe_epochs {
        ctx.check_stop()?;
        crate::job::terminate_if_asked(ctx)?;
        ctx.progress.advanced();
        let loss = head.forward(&train_f).cross_entropy_loss::<Tensor>(
            &train_y,
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
            .eq_tensor(&test_y)
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
            val_accuracy: None,
            checkpoint,
        },
        folded,
    ))
}

/// One view of the pretraining augmentation per labeled sample, seeded by (job seed, epoch, position of
/// the sample in the labeled subset).
fn finetune(
    job: &mut Job,
    p: &PretrainConfig,
    pretrained: Option<&Pretrainer>,
    probe_head: Option<&(Tensor, Tensor)>,
    ring: &mut dyn Collective,
) -> Result<(StageResult, (f64, f64, String), crate::trainer::Trainer)> {
    let (ctx, cfg) = (job.ctx, job.cfg);
    let t0 = Instant::now();
    let len = sample_len(&job.manifest)?;
    let mut trainer = job.new_trainer()?;
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
    if p.finetune_augment {
        // One view of the pretraining augmentation per labeled sample (view 0 of `TwoViews`).
        job.labeled_aug = Some(LabeledAug {
            pipeline: TwoViews::default_1d(len).0,
            view: 0,
        });
    }
    let run = crate::job::run_epochs(
        job,
        &mut trainer,
        ring,
        None,
        None,
        0..cfg.train.epochs,
        None,
    )?;
    let eval = run.eval;
    // With a distillation stage to come, `final.safetensors` is the student's.
    let checkpoint = match (ctx.rank, &p.distill) {
        (0, None) => save_checkpoint(&trainer, &ctx.run_dir)?,
        (0, Some(_)) => {
            let rel = "checkpoints/finetune.safetensors";
            crate::checkpoint::save_model(&trainer, &ctx.run_dir.join(rel))?;
            rel.to_string()
        }
        _ => String::new(),
    };
    ring.barrier()?;
    info!(test_accuracy = eval.accuracy, "fine-tuning finished");
    let steps = trainer.steps_taken();
    Ok((
        trained_stage(
            Stage::Finetune,
            run,
            steps,
            t0,
            ctx.rank,
            checkpoint.clone(),
        ),
        (eval.accuracy, eval.loss, checkpoint),
        trainer,
    ))
}

/// The distillation stage: a fresh student learns from `teacher` (the fine-tuned model, frozen) on the
/// labeled batches and the unlabeled stream; see the module doc.
fn distill(
    job: &mut Job,
    d: &DistillStageConfig,
    teacher: &crate::trainer::Trainer,
    ring: &mut dyn Collective,
) -> Result<(StageResult, (f64, f64, String))> {
    let (ctx, cfg) = (job.ctx, job.cfg);
    let t0 = Instant::now();
    let shape = job.manifest.sample_shape.clone();
    let classes = job.manifest.num_classes();
    let epochs = d.epochs_for(job.steps_per_epoch);
    let mut student_cfg = cfg.clone();
    if let Some(m) = &d.model {
        student_cfg.model = m.clone();
    }
    student_cfg.train.epochs = epochs;
    // Another seed than the fine-tuned model's initialisation.
    let mut student = crate::trainer::Trainer::new_on(
        &student_cfg,
        &shape,
        classes,
        cfg.job.seed.wrapping_add(1),
        job.steps_per_epoch * epochs,
        job.device,
    )?;
    student.distill_from(
        teacher.frozen_teacher(&shape, classes)?,
        crate::losses::KdConfig {
            alpha: d.alpha,
            temperature: d.temperature,
        },
        d.unlabeled_weight,
        &shape,
        classes,
    )?;
    student.broadcast_parameters(ring)?;
    let views: Arc<dyn ViewMaker> = if d.augment {
        let strong = crate::augment::WeakStrong::for_sample_shape(&shape, cfg.augment.flip)
            .map_err(|e| Error::Setup(format!("pretrain.distill.augment: {e}")))?
            .strong;
        match d.teacher_view {
            TeacherView::Same => Arc::new(OneView {
                seed: cfg.job.seed,
                pipeline: strong,
                view: 1,
            }),
            // (clean, strong): UDA's pair, the teacher on the first view, the student on the second.
            TeacherView::Clean => Arc::new(WeakStrongViews {
                seed: cfg.job.seed,
                aug: crate::augment::WeakStrong {
                    weak: crate::augment::Pipeline::new(),
                    strong,
                },
            }),
        }
    } else {
        Arc::new(loader::Identity)
    };
    let mut stream = crate::job::open_unlabeled_stream(
        job,
        views,
        Some(job.per_rank_batch * d.unlabeled_ratio),
        None,
    )?
    .ok_or_else(|| Error::Setup("distillation needs data.unlabeled_split".into()))?;
    info!(
        epochs,
        steps = job.steps_per_epoch * epochs,
        unlabeled_per_rank = job.per_rank_batch * d.unlabeled_ratio,
        "distillation"
    );
    // The labeled epochs after fine-tuning's, in the coordinator's numbering.
    let first = cfg.train.epochs;
    let run = crate::job::run_epochs(
        job,
        &mut student,
        ring,
        Some(&mut stream),
        None,
        first..first + epochs,
        None,
    )?;
    let eval = run.eval;
    let checkpoint = if ctx.rank == 0 {
        save_checkpoint(&student, &ctx.run_dir)?
    } else {
        String::new()
    };
    ring.barrier()?;
    info!(test_accuracy = eval.accuracy, "distillation finished");
    let steps = student.steps_taken();
    Ok((
        trained_stage(Stage::Distill, run, steps, t0, ctx.rank, checkpoint.clone()),
        (eval.accuracy, eval.loss, checkpoint),
    ))
}
