//! Attention variants from the papers: clipped softmax (N6) and the attention gate (A5) of
//! Bondarenko et al. 2023, softplus attention with length scaling and re-weighting (A4, LSSA /
//! LSSAR), and InLine injective linear attention with its local term (A6). TempScale (A7) is
//! the `temperature` of [`AttentionOptions`].

use super::flash::{
    AttentionGrads, Checked, Clip, OnlineTile, ProbTile, RowState, Rows, accumulate_pv, all_finite, backward_impl,
    check, fwd_accumulate, grads_check, kv_tile, rows_f32,
};
use super::{
    AttentionInputs, AttentionOptions, AttentionOutputs, AttentionShape, AttnElement, Scores, check_out, lse_or_own,
    resolve,
};
use crate::arch::dispatch;
use crate::arch::gemm::{MatRef, matmul};
use crate::element::Element;
use crate::error::{Error, Result};
use crate::options::Par;

// ---------------------------------------------------------------------------------------------
// Clipped softmax (N6)

/// Clipped softmax (Bondarenko et al. 2023, "Quantizable Transformers"; ALGORITHMS.md N6):
/// `w = clip((ζ − γ)·softmax(s) + γ, 0, 1)`. With `γ < 0` a weight is exactly 0 once
/// `p ≤ −γ/(ζ − γ)`, so a head can attend to nothing without pushing scores to ±∞; the weights
/// no longer sum to 1. `ζ = 1, γ = 0` is plain softmax.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ClippedSoftmax {
    /// Stretch factor ζ ≥ 1.
    pub zeta: f32,
    /// Offset γ ≤ 0.
    pub gamma: f32,
}

impl Default for ClippedSoftmax {
    fn default() -> Self {
        ClippedSoftmax { zeta: 1.0, gamma: 0.0 }
    }
}

impl ClippedSoftmax {
    /// The authors' BERT-base setting: `γ = −0.025, ζ = 1`.
    pub fn bert() -> Self {
        ClippedSoftmax {
            zeta: 1.0,
            gamma: -0.025,
        }
    }
    /// The authors' OPT setting: `γ = −α/T` for sequence length `T` (they use α = 12,
    /// T = 512), `ζ = 1`.
    pub fn opt(alpha: f32, seq_len: usize) -> Self {
        ClippedSoftmax {
            zeta: 1.0,
            gamma: -alpha / seq_len.max(1) as f32,
        }
    }
    fn validate(&self) -> Result<Clip> {
        if !(self.zeta.is_finite() && self.zeta >= 1.0 && self.gamma.is_finite() && self.gamma <= 0.0) {
            return Err(Error::bad_parameter(
                "clipped softmax (zeta, gamma)",
                format!("({}, {})", self.zeta, self.gamma),
                "finite, zeta >= 1 and gamma <= 0",
            ));
        }
        Ok(Clip {
            zeta: self.zeta,
            gamma: self.gamma,
        })
    }
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
    let AttentionInputs { shape, q, k, v } = inputs;
    let AttentionOutputs { out, lse } = outputs;
    let (clip, opts) = (&opts.variant, &opts.base());
    let cl = clip.validate()?;
    let cx = check(&shape, q, k, v, opts)?;
    check_out("out", out.len(), shape.out_len())?;
    let mut own = Vec::new();
    let lse = lse_or_own(lse, &mut own, shape.lse_len())?;
    if shape.out_len() == 0 {
        lse.fill(f32::NEG_INFINITY);
        return Ok(());
    }
    let d = shape.head_dim;
    for_blocks(&cx, &shape, out, lse, |b, h, i0, o, l| {
        let nb = l.len();
        let mut st = RowState::new(nb, 0);
        let mut qbuf = Vec::new();
        let qm = rows_f32(&cx.q, b, h, i0, nb, shape.head_dim, &mut qbuf);
        let rows = Rows::Block { h, i0, n: nb };
        fwd_accumulate(
            &cx,
            &shape,
            b,
            h / shape.group(),
            rows,
            &qm,
            0,
            shape.kv_len,
            false,
            &mut st,
        );
        for (r, x) in l.iter_mut().enumerate() {
            *x = if st.l[r] == 0.0 || st.m[r] == f32::NEG_INFINITY {
                f32::NEG_INFINITY
            } else {
                (st.m[r] as f64 + st.l[r].ln()) as f32
            };
        }
        let mut acc = vec![0.0f32; nb * d];
        weighted_pass(&cx, &shape, b, h, i0, l, &mut acc, |p| cl.w(p));
        T::store_f32(&acc, o);
    });
    Ok(())
}

