//! The worker process: register with the coordinator, start the heartbeat, place the model on its
//! device, join the collective, run the job's driver (plain, pseudo-label rounds or stages) and report
//! the end. Everything a driver trains with lives in the toolbox modules (`job`, `trainer`, ...).
//!
//! Architecture Invariant: training runs on one plain thread (tch `Tensor` is `Send` but not `Sync`);
//! the async runtime only carries RPCs and the heartbeat.

use crate::checkpoint::PointOf;
use crate::client::{self, Progress};
use crate::collective::{self, Collective, RingConfig, RingListener};
use crate::device::{self, Backend};
use crate::error::rpc;
use crate::job::{self, Job};
use crate::session::Ctx;
use crate::{rounds, stages, Error, Result};
use butler_common::config::{BackendChoice, JobConfig};
use butler_proto::{FinishRequest, RegisterRequest, RendezvousRequest};
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tch::Device;
use tracing::{info, info_span};

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
    /// This worker's index among the workers of its host; picks its GPU (`local_rank mod GPUs`).
    pub local_rank: usize,
    /// TLS to the coordinator (an `https://` URL); plaintext when `None`.
    pub tls: Option<butler_proto::transport::ClientTls>,
}

/// What a finished worker knows.
#[derive(Clone, Debug)]
pub struct WorkerReport {
    pub rank: u32,
    pub world_size: u32,
    pub test_accuracy: f64,
}

/// Runs one worker to the end of the job. Blocking; call from `main`, not from an async task.
///
/// A job with `cluster.max_restarts > 0` survives lost peers and a restarted coordinator: on a
/// transient failure ([`Error::is_transient`]) the worker reports it, registers again (keeping its
/// rank, waiting up to `cluster.rejoin_timeout_ms` for the coordinator) and continues from the job's
/// commit point in the new generation. The coordinator decides whether the job goes on: a failed job
/// refuses the registration.
pub fn run(opts: WorkerOptions) -> Result<WorkerReport> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(|e| Error::Setup(format!("cannot start the async runtime: {e}")))?;
    let mut requested = opts.requested_rank;
    let mut wait = opts.connect_wait;
    let mut sessions = 0u32;
    loop {
        sessions += 1;
        match session(&rt, &opts, requested, wait) {
            Ok(report) => return Ok(report),
            Err(lost) => {
                // A worker asked to terminate leaves instead of registering again (its coordinator
                // may be gone too: a launcher that dies takes its processes with it).
                let retry = lost.error.is_transient()
                    && !TERMINATE_REQUESTED.load(std::sync::atomic::Ordering::Relaxed)
                    && lost.restarts > 0
                    && sessions <= 2 * lost.restarts + 2;
                if !retry {
                    return Err(lost.error);
                }
                tracing::warn!(error = %lost.error, session = sessions, "lost this generation of the job; registering again");
                requested = lost.rank.or(requested);
                wait = wait.max(lost.rejoin);
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
}

/// Why a session ended without a result, and what the next one needs.
struct Lost {
    error: Error,
    /// The rank this worker had (it asks for it again).
    rank: Option<u32>,
    /// The job's `cluster.max_restarts` (0 before the job spec was known).
    restarts: u32,
    /// The job's `cluster.rejoin_timeout_ms`.
    rejoin: Duration,
}

/// One generation of the job: register, heartbeat, train, report the end.
fn session(
    rt: &tokio::runtime::Runtime,
    opts: &WorkerOptions,
    requested_rank: Option<u32>,
    connect_wait: Duration,
) -> std::result::Result<WorkerReport, Lost> {
    let lost = |error: Error| Lost {
        error,
        rank: None,
        restarts: 0,
        rejoin: Duration::ZERO,
    };
    let mut client = rt
        .block_on(client::connect(
            &opts.coordinator,
            &opts.token,
            opts.tls.as_ref(),
            connect_wait,
        ))
        .map_err(|e| lost(Error::Setup(e)))?;
    let reg = rt
        .block_on(client.register(RegisterRequest {
            worker_id: opts.worker_id.clone(),
            requested_rank: requested_rank.map_or(-1, |r| r as i32),
        }))
        // Under mutual TLS a refused client certificate shows first here, as a transport error.
        .map_err(|s| {
            lost(Error::Rpc {
                op: "register",
                code: s.code(),
                message: rt.block_on(butler_proto::transport::explain_status(
                    &s,
                    &opts.coordinator,
                    opts.tls.as_ref(),
                )),
            })
        })?
        .into_inner();
    let cfg = JobConfig::from_toml(&reg.job_toml, Path::new("<job spec from the coordinator>"))
        .map_err(|e| lost(e.into()))?;
    let lost = |error: Error| Lost {
        error,
        rank: Some(reg.rank),
        restarts: cfg.cluster.max_restarts,
        rejoin: Duration::from_millis(cfg.cluster.rejoin_timeout_ms),
    };
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
        rt,
        client: client.clone(),
        rank: reg.rank,
        world: reg.world_size,
        generation: reg.generation,
        progress,
        run_dir: PathBuf::from(&reg.run_dir),
        local_rank: opts.local_rank,
        resume: reg.resume.clone(),
    };
    let result = train(&ctx, &cfg, opts);
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
            retryable: false,
        },
        Err(e) => FinishRequest {
            rank: reg.rank,
            generation: reg.generation,
            ok: false,
            error: e.to_string(),
            // A rank that leaves on SIGTERM has committed: the others regroup and a replacement
            // takes its place.
            retryable: (e.is_transient() || matches!(e, Error::Terminated(_)))
                && cfg.cluster.max_restarts > 0,
            ..Default::default()
        },
    };
    // Best effort when failing: the coordinator may itself be gone.
    let sent = rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(10), client.finish(finish)).await
    });
    match (&result, sent) {
        (Ok(_), Ok(Err(s))) => return Err(lost(rpc("finish")(s))),
        (Ok(_), Err(_)) => {
            return Err(lost(Error::Setup(
                "finish: the coordinator did not answer within 10s".into(),
            )))
        }
        _ => {}
    }
    let (acc, _, _) = result.map_err(lost)?;
    Ok(WorkerReport {
        rank: reg.rank,
        world_size: reg.world_size,
        test_accuracy: acc,
    })
}

