//! Linear cross-entropy against the materialized path: logits formed in f64, then smax's f64
//! `cross_entropy` (itself checked against the formulas and finite differences), then the
//! gradient products in f64.

mod common;

use common::Rng;
use smax::loss::{
    AllIgnored, CrossEntropyOptions, LinearCeScratch, LinearCrossEntropyOptions, LinearGrads, LinearInputs,
    LinearShape, LinearTiles, Reduction, RowOutputs, ShardRow, Targets, VocabShard, cross_entropy,
    linear_cross_entropy, linear_cross_entropy_scratch_bytes, linear_cross_entropy_sharded,
};
use smax::{Error, Par, View, ViewMut};

struct Out {
    loss: f64,
    z: f64,
    rows: Vec<f64>,
    lse: Vec<f64>,
    dh: Vec<f64>,
    dw: Vec<f64>,
    db: Vec<f64>,
}

struct Problem {
    n: usize,
    d: usize,
    v: usize,
    h: Vec<f32>,
    w: Vec<f32>,
    b: Vec<f32>,
    y: Vec<i64>,
}

fn problem(rng: &mut Rng, n: usize, d: usize, v: usize) -> Problem {
    let f = |x: Vec<f64>| x.iter().map(|&v| v as f32).collect::<Vec<f32>>();
    Problem {
        n,
        d,
        v,
        h: f(rng.vec(n * d, 1.0)),
        w: f(rng.vec(v * d, 3.0 / (d as f64).sqrt())),
        b: f(rng.vec(v, 0.5)),
        y: (0..n).map(|i| if i % 5 == 3 { -100 } else { (rng.next_u64() % v as u64) as i64 }).collect(),
    }
}

fn materialized(p: &Problem, bias: bool, o: &LinearCrossEntropyOptions) -> Out {
    let (n, d, v) = (p.n, p.d, p.v);
    let mut z = vec![0.0f64; n * v];
    for i in 0..n {
        for j in 0..v {
            let mut acc = 0.0f64;
            for kk in 0..d {
                acc += p.h[i * d + kk] as f64 * p.w[j * d + kk] as f64;
            }
            z[i * v + j] = acc + if bias { p.b[j] as f64 } else { 0.0 };
        }
    }
    let mut g = vec![0.0f64; n * v];
    let (mut rows, mut lse) = (vec![0.0; n], vec![0.0; n]);
    let mut ce = CrossEntropyOptions::default()
        .reduction(o.reduction)
        .label_smoothing(o.label_smoothing)
        .z_loss(o.z_loss)
        .grad_scale(o.grad_scale)
        .ignore_index(o.ignore_index);
    if let Some(c) = o.softcap {
        ce = ce.softcap(c);
    }
    let r = cross_entropy(
        View::rows(&z, n, v).unwrap(),
        Targets::Classes(&p.y),
        Some(ViewMut::rows(&mut g, n, v).unwrap()),
        RowOutputs { loss: Some(&mut rows), lse: Some(&mut lse), ..Default::default() },
        &ce,
    )
    .unwrap();
    let mut dh = vec![0.0f64; n * d];
    let mut dw = vec![0.0f64; v * d];
    let mut db = vec![0.0f64; v];
    for i in 0..n {
        for j in 0..v {
            let gij = g[i * v + j];
            db[j] += gij;
            for kk in 0..d {
                dh[i * d + kk] += gij * p.w[j * d + kk] as f64;
                dw[j * d + kk] += gij * p.h[i * d + kk] as f64;
            }
        }
    }
    Out { loss: r.loss, z: r.z_loss, rows, lse, dh, dw, db }
}