/// Runs `f(b, h, i0, out_block, lse_block)` for every query block, in parallel.
fn for_blocks<T: Element, F>(cx: &Checked<'_, T>, s: &AttentionShape, out: &mut [T], lse: &mut [f32], f: F)
where
    F: Fn(usize, usize, usize, &mut [T], &mut [f32]) + Sync + Send,
{
    let (d, ql, bq) = (s.head_dim, s.q_len, cx.bq);
    let mut blocks = Vec::new();
    for (bh, (o, l)) in out.chunks_mut(ql * d).zip(lse.chunks_mut(ql)).enumerate() {
        for (ib, (ob, lb)) in o.chunks_mut(bq * d).zip(l.chunks_mut(bq)).enumerate() {
            blocks.push((bh / s.q_heads, bh % s.q_heads, ib * bq, ob, lb));
        }
    }
    let run = |(b, h, i0, o, l): (usize, usize, usize, &mut [T], &mut [f32])| f(b, h, i0, o, l);
    crate::par::for_each(cx.par, blocks, |_, t| run(t));
}

/// `acc += W·V` over every key tile, with `W = wf(exp(s − lse))` (masked keys: `p = 0`).
#[allow(clippy::too_many_arguments)]
fn weighted_pass<T: Element>(
    cx: &Checked<'_, T>,
    s: &AttentionShape,
    b: usize,
    h: usize,
    i0: usize,
    lse: &[f32],
    acc: &mut [f32],
    wf: impl Fn(f32) -> f32,
) {
    let (d, kl, nb, bk) = (s.head_dim, s.kv_len, lse.len(), cx.bk);
    let hk = h / s.group();
    let sc = &cx.sc;
    let lo = sc.range(i0).0;
    let hi = sc.range(i0 + nb - 1).1;
    if lo >= hi {
        return;
    }
    let mut qbuf = Vec::new();
    let qm = rows_f32(&cx.q, b, h, i0, nb, d, &mut qbuf);
    let mut sbuf = vec![0.0f32; nb * bk.min(kl)];
    let (mut kbuf, mut vbuf, mut vis) = (Vec::new(), Vec::new(), Vec::new());
    let mut j0 = lo / bk * bk;
    while j0 < hi {
        let kn = bk.min(kl - j0);
        let (km, vm, bad) = kv_tile(cx, b, hk, j0, kn, d, &mut kbuf, &mut vbuf);
        let sm = &mut sbuf[..nb * kn];
        matmul(sm, kn, qm, km.t(), false, Par::Seq);
        vis.clear();
        vis.resize(nb * kn, false);
        dispatch(
            cx.level,
            ProbTile {
                sc,
                b,
                h,
                i0,
                j0,
                kn,
                t: sm,
                lse,
                vis: Some(&mut vis[..]),
                dcap: None,
            },
        );
        for (x, &f) in sm.iter_mut().zip(&vis) {
            *x = if f { wf(*x) } else { 0.0 };
        }
        accumulate_pv(acc, sm, &vm, if bad { Some(&vis[..]) } else { None });
        j0 += kn;
    }
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
    let AttentionInputs { shape, q, k, v } = inputs;
    let (clip, opts) = (&opts.variant, &opts.base());
    let cl = clip.validate()?;
    let cx = check(&shape, q, k, v, opts)?;
    check_out("d_out", d_out.len(), shape.out_len())?;
    check_out("lse", lse.len(), shape.lse_len())?;
    let AttentionGrads { dq, dk, dv, mut d_bias } = grads;
    grads_check(&shape, dq, dk, dv, d_bias.as_deref())?;
    if let Some(db) = d_bias.as_deref_mut() {
        db.fill(0.0);
    }
    let (d, ql) = (shape.head_dim, shape.q_len);
    if shape.batch == 0 || shape.q_heads == 0 || ql == 0 || shape.kv_len == 0 {
        dq.fill(T::from_f32(0.0));
        dk.fill(T::from_f32(0.0));
        dv.fill(T::from_f32(0.0));
        return Ok(());
    }
    let do_op = super::Op {
        data: d_out,
        st: super::HeadStrides::bhsd(shape.q_heads, ql, d),
    };
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
        clipped_d(&cx, &shape, &do_op, b, h, i0, &lse[row0..row0 + db.len()], cl, db);
    };
    crate::par::for_each(cx.par, blocks, |_, t| run(t));
    backward_impl(&cx, &shape, d_out, lse, &dd, Some(cl), dq, dk, dv, d_bias);
    Ok(())
}

