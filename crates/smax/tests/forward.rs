//! Forward normalisers against the f64 reference: every tail length, scales, algorithms,
//! SIMD levels and element types, the worked examples, special values and layouts.

mod common;
use common::*;
use smax::*;

const ALGS: [Algorithm; 4] = [Algorithm::Auto, Algorithm::ThreePass, Algorithm::TwoPass, Algorithm::Online];

fn lens() -> Vec<usize> {
    let mut v: Vec<usize> = (0..=70).collect();
    v.extend([255, 256, 257, 4095, 4097]);
    v
}

/// Checks softmax, log-softmax and logsumexp of one batch against the reference.
fn check_all<T: Element>(xs: &[f64], rows: usize, n: usize, tau: f64, o: &Options) {
    let x: Vec<T> = to_t(xs);
    let xv = to_f64(&x); // the exact values the kernel sees
    let v = View::rows(&x, rows, n).unwrap();
    let y = softmax_to_vec(v, o).unwrap();
    let l = log_softmax_to_vec(v, o).unwrap();
    let s = logsumexp_to_vec(v, o).unwrap();
    for r in 0..rows {
        let row = &xv[r * n..(r + 1) * n];
        let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let ry = ref_softmax(row, tau);
        let rl = ref_log_softmax(row, tau);
        for i in 0..n {
            let d = (row[i] - m).abs() / tau;
            let (gy, gl) = (y[r * n + i].to_f64(), l[r * n + i].to_f64());
            assert!(
                close(gy, ry[i], softmax_bound::<T>(ry[i], d, n)),
                "{} softmax n={n} i={i} tau={tau} {o:?}: got {gy} want {}",
                T::NAME,
                ry[i]
            );
            assert!(
                close(gl, rl[i], log_softmax_bound::<T>(rl[i], d, n)),
                "{} log_softmax n={n} i={i} {o:?}: got {gl} want {}",
                T::NAME,
                rl[i]
            );
        }
        let want = ref_lse(row, tau);
        let got = s[r].to_f64();
        assert!(close(got, want, lse_bound::<T>(want, n)), "{} lse n={n} {o:?}: got {got} want {want}", T::NAME);
    }
}

fn sweep<T: Element>(scales: &[f64], lens: &[usize]) {
    let mut rng = Rng(0x5eed);
    for &n in lens {
        for &sc in scales {
            let rows = 3;
            let xs = rng.vec(rows * n, sc);
            for level in SimdLevel::available() {
                for alg in ALGS {
                    let o = Options::default().simd(level).algorithm(alg);
                    check_all::<T>(&xs, rows, n, 1.0, &o);
                }
            }
        }
    }
}

#[test]
fn f32_every_tail_length_scale_algorithm_level() {
    sweep::<f32>(&[1.0, 10.0, 100.0, 1e4], &lens());
}

#[test]
fn f64_every_tail_length() {
    sweep::<f64>(&[1.0, 100.0, 1e4], &lens());
}

#[test]
fn f16_and_bf16_accumulate_in_f32() {
    sweep::<f16>(&[1.0, 10.0], &[0, 1, 7, 16, 17, 33, 64, 100, 4097]);
    sweep::<bf16>(&[1.0, 100.0], &[0, 1, 7, 16, 17, 33, 64, 100, 4097]);
    // A long f16 row of equal values: every output is 1/n (a half-precision running sum would
    // stall at 2048 and give rows summing to ~2; candle#3727, tract#2586).
    let n = 8192;
    let x = vec![f16::from_f32(0.5); n];
    let y = softmax_to_vec(View::rows(&x, 1, n).unwrap(), &Options::default()).unwrap();
    let want = 1.0 / n as f64;
    for v in &y {
        assert!((v.to_f64() - want).abs() <= want * 2f64.powi(-11) + 1e-12);
    }
}

/// A three-pass half-precision softmax or log-softmax row is the f32 op on its widened values,
/// rounded once: bit for bit, on every SIMD level, at lengths across the tile size, one call
/// after another on one thread (the f32 copy lives in per-thread scratch that shorter rows
/// reuse, so stale entries would show).
#[test]
fn half_rows_are_the_f32_result_of_their_widened_values() {
    fn check<T: Element>(xs: &[f64], n: usize, level: SimdLevel) {
        let x: Vec<T> = to_t(xs);
        let xf: Vec<f32> = to_f64(&x).iter().map(|&v| v as f32).collect();
        let rows = x.len() / n;
        for tau in [1.0, 0.7] {
            let o = Options::default().simd(level).algorithm(Algorithm::ThreePass).temperature(tau).par(Par::Seq);
            let (v, vf) = (View::rows(&x, rows, n).unwrap(), View::rows(&xf, rows, n).unwrap());
            let narrow = |y: Vec<f32>| -> Vec<T> { y.iter().map(|&v| T::from_f32(v)).collect() };
            let same = |a: &[T], b: &[T]| a.iter().zip(b).all(|(p, q)| p.to_f64().to_bits() == q.to_f64().to_bits());
            assert!(same(&softmax_to_vec(v, &o).unwrap(), &narrow(softmax_to_vec(vf, &o).unwrap())), "softmax n={n}");
            assert!(
                same(&log_softmax_to_vec(v, &o).unwrap(), &narrow(log_softmax_to_vec(vf, &o).unwrap())),
                "log n={n}"
            );
            // Logsumexp: the batch (rows widened in groups) equals each row alone.
            let l = logsumexp_to_vec(v, &o).unwrap();
            for r in 0..rows {
                let alone = logsumexp_to_vec(View::rows(&x[r * n..(r + 1) * n], 1, n).unwrap(), &o).unwrap();
                assert_eq!(l[r].to_f64().to_bits(), alone[0].to_f64().to_bits(), "lse n={n} row {r}");
            }
        }
    }
    let mut rng = Rng(31);
    for level in SimdLevel::available() {
        for n in [1usize, 17, 128, 1023, 1024, 1025, 2048, 4096, 3, 600, 40000, 5000] {
            let mut xs = rng.vec(3 * n, 6.0);
            if n > 2 {
                xs[1] = f64::NEG_INFINITY; // a masked entry
                xs[2 * n] = f64::NAN; // a NaN row
                xs[n] = f64::NEG_INFINITY;
            }
            check::<bf16>(&xs, n, level);
            check::<f16>(&xs, n, level);
        }
    }
}

