//! butler's data plane: a worker process registers with the coordinator, joins the collective, and runs
//! synchronous data-parallel training on its shard of every global batch.
//!
//! Architecture Invariant: training runs on one plain thread (tch `Tensor` is `Send` but not `Sync`);
//! the async runtime only carries RPCs and the heartbeat.

pub mod client;
pub mod collective;
pub mod contrastive;
pub mod data;
pub mod ddp;
pub mod losses;
pub mod mixing;
pub mod models;
pub mod objectives;
pub mod optim;
pub mod rounds;
mod stages;
pub mod trainer;

pub use butler_data::{augment, loader, streams};

use butler_common::config::JobConfig;
use butler_common::fsutil;
use butler_common::sampler::{labeled_subset, DistributedSampler};
use butler_data::JobDataCheck;
use butler_proto::{
    AssignmentRequest, FinishRequest, MetricsReport, RegisterRequest, RendezvousRequest, Stream,
};
use client::{Client, Progress};
use collective::{RingConfig, RingListener};
use data::InMemorySplit;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{info, info_span, warn};
use trainer::Trainer;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Common(#[from] butler_common::Error),
    #[error("collective: {0}")]
    Collective(#[from] collective::CollectiveError),
    #[error("{op}: coordinator answered {code:?}: {message}")]
    Rpc {
        op: &'static str,
        code: tonic::Code,
        message: String,
    },
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
    #[error("{0}")]
    Setup(String),
    #[error("stopping: {0}")]
    Stopped(String),
}

pub type Result<T> = std::result::Result<T, Error>;

fn rpc(op: &'static str) -> impl FnOnce(tonic::Status) -> Error {
    move |s| Error::Rpc {
        op,
        code: s.code(),
        message: s.message().to_string(),
    }
}

#[derive(Clone, Debug)]
pub struct WorkerOptions {
    /// e.g. "http://127.0.0.1:50051".
    pub coordinator: String,
    pub token: String,
    pub worker_id: String,
    pub requested_rank: Option<u32>,
    /// Host the other ranks use to reach this worker's ring listener (a pod IP on a cluster).
    pub advertise_host: String,
    /// Intra-op threads; 0 keeps libtorch's default.
    pub threads: usize,
    /// How long to keep trying to reach the coordinator at start.
    pub connect_wait: Duration,
}

/// What a finished worker knows.
#[derive(Clone, Debug)]
pub struct WorkerReport {
    pub rank: u32,
    pub world_size: u32,
    pub test_accuracy: f64,
}

/// Runs one worker to the end of the job. Blocking; call from `main`, not from an async task.
pub fn run(opts: WorkerOptions) -> Result<WorkerReport> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(|e| Error::Setup(format!("cannot start the async runtime: {e}")))?;
    let mut client = rt
        .block_on(client::connect(
            &opts.coordinator,
            &opts.token,
            opts.connect_wait,
        ))
        .map_err(Error::Setup)?;
    let reg = rt
        .block_on(client.register(RegisterRequest {
            worker_id: opts.worker_id.clone(),
            requested_rank: opts.requested_rank.map_or(-1, |r| r as i32),
        }))
        .map_err(rpc("register"))?
        .into_inner();
    let cfg = JobConfig::from_toml(&reg.job_toml, Path::new("<job spec from the coordinator>"))?;
    let span = info_span!("worker", rank = reg.rank, generation = reg.generation);
    let _enter = span.enter();
    info!(world_size = reg.world_size, worker = %opts.worker_id, "registered");

    let threads = if opts.threads > 0 {
        opts.threads
    } else {
        cfg.train.threads
    };
    if threads > 0 {
        tch::set_num_threads(threads as i32);
    }

    let progress = Arc::new(Progress::default());
    let heartbeat = rt.spawn(client::heartbeat_loop(
        client.clone(),
        reg.rank,
        reg.generation,
        Duration::from_millis(reg.heartbeat_interval_ms.max(10)),
        Duration::from_millis(cfg.cluster.heartbeat_timeout_ms),
        progress.clone(),
    ));
    let ctx = Ctx {
        rt: &rt,
        client: client.clone(),
        rank: reg.rank,
        world: reg.world_size,
        generation: reg.generation,
        progress,
        run_dir: PathBuf::from(&reg.run_dir),
    };
    let result = train(&ctx, &cfg, &opts);
    heartbeat.abort();
    let finish = match &result {
        Ok((acc, loss, ckpt)) => FinishRequest {
            rank: reg.rank,
            generation: reg.generation,
            ok: true,
            error: String::new(),
            test_accuracy: Some(*acc),
            test_loss: Some(*loss),
            checkpoint: ckpt.clone(),
        },
        Err(e) => FinishRequest {
            rank: reg.rank,
            generation: reg.generation,
            ok: false,
            error: e.to_string(),
            ..Default::default()
        },
    };
    // Best effort when failing: the coordinator may itself be gone.
    let sent = rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(10), client.finish(finish)).await
    });
    match (&result, sent) {
        (Ok(_), Ok(Err(s))) => return Err(rpc("finish")(s)),
        (Ok(_), Err(_)) => {
            return Err(Error::Setup(
                "finish: the coordinator did not answer within 10s".into(),
            ))
        }
        _ => {}
    }
    let (acc, _, _) = result?;
    Ok(WorkerReport {
        rank: reg.rank,
        world_size: reg.world_size,
        test_accuracy: acc,
    })
}

