//! The sharded cross-entropies against the whole-vocabulary ones: the vocabulary cut into
//! uneven shards (one of them empty), each shard on its own thread, the combiner exchanging
//! the shards' rows through shared memory and merging them in shard order (what `smax-mpi`
//! does over MPI). `cross_entropy` itself is checked against the f64 formulas elsewhere.

mod common;

use common::Rng;
use half::{bf16, f16};
use smax::loss::{
    AllIgnored, CrossEntropyOptions, Reduction, RowOutputs, ShardRow, Targets, VocabShard, cross_entropy,
    cross_entropy_sharded,
};
use smax::{Element, Error, View, ViewMut};
use std::sync::{Barrier, Mutex};

struct Out {
    loss: f64,
    z: f64,
    rows: Vec<f64>,
    lse: Vec<f64>,
    grad: Vec<f64>,
}

fn whole<T: Element>(x: &[T], rows: usize, v: usize, y: &[i64], o: &CrossEntropyOptions) -> Out {
    let mut g = vec![T::from_f64(0.0); rows * v];
    let (mut l, mut lse) = (vec![0.0; rows], vec![0.0; rows]);
    let r = cross_entropy(
        View::rows(x, rows, v).unwrap(),
        Targets::Classes(y),
        Some(ViewMut::rows(&mut g, rows, v).unwrap()),
        RowOutputs { loss: Some(&mut l), lse: Some(&mut lse), ..Default::default() },
        o,
    )
    .unwrap();
    Out { loss: r.loss, z: r.z_loss, rows: l, lse, grad: g.iter().map(|v| v.to_f64()).collect() }
}

