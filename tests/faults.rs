//! The fault-injection suite, driving the real binary: a job with `cluster.max_restarts` survives a
//! worker killed with `kill -9` mid-epoch (the launcher starts a replacement, every rank resumes from the
//! newest commit point) and a coordinator killed with `kill -9` and restarted with `--resume` (the
//! workers reconnect and register again). Each case must finish with the same final weights, byte for
//! byte, as the uninterrupted run, and — counted from the samples the workers trained
//! (`BUTLER_TRACE_SAMPLES`), keeping for each step the generation that survived — every labeled sample
//! trained exactly once per epoch. A worker cut off by a network partition (a network namespace and a
//! veth pair whose link goes down for longer than the heartbeat timeout) is evicted, the job waits,
//! and the same worker rejoins when the link returns. Recovery times are printed.

mod common;
use common::*;
use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const LABELED: u64 = 400; // 40 per class

fn config(manifest: &Path, batch: usize) -> String {
    format!(
        "[job]\nname = \"faults\"\nseed = 2\n[data]\nmanifest = \"{}\"\nlabels_per_class = 40\n\
         [model]\nkind = \"conv_base\"\nchannels = 16\n\
         [optim]\nkind = \"sgd\"\nlr = 0.05\nmomentum = 0.9\n\
         [train]\nepochs = 4\nbatch_size = {batch}\n\
         [augment]\nlabeled = \"weak\"\n[regularize.mix]\nmixup_alpha = 0.2\n\
         [checkpoint]\nevery_steps = 5\n\
         [cluster]\nheartbeat_interval_ms = 200\nheartbeat_timeout_ms = 3000\nmax_restarts = 2\n\
         rejoin_timeout_ms = 30000\ncollective_timeout_ms = 20000\n",
        manifest.display()
    )
}

fn final_weights(out: &Path) -> Vec<u8> {
    let p = out.join("checkpoints/final.safetensors");
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn accuracy(out: &Path) -> f64 {
    let s: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    s["test_accuracy"].as_f64().unwrap()
}

/// Per epoch, how often each labeled sample was trained — keeping, for every (epoch, step), only the
/// newest generation that trained it (older generations' steps after the commit were rolled back).
fn trained_counts(trace: &Path) -> BTreeMap<u64, Vec<u32>> {
    // (epoch, step) → (generation, ids of every rank)
    let mut steps: BTreeMap<(u64, u64), (u64, Vec<u64>)> = BTreeMap::new();
    for e in std::fs::read_dir(trace).unwrap() {
        let text = std::fs::read_to_string(e.unwrap().path()).unwrap();
        for line in text.lines() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            let (g, ep, st) = (
                v["generation"].as_u64().unwrap(),
                v["epoch"].as_u64().unwrap(),
                v["step"].as_u64().unwrap(),
            );
            let ids: Vec<u64> = v["ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|i| i.as_u64().unwrap())
                .collect();
            let entry = steps.entry((ep, st)).or_insert((g, Vec::new()));
            if g > entry.0 {
                *entry = (g, Vec::new());
            }
            if g == entry.0 {
                entry.1.extend(ids);
            }
        }
    }
    let mut counts: BTreeMap<u64, Vec<u32>> = BTreeMap::new();
    for ((epoch, _), (_, ids)) in steps {
        let c = counts
            .entry(epoch)
            .or_insert_with(|| vec![0; LABELED as usize]);
        for i in ids {
            c[i as usize] += 1;
        }
    }
    counts
}

/// The unlabeled stream: for every (labeled epoch, step) the newest generation's samples, counted per
/// unlabeled epoch; every complete unlabeled epoch must hold each of the `len` samples exactly once.
fn assert_each_unlabeled_sample_once(trace: &Path, len: usize) {
    let mut steps: BTreeMap<(u64, u64), (u64, Vec<u64>)> = BTreeMap::new();
    for e in std::fs::read_dir(trace).unwrap() {
        let text = std::fs::read_to_string(e.unwrap().path()).unwrap();
        for line in text.lines() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            let g = v["generation"].as_u64().unwrap();
            let key = (v["epoch"].as_u64().unwrap(), v["step"].as_u64().unwrap());
            let pairs: Vec<u64> = v["unlabeled"]
                .as_array()
                .unwrap()
                .iter()
                .map(|i| i.as_u64().unwrap())
                .collect();
            let entry = steps.entry(key).or_insert((g, Vec::new()));
            if g > entry.0 {
                *entry = (g, Vec::new());
            }
            if g == entry.0 {
                entry.1.extend(pairs);
            }
        }
    }
    let mut counts: BTreeMap<u64, Vec<u32>> = BTreeMap::new();
    for (_, (_, pairs)) in steps {
        for p in pairs.chunks(2) {
            counts.entry(p[0]).or_insert_with(|| vec![0; len])[p[1] as usize] += 1;
        }
    }
    let last = *counts.keys().max().expect("unlabeled samples were traced");
    assert!(last >= 1, "no complete unlabeled epoch");
    for (epoch, c) in counts.iter().filter(|(e, _)| **e < last) {
        let lost = c.iter().filter(|&&n| n == 0).count();
        let repeated = c.iter().filter(|&&n| n > 1).count();
        assert_eq!(
            (lost, repeated),
            (0, 0),
            "unlabeled epoch {epoch}: {lost} samples lost, {repeated} repeated"
        );
    }
}

