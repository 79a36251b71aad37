//! Decoding: split-K attention over a long key/value cache with the log-sum-exp merge
//! (Flash-Decoding, A2), and FlashDecoding++'s asynchronous softmax with a unified max (A3).

use super::flash::{finish_rows, fwd_accumulate};
use super::tile::{Checked, RowState, Rows, accumulate_pv, blocks, check, forward_outputs, hidden, kv_tile, products};
use super::{AttentionInputs, AttentionOptions, AttentionOutputs, AttentionShape, AttnElement, check_out};
use crate::arch::gemm::MatRef;
use crate::arch::rows as k;
use crate::arch::{Isa, Task, dispatch};
use crate::check::{product, try_vec};
use crate::element::Element;
use crate::error::{Error, Result};
use crate::options::defaults;
use crate::state::LseState;

defaults! {
    /// The split of [`attention_decode`] (the `variant` of its [`AttentionOptions`]).
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct SplitK {
        /// Keys per split (≥ 1; default 2048). Splits are the unit of parallel work: the cache of
        /// every (batch, head) is cut into `ceil(kv_len / split_len)` independent partials.
        pub split_len: usize = 2048,
    }
}

impl SplitK {
    fn check(&self) -> Result<()> {
        if self.split_len == 0 {
            return Err(Error::bad_parameter("split_len", "0", ">= 1"));
        }
        Ok(())
    }
}

/// Partial attention results to merge: `parts` partials of the same `rows` query rows of
/// width `head_dim`.
#[derive(Debug, Clone, Copy)]
pub struct PartialStates<'a> {
    /// Number of partials.
    pub parts: usize,
    /// Query rows per partial.
    pub rows: usize,
    /// Head dimension.
    pub head_dim: usize,
    /// Partial outputs, `[parts, rows, head_dim]`, each normalised over its own keys.
    pub out: &'a [f32],
    /// Partial log-sum-exps, `[parts, rows]`.
    pub lse: &'a [f32],
}

/// Merges partial attention results of the same query rows over disjoint key sets
/// (Flash-Decoding; ALGORITHMS.md A2).
///
/// `o_parts` is `[parts, rows, d]` (each part normalised over its own keys), `lse_parts`
/// `[parts, rows]`. Writes `lse = logsumexp_s lse_s` (through [`LseState`], parts merged in
/// index order) and `o = Σ_s exp(lse_s − lse)·o_s` (f64 accumulation, one rounding).
/// A part with `lse_s = -inf` (no keys, or all masked) is the exact identity: it is skipped,
/// whatever its `o_s` holds. If every part is `-inf` the row is `o = 0`, `lse = -inf`; NaN (or
/// `+inf`) in any part's lse gives a NaN row (lse NaN or `+inf`). `exp(lse)` is never formed, so large log-sum-exps do not
/// overflow (NATTEN#202).
///
/// Errors: buffer lengths that disagree with `(parts, rows, d)`.
pub fn merge_attention_states(states: PartialStates<'_>, out: &mut [f32], lse: &mut [f32]) -> Result<()> {
    let PartialStates { parts, rows, head_dim: d, out: o_parts, lse: lse_parts } = states;
    let n = parts
        .checked_mul(rows)
        .and_then(|x| x.checked_mul(d))
        .ok_or(Error::SizeOverflow { what: "o_parts", shape: format!("parts {parts} rows {rows} d {d}") })?;
    check_out("o_parts", o_parts.len(), n)?;
    check_out("lse_parts", lse_parts.len(), parts.saturating_mul(rows))?;
    check_out("out", out.len(), rows.saturating_mul(d))?;
    check_out("lse", lse.len(), rows)?;
    let mut acc = vec![0.0f64; d];
    for r in 0..rows {
        merge_row(parts, |s| (&o_parts[(s * rows + r) * d..][..d], lse_parts[s * rows + r]), &mut acc);
        let (o, l) = (&mut out[r * d..(r + 1) * d], &mut lse[r]);
        *l = finish_row(parts, |s| lse_parts[s * rows + r], &acc, o);
    }
    Ok(())
}