fn fused(p: &Problem, bias: bool, o: &LinearCrossEntropyOptions) -> Out {
    let (n, d, v) = (p.n, p.d, p.v);
    let mut dh = vec![0.0f32; n * d];
    let mut dw = vec![0.0f32; v * d];
    let mut db = vec![0.0f32; v];
    let (mut rows, mut lse) = (vec![0.0; n], vec![0.0; n]);
    let r = linear_cross_entropy(
        LinearShape { n, d, v },
        LinearInputs { h: &p.h, w: &p.w, bias: if bias { Some(&p.b) } else { None }, targets: &p.y },
        LinearGrads { dh: Some(&mut dh), dw: Some(&mut dw), dbias: Some(&mut db) },
        RowOutputs { loss: Some(&mut rows), lse: Some(&mut lse), ..Default::default() },
        None,
        o,
    )
    .unwrap();
    let f = |x: Vec<f32>| x.iter().map(|&v| v as f64).collect();
    Out { loss: r.loss, z: r.z_loss, rows, lse, dh: f(dh), dw: f(dw), db: f(db) }
}

/// f32 logits carry about `d·2⁻²⁴` relative error from the products; everything after them
/// follows cross_entropy's bounds. Gradients are compared against the largest entry of each.
fn compare(got: &Out, want: &Out, d: usize, what: &str) {
    let tol = 4e-7 * (d as f64).sqrt() + 2e-6;
    let close = |a: f64, b: f64, scale: f64, name: &str| {
        assert!((a - b).abs() <= tol * (scale + b.abs()), "{what}: {name} {a} vs {b}");
    };
    close(got.loss, want.loss, 1.0, "loss");
    close(got.z, want.z, 1.0, "z");
    for i in 0..want.rows.len() {
        close(got.rows[i], want.rows[i], 1.0, "row loss");
        close(got.lse[i], want.lse[i], 1.0, "lse");
    }
    for (name, a, b) in [("dh", &got.dh, &want.dh), ("dw", &got.dw, &want.dw), ("db", &got.db, &want.db)] {
        let scale = b.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        for (x, y) in a.iter().zip(b.iter()) {
            close(*x, *y, scale, name);
        }
    }
}