/// `D_i = Σ_j u_ij p_ij` for one query block.
#[allow(clippy::too_many_arguments)]
fn clipped_d<T: Element>(
    cx: &Checked<'_, T>,
    s: &AttentionShape,
    do_op: &super::Op<'_, T>,
    b: usize,
    h: usize,
    i0: usize,
    lse: &[f32],
    cl: Clip,
    dd: &mut [f32],
) {
    let (d, kl, nb, bk) = (s.head_dim, s.kv_len, lse.len(), cx.bk);
    let hk = h / s.group();
    let sc = &cx.sc;
    let mut acc = vec![0.0f64; nb];
    let (lo, hi) = (sc.range(i0).0, sc.range(i0 + nb - 1).1);
    let (mut qbuf, mut dobuf) = (Vec::new(), Vec::new());
    let qm = rows_f32(&cx.q, b, h, i0, nb, d, &mut qbuf);
    let dom = rows_f32(do_op, b, h, i0, nb, d, &mut dobuf);
    let mut pbuf = vec![0.0f32; nb * bk.min(kl)];
    let mut gbuf = vec![0.0f32; nb * bk.min(kl)];
    let (mut kbuf, mut vbuf, mut vis) = (Vec::new(), Vec::new(), Vec::new());
    let mut j0 = lo / bk * bk;
    while j0 < hi {
        let kn = bk.min(kl - j0);
        // dW = dO Vᵀ below: a non-finite value only reaches its own column, which masked pairs
        // skip, so the tile needs no guarded path here.
        let (km, vm, _) = kv_tile(cx, b, hk, j0, kn, d, &mut kbuf, &mut vbuf);
        let pm = &mut pbuf[..nb * kn];
        let gm = &mut gbuf[..nb * kn];
        matmul(pm, kn, qm, km.t(), false, Par::Seq);
        vis.clear();
        vis.resize(nb * kn, false);
        dispatch(
            cx.level,
            ProbTile {
                sc,
                b,
                h,
                i0,
                j0,
                kn,
                t: pm,
                lse,
                vis: Some(&mut vis[..]),
                dcap: None,
            },
        );
        // dW = dO Vᵀ; a non-finite value only reaches its own column, which masked pairs skip.
        matmul(gm, kn, dom, vm.t(), false, Par::Seq);
        for r in 0..nb {
            for j in 0..kn {
                let ix = r * kn + j;
                if !vis[ix] {
                    continue;
                }
                let g = gm[ix];
                let p = pm[ix];
                if p != 0.0 {
                    acc[r] += (cl.u(p, g) * p) as f64;
                }
            }
        }
        j0 += kn;
    }
    for (x, a) in dd.iter_mut().zip(acc) {
        *x = a as f32;
    }
}

// ---------------------------------------------------------------------------------------------
// Attention gate (A5)

/// Gated attention (Bondarenko et al. 2023, A5): `out_r ← σ(g_r) · out_r` for each row `r` of
/// `d` values (one gate logit per token and head; the logits come from the model's gate
/// network `G_h(x_h)`, a linear map `d_head → 1` in OPT). `σ` is evaluated as
/// `1/(1 + e^{−g})` in f64 (no overflow for any finite `g`; `±inf` gives 0 or 1, NaN gives NaN).
/// Initialise the gate bias with [`gate_bias_init`] (`π_init = 0.25` in the paper).
///
/// Errors: `out.len() ≠ gate_logits.len()·d`.
pub fn attention_gate(out: &mut [f32], gate_logits: &[f32], d: usize) -> Result<()> {
    check_out("out", out.len(), gate_logits.len() * d)?;
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
    let n = gate_logits.len() * d;
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

/// The gate bias that makes the initial gate open `π_init` (A5): `logit(π) = −ln(1/π − 1)`
/// with π clipped to `[1e−16, 1 − 1e−16]`, as the authors' code. Errors: NaN.
pub fn gate_bias_init(pi_init: f64) -> Result<f64> {
    if pi_init.is_nan() {
        return Err(Error::bad_parameter("pi_init", "NaN", "a probability in [0, 1]"));
    }
    let p = pi_init.clamp(1e-16, 1.0 - 1e-16);
    Ok(-(1.0 / p - 1.0).ln())
}

fn sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

// ---------------------------------------------------------------------------------------------
// Softplus attention, LSSA / LSSAR (A4, N7)

/// Softplus attention with length scaling (LSSA) and optional re-weighting (LSSAR), from
/// Gao & Spratling (arXiv 2501.13428, v4/v5; ALGORITHMS.md A4, reconstructed from secondary
/// sources, the paper's own equations were not read: **\[SECONDARY\]**).
///
/// LSSA: `A_ij = softplus(s_i·c_ij) / Σ_j softplus(s_i·c_ij)` over the visible keys, with the
/// cosine `c_ij = q̂_i·k̂_j` (ℓ2-normalised rows, no `1/√d`) and `s_i = ln d · ln N_i`, `N_i`
/// the number of keys row `i` sees. LSSAR: `R_i = normalise(ReLU(N_i·A_i − o_i)^p)`, computed
/// in the log domain as a softmax over `p·ln(N_i A_ij − o_i)` on the positive entries, with
/// `o_i = 0` for the first `offset_rows` positions (1-based position ≤ `offset_rows`) and 1
/// after.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Lssa {
    /// The re-weighting power `p` (LSSAR); `None` for plain LSSA. Default `Some(15.0)`, the
    /// paper's headline setting (3 was best at the training length).
    pub reweight: Option<f32>,
    /// Positions that use offset 0 (default 3).
    pub offset_rows: usize,
}