pub(crate) struct Ctx<'a> {
    rt: &'a tokio::runtime::Runtime,
    client: Client,
    rank: u32,
    world: u32,
    generation: u64,
    progress: Arc<Progress>,
    run_dir: PathBuf,
}

impl Ctx<'_> {
    fn check_stop(&self) -> Result<()> {
        match self.progress.stop_reason() {
            Some(why) => Err(Error::Stopped(why)),
            None => Ok(()),
        }
    }
}

/// Joins the TCP ring: bind, publish the address through the coordinator, connect to the neighbours.
fn join_ring(ctx: &Ctx, cfg: &JobConfig, advertise_host: &str) -> Result<collective::TcpRing> {
    // An IP literal is published as a socket address (brackets for IPv6); a host name (a pod's DNS
    // name) as "name:port", resolved by each peer. The listener binds the loopback address itself when
    // advertised, else every interface of the advertised family.
    let host = if advertise_host == "localhost" {
        "127.0.0.1"
    } else {
        advertise_host
    };
    let (bind_ip, literal) = match host.parse::<IpAddr>() {
        Ok(ip) if ip.is_loopback() => (ip, Some(ip)),
        Ok(ip @ IpAddr::V6(_)) => (IpAddr::from([0u16; 8]), Some(ip)),
        Ok(ip) => (IpAddr::from([0, 0, 0, 0]), Some(ip)),
        Err(_) => (IpAddr::from([0, 0, 0, 0]), None),
    };
    let listener = RingListener::bind(SocketAddr::new(bind_ip, 0))?;
    let port = listener.local_addr().port();
    let endpoint = match literal {
        Some(ip) => SocketAddr::new(ip, port).to_string(),
        None => format!("{host}:{port}"),
    };
    let resp = ctx
        .rt
        .block_on(ctx.client.clone().rendezvous(RendezvousRequest {
            rank: ctx.rank,
            generation: ctx.generation,
            endpoint: endpoint.into_bytes(),
        }))
        .map_err(rpc("rendezvous"))?
        .into_inner();
    let peers = resp
        .endpoints
        .iter()
        .enumerate()
        .map(|(r, e)| {
            let s = String::from_utf8_lossy(e);
            // Prefer IPv4 among a name's addresses: listeners on host names bind IPv4.
            s.to_socket_addrs()
                .ok()
                .and_then(|a| a.min_by_key(|addr| addr.is_ipv6()))
                .ok_or_else(|| {
                    Error::Setup(format!(
                        "rendezvous: rank {r} published an unusable endpoint {s:?}"
                    ))
                })
        })
        .collect::<Result<Vec<_>>>()?;
    let ring_cfg = RingConfig {
        timeout: Duration::from_millis(cfg.cluster.collective_timeout_ms),
        generation: ctx.generation,
        ..Default::default()
    };
    Ok(listener.connect(ctx.rank as usize, &peers, ring_cfg)?)
}

/// What every phase of a job shares once the data is loaded and the ring is up.
pub(crate) struct Job<'a> {
    pub(crate) ctx: &'a Ctx<'a>,
    pub(crate) cfg: &'a JobConfig,
    pub(crate) manifest: butler_data::manifest::Manifest,
    pub(crate) manifest_file: PathBuf,
    pub(crate) train_set: InMemorySplit,
    pub(crate) test_set: InMemorySplit,
    pub(crate) per_rank_batch: u64,
    pub(crate) steps_per_epoch: u64,
    /// Per-sample augmentation of labeled batches.
    pub(crate) labeled_aug: Option<LabeledAug>,
}

