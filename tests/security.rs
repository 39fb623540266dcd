//! The control plane against wrong clients: TLS and mutual TLS accept the right client and refuse
//! each wrong one with an error that names the cause; refused RPCs are logged rate-limited; the
//! metrics endpoint carries no secret; `butler run --tls` runs a whole job over mutual TLS with
//! owner-only files.

mod common;

use common::*;
use rcgen::{
    date_time_ymd, BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair,
};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Output, Stdio};
use std::time::Duration;

struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

fn ca(name: &str) -> Ca {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.distinguished_name.push(DnType::CommonName, name);
    let pem = p.self_signed(&key).unwrap().pem();
    Ca {
        issuer: Issuer::new(p, key),
        pem,
    }
}

/// A leaf certificate and key signed by `ca`, valid now unless `expired`.
fn leaf(ca: &Ca, names: &[&str], server: bool, expired: bool) -> (String, String) {
    let key = KeyPair::generate().unwrap();
    let mut p =
        CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
    p.extended_key_usages = vec![if server {
        ExtendedKeyUsagePurpose::ServerAuth
    } else {
        ExtendedKeyUsagePurpose::ClientAuth
    }];
    if expired {
        p.not_before = date_time_ymd(2020, 1, 1);
        p.not_after = date_time_ymd(2021, 1, 1);
    }
    (
        p.signed_by(&key, &ca.issuer).unwrap().pem(),
        key.serialize_pem(),
    )
}

fn put(dir: &Path, name: &str, text: &str) -> String {
    write(dir, name, text).display().to_string()
}

/// Starts a coordinator for one worker (none comes: it only answers status calls) with `extra`
/// arguments; returns it, its URL's `host:port` and its metrics address when asked for.
fn coordinator(dir: &Path, name: &str, extra: &[String], metrics: bool) -> (Guard, String, u16) {
    let cfg = write(dir, &format!("{name}.toml"), &small_config(&mnist1d(), ""));
    let run = dir.join(name);
    let addr_file = dir.join(format!("{name}.addr"));
    let token_file = write(dir, "token", "s3cret-token\n");
    let mport = free_port();
    let mut c = butler();
    c.args([
        "coordinator",
        "--world-size",
        "1",
        "--listen",
        "127.0.0.1:0",
    ])
    .arg("--config")
    .arg(&cfg)
    .arg("--run-dir")
    .arg(&run)
    .arg("--addr-file")
    .arg(&addr_file)
    .arg("--token-file")
    .arg(&token_file)
    .args(extra)
    .env_remove("BUTLER_TOKEN")
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    if metrics {
        c.args(["--metrics-listen", &format!("127.0.0.1:{mport}")]);
    }
    let child = Guard(Some(c.spawn().unwrap()));
    let addr = wait_for_file(&addr_file, Duration::from_secs(30));
    (child, addr.trim().to_string(), mport)
}

/// Kills the process when dropped, so that a failed assertion leaves no coordinator behind.
struct Guard(Option<Child>);

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(c) = self.0.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn status(url: &str, token: &str, tls: &[&str]) -> Output {
    butler()
        .args(["status", "--json", "--coordinator", url])
        .args(tls)
        .env("BUTLER_TOKEN", token)
        .output()
        .unwrap()
}

/// Mismatches are collected, so that one run shows every case that fails.
static MISSES: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

/// `--tls-ca CA --tls-cert CERT --tls-key KEY` and `extra`.
fn tls_flags<'a>(ca: &'a str, cert: &'a str, key: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    [
        &["--tls-ca", ca, "--tls-cert", cert, "--tls-key", key][..],
        extra,
    ]
    .concat()
}

fn refused(o: &Output, want: &str) {
    let e = stderr(o);
    if o.status.success() || !e.contains(want) {
        MISSES.lock().unwrap().push(format!(
            "expected a refusal naming {want:?}; exit {}, stderr:\n{e}",
            o.status
        ));
    }
}

fn no_misses() {
    let m = MISSES.lock().unwrap();
    assert!(m.is_empty(), "{}", m.join("\n---\n"));
}

