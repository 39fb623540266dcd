//! Bad input gets a clear error naming the cause, a non-zero exit, and nothing half-written.

mod common;
use common::*;
use std::io::Read;
use std::process::Stdio;
use std::time::{Duration, Instant};

fn run_job(config: &std::path::Path, out: &std::path::Path, workers: u32) -> std::process::Output {
    butler()
        .args(["run"])
        .arg(config)
        .args(["--workers", &workers.to_string(), "--out"])
        .arg(out)
        .output()
        .unwrap()
}

#[test]
fn unknown_config_key_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let text = small_config(&mnist1d(), "").replace("lr = 0.01", "lr = 0.01\nlearnig_rate = 0.1");
    let cfg = write(dir.path(), "job.toml", &text);
    let out = dir.path().join("run");
    let o = run_job(&cfg, &out, 1);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(e.contains("learnig_rate") && e.contains("job.toml"), "{e}");
    assert!(
        !out.exists(),
        "a rejected job must not create its run directory"
    );
}

#[test]
fn missing_config_key_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let text = small_config(&mnist1d(), "").replace("batch_size = 100\n", "");
    let cfg = write(dir.path(), "job.toml", &text);
    let o = run_job(&cfg, &dir.path().join("run"), 1);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("missing field `batch_size`"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn manifest_pointing_to_a_missing_shard_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    copy_dataset(&mnist1d(), &data);
    std::fs::remove_file(data.join("train-00002.safetensors")).unwrap();
    let cfg = write(dir.path(), "job.toml", &small_config(&data, ""));
    let out = dir.path().join("run");
    let o = run_job(&cfg, &out, 2);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(
        e.contains("train-00002.safetensors") && e.contains("missing"),
        "{e}"
    );
    assert!(!out.join("summary.json").exists());
}

#[test]
fn corrupt_shard_names_the_file_and_fails_the_job() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    copy_dataset(&mnist1d(), &data);
    let shard = data.join("train-00001.safetensors");
    let mut bytes = std::fs::read(&shard).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x55;
    std::fs::write(&shard, bytes).unwrap();
    let cfg = write(
        dir.path(),
        "job.toml",
        &small_config(
            &data,
            "heartbeat_timeout_ms = 5000\ncollective_timeout_ms = 5000",
        ),
    );
    let out = dir.path().join("run");
    let o = run_job(&cfg, &out, 2);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(
        e.contains("train-00001.safetensors") && e.contains("checksum mismatch"),
        "{e}"
    );
    assert!(!out.join("summary.json").exists());
}

#[test]
fn model_data_shape_mismatch_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    // conv_base takes 1-D sequences; digits are 1×8×8 images.
    let cfg = write(dir.path(), "job.toml", &small_config(&digits(), ""));
    let o = run_job(&cfg, &dir.path().join("run"), 1);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(e.contains("conv_base") && e.contains("[1, 8, 8]"), "{e}");

    let text = small_config(&mnist1d(), "").replace(
        "kind = \"conv_base\"",
        "kind = \"mlp\"\nhidden = [16]\ninput_dim = 64",
    );
    let cfg = write(dir.path(), "job2.toml", &text);
    let o = run_job(&cfg, &dir.path().join("run2"), 1);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("input_dim = 64"), "{}", stderr(&o));
}

#[test]
fn batch_not_divisible_by_workers_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write(dir.path(), "job.toml", &small_config(&mnist1d(), ""));
    let o = run_job(&cfg, &dir.path().join("run"), 3);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("not divisible by 3"), "{}", stderr(&o));
}

#[test]
fn worker_with_wrong_token_is_rejected_and_logged() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write(
        dir.path(),
        "job.toml",
        &small_config(&mnist1d(), "rendezvous_timeout_ms = 30000"),
    );
    let (mut coord, addr) = start_coordinator(&cfg, &dir.path().join("run"), 1, "right-token");
    let o = butler()
        .args([
            "worker",
            "--coordinator",
            &format!("http://{addr}"),
            "--connect-wait-s",
            "5",
        ])
        .env("BUTLER_TOKEN", "wrong-token")
        .output()
        .unwrap();
    coord.kill().unwrap();
    coord.wait().unwrap();
    let mut coord_log = String::new();
    coord
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut coord_log)
        .unwrap();
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(
        e.contains("Unauthenticated") && e.contains("token"),
        "worker said: {e}"
    );
    assert!(
        coord_log.contains("rejected RPC"),
        "coordinator log: {coord_log}"
    );
}

