//! NCCL collectives on CUDA tensors, through cudarc's result-level bindings (NCCL and the CUDA driver are
//! loaded at run time, so this builds and its probes run on machines without either).
//!
//! Stream order: every operation is enqueued on libtorch's current stream of the device, which is the
//! legacy default (null) stream because tch never sets another. Kernels that produced a buffer are
//! therefore ordered before the collective that reads it, and kernels that read the result after it,
//! with no host synchronisation and no events between streams (PyTorch's `async_op=False` path since
//! 2025 does the same).
//!
//! Never hang: the communicator is created non-blocking (`ncclConfig_t.blocking = 0`). After each
//! operation one CUDA event is recorded on the stream and polled, together with
//! `ncclCommGetAsyncError`, against `timeout`; past it the communicator is aborted (`ncclCommAbort`, which
//! also releases kernels spinning on a dead peer) and the operation fails. NCCL cannot tell which peer is
//! gone; the culprit comes from the coordinator's view (the `suspect` callback, fed by the heartbeat).
//!
//! Thread safety: NCCL forbids concurrent calls on one communicator. `NcclCollective` is `Send` (moved to
//! the training thread once) and every operation takes `&mut self`.

use super::api::Collective;
use super::error::{CollectiveError, Result};
use cudarc::driver::{CudaContext, CudaEvent, CudaStream};
use cudarc::nccl::result as nccl;
use cudarc::nccl::sys;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};

/// Bytes of an NCCL unique id (`NCCL_UNIQUE_ID_BYTES`).
pub const NCCL_ID_BYTES: usize = 128;

/// Reports what the coordinator knows about failed peers (e.g. "rank 1 missed its heartbeats"), if
/// anything; consulted only when an operation has already failed or timed out.
pub type Suspect = Box<dyn Fn() -> Option<String> + Send>;

/// What this process can do with NCCL, probed without any call that could panic.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NcclProbe {
    /// libnccl is loadable; its version code (e.g. 22809 for 2.28.9).
    Available { version: i32 },
    /// Why not, in words a user can act on.
    Missing(String),
}

/// Probes for libnccl. cudarc panics when a library it needs cannot be loaded, so this checks
/// `is_culib_present()` before the one call (`ncclGetVersion`) it makes.
pub fn probe() -> NcclProbe {
    // SAFETY: dlopen-and-close of the candidate names; no symbol of the library is called.
    if !unsafe { sys::is_culib_present() } {
        return NcclProbe::Missing(
            "libnccl.so not found (the torch wheel ships only libnccl.so.2: run scripts/setup.sh, which \
             makes the libnccl.so link in <venv>/nccl-shim, and put that directory on LD_LIBRARY_PATH)"
                .into(),
        );
    }
    match nccl::get_nccl_version() {
        // The communicator config we fill is nccl.h 2.28's (`ncclConfig_v22800`).
        Ok(version) if version < 22800 => NcclProbe::Missing(format!(
            "the libnccl.so found is NCCL {}; butler needs 2.28 or newer (the torch 2.11 wheel's \
             nvidia-nccl-cu13 has 2.28.9: is an older system NCCL first on LD_LIBRARY_PATH?)",
            version_string(version)
        )),
        Ok(version) => NcclProbe::Available { version },
        Err(e) => NcclProbe::Missing(format!("ncclGetVersion failed: {}", error_string(&e))),
    }
}