/// Joins the job's collective. Every rank binds a TCP ring listener and publishes it with its device
/// (and rank 0, when it is on CUDA with NCCL, an NCCL unique id); from the coordinator's answer every
/// rank derives the same backend ([`device::select_backend`]) and builds it: the ring (connect to the
/// neighbours) or an NCCL communicator on its GPU.
pub(crate) fn join_collective(
    ctx: &Ctx,
    cfg: &JobConfig,
    advertise_host: &str,
    device: Device,
) -> Result<Box<dyn Collective>> {
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
    let wants_nccl = device.is_cuda() && cfg.cluster.backend != BackendChoice::Ring;
    let nccl = wants_nccl
        && matches!(
            collective::nccl::probe(),
            collective::nccl::NcclProbe::Available { .. }
        );
    let nccl_id = if ctx.rank == 0 && nccl {
        collective::nccl::create_unique_id()?.to_vec()
    } else {
        Vec::new()
    };
    let resp = ctx
        .rt
        .block_on(ctx.client.clone().rendezvous(RendezvousRequest {
            rank: ctx.rank,
            generation: ctx.generation,
            endpoint: endpoint.into_bytes(),
            device: device::device_label(device),
            nccl,
            nccl_id,
        }))
        .map_err(rpc("rendezvous"))?
        .into_inner();
    let (backend, why) = device::select_backend(cfg.cluster.backend, &resp.devices, &resp.nccl)
        .map_err(Error::Setup)?;
    let timeout = Duration::from_millis(cfg.cluster.collective_timeout_ms);
    if backend == Backend::Nccl {
        let Device::Cuda(gpu) = device else {
            unreachable!("select_backend picks NCCL only when every rank is on CUDA")
        };
        drop(listener);
        let progress = ctx.progress.clone();
        let suspect: collective::nccl::Suspect = Box::new(move || progress.stop_reason());
        let comm = collective::nccl::NcclCollective::init(
            ctx.rank as usize,
            resp.devices.len(),
            &resp.nccl_id,
            gpu,
            timeout,
            Some(suspect),
        )?;
        info!(backend = "nccl", gpu, %why, "collective ready");
        return Ok(Box::new(comm));
    }
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
    let secret = collective::RingSecret::from_slice(&resp.ring_secret).ok_or_else(|| {
        Error::Setup(format!(
            "rendezvous: the coordinator sent a {}-byte ring secret, not {} (a coordinator of \
             another butler version?)",
            resp.ring_secret.len(),
            collective::RingSecret::LEN
        ))
    })?;
    let ring_cfg = RingConfig {
        timeout,
        generation: ctx.generation,
        secret,
        ..Default::default()
    };
    let ring = listener.connect(ctx.rank as usize, &peers, ring_cfg)?;
    info!(backend = "ring", %why, "collective ready");
    Ok(Box::new(ring))
}

