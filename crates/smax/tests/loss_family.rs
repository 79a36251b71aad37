//! The loss family beyond cross-entropy: the worked examples of ALGORITHMS.md (N5, N5b, L3, L5,
//! L6, L7, L8, L10, L11), gradients by central finite differences in f64, edge cases, errors and
//! thread-count determinism.

mod common;

use common::Rng;
use smax::loss::{
    CosineGrads, LossOptions, LossReport, Reduction, comp_sum_loss, decoupled_softmax_loss, hinton_kd_loss, nkd_loss,
    normalized_softmax_loss, novel_class_prototype, softmax_collapse_fraction, spherical_z_loss, stablemax,
    stablemax_cross_entropy, tempnet_loss,
};
use smax::{Error, Par, View, ViewMut};

fn close(a: f64, b: f64, tol: f64, what: &str) {
    assert!((a - b).abs() <= tol * (1.0 + b.abs()), "{what}: {a} vs {b}");
}

/// `f(x, grad) -> loss` for a rows x cols input; checks the gradient against central
/// differences of the loss.
type LossFn<'a> = &'a dyn Fn(&[f64], Option<&mut [f64]>) -> f64;

fn fd_check(x: &[f64], rows: usize, cols: usize, f: LossFn, what: &str) {
    let mut g = vec![0.0; x.len()];
    f(x, Some(&mut g));
    let _ = (rows, cols);
    for i in 0..x.len() {
        let h = 1e-6 * (1.0 + x[i].abs());
        let (mut a, mut b) = (x.to_vec(), x.to_vec());
        a[i] += h;
        b[i] -= h;
        let fd = (f(&a, None) - f(&b, None)) / (2.0 * h);
        assert!((fd - g[i]).abs() <= 1e-7 * (1.0 + fd.abs()), "{what}: d/dx[{i}] fd {fd} vs {}", g[i]);
    }
}

fn grad_view(g: Option<&mut [f64]>, rows: usize, cols: usize) -> Option<ViewMut<'_, f64>> {
    g.map(|g| ViewMut::rows(g, rows, cols).unwrap())
}

#[test]
fn stablemax_worked_example_n5() {
    let x = [-2.0, -0.5, 0.0, 1.5, 3.0];
    let mut y = [0.0f64; 5];
    stablemax(
        View::rows(&x, 1, 5).unwrap(),
        ViewMut::rows(&mut y, 1, 5).unwrap(),
        &smax::loss::StablemaxOptions { output: smax::loss::StablemaxOutput::Probs, ..Default::default() }
            .par(Par::Seq),
    )
    .unwrap();
    for (a, b) in y.iter().zip([0.0392156863, 0.0784313725, 0.1176470588, 0.2941176471, 0.4705882353]) {
        close(*a, b, 1e-9, "stablemax");
    }
    stablemax(
        View::rows(&x, 1, 5).unwrap(),
        ViewMut::rows(&mut y, 1, 5).unwrap(),
        &smax::loss::StablemaxOptions { output: smax::loss::StablemaxOutput::LogProbs, ..Default::default() }
            .par(Par::Seq),
    )
    .unwrap();
    for (a, b) in y.iter().zip([-3.2386784522, -2.5455312716, -2.1400661635, -1.2237754316, -0.7537718024]) {
        close(*a, b, 1e-9, "log_stablemax");
    }
    for (t, loss, grad) in [
        (4i64, 0.7537718023763802, [0.0130718954, 0.0522875817, 0.1176470588, 0.1176470588, -0.1323529412]),
        (0, 3.2386784521643808, [-0.3202614379, 0.0522875817, 0.1176470588, 0.1176470588, 0.1176470588]),
    ] {
        let mut g = [0.0f64; 5];
        let r = stablemax_cross_entropy(
            View::rows(&x, 1, 5).unwrap(),
            &[t],
            Some(ViewMut::rows(&mut g, 1, 5).unwrap()),
            None,
            &LossOptions::default(),
        )
        .unwrap();
        close(r.loss, loss, 1e-14, "stablemax ce");
        for (a, b) in g.iter().zip(grad) {
            close(*a, b, 1e-9, "stablemax ce grad");
        }
    }
    // f32 input gives the same numbers (computed in f64).
    let x32: Vec<f32> = x.iter().map(|&v| v as f32).collect();
    let r =
        stablemax_cross_entropy(View::rows(&x32, 1, 5).unwrap(), &[4], None, None, &LossOptions::default()).unwrap();
    close(r.loss, 0.7537718023763802, 1e-12, "f32");
    // Gradient by finite differences on random rows, with an ignored row.
    let mut rng = Rng(1);
    let xs = rng.vec(3 * 6, 3.0);
    let f = |x: &[f64], g: Option<&mut [f64]>| {
        stablemax_cross_entropy(
            View::rows(x, 3, 6).unwrap(),
            &[1, -100, 5],
            grad_view(g, 3, 6),
            None,
            &LossOptions::default(),
        )
        .unwrap()
        .loss
    };
    fd_check(&xs, 3, 6, &f, "stablemax ce");
}

