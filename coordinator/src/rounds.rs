//! Pseudo-label refresh rounds as a persisted state machine: TRAIN(0) → INFER(0) → SELECT → TRAIN(1) → …
//! → TRAIN(R−1) → DONE. The coordinator advances when every rank has reported the current phase done;
//! SELECT runs here, on the merged per-class confidence histograms only (workers keep the samples and
//! write the per-shard sidecars). Every change is written to `rounds/state.json` atomically before it
//! is acknowledged, and each pseudo-label set also to `rounds/set-K/selection.json`, so a coordinator
//! started with `--resume` continues at the phase it stopped in: a TRAIN phase restarts from its
//! beginning (from the previous round's checkpoint), INFER keeps the shards already labeled, and an
//! INFER that completed before the crash goes straight to SELECT, which re-derives the same set.

use butler_common::fsutil;
use butler_common::pseudo::{Histogram, SelectRule, Selection};
use butler_common::semi::PseudoLabelConfig;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Train,
    Infer,
    Done,
}

/// What `rounds/state.json` holds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RoundsState {
    pub round: u32,
    pub phase: Phase,
    /// Ranks that finished the current phase.
    pub done: BTreeSet<u32>,
    /// INFER reports of the current round, by rank.
    pub histograms: BTreeMap<u32, Histogram>,
    /// Pseudo-label sets made so far: `selections[k]` is set k + 1, used by TRAIN(k + 1).
    pub selections: Vec<Selection>,
    /// Rank 0's test accuracy at the end of each TRAIN phase.
    pub round_accuracy: Vec<f64>,
}

/// One round in `summary.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RoundRecord {
    pub round: u32,
    pub test_accuracy: Option<f64>,
    /// Pseudo-labeled samples this round trained on, per class (none in round 0).
    pub pseudo_labels_per_class: Vec<u64>,
}

pub struct Rounds {
    dir: PathBuf,
    rounds: u32,
    world: u32,
    rule: SelectRule,
    state: RoundsState,
    /// Test hook (`BUTLER_FAULT=coordinator-exit-before-select:R`): exit the process after INFER(R)
    /// is complete and persisted, before SELECT.
    exit_before_select: Option<u32>,
}

pub const STATE_FILE: &str = "state.json";

/// Parses and checks `rounds/state.json`'s text: every histogram and selection well-formed (see
/// [`Histogram::check`], [`Selection::check`]), at most one selection per finished round, a round
/// below `u32::MAX` (the next one is `round + 1`). [`Rounds::open`] reads the file and calls this.
pub fn parse_state(text: &str) -> Result<RoundsState, String> {
    let st: RoundsState = serde_json::from_str(text).map_err(|e| e.to_string())?;
    if st.round == u32::MAX {
        return Err(format!("round {} is out of range", st.round));
    }
    if st.selections.len() > st.round as usize {
        return Err(format!(
            "{} pseudo-label sets at round {} (at most one per finished round)",
            st.selections.len(),
            st.round
        ));
    }
    for (rank, h) in &st.histograms {
        h.check()
            .map_err(|e| format!("rank {rank}'s histogram: {e}"))?;
    }
    for (k, s) in st.selections.iter().enumerate() {
        s.check()
            .map_err(|e| format!("pseudo-label set {}: {e}", k + 1))?;
    }
    Ok(st)
}

