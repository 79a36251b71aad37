//! Attention variants against f64 references written from ALGORITHMS.md (N6, A4–A7) and their
//! worked examples: clipped softmax (forward and backward), the attention gate, LSSA / LSSAR,
//! InLine.

// Worked-example values are copied verbatim from the spec (f64 digits), then rounded.
#![allow(clippy::excessive_precision)]

mod common;

use common::Rng;
use smax::attention::{
    AttentionGrads, AttentionOptions, AttentionShape, ClippedSoftmax, Heads, InlineKernel, InlineLocal, KeepMask, Lssa,
    QueryPositions, ScoreStrides, attention_clipped, attention_clipped_backward, attention_gate,
    attention_gate_backward, attention_lssa, gate_bias_init, inline_attention,
};
use smax::{Error, Par};

fn f32s(v: Vec<f64>) -> Vec<f32> {
    v.into_iter().map(|x| x as f32).collect()
}

fn wide(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}

fn close(what: &str, got: &[f32], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}");
    let scale = want.iter().fold(0.0f64, |a, &b| a.max(b.abs()));
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!((g as f64 - w).abs() <= tol * (1.0 + scale), "{what}[{i}]: got {g}, want {w}");
    }
}

/// Scores `x` for one query through keys `[x_j, 0, 0, 0]`, a query `[1, 0, 0, 0]`, scale 1 and
/// identity values: the output row is the weight vector.
fn one_row(x: &[f32]) -> (AttentionShape, Vec<f32>, Vec<f32>, Vec<f32>) {
    let n = x.len();
    let s = AttentionShape::new(1, 1, 1, n, n.max(1));
    let d = n.max(1);
    let mut q = vec![0.0f32; d];
    q[0] = 1.0;
    let mut k = vec![0.0f32; n * d];
    let mut v = vec![0.0f32; n * d];
    for j in 0..n {
        k[j * d] = x[j];
        v[j * d + j] = 1.0;
    }
    (s, q, k, v)
}

// ---------------------------------------------------------------------------------------------
// Clipped softmax (N6)

#[test]
fn clipped_worked_examples_n6() {
    let x = [1.0f32, 2.0, 3.0, 4.0];
    let (s, q, k, v) = one_row(&x);
    let o = AttentionOptions::default().scale(1.0);
    for (clip, want) in [
        (ClippedSoftmax::bert(), [0.0078600684, 0.0643229267, 0.2178048885, 0.6350121164]),
        (ClippedSoftmax::opt(12.0, 512), [0.0093724768, 0.0657492637, 0.2189972591, 0.6355685004]),
        (ClippedSoftmax { zeta: 1.003, gamma: -0.003 }, [0.0292509549, 0.0846671847, 0.235304115, 0.6447777454]),
    ] {
        let mut out = vec![0.0f32; 4];
        attention_clipped(
            smax::attention::AttentionInputs::new(s, Heads::new(&q), Heads::new(&k), Heads::new(&v)),
            smax::attention::AttentionOutputs::new(&mut out, None),
            &o.with_variant(clip),
        )
        .unwrap();
        close("clipped", &out, &want, 1e-6);
    }
    // x = [0, 5]: the small weight is exactly 0 at a finite score.
    let (s2, q2, k2, v2) = one_row(&[0.0, 5.0]);
    let mut out = vec![0.0f32; 2];
    attention_clipped(
        smax::attention::AttentionInputs::new(s2, Heads::new(&q2), Heads::new(&k2), Heads::new(&v2)),
        smax::attention::AttentionOutputs::new(&mut out, None),
        &o.with_variant(ClippedSoftmax::bert()),
    )
    .unwrap();
    assert_eq!(out[0], 0.0);
    assert!((out[1] as f64 - 0.9931398278).abs() < 1e-6);
    // VJP with g = [0.1, -0.2, 0.3, 0] on the weights: with V = I and dO = g, dK_j[0] is the
    // score gradient.
    let mut lse = vec![0.0f32; 1];
    let mut out = vec![0.0f32; 4];
    let clip = ClippedSoftmax::bert();
    attention_clipped(
        smax::attention::AttentionInputs::new(s, Heads::new(&q), Heads::new(&k), Heads::new(&v)),
        smax::attention::AttentionOutputs::new(&mut out, Some(&mut lse)),
        &o.with_variant(clip),
    )
    .unwrap();
    let g = [0.1f32, -0.2, 0.3, 0.0];
    let (mut dq, mut dk, mut dv) = (vec![0.0f32; 4], vec![0.0f32; 16], vec![0.0f32; 16]);
    attention_clipped_backward(
        smax::attention::AttentionInputs::new(s, Heads::new(&q), Heads::new(&k), Heads::new(&v)),
        &lse,
        &g,
        AttentionGrads::new(&mut dq, &mut dk, &mut dv),
        &o.with_variant(clip),
    )
    .unwrap();
    let want = [0.00141818, -0.022941865, 0.0590399894, -0.0375163044];
    for j in 0..4 {
        assert!((dk[j * 4] as f64 - want[j]).abs() < 1e-7, "dk {dk:?}");
    }
}

/// f64 reference of clipped-softmax attention (one head, contiguous, causal or not), with the
/// loss `Σ dO ⊙ out` for finite differences.
fn clipped_ref(q: &[f64], k: &[f64], v: &[f64], n: (usize, usize, usize), causal: bool, zg: (f64, f64)) -> Vec<f64> {
    let (ql, kl, d) = n;
    let scale = 1.0 / (d as f64).sqrt();
    let mut out = vec![0.0; ql * d];
    for i in 0..ql {
        let off = kl as i64 - ql as i64;
        let vis = |j: usize| !causal || (j as i64) <= i as i64 + off;
        let s: Vec<f64> = (0..kl)
            .map(|j| {
                if vis(j) {
                    (0..d).map(|t| q[i * d + t] * k[j * d + t]).sum::<f64>() * scale
                } else {
                    f64::NEG_INFINITY
                }
            })
            .collect();
        let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        if m == f64::NEG_INFINITY {
            continue;
        }
        let z: f64 = s.iter().map(|x| (x - m).exp()).sum();
        for j in 0..kl {
            let p = (s[j] - m).exp() / z;
            let w = ((zg.0 - zg.1) * p + zg.1).clamp(0.0, 1.0);
            for t in 0..d {
                out[i * d + t] += w * v[j * d + t];
            }
        }
    }
    out
}

