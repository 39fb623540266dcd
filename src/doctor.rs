//! `butler doctor`: what this machine offers a worker — libtorch, CUDA devices, cuDNN, NCCL — and the
//! backend `cluster.backend = "auto"` would pick. It probes without any call that can panic and always
//! exits 0; `--check` runs the GPU self-checks (`butler_worker::selfcheck`) and exits non-zero when one
//! fails.

use anyhow::Result;
use butler_common::config::{BackendChoice, DeviceChoice};
use butler_worker::collective::nccl::{self, NcclProbe};
use butler_worker::device;
use serde::Serialize;

#[derive(clap::Args)]
pub struct DoctorArgs {
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
    /// Also run the GPU self-checks (CUDA ≡ CPU training, NCCL collectives, the ring on CUDA tensors,
    /// bf16); each one that cannot run here is skipped with its reason.
    #[arg(long)]
    check: bool,
}

/// The tch release the binary was built with pins this libtorch (and refuses to build against another).
const LIBTORCH_VERSION: &str = "2.11.0";

#[derive(Serialize)]
struct Report {
    butler: &'static str,
    libtorch: &'static str,
    libtorch_cuda_loaded: bool,
    cuda_available: bool,
    cuda_reason: Option<String>,
    cuda_devices: Vec<String>,
    cudnn: bool,
    cuda_driver: bool,
    nccl: Option<String>,
    nccl_reason: Option<String>,
    auto_device: String,
    auto_backend: String,
    auto_backend_reason: String,
}

fn report() -> Report {
    let cuda_available = tch::Cuda::is_available();
    let cuda_driver = nccl::driver_present();
    let cuda_devices = if cuda_available && cuda_driver {
        device::cuda_device_names()
    } else {
        Vec::new()
    };
    let (nccl_version, nccl_reason) = match nccl::probe() {
        NcclProbe::Available { version } => (Some(nccl::version_string(version)), None),
        NcclProbe::Missing(why) => (None, Some(why)),
    };
    let auto = device::resolve_device(DeviceChoice::Auto, 0).unwrap_or(tch::Device::Cpu);
    // What `auto` picks for a world of this one machine's ranks, one per GPU (or one CPU rank).
    let ranks = if auto.is_cuda() {
        (0..tch::Cuda::device_count().max(1) as usize)
            .map(|i| device::device_label(tch::Device::Cuda(i)))
            .collect::<Vec<_>>()
    } else {
        vec![device::device_label(auto)]
    };
    let has_nccl = vec![nccl_version.is_some() && auto.is_cuda(); ranks.len()];
    let (backend, why) = device::select_backend(BackendChoice::Auto, &ranks, &has_nccl)
        .expect("`auto` falls back to the ring rather than failing");
    Report {
        butler: env!("CARGO_PKG_VERSION"),
        libtorch: LIBTORCH_VERSION,
        libtorch_cuda_loaded: device::libtorch_cuda_loaded(),
        cuda_available,
        cuda_reason: (!cuda_available).then(device::cuda_missing_reason),
        cuda_devices,
        cudnn: tch::Cuda::cudnn_is_available(),
        cuda_driver,
        nccl: nccl_version,
        nccl_reason,
        auto_device: format!("{auto:?}"),
        auto_backend: format!("{backend:?}").to_lowercase(),
        auto_backend_reason: why,
    }
}

pub fn run(args: DoctorArgs) -> Result<()> {
    let r = report();
    if args.json && !args.check {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    if !args.json {
        print_text(&r);
    }
    if !args.check {
        return Ok(());
    }
    let results = butler_worker::selfcheck::run_all();
    if args.json {
        #[derive(Serialize)]
        struct WithChecks<'a> {
            #[serde(flatten)]
            report: &'a Report,
            checks: &'a [butler_worker::selfcheck::CheckResult],
        }
        println!(
            "{}",
            serde_json::to_string_pretty(&WithChecks {
                report: &r,
                checks: &results
            })?
        );
    } else {
        println!();
        println!("{:<40} {:<7} detail", "check", "result");
        for c in &results {
            println!("{:<40} {:<7} {}", c.name, c.outcome.label(), c.detail);
        }
    }
    let failed: Vec<&str> = results
        .iter()
        .filter(|c| c.outcome == butler_worker::selfcheck::Outcome::Fail)
        .map(|c| c.name.as_str())
        .collect();
    if !failed.is_empty() {
        anyhow::bail!("self-checks failed: {}", failed.join(", "));
    }
    Ok(())
}

fn print_text(r: &Report) {
    let yes = |b: bool| if b { "yes" } else { "no" };
    println!("butler {}", r.butler);
    println!("libtorch           {} (tch 0.24)", r.libtorch);
    println!(
        "libtorch_cuda.so   {}",
        if r.libtorch_cuda_loaded {
            "loaded"
        } else {
            "not loaded"
        }
    );
    println!("CUDA available     {}", yes(r.cuda_available));
    if let Some(why) = &r.cuda_reason {
        println!("  why not          {why}");
    }
    println!(
        "CUDA driver        {}",
        if r.cuda_driver {
            "libcuda.so.1 found"
        } else {
            "not found"
        }
    );
    for d in &r.cuda_devices {
        println!("  {d}");
    }
    println!("cuDNN              {}", yes(r.cudnn));
    match (&r.nccl, &r.nccl_reason) {
        (Some(v), _) => println!("NCCL               {v}"),
        (None, Some(why)) => println!("NCCL               not available: {why}"),
        (None, None) => println!("NCCL               not available"),
    }
    println!("device = \"auto\"    {}", r.auto_device);
    println!(
        "backend = \"auto\"   {} ({})",
        r.auto_backend, r.auto_backend_reason
    );
}
