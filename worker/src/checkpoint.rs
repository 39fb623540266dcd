//! Checkpoint files: a model's variables written atomically as safetensors, always from host memory so
//! that a checkpoint does not depend on the device that wrote it (a CUDA-trained checkpoint loads on a
//! CPU-only machine, and the other way round).

use crate::trainer::{Trainer, TrainingState};
use crate::Result;
use butler_common::fsutil;
use std::path::Path;
use tracing::warn;

/// Writes the final model to `checkpoints/final.safetensors`; returns that path relative to the run dir.
pub(crate) fn save_checkpoint(trainer: &Trainer, run_dir: &Path) -> Result<String> {
    let rel = "checkpoints/final.safetensors";
    save_model(trainer, &run_dir.join(rel))?;
    Ok(rel.to_string())
}

/// Writes the trainer's evaluated weights (the EMA when `[train] ema` is set) to `path` atomically.
pub(crate) fn save_model(trainer: &Trainer, path: &Path) -> Result<()> {
    trainer.with_eval_weights(|| save_vars(&trainer.vs, path))
}

/// Writes a variable store to `path` atomically.
pub fn save_vars(vs: &tch::nn::VarStore, path: &Path) -> Result<()> {
    let path = path.to_path_buf();
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| butler_common::Error::io(dir, e))?;
    }
    // Host copies, so the file is the same whatever device trained the model.
    let mut named: Vec<(String, tch::Tensor)> = vs
        .variables()
        .into_iter()
        .map(|(name, t)| (name, t.detach().to_device(tch::Device::Cpu)))
        .collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    fsutil::write_atomic_with(&path, |tmp| {
        tch::Tensor::write_safetensors(&named, tmp).map_err(|e| {
            butler_common::Error::invalid(format!("checkpoint {}", tmp.display()), e.to_string())
        })
    })?;
    if let Err(e) = fsutil::sync_parent(&path) {
        warn!(error = %e, "cannot fsync checkpoint directory");
    }
    Ok(())
}

pub use butler_common::resume::{ResumeMeta, RESUME_FORMAT};

/// Where a resumable checkpoint's metadata says the job stood, as the coordinator's commit point.
pub trait PointOf {
    fn point(&self, checkpoint: &str) -> butler_proto::ResumePoint;
}

impl PointOf for ResumeMeta {
    fn point(&self, checkpoint: &str) -> butler_proto::ResumePoint {
        let [ue, us] = self.unlabeled.unwrap_or_default();
        butler_proto::ResumePoint {
            checkpoint: checkpoint.to_string(),
            step: self.step,
            epoch: self.epoch,
            steps_in_epoch: self.steps_in_epoch,
            labeled_start: self.labeled_start,
            has_unlabeled: self.unlabeled.is_some(),
            unlabeled_epoch: ue,
            unlabeled_step: us,
            world_size: self.world_size,
            generation: self.generation,
            stage: self.stage,
            round: self.round,
        }
    }
}

/// The resumable checkpoint of step `step` (of round `round`'s TRAIN phase for pseudo-label rounds,
/// whose step counts restart each round), relative to the run directory.
pub fn resumable_name(round: u32, step: u64) -> String {
    if round == 0 {
        format!("checkpoints/step-{step:09}.safetensors")
    } else {
        format!("checkpoints/round-{round}-step-{step:09}.safetensors")
    }
}

/// Writes the trainer's full state and `meta` to `path` atomically: `model.<variable>`,
/// `ema.<index>`, `optim.<index>.<slot>`, `objective.<name>` (the method's running statistics) and
/// `meta`.
pub fn save_resumable(trainer: &Trainer, meta: &ResumeMeta, path: &Path) -> Result<()> {
    save_state(trainer.training_state(), meta, path)
}