#[test]
fn clipped_forward_and_backward_match_reference() {
    let mut rng = Rng(31);
    for &(ql, kl, d, causal) in &[(7usize, 9usize, 8usize, true), (33, 70, 16, false), (20, 20, 32, true)] {
        let s = AttentionShape::new(1, 1, ql, kl, d);
        let (q, k, v) = (f32s(rng.vec(ql * d, 3.0)), f32s(rng.vec(kl * d, 1.0)), f32s(rng.vec(kl * d, 1.0)));
        let g = f32s(rng.vec(ql * d, 1.0));
        let clip = ClippedSoftmax { zeta: 1.05, gamma: -0.03 };
        let o = AttentionOptions::default().causal(causal).tiles(smax::attention::AttentionTiles { q: 8, kv: 16 });
        let mut out = vec![0.0f32; ql * d];
        let mut lse = vec![0.0f32; ql];
        attention_clipped(
            smax::attention::AttentionInputs::new(s, Heads::new(&q), Heads::new(&k), Heads::new(&v)),
            smax::attention::AttentionOutputs::new(&mut out, Some(&mut lse)),
            &o.with_variant(clip),
        )
        .unwrap();
        let zg = (clip.zeta as f64, clip.gamma as f64);
        let (qw, kw, vw) = (wide(&q), wide(&k), wide(&v));
        close("clipped out", &out, &clipped_ref(&qw, &kw, &vw, (ql, kl, d), causal, zg), 1e-5);
        let (mut dq, mut dk, mut dv) = (vec![0.0f32; ql * d], vec![0.0f32; kl * d], vec![0.0f32; kl * d]);
        attention_clipped_backward(
            smax::attention::AttentionInputs::new(s, Heads::new(&q), Heads::new(&k), Heads::new(&v)),
            &lse,
            &g,
            AttentionGrads::new(&mut dq, &mut dk, &mut dv),
            &o.with_variant(clip),
        )
        .unwrap();
        // Central differences of the f64 reference (the clip kinks are measure-zero for these
        // random inputs; a step of 1e-6 does not cross them).
        let gw = wide(&g);
        let loss = |q: &[f64], k: &[f64], v: &[f64]| -> f64 {
            clipped_ref(q, k, v, (ql, kl, d), causal, zg).iter().zip(&gw).map(|(a, b)| a * b).sum()
        };
        let h = 1e-6;
        for (which, got) in [(0usize, &dq), (1, &dk), (2, &dv)] {
            let mut want = vec![0.0; got.len()];
            for (i, w) in want.iter_mut().enumerate() {
                let (mut a, mut b) = ([qw.clone(), kw.clone(), vw.clone()], [qw.clone(), kw.clone(), vw.clone()]);
                a[which][i] += h;
                b[which][i] -= h;
                *w = (loss(&a[0], &a[1], &a[2]) - loss(&b[0], &b[1], &b[2])) / (2.0 * h);
            }
            close(["dq", "dk", "dv"][which], got, &want, 1e-4);
        }
    }
}

#[test]
fn clipped_parameters_are_validated() {
    let (s, q, k, v) = one_row(&[1.0, 2.0]);
    let mut out = vec![0.0f32; 4];
    for clip in [
        ClippedSoftmax { zeta: 0.5, gamma: 0.0 },
        ClippedSoftmax { zeta: 1.0, gamma: 0.1 },
        ClippedSoftmax { zeta: f32::NAN, gamma: 0.0 },
    ] {
        let e = attention_clipped(
            smax::attention::AttentionInputs::new(s, Heads::new(&q), Heads::new(&k), Heads::new(&v)),
            smax::attention::AttentionOutputs::new(&mut out, None),
            &AttentionOptions::default().with_variant(clip),
        )
        .unwrap_err();
        assert!(matches!(e, Error::BadParameter { .. }), "{e}");
    }
}

// ---------------------------------------------------------------------------------------------
// Attention gate (A5)

#[test]
fn gate_worked_example_a5_and_backward() {
    let b = gate_bias_init(0.25).unwrap();
    let logit = 0.5 * 0.3 + 0.25 * -0.7 + b;
    let mut out = [1.585694277f32, 0.4165550268];
    attention_gate(&mut out, &[logit as f32], 2).unwrap();
    assert!((out[0] as f64 - 0.389037177).abs() < 1e-7 && (out[1] as f64 - 0.1021983834).abs() < 1e-7);
    // Backward against central differences in f64.
    let mut rng = Rng(3);
    let (rows, d) = (5usize, 3usize);
    let attn = f32s(rng.vec(rows * d, 1.0));
    let logits = f32s(rng.vec(rows, 3.0));
    let dg = f32s(rng.vec(rows * d, 1.0));
    let (mut da, mut dl) = (vec![0.0f32; rows * d], vec![0.0f32; rows]);
    attention_gate_backward(&attn, &logits, &dg, d, &mut da, &mut dl).unwrap();
    let sig = |x: f64| 1.0 / (1.0 + (-x).exp());
    for r in 0..rows {
        let g = logits[r] as f64;
        let f = |x: f64| (0..d).map(|t| sig(x) * attn[r * d + t] as f64 * dg[r * d + t] as f64).sum::<f64>();
        let fd = (f(g + 1e-6) - f(g - 1e-6)) / 2e-6;
        assert!((dl[r] as f64 - fd).abs() < 1e-6, "{} vs {fd}", dl[r]);
        for t in 0..d {
            assert!((da[r * d + t] as f64 - sig(g) * dg[r * d + t] as f64).abs() < 1e-7);
        }
    }
    assert!(matches!(attention_gate(&mut out, &[0.0, 1.0], 2), Err(Error::LengthMismatch { .. })));
    // rows · d wraps to 0 in usize: an overflow error, not an empty match (or an index panic).
    let huge = usize::MAX / 2 + 1;
    assert!(matches!(attention_gate(&mut [], &[0.0, 1.0], huge), Err(Error::SizeOverflow { .. })));
    let e = attention_gate_backward(&[], &[0.0, 1.0], &[], huge, &mut [], &mut [0.0; 2]);
    assert!(matches!(e, Err(Error::SizeOverflow { .. })), "{e:?}");
    assert!(gate_bias_init(f64::NAN).is_err());
    assert_eq!(gate_bias_init(0.5).unwrap(), 0.0);
}

