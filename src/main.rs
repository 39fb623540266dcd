//! `butler`: the one user-facing binary. Subcommands: `run` (local launcher), `coordinator`, `worker`,
//! `data` (prepare / import / inspect), `bench`, `doctor`, `report`.
//!
//! Architecture Invariant: command-line glue only — argument parsing, calls into the library crates,
//! printed summaries. Formats, training and protocol logic live in the crates; their typed errors reach
//! `main` through `anyhow`, which prints the chain and exits 1.

mod bench;
mod data_cmd;
mod doctor;
mod launcher;
mod report;
mod tls;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "butler",
    version,
    about = "Data-regularized training across many workers"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log lines as text (colour only on a terminal) or as one JSON object per line.
    #[arg(long, global = true, env = "BUTLER_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run a job on this machine: a coordinator plus N worker processes.
    Run(launcher::RunArgs),
    /// Serve a job's control plane (gRPC) until every worker has finished.
    Coordinator(CoordinatorArgs),
    /// Join a job as one data-parallel worker.
    Worker(WorkerArgs),
    /// Prepare, import and inspect datasets in butler's shard format.
    #[command(subcommand)]
    Data(data_cmd::DataCommand),
    /// Benchmarks.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// What this machine offers: libtorch, CUDA devices, cuDNN, NCCL, and the backend `auto` would pick.
    Doctor(doctor::DoctorArgs),
    /// Write a run directory's report: one self-contained HTML page with its curves and tables.
    Report(report::ReportArgs),
    /// What a running job is doing: membership, progress, throughput, per-rank timing and lateness.
    Status(StatusArgs),
    /// TLS certificates for a job's control plane.
    #[command(subcommand)]
    Tls(tls::TlsCommand),
}

/// The shared job token: from the environment or a file (a Kubernetes Secret), not the command line.
#[derive(clap::Args)]
struct TokenArgs {
    /// The job token. Prefer BUTLER_TOKEN or --token-file: a command line is visible to every user of
    /// the machine (`ps`).
    #[arg(long, env = "BUTLER_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Read the job token from this file (its first line, surrounding whitespace ignored).
    #[arg(long, env = "BUTLER_TOKEN_FILE", conflicts_with = "token")]
    token_file: Option<PathBuf>,
}

impl TokenArgs {
    fn resolve(&self) -> Result<String> {
        if std::env::args_os()
            .any(|a| a == "--token" || a.to_string_lossy().starts_with("--token="))
        {
            eprintln!(
                "warning: --token on the command line is visible to every user of this machine (ps); \
                 use BUTLER_TOKEN or --token-file"
            );
        }
        let token = match (&self.token, &self.token_file) {
            (_, Some(f)) => std::fs::read_to_string(f)
                .with_context(|| format!("reading the job token from {}", f.display()))?
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_string(),
            (Some(t), None) => t.clone(),
            (None, None) => anyhow::bail!(
                "no job token: set BUTLER_TOKEN or pass --token-file (every RPC must carry the job's token)"
            ),
        };
        if token.is_empty() {
            anyhow::bail!("the job token is empty");
        }
        Ok(token)
    }
}

/// TLS to the coordinator, for workers and `butler status`.
#[derive(clap::Args)]
struct ClientTlsArgs {
    /// CA certificate (PEM) that signed the coordinator's certificate; turns TLS on (https:// URL).
    #[arg(long, env = "BUTLER_TLS_CA")]
    tls_ca: Option<PathBuf>,
    /// This client's certificate (PEM), for a coordinator that requires mutual TLS.
    #[arg(long, env = "BUTLER_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// This client's private key (PEM).
    #[arg(long, env = "BUTLER_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Check the coordinator's certificate against this name instead of the URL's host.
    #[arg(long, env = "BUTLER_TLS_DOMAIN")]
    tls_domain: Option<String>,
}

