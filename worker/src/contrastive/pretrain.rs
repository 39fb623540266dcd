//! One replica of a contrastive pretraining job: encoder + method head (SimCLR's projection or CPC's
//! GRU and predictors), the optimizer (LARS or any other), and the synchronous step over the global batch.

use crate::collective::Collective;
use crate::contrastive::cpc::{global_cpc, CpcHead};
use crate::contrastive::encoder::{ConvEncoder, Projection};
use crate::contrastive::global::GatherGrad;
use crate::contrastive::ntxent::global_nt_xent;
use crate::ddp::GradSync;
use crate::device::with_precision;
use crate::optim::Optim;
use crate::{Error, Result};
use butler_common::config::{Precision, ScheduleConfig};
use butler_common::pretrain::{PretrainConfig, PretrainMethod};
use tch::nn;
use tch::{Device, Kind, Tensor};

enum Head {
    SimClr { projection: Projection, tau: f64 },
    Cpc(CpcHead),
}

pub struct Pretrainer {
    pub vs: nn::VarStore,
    pub encoder: ConvEncoder,
    head: Head,
    opt: Optim,
    sync: GradSync,
    lr: f64,
    schedule: ScheduleConfig,
    step: u64,
    total_steps: u64,
    gather_grad: GatherGrad,
    device: Device,
    precision: Precision,
}

/// The encoder and the method's head under `root`.
fn build_networks(
    cfg: &PretrainConfig,
    root: &nn::Path,
    length: usize,
    channels: usize,
) -> Result<(ConvEncoder, Head)> {
    let encoder = ConvEncoder::new(&(root / "encoder"), length, channels);
    cfg.check_steps(encoder.steps() as usize)?;
    let head = match cfg.method {
        PretrainMethod::Simclr => Head::SimClr {
            projection: Projection::new(
                &(root / "projection"),
                encoder.feature_dim(),
                cfg.projection_hidden as i64,
                cfg.projection_dim as i64,
            ),
            tau: cfg.temperature,
        },
        PretrainMethod::Cpc => Head::Cpc(CpcHead::new(
            &(root / "cpc"),
            encoder.channels(),
            cfg.cpc_context as i64,
            cfg.cpc_horizons as i64,
        )),
        PretrainMethod::None => {
            return Err(Error::Setup(
                "pretrain.method = \"none\" has no pretraining stage".into(),
            ))
        }
    };
    Ok((encoder, head))
}

impl Pretrainer {
    /// Parameters are drawn from `seed` (only rank 0's draw matters after `broadcast_parameters`).
    pub fn new(
        cfg: &PretrainConfig,
        length: usize,
        channels: usize,
        seed: u64,
        total_steps: u64,
        bucket_bytes: usize,
    ) -> Result<Pretrainer> {
        Pretrainer::new_on(
            cfg,
            length,
            channels,
            seed,
            total_steps,
            bucket_bytes,
            Device::Cpu,
            Precision::Fp32,
        )
    }

    /// [`Pretrainer::new`] with the replica on `device`, its forward passes in `precision`.
    #[allow(clippy::too_many_arguments)]
    pub fn new_on(
        cfg: &PretrainConfig,
        length: usize,
        channels: usize,
        seed: u64,
        total_steps: u64,
        bucket_bytes: usize,
        device: Device,
        precision: Precision,
    ) -> Result<Pretrainer> {
        // Drawn on the host, so every device starts from the same weights. On a GPU the networks are
        // then built again on the device and the host draw copied in, rather than the host store being
        // moved: tch flattens a GRU's weights for cuDNN only when it is built on CUDA (else every CUDA
        // forward copies them and warns).
        tch::manual_seed(seed as i64);
        let host = nn::VarStore::new(Device::Cpu);
        let (encoder, head) = build_networks(cfg, &host.root(), length, channels)?;
        let (vs, encoder, head) = if device == Device::Cpu {
            (host, encoder, head)
        } else {
            let mut on_device = nn::VarStore::new(device);
            let (encoder, head) = build_networks(cfg, &on_device.root(), length, channels)?;
            on_device.copy(&host)?;
            (on_device, encoder, head)
        };
        let opt = Optim::build(&cfg.optim, vs.trainable_variables());
        let sync = GradSync::new(vs.trainable_variables(), bucket_bytes);
        Ok(Pretrainer {
            vs,
            encoder,
            head,
            opt,
            sync,
            lr: cfg.optim.lr,
            schedule: cfg.schedule.clone(),
            step: 0,
            total_steps,
            gather_grad: GatherGrad::Exact,
            device,
            precision,
        })
    }