// ---------------------------------------------------------------------------------------------
// LSSA / LSSAR (A4)

/// f64 reference of LSSA / LSSAR weights for one row: cosines of the visible keys, N = count.
fn lssa_row(cos: &[f64], vis: &[bool], d: usize, p: Option<f64>, off: f64) -> Vec<f64> {
    let n = vis.iter().filter(|&&x| x).count();
    let mut w = vec![0.0; cos.len()];
    if n == 0 {
        return w;
    }
    let s = (d as f64).ln() * (n as f64).ln();
    let sp = |x: f64| x.max(0.0) + (-x.abs()).exp().ln_1p();
    let tot: f64 = (0..cos.len()).filter(|&j| vis[j]).map(|j| sp(s * cos[j])).sum();
    for j in 0..cos.len() {
        if vis[j] {
            w[j] = sp(s * cos[j]) / tot;
        }
    }
    let Some(p) = p else { return w };
    let z: Vec<f64> = w
        .iter()
        .zip(vis)
        .map(|(&a, &v)| {
            let u = n as f64 * a - off;
            if v && u > 0.0 { p * u.ln() } else { f64::NEG_INFINITY }
        })
        .collect();
    let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    if m == f64::NEG_INFINITY {
        return w; // the uniform-row policy
    }
    let t: f64 = z.iter().map(|x| (x - m).exp()).sum();
    z.iter().map(|x| (x - m).exp() / t).collect()
}

fn cosines(q: &[f64], k: &[f64], d: usize, i: usize, j: usize) -> f64 {
    let (qr, kr) = (&q[i * d..(i + 1) * d], &k[j * d..(j + 1) * d]);
    let nq = qr.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-12);
    let nk = kr.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-12);
    qr.iter().zip(kr).map(|(a, b)| a * b).sum::<f64>() / (nq * nk)
}

#[test]
fn lssa_worked_example_single_row() {
    // q = e0, k_j = [c_j, sqrt(1 − c_j²), 0, …]: cosine c_j. V = I on the first 4 channels.
    let d = 64;
    let c = [0.9f32, -0.2, 0.5, 0.1];
    let s = AttentionShape::new(1, 1, 1, 4, d);
    let mut q = vec![0.0f32; d];
    q[0] = 1.0;
    let mut k = vec![0.0f32; 4 * d];
    let mut v = vec![0.0f32; 4 * d];
    for j in 0..4 {
        k[j * d] = c[j];
        k[j * d + 1] = (1.0 - c[j] * c[j]).sqrt();
        v[j * d + j] = 1.0;
    }
    let o = AttentionOptions::default();
    for (lssa, want) in [
        (Lssa { reweight: None, offset_rows: 3 }, [0.5509376654, 0.029097121, 0.3115260996, 0.1084391141]),
        (Lssa { reweight: Some(3.0), offset_rows: 0 }, [0.9915266934, 0.0, 0.0084733066, 0.0]),
        (Lssa { reweight: Some(15.0), offset_rows: 0 }, [9.9999999995e-01, 0.0, 4.5576665458e-11, 0.0]),
        (
            Lssa { reweight: Some(15.0), offset_rows: 10 },
            [9.9980689399e-01, 6.9363253165e-20, 1.9310598115e-04, 2.5773213657e-11],
        ),
    ] {
        let mut out = vec![0.0f32; d];
        let st = attention_lssa(
            smax::attention::AttentionInputs::new(s, Heads::new(&q), Heads::new(&k), Heads::new(&v)),
            &mut out,
            &o.with_variant(lssa),
        )
        .unwrap();
        assert_eq!(st.uniform_rows, 0);
        for j in 0..4 {
            assert!((out[j] as f64 - want[j]).abs() <= 2e-7 + 1e-5 * want[j], "{lssa:?}: {:?}", &out[..4]);
        }
    }
}