#[test]
fn softmax_collapse_n5b() {
    let z = [0.0f32, -20.0, -25.0, 0.0, -1.0, -2.0];
    // Row 0 collapses in f32 (exp(-20) is below half an ULP of 1); row 1 does not.
    assert_eq!(softmax_collapse_fraction(View::rows(&z, 2, 3).unwrap()).unwrap(), 0.5);
    // In f64 the first row does not collapse (the threshold is ≈ 36.7).
    let z64: Vec<f64> = z.iter().map(|&v| v as f64).collect();
    assert_eq!(softmax_collapse_fraction(View::rows(&z64, 2, 3).unwrap()).unwrap(), 0.0);
    // f16 collapses at a gap of ≈ 7.62.
    let h: Vec<smax::f16> = [0.0, -8.0, -9.0, 0.0, -7.0, -9.0].iter().map(|&v| smax::f16::from_f64(v)).collect();
    assert_eq!(softmax_collapse_fraction(View::rows(&h, 2, 3).unwrap()).unwrap(), 0.5);
    // The collapsed row's cross-entropy at its argmax is exactly 0 in f32 (CE via smax).
    let r = smax::loss::cross_entropy(
        View::rows(&z[..3], 1, 3).unwrap(),
        smax::loss::Targets::Classes(&[0]),
        None,
        Default::default(),
        &Default::default(),
    )
    .unwrap();
    assert!(r.loss.abs() < 1e-8);
    // StableMax in f32 does not collapse: p_0 = 0.92074192, loss 0.0825755.
    let r =
        stablemax_cross_entropy(View::rows(&z[..3], 1, 3).unwrap(), &[0], None, None, &LossOptions::default()).unwrap();
    close(r.loss, 0.0825755, 1e-6, "stablemax no collapse");
    // NaN rows and empty batches.
    let zn = [f32::NAN, 0.0];
    assert_eq!(softmax_collapse_fraction(View::rows(&zn, 1, 2).unwrap()).unwrap(), 0.0);
    assert_eq!(softmax_collapse_fraction(View::rows(&zn[..0], 0, 2).unwrap()).unwrap(), 0.0);
}

#[test]
fn spherical_z_loss_l3() {
    let o = [1.0, 2.0, 3.0, 4.0];
    let run = |o: &[f64], c: i64, a: f64, b: f64, g: Option<&mut [f64]>| {
        spherical_z_loss(
            View::rows(o, 1, 4).unwrap(),
            &[c],
            grad_view(g, 1, 4),
            None,
            &LossOptions::default().with_params(smax::loss::SphericalZ { a, b }),
        )
        .unwrap()
    };
    let mut g = [0.0; 4];
    close(run(&o, 3, 1.0, 1.0, Some(&mut g)).loss, 0.5368461838295913, 1e-14, "c3 a1 b1");
    for (a, b) in g.iter().zip([-0.0743109726, 0.0371554863, 0.1486219452, -0.1114664589]) {
        close(*a, b, 1e-9, "grad");
    }
    close(g.iter().sum::<f64>(), 0.0, 1e-15, "grad sums to 0");
    close(run(&o, 0, 1.0, 1.0, None).loss, 2.4334628122503124, 1e-14, "c0");
    close(run(&o, 3, 0.5, 3.0, None).loss, 2.382649156535105, 1e-14, "a0.5 b3");
    close(run(&o, 3, 1.0, 0.0, None).loss, 0.2322352070906026, 1e-14, "code form");
    let o10: Vec<f64> = o.iter().map(|v| 10.0 * v).collect();
    let o5: Vec<f64> = o.iter().map(|v| v - 5.0).collect();
    close(run(&o10, 3, 1.0, 1.0, None).loss, 0.5368461838295913, 1e-13, "scale invariance");
    close(run(&o5, 3, 1.0, 1.0, None).loss, 0.5368461838295913, 1e-13, "shift invariance");
    // σ = 0: (1/a)·softplus(a·b), zero gradient, flagged.
    let mut g = [1.0; 4];
    let r = run(&[2.0; 4], 1, 2.0, 0.5, Some(&mut g));
    close(r.loss, (1.0f64 + 1.0f64.exp()).ln() / 2.0, 1e-14, "sigma 0");
    assert_eq!(r.flagged_rows, 1);
    assert!(g.iter().all(|&v| v == 0.0));
    // No default for (a, b): a must be > 0.
    assert!(matches!(
        spherical_z_loss(
            View::rows(&o, 1, 4).unwrap(),
            &[0],
            None,
            None,
            &LossOptions::default().with_params(smax::loss::SphericalZ { a: 0.0, b: 1.0 })
        ),
        Err(Error::BadParameter { name: "a", .. })
    ));
    let mut rng = Rng(2);
    let xs = rng.vec(2 * 5, 2.0);
    let f = |x: &[f64], g: Option<&mut [f64]>| {
        spherical_z_loss(
            View::rows(x, 2, 5).unwrap(),
            &[1, 4],
            grad_view(g, 2, 5),
            None,
            &LossOptions::default().with_params(smax::loss::SphericalZ { a: 1.5, b: 0.7 }),
        )
        .unwrap()
        .loss
    };
    fd_check(&xs, 2, 5, &f, "spherical");
}

