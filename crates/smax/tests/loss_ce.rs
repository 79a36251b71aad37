//! Cross-entropy over given logits against an f64 reference written from the formulas of
//! ALGORITHMS.md L1/L2 (PyTorch semantics), every option combination, every SIMD level.

mod common;

use common::{Rng, fsum};
use smax::loss::{AllIgnored, CrossEntropyOptions, LossReport, Reduction, RowOutputs, Targets, cross_entropy};
use smax::{Element, Error, Par, SimdLevel, View, ViewMut, bf16};

/// One configuration of the reference.
#[derive(Clone, Copy, Debug)]
struct Cfg<'a> {
    red: Reduction,
    weights: Option<&'a [f32]>,
    eps: f64,
    lambda: f64,
    cap: Option<f64>,
    tau: f64,
    ignore: i64,
}

enum Tg<'a> {
    Cls(&'a [i64]),
    Probs(&'a [f64]),
}

struct Ref {
    rows: Vec<(f64, f64, f64)>, // loss, z, lse
    grad: Vec<f64>,
    /// Per-entry gradient tolerance scale (what the entry is a difference of).
    mag: Vec<f64>,
    loss: f64,
    z: f64,
    max_t: f64,
}

fn t_of(c: &Cfg, v: f64) -> f64 {
    match c.cap {
        Some(cap) if v != f64::NEG_INFINITY => cap * (v / cap).tanh() / c.tau,
        _ => v / c.tau,
    }
}

fn dt_of(c: &Cfg, v: f64) -> f64 {
    match c.cap {
        Some(_) if v == f64::NEG_INFINITY => 0.0,
        Some(cap) => (1.0 - (v / cap).tanh().powi(2)) / c.tau,
        None => 1.0 / c.tau,
    }
}

/// The reference, straight from the formulas: `u` is the target mass per class (PyTorch:
/// `(1 − ε)·w_y·onehot + ε/K·w`, or `w ⊙ ((1 − ε)q + ε/K)`), `ℓ = Σ u_k(lse − t_k)`,
/// `∂ℓ/∂t = s·(U p − u) + s_z·2λ·lse·p`.
fn reference(x: &[f64], k: usize, tg: &Tg, c: &Cfg) -> Ref {
    let n = x.len() / k;
    let w = |i: usize| c.weights.map_or(1.0, |w| w[i] as f64);
    let valid: Vec<bool> = (0..n).map(|r| !matches!(tg, Tg::Cls(y) if y[r] == c.ignore)).collect();
    let nvalid = valid.iter().filter(|v| **v).count() as f64;
    let den = match (c.red, tg) {
        (Reduction::Mean, Tg::Cls(y)) => fsum((0..n).filter(|&r| valid[r]).map(|r| w(y[r] as usize))),
        (Reduction::Mean, Tg::Probs(_)) => n as f64,
        _ => 1.0,
    };
    let zden = if c.red == Reduction::Mean { nvalid } else { 1.0 };
    let s = if den > 0.0 { 1.0 / den } else { 0.0 };
    let sz = if zden > 0.0 { 1.0 / zden } else { 0.0 };
    let mut out = Ref { rows: vec![], grad: vec![0.0; n * k], mag: vec![0.0; n * k], loss: 0.0, z: 0.0, max_t: 0.0 };
    for r in 0..n {
        let xr = &x[r * k..(r + 1) * k];
        let t: Vec<f64> = xr.iter().map(|&v| t_of(c, v)).collect();
        out.max_t = t.iter().filter(|v| v.is_finite()).fold(out.max_t, |a, v| a.max(v.abs()));
        let m = t.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        // Shifted by the max throughout: `lse − t_i = ln d − (t_i − m)`, and `p_i` from the
        // shifted logit, so `ln d` is not lost in a large `lse`.
        let ld = fsum(t.iter().map(|&v| (v - m).exp())).ln();
        let lse = m + ld;
        if !valid[r] {
            out.rows.push((0.0, 0.0, lse));
            continue;
        }
        let u: Vec<f64> = match tg {
            Tg::Cls(y) => (0..k)
                .map(|i| c.eps / k as f64 * w(i) + if i == y[r] as usize { (1.0 - c.eps) * w(i) } else { 0.0 })
                .collect(),
            Tg::Probs(q) => (0..k).map(|i| w(i) * ((1.0 - c.eps) * q[r * k + i] + c.eps / k as f64)).collect(),
        };
        let big_u = fsum(u.iter().copied());
        let loss = fsum((0..k).filter(|&i| u[i] != 0.0).map(|i| u[i] * (ld - (t[i] - m))));
        let z = c.lambda * lse * lse;
        out.rows.push((loss, z, lse));
        let a = s * big_u + sz * 2.0 * c.lambda * lse;
        for i in 0..k {
            let p = ((t[i] - m) - ld).exp();
            out.grad[r * k + i] = (a * p - s * u[i]) * dt_of(c, xr[i]);
            // With a cap, the chain factor 1 − tanh² is formed from the capped value, so its
            // relative error grows as 1/(1 − tanh²) (documented on `cross_entropy`).
            let cond = match c.cap {
                Some(cap) if xr[i].is_finite() => 1.0 / (1.0 - (xr[i] / cap).tanh().powi(2)),
                _ => 1.0,
            };
            out.mag[r * k + i] = (a.abs() * p + s * u[i].abs()) * dt_of(c, xr[i]).abs() * cond;
        }
    }
    let lsum = fsum(out.rows.iter().map(|r| r.0));
    let zsum = fsum(out.rows.iter().map(|r| r.1));
    (out.loss, out.z) = match c.red {
        Reduction::Mean if den > 0.0 => (lsum / den, if zden > 0.0 { zsum / zden } else { 0.0 }),
        Reduction::Mean => (0.0, 0.0),
        _ => (lsum, zsum),
    };
    out
}

fn opts<'a>(c: &Cfg<'a>) -> CrossEntropyOptions<'a> {
    let mut o = CrossEntropyOptions::default()
        .reduction(c.red)
        .label_smoothing(c.eps)
        .z_loss(c.lambda)
        .temperature(c.tau)
        .ignore_index(c.ignore);
    if let Some(w) = c.weights {
        o = o.class_weights(w);
    }
    if let Some(cap) = c.cap {
        o = o.softcap(cap);
    }
    o
}