/// Writes a replica's state (a [`Trainer`]'s or a pretrainer's) and `meta` to `path` atomically.
pub fn save_state(s: TrainingState, meta: &ResumeMeta, path: &Path) -> Result<()> {
    let mut named: Vec<(String, tch::Tensor)> = s
        .variables
        .into_iter()
        .map(|(n, t)| (format!("model.{n}"), t))
        .collect();
    if let Some(ema) = s.ema {
        named.extend(
            ema.into_iter()
                .enumerate()
                .map(|(i, t)| (format!("ema.{i}"), t)),
        );
    }
    named.extend(
        s.optim
            .named()
            .into_iter()
            .map(|(n, t)| (format!("optim.{n}"), t)),
    );
    named.extend(
        s.objective
            .into_iter()
            .map(|(n, t)| (format!("objective.{n}"), t)),
    );
    let json = serde_json::to_vec(&ResumeMeta {
        format: RESUME_FORMAT,
        ..meta.clone()
    })
    .expect("ResumeMeta serialises");
    named.push(("meta".into(), tch::Tensor::from_slice(&json)));
    named.sort_by(|a, b| a.0.cmp(&b.0));
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| butler_common::Error::io(dir, e))?;
    }
    fsutil::write_atomic_with(path, |tmp| {
        tch::Tensor::write_safetensors(&named, tmp).map_err(|e| {
            butler_common::Error::invalid(format!("checkpoint {}", tmp.display()), e.to_string())
        })
    })?;
    Ok(())
}

/// Loads a resumable checkpoint into `trainer` (on its device) and returns its metadata. Every
/// problem — unreadable, truncated, another model, another optimizer — is an error naming the file.
pub fn load_resumable(trainer: &mut Trainer, path: &Path) -> Result<ResumeMeta> {
    let (state, meta) = read_state(path)?;
    trainer
        .load_training_state(state)
        .map_err(|reason| crate::Error::Checkpoint {
            file: path.to_path_buf(),
            reason,
        })?;
    Ok(meta)
}

/// Reads a resumable checkpoint: the replica's state and the metadata, not yet applied.
pub fn read_state(path: &Path) -> Result<(TrainingState, ResumeMeta)> {
    let bad = |reason: String| crate::Error::Checkpoint {
        file: path.to_path_buf(),
        reason,
    };
    let named = tch::Tensor::read_safetensors(path).map_err(|e| bad(e.to_string()))?;
    if !named.iter().any(|(n, _)| n == "meta") {
        return Err(bad(
            "no `meta` tensor: not a resumable checkpoint (a final model checkpoint?)".into(),
        ));
    }
    let (mut variables, mut ema, mut optim, mut meta) = (Vec::new(), Vec::new(), Vec::new(), None);
    let mut objective = Vec::new();
    for (name, t) in named {
        if let Some(n) = name.strip_prefix("model.") {
            variables.push((n.to_string(), t));
        } else if let Some(i) = name.strip_prefix("ema.") {
            let i: usize = i
                .parse()
                .map_err(|_| bad(format!("malformed tensor name {name:?}")))?;
            ema.push((i, t));
        } else if let Some(n) = name.strip_prefix("optim.") {
            optim.push((n.to_string(), t));
        } else if let Some(n) = name.strip_prefix("objective.") {
            objective.push((n.to_string(), t));
        } else if name == "meta" {
            let bytes = Vec::<u8>::try_from(&t).map_err(|e| bad(e.to_string()))?;
            meta = Some(
                butler_common::resume::parse_meta(&bytes)
                    .map_err(|e| bad(format!("metadata: {e}")))?,
            );
        } else {
            return Err(bad(format!("unexpected tensor {name:?}")));
        }
    }
    let meta = meta.expect("checked above");
    ema.sort_by_key(|(i, _)| *i);
    if ema.iter().enumerate().any(|(k, (i, _))| k != *i) {
        return Err(bad("EMA tensors are not numbered 0..n".into()));
    }
    let state = TrainingState {
        variables,
        ema: (!ema.is_empty()).then(|| ema.into_iter().map(|(_, t)| t).collect()),
        optim: crate::optim::OptimState::from_named(optim).map_err(|e| bad(e.to_string()))?,
        step: meta.step,
        objective,
    };
    Ok((state, meta))
}
