//! Seeing a running job: TensorBoard files, steps/events logs, the late rank, Prometheus `/metrics`
//! scraped from a live coordinator, `butler status`, and plain (escape-free) log files.

mod common;

use common::*;
use std::io::{Read, Write};
use std::time::{Duration, Instant};

fn config(extra: &str) -> String {
    format!(
        "[job]\nname = \"observe\"\nseed = 1\n[data]\nmanifest = \"{}\"\n[model]\nkind = \"conv_base\"\n\
         [optim]\nkind = \"adam\"\nlr = 0.01\n[train]\nepochs = 3\nbatch_size = 50\n\
         [metrics]\nevery_steps = 5\n{extra}",
        mnist1d().display()
    )
}

fn http_get(addr: &str, path: &str) -> Option<String> {
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

#[test]
fn a_slow_rank_is_named_late_with_its_data_phase_and_every_sink_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write(dir.path(), "job.toml", &config(""));
    let out = dir.path().join("run");
    let o = butler()
        .args(["run"])
        .arg(&cfg)
        .args(["--workers", "2", "--out"])
        .arg(&out)
        // Test switch: the last rank waits 25 ms more for every batch.
        .env("BUTLER_SLOW_DATA_MS", "25")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));

    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    let late = summary["late_ranks"]
        .as_array()
        .expect("summary.json names the late rank");
    assert_eq!(late[0]["rank"], 1, "{late:?}");
    assert_eq!(late[0]["phase"], "data", "{late:?}");
    assert!(
        late[0]["lateness_seconds"].as_f64().unwrap() > 0.015,
        "{late:?}"
    );
    let log = std::fs::read_to_string(out.join("logs/coordinator.log")).unwrap();
    assert!(log.contains("late rank") && log.contains("rank=1"), "{log}");
    let events = std::fs::read_to_string(out.join("events.jsonl")).unwrap();
    assert!(events.contains("\"late_rank\""), "{events}");

    // steps.jsonl: one line per 5 steps (`batch_size` is the global batch: one step per 50 training
    // samples), every rank timed.
    let steps: Vec<serde_json::Value> = std::fs::read_to_string(out.join("steps.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let total_steps = summary["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["train_samples"].as_u64().unwrap())
        .sum::<u64>()
        / 50;
    assert_eq!(steps.len() as u64, total_steps / 5);
    for s in &steps {
        assert_eq!(s["ranks"].as_array().unwrap().len(), 2, "{s}");
        assert!(s["scalars"]["train/loss"].as_f64().unwrap() > 0.0);
    }

    // TensorBoard: both CRCs of every record check out, and every point is there.
    let tb = butler_coordinator::tb::read_scalars(&out.join("tb")).unwrap();
    assert_eq!(tb["train/loss"].len(), steps.len());
    assert_eq!(tb["train/lr"].len(), steps.len());
    assert_eq!(tb["rank/data_seconds/rank_1"].len(), steps.len());
    assert_eq!(tb["epoch/train_loss"].len(), 3);
    assert_eq!(tb["epoch/test_accuracy"].len(), 3);
    let last = tb["train/loss"].last().unwrap();
    assert_eq!(
        last.0 as u64,
        steps.last().unwrap()["step"].as_u64().unwrap()
    );

    // Log files carry no terminal escapes, and every worker line names its rank and generation.
    for f in ["coordinator.log", "worker-0.log", "worker-1.log"] {
        let text = std::fs::read_to_string(out.join("logs").join(f)).unwrap();
        assert!(!text.contains('\u{1b}'), "{f} holds ANSI escapes");
    }
    let w = std::fs::read_to_string(out.join("logs/worker-1.log")).unwrap();
    let lines: Vec<&str> = w.lines().filter(|l| l.contains("INFO")).collect();
    assert!(lines.len() > 2);
    assert!(
        lines
            .iter()
            .skip(1)
            .all(|l| l.contains("rank=1") && l.contains("generation=")),
        "{w}"
    );
}

