//! The augmentation library on hand-made samples: determinism per (seed, epoch, sample, view), shapes and
//! value ranges, and each transform doing what its documentation says.

use butler_data::augment::one_d::{self, AmplitudeScale, Cutout1d, GaussianNoise, Roll, Shear};
use butler_data::augment::two_d::{
    self, ColorJitter, Cutout, GaussianBlur, Grayscale, HorizontalFlip, PadCrop, RandomResizedCrop,
};
use butler_data::augment::{
    sample_rng, Op, Pipeline, RandAugment, SampleKey, Transform, TwoViews, WeakStrong,
};
use butler_data::rng::MixRng;

/// A deterministic, non-symmetric test image in [0, 1].
fn image(c: usize, h: usize, w: usize) -> Vec<f32> {
    (0..c * h * w)
        .map(|i| ((i * 37 + 11) % 101) as f32 / 100.0)
        .collect()
}

fn signal(l: usize) -> Vec<f32> {
    (0..l).map(|i| (i as f32 * 0.7).sin()).collect()
}

fn apply(t: &dyn Transform, x: &[f32], shape: &[usize], rng: &mut MixRng) -> Vec<f32> {
    let mut y = x.to_vec();
    t.apply(&mut y, shape, rng, &mut Vec::new());
    y
}

/// Every stock pipeline, with a sample shape it accepts.
fn stock() -> Vec<(&'static str, Pipeline, Vec<usize>)> {
    let ws1 = WeakStrong::default_1d(40);
    let ws2 = WeakStrong::default_2d(32, 32, 2, 10);
    vec![
        ("weak-1d", ws1.weak, vec![40]),
        ("strong-1d", ws1.strong, vec![2, 40]),
        ("two-views-1d", TwoViews::default_1d(40).0, vec![40]),
        ("weak-2d", ws2.weak, vec![3, 32, 32]),
        ("strong-2d", ws2.strong, vec![3, 32, 32]),
        (
            "simclr-2d",
            TwoViews::simclr_2d(32, 32, 0.5, true).0,
            vec![3, 32, 32],
        ),
        (
            "simclr-2d-gray",
            TwoViews::simclr_2d(28, 28, 1.0, true).0,
            vec![1, 28, 28],
        ),
    ]
}

fn input(shape: &[usize]) -> Vec<f32> {
    match *shape {
        [c, h, w] => image(c, h, w),
        _ => signal(shape.iter().product()),
    }
}

#[test]
fn same_key_same_output_different_key_different_output() {
    for (name, p, shape) in stock() {
        let x = input(&shape);
        let key = SampleKey::new(7, 3, 12);
        let a = p.apply_seeded(&x, &shape, key, 0);
        assert_eq!(a, p.apply_seeded(&x, &shape, key, 0), "{name}");
        assert_eq!(
            a,
            p.apply(&x, &shape, &mut sample_rng(7, 3, 12, 0)),
            "{name}"
        );
        // Other ids, epochs, seeds and views change the draw (checked over a few, since a weak
        // pipeline can draw the identity for one of them).
        for (what, other) in [
            ("sample id", |i| SampleKey::new(7, 3, 100 + i)),
            ("epoch", |i| SampleKey::new(7, 100 + i, 12)),
            ("seed", |i| SampleKey::new(100 + i, 3, 12)),
        ] as [(&str, fn(u64) -> SampleKey); 3]
        {
            let differs = (0..8).any(|i| p.apply_seeded(&x, &shape, other(i), 0) != a);
            assert!(
                differs,
                "{name}: changing the {what} never changed the output"
            );
        }
        assert!(
            (1..9).any(|v| p.apply_seeded(&x, &shape, key, v) != a),
            "{name}: views"
        );
    }
}

#[test]
fn results_do_not_depend_on_the_thread_or_the_order() {
    let ws = WeakStrong::default_2d(32, 32, 2, 10);
    let x = image(3, 32, 32);
    let shape = [3, 32, 32];
    let serial: Vec<_> = (0..64u64)
        .map(|id| ws.views(&x, &shape, SampleKey::new(1, 2, id)))
        .collect();
    let mut parallel = vec![(Vec::new(), Vec::new()); 64];
    std::thread::scope(|s| {
        // Two threads, interleaved ids, reversed order, reused buffers.
        for (t, chunk) in parallel.chunks_mut(32).enumerate() {
            let (ws, x) = (&ws, &x);
            s.spawn(move || {
                let mut scratch = Vec::new();
                for (i, out) in chunk.iter_mut().enumerate().rev() {
                    let id = (t * 32 + i) as u64;
                    let (mut weak, mut strong) = (Vec::new(), Vec::new());
                    ws.views_into(
                        x,
                        &shape,
                        SampleKey::new(1, 2, id),
                        &mut weak,
                        &mut strong,
                        &mut scratch,
                    );
                    *out = (weak, strong);
                }
            });
        }
    });
    assert_eq!(serial, parallel);
}