#[test]
fn long_rows_all_algorithms() {
    let mut rng = Rng(7);
    for &n in &[65537usize, (1 << 20) + 1] {
        let xs = rng.vec(n, 10.0);
        for alg in ALGS {
            check_all::<f32>(&xs, 1, n, 1.0, &Options::default().algorithm(alg));
        }
    }
    let xs = rng.vec(300_000, 5.0);
    check_all::<bf16>(&xs, 1, 300_000, 1.0, &Options::default());
    check_all::<f64>(&xs, 1, 300_000, 1.0, &Options::default());
}

#[test]
fn temperature() {
    let mut rng = Rng(11);
    for &tau in &[0.01, 0.5, 2.0, 1000.0] {
        for &n in &[1usize, 5, 33, 300, 70000] {
            let xs = rng.vec(2 * n, 10.0);
            for alg in ALGS {
                let o = Options::default().temperature(tau).algorithm(alg);
                check_all::<f32>(&xs, 2, n, tau, &o);
            }
            check_all::<f64>(&xs, 2, n, tau, &Options::default().temperature(tau));
        }
    }
    // [N2] worked example.
    let x = [1.0f32, 2.0, 3.0, 4.0];
    let y = softmax_to_vec(View::rows(&x, 1, 4).unwrap(), &Options::default().temperature(0.5)).unwrap();
    let want = [0.0021440088, 0.0158422012, 0.1170589132, 0.8649548768];
    for (a, b) in y.iter().zip(want) {
        assert!((*a as f64 - b).abs() < 1e-7 + 1e-6 * b);
    }
    let y = softmax_to_vec(View::rows(&x, 1, 4).unwrap(), &Options::default().temperature(2.0)).unwrap();
    let want = [0.1015363241, 0.1674050973, 0.2760043447, 0.4550542339];
    for (a, b) in y.iter().zip(want) {
        assert!((*a as f64 - b).abs() < 1e-7 + 1e-6 * b);
    }
}

#[test]
fn worked_example_n1_and_n4() {
    // [N1]
    let x = [1.0f64, 2.0, 3.0, 4.0];
    let y = softmax_to_vec(View::rows(&x, 1, 4).unwrap(), &Options::default()).unwrap();
    let want = [0.0320586033, 0.0871443187, 0.2368828181, 0.6439142599];
    for (a, b) in y.iter().zip(want) {
        assert!((a - b).abs() < 1e-10);
    }
    let l = log_softmax_to_vec(View::rows(&x, 1, 4).unwrap(), &Options::default()).unwrap();
    let want = [-3.4401896986, -2.4401896986, -1.4401896986, -0.4401896986];
    for (a, b) in l.iter().zip(want) {
        assert!((a - b).abs() < 1e-10);
    }
    let s = logsumexp_to_vec(View::rows(&x, 1, 4).unwrap(), &Options::default()).unwrap();
    assert!((s[0] - 4.440189698561196).abs() < 1e-14);
    let x1000: Vec<f32> = x.iter().map(|v| (*v + 1000.0) as f32).collect();
    for alg in ALGS {
        let o = Options::default().algorithm(alg);
        let s = logsumexp_to_vec(View::rows(&x1000, 1, 4).unwrap(), &o).unwrap();
        assert!((s[0] as f64 - 1004.4401896985612).abs() < 1e-4, "{alg:?}");
        let y = softmax_to_vec(View::rows(&x1000, 1, 4).unwrap(), &o).unwrap();
        let want = [0.0320586033, 0.0871443187, 0.2368828181, 0.6439142599];
        for (a, b) in y.iter().zip(want) {
            assert!((*a as f64 - b).abs() < 2e-7, "{alg:?}");
        }
    }
    // [N4]: exp overflows f32 here; the two-pass algorithm's extended exponent does not.
    let x = [1000.0f32, 1001.0, 1002.0, -1000.0];
    for alg in ALGS {
        let y = softmax_to_vec(View::rows(&x, 1, 4).unwrap(), &Options::default().algorithm(alg)).unwrap();
        let want = [0.0900305732, 0.2447284711, 0.6652409558, 0.0];
        for (a, b) in y.iter().zip(want) {
            assert!((*a as f64 - b).abs() < 1e-7, "{alg:?} {y:?}");
        }
        let s = logsumexp_to_vec(View::rows(&x, 1, 4).unwrap(), &Options::default().algorithm(alg)).unwrap();
        assert!((s[0] as f64 - 1002.4076059644444).abs() < 1e-4);
    }
}

fn special<T: Element>(row: &[f64], o: &Options) -> (Vec<f64>, Vec<f64>, f64) {
    let x: Vec<T> = to_t(row);
    let n = row.len();
    let v = View::rows(&x, 1, n).unwrap();
    let y = to_f64(&softmax_to_vec(v, o).unwrap());
    let l = to_f64(&log_softmax_to_vec(v, o).unwrap());
    let s = logsumexp_to_vec(v, o).unwrap()[0].to_f64();
    (y, l, s)
}

