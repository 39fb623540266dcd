//! The gRPC face of the coordinator: token check, status mapping, rendezvous waiting, the heartbeat
//! watchdog, and the end of the job (summary.json on success, a failure reason otherwise).

use crate::state::{JobState, RankEndpoint, Refusal};
use crate::summary::Summary;
use crate::{Error, Result};
use butler_common::config::JobConfig;
use butler_common::fsutil;
use butler_data::JobDataCheck;
use butler_proto::coordinator_server::{Coordinator, CoordinatorServer};
use butler_proto::*;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::{watch, Notify};
use tonic::{Request, Response, Status};
use tracing::{info, warn};

/// How a coordinator is started.
#[derive(Clone, Debug)]
pub struct CoordinatorOptions {
    pub config: JobConfig,
    /// The config text as the user wrote it, shown in logs only; workers get the normalised TOML.
    pub world_size: u32,
    pub listen: SocketAddr,
    pub run_dir: PathBuf,
    pub token: String,
    /// Continue a job stopped mid-way (pseudo-label rounds: from `rounds/state.json`).
    pub resume: bool,
    /// Serve Prometheus `/metrics` here (plain HTTP, no token; it holds no secret).
    pub metrics_listen: Option<SocketAddr>,
    /// TLS (and mTLS when it holds a client CA) on every RPC; plaintext when `None`.
    pub tls: Option<butler_proto::transport::ServerTls>,
}

/// How a job ended.
#[derive(Debug)]
pub enum Outcome {
    Succeeded(Summary),
    Failed(String),
}

