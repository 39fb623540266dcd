//! The ring's authenticated handshake against strangers: a peer without the generation's secret, a
//! peer with an earlier generation's secret, and a replay of a recorded handshake are refused, and
//! the ring forms and reduces correctly all the same.
//!
//! The strangers here speak the wire format from its description (ring.rs): hello = "BTLRRING",
//! version 2 (u32 LE), byte-order marker 0x01020304 (native), generation (u64 LE), rank (u32 LE),
//! world (u32 LE), segment bytes (u64 LE); challenge = hello ‖ 32-byte nonce; response = hello ‖
//! nonce ‖ HMAC-SHA256(secret, "butler ring v2: acceptor" ‖ challenge ‖ hello ‖ nonce); proof =
//! HMAC-SHA256(secret, "butler ring v2: connector" ‖ challenge ‖ hello ‖ nonce).

use hmac::Mac;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use butler_worker::collective::ring::{RingConfig, RingListener, RingSecret, TcpRing};

type HmacSha256 = hmac::Hmac<sha2::Sha256>;

fn localhost() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

fn cfg(generation: u64, secret: &[u8; 32]) -> RingConfig {
    RingConfig {
        timeout: Duration::from_secs(20),
        generation,
        secret: RingSecret::from_slice(secret).unwrap(),
        ..RingConfig::default()
    }
}

fn hello(generation: u64, rank: u32, world: u32) -> Vec<u8> {
    let mut b = b"BTLRRING".to_vec();
    b.extend(2u32.to_le_bytes());
    b.extend(0x0102_0304u32.to_ne_bytes());
    b.extend(generation.to_le_bytes());
    b.extend(rank.to_le_bytes());
    b.extend(world.to_le_bytes());
    b.extend((RingConfig::default().segment_bytes as u64).to_le_bytes());
    b
}

fn mac(secret: &[u8; 32], label: &[u8], parts: &[&[u8]]) -> Vec<u8> {
    let mut m = HmacSha256::new_from_slice(secret).unwrap();
    m.update(label);
    for p in parts {
        m.update(p);
    }
    m.finalize().into_bytes().to_vec()
}

/// Sum-reduces `rank + 1` over the ring: every rank must see n(n+1)/2 everywhere.
fn reduce_ok(ring: &mut TcpRing) {
    let n = ring.world_size() as f32;
    let mut buf = vec![ring.rank() as f32 + 1.0; 1000];
    ring.all_reduce_sum_f32(&mut buf).unwrap();
    assert!(
        buf.iter().all(|&x| x == n * (n + 1.0) / 2.0),
        "{:?}",
        &buf[..3]
    );
}

