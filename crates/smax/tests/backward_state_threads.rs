//! Backward passes (f64 finite differences, f32 against the reference), the log-sum-exp
//! state monoid, thread-count determinism and batch invariance, and properties.

mod common;
use common::*;
use proptest::prelude::*;
use smax::*;

fn fd_check(log: bool, x: &[f64], g: &[f64], tau: f64) {
    let n = x.len();
    let o = Options::default().temperature(tau);
    let f = |xx: &[f64]| -> f64 {
        let y = if log {
            log_softmax_to_vec(View::rows(xx, 1, n).unwrap(), &o)
        } else {
            softmax_to_vec(View::rows(xx, 1, n).unwrap(), &o)
        }
        .unwrap();
        fsum(y.iter().zip(g).map(|(a, b)| a * b))
    };
    let y = if log {
        log_softmax_to_vec(View::rows(x, 1, n).unwrap(), &o)
    } else {
        softmax_to_vec(View::rows(x, 1, n).unwrap(), &o)
    }
    .unwrap();
    let dx = if log {
        log_softmax_backward_to_vec(View::rows(&y, 1, n).unwrap(), View::rows(g, 1, n).unwrap(), &o)
    } else {
        softmax_backward_to_vec(View::rows(&y, 1, n).unwrap(), View::rows(g, 1, n).unwrap(), &o)
    }
    .unwrap();
    let h = 1e-6;
    for i in 0..n {
        let mut a = x.to_vec();
        let mut b = x.to_vec();
        a[i] += h;
        b[i] -= h;
        let fd = (f(&a) - f(&b)) / (2.0 * h);
        assert!((fd - dx[i]).abs() <= 1e-5 + 1e-3 * fd.abs(), "log={log} n={n} i={i}: fd {fd} vs {}", dx[i]);
    }
}

#[test]
fn backward_finite_differences_f64() {
    let mut rng = common::Rng(21);
    for n in [1usize, 2, 3, 7, 16, 33, 100] {
        for tau in [1.0, 0.5, 3.0] {
            let x = rng.vec(n, 3.0);
            let g = rng.vec(n, 1.0); // non-uniform upstream gradient
            fd_check(false, &x, &g, tau);
            fd_check(true, &x, &g, tau);
        }
    }
    // [N1] worked VJPs.
    let x = [1.0f64, 2.0, 3.0, 4.0];
    let g = [0.1f64, -0.2, 0.3, 0.0];
    let o = Options::default();
    let y = softmax_to_vec(View::rows(&x, 1, 4).unwrap(), &o).unwrap();
    let d = softmax_backward_to_vec(View::rows(&y, 1, 4).unwrap(), View::rows(&g, 1, 4).unwrap(), &o).unwrap();
    for (a, b) in d.iter().zip([0.0013835903, -0.0223823073, 0.0575999897, -0.0366012726]) {
        assert!((a - b).abs() < 1e-10);
    }
    let l = log_softmax_to_vec(View::rows(&x, 1, 4).unwrap(), &o).unwrap();
    let d = log_softmax_backward_to_vec(View::rows(&l, 1, 4).unwrap(), View::rows(&g, 1, 4).unwrap(), &o).unwrap();
    for (a, b) in d.iter().zip([0.0935882793, -0.2174288637, 0.2526234364, -0.128782852]) {
        assert!((a - b).abs() < 1e-10);
    }
}