fn special_values_for<T: Element>() {
    let ninf = f64::NEG_INFINITY;
    for level in SimdLevel::available() {
        for alg in ALGS {
            for n in [1usize, 3, 17, 300, 70000, 300_000] {
                let o = Options::default().simd(level).algorithm(alg);
                let oz = o.masked_row(MaskedRow::Zero);
                // all -inf
                let row = vec![ninf; n];
                let (y, l, s) = special::<T>(&row, &o);
                assert!(y.iter().all(|v| v.is_nan()) && l.iter().all(|v| v.is_nan()));
                assert_eq!(s, ninf);
                let (y, l, s) = special::<T>(&row, &oz);
                assert!(y.iter().all(|&v| v == 0.0), "{} {level:?} {alg:?} n={n}", T::NAME);
                assert!(l.iter().all(|&v| v == ninf));
                assert_eq!(s, ninf);
                // one finite, rest -inf
                let mut row = vec![ninf; n];
                row[n / 2] = 3.5;
                let (y, l, s) = special::<T>(&row, &o);
                // Exact for the algorithms that shift by the max; the two-pass algorithm's
                // polynomial enters the sum, so there it is exact up to its documented bound.
                let tol = if alg == Algorithm::TwoPass { 1e-6 } else { 0.0 };
                for i in 0..n {
                    let (wy, wl) = if i == n / 2 { (1.0, 0.0) } else { (0.0, ninf) };
                    assert!(close(y[i], wy, tol), "{} {level:?} {alg:?} n={n} i={i}: {}", T::NAME, y[i]);
                    assert!(close(l[i], wl, tol), "{} {level:?} {alg:?} n={n} i={i}: {}", T::NAME, l[i]);
                }
                assert!(close(s, 3.5, 4.0 * tol));
                // NaN anywhere, including inside a masked block
                for pos in [0, n / 2, n - 1] {
                    for fillv in [0.0, ninf] {
                        let mut row = vec![fillv; n];
                        row[pos] = f64::NAN;
                        let (y, l, s) = special::<T>(&row, &oz);
                        assert!(y.iter().all(|v| v.is_nan()), "{} NaN at {pos} n={n} {alg:?} {level:?}", T::NAME);
                        assert!(l.iter().all(|v| v.is_nan()));
                        assert!(s.is_nan());
                    }
                }
                // +inf
                let mut row = vec![1.0; n];
                row[n - 1] = f64::INFINITY;
                let (y, l, s) = special::<T>(&row, &o);
                assert!(y.iter().all(|v| v.is_nan()) && l.iter().all(|v| v.is_nan()));
                assert_eq!(s, f64::INFINITY);
                // +inf and NaN: NaN wins
                row[0] = f64::NAN;
                let (_, _, s) = special::<T>(&row, &o);
                assert!(s.is_nan());
            }
        }
    }
}

#[test]
fn special_values_table() {
    special_values_for::<f32>();
    special_values_for::<f64>();
    special_values_for::<f16>();
    special_values_for::<bf16>();
}

#[test]
fn empty_rows_and_batches() {
    let x: [f32; 0] = [];
    for rows in [0usize, 3] {
        let v = View::rows(&x, rows, 0).unwrap();
        assert_eq!(softmax_to_vec(v, &Options::default()).unwrap().len(), 0);
        let s = logsumexp_to_vec(v, &Options::default()).unwrap();
        assert_eq!(s.len(), rows);
        assert!(s.iter().all(|&v| v == f32::NEG_INFINITY));
    }
    let v = View::rows(&x, 0, 5).unwrap();
    assert!(logsumexp_to_vec(v, &Options::default()).unwrap().is_empty());
    let e: [f64; 0] = [];
    let s = logsumexp_to_vec(View::new(&e, Layout::axis(2, 0, 3)).unwrap(), &Options::default()).unwrap();
    assert_eq!(s, vec![f64::NEG_INFINITY; 6]);
}

#[test]
fn huge_magnitudes_and_denormals() {
    for alg in ALGS {
        let o = Options::default().algorithm(alg);
        let x = [1e30f32, -1e30, 1e30, 0.0];
        let y = softmax_to_vec(View::rows(&x, 1, 4).unwrap(), &o).unwrap();
        assert_eq!(y, vec![0.5, 0.0, 0.5, 0.0], "{alg:?}");
        let s = logsumexp_to_vec(View::rows(&x, 1, 4).unwrap(), &o).unwrap();
        assert!((s[0] as f64 - (1e30f32 as f64 + 2f64.ln())).abs() <= 1e30 * 1e-7);
        let x = [1e-40f32, -1e-42, 0.0, f32::MIN_POSITIVE];
        let y = softmax_to_vec(View::rows(&x, 1, 4).unwrap(), &o).unwrap();
        for v in y {
            assert!((v - 0.25).abs() < 1e-7);
        }
        // Equal logits at any magnitude give -ln n exactly in log space (mlx#4169).
        for mag in [1e8f32, -1e8, 3e38] {
            let x = [mag; 2];
            let l = log_softmax_to_vec(View::rows(&x, 1, 2).unwrap(), &o).unwrap();
            for v in l {
                assert!((v as f64 + 2f64.ln()).abs() < 1e-7, "{alg:?} {mag}");
            }
        }
    }
}

#[test]
fn strided_rows_and_inplace() {
    let mut rng = Rng(3);
    let (rows, n, xs, ys) = (5, 37, 41, 50);
    let xd: Vec<f32> = rng.vec(rows * xs, 5.0).iter().map(|&v| v as f32).collect();
    for alg in ALGS {
        let o = Options::default().algorithm(alg);
        let mut y = vec![f32::NAN; rows * ys];
        softmax(
            View::new(&xd, Layout::strided_rows(rows, n, xs)).unwrap(),
            ViewMut::new(&mut y, Layout::strided_rows(rows, n, ys)).unwrap(),
            &o,
        )
        .unwrap();
        let mut yi = xd.clone();
        softmax_inplace(ViewMut::new(&mut yi, Layout::strided_rows(rows, n, xs)).unwrap(), &o).unwrap();
        for r in 0..rows {
            let row: Vec<f64> = xd[r * xs..r * xs + n].iter().map(|&v| v as f64).collect();
            let want = ref_softmax(&row, 1.0);
            for i in 0..n {
                assert!((y[r * ys + i] as f64 - want[i]).abs() < 1e-6);
                assert_eq!(y[r * ys + i], yi[r * xs + i], "in-place equals out-of-place");
            }
            // Padding is untouched.
            for i in n..ys.min(if r + 1 < rows { ys } else { n }) {
                assert!(y[r * ys + i].is_nan());
            }
            for i in n..xs {
                if r * xs + i < yi.len() {
                    assert_eq!(yi[r * xs + i], xd[r * xs + i]);
                }
            }
        }
        let mut li = xd.clone();
        log_softmax_inplace(ViewMut::new(&mut li, Layout::strided_rows(rows, n, xs)).unwrap(), &o).unwrap();
        let l = log_softmax_to_vec(View::new(&xd, Layout::strided_rows(rows, n, xs)).unwrap(), &o).unwrap();
        for r in 0..rows {
            assert_eq!(&li[r * xs..r * xs + n], &l[r * n..(r + 1) * n]);
        }
    }
    // In place on long rows and narrow types agree with out of place.
    let xd: Vec<bf16> = rng.vec(300_000, 4.0).iter().map(|&v| bf16::from_f64(v)).collect();
    let y = softmax_to_vec(View::rows(&xd, 1, 300_000).unwrap(), &Options::default()).unwrap();
    let mut yi = xd.clone();
    softmax_inplace(ViewMut::rows(&mut yi, 1, 300_000).unwrap(), &Options::default()).unwrap();
    assert_eq!(y, yi);
}

