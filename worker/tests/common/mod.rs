//! Helpers shared by the worker's integration tests.
#![allow(dead_code)]

use butler_worker::collective::{RingConfig, RingListener, TcpRing};
use std::time::Duration;

/// `world` ranks of a loopback TCP ring, connected from one thread each (every blocking call with
/// `timeout`), returned in rank order.
pub fn rings_with_timeout(world: usize, timeout: Duration) -> Vec<TcpRing> {
    let listeners: Vec<_> = (0..world)
        .map(|_| RingListener::bind("127.0.0.1:0".parse().unwrap()).unwrap())
        .collect();
    let peers: Vec<_> = listeners.iter().map(|l| l.local_addr()).collect();
    let handles: Vec<_> = listeners
        .into_iter()
        .enumerate()
        .map(|(rank, l)| {
            let peers = peers.clone();
            std::thread::spawn(move || {
                l.connect(
                    rank,
                    &peers,
                    RingConfig {
                        timeout,
                        ..Default::default()
                    },
                )
                .unwrap()
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}