/// A pipeline applied to every labeled sample, with the generator view it draws from.
pub(crate) struct LabeledAug {
    pub(crate) pipeline: augment::Pipeline,
    pub(crate) view: u64,
}

/// The generator view of `[augment] labeled` (the loader's views are 0 and 1).
const LABELED_VIEW: u64 = 2;

impl<'a> Job<'a> {
    /// Validates the config against the world, loads the labeled (sub)set and the test split, and joins
    /// the ring.
    pub(crate) fn load(
        ctx: &'a Ctx<'a>,
        cfg: &'a JobConfig,
        opts: &WorkerOptions,
    ) -> Result<(Job<'a>, collective::TcpRing)> {
        cfg.validate_world(ctx.world)?;
        let (manifest, manifest_file) = cfg.check_data()?;
        let mut train_set = InMemorySplit::load(&manifest_file, &manifest, &cfg.data.train_split)?;
        if let Some(k) = cfg.data.labels_per_class {
            let labels = Vec::<i64>::try_from(&train_set.y)?;
            train_set = train_set.subset(&labeled_subset(&labels, k, cfg.subset_seed()));
        }
        let test_set = InMemorySplit::load(&manifest_file, &manifest, &cfg.data.test_split)?;
        let ring = join_ring(ctx, cfg, &opts.advertise_host)?;
        info!(
            train = train_set.len,
            test = test_set.len,
            "data loaded; ring connected"
        );
        let per_rank_batch = (cfg.train.batch_size / ctx.world as usize) as u64;
        // Every rank runs the same number of steps: ceil(ceil(n / world) / per-rank batch).
        let steps_per_epoch = train_set
            .len
            .div_ceil(ctx.world as u64)
            .div_ceil(per_rank_batch);
        let labeled_aug = labeled_augmentation(cfg, &manifest.sample_shape)?;
        Ok((
            Job {
                ctx,
                cfg,
                manifest,
                manifest_file,
                train_set,
                test_set,
                per_rank_batch,
                steps_per_epoch,
                labeled_aug,
            },
            ring,
        ))
    }

    pub(crate) fn new_trainer(&self) -> Result<Trainer> {
        Trainer::new(
            self.cfg,
            &self.manifest.sample_shape,
            self.manifest.num_classes(),
            self.cfg.job.seed,
            self.steps_per_epoch * self.cfg.train.epochs,
        )
    }
}

/// The training job proper; returns (test accuracy, test loss, checkpoint path relative to the run dir).
fn train(ctx: &Ctx, cfg: &JobConfig, opts: &WorkerOptions) -> Result<(f64, f64, String)> {
    let (mut job, mut ring) = Job::load(ctx, cfg, opts)?;
    if cfg.pretrain.is_some() {
        return stages::train(&mut job, &mut ring);
    }
    let (eval, trainer) = if cfg.pseudo_label.is_some() {
        rounds::run(&job, &mut ring)?
    } else {
        let mut trainer = job.new_trainer()?;
        trainer.broadcast_parameters(&mut ring)?;
        let views = unlabeled_views(cfg, &job.manifest.sample_shape)?;
        let mut unlabeled = open_unlabeled_stream(&job, views, None)?;
        let run = run_epochs(
            &job,
            &mut trainer,
            &mut ring,
            unlabeled.as_mut(),
            None,
            0..cfg.train.epochs,
        )?;
        (run.eval, trainer)
    };
    let checkpoint = if ctx.rank == 0 {
        save_checkpoint(&trainer, &ctx.run_dir)?
    } else {
        String::new()
    };
    // Nobody reports success before rank 0's checkpoint is on disk.
    ring.barrier()?;
    info!(test_accuracy = eval.accuracy, "training finished");
    Ok((eval.accuracy, eval.loss, checkpoint))
}