/// `acc = Σ_s exp(lse_s − L)·o_s` with `L` the merged log-sum-exp.
fn merge_row<'a>(parts: usize, part: impl Fn(usize) -> (&'a [f32], f32), acc: &mut [f64]) {
    acc.fill(0.0);
    let total = (0..parts).fold(LseState::<f32>::EMPTY, |st, s| st.merge(LseState::<f32>::from_value(part(s).1)));
    let big_l = total.lse() as f64;
    if !big_l.is_finite() {
        return;
    }
    for s in 0..parts {
        let (o, l) = part(s);
        if l == f32::NEG_INFINITY {
            continue;
        }
        let w = (l as f64 - big_l).exp();
        for (a, &x) in acc.iter_mut().zip(o) {
            *a += w * x as f64;
        }
    }
}

/// Rounds the merged row into `o` and returns its log-sum-exp.
fn finish_row(parts: usize, lse_of: impl Fn(usize) -> f32, acc: &[f64], o: &mut [f32]) -> f32 {
    let total = (0..parts).fold(LseState::<f32>::EMPTY, |st, s| st.merge(LseState::<f32>::from_value(lse_of(s))));
    let l = total.lse();
    if l == f32::NEG_INFINITY {
        o.fill(0.0);
    } else if l.is_nan() || l == f32::INFINITY {
        o.fill(f32::NAN);
    } else {
        for (x, &a) in o.iter_mut().zip(acc) {
            *x = a as f32;
        }
    }
    l
}

/// Split-K decoding attention (Flash-Decoding; A2): the same result as [`attention`](super::attention)
/// (within the bound below) for the few-queries, long-cache case, parallel over cache splits.
///
/// Each (batch, key/value head, split) task runs the flash forward over its `split_len` keys
/// for all the query heads that share that key/value head (grouped-query attention: their
/// queries packed into one block, so the cache is read once per group, not once per query
/// head) and produces f32 partial outputs and log-sum-exps; the partials merge in split order
/// through [`merge_attention_states`]'s rule. Empty or fully masked splits are the exact
/// identity. Shapes, masks, options and outputs are those of
/// [`attention`](super::attention). Results are bitwise identical for any thread count;
/// they differ from the one-pass result by the merge's rounding, at most a few f32 ULP of the
/// output scale (tested: `≤ 2e-6·(1 + max|v|)`).
///
/// Errors: those of [`attention`](super::attention); `split_len = 0`; partials
/// (`batch·kv_heads · ceil(kv_len/split_len) · group·q_len · (d + 1)` f32) that do not fit in
/// memory ([`Error::SizeOverflow`], [`Error::Allocation`]: a short `split_len` over a long
/// prefill).
pub fn attention_decode<T: AttnElement>(
    inputs: AttentionInputs<'_, T>,
    outputs: AttentionOutputs<'_, T>,
    opts: &AttentionOptions<'_, SplitK>,
) -> Result<()> {
    let AttentionInputs { shape, q, k, v } = inputs;
    let (dec, opts) = (&opts.variant, &opts.base());
    let cx = check(&shape, q, k, v, opts)?;
    dec.check()?;
    let mut own = Vec::new();
    let Some((out, lse)) = forward_outputs(&shape, outputs, &mut own)? else { return Ok(()) };
    split_k(&cx, &shape, dec.split_len, out, lse, None)
}

/// `(query head, query)` of every row of key/value head `hk`'s group: the group's query heads
/// are packed into one block, so each split reads its keys and values once for all of them.
fn group_rows(s: &AttentionShape, hk: usize) -> Vec<(usize, usize)> {
    let (g, ql) = (s.group(), s.q_len);
    (0..g).flat_map(|hh| (0..ql).map(move |i| (hk * g + hh, i))).collect()
}

/// The queries of `rows` as a contiguous f32 matrix.
fn gather_q<T: Element>(cx: &Checked<'_, T>, b: usize, rows: &[(usize, usize)], d: usize, buf: &mut Vec<f32>) {
    buf.clear();
    buf.resize(rows.len() * d, 0.0);
    for (dst, &(h, i)) in buf.chunks_mut(d).zip(rows) {
        T::load_f32(cx.q.row(b, h, i, d), dst);
    }
}