struct Shared {
    state: Mutex<JobState>,
    /// Woken whenever an endpoint is published, so rendezvous waiters re-check.
    rendezvous: Notify,
    /// Set once when the job has ended; the server drains and stops.
    done: watch::Sender<Option<bool>>,
    job_toml: String,
    run_dir: PathBuf,
    /// Timing, late ranks, per-step scalars and their sinks. Locked after `state` when both are held.
    observer: Mutex<crate::observe::Observer>,
    /// The per-generation secrets of the TCP ring's handshake.
    ring_keys: crate::security::RingKeys,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, JobState> {
        // A panic while holding the lock would be a bug in JobState; the state is still the best record.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn observer(&self) -> MutexGuard<'_, crate::observe::Observer> {
        self.observer.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The `/metrics` text: membership refreshed at scrape time, then every series.
    fn scrape(&self) -> String {
        let (generation, world, members) = {
            let st = self.lock();
            (st.generation, st.world_size, st.members_view())
        };
        let o = self.observer();
        o.metrics.membership(generation, world, &members);
        o.metrics.encode()
    }

    /// `butler status`'s document.
    fn status_json(&self) -> serde_json::Value {
        let st = self.lock();
        let o = self.observer();
        let history = st.history();
        let last_epoch = history.last();
        let ranks: Vec<serde_json::Value> = st
            .members_view()
            .into_iter()
            .map(|m| {
                let state = match (&m.worker, m.finished) {
                    (None, _) => "missing",
                    (Some(_), true) => "finished",
                    (Some(_), false) => "running",
                };
                serde_json::json!({
                    "rank": m.rank,
                    "worker": m.worker,
                    "state": state,
                    "heartbeat_age_seconds": m.heartbeat_age,
                    "progress_age_seconds": m.progress_age,
                    "timing": o.rank_status(m.rank),
                })
            })
            .collect();
        let samples_per_second = o
            .last
            .as_ref()
            .and_then(|l| l.scalars.get("perf/samples_per_second").copied());
        let epochs = st.cfg.train.epochs;
        let done_epochs = history.len() as u64;
        let elapsed = st.elapsed();
        // The ETA from epochs done in this coordinator's lifetime (a resumed job's earlier part aside).
        let this_run = done_epochs.saturating_sub(st.prior_history.len() as u64);
        let eta = (this_run > 0 && done_epochs < epochs)
            .then(|| elapsed / this_run as f64 * (epochs - done_epochs) as f64);
        serde_json::json!({
            "job": st.cfg.job.name,
            "state": match st.failure() {
                Some(_) => "failed",
                None if st.all_finished() => "finished",
                None => "running",
            },
            "failure": st.failure(),
            "generation": st.generation,
            "world_size": st.world_size,
            "restarts": st.restarts,
            "epoch": last_epoch.map(|e| e.epoch),
            "epochs": epochs,
            "step": o.step,
            "elapsed_seconds": elapsed,
            "eta_seconds": eta,
            "samples_per_second": samples_per_second,
            "train_loss": last_epoch.map(|e| e.train_loss),
            "val_accuracy": history.iter().rev().find_map(|e| e.val_accuracy),
            "test_accuracy": history.iter().rev().find_map(|e| e.test_accuracy),
            "scalars": o.last.as_ref().map(|l| &l.scalars),
            "late_rank": o.late_history.last(),
            "ranks": ranks,
        })
    }
}

fn status(r: Refusal) -> Status {
    match r {
        Refusal::StaleGeneration { .. } => Status::failed_precondition(r.to_string()),
        Refusal::BadRank { .. } => Status::invalid_argument(r.to_string()),
        Refusal::WorldFull { .. } | Refusal::RankTaken { .. } => {
            Status::already_exists(r.to_string())
        }
        Refusal::JobFailed(_) => Status::aborted(r.to_string()),
        Refusal::Stage(_) => Status::failed_precondition(r.to_string()),
        Refusal::Invalid(_) => Status::invalid_argument(r.to_string()),
    }
}

struct Service(Arc<Shared>);

#[tonic::async_trait]
impl Coordinator for Service {
    async fn register(
        &self,
        req: Request<RegisterRequest>,
    ) -> std::result::Result<Response<RegisterResponse>, Status> {
        let peer = req.remote_addr();
        let r = req.into_inner();
        let requested = u32::try_from(r.requested_rank).ok();
        // A worker that finds a shrunk job full waits for the next step boundary, where the job
        // regroups with it (the ranks hear about it in their heartbeats).
        let mut waiting = false;
        let deadline = tokio::time::Instant::now()
            + Duration::from_millis(self.0.lock().cfg.cluster.rejoin_timeout_ms);
        let (st, rank) = loop {
            let notified = self.0.rendezvous.notified();
            {
                let mut st = self.0.lock();
                match st.register(&r.worker_id, requested) {
                    Err(Refusal::WorldFull { .. }) if waiting || st.wait_to_join() => {
                        if !waiting {
                            info!(worker = %r.worker_id, "a worker waits to join at the next step boundary");
                        }
                        waiting = true;
                    }
                    other => {
                        let rank = other.map_err(status)?;
                        break (st, rank);
                    }
                }
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(Status::deadline_exceeded(
                    "the job did not reach a step boundary to admit this worker in time",
                ));
            }
        };
        info!(rank, worker = %r.worker_id, ?peer, generation = st.generation, "worker registered");
        Ok(Response::new(RegisterResponse {
            rank,
            world_size: st.world_size,
            generation: st.generation,
            job_toml: self.0.job_toml.clone(),
            heartbeat_interval_ms: st.cfg.cluster.heartbeat_interval_ms,
            run_dir: self.0.run_dir.to_string_lossy().into_owned(),
            resume: st.resumed().map(|c| c.point()),
        }))
    }

    async fn rendezvous(
        &self,
        req: Request<RendezvousRequest>,
    ) -> std::result::Result<Response<RendezvousResponse>, Status> {
        let r = req.into_inner();
        let timeout = {
            let mut st = self.0.lock();
            let published = RankEndpoint {
                endpoint: r.endpoint,
                device: r.device,
                nccl: r.nccl,
                nccl_id: r.nccl_id,
            };
            let host = String::from_utf8_lossy(&published.endpoint)
                .rsplit_once(':')
                .map(|(h, _)| h.to_string())
                .unwrap_or_default();
            let device = published.device.clone();
            st.publish_endpoint(r.rank, r.generation, published)
                .map_err(status)?;
            self.0.observer().rank_info(r.rank, &host, &device);
            Duration::from_millis(st.cfg.cluster.rendezvous_timeout_ms)
        };
        self.0.rendezvous.notify_waiters();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            // Register interest before checking, so a publish between check and wait is not missed.
            let notified = self.0.rendezvous.notified();
            {
                let st = self.0.lock();
                if let Some(f) = st.failure() {
                    return Err(Status::aborted(format!("the job has failed: {f}")));
                }
                if st.generation != r.generation {
                    return Err(status(Refusal::StaleGeneration {
                        got: r.generation,
                        current: st.generation,
                    }));
                }
                if let Some(all) = st.endpoints() {
                    let nccl_id = all.first().map(|e| e.nccl_id.clone()).unwrap_or_default();
                    return Ok(Response::new(RendezvousResponse {
                        generation: st.generation,
                        devices: all.iter().map(|e| e.device.clone()).collect(),
                        nccl: all.iter().map(|e| e.nccl).collect(),
                        endpoints: all.into_iter().map(|e| e.endpoint).collect(),
                        nccl_id,
                        ring_secret: self.0.ring_keys.for_generation(st.generation),
                    }));
                }
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                let missing = self.0.lock().missing_endpoints();
                return Err(Status::deadline_exceeded(format!(
                    "rendezvous timed out after {:.0}s waiting for ranks {missing:?}",
                    timeout.as_secs_f64()
                )));
            }
        }
    }

