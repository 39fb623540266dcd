//! Knowledge-distillation teachers load from both formats and compute the function they were saved with.

use butler_common::config::ModelConfig;
use butler_worker::models;
use butler_worker::objectives::kd::Teacher;
use std::path::Path;
use tch::{nn, Device, Kind, Tensor};

fn fixtures() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures"))
}

#[test]
fn torchscript_teacher_exported_from_pytorch_matches_its_logits() {
    let tensors: std::collections::HashMap<String, Tensor> =
        Tensor::read_safetensors(fixtures().join("kd.safetensors"))
            .unwrap()
            .into_iter()
            .collect();
    let cfg = ModelConfig::Mlp {
        hidden: vec![16],
        input_dim: None,
    };
    let teacher = Teacher::load(&fixtures().join("teacher.pt"), &cfg, &[40], 10).unwrap();
    let got = teacher.logits(&tensors["teacher/x"]).unwrap();
    let diff = (&got - &tensors["teacher/logits"])
        .abs()
        .max()
        .double_value(&[]);
    assert!(
        diff < 1e-6,
        "TorchScript teacher differs from PyTorch by {diff}"
    );
}

#[test]
fn butler_checkpoint_teacher_reproduces_the_saved_model() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = ModelConfig::ConvBase {
        channels: 8,
        input_length: None,
    };
    tch::manual_seed(3);
    let vs = nn::VarStore::new(Device::Cpu);
    let model = models::build(&vs.root(), &cfg, &[40], 10);
    let path = dir.path().join("final.safetensors");
    vs.save(&path).unwrap();
    let x = Tensor::randn([4, 40], (Kind::Float, Device::Cpu));
    let want = tch::no_grad(|| model.forward_t(&x, false));
    tch::manual_seed(99); // a different init, which loading must overwrite
    let teacher = Teacher::load(&path, &cfg, &[40], 10).unwrap();
    let got = teacher.logits(&x).unwrap();
    assert_eq!((&got - &want).abs().max().double_value(&[]), 0.0);
    assert!(
        !got.requires_grad(),
        "the teacher must run without gradients"
    );
}

#[test]
fn missing_teacher_is_a_clear_error() {
    let cfg = ModelConfig::ConvBase {
        channels: 8,
        input_length: None,
    };
    let e = Teacher::load(
        Path::new("/nonexistent/teacher.safetensors"),
        &cfg,
        &[40],
        10,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(
        e.contains("/nonexistent/teacher.safetensors") && e.contains("does not exist"),
        "{e}"
    );
}

#[test]
fn teacher_that_does_not_fit_the_data_fails_at_load() {
    let dir = tempfile::tempdir().unwrap();
    // A ConvBase checkpoint with 10 classes, loaded as a teacher for 4 classes.
    let cfg = ModelConfig::ConvBase {
        channels: 8,
        input_length: None,
    };
    let vs = nn::VarStore::new(Device::Cpu);
    let _model = models::build(&vs.root(), &cfg, &[40], 10);
    let path = dir.path().join("final.safetensors");
    vs.save(&path).unwrap();
    assert!(
        Teacher::load(&path, &cfg, &[40], 4).is_err(),
        "a 10-class checkpoint loaded as a 4-class teacher"
    );
    // The TorchScript fixture takes 40 inputs and has 10 outputs: wrong class count and wrong length.
    let ts = fixtures().join("teacher.pt");
    let e = Teacher::load(&ts, &cfg, &[40], 4)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("teacher.pt") && e.contains("[1, 4]"), "{e}");
    let e = Teacher::load(&ts, &cfg, &[12], 10)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("teacher.pt"), "{e}");
}

