//! Where a worker computes, and in what precision: `[cluster] device` resolved against what libtorch
//! sees, the collective backend every rank derives from the rendezvous, and bf16 autocast regions.

use crate::{Error, Result};
use butler_common::config::{BackendChoice, DeviceChoice, Precision};
use tch::{Device, Tensor};

/// The device this worker trains on. `local_rank` is the worker's index among the workers of its host
/// (the launcher's or `LOCAL_RANK`); it picks GPU `local_rank mod count` of the GPUs this process sees
/// (`CUDA_VISIBLE_DEVICES` already narrows those).
pub fn resolve_device(choice: DeviceChoice, local_rank: usize) -> Result<Device> {
    let cuda = || {
        let n = tch::Cuda::device_count().max(1) as usize;
        Device::Cuda(local_rank % n)
    };
    match choice {
        DeviceChoice::Cpu => Ok(Device::Cpu),
        DeviceChoice::Auto if tch::Cuda::is_available() => Ok(cuda()),
        DeviceChoice::Auto => Ok(Device::Cpu),
        DeviceChoice::Cuda if tch::Cuda::is_available() => Ok(cuda()),
        DeviceChoice::Cuda => Err(Error::Setup(format!(
            "cluster.device = \"cuda\" but libtorch sees no CUDA device ({}); run `butler doctor` to see \
             what this machine offers, or set cluster.device = \"auto\" or \"cpu\"",
            cuda_missing_reason()
        ))),
    }
}

/// Why CUDA is unavailable, as far as this process can tell.
pub fn cuda_missing_reason() -> String {
    if !libtorch_cuda_loaded() {
        return "libtorch_cuda.so is not loaded: this libtorch is a CPU-only build, or the binary was \
                linked without --no-as-needed"
            .into();
    }
    if !crate::collective::nccl::driver_present() {
        return "libcuda.so.1 (the NVIDIA driver) is not installed".into();
    }
    "the driver reports no usable GPU (none visible under CUDA_VISIBLE_DEVICES, or the driver is too \
     old for CUDA 13: R580 or newer is needed)"
        .into()
}

/// Whether `libtorch_cuda.so` is mapped into this process (the proof that the `--no-as-needed` link
/// took: without it, libtorch's CUDA half is never loaded and CUDA is invisible).
pub fn libtorch_cuda_loaded() -> bool {
    std::fs::read_to_string("/proc/self/maps")
        .map(|m| m.lines().any(|l| l.ends_with("/libtorch_cuda.so")))
        .unwrap_or(false)
}

/// "cuda:i NAME (N GiB)" for every GPU libtorch sees. Call only when CUDA is available and the driver
/// library is present (cudarc panics without it).
pub fn cuda_device_names() -> Vec<String> {
    (0..tch::Cuda::device_count().max(0) as usize)
        .map(|i| {
            let name = cudarc::driver::CudaContext::new(i)
                .and_then(|c| {
                    Ok(format!(
                        "{} ({:.0} GiB)",
                        c.name()?,
                        c.total_mem()? as f64 / (1u64 << 30) as f64
                    ))
                })
                .unwrap_or_else(|e| format!("unreadable: {e:?}"));
            format!("cuda:{i} {name}")
        })
        .collect()
}

/// How this rank describes its device in the rendezvous: `cpu`, or `cuda:<index>@<host>#<GPU UUID>`
/// so that ranks sharing one GPU can be told apart from ranks on distinct ones — by the UUID, since
/// processes that each see one GPU through `CUDA_VISIBLE_DEVICES` all call it `cuda:0`, and pods on one
/// node may share a host name.
pub fn device_label(device: Device) -> String {
    match device {
        Device::Cuda(i) => {
            let uuid = if crate::collective::nccl::driver_present() {
                cudarc::driver::CudaContext::new(i)
                    .and_then(|c| c.uuid())
                    .map(|u| {
                        u.bytes
                            .iter()
                            .map(|b| format!("{:02x}", *b as u8))
                            .collect::<String>()
                    })
                    .ok()
            } else {
                None
            };
            match uuid {
                Some(u) => format!("cuda:{i}@{}#{u}", hostname()),
                None => format!("cuda:{i}@{}", hostname()),
            }
        }
        _ => "cpu".to_string(),
    }
}

/// The part of a device label that identifies the physical GPU: its UUID when the label has one.
fn gpu_identity(label: &str) -> &str {
    label.rsplit_once('#').map_or(label, |(_, uuid)| uuid)
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}