fn bwd_f32_case<T: Element>(n: usize, rows: usize, rng: &mut common::Rng, level: SimdLevel, layout_axis: bool) {
    let x: Vec<T> = to_t(&rng.vec(rows * n, 4.0));
    let g: Vec<T> = to_t(&rng.vec(rows * n, 1.0));
    let o = Options::default().simd(level);
    let l = if layout_axis { Layout::axis(1, n, rows) } else { Layout::rows(rows, n) };
    let y = softmax_to_vec(View::new(&x, l).unwrap(), &o).unwrap();
    let ly = log_softmax_to_vec(View::new(&x, l).unwrap(), &o).unwrap();
    let d = softmax_backward_to_vec(View::new(&y, l).unwrap(), View::new(&g, l).unwrap(), &o).unwrap();
    let ld = log_softmax_backward_to_vec(View::new(&ly, l).unwrap(), View::new(&g, l).unwrap(), &o).unwrap();
    let mut di = g.clone();
    softmax_backward_inplace(View::new(&y, l).unwrap(), ViewMut::new(&mut di, l).unwrap(), &o).unwrap();
    assert_eq!(d, di);
    let (u, (r, a)) = (unit::<T>(), rounding::<T>());
    let idx = |row: usize, k: usize| {
        if layout_axis { k * rows + row } else { row * n + k }
    };
    for row in 0..rows {
        let yr: Vec<f64> = (0..n).map(|k| y[idx(row, k)].to_f64()).collect();
        let lr: Vec<f64> = (0..n).map(|k| ly[idx(row, k)].to_f64()).collect();
        let gr: Vec<f64> = (0..n).map(|k| g[idx(row, k)].to_f64()).collect();
        let ws = ref_softmax_bwd(&yr, &gr, 1.0);
        let wl = ref_log_softmax_bwd(&lr, &gr, 1.0);
        let sgy: f64 = yr.iter().zip(&gr).map(|(p, q)| (p * q).abs()).sum();
        let sg: f64 = gr.iter().map(|q| q.abs()).sum();
        for k in 0..n {
            let tol = 80.0 * u * yr[k].abs() * (gr[k].abs() + 2.0 * sgy) + r * ws[k].abs() + a;
            let got = d[idx(row, k)].to_f64();
            assert!(close(got, ws[k], tol), "{} softmax_bwd n={n} k={k}: {got} vs {}", T::NAME, ws[k]);
            let tol = 80.0 * u * (gr[k].abs() + lr[k].exp() * sg) + r * wl[k].abs() + a;
            let got = ld[idx(row, k)].to_f64();
            assert!(close(got, wl[k], tol), "{} log_softmax_bwd n={n} k={k}: {got} vs {}", T::NAME, wl[k]);
        }
    }
}

#[test]
fn backward_against_reference_every_length_and_level() {
    let mut rng = common::Rng(33);
    for level in SimdLevel::available() {
        for n in (0..=70).chain([257, 4097, 65537]) {
            bwd_f32_case::<f32>(n, 2, &mut rng, level, false);
        }
        for n in [1usize, 5, 40, 300] {
            bwd_f32_case::<f32>(n, 7, &mut rng, level, true);
            bwd_f32_case::<bf16>(n, 3, &mut rng, level, false);
            bwd_f32_case::<f16>(n, 3, &mut rng, level, true);
        }
    }
    bwd_f32_case::<f64>(300, 3, &mut rng, SimdLevel::Scalar, false);
    bwd_f32_case::<f64>(30, 3, &mut rng, SimdLevel::Scalar, true);
}

#[test]
fn backward_of_masked_rows_is_zero() {
    let ninf = f32::NEG_INFINITY;
    let o = Options::default().masked_row(MaskedRow::Zero);
    for n in [1usize, 20, 70000] {
        let x = vec![ninf; n];
        let g: Vec<f32> = (0..n).map(|i| i as f32 * 0.5 - 3.0).collect();
        let y = softmax_to_vec(View::rows(&x, 1, n).unwrap(), &o).unwrap();
        let d = softmax_backward_to_vec(View::rows(&y, 1, n).unwrap(), View::rows(&g, 1, n).unwrap(), &o).unwrap();
        assert!(d.iter().all(|&v| v == 0.0));
        let l = log_softmax_to_vec(View::rows(&x, 1, n).unwrap(), &o).unwrap();
        let d = log_softmax_backward_to_vec(View::rows(&l, 1, n).unwrap(), View::rows(&g, 1, n).unwrap(), &o).unwrap();
        assert!(d.iter().all(|&v| v == 0.0), "n={n}");
    }
    // A masked position inside a live row gets exactly the analytic gradient and no NaN.
    let x = [0.0f32, ninf, 1.0];
    let y = softmax_to_vec(View::rows(&x, 1, 3).unwrap(), &o).unwrap();
    let d = softmax_backward_to_vec(View::rows(&y, 1, 3).unwrap(), View::rows(&[1.0f32, 5.0, -1.0], 1, 3).unwrap(), &o)
        .unwrap();
    assert_eq!(d[1], 0.0);
    assert!(d.iter().all(|v| v.is_finite()));
}