#[test]
fn lssa_worked_example_causal_block() {
    let qv = [
        [1.0f32, 0.0, 1.0, 0.0],
        [0.5, 1.0, -0.5, 0.0],
        [0.0, 1.0, 1.0, 1.0],
        [1.0, -0.5, 0.0, 0.5],
        [0.2, 0.4, 0.6, 0.8],
    ];
    let kv = [
        [1.0f32, 1.0, 0.0, 0.0],
        [0.0, 1.0, 1.0, 0.0],
        [1.0, 0.0, 0.0, 1.0],
        [0.5, 0.5, 0.5, 0.5],
        [-1.0, 0.0, 1.0, 0.0],
    ];
    let a_want = [
        vec![1.0],
        vec![0.5864878558, 0.4135121442],
        vec![0.2921022431, 0.4157955137, 0.2921022431],
        vec![0.2261028963, 0.1017261003, 0.412000322, 0.2601706814],
        vec![0.1578349502, 0.2145692463, 0.2145692463, 0.2803341277, 0.1326924295],
    ];
    let r_want = [
        vec![1.0],
        vec![9.9473804173e-01, 5.2619582653e-03],
        vec![4.9601696640e-03, 9.9007966067e-01, 4.9601696640e-03],
        vec![0.0, 0.0, 1.0, 9.2792437003e-19],
        vec![0.0, 7.5518795885e-12, 7.5518795885e-12, 9.9999999998e-01, 0.0],
    ];
    let s = AttentionShape::new(1, 1, 5, 5, 4);
    let q: Vec<f32> = qv.iter().flatten().copied().collect();
    let k: Vec<f32> = kv.iter().flatten().copied().collect();
    let mut rng = Rng(5);
    let v = f32s(rng.vec(20, 1.0));
    let o = AttentionOptions::default().causal(true).tiles(smax::attention::AttentionTiles { q: 2, kv: 2 });
    for (lssa, want) in [(Lssa { reweight: None, offset_rows: 3 }, &a_want), (Lssa::default(), &r_want)] {
        let mut out = vec![0.0f32; 20];
        attention_lssa(
            smax::attention::AttentionInputs::new(s, Heads::new(&q), Heads::new(&k), Heads::new(&v)),
            &mut out,
            &o.with_variant(lssa),
        )
        .unwrap();
        let mut expect = vec![0.0f64; 20];
        for (i, w) in want.iter().enumerate() {
            for (j, &wj) in w.iter().enumerate() {
                for t in 0..4 {
                    expect[i * 4 + t] += wj * v[j * 4 + t] as f64;
                }
            }
        }
        close("lssa block", &out, &expect, 2e-6);
    }
}

#[test]
fn lssa_matches_reference_with_masks_and_gqa() {
    let mut rng = Rng(44);
    let s = AttentionShape::new(2, 4, 37, 53, 16).kv_heads(2);
    let (q, k, v) =
        (f32s(rng.vec(s.out_len(), 1.0)), f32s(rng.vec(s.kv_len_elems(), 1.0)), f32s(rng.vec(s.kv_len_elems(), 1.0)));
    let n = s.batch * s.q_heads * s.q_len * s.kv_len;
    let keep: Vec<bool> = (0..n).map(|i| (i * 13) % 9 != 2).collect();
    let st = ScoreStrides::contiguous(s.q_heads, s.q_len, s.kv_len);
    for (causal, window, use_keep) in [(true, None, false), (false, Some((10usize, 4usize)), false), (true, None, true)]
    {
        let mut o = AttentionOptions::default()
            .causal(causal)
            .tiles(smax::attention::AttentionTiles { q: 16, kv: 16 })
            .positions(QueryPositions::Offset(16));
        if let Some((l, r)) = window {
            o = o.window(smax::attention::Window { left: l, right: r });
        }
        if use_keep {
            o = o.keep(KeepMask { data: &keep, strides: st });
        }
        for lssa in
            [Lssa { reweight: None, offset_rows: 3 }, Lssa::default(), Lssa { reweight: Some(3.0), offset_rows: 0 }]
        {
            let mut out = vec![0.0f32; s.out_len()];
            attention_lssa(
                smax::attention::AttentionInputs::new(s, Heads::new(&q), Heads::new(&k), Heads::new(&v)),
                &mut out,
                &o.with_variant(lssa),
            )
            .unwrap();
            let (qw, kw, vw) = (wide(&q), wide(&k), wide(&v));
            let mut want = vec![0.0f64; s.out_len()];
            let d = s.head_dim;
            for b in 0..2 {
                for h in 0..4 {
                    let hk = h / 2;
                    let qh = &qw[(b * 4 + h) * 37 * d..][..37 * d];
                    let kh = &kw[(b * 2 + hk) * 53 * d..][..53 * d];
                    let vh = &vw[(b * 2 + hk) * 53 * d..][..53 * d];
                    for i in 0..37 {
                        let p = i as i64 + 16;
                        let vis: Vec<bool> = (0..53)
                            .map(|j| {
                                let jj = j as i64;
                                (!causal || jj <= p)
                                    && window.is_none_or(|(l, r)| jj >= p - l as i64 && jj <= p + r as i64)
                                    && (!use_keep || keep[((b * 4 + h) * 37 + i) * 53 + j])
                            })
                            .collect();
                        let cos: Vec<f64> = (0..53).map(|j| cosines(qh, kh, d, i, j)).collect();
                        let off = if p < lssa.offset_rows as i64 { 0.0 } else { 1.0 };
                        let w = lssa_row(&cos, &vis, d, lssa.reweight.map(|x| x as f64), off);
                        for j in 0..53 {
                            for t in 0..d {
                                want[((b * 4 + h) * 37 + i) * d + t] += w[j] * vh[j * d + t];
                            }
                        }
                    }
                }
            }
            close("lssa", &out, &want, 1e-5);
        }
    }
}

/// A query offset near `i64::MAX` puts every row far past `offset_rows` (offset 1), exactly as
/// any other large offset does; the position arithmetic never wraps.
#[test]
fn lssar_huge_query_offset_is_a_late_position() {
    let mut rng = Rng(45);
    let s = AttentionShape::new(1, 2, 5, 9, 8);
    let (q, k, v) =
        (f32s(rng.vec(s.out_len(), 1.0)), f32s(rng.vec(s.kv_len_elems(), 1.0)), f32s(rng.vec(s.kv_len_elems(), 1.0)));
    let run = |offset: i64| {
        let mut out = vec![0.0f32; s.out_len()];
        let o = AttentionOptions::default().positions(QueryPositions::Offset(offset));
        attention_lssa(
            smax::attention::AttentionInputs::new(s, Heads::new(&q), Heads::new(&k), Heads::new(&v)),
            &mut out,
            &o.with_variant(Lssa::default()),
        )
        .unwrap();
        out
    };
    let late = run(1000);
    assert_ne!(late, run(0), "the offset rule must matter for this input");
    assert_eq!(run(i64::MAX), late);
    assert_eq!(run(i64::MAX - 2), late);
}

