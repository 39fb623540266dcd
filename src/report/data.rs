//! The run directory's files as the report reads them: leniently. A field may be missing, null or
//! unknown (the files grow as butler does, and a report of a running or failed job reads half-written
//! files), and a line that cannot be read is skipped and counted instead of failing the report.

use anyhow::{bail, Context, Result};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// One line of `metrics.jsonl` (or one entry of `summary.json`'s `history`): an epoch over all ranks.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct EpochRow {
    pub epoch: u64,
    pub train_loss: Option<f64>,
    pub train_samples: Option<f64>,
    pub train_seconds: Option<f64>,
    pub learning_rate: Option<f64>,
    pub test_accuracy: Option<f64>,
    pub test_loss: Option<f64>,
    pub val_accuracy: Option<f64>,
    pub val_loss: Option<f64>,
}

impl EpochRow {
    /// The world's training throughput in the epoch.
    pub fn samples_per_second(&self) -> Option<f64> {
        match (self.train_samples, self.train_seconds) {
            (Some(n), Some(s)) if s > 0.0 => Some(n / s),
            _ => None,
        }
    }
}

/// One rank's share of a `steps.jsonl` line: means per step over the window since the previous line.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct RankRow {
    pub rank: u32,
    pub data_seconds: Option<f64>,
    pub compute_seconds: Option<f64>,
    pub comm_seconds: Option<f64>,
    pub optim_seconds: Option<f64>,
    pub samples_per_second: Option<f64>,
    pub lateness_seconds: Option<f64>,
}

/// One line of `steps.jsonl`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct StepRow {
    pub step: u64,
    pub epoch: Option<u64>,
    pub generation: Option<u64>,
    pub wall_seconds: Option<f64>,
    /// Any tag; values that are not numbers are dropped by [`StepRow::scalar`].
    pub scalars: BTreeMap<String, serde_json::Value>,
    pub ranks: Vec<RankRow>,
}

impl StepRow {
    pub fn scalar(&self, tag: &str) -> Option<f64> {
        self.scalars.get(tag).and_then(serde_json::Value::as_f64)
    }
}

/// One line of `events.jsonl`: something that happened to the job (regroup, join, restart, resume,
/// round, stage, late_rank, stall, or a kind this report does not know yet).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct EventRow {
    pub wall_seconds: Option<f64>,
    pub step: Option<u64>,
    pub epoch: Option<u64>,
    pub generation: Option<u64>,
    pub kind: String,
    pub detail: String,
}

/// A pseudo-label round of `summary.json`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct RoundRow {
    pub round: u32,
    pub test_accuracy: Option<f64>,
    pub pseudo_labels_per_class: Vec<u64>,
}

/// A stage of a staged job in `summary.json`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct StageRow {
    pub stage: String,
    pub train_loss: Option<f64>,
    pub loss_history: Vec<f64>,
    pub steps: Option<u64>,
    pub samples: Option<u64>,
    pub seconds: Option<f64>,
    pub test_accuracy: Option<f64>,
    pub checkpoint: Option<String>,
}

/// The parts of `summary.json` the report draws; the final table shows every top-level field of
/// [`Summary::raw`].
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct SummaryView {
    pub job: Option<String>,
    pub generation: Option<u64>,
    pub history: Vec<EpochRow>,
    pub rounds: Option<Vec<RoundRow>>,
    pub stages: Vec<StageRow>,
}

pub struct Summary {
    pub raw: serde_json::Map<String, serde_json::Value>,
    pub view: SummaryView,
}

/// Everything the report shows, read from one run directory.
pub struct RunData {
    pub dir: PathBuf,
    pub summary: Option<Summary>,
    /// From `metrics.jsonl`, else `summary.json`'s history; sorted by epoch, one row per epoch.
    pub epochs: Vec<EpochRow>,
    pub steps: Vec<StepRow>,
    pub events: Vec<EventRow>,
    /// `job.toml`, verbatim.
    pub config: Option<String>,
    /// What the reader had to skip or could not find, said in the report.
    pub notes: Vec<String>,
}

pub const SUMMARY: &str = "summary.json";
pub const METRICS: &str = "metrics.jsonl";
pub const STEPS: &str = "steps.jsonl";
pub const EVENTS: &str = "events.jsonl";
pub const CONFIG: &str = "job.toml";