impl Rounds {
    /// Fresh rounds (any earlier `rounds/` directory of this run directory is removed: its sidecars belong
    /// to another run), or with `resume` the persisted state.
    pub fn open(
        run_dir: &Path,
        cfg: &PseudoLabelConfig,
        world: u32,
        resume: bool,
    ) -> Result<Rounds, String> {
        let dir = run_dir.join("rounds");
        let state_file = dir.join(STATE_FILE);
        let state = if resume && state_file.exists() {
            let text = std::fs::read_to_string(&state_file)
                .map_err(|e| format!("cannot read {}: {e}", state_file.display()))?;
            let mut st =
                parse_state(&text).map_err(|e| format!("corrupt {}: {e}", state_file.display()))?;
            if st.phase == Phase::Train {
                // Training restarts from the round's beginning with new processes.
                st.done.clear();
            }
            tracing::info!(round = st.round, phase = ?st.phase, "resuming pseudo-label rounds");
            st
        } else {
            if dir.exists() {
                std::fs::remove_dir_all(&dir)
                    .map_err(|e| format!("cannot clear {}: {e}", dir.display()))?;
            }
            RoundsState {
                round: 0,
                phase: Phase::Train,
                done: BTreeSet::new(),
                histograms: BTreeMap::new(),
                selections: Vec::new(),
                round_accuracy: Vec::new(),
            }
        };
        std::fs::create_dir_all(&dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let exit_before_select = std::env::var("BUTLER_FAULT").ok().and_then(|f| {
            f.strip_prefix("coordinator-exit-before-select:")
                .and_then(|r| r.parse().ok())
        });
        let mut r = Rounds {
            dir,
            rounds: cfg.rounds,
            world,
            rule: SelectRule {
                threshold: cfg.threshold,
                top_k_per_class: cfg.top_k_per_class,
                balance: cfg.balance,
            },
            state,
            exit_before_select,
        };
        if r.state.phase == Phase::Infer && r.state.histograms.len() == world as usize {
            // Stopped between INFER and SELECT: select now.
            r.state.done = (0..world).collect();
            r.advance()?;
        }
        r.persist()?;
        Ok(r)
    }

    pub fn current(&self) -> (u32, Phase) {
        (self.state.round, self.state.phase)
    }

    pub fn state(&self) -> &RoundsState {
        &self.state
    }

    /// The set TRAIN(`round`) uses (none for round 0).
    pub fn selection_for(&self, round: u32) -> Option<&Selection> {
        round
            .checked_sub(1)
            .and_then(|k| self.state.selections.get(k as usize))
    }

    /// Where the sidecars of INFER(`round`) go (the labels of set `round + 1`).
    pub fn labels_dir(run_dir: &Path, round: u32) -> PathBuf {
        run_dir
            .join("rounds")
            .join(format!("set-{}", round + 1))
            .join("labels")
    }

    /// Where rank 0 saves the model at the end of TRAIN(`round`).
    pub fn checkpoint(run_dir: &Path, round: u32) -> PathBuf {
        run_dir
            .join("rounds")
            .join(format!("round-{round}.safetensors"))
    }

    /// Rank `rank` finished phase (`round`, `phase`). A report for a phase that is not the current one
    /// (a repeat after a lost answer) is ignored; a report from the future is an error.
    pub fn complete(
        &mut self,
        rank: u32,
        round: u32,
        phase: Phase,
        histogram: Option<Histogram>,
        accuracy: Option<f64>,
    ) -> Result<(), String> {
        if rank >= self.world {
            return Err(format!(
                "rank {rank} is outside the world of {}",
                self.world
            ));
        }
        if (round, phase) != self.current() {
            if round > self.state.round {
                return Err(format!(
                    "rank {rank} reports {phase:?} of round {round}, but the job is at {:?} of round {}",
                    self.state.phase, self.state.round
                ));
            }
            return Ok(());
        }
        match phase {
            Phase::Infer => {
                let h = histogram.ok_or_else(|| {
                    format!("rank {rank} finished INFER of round {round} without a histogram")
                })?;
                h.check()
                    .map_err(|e| format!("rank {rank}'s histogram of round {round}: {e}"))?;
                self.state.histograms.insert(rank, h);
            }
            Phase::Train => {
                if let Some(a) = accuracy {
                    self.state.round_accuracy.truncate(round as usize);
                    self.state.round_accuracy.push(a);
                }
            }
            Phase::Done => return Ok(()),
        }
        self.state.done.insert(rank);
        self.persist()?;
        if self.state.done.len() == self.world as usize {
            if phase == Phase::Infer && self.exit_before_select == Some(round) {
                tracing::error!(
                    round,
                    "BUTLER_FAULT: exiting after INFER, before SELECT (test hook)"
                );
                std::process::exit(86);
            }
            self.advance()?;
            self.persist()?;
            tracing::info!(round = self.state.round, phase = ?self.state.phase, "pseudo-label rounds: next phase");
        }
        Ok(())
    }

    fn advance(&mut self) -> Result<(), String> {
        let st = &mut self.state;
        st.done.clear();
        match st.phase {
            Phase::Train if st.round + 1 < self.rounds => st.phase = Phase::Infer,
            Phase::Train => st.phase = Phase::Done,
            Phase::Infer => {
                let mut merged: Option<Histogram> = None;
                for h in st.histograms.values() {
                    match &mut merged {
                        None => merged = Some(h.clone()),
                        Some(m) => m.merge(h).map_err(|e| e.to_string())?,
                    }
                }
                let merged = merged.ok_or("INFER finished without histograms")?;
                let set = Selection::choose(st.round + 1, &merged, &self.rule);
                tracing::info!(
                    set = set.round,
                    selected = set.total_selected(),
                    pool = merged.total(),
                    per_class = ?set.selected,
                    "pseudo-label set selected"
                );
                let file = self
                    .dir
                    .join(format!("set-{}", set.round))
                    .join("selection.json");
                if let Some(parent) = file.parent() {
                    std::fs::create_dir_all(parent)
                        .map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
                }
                let json = serde_json::to_vec_pretty(&set).expect("a selection serialises");
                fsutil::write_atomic(&file, &json).map_err(|e| e.to_string())?;
                st.selections.truncate(st.round as usize);
                st.selections.push(set);
                st.histograms.clear();
                st.round += 1;
                st.phase = Phase::Train;
            }
            Phase::Done => {}
        }
        Ok(())
    }

    fn persist(&self) -> Result<(), String> {
        let json = serde_json::to_vec_pretty(&self.state).expect("the rounds state serialises");
        fsutil::write_atomic(&self.dir.join(STATE_FILE), &json).map_err(|e| e.to_string())
    }

    /// Per-round records for `summary.json`.
    pub fn records(&self) -> Vec<RoundRecord> {
        (0..self.rounds)
            .map(|r| RoundRecord {
                round: r,
                test_accuracy: self.state.round_accuracy.get(r as usize).copied(),
                pseudo_labels_per_class: self
                    .selection_for(r)
                    .map(|s| s.selected.clone())
                    .unwrap_or_default(),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> PseudoLabelConfig {
        PseudoLabelConfig {
            rounds: 3,
            threshold: 0.5,
            top_k_per_class: None,
            balance: false,
            reinit: true,
            noisy: false,
            soft: false,
            temperature: 1.0,
            weight: 1.0,
        }
    }

    fn hist(p: f32) -> Histogram {
        let mut h = Histogram::new(2);
        h.add(0, p, butler_common::pseudo::margin_of(p), 0.5);
        h.add(1, 0.9, butler_common::pseudo::margin_of(0.9), 0.5);
        h
    }

    #[test]
    fn phases_advance_when_every_rank_is_done_and_resume_from_disk() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = Rounds::open(dir.path(), &cfg(), 2, false).unwrap();
        assert_eq!(r.current(), (0, Phase::Train));
        r.complete(0, 0, Phase::Train, None, Some(0.5)).unwrap();
        assert_eq!(r.current(), (0, Phase::Train));
        r.complete(1, 0, Phase::Train, None, None).unwrap();
        assert_eq!(r.current(), (0, Phase::Infer));
        // A repeated report of a finished phase is ignored; one from the future is refused.
        r.complete(0, 0, Phase::Train, None, None).unwrap();
        assert!(r.complete(0, 2, Phase::Train, None, None).is_err());
        r.complete(0, 0, Phase::Infer, Some(hist(0.7)), None)
            .unwrap();
        // The coordinator "dies" here; a resumed one has rank 0's histogram and waits for rank 1.
        let mut again = Rounds::open(dir.path(), &cfg(), 2, true).unwrap();
        assert_eq!(again.current(), (0, Phase::Infer));
        again
            .complete(1, 0, Phase::Infer, Some(hist(0.2)), None)
            .unwrap();
        assert_eq!(again.current(), (1, Phase::Train));
        let set = again.selection_for(1).unwrap().clone();
        assert_eq!(set.selected, vec![1, 2]);
        assert!(dir.path().join("rounds/set-1/selection.json").exists());
        for rank in 0..2 {
            again.complete(rank, 1, Phase::Train, None, None).unwrap();
        }
        for rank in 0..2 {
            again
                .complete(rank, 1, Phase::Infer, Some(hist(0.9)), None)
                .unwrap();
        }
        for rank in 0..2 {
            again.complete(rank, 2, Phase::Train, None, None).unwrap();
        }
        assert_eq!(again.current(), (2, Phase::Done));
        assert_eq!(again.records().len(), 3);
        assert_eq!(again.records()[1].pseudo_labels_per_class, vec![1, 2]);
        // A fresh (non-resumed) open starts over and removes the old sets.
        let fresh = Rounds::open(dir.path(), &cfg(), 2, false).unwrap();
        assert_eq!(fresh.current(), (0, Phase::Train));
        assert!(!dir.path().join("rounds/set-1").exists());
    }

    #[test]
    fn a_complete_infer_selects_on_resume() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = Rounds::open(dir.path(), &cfg(), 1, false).unwrap();
        r.complete(0, 0, Phase::Train, None, None).unwrap();
        // Persist a state where INFER is complete but SELECT has not run (what the fault hook leaves).
        r.state.histograms.insert(0, hist(0.8));
        r.state.done.insert(0);
        r.persist().unwrap();
        let resumed = Rounds::open(dir.path(), &cfg(), 1, true).unwrap();
        assert_eq!(resumed.current(), (1, Phase::Train));
        assert_eq!(resumed.selection_for(1).unwrap().selected, vec![1, 1]);
    }

    // Regression (hostile-input property tests): `rounds/state.json` was trusted as read: a
    // histogram with fewer counts than `classes × BINS` made SELECT index out of bounds, a round of
    // u32::MAX overflowed `round + 1`, a selection with a short `min_bin` was used as is.
    #[test]
    fn a_malformed_rounds_state_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = Rounds::open(dir.path(), &cfg(), 1, false).unwrap();
        r.complete(0, 0, Phase::Train, None, None).unwrap();
        let mut short = hist(0.7);
        short.counts.truncate(10);
        let e = r
            .complete(0, 0, Phase::Infer, Some(short), None)
            .unwrap_err();
        assert!(e.contains("histogram"), "{e}");
        r.complete(0, 0, Phase::Infer, Some(hist(0.7)), None)
            .unwrap();
        let text = std::fs::read_to_string(dir.path().join("rounds").join(STATE_FILE)).unwrap();
        let good = parse_state(&text).unwrap();
        assert_eq!(good.round, 1);

        let mut st = good.clone();
        st.phase = Phase::Infer;
        st.histograms.insert(
            0,
            Histogram {
                classes: 2,
                counts: vec![1; 3],
                below: vec![0; 2],
            },
        );
        let e = parse_state(&serde_json::to_string(&st).unwrap()).unwrap_err();
        assert!(e.contains("rank 0's histogram"), "{e}");
        let mut st = good.clone();
        st.round = u32::MAX;
        assert!(parse_state(&serde_json::to_string(&st).unwrap()).is_err());
        let mut st = good.clone();
        st.selections[0].min_bin.pop();
        let e = parse_state(&serde_json::to_string(&st).unwrap()).unwrap_err();
        assert!(e.contains("pseudo-label set 1"), "{e}");
        let mut st = good;
        st.selections.push(st.selections[0].clone());
        assert!(parse_state(&serde_json::to_string(&st).unwrap()).is_err());
        // Written to disk, the resumed coordinator refuses it with the file's name.
        std::fs::write(
            dir.path().join("rounds").join(STATE_FILE),
            serde_json::to_string(&st).unwrap(),
        )
        .unwrap();
        let e = Rounds::open(dir.path(), &cfg(), 1, true).err().unwrap();
        assert!(e.contains("state.json"), "{e}");
    }
}
