//! `butler run`: the local launcher. Starts a coordinator and N worker processes of this same binary on
//! this machine, shows progress from the coordinator's metrics, and fails if any process fails — the same
//! processes a cluster runs, wired over loopback.

use anyhow::{bail, Context, Result};
use butler_common::config::JobConfig;
use butler_data::JobDataCheck;
use indicatif::{ProgressBar, ProgressStyle};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[derive(clap::Args)]
pub struct RunArgs {
    /// Job config (TOML).
    pub config: PathBuf,
    /// Number of worker processes.
    #[arg(long, default_value_t = 2)]
    pub workers: u32,
    /// Run directory for logs, metrics, checkpoints and summary.json (default: runs/JOB_NAME).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Intra-op threads per worker (default: the machine's cores divided among the workers).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Override the config's `job.seed`.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Continue the stopped job in --out from its newest intact checkpoint (pseudo-label rounds resume
    /// their current phase).
    #[arg(long)]
    pub resume: bool,
    /// Serve the coordinator's Prometheus metrics (/metrics) on this address, e.g. 127.0.0.1:9400.
    #[arg(long)]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// Mutual TLS on every RPC, with a CA and certificates made for this run in OUT/tls/.
    #[arg(long)]
    pub tls: bool,
}

struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
    /// What started it, so that a lost worker can be replaced.
    args: Vec<String>,
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn spawn(
    name: &str,
    exe: &Path,
    args: &[String],
    log: PathBuf,
    token: &str,
    threads: usize,
) -> Result<Proc> {
    let out = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
    let err = out.try_clone()?;
    let mut cmd = Command::new(exe);
    // The processes must not outlive the launcher, however it ends (Ctrl-C reaches the whole process
    // group, but `kill` or an OOM kill reaches only the launcher): the kernel sends each child SIGTERM
    // when the launcher exits — a worker then commits and stops at the next step boundary.
    let launcher = std::process::id() as libc::pid_t;
    // SAFETY: the closure runs in the forked child before exec and calls only async-signal-safe
    // functions (prctl, getppid, kill).
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The launcher may have died between fork and prctl.
            if libc::getppid() != launcher {
                libc::kill(libc::getpid(), libc::SIGTERM);
            }
            Ok(())
        });
    }
    let child = cmd
        .args(args)
        .env("BUTLER_TOKEN", token)
        .env_remove("BUTLER_TOKEN_FILE")
        .env("BUTLER_THREADS", threads.to_string())
        .env("OMP_NUM_THREADS", threads.to_string())
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .with_context(|| format!("starting {name}"))?;
    Ok(Proc {
        name: name.to_string(),
        child,
        log,
        args: args.to_vec(),
    })
}

pub fn run(args: RunArgs) -> Result<()> {
    // Validate everything a user can get wrong before any process starts.
    let mut cfg = JobConfig::load(&args.config)?;
    if let Some(seed) = args.seed {
        cfg.job.seed = seed;
    }
    cfg.validate_world(args.workers)?;
    cfg.check_data()?;
    cfg.resolve_steps()?;
    // The workers run on this machine: what they would refuse at start is refused here, before the run
    // directory exists.
    preflight_devices(&cfg, args.workers)?;
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from("runs").join(&cfg.job.name));
    if args.resume && cfg.pseudo_label.is_none() {
        let state = out.join(butler_coordinator::commits::STATE_FILE);
        if !state.exists() {
            bail!(
                "--resume: {} does not exist, so {} holds no commit point to resume from (run the job \
                 without --resume to start it)",
                state.display(),
                out.display()
            );
        }
    }
    let logs = out.join("logs");
    butler_common::fsutil::create_private_dir(&out)?;
    std::fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
    let tls = if args.tls {
        Some(crate::tls::generate(
            &out.join("tls"),
            &["127.0.0.1".to_string(), "localhost".to_string()],
            7,
        )?)
    } else {
        None
    };
    // The run directory records the exact config the job ran with (overrides applied).
    let job_file = out.join("job.toml");
    butler_common::fsutil::write_atomic(&job_file, cfg.to_toml().as_bytes())?;
    let addr_file = out.join("coordinator.addr");
    let _ = std::fs::remove_file(&addr_file);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = args
        .threads
        .unwrap_or((cores / args.workers as usize).max(1));
    // `BUTLER_TOKEN` when set (so `butler status` can ask the coordinator), else a fresh random one.
    let token = std::env::var("BUTLER_TOKEN")
        .ok()
        .filter(|t| !t.is_empty())
        .unwrap_or_else(|| format!("{:032x}", rand::random::<u128>()));
    let exe = std::env::current_exe().context("locating the butler binary")?;

    let mut procs = vec![spawn(
        "coordinator",
        &exe,
        &[
            "coordinator".into(),
            "--config".into(),
            job_file.display().to_string(),
            "--world-size".into(),
            args.workers.to_string(),
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--run-dir".into(),
            out.display().to_string(),
            "--addr-file".into(),
            addr_file.display().to_string(),
        ]
        .into_iter()
        .chain(args.resume.then(|| "--resume".to_string()))
        .chain(
            args.metrics_listen
                .iter()
                .flat_map(|a| ["--metrics-listen".to_string(), a.to_string()]),
        )
        .chain(tls.iter().flat_map(|t| {
            [
                "--tls-cert".to_string(),
                t.coordinator_cert.display().to_string(),
                "--tls-key".to_string(),
                t.coordinator_key.display().to_string(),
                "--tls-client-ca".to_string(),
                t.ca.display().to_string(),
            ]
        }))
        .collect::<Vec<_>>(),
        logs.join("coordinator.log"),
        &token,
        1,
    )?];
    let result = supervise(
        &args,
        &cfg,
        &exe,
        &token,
        threads,
        &out,
        &addr_file,
        tls.as_ref(),
        &mut procs,
    );
    for p in &mut procs {
        let _ = p.child.kill();
        let _ = p.child.wait();
    }
    result
}