#[test]
fn lssar_uniform_rows_fall_back_and_are_counted() {
    // Identical keys: every LSSA row is exactly uniform, so N·A − 1 = 0 everywhere.
    let s = AttentionShape::new(1, 1, 3, 6, 8);
    let q: Vec<f32> = (0..24).map(|i| (i as f32 * 0.37).sin()).collect();
    let k: Vec<f32> = (0..48).map(|i| [0.3f32, -0.1, 0.5, 0.2, 0.0, 0.7, -0.4, 0.1][i % 8]).collect();
    let v: Vec<f32> = (0..48).map(|i| i as f32 * 0.01).collect();
    let mut out = vec![0.0f32; 24];
    let st = attention_lssa(
        smax::attention::AttentionInputs::new(s, Heads::new(&q), Heads::new(&k), Heads::new(&v)),
        &mut out,
        &AttentionOptions::default().with_variant(Lssa { reweight: Some(15.0), offset_rows: 0 }),
    )
    .unwrap();
    assert_eq!(st.uniform_rows, 3);
    for i in 0..3 {
        for t in 0..8 {
            let mean: f64 = (0..6).map(|j| v[j * 8 + t] as f64).sum::<f64>() / 6.0;
            assert!((out[i * 8 + t] as f64 - mean).abs() < 1e-6);
        }
    }
}

#[test]
fn lssa_rejects_options_that_do_not_apply() {
    let s = AttentionShape::new(1, 1, 2, 2, 4);
    let x = vec![0.5f32; 8];
    let mut out = vec![0.0f32; 8];
    let l = Lssa::default();
    for o in [AttentionOptions::default().scale(0.5), AttentionOptions::default().temperature(2.0)] {
        let e = attention_lssa(
            smax::attention::AttentionInputs::new(s, Heads::new(&x), Heads::new(&x), Heads::new(&x)),
            &mut out,
            &o.with_variant(l),
        )
        .unwrap_err();
        assert!(matches!(e, Error::Unsupported { .. }), "{e}");
    }
    let s1 = AttentionShape::new(1, 1, 2, 2, 1);
    let e = attention_lssa(
        smax::attention::AttentionInputs::new(s1, Heads::new(&x), Heads::new(&x), Heads::new(&x)),
        &mut out[..2],
        &AttentionOptions::default().with_variant(l),
    )
    .unwrap_err();
    assert!(matches!(e, Error::BadParameter { name: "head_dim", .. }), "{e}");
    let e = attention_lssa(
        smax::attention::AttentionInputs::new(s, Heads::new(&x), Heads::new(&x), Heads::new(&x)),
        &mut out,
        &AttentionOptions::default().with_variant(Lssa { reweight: Some(-1.0), offset_rows: 3 }),
    )
    .unwrap_err();
    assert!(matches!(e, Error::BadParameter { .. }), "{e}");
}

// ---------------------------------------------------------------------------------------------
// InLine (A6)

#[test]
fn inline_worked_example_a6() {
    let s = AttentionShape::new(1, 1, 2, 4, 2);
    let q = [1.0f32, 0.5, 2.0, 1.0];
    let k = [1.0f32, 0.0, 0.0, 1.0, 1.0, 1.0, -1.0, 0.5];
    let v = [1.0f32, 2.0, 0.0, 1.0, 3.0, -1.0, 0.5, 0.5];
    let mut out = [0.0f32; 4];
    inline_attention(
        smax::attention::AttentionInputs::new(s, Heads::new(&q), Heads::new(&k), Heads::new(&v)),
        &mut out,
        &smax::attention::AttentionOptions::default()
            .with_variant(smax::attention::Inline { kernel: InlineKernel::Identity, local: None }),
    )
    .unwrap();
    let want = [1.5835145534, 0.4868932068, 2.0420291069, 0.3487864136];
    close("inline", &out, &want, 1e-6);
}

/// Reference: materialised weights `w_ij = c(φq·φk_j − φq·k̄) + 1/N`, then the local term.
fn inline_ref(q: &[f64], k: &[f64], v: &[f64], ql: usize, kl: usize, d: usize, phi: impl Fn(f64) -> f64) -> Vec<f64> {
    let c = 1.0 / (d as f64).sqrt() / kl as f64;
    let fk: Vec<f64> = k.iter().map(|&x| phi(x)).collect();
    let kbar: Vec<f64> = (0..d).map(|t| (0..kl).map(|j| fk[j * d + t]).sum::<f64>() / kl as f64).collect();
    let mut out = vec![0.0; ql * d];
    for i in 0..ql {
        let fq: Vec<f64> = q[i * d..(i + 1) * d].iter().map(|&x| phi(x)).collect();
        let qk: f64 = fq.iter().zip(&kbar).map(|(a, b)| a * b).sum();
        for j in 0..kl {
            let dot: f64 = fq.iter().zip(&fk[j * d..(j + 1) * d]).map(|(a, b)| a * b).sum();
            let w = c * (dot - qk) + 1.0 / kl as f64;
            for t in 0..d {
                out[i * d + t] += w * v[j * d + t];
            }
        }
    }
    out
}

