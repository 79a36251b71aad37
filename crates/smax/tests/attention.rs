//! Flash attention forward and backward, split-K and unified-max decoding, against a plain f64
//! reference that materialises the scores (written from ALGORITHMS.md A1–A3, not from the
//! kernels), plus the worked examples A1–A3.

// Worked-example values are copied verbatim from the spec (f64 digits), then rounded.
#![allow(clippy::excessive_precision)]

mod common;

use common::Rng;
use smax::attention::{
    AttentionGrads, AttentionOptions, AttentionShape, HeadStrides, Heads, KeepMask, QueryPositions, ScoreBias,
    ScoreStrides, SplitK, UnifiedFallback, UnifiedMax, attention, attention_backward, attention_decode,
    attention_decode_unified, merge_attention_states, profile_unified_max,
};
use smax::{Error, Par, bf16, f16};

/// A test configuration: shape plus masking, with every mask stored contiguously.
#[derive(Clone)]
struct Cfg {
    s: AttentionShape,
    scale: f64,
    tau: f64,
    softcap: Option<f64>,
    causal: bool,
    offset: i64,
    window: Option<(usize, usize)>,
    bias: Option<Vec<f32>>,
    keep: Option<Vec<bool>>,
}

impl Cfg {
    fn new(s: AttentionShape) -> Self {
        Cfg {
            s,
            scale: 1.0 / (s.head_dim as f64).sqrt(),
            tau: 1.0,
            softcap: None,
            causal: false,
            offset: s.kv_len as i64 - s.q_len as i64,
            window: None,
            bias: None,
            keep: None,
        }
    }
    fn opts(&self) -> AttentionOptions<'_> {
        let s = self.s;
        let st = ScoreStrides::contiguous(s.q_heads, s.q_len, s.kv_len);
        let mut o = AttentionOptions::default()
            .causal(self.causal)
            .scale(self.scale as f32)
            .temperature(self.tau)
            .positions(QueryPositions::Offset(self.offset));
        if let Some(c) = self.softcap {
            o = o.softcap(c as f32);
        }
        if let Some((l, r)) = self.window {
            o = o.window(smax::attention::Window { left: l, right: r });
        }
        if let Some(b) = &self.bias {
            o = o.bias(ScoreBias { data: b, strides: st });
        }
        if let Some(k) = &self.keep {
            o = o.keep(KeepMask { data: k, strides: st });
        }
        o
    }
    fn visible(&self, b: usize, h: usize, i: usize, j: usize) -> bool {
        let p = i as i64 + self.offset;
        let j = j as i64;
        if self.causal && j > p {
            return false;
        }
        if let Some((l, r)) = self.window
            && ((j as i128) < p as i128 - l as i128 || j as i128 > p as i128 + r as i128)
        {
            return false;
        }
        if let Some(k) = &self.keep {
            return k[self.sidx(b, h, i) + j as usize];
        }
        true
    }
    fn sidx(&self, b: usize, h: usize, i: usize) -> usize {
        ((b * self.s.q_heads + h) * self.s.q_len + i) * self.s.kv_len
    }
    fn qi(&self, b: usize, h: usize, i: usize) -> usize {
        ((b * self.s.q_heads + h) * self.s.q_len + i) * self.s.head_dim
    }
    fn ki(&self, b: usize, h: usize, j: usize) -> usize {
        let hk = h / (self.s.q_heads / self.s.kv_heads);
        ((b * self.s.kv_heads + hk) * self.s.kv_len + j) * self.s.head_dim
    }
    /// Scores of row (b, h, i), `-inf` where masked.
    fn scores(&self, q: &[f64], k: &[f64], b: usize, h: usize, i: usize) -> Vec<f64> {
        let d = self.s.head_dim;
        (0..self.s.kv_len)
            .map(|j| {
                if !self.visible(b, h, i, j) {
                    return f64::NEG_INFINITY;
                }
                let qr = &q[self.qi(b, h, i)..][..d];
                let kr = &k[self.ki(b, h, j)..][..d];
                let dot: f64 = qr.iter().zip(kr).map(|(a, b)| a * b).sum();
                let bias = self.bias.as_ref().map_or(0.0, |bb| bb[self.sidx(b, h, i) + j] as f64);
                let t = match self.softcap {
                    None => dot * self.scale,
                    Some(c) => c * (dot * self.scale / c).tanh(),
                };
                (t + bias) / self.tau
            })
            .collect()
    }
    /// Reference probabilities of a row and its lse (`None` when nothing is visible).
    fn probs(&self, q: &[f64], k: &[f64], b: usize, h: usize, i: usize) -> (Vec<f64>, f64) {
        let s = self.scores(q, k, b, h, i);
        let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        if m == f64::NEG_INFINITY {
            return (vec![0.0; s.len()], f64::NEG_INFINITY);
        }
        let z: f64 = s.iter().map(|x| (x - m).exp()).sum();
        (s.iter().map(|x| (x - m).exp() / z).collect(), m + z.ln())
    }
    /// Reference forward: output and lse.
    fn forward(&self, q: &[f64], k: &[f64], v: &[f64]) -> (Vec<f64>, Vec<f64>) {
        let s = self.s;
        let d = s.head_dim;
        let mut out = vec![0.0; s.out_len()];
        let mut lse = vec![0.0; s.lse_len()];
        for b in 0..s.batch {
            for h in 0..s.q_heads {
                for i in 0..s.q_len {
                    let (p, l) = self.probs(q, k, b, h, i);
                    lse[(b * s.q_heads + h) * s.q_len + i] = l;
                    let o = &mut out[self.qi(b, h, i)..][..d];
                    for (j, &pj) in p.iter().enumerate() {
                        if pj != 0.0 {
                            for (x, &vv) in o.iter_mut().zip(&v[self.ki(b, h, j)..][..d]) {
                                *x += pj * vv;
                            }
                        }
                    }
                }
            }
        }
        (out, lse)
    }
    /// Reference backward (A1's formulas, materialised, f64).
    fn backward(&self, q: &[f64], k: &[f64], v: &[f64], dout: &[f64]) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        let s = self.s;
        let d = s.head_dim;
        let (out, _) = self.forward(q, k, v);
        let mut dq = vec![0.0; q.len()];
        let mut dk = vec![0.0; k.len()];
        let mut dv = vec![0.0; v.len()];
        let c = self.scale / self.tau;
        for b in 0..s.batch {
            for h in 0..s.q_heads {
                for i in 0..s.q_len {
                    let (p, _) = self.probs(q, k, b, h, i);
                    let qi = self.qi(b, h, i);
                    let dd: f64 = (0..d).map(|t| dout[qi + t] * out[qi + t]).sum();
                    for (j, &pj) in p.iter().enumerate() {
                        if pj == 0.0 {
                            continue;
                        }
                        let kj = self.ki(b, h, j);
                        let dp: f64 = (0..d).map(|t| dout[qi + t] * v[kj + t]).sum();
                        let mut ds = pj * (dp - dd) * c;
                        if let Some(cap) = self.softcap {
                            let dot: f64 = (0..d).map(|t| q[qi + t] * k[kj + t]).sum();
                            let u = (dot * self.scale / cap).tanh();
                            ds *= 1.0 - u * u;
                        }
                        for t in 0..d {
                            dv[kj + t] += pj * dout[qi + t];
                            dq[qi + t] += ds * k[kj + t];
                            dk[kj + t] += ds * q[qi + t];
                        }
                    }
                }
            }
        }
        (dq, dk, dv)
    }
}

/// Inputs rounded to f32 (both sides see the same numbers).
fn inputs(rng: &mut Rng, s: AttentionShape, qs: f64) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let r = |v: Vec<f64>| v.into_iter().map(|x| x as f32).collect::<Vec<f32>>();
    (r(rng.vec(s.out_len(), qs)), r(rng.vec(s.kv_len_elems(), 1.0)), r(rng.vec(s.kv_len_elems(), 1.0)))
}

fn wide(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}

fn run_fwd(cfg: &Cfg, q: &[f32], k: &[f32], v: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let mut out = vec![0.0f32; cfg.s.out_len()];
    let mut lse = vec![0.0f32; cfg.s.lse_len()];
    attention(
        smax::attention::AttentionInputs::new(cfg.s, Heads::new(q), Heads::new(k), Heads::new(v)),
        smax::attention::AttentionOutputs::new(&mut out, Some(&mut lse)),
        &cfg.opts(),
    )
    .unwrap();
    (out, lse)
}

/// The backward of a forward result with `o`: `(dq, dk, dv)`.
#[allow(clippy::too_many_arguments)]
fn bwd(
    s: AttentionShape,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &[f32],
    d_out: &[f32],
    lse: &[f32],
    o: &AttentionOptions<'_>,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (mut dq, mut dk, mut dv) =
        (vec![0.0f32; s.out_len()], vec![0.0f32; s.kv_len_elems()], vec![0.0f32; s.kv_len_elems()]);
    let g = AttentionGrads::new(&mut dq, &mut dk, &mut dv);
    attention_backward(
        smax::attention::AttentionInputs::new(s, Heads::new(q), Heads::new(k), Heads::new(v)),
        out,
        lse,
        d_out,
        g,
        o,
    )
    .unwrap();
    (dq, dk, dv)
}