    async fn get_assignment(
        &self,
        req: Request<AssignmentRequest>,
    ) -> std::result::Result<Response<AssignmentResponse>, Status> {
        let r = req.into_inner();
        let mut st = self.0.lock();
        match r.stream() {
            Stream::Labeled => {}
            Stream::Unlabeled => {
                let (split, len) = st
                    .unlabeled_assignment(r.rank, r.generation)
                    .map_err(status)?
                    .ok_or_else(|| {
                        Status::failed_precondition(
                            "this job has no unlabeled stream (data.unlabeled_split)",
                        )
                    })?;
                let (lo, hi) = butler_data::assign::part_bounds(len, st.world_size, r.rank);
                let (epoch, start) = st.unlabeled_cursor(r.rank);
                return Ok(Response::new(AssignmentResponse {
                    generation: st.generation,
                    epoch,
                    split,
                    seed: st.cfg.job.seed,
                    shuffle: true,
                    dataset_len: len,
                    world_size: st.world_size,
                    rank: r.rank,
                    samples_for_rank: hi - lo,
                    start,
                    has_epoch: true,
                }));
            }
            Stream::Unspecified => {
                return Err(Status::invalid_argument(
                    "assignment request names no stream",
                ))
            }
        }
        let generation = st.generation;
        let split = st.cfg.data.train_split.clone();
        let a = st
            .assignment(r.rank, r.generation, r.epoch)
            .map_err(status)?;
        Ok(Response::new(match a {
            Some(s) => AssignmentResponse {
                generation,
                epoch: s.epoch,
                split,
                seed: s.seed,
                shuffle: s.shuffle,
                dataset_len: s.dataset_len,
                world_size: s.world_size,
                rank: s.rank,
                samples_for_rank: s.samples_for_rank(),
                start: s.start,
                has_epoch: true,
            },
            None => AssignmentResponse {
                generation,
                epoch: r.epoch,
                split,
                has_epoch: false,
                ..Default::default()
            },
        }))
    }

