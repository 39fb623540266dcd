//! The job's commit points: rank 0's resumable checkpoints as the coordinator records them in
//! `<run>/state.json` (atomic), newest last. A commit is one fact — the checkpoint file (checked by its
//! SHA-256 and size) plus where both data streams stood — so a job resumed from it redoes exactly the
//! work after it. The coordinator never reads the checkpoint's tensors; it hashes the file's bytes.

use butler_common::fsutil;
use butler_proto::ResumePoint;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use tracing::{info, warn};

/// The file the commit log lives in, relative to the run directory.
pub const STATE_FILE: &str = "state.json";
const FORMAT: u32 = 1;

/// One commit point.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Commit {
    /// The checkpoint file, relative to the run directory.
    pub checkpoint: String,
    pub sha256: String,
    pub bytes: u64,
    /// Optimizer steps taken.
    pub step: u64,
    /// The labeled epoch in progress and the steps taken in it.
    pub epoch: u64,
    pub steps_in_epoch: u64,
    /// The labeled stream's consumed global position in that epoch.
    pub labeled_start: u64,
    /// The unlabeled stream's cursor (epoch, steps taken in it), when the job has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unlabeled: Option<[u64; 2]>,
    pub world_size: u32,
    pub generation: u64,
    /// Staged jobs: the stage (`butler_proto::Stage` value) the checkpoint belongs to.
    #[serde(default)]
    pub stage: u32,
    /// Pseudo-label rounds: the round whose TRAIN phase the checkpoint belongs to.
    #[serde(default)]
    pub round: u32,
}

impl Commit {
    pub fn from_point(p: &ResumePoint, sha256: String, bytes: u64) -> Commit {
        Commit {
            checkpoint: p.checkpoint.clone(),
            sha256,
            bytes,
            step: p.step,
            epoch: p.epoch,
            steps_in_epoch: p.steps_in_epoch,
            labeled_start: p.labeled_start,
            unlabeled: p
                .has_unlabeled
                .then_some([p.unlabeled_epoch, p.unlabeled_step]),
            world_size: p.world_size,
            generation: p.generation,
            stage: p.stage,
            round: p.round,
        }
    }

    /// The first labeled epoch a job resumed from this commit trains again (its records are dropped):
    /// the commit's epoch, or 0 for a staged job's commit (inside pretraining: fine-tuning reruns).
    pub fn first_epoch_redone(&self) -> u64 {
        if self.stage == 0 {
            self.epoch
        } else {
            0
        }
    }

    pub fn point(&self) -> ResumePoint {
        let [ue, us] = self.unlabeled.unwrap_or_default();
        ResumePoint {
            checkpoint: self.checkpoint.clone(),
            step: self.step,
            epoch: self.epoch,
            steps_in_epoch: self.steps_in_epoch,
            labeled_start: self.labeled_start,
            has_unlabeled: self.unlabeled.is_some(),
            unlabeled_epoch: ue,
            unlabeled_step: us,
            world_size: self.world_size,
            generation: self.generation,
            stage: self.stage,
            round: self.round,
        }
    }
}

/// What `state.json` holds.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
pub struct StateFile {
    pub format: u32,
    pub job: String,
    /// `JobConfig::trajectory_fingerprint` of the config that wrote the commits.
    pub config: String,
    /// The newest generation the job reached (a restarted coordinator continues above it, so that
    /// messages of the workers it lost are refused).
    #[serde(default)]
    pub generation: u64,
    pub world_size: u32,
    pub commits: Vec<Commit>,
}

/// Parses and checks `state.json`'s text: the format, and every commit's checkpoint name (see
/// [`check_checkpoint_name`]). [`Commits::open`] reads the file and calls this.
pub fn parse_state(text: &str) -> Result<StateFile, String> {
    let state: StateFile =
        serde_json::from_str(text).map_err(|e| format!("is not a butler job state: {e}"))?;
    if state.format != FORMAT {
        return Err(format!(
            "has format {}, this butler reads format {FORMAT}",
            state.format
        ));
    }
    for c in &state.commits {
        check_checkpoint_name(&c.checkpoint)?;
    }
    Ok(state)
}

