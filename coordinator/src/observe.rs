//! What the coordinator sees of a running job beyond membership: per-rank step timing from the
//! heartbeats, the late rank, per-step scalars from rank 0, and where they go — `<run>/steps.jsonl`,
//! `<run>/events.jsonl`, TensorBoard event files under `<run>/tb/` and the Prometheus registry.
//!
//! The late-rank rule: in synchronous data parallelism every rank's step takes as long as the slowest
//! rank's, so step time names no one. What differs is the *arrival* at the gradient all-reduce — data
//! wait plus compute per step — and the late rank is the one that arrives last (it waits least in comm).
//! Per window between two step reports, a rank whose arrival exceeds the median rank's by more than
//! `metrics.late_fraction` of the median step time, in `metrics.late_windows` consecutive windows, is
//! named, together with the phase (data or compute) that makes it late.

use crate::metrics::Metrics;
use crate::summary::EpochRecord;
use crate::tb::EventWriter;
use butler_common::config::MetricsConfig;
use butler_proto::StepTiming;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tracing::{info, warn};

/// A rank named late.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LateRank {
    pub rank: u32,
    /// "data" or "compute": the part of its arrival that exceeds the median rank's most.
    pub phase: String,
    /// Its arrival minus the median rank's, per step, in the window it was named.
    pub lateness_seconds: f64,
    /// The median rank's whole step time in that window.
    pub median_step_seconds: f64,
    /// The global step it was named at.
    pub step: u64,
}

/// One rank's means per step over a window (between two step reports).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RankWindow {
    pub rank: u32,
    pub steps: u64,
    pub data_seconds: f64,
    pub compute_seconds: f64,
    pub comm_seconds: f64,
    pub optim_seconds: f64,
    pub samples_per_second: f64,
    pub lateness_seconds: f64,
}

impl RankWindow {
    fn arrival(&self) -> f64 {
        self.data_seconds + self.compute_seconds
    }

    fn step_seconds(&self) -> f64 {
        self.data_seconds + self.compute_seconds + self.comm_seconds + self.optim_seconds
    }
}

/// One line of `steps.jsonl`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StepLine {
    pub step: u64,
    pub epoch: u64,
    pub generation: u64,
    pub wall_seconds: f64,
    pub scalars: BTreeMap<String, f64>,
    pub ranks: Vec<RankWindow>,
}

/// One line of `events.jsonl`: membership changes, restarts, rounds and stages, late ranks, stalls.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EventLine {
    pub wall_seconds: f64,
    pub step: u64,
    pub epoch: u64,
    pub generation: u64,
    pub kind: String,
    pub detail: String,
}

#[derive(Clone, Debug, Default)]
struct RankObs {
    host: String,
    device: String,
    total: StepTiming,
    /// `total` when the last window closed.
    at_window: StepTiming,
    phase: String,
    collectives: u64,
    window: Option<RankWindow>,
    late_streak: u32,
}

pub struct Observer {
    cfg: MetricsConfig,
    run_dir: PathBuf,
    started: Instant,
    tb: Option<EventWriter>,
    ranks: BTreeMap<u32, RankObs>,
    /// The rank named late now, if any.
    flagged: Option<u32>,
    /// Every naming, for `summary.json`.
    pub late_history: Vec<LateRank>,
    pub step: u64,
    pub epoch: u64,
    pub generation: u64,
    /// The last step report's scalars and per-rank windows (`butler status`).
    pub last: Option<StepLine>,
    pub metrics: Metrics,
}

