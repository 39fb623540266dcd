//! A trainer stopped after k steps, saved to a resumable checkpoint and loaded into a freshly built
//! trainer continues exactly as the one that never stopped: weights, EMA, optimizer state and the
//! schedule position all travel in the file (for every optimizer kind, with Mixup's per-step draws).

use butler_common::config::JobConfig;
use butler_worker::checkpoint::{load_resumable, save_resumable, ResumeMeta};
use butler_worker::collective::SingleProcess;
use butler_worker::trainer::Trainer;
use std::path::Path;
use tch::{Device, Kind, Tensor};

const STEPS: i64 = 12;
const BATCH: i64 = 16;

static SEEDED: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn config(optim: &str) -> JobConfig {
    let text = format!(
        "[job]\nname='r'\nseed=4\n[data]\nmanifest='unused'\n[model]\nkind='conv_base'\nchannels=8\n\
         [optim]\n{optim}\n[schedule]\nkind='cosine'\nwarmup_steps=3\n[train]\nepochs=1\nbatch_size={BATCH}\nema=0.8\n\
         [regularize.mix]\nmixup_alpha=0.4\n"
    );
    JobConfig::from_toml(&text, Path::new("r.toml")).unwrap()
}

fn trainer(cfg: &JobConfig) -> Trainer {
    let _g = SEEDED.lock().unwrap_or_else(|p| p.into_inner());
    Trainer::new(cfg, &[40], 10, 4, STEPS as u64).unwrap()
}

fn step(t: &mut Trainer, x: &Tensor, y: &Tensor, k: i64) {
    let (xb, yb) = (x.narrow(0, k * BATCH, BATCH), y.narrow(0, k * BATCH, BATCH));
    t.step(&xb, &yb, BATCH as u64, None, &mut SingleProcess)
        .unwrap();
}

fn meta(step: u64) -> ResumeMeta {
    ResumeMeta {
        format: 0,
        job: "r".into(),
        step,
        epoch: 0,
        steps_in_epoch: step,
        labeled_start: step * BATCH as u64,
        unlabeled: None,
        world_size: 1,
        generation: 1,
        epoch_losses: vec![[1.5, 80.0]],
        ..ResumeMeta::default()
    }
}

#[test]
fn a_trainer_resumed_from_its_checkpoint_continues_exactly() {
    let x = Tensor::randn([STEPS * BATCH, 40], (Kind::Float, Device::Cpu));
    let y = Tensor::randint(10, [STEPS * BATCH], (Kind::Int64, Device::Cpu));
    let dir = tempfile::tempdir().unwrap();
    for optim in [
        "kind='sgd'\nlr=0.1\nmomentum=0.9\nweight_decay=0.0005\nnesterov=true",
        "kind='adam'\nlr=0.01",
        "kind='adamw'\nlr=0.01\nweight_decay=0.05",
        "kind='lars'\nlr=0.5\nmomentum=0.9\nweight_decay=0.000001",
    ] {
        let cfg = config(optim);
        let mut straight = trainer(&cfg);
        for k in 0..STEPS {
            step(&mut straight, &x, &y, k);
        }

        let mut first = trainer(&cfg);
        for k in 0..5 {
            step(&mut first, &x, &y, k);
        }
        let path = dir.path().join("step-5.safetensors");
        save_resumable(&first, &meta(5), &path).unwrap();
        drop(first);
        // A fresh trainer from another seed: everything must come from the file.
        let mut resumed = {
            let _g = SEEDED.lock().unwrap_or_else(|p| p.into_inner());
            Trainer::new(&cfg, &[40], 10, 99, STEPS as u64).unwrap()
        };
        let m = load_resumable(&mut resumed, &path).unwrap();
        assert_eq!(m.step, 5);
        assert_eq!(m.epoch_losses, vec![[1.5, 80.0]]);
        assert_eq!(resumed.steps_taken(), 5);
        for k in 5..STEPS {
            step(&mut resumed, &x, &y, k);
        }
        assert!(
            straight.flat_parameters() == resumed.flat_parameters(),
            "{optim}: parameters differ after the resume"
        );
        assert!(
            straight.flat_ema() == resumed.flat_ema(),
            "{optim}: EMA differs after the resume"
        );
    }
}

#[test]
fn a_checkpoint_that_does_not_fit_is_refused_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config("kind='adam'\nlr=0.01");
    let t = trainer(&cfg);
    let path = dir.path().join("step-0.safetensors");
    save_resumable(&t, &meta(0), &path).unwrap();

    // Another optimizer.
    let mut sgd = trainer(&config("kind='sgd'\nlr=0.1\nmomentum=0.9"));
    let x = Tensor::randn([BATCH, 40], (Kind::Float, Device::Cpu));
    let y = Tensor::randint(10, [BATCH], (Kind::Int64, Device::Cpu));
    let mut adam = trainer(&cfg);
    step(&mut adam, &x, &y, 0);
    save_resumable(&adam, &meta(1), &path).unwrap();
    let e = load_resumable(&mut sgd, &path).unwrap_err().to_string();
    assert!(
        e.contains("step-0.safetensors") && e.contains("unknown slot"),
        "{e}"
    );

    // Truncated.
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 100]).unwrap();
    let e = load_resumable(&mut adam, &path).unwrap_err().to_string();
    assert!(e.contains("step-0.safetensors"), "{e}");

    // A final model checkpoint is not a resumable one.
    let final_ckpt = dir.path().join("final.safetensors");
    butler_worker::checkpoint::save_vars(&t.vs, &final_ckpt).unwrap();
    let e = load_resumable(&mut adam, &final_ckpt)
        .unwrap_err()
        .to_string();
    assert!(e.contains("not a resumable checkpoint"), "{e}");

    // Another model.
    let other = config("kind='adam'\nlr=0.01")
        .to_toml()
        .replace("channels = 8", "channels = 4");
    let mut small = trainer(&JobConfig::from_toml(&other, Path::new("o.toml")).unwrap());
    save_resumable(&t, &meta(0), &path).unwrap();
    let e = load_resumable(&mut small, &path).unwrap_err().to_string();
    assert!(e.contains("shape"), "{e}");
}