#[test]
fn inline_matches_reference_for_every_kernel_and_the_local_term() {
    let mut rng = Rng(17);
    let (ql, kl, d) = (13usize, 29usize, 8usize);
    let s = AttentionShape::new(1, 2, ql, kl, d).kv_heads(1);
    let (q, k, v) = (f32s(rng.vec(2 * ql * d, 1.0)), f32s(rng.vec(kl * d, 1.0)), f32s(rng.vec(kl * d, 1.0)));
    type Phi = fn(f64) -> f64;
    let kernels: [(InlineKernel, Phi); 4] = [
        (InlineKernel::Identity, |x| x),
        (InlineKernel::Relu, |x| x.max(0.0)),
        (InlineKernel::LeakyRelu(0.1), |x| if x >= 0.0 { x } else { 0.1 * x }),
        (InlineKernel::Exp02, |x| (0.2 * x).exp()),
    ];
    for (kern, phi) in kernels {
        let mut out = vec![0.0f32; 2 * ql * d];
        inline_attention(
            smax::attention::AttentionInputs::new(s, Heads::new(&q), Heads::new(&k), Heads::new(&v)),
            &mut out,
            &smax::attention::AttentionOptions::default()
                .with_variant(smax::attention::Inline { kernel: kern, local: None }),
        )
        .unwrap();
        let mut want = Vec::new();
        for h in 0..2 {
            want.extend(inline_ref(&wide(&q[h * ql * d..(h + 1) * ql * d]), &wide(&k), &wide(&v), ql, kl, d, phi));
        }
        close("inline", &out, &want, 1e-5);
    }
    // Local term: 1 prefix token + a 4 × 7 grid.
    let s2 = AttentionShape::new(1, 1, kl, kl, d);
    let q2 = f32s(rng.vec(kl * d, 1.0));
    let kern = f32s(rng.vec(d * 9, 1.0));
    let local = InlineLocal { height: 4, width: 7, prefix: 1, kernel: &kern };
    let mut out = vec![0.0f32; kl * d];
    inline_attention(
        smax::attention::AttentionInputs::new(s2, Heads::new(&q2), Heads::new(&k), Heads::new(&v)),
        &mut out,
        &smax::attention::AttentionOptions::default()
            .with_variant(smax::attention::Inline { kernel: InlineKernel::Identity, local: Some(local) })
            .par(Par::Seq),
    )
    .unwrap();
    let mut want = inline_ref(&wide(&q2), &wide(&k), &wide(&v), kl, kl, d, |x| x);
    for y in 0..4i64 {
        for x in 0..7i64 {
            let t = 1 + (y * 7 + x) as usize;
            for ch in 0..d {
                for ky in 0..3i64 {
                    for kx in 0..3i64 {
                        let (yy, xx) = (y + ky - 1, x + kx - 1);
                        if (0..4).contains(&yy) && (0..7).contains(&xx) {
                            let src = 1 + (yy * 7 + xx) as usize;
                            want[t * d + ch] += kern[ch * 9 + (ky * 3 + kx) as usize] as f64 * v[src * d + ch] as f64;
                        }
                    }
                }
            }
        }
    }
    close("inline local", &out, &want, 1e-5);
    // Errors: zero keys, a grid that does not cover the tokens.
    let s0 = AttentionShape::new(1, 1, 1, 0, 2);
    let e = inline_attention(
        smax::attention::AttentionInputs::new(s0, Heads::new(&[0.0f32; 2]), Heads::new(&[]), Heads::new(&[])),
        &mut [0.0f32; 2],
        &smax::attention::AttentionOptions::default()
            .with_variant(smax::attention::Inline { kernel: InlineKernel::Identity, local: None })
            .par(Par::Seq),
    )
    .unwrap_err();
    assert!(matches!(e, Error::BadParameter { name: "kv_len", .. }), "{e}");
    let bad = InlineLocal { height: 3, width: 7, prefix: 1, kernel: &kern };
    let e = inline_attention(
        smax::attention::AttentionInputs::new(s2, Heads::new(&q2), Heads::new(&k), Heads::new(&v)),
        &mut out,
        &smax::attention::AttentionOptions::default()
            .with_variant(smax::attention::Inline { kernel: InlineKernel::Identity, local: Some(bad) })
            .par(Par::Seq),
    )
    .unwrap_err();
    assert!(matches!(e, Error::Unsupported { .. }), "{e}");
    // A grid whose height·width wraps to exactly kv_len − prefix is rejected, not accepted.
    let wraps = InlineLocal { height: (1usize << 63) + 14, width: 2, prefix: 1, kernel: &kern };
    let inline_with = |local, o: AttentionOptions<'static>| {
        let mut out = vec![0.0f32; kl * d];
        inline_attention(
            smax::attention::AttentionInputs::new(s2, Heads::new(&q2), Heads::new(&k), Heads::new(&v)),
            &mut out,
            &o.with_variant(smax::attention::Inline { kernel: InlineKernel::Identity, local }),
        )
    };
    let e = inline_with(Some(wraps), AttentionOptions::default()).unwrap_err();
    assert!(matches!(e, Error::Unsupported { what: "inline local term", .. }), "{e}");
    // Masking options do not apply to linear attention: rejected rather than ignored.
    let e = inline_with(None, AttentionOptions::default().causal(true)).unwrap_err();
    assert!(matches!(e, Error::Unsupported { what: "inline_attention options", .. }), "{e}");
    assert!(inline_with(None, AttentionOptions::default()).is_ok());
}

