//! `butler report`: the page drawn from run directories written here (every file the coordinator
//! writes, or only today's summary.json + metrics.jsonl), and the page as headless Chromium renders
//! it from a real run (`scripts/report-check.sh`).

mod common;

use common::{butler, repo, stderr, write};
use std::path::Path;

const CONFIG: &str =
    "[job]\nname = \"fixture <&> job\"\nseed = 0\n\n[data]\nmanifest = \"data/mnist1d\"\n\
                      # a comment with <b>markup</b> & an ampersand\n";

fn summary(extra: &str) -> String {
    format!(
        r#"{{"job":"fixture","test_accuracy":0.8125,"test_loss":0.61,"val_accuracy":0.8,"world_size":2,
        "generation":2,"epochs":4,"samples_per_second":5400.5,"wall_seconds":31.5,
        "checkpoint":"checkpoints/final.safetensors","late_rank_share":{{"1":0.2}},
        "history":[{{"epoch":0,"train_loss":2.0,"train_samples":400,"train_seconds":1.0,"learning_rate":0.01,"test_accuracy":null,"test_loss":null}}]{extra}}}"#
    )
}

fn metrics() -> String {
    (0..4)
        .map(|e| {
            format!(
                r#"{{"epoch":{e},"train_loss":{},"train_samples":400,"train_seconds":0.5,"learning_rate":{},"test_accuracy":null,"test_loss":null,"val_accuracy":{},"val_loss":{}}}"#,
                2.0 - 0.4 * e as f64,
                0.01 / (e + 1) as f64,
                0.5 + 0.1 * e as f64,
                1.5 - 0.2 * e as f64
            ) + "\n"
        })
        .collect()
}

fn steps() -> String {
    let mut out = String::new();
    for i in 1..=8u64 {
        let generation = if i > 5 { 1 } else { 0 };
        let ranks = if generation == 0 { 2 } else { 1 };
        let rank_rows: Vec<String> = (0..ranks)
            .map(|r| {
                format!(
                    r#"{{"rank":{r},"data_seconds":0.001,"compute_seconds":{},"comm_seconds":0.002,"optim_seconds":0.0005,"samples_per_second":{},"lateness_seconds":{},"future_field":true}}"#,
                    0.01 + 0.01 * r as f64,
                    2700.0 - 900.0 * r as f64,
                    0.01 * r as f64
                )
            })
            .collect();
        out += &format!(
            r#"{{"step":{},"epoch":{},"generation":{generation},"wall_seconds":{},"scalars":{{"train/loss":{},"train/loss_labeled":0.4,"train/loss_unlabeled":0.12,"train/lr":0.01,"train/mask_ratio":{},"train/samples_per_second":5400.0}},"ranks":[{}]}}"#,
            i * 10,
            i / 2,
            i as f64 * 1.5,
            2.0 / i as f64,
            0.1 * i as f64,
            rank_rows.join(",")
        );
        out.push('\n');
    }
    // A line cut short by a crash is skipped, not fatal.
    out += r#"{"step":90,"scalars":{"train/lo"#;
    out
}

const EVENTS: &str = concat!(
    r#"{"wall_seconds":9.0,"step":50,"epoch":2,"generation":1,"kind":"regroup","detail":"rank 1 lost; world 2 -> 1"}"#,
    "\n",
    r#"{"wall_seconds":9.5,"step":55,"epoch":2,"generation":1,"kind":"late_rank","detail":"rank <1> late in compute"}"#,
    "\n",
    r#"{"wall_seconds":12.0,"step":70,"epoch":3,"generation":2,"kind":"join","detail":"world 1 -> 2","extra":1}"#,
    "\n",
);

fn report(dir: &Path) -> String {
    let o = butler().arg("report").arg(dir).output().unwrap();
    assert!(o.status.success(), "butler report failed: {}", stderr(&o));
    let stdout = String::from_utf8_lossy(&o.stdout);
    let path = dir.join("report.html");
    assert_eq!(stdout.trim(), format!("report: {}", path.display()));
    std::fs::read_to_string(path).unwrap()
}

/// A chart's text (title, axis label, legend entry, mark label): plotters writes a `<text>` element's
/// content on a line of its own.
fn has_text(html: &str, text: &str) -> bool {
    html.contains(&format!(">\n{text}\n</text>"))
}