#[test]
fn axis_layout_matches_transposed_rows() {
    let mut rng = Rng(5);
    for &(outer, axis, inner) in
        &[(1usize, 7usize, 3usize), (2, 33, 17), (3, 5, 300), (1, 70, 513), (2, 1, 4), (3, 9, 1)]
    {
        let n = outer * axis * inner;
        for level in SimdLevel::available() {
            let o = Options::default().simd(level);
            let xs: Vec<f32> = rng.vec(n, 20.0).iter().map(|&v| v as f32).collect();
            let l = Layout::axis(outer, axis, inner);
            let y = softmax_to_vec(View::new(&xs, l).unwrap(), &o).unwrap();
            let ls = log_softmax_to_vec(View::new(&xs, l).unwrap(), &o).unwrap();
            let s = logsumexp_to_vec(View::new(&xs, l).unwrap(), &o).unwrap();
            let mut yi = xs.clone();
            softmax_inplace(ViewMut::new(&mut yi, l).unwrap(), &o).unwrap();
            assert_eq!(y, yi);
            for ob in 0..outer {
                for j in 0..inner {
                    let col: Vec<f64> = (0..axis).map(|k| xs[ob * axis * inner + k * inner + j] as f64).collect();
                    let m = col.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let ry = ref_softmax(&col, 1.0);
                    let rl = ref_log_softmax(&col, 1.0);
                    for k in 0..axis {
                        let i = ob * axis * inner + k * inner + j;
                        let d = col[k] - m;
                        assert!(close(y[i] as f64, ry[k], softmax_bound::<f32>(ry[k], d.abs(), axis)));
                        assert!(close(ls[i] as f64, rl[k], log_softmax_bound::<f32>(rl[k], d.abs(), axis)));
                    }
                    let want = ref_lse(&col, 1.0);
                    assert!(close(s[ob * inner + j] as f64, want, lse_bound::<f32>(want, axis)));
                }
            }
        }
    }
    // Special columns in an axis layout.
    let ninf = f32::NEG_INFINITY;
    let x = [ninf, 1.0, f32::NAN, ninf, 2.0, 0.0];
    let l = Layout::axis(1, 2, 3);
    let y = softmax_to_vec(View::new(&x, l).unwrap(), &Options::default().masked_row(MaskedRow::Zero)).unwrap();
    assert_eq!(y[0], 0.0);
    assert_eq!(y[3], 0.0);
    assert!(y[2].is_nan() && y[5].is_nan());
    assert!((y[1] - 0.2689414).abs() < 1e-6 && (y[4] - 0.7310586).abs() < 1e-6);
    let s = logsumexp_to_vec(View::new(&x, l).unwrap(), &Options::default()).unwrap();
    assert_eq!(s[0], ninf);
    assert!(s[2].is_nan());
    // f64 in an axis layout.
    let xd: Vec<f64> = x.iter().map(|&v| v as f64).collect();
    let yd = softmax_to_vec(View::new(&xd, l).unwrap(), &Options::default().masked_row(MaskedRow::Zero)).unwrap();
    assert!((yd[1] - 0.2689414213699951).abs() < 1e-15 && yd[0] == 0.0 && yd[2].is_nan());
}

#[test]
fn bad_input_is_a_typed_error() {
    let x = [0.0f32; 10];
    let mut y = [0.0f32; 10];
    assert!(matches!(View::rows(&x, 3, 4), Err(Error::BufferTooShort { needed: 12, len: 10, .. })));
    assert!(matches!(
        View::new(&x, Layout::strided_rows(2, 4, 3)),
        Err(Error::StrideTooSmall { stride: 3, len: 4, .. })
    ));
    assert!(matches!(View::new(&x, Layout::rows(usize::MAX, 2)), Err(Error::SizeOverflow { .. })));
    let v = View::rows(&x, 2, 5).unwrap();
    let e = softmax(v, ViewMut::rows(&mut y, 5, 2).unwrap(), &Options::default());
    assert!(matches!(e, Err(Error::ShapeMismatch { .. })), "{e:?}");
    for t in [0.0, -1.0, f64::NAN, f64::INFINITY, 1e-300] {
        let e = softmax(v, ViewMut::rows(&mut y, 2, 5).unwrap(), &Options::default().temperature(t));
        assert!(matches!(e, Err(Error::BadParameter { name: "temperature", .. })), "{t}: {e:?}");
    }
    let mut out = [0.0f32; 3];
    assert!(matches!(
        logsumexp(v, &mut out, &Options::default()),
        Err(Error::RowCountMismatch { len: 3, rows: 2, .. })
    ));
    let msg = View::rows(&x, 3, 4).unwrap_err().to_string();
    assert!(msg.contains("10") && msg.contains("12"), "{msg}");
    // A row layout against an axis layout of the same size is a mismatch, not a panic.
    let e = softmax(
        View::new(&x, Layout::axis(1, 2, 5)).unwrap(),
        ViewMut::rows(&mut y, 2, 5).unwrap(),
        &Options::default(),
    );
    assert!(e.is_err());
    let mut yb = [0.0f32; 10];
    let e =
        softmax_backward(v, View::rows(&x, 5, 2).unwrap(), ViewMut::rows(&mut yb, 2, 5).unwrap(), &Options::default());
    assert!(matches!(e, Err(Error::ShapeMismatch { what: "dy", .. })));
}

