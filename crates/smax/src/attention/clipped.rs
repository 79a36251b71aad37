//! Clipped softmax (N6) and the attention gate (A5) of Bondarenko et al. 2023, "Quantizable
//! Transformers": two ways for a head to attend to nothing.

use super::backward::{Clip, backward_impl, backward_outputs};
use super::flash::fwd_accumulate;
use super::tile::{
    Checked, RowState, Rows, accumulate_pv, check, for_blocks, for_prob_tiles, forward_outputs, products, rows_f32,
};
use super::{
    AttentionGrads, AttentionInputs, AttentionOptions, AttentionOutputs, AttentionShape, AttnElement, check_out,
};

use crate::element::Element;
use crate::error::{Error, Result};
use crate::options::defaults;
use crate::scalar64::sigmoid;

defaults! {
    /// Clipped softmax (Bondarenko et al. 2023, "Quantizable Transformers"; ALGORITHMS.md N6):
    /// `w = clip((ζ − γ)·softmax(s) + γ, 0, 1)`. With `γ < 0` a weight is exactly 0 once
    /// `p ≤ −γ/(ζ − γ)`, so a head can attend to nothing without pushing scores to ±∞; the weights
    /// no longer sum to 1. `ζ = 1, γ = 0` is plain softmax.
    #[derive(Debug, Clone, Copy, PartialEq)]
    pub struct ClippedSoftmax {
        /// Stretch factor ζ ≥ 1.
        pub zeta: f32 = 1.0,
        /// Offset γ ≤ 0.
        pub gamma: f32 = 0.0,
    }
}

impl ClippedSoftmax {
    /// The authors' BERT-base setting: `γ = −0.025, ζ = 1`.
    pub fn bert() -> Self {
        ClippedSoftmax { zeta: 1.0, gamma: -0.025 }
    }
    /// The authors' OPT setting: `γ = −α/T` for sequence length `T` (they use α = 12,
    /// T = 512), `ζ = 1`.
    pub fn opt(alpha: f32, seq_len: usize) -> Self {
        ClippedSoftmax { zeta: 1.0, gamma: -alpha / seq_len.max(1) as f32 }
    }
    fn validate(&self) -> Result<Clip> {
        if !(self.zeta.is_finite() && self.zeta >= 1.0 && self.gamma.is_finite() && self.gamma <= 0.0) {
            return Err(Error::bad_parameter(
                "clipped softmax (zeta, gamma)",
                format!("({}, {})", self.zeta, self.gamma),
                "finite, zeta >= 1 and gamma <= 0",
            ));
        }
        Ok(Clip { zeta: self.zeta, gamma: self.gamma })
    }
}

/// The operands and options of a clipped-softmax call, checked.
fn checked<'a, T>(
    inputs: AttentionInputs<'a, T>,
    opts: &AttentionOptions<'a, ClippedSoftmax>,
) -> Result<(Checked<'a, T>, AttentionShape, Clip)> {
    let AttentionInputs { shape, q, k, v } = inputs;
    let cl = opts.variant.validate()?;
    Ok((check(&shape, q, k, v, &opts.base())?, shape, cl))
}

/// Attention with clipped-softmax weights (N6): `out_i = Σ_j clip((ζ−γ)p_ij + γ, 0, 1)·v_j`,
/// `p = softmax` of the scores of [`attention`](super::attention) (same shapes, masks, options;
/// masked keys get weight exactly 0). Two passes per query block: the log-sum-exp, then the
/// weights `p = exp(s − lse)` tile by tile. `lse` (optional, `[batch, q_heads, q_len]`)
/// receives the softmax log-sum-exp for the backward. A row with no visible key outputs 0.
/// Error bound as [`attention`](super::attention).
pub fn attention_clipped<T: AttnElement>(
    inputs: AttentionInputs<'_, T>,
    outputs: AttentionOutputs<'_, T>,
    opts: &AttentionOptions<'_, ClippedSoftmax>,
) -> Result<()> {
    let (cx, shape, cl) = checked(inputs, opts)?;
    let mut own = Vec::new();
    let Some((out, lse)) = forward_outputs(&shape, outputs, &mut own)? else { return Ok(()) };
    let d = shape.head_dim;
    for_blocks(&cx, &shape, out, lse, |b, h, i0, o, l| {
        let nb = l.len();
        let mut st = RowState::new(nb, 0);
        let mut qbuf = Vec::new();
        let qm = rows_f32(&cx.q, b, h, i0, nb, shape.head_dim, &mut qbuf);
        let rows = Rows::Block { h, i0, n: nb };
        fwd_accumulate(&cx, &shape, b, h / shape.group(), rows, &qm, 0, shape.kv_len, false, &mut st);
        for (r, x) in l.iter_mut().enumerate() {
            *x = if st.l[r] == 0.0 || st.m[r] == f32::NEG_INFINITY {
                f32::NEG_INFINITY
            } else {
                (st.m[r] as f64 + st.l[r].ln()) as f32
            };
        }
        let mut acc = vec![0.0f32; nb * d];
        weighted_pass(&cx, &shape, (b, h, i0), l, &mut acc, |p| cl.w(p));
        T::store_f32(&acc, o);
    });
    Ok(())
}