#[test]
fn shapes_are_kept_and_images_stay_in_the_unit_interval() {
    for (name, p, shape) in stock() {
        let x = input(&shape);
        for id in 0..200 {
            let y = p.apply_seeded(&x, &shape, SampleKey::new(0, 0, id), 1);
            assert_eq!(y.len(), x.len(), "{name}");
            assert!(y.iter().all(|v| v.is_finite()), "{name}");
            if shape.len() == 3 {
                assert!(
                    y.iter().all(|v| (0.0..=1.0).contains(v)),
                    "{name}: sample {id} left [0, 1]"
                );
            }
        }
    }
    // Non-square images through every RandAugment op at full strength, both interpolations.
    let x = image(3, 17, 23);
    for interp in [
        two_d::Interpolation::Nearest,
        two_d::Interpolation::Bilinear,
    ] {
        for op in Op::ALL {
            let ra = RandAugment::new(3, 30)
                .with_ops(&[op])
                .with_interpolation(interp);
            for id in 0..10 {
                let y = apply(&ra, &x, &[3, 17, 23], &mut sample_rng(0, 0, id, 0));
                assert_eq!(y.len(), x.len());
                assert!(y.iter().all(|v| (0.0..=1.0).contains(v)), "{op:?}");
            }
        }
    }
}

#[test]
fn horizontal_flip_mirrors_rows() {
    let x = vec![
        1.0, 2.0, 3.0, //
        4.0, 5.0, 6.0, //
        7.0, 8.0, 9.0, //
        10.0, 11.0, 12.0,
    ];
    let mut rng = MixRng::new(0);
    let y = apply(&HorizontalFlip::new(1.0), &x, &[2, 2, 3], &mut rng);
    assert_eq!(
        y,
        [3.0, 2.0, 1.0, 6.0, 5.0, 4.0, 9.0, 8.0, 7.0, 12.0, 11.0, 10.0]
    );
    assert_eq!(
        apply(&HorizontalFlip::new(0.0), &x, &[2, 2, 3], &mut rng),
        x
    );
}

#[test]
fn roll_shifts_by_the_drawn_amount() {
    let x: Vec<f32> = (0..10).map(|v| v as f32).collect();
    for seed in 0..20 {
        let mut rng = MixRng::new(seed);
        // The documented draw: k = below(2·max + 1) − max.
        let k = rng.clone().below(2 * 3 + 1) as i64 - 3;
        let y = apply(&Roll::new(3), &x, &[10], &mut rng);
        let want: Vec<f32> = (0..10)
            .map(|i| x[(i as i64 - k).rem_euclid(10) as usize])
            .collect();
        assert_eq!(y, want, "k = {k}");
    }
    assert_eq!(apply(&Roll::new(0), &x, &[10], &mut MixRng::new(1)), x);
    // [C, L]: every channel moves by the same amount.
    let two: Vec<f32> = (0..8).map(|v| v as f32).collect();
    let y = apply(&Roll::new(2), &two, &[2, 4], &mut MixRng::new(4));
    let k = (y[0] as i64).rem_euclid(4);
    assert_eq!(y[4] as i64, 4 + k);
}

#[test]
fn amplitude_scale_shear_and_noise() {
    let x = signal(40);
    let mut rng = MixRng::new(2);
    for _ in 0..50 {
        let y = apply(&AmplitudeScale::new(0.4), &x, &[40], &mut rng);
        let f = y[1] / x[1];
        assert!((0.8..1.2).contains(&f), "{f}");
        assert!(x.iter().zip(&y).all(|(a, b)| (a * f - b).abs() < 1e-5));
    }
    // Shear adds a linear ramp: second differences of y − x vanish, endpoints symmetric.
    let y = apply(&Shear::new(0.75), &x, &[40], &mut rng);
    let d: Vec<f32> = x.iter().zip(&y).map(|(a, b)| b - a).collect();
    assert!(d
        .windows(3)
        .all(|w| (w[0] - 2.0 * w[1] + w[2]).abs() < 1e-5));
    assert!((d[0] + d[39]).abs() < 1e-5 && d[0].abs() <= 0.375);
    // I.i.d. noise has the requested spread.
    let zeros = vec![0.0f32; 20_000];
    let n = apply(&GaussianNoise::new(0.5), &zeros, &[20_000], &mut rng);
    let mean = n.iter().sum::<f32>() / n.len() as f32;
    let std = (n.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / n.len() as f32).sqrt();
    assert!(
        mean.abs() < 0.02 && (std - 0.5).abs() < 0.02,
        "{mean} {std}"
    );
    // 1-D cutout zeros one span in both channels.
    let ones = vec![1.0f32; 80];
    let c = apply(&Cutout1d::new(1, 5), &ones, &[2, 40], &mut rng);
    let zeros_per_channel: Vec<usize> = c
        .chunks(40)
        .map(|r| r.iter().filter(|v| **v == 0.0).count())
        .collect();
    assert_eq!(zeros_per_channel[0], zeros_per_channel[1]);
    assert!((3..=5).contains(&zeros_per_channel[0]));
}