impl Default for Lssa {
    fn default() -> Self {
        Lssa {
            reweight: Some(15.0),
            offset_rows: 3,
        }
    }
}

/// What [`attention_lssa`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LssaStats {
    /// LSSAR rows with no positive `N_i A_ij − o_i` (an exactly uniform row): returned as
    /// their LSSA row, as the spec's policy says.
    pub uniform_rows: usize,
}

/// Softplus attention LSSA / LSSAR (A4): `out_i = Σ_j w_ij v_j` with the weights of [`Lssa`].
///
/// Masks: `causal`, `window` and `keep` of `opts` decide the visible keys (masked keys get
/// weight exactly 0, the spec's multiplicative mask); a row with no visible key outputs 0.
/// `scale`, `temperature`, `softcap` and `bias` do not apply (cosine scores are scaled by
/// `s_i`) and are rejected. A zero query or key has cosine 0 (`x / max(‖x‖, 1e-12)`, PyTorch's
/// `F.normalize`). Requires `head_dim ≥ 2` (`ln 1 = 0` would make every row uniform).
/// Bound: the softplus arguments are at most `ln d · ln kv_len` in magnitude (40 at d = 64,
/// 16k keys), so no exponential overflows; tested within `1e-5` relative to an f64 reference.
pub fn attention_lssa<T: AttnElement>(
    inputs: AttentionInputs<'_, T>,
    out: &mut [T],
    opts: &AttentionOptions<'_, Lssa>,
) -> Result<LssaStats> {
    let AttentionInputs { shape, q, k, v } = inputs;
    let (lssa, opts) = (&opts.variant, &opts.base());
    if opts.scale.is_some() || opts.temperature != 1.0 || opts.bias.is_some() || opts.softcap.is_some() {
        return Err(Error::Unsupported {
            what: "attention_lssa options",
            why: "scale, temperature, softcap and bias do not apply to softplus attention (use causal, window or keep)",
        });
    }
    if shape.head_dim < 2 {
        return Err(Error::bad_parameter(
            "head_dim",
            shape.head_dim,
            ">= 2 for softplus attention (ln d scales the cosines)",
        ));
    }
    if let Some(p) = lssa.reweight
        && !(p.is_finite() && p > 0.0)
    {
        return Err(Error::bad_parameter("reweight power p", p, "finite and > 0"));
    }
    let mut cx = check(&shape, q, k, v, opts)?;
    check_out("out", out.len(), shape.out_len())?;
    if shape.out_len() == 0 {
        return Ok(LssaStats::default());
    }
    // Cosine scores: c = 1 and no bias, so `prep_row` only masks.
    cx.sc.c = 1.0;
    let mut lse_unused = vec![0.0f32; shape.lse_len()];
    let uniform = std::sync::atomic::AtomicUsize::new(0);
    for_blocks(&cx, &shape, out, &mut lse_unused, |b, h, i0, o, l| {
        let n = lssa_block(&cx, &shape, b, h, i0, l.len(), lssa, o);
        uniform.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
    });
    Ok(LssaStats {
        uniform_rows: uniform.into_inner(),
    })
}