/// `|got − want| ≤ tol·(1 + scale)` elementwise, NaN only where NaN, equal infinities.
fn close(what: &str, got: &[f32], want: &[f64], tol: f64, scale: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        if w.is_nan() || g.is_nan() {
            assert!(w.is_nan() && g.is_nan(), "{what}[{i}]: got {g}, want {w}");
            continue;
        }
        if w.is_infinite() {
            assert_eq!(g as f64, w, "{what}[{i}]");
            continue;
        }
        let err = (g as f64 - w).abs();
        assert!(err <= tol * (1.0 + scale), "{what}[{i}]: got {g}, want {w}, err {err:e}");
    }
}

fn max_abs(x: &[f64]) -> f64 {
    x.iter().fold(0.0, |a, &b| a.max(b.abs()))
}

/// Forward bound of the module docs: `1e-5·(1 + max|v|)` on outputs, `1e-5·(1 + |lse|)`.
const FWD_TOL: f64 = 1e-5;

fn check_fwd(cfg: &Cfg, qs: f64, seed: u64) {
    let mut rng = Rng(seed);
    let (q, k, v) = inputs(&mut rng, cfg.s, qs);
    let (out, lse) = run_fwd(cfg, &q, &k, &v);
    let (ro, rl) = cfg.forward(&wide(&q), &wide(&k), &wide(&v));
    close("out", &out, &ro, FWD_TOL, max_abs(&wide(&v)));
    for (i, (&g, &w)) in lse.iter().zip(&rl).enumerate() {
        if w.is_infinite() {
            assert_eq!(g as f64, w, "lse[{i}]");
        } else {
            assert!((g as f64 - w).abs() <= FWD_TOL * (1.0 + w.abs()), "lse[{i}] {g} vs {w}");
        }
    }
}

#[test]
fn worked_example_a1() {
    let s = AttentionShape::new(1, 1, 1, 4, 2);
    let q = [1.0f32, 0.5];
    let k = [1.0f32, 0.0, 0.0, 1.0, 1.0, 1.0, -1.0, 0.5];
    let v = [1.0f32, 2.0, 0.0, 1.0, 3.0, -1.0, 0.5, 0.5];
    for tiles in [(1, 2), (4, 1), (128, 256)] {
        let mut out = [0.0f32; 2];
        let mut lse = [0.0f32; 1];
        let o = AttentionOptions::default().tiles(smax::attention::AttentionTiles { q: tiles.0, kv: tiles.1 });
        attention(
            smax::attention::AttentionInputs::new(s, Heads::new(&q), Heads::new(&k), Heads::new(&v)),
            smax::attention::AttentionOutputs::new(&mut out, Some(&mut lse)),
            &o,
        )
        .unwrap();
        assert!((out[0] as f64 - 1.585694277).abs() < 1e-6, "{out:?}");
        assert!((out[1] as f64 - 0.4165550268).abs() < 1e-6, "{out:?}");
        assert!((lse[0] as f64 - 1.9357042212614726).abs() < 1e-6, "{lse:?}");
    }
}

#[test]
fn forward_matches_reference_across_sizes_and_head_dims() {
    let mut seed = 1;
    for &d in &[32usize, 64, 80, 128] {
        for &(ql, kl) in &[(1usize, 1usize), (7, 7), (63, 65), (65, 257), (257, 63), (1, 257)] {
            for causal in [false, true] {
                let mut cfg = Cfg::new(AttentionShape::new(1, 2, ql, kl, d));
                cfg.causal = causal;
                seed += 1;
                check_fwd(&cfg, 3.0, seed);
            }
        }
    }
}

#[test]
fn small_tiles_exercise_every_boundary() {
    // Tiles that do not divide the sizes: every partial-tile path runs.
    for &(bq, bk) in &[(1usize, 1usize), (3, 5), (16, 7), (64, 32)] {
        let mut cfg = Cfg::new(AttentionShape::new(2, 2, 37, 45, 16));
        cfg.causal = true;
        let mut rng = Rng(bq as u64 * 31 + bk as u64);
        let (q, k, v) = inputs(&mut rng, cfg.s, 4.0);
        let mut out = vec![0.0f32; cfg.s.out_len()];
        let mut lse = vec![0.0f32; cfg.s.lse_len()];
        let o = cfg.opts().tiles(smax::attention::AttentionTiles { q: bq, kv: bk });
        attention(
            smax::attention::AttentionInputs::new(cfg.s, Heads::new(&q), Heads::new(&k), Heads::new(&v)),
            smax::attention::AttentionOutputs::new(&mut out, Some(&mut lse)),
            &o,
        )
        .unwrap();
        let (ro, _) = cfg.forward(&wide(&q), &wide(&k), &wide(&v));
        close("out", &out, &ro, FWD_TOL, 1.0);
    }
}

#[test]
fn causal_offsets_windows_bias_keep_and_gqa() {
    let mut rng = Rng(77);
    let base = AttentionShape::new(2, 4, 33, 70, 24).kv_heads(2);
    // Causal with every kind of offset: bottom-right, top-left, negative, beyond the cache.
    for offset in [base.kv_len as i64 - base.q_len as i64, 0, -5, 80] {
        let mut cfg = Cfg::new(base);
        cfg.causal = true;
        cfg.offset = offset;
        check_fwd(&cfg, 3.0, rng.next_u64());
    }
    // Sliding windows, with and without causal (usize::MAX: unbounded, no overflow).
    for (l, r, causal) in
        [(8usize, 0usize, true), (3, 5, false), (0, 0, false), (100, 100, false), (usize::MAX, usize::MAX, true)]
    {
        let mut cfg = Cfg::new(base);
        cfg.window = Some((l, r));
        cfg.causal = causal;
        check_fwd(&cfg, 3.0, rng.next_u64());
    }
    // Additive bias (with -inf entries) and a boolean mask, plus a temperature.
    let n = base.batch * base.q_heads * base.q_len * base.kv_len;
    let mut cfg = Cfg::new(base);
    cfg.bias =
        Some((0..n).map(|i| if i % 11 == 0 { f32::NEG_INFINITY } else { (rng.uniform() * 2.0) as f32 }).collect());
    cfg.keep = Some((0..n).map(|i| i % 7 != 3).collect());
    cfg.tau = 0.7;
    cfg.causal = true;
    check_fwd(&cfg, 3.0, rng.next_u64());
    // Gemma-2-style soft cap, small enough to bend the scores.
    cfg.softcap = Some(1.5);
    check_fwd(&cfg, 3.0, rng.next_u64());
}

#[test]
fn temperature_worked_example_a7() {
    // Scores of A1 (q·k/√2) with V = I: the output is the weight vector.
    let s = AttentionShape::new(1, 1, 1, 4, 4);
    let k: Vec<f32> =
        [[1.0f32, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.5]].iter().flat_map(|r| [r[0], r[1], 0.0, 0.0]).collect();
    let q = [1.0f32, 0.5, 0.0, 0.0];
    let v: Vec<f32> = (0..16).map(|i| if i % 5 == 0 { 1.0 } else { 0.0 }).collect();
    for (tau, want) in [
        (0.9f32, [0.2933262582, 0.198035914, 0.4344681326, 0.0741696952]),
        (0.8, [0.293131237, 0.1884209731, 0.4560316226, 0.0624161673]),
    ] {
        let mut out = [0.0f32; 4];
        let o = AttentionOptions::default().scale(1.0 / 2f32.sqrt()).temperature(tau as f64);
        attention(
            smax::attention::AttentionInputs::new(s, Heads::new(&q), Heads::new(&k), Heads::new(&v)),
            smax::attention::AttentionOutputs::new(&mut out, None),
            &o,
        )
        .unwrap();
        for (g, w) in out.iter().zip(want) {
            assert!((*g as f64 - w).abs() < 1e-6, "tau {tau}: {out:?}");
        }
    }
}