/// Whether the CUDA driver library (libcuda.so.1, from the node's driver) can be loaded.
pub fn driver_present() -> bool {
    // SAFETY: as in `probe`.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// Version code as "2.28.9".
pub fn version_string(code: i32) -> String {
    // NCCL_VERSION(X,Y,Z) = X*10000 + Y*100 + Z for 2.9 and later.
    format!("{}.{}.{}", code / 10000, (code % 10000) / 100, code % 100)
}

/// Creates the unique id rank 0 hands to the others (through the coordinator). Needs libnccl but no
/// GPU; it starts NCCL's bootstrap listener in this process.
pub fn create_unique_id() -> Result<[u8; NCCL_ID_BYTES]> {
    if let NcclProbe::Missing(why) = probe() {
        return Err(CollectiveError::Unavailable {
            what: "NCCL".into(),
            detail: why,
        });
    }
    let id = nccl::get_uniqueid().map_err(|e| CollectiveError::Nccl {
        op: "ncclGetUniqueId",
        detail: error_string(&e),
    })?;
    Ok(id.internal.map(|c| c as u8))
}

fn error_string(e: &nccl::NcclError) -> String {
    // SAFETY: ncclGetErrorString returns a pointer to a static string for any result code.
    let s = unsafe { sys::ncclGetErrorString(e.0) };
    let text = if s.is_null() {
        String::new()
    } else {
        // SAFETY: non-null, NUL-terminated, static.
        unsafe { std::ffi::CStr::from_ptr(s) }
            .to_string_lossy()
            .into_owned()
    };
    format!("{:?} ({text})", e.0)
}

/// The first "rank N" a failure reason mentions.
pub fn first_rank_mentioned(reason: &str) -> Option<usize> {
    let mut rest = reason;
    while let Some(i) = rest.find("rank ") {
        rest = &rest[i + 5..];
        let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
        if let Ok(r) = digits.parse() {
            return Some(r);
        }
    }
    None
}

pub struct NcclCollective {
    comm: sys::ncclComm_t,
    rank: usize,
    world: usize,
    device: usize,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    event: CudaEvent,
    timeout: Duration,
    suspect: Option<Suspect>,
    /// Set once an operation failed: the communicator is aborted and refuses further work.
    broken: Option<String>,
}

// SAFETY: the communicator handle is used by one thread at a time (every operation takes `&mut self`),
// which is all NCCL requires; the CUDA objects are plain driver handles.
unsafe impl Send for NcclCollective {}

impl NcclCollective {
    /// Joins the communicator of `world` ranks identified by `id` (made by rank 0's
    /// [`create_unique_id`]) on CUDA device `device`. Fails, rather than hanging, when the others do not
    /// join within `timeout`.
    pub fn init(
        rank: usize,
        world: usize,
        id: &[u8],
        device: usize,
        timeout: Duration,
        suspect: Option<Suspect>,
    ) -> Result<NcclCollective> {
        let op = "nccl init";
        if !driver_present() {
            return Err(CollectiveError::Unavailable {
                what: "the CUDA driver".into(),
                detail: "libcuda.so.1 not found (it comes with the node's NVIDIA driver)".into(),
            });
        }
        if let NcclProbe::Missing(why) = probe() {
            return Err(CollectiveError::Unavailable {
                what: "NCCL".into(),
                detail: why,
            });
        }
        let id: [u8; NCCL_ID_BYTES] =
            id.try_into()
                .map_err(|_| CollectiveError::InvalidArgument {
                    op,
                    detail: format!(
                        "NCCL unique id has {} bytes, expected {NCCL_ID_BYTES}",
                        id.len()
                    ),
                })?;
        let driver = |what: &'static str| {
            move |e: cudarc::driver::DriverError| CollectiveError::Nccl {
                op,
                detail: format!("{what}: CUDA driver error {e:?}"),
            }
        };
        // Retains the device's primary context (the one libtorch's runtime uses) and makes it current on
        // this thread, so NCCL binds to this device.
        let ctx = CudaContext::new(device).map_err(driver("cannot open the device's context"))?;
        let stream = ctx.default_stream();
        let event = ctx
            .new_event(None)
            .map_err(driver("cannot create an event"))?;
        let mut config = default_config();
        config.blocking = 0;
        let unique = sys::ncclUniqueId {
            internal: id.map(|b| b as std::ffi::c_char),
        };
        let mut comm: sys::ncclComm_t = std::ptr::null_mut();
        // SAFETY: `comm` and `config` are valid for the call; the id is 128 bytes as NCCL requires.
        let r = unsafe {
            nccl::comm_init_rank_config(&mut comm, world as i32, unique, rank as i32, &mut config)
        };
        let mut me = NcclCollective {
            comm,
            rank,
            world,
            device,
            ctx,
            stream,
            event,
            timeout,
            suspect,
            broken: None,
        };
        if let Err(e) = r {
            return Err(me.fail(op, error_string(&e)));
        }
        // Non-blocking init returns at once; the communicator is ready when its async state leaves
        // ncclInProgress (the other ranks have connected).
        me.wait_enqueued(op, Instant::now() + timeout)?;
        Ok(me)
    }

    pub fn device(&self) -> usize {
        self.device
    }

    /// Sum across ranks into a new tensor (NCCL's out-of-place form). At world size 1 NCCL skips an
    /// in-place reduction altogether, so the self-checks and the benchmark use this one, which at least
    /// moves the data.
    pub fn all_reduce_sum_out_of_place(&mut self, t: &Tensor) -> Result<Tensor> {
        let op = "all_reduce";
        let dt = element_type(op, t)?;
        let (input, _) = self.on_device(t);
        let out = input.empty_like();
        let (src, dst, n) = (input.data_ptr(), out.data_ptr(), input.numel());
        // SAFETY: `src` and `dst` are contiguous device buffers of `n` elements, alive until `run` has
        // waited for the operation.
        self.run(op, |comm, stream| unsafe {
            nccl::all_reduce(src, dst, n, dt, sys::ncclRedOp_t::ncclSum, comm, stream)
        })?;
        Ok(out)
    }

    /// Marks the communicator broken, aborts it, and builds the error for `op`.
    fn fail(&mut self, op: &'static str, detail: String) -> CollectiveError {
        self.abort();
        self.broken = Some(format!("{op}: {detail}"));
        let reported = self.suspect.as_ref().and_then(|f| f());
        CollectiveError::Nccl {
            op,
            detail: match reported {
                Some(r) => format!("{detail}; the coordinator reports: {r}"),
                None => detail,
            },
        }
    }

    fn abort(&mut self) {
        if !self.comm.is_null() {
            // SAFETY: a communicator this struct created and has not freed. Errors are ignored: there is
            // nothing better to do with a communicator that failed.
            let _ = unsafe { nccl::comm_abort(self.comm) };
            self.comm = std::ptr::null_mut();
        }
    }

    fn async_state(&self) -> sys::ncclResult_t {
        let mut state = sys::ncclResult_t::ncclSuccess;
        // SAFETY: valid communicator, valid out-pointer.
        let r = unsafe { sys::ncclCommGetAsyncError(self.comm, &mut state) };
        if r != sys::ncclResult_t::ncclSuccess {
            return r;
        }
        state
    }

    /// Waits until NCCL has finished enqueueing (a non-blocking communicator may return ncclInProgress
    /// from a call and finish it in the background).
    fn wait_enqueued(&mut self, op: &'static str, deadline: Instant) -> Result<()> {
        self.wait_until(op, deadline, |me| {
            Ok(me.async_state() == sys::ncclResult_t::ncclSuccess)
        })
    }

    /// Polls `done` until it holds, failing on an NCCL async error, past `deadline`, or as soon as the
    /// coordinator reports a failed peer (checked once the first microseconds of spinning are over).
    fn wait_until(
        &mut self,
        op: &'static str,
        deadline: Instant,
        mut done: impl FnMut(&Self) -> std::result::Result<bool, String>,
    ) -> Result<()> {
        let mut backoff = Backoff::default();
        loop {
            match done(self) {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) => return Err(self.fail(op, e)),
            }
            match self.async_state() {
                sys::ncclResult_t::ncclSuccess | sys::ncclResult_t::ncclInProgress => {}
                other => return Err(self.fail(op, error_string(&nccl::NcclError(other)))),
            }
            if Instant::now() >= deadline {
                return Err(self.timed_out(op));
            }
            if backoff.sleeping() {
                if let Some(reason) = self.suspect.as_ref().and_then(|f| f()) {
                    return Err(self.peer_gone(op, reason));
                }
            }
            backoff.pause();
        }
    }

    fn timed_out(&mut self, op: &'static str) -> CollectiveError {
        let reported = self.suspect.as_ref().and_then(|f| f());
        self.abort();
        let what = match &reported {
            Some(r) => format!("the coordinator reports: {r}"),
            None => "no peer is known to be gone yet".to_string(),
        };
        self.broken = Some(format!("{op}: timed out"));
        CollectiveError::DeviceTimeout {
            op,
            timeout: self.timeout,
            rank: reported.as_deref().and_then(first_rank_mentioned),
            what,
        }
    }

    /// The coordinator reported a failed peer while an operation waited: abort and name it.
    fn peer_gone(&mut self, op: &'static str, reason: String) -> CollectiveError {
        self.abort();
        self.broken = Some(format!("{op}: aborted, {reason}"));
        CollectiveError::PeerGone {
            op,
            rank: first_rank_mentioned(&reason),
            reason,
        }
    }

    /// Runs one NCCL call on the stream, then waits (bounded) for it to complete on the device.
    fn run(
        &mut self,
        op: &'static str,
        call: impl FnOnce(
            sys::ncclComm_t,
            sys::cudaStream_t,
        ) -> std::result::Result<nccl::NcclStatus, nccl::NcclError>,
    ) -> Result<()> {
        if let Some(cause) = &self.broken {
            return Err(CollectiveError::Poisoned {
                op,
                cause: cause.clone(),
            });
        }
        let deadline = Instant::now() + self.timeout;
        let stream = self.stream.cu_stream() as sys::cudaStream_t;
        if let Err(e) = call(self.comm, stream) {
            return Err(self.fail(op, error_string(&e)));
        }
        self.wait_enqueued(op, deadline)?;
        if let Err(e) = self.event.record(&self.stream) {
            return Err(self.fail(op, format!("cannot record an event: {e:?}")));
        }
        // The event completes when the collective (and everything before it on the stream) has run.
        self.wait_until(op, deadline, |me| {
            me.event
                .try_is_complete()
                .map_err(|e| format!("CUDA error while waiting: {e:?}"))
        })
    }

    /// `t` as a contiguous tensor on this communicator's device, and whether it is a staged copy that
    /// must be copied back.
    fn on_device(&self, t: &Tensor) -> (Tensor, bool) {
        let dev = Device::Cuda(self.device);
        if t.device() == dev && t.is_contiguous() {
            (t.shallow_clone(), false)
        } else {
            (t.to_device(dev).contiguous(), true)
        }
    }
}