impl ClientTlsArgs {
    fn load(&self) -> Result<Option<butler_proto::transport::ClientTls>> {
        butler_proto::transport::ClientTlsFiles {
            ca: self.tls_ca.clone(),
            cert: self.tls_cert.clone(),
            key: self.tls_key.clone(),
            domain: self.tls_domain.clone(),
        }
        .load()
        .map_err(anyhow::Error::msg)
    }
}

#[derive(clap::Args)]
struct StatusArgs {
    /// Coordinator URL, e.g. http://127.0.0.1:50051 (https:// with TLS).
    #[arg(long, env = "BUTLER_COORDINATOR")]
    coordinator: String,
    #[command(flatten)]
    token: TokenArgs,
    #[command(flatten)]
    tls: ClientTlsArgs,
    /// Print the status document as JSON.
    #[arg(long)]
    json: bool,
    /// Print again every this many seconds until the coordinator goes away.
    #[arg(long, value_name = "SECONDS")]
    watch: Option<f64>,
}

#[derive(clap::Args)]
struct CoordinatorArgs {
    /// Job config (TOML).
    #[arg(long)]
    config: PathBuf,
    /// Number of workers in the job.
    #[arg(long)]
    world_size: u32,
    #[arg(long, default_value = "0.0.0.0:50051")]
    listen: SocketAddr,
    /// Serve Prometheus metrics (OpenMetrics text at /metrics, plain HTTP, no token) on this address.
    #[arg(long, env = "BUTLER_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
    /// Where metrics.jsonl and summary.json go (shared storage on a cluster).
    #[arg(long)]
    run_dir: PathBuf,
    #[command(flatten)]
    token: TokenArgs,
    /// Serve TLS with this certificate chain (PEM); clients then need an https:// URL and --tls-ca.
    #[arg(long, env = "BUTLER_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, env = "BUTLER_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Mutual TLS: accept only clients whose certificate this CA (PEM) signed.
    #[arg(long, env = "BUTLER_TLS_CLIENT_CA", requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
    /// Write the bound address here once listening (for launchers that pass port 0).
    #[arg(long)]
    addr_file: Option<PathBuf>,
    /// Continue a stopped job from the state in the run directory instead of starting over: from the
    /// newest intact commit point (`state.json`), or, for pseudo-label rounds, at their current phase.
    #[arg(long)]
    resume: bool,
    /// Only check this command line: parse the job config strictly and apply the world-size rules,
    /// then exit (0: it would start). Reads no data and opens no port; deploy/check.sh runs it on the
    /// Kubernetes manifests' coordinator arguments.
    #[arg(long)]
    check: bool,
}

#[derive(clap::Args)]
struct WorkerArgs {
    /// Coordinator URL, e.g. http://127.0.0.1:50051 (https:// with TLS).
    #[arg(long)]
    coordinator: String,
    #[command(flatten)]
    token: TokenArgs,
    #[command(flatten)]
    tls: ClientTlsArgs,
    /// Rank to ask for (e.g. a Kubernetes job completion index); the coordinator chooses if absent.
    #[arg(long, env = "BUTLER_RANK")]
    rank: Option<u32>,
    /// Address other workers reach this one at (a pod IP on a cluster).
    #[arg(long, env = "BUTLER_ADVERTISE_HOST", default_value = "127.0.0.1")]
    advertise_host: String,
    /// Intra-op threads for libtorch (0: the job config's `train.threads`, else libtorch's default).
    #[arg(long, env = "BUTLER_THREADS", default_value_t = 0)]
    threads: usize,
    #[arg(long)]
    worker_id: Option<String>,
    /// How long to keep trying to reach the coordinator, in seconds.
    #[arg(long, default_value_t = 60)]
    connect_wait_s: u64,
    /// This worker's index among the workers of its host: it trains on GPU `local_rank mod GPUs`
    /// (`torchrun`'s LOCAL_RANK).
    #[arg(long, env = "LOCAL_RANK", default_value_t = 0)]
    local_rank: usize,
}