/// What [`run_epochs`] did.
pub(crate) struct EpochsRun {
    /// The last evaluation.
    pub(crate) eval: trainer::Evaluation,
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
    ring: &mut collective::TcpRing,
    mut unlabeled: Option<&mut streams::UnlabeledStream>,
    pseudo: Option<&rounds::PseudoTable>,
    epochs: std::ops::Range<u64>,
) -> Result<EpochsRun> {
    let (ctx, cfg) = (job.ctx, job.cfg);
    let shape = &job.manifest.sample_shape;
    let mut last_eval = None;
    let mut skipped_total = 0usize;
    let (mut losses, mut samples) = (Vec::new(), 0u64);
    let last_epoch = epochs.end.saturating_sub(1);
    let first_epoch = epochs.start;
    for epoch in epochs {
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
        let (mut loss_sum, mut seen) = (0.0, 0u64);
        let lr = trainer.learning_rate();
        let per_rank_batch = job.per_rank_batch;
        for (k, batch) in sampler.batches(per_rank_batch).iter().enumerate() {
            ctx.check_stop()?;
            let (x, y) = match &job.labeled_aug {
                Some(a) => {
                    job.train_set
                        .batch_augmented(batch, &a.pipeline, cfg.job.seed, epoch, a.view)
                }
                None => job.train_set.batch(batch),
            };
            let global = sampler.global_batch_len(k as u64, per_rank_batch);
            let mut pseudo_batch = None;
            let u = match unlabeled.as_deref_mut() {
                Some(stream) => {
                    let (b, global_u) = stream.next_batch()?;
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
                        None => Some((view_tensors(&b, shape), global_u)),
                    }
                }
                None => None,
            };
            let u_batch = u.as_ref().map(|(views, g)| trainer::UnlabeledBatch {
                views,
                global_len: *g,
            });
            let loss = trainer.step_with(&x, &y, global, u_batch, pseudo_batch.as_ref(), ring)?;
            if !loss.is_finite() {
                return Err(Error::Setup(format!(
                    "training diverged: loss is {loss} at epoch {epoch} step {}",
                    trainer.steps_taken()
                )));
            }
            loss_sum += loss * batch.len() as f64;
            seen += batch.len() as u64;
            ctx.progress
                .step
                .store(trainer.steps_taken(), Ordering::Relaxed);
        }
        let seconds = t0.elapsed().as_secs_f64();
        samples += seen;
        losses.push(if seen > 0 {
            loss_sum / seen as f64
        } else {
            0.0
        });
        let last = epoch == last_epoch;
        let eval = if last || (epoch - first_epoch + 1).is_multiple_of(cfg.train.eval_every) {
            let e = trainer.evaluate(&job.test_set.x, &job.test_set.y, ring, 1000)?;
            last_eval = Some(e);
            Some(e)
        } else {
            None
        };
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
        };
        ctx.rt
            .block_on(ctx.client.clone().report_metrics(report))
            .map_err(rpc("report_metrics"))?;
    }
    if skipped_total > 0 {
        warn!(skipped_total, "corrupt unlabeled samples were skipped");
    }
    let eval = last_eval.ok_or_else(|| Error::Setup("the job ran no epoch".into()))?;
    Ok(EpochsRun {
        eval,
        losses,
        samples,
    })
}

/// The unlabeled stream, when the job has one: its assignment comes from the coordinator (split, seed,
/// world, rank — never sample lists), the order and the reading happen here.
/// `batch` overrides the per-rank batch of μ·b samples (pseudo-label rounds read more of a pool the
/// fewer of its samples are selected; contrastive pretraining has its own batch).
pub(crate) fn open_unlabeled_stream(
    job: &Job,
    views: Arc<dyn loader::ViewMaker>,
    batch: Option<u64>,
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
    let stream = streams::UnlabeledStream::new(
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
    Ok(Some(stream))
}

/// The views the unlabeled stream yields: (clean, strong) for UDA, (weak, strong) for FixMatch, the raw
/// sample otherwise.
fn unlabeled_views(cfg: &JobConfig, shape: &[usize]) -> Result<Arc<dyn loader::ViewMaker>> {
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
fn view_tensors(b: &loader::LoadedBatch, shape: &[usize]) -> Vec<tch::Tensor> {
    let mut dims = vec![b.len() as i64];
    dims.extend(shape.iter().map(|&d| d as i64));
    b.views
        .iter()
        .map(|v| tch::Tensor::from_slice(v).reshape(dims.as_slice()))
        .collect()
}

fn save_checkpoint(trainer: &Trainer, run_dir: &Path) -> Result<String> {
    let rel = "checkpoints/final.safetensors";
    save_model(trainer, &run_dir.join(rel))?;
    Ok(rel.to_string())
}

/// Writes the trainer's parameters to `path` atomically.
pub(crate) fn save_model(trainer: &Trainer, path: &Path) -> Result<()> {
    save_vars(&trainer.vs, path)
}

/// Writes a variable store to `path` atomically.
pub(crate) fn save_vars(vs: &tch::nn::VarStore, path: &Path) -> Result<()> {
    let path = path.to_path_buf();
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
    Ok(())
}