/// Runs split-K for every (batch, key/value head group); with `only`, just the rows it flags
/// (one bool per output row), leaving the others untouched.
fn split_k<T: Element>(
    cx: &Checked<'_, T>,
    s: &AttentionShape,
    split_len: usize,
    out: &mut [T],
    lse: &mut [f32],
    only: Option<&[bool]>,
) -> Result<()> {
    let (d, ql, kl, g) = (s.head_dim, s.q_len, s.kv_len, s.group());
    let parts = kl.div_ceil(split_len).max(1);
    let groups = s.batch * s.kv_heads;
    let gr = g * ql;
    // f32 partials of every (group, split): [groups, parts, g·q_len, d] and [.., g·q_len].
    // Their size grows with the number of splits, which the caller chooses: checked.
    let rows = product("split-K partials", &[groups, parts, gr])?;
    let mut po = try_vec("split-K partials", product("split-K partials", &[rows, d])?, 0.0f32)?;
    let mut pl = try_vec("split-K partials", rows, 0.0f32)?;
    let tasks: Vec<(usize, (&mut [f32], &mut [f32]))> =
        po.chunks_mut(gr * d).zip(pl.chunks_mut(gr)).enumerate().collect();
    let run = |(t, (o, l)): (usize, (&mut [f32], &mut [f32]))| {
        let (grp, sp) = (t / parts, t % parts);
        let (b, hk) = (grp / s.kv_heads, grp % s.kv_heads);
        let rows = group_rows(s, hk);
        if let Some(f) = only
            && !rows.iter().any(|&(h, i)| f[(b * s.q_heads + h) * ql + i])
        {
            return;
        }
        let (lo, hi) = (sp * split_len, ((sp + 1) * split_len).min(kl));
        let mut qbuf = Vec::new();
        for ((rc, ob), lb) in rows.chunks(cx.bq).zip(o.chunks_mut(cx.bq * d)).zip(l.chunks_mut(cx.bq)) {
            gather_q(cx, b, rc, d, &mut qbuf);
            let qm = MatRef::row_major(&qbuf, rc.len(), d);
            let mut st = RowState::new(rc.len(), d);
            fwd_accumulate(cx, s, b, hk, Rows::Packed(rc), &qm, lo, hi, true, &mut st);
            finish_rows(&st, d, ob, lb);
        }
    };
    crate::par::for_each(cx.par, tasks, |_, t| run(t));
    let mut acc = vec![0.0f64; d];
    let mut tmp = vec![0.0f32; d];
    for b in 0..s.batch {
        for h in 0..s.q_heads {
            let grp = b * s.kv_heads + h / g;
            for i in 0..ql {
                let row_ix = (b * s.q_heads + h) * ql + i;
                if let Some(f) = only
                    && !f[row_ix]
                {
                    continue;
                }
                let at = |sp: usize| (grp * parts + sp) * gr + (h % g) * ql + i;
                let lse_of = |sp: usize| pl[at(sp)];
                merge_row(parts, |sp| (&po[at(sp) * d..(at(sp) + 1) * d], lse_of(sp)), &mut acc);
                lse[row_ix] = finish_row(parts, lse_of, &acc, &mut tmp);
                T::store_f32(&tmp, &mut out[row_ix * d..(row_ix + 1) * d]);
            }
        }
    }
    Ok(())
}

/// What triggers the synchronised recomputation in [`attention_decode_unified`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UnifiedFallback {
    /// The paper's rule: any visible score with `x − φ ≤ a` or `x − φ ≥ b`.
    #[default]
    Paper,
    /// Library extension: only `x − φ ≥ b` (overflow risk); scores far below φ just underflow.
    /// A row whose combined denominator is 0 or subnormal also falls back.
    UpperOnly,
}

/// FlashDecoding++'s unified max (Hong et al. 2023, arXiv 2311.01282, §3): the fixed φ and the
/// window `(a, b)` on `x − φ`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct UnifiedMax {
    /// The shared offset φ (the paper: the low end of the profiled score range; see
    /// [`profile_unified_max`]).
    pub phi: f32,
    /// Lower window bound on `x − φ` (default −60: `exp(a)·kv_len` stays far above the
    /// smallest normal f32).
    pub a: f32,
    /// Upper window bound on `x − φ`; `None`: `ln(f32::MAX) − ln(kv_len) − 1`, the largest value
    /// at which the sum of `kv_len` exponentials cannot overflow.
    pub b: Option<f32>,
    /// The fallback rule.
    pub fallback: UnifiedFallback,
}

