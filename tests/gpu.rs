//! The GPU half, as far as a machine without a GPU can check it: the binary links libtorch's CUDA half,
//! `butler doctor` reports honestly, `cuda`/`nccl` asked of a CPU machine are refused with the cause
//! named and nothing written, and rank 0's NCCL id travels through the coordinator's rendezvous
//! unchanged. Parts that need a GPU print why they are skipped.

mod common;
use common::*;

fn gpu_here() -> bool {
    let o = butler().args(["doctor", "--json"]).output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    v["cuda_available"].as_bool().unwrap()
}

#[test]
fn the_binary_links_libtorch_cuda_and_doctor_says_what_it_found() {
    let o = butler().args(["doctor", "--json"]).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    // The venv's torch wheel is the CUDA build: with the --no-as-needed link, libtorch_cuda.so is mapped
    // at start even where no GPU exists (without it, CUDA would be invisible on every machine).
    assert_eq!(v["libtorch_cuda_loaded"], true, "{v}");
    assert_eq!(v["libtorch"], "2.11.0");
    // The project's libnccl.so link makes NCCL loadable (scripts/setup-python.sh).
    let nccl = v["nccl"]
        .as_str()
        .unwrap_or_else(|| panic!("NCCL not found: {v}"));
    assert!(nccl.starts_with("2."), "{nccl}");
    if v["cuda_available"] == false {
        assert_eq!(v["auto_device"], "Cpu");
        assert_eq!(v["auto_backend"], "ring");
        assert!(v["cuda_reason"].as_str().unwrap().len() > 10, "{v}");
    }
    let text = butler().arg("doctor").output().unwrap();
    assert!(text.status.success());
    let t = String::from_utf8_lossy(&text.stdout);
    for line in ["libtorch", "CUDA available", "NCCL", "backend = \"auto\""] {
        assert!(t.contains(line), "doctor's report lacks {line:?}:\n{t}");
    }
}