#[test]
fn comp_sum_family_l5() {
    let h = [2.0, 1.0, 0.1];
    for (tau, loss, grad) in [
        (0.0, 0.5174480603940779, [-0.5174480604, 0.3678794412, 0.1495686192]),
        (1.0, 0.41703001627783376, [-0.3409988611, 0.2424329707, 0.0985658904]),
        (1.7, 0.3616749649880892, [-0.2546673353, 0.1810556154, 0.0736117199]),
        (2.0, 0.3409988611140323, [-0.2247186378, 0.1597636038, 0.064955034]),
    ] {
        let mut g = [0.0; 3];
        let r = comp_sum_loss(
            View::rows(&h, 1, 3).unwrap(),
            &[0],
            Some(ViewMut::rows(&mut g, 1, 3).unwrap()),
            None,
            &LossOptions::default().with_params(smax::loss::CompSum { tau }),
        )
        .unwrap();
        close(r.loss, loss, 1e-14, &format!("tau {tau}"));
        for (a, b) in g.iter().zip(grad) {
            close(*a, b, 1e-9, &format!("grad tau {tau}"));
        }
    }
    // Sum-exponential is unbounded: p_y → 0 gives +inf, gradient finite in f64.
    let mut g = [0.0f64; 2];
    let r = comp_sum_loss(
        View::rows(&[-800.0, 800.0], 1, 2).unwrap(),
        &[0],
        Some(ViewMut::rows(&mut g, 1, 2).unwrap()),
        None,
        &LossOptions::default().with_params(smax::loss::CompSum { tau: 0.0 }),
    )
    .unwrap();
    assert_eq!(r.loss, f64::INFINITY);
    assert!(g.iter().all(|v| v.is_finite()));
    let mut rng = Rng(3);
    let xs = rng.vec(2 * 4, 2.0);
    for tau in [0.0, 0.5, 1.0, 1.7, 2.0] {
        let f = |x: &[f64], g: Option<&mut [f64]>| {
            comp_sum_loss(
                View::rows(x, 2, 4).unwrap(),
                &[2, 0],
                grad_view(g, 2, 4),
                None,
                &LossOptions::default().with_params(smax::loss::CompSum { tau }),
            )
            .unwrap()
            .loss
        };
        fd_check(&xs, 2, 4, &f, &format!("comp-sum tau {tau}"));
    }
}

#[test]
fn nkd_l6_and_hinton_l11() {
    let zs = [2.0, 1.0, 0.1, -1.0];
    let zt = [3.0, 0.5, 0.2, -2.0];
    for (lam, gamma, total, grad) in [
        (1.0, 1.5, 1.724081930602468, [-0.3148253801, 0.3541389027, -0.1310587116, 0.091745189]),
        (3.0, 3.5, 33.55058640269342, [-0.3148253801, 0.373816273, -0.5274779268, 0.468487034]),
    ] {
        let mut g = [0.0; 4];
        let r = nkd_loss(
            View::rows(&zs, 1, 4).unwrap(),
            View::rows(&zt, 1, 4).unwrap(),
            &[0],
            Some(ViewMut::rows(&mut g, 1, 4).unwrap()),
            None,
            &LossOptions::default().with_params(smax::loss::Nkd { temperature: lam, gamma }),
        )
        .unwrap();
        close(r.loss, total, 1e-13, &format!("nkd {lam} {gamma}"));
        for (a, b) in g.iter().zip(grad) {
            close(*a, b, 1e-9, "nkd grad");
        }
    }
    let r = hinton_kd_loss(
        View::rows(&zs, 1, 4).unwrap(),
        View::rows(&zt, 1, 4).unwrap(),
        None,
        None,
        &LossOptions::default().with_params(smax::loss::HintonKd { temperature: 4.0 }),
    )
    .unwrap();
    close(r.loss, 0.2872556104791486, 1e-14, "hinton");
    // K = 1 has no non-target part; a teacher with only -inf non-targets is flagged.
    let r = nkd_loss(
        View::rows(&[1.0], 1, 1).unwrap(),
        View::rows(&[2.0], 1, 1).unwrap(),
        &[0],
        None,
        None,
        &LossOptions::default().with_params(smax::loss::Nkd { temperature: 1.0, gamma: 1.0 }),
    )
    .unwrap();
    assert_eq!((r.loss, r.flagged_rows), (0.0, 0));
    let r = nkd_loss(
        View::rows(&[1.0, 0.0], 1, 2).unwrap(),
        View::rows(&[2.0, f64::NEG_INFINITY], 1, 2).unwrap(),
        &[0],
        None,
        None,
        &LossOptions::default().with_params(smax::loss::Nkd { temperature: 1.0, gamma: 1.0 }),
    )
    .unwrap();
    assert_eq!(r.flagged_rows, 1);
    assert!(r.loss.is_finite());
    let mut rng = Rng(4);
    let (xs, xt) = (rng.vec(3 * 5, 2.0), rng.vec(3 * 5, 2.0));
    let f = |x: &[f64], g: Option<&mut [f64]>| {
        nkd_loss(
            View::rows(x, 3, 5).unwrap(),
            View::rows(&xt, 3, 5).unwrap(),
            &[4, -100, 0],
            grad_view(g, 3, 5),
            None,
            &LossOptions::default().with_params(smax::loss::Nkd { temperature: 2.0, gamma: 1.5 }),
        )
        .unwrap()
        .loss
    };
    fd_check(&xs, 3, 5, &f, "nkd");
    let f = |x: &[f64], g: Option<&mut [f64]>| {
        hinton_kd_loss(
            View::rows(x, 3, 5).unwrap(),
            View::rows(&xt, 3, 5).unwrap(),
            grad_view(g, 3, 5),
            None,
            &LossOptions::default().with_params(smax::loss::HintonKd { temperature: 3.0 }),
        )
        .unwrap()
        .loss
    };
    fd_check(&xs, 3, 5, &f, "hinton");
}