#[test]
fn exp_sampled_ulp() {
    // A sampled sweep of the exp kernel at every level (the exhaustive one is in exp_exhaustive).
    let mut xs = Vec::new();
    let mut b = (-87.33654f32).to_bits();
    while f32::from_bits(b) < 0.0 {
        xs.push(f32::from_bits(b));
        b -= 997;
    }
    xs.extend([0.0, -0.0, -1e-30, -1e-45]);
    for level in SimdLevel::available() {
        let mut y = vec![0.0f32; xs.len()];
        math::exp_nonpositive(&xs, &mut y, Some(level)).unwrap();
        let worst = xs.iter().zip(&y).map(|(&x, &v)| ulp_err(x, v)).fold(0.0, f64::max);
        assert!(worst <= 2.0, "{level:?}: {worst} ULP");
    }
    let specials = [f32::NEG_INFINITY, f32::NAN, -88.0, -100.0, -1e30, 0.0];
    let mut y = [0.0f32; 6];
    math::exp_nonpositive(&specials, &mut y, None).unwrap();
    assert_eq!(y[0], 0.0);
    assert!(y[1].is_nan());
    assert_eq!(&y[2..], &[0.0, 0.0, 0.0, 1.0]);
}

pub fn ulp_err(x: f32, got: f32) -> f64 {
    let want = (x as f64).exp();
    let w32 = want as f32;
    let ulp = if w32 == 0.0 || w32 < f32::MIN_POSITIVE {
        2f64.powi(-149)
    } else {
        let b = w32.to_bits();
        (f32::from_bits(b + 1) as f64 - w32 as f64).abs().min((w32 as f64 - f32::from_bits(b - 1) as f64).abs())
    };
    (got as f64 - want).abs() / ulp
}

/// Out of place, the online algorithm runs as a software pipeline (the write pass of a row
/// carries the online pass of the next one); in place, and for a row alone, it runs row by
/// row. The three must agree bit for bit, at every SIMD level, for short rows of every tail
/// length, for long (chunked) rows, with special rows anywhere in the batch and with strided
/// input and output.
#[test]
fn pipelined_online_is_bitwise_the_row_by_row_result() {
    let mut rng = Rng(0xb17e);
    let chunk = 256 * 1024;
    let mut lens: Vec<usize> = (1..=40).collect();
    lens.extend([255, 256, 257, 1000, 4097, chunk + 1, 2 * chunk + 300]);
    let specials: [(usize, f32); 3] = [(1, f32::NAN), (2, f32::NEG_INFINITY), (3, f32::INFINITY)];
    for &n in &lens {
        let rows = if n > chunk { 3 } else { 6 };
        let (xs, ys) = (n + 3, n + 5);
        let mut x: Vec<f32> = rng.vec(rows * xs, 20.0).iter().map(|&v| v as f32).collect();
        // Row 1 holds a NaN, row 2 is fully masked, row 3 holds +inf; long batches keep row 1.
        for &(r, v) in &specials {
            if r < rows {
                if v == f32::NEG_INFINITY {
                    x[r * xs..r * xs + n].fill(v);
                } else {
                    x[r * xs + n / 2] = v;
                }
            }
        }
        for level in SimdLevel::available() {
            for masked in [MaskedRow::Nan, MaskedRow::Zero] {
                let o = Options::default().simd(level).algorithm(Algorithm::Online).masked_row(masked);
                let xl = Layout::strided_rows(rows, n, xs);
                let mut y = vec![0f32; rows * ys];
                let mut l = vec![0f32; rows * ys];
                softmax(
                    View::new(&x, xl).unwrap(),
                    ViewMut::new(&mut y, Layout::strided_rows(rows, n, ys)).unwrap(),
                    &o,
                )
                .unwrap();
                log_softmax(
                    View::new(&x, xl).unwrap(),
                    ViewMut::new(&mut l, Layout::strided_rows(rows, n, ys)).unwrap(),
                    &o,
                )
                .unwrap();
                let mut yi = x.clone();
                softmax_inplace(ViewMut::new(&mut yi, xl).unwrap(), &o).unwrap();
                let mut li = x.clone();
                log_softmax_inplace(ViewMut::new(&mut li, xl).unwrap(), &o).unwrap();
                for r in 0..rows {
                    let row = &x[r * xs..r * xs + n];
                    let alone = softmax_to_vec(View::rows(row, 1, n).unwrap(), &o).unwrap();
                    let lalone = log_softmax_to_vec(View::rows(row, 1, n).unwrap(), &o).unwrap();
                    let (got, lgot) = (&y[r * ys..r * ys + n], &l[r * ys..r * ys + n]);
                    let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(got), bits(&yi[r * xs..r * xs + n]), "softmax n={n} row {r} {level:?} {masked:?}");
                    assert_eq!(bits(got), bits(&alone), "softmax alone n={n} row {r} {level:?}");
                    assert_eq!(bits(lgot), bits(&li[r * xs..r * xs + n]), "log_softmax n={n} row {r} {level:?}");
                    assert_eq!(bits(lgot), bits(&lalone), "log_softmax alone n={n} row {r} {level:?}");
                }
                // And the pipelined rows are right, not merely consistent.
                let r0: Vec<f64> = x[..n].iter().map(|&v| v as f64).collect();
                let want = ref_softmax(&r0, 1.0);
                let m0 = r0.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                for i in 0..n {
                    let d = (r0[i] - m0).abs();
                    assert!(close(y[i] as f64, want[i], softmax_bound::<f32>(want[i], d, n)), "n={n} i={i}");
                }
                if rows > 2 {
                    let expect = if masked == MaskedRow::Zero { 0.0 } else { f32::NAN };
                    assert!(y[2 * ys..2 * ys + n].iter().all(|&v| v.to_bits() == expect.to_bits()), "masked row n={n}");
                    assert!(y[ys..ys + n].iter().all(|v| v.is_nan()), "NaN row n={n}");
                }
            }
        }
    }
}