#[test]
fn json_logs_carry_rank_and_generation_on_every_worker_line() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write(dir.path(), "job.toml", &config(""));
    let out = dir.path().join("run");
    let o = butler()
        .args(["run", "--log-format", "json"])
        .arg(&cfg)
        .args(["--workers", "2", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    // (That even ranks are not named late is a unit test of the rule in `observe.rs`: on 2 shared cores
    // with other tests running, real ranks are not even.)
    for (f, rank) in [("worker-0.log", 0), ("worker-1.log", 1)] {
        let text = std::fs::read_to_string(out.join("logs").join(f)).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{f}: {e}: {l}")))
            .collect();
        assert!(lines.len() > 2, "{text}");
        for l in &lines {
            assert_eq!(l["span"]["rank"], rank, "{l}");
            assert_eq!(l["span"]["generation"], 1, "{l}");
        }
    }
    let c = std::fs::read_to_string(out.join("logs/coordinator.log")).unwrap();
    assert!(
        c.lines()
            .all(|l| serde_json::from_str::<serde_json::Value>(l).is_ok()),
        "{c}"
    );
}

#[test]
fn a_live_coordinator_is_scraped_and_statused_and_a_hung_rank_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write(
        dir.path(),
        "job.toml",
        &config(
            "[cluster]\nstall_timeout_ms = 6000\ncollective_timeout_ms = 120000\nheartbeat_interval_ms = 200\n",
        ),
    );
    let out = dir.path().join("run");
    let metrics = format!("127.0.0.1:{}", free_port());
    let mut run = butler()
        .args(["run"])
        .arg(&cfg)
        .args(["--workers", "2", "--metrics-listen", &metrics, "--out"])
        .arg(&out)
        .env("BUTLER_TOKEN", "observe-token")
        .env("BUTLER_FAULT", "worker-hang-at-step:12")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let addr = wait_for_file(&out.join("coordinator.addr"), Duration::from_secs(30));
    let url = format!("http://{}", addr.trim());

    // Scrape until the job has reported steps (rank 1 hangs after step 12, rank 0 waits for it).
    let t0 = Instant::now();
    let text = loop {
        if let Some(t) = http_get(&metrics, "/metrics") {
            if t.contains("butler_global_step 10.0") {
                break t;
            }
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "no step 10 on /metrics"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(text.starts_with("HTTP/1.1 200 OK"), "{text}");
    assert!(text.contains("application/openmetrics-text"), "{text}");
    for needle in [
        "butler_generation 1.0",
        "butler_world_size 2.0",
        "butler_ranks{state=\"running\"} 2.0",
        "butler_rank_info{rank=\"1\",host=\"127.0.0.1\",gpu=\"cpu\"} 1.0",
        "butler_step_phase_seconds{rank=\"1\",phase=\"compute\"}",
        "butler_heartbeat_age_seconds{rank=\"0\"}",
        "butler_train_samples_total",
        "# EOF",
    ] {
        assert!(text.contains(needle), "{needle} missing:\n{text}");
    }
    assert!(http_get(&metrics, "/nothing")
        .unwrap()
        .starts_with("HTTP/1.1 404"));

    // `butler status`: refused without the token, answered with it.
    let o = butler()
        .args([
            "status",
            "--json",
            "--coordinator",
            &url,
            "--token",
            "wrong",
        ])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("missing or wrong job token"),
        "{}",
        stderr(&o)
    );
    let o = butler()
        .args(["status", "--json", "--coordinator", &url])
        .env("BUTLER_TOKEN", "observe-token")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let doc: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(doc["job"], "observe");
    assert_eq!(doc["world_size"], 2);
    let ranks = doc["ranks"].as_array().unwrap();
    assert_eq!(ranks.len(), 2);
    assert_eq!(ranks[1]["state"], "running");
    assert!(ranks[1]["timing"]["steps"].as_u64().unwrap() >= 10, "{doc}");
    let o = butler()
        .args(["status", "--coordinator", &url])
        .env("BUTLER_TOKEN", "observe-token")
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&o.stdout);
    assert!(
        table.contains("job observe") && table.contains("data ms"),
        "{table}"
    );

    // The hang: the stall names rank 1 and how far each rank got in the collectives.
    let status = run.wait().unwrap();
    assert!(!status.success(), "a hung rank must fail the job");
    let events = std::fs::read_to_string(out.join("events.jsonl")).unwrap();
    let stall = events
        .lines()
        .find(|l| l.contains("\"stall\""))
        .unwrap_or_else(|| panic!("no stall event:\n{events}"));
    assert!(
        stall.contains("rank 1 is alive but made no progress") && stall.contains("rank 1 entered"),
        "{stall}"
    );
}