#[test]
fn decoupled_softmax_l7() {
    let sims = [0.9, 0.8, 0.1, -0.2];
    let pos = [true, true, false, false];
    let mut g = [0.0; 4];
    let mut rows = [0.0; 1];
    let r = decoupled_softmax_loss(
        View::rows(&sims, 1, 4).unwrap(),
        &pos,
        Some(ViewMut::rows(&mut g, 1, 4).unwrap()),
        Some(&mut rows),
        &LossOptions::default().with_params(smax::loss::Decoupled { temperature: 0.05 }),
    )
    .unwrap();
    close(r.loss, 4.7320181906229664e-07, 1e-9, "decoupled");
    for (a, b) in g.iter().zip([-1.1281410728e-06f64, -8.3358917713e-06, 9.4406318797e-06, 2.3400986821e-08]) {
        assert!((a - b).abs() <= 1e-9 * b.abs() + 1e-17, "{a} vs {b}");
    }
    // Perfect separation: → 0; no positives: the row does not count; no negatives: 0.
    let r = decoupled_softmax_loss(
        View::rows(&[1.0, 1.0, -1.0, -1.0], 1, 4).unwrap(),
        &pos,
        None,
        None,
        &LossOptions::default().with_params(smax::loss::Decoupled { temperature: 0.05 }),
    )
    .unwrap();
    assert!(r.loss < 1e-15);
    let r = decoupled_softmax_loss(
        View::rows(&[0.1, 0.2, 0.3, 0.4], 2, 2).unwrap(),
        &[false, false, true, true],
        None,
        None,
        &LossOptions::default().with_params(smax::loss::Decoupled { temperature: 0.05 }),
    )
    .unwrap();
    assert_eq!((r.valid_rows, r.loss), (1, 0.0));
    let mut rng = Rng(5);
    let xs = rng.vec(2 * 6, 1.0);
    let p = [true, false, true, false, false, false, false, false, false, false, false, true];
    let f = |x: &[f64], g: Option<&mut [f64]>| {
        decoupled_softmax_loss(
            View::rows(x, 2, 6).unwrap(),
            &p,
            grad_view(g, 2, 6),
            None,
            &LossOptions::default().with_params(smax::loss::Decoupled { temperature: 0.3 }),
        )
        .unwrap()
        .loss
    };
    fd_check(&xs, 2, 6, &f, "decoupled");
}

#[test]
fn normalized_softmax_l8() {
    let x = [1.0, 2.0];
    let w = [1.0, 0.0, 0.0, 1.0, -1.0, 1.0];
    for (t, loss) in [(0.05, 0.00013997482943395312), (0.1, 0.01440125520216462), (1.0, 0.7886004105403325)] {
        let r = normalized_softmax_loss(
            &x,
            &w,
            2,
            &[1],
            CosineGrads::default(),
            &LossOptions::default().with_params(smax::loss::NormalizedSoftmax { temperature: t }),
        )
        .unwrap();
        close(r.loss, loss, 1e-12, &format!("T {t}"));
    }
    let p = novel_class_prototype(&[0.5, -1.0, 1.0, -1.5, 0.2, -0.8], 2, 10.0).unwrap();
    close(p[0], 0.4190180882, 1e-9, "prototype");
    close(p[1], -0.9079778862, 1e-9, "prototype");
    assert!(novel_class_prototype(&[1.0, 0.0, -1.0, 0.0], 2, 10.0).is_err());
    // Gradients with respect to x and W by finite differences.
    let mut rng = Rng(6);
    let (xs, ws) = (rng.vec(3 * 4, 1.0), rng.vec(5 * 4, 1.0));
    let y = [2i64, 0, 4];
    let f = |x: &[f64], g: Option<&mut [f64]>| {
        normalized_softmax_loss(
            x,
            &ws,
            4,
            &y,
            CosineGrads { dx: g, dw: None },
            &LossOptions::default().with_params(smax::loss::NormalizedSoftmax { temperature: 0.2 }),
        )
        .unwrap()
        .loss
    };
    fd_check(&xs, 3, 4, &f, "cosine dx");
    let f = |w: &[f64], g: Option<&mut [f64]>| {
        normalized_softmax_loss(
            &xs,
            w,
            4,
            &y,
            CosineGrads { dx: None, dw: g },
            &LossOptions::default().with_params(smax::loss::NormalizedSoftmax { temperature: 0.2 }),
        )
        .unwrap()
        .loss
    };
    fd_check(&ws, 5, 4, &f, "cosine dw");
}