struct Got {
    res: LossReport,
    rows: Vec<(f64, f64, f64)>,
    grad: Vec<f64>,
}

fn run<T: Element>(x: &[f64], k: usize, tg: &Tg, o: &CrossEntropyOptions) -> Got {
    let n = x.len() / k;
    let xt: Vec<T> = x.iter().map(|&v| T::from_f64(v)).collect();
    let qt: Vec<T>;
    let targets = match tg {
        Tg::Cls(y) => Targets::Classes(y),
        Tg::Probs(q) => {
            qt = q.iter().map(|&v| T::from_f64(v)).collect();
            Targets::Probs(View::rows(&qt, n, k).unwrap())
        }
    };
    let mut g = vec![T::default(); n * k];
    let (mut l, mut z, mut s) = (vec![0.0; n], vec![0.0; n], vec![0.0; n]);
    let res = cross_entropy(
        View::rows(&xt, n, k).unwrap(),
        targets,
        Some(ViewMut::rows(&mut g, n, k).unwrap()),
        RowOutputs { loss: Some(&mut l), z_loss: Some(&mut z), lse: Some(&mut s) },
        o,
    )
    .unwrap();
    Got {
        res,
        rows: l.into_iter().zip(z).zip(s).map(|((a, b), c)| (a, b, c)).collect(),
        grad: g.iter().map(|v| v.to_f64()).collect(),
    }
}

/// Compares against the reference: per-row values to `rel` of their size (plus the error
/// that rounding `t` to f32 induces: `rel·U·max|t|`), gradient entries to `rel` of the terms
/// they are a difference of.
fn check(got: &Got, want: &Ref, rel: f64, what: &str) {
    let tol = |v: f64, mass: f64| rel * (v.abs() + mass * (1.0 + want.max_t)) + 1e-300;
    for (r, (g, w)) in got.rows.iter().zip(&want.rows).enumerate() {
        assert!((g.0 - w.0).abs() <= tol(w.0, 1.0), "{what}: row {r} loss {} vs {}", g.0, w.0);
        assert!((g.1 - w.1).abs() <= tol(w.1, w.1.abs().sqrt()), "{what}: row {r} z {} vs {}", g.1, w.1);
        if w.2.is_finite() {
            assert!((g.2 - w.2).abs() <= tol(w.2, 1.0), "{what}: row {r} lse {} vs {}", g.2, w.2);
        }
    }
    assert!((got.res.loss - want.loss).abs() <= tol(want.loss, 1.0), "{what}: loss {} vs {}", got.res.loss, want.loss);
    assert!((got.res.z_loss - want.z).abs() <= tol(want.z, 1.0), "{what}: z {} vs {}", got.res.z_loss, want.z);
    for (i, ((g, w), m)) in got.grad.iter().zip(&want.grad).zip(&want.mag).enumerate() {
        let t = rel * m * (1.0 + want.max_t) + 1e-30;
        assert!((g - w).abs() <= t, "{what}: grad[{i}] {g} vs {w} (tol {t})");
    }
}

fn targets_for(rng: &mut Rng, n: usize, k: usize, ignore: bool) -> Vec<i64> {
    (0..n).map(|r| if ignore && r % 3 == 1 { -100 } else { (rng.next_u64() % k as u64) as i64 }).collect()
}

fn probs_for(rng: &mut Rng, n: usize, k: usize) -> Vec<f64> {
    let mut q = vec![0.0; n * k];
    for r in 0..n {
        let e: Vec<f64> = (0..k).map(|_| (2.0 * rng.uniform()).exp()).collect();
        let s: f64 = e.iter().sum();
        for i in 0..k {
            q[r * k + i] = e[i] / s;
        }
    }
    q
}

