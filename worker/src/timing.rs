//! Where a rank's training time goes: cumulative per-step timing (data wait, compute, communication,
//! optimizer), the phase the training thread is in now, and the sequence number of the latest collective
//! it entered. The training thread writes, the heartbeat task reads (atomics, no locks); the coordinator
//! turns the heartbeat's running sums into per-window means and names the late rank from them.

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::time::Duration;

/// What the training thread is doing now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Phase {
    Setup = 0,
    Data = 1,
    Compute = 2,
    Comm = 3,
    Optimizer = 4,
    Eval = 5,
    Checkpoint = 6,
    Idle = 7,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Setup => "setup",
            Phase::Data => "data",
            Phase::Compute => "compute",
            Phase::Comm => "comm",
            Phase::Optimizer => "optimizer",
            Phase::Eval => "eval",
            Phase::Checkpoint => "checkpoint",
            Phase::Idle => "idle",
        }
    }

    fn from_u8(v: u8) -> Phase {
        match v {
            1 => Phase::Data,
            2 => Phase::Compute,
            3 => Phase::Comm,
            4 => Phase::Optimizer,
            5 => Phase::Eval,
            6 => Phase::Checkpoint,
            7 => Phase::Idle,
            _ => Phase::Setup,
        }
    }
}

/// Running sums since the worker's generation started.
#[derive(Default)]
pub struct StepClock {
    steps: AtomicU64,
    samples: AtomicU64,
    data_ns: AtomicU64,
    compute_ns: AtomicU64,
    comm_ns: AtomicU64,
    optimizer_ns: AtomicU64,
    phase: AtomicU8,
    collectives: AtomicU64,
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

impl StepClock {
    pub fn phase(&self) -> Phase {
        Phase::from_u8(self.phase.load(Ordering::Relaxed))
    }

    /// Sets the phase and returns the one it replaces.
    pub fn enter(&self, p: Phase) -> Phase {
        Phase::from_u8(self.phase.swap(p as u8, Ordering::Relaxed))
    }

    /// A collective begins: its sequence number (1, 2, …) and the phase to restore after it.
    pub fn collective_entered(&self) -> Phase {
        self.collectives.fetch_add(1, Ordering::Relaxed);
        self.enter(Phase::Comm)
    }

    /// A collective ended after `d`; `before` is the phase it interrupted.
    pub fn collective_left(&self, d: Duration, before: Phase) {
        self.comm_ns.fetch_add(nanos(d), Ordering::Relaxed);
        self.enter(before);
    }

    /// Time spent inside collectives so far (to split a step's wall time).
    pub fn comm_total(&self) -> Duration {
        Duration::from_nanos(self.comm_ns.load(Ordering::Relaxed))
    }

    pub fn collectives(&self) -> u64 {
        self.collectives.load(Ordering::Relaxed)
    }

    /// One training step done: its data wait, compute and optimizer time (its communication was
    /// counted by the collectives themselves) and the samples it trained on this rank.
    pub fn step_done(&self, data: Duration, compute: Duration, optimizer: Duration, samples: u64) {
        self.data_ns.fetch_add(nanos(data), Ordering::Relaxed);
        self.compute_ns.fetch_add(nanos(compute), Ordering::Relaxed);
        self.optimizer_ns
            .fetch_add(nanos(optimizer), Ordering::Relaxed);
        self.samples.fetch_add(samples, Ordering::Relaxed);
        self.steps.fetch_add(1, Ordering::Relaxed);
    }

    /// The heartbeat's copy.
    pub fn snapshot(&self) -> butler_proto::StepTiming {
        let s = |a: &AtomicU64| a.load(Ordering::Relaxed) as f64 * 1e-9;
        butler_proto::StepTiming {
            steps: self.steps.load(Ordering::Relaxed),
            samples: self.samples.load(Ordering::Relaxed),
            data_seconds: s(&self.data_ns),
            compute_seconds: s(&self.compute_ns),
            comm_seconds: s(&self.comm_ns),
            optimizer_seconds: s(&self.optimizer_ns),
        }
    }
}

/// Test switch `BUTLER_SLOW_DATA_MS=MS`: the job's last rank waits `MS` milliseconds more for every
/// batch, a straggler the coordinator must name (its data phase makes it late).
pub fn slow_data_delay(rank: u32, world: u32) -> Option<Duration> {
    static MS: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    let ms = (*MS.get_or_init(|| std::env::var("BUTLER_SLOW_DATA_MS").ok()?.parse().ok()))?;
    (rank + 1 == world && world > 1).then(|| Duration::from_millis(ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_collective_restores_the_phase_it_interrupted_and_counts_its_time() {
        let c = StepClock::default();
        c.enter(Phase::Compute);
        let before = c.collective_entered();
        assert_eq!(c.phase(), Phase::Comm);
        c.collective_left(Duration::from_millis(3), before);
        assert_eq!(c.phase(), Phase::Compute);
        assert_eq!(c.collectives(), 1);
        c.step_done(
            Duration::from_millis(1),
            Duration::from_millis(2),
            Duration::from_millis(4),
            32,
        );
        let s = c.snapshot();
        assert_eq!((s.steps, s.samples), (1, 32));
        assert!((s.comm_seconds - 0.003).abs() < 1e-12);
        assert!((s.data_seconds - 0.001).abs() < 1e-12);
        assert!((s.compute_seconds - 0.002).abs() < 1e-12);
        assert!((s.optimizer_seconds - 0.004).abs() < 1e-12);
    }
}