#[test]
fn tempnet_l10() {
    let z = [2.0, 1.0, 0.1];
    let mut dt = [0.0];
    let mut g = [0.0; 3];
    let r = tempnet_loss(
        View::rows(&z, 1, 3).unwrap(),
        &[0],
        &[1.0],
        Some(ViewMut::rows(&mut g, 1, 3).unwrap()),
        Some(&mut dt),
        None,
        &LossOptions::default().with_params(smax::loss::TempNet { rho: 0.1 }),
    )
    .unwrap();
    close(r.loss, -0.581582272390276, 1e-14, "tau 1");
    close(dt[0], -0.15187410990785788, 1e-14, "dL/dtau");
    let r = tempnet_loss(
        View::rows(&z, 1, 3).unwrap(),
        &[0],
        &[0.5],
        None,
        None,
        None,
        &LossOptions::default().with_params(smax::loss::TempNet { rho: 0.1 }),
    )
    .unwrap();
    close(r.loss, -0.42608589008714776, 1e-14, "tau 0.5");
    // At the optimal τ the temperature gradient vanishes.
    let mut dt = [1.0];
    tempnet_loss(
        View::rows(&z, 1, 3).unwrap(),
        &[0],
        &[1.6851189395121366],
        None,
        Some(&mut dt),
        None,
        &LossOptions::default().with_params(smax::loss::TempNet { rho: 0.1 }),
    )
    .unwrap();
    assert!(dt[0].abs() < 1e-12, "{}", dt[0]);
    // Both gradients by finite differences (τ through the loss of one row).
    let mut rng = Rng(7);
    let xs = rng.vec(2 * 4, 2.0);
    let taus = [0.7, 1.9];
    let f = |x: &[f64], g: Option<&mut [f64]>| {
        tempnet_loss(
            View::rows(x, 2, 4).unwrap(),
            &[3, 1],
            &taus,
            grad_view(g, 2, 4),
            None,
            None,
            &LossOptions::default().with_params(smax::loss::TempNet { rho: 0.5 }),
        )
        .unwrap()
        .loss
    };
    fd_check(&xs, 2, 4, &f, "tempnet dz");
    let ft = |t: &[f64], g: Option<&mut [f64]>| {
        tempnet_loss(
            View::rows(&xs, 2, 4).unwrap(),
            &[3, 1],
            t,
            None,
            g,
            None,
            &LossOptions::default().with_params(smax::loss::TempNet { rho: 0.5 }),
        )
        .unwrap()
        .loss
    };
    fd_check(&taus, 2, 1, &ft, "tempnet dtau");
    assert!(matches!(
        tempnet_loss(
            View::rows(&z, 1, 3).unwrap(),
            &[0],
            &[0.0],
            None,
            None,
            None,
            &LossOptions::default().with_params(smax::loss::TempNet { rho: 0.1 })
        ),
        Err(Error::BadParameter { name: "tau", .. })
    ));
}

#[test]
fn reductions_errors_and_threads() {
    let mut rng = Rng(9);
    let (n, k) = (400, 300);
    let x: Vec<f32> = rng.vec(n * k, 4.0).iter().map(|&v| v as f32).collect();
    let t: Vec<i64> = (0..n).map(|i| if i % 7 == 0 { -100 } else { (i * 13 % k) as i64 }).collect();
    let run = |o: &LossOptions| -> (LossReport, Vec<u32>) {
        let mut g = vec![0.0f32; n * k];
        let r = stablemax_cross_entropy(
            View::rows(&x, n, k).unwrap(),
            &t,
            Some(ViewMut::rows(&mut g, n, k).unwrap()),
            None,
            o,
        )
        .unwrap();
        (r, g.iter().map(|v| v.to_bits()).collect())
    };
    let base = run(&LossOptions { exec: smax::Exec::SEQ, ..Default::default() });
    for threads in [1, 2, 3] {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        let got = pool.install(|| run(&LossOptions::default()));
        assert_eq!(got.0.loss.to_bits(), base.0.loss.to_bits());
        assert!(got.1 == base.1, "{threads} threads");
    }
    let valid = t.iter().filter(|&&v| v != -100).count();
    assert_eq!(base.0.valid_rows, valid);
    let sum = run(&LossOptions { reduction: Reduction::Sum, ..Default::default() });
    close(sum.0.loss / valid as f64, base.0.loss, 1e-14, "sum vs mean");
    // Errors.
    let v = View::rows(&x, n, k).unwrap();
    assert!(matches!(
        stablemax_cross_entropy(v, &t[1..], None, None, &LossOptions::default()),
        Err(Error::LengthMismatch { what: "targets", .. })
    ));
    let mut bad = t.clone();
    bad[3] = k as i64;
    assert!(matches!(
        stablemax_cross_entropy(v, &bad, None, None, &LossOptions::default()),
        Err(Error::TargetOutOfRange { row: 3, .. })
    ));
    assert!(matches!(
        comp_sum_loss(v, &t, None, None, &LossOptions::default().with_params(smax::loss::CompSum { tau: -1.0 })),
        Err(Error::BadParameter { name: "tau", .. })
    ));
    assert!(matches!(
        hinton_kd_loss(
            v,
            View::rows(&x[..k], 1, k).unwrap(),
            None,
            None,
            &LossOptions::default().with_params(smax::loss::HintonKd { temperature: 1.0 })
        ),
        Err(Error::ShapeMismatch { what: "teacher", .. })
    ));
    assert!(matches!(
        decoupled_softmax_loss(
            v,
            &[true; 3],
            None,
            None,
            &LossOptions::default().with_params(smax::loss::Decoupled { temperature: 0.05 })
        ),
        Err(Error::LengthMismatch { what: "positives", .. })
    ));
}