impl RunData {
    /// Reads a run directory. It needs `summary.json` or `metrics.jsonl`; every other file is optional.
    pub fn load(dir: &Path) -> Result<RunData> {
        if !dir.is_dir() {
            bail!("{} is not a directory", dir.display());
        }
        let mut notes = Vec::new();
        let summary = match read_optional(&dir.join(SUMMARY))? {
            Some(text) => Some(
                parse_summary(&text)
                    .with_context(|| format!("reading {}", dir.join(SUMMARY).display()))?,
            ),
            None => None,
        };
        let metrics = read_optional(&dir.join(METRICS))?;
        if summary.is_none() && metrics.is_none() {
            bail!(
                "{} holds neither {SUMMARY} nor {METRICS}: is it a butler run directory?",
                dir.display()
            );
        }
        if summary.is_none() {
            notes.push(format!(
                "{SUMMARY} is absent: the job has not finished (or failed); the curves show what \
                 {METRICS} holds so far."
            ));
        }
        let mut epochs: Vec<EpochRow> = match &metrics {
            Some(text) => parse_lines(text, METRICS, &mut notes),
            None => Vec::new(),
        };
        if epochs.is_empty() {
            if let Some(s) = &summary {
                epochs = s.view.history.clone();
            }
        }
        // A resumed job rewrites its metrics; should an epoch still appear twice, the later line wins.
        epochs.reverse();
        epochs.sort_by_key(|r| r.epoch);
        epochs.dedup_by_key(|r| r.epoch);

        let mut steps: Vec<StepRow> = match read_optional(&dir.join(STEPS))? {
            Some(text) => parse_lines(&text, STEPS, &mut notes),
            None => Vec::new(),
        };
        steps.sort_by_key(|s| s.step);
        let mut events: Vec<EventRow> = match read_optional(&dir.join(EVENTS))? {
            Some(text) => parse_lines(&text, EVENTS, &mut notes),
            None => Vec::new(),
        };
        events.sort_by(|a, b| {
            (a.wall_seconds.unwrap_or(0.0), a.step)
                .partial_cmp(&(b.wall_seconds.unwrap_or(0.0), b.step))
                .unwrap_or(std::cmp::Ordering::Equal)
        });
        let config = read_optional(&dir.join(CONFIG))?;
        Ok(RunData {
            dir: dir.to_path_buf(),
            summary,
            epochs,
            steps,
            events,
            config,
            notes,
        })
    }

    pub fn job_name(&self) -> String {
        self.summary
            .as_ref()
            .and_then(|s| s.view.job.clone())
            .or_else(|| config_job_name(self.config.as_deref()?))
            .unwrap_or_else(|| {
                self.dir
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_else(|| "run".into())
            })
    }
}

/// `[job] name` of a job config, without parsing it strictly (the report must not refuse a config
/// from another butler version).
fn config_job_name(config: &str) -> Option<String> {
    let table: toml::Table = config.parse().ok()?;
    Some(table.get("job")?.get("name")?.as_str()?.to_string())
}

fn read_optional(path: &Path) -> Result<Option<String>> {
    match std::fs::read(path) {
        // Lossy: a report must not fail on one bad byte in a log-like file.
        Ok(bytes) => Ok(Some(String::from_utf8_lossy(&bytes).into_owned())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

fn parse_summary(text: &str) -> Result<Summary> {
    let value: serde_json::Value = serde_json::from_str(text)?;
    let serde_json::Value::Object(raw) = value else {
        bail!("not a JSON object");
    };
    let view = serde_json::from_value(serde_json::Value::Object(raw.clone()))?;
    Ok(Summary { raw, view })
}

/// JSON lines; blank lines are ignored, unreadable ones (a line cut by a crash, a wrong type) skipped
/// and counted in `notes`.
pub fn parse_lines<T: DeserializeOwned>(text: &str, file: &str, notes: &mut Vec<String>) -> Vec<T> {
    let mut rows = Vec::new();
    let mut bad = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str(line) {
            Ok(row) => rows.push(row),
            Err(_) => bad.push(i + 1),
        }
    }
    if !bad.is_empty() {
        let shown: Vec<String> = bad.iter().take(5).map(|l| l.to_string()).collect();
        let more = if bad.len() > 5 { ", …" } else { "" };
        notes.push(format!(
            "{file}: skipped {} unreadable line(s) (line {}{more}).",
            bad.len(),
            shown.join(", ")
        ));
    }
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_read_leniently() {
        let text = concat!(
            r#"{"step":10,"scalars":{"train/loss":0.5,"note":"x"},"unknown":[1,2]}"#,
            "\n\n",
            r#"{"step":20,"scalars":{"train/loss":null}"#,
            "\n",
            r#"{"step":30,"ranks":[{"rank":1,"compute_seconds":0.01}]}"#,
            "\n",
        );
        let mut notes = Vec::new();
        let rows: Vec<StepRow> = parse_lines(text, STEPS, &mut notes);
        assert_eq!(rows.len(), 2, "the truncated line is skipped");
        assert_eq!(rows[0].scalar("train/loss"), Some(0.5));
        assert_eq!(rows[0].scalar("note"), None, "a string is not a scalar");
        assert_eq!(rows[1].ranks[0].rank, 1);
        assert_eq!(rows[1].ranks[0].data_seconds, None);
        assert_eq!(notes.len(), 1);
        assert!(notes[0].contains("line 3"), "{notes:?}");
    }

    #[test]
    fn epoch_rows_tolerate_nulls_and_missing_fields() {
        let rows: Vec<EpochRow> = parse_lines(
            r#"{"epoch":0,"train_loss":1.0,"test_accuracy":null,"train_samples":400,"train_seconds":2.0}"#,
            METRICS,
            &mut Vec::new(),
        );
        assert_eq!(rows[0].test_accuracy, None);
        assert_eq!(rows[0].samples_per_second(), Some(200.0));
        assert_eq!(rows[0].val_loss, None);
    }

    #[test]
    fn job_name_comes_from_the_config_when_there_is_no_summary() {
        assert_eq!(
            config_job_name("[job]\nname = \"abc\"\nseed = 0\n").as_deref(),
            Some("abc")
        );
        assert_eq!(config_job_name("not toml ["), None);
    }
}