#[test]
fn fully_masked_rows_give_zero_and_neg_inf_lse() {
    let s = AttentionShape::new(1, 2, 6, 5, 8);
    let mut cfg = Cfg::new(s);
    cfg.causal = true;
    cfg.offset = -2; // queries 0 and 1 see nothing
    let mut rng = Rng(5);
    let (q, k, v) = inputs(&mut rng, s, 1.0);
    let (out, lse) = run_fwd(&cfg, &q, &k, &v);
    for h in 0..2 {
        for i in 0..2 {
            assert_eq!(lse[h * 6 + i], f32::NEG_INFINITY);
            assert!(out[(h * 6 + i) * 8..][..8].iter().all(|&x| x == 0.0));
        }
        assert!(lse[h * 6 + 2].is_finite());
    }
    // Zero keys: every row is empty.
    let s0 = AttentionShape::new(1, 1, 3, 0, 4);
    let mut out0 = vec![1.0f32; 12];
    let mut lse0 = vec![0.0f32; 3];
    let o = AttentionOptions::default();
    attention(
        smax::attention::AttentionInputs::new(s0, Heads::new(&[0.0f32; 12]), Heads::new(&[]), Heads::new(&[])),
        smax::attention::AttentionOutputs::new(&mut out0, Some(&mut lse0)),
        &o,
    )
    .unwrap();
    assert!(out0.iter().all(|&x| x == 0.0));
    assert!(lse0.iter().all(|&x| x == f32::NEG_INFINITY));
    // Gradients of empty rows are zero.
    let d_out = vec![1.0f32; s.out_len()];
    let (dq, _, _) = bwd(s, &q, &k, &v, &out, &d_out, &lse, &cfg.opts());
    for h in 0..2 {
        for i in 0..2 {
            assert!(dq[(h * 6 + i) * 8..][..8].iter().all(|&x| x == 0.0));
        }
    }
}

#[test]
fn masked_positions_never_leak_nan_or_inf() {
    // NaN / inf planted in keys and values that every query masks (padding via keep), and in
    // keys that only some queries mask (causal): outputs and gradients equal the clean run.
    let s = AttentionShape::new(1, 2, 20, 40, 16);
    let mut rng = Rng(9);
    let (q, k, v) = inputs(&mut rng, s, 2.0);
    let n = s.q_heads * s.q_len * s.kv_len;
    let mut cfg = Cfg::new(s);
    cfg.causal = true;
    cfg.offset = 10; // query i sees keys 0 ..= i + 10
    cfg.keep = Some((0..n).map(|i| i % s.kv_len < 35).collect()); // keys 35.. are padding
    let d_out: Vec<f32> = rng.vec(s.out_len(), 1.0).into_iter().map(|x| x as f32).collect();
    let run = |k: &[f32], v: &[f32]| {
        let (out, lse) = run_fwd(&cfg, &q, k, v);
        let (dq, dk, dv) = bwd(s, &q, k, v, &out, &d_out, &lse, &cfg.opts());
        (out, lse, dq, dk, dv)
    };
    let clean = run(&k, &v);
    let (mut kb, mut vb) = (k.clone(), v.clone());
    for h in 0..2 {
        for j in 35..40 {
            kb[(h * 40 + j) * 16] = f32::NAN;
            vb[(h * 40 + j) * 16 + 3] = f32::INFINITY;
        }
        // Query i sees key 30 only when i + 10 ≥ 30, never here (q_len 20): key 30 is masked
        // for every query by causality alone.
        kb[(h * 40 + 30) * 16 + 1] = f32::NEG_INFINITY;
        vb[(h * 40 + 30) * 16 + 2] = f32::NAN;
    }
    let dirty = run(&kb, &vb);
    assert_eq!(clean.0, dirty.0, "out");
    assert_eq!(clean.1, dirty.1, "lse");
    assert_eq!(clean.2, dirty.2, "dq");
    // dK and dV of clean keys are unchanged; masked keys get exactly zero.
    for h in 0..2 {
        for j in 0..40 {
            let r = (h * 40 + j) * 16..(h * 40 + j + 1) * 16;
            if j >= 30 {
                assert!(dirty.3[r.clone()].iter().all(|&x| x == 0.0), "dk of masked key {j}");
                assert!(dirty.4[r].iter().all(|&x| x == 0.0), "dv of masked key {j}");
            } else {
                assert_eq!(clean.3[r.clone()], dirty.3[r.clone()]);
                assert_eq!(clean.4[r.clone()], dirty.4[r]);
            }
        }
    }
}

#[test]
fn partially_masked_nan_key_reaches_only_the_rows_that_see_it() {
    // Key 25 holds NaN (key) and inf (value); with causal offset 10 only queries ≥ 15 see it.
    let s = AttentionShape::new(1, 1, 20, 40, 16);
    let mut rng = Rng(19);
    let (q, k, v) = inputs(&mut rng, s, 2.0);
    let mut cfg = Cfg::new(s);
    cfg.causal = true;
    cfg.offset = 10;
    let d_out: Vec<f32> = rng.vec(s.out_len(), 1.0).into_iter().map(|x| x as f32).collect();
    let run = |k: &[f32], v: &[f32]| {
        let (out, lse) = run_fwd(&cfg, &q, k, v);
        let (dq, _, _) = bwd(s, &q, k, v, &out, &d_out, &lse, &cfg.opts());
        (out, dq)
    };
    let clean = run(&k, &v);
    let (mut kb, mut vb) = (k.clone(), v.clone());
    kb[25 * 16 + 4] = f32::NAN;
    vb[25 * 16 + 7] = f32::INFINITY;
    let dirty = run(&kb, &vb);
    assert_eq!(clean.0[..15 * 16], dirty.0[..15 * 16], "rows that mask key 25");
    assert_eq!(clean.1[..15 * 16], dirty.1[..15 * 16], "dq of rows that mask key 25");
    assert!(dirty.0[15 * 16..].iter().all(|x| x.is_nan()), "rows that see a NaN key");
}

#[test]
fn visible_nan_and_inf_propagate() {
    let s = AttentionShape::new(1, 1, 4, 6, 8);
    let mut rng = Rng(3);
    let (q, mut k, mut v) = inputs(&mut rng, s, 1.0);
    let mut cfg = Cfg::new(s);
    cfg.causal = true; // query i sees keys 0 ..= i + 2
    v[3 * 8] = f32::NAN; // key 3: seen by queries 1, 2, 3
    k[5 * 8] = f32::INFINITY; // key 5: seen by query 3 only
    let (out, lse) = run_fwd(&cfg, &q, &k, &v);
    assert!(out[..8].iter().all(|x| x.is_finite()) && lse[0].is_finite());
    assert!(out[8].is_nan() && out[16].is_nan());
    assert!(out[8 + 1].is_finite(), "NaN in one value channel stays in that channel");
    let (ro, _) = cfg.forward(&wide(&q), &wide(&k), &wide(&v));
    for (i, (&g, &w)) in out.iter().zip(&ro).enumerate() {
        assert_eq!(g.is_nan(), w.is_nan(), "[{i}] {g} vs {w}");
    }
}

#[test]
fn thread_count_and_call_composition_do_not_change_bits() {
    let s = AttentionShape::new(2, 4, 150, 300, 32).kv_heads(2);
    let mut cfg = Cfg::new(s);
    cfg.causal = true;
    let mut rng = Rng(21);
    let (q, k, v) = inputs(&mut rng, s, 3.0);
    let d_out: Vec<f32> = rng.vec(s.out_len(), 1.0).into_iter().map(|x| x as f32).collect();
    let mut results = Vec::new();
    for threads in [1usize, 2, 3, 8] {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        results.push(pool.install(|| {
            let (out, lse) = run_fwd(&cfg, &q, &k, &v);
            let (dq, dk, dv) = bwd(s, &q, &k, &v, &out, &d_out, &lse, &cfg.opts());
            (out, lse, dq, dk, dv)
        }));
    }
    let seq = {
        let (mut out, mut lse) = (vec![0.0f32; s.out_len()], vec![0.0f32; s.lse_len()]);
        attention(
            smax::attention::AttentionInputs::new(s, Heads::new(&q), Heads::new(&k), Heads::new(&v)),
            smax::attention::AttentionOutputs::new(&mut out, Some(&mut lse)),
            &cfg.opts().par(Par::Seq),
        )
        .unwrap();
        out
    };
    for r in &results[1..] {
        assert!(r == &results[0]);
    }
    assert_eq!(seq, results[0].0);
    // One batch computed alone equals its slice of the batched call.
    let s1 = AttentionShape::new(1, 4, 150, 300, 32).kv_heads(2);
    let mut c1 = Cfg::new(s1);
    c1.causal = true;
    let (o1, _) = run_fwd(&c1, &q[s1.out_len()..], &k[s1.kv_len_elems()..], &v[s1.kv_len_elems()..]);
    assert_eq!(o1[..], results[0].0[s1.out_len()..]);
}

#[test]
fn strided_bshd_inputs_equal_contiguous() {
    let s = AttentionShape::new(2, 3, 17, 29, 8);
    let mut rng = Rng(4);
    let (q, k, v) = inputs(&mut rng, s, 2.0);
    // Re-lay out as [b, s, h, d].
    let to_bshd = |x: &[f32], h: usize, t: usize| {
        let mut y = vec![0.0f32; x.len()];
        for b in 0..s.batch {
            for hh in 0..h {
                for tt in 0..t {
                    for c in 0..8 {
                        y[((b * t + tt) * h + hh) * 8 + c] = x[((b * h + hh) * t + tt) * 8 + c];
                    }
                }
            }
        }
        y
    };
    let (qb, kb, vb) = (to_bshd(&q, 3, 17), to_bshd(&k, 3, 29), to_bshd(&v, 3, 29));
    let o = AttentionOptions::default().causal(true);
    let mut a = vec![0.0f32; s.out_len()];
    let mut b = vec![0.0f32; s.out_len()];
    attention(
        smax::attention::AttentionInputs::new(s, Heads::new(&q), Heads::new(&k), Heads::new(&v)),
        smax::attention::AttentionOutputs::new(&mut a, None),
        &o,
    )
    .unwrap();
    attention(
        smax::attention::AttentionInputs::new(
            s,
            Heads::strided(&qb, HeadStrides::bshd(3, 17, 8)),
            Heads::strided(&kb, HeadStrides::bshd(3, 29, 8)),
            Heads::strided(&vb, HeadStrides::bshd(3, 29, 8)),
        ),
        smax::attention::AttentionOutputs::new(&mut b, None),
        &o,
    )
    .unwrap();
    assert_eq!(a, b);
}

