//! `butler report RUN_DIR`: one self-contained `report.html` for a run directory — loss, accuracy and
//! learning-rate curves, throughput overall and per rank, the per-rank step-time split, membership
//! changes and restarts marked on the curves, pseudo-label rounds and stages, the final metrics and
//! the job config. Charts are inline SVG and the page has no script, so it opens anywhere, offline.
//!
//! It reads `summary.json` and `metrics.jsonl` (every run has them) and, when present, `steps.jsonl`,
//! `events.jsonl` and `job.toml` (see `data.rs` for the formats; all read leniently).

mod chart;
mod data;
mod page;

use anyhow::{Context, Result};
use std::path::{Path, PathBuf};

pub const REPORT_FILE: &str = "report.html";

#[derive(clap::Args)]
pub struct ReportArgs {
    /// The run directory (`butler run --out`, or a coordinator's `--run-dir`).
    pub run_dir: PathBuf,
    /// Where to write the page (default: RUN_DIR/report.html).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

pub fn run(args: ReportArgs) -> Result<()> {
    let out = args.out.unwrap_or_else(|| args.run_dir.join(REPORT_FILE));
    let path = write_report_to(&args.run_dir, &out)?;
    println!("report: {}", path.display());
    Ok(())
}

/// Writes `RUN_DIR/report.html` and returns its path.
pub fn write_report(run_dir: &Path) -> Result<PathBuf> {
    write_report_to(run_dir, &run_dir.join(REPORT_FILE))
}

/// Writes the report of `run_dir` to `out` (atomically: a reader never sees half a page).
pub fn write_report_to(run_dir: &Path, out: &Path) -> Result<PathBuf> {
    let run = data::RunData::load(run_dir)
        .with_context(|| format!("reading the run directory {}", run_dir.display()))?;
    let html = page::render(&run).context("drawing the report")?;
    butler_common::fsutil::write_atomic(out, html.as_bytes())
        .with_context(|| format!("writing {}", out.display()))?;
    Ok(out.to_path_buf())
}