#[test]
fn uskd_l6b() {
    use smax::loss::{UskdOptions, UskdRanking, uskd_loss};
    let zs = [2.0, 1.0, 0.1, -1.0, 0.2, 0.1, 1.5, 0.3];
    let w = [1.0, 0.0, 0.5, -0.5, 0.0, 0.3, 0.9, 0.1];
    let y = [0i64, 2];
    for (ranking, lnt, total) in [
        (UskdRanking::PaperProb, 1.1444038150178604, 0.6391546536018141),
        (UskdRanking::CodeLogProb, 1.129019199633245, 0.6376161920633526),
    ] {
        let p = UskdOptions { ranking, ..Default::default() };
        let r = uskd_loss(View::rows(&zs, 2, 4).unwrap(), View::rows(&w, 2, 4).unwrap(), &y, None, None, &p).unwrap();
        close(r.target, 0.5202211018651132, 1e-14, "L_t");
        close(r.non_target, lnt, 1e-14, "L_nt");
        close(r.weak, 0.004493170234914948, 1e-14, "L_weak");
        close(r.total, total, 1e-14, "total");
    }
    // Gradients by finite differences. Weak head: exact.
    let p = UskdOptions::default();
    let fw = |wv: &[f64], g: Option<&mut [f64]>| {
        uskd_loss(
            View::rows(&zs, 2, 4).unwrap(),
            View::rows(wv, 2, 4).unwrap(),
            &y,
            None,
            g.map(|g| ViewMut::rows(g, 2, 4).unwrap()),
            &p,
        )
        .unwrap()
        .weak
    };
    fd_check(&w, 2, 4, &fw, "uskd weak");
    // Student, batch of two with α = 0: the non-target term alone (ranks are locally constant,
    // so its gradient is exact).
    let p0 = UskdOptions { alpha: 0.0, ..p };
    let fs = |z: &[f64], g: Option<&mut [f64]>| {
        let r = uskd_loss(
            View::rows(z, 2, 4).unwrap(),
            View::rows(&w, 2, 4).unwrap(),
            &y,
            g.map(|g| ViewMut::rows(g, 2, 4).unwrap()),
            None,
            &p0,
        )
        .unwrap();
        r.total - r.weak
    };
    fd_check(&zs, 2, 4, &fs, "uskd non-target");
    // Student, one row with α = 1: there p_t = S_t² + 1 − S_t² = 1 exactly, so the detached
    // soft target does not hide any dependence and the whole gradient is checkable.
    let fs1 = |z: &[f64], g: Option<&mut [f64]>| {
        let r = uskd_loss(
            View::rows(z, 1, 4).unwrap(),
            View::rows(&w[..4], 1, 4).unwrap(),
            &y[..1],
            g.map(|g| ViewMut::rows(g, 1, 4).unwrap()),
            None,
            &p,
        )
        .unwrap();
        r.total - r.weak
    };
    fd_check(&zs[..4], 1, 4, &fs1, "uskd one row");
    assert!(matches!(
        uskd_loss(View::rows(&zs, 2, 4).unwrap(), View::rows(&w, 2, 4).unwrap(), &[0, 4], None, None, &p),
        Err(Error::TargetOutOfRange { .. })
    ));
}

