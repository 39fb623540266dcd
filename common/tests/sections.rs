//! The `[ssl]`, `[pseudo_label]` and `[pretrain]` sections as the job config parses and validates them:
//! they live in their own modules, so their round trips through `JobConfig` are tested from outside.

mod semi {
    use butler_common::config::JobConfig;
    use butler_common::semi::*;
    use std::path::Path;

    fn parse(extra_data: &str, sections: &str) -> Result<JobConfig, String> {
        let text = format!(
            "[job]\nname='t'\n[data]\nmanifest='m'\n{extra_data}[model]\nkind='mlp'\nhidden=[8]\n\
             [optim]\nkind='sgd'\nlr=0.1\n[train]\nepochs=1\nbatch_size=8\n{sections}"
        );
        JobConfig::from_toml(&text, Path::new("job.toml")).map_err(|e| e.to_string())
    }

    #[test]
    fn semi_supervised_config_errors_name_the_key_and_cause() {
        let u = "unlabeled_split='u'\n";
        let ok = parse(u, "[ssl]\nmethod='fixmatch'\n").unwrap();
        assert_eq!(ok.unlabeled_ratio(), 7, "FixMatch's default μ");
        assert_eq!(ok.ssl.unwrap().threshold(), 0.95);
        let mu3 = parse(
            "unlabeled_split='u'\nunlabeled_ratio=3\n",
            "[ssl]\nmethod='fixmatch'\n",
        )
        .unwrap();
        assert_eq!(mu3.unlabeled_ratio(), 3);
        let uda = parse(u, "[ssl]\nmethod='uda'\ntsa='exp'\n").unwrap();
        assert_eq!(uda.ssl.unwrap().threshold(), 0.0);
        for (data, sections, want) in [
            ("", "[ssl]\nmethod='uda'\n", "needs data.unlabeled_split"),
            (u, "[ssl]\nmethod='mixmatch'\n", "unknown variant"),
            (u, "[ssl]\nmethod='fixmatch'\ntsa='linear'\n", "UDA options"),
            (u, "[ssl]\nmethod='uda'\nthreshold=1.5\n", "ssl.threshold"),
            (u, "[ssl]\nmethod='uda'\ntemperature=0\n", "ssl.temperature"),
            (u, "[ssl]\nmethod='uda'\nlambda_u=-1\n", "ssl.lambda_u"),
            (
                u,
                "[ssl]\nmethod='uda'\n[regularize.mix]\nmixup_alpha=1.0\n",
                "cannot be combined",
            ),
            (u, "[pseudo_label]\nrounds=1\n", "pseudo_label.rounds"),
            (
                "",
                "[pseudo_label]\nrounds=2\n",
                "needs data.unlabeled_split",
            ),
            (
                u,
                "[pseudo_label]\nrounds=2\ntop_k_per_class=0\n",
                "top_k_per_class",
            ),
            (
                u,
                "[pseudo_label]\nrounds=2\n[ssl]\nmethod='uda'\n",
                "cannot be combined",
            ),
            (u, "[augment]\nlabeled='medium'\n", "unknown variant"),
        ] {
            let e = parse(data, sections).unwrap_err();
            assert!(
                e.contains(want) && e.contains("job.toml"),
                "{sections}: {e}"
            );
        }
        // A staged job with consistency training as well: refused, not silently ignored.
        let staged = "[job]\nname='t'\n[data]\nmanifest='m'\nlabels_per_class=4\nunlabeled_split='u'\n\
             [model]\nkind='conv_base'\n[optim]\nkind='adam'\nlr=0.01\n[train]\nepochs=1\nbatch_size=8\n\
             [pretrain]\nmethod='simclr'\n[pretrain.optim]\nkind='lars'\nlr=1.0\n";
        assert!(JobConfig::from_toml(staged, Path::new("job.toml")).is_ok());
        let e = JobConfig::from_toml(
            &format!("{staged}[ssl]\nmethod='fixmatch'\n"),
            Path::new("job.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("pretrain") && e.contains("cannot be combined"),
            "{e}"
        );
    }

    #[test]
    fn tsa_thresholds_follow_the_schedules() {
        let k = 10;
        // At t = 0: linear and log start at 1/K, exp at exp(−5)·(1 − 1/K) + 1/K.
        assert!((TsaSchedule::Linear.threshold(0, 100, k) - 0.1).abs() < 1e-12);
        assert!((TsaSchedule::Log.threshold(0, 100, k) - 0.1).abs() < 1e-12);
        let exp0 = (-5f64).exp() * 0.9 + 0.1;
        assert!((TsaSchedule::Exp.threshold(0, 100, k) - exp0).abs() < 1e-12);
        // At t = T all reach 1 (or, for log, 1 − e^−5 of the way).
        assert!((TsaSchedule::Linear.threshold(100, 100, k) - 1.0).abs() < 1e-12);
        assert!((TsaSchedule::Exp.threshold(100, 100, k) - 1.0).abs() < 1e-12);
        let log_t = (1.0 - (-5f64).exp()) * 0.9 + 0.1;
        assert!((TsaSchedule::Log.threshold(100, 100, k) - log_t).abs() < 1e-12);
        // Half way: linear 0.55, log above it, exp below it.
        let (l, g, e) = (
            TsaSchedule::Linear.threshold(50, 100, k),
            TsaSchedule::Log.threshold(50, 100, k),
            TsaSchedule::Exp.threshold(50, 100, k),
        );
        assert!((l - 0.55).abs() < 1e-12);
        assert!(g > l && e < l);
        assert_eq!(TsaSchedule::None.threshold(0, 100, k), 1.0);
        // Past the end stays at the end.
        assert_eq!(
            TsaSchedule::Linear.threshold(500, 100, k),
            TsaSchedule::Linear.threshold(100, 100, k)
        );
    }
}

mod pretrain {
    use butler_common::config::{JobConfig, OptimKind};
    use std::path::Path;

