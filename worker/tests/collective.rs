//! The tensor-level `Collective` over the TCP ring: in-place for contiguous CPU f32 tensors, staged for
//! anything else, with torch.distributed's semantics.

mod common;

use butler_worker::collective::{Collective, TcpRing};
use std::time::Duration;
use tch::{Device, Kind, Tensor};

fn rings(world: usize) -> Vec<TcpRing> {
    common::rings_with_timeout(world, Duration::from_secs(10))
}

#[test]
fn tensor_collectives_match_torch_distributed_semantics() {
    let world = 3;
    let hs: Vec<_> = rings(world)
        .into_iter()
        .map(|mut ring| {
            std::thread::spawn(move || {
                let r = ring.rank() as f64;
                // Contiguous f32: reduced in place.
                let mut t = Tensor::full([2, 5], r + 1.0, (Kind::Float, Device::Cpu));
                ring.all_reduce_sum(&mut t).unwrap();
                assert_eq!(
                    Vec::<f32>::try_from(t.reshape([-1])).unwrap(),
                    vec![6.0; 10]
                );
                // Non-contiguous f64 view: staged through a copy and written back.
                let base = Tensor::full([4, 3], r, (Kind::Double, Device::Cpu));
                let mut view = base.transpose(0, 1);
                ring.all_reduce_sum(&mut view).unwrap();
                assert_eq!(
                    Vec::<f64>::try_from(base.reshape([-1])).unwrap(),
                    vec![3.0; 12]
                );
                // all_gather concatenates along dim 0 in rank order.
                let g = ring
                    .all_gather(&Tensor::full([2], r, (Kind::Float, Device::Cpu)))
                    .unwrap();
                assert_eq!(
                    Vec::<f32>::try_from(&g).unwrap(),
                    vec![0.0, 0.0, 1.0, 1.0, 2.0, 2.0]
                );
                // broadcast from a non-zero root.
                let mut b = Tensor::full([3], r * 10.0, (Kind::Float, Device::Cpu));
                ring.broadcast(&mut b, 2).unwrap();
                assert_eq!(Vec::<f32>::try_from(&b).unwrap(), vec![20.0; 3]);
                ring.barrier().unwrap();
            })
        })
        .collect();
    for h in hs {
        h.join().unwrap();
    }
}