impl Drop for NcclCollective {
    fn drop(&mut self) {
        // ncclCommDestroy can block forever on a dead peer; abort never does (as ProcessGroupNCCL).
        self.abort();
        let _ = &self.ctx;
    }
}

fn default_config() -> sys::ncclConfig_t {
    // NCCL_CONFIG_INITIALIZER of nccl.h 2.28: size, magic, version, then every attribute undefined.
    const UNDEF_INT: i32 = i32::MIN;
    sys::ncclConfig_t {
        size: std::mem::size_of::<sys::ncclConfig_t>(),
        magic: 0xcafe_beef,
        version: 22809,
        blocking: UNDEF_INT,
        cgaClusterSize: UNDEF_INT,
        minCTAs: UNDEF_INT,
        maxCTAs: UNDEF_INT,
        netName: std::ptr::null(),
        splitShare: UNDEF_INT,
        trafficClass: UNDEF_INT,
        commName: std::ptr::null(),
        collnetEnable: UNDEF_INT,
        CTAPolicy: UNDEF_INT,
        shrinkShare: UNDEF_INT,
        nvlsCTAs: UNDEF_INT,
        nChannelsPerNetPeer: UNDEF_INT,
        nvlinkCentricSched: UNDEF_INT,
    }
}

/// NCCL's element type for a tensor kind.
pub fn nccl_type(kind: Kind) -> Option<sys::ncclDataType_t> {
    use sys::ncclDataType_t as T;
    Some(match kind {
        Kind::Float => T::ncclFloat32,
        Kind::Double => T::ncclFloat64,
        Kind::BFloat16 => T::ncclBfloat16,
        Kind::Half => T::ncclFloat16,
        Kind::Int => T::ncclInt32,
        Kind::Int64 => T::ncclInt64,
        Kind::Int8 => T::ncclInt8,
        Kind::Uint8 => T::ncclUint8,
        _ => return None,
    })
}