fn stop(mut g: Guard) -> String {
    let mut c = g.0.take().unwrap();
    let _ = c.kill();
    let mut s = String::new();
    c.stderr.take().unwrap().read_to_string(&mut s).unwrap();
    let _ = c.wait();
    s
}

#[test]
fn tls_and_mutual_tls_accept_the_right_client_and_name_each_wrong_one() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let good = ca("job CA");
    let other = ca("someone else's CA");
    let (server, server_key) = leaf(&good, &["127.0.0.1", "localhost"], true, false);
    let (old_server, old_server_key) = leaf(&good, &["127.0.0.1"], true, true);
    let (client, client_key) = leaf(&good, &["worker"], false, false);
    let (old_client, old_client_key) = leaf(&good, &["worker"], false, true);
    let (alien, alien_key) = leaf(&other, &["worker"], false, false);
    let ca_pem = put(d, "ca.pem", &good.pem);
    let other_pem = put(d, "other-ca.pem", &other.pem);
    let f = |n: &str, t: &str| put(d, n, t);
    let (server, server_key) = (f("server.pem", &server), f("server.key", &server_key));
    let (old_server, old_server_key) = (f("old.pem", &old_server), f("old.key", &old_server_key));
    let (client, client_key) = (f("client.pem", &client), f("client.key", &client_key));
    let (old_client, old_client_key) = (f("oldc.pem", &old_client), f("oldc.key", &old_client_key));
    let (alien, alien_key) = (f("alien.pem", &alien), f("alien.key", &alien_key));

    // Mutual TLS.
    let (mtls, addr, mport) = coordinator(
        d,
        "mtls",
        &[
            "--tls-cert".into(),
            server.clone(),
            "--tls-key".into(),
            server_key.clone(),
            "--tls-client-ca".into(),
            ca_pem.clone(),
        ],
        true,
    );
    let url = format!("https://{addr}");
    let token = "s3cret-token";
    let o = status(&url, token, &tls_flags(&ca_pem, &client, &client_key, &[]));
    assert!(o.status.success(), "{}", stderr(&o));
    let doc: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(doc["world_size"], 1);
    // The domain override: the certificate holds "localhost" too.
    let o = status(
        &url,
        token,
        &tls_flags(
            &ca_pem,
            &client,
            &client_key,
            &["--tls-domain", "localhost"],
        ),
    );
    assert!(o.status.success(), "{}", stderr(&o));

    refused(
        &status(&format!("http://{addr}"), token, &[]),
        "probably requires TLS",
    );
    refused(
        &status(&url, token, &["--tls-ca", &ca_pem]),
        "requires a client certificate",
    );
    refused(
        &status(
            &url,
            token,
            &tls_flags(&other_pem, &client, &client_key, &[]),
        ),
        "not signed by the CA given with --tls-ca (wrong CA)",
    );
    refused(
        &status(&url, token, &tls_flags(&ca_pem, &alien, &alien_key, &[])),
        "not signed by the coordinator's client CA",
    );
    refused(
        &status(
            &url,
            token,
            &tls_flags(&ca_pem, &old_client, &old_client_key, &[]),
        ),
        "client's certificate: it has expired",
    );
    refused(
        &status(
            &url,
            token,
            &tls_flags(
                &ca_pem,
                &client,
                &client_key,
                &["--tls-domain", "elsewhere.example"],
            ),
        ),
        "does not name the host",
    );
    refused(
        &status(&format!("http://{addr}"), token, &["--tls-ca", &ca_pem]),
        "not https://",
    );
    // A worker fails at once with the cause, instead of retrying for its connect wait.
    let t0 = std::time::Instant::now();
    let o = butler()
        .args([
            "worker",
            "--coordinator",
            &url,
            "--tls-ca",
            &other_pem,
            "--connect-wait-s",
            "60",
        ])
        .env("BUTLER_TOKEN", token)
        .output()
        .unwrap();
    refused(&o, "wrong CA");
    assert!(t0.elapsed() < Duration::from_secs(30), "{:?}", t0.elapsed());
    let o = butler()
        .args(["worker", "--coordinator", &url, "--tls-ca", &ca_pem])
        .env("BUTLER_TOKEN", token)
        .output()
        .unwrap();
    refused(&o, "requires a client certificate");
    // The right channel with the wrong token, three times: refused each time, logged once.
    for _ in 0..3 {
        refused(
            &status(
                &url,
                "wrong",
                &tls_flags(&ca_pem, &client, &client_key, &[]),
            ),
            "missing or wrong job token",
        );
    }
    // The metrics endpoint (plain HTTP, no token) holds no secret.
    let mut s = std::net::TcpStream::connect(("127.0.0.1", mport)).unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut page = String::new();
    s.read_to_string(&mut page).unwrap();
    assert!(page.contains("butler_"), "{page}");
    assert!(!page.contains(token) && !page.contains("BEGIN"), "{page}");
    no_misses();
    let log = stop(mtls);
    assert!(log.contains("coordinator listening (TLS)"), "{log}");
    assert_eq!(
        log.matches("rejected RPC").count(),
        1,
        "refusals from one address are logged once per window:\n{log}"
    );
    assert!(
        log.contains("peer=127.0.0.1:"),
        "the refusal names the peer:\n{log}"
    );
    assert!(!log.contains(token), "the token is never logged:\n{log}");

    // TLS with an expired server certificate, and a plaintext coordinator.
    let (expired, addr, _) = coordinator(
        d,
        "expired",
        &[
            "--tls-cert".into(),
            old_server,
            "--tls-key".into(),
            old_server_key,
        ],
        false,
    );
    refused(
        &status(&format!("https://{addr}"), token, &["--tls-ca", &ca_pem]),
        "coordinator's TLS certificate has expired",
    );
    stop(expired);
    let (plain, addr, _) = coordinator(d, "plain", &[], false);
    refused(
        &status(&format!("https://{addr}"), token, &["--tls-ca", &ca_pem]),
        "does not speak TLS",
    );
    let o = status(&format!("http://{addr}"), token, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    stop(plain);

    // Bad TLS files are refused before the coordinator listens, naming the file.
    let o = butler()
        .args([
            "coordinator",
            "--world-size",
            "1",
            "--listen",
            "127.0.0.1:0",
        ])
        .arg("--config")
        .arg(write(d, "bad.toml", &small_config(&mnist1d(), "")))
        .arg("--run-dir")
        .arg(d.join("bad"))
        .args([
            "--tls-cert",
            &ca_pem,
            "--tls-key",
            &d.join("missing.key").display().to_string(),
        ])
        .env("BUTLER_TOKEN", token)
        .output()
        .unwrap();
    refused(&o, "cannot read the coordinator's private key (--tls-key)");
    no_misses();
}

#[cfg(unix)]
#[test]
fn butler_run_with_tls_trains_over_mutual_tls_with_owner_only_files() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let cfg = write(
        dir.path(),
        "job.toml",
        &small_config(&mnist1d(), "").replace("epochs = 2", "epochs = 1"),
    );
    let out: PathBuf = dir.path().join("runs/tls-job");
    let o = butler()
        .args(["run", "--workers", "2", "--threads", "1", "--tls"])
        .arg(&cfg)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("https://127.0.0.1:"), "{}", stderr(&o));
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    assert!(summary["test_accuracy"].as_f64().unwrap() > 0.2);
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&out), 0o700);
    assert_eq!(mode(&out.join("tls")), 0o700);
    for f in [
        "ca.pem",
        "coordinator.pem",
        "coordinator.key",
        "client.pem",
        "client.key",
    ] {
        assert_eq!(mode(&out.join("tls").join(f)), 0o600, "{f}");
    }
    let log = std::fs::read_to_string(out.join("logs/coordinator.log")).unwrap();
    assert!(
        log.contains("coordinator listening (TLS)") && log.contains("mutual_tls=true"),
        "{log}"
    );
    assert!(!log.contains("rejected RPC"), "{log}");
}