impl UnifiedMax {
    /// φ with the default window and the paper's fallback rule.
    pub fn new(phi: f32) -> Self {
        UnifiedMax { phi, a: -60.0, b: None, fallback: UnifiedFallback::Paper }
    }

    /// The window for `kv_len` keys, checked: φ, `a` and `b` finite, `a < b ≤ ln(f32::MAX)`.
    fn window(&self, kv_len: usize) -> Result<Win> {
        let b_auto = (f32::MAX.ln() - (kv_len.max(1) as f32).ln() - 1.0).max(0.0);
        let (phi, a, b) = (self.phi, self.a, self.b.unwrap_or(b_auto));
        if !phi.is_finite() || !a.is_finite() || !b.is_finite() || a >= b || b > f32::MAX.ln() {
            return Err(Error::bad_parameter(
                "unified max (phi, a, b)",
                format!("({phi}, {a}, {b})"),
                "finite, a < b <= ln(f32::MAX)",
            ));
        }
        Ok(Win { phi, a, b, upper_only: self.fallback == UnifiedFallback::UpperOnly })
    }
}

/// The parameters of [`attention_decode_unified`] (the `variant` of its
/// [`AttentionOptions`]): the split and the unified max.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct UnifiedDecode {
    /// The split-K partition, as [`attention_decode`].
    pub split: SplitK,
    /// φ and its window.
    pub max: UnifiedMax,
}

/// What [`attention_decode_unified`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct UnifiedStats {
    /// Query rows computed.
    pub rows: usize,
    /// Rows recomputed with the synchronised (max-tracking) split-K path.
    pub fallback_rows: usize,
}

/// φ and the profiled range from calibration scores (FlashDecoding++ §3, Fig. 5): the
/// `(1 − coverage)/2` and `(1 + coverage)/2` quantiles of the finite scores (nearest rank);
/// the paper covers 99.99 % and sets φ to the low end. Returns `(lo, hi)`; use
/// `UnifiedMax::new(lo)`.
///
/// Errors: `coverage` outside `(0, 1]`, or no finite score.
pub fn profile_unified_max(scores: &[f32], coverage: f64) -> Result<(f32, f32)> {
    if !(coverage > 0.0 && coverage <= 1.0) {
        return Err(Error::bad_parameter("coverage", coverage, "in (0, 1]"));
    }
    let mut v: Vec<f32> = scores.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return Err(Error::LengthMismatch { what: "scores (finite)", len: 0, expected: 1 });
    }
    v.sort_by(f32::total_cmp);
    let n = v.len();
    let tail = (1.0 - coverage) / 2.0;
    let lo = ((tail * n as f64).floor() as usize).min(n - 1);
    let hi = (((1.0 - tail) * n as f64).ceil() as usize).clamp(1, n) - 1;
    Ok((v[lo], v[hi.max(lo)]))
}

