//! The coordinator's job state as plain data with synchronous methods; the gRPC layer locks it, calls one
//! method, and unlocks. Keeping the logic free of async and I/O makes it testable on its own.

use crate::summary::{EpochRecord, Summary};
use butler_common::config::JobConfig;
use butler_common::sampler::DistributedSampler;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

#[derive(Clone, Debug)]
struct Member {
    worker_id: String,
    last_seen: Instant,
    finished: bool,
    /// Units of work the rank has reported, and when that count last changed.
    progress: u64,
    progress_at: Instant,
}

/// One rank as `butler status` and `/metrics` show it.
#[derive(Clone, Debug)]
pub struct MemberView {
    pub rank: u32,
    pub worker: Option<String>,
    pub finished: bool,
    pub heartbeat_age: Option<f64>,
    pub progress_age: Option<f64>,
}

#[derive(Clone, Debug, Default)]
struct EpochAgg {
    loss_weighted: f64,
    samples: u64,
    seconds: f64,
    lr: f64,
    reports: u32,
    test_accuracy: Option<f64>,
    test_loss: Option<f64>,
    val_accuracy: Option<f64>,
    val_loss: Option<f64>,
}

/// What a rank reported when it finished successfully.
#[derive(Clone, Debug, Default)]
struct RankResult {
    test_accuracy: Option<f64>,
    test_loss: Option<f64>,
    checkpoint: String,
}

/// An error a worker must see, mapped to a gRPC status by the service layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    StaleGeneration {
        got: u64,
        current: u64,
    },
    BadRank {
        rank: u32,
        world: u32,
    },
    WorldFull {
        world: u32,
    },
    RankTaken {
        rank: u32,
        by: String,
    },
    JobFailed(String),
    /// A stage report that does not follow the job's stage plan.
    Stage(String),
    /// A request whose content is malformed (named in the message).
    Invalid(String),
}

/// What one rank published for the rendezvous; relayed to every rank as it came, never interpreted
/// beyond the check that only rank 0 carries an NCCL id.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RankEndpoint {
    /// The rank's TCP ring listener ("host:port").
    pub endpoint: Vec<u8>,
    /// "cpu" or "cuda".
    pub device: String,
    /// Whether the rank can load NCCL.
    pub nccl: bool,
    /// Rank 0's NCCL unique id, when it made one.
    pub nccl_id: Vec<u8>,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::StaleGeneration { got, current } => {
                write!(
                    f,
                    "generation {got} is stale (current generation is {current}); re-register"
                )
            }
            Refusal::BadRank { rank, world } => {
                write!(f, "rank {rank} is outside this job's world of {world}")
            }
            Refusal::WorldFull { world } => write!(f, "all {world} ranks of this job are taken"),
            Refusal::RankTaken { rank, by } => {
                write!(f, "rank {rank} is already held by worker {by:?}")
            }
            Refusal::JobFailed(why) => write!(f, "the job has failed: {why}"),
            Refusal::Stage(why) | Refusal::Invalid(why) => write!(f, "{why}"),
        }
    }
}

pub struct JobState {
    pub cfg: JobConfig,
    pub world_size: u32,
    pub generation: u64,
    pub train_len: u64,
    /// Samples in the unlabeled stream's split, when the job has one.
    pub unlabeled_len: Option<u64>,
    members: Vec<Option<Member>>,
    endpoints: Vec<Option<RankEndpoint>>,
    epochs: BTreeMap<u64, EpochAgg>,
    finished_ok: Vec<Option<RankResult>>,
    failure: Option<String>,
    started: Instant,
    /// Regroups so far (`cluster.max_restarts` bounds them).
    pub restarts: u32,
    /// After a regroup: when the world must be full again.
    rejoin_deadline: Option<Instant>,
    /// A regroup happened that the service has not yet written out (`metrics.jsonl`).
    regrouped: bool,
    /// The world size the job was started with (it may shrink to `cluster.min_workers` and grow back).
    pub max_world: u32,
    /// Workers waiting to join a shrunk job (admitted at the next step boundary).
    pub joining: u32,
    /// Pseudo-label rounds, when the job has them.
    pub rounds: Option<crate::rounds::Rounds>,
    /// Commit points of a job that checkpoints (plain, semi-supervised and distillation jobs).
    pub commits: Option<crate::commits::Commits>,
    /// Epochs recorded before this coordinator resumed the job (from `metrics.jsonl`).
    pub prior_history: Vec<EpochRecord>,
    stages: crate::stages::StagePlan,
}