/// Appends `line` to a JSON-lines file (`metrics.jsonl`, `steps.jsonl`, `events.jsonl`); a failure only
/// warns — the job's result is `summary.json`.
pub(crate) fn append_line(path: &Path, line: &str) {
    let r = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .and_then(|mut f| f.write_all(line.as_bytes()));
    if let Err(e) = r {
        warn!(file = %path.display(), error = %e, "cannot append");
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// One phase's seconds of a window.
type PhaseOf = fn(&RankWindow) -> f64;

/// Per-rank TensorBoard tags only for worlds up to this size (beyond it: median and max).
const PER_RANK_TAGS: usize = 16;

impl Observer {
    /// An observer for a job whose run directory is `run_dir`; `tensorboard` opens `<run>/tb/`.
    pub fn new(cfg: &MetricsConfig, run_dir: &Path, metrics: Metrics) -> Observer {
        let tb = if cfg.tensorboard {
            match EventWriter::create(&run_dir.join("tb")) {
                Ok(w) => Some(w),
                Err(e) => {
                    warn!(error = %e, "cannot create the TensorBoard event file; going on without it");
                    None
                }
            }
        } else {
            None
        };
        Observer {
            cfg: cfg.clone(),
            run_dir: run_dir.into(),
            started: Instant::now(),
            tb,
            ranks: BTreeMap::new(),
            flagged: None,
            late_history: Vec::new(),
            step: 0,
            epoch: 0,
            generation: 0,
            last: None,
            metrics,
        }
    }

    fn wall(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    /// Where a rank runs (from its rendezvous): host and device, for `butler_rank_info`.
    pub fn rank_info(&mut self, rank: u32, host: &str, device: &str) {
        let r = self.ranks.entry(rank).or_default();
        r.host = host.to_string();
        r.device = device.to_string();
        self.metrics.rank_info(rank, host, device);
    }

    /// A heartbeat's timing: running sums since the rank's process joined this generation.
    pub fn beat(&mut self, rank: u32, timing: Option<StepTiming>, phase: &str, collectives: u64) {
        let r = self.ranks.entry(rank).or_default();
        if let Some(t) = timing {
            // A new process (a new generation) starts its sums at zero again; otherwise a heartbeat
            // only moves the sums forward (a step report's gathered timing may be newer).
            if t.steps < r.at_window.steps {
                r.at_window = StepTiming::default();
                r.total = t;
            } else if t.steps >= r.total.steps {
                r.total = t;
            }
        }
        r.phase = phase.to_string();
        r.collectives = collectives;
    }

    /// A rank's timing as gathered with a step report (exact at that step, unlike a heartbeat's).
    pub fn timing_at_step(&mut self, rank: u32, t: StepTiming) {
        let r = self.ranks.entry(rank).or_default();
        if t.steps < r.at_window.steps {
            r.at_window = StepTiming::default();
        }
        r.total = t;
    }

    /// Forgets the ranks of an earlier generation (after a regroup).
    pub fn new_generation(&mut self, generation: u64) {
        self.generation = generation;
        self.ranks.clear();
        self.flagged = None;
        self.metrics.clear_ranks();
    }

    /// Rank 0's step report: closes each rank's window, applies the late-rank rule, and writes the
    /// step's line, TensorBoard scalars and gauges.
    pub fn step_report(
        &mut self,
        step: u64,
        epoch: u64,
        generation: u64,
        scalars: BTreeMap<String, f64>,
    ) {
        self.step = step;
        self.epoch = epoch;
        self.generation = generation;
        let mut windows = Vec::new();
        for (&rank, r) in self.ranks.iter_mut() {
            let (a, b) = (&r.at_window, &r.total);
            let steps = b.steps.saturating_sub(a.steps);
            if steps == 0 {
                continue;
            }
            let n = steps as f64;
            let busy = (b.data_seconds - a.data_seconds)
                + (b.compute_seconds - a.compute_seconds)
                + (b.comm_seconds - a.comm_seconds)
                + (b.optimizer_seconds - a.optimizer_seconds);
            let w = RankWindow {
                rank,
                steps,
                data_seconds: (b.data_seconds - a.data_seconds) / n,
                compute_seconds: (b.compute_seconds - a.compute_seconds) / n,
                comm_seconds: (b.comm_seconds - a.comm_seconds) / n,
                optim_seconds: (b.optimizer_seconds - a.optimizer_seconds) / n,
                samples_per_second: if busy > 0.0 {
                    b.samples.saturating_sub(a.samples) as f64 / busy
                } else {
                    0.0
                },
                lateness_seconds: 0.0,
            };
            self.metrics
                .samples(b.samples.saturating_sub(a.samples) as f64);
            r.at_window = *b;
            windows.push(w);
        }
        let med_data = median(windows.iter().map(|w| w.data_seconds).collect());
        let med_compute = median(windows.iter().map(|w| w.compute_seconds).collect());
        let med_step = median(windows.iter().map(RankWindow::step_seconds).collect());
        // Against the median of the *other* ranks: with two ranks the median of all would halve it.
        let arrivals: Vec<f64> = windows.iter().map(RankWindow::arrival).collect();
        for (i, w) in windows.iter_mut().enumerate() {
            let others: Vec<f64> = (arrivals.iter().enumerate())
                .filter(|&(j, _)| j != i)
                .map(|(_, a)| *a)
                .collect();
            w.lateness_seconds = if others.is_empty() {
                0.0
            } else {
                w.arrival() - median(others)
            };
        }
        // The late-rank rule (module docs): only with two ranks or more to compare.
        let mut worst: Option<(u32, f64)> = None;
        for w in &windows {
            let r = self.ranks.get_mut(&w.rank).expect("a window has its rank");
            let late = windows.len() >= 2
                && w.lateness_seconds > self.cfg.late_fraction * med_step
                && med_step > 0.0;
            r.late_streak = if late { r.late_streak + 1 } else { 0 };
            r.window = Some(w.clone());
            if r.late_streak >= self.cfg.late_windows
                && worst.is_none_or(|(_, l)| w.lateness_seconds > l)
            {
                worst = Some((w.rank, w.lateness_seconds));
            }
        }
        match worst {
            Some((rank, lateness)) if self.flagged != Some(rank) => {
                let w = windows.iter().find(|w| w.rank == rank).expect("named");
                let phase = if w.data_seconds - med_data >= w.compute_seconds - med_compute {
                    "data"
                } else {
                    "compute"
                };
                let host = self.ranks.get(&rank).map_or("", |r| r.host.as_str());
                warn!(
                    rank,
                    host,
                    phase,
                    lateness_ms = lateness * 1e3,
                    median_step_ms = med_step * 1e3,
                    "late rank: it reaches the gradient all-reduce last, every step; its {phase} phase makes it late"
                );
                let late = LateRank {
                    rank,
                    phase: phase.to_string(),
                    lateness_seconds: lateness,
                    median_step_seconds: med_step,
                    step,
                };
                self.event(
                    "late_rank",
                    format!(
                        "rank {rank} ({host}) is late by {:.1} ms per step (median step {:.1} ms): its {phase} phase",
                        lateness * 1e3,
                        med_step * 1e3
                    ),
                );
                self.late_history.push(late);
                self.flagged = Some(rank);
            }
            None if self.flagged.is_some() => {
                info!(rank = self.flagged, "the late rank caught up");
                self.flagged = None;
            }
            _ => {}
        }
        self.metrics.late_rank(self.flagged);
        let total_rate: f64 = windows.iter().map(|w| w.samples_per_second).sum();
        let mut scalars = scalars;
        if !windows.is_empty() {
            scalars.insert("perf/samples_per_second".into(), total_rate);
            scalars.insert("perf/step_seconds".into(), med_step);
        }
        self.metrics.step(step, epoch, &scalars, &windows);
        if let Some(tb) = self.tb.as_mut() {
            let mut tags: Vec<(String, f64)> =
                scalars.iter().map(|(k, v)| (k.clone(), *v)).collect();
            let per_phase: [(&str, PhaseOf); 5] = [
                ("data", |w| w.data_seconds),
                ("compute", |w| w.compute_seconds),
                ("comm", |w| w.comm_seconds),
                ("optimizer", |w| w.optim_seconds),
                ("lateness", |w| w.lateness_seconds),
            ];
            for (phase, f) in per_phase {
                if windows.len() <= PER_RANK_TAGS {
                    for w in &windows {
                        tags.push((format!("rank/{phase}_seconds/rank_{}", w.rank), f(w)));
                    }
                } else {
                    let v: Vec<f64> = windows.iter().map(f).collect();
                    let max = v.iter().copied().fold(f64::MIN, f64::max);
                    tags.push((format!("rank/{phase}_seconds/median"), median(v)));
                    tags.push((format!("rank/{phase}_seconds/max"), max));
                }
            }
            let r = tb
                .scalars(step, tags.iter().map(|(k, v)| (k.as_str(), *v)))
                .and_then(|_| tb.flush());
            if let Err(e) = r {
                warn!(error = %e, "cannot write TensorBoard scalars");
            }
        }
        let line = StepLine {
            step,
            epoch,
            generation,
            wall_seconds: self.wall(),
            scalars,
            ranks: windows,
        };
        append_line(
            &self.run_dir.join("steps.jsonl"),
            &(serde_json::to_string(&line).expect("a step line serialises") + "\n"),
        );
        self.last = Some(line);
    }

    /// A finished epoch (every rank reported it).
    pub fn epoch_done(&mut self, rec: &EpochRecord, step: u64) {
        self.epoch = rec.epoch;
        self.step = self.step.max(step);
        let mut tags = vec![
            ("epoch/train_loss", rec.train_loss),
            ("epoch/learning_rate", rec.learning_rate),
            ("epoch/epoch", rec.epoch as f64),
        ];
        if rec.train_seconds > 0.0 {
            tags.push((
                "epoch/samples_per_second",
                rec.train_samples as f64 / rec.train_seconds,
            ));
        }
        for (tag, v) in [
            ("epoch/test_accuracy", rec.test_accuracy),
            ("epoch/test_loss", rec.test_loss),
            ("epoch/val_accuracy", rec.val_accuracy),
            ("epoch/val_loss", rec.val_loss),
        ] {
            if let Some(v) = v {
                tags.push((tag, v));
            }
        }
        self.metrics.epoch(rec, self.step);
        if let Some(tb) = self.tb.as_mut() {
            if let Err(e) = tb
                .scalars(self.step, tags.iter().copied())
                .and_then(|_| tb.flush())
            {
                warn!(error = %e, "cannot write TensorBoard scalars");
            }
        }
    }

    /// Something to mark on the curves: appended to `events.jsonl`.
    pub fn event(&mut self, kind: &str, detail: String) {
        let line = EventLine {
            wall_seconds: self.wall(),
            step: self.step,
            epoch: self.epoch,
            generation: self.generation,
            kind: kind.to_string(),
            detail,
        };
        if kind == "regroup" || kind == "resume" {
            self.metrics.restart(kind);
        }
        append_line(
            &self.run_dir.join("events.jsonl"),
            &(serde_json::to_string(&line).expect("an event serialises") + "\n"),
        );
    }

    /// Per-rank state for `butler status`: phase, latest collective, last window.
    pub fn rank_status(&self, rank: u32) -> serde_json::Value {
        match self.ranks.get(&rank) {
            Some(r) => serde_json::json!({
                "host": r.host,
                "device": r.device,
                "phase": r.phase,
                "collectives": r.collectives,
                "steps": r.total.steps,
                "window": r.window,
                "late": self.flagged == Some(rank),
            }),
            None => serde_json::Value::Null,
        }
    }

    /// The ranks that have entered fewer collectives than the furthest one (a stall's suspects).
    pub fn behind_in_collectives(&self) -> Vec<(u32, u64, u64)> {
        let max = self
            .ranks
            .values()
            .map(|r| r.collectives)
            .max()
            .unwrap_or(0);
        self.ranks
            .iter()
            .filter(|(_, r)| r.collectives < max)
            .map(|(&k, r)| (k, r.collectives, max))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timing(steps: u64, data: f64, compute: f64, comm: f64) -> StepTiming {
        StepTiming {
            steps,
            samples: steps * 32,
            data_seconds: data * steps as f64,
            compute_seconds: compute * steps as f64,
            comm_seconds: comm * steps as f64,
            optimizer_seconds: 0.001 * steps as f64,
        }
    }

    #[test]
    fn the_rank_that_arrives_last_is_named_with_its_phase_after_consecutive_windows() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = MetricsConfig::default();
        let mut o = Observer::new(&cfg, dir.path(), Metrics::new());
        for window in 1..=4u64 {
            let n = window * 10;
            // Ranks 0 and 1 wait for rank 2 in comm; rank 2's data wait is 20 ms longer.
            o.beat(0, Some(timing(n, 0.001, 0.010, 0.021)), "comm", n);
            o.beat(1, Some(timing(n, 0.001, 0.011, 0.020)), "comm", n);
            o.beat(2, Some(timing(n, 0.021, 0.010, 0.001)), "data", n);
            o.step_report(n, 0, 1, BTreeMap::new());
            let named = o.late_history.len();
            assert_eq!(named, usize::from(window >= 3), "window {window}");
        }
        let late = &o.late_history[0];
        assert_eq!((late.rank, late.phase.as_str()), (2, "data"));
        // 31 ms against the other ranks' median arrival of 11.5 ms.
        assert!((late.lateness_seconds - 0.0195).abs() < 1e-9, "{late:?}");
        let events = std::fs::read_to_string(dir.path().join("events.jsonl")).unwrap();
        assert!(events.contains("\"late_rank\"") && events.contains("rank 2"));
        let steps = std::fs::read_to_string(dir.path().join("steps.jsonl")).unwrap();
        assert_eq!(steps.lines().count(), 4);
        let tb = crate::tb::read_scalars(&dir.path().join("tb")).unwrap();
        assert_eq!(tb["rank/data_seconds/rank_2"].len(), 4);
    }

    #[test]
    fn even_ranks_are_never_named() {
        let dir = tempfile::tempdir().unwrap();
        let mut o = Observer::new(&MetricsConfig::default(), dir.path(), Metrics::new());
        for window in 1..=6u64 {
            let n = window * 10;
            o.beat(0, Some(timing(n, 0.001, 0.010, 0.002)), "compute", n);
            o.beat(1, Some(timing(n, 0.0012, 0.0105, 0.0015)), "compute", n);
            o.step_report(n, 0, 1, BTreeMap::new());
        }
        assert!(o.late_history.is_empty());
    }
}