/// `acc += W·V` over every key tile, with `W = wf(exp(s − lse))` (masked keys: `p = 0`).
fn weighted_pass<T: Element>(
    cx: &Checked<'_, T>,
    s: &AttentionShape,
    (b, h, i0): (usize, usize, usize),
    lse: &[f32],
    acc: &mut [f32],
    wf: impl Fn(f32) -> f32,
) {
    let nb = lse.len();
    if cx.sc.range(i0).0 >= cx.sc.range(i0 + nb - 1).1 {
        return;
    }
    let mut qbuf = Vec::new();
    let qm = rows_f32(&cx.q, b, h, i0, nb, s.head_dim, &mut qbuf);
    for_prob_tiles(cx, s, (b, h, i0), (qm, lse), |pm, vm, vis, bad| {
        for (x, &f) in pm.iter_mut().zip(vis) {
            *x = if f { wf(*x) } else { 0.0 };
        }
        accumulate_pv(acc, pm, &vm, bad.then_some(vis));
    });
}

/// Backward of [`attention_clipped`] (N6): `dV = Wᵀ dO`; with `u = (dO Vᵀ)·(ζ − γ)·1[0 ≤ r ≤ 1]`
/// (inclusive, as `torch.clamp`'s backward) and `D_i = Σ_j u_ij p_ij`, `dS = P ⊙ (u − D)`,
/// then `dQ`, `dK` (and the score-bias gradient `dS/τ` if asked) as
/// [`attention_backward`](super::attention_backward). One extra tiled pass computes `D`. `lse`
/// is the one the forward wrote; the rest as [`attention_backward`](super::attention_backward)
/// (no `out` needed).
pub fn attention_clipped_backward<T: AttnElement>(
    inputs: AttentionInputs<'_, T>,
    lse: &[f32],
    d_out: &[T],
    grads: AttentionGrads<'_, T>,
    opts: &AttentionOptions<'_, ClippedSoftmax>,
) -> Result<()> {
    let (cx, shape, cl) = checked(inputs, opts)?;
    let Some(grads) = backward_outputs(&shape, d_out, lse, grads)? else { return Ok(()) };
    let (d, ql) = (shape.head_dim, shape.q_len);
    let do_op = super::Op { data: d_out, st: super::HeadStrides::bhsd(shape.q_heads, ql, d) };
    // D_i = Σ_j u_ij p_ij, one pass over the key tiles per query block.
    let mut dd = vec![0.0f32; shape.lse_len()];
    let mut blocks = Vec::new();
    for (bh, dh) in dd.chunks_mut(ql).enumerate() {
        for (ib, db) in dh.chunks_mut(cx.bq).enumerate() {
            blocks.push((bh, ib * cx.bq, db));
        }
    }
    let run = |(bh, i0, db): (usize, usize, &mut [f32])| {
        let (b, h) = (bh / shape.q_heads, bh % shape.q_heads);
        let row0 = bh * ql + i0;
        clipped_d(&cx, &shape, &do_op, (b, h, i0), &lse[row0..row0 + db.len()], cl, db);
    };
    crate::par::for_each(cx.par, blocks, |_, t| run(t));
    backward_impl(&cx, &shape, d_out, lse, &dd, Some(cl), grads);
    Ok(())
}

