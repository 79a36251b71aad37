//! The five targets. Inputs stay small (at most [`MAX_ELEMS`] elements a buffer) so a run
//! explores many shapes per second; sizes that no buffer backs are still decoded, to reach the
//! validation.

use smax::attention::{
    AttentionGrads, AttentionInputs, AttentionOptions, AttentionOutputs, AttentionShape, AttentionTiles,
    ClippedSoftmax, Heads, QueryPositions, SplitK, Window, attention as attention_fwd, attention_backward,
    attention_clipped, attention_decode,
};
use smax::calibrate::{
    Binning, CalibrationOptions, FitOptions, OodOptions, OodScore, brier_score, calibration_error, fit_temperature,
    ood_scores,
};
use smax::gate::{Activation, GateOptions, GateOrder, gate};
use smax::loss::{AllIgnored, CrossEntropyOptions, Reduction, RowOutputs, Targets, cross_entropy as ce};
use smax::quant::{Quantizer, ZeroMode, dequantize, quantize};
use smax::sample::{Draw, GumbelOptions, GumbelSource, Processed, SampleOptions, gumbel_max, sample};
use smax::{Algorithm, Element, Layout, MaskedRow, Options, Par, View, ViewMut, bf16, f16};

use crate::input::{Input, LEN_CAP};

/// The largest buffer a target builds.
const MAX_ELEMS: usize = 4096;

/// Ordinary temperatures, and a tiny one whose `1/τ` is finite but scales ordinary logits past
/// f32 (the shift by the max must come before the scale).
const TEMPERATURES: [f64; 5] = [1.0, 0.5, 2.0, 0.05, 1e-9];

/// Bitwise equality of two results (NaN payloads included).
fn same_bits<T: Element>(a: &[T], b: &[T]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_f64().to_bits() == y.to_f64().to_bits())
}

fn convert<T: Element>(v: &[f64]) -> Vec<T> {
    v.iter().map(|&x| T::from_f64(x)).collect()
}

// ---------------------------------------------------------------------------------------------
// Normalizers.

/// `softmax`, `log_softmax`, `logsumexp` and the backward passes over arbitrary layouts,
/// strides, element types and options.
pub fn normalizers(data: &[u8]) {
    let mut i = Input::new(data);
    match i.small(3) {
        0 => normalizers_t::<f32>(&mut i),
        1 => normalizers_t::<f64>(&mut i),
        2 => normalizers_t::<f16>(&mut i),
        _ => normalizers_t::<bf16>(&mut i),
    }
}

/// A layout and, for a row layout, its row stride (the oracles on rows need it).
fn layout(i: &mut Input) -> (Layout, Option<usize>) {
    match i.small(2) {
        0 => {
            let (r, l) = (i.size(16), i.size(64));
            (Layout::rows(r, l), Some(l))
        }
        1 => {
            let (r, l) = (i.size(16), i.size(64));
            let s = l.saturating_add(i.size(4));
            (Layout::strided_rows(r, l, s), Some(s))
        }
        _ => (Layout::axis(i.size(8), i.size(16), i.size(16)), None),
    }
}