fn count(html: &str, what: &str) -> usize {
    html.matches(what).count()
}

#[test]
fn a_full_run_directory_gives_every_section() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write(d, "summary.json", &summary(""));
    write(d, "metrics.jsonl", &metrics());
    write(d, "steps.jsonl", &steps());
    write(d, "events.jsonl", EVENTS);
    write(d, "job.toml", CONFIG);
    let html = report(d);

    assert!(html.starts_with("<!DOCTYPE html>"));
    // Self-contained: no script, stylesheet or image to fetch.
    for outside in ["<script", "<link", "src=", "url("] {
        assert!(
            !html.contains(outside),
            "the page refers to something outside: {outside}"
        );
    }
    // Per epoch: loss, accuracy, lr, throughput; per step: losses, lr, mask ratio; ranks: throughput,
    // step-time split, lateness.
    let charts = count(&html, "<figure class=\"chart\"");
    assert_eq!(charts, 10, "{html}");
    assert_eq!(count(&html, "<svg"), charts);
    for title in [
        "Loss",
        "Accuracy",
        "Learning rate (end of epoch)",
        "Throughput, whole world",
        "Loss per step",
        "train/mask_ratio",
        "Mean step time per rank",
        "Lateness per rank",
    ] {
        assert!(has_text(&html, title), "missing chart {title}");
    }
    for legend in [
        "loss_labeled",
        "loss_unlabeled",
        "rank 0",
        "rank 1",
        "compute",
        "comm",
        "optimizer",
        "validation",
    ] {
        assert!(has_text(&html, legend), "missing legend entry {legend}");
    }
    // The regroup (event 1) and the join (event 3) are drawn on the epoch and step curves; the late
    // rank (event 2) is listed only.
    assert_eq!(count(&html, "data-marks=\"2\""), 9, "the curves with marks");
    assert!(has_text(&html, "regroup") && has_text(&html, "join"));
    assert!(html.contains("rank 1 lost; world 2 -&gt; 1"));
    assert!(html.contains("rank &lt;1&gt; late in compute"));
    // The config verbatim, escaped.
    assert!(html.contains(
        "name = &quot;fixture &lt;&amp;&gt; job&quot;\nseed = 0\n\n[data]\nmanifest = &quot;data/mnist1d&quot;\n\
         # a comment with &lt;b&gt;markup&lt;/b&gt; &amp; an ampersand"
    ));
    assert!(!html.contains("<b>markup"));
    // The final table: every top-level field but the drawn ones.
    for cell in [
        "<th>test_accuracy</th><td class=\"num\">0.8125</td>",
        "<th>samples_per_second</th><td class=\"num\">5400.5</td>",
        "<th>late_rank_share</th>",
    ] {
        assert!(html.contains(cell), "missing {cell}");
    }
    assert!(!html.contains("<th>history</th>"));
    // The per-rank table and the note about the truncated line.
    assert!(html.contains("<table class=\"ranks\">"));
    assert!(
        html.contains("steps.jsonl: skipped 1 unreadable line(s) (line 9)"),
        "{html}"
    );
}

#[test]
fn todays_run_directory_summary_and_metrics_only() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write(d, "summary.json", &summary(""));
    write(d, "metrics.jsonl", &metrics());
    let html = report(d);
    assert_eq!(count(&html, "<figure class=\"chart\""), 4);
    assert_eq!(count(&html, "data-marks=\"0\""), 4);
    assert!(html.contains("Per-rank throughput and step times come from steps.jsonl"));
    // A second generation without events: said, not drawn.
    assert!(html.contains("The job ended in generation 2"));
    assert!(html.contains("No job.toml in the run directory."));
    assert!(html.contains("<title>butler report — fixture</title>"));
}