fn init_tracing(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("BUTLER_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    // Colour only on a terminal: `butler run` sends each process's stderr to a log file.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    match format {
        LogFormat::Text => fmt.with_ansi(ansi).init(),
        // The worker's span (rank, generation) rides on every line as `span`.
        LogFormat::Json => fmt
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .init(),
    }
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = dispatch(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn dispatch(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Run(args) => {
            // The coordinator and workers it starts log the same way.
            if cli.log_format == LogFormat::Json {
                std::env::set_var("BUTLER_LOG_FORMAT", "json");
            }
            launcher::run(args)
        }
        Command::Coordinator(args) => {
            init_tracing(cli.log_format);
            coordinator(args)
        }
        Command::Worker(args) => {
            init_tracing(cli.log_format);
            worker(args)
        }
        Command::Status(args) => status(args),
        Command::Data(cmd) => data_cmd::run(cmd),
        Command::Bench(cmd) => bench::run(cmd),
        Command::Doctor(args) => doctor::run(args),
        Command::Report(args) => report::run(args),
        Command::Tls(cmd) => tls::run(cmd),
    }
}

fn coordinator(args: CoordinatorArgs) -> Result<()> {
    let config = butler_common::config::JobConfig::load(&args.config)?;
    if args.check {
        config.validate_world(args.world_size)?;
        println!(
            "{}: job {:?} is valid for {} workers",
            args.config.display(),
            config.job.name,
            args.world_size
        );
        return Ok(());
    }
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(
            butler_proto::transport::ServerTls::load(cert, key, args.tls_client_ca.as_deref())
                .map_err(anyhow::Error::msg)?,
        ),
        _ => None,
    };
    let opts = butler_coordinator::CoordinatorOptions {
        config,
        world_size: args.world_size,
        listen: args.listen,
        run_dir: args.run_dir.clone(),
        token: args.token.resolve()?,
        resume: args.resume,
        metrics_listen: args.metrics_listen,
        tls,
    };
    // A stale summary from an earlier run in this directory must not pass for this run's result.
    // A resumed job keeps the metrics of its earlier part.
    let stale: &[&str] = if args.resume {
        &["summary.json"]
    } else {
        &["summary.json", "metrics.jsonl"]
    };
    for stale in stale {
        let p = args.run_dir.join(stale);
        if p.exists() {
            std::fs::remove_file(&p).with_context(|| format!("removing stale {}", p.display()))?;
        }
    }
    let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    let addr_file = args.addr_file.clone();
    let outcome = rt.block_on(butler_coordinator::serve(opts, move |addr| {
        if let Some(f) = addr_file {
            if let Err(e) = butler_common::fsutil::write_atomic(&f, addr.to_string().as_bytes()) {
                tracing::error!(error = %e, "cannot write the address file");
            }
        }
    }))?;
    match outcome {
        butler_coordinator::Outcome::Succeeded(s) => {
            tracing::info!(
                test_accuracy = s.test_accuracy,
                wall_seconds = s.wall_seconds,
                "done"
            );
            Ok(())
        }
        butler_coordinator::Outcome::Failed(why) => anyhow::bail!("job failed: {why}"),
    }
}

fn worker(args: WorkerArgs) -> Result<()> {
    let worker_id = args.worker_id.unwrap_or_else(|| {
        let host = std::fs::read_to_string("/etc/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "worker".into());
        format!("{host}:{}", std::process::id())
    });
    // The worker logs its end inside its span (rank, generation).
    butler_worker::run(butler_worker::WorkerOptions {
        coordinator: args.coordinator,
        token: args.token.resolve()?,
        tls: args.tls.load()?,
        worker_id,
        requested_rank: args.rank,
        advertise_host: args.advertise_host,
        threads: args.threads,
        connect_wait: Duration::from_secs(args.connect_wait_s),
        local_rank: args.local_rank,
    })?;
    Ok(())
}

fn status(args: StatusArgs) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let token = args.token.resolve()?;
    let tls = args.tls.load()?;
    loop {
        let doc = rt
            .block_on(butler_coordinator::status_rpc(
                &args.coordinator,
                &token,
                tls.as_ref(),
            ))
            .map_err(anyhow::Error::msg)?;
        if args.json {
            println!("{doc}");
        } else {
            print!("{}", render_status(&doc));
        }
        match args.watch {
            Some(s) if s > 0.0 => std::thread::sleep(Duration::from_secs_f64(s)),
            _ => return Ok(()),
        }
    }
}