/// `x / max(‖x‖, 1e-12)` into `dst`.
fn normalize_into(x: &[f32], dst: &mut [f32]) {
    let n = x
        .iter()
        .map(|v| (*v as f64) * (*v as f64))
        .sum::<f64>()
        .sqrt()
        .max(1e-12);
    for (d, &v) in dst.iter_mut().zip(x) {
        *d = (v as f64 / n) as f32;
    }
}

/// Stable softplus in f32 (N7): `x` above 20, `e^x` below −20, else `max(x,0) + ln1p(e^{−|x|})`.
#[inline]
fn softplus(x: f32) -> f32 {
    if x > 20.0 {
        x
    } else if x < -20.0 {
        x.exp()
    } else {
        x.max(0.0) + (-x.abs()).exp().ln_1p()
    }
}

/// Normalised rows `r0 .. r0 + n` of an operand.
fn normalized_rows<T: Element>(op: &super::Op<'_, T>, b: usize, h: usize, r0: usize, n: usize, d: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; n * d];
    let mut tmp = vec![0.0f32; d];
    for (r, dst) in out.chunks_mut(d).enumerate() {
        T::load_f32(op.row(b, h, r0 + r, d), &mut tmp);
        normalize_into(&tmp, dst);
    }
    out
}

/// One query block of LSSA / LSSAR; returns the number of uniform LSSAR rows.
#[allow(clippy::too_many_arguments)]
fn lssa_block<T: Element>(
    cx: &Checked<'_, T>,
    s: &AttentionShape,
    b: usize,
    h: usize,
    i0: usize,
    nb: usize,
    lssa: &Lssa,
    out: &mut [T],
) -> usize {
    let (d, kl, bk) = (s.head_dim, s.kv_len, cx.bk);
    let hk = h / s.group();
    let sc: &Scores<'_> = &cx.sc;
    let qn = normalized_rows(&cx.q, b, h, i0, nb, d);
    let qm = MatRef::row_major(&qn, nb, d);
    let ln_d = (d as f64).ln();
    // N_i and s_i.
    let mut count = vec![0usize; nb];
    for (r, c) in count.iter_mut().enumerate() {
        let (lo, hi) = sc.range(i0 + r);
        *c = match sc.keep {
            None => hi - lo,
            Some(kp) => {
                let o = kp.strides.at(b, h, i0 + r);
                kp.data[o + lo..o + hi].iter().filter(|&&x| x).count()
            }
        };
    }
    let scale: Vec<f32> = count
        .iter()
        .map(|&n| if n == 0 { 0.0 } else { (ln_d * (n as f64).ln()) as f32 })
        .collect();
    let (lo, hi) = (sc.range(i0).0, sc.range(i0 + nb - 1).1);
    let mut sbuf = vec![0.0f32; nb * bk.min(kl).max(1)];
    let (mut vbuf, mut vis) = (Vec::new(), Vec::new());
    // One tile of softplus weights `softplus(s_i c_ij)` (0 where masked) into `sbuf`.
    let tile = |j0: usize, kn: usize, sm: &mut [f32], vis: &mut Vec<bool>| {
        let kn_rows = normalized_rows(&cx.k, b, hk, j0, kn, d);
        matmul(sm, kn, qm, MatRef::row_major(&kn_rows, kn, d).t(), false, Par::Seq);
        vis.clear();
        vis.resize(nb * kn, false);
        for (r, rw) in sm.chunks_mut(kn).enumerate() {
            sc.prep_row(pulp::Scalar::new(), (b, h, i0 + r), j0, rw, None);
            for (j, x) in rw.iter_mut().enumerate() {
                let visible = *x != f32::NEG_INFINITY;
                vis[r * kn + j] = visible;
                *x = if visible { softplus(scale[r] * *x) } else { 0.0 };
            }
        }
    };
    // Pass 1: S_i = Σ softplus, and (LSSA) acc = Σ softplus · v.
    let mut ssum = vec![0.0f64; nb];
    let mut acc = vec![0.0f32; nb * d];
    let want_lssa = lssa.reweight.is_none();
    let mut j0 = lo / bk * bk;
    while j0 < hi {
        let kn = bk.min(kl - j0);
        let sm = &mut sbuf[..nb * kn];
        tile(j0, kn, sm, &mut vis);
        for (r, rw) in sm.chunks(kn).enumerate() {
            ssum[r] += rw.iter().map(|&x| x as f64).sum::<f64>();
        }
        if want_lssa {
            let vm = rows_f32(&cx.v, b, hk, j0, kn, d, &mut vbuf);
            let bad = !all_finite(cx.level, &vm);
            accumulate_pv(&mut acc, sm, &vm, if bad { Some(&vis[..]) } else { None });
        }
        j0 += kn;
    }
    let finish = |acc: &[f32], den: &[f64], out: &mut [T]| {
        let mut tmp = vec![0.0f32; d];
        for r in 0..nb {
            let o = &mut out[r * d..(r + 1) * d];
            if den[r] == 0.0 || count[r] == 0 {
                o.fill(T::from_f32(0.0));
                continue;
            }
            let inv = 1.0 / den[r];
            for (t, &x) in tmp.iter_mut().zip(&acc[r * d..(r + 1) * d]) {
                *t = (x as f64 * inv) as f32;
            }
            T::store_f32(&tmp, o);
        }
    };
    let Some(p) = lssa.reweight else {
        finish(&acc, &ssum, out);
        return 0;
    };
    // Pass 2 (LSSAR): online softmax over z_ij = p·ln(N_i·A_ij − o_i) on the positive entries.
    let mut st = RowState::new(nb, d);
    let mut j0 = lo / bk * bk;
    while j0 < hi {
        let kn = bk.min(kl - j0);
        let sm = &mut sbuf[..nb * kn];
        tile(j0, kn, sm, &mut vis);
        for (r, rw) in sm.chunks_mut(kn).enumerate() {
            let pos = (i0 + r) as i64 + sc.offset + 1;
            let off = if pos <= lssa.offset_rows as i64 { 0.0 } else { 1.0 };
            let nn = count[r] as f64;
            for (j, x) in rw.iter_mut().enumerate() {
                let u = nn * (*x as f64) / ssum[r] - off;
                *x = if vis[r * kn + j] && u > 0.0 {
                    (p as f64 * u.ln()) as f32
                } else if vis[r * kn + j] && u.is_nan() {
                    f32::NAN
                } else {
                    f32::NEG_INFINITY
                };
                vis[r * kn + j] = *x != f32::NEG_INFINITY;
            }
        }
        let vm = rows_f32(&cx.v, b, hk, j0, kn, d, &mut vbuf);
        let bad = !all_finite(cx.level, &vm);
        dispatch(
            cx.level,
            OnlineTile {
                sc: None,
                b,
                rows: Rows::Block { h, i0, n: nb },
                j0,
                kn,
                d,
                t: sm,
                st: &mut st,
                vis: None,
            },
        );
        accumulate_pv(&mut st.acc, sm, &vm, if bad { Some(&vis[..]) } else { None });
        j0 += kn;
    }
    // Rows with no positive entry (and some visible key) fall back to their LSSA row.
    let uniform: Vec<bool> = (0..nb).map(|r| count[r] > 0 && st.m[r] == f32::NEG_INFINITY).collect();
    let n_uniform = uniform.iter().filter(|&&x| x).count();
    finish(&st.acc, &st.l, out);
    if n_uniform > 0 {
        let mut acc = vec![0.0f32; nb * d];
        let mut j0 = lo / bk * bk;
        while j0 < hi {
            let kn = bk.min(kl - j0);
            let sm = &mut sbuf[..nb * kn];
            tile(j0, kn, sm, &mut vis);
            let vm = rows_f32(&cx.v, b, hk, j0, kn, d, &mut vbuf);
            let bad = !all_finite(cx.level, &vm);
            accumulate_pv(&mut acc, sm, &vm, if bad { Some(&vis[..]) } else { None });
            j0 += kn;
        }
        let mut tmp = vec![0.0f32; d];
        for r in (0..nb).filter(|&r| uniform[r]) {
            let inv = 1.0 / ssum[r];
            for (t, &x) in tmp.iter_mut().zip(&acc[r * d..(r + 1) * d]) {
                *t = (x as f64 * inv) as f32;
            }
            T::store_f32(&tmp, &mut out[r * d..(r + 1) * d]);
        }
    }
    n_uniform
}