    async fn phase(
        &self,
        req: Request<PhaseRequest>,
    ) -> std::result::Result<Response<PhaseResponse>, Status> {
        use crate::rounds::Phase;
        let r = req.into_inner();
        let mut st = self.0.lock();
        st.alive(r.rank, r.generation).map_err(status)?;
        let to_phase = |k: i32| match PhaseKind::try_from(k) {
            Ok(PhaseKind::Train) => Ok(Phase::Train),
            Ok(PhaseKind::Infer) => Ok(Phase::Infer),
            Ok(PhaseKind::Done) => Ok(Phase::Done),
            _ => Err(Status::invalid_argument(format!("unknown phase kind {k}"))),
        };
        let result = {
            let rounds = st.rounds.as_mut().ok_or_else(|| {
                Status::failed_precondition("this job has no pseudo-label rounds")
            })?;
            let outcome = match r.done {
                Some(d) => {
                    let histogram =
                        (!d.histogram.is_empty()).then_some(butler_common::pseudo::Histogram {
                            classes: d.classes as usize,
                            counts: d.histogram,
                            below: d.below,
                        });
                    if let Some(h) = &histogram {
                        if h.counts.len() != h.classes * butler_common::pseudo::BINS
                            || h.below.len() != h.classes
                        {
                            return Err(Status::invalid_argument(format!(
                                "histogram has {} + {} counts for {} classes",
                                h.counts.len(),
                                h.below.len(),
                                h.classes
                            )));
                        }
                    }
                    rounds.complete(
                        r.rank,
                        d.round,
                        to_phase(d.kind)?,
                        histogram,
                        d.test_accuracy,
                    )
                }
                None => Ok(()),
            };
            outcome.map(|()| {
                let (round, phase) = rounds.current();
                PhaseResponse {
                    round,
                    kind: match phase {
                        Phase::Train => PhaseKind::Train,
                        Phase::Infer => PhaseKind::Infer,
                        Phase::Done => PhaseKind::Done,
                    } as i32,
                    selection_json: rounds
                        .selection_for(round)
                        .filter(|_| phase == Phase::Train)
                        .map(|s| serde_json::to_string(s).expect("a selection serialises"))
                        .unwrap_or_default(),
                }
            })
        };
        match result {
            Ok(resp) => Ok(Response::new(resp)),
            Err(why) => {
                st.fail(format!("pseudo-label rounds: {why}"));
                Err(Status::aborted(why))
            }
        }
    }

    async fn heartbeat(
        &self,
        req: Request<HeartbeatRequest>,
    ) -> std::result::Result<Response<HeartbeatResponse>, Status> {
        let r = req.into_inner();
        let mut st = self.0.lock();
        if r.generation == st.generation {
            self.0
                .observer()
                .beat(r.rank, r.timing, &r.phase, r.collectives);
        }
        match st.heartbeat(r.rank, r.generation, r.progress) {
            Ok(()) => Ok(Response::new(HeartbeatResponse {
                regroup_at_boundary: st.joining > 0,
                ..Default::default()
            })),
            Err(Refusal::JobFailed(why)) => Ok(Response::new(HeartbeatResponse {
                stop: true,
                reason: why,
                ..Default::default()
            })),
            // A rank of an older generation: the job regrouped without it, and it must join again.
            Err(Refusal::StaleGeneration { got, current }) if got < current => {
                Ok(Response::new(HeartbeatResponse {
                    stop: true,
                    reason: format!(
                        "the job regrouped (generation {current}, this rank is in {got})"
                    ),
                    regroup: true,
                    ..Default::default()
                }))
            }
            Err(e) => Err(status(e)),
        }
    }

    async fn report_metrics(
        &self,
        req: Request<MetricsReport>,
    ) -> std::result::Result<Response<Ack>, Status> {
        let r = req.into_inner();
        let record = {
            let mut st = self.0.lock();
            st.report(
                r.rank,
                r.generation,
                r.epoch,
                r.train_loss,
                r.train_samples,
                r.train_seconds,
                r.learning_rate,
                (r.test_accuracy, r.test_loss),
                (r.val_accuracy, r.val_loss),
            )
            .map_err(status)?
        };
        if let Some(rec) = record {
            self.0.observer().epoch_done(&rec, r.step);
            info!(
                epoch = rec.epoch,
                train_loss = rec.train_loss,
                test_accuracy = rec.test_accuracy,
                seconds = rec.train_seconds,
                "epoch done"
            );
            let line = serde_json::to_string(&rec).expect("EpochRecord serialises") + "\n";
            crate::observe::append_line(&self.0.run_dir.join("metrics.jsonl"), &line);
        }
        Ok(Response::new(Ack {}))
    }

    async fn commit(
        &self,
        req: Request<CommitRequest>,
    ) -> std::result::Result<Response<Ack>, Status> {
        let r = req.into_inner();
        let point = r
            .point
            .ok_or_else(|| Status::invalid_argument("commit without a resume point"))?;
        let c = crate::commits::Commit::from_point(&point, r.sha256, r.bytes);
        let mut st = self.0.lock();
        st.commit(r.rank, r.generation, c).map_err(status)?;
        self.0.observer().metrics.checkpoint(r.bytes);
        info!(
            step = point.step,
            epoch = point.epoch,
            checkpoint = %point.checkpoint,
            "commit point recorded"
        );
        Ok(Response::new(Ack {}))
    }