#[test]
fn variants_are_bitwise_identical_across_thread_counts() {
    let s = AttentionShape::new(2, 4, 70, 90, 16).kv_heads(2);
    let mut rng = Rng(123);
    let (q, k, v) =
        (f32s(rng.vec(s.out_len(), 2.0)), f32s(rng.vec(s.kv_len_elems(), 1.0)), f32s(rng.vec(s.kv_len_elems(), 1.0)));
    let g = f32s(rng.vec(s.out_len(), 1.0));
    let o = AttentionOptions::default().causal(true).tiles(smax::attention::AttentionTiles { q: 16, kv: 32 });
    let run = || {
        let clip = ClippedSoftmax::bert();
        let mut a = vec![0.0f32; s.out_len()];
        let mut lse = vec![0.0f32; s.lse_len()];
        attention_clipped(
            smax::attention::AttentionInputs::new(s, Heads::new(&q), Heads::new(&k), Heads::new(&v)),
            smax::attention::AttentionOutputs::new(&mut a, Some(&mut lse)),
            &o.with_variant(clip),
        )
        .unwrap();
        let (mut dq, mut dk, mut dv) =
            (vec![0.0f32; s.out_len()], vec![0.0f32; s.kv_len_elems()], vec![0.0f32; s.kv_len_elems()]);
        attention_clipped_backward(
            smax::attention::AttentionInputs::new(s, Heads::new(&q), Heads::new(&k), Heads::new(&v)),
            &lse,
            &g,
            AttentionGrads::new(&mut dq, &mut dk, &mut dv),
            &o.with_variant(clip),
        )
        .unwrap();
        let mut b = vec![0.0f32; s.out_len()];
        attention_lssa(
            smax::attention::AttentionInputs::new(s, Heads::new(&q), Heads::new(&k), Heads::new(&v)),
            &mut b,
            &o.with_variant(Lssa::default()),
        )
        .unwrap();
        let mut c = vec![0.0f32; s.out_len()];
        inline_attention(
            smax::attention::AttentionInputs::new(s, Heads::new(&q), Heads::new(&k), Heads::new(&v)),
            &mut c,
            &smax::attention::AttentionOptions::default()
                .with_variant(smax::attention::Inline { kernel: InlineKernel::Identity, local: None }),
        )
        .unwrap();
        (a, dq, dk, dv, b, c)
    };
    let results: Vec<_> = [1usize, 2, 3]
        .iter()
        .map(|&t| rayon::ThreadPoolBuilder::new().num_threads(t).build().unwrap().install(run))
        .collect();
    assert!(results[1] == results[0] && results[2] == results[0]);
}

/// The f64 reference of LSSA / LSSAR over `[1, hq, ql, d]` queries and `[1, 1, kl, d]` keys and
/// values (every query head shares the one KV head), with causal masking at a query offset and
/// an optional keep mask.
#[allow(clippy::too_many_arguments)]
fn lssa_ref(
    q: &[f64],
    k: &[f64],
    v: &[f64],
    (hq, ql, kl, d): (usize, usize, usize, usize),
    offset: i64,
    keep: Option<&[bool]>,
    lssa: Lssa,
) -> Vec<f64> {
    let mut out = vec![0.0f64; hq * ql * d];
    for h in 0..hq {
        let qh = &q[h * ql * d..(h + 1) * ql * d];
        for i in 0..ql {
            let p = i as i64 + offset;
            let vis: Vec<bool> =
                (0..kl).map(|j| j as i64 <= p && keep.is_none_or(|m| m[(h * ql + i) * kl + j])).collect();
            let cos: Vec<f64> = (0..kl).map(|j| cosines(qh, k, d, i, j)).collect();
            let off = if p < lssa.offset_rows as i64 { 0.0 } else { 1.0 };
            let w = lssa_row(&cos, &vis, d, lssa.reweight.map(|x| x as f64), off);
            for j in 0..kl {
                for t in 0..d {
                    out[(h * ql + i) * d + t] += w[j] * v[j * d + t];
                }
            }
        }
    }
    out
}

#[test]
fn lssa_backward_matches_finite_differences() {
    use smax::attention::{AttentionGrads, attention_lssa_backward};
    let mut rng = Rng(91);
    let (hq, ql, kl, d) = (2, 5, 7, 4);
    let s = AttentionShape::new(1, hq, ql, kl, d).kv_heads(1);
    let (q, k, v) =
        (f32s(rng.vec(s.out_len(), 1.0)), f32s(rng.vec(s.kv_len_elems(), 1.0)), f32s(rng.vec(s.kv_len_elems(), 1.0)));
    let c = rng.vec(s.out_len(), 1.0);
    let keep: Vec<bool> = (0..hq * ql * kl).map(|i| (i * 7) % 5 != 1).collect();
    let st = ScoreStrides::contiguous(hq, ql, kl);
    for use_keep in [false, true] {
        for lssa in
            [Lssa { reweight: None, offset_rows: 3 }, Lssa { reweight: Some(3.0), offset_rows: 0 }, Lssa::default()]
        {
            let mut o = AttentionOptions::default().causal(true).positions(QueryPositions::Offset(2));
            if use_keep {
                o = o.keep(KeepMask { data: &keep, strides: st });
            }
            let cf: Vec<f32> = c.iter().map(|&x| x as f32).collect();
            let (mut dq, mut dk, mut dv) = (vec![0.0f32; q.len()], vec![0.0f32; k.len()], vec![0.0f32; v.len()]);
            attention_lssa_backward(
                smax::attention::AttentionInputs::new(s, Heads::new(&q), Heads::new(&k), Heads::new(&v)),
                &cf,
                AttentionGrads::new(&mut dq, &mut dk, &mut dv),
                &o.with_variant(lssa),
            )
            .unwrap();
            let (qw, kw, vw) = (wide(&q), wide(&k), wide(&v));
            let km = use_keep.then_some(&keep[..]);
            let loss = |q: &[f64], k: &[f64], v: &[f64]| -> f64 {
                lssa_ref(q, k, v, (hq, ql, kl, d), 2, km, lssa).iter().zip(&cf).map(|(a, b)| a * *b as f64).sum()
            };
            let eps = 1e-6;
            for (name, got, which) in [("dq", &dq, 0), ("dk", &dk, 1), ("dv", &dv, 2)] {
                let scale = got.iter().fold(1e-3f64, |m, &x| m.max(x.abs() as f64));
                for i in 0..got.len() {
                    let mut xs = [qw.clone(), kw.clone(), vw.clone()];
                    xs[which][i] += eps;
                    let up = loss(&xs[0], &xs[1], &xs[2]);
                    xs[which][i] -= 2.0 * eps;
                    let dn = loss(&xs[0], &xs[1], &xs[2]);
                    let fd = (up - dn) / (2.0 * eps);
                    assert!(
                        (got[i] as f64 - fd).abs() <= 2e-5 * scale,
                        "{lssa:?} keep {use_keep}: {name}[{i}] {} vs {fd}",
                        got[i]
                    );
                }
            }
        }
    }
    // Options that do not apply are refused, as in the forward.
    let (mut dq, mut dk, mut dv) = (vec![0.0f32; q.len()], vec![0.0f32; k.len()], vec![0.0f32; v.len()]);
    let r = attention_lssa_backward(
        smax::attention::AttentionInputs::new(s, Heads::new(&q), Heads::new(&k), Heads::new(&v)),
        &vec![0.0f32; q.len()],
        AttentionGrads::new(&mut dq, &mut dk, &mut dv),
        &AttentionOptions::default().scale(0.5).with_variant(Lssa::default()),
    );
    assert!(r.is_err());
}