#[test]
fn every_family_loss_is_thread_count_deterministic() {
    let mut rng = Rng(77);
    let (n, k) = (300, 64);
    let x = rng.vec(n * k, 3.0);
    let xt = rng.vec(n * k, 3.0);
    let t: Vec<i64> = (0..n).map(|i| if i % 9 == 0 { -100 } else { (i * 7 % k) as i64 }).collect();
    let taus: Vec<f64> = (0..n).map(|i| 0.5 + (i % 10) as f64 * 0.3).collect();
    let pos: Vec<bool> = (0..n * k).map(|i| i % 17 == 0).collect();
    type Run<'a> = Box<dyn Fn(&LossOptions, &mut [f64]) -> f64 + Sync + 'a>;
    let v = || View::rows(&x, n, k).unwrap();
    let vt = || View::rows(&xt, n, k).unwrap();
    let runs: Vec<(&str, Run)> = vec![
        (
            "comp_sum",
            Box::new(|o, gb| {
                comp_sum_loss(
                    v(),
                    &t,
                    Some(ViewMut::rows(gb, n, k).unwrap()),
                    None,
                    &(*o).with_params(smax::loss::CompSum { tau: 1.7 }),
                )
                .unwrap()
                .loss
            }),
        ),
        (
            "spherical",
            Box::new(|o, gb| {
                spherical_z_loss(
                    v(),
                    &t,
                    Some(ViewMut::rows(gb, n, k).unwrap()),
                    None,
                    &(*o).with_params(smax::loss::SphericalZ { a: 1.0, b: 0.5 }),
                )
                .unwrap()
                .loss
            }),
        ),
        (
            "nkd",
            Box::new(|o, gb| {
                nkd_loss(
                    v(),
                    vt(),
                    &t,
                    Some(ViewMut::rows(gb, n, k).unwrap()),
                    None,
                    &(*o).with_params(smax::loss::Nkd { temperature: 2.0, gamma: 1.5 }),
                )
                .unwrap()
                .loss
            }),
        ),
        (
            "hinton",
            Box::new(|o, gb| {
                hinton_kd_loss(
                    v(),
                    vt(),
                    Some(ViewMut::rows(gb, n, k).unwrap()),
                    None,
                    &(*o).with_params(smax::loss::HintonKd { temperature: 4.0 }),
                )
                .unwrap()
                .loss
            }),
        ),
        (
            "decoupled",
            Box::new(|o, gb| {
                decoupled_softmax_loss(
                    v(),
                    &pos,
                    Some(ViewMut::rows(gb, n, k).unwrap()),
                    None,
                    &(*o).with_params(smax::loss::Decoupled { temperature: 0.05 }),
                )
                .unwrap()
                .loss
            }),
        ),
        (
            "tempnet",
            Box::new(|o, gb| {
                tempnet_loss(
                    v(),
                    &t,
                    &taus,
                    Some(ViewMut::rows(gb, n, k).unwrap()),
                    None,
                    None,
                    &(*o).with_params(smax::loss::TempNet { rho: 1.0 }),
                )
                .unwrap()
                .loss
            }),
        ),
    ];
    for (name, f) in &runs {
        let mut gs = vec![0.0; n * k];
        let base = f(&LossOptions { exec: smax::Exec::SEQ, ..Default::default() }, &mut gs);
        for threads in [2, 3] {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            let mut gp = vec![0.0; n * k];
            let l = pool.install(|| f(&LossOptions::default(), &mut gp));
            assert_eq!(l.to_bits(), base.to_bits(), "{name} {threads} threads");
            assert!(gp.iter().zip(&gs).all(|(a, b)| a.to_bits() == b.to_bits()), "{name} grad {threads} threads");
        }
    }
}

#[test]
fn uskd_ranking_of_a_confident_student_does_not_depend_on_class_order() {
    // Issue "No panic", class 6: with the target's margin past about 37, `1 − S_t` rounded to
    // 0, every score became +inf and the ranking fell back to the class order, so permuting the
    // non-target classes changed the loss.
    use smax::loss::{UskdOptions, UskdRanking, uskd_loss};
    let z = [45.0f64, 0.0, 1.5, 3.0, -2.0];
    let w = [45.0f64, 0.2, -1.0, 2.5, 0.7];
    let perm = [0usize, 3, 1, 4, 2]; // class j of the permuted row is class perm[j] of the original
    let zp: Vec<f64> = perm.iter().map(|&j| z[j]).collect();
    let wp: Vec<f64> = perm.iter().map(|&j| w[j]).collect();
    for ranking in [UskdRanking::PaperProb, UskdRanking::CodeLogProb] {
        let p = UskdOptions { ranking, ..Default::default() };
        let run = |z: &[f64], w: &[f64]| {
            uskd_loss(View::rows(z, 1, 5).unwrap(), View::rows(w, 1, 5).unwrap(), &[0], None, None, &p).unwrap()
        };
        let (a, b) = (run(&z, &w), run(&zp, &wp));
        assert!(a.non_target.is_finite(), "{ranking:?}: {a:?}");
        close(b.non_target, a.non_target, 1e-12, "L_nt under a permutation of the non-target classes");
        close(b.total, a.total, 1e-12, "total under a permutation of the non-target classes");
    }
}

/// ⊥Grad's definition in plain f64.
fn ortho_reference(w: &[f64], g: &[f64], renormalize: bool) -> Vec<f64> {
    let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
    let c = dot(w, g) / (dot(w, w) + 1e-30);
    let p: Vec<f64> = g.iter().zip(w).map(|(gi, wi)| gi - c * wi).collect();
    let s = if renormalize { dot(g, g).sqrt() / (dot(&p, &p).sqrt() + 1e-30) } else { 1.0 };
    p.iter().map(|v| v * s).collect()
}

