//! Knowledge distillation (Hinton et al. 2015): the student matches a frozen teacher's temperature-
//! softened predictions on the same (possibly mixed) inputs, plus α·CE on the labels.
//! The teacher is a butler checkpoint (safetensors, rebuilt from a model config) or a TorchScript file
//! exported from PyTorch; it runs without gradients on every worker beside the student.

use super::api::{non_empty, LossParts, Objective, StepCtx};
use super::batch_aug::BatchAug;
use crate::losses::{kd_loss, one_hot, KdConfig};
use crate::models::{self, Model};
use crate::{Error, Result};
use butler_common::config::{DistillConfig, JobConfig};
use std::path::Path;
use tch::{nn, CModule, Device, Tensor};

/// A frozen model that produces logits.
pub enum Teacher {
    Native {
        _vs: nn::VarStore,
        model: Box<dyn Model>,
    },
    TorchScript(CModule),
}

impl Teacher {
    /// Loads a teacher; `.pt`/`.ts`/`.torchscript` files are TorchScript, anything else a butler
    /// safetensors checkpoint built with `model_cfg`.
    pub fn load(
        path: &Path,
        model_cfg: &butler_common::config::ModelConfig,
        sample_shape: &[usize],
        classes: usize,
    ) -> Result<Teacher> {
        Teacher::load_on(path, model_cfg, sample_shape, classes, Device::Cpu)
    }

    /// [`Teacher::load`] onto `device` (the student's).
    pub fn load_on(
        path: &Path,
        model_cfg: &butler_common::config::ModelConfig,
        sample_shape: &[usize],
        classes: usize,
        device: Device,
    ) -> Result<Teacher> {
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
        let fail =
            |e: tch::TchError| Error::Setup(format!("cannot load teacher {}: {e}", path.display()));
        if !path.is_file() {
            return Err(Error::Setup(format!(
                "teacher {} does not exist",
                path.display()
            )));
        }
        let teacher = if matches!(ext, "pt" | "ts" | "torchscript") {
            let mut m = CModule::load_on_device(path, device).map_err(fail)?;
            m.set_eval();
            Teacher::TorchScript(m)
        } else {
            model_cfg.check_input(sample_shape)?;
            let mut vs = nn::VarStore::new(Device::Cpu);
            let model = models::build(&vs.root(), model_cfg, sample_shape, classes);
            vs.load(path).map_err(fail)?;
            vs.set_device(device);
            vs.freeze();
            Teacher::Native { _vs: vs, model }
        };
        // One forward on a dummy batch now, so a teacher that does not fit the data (wrong input shape,
        // wrong number of classes, a tuple output) fails at setup with its file named, not mid-training.
        let mut shape = vec![1i64];
        shape.extend(sample_shape.iter().map(|&d| d as i64));
        let probe = tch::Tensor::zeros(shape.as_slice(), (tch::Kind::Float, device));
        let cannot_run = |why: String| {
            Error::Setup(format!(
                "teacher {} cannot run on samples of shape {sample_shape:?}: {why}",
                path.display()
            ))
        };
        let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| teacher.logits(&probe)))
            .map_err(|_| cannot_run("libtorch raised an error".into()))?
            .map_err(|e| cannot_run(e.to_string()))?;
        if out.size() != [1, classes as i64] {
            return Err(Error::Setup(format!(
                "teacher {} outputs {:?} for one sample; the student needs [1, {classes}] logits",
                path.display(),
                out.size()
            )));
        }
        Ok(teacher)
    }

    pub fn logits(&self, x: &Tensor) -> Result<Tensor> {
        tch::no_grad(|| match self {
            Teacher::Native { model, .. } => Ok(model.forward_t(x, false)),
            Teacher::TorchScript(m) => m
                .forward_ts(&[x])
                .map_err(|e| Error::Setup(format!("teacher forward: {e}"))),
        })
    }
}

pub struct Distill {
    aug: BatchAug,
    teacher: Teacher,
    kd: KdConfig,
    label_smoothing: f64,
    classes: i64,
    unlabeled_weight: f64,
}

impl Distill {
    pub fn new(
        cfg: &JobConfig,
        d: &DistillConfig,
        aug: BatchAug,
        sample_shape: &[usize],
        classes: usize,
        device: Device,
    ) -> Result<Distill> {
        let teacher_cfg = d.teacher_model.as_ref().unwrap_or(&cfg.model);
        let teacher = Teacher::load_on(&d.teacher, teacher_cfg, sample_shape, classes, device)?;
        Ok(Distill::with_teacher(
            teacher,
            aug,
            KdConfig {
                alpha: d.alpha,
                temperature: d.temperature,
            },
            cfg.train.label_smoothing,
            classes,
            d.unlabeled_weight,
        ))
    }

    /// Distillation from a teacher already in memory (the staged job's fine-tuned model).
    pub fn with_teacher(
        teacher: Teacher,
        aug: BatchAug,
        kd: KdConfig,
        label_smoothing: f64,
        classes: usize,
        unlabeled_weight: f64,
    ) -> Distill {
        Distill {
            aug,
            teacher,
            kd,
            label_smoothing,
            classes: classes as i64,
            unlabeled_weight,
        }
    }
}

impl Objective for Distill {
    fn name(&self) -> &'static str {
        "kd"
    }

    fn loss(&mut self, ctx: StepCtx) -> Result<LossParts> {
        let labeled = non_empty(ctx.x).then(|| {
            let prepared = self.aug.apply(ctx.x, ctx.y, ctx.rng);
            let student = prepared.forward(ctx.model);
            let teacher = self
                .teacher
                .logits(&prepared.x)
                .expect("the teacher was probed on this sample shape at load");
            let targets = prepared
                .soft_targets
                .unwrap_or_else(|| one_hot(ctx.y, self.classes));
            kd_loss(
                &student,
                &teacher,
                Some(&targets),
                &self.kd,
                self.label_smoothing,
            )
        });
        // On unlabeled data there is no CE term: λ·T²·KL(teacher ‖ student) alone. With one view both
        // models see it; with two (the staged job's `teacher_view = "clean"`) the teacher sees the
        // first (clean) and the student the last (augmented).
        let views = ctx.unlabeled.first().zip(ctx.unlabeled.last());
        let unlabeled = views.filter(|(u, _)| non_empty(u)).map(|(t, s)| {
            let student = ctx.model.forward_t(s, true);
            let teacher = self
                .teacher
                .logits(t)
                .expect("the teacher was probed on this sample shape at load");
            kd_loss(&student, &teacher, None, &self.kd, 0.0) * self.unlabeled_weight
        });
        Ok(LossParts {
            labeled,
            unlabeled,
            ..Default::default()
        })
    }
}