/// `D_i = Σ_j u_ij p_ij` for one query block.
fn clipped_d<T: Element>(
    cx: &Checked<'_, T>,
    s: &AttentionShape,
    do_op: &super::Op<'_, T>,
    (b, h, i0): (usize, usize, usize),
    lse: &[f32],
    cl: Clip,
    dd: &mut [f32],
) {
    let (d, nb) = (s.head_dim, lse.len());
    let mut acc = vec![0.0f64; nb];
    let (mut qbuf, mut dobuf) = (Vec::new(), Vec::new());
    let qm = rows_f32(&cx.q, b, h, i0, nb, d, &mut qbuf);
    let dom = rows_f32(do_op, b, h, i0, nb, d, &mut dobuf);
    let mut gbuf = vec![0.0f32; nb * cx.bk.min(s.kv_len)];
    // dW = dO Vᵀ below: a non-finite value only reaches its own column, which masked pairs
    // skip, so the tile needs no guarded path here.
    for_prob_tiles(cx, s, (b, h, i0), (qm, lse), |pm, vm, vis, _| {
        let gm = products(dom, vm, &mut gbuf);
        let kn = pm.len() / nb;
        for r in 0..nb {
            for j in 0..kn {
                let ix = r * kn + j;
                let (g, p) = (gm[ix], pm[ix]);
                if vis[ix] && p != 0.0 {
                    acc[r] += (cl.u(p, g) * p) as f64;
                }
            }
        }
    });
    for (x, a) in dd.iter_mut().zip(acc) {
        *x = a as f32;
    }
}

/// Gated attention (Bondarenko et al. 2023, A5): `out_r ← σ(g_r) · out_r` for each row `r` of
/// `d` values (one gate logit per token and head; the logits come from the model's gate
/// network `G_h(x_h)`, a linear map `d_head → 1` in OPT). `σ` is evaluated as
/// `1/(1 + e^{−g})` in f64 (no overflow for any finite `g`; `±inf` gives 0 or 1, NaN gives NaN).
/// Initialise the gate bias with [`gate_bias_init`] (`π_init = 0.25` in the paper).
///
/// Errors: `out.len() ≠ gate_logits.len()·d`, or a product `gate_logits.len()·d` that overflows
/// (`Error::SizeOverflow`).
pub fn attention_gate(out: &mut [f32], gate_logits: &[f32], d: usize) -> Result<()> {
    check_out("out", out.len(), gated_len(gate_logits.len(), d)?)?;
    if d == 0 {
        return Ok(());
    }
    for (o, &g) in out.chunks_mut(d).zip(gate_logits) {
        let sg = sigmoid(g as f64) as f32;
        for x in o {
            *x *= sg;
        }
    }
    Ok(())
}

/// Backward of [`attention_gate`]: from the ungated attention output `attn`, the gate logits
/// and the gradient of the gated output, writes `d_attn = σ(g)·d_gated` and
/// `d_logits_r = σ(g)(1 − σ(g))·⟨d_gated_r, attn_r⟩` (f64 dot). Errors: mismatched lengths.
pub fn attention_gate_backward(
    attn: &[f32],
    gate_logits: &[f32],
    d_gated: &[f32],
    d: usize,
    d_attn: &mut [f32],
    d_logits: &mut [f32],
) -> Result<()> {
    let n = gated_len(gate_logits.len(), d)?;
    check_out("attn", attn.len(), n)?;
    check_out("d_gated", d_gated.len(), n)?;
    check_out("d_attn", d_attn.len(), n)?;
    check_out("d_logits", d_logits.len(), gate_logits.len())?;
    if d == 0 {
        d_logits.fill(0.0);
        return Ok(());
    }
    for (r, &g) in gate_logits.iter().enumerate() {
        let sg = sigmoid(g as f64);
        let (a, dg) = (&attn[r * d..(r + 1) * d], &d_gated[r * d..(r + 1) * d]);
        let dot: f64 = a.iter().zip(dg).map(|(x, y)| *x as f64 * *y as f64).sum();
        d_logits[r] = (sg * (1.0 - sg) * dot) as f32;
        for (x, &y) in d_attn[r * d..(r + 1) * d].iter_mut().zip(dg) {
            *x = (sg * y as f64) as f32;
        }
    }
    Ok(())
}

/// `rows · d`, the length of the gated output; `Error::SizeOverflow` when it does not fit.
fn gated_len(rows: usize, d: usize) -> Result<usize> {
    rows.checked_mul(d).ok_or(Error::SizeOverflow { what: "attention gate", shape: format!("{rows} rows x {d}") })
}

/// The gate bias that makes the initial gate open `π_init` (A5): `logit(π) = −ln(1/π − 1)`
/// with π clipped to `[1e−16, 1 − 1e−16]`, as the authors' code. Errors: NaN.
pub fn gate_bias_init(pi_init: f64) -> Result<f64> {
    if pi_init.is_nan() {
        return Err(Error::bad_parameter("pi_init", "NaN", "a probability in [0, 1]"));
    }
    let p = pi_init.clamp(1e-16, 1.0 - 1e-16);
    Ok(-(1.0 / p - 1.0).ln())
}