/// Every shard's result, the gradient gathered back into whole rows.
fn sharded<T: Element>(
    x: &[T],
    rows: usize,
    v: usize,
    y: &[i64],
    bounds: &[usize],
    o: &CrossEntropyOptions,
) -> Vec<Out> {
    let parts = bounds.len() - 1;
    let exchange: Mutex<Vec<Vec<ShardRow>>> = Mutex::new(vec![Vec::new(); parts]);
    let barrier = Barrier::new(parts);
    type ShardOut<T> = (smax::loss::LossReport, Vec<f64>, Vec<f64>, Vec<T>);
    let res: Vec<ShardOut<T>> = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..parts)
            .map(|s| {
                let (lo, hi) = (bounds[s], bounds[s + 1]);
                let (exchange, barrier) = (&exchange, &barrier);
                sc.spawn(move || {
                    let w = hi - lo;
                    let xs: Vec<T> = (0..rows).flat_map(|r| x[r * v + lo..r * v + hi].to_vec()).collect();
                    let mut g = vec![T::from_f64(0.0); rows * w];
                    let (mut l, mut lse) = (vec![0.0; rows], vec![0.0; rows]);
                    let mut combine = |r: &mut [ShardRow]| {
                        exchange.lock().unwrap()[s] = r.to_vec();
                        barrier.wait();
                        let all = exchange.lock().unwrap().clone();
                        barrier.wait();
                        for (i, out) in r.iter_mut().enumerate() {
                            *out = ShardRow::merge(all.iter().map(|rows| rows[i]).collect::<Vec<_>>());
                        }
                        Ok(())
                    };
                    let rep = cross_entropy_sharded(
                        View::rows(&xs, rows, w).unwrap(),
                        Targets::Classes(y),
                        Some(ViewMut::rows(&mut g, rows, w).unwrap()),
                        RowOutputs { loss: Some(&mut l), lse: Some(&mut lse), ..Default::default() },
                        VocabShard { start: lo, total: v, combine: &mut combine },
                        o,
                    )
                    .unwrap();
                    (rep, l, lse, g)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut grad = vec![0.0f64; rows * v];
    for (s, r) in res.iter().enumerate() {
        let (lo, hi) = (bounds[s], bounds[s + 1]);
        for row in 0..rows {
            for j in lo..hi {
                grad[row * v + j] = r.3[row * (hi - lo) + j - lo].to_f64();
            }
        }
    }
    res.iter()
        .map(|r| Out { loss: r.0.loss, z: r.0.z_loss, rows: r.1.clone(), lse: r.2.clone(), grad: grad.clone() })
        .collect()
}

fn close(a: f64, b: f64, tol: f64) -> bool {
    a == b || (a.is_nan() && b.is_nan()) || (a - b).abs() <= tol * (1.0 + b.abs())
}

/// `tol` relative for the losses; the gradient within `gtol` of its largest entry.
#[allow(clippy::too_many_arguments)]
fn check<T: Element>(
    x: &[T],
    rows: usize,
    v: usize,
    y: &[i64],
    o: &CrossEntropyOptions,
    tol: f64,
    gtol: f64,
    what: &str,
) {
    let want = whole(x, rows, v, y, o);
    let gmax = want.grad.iter().filter(|g| g.is_finite()).fold(1e-30f64, |m, g| m.max(g.abs()));
    let splits: Vec<Vec<usize>> =
        vec![vec![0, v], vec![0, v / 3, v], vec![0, 0, v / 2, v], vec![0, 1, v / 4, v / 2 + 3, v]];
    for b in &splits {
        let got = sharded(x, rows, v, y, b, o);
        for (s, g) in got.iter().enumerate() {
            let ctx = format!("{what}, shards {b:?}, shard {s}");
            assert!(close(g.loss, want.loss, tol), "{ctx}: loss {} vs {}", g.loss, want.loss);
            assert!(close(g.z, want.z, tol), "{ctx}: z-loss {} vs {}", g.z, want.z);
            assert_eq!(g.loss.to_bits(), got[0].loss.to_bits(), "{ctx}: shards disagree");
            for r in 0..rows {
                assert!(close(g.rows[r], want.rows[r], tol), "{ctx}: row {r} loss {} vs {}", g.rows[r], want.rows[r]);
                assert!(close(g.lse[r], want.lse[r], tol), "{ctx}: row {r} lse {} vs {}", g.lse[r], want.lse[r]);
            }
            for (i, (a, b)) in g.grad.iter().zip(&want.grad).enumerate() {
                assert!(
                    (a.is_nan() && b.is_nan()) || (a - b).abs() <= gtol * gmax,
                    "{ctx}: grad[{}][{}] {a} vs {b}",
                    i / v,
                    i % v
                );
            }
        }
    }
}

fn cases(v: usize, weights: &[f32]) -> Vec<(&'static str, CrossEntropyOptions<'_>)> {
    let base = CrossEntropyOptions::default();
    let _ = v;
    vec![
        ("default", base),
        ("smoothing", base.label_smoothing(0.1)),
        ("weights", CrossEntropyOptions { class_weights: Some(weights), ..base }),
        ("weights + smoothing", CrossEntropyOptions { class_weights: Some(weights), label_smoothing: 0.2, ..base }),
        ("temperature", base.temperature(0.6)),
        ("softcap", base.softcap(4.0).temperature(1.3)),
        ("z-loss", base.z_loss(1e-3)),
        ("sum, grad scale", base.reduction(Reduction::Sum).grad_scale(0.5)),
        ("none", base.reduction(Reduction::None)),
        ("ignore index 0", base.ignore_index(0)),
    ]
}

fn problem(rng: &mut Rng, rows: usize, v: usize) -> (Vec<f64>, Vec<i64>, Vec<f32>) {
    let mut x = rng.vec(rows * v, 6.0);
    x[2 * v + 5] = 30.0; // a dominant logit
    x[3 * v..3 * v + v / 2].fill(f64::NEG_INFINITY); // half a row masked (whole shards of it)
    let mut y: Vec<i64> = (0..rows).map(|_| (rng.next_u64() % v as u64) as i64).collect();
    y[1] = -100;
    y[3] = (v - 1) as i64;
    y[4] = 0;
    let w: Vec<f32> = (0..v).map(|k| 0.5 + (k % 5) as f32 * 0.3).collect();
    (x, y, w)
}

#[test]
fn shards_agree_with_the_whole_vocabulary() {
    let mut rng = Rng(0x5a4d_c0de);
    for &(rows, v) in &[(9usize, 37usize), (70, 300)] {
        let (x, y, w) = problem(&mut rng, rows, v);
        let f32s: Vec<f32> = x.iter().map(|&v| v as f32).collect();
        let f16s: Vec<f16> = x.iter().map(|&v| f16::from_f64(v)).collect();
        let bf16s: Vec<bf16> = x.iter().map(|&v| bf16::from_f64(v)).collect();
        for (name, o) in cases(v, &w) {
            // With ignore index 0, class 0 is the ignored one (rows 1 and 4 here): a shard
            // whose local index 0 is another class must not take it for the ignore index.
            let y: Vec<i64> = y.iter().map(|&t| if t == -100 { o.ignore_index } else { t }).collect();
            check(&f32s, rows, v, &y, &o, 2e-6, 2e-6, &format!("f32 {name}"));
            check(&x, rows, v, &y, &o, 1e-12, 1e-12, &format!("f64 {name}"));
            check(&f16s, rows, v, &y, &o, 2e-6, 2e-3, &format!("f16 {name}"));
            check(&bf16s, rows, v, &y, &o, 2e-6, 1e-2, &format!("bf16 {name}"));
        }
    }
}

#[test]
fn special_rows_as_the_whole_call() {
    let (rows, v) = (6usize, 20usize);
    let mut rng = Rng(11);
    let mut x: Vec<f32> = rng.vec(rows * v, 3.0).iter().map(|&v| v as f32).collect();
    x[..v].fill(f32::NEG_INFINITY); // every logit masked: +inf loss, zero gradient
    x[v + 13] = f32::NAN; // NaN: NaN loss and gradient
    x[2 * v + 4] = f32::INFINITY; // +inf without a cap: NaN
    x[3 * v + 7] = f32::NEG_INFINITY; // the target's logit masked: +inf loss
    x[4 * v + 2] = 3.0e38; // overflows f32 at temperature 0.1: the f64 path
    let y = [3i64, 5, 6, 7, 2, 9];
    let base = CrossEntropyOptions::default();
    for (name, o) in [
        ("none", base.reduction(Reduction::None)),
        ("z-loss", base.reduction(Reduction::None).z_loss(1e-2)),
        ("softcap", base.reduction(Reduction::None).softcap(5.0)),
        ("temperature 0.1", base.reduction(Reduction::None).temperature(0.1)),
    ] {
        check(&x, rows, v, &y, &o, 2e-6, 2e-6, name);
    }
    // Every row ignored: the mean's all-ignored value, zero gradients.
    for all_ignored in [AllIgnored::Zero, AllIgnored::Nan] {
        let o = CrossEntropyOptions { all_ignored, ..base };
        check(&x, rows, v, &[-100; 6], &o, 2e-6, 0.0, "every row ignored");
    }
}

#[test]
fn shard_errors() {
    let x = [0.5f32; 8];
    let run = |start: usize, total: usize, y: &[i64], w: Option<&[f32]>, fail: bool| {
        let mut combine = |_: &mut [ShardRow]| {
            if fail {
                Err(Error::BadParameter { name: "peer", value: "gone".into(), expected: "alive" })
            } else {
                Ok(())
            }
        };
        let o = CrossEntropyOptions { class_weights: w, ..Default::default() };
        cross_entropy_sharded(
            View::rows(&x, 2, 4).unwrap(),
            Targets::Classes(y),
            None,
            RowOutputs::default(),
            VocabShard { start, total, combine: &mut combine },
            &o,
        )
    };
    assert!(run(4, 10, &[0, 9], None, false).is_ok());
    assert!(matches!(run(7, 10, &[0, 1], None, false), Err(Error::BadParameter { name: "shard", .. })));
    assert!(matches!(run(usize::MAX, 10, &[0, 1], None, false), Err(Error::BadParameter { name: "shard", .. })));
    assert!(matches!(
        run(0, 10, &[0, 10], None, false),
        Err(Error::TargetOutOfRange { row: 1, target: 10, classes: 10 })
    ));
    assert!(matches!(
        run(0, 10, &[0, 1], Some(&[1.0; 4]), false),
        Err(Error::LengthMismatch { what: "class_weights", .. })
    ));
    assert!(matches!(run(0, 10, &[0, 1], None, true), Err(Error::BadParameter { name: "peer", .. })));
    let q = [0.25f32; 8];
    let mut combine = |_: &mut [ShardRow]| Ok(());
    let e = cross_entropy_sharded(
        View::rows(&x, 2, 4).unwrap(),
        Targets::Probs(View::rows(&q, 2, 4).unwrap()),
        None,
        RowOutputs::default(),
        VocabShard { start: 0, total: 4, combine: &mut combine },
        &CrossEntropyOptions::default(),
    );
    assert!(matches!(e, Err(Error::Unsupported { .. })));
}