/// Short f32 three-pass rows with a separate output run a group of rows at a time (the maxima
/// of the group, then its exponential passes, then its writes); logsumexp over short rows
/// likewise. Bit for bit the row-by-row result (in place, or a row alone) for every tail length
/// up to past the grouping limit, with special rows inside and across groups, strided rows,
/// both masked-row rules, a temperature, at every SIMD level; and within the reference's bound.
#[test]
fn grouped_short_rows_are_each_row_alone() {
    let mut rng = Rng(0x96a0);
    let mut lens: Vec<usize> = (1..=40).collect();
    lens.extend([63, 64, 65, 127, 128, 129, 255, 256, 257, 511, 512, 513, 1000, 1023, 1024, 1025, 2049]);
    let rows = 37;
    let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
    for &n in &lens {
        let (xs, ys) = (n + 3, n + 5);
        let mut x: Vec<f32> = rng.vec(rows * xs, 15.0).iter().map(|&v| v as f32).collect();
        for r in [1, 17] {
            x[r * xs + n / 2] = f32::NAN;
        }
        for r in [2, 20, 36] {
            x[r * xs..r * xs + n].fill(f32::NEG_INFINITY);
        }
        x[3 * xs + n - 1] = f32::INFINITY;
        let xl = Layout::strided_rows(rows, n, xs);
        let yl = Layout::strided_rows(rows, n, ys);
        for level in SimdLevel::available() {
            for (masked, tau) in [(MaskedRow::Nan, 1.0), (MaskedRow::Zero, 1.3)] {
                let o =
                    Options::default().simd(level).algorithm(Algorithm::ThreePass).masked_row(masked).temperature(tau);
                for log in [false, true] {
                    let mut y = vec![0f32; rows * ys];
                    let mut yi = x.clone();
                    if log {
                        log_softmax(View::new(&x, xl).unwrap(), ViewMut::new(&mut y, yl).unwrap(), &o).unwrap();
                        log_softmax_inplace(ViewMut::new(&mut yi, xl).unwrap(), &o).unwrap();
                    } else {
                        softmax(View::new(&x, xl).unwrap(), ViewMut::new(&mut y, yl).unwrap(), &o).unwrap();
                        softmax_inplace(ViewMut::new(&mut yi, xl).unwrap(), &o).unwrap();
                    }
                    for r in 0..rows {
                        let (got, want) = (&y[r * ys..r * ys + n], &yi[r * xs..r * xs + n]);
                        assert_eq!(bits(got), bits(want), "log={log} n={n} row {r} {level:?} {masked:?}");
                    }
                    let r0: Vec<f64> = x[..n].iter().map(|&v| v as f64).collect();
                    let m0 = r0.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let want = if log { ref_log_softmax(&r0, tau) } else { ref_softmax(&r0, tau) };
                    for i in 0..n {
                        let d = (r0[i] - m0).abs() / tau;
                        let tol = if log {
                            log_softmax_bound::<f32>(want[i], d, n)
                        } else {
                            softmax_bound::<f32>(want[i], d, n)
                        };
                        assert!(close(y[i] as f64, want[i], tol), "log={log} n={n} i={i} {level:?}");
                    }
                    let masked_fill = match (masked, log) {
                        (MaskedRow::Zero, false) => 0.0,
                        (MaskedRow::Zero, true) => f32::NEG_INFINITY,
                        _ => f32::NAN,
                    };
                    assert!(y[20 * ys..20 * ys + n].iter().all(|v| v.to_bits() == masked_fill.to_bits()), "n={n}");
                    assert!(
                        y[17 * ys..17 * ys + n].iter().all(|v| v.is_nan())
                            && y[3 * ys..3 * ys + n].iter().all(|v| v.is_nan())
                    );
                }
                for alg in [Algorithm::Auto, Algorithm::ThreePass] {
                    let o = o.algorithm(alg);
                    let s = logsumexp_to_vec(View::new(&x, xl).unwrap(), &o).unwrap();
                    for r in 0..rows {
                        let alone = logsumexp_to_vec(View::rows(&x[r * xs..r * xs + n], 1, n).unwrap(), &o).unwrap();
                        assert_eq!(s[r].to_bits(), alone[0].to_bits(), "lse n={n} row {r} {level:?} {alg:?}");
                    }
                    assert!(s[1].is_nan() && s[2] == f32::NEG_INFINITY && s[3] == f32::INFINITY, "lse n={n}");
                    let r0: Vec<f64> = x[..n].iter().map(|&v| v as f64).collect();
                    let want = ref_lse(&r0, tau);
                    assert!(close(s[0] as f64, want, lse_bound::<f32>(want, n)), "lse n={n} {level:?}");
                }
            }
        }
    }
}

/// `Auto` picks by op and row length alone: three-pass up to 4 Ki elements for softmax and
/// 1 Ki for log-softmax, the pipelined online algorithm above (logsumexp: three-pass up to
/// 4 Ki). A large call (its output streamed) agrees bit for bit with the unpipelined online
/// result, with each row computed alone, and with the reference.
#[test]
fn auto_picks_by_row_length_and_pipelines_long_rows() {
    assert_eq!(Algorithm::Auto.resolve(4 * 1024), Algorithm::ThreePass);
    assert_eq!(Algorithm::Auto.resolve(4 * 1024 + 1), Algorithm::Online);
    assert_eq!(Algorithm::Auto.resolve(1 << 24), Algorithm::Online);
    assert_eq!(Algorithm::Auto.resolve_log_softmax(1024), Algorithm::ThreePass);
    assert_eq!(Algorithm::Auto.resolve_log_softmax(1025), Algorithm::Online);
    assert_eq!(Algorithm::Online.resolve_log_softmax(7), Algorithm::Online);
    assert_eq!(Algorithm::Auto.resolve_logsumexp(4 * 1024), Algorithm::ThreePass);
    assert_eq!(Algorithm::Auto.resolve_logsumexp(4 * 1024 + 1), Algorithm::Online);
    assert_eq!(Algorithm::ThreePass.resolve(1 << 24), Algorithm::ThreePass);
    assert_eq!(Algorithm::TwoPass.resolve_logsumexp(7), Algorithm::TwoPass);

    // 64 rows of 128 Ki f32: a 32 MiB output, written with non-temporal stores.
    let (rows, n) = (64, 128 * 1024);
    let mut rng = Rng(0x1a29e);
    let x: Vec<f32> = rng.vec(rows * n, 8.0).iter().map(|&v| v as f32).collect();
    let y = softmax_to_vec(View::rows(&x, rows, n).unwrap(), &Options::default()).unwrap();
    let mut yi = x.clone();
    let online = Options::default().algorithm(Algorithm::Online);
    softmax_inplace(ViewMut::rows(&mut yi, rows, n).unwrap(), &online).unwrap();
    assert!(y.iter().zip(&yi).all(|(a, b)| a.to_bits() == b.to_bits()));
    for r in [0, 31, 63] {
        let alone = softmax_to_vec(View::rows(&x[r * n..(r + 1) * n], 1, n).unwrap(), &Options::default()).unwrap();
        assert!(alone.iter().zip(&y[r * n..]).all(|(a, b)| a.to_bits() == b.to_bits()), "row {r} alone");
        let row: Vec<f64> = x[r * n..(r + 1) * n].iter().map(|&v| v as f64).collect();
        let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let want = ref_softmax(&row, 1.0);
        for i in (0..n).step_by(97) {
            let d = (row[i] - m).abs();
            assert!(close(y[r * n + i] as f64, want[i], softmax_bound::<f32>(want[i], d, n)));
        }
    }
}