// ---------------------------------------------------------------------------------------------
// InLine attention (A6)

/// The kernel φ of [`inline_attention`] (A6; the authors' code offers these four).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum InlineKernel {
    /// φ(x) = x (the default; the only one for which the weights are provably injective in q).
    #[default]
    Identity,
    /// φ(x) = max(x, 0).
    Relu,
    /// φ(x) = x for x ≥ 0, `slope·x` below.
    LeakyRelu(f32),
    /// φ(x) = exp(0.2·x).
    Exp02,
}

impl InlineKernel {
    #[inline]
    fn apply(&self, x: f32) -> f32 {
        match *self {
            InlineKernel::Identity => x,
            InlineKernel::Relu => x.max(0.0),
            InlineKernel::LeakyRelu(s) => {
                if x >= 0.0 {
                    x
                } else {
                    s * x
                }
            }
            InlineKernel::Exp02 => (0.2 * x).exp(),
        }
    }
}

/// InLine's local term (A6): a 3×3 depthwise convolution of the values over the token grid,
/// with a kernel per (batch, query head, channel) that the model predicts from the token mean
/// (its small prediction network stays in the model). Cross-correlation with zero padding, as
/// PyTorch's `conv2d`; the first `prefix` tokens (DeiT's class token) take no local term.
#[derive(Debug, Clone, Copy)]
pub struct InlineLocal<'a> {
    /// Grid height.
    pub height: usize,
    /// Grid width.
    pub width: usize,
    /// Tokens before the grid (no local term).
    pub prefix: usize,
    /// `[batch, q_heads, head_dim, 9]` row-major 3×3 kernels.
    pub kernel: &'a [f32],
}