#[test]
fn half_inputs_are_widened_and_narrowed_once() {
    let s = AttentionShape::new(1, 2, 40, 70, 32);
    let mut rng = Rng(8);
    let (q, k, v) = inputs(&mut rng, s, 2.0);
    let mut cfg = Cfg::new(s);
    cfg.causal = true;
    fn run<T: smax::attention::AttnElement>(
        cfg: &Cfg,
        q: &[f32],
        k: &[f32],
        v: &[f32],
    ) -> (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>) {
        let n = |x: &[f32]| x.iter().map(|&v| T::from_f32(v)).collect::<Vec<T>>();
        let (qn, kn, vn) = (n(q), n(k), n(v));
        let mut out = vec![T::from_f32(0.0); cfg.s.out_len()];
        attention(
            smax::attention::AttentionInputs::new(cfg.s, Heads::new(&qn), Heads::new(&kn), Heads::new(&vn)),
            smax::attention::AttentionOutputs::new(&mut out, None),
            &cfg.opts(),
        )
        .unwrap();
        let w = |x: &[T]| x.iter().map(|v| v.to_f64()).collect::<Vec<f64>>();
        (w(&out), w(&qn), w(&kn), w(&vn))
    }
    for (eps, (out, qw, kw, vw)) in
        [(2f64.powi(-11), run::<f16>(&cfg, &q, &k, &v)), (2f64.powi(-8), run::<bf16>(&cfg, &q, &k, &v))]
    {
        let (ro, _) = cfg.forward(&qw, &kw, &vw);
        for (g, w) in out.iter().zip(&ro) {
            // One rounding of the narrow type on top of the f32 bound.
            assert!((g - w).abs() <= w.abs() * eps + FWD_TOL * 2.0, "{g} vs {w}");
        }
    }
}

#[test]
fn backward_reference_agrees_with_finite_differences() {
    // The f64 reference gradient is itself checked by central differences.
    let s = AttentionShape::new(1, 2, 5, 7, 4).kv_heads(1);
    let mut cfg = Cfg::new(s);
    cfg.causal = true;
    cfg.tau = 0.8;
    for cap in [None, Some(0.7)] {
        cfg.softcap = cap;
        let mut rng = Rng(12);
        let (q, k, v) = (rng.vec(s.out_len(), 1.0), rng.vec(s.kv_len_elems(), 1.0), rng.vec(s.kv_len_elems(), 1.0));
        let dout = rng.vec(s.out_len(), 1.0);
        let (dq, dk, dv) = cfg.backward(&q, &k, &v, &dout);
        let f = |q: &[f64], k: &[f64], v: &[f64]| -> f64 {
            let (o, _) = cfg.forward(q, k, v);
            o.iter().zip(&dout).map(|(a, b)| a * b).sum()
        };
        let hstep = 1e-6;
        for (which, grad) in [(0, &dq), (1, &dk), (2, &dv)] {
            for i in 0..grad.len() {
                let (mut a, mut b) = ([q.clone(), k.clone(), v.clone()], [q.clone(), k.clone(), v.clone()]);
                a[which][i] += hstep;
                b[which][i] -= hstep;
                let fd = (f(&a[0], &a[1], &a[2]) - f(&b[0], &b[1], &b[2])) / (2.0 * hstep);
                assert!((fd - grad[i]).abs() < 1e-7 * (1.0 + fd.abs()), "input {which}[{i}]: fd {fd} vs {}", grad[i]);
            }
        }
    }
}

/// Backward bound: `1e-4·(1 + max|g_ref|)` per gradient.
const BWD_TOL: f64 = 1e-4;

#[test]
fn backward_matches_reference() {
    let mut seed = 100;
    for &d in &[32usize, 64, 80, 128] {
        for &(ql, kl, causal, window) in &[
            (1usize, 1usize, false, None),
            (7, 63, true, None),
            (65, 65, true, None),
            (63, 257, false, Some((20usize, 3usize))),
            (130, 70, true, None),
        ] {
            let s = AttentionShape::new(1, 4, ql, kl, d).kv_heads(2);
            let mut cfg = Cfg::new(s);
            cfg.causal = causal;
            cfg.window = window;
            seed += 1;
            let mut rng = Rng(seed);
            let (q, k, v) = inputs(&mut rng, s, 3.0);
            let d_out: Vec<f32> = rng.vec(s.out_len(), 1.0).into_iter().map(|x| x as f32).collect();
            let (out, lse) = run_fwd(&cfg, &q, &k, &v);
            let (dq, dk, dv) = bwd(s, &q, &k, &v, &out, &d_out, &lse, &cfg.opts());
            let (rq, rk, rv) = cfg.backward(&wide(&q), &wide(&k), &wide(&v), &wide(&d_out));
            close("dq", &dq, &rq, BWD_TOL, max_abs(&rq));
            close("dk", &dk, &rk, BWD_TOL, max_abs(&rk));
            close("dv", &dv, &rv, BWD_TOL, max_abs(&rv));
        }
    }
}

#[test]
fn backward_with_bias_keep_and_temperature() {
    let s = AttentionShape::new(2, 2, 30, 41, 16);
    let n = s.batch * s.q_heads * s.q_len * s.kv_len;
    let mut rng = Rng(55);
    let mut cfg = Cfg::new(s);
    cfg.bias = Some((0..n).map(|_| rng.uniform() as f32).collect());
    cfg.keep = Some((0..n).map(|i| (i * 7) % 5 != 0).collect());
    cfg.tau = 1.3;
    for cap in [None, Some(1.5)] {
        cfg.softcap = cap;
        let (q, k, v) = inputs(&mut rng, s, 2.0);
        let d_out: Vec<f32> = rng.vec(s.out_len(), 1.0).into_iter().map(|x| x as f32).collect();
        let (out, lse) = run_fwd(&cfg, &q, &k, &v);
        let (dq, dk, dv) = bwd(
            s,
            &q,
            &k,
            &v,
            &out,
            &d_out,
            &lse,
            &cfg.opts().tiles(smax::attention::AttentionTiles { q: 16, kv: 16 }),
        );
        let (rq, rk, rv) = cfg.backward(&wide(&q), &wide(&k), &wide(&v), &wide(&d_out));
        close("dq", &dq, &rq, BWD_TOL, max_abs(&rq));
        close("dk", &dk, &rk, BWD_TOL, max_abs(&rk));
        close("dv", &dv, &rv, BWD_TOL, max_abs(&rv));
    }
}