/// The status document as a few lines and a per-rank table.
fn render_status(d: &serde_json::Value) -> String {
    use std::fmt::Write;
    let num = |v: &serde_json::Value| v.as_f64();
    let fmt_opt = |v: Option<f64>, digits: usize| match v {
        Some(x) => format!("{x:.digits$}"),
        None => "-".into(),
    };
    let mut out = String::new();
    let _ = writeln!(
        out,
        "job {} — {} — generation {}, world {}, restarts {}",
        d["job"].as_str().unwrap_or("?"),
        d["state"].as_str().unwrap_or("?"),
        d["generation"],
        d["world_size"],
        d["restarts"]
    );
    if let Some(f) = d["failure"].as_str() {
        let _ = writeln!(out, "failure: {f}");
    }
    let eta = num(&d["eta_seconds"]).map_or("-".into(), |s| format!("{:.0}s", s));
    let _ = writeln!(
        out,
        "epoch {}/{}  step {}  {} samples/s  loss {}  val acc {}  test acc {}  elapsed {:.0}s  ETA {eta}",
        d["epoch"].as_u64().map_or("-".into(), |e| (e + 1).to_string()),
        d["epochs"],
        d["step"],
        fmt_opt(num(&d["samples_per_second"]), 0),
        fmt_opt(num(&d["train_loss"]), 4),
        fmt_opt(num(&d["val_accuracy"]), 4),
        fmt_opt(num(&d["test_accuracy"]), 4),
        num(&d["elapsed_seconds"]).unwrap_or(0.0),
    );
    if let Some(l) = d["late_rank"].as_object() {
        let _ = writeln!(
            out,
            "late rank: {} ({} phase, +{:.1} ms per step at step {})",
            l["rank"],
            l["phase"].as_str().unwrap_or("?"),
            l["lateness_seconds"].as_f64().unwrap_or(0.0) * 1e3,
            l["step"]
        );
    }
    let _ = writeln!(
        out,
        "{:>4}  {:<9} {:<10} {:>7} {:>8} {:>8} {:>8} {:>8} {:>9} {:>8}  host",
        "rank",
        "state",
        "phase",
        "beat s",
        "data ms",
        "comp ms",
        "comm ms",
        "opt ms",
        "late ms",
        "samp/s"
    );
    for r in d["ranks"].as_array().into_iter().flatten() {
        let t = &r["timing"];
        let w = &t["window"];
        let ms = |k: &str| fmt_opt(num(&w[k]).map(|x| x * 1e3), 2);
        let _ = writeln!(
            out,
            "{:>4}  {:<9} {:<10} {:>7} {:>8} {:>8} {:>8} {:>8} {:>9} {:>8}  {}{}",
            r["rank"],
            r["state"].as_str().unwrap_or("?"),
            t["phase"].as_str().unwrap_or("-"),
            fmt_opt(num(&r["heartbeat_age_seconds"]), 1),
            ms("data_seconds"),
            ms("compute_seconds"),
            ms("comm_seconds"),
            ms("optim_seconds"),
            ms("lateness_seconds"),
            fmt_opt(num(&w["samples_per_second"]), 0),
            t["host"].as_str().unwrap_or(""),
            if t["late"].as_bool() == Some(true) {
                "  LATE"
            } else {
                ""
            },
        );
    }
    out
}