/// Loads the commit point's checkpoint into `trainer` (every rank reads the same file) and checks that
/// it is the state the coordinator recorded.
pub(crate) fn resume_from(
    ctx: &Ctx,
    trainer: &mut crate::trainer::Trainer,
    point: &butler_proto::ResumePoint,
) -> Result<crate::checkpoint::ResumeMeta> {
    let path = ctx.run_dir.join(&point.checkpoint);
    let meta = crate::checkpoint::load_resumable(trainer, &path)?;
    if meta.point(&point.checkpoint) != *point {
        return Err(Error::Checkpoint {
            file: path,
            reason: format!(
                "it holds step {} (epoch {}) but the coordinator's commit names step {} (epoch {})",
                meta.step, meta.epoch, point.step, point.epoch
            ),
        });
    }
    if meta.world_size != ctx.world {
        // The job shrank: the coordinator re-cuts the epoch's unconsumed samples for this world.
        info!(
            from = meta.world_size,
            to = ctx.world,
            "resuming with another world size"
        );
    }
    info!(step = meta.step, epoch = meta.epoch, checkpoint = %point.checkpoint, "resumed from the commit point");
    Ok(meta)
}

/// Set once this process has received SIGTERM; it then never starts another session.
static TERMINATE_REQUESTED: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// SIGTERM (what Kubernetes sends before it kills a pod) asks the job to stop at the next step boundary
/// with a committed checkpoint, instead of dying mid-step.
fn watch_sigterm(ctx: &Ctx) -> Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let progress = ctx.progress.clone();
    let mut term = {
        let _guard = ctx.rt.enter();
        signal(SignalKind::terminate())
            .map_err(|e| Error::Setup(format!("cannot watch SIGTERM: {e}")))?
    };
    ctx.rt.spawn(async move {
        if term.recv().await.is_some() {
            tracing::warn!("SIGTERM: stopping at the next step boundary after a checkpoint");
            TERMINATE_REQUESTED.store(true, std::sync::atomic::Ordering::Relaxed);
            progress
                .terminate
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
    });
    Ok(())
}

/// The training job proper; returns (test accuracy, test loss, checkpoint path relative to the run dir).
fn train(ctx: &Ctx, cfg: &JobConfig, opts: &WorkerOptions) -> Result<(f64, f64, String)> {
    let device = device::resolve_device(cfg.cluster.device, ctx.local_rank)?;
    let mut job = Job::load(ctx, cfg, device)?;
    let progress = ctx.progress.clone();
    let mut comm = collective::Observed::new(
        join_collective(ctx, cfg, &opts.advertise_host, device)?,
        Box::new(move || progress.advanced()),
        ctx.progress.timing.clone(),
    );
    info!(
        train = job.train_set.len,
        test = job.test_set.len,
        device = ?device,
        precision = ?cfg.train.precision,
        "data loaded; collective ready"
    );
    let ring: &mut dyn Collective = &mut comm;
    if cfg.pretrain.is_some() {
        watch_sigterm(ctx)?;
        return stages::train(&mut job, ring);
    }
    let (eval, trainer) = if cfg.pseudo_label.is_some() {
        rounds::run(&job, ring)?
    } else {
        watch_sigterm(ctx)?;
        let mut trainer = job.new_trainer()?;
        trainer.broadcast_parameters(ring)?;
        let resumed = match &ctx.resume {
            Some(point) => Some(resume_from(ctx, &mut trainer, point)?),
            None => None,
        };
        let views = job::unlabeled_views(cfg, &job.manifest.sample_shape)?;
        let mut unlabeled = job::open_unlabeled_stream(&job, views, None, resumed.as_ref())?;
        let durable = job::Durable {
            cfg: &cfg.checkpoint,
            resumed: resumed.as_ref(),
            round: 0,
        };
        let run = job::run_epochs(
            &job,
            &mut trainer,
            ring,
            unlabeled.as_mut(),
            None,
            0..cfg.train.epochs,
            Some(durable),
        )?;
        (run.eval, trainer)
    };
    let checkpoint = if ctx.rank == 0 {
        crate::checkpoint::save_checkpoint(&trainer, &ctx.run_dir)?
    } else {
        String::new()
    };
    // Nobody reports success before rank 0's checkpoint is on disk.
    ring.barrier()?;
    info!(test_accuracy = eval.accuracy, "training finished");
    Ok((eval.accuracy, eval.loss, checkpoint))
}