#[test]
fn orthogonal_gradient_matches_its_definition_and_edge_cases() {
    use smax::loss::{OrthoGradOptions, orthogonal_gradient};
    let w: Vec<f64> = (0..257).map(|i| ((i * 37 % 101) as f64 - 50.0) / 17.0).collect();
    let g: Vec<f64> = (0..257).map(|i| ((i * 53 % 89) as f64 - 44.0) / 9.0 + w[i] * 0.7).collect();
    for renormalize in [true, false] {
        let o = OrthoGradOptions::default().renormalize(renormalize);
        let want = ortho_reference(&w, &g, renormalize);
        let mut got = g.clone();
        orthogonal_gradient(&w, &mut got, &o).unwrap();
        for (a, b) in got.iter().zip(&want) {
            assert!((a - b).abs() <= 1e-12 * b.abs().max(1.0), "{a} vs {b}");
        }
        // Orthogonal to w; with renormalize, as long as g.
        let wg: f64 = got.iter().zip(&w).map(|(a, b)| a * b).sum();
        assert!(wg.abs() <= 1e-9, "w·g⊥ = {wg}");
        if renormalize {
            let n = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
            assert!((n(&got) - n(&g)).abs() <= 1e-12 * n(&g));
        }
        // f32 against the same reference, rounded once.
        let (w32, mut g32): (Vec<f32>, Vec<f32>) =
            (w.iter().map(|&v| v as f32).collect(), g.iter().map(|&v| v as f32).collect());
        let want32 = ortho_reference(
            &w32.iter().map(|&v| v as f64).collect::<Vec<_>>(),
            &g32.iter().map(|&v| v as f64).collect::<Vec<_>>(),
            renormalize,
        );
        orthogonal_gradient(&w32, &mut g32, &o).unwrap();
        for (a, b) in g32.iter().zip(&want32) {
            assert!((*a as f64 - b).abs() <= 2f64.powi(-24) * b.abs().max(1e-30) * 1.01, "{a} vs {b}");
        }
    }
    // w = 0: the plain gradient; g = 0 stays 0; g parallel to w vanishes; lengths must agree.
    let o = OrthoGradOptions::default();
    let mut g2 = vec![1.0f64, -2.0, 3.0];
    orthogonal_gradient(&[0.0, 0.0, 0.0], &mut g2, &o).unwrap();
    assert_eq!(g2, [1.0, -2.0, 3.0]);
    let mut z = vec![0.0f64; 3];
    orthogonal_gradient(&[1.0, 2.0, 3.0], &mut z, &o).unwrap();
    assert_eq!(z, [0.0; 3]);
    let mut par = vec![2.0f64, 4.0, 6.0];
    orthogonal_gradient(&[1.0, 2.0, 3.0], &mut par, &o).unwrap();
    assert!(par.iter().all(|v| v.abs() <= 1e-15), "{par:?}");
    assert!(orthogonal_gradient(&[1.0f32, 2.0], &mut [1.0f32], &o).is_err());
}

#[test]
fn normalized_softmax_zero_vectors_have_zero_gradient() {
    // x row 0 is zero, class 1's weight is zero: their gradients are 0, not ~1e12; the other
    // entries are unchanged by the zero vectors' presence (checked against finite differences).
    let x = [0.0, 0.0, 1.0, -2.0];
    let w = [1.0, 0.5, 0.0, 0.0, -1.0, 1.0];
    let (mut dx, mut dw) = ([0.0f64; 4], [0.0f64; 6]);
    let o = LossOptions::default().with_params(smax::loss::NormalizedSoftmax { temperature: 0.5 });
    let grads = CosineGrads { dx: Some(&mut dx), dw: Some(&mut dw) };
    normalized_softmax_loss(&x, &w, 2, &[0, 2], grads, &o).unwrap();
    assert_eq!(&dx[..2], &[0.0, 0.0]);
    assert_eq!(&dw[2..4], &[0.0, 0.0]);
    let loss =
        |x: &[f64], w: &[f64]| normalized_softmax_loss(x, w, 2, &[0, 2], CosineGrads::default(), &o).unwrap().loss;
    let h = 1e-6;
    for d in 2..4 {
        let (mut xp, mut xm) = (x, x);
        xp[d] += h;
        xm[d] -= h;
        let fd = (loss(&xp, &w) - loss(&xm, &w)) / (2.0 * h);
        assert!((dx[d] - fd).abs() <= 1e-7, "dx[{d}] {} vs {fd}", dx[d]);
    }
    for d in [0usize, 1, 4, 5] {
        let (mut wp, mut wm) = (w, w);
        wp[d] += h;
        wm[d] -= h;
        let fd = (loss(&x, &wp) - loss(&x, &wm)) / (2.0 * h);
        assert!((dw[d] - fd).abs() <= 1e-7, "dw[{d}] {} vs {fd}", dw[d]);
    }
}
