//! The worker's side of pseudo-label refresh rounds. The coordinator says which phase the job is in
//! (`Phase` RPC); the worker runs it and reports it done:
//!
//! - **TRAIN(r)**: a student (re-initialised, or continuing from `rounds/round-(r−1)`) trains the
//!   configured epochs on the labeled data plus, for r ≥ 1, the samples of pseudo-label set r met in the
//!   unlabeled stream (hard labels or stored probabilities; strong augmentation in noisy-student mode).
//!   Rank 0 saves `rounds/round-r.safetensors` and reports its test accuracy.
//! - **INFER(r)**: each rank labels its shards of the unlabeled split (shard i goes to rank i mod W) with
//!   the round's model, batched and without gradient, writing one sidecar per shard
//!   (`rounds/set-(r+1)/labels/shard-i.plab`: id, class, confidence, optionally the probabilities)
//!   atomically; a sidecar left by an interrupted INFER is reused. It reports the per-class confidence
//!   histogram of its shards — never samples — from which the coordinator selects set r + 1.
//!
//! The run directory must be shared by all workers (as for checkpoints): every rank reads every sidecar.

use crate::collective::Collective;
use crate::error::rpc;
use crate::job::Job;
use crate::objectives::{PseudoBatch, PseudoTargets};
use crate::trainer::{Evaluation, Trainer};
use crate::{loader, Error, Result};
use butler_common::pseudo::{Histogram, Selection, Sidecar};
use butler_data::shard::{read_shard_checked, CorruptPolicy};
use butler_proto::{PhaseDone, PhaseKind, PhaseRequest, PhaseResponse};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tch::Tensor;
use tracing::info;

/// Where the coordinator keeps round artefacts (mirrors `butler_coordinator::rounds`).
fn labels_dir(run_dir: &Path, round: u32) -> PathBuf {
    run_dir
        .join("rounds")
        .join(format!("set-{}", round + 1))
        .join("labels")
}

fn round_checkpoint(run_dir: &Path, round: u32) -> PathBuf {
    run_dir
        .join("rounds")
        .join(format!("round-{round}.safetensors"))
}

/// Runs phases until the coordinator says DONE; returns the last TRAIN's evaluation and model.
pub(crate) fn run(job: &Job, ring: &mut dyn Collective) -> Result<(Evaluation, Trainer)> {
    let ctx = job.ctx;
    let p = job
        .cfg
        .pseudo_label
        .as_ref()
        .expect("rounds::run is only called for pseudo-label jobs");
    let mut done: Option<PhaseDone> = None;
    let mut finished: Option<(u32, i32)> = None;
    let mut last: Option<(Evaluation, Trainer, u32)> = None;
    // The commit point this session resumes from: it belongs to one round's TRAIN phase.
    let mut resume = ctx.resume.clone();
    loop {
        let phase = next_phase(job, done.take(), finished)?;
        let kind = PhaseKind::try_from(phase.kind).unwrap_or(PhaseKind::Unspecified);
        let round = phase.round;
        info!(round, phase = ?kind, "phase");
        match kind {
            PhaseKind::Train => {
                let mut trainer = job.new_trainer()?;
                if round > 0 && !p.reinit {
                    load_model(&mut trainer, &round_checkpoint(&ctx.run_dir, round - 1))?;
                }
                trainer.broadcast_parameters(ring)?;
                let resumed = match resume.take().filter(|p| p.round == round) {
                    Some(point) => Some(crate::process::resume_from(ctx, &mut trainer, &point)?),
                    None => None,
                };
                let table: Option<Arc<PseudoTable>> = if round > 0 {
                    let set: Selection =
                        serde_json::from_str(&phase.selection_json).map_err(|e| {
                            Error::Setup(format!(
                                "round {round}: the coordinator sent no usable pseudo-label set: {e}"
                            ))
                        })?;
                    Some(Arc::new(PseudoTable::load(
                        &labels_dir(&ctx.run_dir, round - 1),
                        &set,
                        p.soft,
                    )?))
                } else {
                    None
                };
                let mut stream = match &table {
                    Some(t) => {
                        let ratio = read_ratio(job, t.len() as u64)?;
                        info!(
                            round,
                            selected = t.len(),
                            read_ratio = ratio,
                            "pseudo-labeled stream"
                        );
                        crate::job::open_unlabeled_stream(
                            job,
                            pseudo_views(job, t.clone())?,
                            Some(job.per_rank_batch * ratio),
                            None,
                        )?
                    }
                    None => None,
                };
                let epochs = job.cfg.train.epochs;
                let from = round as u64 * epochs;
                let eval = crate::job::run_epochs(
                    job,
                    &mut trainer,
                    ring,
                    stream.as_mut(),
                    table.as_deref(),
                    from..from + epochs,
                    Some(crate::job::Durable {
                        cfg: &job.cfg.checkpoint,
                        resumed: resumed.as_ref(),
                        round,
                    }),
                )?
                .eval;
                if ctx.rank == 0 {
                    crate::checkpoint::save_model(
                        &trainer,
                        &round_checkpoint(&ctx.run_dir, round),
                    )?;
                }
                ring.barrier()?;
                info!(round, test_accuracy = eval.accuracy, "round trained");
                done = Some(PhaseDone {
                    round,
                    kind: PhaseKind::Train as i32,
                    test_accuracy: (ctx.rank == 0).then_some(eval.accuracy),
                    ..Default::default()
                });
                last = Some((eval, trainer, round));
            }
            PhaseKind::Infer => {
                // After a restart at INFER the round's model comes from its checkpoint.
                if last.as_ref().map(|l| l.2) != Some(round) {
                    let (e, t) = restore(job, ring, round)?;
                    last = Some((e, t, round));
                }
                let trainer = &last.as_ref().expect("set above").1;
                let h = infer(job, trainer, round, p.soft, p.threshold)?;
                done = Some(PhaseDone {
                    round,
                    kind: PhaseKind::Infer as i32,
                    classes: h.classes as u32,
                    histogram: h.counts,
                    below: h.below,
                    ..Default::default()
                });
            }
            PhaseKind::Done => {
                return match last {
                    Some((e, t, _)) => Ok((e, t)),
                    // Restarted after the last round finished: its checkpoint is the result.
                    None => restore(job, ring, round),
                };
            }
            PhaseKind::Unspecified => {
                return Err(Error::Setup(format!(
                    "the coordinator answered an unknown phase {}",
                    phase.kind
                )))
            }
        }
        finished = done.as_ref().map(|d| (d.round, d.kind));
    }
}