#[test]
fn bad_input_is_a_typed_error() {
    let s = AttentionShape::new(1, 3, 4, 4, 8).kv_heads(2);
    let x = vec![0.0f32; 1000];
    let mut out = vec![0.0f32; s.out_len()];
    let o = AttentionOptions::default();
    let e = attention(
        smax::attention::AttentionInputs::new(s, Heads::new(&x), Heads::new(&x), Heads::new(&x)),
        smax::attention::AttentionOutputs::new(&mut out, None),
        &o,
    )
    .unwrap_err();
    assert!(matches!(e, Error::Unsupported { what: "kv_heads", .. }), "{e}");
    let s = AttentionShape::new(1, 2, 4, 4, 8);
    let mut out = vec![0.0f32; s.out_len()];
    let short = vec![0.0f32; 10];
    let e = attention(
        smax::attention::AttentionInputs::new(s, Heads::new(&short), Heads::new(&x), Heads::new(&x)),
        smax::attention::AttentionOutputs::new(&mut out, None),
        &o,
    )
    .unwrap_err();
    assert!(matches!(e, Error::BufferTooShort { what: "q", .. }), "{e}");
    let e = attention(
        smax::attention::AttentionInputs::new(s, Heads::new(&x), Heads::new(&x), Heads::new(&x)),
        smax::attention::AttentionOutputs::new(&mut out[..5], None),
        &o,
    )
    .unwrap_err();
    assert!(matches!(e, Error::LengthMismatch { what: "out", .. }), "{e}");
    for t in [0.0f32, -1.0, f32::NAN] {
        let e = attention(
            smax::attention::AttentionInputs::new(s, Heads::new(&x), Heads::new(&x), Heads::new(&x)),
            smax::attention::AttentionOutputs::new(&mut out, None),
            &o.temperature(t as f64),
        )
        .unwrap_err();
        assert!(matches!(e, Error::BadParameter { name: "temperature", .. }), "{e}");
    }
    let e = attention(
        smax::attention::AttentionInputs::new(s, Heads::new(&x), Heads::new(&x), Heads::new(&x)),
        smax::attention::AttentionOutputs::new(&mut out, None),
        &o.scale(f32::INFINITY),
    )
    .unwrap_err();
    assert!(matches!(e, Error::BadParameter { name: "scale", .. }), "{e}");
    // Each finite, but `scale/τ = 1e39` is not (the kernels scale q·k by the quotient); with a
    // cap the scores are at most `c/τ`, which must be finite instead.
    let mut quotient = |o: &smax::attention::AttentionOptions| {
        let io = smax::attention::AttentionInputs::new(s, Heads::new(&x), Heads::new(&x), Heads::new(&x));
        attention(io, smax::attention::AttentionOutputs::new(&mut out, None), o)
    };
    for (q, name) in [(o.scale(1e30).temperature(1e-9), "scale"), (o.softcap(1e30).temperature(1e-9), "softcap")] {
        let e = quotient(&q).unwrap_err();
        assert!(matches!(e, Error::BadParameter { name: n, .. } if n == name), "{e}");
    }
    let capped = quotient(&o.scale(1e30).softcap(1.0).temperature(1e-9));
    assert!(capped.is_ok() && out.iter().all(|v| v.is_finite()), "{capped:?}");
    for c in [0.0f32, -2.0, f32::NAN, f32::INFINITY] {
        let e = attention(
            smax::attention::AttentionInputs::new(s, Heads::new(&x), Heads::new(&x), Heads::new(&x)),
            smax::attention::AttentionOutputs::new(&mut out, None),
            &o.softcap(c),
        )
        .unwrap_err();
        assert!(matches!(e, Error::BadParameter { name: "softcap", .. }), "{e}");
    }
    let bias = vec![0.0f32; 3];
    let ob = o.bias(ScoreBias { data: &bias, strides: ScoreStrides::shared(4) });
    let e = attention(
        smax::attention::AttentionInputs::new(s, Heads::new(&x), Heads::new(&x), Heads::new(&x)),
        smax::attention::AttentionOutputs::new(&mut out, None),
        &ob,
    )
    .unwrap_err();
    assert!(matches!(e, Error::BufferTooShort { what: "bias", .. }), "{e}");
    let e = attention(
        smax::attention::AttentionInputs::new(
            s,
            Heads::strided(&x, HeadStrides { batch: 64, head: 32, token: 4 }),
            Heads::new(&x),
            Heads::new(&x),
        ),
        smax::attention::AttentionOutputs::new(&mut out, None),
        &o,
    )
    .unwrap_err();
    assert!(matches!(e, Error::StrideTooSmall { what: "q", .. }), "{e}");
    let s0 = AttentionShape::new(1, 1, 1, 1, 0);
    let e = attention(
        smax::attention::AttentionInputs::new(s0, Heads::new(&x), Heads::new(&x), Heads::new(&x)),
        smax::attention::AttentionOutputs::new(&mut [], None),
        &o,
    )
    .unwrap_err();
    assert!(matches!(e, Error::BadParameter { name: "head_dim", .. }), "{e}");
}

// ---------------------------------------------------------------------------------------------
// Decoding

#[test]
fn worked_example_a2_merge() {
    let o = [0.5874790008f32, 1.5874790008, 2.5768884494, -0.7461330697];
    let l = [1.2390215580409039f32, 1.2460800677481865];
    let (mut out, mut lse) = ([0.0f32; 2], [0.0f32; 1]);
    merge_attention_states(
        smax::attention::PartialStates { parts: 2, rows: 1, head_dim: 2, out: &o, lse: &l },
        &mut out,
        &mut lse,
    )
    .unwrap();
    assert!((lse[0] as f64 - 1.935704221261473).abs() < 1e-6);
    assert!((out[0] as f64 - 1.585694277).abs() < 1e-6 && (out[1] as f64 - 0.4165550268).abs() < 1e-6);
}

#[test]
fn merge_identity_and_grouping() {
    let mut rng = Rng(61);
    let (rows, d, parts) = (3usize, 5usize, 6usize);
    let o: Vec<f32> = rng.vec(parts * rows * d, 2.0).into_iter().map(|x| x as f32).collect();
    let mut l: Vec<f32> = rng.vec(parts * rows, 5.0).into_iter().map(|x| x as f32).collect();
    l[rows] = f32::NEG_INFINITY; // part 1, row 0 is empty
    // Empty parts are the exact identity, whatever their outputs hold.
    let mut with_empty = o.clone();
    with_empty.extend(std::iter::repeat_n(f32::NAN, rows * d));
    let mut l_empty = l.clone();
    l_empty.extend(std::iter::repeat_n(f32::NEG_INFINITY, rows));
    let (mut a, mut la) = (vec![0.0f32; rows * d], vec![0.0f32; rows]);
    let (mut b, mut lb) = (vec![0.0f32; rows * d], vec![0.0f32; rows]);
    merge_attention_states(
        smax::attention::PartialStates { parts, rows, head_dim: d, out: &o, lse: &l },
        &mut a,
        &mut la,
    )
    .unwrap();
    merge_attention_states(
        smax::attention::PartialStates { parts: parts + 1, rows, head_dim: d, out: &with_empty, lse: &l_empty },
        &mut b,
        &mut lb,
    )
    .unwrap();
    assert_eq!(a, b);
    assert_eq!(la, lb);
    // empty ⊕ empty stays empty: output 0, lse -inf, never NaN.
    let (mut e, mut le) = (vec![9.0f32; d], vec![0.0f32; 1]);
    merge_attention_states(
        smax::attention::PartialStates {
            parts: 2,
            rows: 1,
            head_dim: d,
            out: &vec![f32::NAN; 2 * d],
            lse: &[f32::NEG_INFINITY; 2],
        },
        &mut e,
        &mut le,
    )
    .unwrap();
    assert!(e.iter().all(|&x| x == 0.0) && le[0] == f32::NEG_INFINITY);
    // Merging in two groups, then the groups, equals one merge (within rounding).
    let half = 3 * rows;
    let (mut g1, mut lg1) = (vec![0.0f32; rows * d], vec![0.0f32; rows]);
    let (mut g2, mut lg2) = (vec![0.0f32; rows * d], vec![0.0f32; rows]);
    merge_attention_states(
        smax::attention::PartialStates { parts: 3, rows, head_dim: d, out: &o[..half * d], lse: &l[..half] },
        &mut g1,
        &mut lg1,
    )
    .unwrap();
    merge_attention_states(
        smax::attention::PartialStates { parts: 3, rows, head_dim: d, out: &o[half * d..], lse: &l[half..] },
        &mut g2,
        &mut lg2,
    )
    .unwrap();
    let (mut c, mut lc) = (vec![0.0f32; rows * d], vec![0.0f32; rows]);
    merge_attention_states(
        smax::attention::PartialStates {
            parts: 2,
            rows,
            head_dim: d,
            out: &[g1, g2].concat(),
            lse: &[lg1, lg2].concat(),
        },
        &mut c,
        &mut lc,
    )
    .unwrap();
    for (x, y) in a.iter().zip(&c) {
        assert!((x - y).abs() <= 4.0 * f32::EPSILON * (1.0 + x.abs()), "{x} vs {y}");
    }
    for (x, y) in la.iter().zip(&lc) {
        assert!((x - y).abs() <= 4.0 * f32::EPSILON * (1.0 + x.abs()));
    }
    // NaN in a part's lse makes the row NaN.
    let mut ln = l.clone();
    ln[0] = f32::NAN;
    merge_attention_states(
        smax::attention::PartialStates { parts, rows, head_dim: d, out: &o, lse: &ln },
        &mut a,
        &mut la,
    )
    .unwrap();
    assert!(la[0].is_nan() && a[0].is_nan());
}

#[test]
fn split_k_equals_one_pass() {
    let mut rng = Rng(71);
    for &(ql, kl, split, causal) in
        &[(1usize, 1000usize, 128usize, false), (4, 777, 100, true), (1, 50, 7, false), (2, 300, 1000, true)]
    {
        let s = AttentionShape::new(2, 4, ql, kl, 32).kv_heads(2);
        let mut cfg = Cfg::new(s);
        cfg.causal = causal;
        let (q, k, v) = inputs(&mut rng, s, 3.0);
        let (one, lone) = run_fwd(&cfg, &q, &k, &v);
        let mut out = vec![0.0f32; s.out_len()];
        let mut lse = vec![0.0f32; s.lse_len()];
        attention_decode(
            smax::attention::AttentionInputs::new(s, Heads::new(&q), Heads::new(&k), Heads::new(&v)),
            smax::attention::AttentionOutputs::new(&mut out, Some(&mut lse)),
            &cfg.opts().with_variant(SplitK { split_len: split }),
        )
        .unwrap();
        close("split-k out", &out, &wide(&one), 2e-6, 1.0);
        close("split-k lse", &lse, &wide(&lone), 2e-6, 10.0);
        let (ro, _) = cfg.forward(&wide(&q), &wide(&k), &wide(&v));
        close("split-k vs ref", &out, &ro, FWD_TOL, 1.0);
    }
}

