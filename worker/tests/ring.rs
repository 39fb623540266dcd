//! Ring collectives with ranks as threads of one process, each with its own listener on
//! 127.0.0.1:0.

use std::net::SocketAddr;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use butler_worker::collective::ring::{
    bus_bandwidth_gbps, CollectiveError, Result, RingConfig, RingListener, TcpRing,
};

fn localhost() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// Binds all listeners, then connects every rank in its own thread and runs `f` there.
fn run_ranks<R: Send>(
    world: usize,
    cfg_for: impl Fn(usize) -> RingConfig + Sync,
    f: impl Fn(usize, Result<TcpRing>) -> R + Sync,
) -> Vec<R> {
    let listeners: Vec<RingListener> = (0..world)
        .map(|_| RingListener::bind(localhost()).unwrap())
        .collect();
    let peers: Vec<SocketAddr> = listeners.iter().map(RingListener::local_addr).collect();
    std::thread::scope(|s| {
        let handles: Vec<_> = listeners
            .into_iter()
            .enumerate()
            .map(|(rank, l)| {
                let (peers, cfg_for, f) = (&peers, &cfg_for, &f);
                s.spawn(move || f(rank, l.connect(rank, peers, cfg_for(rank))))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn with_ring<R: Send>(
    world: usize,
    cfg: RingConfig,
    f: impl Fn(&mut TcpRing) -> R + Sync,
) -> Vec<R> {
    run_ranks(
        world,
        |_| cfg.clone(),
        |rank, ring| {
            let mut ring = ring.unwrap_or_else(|e| panic!("rank {rank}: connect failed: {e}"));
            assert_eq!(ring.rank(), rank);
            assert_eq!(ring.world_size(), world);
            f(&mut ring)
        },
    )
}

fn cfg_timeout(secs: u64) -> RingConfig {
    RingConfig {
        timeout: Duration::from_secs(secs),
        ..RingConfig::default()
    }
}

fn value(rank: usize, i: usize) -> f32 {
    ((rank + 1) * (i % 1000)) as f32
}

fn check_all_reduce(ring: &mut TcpRing, len: usize) {
    let n = ring.world_size();
    let mut buf: Vec<f32> = (0..len).map(|i| value(ring.rank(), i)).collect();
    ring.all_reduce_sum_f32(&mut buf)
        .unwrap_or_else(|e| panic!("rank {}: all_reduce len {len}: {e}", ring.rank()));
    let factor = (n * (n + 1) / 2) as f32;
    if let Some(i) = (0..len).find(|&i| buf[i] != (i % 1000) as f32 * factor) {
        panic!(
            "rank {} len {len}: element {i} is {} expected {}",
            ring.rank(),
            buf[i],
            (i % 1000) as f32 * factor
        );
    }
}

#[test]
fn all_reduce_exact_various_lengths() {
    for world in 2..=4 {
        with_ring(world, cfg_timeout(30), |ring| {
            for len in [0, 1, 2, 3, 5, 7, world - 1, 1000, 1_000_003] {
                check_all_reduce(ring, len);
            }
        });
    }
}

#[test]
fn all_reduce_64_mib() {
    for world in [2, 4] {
        with_ring(world, cfg_timeout(30), |ring| {
            check_all_reduce(ring, 16 * 1024 * 1024);
        });
    }
}

#[test]
fn all_reduce_tiny_segments() {
    // Many segments per chunk, uneven tail segments, non-inline path.
    let cfg = RingConfig {
        segment_bytes: 4 * 1000 + 4,
        ..cfg_timeout(30)
    };
    with_ring(3, cfg, |ring| {
        for len in [1, 2, 1001, 50_000, 123_457] {
            check_all_reduce(ring, len);
        }
    });
}

/// Pinned helper threads (the receiving half then runs off the calling thread).
#[test]
fn pinned_helper_threads_stay_correct() {
    let ncpu = std::thread::available_parallelism().map_or(1, |n| n.get());
    with_ring(3, cfg_timeout(30), |ring| {
        let (r, n) = (ring.rank(), ring.world_size());
        ring.set_helper_cpus(Some(r % ncpu), Some((r + n - 1) % n % ncpu))
            .unwrap();
        for len in [1, 1000, 1_000_003] {
            check_all_reduce(ring, len);
        }
        let mut big = vec![r as f32; 3_000_000];
        ring.broadcast_f32(&mut big, 2).unwrap();
        assert!(big.iter().all(|v| *v == 2.0));
        let got = ring.all_gather_bytes(&vec![r as u8; 200_000 + r]).unwrap();
        for (src, b) in got.iter().enumerate() {
            assert_eq!(b, &vec![src as u8; 200_000 + src]);
        }
        ring.set_helper_cpus(None, None).unwrap();
        check_all_reduce(ring, 100_000);
    });
}

#[test]
fn helper_cpu_out_of_range_is_rejected() {
    with_ring(2, cfg_timeout(10), |ring| {
        let e = ring.set_helper_cpus(Some(100_000), None).unwrap_err();
        assert!(matches!(e, CollectiveError::InvalidArgument { .. }), "{e}");
    });
}

#[test]
fn repeated_ops_stay_correct() {
    with_ring(3, cfg_timeout(30), |ring| {
        for k in 0..50usize {
            let len = [0, 1, 17, 4096, 70_000, 300_001][k % 6] + k;
            check_all_reduce(ring, len);
            if k % 10 == 0 {
                ring.barrier().unwrap();
            }
        }
    });
}

#[test]
fn all_gather_f32_works() {
    for world in 2..=4 {
        let big = 4 * 1024 * 1024 / world; // 16 MiB of output
        with_ring(world, cfg_timeout(30), |ring| {
            let r = ring.rank();
            for len in [0, 1, 7, 1001, big] {
                let input: Vec<f32> = (0..len)
                    .map(|i| (r * 1_000_000 + i % 999_983) as f32)
                    .collect();
                let mut output = vec![-1.0f32; len * world];
                ring.all_gather_f32(&input, &mut output).unwrap();
                for src in 0..world {
                    for i in 0..len {
                        assert_eq!(
                            output[src * len + i],
                            (src * 1_000_000 + i % 999_983) as f32,
                            "rank {r} len {len} src {src} i {i}"
                        );
                    }
                }
            }
        });
    }
}

#[test]
fn all_gather_bytes_variable_lengths() {
    for world in 2..=4 {
        with_ring(world, cfg_timeout(30), |ring| {
            let r = ring.rank();
            let make = |rank: usize, len: usize| -> Vec<u8> {
                (0..len).map(|i| (rank * 31 + i * 7) as u8).collect()
            };
            let cases: [&dyn Fn(usize) -> usize; 4] = [
                &|rank| rank * 37,              // rank 0 empty
                &|_| 0,                         // all empty
                &|rank| (world - rank) % 2,     // some 1 byte, some empty
                &|rank| 3 * 1024 * 1024 + rank, // large, uneven
            ];
            for case in cases {
                let got = ring.all_gather_bytes(&make(r, case(r))).unwrap();
                assert_eq!(got.len(), world);
                for (src, bytes) in got.iter().enumerate() {
                    assert_eq!(bytes, &make(src, case(src)), "rank {r} src {src}");
                }
            }
        });
    }
}

#[test]
fn broadcast_from_every_root() {
    for world in 2..=4 {
        with_ring(world, cfg_timeout(30), |ring| {
            let r = ring.rank();
            for len in [1usize, 1001, 4 * 1024 * 1024] {
                for root in 0..world {
                    let expect = |i: usize| (root * 7 + i % 10_007) as f32;
                    let mut buf: Vec<f32> = if r == root {
                        (0..len).map(expect).collect()
                    } else {
                        vec![-1.0; len]
                    };
                    ring.broadcast_f32(&mut buf, root).unwrap();
                    assert!(
                        buf.iter().enumerate().all(|(i, v)| *v == expect(i)),
                        "rank {r} root {root} len {len}"
                    );

                    let expect_b = |i: usize| (root + i * 13) as u8;
                    let blen = len * 4 + 3;
                    let mut bytes: Vec<u8> = if r == root {
                        (0..blen).map(expect_b).collect()
                    } else {
                        vec![0; blen]
                    };
                    ring.broadcast_bytes(&mut bytes, root).unwrap();
                    assert!(
                        bytes.iter().enumerate().all(|(i, v)| *v == expect_b(i)),
                        "rank {r} root {root} bytes {blen}"
                    );
                }
            }
        });
    }
}

#[test]
fn barrier_waits_for_everyone() {
    for world in 2..=4 {
        let late = world - 1;
        let waited = with_ring(world, cfg_timeout(30), |ring| {
            for _ in 0..20 {
                ring.barrier().unwrap();
            }
            if ring.rank() == late {
                std::thread::sleep(Duration::from_millis(300));
            }
            let t = Instant::now();
            ring.barrier().unwrap();
            t.elapsed()
        });
        for (rank, w) in waited.iter().enumerate() {
            if rank != late {
                assert!(
                    *w >= Duration::from_millis(250),
                    "world {world} rank {rank} waited {w:?}"
                );
            }
        }
    }
}

#[test]
fn world_size_one_every_op() {
    let l = RingListener::bind(localhost()).unwrap();
    let addr = l.local_addr();
    let mut ring = l.connect(0, &[addr], RingConfig::default()).unwrap();
    assert_eq!((ring.rank(), ring.world_size()), (0, 1));
    let mut buf = vec![1.0f32, 2.0, 3.0];
    ring.all_reduce_sum_f32(&mut buf).unwrap();
    assert_eq!(buf, [1.0, 2.0, 3.0]);
    ring.all_reduce_sum_f32(&mut []).unwrap();
    let mut out = vec![0.0f32; 3];
    ring.all_gather_f32(&buf, &mut out).unwrap();
    assert_eq!(out, buf);
    assert_eq!(
        ring.all_gather_bytes(b"abc").unwrap(),
        vec![b"abc".to_vec()]
    );
    assert_eq!(ring.all_gather_bytes(b"").unwrap(), vec![Vec::<u8>::new()]);
    ring.broadcast_f32(&mut buf, 0).unwrap();
    assert_eq!(buf, [1.0, 2.0, 3.0]);
    let mut b = *b"xyz";
    ring.broadcast_bytes(&mut b, 0).unwrap();
    assert_eq!(&b, b"xyz");
    ring.barrier().unwrap();
    assert!(matches!(
        ring.broadcast_f32(&mut buf, 1),
        Err(CollectiveError::InvalidArgument { .. })
    ));
}

#[test]
fn invalid_arguments_are_rejected_locally() {
    with_ring(2, cfg_timeout(10), |ring| {
        let mut out = vec![0.0f32; 5];
        let e = ring.all_gather_f32(&[1.0, 2.0], &mut out).unwrap_err();
        assert!(matches!(e, CollectiveError::InvalidArgument { .. }), "{e}");
        let e = ring.broadcast_f32(&mut [1.0], 2).unwrap_err();
        assert!(e.to_string().contains("root 2 out of range"), "{e}");
        let e = ring.broadcast_bytes(&mut [1], 7).unwrap_err();
        assert!(matches!(e, CollectiveError::InvalidArgument { .. }), "{e}");
        // The ring is still usable.
        check_all_reduce(ring, 10);
    });
}

/// World 3: rank 2 drops its ring (a dead process) while ranks 0 and 1 are inside all_reduce.
/// Rank 0 reads from rank 2 and sees EOF; rank 1 writes to rank 2, and also receives rank 0's
/// abort frame whose root cause names rank 2: either way its error names rank 2.
#[test]
fn killed_peer_errors_name_it() {
    let timeout = Duration::from_secs(2);
    for (len, pinned) in [(1000usize, false), (1_000_000, false), (1_000_000, true)] {
        let results = with_ring(
            3,
            RingConfig {
                timeout,
                ..RingConfig::default()
            },
            |ring| {
                if ring.rank() == 2 {
                    std::thread::sleep(Duration::from_millis(300));
                    return None;
                }
                if pinned {
                    ring.set_helper_cpus(Some(0), Some(0)).unwrap();
                }
                let mut buf = vec![1.0f32; len];
                let t = Instant::now();
                let res = ring.all_reduce_sum_f32(&mut buf);
                let elapsed = t.elapsed();
                // Once failed, the ring stays failed.
                let again = ring.barrier().unwrap_err();
                assert!(matches!(again, CollectiveError::Poisoned { .. }), "{again}");
                Some((res.unwrap_err(), elapsed))
            },
        );
        for (rank, r) in results.into_iter().enumerate().take(2) {
            let (err, elapsed) = r.unwrap();
            let msg = err.to_string();
            eprintln!("len {len} pinned {pinned} rank {rank}: {msg} ({elapsed:?})");
            assert!(elapsed < timeout * 3, "rank {rank} took {elapsed:?}");
            assert!(msg.contains("rank 2"), "rank {rank}: {msg}");
            if rank == 0 {
                assert_eq!(msg, "all_reduce: peer rank 2 closed the connection");
                assert_eq!(err.peer_rank(), Some(2));
            }
        }
    }
}

/// A peer that is alive but never calls the op: its successor times out naming it, the other
/// rank gets the abort (or its own write timeout) naming it too.
#[test]
fn silent_peer_times_out_naming_it() {
    let timeout = Duration::from_secs(2);
    for (world, len) in [(2usize, 100usize), (3, 100), (3, 3_000_000)] {
        let silent = world - 1;
        let (done_tx, done_rx) = mpsc::channel::<()>();
        let done_rx = std::sync::Mutex::new(done_rx);
        let results = run_ranks(
            world,
            |_| RingConfig {
                timeout,
                ..RingConfig::default()
            },
            |rank, ring| {
                let mut ring = ring.unwrap();
                if rank == silent {
                    let rx = done_rx.lock().unwrap();
                    for _ in 0..world - 1 {
                        rx.recv_timeout(Duration::from_secs(20)).unwrap();
                    }
                    return None;
                }
                let mut buf = vec![1.0f32; len];
                let t = Instant::now();
                let res = ring.all_reduce_sum_f32(&mut buf);
                let elapsed = t.elapsed();
                done_tx.send(()).unwrap();
                Some((res.unwrap_err(), elapsed))
            },
        );
        for (rank, r) in results.into_iter().enumerate().take(world - 1) {
            let (err, elapsed) = r.unwrap();
            let msg = err.to_string();
            eprintln!("world {world} len {len} rank {rank}: {msg} ({elapsed:?})");
            assert!(
                elapsed >= timeout / 2,
                "rank {rank} failed too early: {elapsed:?}"
            );
            assert!(elapsed < timeout * 3, "rank {rank} took {elapsed:?}");
            assert!(
                msg.contains(&format!("rank {silent}")),
                "rank {rank}: {msg}"
            );
            if rank == 0 {
                assert_eq!(
                    msg,
                    format!("all_reduce: peer rank {silent} timed out after 2s (no data received)")
                );
            }
        }
    }
}

#[test]
fn generation_mismatch_names_rank() {
    let results = run_ranks(
        2,
        |rank| RingConfig {
            generation: if rank == 0 { 3 } else { 2 },
            ..cfg_timeout(5)
        },
        |_, ring| ring.err().map(|e| e.to_string()),
    );
    assert_eq!(
        results[0].as_deref(),
        Some("handshake with rank 1: generation mismatch (expected 3, got 2)")
    );
    assert_eq!(
        results[1].as_deref(),
        Some("handshake with rank 0: generation mismatch (expected 2, got 3)")
    );
}

#[test]
fn unreachable_peer_fails_rendezvous_in_time() {
    let l = RingListener::bind(localhost()).unwrap();
    let dead = {
        let other = RingListener::bind(localhost()).unwrap();
        other.local_addr()
    };
    let peers = [l.local_addr(), dead];
    let t = Instant::now();
    let cfg = RingConfig {
        timeout: Duration::from_millis(500),
        ..RingConfig::default()
    };
    let err = l.connect(0, &peers, cfg).err().unwrap();
    let msg = err.to_string();
    eprintln!("{msg}");
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    assert!(
        msg.starts_with(&format!(
            "rendezvous: could not connect to rank 1 at {dead}: "
        )),
        "{msg}"
    );
}

#[test]
fn predecessor_never_connects() {
    // Rank 1's listener exists (connect succeeds) but rank 1 never runs: rank 0 gets no
    // connection from its predecessor.
    let l0 = RingListener::bind(localhost()).unwrap();
    let l1 = RingListener::bind(localhost()).unwrap();
    let peers = [l0.local_addr(), l1.local_addr()];
    let t = Instant::now();
    let cfg = RingConfig {
        timeout: Duration::from_millis(500),
        ..RingConfig::default()
    };
    let msg = l0.connect(0, &peers, cfg).err().unwrap().to_string();
    eprintln!("{msg}");
    assert!(t.elapsed() < Duration::from_secs(3));
    assert!(msg.contains("rank 1"), "{msg}");
    drop(l1);
}

#[test]
fn mismatched_sizes_are_detected() {
    let results = with_ring(2, cfg_timeout(5), |ring| {
        let len = if ring.rank() == 0 { 100 } else { 101 };
        let mut buf = vec![1.0f32; len];
        ring.all_reduce_sum_f32(&mut buf)
            .err()
            .map(|e| e.to_string())
    });
    for (rank, r) in results.iter().enumerate() {
        let msg = r
            .as_deref()
            .unwrap_or_else(|| panic!("rank {rank} succeeded"));
        eprintln!("rank {rank}: {msg}");
        assert!(msg.contains(&format!("rank {}", 1 - rank)), "{msg}");
    }
}

#[test]
fn mismatched_ops_are_detected() {
    let results = with_ring(2, cfg_timeout(5), |ring| {
        let mut buf = vec![1.0f32; 10];
        let res = if ring.rank() == 0 {
            ring.all_reduce_sum_f32(&mut buf)
        } else {
            ring.broadcast_f32(&mut buf, 1)
        };
        res.err().map(|e| e.to_string())
    });
    let msg = results[0].as_deref().expect("rank 0 must fail");
    assert!(
        msg.contains("peer rank 1") && msg.contains("broadcast"),
        "{msg}"
    );
}

#[test]
fn bus_bandwidth_formula() {
    assert!((bus_bandwidth_gbps(1_000_000_000, 2, 1.0) - 1.0).abs() < 1e-12);
    assert!((bus_bandwidth_gbps(1_000_000_000, 4, 0.5) - 3.0).abs() < 1e-12);
    assert_eq!(bus_bandwidth_gbps(1000, 1, 1.0), 0.0);
}
