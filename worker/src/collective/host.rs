//! The TCP ring behind the [`Collective`] interface: tensors of any device and kind travel as host f32
//! (in place for a contiguous CPU f32 tensor, through a staging copy otherwise — so the ring also
//! carries CUDA tensors, for ranks that share a GPU or a mixed CPU/GPU job).

use super::api::Collective;
use super::error::Result;
use super::ring::TcpRing;
use tch::{Device, Kind, Tensor};

/// Runs `op` on `t` as a host f32 slice: in place when `t` is already a contiguous CPU f32 tensor (the
/// common case — gradient buckets are allocated that way), through a staging copy otherwise.
fn with_host_f32<R>(t: &mut Tensor, op: impl FnOnce(&mut [f32]) -> Result<R>) -> Result<R> {
    if t.device() == Device::Cpu && t.kind() == Kind::Float && t.is_contiguous() {
        let n = t.numel();
        // SAFETY: a contiguous CPU f32 tensor owns `numel` f32 values at data_ptr; `t` is borrowed
        // mutably for the whole call, so nothing else reads or writes them meanwhile.
        let slice = unsafe { std::slice::from_raw_parts_mut(t.data_ptr() as *mut f32, n) };
        return op(slice);
    }
    let mut staged = t.to_device(Device::Cpu).to_kind(Kind::Float).contiguous();
    let r = with_host_f32(&mut staged, op)?;
    t.copy_(&staged);
    Ok(r)
}

impl Collective for TcpRing {
    fn rank(&self) -> usize {
        TcpRing::rank(self)
    }

    fn world_size(&self) -> usize {
        TcpRing::world_size(self)
    }

    fn all_reduce_sum(&mut self, t: &mut Tensor) -> Result<()> {
        with_host_f32(t, |s| self.all_reduce_sum_f32(s))
    }

    fn all_gather(&mut self, t: &Tensor) -> Result<Tensor> {
        let mut input = t.to_device(Device::Cpu).to_kind(Kind::Float).contiguous();
        let mut shape = input.size();
        if shape.is_empty() {
            shape.push(1);
        }
        shape[0] *= self.world_size() as i64;
        let mut out = Tensor::zeros(shape.as_slice(), (Kind::Float, Device::Cpu));
        with_host_f32(&mut input, |src| {
            with_host_f32(&mut out, |dst| self.all_gather_f32(src, dst))
        })?;
        Ok(out.to_device(t.device()).to_kind(t.kind()))
    }

    fn broadcast(&mut self, t: &mut Tensor, root: usize) -> Result<()> {
        with_host_f32(t, |s| self.broadcast_f32(s, root))
    }

    fn barrier(&mut self) -> Result<()> {
        TcpRing::barrier(self)
    }
}
