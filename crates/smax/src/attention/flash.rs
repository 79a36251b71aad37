//! Flash attention (A1): the tiled forward with the online softmax, and the backward that
//! recomputes the score tiles from the saved log-sum-exp.

use super::tile::{
    Checked, OnlineTile, RowState, Rows, accumulate_pv, blocks, check, forward_outputs, hidden, kv_tile, products,
    rows_f32,
};
use super::{AttentionInputs, AttentionOptions, AttentionOutputs, AttentionShape, AttnElement};
use crate::arch::dispatch;
use crate::arch::gemm::MatRef;
use crate::element::Element;
use crate::error::Result;

/// Scaled dot-product attention, forward (FlashAttention's online softmax; ALGORITHMS.md A1).
///
/// `out[b, h, i] = Σ_j softmax_j(s_ij) · v[b, h/g, j]` over the visible keys (see the module
/// docs for scores, masks, layouts and special values), written to `out`, contiguous
/// `[batch, q_heads, q_len, head_dim]`. With `lse`, also writes the per-row log-sum-exp of
/// the scores, `[batch, q_heads, q_len]` (`-inf` for a row with no visible key), which
/// [`attention_backward`](super::attention_backward) and [`merge_attention_states`](super::merge_attention_states)
/// take.
///
/// Never materialises `q_len × kv_len`: query blocks of `tiles.q` rows stream key blocks of
/// `tiles.kv` keys through two f32 matrix products (`gemm`) and the SIMD exponential, with
/// the running `(max, sum, acc)` state per row; key blocks that causal or window masking
/// hides from a whole query block are skipped.
///
/// Errors: a shape that is inconsistent (`q_heads` not a multiple of `kv_heads`,
/// `head_dim = 0`), an operand shorter than its strides address, an output of the wrong
/// length, a non-finite scale, `τ ≤ 0`, a bias or mask shorter than the scores.
pub fn attention<T: AttnElement>(
    inputs: AttentionInputs<'_, T>,
    outputs: AttentionOutputs<'_, T>,
    opts: &AttentionOptions<'_>,
) -> Result<()> {
    let AttentionInputs { shape, q, k, v } = inputs;
    let cx = check(&shape, q, k, v, opts)?;
    let mut own = Vec::new();
    let Some((out, lse)) = forward_outputs(&shape, outputs, &mut own)? else { return Ok(()) };
    let (d, ql) = (shape.head_dim, shape.q_len);
    let heads: Vec<(usize, (&mut [T], &mut [f32]))> =
        out.chunks_mut(ql * d).zip(lse.chunks_mut(ql)).enumerate().collect();
    let run_head = |(bh, (o, l)): (usize, (&mut [T], &mut [f32]))| {
        let (b, h) = (bh / shape.q_heads, bh % shape.q_heads);
        let blocks: Vec<(usize, (&mut [T], &mut [f32]))> =
            o.chunks_mut(cx.bq * d).zip(l.chunks_mut(cx.bq)).enumerate().collect();
        let run = |(ib, (ob, lb)): (usize, (&mut [T], &mut [f32]))| {
            fwd_block(&cx, &shape, b, h, ib * cx.bq, ob, lb, 0, shape.kv_len)
        };
        crate::par::for_each(cx.par, blocks, |_, t| run(t));
    };
    crate::par::for_each(cx.par, heads, |_, t| run_head(t));
    Ok(())
}

/// One query block (rows `i0 .. i0 + lse.len()` of head `(b, h)`) over the keys `[k_lo, k_hi)`:
/// writes the normalised output and the log-sum-exp.
#[allow(clippy::too_many_arguments)]
pub(crate) fn fwd_block<T: Element>(
    cx: &Checked<'_, T>,
    s: &AttentionShape,
    b: usize,
    h: usize,
    i0: usize,
    out: &mut [T],
    lse: &mut [f32],
    k_lo: usize,
    k_hi: usize,
) {
    let d = s.head_dim;
    let nb = lse.len();
    let mut st = RowState::new(nb, d);
    let mut qbuf = Vec::new();
    let qm = rows_f32(&cx.q, b, h, i0, nb, d, &mut qbuf);
    fwd_accumulate(cx, s, b, h / s.group(), Rows::Block { h, i0, n: nb }, &qm, k_lo, k_hi, true, &mut st);
    finish_rows(&st, d, out, lse);
}

/// `out = acc / l` and `lse = m + ln l` per row (0 and `-inf` for a row that saw nothing).
pub(crate) fn finish_rows<T: Element>(st: &RowState, d: usize, out: &mut [T], lse: &mut [f32]) {
    let mut tmp = vec![0.0f32; d];
    for r in 0..lse.len() {
        let (m, l) = (st.m[r], st.l[r]);
        let a = &st.acc[r * d..(r + 1) * d];
        let o = &mut out[r * d..(r + 1) * d];
        if l == 0.0 || m == f32::NEG_INFINITY {
            o.fill(T::from_f32(0.0));
            lse[r] = f32::NEG_INFINITY;
            continue;
        }
        let inv = (1.0 / l) as f32;
        for (t, &x) in tmp.iter_mut().zip(a) {
            *t = x * inv;
        }
        T::store_f32(&tmp, o);
        lse[r] = (m as f64 + l.ln()) as f32;
    }
}

/// Streams keys `[k_lo, k_hi)` of key/value head `(b, hk)` into the running state of `rows`
/// (their queries in `qm`); without `values`, only the running max and sum (the log-sum-exp
/// pass of two-pass variants; `st` then has an empty accumulator).
#[allow(clippy::too_many_arguments)]
pub(crate) fn fwd_accumulate<T: Element>(
    cx: &Checked<'_, T>,
    s: &AttentionShape,
    b: usize,
    hk: usize,
    rows: Rows<'_>,
    qm: &MatRef<'_>,
    k_lo: usize,
    k_hi: usize,
    values: bool,
    st: &mut RowState,
) {
    let d = if values { s.head_dim } else { 0 };
    let hd = s.head_dim;
    let nb = rows.len();
    let sc = &cx.sc;
    if nb == 0 {
        return;
    }
    let (lo, hi) = rows.key_span(sc);
    let (lo, hi) = (lo.max(k_lo), hi.min(k_hi));
    if lo >= hi {
        return;
    }
    let bk = cx.bk;
    // Key blocks are aligned to multiples of `bk` from `k_lo`, so a key's block never depends
    // on the query block (one row's result is the same in every call that contains it).
    let start = k_lo + (lo - k_lo) / bk * bk;
    let mut sbuf = vec![0.0f32; nb * bk.min(k_hi - start)];
    let mut vis = Vec::new();
    let (mut kbuf, mut vbuf) = (Vec::new(), Vec::new());
    // The last block stops at the block's last visible key: the columns past it would only add
    // exact zeros (tested bit for bit against other block compositions).
    for (j0, kn) in blocks(start, hi, hi, bk) {
        let (km, vm, bad) = kv_tile(cx, b, hk, j0, kn, if values { hd } else { 0 }, &mut kbuf, &mut vbuf);
        let bad = values && bad;
        let t = products(*qm, km, &mut sbuf);
        let mut vis = bad.then(|| hidden(&mut vis, nb * kn));
        let vis_mut = vis.as_deref_mut();
        dispatch(cx.level, OnlineTile { sc: Some(sc), b, rows, j0, kn, d, t: &mut *t, st, vis: vis_mut });
        if values {
            accumulate_pv(&mut st.acc, t, &vm, vis.as_deref());
        }
    }
}
