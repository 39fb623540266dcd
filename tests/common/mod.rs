//! Helpers for the integration tests that drive the real `butler` binary.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub fn butler() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_butler"));
    c.current_dir(repo());
    c
}

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The prepared MNIST-1D dataset; the test script prepares it before `cargo test`.
pub fn mnist1d() -> PathBuf {
    let p = repo().join("data/mnist1d/manifest.json");
    assert!(p.exists(), "{} is missing: run scripts/test.sh (it prepares the data) or `butler data prepare mnist1d`", p.display());
    p.parent().unwrap().to_path_buf()
}

pub fn digits() -> PathBuf {
    let p = repo().join("data/digits/manifest.json");
    assert!(
        p.exists(),
        "{} is missing: run scripts/test.sh (it prepares the data) or `butler data prepare digits`",
        p.display()
    );
    p.parent().unwrap().to_path_buf()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A small, fast MNIST-1D job config pointing at `manifest`.
pub fn small_config(manifest: &Path, extra_cluster: &str) -> String {
    format!(
        "[job]\nname = \"small\"\nseed = 1\n[data]\nmanifest = \"{}\"\n[model]\nkind = \"conv_base\"\n\
         [optim]\nkind = \"adam\"\nlr = 0.01\n[train]\nepochs = 2\nbatch_size = 100\n[cluster]\n{extra_cluster}\n",
        manifest.display()
    )
}

pub fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// Copies a prepared dataset directory so a test can damage its copy.
pub fn copy_dataset(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
}

/// Waits until `path` holds something, returning it (panics after `limit`).
pub fn wait_for_file(path: &Path, limit: Duration) -> String {
    let t0 = Instant::now();
    loop {
        if let Ok(s) = std::fs::read_to_string(path) {
            if !s.is_empty() {
                return s;
            }
        }
        assert!(
            t0.elapsed() < limit,
            "{} did not appear within {limit:?}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Starts `butler coordinator` for `world` workers on a free loopback port, its stderr piped; returns the
/// process and the address it listens on.
pub fn start_coordinator(
    config: &Path,
    run_dir: &Path,
    world: u32,
    token: &str,
) -> (Child, String) {
    let addr_file = run_dir.with_extension("addr");
    let child = butler()
        .args([
            "coordinator",
            "--world-size",
            &world.to_string(),
            "--listen",
            "127.0.0.1:0",
        ])
        .arg("--config")
        .arg(config)
        .arg("--run-dir")
        .arg(run_dir)
        .arg("--addr-file")
        .arg(&addr_file)
        .env("BUTLER_TOKEN", token)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let addr = wait_for_file(&addr_file, Duration::from_secs(30));
    (child, addr)
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
