//! Data parallelism over a `Collective`: rank 0's initial parameters are broadcast to all, and gradients
//! are averaged in flat buckets of about `bucket_mb` (PyTorch DDP's 25 MB by default), filled in reverse
//! parameter order — the order backward produces them, which keeps the layout ready for overlapping
//! communication with backward later.

use crate::collective::{Collective, Result};
use tch::{Device, Kind, Tensor};

/// A contiguous f32 buffer plus the parameters whose gradients it carries.
struct Bucket {
    flat: Tensor,
    /// (index into params, offset, numel)
    slots: Vec<(usize, i64, i64)>,
}

pub struct GradSync {
    params: Vec<Tensor>,
    buckets: Vec<Bucket>,
}

impl GradSync {
    /// `params` are the trainable tensors in registration order (shallow clones sharing storage).
    pub fn new(params: Vec<Tensor>, bucket_bytes: usize) -> Self {
        // Materialise every gradient as zeros once. From here on gradients are zeroed in place
        // (`zero_grad` below), never reset to undefined as libtorch's optimizers do by default, so every
        // parameter always has a gradient the buckets can copy back into — also on a rank whose share of
        // the last batch is empty and that therefore runs no backward pass.
        if let Some(total) = params
            .iter()
            .map(|p| p.sum(Kind::Float))
            .reduce(|a, b| a + b)
        {
            (total * 0.0).backward();
        }
        // Buckets live where the parameters do (on the GPU for NCCL: no host copy per bucket).
        let device = params.first().map_or(Device::Cpu, |p| p.device());
        let cap = (bucket_bytes / 4).max(1) as i64;
        let mut plan: Vec<Vec<(usize, i64, i64)>> = vec![Vec::new()];
        let mut used = 0i64;
        for (i, p) in params.iter().enumerate().rev() {
            let n = p.numel() as i64;
            if used > 0 && used + n > cap {
                plan.push(Vec::new());
                used = 0;
            }
            plan.last_mut()
                .expect("plan starts non-empty")
                .push((i, used, n));
            used += n;
        }
        let buckets = plan
            .into_iter()
            .filter(|slots| !slots.is_empty())
            .map(|slots| {
                let len: i64 = slots.iter().map(|s| s.2).sum();
                Bucket {
                    flat: Tensor::zeros([len], (Kind::Float, device)),
                    slots,
                }
            })
            .collect();
        GradSync { params, buckets }
    }

    /// Zeroes every gradient in place (keeping it defined; see `new`).
    pub fn zero_grad(&mut self) {
        for p in &mut self.params {
            p.zero_grad();
        }
    }

    pub fn num_buckets(&self) -> usize {
        self.buckets.len()
    }

    /// Replaces every rank's parameters by rank 0's, so all replicas start identical.
    pub fn broadcast_parameters(&mut self, comm: &mut dyn Collective) -> Result<()> {
        if comm.world_size() == 1 {
            return Ok(());
        }
        let _guard = tch::no_grad_guard();
        for b in &mut self.buckets {
            for &(i, off, n) in &b.slots {
                b.flat
                    .narrow(0, off, n)
                    .copy_(&self.params[i].detach().reshape([-1]));
            }
            comm.broadcast(&mut b.flat, 0)?;
            for &(i, off, n) in &b.slots {
                let mut p = self.params[i].detach();
                p.copy_(&b.flat.narrow(0, off, n).view_as(&p));
            }
        }
        Ok(())
    }

    /// Averages gradients across ranks (sum, then divide by the world size). A parameter that took no
    /// part in this rank's loss contributes zeros, as in DDP with `find_unused_parameters`.
    pub fn all_reduce_gradients(&mut self, comm: &mut dyn Collective) -> Result<()> {
        let world = comm.world_size();
        if world == 1 {
            return Ok(());
        }
        let _guard = tch::no_grad_guard();
        for b in &mut self.buckets {
            for &(i, off, n) in &b.slots {
                let g = self.params[i].grad();
                let mut dst = b.flat.narrow(0, off, n);
                if g.defined() {
                    dst.copy_(&g.reshape([-1]));
                } else {
                    let _ = dst.zero_();
                }
            }
            comm.all_reduce_sum(&mut b.flat)?;
            let _ = b.flat.divide_scalar_(world as f64);
            for &(i, off, n) in &b.slots {
                let mut g = self.params[i].grad();
                g.copy_(&b.flat.narrow(0, off, n).view_as(&g));
            }
        }
        Ok(())
    }
}
