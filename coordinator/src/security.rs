//! The coordinator's secrets and its guard against strangers: the job token's check, the per-
//! generation ring secrets, and the rate-limited log of refused RPCs.

use hmac::Mac;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

type HmacSha256 = hmac::Hmac<sha2::Sha256>;

/// Compares in time independent of where (or whether) the byte strings differ; only the length
/// (a `Bearer ` prefix plus the token's length) can leak through timing.
pub fn token_matches(got: &[u8], want: &[u8]) -> bool {
    got.len() == want.len() && got.iter().zip(want).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
}

/// The root of this coordinator's ring secrets: random per coordinator process, never written
/// anywhere. A resumed job (a new process) starts a new generation, so it needs no old secrets.
pub struct RingKeys {
    master: [u8; 32],
}

impl RingKeys {
    pub fn random() -> RingKeys {
        RingKeys {
            master: rand::random(),
        }
    }

    /// `HMAC-SHA256(master, "butler ring secret" ‖ generation)`: one secret per generation, so a
    /// worker of an earlier generation (dropped by a regroup) cannot join the new ring.
    pub fn for_generation(&self, generation: u64) -> Vec<u8> {
        let mut m = HmacSha256::new_from_slice(&self.master).expect("HMAC takes any key length");
        m.update(b"butler ring secret");
        m.update(&generation.to_le_bytes());
        m.finalize().into_bytes().to_vec()
    }
}

/// How often one peer's refused RPCs are logged: the first at once, then one summary line per
/// window with the count, so a scanner or a misconfigured client cannot flood the log.
pub const REFUSAL_LOG_WINDOW: Duration = Duration::from_secs(10);
/// Peers remembered at once; beyond this the oldest windows are forgotten.
const MAX_TRACKED_PEERS: usize = 4096;

/// Rate limiter of the "rejected RPC" warning, per peer address.
#[derive(Default)]
pub struct RefusalLog {
    peers: Mutex<HashMap<Option<IpAddr>, Window>>,
}

struct Window {
    start: Instant,
    /// Refusals in this window not logged yet.
    suppressed: u64,
}

impl RefusalLog {
    /// Records a refusal from `peer`; returns `Some(n)` when a line should be logged now, `n`
    /// being the refusals it stands for (1, or the suppressed count plus this one).
    pub fn record(&self, peer: Option<IpAddr>, now: Instant) -> Option<u64> {
        let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        if peers.len() >= MAX_TRACKED_PEERS && !peers.contains_key(&peer) {
            peers.retain(|_, w| now.duration_since(w.start) < REFUSAL_LOG_WINDOW);
            if peers.len() >= MAX_TRACKED_PEERS {
                peers.clear();
            }
        }
        match peers.get_mut(&peer) {
            Some(w) if now.duration_since(w.start) < REFUSAL_LOG_WINDOW => {
                w.suppressed += 1;
                None
            }
            Some(w) => {
                let n = w.suppressed + 1;
                *w = Window {
                    start: now,
                    suppressed: 0,
                };
                Some(n)
            }
            None => {
                peers.insert(
                    peer,
                    Window {
                        start: now,
                        suppressed: 0,
                    },
                );
                Some(1)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_comparison() {
        assert!(token_matches(b"Bearer abc", b"Bearer abc"));
        assert!(!token_matches(b"Bearer abd", b"Bearer abc"));
        assert!(!token_matches(b"Bearer ab", b"Bearer abc"));
        assert!(!token_matches(b"", b"Bearer abc"));
    }

    #[test]
    fn ring_secrets_differ_per_generation_and_per_coordinator() {
        let k = RingKeys::random();
        assert_eq!(k.for_generation(3), k.for_generation(3));
        assert_eq!(k.for_generation(3).len(), 32);
        assert_ne!(k.for_generation(3), k.for_generation(4));
        assert_ne!(k.for_generation(3), RingKeys::random().for_generation(3));
    }

    #[test]
    fn refusals_are_logged_once_per_window_per_peer() {
        let log = RefusalLog::default();
        let a = Some(IpAddr::from([10, 0, 0, 1]));
        let b = Some(IpAddr::from([10, 0, 0, 2]));
        let t0 = Instant::now();
        assert_eq!(log.record(a, t0), Some(1));
        for i in 1..=5 {
            assert_eq!(log.record(a, t0 + Duration::from_millis(i)), None);
        }
        // Another peer is logged on its own.
        assert_eq!(log.record(b, t0), Some(1));
        // After the window: one line for the five suppressed plus this one.
        assert_eq!(log.record(a, t0 + REFUSAL_LOG_WINDOW), Some(6));
        assert_eq!(log.record(a, t0 + REFUSAL_LOG_WINDOW), None);
    }

    #[test]
    fn the_peer_table_stays_bounded() {
        let log = RefusalLog::default();
        let t0 = Instant::now();
        for i in 0..(MAX_TRACKED_PEERS as u32 + 10) {
            log.record(Some(IpAddr::from(i.to_be_bytes())), t0);
        }
        assert!(log.peers.lock().unwrap().len() <= MAX_TRACKED_PEERS);
    }
}