/// Decoding attention with FlashDecoding++'s asynchronous softmax (A3): every split
/// accumulates `num = Σ e^{x−φ}·v` and `den = Σ e^{x−φ}` against the one fixed φ, with no
/// running max and no rescaling between splits; the output is `Σ num / Σ den` and the
/// log-sum-exp `φ + ln Σ den`.
///
/// A row any of whose visible scores leaves the window (see [`UnifiedFallback`]) is recomputed
/// with the exact split-K path of [`attention_decode`], so the result always equals exact
/// attention up to rounding (Eq. 3 holds for any φ); [`UnifiedStats::fallback_rows`] counts
/// them. Shapes, masks and outputs as [`attention`](super::attention). Errors: as
/// [`attention_decode`], plus a non-finite φ or window, or `a ≥ b`.
pub fn attention_decode_unified<T: AttnElement>(
    inputs: AttentionInputs<'_, T>,
    outputs: AttentionOutputs<'_, T>,
    opts: &AttentionOptions<'_, UnifiedDecode>,
) -> Result<UnifiedStats> {
    let AttentionInputs { shape, q, k, v } = inputs;
    let UnifiedDecode { split: ref dec, max: ref um } = opts.variant;
    let opts = &opts.base();
    let cx = check(&shape, q, k, v, opts)?;
    dec.check()?;
    let win = um.window(shape.kv_len)?;
    let rows = shape.lse_len();
    let mut own = Vec::new();
    let Some((out, lse)) = forward_outputs(&shape, outputs, &mut own)? else {
        return Ok(UnifiedStats { rows, fallback_rows: 0 });
    };
    let (d, ql, kl, g) = (shape.head_dim, shape.q_len, shape.kv_len, shape.group());
    let parts = kl.div_ceil(dec.split_len).max(1);
    let groups = shape.batch * shape.kv_heads;
    let gr = g * ql;
    // Per (batch·kv head group, split): numerators [g·q_len, d], denominators and window
    // flags [g·q_len] (the group's query heads packed, as in split-K).
    let n = product("split partials", &[groups, parts, gr])?;
    let mut sp = Splits {
        num: try_vec("split partials", product("split partials", &[n, d])?, 0.0f32)?,
        den: try_vec("split partials", n, 0.0f64)?,
        flag: try_vec("split partials", n, false)?,
        parts,
    };
    let tasks: Vec<(usize, ((&mut [f32], &mut [f64]), &mut [bool]))> =
        sp.num.chunks_mut(gr * d).zip(sp.den.chunks_mut(gr)).zip(sp.flag.chunks_mut(gr)).enumerate().collect();
    let run = |(t, ((nm, dn), fl)): (usize, ((&mut [f32], &mut [f64]), &mut [bool]))| {
        let (grp, sp) = (t / parts, t % parts);
        let (bb, hk) = (grp / shape.kv_heads, grp % shape.kv_heads);
        let (lo, hi) = (sp * dec.split_len, ((sp + 1) * dec.split_len).min(kl));
        unified_split(&cx, &shape, (bb, hk), lo..hi, win, (nm, dn, fl));
    };
    crate::par::for_each(cx.par, tasks, |_, t| run(t));
    let fallback = combine_splits(&shape, &sp, win, out, lse);
    let fallback_rows = fallback.iter().filter(|&&x| x).count();
    if fallback_rows > 0 {
        split_k(&cx, &shape, dec.split_len, out, lse, Some(&fallback))?;
    }
    Ok(UnifiedStats { rows, fallback_rows })
}

/// The asynchronous softmax's per-split partial results (see [`attention_decode_unified`]).
struct Splits {
    num: Vec<f32>,
    den: Vec<f64>,
    flag: Vec<bool>,
    parts: usize,
}

/// Combines the splits: one division per row, after every split is done. Returns the rows to
/// recompute with the exact path (their `out` and `lse` are left for it).
fn combine_splits<T: Element>(
    shape: &AttentionShape,
    sp: &Splits,
    win: Win,
    out: &mut [T],
    lse: &mut [f32],
) -> Vec<bool> {
    let (d, ql, g, parts) = (shape.head_dim, shape.q_len, shape.group(), sp.parts);
    let gr = g * ql;
    let mut fallback = vec![false; shape.lse_len()];
    let mut tmp = vec![0.0f32; d];
    let mut acc = vec![0.0f64; d];
    for bh in 0..shape.batch * shape.q_heads {
        let (bb, h) = (bh / shape.q_heads, bh % shape.q_heads);
        let grp = bb * shape.kv_heads + h / g;
        for i in 0..ql {
            let r = bh * ql + i;
            let mut dsum = 0.0f64;
            let mut flagged = false;
            acc.fill(0.0);
            for part in 0..parts {
                let o = (grp * parts + part) * gr + (h % g) * ql + i;
                dsum += sp.den[o];
                flagged |= sp.flag[o];
                for (x, &y) in acc.iter_mut().zip(&sp.num[o * d..(o + 1) * d]) {
                    *x += y as f64;
                }
            }
            let underflow = dsum < f32::MIN_POSITIVE as f64;
            if flagged || (win.upper_only && underflow && !dsum.is_nan()) {
                fallback[r] = true;
                continue;
            }
            let o = &mut out[r * d..(r + 1) * d];
            if dsum == 0.0 {
                // Every key masked (the paper's rule lets a row through only when all visible
                // scores sit inside the window, so a zero sum means nothing was visible).
                o.fill(T::from_f32(0.0));
                lse[r] = f32::NEG_INFINITY;
                continue;
            }
            let inv = 1.0 / dsum;
            for (t, &x) in tmp.iter_mut().zip(&acc) {
                *t = (x * inv) as f32;
            }
            T::store_f32(&tmp, o);
            lse[r] = (win.phi as f64 + dsum.ln()) as f32;
        }
    }
    fallback
}