#[test]
fn worked_examples_a3_unified_max() {
    // A3: same q, K, V as A1, φ = 1, chunks of 2: no fallback, equals A1.
    let s = AttentionShape::new(1, 1, 1, 4, 2);
    let q = [1.0f32, 0.5];
    let k = [1.0f32, 0.0, 0.0, 1.0, 1.0, 1.0, -1.0, 0.5];
    let v = [1.0f32, 2.0, 0.0, 1.0, 3.0, -1.0, 0.5, 0.5];
    let mut out = [0.0f32; 2];
    let mut lse = [0.0f32; 1];
    let o = AttentionOptions::default();
    let st = attention_decode_unified(
        smax::attention::AttentionInputs::new(s, Heads::new(&q), Heads::new(&k), Heads::new(&v)),
        smax::attention::AttentionOutputs::new(&mut out, Some(&mut lse)),
        &o.with_variant(smax::attention::UnifiedDecode { split: SplitK { split_len: 2 }, max: UnifiedMax::new(1.0) }),
    )
    .unwrap();
    assert_eq!(st.fallback_rows, 0);
    assert!((out[0] as f64 - 1.585694277).abs() < 1e-6 && (out[1] as f64 - 0.4165550268).abs() < 1e-6);
    assert!((lse[0] as f64 - 1.9357042212614726).abs() < 1e-6);
    // A3b: scores x = [4,5,6,7] (no fallback) and y = [3,6,9,6] (fallback), φ = 6, (a, b) = (−3, 3).
    let s = AttentionShape::new(1, 1, 1, 4, 4);
    let v: Vec<f32> = [1.0f32, 2.0, 3.0, 4.0].iter().flat_map(|&x| [x, 0.0, 0.0, 0.0]).collect();
    let q = [1.0f32, 0.0, 0.0, 0.0];
    let um = UnifiedMax { phi: 6.0, a: -3.0, b: Some(3.0), fallback: UnifiedFallback::Paper };
    for (xs, want, fb) in
        [([4.0f32, 5.0, 6.0, 7.0], 3.4926527345857683, 0), ([3.0, 6.0, 9.0, 6.0], 2.995501573106691, 1)]
    {
        let k: Vec<f32> = xs.iter().flat_map(|&x| [x, 0.0, 0.0, 0.0]).collect();
        let mut out = [0.0f32; 4];
        let o = AttentionOptions::default().scale(1.0);
        let st = attention_decode_unified(
            smax::attention::AttentionInputs::new(s, Heads::new(&q), Heads::new(&k), Heads::new(&v)),
            smax::attention::AttentionOutputs::new(&mut out, None),
            &o.with_variant(smax::attention::UnifiedDecode { split: SplitK { split_len: 2 }, max: um }),
        )
        .unwrap();
        assert_eq!(st.fallback_rows, fb, "{xs:?}");
        assert!((out[0] as f64 - want).abs() < 2e-6, "{xs:?}: {out:?}");
    }
    // UpperOnly: y's lower violation alone does not trigger; its upper one does.
    let k: Vec<f32> = [3.0f32, 6.0, 8.0, 6.0].iter().flat_map(|&x| [x, 0.0, 0.0, 0.0]).collect();
    let mut out = [0.0f32; 4];
    let st = attention_decode_unified(
        smax::attention::AttentionInputs::new(s, Heads::new(&q), Heads::new(&k), Heads::new(&v)),
        smax::attention::AttentionOutputs::new(&mut out, None),
        &AttentionOptions::default().scale(1.0).with_variant(smax::attention::UnifiedDecode {
            split: SplitK { split_len: 2 },
            max: UnifiedMax { fallback: UnifiedFallback::UpperOnly, ..um },
        }),
    )
    .unwrap();
    assert_eq!(st.fallback_rows, 0);
}

#[test]
fn unified_max_equals_exact_and_counts_fallbacks() {
    let s = AttentionShape::new(1, 4, 2, 900, 32);
    let mut rng = Rng(90);
    let (q, k, v) = inputs(&mut rng, s, 2.0);
    let mut cfg = Cfg::new(s);
    cfg.causal = true;
    let (ro, rl) = cfg.forward(&wide(&q), &wide(&k), &wide(&v));
    // Profile φ from the reference scores; every row stays inside the default window.
    let (qw, kw) = (wide(&q), wide(&k));
    let mut scores = Vec::new();
    for h in 0..4 {
        for i in 0..2 {
            scores.extend(cfg.scores(&qw, &kw, 0, h, i).iter().map(|&x| x as f32));
        }
    }
    let (lo, hi) = profile_unified_max(&scores, 0.9999).unwrap();
    assert!(lo < hi);
    let mut out = vec![0.0f32; s.out_len()];
    let mut lse = vec![0.0f32; s.lse_len()];
    let dec = SplitK { split_len: 128 };
    let st = attention_decode_unified(
        smax::attention::AttentionInputs::new(s, Heads::new(&q), Heads::new(&k), Heads::new(&v)),
        smax::attention::AttentionOutputs::new(&mut out, Some(&mut lse)),
        &cfg.opts().with_variant(smax::attention::UnifiedDecode { split: dec, max: UnifiedMax::new(lo) }),
    )
    .unwrap();
    assert_eq!(st, smax::attention::UnifiedStats { rows: 8, fallback_rows: 0 });
    close("unified out", &out, &ro, FWD_TOL, 1.0);
    close("unified lse", &lse, &rl, FWD_TOL, 10.0);
    // A narrow window forces a fallback for every row; the result is still exact.
    let narrow = UnifiedMax { phi: lo, a: -0.5, b: Some(0.5), fallback: UnifiedFallback::Paper };
    let st = attention_decode_unified(
        smax::attention::AttentionInputs::new(s, Heads::new(&q), Heads::new(&k), Heads::new(&v)),
        smax::attention::AttentionOutputs::new(&mut out, Some(&mut lse)),
        &cfg.opts().with_variant(smax::attention::UnifiedDecode { split: dec, max: narrow }),
    )
    .unwrap();
    assert_eq!(st.fallback_rows, 8);
    close("fallback out", &out, &ro, FWD_TOL, 1.0);
    // A φ far above every score underflows every row: UpperOnly falls back on the zero sum.
    let high = UnifiedMax { phi: 200.0, a: -1000.0, b: Some(10.0), fallback: UnifiedFallback::UpperOnly };
    let st = attention_decode_unified(
        smax::attention::AttentionInputs::new(s, Heads::new(&q), Heads::new(&k), Heads::new(&v)),
        smax::attention::AttentionOutputs::new(&mut out, None),
        &cfg.opts().with_variant(smax::attention::UnifiedDecode { split: dec, max: high }),
    )
    .unwrap();
    assert_eq!(st.fallback_rows, 8);
    close("underflow fallback out", &out, &ro, FWD_TOL, 1.0);
    // Bad windows are errors.
    let bad = UnifiedMax { phi: 0.0, a: 1.0, b: Some(0.5), fallback: UnifiedFallback::Paper };
    let e = attention_decode_unified(
        smax::attention::AttentionInputs::new(s, Heads::new(&q), Heads::new(&k), Heads::new(&v)),
        smax::attention::AttentionOutputs::new(&mut out, None),
        &cfg.opts().with_variant(smax::attention::UnifiedDecode { split: dec, max: bad }),
    )
    .unwrap_err();
    assert!(matches!(e, Error::BadParameter { .. }));
    let e = attention_decode(
        smax::attention::AttentionInputs::new(s, Heads::new(&q), Heads::new(&k), Heads::new(&v)),
        smax::attention::AttentionOutputs::new(&mut out, None),
        &cfg.opts().with_variant(SplitK { split_len: 0 }),
    )
    .unwrap_err();
    assert!(matches!(e, Error::BadParameter { name: "split_len", .. }));
}

// ---------------------------------------------------------------------------------------------
// Properties over random shapes, masks and tile sizes

