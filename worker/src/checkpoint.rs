//! Checkpoint files: a model's variables written atomically as safetensors, always from host memory so
//! that a checkpoint does not depend on the device that wrote it (a CUDA-trained checkpoint loads on a
//! CPU-only machine, and the other way round).

use crate::trainer::Trainer;
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
pub(crate) fn save_vars(vs: &tch::nn::VarStore, path: &Path) -> Result<()> {
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