/// `cluster.device = "cuda"` or `cluster.backend = "nccl"` on a machine that cannot honour them.
fn preflight_devices(cfg: &JobConfig, workers: u32) -> Result<()> {
    use butler_common::config::BackendChoice;
    let device = butler_worker::device::resolve_device(cfg.cluster.device, 0)?;
    if cfg.cluster.backend != BackendChoice::Nccl {
        return Ok(());
    }
    if !device.is_cuda() {
        bail!(
            "cluster.backend = \"nccl\" but this machine has no CUDA device ({}); run `butler doctor`, \
             or set cluster.backend = \"auto\" or \"ring\"",
            butler_worker::device::cuda_missing_reason()
        );
    }
    if let butler_worker::collective::nccl::NcclProbe::Missing(why) =
        butler_worker::collective::nccl::probe()
    {
        bail!("cluster.backend = \"nccl\" but NCCL cannot be loaded: {why}; run `butler doctor`");
    }
    let gpus = tch::Cuda::device_count().max(0) as u32;
    if workers > gpus {
        bail!(
            "cluster.backend = \"nccl\" needs one GPU per rank, but {workers} workers share this machine's \
             {gpus} GPU(s); use --workers {gpus}, or cluster.backend = \"ring\" to share GPUs"
        );
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn supervise(
    args: &RunArgs,
    cfg: &JobConfig,
    exe: &Path,
    token: &str,
    threads: usize,
    out: &Path,
    addr_file: &Path,
    tls: Option<&crate::tls::TlsFiles>,
    procs: &mut Vec<Proc>,
) -> Result<()> {
    let start = Instant::now();
    let addr = loop {
        if let Ok(a) = std::fs::read_to_string(addr_file) {
            break a;
        }
        if let Some(status) = procs[0].child.try_wait()? {
            bail!(
                "the coordinator exited ({status}) before listening:\n{}",
                tail(&procs[0].log, 20)
            );
        }
        if start.elapsed() > Duration::from_secs(30) {
            bail!(
                "the coordinator did not start listening within 30s; see {}",
                procs[0].log.display()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let addr = addr.trim();
    let (url, client_tls) = match tls {
        Some(t) => (
            format!("https://{addr}"),
            vec![
                "--tls-ca".to_string(),
                t.ca.display().to_string(),
                "--tls-cert".to_string(),
                t.client_cert.display().to_string(),
                "--tls-key".to_string(),
                t.client_key.display().to_string(),
            ],
        ),
        None => (format!("http://{addr}"), Vec::new()),
    };
    eprintln!(
        "coordinator at {url} (with BUTLER_TOKEN set: butler status --coordinator {url}{}{})",
        if client_tls.is_empty() { "" } else { " " },
        client_tls.join(" ")
    );
    for rank in 0..args.workers {
        procs.push(spawn(
            &format!("worker {rank}"),
            exe,
            &[
                "worker".into(),
                "--coordinator".into(),
                url.clone(),
                "--rank".into(),
                rank.to_string(),
                "--advertise-host".into(),
                "127.0.0.1".into(),
                "--worker-id".into(),
                format!("local-{rank}"),
                "--threads".into(),
                threads.to_string(),
                // One host: rank r takes GPU r mod GPUs.
                "--local-rank".into(),
                rank.to_string(),
            ]
            .into_iter()
            .chain(client_tls.iter().cloned())
            .collect::<Vec<_>>(),
            out.join("logs").join(format!("worker-{rank}.log")),
            token,
            threads,
        )?);
    }

    let bar = ProgressBar::new(cfg.train.epochs);
    bar.set_style(
        ProgressStyle::with_template(
            "{prefix} [{elapsed_precise}] {bar:30} epoch {pos}/{len} {msg}",
        )
        .expect("the template is valid"),
    );
    bar.set_prefix(format!("{} ×{}", cfg.job.name, args.workers));
    let metrics = out.join("metrics.jsonl");
    let mut exited = vec![false; procs.len()];
    // With cluster.max_restarts the job regroups after a lost worker; a worker process that died is
    // replaced (as a Kubernetes Job restarts its pod) and registers for the same rank.
    let mut replaced = 0u32;
    loop {
        update_progress(&bar, &metrics);
        for i in 0..procs.len() {
            if exited[i] {
                continue;
            }
            if let Some(status) = procs[i].child.try_wait()? {
                exited[i] = true;
                let coordinator_alive = !exited[0];
                if !status.success()
                    && i > 0
                    && coordinator_alive
                    && replaced < cfg.cluster.max_restarts
                {
                    replaced += 1;
                    let old = &procs[i];
                    let log = out
                        .join("logs")
                        .join(format!("worker-{}.replacement-{replaced}.log", i - 1));
                    bar.suspend(|| {
                        eprintln!(
                            "{} exited ({status}); starting a replacement ({replaced}/{}), log {}",
                            old.name,
                            cfg.cluster.max_restarts,
                            log.display()
                        )
                    });
                    let (name, args_i) = (old.name.clone(), old.args.clone());
                    procs[i] = spawn(&name, exe, &args_i, log, token, threads)?;
                    exited[i] = false;
                    continue;
                }
                let p = &procs[i];
                if !status.success() {
                    bar.abandon();
                    // Let the others notice and log their side before they are stopped.
                    std::thread::sleep(Duration::from_millis(500));
                    bail!(
                        "{} failed ({status}); last lines of {}:\n{}",
                        p.name,
                        p.log.display(),
                        tail(&p.log, 15)
                    );
                }
            }
        }
        if exited.iter().all(|&e| e) {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    update_progress(&bar, &metrics);
    bar.finish();
    let summary_path = out.join("summary.json");
    let text = std::fs::read_to_string(&summary_path).with_context(|| {
        format!(
            "every process exited cleanly but {} is missing",
            summary_path.display()
        )
    })?;
    let s: serde_json::Value = serde_json::from_str(&text)?;
    let val = s["val_accuracy"]
        .as_f64()
        .map(|v| format!("validation accuracy {v:.4}, "))
        .unwrap_or_default();
    println!(
        "{}: {val}test accuracy {:.4}, {} workers, {:.0} samples/s, {:.1}s wall — {}",
        cfg.job.name,
        s["test_accuracy"].as_f64().unwrap_or(f64::NAN),
        args.workers,
        s["samples_per_second"].as_f64().unwrap_or(f64::NAN),
        s["wall_seconds"].as_f64().unwrap_or(f64::NAN),
        summary_path.display()
    );
    // The report is a view of the run, not part of its result: failing to draw it fails nothing.
    match crate::report::write_report(out) {
        Ok(path) => println!("report: {}", path.display()),
        Err(e) => eprintln!("warning: no run report: {e:#}"),
    }
    Ok(())
}

fn update_progress(bar: &ProgressBar, metrics: &Path) {
    let Ok(text) = std::fs::read_to_string(metrics) else {
        return;
    };
    let lines: Vec<&str> = text.lines().collect();
    if let Some(last) = lines
        .last()
        .and_then(|l| serde_json::from_str::<serde_json::Value>(l).ok())
    {
        bar.set_position(lines.len() as u64);
        let acc = match (
            last["val_accuracy"].as_f64(),
            last["test_accuracy"].as_f64(),
        ) {
            (Some(v), _) => format!(" val acc {v:.4}"),
            (None, Some(a)) => format!(" test acc {a:.4}"),
            _ => String::new(),
        };
        bar.set_message(format!(
            "loss {:.4}{acc}",
            last["train_loss"].as_f64().unwrap_or(f64::NAN)
        ));
    }
}