    async fn report_step(
        &self,
        req: Request<StepReport>,
    ) -> std::result::Result<Response<Ack>, Status> {
        let r = req.into_inner();
        {
            let mut st = self.0.lock();
            st.alive(r.rank, r.generation).map_err(status)?;
            if r.rank != 0 {
                return Err(Status::invalid_argument("only rank 0 reports step scalars"));
            }
        }
        let scalars = r.scalars.into_iter().collect();
        let mut o = self.0.observer();
        // The timing gathered at this step is exact for every rank; heartbeats lag behind it.
        for (rank, t) in r.ranks.into_iter().enumerate() {
            o.timing_at_step(rank as u32, t);
        }
        o.step_report(r.step, r.epoch, r.generation, scalars);
        Ok(Response::new(Ack {}))
    }

    async fn status(
        &self,
        _req: Request<StatusRequest>,
    ) -> std::result::Result<Response<StatusResponse>, Status> {
        Ok(Response::new(StatusResponse {
            json: self.0.status_json().to_string(),
        }))
    }

    async fn next_stage(
        &self,
        req: Request<StageRequest>,
    ) -> std::result::Result<Response<StageResponse>, Status> {
        let r = req.into_inner();
        if let Some(done) = &r.finished {
            if r.rank == 0 {
                info!(
                    stage = Stage::try_from(done.stage).unwrap_or(Stage::Done).as_str_name(),
                    train_loss = done.train_loss,
                    test_accuracy = done.test_accuracy,
                    checkpoint = %done.checkpoint,
                    "stage finished on rank 0"
                );
            }
        }
        let next = self
            .0
            .lock()
            .next_stage(r.rank, r.generation, r.finished)
            .map_err(status)?;
        Ok(Response::new(StageResponse { next: next as i32 }))
    }

    async fn finish(
        &self,
        req: Request<FinishRequest>,
    ) -> std::result::Result<Response<Ack>, Status> {
        let r = req.into_inner();
        let mut st = self.0.lock();
        if !r.ok {
            warn!(rank = r.rank, error = %r.error, "rank reported failure");
        } else {
            info!(rank = r.rank, "rank finished");
        }
        let all_ok = st
            .finish(
                r.rank,
                r.generation,
                r.ok,
                &r.error,
                r.retryable,
                (r.test_accuracy, r.test_loss),
                r.checkpoint,
            )
            .map_err(status)?;
        if let Some(kept) = st.take_regrouped() {
            let (generation, world, restarts) = (st.generation, st.world_size, st.restarts);
            drop(st);
            let mut o = self.0.observer();
            o.event(
                "regroup",
                format!("generation {generation} with {world} ranks (restart {restarts})"),
            );
            o.new_generation(generation);
            drop(o);
            write_metrics(&self.0.run_dir, &kept);
            self.0.rendezvous.notify_waiters();
            return Ok(Response::new(Ack {}));
        }
        if all_ok {
            let mut summary = st.summary();
            drop(st);
            summary.late_ranks = self.0.observer().late_history.clone();
            let path = self.0.run_dir.join("summary.json");
            let json = serde_json::to_vec_pretty(&summary).expect("Summary serialises");
            match fsutil::write_atomic(&path, &json) {
                Ok(()) => {
                    info!(path = %path.display(), test_accuracy = summary.test_accuracy, "job succeeded; summary written");
                    let _ = self.0.done.send(Some(true));
                }
                Err(e) => {
                    self.0.lock().fail(format!("cannot write summary: {e}"));
                    let _ = self.0.done.send(Some(false));
                }
            }
        } else if st.failure().is_some() && st.all_finished() {
            let _ = self.0.done.send(Some(false));
        }
        Ok(Response::new(Ack {}))
    }
}

/// A resumed job keeps the epochs recorded before its commit point and drops the later ones (they are
/// trained again): rewrites `metrics.jsonl` atomically and returns those records.
fn keep_metrics_before(path: &std::path::Path, epoch: u64) -> Result<Vec<crate::EpochRecord>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(butler_common::Error::io(path, e).into()),
    };
    let mut kept = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let rec: crate::EpochRecord = serde_json::from_str(line).map_err(|e| {
            butler_common::Error::invalid(format!("{}", path.display()), e.to_string())
        })?;
        if rec.epoch < epoch {
            kept.push(rec);
        }
    }
    fsutil::write_atomic(path, metrics_lines(&kept).as_bytes())?;
    Ok(kept)
}