/// A commit's checkpoint is a relative path inside the run directory: the coordinator hashes it at
/// resume and deletes it when it falls out of the newest `keep`, so a name with `..`, a root or a
/// prefix (from a hostile `state.json` or commit request) would reach files outside the run.
pub fn check_checkpoint_name(name: &str) -> Result<(), String> {
    use std::path::Component;
    let p = Path::new(name);
    if name.is_empty()
        || name.contains('\0')
        || !p.components().all(|c| matches!(c, Component::Normal(_)))
    {
        return Err(format!(
            "checkpoint {name:?} is not a relative path inside the run directory"
        ));
    }
    Ok(())
}

/// The commit log of one run directory.
#[derive(Debug)]
pub struct Commits {
    run_dir: PathBuf,
    job: String,
    config: String,
    generation: u64,
    world_size: u32,
    keep: usize,
    commits: Vec<Commit>,
    /// The commit this coordinator resumed from, if any.
    resumed: Option<Commit>,
}

impl Commits {
    /// A fresh job removes an earlier run's log and resumable checkpoints from `run_dir` (they would
    /// otherwise pass for this run's); with `resume` it reads the log and picks the newest commit whose
    /// checkpoint is intact, warning about (and dropping) newer ones that are not. A missing log is an
    /// error when `required`, else an empty log; another world size is an error unless `any_world`
    /// (elastic jobs).
    #[allow(clippy::too_many_arguments)]
    pub fn open(
        run_dir: &Path,
        job: &str,
        config: &str,
        world_size: u32,
        keep: usize,
        resume: bool,
        required: bool,
        any_world: bool,
    ) -> Result<Commits, String> {
        let file = run_dir.join(STATE_FILE);
        let mut c = Commits {
            run_dir: run_dir.to_path_buf(),
            job: job.to_string(),
            config: config.to_string(),
            generation: 0,
            world_size,
            keep: keep.max(1),
            commits: Vec::new(),
            resumed: None,
        };
        if !resume {
            for stale in c.stale_files() {
                std::fs::remove_file(&stale)
                    .map_err(|e| format!("removing {} of an earlier run: {e}", stale.display()))?;
            }
            return Ok(c);
        }
        let text = match std::fs::read_to_string(&file) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => return Ok(c),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(format!(
                "--resume: {} does not exist, so this run directory has no commit point to resume \
                     from (run the job without --resume to start it)",
                file.display()
            ))
            }
            Err(e) => return Err(format!("--resume: cannot read {}: {e}", file.display())),
        };
        let state = parse_state(&text).map_err(|e| format!("--resume: {} {e}", file.display()))?;
        if state.job != job {
            return Err(format!(
                "--resume: {} belongs to job {:?}, not {job:?}",
                file.display(),
                state.job
            ));
        }
        if state.config != config {
            return Err(format!(
                "--resume: the job's config differs from the one that wrote {} in what decides the \
                 training (only [cluster], [checkpoint], loader threads/caches and train.threads may \
                 change across a resume); restore the original config or run without --resume",
                file.display()
            ));
        }
        if state.world_size != world_size && !any_world {
            return Err(format!(
                "--resume: the job was run with {} workers and is resumed with {world_size}; resume \
                 it with {} workers",
                state.world_size, state.world_size
            ));
        }
        let mut problems = Vec::new();
        let mut commits = state.commits;
        while let Some(newest) = commits.last() {
            match verify(run_dir, newest) {
                Ok(()) => break,
                Err(why) => {
                    warn!(checkpoint = %newest.checkpoint, %why, "checkpoint unusable; trying the previous commit");
                    problems.push(why);
                    commits.pop();
                }
            }
        }
        if commits.is_empty() && !problems.is_empty() {
            return Err(format!(
                "--resume: no intact checkpoint in {}: {}",
                run_dir.display(),
                problems.join("; ")
            ));
        }
        c.resumed = commits.last().cloned();
        c.generation = state
            .generation
            .max(commits.iter().map(|c| c.generation).max().unwrap_or(0));
        c.commits = commits;
        match &c.resumed {
            Some(r) => info!(
                checkpoint = %r.checkpoint,
                step = r.step,
                epoch = r.epoch,
                "resuming from the newest intact commit"
            ),
            None => {
                warn!("--resume: no commit was recorded yet; the job starts from the beginning")
            }
        }
        if !problems.is_empty() {
            c.persist()?;
        }
        Ok(c)
    }

    /// The newest generation recorded (0 for a fresh job).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The job continues in `generation` from the newest commit (a regroup, or a restarted coordinator);
    /// the generation is persisted.
    pub fn resume_from_newest(&mut self, generation: u64) {
        self.generation = generation;
        self.resumed = self.commits.last().cloned();
        if let Err(e) = self.persist() {
            warn!(error = %e, "cannot persist the job state's generation");
        }
    }

    /// The commit this job resumed from.
    pub fn resumed(&self) -> Option<&Commit> {
        self.resumed.as_ref()
    }

    pub fn newest(&self) -> Option<&Commit> {
        self.commits.last()
    }

    /// Records a commit (after checking that its file exists with the reported size: the hash, which
    /// rank 0 computed, is checked at resume, so a commit never blocks the control plane reading a
    /// large file), persists the log, then deletes the checkpoints of commits older than the newest
    /// `keep`.
    pub fn record(&mut self, c: Commit) -> Result<(), String> {
        check_checkpoint_name(&c.checkpoint)?;
        if let Some(prev) = self.commits.last() {
            // Pseudo-label rounds start each TRAIN phase's step count afresh.
            if (c.round, c.step) < (prev.round, prev.step) {
                return Err(format!(
                    "commit at round {} step {} is older than the recorded round {} step {}",
                    c.round, c.step, prev.round, prev.step
                ));
            }
        }
        let path = self.run_dir.join(&c.checkpoint);
        let bytes = std::fs::metadata(&path)
            .map_err(|e| format!("{}: {e}", path.display()))?
            .len();
        if bytes != c.bytes {
            return Err(format!(
                "{} has {bytes} bytes, rank 0 reported {}",
                path.display(),
                c.bytes
            ));
        }
        self.generation = self.generation.max(c.generation);
        self.commits.retain(|old| old.checkpoint != c.checkpoint);
        self.commits.push(c);
        let excess = self.commits.len().saturating_sub(self.keep);
        let dropped: Vec<Commit> = self.commits.drain(..excess).collect();
        self.persist()?;
        // Only after the log no longer names them.
        for d in dropped {
            let path = self.run_dir.join(&d.checkpoint);
            if let Err(e) = std::fs::remove_file(&path) {
                warn!(path = %path.display(), error = %e, "cannot delete an old checkpoint");
            }
        }
        Ok(())
    }

    fn persist(&self) -> Result<(), String> {
        let state = StateFile {
            format: FORMAT,
            job: self.job.clone(),
            config: self.config.clone(),
            generation: self.generation,
            world_size: self.world_size,
            commits: self.commits.clone(),
        };
        let path = self.run_dir.join(STATE_FILE);
        let json = serde_json::to_vec_pretty(&state).expect("the job state serialises");
        fsutil::write_atomic(&path, &json).map_err(|e| format!("writing {}: {e}", path.display()))
    }

    /// The log and the resumable checkpoints an earlier run left.
    fn stale_files(&self) -> Vec<PathBuf> {
        let mut v = Vec::new();
        let state = self.run_dir.join(STATE_FILE);
        if state.exists() {
            v.push(state);
        }
        if let Ok(entries) = std::fs::read_dir(self.run_dir.join("checkpoints")) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.contains("step-") && name.ends_with(".safetensors") {
                    v.push(e.path());
                }
            }
        }
        v
    }
}