#[test]
fn every_option_combination_f32_f64() {
    let mut rng = Rng(0x5eed_0003);
    for &k in &[1usize, 7, 33, 257, 1030] {
        let n = 5;
        let x: Vec<f64> = rng.vec(n * k, 6.0).iter().map(|&v| v as f32 as f64).collect();
        let wv: Vec<f32> = (0..k).map(|i| 0.25 + (i % 5) as f32 * 0.5).collect();
        let cls = targets_for(&mut rng, n, k, true);
        let q: Vec<f64> = probs_for(&mut rng, n, k).iter().map(|&v| v as f32 as f64).collect();
        for red in [Reduction::None, Reduction::Sum, Reduction::Mean] {
            for weights in [None, Some(&wv[..])] {
                for eps in [0.0, 0.1] {
                    for lambda in [0.0, 1e-2] {
                        for cap in [None, Some(3.0)] {
                            for tau in [1.0, 0.7] {
                                for soft in [false, true] {
                                    let c = Cfg { red, weights, eps, lambda, cap, tau, ignore: -100 };
                                    let tg = if soft { Tg::Probs(&q) } else { Tg::Cls(&cls) };
                                    let want = reference(&x, k, &tg, &c);
                                    let o = opts(&c);
                                    let what = format!("{c:?} soft={soft} k={k}");
                                    check(&run::<f64>(&x, k, &tg, &o), &want, 1e-12, &format!("f64 {what}"));
                                    for level in SimdLevel::available() {
                                        let o = o.simd(level);
                                        check(
                                            &run::<f32>(&x, k, &tg, &o),
                                            &want,
                                            5e-7,
                                            &format!("f32 {level:?} {what}"),
                                        );
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn every_tail_length_every_level() {
    let mut rng = Rng(7);
    let mut lens: Vec<usize> = (1..70).collect();
    lens.extend([255, 256, 257, 1023, 1024, 1025, 2049, 4097, 70001]);
    for &k in &lens {
        let n = 3;
        let x: Vec<f64> = rng.vec(n * k, 20.0).iter().map(|&v| v as f32 as f64).collect();
        let cls = targets_for(&mut rng, n, k, false);
        let c = Cfg { red: Reduction::Mean, weights: None, eps: 0.0, lambda: 0.0, cap: None, tau: 1.0, ignore: -100 };
        let want = reference(&x, k, &Tg::Cls(&cls), &c);
        for level in SimdLevel::available() {
            let o = opts(&c).simd(level);
            check(&run::<f32>(&x, k, &Tg::Cls(&cls), &o), &want, 5e-7, &format!("{level:?} k={k}"));
        }
        let c2 = Cfg { eps: 0.1, cap: Some(10.0), ..c };
        let want = reference(&x, k, &Tg::Cls(&cls), &c2);
        let o = opts(&c2);
        check(&run::<f32>(&x, k, &Tg::Cls(&cls), &o), &want, 5e-7, &format!("smooth+cap k={k}"));
    }
}

#[test]
fn half_types_accumulate_in_f32() {
    let mut rng = Rng(11);
    let (n, k) = (4, 1500);
    let x: Vec<f64> = rng.vec(n * k, 8.0).iter().map(|&v| bf16::from_f64(v).to_f64()).collect();
    let cls = targets_for(&mut rng, n, k, true);
    let c = Cfg { red: Reduction::Mean, weights: None, eps: 0.1, lambda: 1e-3, cap: None, tau: 1.0, ignore: -100 };
    let want = reference(&x, k, &Tg::Cls(&cls), &c);
    let got = run::<bf16>(&x, k, &Tg::Cls(&cls), &opts(&c));
    // The statistics are f32-exact; only the stored gradient is rounded to bf16 (2^-9).
    for (r, (g, w)) in got.rows.iter().zip(&want.rows).enumerate() {
        assert!((g.0 - w.0).abs() <= 2e-6 * (1.0 + w.0.abs() + want.max_t), "row {r}");
    }
    for ((g, w), m) in got.grad.iter().zip(&want.grad).zip(&want.mag) {
        assert!((g - w).abs() <= 2f64.powi(-8) * m + 1e-30, "{g} vs {w}");
    }
}

#[test]
fn gradient_matches_finite_differences_f64() {
    // The formula itself (not only the code) is checked: central differences of the f64 loss.
    let mut rng = Rng(99);
    let (n, k) = (3, 6);
    let x = rng.vec(n * k, 2.0);
    let wv: Vec<f32> = vec![1.0, 0.5, 2.0, 1.5, 0.75, 1.25];
    let cls = vec![2i64, -100, 5];
    let q = probs_for(&mut rng, n, k);
    for soft in [false, true] {
        for red in [Reduction::Sum, Reduction::Mean] {
            let c = Cfg { red, weights: Some(&wv), eps: 0.2, lambda: 0.05, cap: Some(1.5), tau: 0.8, ignore: -100 };
            let tg = if soft { Tg::Probs(&q) } else { Tg::Cls(&cls) };
            let o = opts(&c);
            let total = |x: &[f64]| {
                let g = run::<f64>(x, k, &tg, &o);
                g.res.loss + g.res.z_loss
            };
            let an = run::<f64>(&x, k, &tg, &o).grad;
            for i in 0..n * k {
                let h = 1e-6;
                let (mut a, mut b) = (x.clone(), x.clone());
                a[i] += h;
                b[i] -= h;
                let fd = (total(&a) - total(&b)) / (2.0 * h);
                assert!((fd - an[i]).abs() < 1e-8, "soft={soft} {red:?} [{i}] fd {fd} vs {}", an[i]);
            }
        }
    }
}

#[test]
fn worked_example_l1_and_l2() {
    let z = [2.0, 1.0, 0.1, 0.5, 2.5, -1.0, 1.0, 1.0, 1.0];
    let y = [0i64, 1, -100];
    let o = CrossEntropyOptions::default().label_smoothing(0.1);
    let mut g = vec![0.0f64; 9];
    let mut rows = vec![0.0; 3];
    let r = cross_entropy(
        View::rows(&z, 3, 3).unwrap(),
        Targets::Classes(&y),
        Some(ViewMut::rows(&mut g, 3, 3).unwrap()),
        RowOutputs { loss: Some(&mut rows), ..Default::default() },
        &o,
    )
    .unwrap();
    let close = |a: f64, b: f64, t: f64| assert!((a - b).abs() <= t, "{a} vs {b}");
    close(r.loss, 0.425104111700061, 1e-14);
    assert_eq!(r.valid_rows, 2);
    for (a, b) in rows.iter().zip([0.5136966829, 0.3365115405, 0.0]) {
        close(*a, b, 1e-10);
    }
    let want = [-0.1371660972, 0.1045498187, 0.0326162785, 0.0413906007, -0.0376782614, -0.0037123393, 0.0, 0.0, 0.0];
    for (a, b) in g.iter().zip(want) {
        close(*a, b, 1e-10);
    }
    // f32 at every level, and ε = 0.
    for level in SimdLevel::available() {
        let z32: Vec<f32> = z.iter().map(|&v| v as f32).collect();
        let mut rows = vec![0.0; 3];
        let r = cross_entropy(
            View::rows(&z32, 3, 3).unwrap(),
            Targets::Classes(&y),
            None,
            RowOutputs { loss: Some(&mut rows), ..Default::default() },
            &CrossEntropyOptions::default().simd(level),
        )
        .unwrap();
        close(r.loss, 0.285104111700061, 1e-6);
        close(rows[0], 0.4170300163, 1e-6);
        close(rows[1], 0.1531782071, 1e-6);
    }
    // L2: z-loss of [2, 1, 0.1] with λ = 1e-4, and its gradient (z-loss only: the CE part
    // is removed by comparing against λ = 0).
    let z1 = [2.0f64, 1.0, 0.1];
    let grad_with = |lambda: f64| {
        let mut g = vec![0.0f64; 3];
        let r = cross_entropy(
            View::rows(&z1, 1, 3).unwrap(),
            Targets::Classes(&[0]),
            Some(ViewMut::rows(&mut g, 1, 3).unwrap()),
            RowOutputs::default(),
            &CrossEntropyOptions::default().z_loss(lambda),
        )
        .unwrap();
        (r, g)
    };
    let (r, g1) = grad_with(1e-4);
    let (_, g0) = grad_with(0.0);
    close(r.z_loss, 0.0005842034099588026, 1e-16);
    for (i, w) in [3.1856510669e-04, 1.1719355343e-04, 4.7647343140e-05].iter().enumerate() {
        close(g1[i] - g0[i], *w, 1e-13);
    }
}

/// Rows longer than 64 Ki (plain f32, class targets, no smoothing or cap, with a gradient)
/// take the pipelined online path: checked against the reference with weights, z-loss, a
/// temperature and ignored rows, at every SIMD level and two tail lengths.
#[test]
fn long_rows_pipelined_match_the_reference() {
    let mut rng = Rng(0x5eed_0071);
    for &k in &[131073usize, 140013] {
        let n = 7;
        let x: Vec<f64> = rng.vec(n * k, 20.0).iter().map(|&v| v as f32 as f64).collect();
        let cls = targets_for(&mut rng, n, k, true);
        let w: Vec<f32> = (0..k).map(|_| (1.0 + 0.5 * rng.uniform()) as f32).collect();
        let plain =
            Cfg { red: Reduction::Sum, weights: None, eps: 0.0, lambda: 0.0, cap: None, tau: 1.0, ignore: -100 };
        let full = Cfg { red: Reduction::Mean, weights: Some(&w), lambda: 1e-3, tau: 0.7, ..plain };
        for (name, c) in [("plain", plain), ("weights+z+tau+mean", full)] {
            let want = reference(&x, k, &Tg::Cls(&cls), &c);
            for level in SimdLevel::available() {
                let o = opts(&c).simd(level);
                check(&run::<f32>(&x, k, &Tg::Cls(&cls), &o), &want, 5e-7, &format!("{level:?} k={k} {name}"));
            }
        }
    }
}

/// The pipelined paths give every row the bits it gets alone, whatever sits beside it:
/// special rows (NaN, +inf, all −inf) and ignored rows in the middle of the batch break the
/// pipeline and restart it; the row results, the gradient and the lse all match bit for bit.
/// Rows of 128 Ki + 300 take the online pipeline; 1030 rows of 8 Ki + 5 and 8200 rows of
/// 1 Ki + 3 (33 MB gradients, streamed) take the pipelined three-pass. Plain (z-loss) and with class weights, a
/// temperature and a gradient scale.
#[test]
fn pipelined_rows_are_each_row_alone() {
    rows_alone_case(131072 + 300, 9, 0x5eed_0072);
    rows_alone_case(8192 + 5, 1030, 0x5eed_0073);
    rows_alone_case(1024 + 3, 8200, 0x5eed_0074);
}

fn rows_alone_case(k: usize, n: usize, seed: u64) {
    let mut rng = Rng(seed);
    // f32 values (f64 holds them exactly; `run` converts back).
    let mut x: Vec<f64> = rng.vec(n * k, 8.0).iter().map(|&v| v as f32 as f64).collect();
    x[2 * k + 17] = f64::NAN;
    for v in &mut x[4 * k..5 * k] {
        *v = f64::NEG_INFINITY;
    }
    x[6 * k + 5] = f64::INFINITY;
    let mut cls = targets_for(&mut rng, n, k, false);
    cls[7] = -100;
    // Targets at the ends of their rows: in the plain-stored head or tail of a streamed
    // gradient row, as well as inside its streamed vectors.
    cls[0] = 0;
    cls[1] = (k - 1) as i64;
    cls[3] = 1;
    cls[8] = (k - 2) as i64;
    let w: Vec<f32> = (0..k).map(|_| (1.0 + 0.5 * rng.uniform()) as f32).collect();
    let plain = CrossEntropyOptions::default().reduction(Reduction::None).z_loss(1e-4);
    // (A sum, not a mean: a mean's per-row scale depends on the rows in the call.)
    let weighted =
        CrossEntropyOptions::default().reduction(Reduction::Sum).class_weights(&w).temperature(0.7).grad_scale(0.25);
    for (level, o) in SimdLevel::available().into_iter().flat_map(|l| [(l, plain), (l, weighted)]) {
        let o = o.simd(level);
        let all = run::<f32>(&x, k, &Tg::Cls(&cls), &o);
        for r in (0..9).chain([n / 2, n - 1]) {
            let one = run::<f32>(&x[r * k..(r + 1) * k], k, &Tg::Cls(&cls[r..r + 1]), &o);
            let what = format!("{level:?} k={k} row {r}");
            let (a, b) = (all.rows[r], one.rows[0]);
            assert_eq!(a.0.to_bits(), b.0.to_bits(), "{what}: loss");
            assert_eq!(a.1.to_bits(), b.1.to_bits(), "{what}: z");
            assert_eq!(a.2.to_bits(), b.2.to_bits(), "{what}: lse");
            let same = all.grad[r * k..(r + 1) * k].iter().zip(&one.grad).all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "{what}: gradient");
        }
        let (g, l, s): (&[f64], Vec<f64>, Vec<f64>) =
            (&all.grad, all.rows.iter().map(|r| r.0).collect(), all.rows.iter().map(|r| r.2).collect());
        // The special rows follow the rules of the short path.
        assert!(l[2].is_nan() && s[2].is_nan(), "NaN row");
        assert!(l[4] == f64::INFINITY && s[4] == f64::NEG_INFINITY, "all -inf row");
        assert!(g[4 * k..5 * k].iter().all(|&v| v == 0.0));
        assert!(s[6] == f64::INFINITY, "+inf row");
        assert!(l[7] == 0.0 && g[7 * k..8 * k].iter().all(|&v| v == 0.0), "ignored row");
        assert!(s[7].is_finite(), "ignored row keeps its lse");
    }
}

#[test]
fn edge_cases() {
    let o = CrossEntropyOptions::default().reduction(Reduction::None);
    let one = |x: &[f32], y: i64, o: &CrossEntropyOptions| {
        let mut g = vec![0.0f32; x.len()];
        let mut l = [0.0f64];
        let mut s = [0.0f64];
        let r = cross_entropy(
            View::rows(x, 1, x.len()).unwrap(),
            Targets::Classes(&[y]),
            Some(ViewMut::rows(&mut g, 1, x.len()).unwrap()),
            RowOutputs { loss: Some(&mut l), lse: Some(&mut s), ..Default::default() },
            o,
        )
        .unwrap();
        (r, l[0], s[0], g)
    };
    let ninf = f32::NEG_INFINITY;
    for level in SimdLevel::available() {
        let o = o.simd(level);
        // -inf at non-target positions: finite loss, zero gradient there.
        let (_, l, _, g) = one(&[1.0, ninf, 0.0, ninf], 0, &o);
        assert!((l - (1.0f64 + (-1.0f64).exp()).ln()).abs() < 1e-6);
        assert_eq!((g[1], g[3]), (0.0, 0.0));
        // Target at a -inf logit: +inf loss, finite gradient p − onehot.
        let (_, l, _, g) = one(&[1.0, ninf, 0.0], 1, &o);
        assert_eq!(l, f64::INFINITY);
        assert_eq!(g[1], -1.0);
        assert!(g.iter().all(|v| v.is_finite()));
        // Every logit -inf: +inf loss, lse -inf, zero gradient.
        let (_, l, s, g) = one(&[ninf; 5], 2, &o);
        assert_eq!((l, s), (f64::INFINITY, f64::NEG_INFINITY));
        assert!(g.iter().all(|&v| v == 0.0));
        // NaN anywhere: NaN loss and gradient.
        let (r, l, _, g) = one(&[1.0, f32::NAN, 0.0], 0, &o);
        assert!(l.is_nan() && r.loss.is_nan() && g.iter().all(|v| v.is_nan()));
        // +inf without a cap: NaN (softmax is NaN); with a cap: the limit c.
        let (_, l, s, _) = one(&[1.0, f32::INFINITY, 0.0], 0, &o);
        assert!(l.is_nan() && s == f64::INFINITY);
        let (_, l, _, g) = one(&[1.0, f32::INFINITY, 0.0], 1, &o.softcap(5.0));
        let want = (1.0f64 + (5.0 * (0.2f64).tanh() - 5.0).exp() + (-5.0f64).exp()).ln();
        assert!((l - want).abs() < 1e-5, "{l} vs {want}");
        assert!(g.iter().all(|v| v.is_finite()));
        // Masked classes stay masked under the cap.
        let (_, l, _, g) = one(&[1.0, ninf, 0.0], 0, &o.softcap(5.0));
        let t1 = 5.0 * (0.2f64).tanh();
        assert!((l - (1.0 + (-t1).exp()).ln()).abs() < 1e-6);
        assert_eq!(g[1], 0.0);
        // Huge magnitudes: no overflow (the loss is exact in f64: 3e38 − (−3e38)).
        let (_, l, _, _) = one(&[3e38, -3e38, 1e38], 1, &o);
        assert!((l - 6e38).abs() < 1e33, "{l}");
        let (_, l, _, _) = one(&[3e38, -3e38, 1e38], 0, &o);
        assert_eq!(l, 0.0);
        // Denormal logits behave like zeros.
        let (_, l, _, _) = one(&[1e-40, -1e-41, 0.0], 0, &o);
        assert!((l - 3f64.ln()).abs() < 1e-6);
    }
    // A single class: loss 0, gradient 0.
    let (_, l, _, g) = one(&[4.0], 0, &o);
    assert_eq!((l, g[0]), (0.0, 0.0));
}

#[test]
fn all_ignored_and_empty_batches() {
    let x = [1.0f32, 2.0, 3.0, 4.0];
    let y = [-100i64, -100];
    let mut g = vec![1.0f32; 4];
    let r = cross_entropy(
        View::rows(&x, 2, 2).unwrap(),
        Targets::Classes(&y),
        Some(ViewMut::rows(&mut g, 2, 2).unwrap()),
        RowOutputs::default(),
        &CrossEntropyOptions::default().z_loss(1e-4),
    )
    .unwrap();
    assert_eq!((r.loss, r.z_loss, r.valid_rows), (0.0, 0.0, 0));
    assert!(g.iter().all(|&v| v == 0.0));
    let r = cross_entropy(
        View::rows(&x, 2, 2).unwrap(),
        Targets::Classes(&y),
        None,
        RowOutputs::default(),
        &CrossEntropyOptions::default().all_ignored(AllIgnored::Nan),
    )
    .unwrap();
    assert!(r.loss.is_nan());
    // No rows at all.
    let r = cross_entropy(
        View::rows(&x[..0], 0, 2).unwrap(),
        Targets::Classes(&[]),
        None,
        RowOutputs::default(),
        &CrossEntropyOptions::default(),
    )
    .unwrap();
    assert_eq!((r.loss, r.valid_rows), (0.0, 0));
    // Custom ignore index.
    let r = cross_entropy(
        View::rows(&x, 2, 2).unwrap(),
        Targets::Classes(&[1, 7]),
        None,
        RowOutputs::default(),
        &CrossEntropyOptions::default().ignore_index(7),
    )
    .unwrap();
    assert_eq!(r.valid_rows, 1);
    assert!((r.loss - (1.0f64 + (-1.0f64).exp()).ln()).abs() < 1e-6);
}

#[test]
fn zero_class_weight_mean_reports_the_z_loss_its_gradient_carries() {
    // Issue "No panic", class 6: rows that count but weigh 0 in total. The main loss has no
    // weighted mean (0, as for all-ignored rows, and no main gradient); the z-loss is a mean
    // over the rows that count, so the report must give it, as the gradient does.
    let x = [1.0f32, 2.0, 3.0, 0.5];
    let w = [0.0f32, 1.0];
    let (lambda, mut g, mut z_rows) = (0.01, vec![0.0f32; 4], vec![0.0f64; 2]);
    let r = cross_entropy(
        View::rows(&x, 2, 2).unwrap(),
        Targets::Classes(&[0, 0]),
        Some(ViewMut::rows(&mut g, 2, 2).unwrap()),
        RowOutputs { z_loss: Some(&mut z_rows), ..Default::default() },
        &CrossEntropyOptions { class_weights: Some(&w), ..Default::default() }.z_loss(lambda),
    )
    .unwrap();
    assert_eq!((r.loss, r.valid_rows, r.denominator), (0.0, 2, 0.0));
    let lse = |a: f64, b: f64| a.max(b) + (-(a - b).abs()).exp().ln_1p();
    let want = lambda * (lse(1.0, 2.0).powi(2) + lse(3.0, 0.5).powi(2)) / 2.0;
    assert!((r.z_loss - want).abs() < 1e-6 * want, "{} vs {want}", r.z_loss);
    assert!((z_rows.iter().sum::<f64>() / 2.0 - r.z_loss).abs() < 1e-12);
    // The gradient is the z-loss's alone: 2λ·lse·p / 2 rows, which sums to λ·lse per row.
    let g0 = g[0] as f64 + g[1] as f64;
    assert!((g0 - lambda * lse(1.0, 2.0)).abs() < 1e-6, "{g0}");
}

#[test]
fn bad_input_is_a_typed_error() {
    let x = [0.0f32; 6];
    let v = || View::rows(&x, 2, 3).unwrap();
    let ce = |t: Targets<f32>, o: &CrossEntropyOptions| cross_entropy(v(), t, None, RowOutputs::default(), o);
    let d = CrossEntropyOptions::default();
    assert!(matches!(
        ce(Targets::Classes(&[0, 3]), &d),
        Err(Error::TargetOutOfRange { row: 1, target: 3, classes: 3 })
    ));
    assert!(matches!(ce(Targets::Classes(&[0, -1]), &d), Err(Error::TargetOutOfRange { .. })));
    assert!(matches!(ce(Targets::Classes(&[0]), &d), Err(Error::LengthMismatch { what: "targets", .. })));
    let w = [1.0f32; 2];
    assert!(matches!(
        ce(Targets::Classes(&[0, 0]), &d.class_weights(&w)),
        Err(Error::LengthMismatch { what: "class_weights", .. })
    ));
    let wn = [1.0f32, -1.0, 1.0];
    for (o, name) in [
        (d.class_weights(&wn), "class_weights"),
        (d.temperature(0.0), "temperature"),
        (d.temperature(f64::NAN), "temperature"),
        // 1/τ = 1e39 overflows f32: every scaled logit would be ±inf (loss +inf, gradient 0).
        (d.temperature(1e-39), "temperature"),
        (d.label_smoothing(1.5), "label_smoothing"),
        (d.z_loss(-1.0), "z_loss"),
        (d.softcap(0.0), "softcap"),
        (d.grad_scale(f64::INFINITY), "grad_scale"),
    ] {
        match ce(Targets::Classes(&[0, 0]), &o) {
            Err(Error::BadParameter { name: n, .. }) => assert_eq!(n, name),
            other => panic!("{name}: {other:?}"),
        }
    }
    // f64 logits compute in f64, where 1/τ = 1e39 is an ordinary number.
    let x64: Vec<f64> = x.iter().map(|&v| v as f64 * 1e-39).collect();
    let r = cross_entropy(
        View::rows(&x64, 2, 3).unwrap(),
        Targets::Classes(&[0, 0]),
        None,
        RowOutputs::default(),
        &d.temperature(1e-39),
    );
    assert!(r.unwrap().loss.is_finite());
    let q = [0.0f32; 4];
    assert!(matches!(
        ce(Targets::Probs(View::rows(&q, 2, 2).unwrap()), &d),
        Err(Error::ShapeMismatch { what: "targets", .. })
    ));
    let mut g = [0.0f32; 4];
    assert!(matches!(
        cross_entropy(
            v(),
            Targets::Classes(&[0, 0]),
            Some(ViewMut::rows(&mut g, 2, 2).unwrap()),
            RowOutputs::default(),
            &d
        ),
        Err(Error::ShapeMismatch { what: "grad", .. })
    ));
    let mut l = [0.0f64; 3];
    assert!(matches!(
        cross_entropy(
            v(),
            Targets::Classes(&[0, 0]),
            None,
            RowOutputs { loss: Some(&mut l), ..Default::default() },
            &d
        ),
        Err(Error::RowCountMismatch { what: "loss", .. })
    ));
    let e: [f32; 0] = [];
    assert!(matches!(
        cross_entropy(View::rows(&e, 2, 0).unwrap(), Targets::Classes(&[0, 0]), None, RowOutputs::default(), &d),
        Err(Error::BadParameter { name: "classes", .. })
    ));
    let ax = [0.0f32; 8];
    assert!(matches!(
        cross_entropy(
            View::new(&ax, smax::Layout::axis(2, 2, 2)).unwrap(),
            Targets::Classes(&[0, 0, 0, 0]),
            None,
            RowOutputs::default(),
            &d
        ),
        Err(Error::Unsupported { what: "logits", .. })
    ));
}

#[test]
fn strided_views_and_thread_determinism() {
    let mut rng = Rng(5);
    let (n, k, stride) = (300, 1000, 1003);
    let xs: Vec<f32> = rng.vec(n * stride, 10.0).iter().map(|&v| v as f32).collect();
    let cls = targets_for(&mut rng, n, k, true);
    let lay = smax::Layout::strided_rows(n, k, stride);
    let o = CrossEntropyOptions::default().label_smoothing(0.05).z_loss(1e-4).softcap(7.0);
    let go = |o: &CrossEntropyOptions| {
        let mut g = vec![0.0f32; n * stride];
        let r = cross_entropy(
            View::new(&xs, lay).unwrap(),
            Targets::Classes(&cls),
            Some(ViewMut::new(&mut g, lay).unwrap()),
            RowOutputs::default(),
            o,
        )
        .unwrap();
        (r.loss.to_bits(), r.z_loss.to_bits(), g.iter().map(|v| v.to_bits()).collect::<Vec<_>>())
    };
    let base = go(&o.par(Par::Seq));
    for threads in [1, 2, 3, 8] {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        assert!(pool.install(|| go(&o)) == base, "{threads} threads");
    }
    // The strided result equals the contiguous one.
    let xc: Vec<f64> = (0..n).flat_map(|r| xs[r * stride..r * stride + k].iter().map(|&v| v as f64)).collect();
    let c =
        Cfg { red: Reduction::Mean, weights: None, eps: 0.05, lambda: 1e-4, cap: Some(7.0), tau: 1.0, ignore: -100 };
    let got = run::<f32>(&xc, k, &Tg::Cls(&cls), &o);
    assert_eq!(got.res.loss.to_bits(), base.0);
    let want = reference(&xc, k, &Tg::Cls(&cls), &c);
    check(&got, &want, 5e-7, "strided");
}

#[test]
fn tanh_sampled_ulp() {
    let mut xs = Vec::new();
    let mut b = 1u32;
    while b < 0x7f80_0000 {
        xs.push(f32::from_bits(b));
        xs.push(-f32::from_bits(b));
        b += 1013;
    }
    for level in SimdLevel::available() {
        let mut y = vec![0.0f32; xs.len()];
        smax::math::tanh(&xs, &mut y, Some(level)).unwrap();
        let mut worst = 0.0f64;
        for (&x, &v) in xs.iter().zip(&y) {
            let want = (x as f64).tanh();
            let w32 = want as f32;
            let ulp = if w32.abs() < f32::MIN_POSITIVE {
                2f64.powi(-149)
            } else {
                let up = f32::from_bits(w32.abs().to_bits() + 1) as f64 - w32.abs() as f64;
                up.min(w32.abs() as f64 - f32::from_bits(w32.abs().to_bits() - 1) as f64)
            };
            worst = worst.max((v as f64 - want).abs() / ulp);
        }
        assert!(worst <= 4.0, "{level:?}: {worst} ULP");
    }
    let sp = [f32::INFINITY, f32::NEG_INFINITY, f32::NAN, 0.0, -0.0];
    let mut y = [0.0f32; 5];
    smax::math::tanh(&sp, &mut y, None).unwrap();
    assert_eq!((y[0], y[1]), (1.0, -1.0));
    assert!(y[2].is_nan());
    assert_eq!((y[3].to_bits(), y[4].to_bits()), (0.0f32.to_bits(), (-0.0f32).to_bits()));
}

/// A logit far above the rest at a tiny temperature: `x·k` is past `f32::MAX` while
/// `(x − max)·k` is not. Every path (short f32 rows, the pipelined online rows, a cap, bf16,
/// f16, and an ignored row whose lse is asked for) gives the f64 reference's loss, lse and
/// gradient: the target logit is shifted by the max before it is scaled, and a row whose
/// transformed logits overflow f32 is computed in f64 (it used to read as an all `-inf` row).
#[test]
fn scaled_logits_past_f32_max_follow_the_reference() {
    // `out_rel`: the rounding of the gradient into `T`.
    fn case<T: Element>(what: &str, big: f64, k: usize, cap: Option<f64>, tau: f64, out_rel: f64) {
        let mut rng = Rng(0x5eed_0081);
        let n = 3;
        let mut x: Vec<f64> = rng.vec(n * k, 4.0);
        for r in 0..n {
            x[r * k + 1] = big;
        }
        // The values the call sees.
        let x: Vec<f64> = x.iter().map(|&v| T::from_f64(v).to_f64()).collect();
        // Target at the large logit, target elsewhere, ignored row (lse only).
        let cls = [1i64, (k - 1) as i64, -100];
        let c = Cfg { red: Reduction::Sum, weights: None, eps: 0.0, lambda: 0.0, cap, tau, ignore: -100 };
        let want = reference(&x, k, &Tg::Cls(&cls), &c);
        for level in SimdLevel::available() {
            let got = run::<T>(&x, k, &Tg::Cls(&cls), &opts(&c).simd(level));
            let close = |g: f64, w: f64, abs: f64| (g - w).abs() <= 1e-6 * w.abs() + abs;
            for (r, (g, w)) in got.rows.iter().zip(&want.rows).enumerate() {
                let at = format!("{what} {level:?} row {r}");
                assert!(w.0.is_finite() && w.2.is_finite(), "{at}: reference {w:?}");
                assert!(close(g.0, w.0, 1e-6) && close(g.2, w.2, 0.0), "{at}: {g:?} vs {w:?}");
            }
            // The entries are (p − [k = y])·∂t/∂x, with p 0 or 1 but for rounding.
            let scale = want.grad.iter().fold(0.0f64, |a, v| a.max(v.abs()));
            assert!(scale > 0.0, "{what}: the target elsewhere has a gradient");
            for (i, (g, w)) in got.grad.iter().zip(&want.grad).enumerate() {
                // (Past the range of `T`, the entry rounds to ±inf.)
                let ok = if T::from_f64(*w).to_f64().is_infinite() {
                    *g == T::from_f64(*w).to_f64()
                } else {
                    close(*g, *w, (1e-6 + out_rel) * scale)
                };
                assert!(ok, "{what} {level:?}: grad[{i}] {g} vs {w}");
            }
        }
    }
    case::<f32>("f32 short", 1e30, 37, None, 1e-9, 0.0);
    case::<f32>("f32 pipelined", 1e30, 131073, None, 1e-9, 0.0);
    case::<f32>("f32 cap", 1e30, 37, Some(1e30), 1e-9, 0.0);
    case::<bf16>("bf16", 1e30, 37, None, 1e-9, 2f64.powi(-8));
    case::<smax::f16>("f16", 6e4, 37, None, 1e-35, 2f64.powi(-11));
}

/// f64 logits whose scaled values pass `f64::MAX` (`1e300/1e-10`): from the formulas, the
/// target at the max has `p = 1`, loss `−ln 1 = 0` and a zero gradient, and its lse
/// (`≈ 1e310`) rounds to `+inf`; a target elsewhere has loss `≈ 1e310 → +inf` and gradient
/// `(p − [k = y])/τ` = `+1e10` at the max and `−1e10` at the target.
#[test]
fn f64_scaled_logits_past_f64_max() {
    let x = [0.5f64, 1e300, -3.0, 2.0, 0.5, 1e300, -3.0, 2.0];
    let mut g = [f64::NAN; 8];
    let (mut l, mut s) = ([0.0; 2], [0.0; 2]);
    for level in SimdLevel::available() {
        cross_entropy(
            View::rows(&x, 2, 4).unwrap(),
            Targets::Classes(&[1, 3]),
            Some(ViewMut::rows(&mut g, 2, 4).unwrap()),
            RowOutputs { loss: Some(&mut l), lse: Some(&mut s), ..Default::default() },
            &CrossEntropyOptions::default().reduction(Reduction::Sum).temperature(1e-10).simd(level),
        )
        .unwrap();
        assert_eq!((l, s), ([0.0, f64::INFINITY], [f64::INFINITY; 2]), "{level:?}");
        assert_eq!(g, [0.0, 0.0, 0.0, 0.0, 0.0, 1e10, 0.0, -1e10], "{level:?}");
    }
}

/// Label smoothing over logits near `f32::MAX`: the smoothing sum `Σ v·t` overflows f32 block
/// sums (`inf`, or `inf − inf = NaN` beside a masked logit), and such rows are computed in
/// f64. Loss and lse follow the f64 reference (`+inf` where a masked logit carries target mass,
/// as the formula gives), the gradient too; with and without class weights, f32 and bf16.
#[test]
fn smoothing_over_logits_near_f32_max_follows_the_reference() {
    fn case<T: Element>(weights: Option<&[f32]>, out_rel: f64) {
        let big = f32::MAX as f64 * 0.9;
        let x: Vec<f64> =
            [big, big, 1.0, 0.0, big, big, f64::NEG_INFINITY, 0.0].iter().map(|&v| T::from_f64(v).to_f64()).collect();
        let cls = [2i64, 0];
        let c = Cfg { red: Reduction::Sum, weights, eps: 0.1, lambda: 0.0, cap: None, tau: 1.0, ignore: -100 };
        let want = reference(&x, 4, &Tg::Cls(&cls), &c);
        // (Row 1's loss is `ε/K·w·(lse − (−inf)) = +inf`; the reference's compensated sum
        // turns that into NaN, so it is written here.)
        let want_loss = [want.rows[0].0, f64::INFINITY];
        for level in SimdLevel::available() {
            let got = run::<T>(&x, 4, &Tg::Cls(&cls), &opts(&c).simd(level));
            let at = format!("{} {weights:?} {level:?}", T::NAME);
            for ((g, w), wl) in got.rows.iter().zip(&want.rows).zip(want_loss) {
                let same = |a: f64, b: f64| a == b || (a - b).abs() <= 1e-6 * b.abs();
                assert!(same(g.0, wl) && same(g.2, w.2), "{at}: {g:?} vs {wl} {w:?}");
            }
            let scale = want.grad.iter().fold(0.0f64, |a, v| a.max(v.abs()));
            for (i, (g, w)) in got.grad.iter().zip(&want.grad).enumerate() {
                assert!((g - w).abs() <= (1e-6 + out_rel) * scale, "{at}: grad[{i}] {g} vs {w}");
            }
        }
    }
    let w = [1.0f32, 0.5, 2.0, 1.5];
    for weights in [None, Some(&w[..])] {
        case::<f32>(weights, 0.0);
        case::<bf16>(weights, 2f64.powi(-8));
    }
}

/// A target class of weight 0 contributes 0 to its row's loss, also when its logit is masked
/// (`-inf`) or scales past f32 (`-1e30` at τ = 1e-9 on bf16): `0·inf` gave NaN. The rest of the
/// row's loss is the smoothing part alone, `ε/K·Σ_k w_k (lse − t_k)`, here with all weights 0
/// but the first: `ε/2·(lse − t_0)`.
#[test]
fn zero_weight_target_with_a_masked_logit_contributes_nothing() {
    fn case<T: Element>(x1: f64, tau: f64) {
        let x: Vec<T> = [1.0, x1].iter().map(|&v| T::from_f64(v)).collect();
        let w = [1.0f32, 0.0];
        let mut l = [f64::NAN];
        let mut lse = [f64::NAN];
        let o = CrossEntropyOptions::default().class_weights(&w).label_smoothing(0.1).temperature(tau);
        for level in SimdLevel::available() {
            cross_entropy(
                View::rows(&x, 1, 2).unwrap(),
                Targets::Classes(&[1]),
                None,
                RowOutputs { loss: Some(&mut l), lse: Some(&mut lse), ..Default::default() },
                &o.simd(level),
            )
            .unwrap();
            let want = 0.1 / 2.0 * (lse[0] - 1.0 / tau);
            assert!((l[0] - want).abs() <= 1e-6 * (1.0 + want.abs()), "{} {level:?}: {} vs {want}", T::NAME, l[0]);
        }
    }
    case::<f32>(f64::NEG_INFINITY, 1.0);
    case::<f64>(f64::NEG_INFINITY, 1.0);
    case::<bf16>(f64::NEG_INFINITY, 1.0);
    case::<bf16>(-1e30, 1e-9);
}

#[test]
fn without_class_weights_keeps_every_other_setting() {
    let w = [1.0f32, 2.0];
    let o = CrossEntropyOptions::default()
        .reduction(Reduction::Sum)
        .ignore_index(3)
        .class_weights(&w)
        .label_smoothing(0.1)
        .z_loss(1e-3)
        .softcap(30.0)
        .temperature(0.9)
        .grad_scale(2.0)
        .all_ignored(AllIgnored::Nan);
    let u = o.without_class_weights();
    assert!(u.class_weights.is_none());
    // Every other field equal: the options print the same once the weights are put back.
    assert_eq!(format!("{:?}", CrossEntropyOptions { class_weights: Some(&w), ..u }), format!("{o:?}"));
}