/// The local term of InLine in f64 (1 prefix token, an `hh x ww` grid), added to `out`.
fn inline_local_ref(out: &mut [f64], v: &[f64], kern: &[f64], (hh, ww, d): (i64, i64, usize)) {
    for y in 0..hh {
        for x in 0..ww {
            let t = 1 + (y * ww + x) as usize;
            for ch in 0..d {
                for ky in 0..3i64 {
                    for kx in 0..3i64 {
                        let (yy, xx) = (y + ky - 1, x + kx - 1);
                        if (0..hh).contains(&yy) && (0..ww).contains(&xx) {
                            let src = 1 + (yy * ww + xx) as usize;
                            out[t * d + ch] += kern[ch * 9 + (ky * 3 + kx) as usize] * v[src * d + ch];
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn inline_backward_matches_finite_differences() {
    use smax::attention::{AttentionGrads, Inline, inline_attention_backward};
    let mut rng = Rng(23);
    let (hq, hh, ww, d) = (2usize, 2i64, 3i64, 4usize);
    let n = 1 + (hh * ww) as usize;
    let s = AttentionShape::new(1, hq, n, n, d).kv_heads(1);
    let (q, k, v) =
        (f32s(rng.vec(s.out_len(), 1.0)), f32s(rng.vec(s.kv_len_elems(), 1.0)), f32s(rng.vec(s.kv_len_elems(), 1.0)));
    let kern = f32s(rng.vec(hq * d * 9, 0.5));
    let c: Vec<f32> = f32s(rng.vec(s.out_len(), 1.0));
    type Phi = fn(f64) -> f64;
    let kernels: [(InlineKernel, Phi); 4] = [
        (InlineKernel::Identity, |x| x),
        (InlineKernel::Relu, |x| x.max(0.0)),
        (InlineKernel::LeakyRelu(0.1), |x| if x >= 0.0 { x } else { 0.1 * x }),
        (InlineKernel::Exp02, |x| (0.2 * x).exp()),
    ];
    for (kernel, phi) in kernels {
        for with_local in [false, true] {
            let local =
                with_local.then_some(InlineLocal { height: hh as usize, width: ww as usize, prefix: 1, kernel: &kern });
            let (mut dq, mut dk, mut dv) = (vec![0.0f32; q.len()], vec![0.0f32; k.len()], vec![0.0f32; v.len()]);
            let mut dkern = vec![0.0f32; kern.len()];
            inline_attention_backward(
                smax::attention::AttentionInputs::new(s, Heads::new(&q), Heads::new(&k), Heads::new(&v)),
                &c,
                AttentionGrads::new(&mut dq, &mut dk, &mut dv),
                with_local.then_some(&mut dkern[..]),
                &AttentionOptions::default().with_variant(Inline { kernel, local }),
            )
            .unwrap();
            let loss = |x: &[Vec<f64>; 4]| -> f64 {
                let [q, k, v, kn] = x;
                let mut total = 0.0;
                for h in 0..hq {
                    let mut o = inline_ref(&q[h * n * d..(h + 1) * n * d], k, v, n, n, d, phi);
                    if with_local {
                        inline_local_ref(&mut o, v, &kn[h * d * 9..(h + 1) * d * 9], (hh, ww, d));
                    }
                    total += o.iter().zip(&c[h * n * d..(h + 1) * n * d]).map(|(a, b)| a * *b as f64).sum::<f64>();
                }
                total
            };
            let base = [wide(&q), wide(&k), wide(&v), wide(&kern)];
            let eps = 1e-6;
            let mut outs: Vec<(&str, &[f32], usize)> = vec![("dq", &dq, 0), ("dk", &dk, 1), ("dv", &dv, 2)];
            if with_local {
                outs.push(("dkern", &dkern, 3));
            }
            for (name, got, which) in outs {
                let scale = got.iter().fold(1e-3f64, |m, &x| m.max(x.abs() as f64));
                for i in 0..got.len() {
                    let mut x = base.clone();
                    x[which][i] += eps;
                    let up = loss(&x);
                    x[which][i] -= 2.0 * eps;
                    let fd = (up - loss(&x)) / (2.0 * eps);
                    // ReLU's kink: a coordinate within eps of 0 has no derivative to compare.
                    if matches!(kernel, InlineKernel::Relu | InlineKernel::LeakyRelu(_))
                        && which < 2
                        && base[which][i].abs() < 1e-4
                    {
                        continue;
                    }
                    assert!(
                        (got[i] as f64 - fd).abs() <= 2e-5 * scale,
                        "{kernel:?} local {with_local}: {name}[{i}] {} vs {fd}",
                        got[i]
                    );
                }
            }
        }
    }
    // A local term needs its kernel gradient buffer.
    let (mut dq, mut dk, mut dv) = (vec![0.0f32; q.len()], vec![0.0f32; k.len()], vec![0.0f32; v.len()]);
    let local = InlineLocal { height: hh as usize, width: ww as usize, prefix: 1, kernel: &kern };
    assert!(
        inline_attention_backward(
            smax::attention::AttentionInputs::new(s, Heads::new(&q), Heads::new(&k), Heads::new(&v)),
            &c,
            AttentionGrads::new(&mut dq, &mut dk, &mut dv),
            None,
            &AttentionOptions::default().with_variant(Inline { kernel: InlineKernel::Identity, local: Some(local) }),
        )
        .is_err()
    );
}