/// The parameters of [`inline_attention`] (the `variant` of its [`AttentionOptions`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct Inline<'a> {
    /// The kernel φ.
    pub kernel: InlineKernel,
    /// The optional local term.
    pub local: Option<InlineLocal<'a>>,
}

/// InLine injective linear attention (Han et al. 2024, A6), non-causal, in `O(N·d²)`:
/// `o_i = φ(q_i)ᵀ·(c·Σ_j φ(k_j) v_jᵀ) + (1 − N·c·φ(q_i)·k̄_φ)·v̄`, `c = d^{−1/2}/N`, which equals
/// `Σ_j w_ij v_j` with the weights `w_ij = c·(φ(q_i)·φ(k_j) − φ(q_i)·k̄_φ) + 1/N` (rows sum to 1
/// exactly; weights can be negative). Plus the optional [`InlineLocal`] term, which needs
/// `q_len = kv_len = prefix + height·width`.
///
/// Shapes and layouts as [`attention`](super::attention) (grouped-query allowed); masks do not
/// apply (remove padded tokens instead: `-inf` has no meaning in a linear kernel). `Σ φ(k)vᵀ`
/// and the means accumulate in f32 through `gemm` and f64 sums. Errors: `kv_len = 0`, a local
/// term whose grid or kernel does not match, and the shape and buffer errors of
/// [`attention`](super::attention).
pub fn inline_attention<'a, T: AttnElement>(
    inputs: AttentionInputs<'_, T>,
    out: &mut [T],
    opts: &AttentionOptions<'a, Inline<'a>>,
) -> Result<()> {
    let AttentionInputs { shape, q, k, v } = inputs;
    let Inline { kernel, local } = opts.variant;
    let o = opts;
    if o.scale.is_some()
        || o.temperature != 1.0
        || o.softcap.is_some()
        || o.causal
        || o.window.is_some()
        || o.bias.is_some()
        || o.keep.is_some()
    {
        return Err(Error::Unsupported {
            what: "inline_attention options",
            why: "scale, temperature, softcap, causal, window, bias and keep do not apply to linear attention (only exec and the variant are read)",
        });
    }
    shape.validate()?;
    let (d, ql, kl) = (shape.head_dim, shape.q_len, shape.kv_len);
    let qo = resolve("q", q, shape.batch, shape.q_heads, ql, d)?;
    let ko = resolve("k", k, shape.batch, shape.kv_heads, kl, d)?;
    let vo = resolve("v", v, shape.batch, shape.kv_heads, kl, d)?;
    check_out("out", out.len(), shape.out_len())?;
    if kl == 0 {
        return Err(Error::bad_parameter(
            "kv_len",
            "0",
            ">= 1 (InLine attention is undefined over zero keys)",
        ));
    }
    if let InlineKernel::LeakyRelu(s) = kernel
        && !s.is_finite()
    {
        return Err(Error::bad_parameter("leaky relu slope", s, "finite"));
    }
    if let Some(l) = local {
        let tokens = l.height.checked_mul(l.width).and_then(|hw| hw.checked_add(l.prefix));
        if ql != kl || tokens != Some(kl) {
            return Err(Error::Unsupported {
                what: "inline local term",
                why: "needs q_len = kv_len = prefix + height * width",
            });
        }
        check_out("local kernel", l.kernel.len(), shape.batch * shape.q_heads * d * 9)?;
    }
    if shape.out_len() == 0 {
        return Ok(());
    }
    let heads: Vec<(usize, &mut [T])> = out.chunks_mut(ql * d).enumerate().collect();
    crate::par::for_each(opts.exec.par, heads, |_, (bh, o)| {
        let (b, h) = (bh / shape.q_heads, bh % shape.q_heads);
        let (mut o32, vv) = inline_head(&shape, kernel, (&qo, &ko, &vo), b, h);
        if let Some(l) = local {
            let kern = &l.kernel[(b * shape.q_heads + h) * d * 9..][..d * 9];
            add_local_term(&l, kern, &vv, d, &mut o32);
        }
        T::store_f32(&o32, o);
    });
    Ok(())
}