/// A worker killed mid-training: its peer fails with an error naming the dead rank (collective timeout or
/// closed connection), the coordinator fails the job, nobody hangs, no summary is written.
#[test]
fn killed_worker_fails_the_job_without_hanging() {
    let dir = tempfile::tempdir().unwrap();
    let text = small_config(
        &mnist1d(),
        "heartbeat_interval_ms = 200\nheartbeat_timeout_ms = 3000\ncollective_timeout_ms = 3000",
    )
    .replace("epochs = 2", "epochs = 500");
    let cfg = write(dir.path(), "job.toml", &text);
    let run = dir.path().join("run");
    let (mut coord, addr) = start_coordinator(&cfg, &run, 2, "t");
    let worker = |rank: u32| {
        butler()
            .args([
                "worker",
                "--coordinator",
                &format!("http://{addr}"),
                "--rank",
                &rank.to_string(),
                "--threads",
                "1",
            ])
            .env("BUTLER_TOKEN", "t")
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let mut w0 = worker(0);
    let mut w1 = worker(1);
    wait_for_file(&run.join("metrics.jsonl"), Duration::from_secs(60));
    w1.kill().unwrap();
    w1.wait().unwrap();
    let t0 = Instant::now();
    let status0 = w0.wait().unwrap();
    let coord_status = coord.wait().unwrap();
    let elapsed = t0.elapsed();
    let mut log0 = String::new();
    w0.stderr.take().unwrap().read_to_string(&mut log0).unwrap();
    assert!(!status0.success() && !coord_status.success());
    assert!(
        log0.contains("rank 1"),
        "worker 0 should name the dead rank: {log0}"
    );
    assert!(
        elapsed < Duration::from_secs(30),
        "took {elapsed:?} to notice a dead peer"
    );
    assert!(!run.join("summary.json").exists());
}

#[test]
fn unlabeled_split_without_a_method_that_uses_it_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let text =
        small_config(&mnist1d(), "").replace("[model]", "unlabeled_split = \"train\"\n[model]");
    let cfg = write(dir.path(), "job.toml", &text);
    let o = run_job(&cfg, &dir.path().join("run"), 1);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("data.unlabeled_split"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn resume_of_a_job_without_persisted_progress_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write(dir.path(), "job.toml", &small_config(&mnist1d(), ""));
    let out = dir.path().join("run");
    let o = butler()
        .arg("run")
        .arg(&cfg)
        .args(["--workers", "1", "--resume", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(
        e.contains("--resume") && e.contains("state.json does not exist"),
        "{e}"
    );
    assert!(
        !out.exists(),
        "a refused job must not create its run directory"
    );
}

#[test]
fn a_rank_that_beats_but_hangs_is_named_within_the_stall_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write(
        dir.path(),
        "job.toml",
        &small_config(
            &mnist1d(),
            "stall_timeout_ms = 2000\ncollective_timeout_ms = 120000\nheartbeat_interval_ms = 200",
        ),
    );
    let out = dir.path().join("run");
    let t0 = Instant::now();
    let o = butler()
        .args(["run"])
        .arg(&cfg)
        .args(["--workers", "2", "--out"])
        .arg(&out)
        .env("BUTLER_FAULT", "worker-hang-at-step:3")
        .output()
        .unwrap();
    let took = t0.elapsed();
    assert!(!o.status.success(), "a hung rank must fail the job");
    let log = std::fs::read_to_string(out.join("logs/coordinator.log")).unwrap();
    assert!(
        log.contains("rank 1 is alive but made no progress") && log.contains("never entered"),
        "the coordinator did not name the hung rank:\n{log}"
    );
    // Far below the 120 s collective timeout the healthy rank is blocked in.
    assert!(took < Duration::from_secs(60), "took {took:?}");
    assert!(!out.join("summary.json").exists());
}