fn assert_each_sample_once(trace: &Path, epochs: u64) {
    let counts = trained_counts(trace);
    assert_eq!(counts.len() as u64, epochs, "epochs traced");
    for (epoch, c) in counts {
        let lost = c.iter().filter(|&&n| n == 0).count();
        let repeated = c.iter().filter(|&&n| n > 1).count();
        assert_eq!(
            (lost, repeated),
            (0, 0),
            "epoch {epoch}: {lost} samples lost, {repeated} repeated"
        );
    }
}

/// Seconds between the first log line containing `from` and the first later line containing `to`, over
/// all logs in `dir` (tracing's RFC 3339 timestamps).
fn seconds_between(dir: &Path, from: &str, to: &str) -> Option<f64> {
    let stamp = |line: &str| -> Option<f64> {
        // 2026-12-05T07:40:01.123456Z
        let t = line.split_whitespace().next()?;
        let time = t.split('T').nth(1)?.trim_end_matches('Z');
        let mut parts = time.split(':');
        let h: f64 = parts.next()?.parse().ok()?;
        let m: f64 = parts.next()?.parse().ok()?;
        let s: f64 = parts.next()?.parse().ok()?;
        Some(h * 3600.0 + m * 60.0 + s)
    };
    let mut lines = Vec::new();
    for e in std::fs::read_dir(dir).ok()? {
        let text = std::fs::read_to_string(e.ok()?.path()).unwrap_or_default();
        lines.extend(
            text.lines()
                .filter_map(|l| Some((stamp(l)?, l.to_string()))),
        );
    }
    let start = lines
        .iter()
        .filter(|(_, l)| l.contains(from))
        .map(|(t, _)| *t)
        .fold(f64::INFINITY, f64::min);
    let end = lines
        .iter()
        .filter(|(t, l)| *t >= start && l.contains(to))
        .map(|(t, _)| *t)
        .fold(f64::INFINITY, f64::min);
    (start.is_finite() && end.is_finite()).then_some(end - start)
}

fn run(
    cfg: &Path,
    out: &Path,
    workers: u32,
    env: &[(&str, &Path)],
    fault: Option<&str>,
) -> std::process::Output {
    let mut c = butler();
    c.arg("run")
        .arg(cfg)
        .args(["--workers", &workers.to_string(), "--threads", "1", "--out"])
        .arg(out);
    for (k, v) in env {
        c.env(k, v);
    }
    if let Some(f) = fault {
        c.env("BUTLER_FAULT", f);
    }
    c.output().unwrap()
}