fn metrics_lines(records: &[crate::EpochRecord]) -> String {
    records
        .iter()
        .map(|r| serde_json::to_string(r).expect("EpochRecord serialises") + "\n")
        .collect()
}

/// After a regroup: `metrics.jsonl` holds the records kept (the later epochs are trained again).
fn write_metrics(run_dir: &std::path::Path, kept: &[crate::EpochRecord]) {
    let path = run_dir.join("metrics.jsonl");
    if let Err(e) = fsutil::write_atomic(&path, metrics_lines(kept).as_bytes()) {
        warn!(path = %path.display(), error = %e, "cannot rewrite metrics after a regroup");
    }
}

/// `butler status`: asks a running coordinator at `url` (token required) for its status document.
pub async fn status_rpc(
    url: &str,
    token: &str,
    tls: Option<&butler_proto::transport::ClientTls>,
) -> std::result::Result<serde_json::Value, String> {
    use butler_proto::transport;
    let channel = transport::endpoint(url, tls)?
        .timeout(Duration::from_secs(10))
        .connect()
        .await
        .map_err(|e| {
            let why = transport::explain(&e, tls.is_some()).unwrap_or_else(|| transport::chain(&e));
            format!("cannot reach the coordinator at {url}: {why}")
        })?;
    let bearer: tonic::metadata::MetadataValue<_> = format!("Bearer {token}")
        .parse()
        .map_err(|_| "the token holds characters a header cannot carry".to_string())?;
    let mut client = butler_proto::coordinator_client::CoordinatorClient::with_interceptor(
        channel,
        move |mut req: Request<()>| {
            req.metadata_mut().insert(AUTH_METADATA_KEY, bearer.clone());
            Ok(req)
        },
    );
    let r = match client.status(StatusRequest {}).await {
        Ok(r) => r,
        Err(s) => {
            let why = transport::explain_status(&s, url, tls).await;
            return Err(format!("status RPC to {url}: {why}"));
        }
    };
    serde_json::from_str(&r.into_inner().json).map_err(|e| format!("bad status document: {e}"))
}