fn normalizers_t<T: Element>(i: &mut Input) {
    let (lx, sx) = layout(i);
    let (ly, sy) = if i.u8() < 200 { (lx, sx) } else { layout(i) };
    let opts = Options {
        temperature: i.param(&TEMPERATURES),
        masked_row: i.pick(&[MaskedRow::Nan, MaskedRow::Zero]),
        algorithm: i.pick(&[Algorithm::Auto, Algorithm::ThreePass, Algorithm::TwoPass, Algorithm::Online]),
        ..Default::default()
    };
    let op = i.small(5);
    let (nx, ny) = (lx.required_len(), ly.required_len());
    let (Some(nx), Some(ny)) = (nx, ny) else {
        // A layout whose size overflows must be refused, whatever the buffer.
        let x: Vec<T> = vec![T::from_f64(0.0); 4];
        for l in [lx, ly].into_iter().filter(|l| l.required_len().is_none()) {
            assert!(View::new(&x, l).is_err(), "a layout whose size overflows must be refused");
        }
        return;
    };
    if nx > MAX_ELEMS || ny > MAX_ELEMS {
        let x: Vec<T> = vec![T::from_f64(0.0); 8];
        if nx > 8 {
            assert!(View::new(&x, lx).is_err(), "a short buffer must be refused");
        }
        return;
    }
    let nx = i.len_near(nx);
    let ny = i.len_near(ny);
    let x: Vec<T> = convert(&i.values(nx));
    let dy: Vec<T> = convert(&i.values(nx));
    let run = |par: Par| -> Option<Vec<T>> {
        let o = Options { exec: smax::Exec { par, simd: None }, ..opts };
        let mut y = vec![T::from_f64(0.0); ny];
        let xv = View::new(&x, lx).ok()?;
        let r = match op {
            0 => smax::softmax(xv, ViewMut::new(&mut y, ly).ok()?, &o),
            1 => smax::log_softmax(xv, ViewMut::new(&mut y, ly).ok()?, &o),
            2 => {
                let mut out = vec![T::from_f64(0.0); lx.row_count().min(MAX_ELEMS)];
                let r = smax::logsumexp(xv, &mut out, &o);
                y = out;
                r
            }
            3 => smax::softmax_backward(xv, View::new(&dy, lx).ok()?, ViewMut::new(&mut y, ly).ok()?, &o),
            4 => smax::log_softmax_backward(xv, View::new(&dy, lx).ok()?, ViewMut::new(&mut y, ly).ok()?, &o),
            _ => {
                y = x.clone();
                smax::softmax_inplace(ViewMut::new(&mut y, lx).ok()?, &o)
            }
        };
        r.ok().map(|_| y)
    };
    let seq = run(Par::Seq);
    let par = run(Par::Rayon);
    match (&seq, &par) {
        (Some(a), Some(b)) => assert!(same_bits(a, b), "thread count changed a result"),
        (None, None) => {}
        _ => panic!("one thread and the pool disagree on success"),
    }
    if let (Some(y), 0, Some(xs), Some(ys)) = (seq, op, sx, sy) {
        check_softmax_rows(&x, &y, (lx, xs, ys), opts.masked_row);
    }
}