#[test]
fn grayscale_of_pure_red_is_its_luma() {
    let red = vec![1.0, 0.0, 0.0];
    let y = apply(&Grayscale::new(1.0), &red, &[3, 1, 1], &mut MixRng::new(0));
    for v in y {
        assert!((v - 0.299).abs() < 1e-6, "{v}");
    }
    let gray = vec![0.3f32; 4];
    assert_eq!(
        apply(&Grayscale::new(1.0), &gray, &[1, 2, 2], &mut MixRng::new(0)),
        gray
    );
}

#[test]
fn full_scale_square_crop_is_the_identity() {
    let x = image(3, 16, 16);
    let crop = RandomResizedCrop::new((1.0, 1.0), (1.0, 1.0));
    for seed in 0..10 {
        assert_eq!(apply(&crop, &x, &[3, 16, 16], &mut MixRng::new(seed)), x);
    }
    // A real crop changes the image but keeps its range.
    let y = apply(
        &RandomResizedCrop::new((0.08, 0.5), (0.75, 4.0 / 3.0)),
        &x,
        &[3, 16, 16],
        &mut MixRng::new(1),
    );
    assert_ne!(y, x);
}

#[test]
fn blur_of_a_constant_image_is_constant() {
    let x = vec![0.37f32; 3 * 9 * 11];
    let blur = GaussianBlur::new(5, (0.1, 2.0));
    for seed in 0..5 {
        let y = apply(&blur, &x, &[3, 9, 11], &mut MixRng::new(seed));
        assert!(y.iter().all(|v| (v - 0.37).abs() < 1e-6));
    }
    // A single bright pixel spreads symmetrically and keeps its mass (away from the borders).
    let mut dot = vec![0.0f32; 81];
    dot[40] = 1.0;
    two_d::blur(
        &mut dot,
        &[1, 9, 9],
        &two_d::blur_kernel(3, 1.0),
        &mut Vec::new(),
    );
    assert!((dot.iter().sum::<f32>() - 1.0).abs() < 1e-6);
    assert_eq!(dot[39], dot[41]);
    assert_eq!(dot[31], dot[49]);
    assert!(dot[40] > dot[39] && dot[39] > dot[30]);
}

#[test]
fn solarize_inverts_values_at_or_above_the_threshold() {
    let x = vec![0.0, 0.25, 0.5, 0.75, 1.0];
    let mut y = x.clone();
    Op::Solarize.apply(
        &mut y,
        &[1, 1, 5],
        0.5,
        two_d::Interpolation::Nearest,
        0.0,
        &mut Vec::new(),
    );
    assert_eq!(y, [0.0, 0.25, 0.5, 0.25, 0.0]);
    // At M = 0 the threshold is 1: only the value 1 flips.
    let ra = RandAugment::new(1, 0).with_ops(&[Op::Solarize]);
    let z = apply(&ra, &x, &[1, 1, 5], &mut MixRng::new(0));
    assert_eq!(z, [0.0, 0.25, 0.5, 0.75, 0.0]);
}

#[test]
fn randaugment_with_no_ops_or_identity_is_the_identity() {
    let x = image(3, 8, 8);
    for seed in 0..5 {
        let mut rng = MixRng::new(seed);
        assert_eq!(apply(&RandAugment::new(0, 30), &x, &[3, 8, 8], &mut rng), x);
        let id = RandAugment::new(4, 30).with_ops(&[Op::Identity]);
        assert_eq!(apply(&id, &x, &[3, 8, 8], &mut rng), x);
    }
    // Magnitude 0 leaves the value ops and integer translations as the identity too.
    let calm = RandAugment::new(3, 0).with_ops(&[
        Op::Brightness,
        Op::Color,
        Op::Contrast,
        Op::Sharpness,
        Op::TranslateX,
        Op::ShearY,
        Op::Rotate,
    ]);
    let y = apply(&calm, &x, &[3, 8, 8], &mut MixRng::new(3));
    assert!(x.iter().zip(&y).all(|(a, b)| (a - b).abs() < 1e-6));
}