/// Runs the coordinator until the job ends. `on_bound` receives the bound address (port 0 allowed).
pub async fn serve(
    mut opts: CoordinatorOptions,
    on_bound: impl FnOnce(SocketAddr),
) -> Result<Outcome> {
    let (manifest, manifest_file) = opts.config.check_data()?;
    // Workers receive the config with `train.steps` already turned into epochs.
    opts.config.resolve_steps()?;
    opts.config.validate_world(opts.world_size)?;
    let train_len = opts.config.train_len(&manifest, &manifest_file)?;
    let unlabeled_len = match &opts.config.data.unlabeled_split {
        Some(u) => Some(manifest.split(u, &manifest_file)?.num_samples),
        None => None,
    };
    // Owner-only: checkpoints, logs and job state are the job's, not every local user's.
    fsutil::create_private_dir(&opts.run_dir)?;
    let rounds = match &opts.config.pseudo_label {
        Some(p) => Some(
            crate::rounds::Rounds::open(&opts.run_dir, p, opts.world_size, opts.resume)
                .map_err(|e| butler_common::Error::invalid("pseudo-label rounds", e))?,
        ),
        None => None,
    };

    // Every job kind checkpoints and resumes at step boundaries: plain, semi-supervised and
    // distillation jobs, staged jobs inside pretraining, pseudo-label rounds inside TRAIN (their
    // phases resume by the rounds' own state, above).
    let commits = {
        Some(
            crate::commits::Commits::open(
                &opts.run_dir,
                &opts.config.job.name,
                &opts.config.trajectory_fingerprint(),
                opts.world_size,
                opts.config.checkpoint.keep,
                opts.resume,
                // Rounds resume by their own state even before their first commit.
                opts.config.pseudo_label.is_none(),
                // An elastic job may resume with another world size in its range.
                opts.config.cluster.min_workers.is_some(),
            )
            .map_err(|e| butler_common::Error::invalid("job state", e))?,
        )
    };
    // A resumed job trains again from some epoch; the records from there on are dropped.
    let redo_from = match (&rounds, commits.as_ref().and_then(|c| c.resumed())) {
        // Pseudo-label rounds: only a TRAIN phase is redone — from the commit when it belongs to
        // this round, else from the phase's first epoch; INFER resumes without training.
        (Some(r), commit) => match r.current() {
            (round, crate::rounds::Phase::Train) => Some(match commit {
                Some(c) if c.round == round => c.epoch,
                _ => round as u64 * opts.config.train.epochs,
            }),
            _ => None,
        },
        (None, Some(c)) => Some(c.first_epoch_redone()),
        (None, None) => Some(0),
    };
    let prior_history = match redo_from.filter(|_| opts.resume) {
        Some(epoch) => keep_metrics_before(&opts.run_dir.join("metrics.jsonl"), epoch)?,
        None if opts.resume => keep_metrics_before(&opts.run_dir.join("metrics.jsonl"), u64::MAX)?,
        None => Vec::new(),
    };

    let listener = tokio::net::TcpListener::bind(opts.listen)
        .await
        .map_err(|source| Error::Listen {
            addr: opts.listen.to_string(),
            source,
        })?;
    let bound = listener.local_addr().map_err(|source| Error::Listen {
        addr: opts.listen.to_string(),
        source,
    })?;
    let cluster = opts.config.cluster.clone();
    let (done_tx, mut done_rx) = watch::channel(None);
    // The resolved config next to the results (the run report shows it).
    let job_toml = opts.config.to_toml();
    fsutil::write_atomic(&opts.run_dir.join("job.toml"), job_toml.as_bytes())?;
    let mut observer = crate::observe::Observer::new(
        &opts.config.metrics,
        &opts.run_dir,
        crate::metrics::Metrics::new(),
    );
    if !opts.resume {
        // A fresh job's curves start empty; a resumed one appends (its events mark the restart).
        for stale in ["steps.jsonl", "events.jsonl"] {
            let p = opts.run_dir.join(stale);
            if p.exists() {
                std::fs::remove_file(&p).map_err(|e| butler_common::Error::io(&p, e))?;
            }
        }
    }
    let shared = Arc::new(Shared {
        observer: Mutex::new({
            observer.generation = 1;
            observer
        }),
        job_toml,
        state: Mutex::new({
            let mut st = JobState::new(opts.config, opts.world_size, train_len);
            st.unlabeled_len = unlabeled_len;
            st.rounds = rounds;
            st.commits = commits;
            st.prior_history = prior_history;
            if opts.resume {
                // Above every generation the lost workers may still speak for.
                let g = st.commits.as_ref().map_or(0, |c| c.generation()) + 1;
                st.generation = g.max(1);
                if let Some(c) = st.commits.as_mut() {
                    c.resume_from_newest(st.generation);
                }
            }
            st
        }),
        rendezvous: Notify::new(),
        done: done_tx,
        run_dir: opts.run_dir.clone(),
        ring_keys: crate::security::RingKeys::random(),
    });
    {
        let generation = shared.lock().generation;
        let mut o = shared.observer();
        o.generation = generation;
        if opts.resume {
            o.event(
                "resume",
                format!("the coordinator resumed the job (generation {generation})"),
            );
        }
    }
    let metrics_server = match opts.metrics_listen {
        Some(addr) => {
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| Error::Listen {
                    addr: addr.to_string(),
                    source,
                })?;
            let at = l.local_addr().map_err(|source| Error::Listen {
                addr: addr.to_string(),
                source,
            })?;
            info!(%at, "serving Prometheus metrics at /metrics");
            let s = shared.clone();
            Some(tokio::spawn(crate::metrics::serve(
                l,
                Arc::new(move || s.scrape()),
            )))
        }
        None => None,
    };
    match &opts.tls {
        Some(t) => {
            info!(%bound, world_size = opts.world_size, mutual_tls = t.mutual(), "coordinator listening (TLS)")
        }
        None => info!(%bound, world_size = opts.world_size, "coordinator listening (plaintext)"),
    }
    on_bound(bound);

    let token = format!("Bearer {}", opts.token);
    let refusals = Arc::new(crate::security::RefusalLog::default());
    let auth = move |req: Request<()>| -> std::result::Result<Request<()>, Status> {
        let got = req
            .metadata()
            .get(AUTH_METADATA_KEY)
            .map(|v| v.as_bytes())
            .unwrap_or_default();
        if crate::security::token_matches(got, token.as_bytes()) {
            Ok(req)
        } else {
            let peer = req.remote_addr();
            if let Some(n) = refusals.record(peer.map(|a| a.ip()), std::time::Instant::now()) {
                let peer = peer.map_or_else(|| "unknown".to_string(), |a| a.to_string());
                warn!(%peer, refused = n, "rejected RPC: missing or wrong job token (logged at most once per {}s per address)", crate::security::REFUSAL_LOG_WINDOW.as_secs());
            }
            Err(Status::unauthenticated("missing or wrong job token"))
        }
    };

    // The watchdog turns silence into a failure: a dead worker must not leave the job waiting forever.
    let watchdog = {
        let shared = shared.clone();
        let timeout = Duration::from_millis(cluster.heartbeat_timeout_ms);
        let stall = Duration::from_millis(cluster.stall_timeout_ms);
        let join_timeout = Duration::from_millis(cluster.rendezvous_timeout_ms);
        let period = Duration::from_millis(cluster.heartbeat_interval_ms.clamp(50, 1000));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            loop {
                tick.tick().await;
                let failed = {
                    let mut st = shared.lock();
                    if st.failure().is_none() && st.try_shrink() {
                        shared.rendezvous.notify_waiters();
                    }
                    if st.failure().is_none() {
                        // A silent rank is survivable (regroup); a stalled one is not (it may hang again).
                        if let Some(why) = st.overdue(timeout, join_timeout) {
                            if st.can_regroup() && !st.rejoin_expired() {
                                st.regroup(&why);
                            } else {
                                st.fail(why);
                            }
                        } else if let Some(why) = st.stalled(stall) {
                            let mut o = shared.observer();
                            let behind = o.behind_in_collectives();
                            let detail = if behind.is_empty() {
                                why.clone()
                            } else {
                                let names: Vec<String> = behind
                                    .iter()
                                    .map(|(r, n, max)| format!("rank {r} entered {n} of {max}"))
                                    .collect();
                                format!(
                                    "{why}; collectives entered: {} (the others wait in collective {})",
                                    names.join(", "),
                                    behind[0].2
                                )
                            };
                            o.event("stall", detail);
                            drop(o);
                            st.fail(why);
                        }
                    }
                    if let Some(kept) = st.take_regrouped() {
                        let mut o = shared.observer();
                        o.event(
                            "regroup",
                            format!(
                                "generation {} with {} ranks (restart {})",
                                st.generation, st.world_size, st.restarts
                            ),
                        );
                        o.new_generation(st.generation);
                        drop(o);
                        write_metrics(&shared.run_dir, &kept);
                        shared.rendezvous.notify_waiters();
                    }
                    st.failure().is_some()
                };
                if failed {
                    shared.rendezvous.notify_waiters();
                    // Give live workers a few heartbeats to hear "stop" before the server goes away.
                    tokio::time::sleep(period * 3).await;
                    let _ = shared.done.send(Some(false));
                    return;
                }
            }
        })
    };

    let shutdown = {
        let mut rx = done_rx.clone();
        async move {
            let _ = rx.wait_for(Option::is_some).await;
        }
    };
    let mut server = tonic::transport::Server::builder();
    if let Some(t) = &opts.tls {
        server = server
            .tls_config(t.config())
            .map_err(|e| Error::Tls(butler_proto::transport::chain(&e)))?;
    }
    server
        .add_service(CoordinatorServer::with_interceptor(
            Service(shared.clone()),
            auth,
        ))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            shutdown,
        )
        .await?;
    watchdog.abort();
    if let Some(m) = metrics_server {
        m.abort();
    }
    let ok = done_rx.borrow_and_update().unwrap_or(false);
    let st = shared.lock();
    Ok(if ok {
        let mut summary = st.summary();
        summary.late_ranks = shared.observer().late_history.clone();
        Outcome::Succeeded(summary)
    } else {
        Outcome::Failed(
            st.failure()
                .unwrap_or("the job ended without a result")
                .to_string(),
        )
    })
}