/// Distillation on unlabeled data has no CE term: its part is λ·T²·KL(teacher ‖ student) on the
/// unlabeled batch, and the labeled part is unchanged by its presence.
#[test]
fn distillation_on_unlabeled_data_is_the_kd_term_alone() {
    use butler_common::config::JobConfig;
    use butler_worker::losses::{kd_loss, KdConfig};
    use butler_worker::mixing::MixRng;
    use butler_worker::objectives::{self, StepCtx};

    let text = format!(
        "[job]\nname='kd'\n[data]\nmanifest='unused'\n[model]\nkind='mlp'\nhidden=[8]\n[optim]\nkind='sgd'\nlr=0.1\n\
         [train]\nepochs=1\nbatch_size=4\n[regularize.distill]\nteacher='{}'\nalpha=0.3\ntemperature=2.0\nunlabeled_weight=0.7\n",
        fixtures().join("teacher.pt").display()
    );
    let cfg = JobConfig::from_toml(&text, Path::new("kd.toml")).unwrap();
    tch::manual_seed(5);
    let vs = nn::VarStore::new(Device::Cpu);
    let student = models::build(&vs.root(), &cfg.model, &[40], 10);
    let mut objective =
        objectives::build(&cfg, &[40], 10, student.mix_points(), 100, tch::Device::Cpu).unwrap();
    let x = Tensor::randn([4, 40], (Kind::Float, Device::Cpu));
    let y = Tensor::from_slice(&[1i64, 2, 3, 4]);
    let u = Tensor::randn([6, 40], (Kind::Float, Device::Cpu));
    let mut rng = MixRng::new(0);
    let parts = objective
        .loss(StepCtx {
            model: student.as_ref(),
            x: &x,
            y: &y,
            rng: &mut rng,
            step: 0,
            unlabeled: std::slice::from_ref(&u),
            unlabeled_ids: &[],
            unlabeled_pool: 0,
            pseudo: None,
            comm: &mut butler_worker::collective::SingleProcess,
            teacher: None,
        })
        .unwrap();

    let teacher = Teacher::load(&fixtures().join("teacher.pt"), &cfg.model, &[40], 10).unwrap();
    let kd = KdConfig {
        alpha: 0.3,
        temperature: 2.0,
    };
    let want_u = kd_loss(
        &student.forward_t(&u, true),
        &teacher.logits(&u).unwrap(),
        None,
        &kd,
        0.0,
    ) * 0.7;
    let got_u = parts.unlabeled.expect("an unlabeled part");
    assert!((got_u.double_value(&[]) - want_u.double_value(&[])).abs() < 1e-6);
    let targets = butler_worker::losses::one_hot(&y, 10);
    let want_l = kd_loss(
        &student.forward_t(&x, true),
        &teacher.logits(&x).unwrap(),
        Some(&targets),
        &kd,
        0.0,
    );
    assert!((parts.labeled.unwrap().double_value(&[]) - want_l.double_value(&[])).abs() < 1e-6);

    // An empty unlabeled share contributes no part.
    let empty = Tensor::zeros([0, 40], (Kind::Float, Device::Cpu));
    let parts = objective
        .loss(StepCtx {
            model: student.as_ref(),
            x: &x,
            y: &y,
            rng: &mut rng,
            step: 1,
            unlabeled: std::slice::from_ref(&empty),
            unlabeled_ids: &[],
            unlabeled_pool: 0,
            pseudo: None,
            comm: &mut butler_worker::collective::SingleProcess,
            teacher: None,
        })
        .unwrap();
    assert!(parts.unlabeled.is_none());
}

/// The staged job's `teacher_view = "clean"`: with two unlabeled views the teacher sees the first (the
/// clean sample) and the student the second (its augmented view); an in-memory teacher
/// (`Distill::with_teacher`) computes what the loaded one does.
#[test]
fn with_two_unlabeled_views_the_teacher_sees_the_first_and_the_student_the_second() {
    use butler_worker::losses::{kd_loss, KdConfig};
    use butler_worker::mixing::MixRng;
    use butler_worker::objectives::{kd::Distill, BatchAug, Objective, StepCtx};

    let cfg = ModelConfig::Mlp {
        input_dim: None,
        hidden: vec![8],
    };
    tch::manual_seed(9);
    let vs = nn::VarStore::new(Device::Cpu);
    let student = models::build(&vs.root(), &cfg, &[40], 10);
    let kd = KdConfig {
        alpha: 0.5,
        temperature: 1.5,
    };
    let teacher = || Teacher::load(&fixtures().join("teacher.pt"), &cfg, &[40], 10).unwrap();
    let regularize = butler_common::config::RegularizeConfig::default();
    let aug = BatchAug::new(&regularize, &[40], 10, student.mix_points()).unwrap();
    let mut objective = Distill::with_teacher(teacher(), aug, kd, 0.0, 10, 0.4);
    let (clean, strong) = (
        Tensor::randn([5, 40], (Kind::Float, Device::Cpu)),
        Tensor::randn([5, 40], (Kind::Float, Device::Cpu)),
    );
    let x = Tensor::zeros([0, 40], (Kind::Float, Device::Cpu));
    let y = Tensor::zeros([0], (Kind::Int64, Device::Cpu));
    let mut rng = MixRng::new(0);
    let mut unlabeled = |views: &[Tensor]| {
        objective
            .loss(StepCtx {
                model: student.as_ref(),
                x: &x,
                y: &y,
                rng: &mut rng,
                step: 0,
                unlabeled: views,
                unlabeled_ids: &[],
                unlabeled_pool: 0,
                pseudo: None,
                comm: &mut butler_worker::collective::SingleProcess,
                teacher: None,
            })
            .unwrap()
            .unlabeled
            .expect("an unlabeled part")
            .double_value(&[])
    };
    let got = unlabeled(&[clean.shallow_clone(), strong.shallow_clone()]);
    let same = unlabeled(std::slice::from_ref(&strong));
    let t = teacher();
    let want = |t_in: &Tensor| {
        (kd_loss(
            &student.forward_t(&strong, true),
            &t.logits(t_in).unwrap(),
            None,
            &kd,
            0.0,
        ) * 0.4)
            .double_value(&[])
    };
    assert!(
        (got - want(&clean)).abs() < 1e-6,
        "{got} vs {}",
        want(&clean)
    );
    assert!((same - want(&strong)).abs() < 1e-6);
    assert!(
        (got - same).abs() > 1e-4,
        "the two inputs give different targets"
    );
}