fn element_type(op: &'static str, t: &Tensor) -> Result<sys::ncclDataType_t> {
    nccl_type(t.kind()).ok_or_else(|| CollectiveError::InvalidArgument {
        op,
        detail: format!("NCCL has no element type for {:?}", t.kind()),
    })
}

/// Spins (yielding) for the first half millisecond, then sleeps in short steps: a collective usually
/// finishes in microseconds to a millisecond, and a late wake-up adds to every bucket of every step;
/// dead peers are detected in seconds.
struct Backoff(Instant);

impl Default for Backoff {
    fn default() -> Self {
        Backoff(Instant::now())
    }
}

impl Backoff {
    /// Whether the spinning phase is over.
    fn sleeping(&self) -> bool {
        self.0.elapsed() >= Duration::from_micros(500)
    }

    fn pause(&mut self) {
        if self.sleeping() {
            std::thread::sleep(Duration::from_micros(20));
        } else {
            std::thread::yield_now();
        }
    }
}

impl Collective for NcclCollective {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&mut self, t: &mut Tensor) -> Result<()> {
        let op = "all_reduce";
        let dt = element_type(op, t)?;
        let (buf, staged) = self.on_device(t);
        let (ptr, n) = (buf.data_ptr(), buf.numel());
        // SAFETY: `buf` is a contiguous device tensor of `n` elements of type `dt`, alive until `run`
        // has waited for the operation to complete; in place is allowed by NCCL.
        self.run(op, |comm, stream| unsafe {
            nccl::all_reduce(ptr, ptr, n, dt, sys::ncclRedOp_t::ncclSum, comm, stream)
        })?;
        if staged {
            t.copy_(&buf);
        }
        Ok(())
    }

    fn all_gather(&mut self, t: &Tensor) -> Result<Tensor> {
        let op = "all_gather";
        let dt = element_type(op, t)?;
        let (input, _) = self.on_device(t);
        let mut shape = input.size();
        if shape.is_empty() {
            shape.push(1);
        }
        shape[0] *= self.world as i64;
        let out = Tensor::empty(shape.as_slice(), (t.kind(), Device::Cuda(self.device)));
        let (src, dst, n) = (input.data_ptr(), out.data_ptr(), input.numel());
        // SAFETY: `src` holds `n` elements, `dst` world·n, both contiguous on this device and alive
        // until the operation completed.
        self.run(op, |comm, stream| unsafe {
            nccl::all_gather(src, dst, n, dt, comm, stream)
        })?;
        Ok(if t.device() == out.device() {
            out
        } else {
            out.to_device(t.device())
        })
    }

    fn broadcast(&mut self, t: &mut Tensor, root: usize) -> Result<()> {
        let op = "broadcast";
        if root >= self.world {
            return Err(CollectiveError::InvalidArgument {
                op,
                detail: format!("root {root} out of range for world size {}", self.world),
            });
        }
        let dt = element_type(op, t)?;
        let (buf, staged) = self.on_device(t);
        let (ptr, n) = (buf.data_ptr(), buf.numel());
        // SAFETY: as in all_reduce_sum.
        self.run(op, |comm, stream| unsafe {
            nccl::broadcast(ptr, ptr, n, dt, root as i32, comm, stream)
        })?;
        if staged {
            t.copy_(&buf);
        }
        Ok(())
    }

    fn barrier(&mut self) -> Result<()> {
        let mut one = Tensor::ones([1], (Kind::Float, Device::Cuda(self.device)));
        self.all_reduce_sum(&mut one)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_codes_read_as_dotted() {
        assert_eq!(version_string(22809), "2.28.9");
        assert_eq!(version_string(21903), "2.19.3");
    }

    #[test]
    fn the_reported_rank_is_found_in_the_reason() {
        assert_eq!(
            first_rank_mentioned("rank 3 missed heartbeats for 30s"),
            Some(3)
        );
        assert_eq!(
            first_rank_mentioned("the coordinator stopped the job: rank 12 failed: boom"),
            Some(12)
        );
        assert_eq!(first_rank_mentioned("the ranks disagree"), None);
    }

    #[test]
    fn every_float_kind_maps_to_an_nccl_type() {
        for k in [Kind::Float, Kind::Double, Kind::BFloat16, Kind::Half] {
            assert!(nccl_type(k).is_some(), "{k:?}");
        }
        assert!(nccl_type(Kind::Bool).is_none());
    }

    #[test]
    fn the_config_matches_the_wheels_nccl_h() {
        // sizeof(ncclConfig_v22800) in nccl.h 2.28.9: 8 + 4 + 4 + 4·4 + 8 + 2·4 + 8 + 6·4 = 80.
        let c = default_config();
        assert_eq!(c.size, 80);
        assert_eq!(c.magic, 0xcafebeef);
    }
}
