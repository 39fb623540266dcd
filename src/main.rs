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
    /// Where metrics.jsonl and summary.json go (shared storage on a cluster).
    #[arg(long)]
    run_dir: PathBuf,
    /// The shared job token; prefer the environment variable over the command line.
    #[arg(long, env = "BUTLER_TOKEN", hide_env_values = true)]
    token: String,
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
    /// Coordinator URL, e.g. http://127.0.0.1:50051.
    #[arg(long)]
    coordinator: String,
    #[arg(long, env = "BUTLER_TOKEN", hide_env_values = true)]
    token: String,
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

fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("BUTLER_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    // Colour only on a terminal: `butler run` sends each process's stderr to a log file.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
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
        Command::Run(args) => launcher::run(args),
        Command::Coordinator(args) => {
            init_tracing();
            coordinator(args)
        }
        Command::Worker(args) => {
            init_tracing();
            worker(args)
        }
        Command::Data(cmd) => data_cmd::run(cmd),
        Command::Bench(cmd) => bench::run(cmd),
        Command::Doctor(args) => doctor::run(args),
        Command::Report(args) => report::run(args),
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
    let opts = butler_coordinator::CoordinatorOptions {
        config,
        world_size: args.world_size,
        listen: args.listen,
        run_dir: args.run_dir.clone(),
        token: args.token,
        resume: args.resume,
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
    let report = butler_worker::run(butler_worker::WorkerOptions {
        coordinator: args.coordinator,
        token: args.token,
        worker_id,
        requested_rank: args.rank,
        advertise_host: args.advertise_host,
        threads: args.threads,
        connect_wait: Duration::from_secs(args.connect_wait_s),
        local_rank: args.local_rank,
    })?;
    tracing::info!(
        rank = report.rank,
        test_accuracy = report.test_accuracy,
        "worker done"
    );
    Ok(())
}