impl JobState {
    pub fn new(cfg: JobConfig, world_size: u32, train_len: u64) -> Self {
        let n = world_size as usize;
        JobState {
            world_size,
            generation: 1,
            train_len,
            unlabeled_len: None,
            members: vec![None; n],
            endpoints: vec![None; n],
            epochs: BTreeMap::new(),
            finished_ok: vec![None; n],
            failure: None,
            started: Instant::now(),
            restarts: 0,
            rejoin_deadline: None,
            regrouped: false,
            max_world: cfg
                .cluster
                .max_workers
                .unwrap_or(world_size)
                .max(world_size),
            joining: 0,
            rounds: None,
            commits: None,
            prior_history: Vec::new(),
            stages: crate::stages::StagePlan::new(&cfg, world_size),
            cfg,
        }
    }

    pub fn failure(&self) -> Option<&str> {
        self.failure.as_deref()
    }

    /// Each rank of the current world: its worker, whether it finished, seconds since its last sign of
    /// life and since its progress count last changed (`None`: no worker holds the rank).
    pub fn members_view(&self) -> Vec<MemberView> {
        let now = Instant::now();
        self.members
            .iter()
            .enumerate()
            .map(|(rank, m)| MemberView {
                rank: rank as u32,
                worker: m.as_ref().map(|m| m.worker_id.clone()),
                finished: m.as_ref().is_some_and(|m| m.finished),
                heartbeat_age: m
                    .as_ref()
                    .map(|m| now.duration_since(m.last_seen).as_secs_f64()),
                progress_age: m
                    .as_ref()
                    .map(|m| now.duration_since(m.progress_at).as_secs_f64()),
            })
            .collect()
    }

