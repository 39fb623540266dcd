//! The coordinator's Prometheus metrics (OpenMetrics text, the official `prometheus-client` crate) and
//! the small HTTP server that serves them at `/metrics` on their own port (`--metrics-listen`): plain
//! HTTP without the job token, the usual pattern for scrape endpoints. GPU counters are DCGM
//! exporter's; `butler_rank_info{rank,host,gpu}` joins them to ranks.

use crate::observe::RankWindow;
use crate::state::MemberView;
use crate::summary::EpochRecord;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::collections::BTreeMap;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

type G = Gauge<f64, AtomicU64>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RankLabel {
    rank: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RankPhase {
    rank: String,
    phase: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RankInfo {
    rank: String,
    host: String,
    gpu: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SplitLabel {
    split: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TagLabel {
    tag: String,
}

/// Every series butler exports; cheap to clone (the registry holds the same handles).
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    generation: G,
    world_size: G,
    ranks: Family<StateLabel, G>,
    epoch: G,
    global_step: G,
    samples: Counter<f64, AtomicU64>,
    loss: G,
    lr: G,
    accuracy: Family<SplitLabel, G>,
    last_progress: G,
    step_scalar: Family<TagLabel, G>,
    phase_seconds: Family<RankPhase, G>,
    lateness: Family<RankLabel, G>,
    late_rank: G,
    heartbeat_age: Family<RankLabel, G>,
    rank_info: Family<RankInfo, G>,
    checkpoints: Counter,
    checkpoint_last: G,
    checkpoint_bytes: G,
    restarts: Family<ReasonLabel, Counter>,
}

/// Seconds since the Unix epoch (Prometheus timestamps, TensorBoard wall times).
pub(crate) fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut r = Registry::with_prefix("butler");
        let m = Metrics {
            registry: Arc::new(Registry::default()),
            generation: G::default(),
            world_size: G::default(),
            ranks: Family::default(),
            epoch: G::default(),
            global_step: G::default(),
            samples: Counter::default(),
            loss: G::default(),
            lr: G::default(),
            accuracy: Family::default(),
            last_progress: G::default(),
            step_scalar: Family::default(),
            phase_seconds: Family::default(),
            lateness: Family::default(),
            late_rank: G::default(),
            heartbeat_age: Family::default(),
            rank_info: Family::default(),
            checkpoints: Counter::default(),
            checkpoint_last: G::default(),
            checkpoint_bytes: G::default(),
            restarts: Family::default(),
        };
        r.register(
            "generation",
            "Membership generation of the job",
            m.generation.clone(),
        );
        r.register(
            "world_size",
            "Ranks in the current generation",
            m.world_size.clone(),
        );
        r.register(
            "ranks",
            "Ranks by state (running, finished, missing)",
            m.ranks.clone(),
        );
        r.register("epoch", "Latest finished epoch", m.epoch.clone());
        r.register(
            "global_step",
            "Optimizer steps taken",
            m.global_step.clone(),
        );
        r.register(
            "train_samples",
            "Training samples processed by all ranks",
            m.samples.clone(),
        );
        r.register(
            "train_loss",
            "Latest training loss (global mean)",
            m.loss.clone(),
        );
        r.register("learning_rate", "Current learning rate", m.lr.clone());
        r.register(
            "eval_accuracy",
            "Latest evaluation accuracy by split",
            m.accuracy.clone(),
        );
        r.register(
            "last_progress_timestamp_seconds",
            "Unix time of the latest step or epoch report",
            m.last_progress.clone(),
        );
        r.register(
            "step_scalar",
            "Latest per-step scalars (losses by part, method signals) by TensorBoard tag",
            m.step_scalar.clone(),
        );
        r.register(
            "step_phase_seconds",
            "Per rank, mean seconds per step in each phase over the latest window",
            m.phase_seconds.clone(),
        );
        r.register(
            "rank_lateness_seconds",
            "Per rank, arrival at the gradient all-reduce minus the median rank's, per step",
            m.lateness.clone(),
        );
        r.register(
            "late_rank",
            "The rank named late (-1: none)",
            m.late_rank.clone(),
        );
        r.register(
            "heartbeat_age_seconds",
            "Per rank, seconds since its last heartbeat",
            m.heartbeat_age.clone(),
        );
        r.register(
            "rank_info",
            "Where each rank runs (join with GPU exporters)",
            m.rank_info.clone(),
        );
        r.register(
            "checkpoints",
            "Commit points recorded",
            m.checkpoints.clone(),
        );
        r.register(
            "checkpoint_last_success_timestamp_seconds",
            "Unix time of the latest commit point",
            m.checkpoint_last.clone(),
        );
        r.register(
            "checkpoint_bytes",
            "Size of the latest checkpoint",
            m.checkpoint_bytes.clone(),
        );
        r.register(
            "restarts",
            "Regroups and resumes by reason",
            m.restarts.clone(),
        );
        m.late_rank.set(-1.0);
        Metrics {
            registry: Arc::new(r),
            ..m
        }
    }

    /// The exposition text, ending in `# EOF`.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }

    /// Membership as the job state sees it now.
    pub fn membership(&self, generation: u64, world: u32, members: &[MemberView]) {
        self.generation.set(generation as f64);
        self.world_size.set(world as f64);
        let mut by_state: BTreeMap<&str, f64> =
            [("running", 0.0), ("finished", 0.0), ("missing", 0.0)].into();
        for m in members {
            let s = match (&m.worker, m.finished) {
                (None, _) => "missing",
                (Some(_), true) => "finished",
                (Some(_), false) => "running",
            };
            *by_state.entry(s).or_default() += 1.0;
            if let Some(age) = m.heartbeat_age {
                self.heartbeat_age
                    .get_or_create(&RankLabel {
                        rank: m.rank.to_string(),
                    })
                    .set(age);
            }
        }
        for (state, n) in by_state {
            self.ranks
                .get_or_create(&StateLabel {
                    state: state.into(),
                })
                .set(n);
        }
    }

    pub fn rank_info(&self, rank: u32, host: &str, gpu: &str) {
        self.rank_info
            .get_or_create(&RankInfo {
                rank: rank.to_string(),
                host: host.into(),
                gpu: gpu.into(),
            })
            .set(1.0);
    }

    /// A regroup: per-rank series of the old world go.
    pub fn clear_ranks(&self) {
        self.phase_seconds.clear();
        self.lateness.clear();
        self.heartbeat_age.clear();
        self.rank_info.clear();
    }

    pub fn samples(&self, n: f64) {
        self.samples.inc_by(n);
    }

    pub fn late_rank(&self, rank: Option<u32>) {
        self.late_rank.set(rank.map_or(-1.0, f64::from));
    }

    pub fn step(
        &self,
        step: u64,
        epoch: u64,
        scalars: &BTreeMap<String, f64>,
        windows: &[RankWindow],
    ) {
        self.global_step.set(step as f64);
        self.epoch.set(epoch as f64);
        self.last_progress.set(unix_now());
        for (tag, v) in scalars {
            self.step_scalar
                .get_or_create(&TagLabel { tag: tag.clone() })
                .set(*v);
        }
        if let Some(l) = scalars.get("train/loss") {
            self.loss.set(*l);
        }
        if let Some(lr) = scalars.get("train/lr") {
            self.lr.set(*lr);
        }
        for w in windows {
            let rank = w.rank.to_string();
            for (phase, v) in [
                ("data", w.data_seconds),
                ("compute", w.compute_seconds),
                ("comm", w.comm_seconds),
                ("optimizer", w.optim_seconds),
            ] {
                self.phase_seconds
                    .get_or_create(&RankPhase {
                        rank: rank.clone(),
                        phase: phase.into(),
                    })
                    .set(v);
            }
            self.lateness
                .get_or_create(&RankLabel { rank })
                .set(w.lateness_seconds);
        }
    }

    pub fn epoch(&self, rec: &EpochRecord, step: u64) {
        self.epoch.set(rec.epoch as f64);
        self.global_step.set(step as f64);
        self.loss.set(rec.train_loss);
        self.lr.set(rec.learning_rate);
        self.last_progress.set(unix_now());
        for (split, v) in [("test", rec.test_accuracy), ("val", rec.val_accuracy)] {
            if let Some(v) = v {
                self.accuracy
                    .get_or_create(&SplitLabel {
                        split: split.into(),
                    })
                    .set(v);
            }
        }
    }

    pub fn checkpoint(&self, bytes: u64) {
        self.checkpoints.inc();
        self.checkpoint_last.set(unix_now());
        self.checkpoint_bytes.set(bytes as f64);
    }

    pub fn restart(&self, reason: &str) {
        self.restarts
            .get_or_create(&ReasonLabel {
                reason: reason.into(),
            })
            .inc();
    }
}

/// Serves `GET /metrics` (anything else: 404) until the task is dropped. `render` is called per scrape.
pub async fn serve(
    listener: tokio::net::TcpListener,
    render: Arc<dyn Fn() -> String + Send + Sync>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    loop {
        let Ok((mut sock, _)) = listener.accept().await else {
            continue;
        };
        let render = render.clone();
        tokio::spawn(async move {
            let mut buf = Vec::with_capacity(1024);
            let mut chunk = [0u8; 1024];
            // The request head only; a scrape has no body. Give up on slow or oversized requests.
            let head = tokio::time::timeout(std::time::Duration::from_secs(5), async {
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 16 * 1024 {
                    match sock.read(&mut chunk).await {
                        Ok(0) | Err(_) => return false,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                true
            })
            .await;
            if !matches!(head, Ok(true)) {
                return;
            }
            let line = String::from_utf8_lossy(&buf);
            let path = line.split_whitespace().nth(1).unwrap_or("");
            let ok =
                line.starts_with("GET ") && (path == "/metrics" || path.starts_with("/metrics?"));
            let (status, ctype, body) = if ok {
                (
                    "200 OK",
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    render(),
                )
            } else {
                ("404 Not Found", "text/plain", "only /metrics here\n".into())
            };
            let resp = format!(
                "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = sock.write_all(resp.as_bytes()).await;
            let _ = sock.shutdown().await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exposition_names_every_family_and_ends_in_eof() {
        let m = Metrics::new();
        m.rank_info(0, "10.0.0.1", "cuda:0");
        m.step(
            100,
            2,
            &[("train/loss".to_string(), 0.5)].into(),
            &[RankWindow {
                rank: 0,
                steps: 10,
                data_seconds: 0.001,
                ..RankWindow::default()
            }],
        );
        m.restart("regroup");
        let text = m.encode();
        for needle in [
            "butler_global_step 100.0",
            "butler_train_loss 0.5",
            "butler_rank_info{rank=\"0\",host=\"10.0.0.1\",gpu=\"cuda:0\"} 1.0",
            "butler_step_phase_seconds{rank=\"0\",phase=\"data\"} 0.001",
            "butler_restarts_total{reason=\"regroup\"} 1",
            "butler_late_rank -1.0",
        ] {
            assert!(text.contains(needle), "{needle} missing from:\n{text}");
        }
        assert!(text.ends_with("# EOF\n"));
    }
}