/// The linear-attention output of head `(b, h)` in f32, and the head's values in f32 (which
/// the local term reads).
fn inline_head<T: AttnElement>(
    shape: &AttentionShape,
    kernel: InlineKernel,
    (qo, ko, vo): (&super::Op<'_, T>, &super::Op<'_, T>, &super::Op<'_, T>),
    b: usize,
    h: usize,
) -> (Vec<f32>, Vec<f32>) {
    let (d, ql, kl) = (shape.head_dim, shape.q_len, shape.kv_len);
    let c = (1.0 / (d as f64).sqrt()) / kl as f64;
    let hk = h / shape.group();
    // φ(K), V (f32), then KV = φ(K)ᵀ V, k̄_φ and v̄.
    let mut fk = vec![0.0f32; kl * d];
    let mut vv = vec![0.0f32; kl * d];
    for j in 0..kl {
        T::load_f32(ko.row(b, hk, j, d), &mut fk[j * d..(j + 1) * d]);
        T::load_f32(vo.row(b, hk, j, d), &mut vv[j * d..(j + 1) * d]);
    }
    for x in fk.iter_mut() {
        *x = kernel.apply(*x);
    }
    let mut kvm = vec![0.0f32; d * d];
    matmul(
        &mut kvm,
        d,
        MatRef::row_major(&fk, kl, d).t(),
        MatRef::row_major(&vv, kl, d),
        false,
        Par::Seq,
    );
    let mean = |m: &[f32]| -> Vec<f64> {
        let mut s = vec![0.0f64; d];
        for r in m.chunks(d) {
            for (a, &x) in s.iter_mut().zip(r) {
                *a += x as f64;
            }
        }
        s.iter().map(|x| x / kl as f64).collect()
    };
    let (kbar, vbar) = (mean(&fk), mean(&vv));
    let mut fq = vec![0.0f32; ql * d];
    for i in 0..ql {
        T::load_f32(qo.row(b, h, i, d), &mut fq[i * d..(i + 1) * d]);
    }
    for x in fq.iter_mut() {
        *x = kernel.apply(*x);
    }
    let mut o32 = vec![0.0f32; ql * d];
    matmul(
        &mut o32,
        d,
        MatRef::row_major(&fq, ql, d),
        MatRef::row_major(&kvm, d, d),
        false,
        Par::Seq,
    );
    for i in 0..ql {
        let qk: f64 = fq[i * d..(i + 1) * d]
            .iter()
            .zip(&kbar)
            .map(|(a, b)| *a as f64 * b)
            .sum();
        let coef = 1.0 - kl as f64 * c * qk;
        for (x, &vb) in o32[i * d..(i + 1) * d].iter_mut().zip(&vbar) {
            *x = (*x as f64 * c + coef * vb) as f32;
        }
    }
    (o32, vv)
}

/// Adds InLine's local term (the 3×3 depthwise convolution of the values `vv` over the token
/// grid, kernel `kern` `[head_dim, 9]`) to the head's output `o32`.
fn add_local_term(l: &InlineLocal<'_>, kern: &[f32], vv: &[f32], d: usize, o32: &mut [f32]) {
    let (hh, ww) = (l.height as i64, l.width as i64);
    for y in 0..hh {
        for x in 0..ww {
            let t = l.prefix + (y * ww + x) as usize;
            for ch in 0..d {
                let mut a = 0.0f64;
                for ky in 0..3i64 {
                    for kx in 0..3i64 {
                        let (yy, xx) = (y + ky - 1, x + kx - 1);
                        if yy < 0 || yy >= hh || xx < 0 || xx >= ww {
                            continue;
                        }
                        let src = l.prefix + (yy * ww + xx) as usize;
                        a += kern[ch * 9 + (ky * 3 + kx) as usize] as f64 * vv[src * d + ch] as f64;
                    }
                }
                o32[t * d + ch] += a as f32;
            }
        }
    }
}