/// Three-pass calls with a streamed output and rows of at least 1 Ki run as a pipeline (the
/// finish of row r carries the max pass of row r + 1): bit for bit each row computed alone
/// (a small call, unpipelined), for softmax and log-softmax, with special rows in the batch,
/// strided rows, and a temperature; and within the bound of the reference. Two row lengths:
/// one just above the threshold and one past the 4 Ki prefetch distance.
#[test]
fn pipelined_three_pass_is_each_row_alone() {
    let mut rng = Rng(0x3a55);
    // 2100 rows of 4109 or 8200 rows of 1030: a 33 MB output (streamed from 32 MiB).
    for (rows, n, xs) in [(2100, 4096 + 13, 4096 + 20), (8200, 1024 + 6, 1024 + 13)] {
        pipelined_three_pass_case(&mut rng, rows, n, xs);
    }
}

fn pipelined_three_pass_case(rng: &mut Rng, rows: usize, n: usize, xs: usize) {
    let mut x: Vec<f32> = rng.vec(rows * xs, 9.0).iter().map(|&v| v as f32).collect();
    x[3 * xs + 17] = f32::NAN;
    x[4 * xs..4 * xs + n].fill(f32::NEG_INFINITY);
    x[5 * xs + n - 1] = f32::INFINITY;
    for log in [false, true] {
        let o = Options::default().algorithm(Algorithm::ThreePass).temperature(1.3);
        let xv = View::new(&x, Layout::strided_rows(rows, n, xs)).unwrap();
        let y = if log { log_softmax_to_vec(xv, &o) } else { softmax_to_vec(xv, &o) }.unwrap();
        for r in [0, 2, 3, 4, 5, 6, 700, rows - 1] {
            let xr = &x[r * xs..r * xs + n];
            let v = View::rows(xr, 1, n).unwrap();
            let alone = if log { log_softmax_to_vec(v, &o) } else { softmax_to_vec(v, &o) }.unwrap();
            let same = alone.iter().zip(&y[r * n..]).all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "log={log} row {r}");
        }
        assert!(y[3 * n..4 * n].iter().all(|v| v.is_nan()), "log={log} NaN row");
        let row: Vec<f64> = x[700 * xs..700 * xs + n].iter().map(|&v| v as f64).collect();
        let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let (want, got) = (if log { ref_log_softmax(&row, 1.3) } else { ref_softmax(&row, 1.3) }, &y[700 * n..701 * n]);
        for i in 0..n {
            let d = (row[i] - m).abs() / 1.3;
            let tol = if log { log_softmax_bound::<f32>(want[i], d, n) } else { softmax_bound::<f32>(want[i], d, n) };
            assert!(close(got[i] as f64, want[i], tol), "log={log} i={i}");
        }
    }
}

/// Logsumexp of a batch of long (chunked) rows, computed in one parallel pass over every chunk
/// of every row, equals each row computed alone bit for bit, special rows included.
#[test]
fn long_row_logsumexp_batch_matches_rows_alone() {
    let mut rng = Rng(0x15e);
    let n = 2 * 256 * 1024 + 77;
    let rows = 4;
    let mut x: Vec<f32> = rng.vec(rows * n, 30.0).iter().map(|&v| v as f32).collect();
    x[n + 5] = f32::NAN;
    x[2 * n..3 * n].fill(f32::NEG_INFINITY);
    for alg in ALGS {
        let o = Options::default().algorithm(alg);
        let s = logsumexp_to_vec(View::rows(&x, rows, n).unwrap(), &o).unwrap();
        for r in 0..rows {
            let alone = logsumexp_to_vec(View::rows(&x[r * n..(r + 1) * n], 1, n).unwrap(), &o).unwrap();
            assert_eq!(s[r].to_bits(), alone[0].to_bits(), "{alg:?} row {r}");
        }
        assert!(s[1].is_nan() && s[2] == f32::NEG_INFINITY, "{alg:?}");
        let row: Vec<f64> = x[3 * n..].iter().map(|&v| v as f64).collect();
        let want = ref_lse(&row, 1.0);
        assert!(close(s[3] as f64, want, lse_bound::<f32>(want, n)), "{alg:?}");
    }
}

/// Calls with many long rows pipeline groups of consecutive rows on one thread each (the chunk
/// states of each row still merge in chunk order): bit for bit the in-place (row by row,
/// chunks in parallel) result and each row alone, special rows included, at every SIMD level.
#[test]
fn grouped_long_rows_match_rows_alone() {
    let (rows, n) = (32, 256 * 1024 + 3);
    let mut rng = Rng(0x9a0);
    let mut x: Vec<f32> = rng.vec(rows * n, 12.0).iter().map(|&v| v as f32).collect();
    x[5 * n + 7] = f32::NAN;
    x[9 * n..10 * n].fill(f32::NEG_INFINITY);
    x[31 * n + n - 1] = f32::INFINITY;
    for level in SimdLevel::available() {
        let o = Options::default().simd(level);
        let y = softmax_to_vec(View::rows(&x, rows, n).unwrap(), &o).unwrap();
        let l = log_softmax_to_vec(View::rows(&x, rows, n).unwrap(), &o).unwrap();
        let mut yi = x.clone();
        softmax_inplace(ViewMut::rows(&mut yi, rows, n).unwrap(), &o).unwrap();
        assert!(y.iter().zip(&yi).all(|(a, b)| a.to_bits() == b.to_bits()), "{level:?}");
        for r in [0, 5, 9, 10, 31] {
            let row = &x[r * n..(r + 1) * n];
            let alone = log_softmax_to_vec(View::rows(row, 1, n).unwrap(), &o).unwrap();
            assert!(alone.iter().zip(&l[r * n..]).all(|(a, b)| a.to_bits() == b.to_bits()), "{level:?} row {r}");
        }
        assert!(y[5 * n..6 * n].iter().all(|v| v.is_nan()) && y[9 * n..10 * n].iter().all(|v| v.is_nan()));
        let r0: Vec<f64> = x[..n].iter().map(|&v| v as f64).collect();
        let want = ref_log_softmax(&r0, 1.0);
        let m0 = r0.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        for i in (0..n).step_by(101) {
            assert!(close(l[i] as f64, want[i], log_softmax_bound::<f32>(want[i], (r0[i] - m0).abs(), n)));
        }
    }
}