#[test]
fn a_worker_killed_mid_epoch_is_replaced_and_the_job_finishes_exactly() {
    survives("worker-kill-at-step:12", "kill -9 worker");
}

#[test]
fn a_worker_leaving_on_sigterm_commits_and_the_job_finishes_exactly() {
    survives("worker-sigterm-at-step:12", "SIGTERM worker");
}

/// 3 workers, one of which `fault` takes out mid-epoch; the launcher replaces it.
fn survives(fault: &str, name: &str) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write(dir.path(), "job.toml", &config(&mnist1d(), 60));
    let clean = dir.path().join("clean");
    let o = run(&cfg, &clean, 3, &[], None);
    assert!(o.status.success(), "clean run: {}", stderr(&o));

    let out = dir.path().join("killed");
    let trace = dir.path().join("trace");
    std::fs::create_dir_all(&trace).unwrap();
    // 7 steps per epoch; the commit of step 10 is mid-epoch 1, the kill after step 12.
    let o = run(
        &cfg,
        &out,
        3,
        &[("BUTLER_TRACE_SAMPLES", &trace)],
        Some(fault),
    );
    assert!(
        o.status.success(),
        "the job did not survive: {}",
        stderr(&o)
    );
    let said = String::from_utf8_lossy(&o.stdout).into_owned() + &stderr(&o);
    assert!(said.contains("starting a replacement"), "{said}");
    assert!(
        final_weights(&clean) == final_weights(&out),
        "the job that lost a worker ends with other weights than the clean run"
    );
    assert_eq!(accuracy(&clean), accuracy(&out));
    assert_each_sample_once(&trace, 4);
    let recovery = seconds_between(
        &out.join("logs"),
        "regrouping",
        "resumed from the commit point",
    );
    eprintln!(
        "FAULT {name}: recovery {:.2}s, accuracy {:.4} (clean {:.4})",
        recovery.expect("regroup and resume are logged"),
        accuracy(&out),
        accuracy(&clean)
    );
}

struct Procs(Vec<Child>);
impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn spawn(args: &[&str], log: &Path, envs: &[(&str, &str)]) -> Child {
    let f = std::fs::File::create(log).unwrap();
    let mut c = Command::new(env!("CARGO_BIN_EXE_butler"));
    c.current_dir(repo())
        .args(args)
        .env("BUTLER_TOKEN", "fault-token")
        .stdin(Stdio::null())
        .stdout(f.try_clone().unwrap())
        .stderr(f);
    for (k, v) in envs {
        c.env(k, v);
    }
    c.spawn().unwrap()
}

fn commit_count(out: &Path) -> usize {
    std::fs::read_to_string(out.join("state.json"))
        .ok()
        .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
        .and_then(|v| v["commits"].as_array().map(|a| a.len()))
        .unwrap_or(0)
}