#[test]
fn agrees_with_materialized_cross_entropy() {
    let mut rng = Rng(0x11ea);
    for &(n, d, v, tiles) in &[
        (9, 5, 13, LinearTiles { tokens: 4, vocab: 5 }),
        (33, 32, 70, LinearTiles { tokens: 16, vocab: 32 }),
        (70, 24, 300, LinearTiles::default()),
        (20, 8, 1100, LinearTiles { tokens: 7, vocab: 1030 }),
    ] {
        let p = problem(&mut rng, n, d, v);
        for red in [Reduction::Mean, Reduction::Sum, Reduction::None] {
            for eps in [0.0, 0.1] {
                for lambda in [0.0, 1e-2] {
                    for cap in [None, Some(2.0)] {
                        for bias in [false, true] {
                            let o = LinearCrossEntropyOptions {
                                reduction: red,
                                label_smoothing: eps,
                                z_loss: lambda,
                                softcap: cap,
                                tiles,
                                ..Default::default()
                            };
                            let what =
                                format!("n={n} d={d} v={v} {red:?} eps={eps} z={lambda} cap={cap:?} bias={bias}");
                            compare(&fused(&p, bias, &o), &materialized(&p, bias, &o), d, &what);
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn worked_example_l9() {
    let p = Problem {
        n: 3,
        d: 2,
        v: 4,
        h: vec![1.0, 0.0, 0.5, 0.5, 2.0, -1.0],
        w: vec![1.0, 1.0, 2.0, 0.0, -1.0, 0.5, 0.0, -2.0],
        b: vec![0.0; 4],
        y: vec![1, 0, 2],
    };
    let o = LinearCrossEntropyOptions { tiles: LinearTiles { tokens: 2, vocab: 2 }, ..Default::default() };
    let r = fused(&p, false, &o);
    let close = |a: f64, b: f64| assert!((a - b).abs() <= 1e-6 * (1.0 + b.abs()), "{a} vs {b}");
    close(r.loss, 2.6652770410404996);
    for (a, b) in r.lse.iter().zip([2.4401896986, 1.8845276149, 4.1711138096]) {
        close(*a, b);
    }
    for (a, b) in r.rows.iter().zip([0.4401896986, 0.8845276149, 6.6711138096]) {
        close(*a, b);
    }
    let de = [-0.1691157551, 0.0262078274, 0.0401423592, -0.2132343173, 0.9087137229, -0.2285035659];
    for (a, b) in r.dh.iter().zip(de) {
        close(*a, b);
    }
    let dc = [
        0.0090836959,
        -0.1118340834,
        0.511940055,
        -0.212090356,
        -0.6354190643,
        0.3526277478,
        0.1143953134,
        -0.0287033084,
    ];
    for (a, b) in r.dw.iter().zip(dc) {
        close(*a, b);
    }
}

#[test]
fn thread_count_determinism_and_scratch_reuse() {
    let mut rng = Rng(3);
    let p = problem(&mut rng, 300, 48, 2500);
    let o = LinearCrossEntropyOptions {
        label_smoothing: 0.1,
        z_loss: 1e-4,
        tiles: LinearTiles { tokens: 64, vocab: 256 },
        ..Default::default()
    };
    let bits = |x: &Out| {
        let mut v = vec![x.loss.to_bits(), x.z.to_bits()];
        for s in [&x.dh, &x.dw, &x.db, &x.rows] {
            v.extend(s.iter().map(|f| f.to_bits()));
        }
        v
    };
    let base = bits(&fused(&p, true, &o.par(Par::Seq)));
    for t in [1, 2, 3] {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(t).build().unwrap();
        assert!(pool.install(|| bits(&fused(&p, true, &o))) == base, "{t} threads");
    }
    // A caller's scratch gives the same bits, call after call.
    let shape = LinearShape { n: p.n, d: p.d, v: p.v };
    let mut sc = LinearCeScratch::new(shape, o.tiles).unwrap();
    assert_eq!(sc.bytes(), linear_cross_entropy_scratch_bytes(shape, o.tiles));
    // Absurd tiles are clamped to the problem, not allocated.
    let huge = LinearTiles { tokens: usize::MAX, vocab: usize::MAX };
    assert_eq!(
        linear_cross_entropy_scratch_bytes(shape, huge),
        linear_cross_entropy_scratch_bytes(shape, LinearTiles { tokens: p.n, vocab: p.v })
    );
    for _ in 0..2 {
        let mut dh = vec![0.0f32; p.n * p.d];
        let r = linear_cross_entropy(
            LinearShape { n: p.n, d: p.d, v: p.v },
            LinearInputs { h: &p.h, w: &p.w, bias: Some(&p.b), targets: &p.y },
            LinearGrads { dh: Some(&mut dh), ..Default::default() },
            RowOutputs::default(),
            Some(&mut sc),
            &o,
        )
        .unwrap();
        assert_eq!(r.loss.to_bits(), base[0]);
        let want: Vec<u64> = base[2..2 + dh.len()].to_vec();
        assert!(dh.iter().map(|&v| (v as f64).to_bits()).eq(want));
    }
}

#[test]
fn gradient_filtering_is_opt_in() {
    let mut rng = Rng(8);
    let p = problem(&mut rng, 64, 16, 600);
    let o = LinearCrossEntropyOptions { tiles: LinearTiles { tokens: 16, vocab: 64 }, ..Default::default() };
    let exact = fused(&p, false, &o);
    // Threshold 0 filters nothing.
    let zero = fused(&p, false, &LinearCrossEntropyOptions { filter: Some(0.0), ..o });
    assert_eq!(exact.dh, zero.dh);
    // A tiny threshold changes the gradient by less than it drops.
    let tiny = fused(&p, false, &LinearCrossEntropyOptions { filter: Some(2f32.powi(-28)), ..o });
    compare(&tiny, &materialized(&p, false, &o), p.d, "filter 2^-28");
    // An enormous threshold skips every product (the loss is untouched).
    let all = fused(&p, false, &LinearCrossEntropyOptions { filter: Some(1e30), ..o });
    assert_eq!(all.loss, exact.loss);
    assert!(all.dh.iter().chain(&all.dw).all(|&v| v == 0.0));
}

#[test]
fn edge_cases() {
    let mut rng = Rng(21);
    let mut p = problem(&mut rng, 6, 4, 10);
    // Every token ignored: 0 (or NaN on request), zero gradients.
    p.y = vec![-100; 6];
    let r = fused(&p, true, &LinearCrossEntropyOptions::default());
    assert_eq!((r.loss, r.z), (0.0, 0.0));
    assert!(r.dh.iter().chain(&r.dw).chain(&r.db).all(|&v| v == 0.0));
    let r = fused(&p, true, &LinearCrossEntropyOptions { all_ignored: AllIgnored::Nan, ..Default::default() });
    assert!(r.loss.is_nan());
    // A bias of -inf masks a vocabulary entry: equal to dropping that row of W; a target
    // there gives +inf.
    p.y = vec![0, 1, 2, 3, 4, 5];
    p.b[7] = f32::NEG_INFINITY;
    let m = materialized(&p, true, &LinearCrossEntropyOptions::default());
    let f = fused(&p, true, &LinearCrossEntropyOptions::default());
    compare(&f, &m, p.d, "masked vocabulary");
    assert!(f.dw[7 * 4..8 * 4].iter().all(|&v| v == 0.0));
    p.y[0] = 7;
    let f = fused(&p, true, &LinearCrossEntropyOptions::default());
    assert_eq!(f.rows[0], f64::INFINITY);
    // A single class: loss 0.
    let q = Problem { n: 2, d: 3, v: 1, h: vec![1.0; 6], w: vec![0.5; 3], b: vec![0.0], y: vec![0, 0] };
    assert_eq!(fused(&q, false, &LinearCrossEntropyOptions::default()).loss, 0.0);
}

#[test]
fn bad_input_is_a_typed_error() {
    let h = [0.0f32; 6];
    let w = [0.0f32; 8];
    let shape = LinearShape { n: 3, d: 2, v: 4 };
    let call = |s: LinearShape, i: LinearInputs, o: &LinearCrossEntropyOptions| {
        linear_cross_entropy(s, i, LinearGrads::default(), RowOutputs::default(), None, o)
    };
    let inp = LinearInputs { h: &h, w: &w, bias: None, targets: &[0, 1, 2] };
    let d = LinearCrossEntropyOptions::default();
    assert!(call(shape, inp, &d).is_ok());
    assert!(matches!(call(LinearShape { n: 3, d: 2, v: 5 }, inp, &d), Err(Error::LengthMismatch { what: "w", .. })));
    assert!(matches!(
        call(shape, LinearInputs { targets: &[0, 1], ..inp }, &d),
        Err(Error::LengthMismatch { what: "targets", .. })
    ));
    assert!(matches!(
        call(shape, LinearInputs { bias: Some(&[0.0; 3]), ..inp }, &d),
        Err(Error::LengthMismatch { what: "bias", .. })
    ));
    assert!(matches!(
        call(shape, LinearInputs { targets: &[0, 4, 1], ..inp }, &d),
        Err(Error::TargetOutOfRange { row: 1, target: 4, .. })
    ));
    assert!(matches!(
        call(LinearShape { n: 3, d: 0, v: 4 }, LinearInputs { h: &[], w: &[], ..inp }, &d),
        Err(Error::BadParameter { name: "d", .. })
    ));
    let huge = LinearCrossEntropyOptions { tiles: LinearTiles { tokens: usize::MAX, vocab: usize::MAX }, ..d };
    assert!(call(shape, inp, &huge).is_ok());
    let bad_tiles = LinearCrossEntropyOptions { tiles: LinearTiles { tokens: 0, vocab: 4 }, ..d };
    assert!(matches!(call(shape, inp, &bad_tiles), Err(Error::BadParameter { name: "tiles", .. })));
    let bad_eps = LinearCrossEntropyOptions { label_smoothing: -0.1, ..d };
    assert!(matches!(call(shape, inp, &bad_eps), Err(Error::BadParameter { name: "label_smoothing", .. })));
    let mut dh = [0.0f32; 5];
    assert!(matches!(
        linear_cross_entropy(
            shape,
            inp,
            LinearGrads { dh: Some(&mut dh), ..Default::default() },
            RowOutputs::default(),
            None,
            &d
        ),
        Err(Error::LengthMismatch { what: "dh", .. })
    ));
}

#[test]
fn special_rows_give_the_z_loss_cross_entropy_gives() {
    // Issue "No panic", class 7: on a NaN row `cross_entropy` reported a NaN loss and z-loss,
    // the linear path a `+inf` loss (its max skipped the NaN logits) and a `+inf` z-loss. Row 0
    // NaN; then `+inf` logits from the bias in every row.
    let mut rng = Rng(7);
    let mut p = problem(&mut rng, 3, 4, 5);
    p.y = vec![1, 2, 3];
    p.h[1] = f32::NAN;
    let o = LinearCrossEntropyOptions { reduction: Reduction::Sum, z_loss: 1e-3, ..Default::default() };
    let (got, want) = (fused(&p, false, &o), materialized(&p, false, &o));
    assert!(got.rows[0].is_nan() && want.rows[0].is_nan(), "{:?} {:?}", got.rows, want.rows);
    assert!(got.z.is_nan() && want.z.is_nan(), "z-loss of a NaN row: linear {} vs cross_entropy {}", got.z, want.z);
    p.h[1] = 0.5;
    p.b[2] = f32::INFINITY;
    let (got, want) = (fused(&p, true, &o), materialized(&p, true, &o));
    assert_eq!(got.z.is_nan(), want.z.is_nan(), "linear {} vs cross_entropy {}", got.z, want.z);
    assert_eq!(got.z == f64::INFINITY, want.z == f64::INFINITY, "linear {} vs cross_entropy {}", got.z, want.z);
}

/// CCE's filter (its code: `|p − onehot| < ε` on a whole tile, then the soft cap's chain factor)
/// in f64: the tiles it skips, and `dh`, `dW` summed over the tiles it keeps (mean reduction).
fn filtered_reference(p: &Problem, cap: f64, f: f64, bn: usize, bv: usize) -> (Vec<bool>, Vec<f64>, Vec<f64>) {
    let (n, d, v) = (p.n, p.d, p.v);
    let valid = p.y.iter().filter(|&&t| t != -100).count() as f64;
    let (mut pre, mut post) = (vec![0.0f64; n * v], vec![0.0f64; n * v]);
    for i in 0..n {
        if p.y[i] == -100 {
            continue;
        }
        let raw: Vec<f64> =
            (0..v).map(|j| (0..d).map(|k| p.h[i * d + k] as f64 * p.w[j * d + k] as f64).sum::<f64>()).collect();
        let z: Vec<f64> = raw.iter().map(|&x| cap * (x / cap).tanh()).collect();
        let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let lse = m + z.iter().map(|&t| (t - m).exp()).sum::<f64>().ln();
        for j in 0..v {
            let g = (z[j] - lse).exp() - if j as i64 == p.y[i] { 1.0 } else { 0.0 };
            pre[i * v + j] = g;
            post[i * v + j] = g * (1.0 - (z[j] / cap).powi(2)) / valid;
        }
    }
    let mut skipped = Vec::new();
    let (mut dh, mut dw) = (vec![0.0f64; n * d], vec![0.0f64; v * d]);
    for j0 in (0..v).step_by(bv) {
        for i0 in (0..n).step_by(bn) {
            let (i1, j1) = ((i0 + bn).min(n), (j0 + bv).min(v));
            let skip = (i0..i1).all(|i| (j0..j1).all(|j| pre[i * v + j].abs() < f));
            skipped.push(skip);
            if skip {
                continue;
            }
            for i in i0..i1 {
                for j in j0..j1 {
                    for k in 0..d {
                        dh[i * d + k] += post[i * v + j] * p.w[j * d + k] as f64;
                        dw[j * d + k] += post[i * v + j] * p.h[i * d + k] as f64;
                    }
                }
            }
        }
    }
    (skipped, dh, dw)
}

#[test]
fn gradient_filter_measures_p_minus_onehot_before_the_cap_chain_factor() {
    // A tight soft cap makes the chain factor small for the large logits, so the gradient after
    // it is far below `p − onehot`: a filter measured after the factor would skip tiles that
    // CCE's code keeps.
    let mut rng = Rng(31);
    let mut p = problem(&mut rng, 48, 8, 640);
    for w in p.w.iter_mut() {
        *w *= 3.0;
    }
    let (bn, bv, cap) = (16, 64, 2.0);
    // Each tile's largest |p − onehot| and largest gradient after the chain factor, in f64.
    let (pre_max, post_max): (Vec<f64>, Vec<f64>) = {
        let mut pre = Vec::new();
        let mut post = Vec::new();
        let valid = p.y.iter().filter(|&&t| t != -100).count() as f64;
        let (n, d, v) = (p.n, p.d, p.v);
        let mut gpre = vec![0.0f64; n * v];
        let mut gpost = vec![0.0f64; n * v];
        for i in (0..n).filter(|&i| p.y[i] != -100) {
            let z: Vec<f64> = (0..v)
                .map(|j| {
                    cap * ((0..d).map(|k| p.h[i * d + k] as f64 * p.w[j * d + k] as f64).sum::<f64>() / cap).tanh()
                })
                .collect();
            let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let lse = m + z.iter().map(|&t| (t - m).exp()).sum::<f64>().ln();
            for j in 0..v {
                let g = (z[j] - lse).exp() - if j as i64 == p.y[i] { 1.0 } else { 0.0 };
                gpre[i * v + j] = g.abs();
                gpost[i * v + j] = (g * (1.0 - (z[j] / cap).powi(2))).abs() / valid;
            }
        }
        for j0 in (0..v).step_by(bv) {
            for i0 in (0..n).step_by(bn) {
                let cells = || (i0..(i0 + bn).min(n)).flat_map(move |i| (j0..(j0 + bv).min(v)).map(move |j| i * v + j));
                pre.push(cells().map(|c| gpre[c]).fold(0.0, f64::max));
                post.push(cells().map(|c| gpost[c] * valid).fold(0.0, f64::max));
            }
        }
        (pre, post)
    };
    // Thresholds halfway (geometrically) between consecutive tile maxima, far from every maximum
    // in relative terms, chosen where the two measures decide differently.
    let mut sorted = pre_max.clone();
    sorted.sort_by(f64::total_cmp);
    let mut tested = 0;
    for w in sorted.windows(2) {
        let f = (w[0] * w[1]).sqrt();
        let near = |x: &f64| (x / f - 1.0).abs() < 1e-3;
        if w[1] < w[0] * 1.01 || pre_max.iter().chain(&post_max).any(near) {
            continue;
        }
        let differs = pre_max.iter().zip(&post_max).filter(|(a, b)| (**a < f) != (**b < f)).count();
        if differs == 0 {
            continue;
        }
        let (skipped, dh, dw) = filtered_reference(&p, cap, f, bn, bv);
        assert!(skipped.iter().any(|&s| s) && skipped.iter().any(|&s| !s), "threshold {f} decides nothing");
        let o = LinearCrossEntropyOptions {
            tiles: LinearTiles { tokens: bn, vocab: bv },
            softcap: Some(cap),
            filter: Some(f as f32),
            ..Default::default()
        };
        let got = fused(&p, false, &o);
        let tol = 1e-5 * dh.iter().chain(&dw).fold(1e-30f64, |a, v| a.max(v.abs()));
        for (name, g, w) in [("dh", &got.dh, &dh), ("dw", &got.dw, &dw)] {
            for (i, (a, b)) in g.iter().zip(w.iter()).enumerate() {
                assert!(
                    (a - b).abs() <= tol,
                    "filter {f}: {name}[{i}] {a} vs {b} ({differs} tiles decide differently)"
                );
            }
        }
        tested += 1;
    }
    assert!(tested >= 3, "only {tested} thresholds separate the two measures");
}

/// The problem's vocabulary cut into `parts` uneven shards, each run on its own thread with
/// `linear_cross_entropy_sharded`; the combiner exchanges the shards' rows through shared
/// memory and merges them in shard order (what `smax-mpi` does over MPI). Returns every
/// shard's result: `dh` summed over shards in shard order, `dw` and `db` concatenated.
fn sharded(p: &Problem, bias: bool, parts: usize, o: &LinearCrossEntropyOptions) -> Vec<Out> {
    use std::sync::{Barrier, Mutex};
    let (n, d, v) = (p.n, p.d, p.v);
    let bounds: Vec<usize> = (0..=parts).map(|s| (s * s + s) * v / (parts * parts + parts)).collect();
    let exchange: Mutex<Vec<Vec<ShardRow>>> = Mutex::new(vec![Vec::new(); parts]);
    let barrier = Barrier::new(parts);
    type ShardOut = (smax::loss::LossReport, Vec<f64>, Vec<f64>, Vec<f32>, Vec<f32>, Vec<f32>);
    let results: Vec<ShardOut> = std::thread::scope(|sc| {
        let handles: Vec<_> = (0..parts)
            .map(|s| {
                let (lo, hi) = (bounds[s], bounds[s + 1]);
                let (exchange, barrier) = (&exchange, &barrier);
                sc.spawn(move || {
                    let vs = hi - lo;
                    let (mut dh, mut dw, mut db) = (vec![0.0f32; n * d], vec![0.0f32; vs * d], vec![0.0f32; vs]);
                    let (mut rows, mut lse) = (vec![0.0; n], vec![0.0; n]);
                    let mut combine = |r: &mut [ShardRow]| {
                        exchange.lock().unwrap()[s] = r.to_vec();
                        barrier.wait();
                        let all = exchange.lock().unwrap().clone();
                        for (i, out) in r.iter_mut().enumerate() {
                            *out = ShardRow::merge(all.iter().map(|rows| rows[i]).collect::<Vec<_>>());
                        }
                        Ok(())
                    };
                    let rep = linear_cross_entropy_sharded(
                        LinearShape { n, d, v: vs },
                        LinearInputs {
                            h: &p.h,
                            w: &p.w[lo * d..hi * d],
                            bias: if bias { Some(&p.b[lo..hi]) } else { None },
                            targets: &p.y,
                        },
                        LinearGrads { dh: Some(&mut dh), dw: Some(&mut dw), dbias: Some(&mut db) },
                        RowOutputs { loss: Some(&mut rows), lse: Some(&mut lse), ..Default::default() },
                        None,
                        VocabShard { start: lo, total: v, combine: &mut combine },
                        o,
                    )
                    .unwrap();
                    (rep, rows, lse, dh, dw, db)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut dh = vec![0.0f64; n * d];
    for r in &results {
        for (a, &x) in dh.iter_mut().zip(&r.3) {
            *a += x as f64;
        }
    }
    let dw: Vec<f64> = results.iter().flat_map(|r| r.4.iter().map(|&x| x as f64)).collect();
    let db: Vec<f64> = results.iter().flat_map(|r| r.5.iter().map(|&x| x as f64)).collect();
    results
        .iter()
        .map(|r| Out {
            loss: r.0.loss,
            z: r.0.z_loss,
            rows: r.1.clone(),
            lse: r.2.clone(),
            dh: dh.clone(),
            dw: dw.clone(),
            db: db.clone(),
        })
        .collect()
}

#[test]
fn vocabulary_shards_agree_with_the_whole_vocabulary() {
    let mut rng = Rng(0x5a4d);
    let base = LinearCrossEntropyOptions { tiles: LinearTiles { tokens: 8, vocab: 16 }, ..Default::default() };
    let cases = [
        ("default", base),
        ("smoothing", base.label_smoothing(0.15)),
        ("z-loss", base.z_loss(1e-3)),
        ("softcap", base.softcap(2.5)),
        ("sum, grad scale", base.reduction(Reduction::Sum).grad_scale(0.5)),
        ("none", base.reduction(Reduction::None)),
        ("smoothing + cap + z", base.label_smoothing(0.1).softcap(4.0).z_loss(1e-4)),
    ];
    for &(n, d, v) in &[(21, 8, 37), (40, 16, 100)] {
        let p = problem(&mut rng, n, d, v);
        for (name, o) in &cases {
            for bias in [false, true] {
                let want = materialized(&p, bias, o);
                for parts in 1..=4 {
                    let got = sharded(&p, bias, parts, o);
                    for (s, g) in got.iter().enumerate() {
                        compare(g, &want, d, &format!("{name} n {n} v {v} bias {bias}, shard {s} of {parts}"));
                        // Every shard reports the same loss, bit for bit.
                        assert_eq!(g.loss.to_bits(), got[0].loss.to_bits(), "{name}: shards disagree");
                    }
                }
            }
        }
    }
    // Ignore index 0: class 0 is ignored, and a shard whose local index 0 is another class
    // must not take it for the ignore index.
    let mut p = problem(&mut rng, 30, 8, 50);
    p.y = p.y.iter().map(|&t| if t == -100 { 0 } else { t }).collect();
    // Targets at the second shard's first class for 2, 3 and 4 shards (local index 0).
    (p.y[5], p.y[6], p.y[7]) = (16, 8, 5);
    let o = base.ignore_index(0).label_smoothing(0.1);
    let want = materialized(&p, true, &o);
    for parts in 2..=4 {
        for g in sharded(&p, true, parts, &o) {
            compare(&g, &want, 8, &format!("ignore index 0, {parts} shards"));
        }
    }
    // Every token ignored, and a target at a -inf bias (+inf loss): as the whole call.
    let mut p = problem(&mut rng, 6, 4, 9);
    p.y = vec![-100; 6];
    for all_ignored in [AllIgnored::Zero, AllIgnored::Nan] {
        let o = LinearCrossEntropyOptions { all_ignored, ..base };
        let got = sharded(&p, false, 3, &o);
        let want = fused(&p, false, &o);
        assert_eq!(got[0].loss.to_bits(), want.loss.to_bits());
        assert!(got[0].dh.iter().chain(&got[0].dw).all(|&g| g == 0.0));
    }
    p.y = vec![0, 3, 8, 2, 5, 7];
    p.b[8] = f32::NEG_INFINITY;
    let got = sharded(&p, true, 3, &base);
    let want = fused(&p, true, &base);
    assert_eq!(got[0].loss, f64::INFINITY);
    assert_eq!(want.loss, f64::INFINITY);
}

#[test]
fn vocabulary_shard_errors() {
    let mut rng = Rng(3);
    let p = problem(&mut rng, 4, 3, 10);
    let run = |start: usize, total: usize, y: &[i64], fail: bool| {
        let mut combine = |_: &mut [ShardRow]| {
            if fail {
                Err(Error::BadParameter { name: "peer", value: "gone".into(), expected: "alive" })
            } else {
                Ok(())
            }
        };
        linear_cross_entropy_sharded(
            LinearShape { n: 4, d: 3, v: 5 },
            LinearInputs { h: &p.h, w: &p.w[..15], bias: None, targets: y },
            LinearGrads::default(),
            RowOutputs::default(),
            None,
            VocabShard { start, total, combine: &mut combine },
            &LinearCrossEntropyOptions::default(),
        )
    };
    assert!(run(0, 10, &[0, 9, -100, 5], false).is_ok());
    assert!(matches!(run(6, 10, &[0, 1, 2, 3], false), Err(Error::BadParameter { name: "shard", .. })));
    assert!(matches!(run(usize::MAX, 10, &[0, 1, 2, 3], false), Err(Error::BadParameter { name: "shard", .. })));
    assert!(matches!(
        run(0, 10, &[0, 10, 2, 3], false),
        Err(Error::TargetOutOfRange { row: 1, target: 10, classes: 10 })
    ));
    assert!(matches!(run(0, 10, &[0, 1, 2, 3], true), Err(Error::BadParameter { name: "peer", .. })));
}