#[test]
fn lse_state_is_a_monoid() {
    let e = LseState::<f64>::EMPTY;
    assert_eq!(e.merge(e), e);
    assert!(e.merge(e).is_empty() && e.lse() == f64::NEG_INFINITY);
    // [N3] worked example.
    let mut s = LseState::<f64>::EMPTY;
    let want = [(1.0, 1.0), (2.0, 1.3678794411714423), (3.0, 1.5032147244080551), (4.0, 1.553001792775919)];
    for (i, x) in [1.0, 2.0, 3.0, 4.0].into_iter().enumerate() {
        s.push(x);
        assert_eq!(s.max, want[i].0);
        assert!((s.sum - want[i].1).abs() < 1e-15);
    }
    assert!((s.lse() - 4.440189698561196).abs() < 1e-15);
    let a = LseState::<f64>::from_slice(&[1.0f64, 2.0]);
    let b = LseState::<f64>::from_slice(&[3.0f64, 4.0]);
    let m = a.merge(b);
    assert_eq!(m.max, 4.0);
    assert!((m.sum - 1.553001792775919).abs() < 1e-15);
    assert_eq!(a.merge(e), a);
    assert_eq!(e.merge(a), a);
    let ninf = LseState::<f32>::from_value(f32::NEG_INFINITY);
    assert!(ninf.is_empty());
    let n = LseState::<f32>::from_value(f32::NAN);
    assert!(n.merge(LseState::<f32>::from_value(1.0)).lse().is_nan());
    let p = LseState::<f32>::from_value(f32::INFINITY);
    assert_eq!(p.merge(LseState::<f32>::from_value(3.0)).lse(), f32::INFINITY);
    assert_eq!(p.merge(p).lse(), f32::INFINITY);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Merging in any grouping agrees with one sequential pass; empty parts are identities.
    #[test]
    fn lse_state_merge_any_grouping(xs in prop::collection::vec(-50.0f64..50.0, 0..40), cut in 0usize..40) {
        let cut = cut.min(xs.len());
        let whole = LseState::<f64>::from_slice(&xs);
        let parts = LseState::<f64>::from_slice(&xs[..cut]).merge(LseState::<f64>::EMPTY).merge(LseState::<f64>::from_slice(&xs[cut..]));
        let want = ref_lse(&xs, 1.0);
        prop_assert!(close(whole.lse(), want, 1e-12 * (1.0 + want.abs())));
        prop_assert!(close(parts.lse(), want, 1e-12 * (1.0 + want.abs())));
    }

    /// Shift invariance, rows summing to one, and log_softmax = log(softmax) where representable.
    #[test]
    fn softmax_properties(xs in prop::collection::vec(-30.0f32..30.0, 1..300), shift in -1e3f32..1e3, alg in 0usize..4) {
        let alg = [Algorithm::Auto, Algorithm::ThreePass, Algorithm::TwoPass, Algorithm::Online][alg];
        let o = Options::default().algorithm(alg);
        let n = xs.len();
        let y = softmax_to_vec(View::rows(&xs, 1, n).unwrap(), &o).unwrap();
        let total: f64 = y.iter().map(|&v| v as f64).sum();
        prop_assert!((total - 1.0).abs() <= (90.0 + 2.0 * (n as f64).ln()) * U32 * 2.0 + n as f64 * U32);
        // Shift by a value that keeps every shifted input exact in f32 (integer shifts of
        // values on a 2^-8 grid), so the reference is the same row.
        let xq: Vec<f32> = xs.iter().map(|v| (v * 256.0).round() / 256.0).collect();
        let sh = shift.round();
        let xsft: Vec<f32> = xq.iter().map(|v| v + sh).collect();
        let a = softmax_to_vec(View::rows(&xq, 1, n).unwrap(), &o).unwrap();
        let b = softmax_to_vec(View::rows(&xsft, 1, n).unwrap(), &o).unwrap();
        let xd: Vec<f64> = xq.iter().map(|&v| v as f64).collect();
        let want = ref_softmax(&xd, 1.0);
        let m = xd.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        for i in 0..n {
            // The shifted row is exact in f32, so the same bound holds for every algorithm.
            let tol = softmax_bound::<f32>(want[i], (xd[i] - m).abs(), n);
            prop_assert!(close(b[i] as f64, want[i], tol), "shifted i={} {} vs {}", i, b[i], want[i]);
            prop_assert!(close(a[i] as f64, want[i], softmax_bound::<f32>(want[i], (xd[i] - m).abs(), n)));
        }
        let l = log_softmax_to_vec(View::rows(&xq, 1, n).unwrap(), &o).unwrap();
        for i in 0..n {
            if a[i] > 1e-30 {
                prop_assert!(((a[i] as f64).ln() - l[i] as f64).abs() <= 1e-5 * (1.0 + (l[i] as f64).abs()));
            }
        }
    }
}