use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Forward and backward equal the f64 reference for any shape, grouping, mask and tiling.
    #[test]
    fn matches_reference_for_random_shapes(
        batch in 1usize..3, kv_heads in 1usize..3, group in 1usize..3,
        q_len in 1usize..24, kv_len in 0usize..40, d in 1usize..10,
        causal: bool, offset in -8i64..40, window in proptest::option::of((0usize..12, 0usize..12)),
        bq in 1usize..40, bk in 1usize..40, softcap in proptest::option::of(0.5f64..5.0), seed: u64,
    ) {
        let s = AttentionShape::new(batch, kv_heads * group, q_len, kv_len, d).kv_heads(kv_heads);
        let mut cfg = Cfg::new(s);
        cfg.causal = causal;
        cfg.offset = offset;
        cfg.window = window;
        cfg.softcap = softcap.map(|c| c as f32 as f64);
        let mut rng = Rng(seed | 1);
        let (q, k, v) = inputs(&mut rng, s, 3.0);
        let mut out = vec![0.0f32; s.out_len()];
        let mut lse = vec![0.0f32; s.lse_len()];
        let o = cfg.opts().tiles(smax::attention::AttentionTiles { q: bq, kv: bk });
        attention(smax::attention::AttentionInputs::new(s, Heads::new(&q), Heads::new(&k), Heads::new(&v)), smax::attention::AttentionOutputs::new(&mut out, Some(&mut lse)), &o).unwrap();
        let (ro, rl) = cfg.forward(&wide(&q), &wide(&k), &wide(&v));
        close("out", &out, &ro, FWD_TOL, 1.0);
        for (&g, &w) in lse.iter().zip(&rl) {
            let ok = if w.is_infinite() { g as f64 == w } else { (g as f64 - w).abs() <= FWD_TOL * (1.0 + w.abs()) };
            prop_assert!(ok, "lse {} vs {}", g, w);
        }
        let d_out: Vec<f32> = rng.vec(s.out_len(), 1.0).into_iter().map(|x| x as f32).collect();
        let (dq, dk, dv) = bwd(s, &q, &k, &v, &out, &d_out, &lse, &o);
        let (rq, rk, rv) = cfg.backward(&wide(&q), &wide(&k), &wide(&v), &wide(&d_out));
        close("dq", &dq, &rq, BWD_TOL, max_abs(&rq));
        close("dk", &dk, &rk, BWD_TOL, max_abs(&rk));
        close("dv", &dv, &rv, BWD_TOL, max_abs(&rv));
        // Split-K at a random split equals the reference too.
        let mut o2 = vec![0.0f32; s.out_len()];
        attention_decode(smax::attention::AttentionInputs::new(s, Heads::new(&q), Heads::new(&k), Heads::new(&v)), smax::attention::AttentionOutputs::new(&mut o2, None), &o.with_variant(SplitK { split_len: bk })).unwrap();
        close("split-k", &o2, &ro, FWD_TOL, 1.0);
    }
}

#[test]
fn backward_modes_agree_bit_for_bit() {
    // 8 (batch, kv head) pairs run the one-pass backward on ≤ 8 threads; each batch alone
    // (1 pair) on 2 threads runs the two-pass one (dK/dV per key block, then dQ per query
    // block). Same sums, same order.
    let s = AttentionShape::new(8, 2, 45, 300, 16).kv_heads(1);
    let mut rng = Rng(88);
    let (q, mut k, v) = inputs(&mut rng, s, 3.0);
    k[5 * 16 + 3] = f32::NAN; // a non-finite key in batch 0 exercises the guarded products
    let d_out: Vec<f32> = rng.vec(s.out_len(), 1.0).into_iter().map(|x| x as f32).collect();
    let grads = |s: AttentionShape, q: &[f32], k: &[f32], v: &[f32], d_out: &[f32]| {
        let mut c = Cfg::new(s);
        c.causal = true;
        let o = c.opts().tiles(smax::attention::AttentionTiles { q: 16, kv: 64 });
        let (mut out, mut lse) = (vec![0.0f32; s.out_len()], vec![0.0f32; s.lse_len()]);
        attention(
            smax::attention::AttentionInputs::new(s, Heads::new(q), Heads::new(k), Heads::new(v)),
            smax::attention::AttentionOutputs::new(&mut out, Some(&mut lse)),
            &o,
        )
        .unwrap();
        let (dq, dk, dv) = bwd(s, q, k, v, &out, d_out, &lse, &o);
        (dq, dk, dv)
    };
    let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
    let all = pool.install(|| grads(s, &q, &k, &v, &d_out));
    let s1 = AttentionShape::new(1, 2, 45, 300, 16).kv_heads(1);
    let (nq, nk) = (s1.out_len(), s1.kv_len_elems());
    for b in 0..8 {
        let one = grads(s1, &q[b * nq..][..nq], &k[b * nk..][..nk], &v[b * nk..][..nk], &d_out[b * nq..][..nq]);
        let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<u32>>();
        assert_eq!(bits(&one.0), bits(&all.0[b * nq..][..nq]), "dq of batch {b}");
        assert_eq!(bits(&one.1), bits(&all.1[b * nk..][..nk]), "dk of batch {b}");
        assert_eq!(bits(&one.2), bits(&all.2[b * nk..][..nk]), "dv of batch {b}");
        if b == 1 {
            // A clean batch matches the reference too.
            let mut c1 = Cfg::new(s1);
            c1.causal = true;
            let (rq, rk, rv) = c1.backward(
                &wide(&q[nq..][..nq]),
                &wide(&k[nk..][..nk]),
                &wide(&v[nk..][..nk]),
                &wide(&d_out[nq..][..nq]),
            );
            close("dq", &one.0, &rq, BWD_TOL, max_abs(&rq));
            close("dk", &one.1, &rk, BWD_TOL, max_abs(&rk));
            close("dv", &one.2, &rv, BWD_TOL, max_abs(&rv));
        }
    }
    assert!(all.0.iter().any(|x| x.is_nan()), "rows that see the NaN key get NaN gradients");
}

#[test]
fn grouped_decoding_with_per_head_masks() {
    // Grouped heads are packed into one block per key/value head: per-head bias and masks
    // must still apply to the right rows, in split-K and in the unified-max path.
    let s = AttentionShape::new(2, 6, 3, 500, 16).kv_heads(2);
    let n = s.batch * s.q_heads * s.q_len * s.kv_len;
    let mut rng = Rng(404);
    let (q, k, v) = inputs(&mut rng, s, 2.0);
    let mut cfg = Cfg::new(s);
    cfg.causal = true;
    cfg.bias = Some((0..n).map(|i| ((i / s.kv_len) % 5) as f32 * 0.3 - (i % 3) as f32 * 0.1).collect());
    cfg.keep = Some((0..n).map(|i| (i * 31) % 11 != 4).collect());
    let (ro, rl) = cfg.forward(&wide(&q), &wide(&k), &wide(&v));
    let mut out = vec![0.0f32; s.out_len()];
    let mut lse = vec![0.0f32; s.lse_len()];
    let dec = SplitK { split_len: 96 };
    attention_decode(
        smax::attention::AttentionInputs::new(s, Heads::new(&q), Heads::new(&k), Heads::new(&v)),
        smax::attention::AttentionOutputs::new(&mut out, Some(&mut lse)),
        &cfg.opts().with_variant(dec),
    )
    .unwrap();
    close("grouped split-k", &out, &ro, FWD_TOL, 1.0);
    close("grouped split-k lse", &lse, &rl, FWD_TOL, 10.0);
    let st = attention_decode_unified(
        smax::attention::AttentionInputs::new(s, Heads::new(&q), Heads::new(&k), Heads::new(&v)),
        smax::attention::AttentionOutputs::new(&mut out, Some(&mut lse)),
        &cfg.opts().with_variant(smax::attention::UnifiedDecode { split: dec, max: UnifiedMax::new(-3.0) }),
    )
    .unwrap();
    assert_eq!(st.fallback_rows, 0);
    close("grouped unified", &out, &ro, FWD_TOL, 1.0);
    close("grouped unified lse", &lse, &rl, FWD_TOL, 10.0);
}