/// Reports `done` (if any) and waits until the coordinator's phase differs from the one just finished.
fn next_phase(
    job: &Job,
    mut done: Option<PhaseDone>,
    finished: Option<(u32, i32)>,
) -> Result<PhaseResponse> {
    let ctx = job.ctx;
    loop {
        ctx.check_stop()?;
        let resp = ctx
            .rt
            .block_on(ctx.client.clone().phase(PhaseRequest {
                rank: ctx.rank,
                generation: ctx.generation,
                done: done.take(),
            }))
            .map_err(rpc("phase"))?
            .into_inner();
        if Some((resp.round, resp.kind)) != finished {
            return Ok(resp);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The model of round `round` from its checkpoint, evaluated.
fn restore(job: &Job, ring: &mut dyn Collective, round: u32) -> Result<(Evaluation, Trainer)> {
    let mut t = job.new_trainer()?;
    load_model(&mut t, &round_checkpoint(&job.ctx.run_dir, round))?;
    let e = t.evaluate(&job.test_set.x, &job.test_set.y, ring, 1000)?;
    Ok((e, t))
}

/// Loads a round's checkpoint as the trainer's parameters (and restarts its EMA there).
fn load_model(trainer: &mut Trainer, path: &Path) -> Result<()> {
    trainer.vs.load(path).map_err(|e| {
        Error::Setup(format!(
            "cannot load round checkpoint {}: {e}",
            path.display()
        ))
    })?;
    trainer.reset_ema();
    Ok(())
}

/// How many pool samples a rank reads per labeled sample so that, on average, μ = `data.unlabeled_ratio`
/// of them are selected: μ·pool/selected, at least μ and at most 16·μ. The pseudo-labeled term is a
/// mean over the selected samples, so this only sets how many of them a step sees.
fn read_ratio(job: &Job, selected: u64) -> Result<u64> {
    let mu = job.cfg.unlabeled_ratio();
    let split = job.cfg.data.unlabeled_split.as_deref().unwrap_or_default();
    let pool = job.manifest.split(split, &job.manifest_file)?.num_samples;
    Ok((mu * pool).div_ceil(selected.max(1)).clamp(mu, 16 * mu))
}

/// The view of the unlabeled stream the pseudo-labeled term trains on: the raw sample, or in
/// noisy-student mode its strong augmentation. Samples outside the set are passed through raw (they are
/// dropped after loading), so the loader threads spend no augmentation on them.
fn pseudo_views(job: &Job, table: Arc<PseudoTable>) -> Result<Arc<dyn loader::ViewMaker>> {
    let p = job.cfg.pseudo_label.as_ref().expect("a pseudo-label job");
    let strong = if p.noisy {
        let aug = crate::augment::WeakStrong::for_sample_shape(
            &job.manifest.sample_shape,
            job.cfg.augment.flip,
        )
        .map_err(|e| Error::Setup(format!("pseudo_label.noisy: {e}")))?;
        Some(aug.strong)
    } else {
        None
    };
    Ok(Arc::new(SelectedView {
        seed: job.cfg.job.seed,
        strong,
        table,
    }))
}

struct SelectedView {
    seed: u64,
    strong: Option<crate::augment::Pipeline>,
    table: Arc<PseudoTable>,
}

impl loader::ViewMaker for SelectedView {
    fn num_views(&self) -> usize {
        1
    }

    fn views(&self, x: &[f32], shape: &[usize], epoch: u64, id: u64) -> Vec<Vec<f32>> {
        match &self.strong {
            Some(p) if self.table.contains(id) => vec![p.apply_seeded(
                x,
                shape,
                crate::augment::SampleKey::new(self.seed, epoch, id),
                1,
            )],
            _ => vec![x.to_vec()],
        }
    }
}

/// INFER on this rank's shards; returns their histogram.
fn infer(
    job: &Job,
    trainer: &Trainer,
    round: u32,
    soft: bool,
    threshold: f64,
) -> Result<Histogram> {
    let ctx = job.ctx;
    let split_name = job
        .cfg
        .data
        .unlabeled_split
        .as_deref()
        .expect("pseudo-label jobs have an unlabeled split");
    let split = job.manifest.split(split_name, &job.manifest_file)?;
    let dir = labels_dir(&ctx.run_dir, round);
    std::fs::create_dir_all(&dir).map_err(|e| butler_common::Error::io(&dir, e))?;
    let data_dir = job.manifest_file.parent().unwrap_or(Path::new("."));
    let classes = job.manifest.num_classes();
    let policy: CorruptPolicy = job.cfg.loader.corrupt.into();
    let mut hist = Histogram::new(classes);
    let (mut labeled, mut reused) = (0usize, 0usize);
    for (i, entry) in split.shards.iter().enumerate() {
        if i % ctx.world as usize != ctx.rank as usize {
            continue;
        }
        ctx.check_stop()?;
        let path = dir.join(format!("shard-{i:05}.plab"));
        let existing = Sidecar::read(&path)
            .ok()
            .filter(|s| s.classes == classes && s.probs.is_some() == soft);
        let sidecar = match existing {
            Some(s) => {
                reused += 1;
                s
            }
            None => {
                let (data, skipped) =
                    read_shard_checked(data_dir, &job.manifest, entry, split.labeled, policy)?;
                for s in &skipped {
                    tracing::warn!(%s, "skipped a corrupt sample while pseudo-labeling");
                }
                let mut dims = vec![data.len() as i64];
                dims.extend(job.manifest.sample_shape.iter().map(|&d| d as i64));
                let x = Tensor::from_slice(&data.x).reshape(dims.as_slice());
                let log_p = trainer.log_probabilities(&x, 1000);
                let (log_conf, class) = log_p.max_dim(-1, false);
                // −ln(1 − p) = −logsumexp of the other classes' log-probabilities.
                let margin = -log_p
                    .scatter_value(1, &class.unsqueeze(1), f64::NEG_INFINITY)
                    .logsumexp([1], false);
                let f32s = |t: &Tensor| Vec::<f32>::try_from(t.to_kind(tch::Kind::Float));
                let s = Sidecar {
                    ids: data.ids,
                    class: Vec::<i64>::try_from(&class)?
                        .into_iter()
                        .map(|c| c as u32)
                        .collect(),
                    confidence: f32s(&log_conf.exp())?,
                    margin: f32s(&margin)?,
                    probs: if soft {
                        Some(f32s(&log_p.exp().reshape([-1]))?)
                    } else {
                        None
                    },
                    classes,
                };
                s.write(&path)?;
                labeled += 1;
                if fault_after_sidecar(round, ctx.rank) {
                    tracing::error!(
                        round,
                        shard = i,
                        "BUTLER_FAULT: exiting after writing a sidecar (test hook)"
                    );
                    std::process::exit(86);
                }
                s
            }
        };
        hist.merge(&sidecar.histogram(threshold))?;
        // Progress for the heartbeat: shards done in this phase.
        ctx.progress.step.store(
            (labeled + reused) as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
        ctx.progress.advanced();
    }
    info!(
        round,
        labeled,
        reused,
        samples = hist.total(),
        "shards pseudo-labeled"
    );
    Ok(hist)
}

/// Test hook (`BUTLER_FAULT=worker-exit-after-sidecar:R`): the last rank dies in INFER(R) after writing
/// its first sidecar.
fn fault_after_sidecar(round: u32, rank: u32) -> bool {
    std::env::var("BUTLER_FAULT").ok().is_some_and(|f| {
        f.strip_prefix("worker-exit-after-sidecar:")
            .and_then(|r| r.parse::<u32>().ok())
            == Some(round)
            && rank == 1
    })
}

/// The selected samples of one pseudo-label set, by id: the predicted class, or the probabilities.
pub struct PseudoTable {
    entries: HashMap<u64, Target>,
    classes: i64,
}

enum Target {
    Hard(i64),
    Soft(Vec<f32>),
}

impl PseudoTable {
    /// Reads every sidecar of the set and keeps the samples `set` selects. Fails when the sidecars do
    /// not hold the predictions the set was chosen from (missing or foreign files).
    pub fn load(dir: &Path, set: &Selection, soft: bool) -> Result<Self> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| butler_common::Error::io(dir, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "plab"))
            .collect();
        files.sort();
        let mut entries = HashMap::new();
        let mut per_class = vec![0u64; set.selected.len()];
        let mut total = 0u64;
        for f in &files {
            let s = Sidecar::read(f)?;
            total += s.len() as u64;
            for i in 0..s.len() {
                let (c, p) = (s.class[i], s.confidence[i]);
                if !set.selects(c, p, s.margin[i]) {
                    continue;
                }
                per_class[c as usize] += 1;
                let target = match (&s.probs, soft) {
                    (Some(probs), true) => {
                        Target::Soft(probs[i * s.classes..(i + 1) * s.classes].to_vec())
                    }
                    (None, true) => {
                        return Err(Error::Setup(format!(
                            "{}: soft pseudo-labels need probabilities, the sidecar has none",
                            f.display()
                        )))
                    }
                    _ => Target::Hard(c as i64),
                };
                entries.insert(s.ids[i], target);
            }
        }
        let predicted: u64 = set.predicted.iter().sum();
        if total != predicted || per_class != set.selected {
            return Err(Error::Setup(format!(
                "pseudo-label set {}: the sidecars in {} hold {total} predictions ({per_class:?} selected), the coordinator counted {predicted} ({:?})",
                set.round,
                dir.display(),
                set.selected
            )));
        }
        info!(
            set = set.round,
            selected = entries.len(),
            "pseudo-label set loaded"
        );
        Ok(PseudoTable {
            entries,
            classes: set.selected.len() as i64,
        })
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn contains(&self, id: u64) -> bool {
        self.entries.contains_key(&id)
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The selected samples of an unlabeled batch (view 0) with their targets.
    pub fn batch(&self, b: &loader::LoadedBatch, shape: &[usize]) -> PseudoBatch {
        let numel: usize = shape.iter().product();
        let mut x = Vec::new();
        let mut hard = Vec::new();
        let mut soft = Vec::new();
        let mut is_soft = false;
        for (i, id) in b.ids.iter().enumerate() {
            match self.entries.get(id) {
                Some(Target::Hard(c)) => hard.push(*c),
                Some(Target::Soft(p)) => {
                    is_soft = true;
                    soft.extend_from_slice(p)
                }
                None => continue,
            }
            x.extend_from_slice(&b.views[0][i * numel..(i + 1) * numel]);
        }
        let n = x.len() / numel.max(1);
        let mut dims = vec![n as i64];
        dims.extend(shape.iter().map(|&d| d as i64));
        PseudoBatch {
            x: Tensor::from_slice(&x).reshape(dims.as_slice()),
            targets: if is_soft {
                PseudoTargets::Soft(Tensor::from_slice(&soft).reshape([n as i64, self.classes]))
            } else {
                PseudoTargets::Hard(Tensor::from_slice(&hard))
            },
        }
    }
}