#[test]
fn bitwise_identical_for_any_thread_count_and_batch() {
    let mut rng = common::Rng(99);
    let cases = [(300usize, 100usize), (3, 70000), (1, 600_000)];
    for &(rows, n) in &cases {
        let x: Vec<f32> = rng.vec(rows * n, 8.0).iter().map(|&v| v as f32).collect();
        let g: Vec<f32> = rng.vec(rows * n, 1.0).iter().map(|&v| v as f32).collect();
        for alg in [Algorithm::Auto, Algorithm::ThreePass, Algorithm::TwoPass, Algorithm::Online] {
            let o = Options::default().algorithm(alg);
            let run = |threads: usize| {
                let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
                pool.install(|| {
                    let v = View::rows(&x, rows, n).unwrap();
                    let y = softmax_to_vec(v, &o).unwrap();
                    let l = log_softmax_to_vec(v, &o).unwrap();
                    let s = logsumexp_to_vec(v, &o).unwrap();
                    let d =
                        softmax_backward_to_vec(View::rows(&y, rows, n).unwrap(), View::rows(&g, rows, n).unwrap(), &o)
                            .unwrap();
                    (y, l, s, d)
                })
            };
            let base = run(1);
            let seq = {
                let o = o.par(Par::Seq);
                let v = View::rows(&x, rows, n).unwrap();
                softmax_to_vec(v, &o).unwrap()
            };
            assert_eq!(base.0, seq);
            for t in [2, 3, 8] {
                assert!(base == run(t), "rows={rows} n={n} {alg:?} threads={t}");
            }
            // Batch invariance: the last row alone gives the same bits as inside the batch.
            let last = &x[(rows - 1) * n..];
            let alone = softmax_to_vec(View::rows(last, 1, n).unwrap(), &o).unwrap();
            assert_eq!(&base.0[(rows - 1) * n..], &alone[..]);
        }
    }
}

/// A large call (a 32 MiB gradient, written with streaming stores) agrees bit for bit with
/// each row computed alone (a small call, written through the cache), for short and long
/// (chunked) rows, with a temperature, and matches the reference.
#[test]
fn streamed_backward_is_each_row_alone() {
    let mut rng = Rng(0xbac4);
    for (rows, n) in [(64usize, 128 * 1024 + 3), (16, 512 * 1024 + 5)] {
        let y32: Vec<f32> = rng.vec(rows * n, 1.0).iter().map(|&v| (v.abs() * 1e-5) as f32).collect();
        let g32: Vec<f32> = rng.vec(rows * n, 1.0).iter().map(|&v| v as f32).collect();
        for log in [false, true] {
            let o = Options::default().temperature(0.8);
            let run = |y: &[f32], g: &[f32], r: usize| {
                let (y, g) = (View::rows(y, r, n).unwrap(), View::rows(g, r, n).unwrap());
                if log {
                    log_softmax_backward_to_vec(y, g, &o).unwrap()
                } else {
                    softmax_backward_to_vec(y, g, &o).unwrap()
                }
            };
            let all = run(&y32, &g32, rows);
            for r in [0, 5, rows - 1] {
                let (y, g) = (&y32[r * n..(r + 1) * n], &g32[r * n..(r + 1) * n]);
                let alone = run(y, g, 1);
                let same = alone.iter().zip(&all[r * n..]).all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "log={log} n={n} row {r}");
                let (yd, gd): (Vec<f64>, Vec<f64>) = (to_f64(y), to_f64(g));
                let want = if log { ref_log_softmax_bwd(&yd, &gd, 0.8) } else { ref_softmax_bwd(&yd, &gd, 0.8) };
                for i in (0..n).step_by(1009) {
                    let tol = 1e-5 * want[i].abs() + 1e-6;
                    assert!((alone[i] as f64 - want[i]).abs() <= tol, "log={log} n={n} r={r} i={i}");
                }
            }
        }
    }
}