#[test]
fn randaugment_translate_moves_content_and_fills_zero() {
    // TranslateX at M = 30 on a 331-wide image would be 150 px; on width 10 it is 4.53 → 4 px.
    let x = vec![1.0f32; 10];
    let mut y = x.clone();
    let mag = Op::TranslateX.magnitude(30, 1, 10);
    Op::TranslateX.apply(
        &mut y,
        &[1, 1, 10],
        mag,
        two_d::Interpolation::Nearest,
        0.0,
        &mut Vec::new(),
    );
    assert_eq!(y, [0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]);
}

#[test]
fn cutout_zeros_a_square_in_every_channel() {
    let x = vec![1.0f32; 3 * 12 * 12];
    let mut rng = MixRng::new(9);
    for _ in 0..20 {
        // The documented draws: cy then cx.
        let mut peek = rng.clone();
        let (cy, cx) = (peek.below(12) as i64, peek.below(12) as i64);
        let y = apply(&Cutout::new(1, 4), &x, &[3, 12, 12], &mut rng);
        let rows = (cy - 2).clamp(0, 12)..(cy + 2).clamp(0, 12);
        let cols = (cx - 2).clamp(0, 12)..(cx + 2).clamp(0, 12);
        for c in 0..3 {
            for yy in 0..12 {
                for xx in 0..12 {
                    let inside = rows.contains(&yy) && cols.contains(&xx);
                    let v = y[(c * 12 + yy as usize) * 12 + xx as usize];
                    assert_eq!(v, if inside { 0.0 } else { 1.0 });
                }
            }
        }
    }
}

#[test]
fn pad_crop_and_jitter_limits() {
    let x = image(3, 8, 8);
    let mut rng = MixRng::new(0);
    assert_eq!(apply(&PadCrop::reflect(0, 0), &x, &[3, 8, 8], &mut rng), x);
    assert_eq!(
        apply(
            &ColorJitter::new(0.0, 0.0, 0.0, 0.0),
            &x,
            &[3, 8, 8],
            &mut rng
        ),
        x
    );
    // A reflect-padded shift keeps every value from the image.
    let y = apply(&PadCrop::reflect(2, 2), &x, &[3, 8, 8], &mut rng);
    assert!(y.iter().all(|v| x.contains(v)));
    // Brightness alone scales (then clamps) every value by one factor in [0.5, 1.5].
    let dim = vec![0.1f32, 0.2, 0.4];
    let b = apply(
        &ColorJitter::new(0.5, 0.0, 0.0, 0.0),
        &dim,
        &[1, 1, 3],
        &mut rng,
    );
    let f = b[0] / 0.1;
    assert!((0.5..=1.5).contains(&f));
    assert!((b[2] - 0.4 * f).abs() < 1e-6);
}

#[test]
fn weak_and_strong_views() {
    // 1-D: the weak view is a small circular shift of the input.
    let ws = WeakStrong::default_1d(40);
    let x = signal(40);
    for id in 0..20 {
        let (weak, strong) = ws.views(&x, &[40], SampleKey::new(0, 0, id));
        let is_roll = (-4i64..=4).any(|k| {
            let mut r = x.clone();
            one_d::roll(&mut r, &[40], k);
            r == weak
        });
        assert!(is_roll, "sample {id}");
        assert_ne!(weak, strong);
    }
    // 2-D: the weak view keeps the image's values (flip + reflect shift), the strong view does not in
    // general; the two views come from independent draws.
    let ws = WeakStrong::default_2d(32, 32, 2, 10);
    let x = image(3, 32, 32);
    let mut strong_differs = 0;
    for id in 0..20 {
        let (weak, strong) = ws.views(&x, &[3, 32, 32], SampleKey::new(0, 0, id));
        assert!(weak.iter().all(|v| x.contains(v)));
        strong_differs += (weak != strong) as usize;
    }
    assert_eq!(strong_differs, 20);
    // Contrastive views: two different draws of one pipeline.
    let tv = TwoViews::simclr_2d(32, 32, 0.5, false);
    let (a, b) = tv.views(&x, &[3, 32, 32], SampleKey::new(0, 0, 0));
    assert_ne!(a, b);
    assert_eq!(
        a,
        tv.0.apply_seeded(&x, &[3, 32, 32], SampleKey::new(0, 0, 0), 0)
    );
    assert_eq!(
        b,
        tv.0.apply_seeded(&x, &[3, 32, 32], SampleKey::new(0, 0, 0), 1)
    );
}

#[test]
#[should_panic(expected = "must be [C, H, W]")]
fn a_2d_transform_refuses_a_1d_sample() {
    let mut x = vec![0.0f32; 8];
    HorizontalFlip::new(1.0).apply(&mut x, &[8], &mut MixRng::new(0), &mut Vec::new());
}

#[test]
#[should_panic(expected = "has 12 values")]
fn a_wrong_length_is_refused() {
    let p = Pipeline::new().then(Roll::new(1));
    let _ = p.apply(&[0.0; 10], &[12], &mut MixRng::new(0));
}
