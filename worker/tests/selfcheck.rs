//! The GPU self-checks' harness on the CPU: without a GPU every check is skipped with its reason, and the
//! training the CUDA ≡ CPU checks compare is deterministic and moves the parameters (so a comparison
//! on a GPU machine means something). One test function: libtorch's RNG is process-global.

use butler_common::config::Precision;
use butler_worker::selfcheck::{self, max_abs_diff, train_simclr, train_supervised, Outcome};
use butler_worker::trainer::Trainer;
use tch::Device;

#[test]
fn self_checks_skip_without_a_gpu_and_their_training_is_deterministic() {
    if tch::Cuda::is_available() {
        println!("this machine has CUDA: the checks run for real in `butler doctor --check`");
    } else {
        let r = selfcheck::run_all();
        assert_eq!(r.len(), 7);
        for c in &r {
            assert_eq!(c.outcome, Outcome::Skip, "{}", c.name);
            assert!(c.detail.starts_with("no CUDA device: "), "{}", c.detail);
            println!("skipped (printed reason): {} — {}", c.name, c.detail);
        }
    }
    // The binary and test targets link libtorch with --no-as-needed: the CUDA half is mapped even here.
    assert!(
        butler_worker::device::libtorch_cuda_loaded(),
        "libtorch_cuda.so is not mapped: the worker's build.rs link arguments did not take"
    );
    assert_eq!(
        selfcheck::checkpoint_round_trip(Device::Cpu, Device::Cpu),
        Ok("trained on Cpu, loaded on Cpu: parameters identical".to_string())
    );
    let a = train_supervised(Device::Cpu, "", Precision::Fp32).unwrap();
    let b = train_supervised(Device::Cpu, "", Precision::Fp32).unwrap();
    assert_eq!(max_abs_diff(&a, &b), 0.0);
    let untrained = {
        let cfg = selfcheck::config("", Precision::Fp32);
        Trainer::new(&cfg, &[40], 10, cfg.job.seed, 1)
            .unwrap()
            .flat_parameters()
    };
    assert!(
        max_abs_diff(&a, &untrained) > 1e-3,
        "training did not move the parameters"
    );
    // bf16 autocast on the CPU: close to fp32, not equal (the matmuls really ran in bf16).
    let bf16 = train_supervised(Device::Cpu, "", Precision::Bf16).unwrap();
    let d = max_abs_diff(&a, &bf16);
    assert!(d > 0.0 && d < 0.1, "bf16 vs fp32 on the CPU: {d}");
    let s = train_simclr(Device::Cpu).unwrap();
    assert_eq!(max_abs_diff(&s, &train_simclr(Device::Cpu).unwrap()), 0.0);
    let f = train_supervised(
        Device::Cpu,
        "[ssl]\nmethod='fixmatch'\nthreshold=0.15\n",
        Precision::Fp32,
    )
    .unwrap();
    assert!(
        max_abs_diff(&f, &a) > 1e-4,
        "the unlabeled term must change the FixMatch replica"
    );
}
