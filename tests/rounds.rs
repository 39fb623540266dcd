//! Pseudo-label refresh rounds end to end: 2 workers, 2 rounds over a small pool, the coordinator killed
//! between INFER and SELECT (and, separately, a worker killed inside INFER) and the job resumed; the
//! pseudo-label set and the result must equal an uninterrupted run's.

mod common;
use common::*;
use std::path::Path;

fn config(manifest: &Path) -> String {
    format!(
        "[job]\nname = \"rounds\"\nseed = 3\n[data]\nmanifest = \"{}\"\nlabels_per_class = 20\n\
         unlabeled_split = \"train\"\nunlabeled_ratio = 2\n[model]\nkind = \"conv_base\"\nchannels = 16\n\
         [optim]\nkind = \"adam\"\nlr = 0.01\n[train]\nepochs = 4\nbatch_size = 40\neval_every = 4\n\
         [augment]\nlabeled = \"weak\"\n\
         [pseudo_label]\nrounds = 2\nthreshold = 0.5\ntop_k_per_class = 150\nnoisy = true\n\
         [cluster]\nheartbeat_interval_ms = 200\nheartbeat_timeout_ms = 5000\n",
        manifest.display()
    )
}

fn run(cfg: &Path, out: &Path, extra: &[&str], fault: Option<&str>) -> std::process::Output {
    let mut c = butler();
    c.arg("run")
        .arg(cfg)
        .args(["--workers", "2", "--threads", "1", "--out"])
        .arg(out)
        .args(extra);
    if let Some(f) = fault {
        c.env("BUTLER_FAULT", f);
    }
    c.output().unwrap()
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(
        &std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
    )
    .unwrap()
}

/// The log without terminal colour codes.
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The sidecars of a set, file name → bytes.
fn sidecars(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    v.sort();
    v
}

#[test]
fn killed_coordinator_or_worker_resumes_to_the_same_pseudo_labels() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write(dir.path(), "rounds.toml", &config(&mnist1d()));

    let straight = dir.path().join("straight");
    let o = run(&cfg, &straight, &[], None);
    assert!(o.status.success(), "uninterrupted run: {}", stderr(&o));

    let broken = dir.path().join("broken");
    let o = run(&cfg, &broken, &[], Some("coordinator-exit-before-select:0"));
    assert!(
        !o.status.success(),
        "the fault hook should have killed the coordinator"
    );
    assert!(!broken.join("summary.json").exists());
    let state = json(&broken.join("rounds/state.json"));
    assert_eq!(state["phase"], "infer", "{state}");
    assert_eq!(state["histograms"].as_object().unwrap().len(), 2, "{state}");
    assert!(!broken.join("rounds/set-1/selection.json").exists());

    let o = run(&cfg, &broken, &["--resume"], None);
    assert!(o.status.success(), "resumed run: {}", stderr(&o));
    let log = std::fs::read_to_string(broken.join("logs/coordinator.log")).unwrap();
    assert!(log.contains("resuming pseudo-label rounds"), "{log}");

    // The same set: the selection rule, and the predictions it is applied to.
    let (a, b) = (
        json(&straight.join("rounds/set-1/selection.json")),
        json(&broken.join("rounds/set-1/selection.json")),
    );
    assert_eq!(a, b);
    let selected: u64 = a["selected"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert!(
        selected > 0 && selected < 4000,
        "the set selects {selected} of 4000"
    );
    let labels = |run: &Path| sidecars(&run.join("rounds/set-1/labels"));
    assert_eq!(labels(&straight).len(), 4, "one sidecar per shard");
    assert_eq!(labels(&straight), labels(&broken));

    // And the same trained result, round by round.
    let (sa, sb) = (
        json(&straight.join("summary.json")),
        json(&broken.join("summary.json")),
    );
    assert_eq!(sa["rounds"], sb["rounds"]);
    assert_eq!(sa["test_accuracy"], sb["test_accuracy"]);
    assert_eq!(sa["rounds"].as_array().unwrap().len(), 2);

    // A worker dying in the middle of INFER: the resumed job keeps the sidecar it finished and ends
    // with the same set.
    let worker_died = dir.path().join("worker-died");
    let o = run(&cfg, &worker_died, &[], Some("worker-exit-after-sidecar:0"));
    assert!(
        !o.status.success(),
        "the fault hook should have killed rank 1"
    );
    let state = json(&worker_died.join("rounds/state.json"));
    assert_eq!(state["phase"], "infer", "{state}");
    let o = run(&cfg, &worker_died, &["--resume"], None);
    assert!(
        o.status.success(),
        "resumed after a worker death: {}",
        stderr(&o)
    );
    let log = strip_ansi(&std::fs::read_to_string(worker_died.join("logs/worker-1.log")).unwrap());
    assert!(
        log.contains("labeled=1 reused=1"),
        "rank 1 should reuse its finished sidecar: {log}"
    );
    assert_eq!(json(&worker_died.join("rounds/set-1/selection.json")), a);
    assert_eq!(labels(&worker_died), labels(&straight));
    assert_eq!(
        json(&worker_died.join("summary.json"))["test_accuracy"],
        sa["test_accuracy"]
    );
}
