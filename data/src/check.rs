//! The job config checked against the dataset it names: splits exist and are labeled, shards are
//! present, the model fits the sample shape, and the labeled subset is sized from the manifest's class
//! counts. It lives here, not in `butler_common::config`, because it needs the manifest, and `common`
//! must not depend on this crate (this crate depends on `common`).

use crate::manifest::Manifest;
use crate::{Error, Result};
use butler_common::config::JobConfig;
use std::path::{Path, PathBuf};

/// The checks of a [`JobConfig`] that read the dataset. A trait, so callers keep writing
/// `cfg.check_data()` with the trait in scope.
pub trait JobDataCheck {
    /// Number of training samples the sampler covers: the whole train split, or the labeled subset.
    fn train_len(&self, m: &Manifest, file: &Path) -> Result<u64>;

    /// Resolves `train.steps` into whole epochs of the labeled set (see `TrainConfig::resolve_steps`).
    fn resolve_steps(&mut self) -> Result<()>;

    /// Loads the manifest and checks that the splits exist, are labeled, and fit the model.
    fn check_data(&self) -> Result<(Manifest, PathBuf)>;
}

impl JobDataCheck for JobConfig {
    fn train_len(&self, m: &Manifest, file: &Path) -> Result<u64> {
        let split = m.split(&self.data.train_split, file)?;
        match self.data.labels_per_class {
            None => Ok(split.num_samples),
            Some(0) => Err(Error::invalid(
                "data.labels_per_class",
                "must be at least 1",
            )),
            Some(k) => {
                let counts = split.class_counts.as_ref().ok_or_else(|| Error::Manifest {
                    path: file.to_path_buf(),
                    message: format!(
                        "split {:?} has no class_counts, which data.labels_per_class needs (re-run `butler data prepare`)",
                        self.data.train_split
                    ),
                })?;
                Ok(butler_common::sampler::subset_len(counts, k))
            }
        }
    }

    fn resolve_steps(&mut self) -> Result<()> {
        let distill_steps = (self.pretrain.as_ref())
            .and_then(|p| p.distill.as_ref())
            .is_some_and(|d| d.steps.is_some());
        if self.train.steps.is_some() || distill_steps {
            let (m, file) = Manifest::load(&self.data.manifest)?;
            let len = self.train_len(&m, &file)?;
            self.train.resolve_steps(len);
            // `[pretrain.distill] steps` likewise, with the same labeled batches.
            let per_epoch = len.div_ceil(self.train.batch_size.max(1) as u64).max(1);
            if let Some(d) = self.pretrain.as_mut().and_then(|p| p.distill.as_mut()) {
                if d.steps.is_some() {
                    d.epochs = Some(d.epochs_for(per_epoch));
                    d.steps = None;
                }
            }
        }
        Ok(())
    }

    fn check_data(&self) -> Result<(Manifest, PathBuf)> {
        let (m, file) = Manifest::load(&self.data.manifest)?;
        let splits = [&self.data.train_split, &self.data.test_split]
            .into_iter()
            .chain(self.data.val_split.as_ref());
        for split in splits {
            if !m.split(split, &file)?.labeled {
                return Err(Error::Manifest {
                    path: file.clone(),
                    message: format!(
                        "split {split:?} is unlabeled; training and evaluation need labels"
                    ),
                });
            }
            m.check_shards_exist(split, &file)?;
        }
        self.model
            .check_input(&m.sample_shape)
            .map_err(|e| match e {
                butler_common::Error::Invalid { context, message } => Error::Invalid {
                    context,
                    message: format!("{message} (dataset {:?} in {})", m.name, file.display()),
                },
                other => other.into(),
            })?;
        self.train_len(&m, &file)?;
        if let Some(u) = &self.data.unlabeled_split {
            m.split(u, &file)?;
            m.check_shards_exist(u, &file)?;
            let pretrains = self.pretrain.as_ref().is_some_and(|p| {
                p.method != butler_common::pretrain::PretrainMethod::None || p.distill.is_some()
            });
            if self.regularize.distill.is_none()
                && self.ssl.is_none()
                && self.pseudo_label.is_none()
                && !pretrains
            {
                return Err(Error::invalid(
                    "data.unlabeled_split",
                    "is set but no configured method uses unlabeled data ([ssl], [pseudo_label], [pretrain] or regularize.distill)",
                ));
            }
        }
        if let Some(d) = &self.regularize.distill {
            if !d.teacher.is_file() {
                return Err(Error::invalid(
                    "regularize.distill.teacher",
                    format!("{} does not exist (train the teacher first; its checkpoint is <run>/checkpoints/final.safetensors)", d.teacher.display()),
                ));
            }
            if let Some(t) = &d.teacher_model {
                t.check_input(&m.sample_shape)?;
            }
        }
        Ok((m, file))
    }
}