    const JOB: &str = "[job]\nname='p'\nseed=1\n[data]\nmanifest='m'\nlabels_per_class=4\nunlabeled_split='u'\n\
        [model]\nkind='conv_base'\n[optim]\nkind='adam'\nlr=0.01\n[train]\nepochs=1\nbatch_size=12\n\
        [pretrain]\nmethod='simclr'\nbatch_size=4096\n[pretrain.optim]\nkind='lars'\nlr=4.8\n";

    #[test]
    fn pretrain_section_survives_the_trip_to_the_workers() {
        let c = JobConfig::from_toml(JOB, Path::new("p.toml")).unwrap();
        let p = c.pretrain.as_ref().unwrap();
        assert_eq!(p.optim.kind, OptimKind::Lars);
        assert_eq!(p.optim.trust_coefficient, 0.001);
        assert!(p.finetune_from_probe);
        // The coordinator hands workers the normalised TOML.
        let again = JobConfig::from_toml(&c.to_toml(), Path::new("again.toml")).unwrap();
        assert_eq!(again, c);
        let plain = JOB
            .split("[pretrain]")
            .next()
            .unwrap()
            .replace("unlabeled_split='u'\n", "");
        assert!(JobConfig::from_toml(&plain, Path::new("plain.toml"))
            .unwrap()
            .pretrain
            .is_none());
    }