/// The checkpoint a commit names exists with the recorded size and SHA-256.
fn verify(run_dir: &Path, c: &Commit) -> Result<(), String> {
    let path = run_dir.join(&c.checkpoint);
    let (sha, bytes) =
        fsutil::sha256_file(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    if bytes != c.bytes {
        return Err(format!(
            "{} has {bytes} bytes, the commit recorded {} (truncated or overwritten)",
            path.display(),
            c.bytes
        ));
    }
    if sha != c.sha256 {
        return Err(format!(
            "{} does not match its recorded SHA-256 (corrupt)",
            path.display()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn commit(dir: &Path, step: u64, bytes: &[u8]) -> Commit {
        let rel = format!("checkpoints/step-{step}.safetensors");
        std::fs::create_dir_all(dir.join("checkpoints")).unwrap();
        std::fs::write(dir.join(&rel), bytes).unwrap();
        let (sha, n) = fsutil::sha256_file(&dir.join(&rel)).unwrap();
        Commit {
            checkpoint: rel,
            sha256: sha,
            bytes: n,
            step,
            epoch: step / 10,
            steps_in_epoch: step % 10,
            labeled_start: (step % 10) * 8,
            unlabeled: Some([0, step]),
            world_size: 2,
            generation: 1,
            stage: 0,
            round: 0,
        }
    }

    #[test]
    fn keeps_the_newest_and_resumes_from_the_last_intact() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let mut c = Commits::open(d, "j", "cfg", 2, 2, false, true, false).unwrap();
        for step in [5, 10, 15] {
            c.record(commit(d, step, format!("ckpt {step}").as_bytes()))
                .unwrap();
        }
        // keep = 2: step 5's file is gone, the log names 10 and 15.
        assert!(!d.join("checkpoints/step-5.safetensors").exists());
        let r = Commits::open(d, "j", "cfg", 2, 2, true, true, false).unwrap();
        assert_eq!(r.resumed().unwrap().step, 15);
        assert_eq!(r.resumed().unwrap().point().unlabeled_step, 15);

        // Truncate the newest: the previous one is used, and the log forgets the broken one.
        std::fs::write(d.join("checkpoints/step-15.safetensors"), b"ckpt").unwrap();
        let r = Commits::open(d, "j", "cfg", 2, 2, true, true, false).unwrap();
        assert_eq!(r.resumed().unwrap().step, 10);
        assert_eq!(
            Commits::open(d, "j", "cfg", 2, 2, true, true, false)
                .unwrap()
                .newest()
                .unwrap()
                .step,
            10
        );

        // Corrupt the only one left (same size, other bytes): a clear error naming the file.
        std::fs::write(d.join("checkpoints/step-10.safetensors"), b"ckpt 11").unwrap();
        let e = Commits::open(d, "j", "cfg", 2, 2, true, true, false).unwrap_err();
        assert!(
            e.contains("step-10.safetensors") && e.contains("corrupt"),
            "{e}"
        );
    }

    #[test]
    fn refuses_what_it_cannot_resume() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let e = Commits::open(d, "j", "cfg", 2, 2, true, true, false).unwrap_err();
        assert!(e.contains("state.json does not exist"), "{e}");
        let mut c = Commits::open(d, "j", "cfg", 2, 2, false, true, false).unwrap();
        c.record(commit(d, 3, b"x")).unwrap();
        let e = Commits::open(d, "j", "cfg", 3, 2, true, true, false).unwrap_err();
        assert!(e.contains("resume it with 2 workers"), "{e}");
        let e = Commits::open(d, "other", "cfg", 2, 2, true, true, false).unwrap_err();
        assert!(e.contains("belongs to job"), "{e}");
        let e = Commits::open(d, "j", "other recipe", 2, 2, true, true, false).unwrap_err();
        assert!(e.contains("config differs"), "{e}");
        // An older step than the newest is refused.
        assert!(c.record(commit(d, 2, b"y")).is_err());
        // A fresh start clears the earlier run's log and checkpoints.
        Commits::open(d, "j", "cfg", 2, 2, false, true, false).unwrap();
        assert!(!d.join(STATE_FILE).exists());
        assert!(!d.join("checkpoints/step-3.safetensors").exists());
    }

    // Regression (hostile-input property tests): a checkpoint name with `..` or a root, from a
    // commit request or a hand-edited state.json, was joined to the run directory, hashed and —
    // once older than the newest `keep` — deleted: a file outside the run could be removed.
    #[test]
    fn checkpoint_names_outside_the_run_directory_are_refused() {
        let outer = tempfile::tempdir().unwrap();
        let d = outer.path().join("run");
        std::fs::create_dir_all(&d).unwrap();
        let victim = outer.path().join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        let mut c = Commits::open(&d, "j", "cfg", 2, 1, false, true, false).unwrap();
        for name in [
            "../victim",
            victim.to_str().unwrap(),
            "checkpoints/../../victim",
            "",
        ] {
            let mut bad = commit(&d, 1, b"x");
            bad.checkpoint = name.to_string();
            bad.bytes = 8;
            let e = c.record(bad).unwrap_err();
            assert!(
                e.contains("not a relative path inside the run"),
                "{name}: {e}"
            );
        }
        c.record(commit(&d, 2, b"y")).unwrap();
        c.record(commit(&d, 3, b"z")).unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");

        let text = std::fs::read_to_string(d.join(STATE_FILE)).unwrap();
        assert!(parse_state(&text).is_ok());
        let hostile = text.replace("checkpoints/step-3.safetensors", "../victim");
        let e = parse_state(&hostile).unwrap_err();
        assert!(e.contains("\"../victim\""), "{e}");
        let e = Commits::open(&d, "j", "cfg", 2, 1, true, true, false).unwrap();
        assert_eq!(e.resumed().unwrap().step, 3);
    }
}
