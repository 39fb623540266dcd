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

/// FlexMatch's per-sample learning status and distribution alignment's running mean (and FreeMatch's,
/// SoftMatch's EMAs) travel in the checkpoint: a resumed trainer continues exactly, and a trainer whose
/// method state was lost does not (so the check means something).
#[test]
fn a_stateful_semi_supervised_method_resumes_exactly() {
    use butler_worker::trainer::UnlabeledBatch;
    const U: i64 = 24;
    const POOL: u64 = 40;
    tch::manual_seed(8);
    let x = Tensor::randn([STEPS * BATCH, 40], (Kind::Float, Device::Cpu));
    let y = Tensor::randint(10, [STEPS * BATCH], (Kind::Int64, Device::Cpu));
    let u = Tensor::randn([STEPS * U + 1, 40], (Kind::Float, Device::Cpu)) * 2.0;
    let dir = tempfile::tempdir().unwrap();
    for ssl in [
        "method='flexmatch'\nthreshold=0.15\ndistribution_alignment=true\nda_momentum=0.5",
        "method='freematch'\nadaptive_momentum=0.5",
        "method='softmatch'\nadaptive_momentum=0.5",
    ] {
        let text = format!(
            "[job]\nname='r'\nseed=4\n[data]\nmanifest='unused'\nunlabeled_split='u'\n[model]\nkind='conv_base'\nchannels=8\n\
             [optim]\nkind='adamw'\nlr=0.003\n[train]\nepochs=1\nbatch_size={BATCH}\n[ssl]\n{ssl}\n"
        );
        let cfg = JobConfig::from_toml(&text, Path::new("r.toml")).unwrap();
        let step = |t: &mut Trainer, k: i64| {
            let (xb, yb) = (x.narrow(0, k * BATCH, BATCH), y.narrow(0, k * BATCH, BATCH));
            let clean = u.narrow(0, k * U, U);
            let views = [
                clean.shallow_clone(),
                &clean + u.narrow(0, k * U + 1, U) * 0.3,
            ];
            let ids: Vec<u64> = (k * U..(k + 1) * U).map(|i| i as u64 % POOL).collect();
            let batch = UnlabeledBatch {
                views: &views,
                global_len: U as u64,
                ids: &ids,
                pool_len: POOL,
            };
            t.step(&xb, &yb, BATCH as u64, Some(batch), &mut SingleProcess)
                .unwrap();
        };
        let mut straight = trainer(&cfg);
        for k in 0..STEPS {
            step(&mut straight, k);
        }
        let mut first = trainer(&cfg);
        for k in 0..5 {
            step(&mut first, k);
        }
        let path = dir.path().join("ssl-step-5.safetensors");
        save_resumable(&first, &meta(5), &path).unwrap();
        let saved = first.training_state().objective;
        assert!(!saved.is_empty(), "{ssl}: no method state to save");
        drop(first);

        let mut resumed = trainer(&cfg);
        load_resumable(&mut resumed, &path).unwrap();
        // The same weights, optimizer and step with the method's state at its start values.
        let mut forgetful = trainer(&cfg);
        let mut state = butler_worker::checkpoint::read_state(&path).unwrap().0;
        state.objective = trainer(&cfg).training_state().objective;
        forgetful.load_training_state(state).unwrap();
        for k in 5..STEPS {
            step(&mut resumed, k);
            step(&mut forgetful, k);
        }
        assert!(
            straight.flat_parameters() == resumed.flat_parameters(),
            "{ssl}: parameters differ after the resume"
        );
        assert!(
            straight.flat_parameters() != forgetful.flat_parameters(),
            "{ssl}: losing the method state changed nothing; the test proves nothing"
        );
    }
}