    #[test]
    fn pretrain_keys_are_strict_and_values_checked() {
        let e = JobConfig::from_toml(
            &JOB.replace("batch_size=4096", "batch_size=4096\nnegatives='local'"),
            Path::new("p.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("negatives"), "{e}");
        for (from, to, key) in [
            ("batch_size=4096", "batch_size=1", "pretrain.batch_size"),
            (
                "method='simclr'",
                "method='simclr'\ntemperature=0.0",
                "pretrain.temperature",
            ),
            ("lr=4.8", "lr=-1.0", "pretrain.optim.lr"),
            (
                "method='simclr'",
                "method='cpc'\ncpc_horizons=0",
                "pretrain.cpc_horizons",
            ),
        ] {
            let e = JobConfig::from_toml(&JOB.replace(from, to), Path::new("p.toml"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(key), "{key}: {e}");
        }
        let c = JobConfig::from_toml(JOB, Path::new("p.toml")).unwrap();
        let e = c.validate_world(3).unwrap_err().to_string(); // 12 divides by 3, 4096 does not
        assert!(e.contains("pretrain.batch_size"), "{e}");
        assert!(c.validate_world(2).is_ok());
    }
}

mod elastic {
    use butler_common::config::JobConfig;
    use std::path::Path;

    fn job(batch: usize, extra: &str) -> JobConfig {
        let text = format!(
            "[job]\nname='t'\n[data]\nmanifest='m'\n{extra}[model]\nkind='mlp'\nhidden=[8]\n\
             [optim]\nkind='sgd'\nlr=0.1\n[train]\nepochs=1\nbatch_size={batch}\n"
        );
        JobConfig::from_toml(&text, Path::new("job.toml")).unwrap()
    }

    fn with_cluster(mut c: JobConfig, min: u32, restarts: u32) -> JobConfig {
        c.cluster.min_workers = Some(min);
        c.cluster.max_restarts = restarts;
        c
    }

    #[test]
    fn every_world_an_elastic_job_may_shrink_to_must_carry_its_batch() {
        // 60 is divisible by 4, 3 and 2.
        assert!(with_cluster(job(60, ""), 2, 1).validate_world(4).is_ok());
        // 48 is not divisible by 5: a world of 6 that may shrink to 5 is refused, naming both.
        let e = with_cluster(job(48, ""), 4, 1)
            .validate_world(6)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("cluster.min_workers") && e.contains("run with 5 workers"),
            "{e}"
        );
        // Elastic needs regroups.
        let e = with_cluster(job(60, ""), 2, 0)
            .validate_world(3)
            .unwrap_err()
            .to_string();
        assert!(e.contains("max_restarts"), "{e}");
        // Out of range.
        let e = with_cluster(job(60, ""), 5, 1)
            .validate_world(3)
            .unwrap_err()
            .to_string();
        assert!(e.contains("between 1 and the world size 3"), "{e}");
        // A job with an unlabeled stream may (the stream re-cuts its epoch); a staged job may not.
        assert!(with_cluster(job(60, "unlabeled_split='u'\n"), 2, 1)
            .validate_world(3)
            .is_ok());
        let staged = JobConfig::from_toml(
            "[job]\nname='t'\n[data]\nmanifest='m'\nlabels_per_class=4\nunlabeled_split='u'\n\
             [model]\nkind='conv_base'\n[optim]\nkind='sgd'\nlr=0.1\n[train]\nepochs=1\nbatch_size=60\n\
             [pretrain]\nmethod='simclr'\nepochs=1\nbatch_size=60\n[pretrain.optim]\nkind='lars'\nlr=0.1\n",
            Path::new("job.toml"),
        )
        .unwrap();
        let e = with_cluster(staged, 2, 1)
            .validate_world(3)
            .unwrap_err()
            .to_string();
        assert!(e.contains("staged jobs"), "{e}");
        // min = world is not elastic: anything goes.
        assert!(with_cluster(job(60, "unlabeled_split='u'\n"), 3, 1)
            .validate_world(3)
            .is_ok());
    }
}

mod elastic_growth {
    use butler_common::config::JobConfig;
    use std::path::Path;

    #[test]
    fn growth_is_bounded_by_max_workers_and_checked_like_shrinking() {
        let text = "[job]\nname='t'\n[data]\nmanifest='m'\n[model]\nkind='mlp'\nhidden=[8]\n\
             [optim]\nkind='sgd'\nlr=0.1\n[train]\nepochs=1\nbatch_size=60\n\
             [cluster]\nmax_restarts=1\nmin_workers=2\nmax_workers=5\n";
        let c = JobConfig::from_toml(text, Path::new("job.toml")).unwrap();
        // 60 is divisible by 2, 3, 4 and 5.
        assert!(c.validate_world(3).is_ok());
        let e = c.validate_world(6).unwrap_err().to_string();
        assert!(e.contains("cluster.max_workers"), "{e}");
        let mut c7 = c.clone();
        c7.cluster.max_workers = Some(7);
        let e = c7.validate_world(3).unwrap_err().to_string();
        assert!(e.contains("run with 7 workers"), "{e}");
        let mut not_elastic = c.clone();
        not_elastic.cluster.min_workers = None;
        let e = not_elastic.validate_world(3).unwrap_err().to_string();
        assert!(e.contains("set cluster.min_workers"), "{e}");
    }
}

#[test]
fn every_example_config_loads_and_validates() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "toml") {
            butler_common::config::JobConfig::load(&p)
                .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            n += 1;
        }
    }
    assert!(n >= 19, "only {n} example configs in {}", dir.display());
}