/// The README's special-value table and the sum rule, on plain row layouts.
fn check_softmax_rows<T: Element>(x: &[T], y: &[T], (lx, xs, ys): (Layout, usize, usize), masked: MaskedRow) {
    let (rows, len) = (lx.row_count(), lx.row_len());
    if len == 0 {
        return; // rows of nothing: any count of them is valid, and there is nothing to check
    }
    let tol = match core::mem::size_of::<T>() {
        2 if T::from_f64(1.0 + 1.0 / 256.0).to_f64() == 1.0 => 0.02 + len as f64 / 256.0,
        2 => 0.01 + len as f64 / 1024.0,
        _ => 1e-4,
    };
    for r in 0..rows {
        let xr: Vec<f64> = x[r * xs..r * xs + len].iter().map(|v| v.to_f64()).collect();
        let yr: Vec<f64> = y[r * ys..r * ys + len].iter().map(|v| v.to_f64()).collect();
        if xr.iter().any(|v| v.is_nan() || *v == f64::INFINITY) {
            assert!(yr.iter().all(|v| v.is_nan()), "a row with NaN or +inf gives NaN: {xr:?} -> {yr:?}");
        } else if !xr.is_empty() && xr.iter().all(|v| *v == f64::NEG_INFINITY) {
            let want_nan = masked == MaskedRow::Nan;
            assert!(yr.iter().all(|v| if want_nan { v.is_nan() } else { *v == 0.0 }), "masked row: {yr:?}");
        } else if !xr.is_empty() {
            let s: f64 = yr.iter().sum();
            assert!(yr.iter().all(|v| (0.0..=1.0 + tol).contains(v)), "softmax outside [0, 1]: {xr:?} -> {yr:?}");
            assert!((s - 1.0).abs() <= tol, "softmax row sums to {s}: {xr:?} -> {yr:?}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Cross-entropy.

/// `cross_entropy` with every option, class or probability targets, with and without the
/// gradient and the per-row outputs.
pub fn cross_entropy(data: &[u8]) {
    let mut i = Input::new(data);
    match i.small(2) {
        0 => cross_entropy_t::<f32>(&mut i),
        1 => cross_entropy_t::<f64>(&mut i),
        _ => cross_entropy_t::<bf16>(&mut i),
    }
}

fn cross_entropy_t<T: Element>(i: &mut Input) {
    let (rows, len) = (i.size(12), i.size(64));
    let Some(n) = rows.checked_mul(len).filter(|&n| n <= MAX_ELEMS) else {
        let x: Vec<T> = vec![T::from_f64(0.0); 4];
        if let Ok(v) = View::rows(&x, rows, len) {
            let t = vec![0i64; 4];
            let r = ce(v, Targets::Classes(&t), None, RowOutputs::default(), &Default::default());
            assert!(r.is_err());
        }
        return;
    };
    let x: Vec<T> = convert(&i.values_near(n));
    let probs = i.u8() > 200;
    let pv: Vec<T> = convert(&i.values(n));
    let classes: Vec<i64> = (0..i.len_near(rows))
        .map(|_| match i.u8() {
            0..=229 => i.small(len.max(1)) as i64,
            230..=239 => -100,
            240..=247 => len as i64,
            _ => i.u64() as i64,
        })
        .collect();
    let weights: Option<Vec<f32>> =
        (i.u8() > 220).then(|| (0..i.len_near(len)).map(|_| i.param(&[1.0, 0.5, 2.0, 0.0]) as f32).collect());
    let opts = CrossEntropyOptions {
        reduction: i.pick(&[Reduction::Mean, Reduction::Sum, Reduction::None]),
        ignore_index: i.pick(&[-100, 0, 1]),
        class_weights: weights.as_deref(),
        label_smoothing: i.param(&[0.0, 0.0, 0.1, 0.5]),
        z_loss: i.param(&[0.0, 0.0, 1e-4, 1.0]),
        softcap: (i.u8() > 200).then(|| i.param(&[30.0, 1.0, 0.5])),
        temperature: i.param(&TEMPERATURES),
        grad_scale: i.param(&[1.0, 0.5]),
        all_ignored: i.pick(&[AllIgnored::Zero, AllIgnored::Nan]),
        ..Default::default()
    };
    let want_grad = i.bool();
    let want_rows = i.bool();
    let run = |par: Par| -> Option<(u64, u64, Vec<T>, Vec<f64>)> {
        let o = CrossEntropyOptions { exec: smax::Exec { par, simd: None }, ..opts };
        let mut g = vec![T::from_f64(0.0); n];
        let mut loss_rows = vec![0.0f64; rows.min(LEN_CAP)];
        let mut lse = vec![0.0f64; rows.min(LEN_CAP)];
        let xv = View::rows(&x, rows, len).ok()?;
        let t = if probs { Targets::Probs(View::rows(&pv, rows, len).ok()?) } else { Targets::Classes(&classes) };
        let grad = if want_grad { Some(ViewMut::rows(&mut g, rows, len).ok()?) } else { None };
        let ro = if want_rows {
            RowOutputs { loss: Some(&mut loss_rows), z_loss: None, lse: Some(&mut lse) }
        } else {
            RowOutputs::default()
        };
        let r = ce(xv, t, grad, ro, &o).ok()?;
        loss_rows.extend_from_slice(&lse);
        Some((r.loss.to_bits(), r.z_loss.to_bits(), g, loss_rows))
    };
    let (a, b) = (run(Par::Seq), run(Par::Rayon));
    match (&a, &b) {
        (Some(a), Some(b)) => {
            assert_eq!((a.0, a.1), (b.0, b.1), "thread count changed the loss");
            assert!(same_bits(&a.2, &b.2), "thread count changed the gradient");
            assert!(same_bits(&a.3, &b.3), "thread count changed the row outputs");
        }
        (None, None) => {}
        _ => panic!("one thread and the pool disagree on success"),
    }
    // Special values: a row of finite logits has an lse that is a number or `±inf` (the
    // rounding of one past the type), and against a class target a loss `lse − t_y ≥ 0` that
    // is not NaN (`+inf` when it is past the type).
    let Some(a) = a else { return };
    if probs || !want_rows {
        return;
    }
    let shown = rows.min(LEN_CAP);
    // The target mass per row is at most `Σ|w|` (1 without weights).
    let mass = weights.as_ref().map_or(1.0, |w| w.iter().map(|&v| (v as f64).abs()).sum::<f64>()).max(1.0);
    for r in 0..shown {
        let xr = &x[r * len..(r + 1) * len];
        if !xr.iter().all(|v| v.to_f64().is_finite()) {
            continue;
        }
        let (l, s) = (a.3[r], a.3[shown + r]);
        // (`-inf` is the rounding of an lse below `-f64::MAX`: `max x/τ` is, and a cap only
        // raises negative logits.)
        let floor = xr.iter().map(|v| v.to_f64()).fold(f64::NEG_INFINITY, f64::max) / opts.temperature;
        assert!(
            !s.is_nan() && (s > f64::NEG_INFINITY || floor == f64::NEG_INFINITY),
            "row {r}: lse {s} of finite logits"
        );
        // `ℓ = Σ u_k (lse − t_k) ≥ 0`, within the documented rounding: a few f32 roundings of
        // `lse` and `t` per unit of target mass.
        let tmax = xr.iter().map(|v| v.to_f64().abs()).fold(0.0, f64::max) / opts.temperature;
        let tol = 1e-5 * mass * (1.0 + s.abs() + tmax);
        if classes[r] != opts.ignore_index {
            assert!(!l.is_nan() && l >= -tol, "row {r}: loss {l} (lse {s}) of finite logits");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Attention.

/// `attention` forward, backward, split-K decoding and clipped softmax over small shapes with
/// every mask and scaling option.
pub fn attention(data: &[u8]) {
    let mut i = Input::new(data);
    let kv_heads = i.size(2);
    let group = i.size(2);
    let shape = AttentionShape {
        batch: i.size(2),
        q_heads: kv_heads.saturating_mul(group),
        kv_heads,
        q_len: i.size(6),
        kv_len: i.size(6),
        head_dim: i.size(5),
    };
    let opts = AttentionOptions {
        scale: (i.u8() > 200).then(|| i.param(&[0.5, 1.0]) as f32),
        temperature: i.param(&[1.0, 1.0, 0.5, 2.0]),
        softcap: (i.u8() > 220).then(|| i.param(&[5.0, 1.0]) as f32),
        causal: i.bool(),
        positions: if i.u8() > 200 { QueryPositions::Offset(i.u64() as i64 % 8) } else { QueryPositions::BottomRight },
        window: (i.u8() > 200).then(|| Window { left: i.size(4), right: i.size(4) }),
        tiles: AttentionTiles { q: i.size(4), kv: i.size(4) },
        ..Default::default()
    };
    let op = i.small(3);
    let ql = shape.q_heads.saturating_mul(shape.q_len).saturating_mul(shape.head_dim).saturating_mul(shape.batch);
    let kl = shape.kv_heads.saturating_mul(shape.kv_len).saturating_mul(shape.head_dim).saturating_mul(shape.batch);
    if ql > MAX_ELEMS || kl > MAX_ELEMS {
        let (q, k) = (vec![0.0f32; 4], vec![0.0f32; 4]);
        let mut out = vec![0.0f32; 4];
        let r = attention_fwd(
            AttentionInputs::new(shape, Heads::new(&q), Heads::new(&k), Heads::new(&k)),
            AttentionOutputs::new(&mut out, None),
            &opts,
        );
        assert!(r.is_err() || ql == 0, "short operands must be refused");
        return;
    }
    let q: Vec<f32> = i.f32s_near(ql);
    let k: Vec<f32> = i.f32s_near(kl);
    let v: Vec<f32> = i.f32s_near(kl);
    let d_out: Vec<f32> = i.values(ql).iter().map(|&v| v as f32).collect();
    let split_len = i.size(8);
    let rows = shape.batch.saturating_mul(shape.q_heads).saturating_mul(shape.q_len).min(LEN_CAP);
    let run = |par: Par| -> Option<Vec<f32>> {
        let o = AttentionOptions { exec: smax::Exec { par, simd: None }, ..opts };
        let inputs = AttentionInputs::new(shape, Heads::new(&q), Heads::new(&k), Heads::new(&v));
        let mut out = vec![0.0f32; ql];
        let mut lse = vec![0.0f32; rows];
        match op {
            0 => attention_fwd(inputs, AttentionOutputs::new(&mut out, Some(&mut lse)), &o).ok()?,
            1 => {
                attention_fwd(inputs, AttentionOutputs::new(&mut out, Some(&mut lse)), &o).ok()?;
                let (mut dq, mut dk, mut dv) = (vec![0.0f32; ql], vec![0.0f32; kl], vec![0.0f32; kl]);
                let inputs = AttentionInputs::new(shape, Heads::new(&q), Heads::new(&k), Heads::new(&v));
                let g = AttentionGrads::new(&mut dq, &mut dk, &mut dv);
                attention_backward(inputs, &out, &lse, &d_out, g, &o).ok()?;
                out.extend_from_slice(&dq);
                out.extend_from_slice(&dk);
                out.extend_from_slice(&dv);
            }
            2 => {
                let o = o.with_variant(SplitK { split_len });
                attention_decode(inputs, AttentionOutputs::new(&mut out, Some(&mut lse)), &o).ok()?;
            }
            _ => {
                let o = o.with_variant(ClippedSoftmax { zeta: 1.0 + split_len as f32 / 8.0, gamma: -0.01 });
                attention_clipped(inputs, AttentionOutputs::new(&mut out, Some(&mut lse)), &o).ok()?;
            }
        }
        out.extend_from_slice(&lse);
        Some(out)
    };
    match (run(Par::Seq), run(Par::Rayon)) {
        (Some(a), Some(b)) => assert!(same_bits(&a, &b), "thread count changed an attention result"),
        (None, None) => {}
        _ => panic!("one thread and the pool disagree on success"),
    }
}

// ---------------------------------------------------------------------------------------------
// Sampling and gating.

/// `sample` (top-k, top-p, min-p, strict or tie-keeping), `gumbel_max` and `gate`.
pub fn sampling(data: &[u8]) {
    let mut i = Input::new(data);
    let (rows, len) = (i.size(8), i.size(64));
    let Some(n) = rows.checked_mul(len).filter(|&n| n <= MAX_ELEMS) else { return };
    let x: Vec<f32> = i.f32s_near(n);
    match i.small(2) {
        0 => {
            let opts = SampleOptions {
                temperature: i.param(&TEMPERATURES),
                top_k: (i.u8() > 128).then(|| i.size(70)),
                strict_top_k: i.bool(),
                top_p: (i.u8() > 128).then(|| i.param(&[0.9, 0.5, 1.0, 0.01])),
                min_p: (i.u8() > 170).then(|| i.param(&[0.05, 0.1, 0.0, 1.0])),
                ..Default::default()
            };
            let u: Vec<f64> = (0..i.len_near(rows)).map(|_| i.param(&[0.0, 0.25, 0.5, 0.999])).collect();
            let seeds: Vec<u64> = (0..rows.min(LEN_CAP)).map(|_| i.u64()).collect();
            let counter = i.bool();
            let logprobs = i.bool();
            // f64 logits never take the f32 candidate search: a third run, the plain path.
            let x64: Vec<f64> = x.iter().map(|&v| v as f64).collect();
            let run = |par: Par, wide: bool| {
                let o = SampleOptions { exec: smax::Exec { par, simd: None }, ..opts };
                let mut tokens = vec![0u32; rows.min(LEN_CAP)];
                let mut p = vec![0.0f32; n];
                let draw = if counter { Draw::Counter { seeds: &seeds, step: 3 } } else { Draw::Uniform(&u) };
                let kind = if logprobs { Processed::LogProbs } else { Processed::Probs };
                let pv = ViewMut::rows(&mut p, rows, len).ok().map(|v| (v, kind));
                if wide {
                    sample(View::rows(&x64, rows, len).ok()?, draw, &mut tokens, pv, &o).ok()?;
                } else {
                    sample(View::rows(&x, rows, len).ok()?, draw, &mut tokens, pv, &o).ok()?;
                }
                Some((tokens, p))
            };
            let (a, b, c) = (run(Par::Seq, false), run(Par::Rayon, false), run(Par::Seq, true));
            match (&a, &b, &c) {
                (Some(a), Some(b), Some(c)) => {
                    assert!(a.0 == b.0 && same_bits(&a.1, &b.1), "thread count changed a draw");
                    assert!(a.0 == c.0 && same_bits(&a.1, &c.1), "f32 and f64 logits disagree");
                }
                (None, None, None) => {}
                _ => panic!("one thread, the pool and f64 logits disagree on success"),
            }
            if let Some((tokens, _)) = a {
                for (r, &t) in tokens.iter().enumerate() {
                    let t = t as usize;
                    assert!(t < len, "token {t} out of a row of {len}");
                    let v = x[r * len + t];
                    assert!(v != f32::NEG_INFINITY && !v.is_nan(), "row {r} drew masked token {t}");
                }
            }
        }
        1 => {
            let opts = GumbelOptions { temperature: i.param(&TEMPERATURES), k: i.size(8), ..Default::default() };
            let seeds: Vec<u64> = (0..i.len_near(rows)).map(|_| i.u64()).collect();
            let mut tokens = vec![0u32; i.len_near(rows.saturating_mul(opts.k.min(64)))];
            if let Ok(xv) = View::rows(&x, rows, len)
                && gumbel_max(xv, GumbelSource::Counter { seeds: &seeds, step: 1 }, &mut tokens, &opts).is_ok()
            {
                assert!(tokens.iter().all(|&t| (t as usize) < len), "Gumbel token out of range");
            }
        }
        _ => {
            let opts = GateOptions {
                k: i.size(6),
                order: if i.bool() {
                    GateOrder::TopKThenSoftmax
                } else {
                    GateOrder::SoftmaxThenTopK { renormalize: i.bool() }
                },
                temperature: i.param(&TEMPERATURES),
                activation: i.pick(&[Activation::Identity, Activation::Tanh, Activation::Sigmoid]),
                threshold: (i.u8() > 200).then(|| i.param(&[0.1, 0.0, 0.9])),
                routed_scaling_factor: i.param(&[1.0, 2.5]),
                ..Default::default()
            };
            let bias: Option<Vec<f32>> = (i.u8() > 170).then(|| (0..i.len_near(len)).map(|_| i.f64() as f32).collect());
            let k = opts.k.min(64);
            let Some(m) = rows.checked_mul(k) else { return };
            let mut experts = vec![0u32; i.len_near(m)];
            let mut weights = vec![0.0f32; experts.len()];
            let Ok(xv) = View::rows(&x, rows, len) else { return };
            if gate(xv, bias.as_deref(), &mut experts, &mut weights, &opts).is_ok() {
                for (r, (row, wr)) in experts.chunks(k.max(1)).zip(weights.chunks(k.max(1))).enumerate() {
                    let xr = &x[r * len..(r + 1) * len];
                    let unmasked = xr.iter().filter(|v| **v != f32::NEG_INFINITY).count();
                    for (a, (&e, &w)) in row.iter().zip(wr).enumerate() {
                        assert!((e as usize) < len, "expert {e} of {len}");
                        assert!(!row[..a].contains(&e), "expert {e} chosen twice: {row:?}");
                        // Weights carry the sign of the scaling factor (any finite one is valid).
                        assert!(w.is_finite() && w as f64 * opts.routed_scaling_factor >= 0.0, "row {r}: weight {w}");
                        if xr[e as usize] == f32::NEG_INFINITY {
                            assert!(w == 0.0 && unmasked < k, "row {r}: masked expert {e} chosen with weight {w}");
                        }
                    }
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Calibration and quantizers.

/// The calibration metrics and the quantizers.
pub fn calibrate(data: &[u8]) {
    let mut i = Input::new(data);
    let (rows, len) = (i.size(16), i.size(16));
    let Some(n) = rows.checked_mul(len).filter(|&n| n <= MAX_ELEMS) else { return };
    let x: Vec<f32> = i.f32s_near(n);
    let t: Vec<i64> =
        (0..i.len_near(rows)).map(|_| i.small(len.saturating_add(1)) as i64 - (i.u8() > 250) as i64).collect();
    let Ok(xv) = View::rows(&x, rows, len) else { return };
    match i.small(4) {
        0 => {
            let m = i.size(40);
            let binning = if i.bool() { Binning::EqualWidth(m) } else { Binning::EqualMass(m) };
            if let Ok(c) = calibration_error(xv, &t, &CalibrationOptions { binning, ..Default::default() }) {
                assert_eq!(c.bins.iter().map(|b| b.count).sum::<usize>(), rows, "bins miss samples");
                assert!((c.ece.is_nan() || c.ece >= 0.0) && (c.mce.is_nan() || c.mce <= 1.0), "{c:?}");
            }
        }
        1 => {
            let o = FitOptions { t_min: i.param(&[1e-3, 0.1]), t_max: i.param(&[1e3, 10.0]), ..Default::default() };
            if let Ok(f) = fit_temperature(xv, &t, &o) {
                assert!(f.temperature >= o.t_min && f.temperature <= o.t_max, "{f:?}");
            }
            let _ = brier_score(xv, &t);
        }
        2 => {
            let score = match i.small(2) {
                0 => OodScore::Msp,
                1 => OodScore::MaxLogit,
                _ => OodScore::NegEnergy(i.param(&TEMPERATURES)),
            };
            let mut out = vec![0.0f64; i.len_near(rows)];
            let _ = ood_scores(xv, &mut out, &OodOptions { score, ..Default::default() });
        }
        _ => {
            let bits = i.small(20) as u32;
            let q = match i.small(3) {
                0 => Quantizer::Uniform { bits, min: i.f64(), max: i.f64() },
                1 => Quantizer::FixedPoint { bits },
                2 => Quantizer::Log2 { bits, delta: i.param(&[1.0, 0.5]), zero_mode: ZeroMode::Zero },
                _ => Quantizer::LogSqrt2 { bits, delta: i.param(&[1.0, 0.25]) },
            };
            let mut codes = vec![0u16; i.len_near(x.len())];
            let mut zero = vec![false; codes.len()];
            let mut recon = vec![0.0f32; codes.len()];
            if let Ok(rep) = quantize(&x, &q, &mut codes, Some(&mut zero), Some(&mut recon)) {
                let mut back = vec![0.0f32; codes.len()];
                dequantize(&codes, Some(&zero), &q, &mut back).expect("dequantize of quantize's codes");
                for (a, b) in recon.iter().zip(&back) {
                    assert!(a.to_bits() == b.to_bits(), "quantize's reconstruction {a} != dequantize {b} ({q:?})");
                }
                if recon.iter().any(|r| r.is_nan()) {
                    assert!(
                        rep.max_abs_err.is_nan() || x.iter().any(|v| v.is_nan()),
                        "NaN reconstruction hidden: {rep:?}"
                    );
                }
            }
        }
    }
}