/// `t` (a host batch) on `device`. To a GPU the batch goes through pinned memory with a non-blocking copy
/// (the copy overlaps with the kernels already queued; libtorch's pinned-memory cache keeps the staging
/// buffer alive until the copy has run); where pinning fails, a plain copy.
pub fn to_step_device(t: &Tensor, device: Device) -> Tensor {
    if !device.is_cuda() || t.device() != Device::Cpu {
        return t.to_device(device);
    }
    // `_pin_memory(self, cuda:i)` takes CUDA's pinned allocator directly; tch's `pin_memory(device)` would
    // pass a CPU device for "none" (deprecated, and CPU is no accelerator: it throws).
    match t.f_internal_pin_memory(device) {
        Ok(pinned) => pinned
            .f_to_device_(device, t.kind(), true, false)
            .unwrap_or_else(|_| t.to_device(device)),
        Err(_) => t.to_device(device),
    }
}

/// The collective every rank uses. Every rank evaluates this on the same rendezvous answer, so all agree.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Nccl,
    Ring,
}

/// Picks the backend from what every rank published: `auto` is NCCL when every rank is on its own CUDA
/// device and can load NCCL, else the TCP ring (which also carries CUDA tensors, through host memory).
/// `nccl` without those conditions is an error naming the ranks that lack them.
pub fn select_backend(
    choice: BackendChoice,
    devices: &[String],
    nccl: &[bool],
) -> std::result::Result<(Backend, String), String> {
    if choice == BackendChoice::Ring {
        return Ok((Backend::Ring, "cluster.backend = \"ring\"".into()));
    }
    let not_cuda: Vec<usize> = (0..devices.len())
        .filter(|&r| !devices[r].starts_with("cuda"))
        .collect();
    let no_nccl: Vec<usize> = (0..devices.len())
        .filter(|&r| !nccl.get(r).copied().unwrap_or(false))
        .collect();
    let mut shared = Vec::new();
    for (a, da) in devices.iter().enumerate() {
        for (b, db) in devices.iter().enumerate().skip(a + 1) {
            if da.starts_with("cuda") && gpu_identity(da) == gpu_identity(db) {
                shared.push(format!("ranks {a} and {b} share {da}"));
            }
        }
    }
    let problem = if !not_cuda.is_empty() {
        Some(format!("ranks {not_cuda:?} are not on CUDA"))
    } else if !no_nccl.is_empty() {
        Some(format!("ranks {no_nccl:?} cannot load NCCL"))
    } else if !shared.is_empty() {
        Some(format!(
            "{} (NCCL needs one GPU per rank)",
            shared.join(", ")
        ))
    } else {
        None
    };
    match (choice, problem) {
        (_, None) => Ok((
            Backend::Nccl,
            "every rank is on its own CUDA device with NCCL".into(),
        )),
        (BackendChoice::Auto, Some(why)) => Ok((Backend::Ring, format!("TCP ring: {why}"))),
        (_, Some(why)) => Err(format!(
            "cluster.backend = \"nccl\" but {why}; run `butler doctor` on those machines, or set \
             cluster.backend = \"auto\" or \"ring\""
        )),
    }
}

extern "C" {
    fn butler_autocast_enter_bf16(cuda: i32, prev_enabled: *mut i32, prev_dtype: *mut i32) -> i32;
    fn butler_autocast_exit(cuda: i32, prev_enabled: i32, prev_dtype: i32) -> i32;
    fn butler_cuda_fp32_ieee(ieee: i32) -> i32;
}

/// Makes CUDA's fp32 math IEEE fp32 (no TF32 in convolutions or matmuls, deterministic cuDNN), as the
/// CUDA ≡ CPU self-checks need, or restores libtorch's defaults (TF32 convolutions). Process-wide.
pub fn set_cuda_fp32_ieee(ieee: bool) -> bool {
    // SAFETY: plain setters of ATen's global context; the shim catches C++ exceptions.
    unsafe { butler_cuda_fp32_ieee(i32::from(ieee)) == 0 }
}