/// Empty rows with a row stride and an empty buffer (README §0.1: an empty row's log-sum-exp is
/// `-inf`, its softmax is empty): every entry point that walks rows treats them as empty rows
/// at offset 0, whatever the stride.
#[test]
fn empty_strided_rows_are_empty_rows() {
    let empty: [f32; 0] = [];
    let x = View::new(&empty[..], Layout::strided_rows(2, 0, 1)).unwrap();
    let lse = logsumexp_to_vec(x, &Options::default()).unwrap();
    assert_eq!(lse, vec![f32::NEG_INFINITY; 2]);
    let empty64: [f64; 0] = [];
    let x64 = View::new(&empty64[..], Layout::strided_rows(2, 0, 3)).unwrap();
    assert_eq!(logsumexp_to_vec(x64, &Options::default()).unwrap(), vec![f64::NEG_INFINITY; 2]);
    let mut out: [f32; 0] = [];
    softmax(x, ViewMut::new(&mut out[..], Layout::strided_rows(2, 0, 5)).unwrap(), &Options::default()).unwrap();
    assert_eq!(smax::loss::softmax_collapse_fraction(x).unwrap(), 0.0);
    let mut scores = [0.0f64; 2];
    let opts = smax::calibrate::OodOptions { score: smax::calibrate::OodScore::MaxLogit, ..Default::default() };
    smax::calibrate::ood_scores(x, &mut scores, &opts).unwrap();
    assert!(scores.iter().all(|&s| s == f64::NEG_INFINITY), "{scores:?}");
}

#[test]
fn two_pass_rows_with_entries_far_below_the_max() {
    // Found by the `normalizers` fuzz target: the two-pass first pass took `exp` of every
    // scaled entry in its extended form, valid only for |x/τ| < 2^22, and checked only the
    // row's max against that range, so one entry far below the max (here −4.8e30 after τ)
    // made the whole row NaN. Such entries now contribute their (zero) share exactly.
    let mut rows: Vec<Vec<f32>> = vec![
        std::iter::once(-2.4e30).chain(std::iter::repeat_n(0.0, 36)).collect(),
        vec![-5.0e6, 0.0, 1.0],
        vec![1.0, -3.0e38, 2.0, -4.3e6, 0.5],
        vec![-4.19e6, -4.1e6, -4.0e6],
    ];
    rows.push((0..300).map(|i| if i % 7 == 0 { -1e20 } else { (i % 5) as f32 }).collect());
    for tau in [0.5, 1.0, 1e-3] {
        for x in &rows {
            let n = x.len();
            let xv = View::rows(x, 1, n).unwrap();
            for level in SimdLevel::available() {
                let two = Options { temperature: tau, algorithm: Algorithm::TwoPass, ..Default::default() }.simd(level);
                let online = Options { algorithm: Algorithm::Online, ..two };
                let (a, b) = (softmax_to_vec(xv, &two).unwrap(), softmax_to_vec(xv, &online).unwrap());
                assert!(a.iter().all(|v| v.is_finite()), "τ {tau} {level:?}: {a:?}");
                for (p, q) in a.iter().zip(&b) {
                    assert!((p - q).abs() <= 1e-6 * q.abs().max(1e-30), "τ {tau} {level:?}: two-pass {p} online {q}");
                }
                let (l2, l1) = (logsumexp_to_vec(xv, &two).unwrap()[0], logsumexp_to_vec(xv, &online).unwrap()[0]);
                assert!((l2 - l1).abs() <= 1e-6 * l1.abs().max(1.0), "τ {tau} {level:?}: lse {l2} vs {l1}");
            }
        }
    }
}

#[test]
fn layout_for_axis_collapses_the_other_axes() {
    use smax::Layout;
    assert_eq!(Layout::for_axis(&[3, 5, 7], 2).unwrap(), Layout::rows(15, 7));
    assert_eq!(Layout::for_axis(&[3, 5, 7], 1).unwrap(), Layout::axis(3, 5, 7));
    assert_eq!(Layout::for_axis(&[3, 5, 7], 0).unwrap(), Layout::axis(1, 3, 35));
    assert_eq!(Layout::for_axis(&[4, 6, 1, 1], 1).unwrap(), Layout::rows(4, 6));
    assert!(matches!(Layout::for_axis(&[3, 5], 2), Err(smax::Error::BadParameter { .. })));
    assert!(matches!(Layout::for_axis(&[usize::MAX, 2, 3], 2), Err(smax::Error::SizeOverflow { .. })));
    // Softmax over axis 1 through it equals softmax of the transposed rows.
    let x: Vec<f32> = (0..24).map(|i| ((i * 7) % 11) as f32 * 0.5).collect();
    let y = smax::softmax_to_vec(
        smax::View::new(&x, Layout::for_axis(&[2, 3, 4], 1).unwrap()).unwrap(),
        &Options::default(),
    )
    .unwrap();
    for o in 0..2 {
        for i in 0..4 {
            let col: Vec<f32> = (0..3).map(|k| x[o * 12 + k * 4 + i]).collect();
            let want = smax::softmax_to_vec(smax::View::rows(&col, 1, 3).unwrap(), &Options::default()).unwrap();
            for k in 0..3 {
                assert_eq!(y[o * 12 + k * 4 + i], want[k]);
            }
        }
    }
}