    /// Seconds since the coordinator started.
    pub fn elapsed(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    /// The epochs recorded so far (the resumed part first; only epochs every rank has reported).
    pub fn history(&self) -> Vec<EpochRecord> {
        self.summary().history
    }

    /// Marks the job failed (first reason wins: later ones are consequences).
    pub fn fail(&mut self, why: String) {
        if self.failure.is_none() {
            tracing::error!(reason = %why, "job failed");
            self.failure = Some(why);
        }
    }

    /// Whether a lost worker can be survived by regrouping: a job that records commit points, with
    /// restarts left, not failed and not finished.
    pub fn can_regroup(&self) -> bool {
        // Pseudo-label rounds resume by hand (`--resume`); their phase reports are not regrouped.
        // Admitting a waiting worker is not a failure: it needs no restart left.
        self.failure.is_none()
            && self.commits.is_some()
            && self.rounds.is_none()
            && (self.restarts < self.cfg.cluster.max_restarts || self.joining > 0)
            && !self.finished_ok.iter().all(Option::is_some)
    }

    /// A worker asks to join a job running below its world size: true when it should wait for the
    /// next step boundary (the ranks are told through their heartbeats), false when it cannot join.
    pub fn wait_to_join(&mut self) -> bool {
        let open = self.failure.is_none()
            && self.cfg.cluster.min_workers.is_some()
            && self.world_size + self.joining < self.max_world
            && self.members.iter().all(Option::is_some)
            && !self.finished_ok.iter().any(Option::is_some);
        if open {
            self.joining += 1;
        }
        open
    }

    /// Survives a lost worker: a new generation in which every rank registers again (survivors and
    /// replacements alike) and resumes from the newest commit point. Records of the epochs at or after
    /// that commit are dropped (they are trained again; see [`JobState::take_regrouped`]).
    pub fn regroup(&mut self, why: &str) {
        if self.joining > 0 {
            // Growing back: the waiting workers take part in the new generation.
            self.world_size = (self.world_size + self.joining).min(self.max_world);
            self.joining = 0;
        } else {
            self.restarts += 1;
        }
        self.generation += 1;
        let n = self.world_size as usize;
        self.members = vec![None; n];
        self.endpoints = vec![None; n];
        self.finished_ok = vec![None; n];
        self.rejoin_deadline =
            Some(Instant::now() + Duration::from_millis(self.cfg.cluster.rejoin_timeout_ms));
        let from = match self.commits.as_mut() {
            Some(c) => {
                c.resume_from_newest(self.generation);
                c.resumed()
                    .map_or(0, crate::commits::Commit::first_epoch_redone)
            }
            None => 0,
        };
        // A staged job walks its plan again from the commit (inside pretraining).
        self.stages = crate::stages::StagePlan::new(&self.cfg, self.world_size);
        let mut kept: Vec<EpochRecord> = std::mem::take(&mut self.prior_history)
            .into_iter()
            .chain(self.epochs.iter().map(|(e, a)| Self::record(*e, a)))
            .filter(|r| r.epoch < from)
            .collect();
        kept.sort_by_key(|r| r.epoch);
        self.epochs.clear();
        self.prior_history = kept;
        self.regrouped = true;
        tracing::warn!(
            reason = %why,
            generation = self.generation,
            restart = self.restarts,
            max_restarts = self.cfg.cluster.max_restarts,
            resume_epoch = from,
            "regrouping: every rank registers again and resumes from the newest commit point"
        );
    }

    /// Elastic shrinking: past the rejoin deadline with fewer workers registered than the world but
    /// at least `cluster.min_workers`, the job goes on with those — a new generation whose world is
    /// their count; they register again and get dense ranks. Returns whether it shrank.
    pub fn try_shrink(&mut self) -> bool {
        let Some(deadline) = self.rejoin_deadline else {
            return false;
        };
        let registered = self.members.iter().filter(|m| m.is_some()).count() as u32;
        let min = self.cfg.cluster.min_workers.unwrap_or(self.world_size);
        if self.failure.is_some()
            || Instant::now() <= deadline
            || registered >= self.world_size
            || registered < min
            || registered == 0
        {
            return false;
        }
        let from = self.world_size;
        self.generation += 1;
        self.world_size = registered;
        let n = registered as usize;
        self.members = vec![None; n];
        self.endpoints = vec![None; n];
        self.finished_ok = vec![None; n];
        self.stages = crate::stages::StagePlan::new(&self.cfg, registered);
        self.rejoin_deadline =
            Some(Instant::now() + Duration::from_millis(self.cfg.cluster.rejoin_timeout_ms));
        if let Some(c) = self.commits.as_mut() {
            c.resume_from_newest(self.generation);
        }
        tracing::warn!(
            from,
            to = registered,
            generation = self.generation,
            "shrinking: no replacement within cluster.rejoin_timeout_ms; continuing with the workers left"
        );
        true
    }

    /// A regroup's rejoin deadline passed with ranks still missing (and the job could not shrink): the
    /// job fails rather than regrouping again.
    pub fn rejoin_expired(&self) -> bool {
        self.rejoin_deadline.is_some_and(|d| Instant::now() > d)
            && self.members.iter().any(Option::is_none)
    }

    /// After a regroup, once: the epoch records kept (`metrics.jsonl` must be rewritten to them).
    pub fn take_regrouped(&mut self) -> Option<Vec<EpochRecord>> {
        std::mem::take(&mut self.regrouped).then(|| self.prior_history.clone())
    }

    fn check(&self, rank: u32, generation: u64) -> Result<(), Refusal> {
        if let Some(f) = &self.failure {
            return Err(Refusal::JobFailed(f.clone()));
        }
        if generation != self.generation {
            return Err(Refusal::StaleGeneration {
                got: generation,
                current: self.generation,
            });
        }
        if rank >= self.world_size {
            return Err(Refusal::BadRank {
                rank,
                world: self.world_size,
            });
        }
        Ok(())
    }

    /// Admits a worker: the requested rank if free, else the lowest free one.
    pub fn register(&mut self, worker_id: &str, requested: Option<u32>) -> Result<u32, Refusal> {
        if let Some(f) = &self.failure {
            return Err(Refusal::JobFailed(f.clone()));
        }
        let rank = match requested {
            // After the job shrank, a worker asks for its old rank: it takes the lowest free one.
            Some(r) if r >= self.world_size && self.cfg.cluster.min_workers.is_some() => {
                self.members
                    .iter()
                    .position(Option::is_none)
                    .ok_or(Refusal::WorldFull {
                        world: self.world_size,
                    })? as u32
            }
            Some(r) if r >= self.world_size => {
                return Err(Refusal::BadRank {
                    rank: r,
                    world: self.world_size,
                })
            }
            Some(r) => match &self.members[r as usize] {
                // Elastic jobs renumber: a worker whose old rank a newcomer took takes a free one.
                Some(_) if self.cfg.cluster.min_workers.is_some() => self
                    .members
                    .iter()
                    .position(Option::is_none)
                    .ok_or(Refusal::WorldFull {
                        world: self.world_size,
                    })? as u32,
                Some(m) => {
                    return Err(Refusal::RankTaken {
                        rank: r,
                        by: m.worker_id.clone(),
                    })
                }
                None => r,
            },
            None => self
                .members
                .iter()
                .position(Option::is_none)
                .ok_or(Refusal::WorldFull {
                    world: self.world_size,
                })? as u32,
        };
        self.members[rank as usize] = Some(Member {
            worker_id: worker_id.to_string(),
            last_seen: Instant::now(),
            finished: false,
            progress: 0,
            progress_at: Instant::now(),
        });
        Ok(rank)
    }

    /// Records what a rank published for the rendezvous.
    pub fn publish_endpoint(
        &mut self,
        rank: u32,
        generation: u64,
        endpoint: RankEndpoint,
    ) -> Result<(), Refusal> {
        self.check(rank, generation)?;
        if rank != 0 && !endpoint.nccl_id.is_empty() {
            return Err(Refusal::Invalid(format!(
                "rank {rank} published an NCCL id; only rank 0 creates it"
            )));
        }
        self.endpoints[rank as usize] = Some(endpoint);
        self.touch(rank);
        Ok(())
    }

    /// Every rank's rendezvous record, once all have published.
    pub fn endpoints(&self) -> Option<Vec<RankEndpoint>> {
        self.endpoints.iter().cloned().collect()
    }

    pub fn missing_endpoints(&self) -> Vec<u32> {
        (0..self.world_size)
            .filter(|&r| self.endpoints[r as usize].is_none())
            .collect()
    }

    pub fn assignment(
        &mut self,
        rank: u32,
        generation: u64,
        epoch: u64,
    ) -> Result<Option<DistributedSampler>, Refusal> {
        self.check(rank, generation)?;
        self.touch(rank);
        // With pseudo-label rounds the labeled epochs of round r are numbered r·E .. (r+1)·E.
        let rounds = self
            .cfg
            .pseudo_label
            .as_ref()
            .map_or(1, |p| p.rounds as u64);
        // A staged job's distillation stage trains the labeled epochs after fine-tuning's.
        let distill = (self.cfg.pretrain.as_ref())
            .and_then(|p| p.distill.as_ref())
            .map_or(0, |d| {
                d.epochs_for(
                    self.train_len
                        .div_ceil(self.cfg.train.batch_size.max(1) as u64),
                )
            });
        if epoch >= self.cfg.train.epochs * rounds + distill {
            return Ok(None);
        }
        Ok(Some(DistributedSampler {
            dataset_len: self.train_len,
            seed: self.cfg.job.seed,
            epoch,
            shuffle: self.cfg.train.shuffle,
            world_size: self.world_size,
            rank,
            // A staged job's commits belong to pretraining; its labeled epochs start afresh.
            start: self
                .resumed()
                .filter(|c| c.stage == 0 && c.epoch == epoch)
                .map_or(0, |c| c.labeled_start),
        }))
    }

    /// The commit point this job resumed from.
    pub fn resumed(&self) -> Option<&crate::commits::Commit> {
        self.commits.as_ref().and_then(|c| c.resumed())
    }

    /// Where the unlabeled stream starts: (epoch, steps taken in it) — the resumed commit's cursor, or
    /// the beginning.
    pub fn unlabeled_cursor(&self, rank: u32) -> (u64, u64) {
        // With pseudo-label rounds each TRAIN phase opens its stream afresh; the commit's cursor
        // belongs to its own round's TRAIN only.
        let current_train = self.rounds.as_ref().map(|r| r.current());
        self.resumed()
            .filter(|c| match current_train {
                Some((round, phase)) => phase == crate::rounds::Phase::Train && c.round == round,
                None => true,
            })
            // A staged job's commits belong to pretraining: the distillation stage, which opens the
            // stream afresh after it, starts at the stream's beginning.
            .filter(|c| c.stage == 0 || c.stage == self.stages.current(rank) as u32)
            .and_then(|c| c.unlabeled)
            .map_or((0, 0), |[e, s]| (e, s))
    }

    /// Rank 0 committed a checkpoint.
    pub fn commit(
        &mut self,
        rank: u32,
        generation: u64,
        c: crate::commits::Commit,
    ) -> Result<(), Refusal> {
        self.check(rank, generation)?;
        self.touch(rank);
        if rank != 0 {
            return Err(Refusal::Invalid(format!(
                "rank {rank} sent a commit; only rank 0 writes checkpoints"
            )));
        }
        let log = self.commits.as_mut().ok_or_else(|| {
            Refusal::Invalid("this job kind does not record commit points".into())
        })?;
        log.record(c).map_err(Refusal::Invalid)
    }

    /// The unlabeled stream's assignment: a sharded order (`common::assign`) the worker
    /// computes from (seed, epoch, world size), starting at its beginning. The stream has no end of its
    /// own — its epochs run on while the labeled stream sets the job's length.
    pub fn unlabeled_assignment(
        &mut self,
        rank: u32,
        generation: u64,
    ) -> Result<Option<(String, u64)>, Refusal> {
        self.check(rank, generation)?;
        self.touch(rank);
        Ok(self
            .cfg
            .data
            .unlabeled_split
            .clone()
            .zip(self.unlabeled_len))
    }

    fn touch(&mut self, rank: u32) {
        if let Some(Some(m)) = self.members.get_mut(rank as usize) {
            m.last_seen = Instant::now();
        }
    }

    /// A rank finished a stage (or starts: `None`); returns its next stage.
    pub fn next_stage(
        &mut self,
        rank: u32,
        generation: u64,
        finished: Option<butler_proto::StageResult>,
    ) -> Result<butler_proto::Stage, Refusal> {
        self.check(rank, generation)?;
        self.touch(rank);
        self.stages.next(rank, finished).map_err(Refusal::Stage)
    }

    /// A sign of life from `rank` that carries no progress count (a phase poll).
    pub fn alive(&mut self, rank: u32, generation: u64) -> Result<(), Refusal> {
        self.check(rank, generation)?;
        self.touch(rank);
        Ok(())
    }

    /// Heartbeat: returns the failure reason if workers should stop. `progress` is the rank's count of
    /// completed units of work.
    pub fn heartbeat(&mut self, rank: u32, generation: u64, progress: u64) -> Result<(), Refusal> {
        self.check(rank, generation)?;
        self.touch(rank);
        if let Some(Some(m)) = self.members.get_mut(rank as usize) {
            if progress != m.progress {
                m.progress = progress;
                m.progress_at = Instant::now();
            }
        }
        Ok(())
    }

    /// Adds one rank's epoch report; returns the epoch's record once every rank has reported.
    #[allow(clippy::too_many_arguments)]
    pub fn report(
        &mut self,
        rank: u32,
        generation: u64,
        epoch: u64,
        loss: f64,
        samples: u64,
        seconds: f64,
        lr: f64,
        test: (Option<f64>, Option<f64>),
        val: (Option<f64>, Option<f64>),
    ) -> Result<Option<EpochRecord>, Refusal> {
        self.check(rank, generation)?;
        self.touch(rank);
        let agg = self.epochs.entry(epoch).or_default();
        agg.loss_weighted += loss * samples as f64;
        agg.samples += samples;
        agg.seconds = agg.seconds.max(seconds);
        agg.lr = lr;
        agg.reports += 1;
        if test.0.is_some() {
            agg.test_accuracy = test.0;
            agg.test_loss = test.1;
        }
        if val.0.is_some() {
            agg.val_accuracy = val.0;
            agg.val_loss = val.1;
        }
        if agg.reports == self.world_size {
            return Ok(Some(Self::record(epoch, agg)));
        }
        Ok(None)
    }

    fn record(epoch: u64, a: &EpochAgg) -> EpochRecord {
        EpochRecord {
            epoch,
            train_loss: if a.samples > 0 {
                a.loss_weighted / a.samples as f64
            } else {
                0.0
            },
            train_samples: a.samples,
            train_seconds: a.seconds,
            learning_rate: a.lr,
            test_accuracy: a.test_accuracy,
            test_loss: a.test_loss,
            val_accuracy: a.val_accuracy,
            val_loss: a.val_loss,
        }
    }

    /// A rank finished. Returns true when every rank has finished successfully.
    #[allow(clippy::too_many_arguments)]
    pub fn finish(
        &mut self,
        rank: u32,
        generation: u64,
        ok: bool,
        error: &str,
        retryable: bool,
        test: (Option<f64>, Option<f64>),
        checkpoint: String,
    ) -> Result<bool, Refusal> {
        if generation != self.generation || rank >= self.world_size {
            self.check(rank, generation)?;
        }
        if let Some(Some(m)) = self.members.get_mut(rank as usize) {
            m.finished = true;
        }
        if !ok {
            let why = format!("rank {rank} failed: {error}");
            if retryable && self.can_regroup() {
                self.regroup(&why);
            } else {
                self.fail(why);
            }
            return Ok(false);
        }
        self.finished_ok[rank as usize] = Some(RankResult {
            test_accuracy: test.0,
            test_loss: test.1,
            checkpoint,
        });
        Ok(self.failure.is_none() && self.finished_ok.iter().all(Option::is_some))
    }

    /// Ranks that registered but have been silent longer than `timeout`, and ranks that never registered
    /// within `join_timeout` of the start.
    pub fn overdue(&self, timeout: Duration, join_timeout: Duration) -> Option<String> {
        let now = Instant::now();
        for (rank, m) in self.members.iter().enumerate() {
            match m {
                Some(m) if !m.finished && now.duration_since(m.last_seen) > timeout => {
                    return Some(format!(
                        "rank {rank} (worker {:?}) sent no heartbeat for {:.1}s (timeout {:.1}s); it is presumed dead",
                        m.worker_id,
                        now.duration_since(m.last_seen).as_secs_f64(),
                        timeout.as_secs_f64()
                    ));
                }
                None => {
                    let late = match self.rejoin_deadline {
                        Some(d) => now > d,
                        None => now.duration_since(self.started) > join_timeout,
                    };
                    if late {
                        return Some(match self.rejoin_deadline {
                            Some(_) => format!(
                                "rank {rank} did not register again within {:.0}s of regroup {} \
                                 (cluster.rejoin_timeout_ms); the last commit point is intact, resume \
                                 with --resume",
                                self.cfg.cluster.rejoin_timeout_ms as f64 / 1000.0,
                                self.restarts
                            ),
                            None => format!(
                                "rank {rank} never registered within {:.0}s",
                                join_timeout.as_secs_f64()
                            ),
                        });
                    }
                }
                _ => {}
            }
        }
        None
    }

    /// A job whose ranks still beat but have completed no unit of work for `stall`: returns the failure
    /// naming the ranks furthest behind (in a synchronous job the others are waiting for them, in a
    /// collective they have not entered). `stall` zero disables the check.
    pub fn stalled(&self, stall: Duration) -> Option<String> {
        if stall.is_zero() {
            return None;
        }
        let now = Instant::now();
        let live: Vec<(usize, &Member)> = self
            .members
            .iter()
            .enumerate()
            .filter_map(|(r, m)| m.as_ref().filter(|m| !m.finished).map(|m| (r, m)))
            .collect();
        let stuck = live
            .iter()
            .any(|(_, m)| now.duration_since(m.progress_at) > stall);
        if !stuck {
            return None;
        }
        let behind = live.iter().map(|(_, m)| m.progress).min()?;
        let ranks: Vec<usize> = live
            .iter()
            .filter(|(_, m)| m.progress == behind)
            .map(|(r, _)| *r)
            .collect();
        let ahead = live.iter().map(|(_, m)| m.progress).max().unwrap_or(behind);
        let (names, verb) = if ranks.len() == 1 {
            (format!("rank {}", ranks[0]), "is")
        } else {
            (format!("ranks {ranks:?}"), "are")
        };
        let detail = if behind < ahead {
            format!(
                "progress count {behind} while others reached {ahead}: the others wait in a collective \
                 that {names} never entered"
            )
        } else {
            format!(
                "every live rank at progress count {behind}: stuck together, e.g. in a collective"
            )
        };
        Some(format!(
            "{names} {verb} alive but made no progress for over {:.0}s (stall timeout; {detail}): a hung \
             device, a deadlock or a stuck read?",
            stall.as_secs_f64()
        ))
    }

    pub fn all_finished(&self) -> bool {
        self.members
            .iter()
            .all(|m| m.as_ref().is_some_and(|m| m.finished))
    }

    pub fn summary(&self) -> Summary {
        let history: Vec<EpochRecord> = self
            .prior_history
            .iter()
            .cloned()
            .chain(self.epochs.iter().map(|(e, a)| Self::record(*e, a)))
            .collect();
        let samples: u64 = history.iter().map(|h| h.train_samples).sum();
        let seconds: f64 = history.iter().map(|h| h.train_seconds).sum();
        let RankResult {
            test_accuracy: acc,
            test_loss: loss,
            checkpoint: ckpt,
        } = self
            .finished_ok
            .first()
            .cloned()
            .flatten()
            .unwrap_or_default();
        Summary {
            rounds: self.rounds.as_ref().map(|r| r.records()),
            job: self.cfg.job.name.clone(),
            test_accuracy: acc
                .or_else(|| history.iter().rev().find_map(|h| h.test_accuracy))
                .unwrap_or(0.0),
            test_loss: loss,
            val_accuracy: history.iter().rev().find_map(|h| h.val_accuracy),
            world_size: self.world_size,
            generation: self.generation,
            epochs: self.cfg.train.epochs,
            samples_per_second: if seconds > 0.0 {
                samples as f64 / seconds
            } else {
                0.0
            },
            wall_seconds: self.started.elapsed().as_secs_f64(),
            checkpoint: ckpt,
            history,
            stages: self.stages.records(self.world_size),
            late_ranks: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn cfg() -> JobConfig {
        JobConfig::from_toml(
            "[job]\nname='t'\n[data]\nmanifest='x'\n[model]\nkind='mlp'\nhidden=[4]\n[optim]\nkind='sgd'\nlr=0.1\n[train]\nepochs=2\nbatch_size=4\n",
            Path::new("t.toml"),
        )
        .unwrap()
    }

    #[test]
    fn registration_assigns_ranks_and_refuses_a_full_world() {
        let mut s = JobState::new(cfg(), 2, 10);
        assert_eq!(s.register("a", Some(1)), Ok(1));
        assert!(matches!(
            s.register("b", Some(1)),
            Err(Refusal::RankTaken { rank: 1, .. })
        ));
        assert_eq!(s.register("b", None), Ok(0));
        assert_eq!(s.register("c", None), Err(Refusal::WorldFull { world: 2 }));
    }

    #[test]
    fn stale_generation_is_refused() {
        let mut s = JobState::new(cfg(), 1, 10);
        s.register("a", None).unwrap();
        assert_eq!(
            s.heartbeat(0, 7, 0),
            Err(Refusal::StaleGeneration { got: 7, current: 1 })
        );
        assert!(s.assignment(0, 1, 0).unwrap().is_some());
        assert!(
            s.assignment(0, 1, 2).unwrap().is_none(),
            "epochs = 2 ends the job"
        );
    }

    #[test]
    fn epoch_record_waits_for_every_rank_and_weights_losses() {
        let mut s = JobState::new(cfg(), 2, 10);
        s.register("a", None).unwrap();
        s.register("b", None).unwrap();
        assert_eq!(
            s.report(
                0,
                1,
                0,
                1.0,
                10,
                2.0,
                0.1,
                (Some(0.5), Some(1.0)),
                (None, None)
            )
            .unwrap(),
            None
        );
        let r = s
            .report(1, 1, 0, 3.0, 30, 3.0, 0.1, (None, None), (None, None))
            .unwrap()
            .unwrap();
        assert_eq!(r.train_samples, 40);
        assert!((r.train_loss - 2.5).abs() < 1e-12);
        assert_eq!(r.train_seconds, 3.0);
        assert_eq!(r.test_accuracy, Some(0.5));
    }

    #[test]
    fn failure_of_one_rank_fails_the_job() {
        let mut s = JobState::new(cfg(), 2, 10);
        s.register("a", None).unwrap();
        s.register("b", None).unwrap();
        assert_eq!(
            s.finish(
                1,
                1,
                false,
                "collective: peer rank 0 closed",
                true,
                (None, None),
                String::new()
            ),
            Ok(false)
        );
        assert!(s.failure().unwrap().contains("rank 1 failed"));
        assert!(matches!(s.heartbeat(0, 1, 0), Err(Refusal::JobFailed(_))));
    }

    #[test]
    fn a_lost_rank_regroups_under_a_new_generation_until_restarts_run_out() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = cfg();
        c.cluster.max_restarts = 1;
        let mut s = JobState::new(c, 2, 10);
        s.commits = Some(
            crate::commits::Commits::open(dir.path(), "t", "fp", 2, 2, false, true, false).unwrap(),
        );
        s.register("a", None).unwrap();
        s.register("b", None).unwrap();
        s.report(0, 1, 0, 1.0, 5, 1.0, 0.1, (None, None), (None, None))
            .unwrap();
        s.report(1, 1, 0, 1.0, 5, 1.0, 0.1, (None, None), (None, None))
            .unwrap();
        // Rank 1's collective failed: a transient failure, so the job regroups.
        s.finish(
            1,
            1,
            false,
            "peer rank 0 closed",
            true,
            (None, None),
            String::new(),
        )
        .unwrap();
        assert!(s.failure().is_none());
        assert_eq!(s.generation, 2);
        // No commit yet: the job restarts from the beginning and forgets epoch 0's record.
        assert_eq!(s.take_regrouped(), Some(vec![]));
        assert!(s.take_regrouped().is_none());
        // The old generation is refused; heartbeats of it learn about the regroup.
        assert!(matches!(
            s.heartbeat(0, 1, 0),
            Err(Refusal::StaleGeneration { got: 1, current: 2 })
        ));
        // Both ranks register again, with their ranks.
        assert_eq!(s.register("a", Some(0)), Ok(0));
        assert_eq!(s.register("b2", Some(1)), Ok(1));
        // A second loss exceeds max_restarts = 1: the job fails.
        s.finish(
            0,
            2,
            false,
            "peer rank 1 closed",
            true,
            (None, None),
            String::new(),
        )
        .unwrap();
        assert!(s.failure().unwrap().contains("rank 0 failed"));
    }

    #[test]
    fn a_permanent_failure_never_regroups() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = cfg();
        c.cluster.max_restarts = 3;
        let mut s = JobState::new(c, 1, 10);
        s.commits = Some(
            crate::commits::Commits::open(dir.path(), "t", "fp", 1, 2, false, true, false).unwrap(),
        );
        s.register("a", None).unwrap();
        s.finish(
            0,
            1,
            false,
            "shard corrupt",
            false,
            (None, None),
            String::new(),
        )
        .unwrap();
        assert!(s.failure().is_some());
    }

    #[test]
    fn silent_rank_is_overdue() {
        let mut s = JobState::new(cfg(), 1, 10);
        s.register("a", None).unwrap();
        assert!(s
            .overdue(Duration::from_secs(60), Duration::from_secs(60))
            .is_none());
        std::thread::sleep(Duration::from_millis(20));
        assert!(s
            .overdue(Duration::from_millis(5), Duration::from_secs(60))
            .unwrap()
            .contains("rank 0"));
    }

    #[test]
    fn a_rank_that_beats_but_does_not_advance_is_named_as_stalled() {
        let mut s = JobState::new(cfg(), 3, 10);
        for w in ["a", "b", "c"] {
            s.register(w, None).unwrap();
        }
        let stall = Duration::from_millis(30);
        assert!(s.stalled(stall).is_none());
        // Ranks 0 and 2 completed 5 units of work and wait (in a collective) for rank 1, stuck at 4.
        for _ in 0..3 {
            for (rank, p) in [(0, 5), (1, 4), (2, 5)] {
                s.heartbeat(rank, 1, p).unwrap();
            }
            std::thread::sleep(Duration::from_millis(15));
        }
        std::thread::sleep(Duration::from_millis(20));
        let why = s
            .stalled(stall)
            .expect("no work for longer than the stall timeout");
        assert!(
            why.starts_with("rank 1 is alive but made no progress"),
            "{why}"
        );
        assert!(why.contains("count 4 while others reached 5"), "{why}");
        // Progress restarts the clock; zero disables the check.
        for (rank, p) in [(0, 6), (1, 5), (2, 6)] {
            s.heartbeat(rank, 1, p).unwrap();
        }
        assert!(s.stalled(stall).is_none());
        assert!(s.stalled(Duration::ZERO).is_none());
    }
}