/// Runs `f` under the configured precision on `device`: plain for fp32; for bf16 under ATen's autocast
/// with dtype bfloat16 (matmuls and convolutions in bf16, reductions and losses in fp32, as
/// `torch.autocast(device_type, dtype=torch.bfloat16)`). Parameters, gradients and optimizer state are
/// untouched: they stay fp32 (master weights). Backward runs outside the region, as PyTorch recommends.
pub fn with_precision<T>(precision: Precision, device: Device, f: impl FnOnce() -> T) -> T {
    if precision == Precision::Fp32 {
        return f();
    }
    /// Leaves the region on every exit, unwinding included.
    struct Region {
        cuda: i32,
        prev_enabled: i32,
        prev_dtype: i32,
    }
    impl Drop for Region {
        fn drop(&mut self) {
            // SAFETY: restores the state saved on entry; the shim catches C++ exceptions.
            unsafe { butler_autocast_exit(self.cuda, self.prev_enabled, self.prev_dtype) };
        }
    }
    let cuda = i32::from(device.is_cuda());
    let (mut prev_enabled, mut prev_dtype) = (0, 0);
    // SAFETY: plain calls into ATen's thread-local autocast state; the shim catches C++ exceptions.
    let entered =
        unsafe { butler_autocast_enter_bf16(cuda, &mut prev_enabled, &mut prev_dtype) } == 0;
    let _region = entered.then_some(Region {
        cuda,
        prev_enabled,
        prev_dtype,
    });
    f()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn auto_picks_nccl_only_when_every_rank_has_its_own_gpu_and_nccl() {
        let gpus = labels(&["cuda:0@a", "cuda:1@a", "cuda:0@b"]);
        let (b, _) = select_backend(BackendChoice::Auto, &gpus, &[true; 3]).unwrap();
        assert_eq!(b, Backend::Nccl);
        let mixed = labels(&["cuda:0@a", "cpu"]);
        let (b, why) = select_backend(BackendChoice::Auto, &mixed, &[true, true]).unwrap();
        assert_eq!(b, Backend::Ring);
        assert!(why.contains("[1]"), "{why}");
        let (b, why) = select_backend(BackendChoice::Auto, &gpus, &[true, false, true]).unwrap();
        assert_eq!(b, Backend::Ring);
        assert!(why.contains("NCCL"), "{why}");
        let shared = labels(&["cuda:0@a", "cuda:0@a"]);
        let (b, why) = select_backend(BackendChoice::Auto, &shared, &[true, true]).unwrap();
        assert_eq!(b, Backend::Ring);
        assert!(why.contains("share cuda:0@a"), "{why}");
        // One GPU per process (CUDA_VISIBLE_DEVICES): same ordinal and host, different GPUs.
        let own = labels(&["cuda:0@n#aa01", "cuda:0@n#bb02"]);
        let (b, _) = select_backend(BackendChoice::Auto, &own, &[true, true]).unwrap();
        assert_eq!(b, Backend::Nccl);
        // The same GPU seen from two containers with different host names.
        let same = labels(&["cuda:0@p1#aa01", "cuda:1@p2#aa01"]);
        let (b, _) = select_backend(BackendChoice::Auto, &same, &[true, true]).unwrap();
        assert_eq!(b, Backend::Ring);
    }

    #[test]
    fn nccl_by_choice_names_the_ranks_that_cannot() {
        let mixed = labels(&["cuda:0@a", "cpu", "cpu"]);
        let e = select_backend(BackendChoice::Nccl, &mixed, &[true; 3]).unwrap_err();
        assert!(e.contains("ranks [1, 2] are not on CUDA"), "{e}");
        assert!(e.contains("butler doctor"), "{e}");
        let (b, _) = select_backend(BackendChoice::Ring, &labels(&["cuda:0@a"]), &[true]).unwrap();
        assert_eq!(b, Backend::Ring);
    }

    #[test]
    fn cpu_is_always_available_and_cuda_is_refused_without_a_gpu() {
        assert_eq!(resolve_device(DeviceChoice::Cpu, 3).unwrap(), Device::Cpu);
        if tch::Cuda::is_available() {
            println!("skipped the no-GPU half: this machine has CUDA");
            return;
        }
        assert_eq!(resolve_device(DeviceChoice::Auto, 0).unwrap(), Device::Cpu);
        let e = resolve_device(DeviceChoice::Cuda, 0)
            .unwrap_err()
            .to_string();
        assert!(e.contains("cluster.device = \"cuda\""), "{e}");
        assert!(e.contains("butler doctor"), "{e}");
    }

    #[test]
    fn the_fp32_mode_switch_works_without_a_gpu() {
        assert!(set_cuda_fp32_ieee(true));
        assert!(set_cuda_fp32_ieee(false));
    }

    #[test]
    fn bf16_autocast_runs_matmuls_in_bf16_on_cpu_and_leaves_fp32_alone() {
        let a = tch::Tensor::randn([4, 8], (tch::Kind::Float, Device::Cpu));
        let w = tch::Tensor::randn([8, 3], (tch::Kind::Float, Device::Cpu));
        let fp32 = with_precision(Precision::Fp32, Device::Cpu, || a.matmul(&w));
        assert_eq!(fp32.kind(), tch::Kind::Float);
        let bf16 = with_precision(Precision::Bf16, Device::Cpu, || a.matmul(&w));
        assert_eq!(bf16.kind(), tch::Kind::BFloat16);
        // Outside the region autocast is off again.
        assert_eq!(a.matmul(&w).kind(), tch::Kind::Float);
        let diff = (bf16.to_kind(tch::Kind::Float) - &fp32)
            .abs()
            .max()
            .double_value(&[]);
        assert!(diff < 0.2, "bf16 matmul differs from fp32 by {diff}");
    }
}