#[derive(Clone, Copy)]
struct Win {
    phi: f32,
    a: f32,
    b: f32,
    upper_only: bool,
}

/// One split of the asynchronous softmax: `num`, `den` and the window flags of the rows of
/// key/value head `(b, hk)`'s group (see `group_rows`) over keys `[lo, hi)`.
fn unified_split<T: Element>(
    cx: &Checked<'_, T>,
    s: &AttentionShape,
    (b, hk): (usize, usize),
    keys: std::ops::Range<usize>,
    win: Win,
    (num, den, flag): (&mut [f32], &mut [f64], &mut [bool]),
) {
    let (d, lo, hi) = (s.head_dim, keys.start, keys.end);
    let rows = group_rows(s, hk);
    let ql = rows.len();
    let mut qbuf = Vec::new();
    gather_q(cx, b, &rows, d, &mut qbuf);
    let qm = MatRef::row_major(&qbuf, ql, d);
    let bk = cx.bk;
    let mut sbuf = vec![0.0f32; ql * bk.min(hi.saturating_sub(lo)).max(1)];
    let (mut kbuf, mut vbuf) = (Vec::new(), Vec::new());
    let mut vis = Vec::new();
    for (j0, kn) in blocks(lo, hi, hi, bk) {
        let (km, vm, bad) = kv_tile(cx, b, hk, j0, kn, d, &mut kbuf, &mut vbuf);
        let t = products(qm, km, &mut sbuf);
        let vis = hidden(&mut vis, t.len());
        let tile = AsyncTile { cx, b, rows: &rows, j0, kn, t: &mut *t, win, den, flag, vis: &mut *vis };
        dispatch(cx.level, tile);
        accumulate_pv(num, t, &vm, bad.then_some(&*vis));
    }
}

/// Scores → `e^{x − φ}` in place with the window test (no max, no rescaling).
struct AsyncTile<'a, 'b, T> {
    cx: &'a Checked<'b, T>,
    b: usize,
    rows: &'a [(usize, usize)],
    j0: usize,
    kn: usize,
    t: &'a mut [f32],
    win: Win,
    den: &'a mut [f64],
    flag: &'a mut [bool],
    vis: &'a mut [bool],
}

impl<T> Task for AsyncTile<'_, '_, T> {
    type Output = ();
    #[cfg_attr(not(debug_assertions), inline(always))]
    #[cfg_attr(debug_assertions, inline)]
    fn run<S: Isa>(self, s: S) {
        let AsyncTile { cx, b, rows, j0, kn, t, win, den, flag, vis } = self;
        for (r, row) in t.chunks_mut(kn).enumerate() {
            let (h, i) = rows[r];
            cx.sc.prep_row(s, (b, h, i), j0, row, None);
            let mut out_of_window = false;
            for (f, &x) in vis[r * kn..(r + 1) * kn].iter_mut().zip(row.iter()) {
                *f = x != f32::NEG_INFINITY;
                let y = x - win.phi;
                out_of_window |= *f && (y >= win.b || (!win.upper_only && y <= win.a));
            }
            if out_of_window {
                flag[r] = true;
            }
            // Out-of-window rows are recomputed; clamp so the exponential stays in range.
            let cap = win.phi + win.b;
            for x in row.iter_mut() {
                if *x > cap {
                    *x = cap;
                }
            }
            den[r] += k::exp_shift_inplace_sum(s, row, win.phi);
        }
    }
}