#[test]
fn bias_gradient_matches_reference_and_finite_differences() {
    let s = AttentionShape::new(2, 4, 9, 13, 8).kv_heads(2);
    let n = s.batch * s.q_heads * s.q_len * s.kv_len;
    let mut rng = Rng(515);
    let mut cfg = Cfg::new(s);
    cfg.causal = true;
    cfg.offset = 6;
    cfg.tau = 0.9;
    cfg.bias = Some((0..n).map(|_| rng.uniform() as f32).collect());
    cfg.keep = Some((0..n).map(|i| i % 7 != 2).collect());
    let (q, k, v) = inputs(&mut rng, s, 2.0);
    let d_out: Vec<f32> = rng.vec(s.out_len(), 1.0).into_iter().map(|x| x as f32).collect();
    // Reference: ∂(Σ dO ⊙ out)/∂bias by central differences on the f64 reference.
    let (qw, kw, vw, gw) = (wide(&q), wide(&k), wide(&v), wide(&d_out));
    let bias0 = cfg.bias.clone().unwrap();
    let mut want = vec![0.0f64; n];
    for (i, w) in want.iter_mut().enumerate() {
        let f = |delta: f32| {
            let mut c = cfg.clone();
            let mut b = bias0.clone();
            b[i] += delta;
            c.bias = Some(b);
            c.forward(&qw, &kw, &vw).0.iter().zip(&gw).map(|(a, b)| a * b).sum::<f64>()
        };
        *w = (f(1e-3) - f(-1e-3)) / 2e-3;
    }
    for threads in [1usize, 2, 8] {
        // 4 (batch, kv head) pairs: one pass on 1 and 2 threads, two passes on 8.
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        let db = pool.install(|| {
            let (out, lse) = run_fwd(&cfg, &q, &k, &v);
            let (mut dq, mut dk, mut dv) =
                (vec![0.0f32; s.out_len()], vec![0.0f32; s.kv_len_elems()], vec![0.0f32; s.kv_len_elems()]);
            let mut db = vec![f32::NAN; n];
            let g = AttentionGrads::new(&mut dq, &mut dk, &mut dv).with_bias_grad(&mut db);
            attention_backward(
                smax::attention::AttentionInputs::new(s, Heads::new(&q), Heads::new(&k), Heads::new(&v)),
                &out,
                &lse,
                &d_out,
                g,
                &cfg.opts().tiles(smax::attention::AttentionTiles { q: 4, kv: 5 }),
            )
            .unwrap();
            db
        });
        // f32 bias perturbation of 1e-3 limits the difference quotient to ~1e-4.
        close("d_bias", &db, &want, 2e-4, 1.0);
        for (i, &x) in db.iter().enumerate() {
            let (b, h, qi, j) = (i / (4 * 9 * 13), (i / (9 * 13)) % 4, (i / 13) % 9, i % 13);
            if !cfg.visible(b, h, qi, j) {
                assert_eq!(x, 0.0, "masked pair ({b},{h},{qi},{j})");
            }
        }
    }
    let (mut dq, mut dk, mut dv) =
        (vec![0.0f32; s.out_len()], vec![0.0f32; s.kv_len_elems()], vec![0.0f32; s.kv_len_elems()]);
    let mut short = vec![0.0f32; n - 1];
    let g = AttentionGrads::new(&mut dq, &mut dk, &mut dv).with_bias_grad(&mut short);
    let (out, lse) = run_fwd(&cfg, &q, &k, &v);
    let e = attention_backward(
        smax::attention::AttentionInputs::new(s, Heads::new(&q), Heads::new(&k), Heads::new(&v)),
        &out,
        &lse,
        &d_out,
        g,
        &cfg.opts(),
    )
    .unwrap_err();
    assert!(matches!(e, Error::LengthMismatch { what: "d_bias", .. }), "{e}");
}

/// No query head (a multiple, 0, of the key/value heads): nothing attends to the keys, so
/// every key and value gradient is exactly zero, written over whatever the buffers held.
#[test]
fn no_query_heads_give_zero_key_and_value_gradients() {
    let s = AttentionShape::new(2, 0, 3, 5, 4).kv_heads(1);
    let kv = vec![1.0f32; s.kv_len_elems()];
    let (mut dq, mut dk, mut dv) = (vec![], vec![7.0f32; s.kv_len_elems()], vec![7.0f32; s.kv_len_elems()]);
    attention_backward(
        smax::attention::AttentionInputs::new(s, Heads::new(&[]), Heads::new(&kv), Heads::new(&kv)),
        &[],
        &[],
        &[],
        AttentionGrads::new(&mut dq, &mut dk, &mut dv),
        &AttentionOptions::default(),
    )
    .unwrap();
    assert!(dk.iter().chain(&dv).all(|&x| x == 0.0));
}

#[test]
fn sizes_with_no_batch_and_absurd_tiles_are_checked() {
    // Found by the `attention` fuzz target. With batch = 0 the whole product is 0, but the
    // per-head strides multiply heads, tokens and d: that product overflowed.
    let x = [0.0f32; 4];
    let mut out = [0.0f32; 4];
    let s =
        AttentionShape { batch: 0, q_heads: 1 << 40, kv_heads: 1 << 40, q_len: 1 << 20, kv_len: 1, head_dim: 1 << 10 };
    let r = attention(
        smax::attention::AttentionInputs::new(s, Heads::new(&x), Heads::new(&x), Heads::new(&x)),
        smax::attention::AttentionOutputs::new(&mut out, None),
        &AttentionOptions::default(),
    );
    assert!(matches!(r, Err(Error::SizeOverflow { .. })), "{r:?}");
    // Both lengths 0: the product was 0 while `batch·heads` overflowed inside `out_len`.
    let s0 = AttentionShape { batch: 1 << 40, q_heads: 1 << 40, kv_heads: 1 << 40, q_len: 0, kv_len: 0, head_dim: 1 };
    let r = attention(
        smax::attention::AttentionInputs::new(s0, Heads::new(&x), Heads::new(&x), Heads::new(&x)),
        smax::attention::AttentionOutputs::new(&mut out, None),
        &AttentionOptions::default(),
    );
    assert!(matches!(r, Err(Error::SizeOverflow { .. })), "{r:?}");
    assert_eq!(s0.out_len(), 0, "a zero length gives 0 elements whatever the rest");
    // A key count past i64::MAX: the bottom-right offset saturates instead of overflowing.
    let s1 = AttentionShape { batch: 0, q_heads: 1, kv_heads: 1, q_len: 1, kv_len: usize::MAX, head_dim: 1 };
    let r = attention(
        smax::attention::AttentionInputs::new(s1, Heads::new(&x), Heads::new(&x), Heads::new(&x)),
        smax::attention::AttentionOutputs::new(&mut out[..0], None),
        &AttentionOptions { causal: true, ..Default::default() },
    );
    assert!(r.is_ok(), "{r:?}");
    let h = HeadStrides::bhsd(usize::MAX, 2, 2);
    assert_eq!((h.batch, h.head, h.token), (usize::MAX, 4, 2), "strides saturate");
    // Tiles of usize::MAX multiplied the head dimension; they are one tile of the problem,
    // bit for bit the result of tiles of exactly its size.
    let mut rng = Rng(3);
    let (ql, kl, d) = (5, 7, 3);
    let q: Vec<f32> = rng.vec(ql * d, 1.0).iter().map(|&v| v as f32).collect();
    let kv: Vec<f32> = rng.vec(kl * d, 1.0).iter().map(|&v| v as f32).collect();
    let s = AttentionShape::new(1, 1, ql, kl, d);
    let run = |tiles: smax::attention::AttentionTiles| {
        let mut out = vec![0.0f32; ql * d];
        attention(
            smax::attention::AttentionInputs::new(s, Heads::new(&q), Heads::new(&kv), Heads::new(&kv)),
            smax::attention::AttentionOutputs::new(&mut out, None),
            &AttentionOptions { tiles, causal: true, ..Default::default() },
        )
        .unwrap();
        out.iter().map(|v| v.to_bits()).collect::<Vec<u32>>()
    };
    let huge = run(smax::attention::AttentionTiles { q: usize::MAX, kv: usize::MAX });
    assert_eq!(huge, run(smax::attention::AttentionTiles { q: ql, kv: kl }));
}

#[test]
fn without_borrows_keeps_every_setting_and_refuses_a_bias_or_mask() {
    let o = AttentionOptions::<()>::default()
        .causal(true)
        .scale(0.3)
        .softcap(5.0)
        .temperature(0.8)
        .window(smax::attention::Window { left: 3, right: 1 })
        .positions(QueryPositions::Offset(-2));
    let w = o.without_borrows().expect("nothing borrowed");
    assert_eq!((w.scale, w.softcap, w.temperature, w.causal), (Some(0.3), Some(5.0), 0.8, true));
    assert_eq!((w.window, w.positions, w.tiles), (o.window, o.positions, o.tiles));
    let bias = [0.0f32; 4];
    let b = ScoreBias { data: &bias, strides: ScoreStrides::shared(4) };
    assert!(o.bias(b).without_borrows().is_none());
    let keep = [true; 4];
    let k = KeepMask { data: &keep, strides: ScoreStrides::shared(4) };
    assert!(o.keep(k).without_borrows().is_none());
}

#[test]
fn visible_keys_is_the_reference_mask() {
    // Every causal/window/offset combination on small lengths, and the bottom-right default.
    for (sq, skv) in [(1usize, 1usize), (5, 9), (9, 5), (7, 7), (3, 0)] {
        for causal in [false, true] {
            for window in [None, Some((0, 0)), Some((2, 1)), Some((usize::MAX, 3))] {
                for offset in [-4i64, 0, 2, skv as i64 - sq as i64, 1000, -1000] {
                    let mut cfg = Cfg::new(AttentionShape::new(1, 1, sq, skv, 4));
                    (cfg.causal, cfg.window, cfg.offset) = (causal, window, offset);
                    let o = cfg.opts();
                    for i in 0..sq {
                        let r = o.visible_keys(sq, skv, i);
                        for j in 0..skv {
                            assert_eq!(
                                r.contains(&j),
                                cfg.visible(0, 0, i, j),
                                "{causal} {window:?} {offset} i {i} j {j}"
                            );
                        }
                    }
                }
            }
        }
    }
    let o = AttentionOptions::<()>::default().causal(true);
    assert_eq!(o.visible_keys(2, 5, 0), 0..4);
    assert_eq!(o.visible_keys(2, 5, 1), 0..5);
}