/// Runs rank `r` of a ring on `listeners[r]` with `peers_of(r)` in its own thread.
fn run_ring(
    listeners: Vec<RingListener>,
    peers_of: impl Fn(usize) -> Vec<SocketAddr> + Sync,
    cfg_of: impl Fn(usize) -> RingConfig + Sync,
) -> Vec<Result<(), String>> {
    std::thread::scope(|s| {
        let hs: Vec<_> = listeners
            .into_iter()
            .enumerate()
            .map(|(r, l)| {
                let (peers_of, cfg_of) = (&peers_of, &cfg_of);
                s.spawn(move || {
                    let mut ring = l
                        .connect(r, &peers_of(r), cfg_of(r))
                        .map_err(|e| e.to_string())?;
                    reduce_ok(&mut ring);
                    Ok(())
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// A stranger that connects to `target` first, claims to be rank `claimed` of `generation`, reads
/// the answer and sends `proof(challenge, response head)` (or nothing). Returns once the ring
/// drops it: `Ok(())` when the connection was closed on it, an error if it was kept.
fn stranger(
    target: SocketAddr,
    generation: u64,
    claimed: u32,
    world: u32,
    proof: impl FnOnce(&[u8], &[u8]) -> Option<Vec<u8>> + Send + 'static,
) -> std::thread::JoinHandle<Result<(), String>> {
    let mut s = TcpStream::connect(target).unwrap();
    let mut challenge = hello(generation, claimed, world);
    challenge.extend([7u8; 32]);
    s.write_all(&challenge).unwrap();
    std::thread::spawn(move || {
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut response = [0u8; 104];
        s.read_exact(&mut response)
            .map_err(|e| format!("no response: {e}"))?;
        if let Some(p) = proof(&challenge, &response[..72]) {
            let _ = s.write_all(&p);
        }
        // A refused connection is closed: the read ends with EOF (or a reset), not with data.
        let mut b = [0u8; 1];
        match s.read(&mut b) {
            Ok(0) | Err(_) => Ok(()),
            Ok(_) => Err("the ring sent data to a stranger".into()),
        }
    })
}

#[test]
fn strangers_without_the_secret_are_refused_and_the_ring_forms() {
    let secret = [0x5au8; 32];
    let listeners: Vec<RingListener> = (0..3)
        .map(|_| RingListener::bind(localhost()).unwrap())
        .collect();
    let peers: Vec<SocketAddr> = listeners.iter().map(RingListener::local_addr).collect();
    // Rank 1's predecessor is rank 0: two strangers claim to be it and reach rank 1 first, one
    // with a proof under a wrong secret, one with no proof at all (it hangs up).
    let wrong = stranger(peers[1], 4, 0, 3, |c, r| {
        Some(mac(&[0x11; 32], b"butler ring v2: connector", &[c, r]))
    });
    let silent = stranger(peers[2], 4, 1, 3, |_, _| None);
    let start = Instant::now();
    let results = run_ring(listeners, |_| peers.clone(), |_| cfg(4, &secret));
    for (r, res) in results.iter().enumerate() {
        assert!(res.is_ok(), "rank {r}: {res:?}");
    }
    assert_eq!(wrong.join().unwrap(), Ok(()));
    assert_eq!(silent.join().unwrap(), Ok(()));
    assert!(
        start.elapsed() < Duration::from_secs(15),
        "{:?}",
        start.elapsed()
    );
}

#[test]
fn an_earlier_generations_secret_and_a_replayed_handshake_are_refused() {
    let (old, new) = ([1u8; 32], [2u8; 32]);

    // Generation 1 through a recording proxy between rank 0 and rank 1: it keeps what rank 0 sent
    // (its challenge and its proof), as an eavesdropper on the cluster network would.
    let listeners: Vec<RingListener> = (0..2)
        .map(|_| RingListener::bind(localhost()).unwrap())
        .collect();
    let peers: Vec<SocketAddr> = listeners.iter().map(RingListener::local_addr).collect();
    let proxy = TcpListener::bind(localhost()).unwrap();
    let proxy_addr = proxy.local_addr().unwrap();
    let to = peers[1];
    let recorder = std::thread::spawn(move || {
        let (a, _) = proxy.accept().unwrap();
        let b = TcpStream::connect(to).unwrap();
        let (mut a2, mut b2) = (a.try_clone().unwrap(), b.try_clone().unwrap());
        let back = std::thread::spawn(move || {
            let _ = std::io::copy(&mut b2, &mut a2);
        });
        let mut recorded = Vec::new();
        let (mut a, mut b) = (a, b);
        let mut buf = [0u8; 4096];
        loop {
            match a.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if recorded.len() < 104 {
                        recorded.extend_from_slice(&buf[..n.min(104 - recorded.len())]);
                    }
                    if b.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = b.shutdown(std::net::Shutdown::Both);
        let _ = back.join();
        recorded
    });
    let results = run_ring(
        listeners,
        |r| {
            let mut p = peers.clone();
            if r == 0 {
                p[1] = proxy_addr;
            }
            p
        },
        |_| cfg(1, &old),
    );
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    let recorded = recorder.join().unwrap();
    assert_eq!(recorded.len(), 104, "challenge (72) + proof (32)");

    // Generation 2: a replay of rank 0's recorded bytes, and a stranger who holds generation 1's
    // secret and proves it correctly for a generation-2 hello, both reach rank 1 first.
    let listeners: Vec<RingListener> = (0..2)
        .map(|_| RingListener::bind(localhost()).unwrap())
        .collect();
    let peers: Vec<SocketAddr> = listeners.iter().map(RingListener::local_addr).collect();
    let replay = {
        let mut s = TcpStream::connect(peers[1]).unwrap();
        s.write_all(&recorded[..72]).unwrap();
        std::thread::spawn(move || {
            s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            let mut response = [0u8; 104];
            s.read_exact(&mut response).unwrap();
            let _ = s.write_all(&recorded[72..]);
            let mut b = [0u8; 1];
            matches!(s.read(&mut b), Ok(0) | Err(_))
        })
    };
    let stale = stranger(peers[1], 2, 0, 2, move |c, r| {
        Some(mac(&old, b"butler ring v2: connector", &[c, r]))
    });
    let results = run_ring(listeners, |_| peers.clone(), |_| cfg(2, &new));
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    assert!(
        replay.join().unwrap(),
        "the replayed handshake was not closed"
    );
    assert_eq!(stale.join().unwrap(), Ok(()));
}

#[test]
fn a_connector_refuses_an_acceptor_without_the_secret() {
    let secret = [9u8; 32];
    let listener = RingListener::bind(localhost()).unwrap();
    let ours = listener.local_addr();
    let impostor = TcpListener::bind(localhost()).unwrap();
    let peers = vec![ours, impostor.local_addr().unwrap()];
    // The impostor sits at rank 1's address: it challenges rank 0 (rank 0 accepts from its
    // predecessor, rank 1, before it reads its successor's answer) and answers rank 0's challenge
    // with a MAC under the wrong key.
    let fake = std::thread::spawn(move || {
        let mut to_rank0 = TcpStream::connect(ours).unwrap();
        let mut c = hello(6, 1, 2);
        c.extend([3u8; 32]);
        to_rank0.write_all(&c).unwrap();
        let (mut from_rank0, _) = impostor.accept().unwrap();
        let mut challenge = [0u8; 72];
        from_rank0.read_exact(&mut challenge).unwrap();
        let mut head = hello(6, 1, 2);
        head.extend([4u8; 32]);
        let m = mac(
            &[0u8; 32],
            b"butler ring v2: acceptor",
            &[&challenge, &head],
        );
        from_rank0.write_all(&head).unwrap();
        from_rank0.write_all(&m).unwrap();
        let mut b = [0u8; 1];
        let _ = from_rank0.read(&mut b);
        drop(to_rank0);
    });
    let err = listener
        .connect(0, &peers, cfg(6, &secret))
        .err()
        .expect("must fail");
    let text = err.to_string();
    assert!(
        text.contains("handshake with rank 1") && text.contains("failed authentication"),
        "{text}"
    );
    fake.join().unwrap();
}