    pub fn broadcast_parameters(&mut self, comm: &mut dyn Collective) -> Result<()> {
        Ok(self.sync.broadcast_parameters(comm)?)
    }

    /// Switches the gradient of the gathered candidates (tests and benchmarks of the failure mode only).
    pub fn set_gather_grad(&mut self, g: GatherGrad) {
        self.gather_grad = g;
    }

    pub fn learning_rate(&self) -> f64 {
        self.schedule.lr_at(self.lr, self.step, self.total_steps)
    }

    pub fn steps_taken(&self) -> u64 {
        self.step
    }

    /// Views this method needs per sample (SimCLR 2, CPC 1).
    pub fn num_views(&self) -> usize {
        match self.head {
            Head::SimClr { .. } => 2,
            Head::Cpc(_) => 1,
        }
    }

    /// One synchronous step on this rank's share of the global batch: `views[v]` is view `v` of this
    /// rank's samples (`[n_r, length]`, `n_r` may differ per rank and be 0). Returns the global mean loss.
    pub fn step(&mut self, views: &[Tensor], comm: &mut dyn Collective) -> Result<f64> {
        if views.len() != self.num_views() {
            return Err(Error::Setup(format!(
                "the pretraining step got {} views per sample, the method needs {}",
                views.len(),
                self.num_views()
            )));
        }
        self.opt.set_lr(self.learning_rate());
        self.sync.zero_grad();
        let (dev, precision) = (self.device, self.precision);
        let views: Vec<Tensor> = views
            .iter()
            .map(|v| crate::device::to_step_device(v, dev))
            .collect();
        // The encoder's forward runs in the configured precision; the global loss (similarities over
        // the gathered batch, its collectives and its inner backward) in fp32.
        let fp32 = |f: &dyn Fn() -> Tensor| with_precision(precision, dev, f).to_kind(Kind::Float);
        let (loss, value) = match &self.head {
            Head::SimClr { projection, tau } => {
                let z1 = fp32(&|| projection.embed(&self.encoder.features(&views[0])));
                let z2 = fp32(&|| projection.embed(&self.encoder.features(&views[1])));
                global_nt_xent(&z1, &z2, *tau, self.gather_grad, comm)?
            }
            Head::Cpc(head) => {
                let z = fp32(&|| CpcHead::latents(&self.encoder, &views[0]));
                global_cpc(head, &z, self.gather_grad, comm)?
            }
        };
        if let Some(l) = loss {
            l.backward();
        }
        self.sync.all_reduce_gradients(comm)?;
        self.opt.step();
        self.step += 1;
        Ok(value)
    }

    /// What a resumable checkpoint of pretraining holds: the variables, the optimizer state, the step.
    pub fn training_state(&self) -> crate::trainer::TrainingState {
        crate::trainer::TrainingState {
            variables: self
                .vs
                .variables()
                .into_iter()
                .map(|(n, t)| (n, t.detach().to_device(Device::Cpu)))
                .collect(),
            ema: None,
            optim: self.opt.state(),
            step: self.step,
            objective: Vec::new(),
        }
    }

    /// Restores [`Pretrainer::training_state`].
    pub fn load_training_state(
        &mut self,
        s: crate::trainer::TrainingState,
    ) -> std::result::Result<(), String> {
        self.step = s.apply(&self.vs, None, &mut self.opt)?;
        Ok(())
    }

    /// Flat copy of all parameters in name order (tests, checksums).
    pub fn flat_parameters(&self) -> Vec<f32> {
        crate::trainer::flat_parameters(&self.vs)
    }
}