#[test]
fn cuda_or_nccl_on_a_machine_without_them_is_refused_before_anything_is_written() {
    if gpu_here() {
        println!("skipped: this machine has CUDA, so cluster.device = \"cuda\" is valid here");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for (cluster, expect) in [
        (
            "device = \"cuda\"",
            "cluster.device = \"cuda\" but libtorch sees no CUDA device",
        ),
        (
            "backend = \"nccl\"",
            "cluster.backend = \"nccl\" but this machine has no CUDA device",
        ),
        (
            "device = \"cpu\"\nbackend = \"nccl\"",
            "cluster.backend: \"nccl\" needs cluster.device = \"cuda\"",
        ),
    ] {
        let cfg = write(dir.path(), "job.toml", &small_config(&mnist1d(), cluster));
        let out = dir.path().join("run");
        let o = butler()
            .arg("run")
            .arg(&cfg)
            .args(["--workers", "1", "--out"])
            .arg(&out)
            .output()
            .unwrap();
        assert!(!o.status.success(), "{cluster}: accepted");
        let e = stderr(&o);
        assert!(e.contains(expect), "{cluster}: {e}");
        assert!(
            !out.exists(),
            "{cluster}: a refused job created its run directory"
        );
    }
}

#[test]
fn a_worker_asked_for_cuda_without_one_fails_naming_the_cause() {
    if gpu_here() {
        println!("skipped: this machine has CUDA");
        return;
    }
    // Started directly (as on a cluster), past the launcher's preflight: the worker itself refuses, the
    // coordinator records the failure and exits non-zero.
    let dir = tempfile::tempdir().unwrap();
    let cfg = write(
        dir.path(),
        "job.toml",
        &small_config(&mnist1d(), "device = \"cuda\""),
    );
    let run_dir = dir.path().join("run");
    let (coord, addr) = start_coordinator(&cfg, &run_dir, 1, "t");
    let url = format!("http://{addr}");
    let w = butler()
        .args(["worker", "--token", "t", "--coordinator", &url])
        .output()
        .unwrap();
    assert!(!w.status.success());
    let e = stderr(&w);
    assert!(
        e.contains("cluster.device = \"cuda\"") && e.contains("butler doctor"),
        "{e}"
    );
    let c = coord.wait_with_output().unwrap();
    assert!(!c.status.success(), "the coordinator reported success");
    assert!(!run_dir.join("summary.json").exists());
}

#[test]
fn rank_zeros_nccl_id_travels_through_the_coordinator_unchanged() {
    use butler_worker::collective::nccl;
    let id = match nccl::create_unique_id() {
        Ok(id) => id,
        Err(e) => {
            println!("skipped: no NCCL id can be made here: {e}");
            return;
        }
    };
    let dir = tempfile::tempdir().unwrap();
    let cfg_path = write(dir.path(), "job.toml", &small_config(&mnist1d(), ""));
    let config = butler_common::config::JobConfig::load(&cfg_path).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let opts = butler_coordinator::CoordinatorOptions {
        config,
        world_size: 2,
        listen: "127.0.0.1:0".parse().unwrap(),
        run_dir: dir.path().join("run"),
        token: "secret".into(),
        resume: false,
        metrics_listen: None,
        tls: None,
    };
    rt.spawn(butler_coordinator::serve(opts, move |addr| {
        let _ = tx.send(addr);
    }));
    let addr = rx.recv_timeout(std::time::Duration::from_secs(30)).unwrap();
    let url = format!("http://{addr}");
    let answers: Vec<_> = rt.block_on(async {
        let mut clients = Vec::new();
        for rank in 0..2u32 {
            let mut c = butler_worker::client::connect(
                &url,
                "secret",
                None,
                std::time::Duration::from_secs(10),
            )
            .await
            .unwrap();
            let reg = c
                .register(butler_proto::RegisterRequest {
                    worker_id: format!("w{rank}"),
                    requested_rank: rank as i32,
                })
                .await
                .unwrap()
                .into_inner();
            clients.push((c, reg));
        }
        // A rank other than 0 may not publish an id.
        let (c1, reg1) = &clients[1];
        let refused = c1
            .clone()
            .rendezvous(butler_proto::RendezvousRequest {
                rank: 1,
                generation: reg1.generation,
                endpoint: b"127.0.0.1:1".to_vec(),
                device: "cuda:1@h".into(),
                nccl: true,
                nccl_id: id.to_vec(),
            })
            .await
            .unwrap_err();
        assert_eq!(refused.code(), tonic::Code::InvalidArgument);
        assert!(
            refused.message().contains("only rank 0"),
            "{}",
            refused.message()
        );
        let calls = clients.iter().map(|(c, reg)| {
            let mut c = c.clone();
            let rank = reg.rank;
            let generation = reg.generation;
            async move {
                c.rendezvous(butler_proto::RendezvousRequest {
                    rank,
                    generation,
                    endpoint: format!("127.0.0.1:{}", 1000 + rank).into_bytes(),
                    device: format!("cuda:{rank}@h"),
                    nccl: true,
                    nccl_id: if rank == 0 { id.to_vec() } else { Vec::new() },
                })
                .await
                .unwrap()
                .into_inner()
            }
        });
        futures_join(calls).await
    });
    for a in &answers {
        assert_eq!(a.nccl_id, id.to_vec(), "the id changed on the way");
        assert_eq!(
            a.devices,
            vec!["cuda:0@h".to_string(), "cuda:1@h".to_string()]
        );
        assert_eq!(a.nccl, vec![true, true]);
        let (b, _) = butler_worker::device::select_backend(
            butler_common::config::BackendChoice::Auto,
            &a.devices,
            &a.nccl,
        )
        .unwrap();
        assert_eq!(b, butler_worker::device::Backend::Nccl);
    }
}

/// Runs the futures concurrently (a rendezvous answers only once every rank has called).
async fn futures_join<F: std::future::Future<Output = T> + Send + 'static, T: Send + 'static>(
    fs: impl Iterator<Item = F>,
) -> Vec<T> {
    let handles: Vec<_> = fs.map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}