#[test]
fn a_coordinator_killed_mid_epoch_and_resumed_takes_its_workers_back() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write(dir.path(), "job.toml", &config(&mnist1d(), 40));
    let clean = dir.path().join("clean");
    let o = run(&cfg, &clean, 2, &[], None);
    assert!(o.status.success(), "clean run: {}", stderr(&o));

    let out = dir.path().join("run");
    let logs = out.join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    let trace = dir.path().join("trace");
    std::fs::create_dir_all(&trace).unwrap();
    let port = free_port().to_string();
    let listen = format!("127.0.0.1:{port}");
    let url = format!("http://127.0.0.1:{port}");
    let cfg_s = cfg.to_str().unwrap();
    let out_s = out.to_str().unwrap();
    let coordinator = |resume: bool, log: &str| {
        let mut a = vec![
            "coordinator",
            "--config",
            cfg_s,
            "--world-size",
            "2",
            "--listen",
            &listen,
            "--run-dir",
            out_s,
        ];
        if resume {
            a.push("--resume");
        }
        spawn(&a, &logs.join(log), &[])
    };
    let mut procs = Procs(vec![coordinator(false, "coordinator.log")]);
    let trace_s = trace.to_str().unwrap();
    for r in ["0", "1"] {
        procs.0.push(spawn(
            &[
                "worker",
                "--coordinator",
                &url,
                "--rank",
                r,
                "--advertise-host",
                "127.0.0.1",
                "--worker-id",
                &format!("w{r}"),
                "--threads",
                "1",
                "--connect-wait-s",
                "30",
            ],
            &logs.join(format!("worker-{r}.log")),
            &[("BUTLER_TRACE_SAMPLES", trace_s)],
        ));
    }
    // Kill the coordinator once the job has committed twice (mid-epoch 1 at 10 steps per epoch).
    let t0 = Instant::now();
    while commit_count(&out) < 2 {
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "no commit point appeared"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    procs.0[0].kill().unwrap(); // SIGKILL
    procs.0[0].wait().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    procs.0[0] = coordinator(true, "coordinator-resumed.log");
    let t0 = Instant::now();
    for i in 0..3 {
        loop {
            if let Some(status) = procs.0[i].try_wait().unwrap() {
                assert!(
                    status.success(),
                    "process {i} failed; see {}",
                    logs.display()
                );
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(180),
                "the job did not finish after the coordinator's restart"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    assert!(
        final_weights(&clean) == final_weights(&out),
        "the job whose coordinator restarted ends with other weights than the clean run"
    );
    assert_eq!(accuracy(&clean), accuracy(&out));
    assert_each_sample_once(&trace, 4);
    let recovery = seconds_between(
        &logs,
        "coordinator listening",
        "resumed from the commit point",
    );
    eprintln!(
        "FAULT kill -9 coordinator: recovery after restart {:.2}s, accuracy {:.4} (clean {:.4})",
        recovery.unwrap_or(f64::NAN),
        accuracy(&out),
        accuracy(&clean)
    );
}

/// A network namespace joined to this one by a veth pair: `host_ip` here, `ns_ip` inside. Removed on
/// drop (deleting the namespace deletes the pair).
struct Netns {
    name: String,
    host_if: String,
}

fn ip(args: &[&str]) -> bool {
    Command::new("ip")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

impl Netns {
    const HOST_IP: &'static str = "10.213.7.1";
    const NS_IP: &'static str = "10.213.7.2";

    fn create() -> Option<Netns> {
        let id = std::process::id() % 100_000;
        let n = Netns {
            name: format!("butler-part-{id}"),
            host_if: format!("bph{id}"),
        };
        let ns_if = format!("bpn{id}");
        let ok = ip(&["netns", "add", &n.name])
            && ip(&[
                "link", "add", &n.host_if, "type", "veth", "peer", "name", &ns_if,
            ])
            && ip(&["link", "set", &ns_if, "netns", &n.name])
            && ip(&[
                "addr",
                "add",
                &format!("{}/30", Self::HOST_IP),
                "dev",
                &n.host_if,
            ])
            && ip(&["link", "set", &n.host_if, "up"])
            && ip(&[
                "netns",
                "exec",
                &n.name,
                "ip",
                "addr",
                "add",
                &format!("{}/30", Self::NS_IP),
                "dev",
                &ns_if,
            ])
            && ip(&["netns", "exec", &n.name, "ip", "link", "set", &ns_if, "up"])
            && ip(&["netns", "exec", &n.name, "ip", "link", "set", "lo", "up"]);
        ok.then_some(n)
    }

    fn link(&self, up: bool) {
        assert!(ip(&[
            "link",
            "set",
            &self.host_if,
            if up { "up" } else { "down" }
        ]));
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        ip(&["netns", "del", &self.name]);
        ip(&["link", "del", &self.host_if]);
    }
}

fn log_has(dir: &Path, needle: &str) -> bool {
    std::fs::read_dir(dir).unwrap().any(|e| {
        std::fs::read_to_string(e.unwrap().path())
            .unwrap_or_default()
            .contains(needle)
    })
}

#[test]
fn a_partitioned_worker_is_evicted_and_rejoins_when_the_link_returns() {
    // Needs root and iproute2 (CI and the developers' machines run as root).
    let Some(net) = Netns::create() else {
        eprintln!("SKIPPED: cannot create a network namespace (needs root and `ip`)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let text = config(&mnist1d(), 60)
        .replace("epochs = 4", "epochs = 12")
        .replace(
            "collective_timeout_ms = 20000",
            "collective_timeout_ms = 5000",
        )
        .replace("rejoin_timeout_ms = 30000", "rejoin_timeout_ms = 60000");
    let cfg = write(dir.path(), "job.toml", &text);
    let clean = dir.path().join("clean");
    let o = run(&cfg, &clean, 3, &[], None);
    assert!(o.status.success(), "clean run: {}", stderr(&o));

    let out = dir.path().join("run");
    let logs = out.join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    let trace = dir.path().join("trace");
    std::fs::create_dir_all(&trace).unwrap();
    let port = free_port().to_string();
    let listen = format!("{}:{port}", Netns::HOST_IP);
    let url = format!("http://{listen}");
    let (cfg_s, out_s, trace_s) = (
        cfg.to_str().unwrap(),
        out.to_str().unwrap(),
        trace.to_str().unwrap(),
    );
    let mut procs = Procs(vec![spawn(
        &[
            "coordinator",
            "--config",
            cfg_s,
            "--world-size",
            "3",
            "--listen",
            &listen,
            "--run-dir",
            out_s,
        ],
        &logs.join("coordinator.log"),
        &[],
    )]);
    let exe = env!("CARGO_BIN_EXE_butler");
    for r in 0..3 {
        let rank = r.to_string();
        let (host, id) = if r == 2 {
            (Netns::NS_IP, "partitioned")
        } else {
            (Netns::HOST_IP, "w")
        };
        let worker = [
            "worker",
            "--coordinator",
            &url,
            "--rank",
            &rank,
            "--advertise-host",
            host,
            "--worker-id",
            &format!("{id}{r}"),
            "--threads",
            "1",
            "--connect-wait-s",
            "60",
        ];
        let args: Vec<&str> = if r == 2 {
            ["netns", "exec", net.name.as_str(), exe]
                .into_iter()
                .chain(worker)
                .collect()
        } else {
            worker.to_vec()
        };
        let log = logs.join(format!("worker-{r}.log"));
        procs.0.push(if r == 2 {
            let f = std::fs::File::create(&log).unwrap();
            Command::new("ip")
                .args(&args)
                .current_dir(repo())
                .env("BUTLER_TOKEN", "fault-token")
                .env("BUTLER_TRACE_SAMPLES", trace_s)
                .stdin(Stdio::null())
                .stdout(f.try_clone().unwrap())
                .stderr(f)
                .spawn()
                .unwrap()
        } else {
            spawn(&args, &log, &[("BUTLER_TRACE_SAMPLES", trace_s)])
        });
    }
    let t0 = Instant::now();
    while commit_count(&out) < 1 {
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "no commit point appeared"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    net.link(false);
    let cut = Instant::now();
    while !log_has(&logs, "regrouping") {
        assert!(
            cut.elapsed() < Duration::from_secs(30),
            "the partitioned rank was not evicted"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let evicted = cut.elapsed().as_secs_f64();
    // Longer than the heartbeat timeout: the rank must be gone from the job before it comes back.
    std::thread::sleep(Duration::from_secs(4));
    net.link(true);
    let back = Instant::now();
    for i in 0..4 {
        loop {
            if let Some(status) = procs.0[i].try_wait().unwrap() {
                assert!(
                    status.success(),
                    "process {i} failed; see {}",
                    logs.display()
                );
                break;
            }
            assert!(
                back.elapsed() < Duration::from_secs(150),
                "the job did not finish after the link came back"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    assert!(
        final_weights(&clean) == final_weights(&out),
        "the job with a partitioned worker ends with other weights than the clean run"
    );
    assert_each_sample_once(&trace, 12);
    let rejoined = seconds_between(&logs, "regrouping", "resumed from the commit point");
    eprintln!(
        "FAULT partition of one worker: evicted after {evicted:.2}s, training again {:.2}s after the \
         regroup (link restored after {:.2}s), accuracy {:.4} (clean {:.4})",
        rejoined.unwrap_or(f64::NAN),
        back.duration_since(cut).as_secs_f64(),
        accuracy(&out),
        accuracy(&clean)
    );
}

#[test]
fn an_elastic_job_shrinks_without_a_replacement_and_grows_when_a_worker_joins() {
    shrink_and_grow(false);
}

#[test]
fn an_elastic_fixmatch_job_recuts_its_unlabeled_epoch_across_world_sizes() {
    shrink_and_grow(true);
}

/// 3 workers, min_workers = 2: one is killed after step 12 and gets no replacement (the job shrinks
/// to 2 after the rejoin timeout), then a new worker registers (it grows back to 3). Supervised
/// without Mixup and with a constant learning rate, training with W workers equals training with one,
/// so the run must end where the clean 3-worker run ends (to float noise). With FixMatch the
/// unlabeled stream re-cuts its epoch at each world change (the batches differ from the clean run's,
/// so only the accounting is exact): every labeled sample once per epoch, and every unlabeled sample
/// once per complete unlabeled epoch.
fn shrink_and_grow(fixmatch: bool) {
    let dir = tempfile::tempdir().unwrap();
    let mut text = config(&mnist1d(), 60)
        .replace("[regularize.mix]\nmixup_alpha = 0.2\n", "")
        .replace("epochs = 4", "epochs = 12")
        .replace(
            "rejoin_timeout_ms = 30000",
            "rejoin_timeout_ms = 2000\nmin_workers = 2",
        );
    if fixmatch {
        text = text.replace(
            "labels_per_class = 40\n",
            "labels_per_class = 40\nunlabeled_split = \"train\"\nunlabeled_ratio = 2\n",
        ) + "[ssl]\nmethod = \"fixmatch\"\nthreshold = 0.7\n";
    }
    let cfg = write(dir.path(), "job.toml", &text);
    let clean = dir.path().join("clean");
    let o = run(&cfg, &clean, 3, &[], None);
    assert!(o.status.success(), "clean run: {}", stderr(&o));

    let out = dir.path().join("run");
    let logs = out.join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    let trace = dir.path().join("trace");
    std::fs::create_dir_all(&trace).unwrap();
    let port = free_port().to_string();
    let listen = format!("127.0.0.1:{port}");
    let url = format!("http://{listen}");
    let (cfg_s, out_s, trace_s) = (
        cfg.to_str().unwrap(),
        out.to_str().unwrap(),
        trace.to_str().unwrap(),
    );
    let mut procs = Procs(vec![spawn(
        &[
            "coordinator",
            "--config",
            cfg_s,
            "--world-size",
            "3",
            "--listen",
            &listen,
            "--run-dir",
            out_s,
        ],
        &logs.join("coordinator.log"),
        &[],
    )]);
    for r in ["0", "1", "2"] {
        procs.0.push(spawn(
            &[
                "worker",
                "--coordinator",
                &url,
                "--rank",
                r,
                "--advertise-host",
                "127.0.0.1",
                "--worker-id",
                &format!("w{r}"),
                "--threads",
                "1",
            ],
            &logs.join(format!("worker-{r}.log")),
            &[
                ("BUTLER_TRACE_SAMPLES", trace_s),
                ("BUTLER_FAULT", "worker-kill-at-step:12"),
            ],
        ));
    }
    let t0 = Instant::now();
    while !log_has(&logs, "shrinking") {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the job did not shrink"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // A new worker (no rank asked) joins the running 2-worker job.
    procs.0.push(spawn(
        &[
            "worker",
            "--coordinator",
            &url,
            "--advertise-host",
            "127.0.0.1",
            "--worker-id",
            "newcomer",
            "--threads",
            "1",
        ],
        &logs.join("worker-new.log"),
        &[("BUTLER_TRACE_SAMPLES", trace_s)],
    ));
    for i in [0, 1, 2, 4] {
        loop {
            if let Some(status) = procs.0[i].try_wait().unwrap() {
                assert!(
                    status.success(),
                    "process {i} failed; see {}",
                    logs.display()
                );
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(120),
                "the job did not finish after shrinking and growing"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    assert!(
        log_has(&logs, "waits to join"),
        "the newcomer did not wait for a boundary"
    );
    let s: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    assert_eq!(s["world_size"], 3, "the job grew back to 3 workers");
    assert_each_sample_once(&trace, 12);
    if fixmatch {
        assert_each_unlabeled_sample_once(&trace, 4000);
        assert!(
            log_has(&logs, "re-cuts its epoch"),
            "the stream did not re-cut"
        );
        eprintln!(
            "FAULT elastic FixMatch 3 → 2 → 3: accuracy {:.4} (clean {:.4})",
            accuracy(&out),
            accuracy(&clean)
        );
        return;
    }
    let weights = |d: &Path| -> Vec<(String, tch::Tensor)> {
        let mut v = tch::Tensor::read_safetensors(d.join("checkpoints/final.safetensors")).unwrap();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    };
    let worst = weights(&clean)
        .iter()
        .zip(weights(&out))
        .map(|((na, a), (nb, b))| {
            assert_eq!(na, &nb);
            (a - b).abs().max().double_value(&[])
        })
        .fold(0.0, f64::max);
    assert!(
        worst < 1e-4,
        "max |Δweight| = {worst:e} against the clean 3-worker run"
    );
    let recovery = seconds_between(&logs, "shrinking", "resumed from the commit point");
    let admitted = seconds_between(&logs, "waits to join", "resuming with another world size");
    eprintln!(
        "FAULT kill -9 of 1 of 3 workers, no replacement: shrank to 2, training again {:.2}s after \
         the shrink; a new worker admitted {:.2}s after it asked; max |Δweight| vs the clean run \
         {worst:.1e}, accuracy {:.4} (clean {:.4})",
        recovery.unwrap_or(f64::NAN),
        admitted.unwrap_or(f64::NAN),
        accuracy(&out),
        accuracy(&clean)
    );
}

/// Processes whose command line mentions `needle`.
fn processes_with(needle: &str) -> Vec<u32> {
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if let Ok(cmd) = std::fs::read(e.path().join("cmdline")) {
            if String::from_utf8_lossy(&cmd).contains(needle) {
                found.push(pid);
            }
        }
    }
    found
}

#[test]
fn the_launchers_processes_do_not_outlive_it() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write(
        dir.path(),
        "job.toml",
        &config(&mnist1d(), 64).replace("epochs = 4", "epochs = 10000"),
    );
    let out = dir.path().join("run");
    let mut launcher = butler()
        .arg("run")
        .arg(&cfg)
        .args(["--workers", "2", "--out"])
        .arg(&out)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for_file(&out.join("metrics.jsonl"), Duration::from_secs(120));
    let addr = std::fs::read_to_string(out.join("coordinator.addr")).unwrap();
    let coordinator = processes_with(&out.join("job.toml").display().to_string());
    let workers = processes_with(addr.trim());
    assert_eq!(
        (coordinator.len(), workers.len()),
        (1, 2),
        "{coordinator:?} {workers:?}"
    );
    // kill -9: the launcher can do nothing; the kernel tells its children (PR_SET_PDEATHSIG).
    launcher.kill().unwrap();
    launcher.wait().unwrap();
    let t0 = Instant::now();
    let alive = |pids: &[u32]| {
        pids.iter()
            .filter(|p| {
                std::fs::read_to_string(format!("/proc/{p}/stat"))
                    .is_ok_and(|s| !s.contains(") Z "))
            })
            .count()
    };
    while alive(&coordinator) + alive(&workers) > 0 {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "processes outlived the launcher by 30 s: coordinator {coordinator:?}, workers {workers:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    println!(
        "children gone {:.2} s after kill -9 of the launcher",
        t0.elapsed().as_secs_f64()
    );
}