#[test]
fn pseudo_label_rounds_and_stages_are_shown_as_such() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Three rounds over 4 epochs each: the worker numbers round r's epochs r·4 .. r·4 + 3.
    let rounds = r#","rounds":[{"round":0,"test_accuracy":0.5,"pseudo_labels_per_class":[]},
        {"round":1,"test_accuracy":0.6,"pseudo_labels_per_class":[10,20]},
        {"round":2,"test_accuracy":0.7,"pseudo_labels_per_class":[30,40]}]"#;
    write(d, "summary.json", &summary(rounds));
    let metrics: String = (0..12)
        .map(|e| format!(r#"{{"epoch":{e},"train_loss":1.0,"train_samples":10,"train_seconds":1.0,"learning_rate":0.1}}"#) + "\n")
        .collect();
    write(d, "metrics.jsonl", &metrics);
    let html = report(d);
    assert!(html.contains("<h2 id=\"rounds\">Pseudo-label rounds</h2>"));
    assert!(
        html.contains(
            "<td class=\"num\">2</td><td class=\"num\">0.7000</td><td class=\"num\">70</td>"
        ),
        "{html}"
    );
    assert!(has_text(&html, "Test accuracy after each round"));
    // Rounds 1 and 2 start at epochs 4 and 8: marked r1, r2 on the epoch curves (loss, lr,
    // throughput; these metrics have no accuracy).
    assert_eq!(count(&html, "data-marks=\"2\""), 3);
    assert!(has_text(&html, "r1") && has_text(&html, "r2"));

    let stages = r#","stages":[{"stage":"pretrain","train_loss":3.1,"loss_history":[5.0,4.0,3.1],"steps":30,"samples":3000,"seconds":10.0,"test_accuracy":null,"checkpoint":"checkpoints/pretrain.safetensors"},
        {"stage":"probe","train_loss":0.9,"loss_history":[1.2,0.9],"steps":2,"samples":800,"seconds":0.5,"test_accuracy":0.48,"checkpoint":"checkpoints/probe.safetensors"}]"#;
    write(d, "summary.json", &summary(stages));
    let html = report(d);
    assert!(html.contains("<h2 id=\"stages\">Stages</h2>"));
    assert!(html.contains("<h2 id=\"epochs\">Per epoch (fine-tuning stage)</h2>"));
    assert!(has_text(&html, "Training loss per stage"));
    assert!(has_text(&html, "pretrain") && has_text(&html, "probe"));
    assert!(html.contains("checkpoints/probe.safetensors"));
}

#[test]
fn an_unfinished_job_and_an_explicit_out() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write(d, "metrics.jsonl", &metrics());
    let out = d.join("elsewhere.html");
    let o = butler()
        .arg("report")
        .arg(d)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let html = std::fs::read_to_string(&out).unwrap();
    assert!(html.contains("summary.json is absent: the job has not finished"));
    assert!(has_text(&html, "Loss"));
    assert!(!d.join("report.html").exists());
}

#[test]
fn a_directory_without_metrics_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let o = butler().arg("report").arg(dir.path()).output().unwrap();
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("holds neither summary.json nor metrics.jsonl"),
        "{}",
        stderr(&o)
    );
    write(dir.path(), "summary.json", "{\"job\": ");
    let o = butler().arg("report").arg(dir.path()).output().unwrap();
    assert!(!o.status.success());
    assert!(stderr(&o).contains("summary.json"), "{}", stderr(&o));
}

fn chromium() -> Option<String> {
    let path = std::env::var_os("PATH")?;
    ["chromium", "chromium-browser"].into_iter().find_map(|b| {
        std::env::split_paths(&path)
            .map(|d| d.join(b))
            .find(|p| p.is_file())
            .map(|p| p.display().to_string())
    })
}

/// A real 2-worker run (a shortened examples/mnist1d-40-uda.toml), its report rendered by headless
/// Chromium: charts present, no console message, a screenshot taken.
#[test]
fn the_report_of_a_real_run_renders_in_headless_chromium() {
    if chromium().is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI is set but Chromium is not installed: run scripts/setup-chromium.sh (the run report's \
             browser check needs Debian's chromium package)"
        );
        eprintln!("skipped: no Chromium on PATH (scripts/setup-chromium.sh installs it)");
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let o = std::process::Command::new("bash")
        .arg(repo().join("scripts/report-check.sh"))
        .arg("--work")
        .arg(work.path())
        .env("BUTLER", env!("CARGO_BIN_EXE_butler"))
        .current_dir(repo())
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "scripts/report-check.sh failed:\n{out}\n{}",
        stderr(&o)
    );
    assert!(out.contains("report-check: OK"), "{out}");
    assert!(work.path().join("report.png").exists());
}
