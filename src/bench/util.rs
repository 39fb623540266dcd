//! What several benches share: launching one process per rank, a ring rendezvous through files, and
//! this process's memory figures. A leaf: it imports no other bench module.

use anyhow::{bail, Context, Result};
use butler_worker::collective::{RingConfig, RingListener};
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// Runs this binary once per rank with the arguments `args(rank)`, waits for all, and fails naming the
/// ranks that failed.
pub fn spawn_ranks(world: usize, args: impl Fn(usize) -> Vec<String>) -> Result<()> {
    let exe = std::env::current_exe()?;
    let children: Vec<_> = (0..world)
        .map(|rank| {
            Command::new(&exe)
                .args(args(rank))
                .spawn()
                .context("starting a bench rank")
        })
        .collect::<Result<_>>()?;
    let mut failed = Vec::new();
    for (rank, mut c) in children.into_iter().enumerate() {
        if !c.wait()?.success() {
            failed.push(rank);
        }
    }
    if !failed.is_empty() {
        bail!("bench ranks {failed:?} failed");
    }
    Ok(())
}

/// Joins a loopback ring of `world` bench processes that publish their addresses as files in `dir`
/// (the benches run without a coordinator).
pub fn file_rendezvous(
    rank: usize,
    world: usize,
    dir: &Path,
    cfg: RingConfig,
) -> Result<butler_worker::collective::TcpRing> {
    let listener = RingListener::bind("127.0.0.1:0".parse().expect("a valid address"))?;
    let mine = dir.join(format!("rank{rank}.addr"));
    butler_common::fsutil::write_atomic(&mine, listener.local_addr().to_string().as_bytes())?;
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut peers = Vec::with_capacity(world);
    for r in 0..world {
        let f = dir.join(format!("rank{r}.addr"));
        loop {
            if let Ok(s) = std::fs::read_to_string(&f) {
                peers.push(s.parse::<SocketAddr>()?);
                break;
            }
            if Instant::now() > deadline {
                bail!("rank {r} never published its address");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    Ok(listener.connect(rank, &peers, cfg)?)
}

/// A memory figure of this process from /proc/self/status (`VmHWM` = peak RSS, `VmRSS` = current), in MiB.
pub fn proc_status_mib(key: &str) -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kib| kib / 1024.0)
}
