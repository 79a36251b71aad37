//! Flash attention (A1): the tiled forward with the online softmax, and the backward that
//! recomputes the score tiles from the saved log-sum-exp.

use super::{
    AttentionInputs, AttentionOptions, AttentionOutputs, AttentionShape, AttnElement, Heads, Op, Scores, check_out,
    lse_or_own, resolve, scores,
};
use crate::arch::gemm::{MatRef, matmul};
use crate::arch::rows as k;
use crate::arch::{Ahead, Isa, SimdLevel, Task, dispatch};
use crate::element::Element;
use crate::error::{Error, Result};
use crate::options::Par;

/// Rows `t0 .. t0 + n` of head `(b, h)` as an f32 matrix: the caller's buffer itself for f32
/// (any token stride), else widened into `buf`.
pub(crate) fn rows_f32<'b, T: Element>(
    op: &Op<'b, T>,
    b: usize,
    h: usize,
    t0: usize,
    n: usize,
    d: usize,
    buf: &'b mut Vec<f32>,
) -> MatRef<'b> {
    if n == 0 {
        return MatRef::row_major(&[], 0, d);
    }
    let start = op.at(b, h, t0);
    let end = op.at(b, h, t0 + n - 1) + d;
    if let Some(x) = T::as_f32(&op.data[start..end]) {
        return MatRef {
            data: x,
            rows: n,
            cols: d,
            rs: op.st.token,
            cs: 1,
        };
    }
    buf.clear();
    buf.resize(n * d, 0.0);
    for (r, dst) in buf.chunks_mut(d).enumerate() {
        T::load_f32(op.row(b, h, t0 + r, d), dst);
    }
    MatRef::row_major(buf, n, d)
}

/// Key and value rows `j0 .. j0 + kn` of key/value head `(b, hk)` as f32 matrices (value rows
/// of `dv` columns: 0 skips them), and whether either holds a NaN or an infinity.
#[allow(clippy::too_many_arguments)]
pub(crate) fn kv_tile<'b, T: Element>(
    cx: &Checked<'b, T>,
    b: usize,
    hk: usize,
    j0: usize,
    kn: usize,
    dv: usize,
    kbuf: &'b mut Vec<f32>,
    vbuf: &'b mut Vec<f32>,
) -> (MatRef<'b>, MatRef<'b>, bool) {
    let km = rows_f32(&cx.k, b, hk, j0, kn, cx.k_d, kbuf);
    let vm = rows_f32(&cx.v, b, hk, j0, kn, dv, vbuf);
    let bad = !all_finite(cx.level, &km) || !all_finite(cx.level, &vm);
    (km, vm, bad)
}

/// True when every element of `m` is finite (a SIMD scan).
pub(crate) fn all_finite(level: SimdLevel, m: &MatRef<'_>) -> bool {
    struct Scan<'a, 'b>(&'a MatRef<'b>);
    impl Task for Scan<'_, '_> {
        type Output = bool;
        #[inline(always)]
        fn run<S: Isa>(self, s: S) -> bool {
            let m = self.0;
            if m.rs == m.cols {
                return k::all_finite(s, &m.data[..m.rows * m.cols]);
            }
            (0..m.rows).all(|r| k::all_finite(s, row(m, r)))
        }
    }
    dispatch(level, Scan(m))
}

/// Indices of the rows of `m` that hold a NaN or an infinity.
pub(crate) fn nonfinite_rows(m: &MatRef<'_>) -> Vec<usize> {
    (0..m.rows)
        .filter(|&r| !row(m, r).iter().all(|x| x.is_finite()))
        .collect()
}

/// A contiguous copy of `m` in `buf` with the listed rows set to zero (or `m` itself when the
/// list is empty). Products with the copy equal those with `m` bit for bit wherever the zeroed
/// rows meet a zero weight, which is how masked pairs are kept out of the matrix products
/// without ever forming `0 · NaN`; the visible pairs of those rows are added back one by one.
pub(crate) fn zeroed<'b>(m: &MatRef<'b>, rows: &[usize], buf: &'b mut Vec<f32>) -> MatRef<'b> {
    if rows.is_empty() {
        return *m;
    }
    buf.clear();
    for r in 0..m.rows {
        buf.extend_from_slice(row(m, r));
    }
    for &r in rows {
        buf[r * m.cols..(r + 1) * m.cols].fill(0.0);
    }
    MatRef::row_major(buf, m.rows, m.cols)
}

/// The contiguous `[rows, d]` row `r` of a matrix view.
#[inline]
pub(crate) fn row<'b>(m: &MatRef<'b>, r: usize) -> &'b [f32] {
    &m.data[r * m.rs..r * m.rs + m.cols]
}

/// Validates the shared operands and resolves the options.
pub(crate) struct Checked<'a, T> {
    pub q: Op<'a, T>,
    pub k: Op<'a, T>,
    pub v: Op<'a, T>,
    pub sc: Scores<'a>,
    pub level: SimdLevel,
    /// The head dimension.
    pub k_d: usize,
    pub bq: usize,
    pub bk: usize,
    pub par: Par,
}

pub(crate) fn check<'a, T>(
    s: &AttentionShape,
    q: Heads<'a, T>,
    kk: Heads<'a, T>,
    v: Heads<'a, T>,
    o: &AttentionOptions<'a>,
) -> Result<Checked<'a, T>> {
    s.validate()?;
    let d = s.head_dim;
    Ok(Checked {
        q: resolve("q", q, s.batch, s.q_heads, s.q_len, d)?,
        k: resolve("k", kk, s.batch, s.kv_heads, s.kv_len, d)?,
        v: resolve("v", v, s.batch, s.kv_heads, s.kv_len, d)?,
        sc: scores(s, o)?,
        level: SimdLevel::resolve(o.exec.simd),
        k_d: d,
        bq: o.tiles.q.max(1),
        bk: o.tiles.kv.max(1),
        par: o.exec.par,
    })
}

/// Scaled dot-product attention, forward (FlashAttention's online softmax; ALGORITHMS.md A1).
///
/// `out[b, h, i] = Σ_j softmax_j(s_ij) · v[b, h/g, j]` over the visible keys (see the module
/// docs for scores, masks, layouts and special values), written to `out`, contiguous
/// `[batch, q_heads, q_len, head_dim]`. With `lse`, also writes the per-row log-sum-exp of
/// the scores, `[batch, q_heads, q_len]` (`-inf` for a row with no visible key), which
/// [`attention_backward`] and [`merge_attention_states`](super::merge_attention_states)
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
    let AttentionOutputs { out, lse } = outputs;
    let cx = check(&shape, q, k, v, opts)?;
    check_out("out", out.len(), shape.out_len())?;
    let mut own = Vec::new();
    let lse = lse_or_own(lse, &mut own, shape.lse_len())?;
    if shape.out_len() == 0 {
        lse.fill(f32::NEG_INFINITY);
        return Ok(());
    }
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

/// Running state of a block of query rows.
pub(crate) struct RowState {
    pub m: Vec<f32>,
    pub l: Vec<f64>,
    pub acc: Vec<f32>,
}

impl RowState {
    pub fn new(nb: usize, d: usize) -> Self {
        RowState {
            m: vec![f32::NEG_INFINITY; nb],
            l: vec![0.0; nb],
            acc: vec![0.0; nb * d],
        }
    }
}

/// The query rows of one block: consecutive queries of one head, or (decoding with grouped
/// heads) any `(head, query)` pairs that share a key/value head, packed so each key and value
/// row is read once for all of them.
#[derive(Clone, Copy)]
pub(crate) enum Rows<'a> {
    /// Queries `i0 .. i0 + n` of query head `h`.
    Block { h: usize, i0: usize, n: usize },
    /// `(query head, query)` pairs.
    Packed(&'a [(usize, usize)]),
}

impl Rows<'_> {
    #[inline]
    pub fn len(&self) -> usize {
        match self {
            Rows::Block { n, .. } => *n,
            Rows::Packed(p) => p.len(),
        }
    }
    /// `(query head, query)` of row `r`.
    #[inline(always)]
    pub fn get(&self, r: usize) -> (usize, usize) {
        match self {
            Rows::Block { h, i0, .. } => (*h, i0 + r),
            Rows::Packed(p) => p[r],
        }
    }
    /// The keys `[lo, hi)` any row can see (causal and window only).
    fn key_span(&self, sc: &Scores<'_>) -> (usize, usize) {
        match self {
            // Both ends of the visible range grow with the query index.
            Rows::Block { i0, n, .. } => (sc.range(*i0).0, sc.range(i0 + n - 1).1),
            Rows::Packed(p) => p.iter().fold((usize::MAX, 0), |(lo, hi), &(_, i)| {
                let (a, b) = sc.range(i);
                (lo.min(a), hi.max(b))
            }),
        }
    }
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
    fwd_accumulate(
        cx,
        s,
        b,
        h / s.group(),
        Rows::Block { h, i0, n: nb },
        &qm,
        k_lo,
        k_hi,
        true,
        &mut st,
    );
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
    let mut j0 = k_lo + (lo - k_lo) / bk * bk;
    let mut sbuf = vec![0.0f32; nb * bk.min(k_hi - j0)];
    let mut vis = Vec::new();
    let (mut kbuf, mut vbuf) = (Vec::new(), Vec::new());
    while j0 < hi {
        // The last block stops at the block's last visible key: the columns past it would only add
        // exact zeros (tested bit for bit against other block compositions).
        let kn = bk.min(hi - j0);
        let (km, vm, bad) = kv_tile(cx, b, hk, j0, kn, if values { hd } else { 0 }, &mut kbuf, &mut vbuf);
        let bad = values && bad;
        let sm = &mut sbuf[..nb * kn];
        matmul(sm, kn, *qm, km.t(), false, Par::Seq);
        if bad {
            vis.clear();
            vis.resize(nb * kn, false);
        }
        dispatch(
            cx.level,
            OnlineTile {
                sc: Some(sc),
                b,
                rows,
                j0,
                kn,
                d,
                t: sm,
                st,
                vis: if bad { Some(&mut vis[..]) } else { None },
            },
        );
        if values {
            accumulate_pv(&mut st.acc, sm, &vm, if bad { Some(&vis[..]) } else { None });
        }
        j0 += kn;
    }
}

/// `acc[nb × d] += P[nb × kn] · V[kn × d]`. With `vis` (the tile's visible pairs, given when
/// the tile holds non-finite keys or values), value rows holding NaN or infinity are zeroed for
/// the matrix product and their visible pairs added one by one, so a masked key contributes
/// exactly nothing (never `0 · NaN`) and the other products are bit-identical to a clean tile.
pub(crate) fn accumulate_pv(acc: &mut [f32], p: &[f32], vm: &MatRef<'_>, vis: Option<&[bool]>) {
    let (kn, d) = (vm.rows, vm.cols);
    if kn == 0 || d == 0 {
        return;
    }
    let nb = p.len() / kn;
    let bad = match vis {
        Some(_) => nonfinite_rows(vm),
        None => Vec::new(),
    };
    let mut buf = Vec::new();
    let vs = zeroed(vm, &bad, &mut buf);
    matmul(acc, d, MatRef::row_major(p, nb, kn), vs, true, Par::Seq);
    if let Some(vis) = vis {
        for &j in &bad {
            for r in 0..nb {
                if vis[r * kn + j] {
                    let pv = p[r * kn + j];
                    for (x, &vv) in acc[r * d..(r + 1) * d].iter_mut().zip(row(vm, j)) {
                        *x += pv * vv;
                    }
                }
            }
        }
    }
}

/// Scores → probabilities relative to the running max, for one tile; rescales each row's
/// accumulator and sum (steps 1–4 of A1).
pub(crate) struct OnlineTile<'a, 'b> {
    /// `Some`: turn raw products into scores first; `None`: the tile already holds scores.
    pub sc: Option<&'a Scores<'b>>,
    pub b: usize,
    pub rows: Rows<'a>,
    pub j0: usize,
    pub kn: usize,
    pub d: usize,
    pub t: &'a mut [f32],
    pub st: &'a mut RowState,
    pub vis: Option<&'a mut [bool]>,
}

impl Task for OnlineTile<'_, '_> {
    type Output = ();
    #[inline(always)]
    fn run<S: Isa>(self, s: S) {
        let OnlineTile {
            sc,
            b,
            rows,
            j0,
            kn,
            d,
            t,
            st,
            mut vis,
        } = self;
        for (r, row) in t.chunks_mut(kn).enumerate() {
            if let Some(sc) = sc {
                let (h, i) = rows.get(r);
                sc.prep_row(s, (b, h, i), j0, row, None);
            }
            if let Some(vis) = vis.as_deref_mut() {
                for (f, &x) in vis[r * kn..(r + 1) * kn].iter_mut().zip(row.iter()) {
                    *f = x != f32::NEG_INFINITY;
                }
            }
            let mt = k::max(s, row, Ahead::NONE);
            let mo = st.m[r];
            let mn = if mt > mo { mt } else { mo };
            if mn == f32::NEG_INFINITY {
                row.fill(0.0);
                continue;
            }
            let alpha = if mo == f32::NEG_INFINITY {
                0.0
            } else if mo == mn {
                1.0
            } else {
                (mo - mn).exp()
            };
            let sum = k::exp_shift_inplace_sum(s, row, mn);
            st.l[r] = st.l[r] * alpha as f64 + sum;
            if alpha != 1.0 {
                k::scale(s, &mut st.acc[r * d..(r + 1) * d], alpha);
            }
            st.m[r] = mn;
        }
    }
}

/// Flash attention backward (A1): from the forward's inputs, its output `out`, the upstream
/// gradient `d_out` (both contiguous `[batch, q_heads, q_len, head_dim]`) and the saved
/// `lse`, writes `dq` (contiguous like `out`), `dk` and `dv` (contiguous
/// `[batch, kv_heads, kv_len, head_dim]`; grouped heads' gradients summed).
///
/// Recomputes each score tile: `P = exp(s − lse)`, `D_i = Σ dO_i ⊙ O_i`, `dV += Pᵀ dO`,
/// `dP = dO Vᵀ`, `dS = P ⊙ (dP − D)`, `dQ += dS K · c`, `dK += dSᵀ Q · c` (with
/// `c = scale/τ`), five f32 matrix products per tile, never `q_len × kv_len` at once.
/// A row with `lse = -inf` (nothing visible) gets zero gradients; masked (query, key) pairs
/// contribute exactly nothing, even when the key, value, query or upstream gradient holds
/// NaN or infinity (those tiles take a guarded path). `opts` must be the forward's options.
///
/// Threads split (batch, key/value head) pairs, each running its key blocks in order and
/// accumulating `dQ` in f32 for its heads; with fewer pairs than threads (grouped-query
/// attention at small batch) the work splits into key blocks for dK/dV, then query blocks for
/// dQ (two more products per tile, every thread busy, the same bits). Results are bitwise
/// identical for any thread count. Errors: as [`attention`], plus wrong lengths of `out`, `d_out`, `lse` or the
/// gradients.
pub fn attention_backward<T: AttnElement>(
    inputs: AttentionInputs<'_, T>,
    out: &[T],
    lse: &[f32],
    d_out: &[T],
    grads: AttentionGrads<'_, T>,
    opts: &AttentionOptions<'_>,
) -> Result<()> {
    let AttentionInputs { shape, q, k, v } = inputs;
    let cx = check(&shape, q, k, v, opts)?;
    check_out("out", out.len(), shape.out_len())?;
    check_out("d_out", d_out.len(), shape.out_len())?;
    check_out("lse", lse.len(), shape.lse_len())?;
    let AttentionGrads { dq, dk, dv, mut d_bias } = grads;
    grads_check(&shape, dq, dk, dv, d_bias.as_deref())?;
    if let Some(db) = d_bias.as_deref_mut() {
        db.fill(0.0);
    }
    if shape.batch == 0 || shape.kv_heads == 0 {
        return Ok(());
    }
    let d = shape.head_dim;
    if shape.q_len == 0 || shape.kv_len == 0 {
        dq.fill(T::from_f32(0.0));
        dk.fill(T::from_f32(0.0));
        dv.fill(T::from_f32(0.0));
        return Ok(());
    }
    // D_i = Σ dO_i ⊙ O_i for every query row (f64 dot, one rounding).
    let mut dd = vec![0.0f32; shape.lse_len()];
    let (mut t1, mut t2) = (vec![0.0f32; d], vec![0.0f32; d]);
    for ((x, y), di) in out.chunks(d).zip(d_out.chunks(d)).zip(dd.iter_mut()) {
        T::load_f32(x, &mut t1);
        T::load_f32(y, &mut t2);
        *di = t1.iter().zip(&t2).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>() as f32;
    }
    backward_impl(&cx, &shape, d_out, lse, &dd, None, dq, dk, dv, d_bias);
    Ok(())
}

/// The gradient outputs of [`attention_backward`]: `dq` contiguous
/// `[batch, q_heads, q_len, head_dim]`, `dk` and `dv` contiguous
/// `[batch, kv_heads, kv_len, head_dim]` (grouped heads' gradients summed), and optionally
/// `d_bias`, the gradient of the additive score bias, contiguous f32
/// `[batch, q_heads, q_len, kv_len]` (`∂L/∂s / τ`, 0 at masked pairs; a broadcast bias is the
/// sum of this over its broadcast axes). `d_bias` is the one output as large as the scores; it
/// is written only when asked for.
pub struct AttentionGrads<'a, T> {
    /// Query gradient.
    pub dq: &'a mut [T],
    /// Key gradient.
    pub dk: &'a mut [T],
    /// Value gradient.
    pub dv: &'a mut [T],
    /// Score-bias gradient, if wanted.
    pub d_bias: Option<&'a mut [f32]>,
}

impl<'a, T> AttentionGrads<'a, T> {
    /// `dq`, `dk`, `dv`; no bias gradient.
    pub fn new(dq: &'a mut [T], dk: &'a mut [T], dv: &'a mut [T]) -> Self {
        AttentionGrads {
            dq,
            dk,
            dv,
            d_bias: None,
        }
    }
    /// Also writes the score-bias gradient into `d_bias`.
    pub fn with_bias_grad(mut self, d_bias: &'a mut [f32]) -> Self {
        self.d_bias = Some(d_bias);
        self
    }
}

/// Lengths of the gradient outputs.
pub(crate) fn grads_check<T>(s: &AttentionShape, dq: &[T], dk: &[T], dv: &[T], d_bias: Option<&[f32]>) -> Result<()> {
    check_out("dq", dq.len(), s.out_len())?;
    check_out("dk", dk.len(), s.kv_len_elems())?;
    check_out("dv", dv.len(), s.kv_len_elems())?;
    if let Some(db) = d_bias {
        let n = s.lse_len().checked_mul(s.kv_len).ok_or(Error::SizeOverflow {
            what: "d_bias",
            shape: format!("{} rows x {} keys", s.lse_len(), s.kv_len),
        })?;
        check_out("d_bias", db.len(), n)?;
    }
    Ok(())
}

/// The clipped-softmax weights `w = clip((ζ − γ)p + γ, 0, 1)` and their backward rule.
#[derive(Clone, Copy)]
pub(crate) struct Clip {
    pub zeta: f32,
    pub gamma: f32,
}

impl Clip {
    #[inline(always)]
    pub fn r(&self, p: f32) -> f32 {
        (self.zeta - self.gamma) * p + self.gamma
    }
    #[inline(always)]
    pub fn w(&self, p: f32) -> f32 {
        let r = self.r(p);
        if r.is_nan() { r } else { r.clamp(0.0, 1.0) }
    }
    /// `u = g·(ζ − γ)·1[0 ≤ r ≤ 1]` (inclusive, as `torch.clamp`'s backward).
    #[inline(always)]
    pub fn u(&self, p: f32, g: f32) -> f32 {
        let r = self.r(p);
        if (0.0..=1.0).contains(&r) {
            g * (self.zeta - self.gamma)
        } else {
            0.0
        }
    }
}

/// The tiled backward shared by softmax and clipped-softmax attention, given every row's
/// `D_i` (`Σ dO ⊙ O` for softmax, `Σ_j u_ij p_ij` for clipped softmax).
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward_impl<T: Element>(
    cx: &Checked<'_, T>,
    shape: &AttentionShape,
    d_out: &[T],
    lse: &[f32],
    dd: &[f32],
    clip: Option<Clip>,
    dq: &mut [T],
    dk: &mut [T],
    dv: &mut [T],
    d_bias: Option<&mut [f32]>,
) {
    let (d, ql, kl, g) = (shape.head_dim, shape.q_len, shape.kv_len, shape.group());
    let do_op = Op {
        data: d_out,
        st: super::HeadStrides::bhsd(shape.q_heads, ql, d),
    };
    let pairs = shape.batch * shape.kv_heads;
    if cx.par == Par::Seq || pairs >= rayon::current_num_threads() {
        // One task per (batch, key/value head): five products per tile, dQ accumulated in
        // the task.
        let dbs: Vec<Option<&mut [f32]>> = match d_bias {
            Some(db) => db.chunks_mut(g * ql * kl).map(Some).collect(),
            None => (0..pairs).map(|_| None).collect(),
        };
        let tasks: Vec<(usize, (((&mut [T], &mut [T]), &mut [T]), Option<&mut [f32]>))> = dq
            .chunks_mut(g * ql * d)
            .zip(dk.chunks_mut(kl * d))
            .zip(dv.chunks_mut(kl * d))
            .zip(dbs)
            .enumerate()
            .collect();
        let run = |(bh, (((dqh, dkh), dvh), dbh)): (usize, (((&mut [T], &mut [T]), &mut [T]), Option<&mut [f32]>))| {
            let (b, hk) = (bh / shape.kv_heads, bh % shape.kv_heads);
            bwd_head(
                cx,
                shape,
                &do_op,
                lse,
                dd,
                clip,
                b,
                hk,
                0,
                kl,
                Some((dqh, dbh)),
                dkh,
                dvh,
            );
        };
        crate::par::for_each(cx.par, tasks, |_, t| run(t));
        return;
    }
    // Fewer (batch, key/value head) pairs than threads: two passes that each split finer,
    // dK/dV per key block, then dQ per query block (seven products per tile instead of five,
    // but every thread busy). Each gradient element sums the same terms in the same order as
    // above, so the choice, although it depends on the thread count, never changes a bit
    // (tested).
    let mut tasks = Vec::new();
    for (bh, (dkh, dvh)) in dk.chunks_mut(kl * d).zip(dv.chunks_mut(kl * d)).enumerate() {
        for (jb, (dkb, dvb)) in dkh.chunks_mut(cx.bk * d).zip(dvh.chunks_mut(cx.bk * d)).enumerate() {
            tasks.push((bh, jb * cx.bk, dkb, dvb));
        }
    }
    let run = |(bh, j0, dkb, dvb): (usize, usize, &mut [T], &mut [T])| {
        let (b, hk) = (bh / shape.kv_heads, bh % shape.kv_heads);
        let j1 = j0 + dkb.len() / d;
        bwd_head(cx, shape, &do_op, lse, dd, clip, b, hk, j0, j1, None, dkb, dvb);
    };
    crate::par::for_each(cx.par, tasks, |_, t| run(t));
    let mut dbs = d_bias.map(|db| db.chunks_mut(ql * kl).flat_map(|h| h.chunks_mut(cx.bq * kl)));
    let mut blocks = Vec::new();
    for (bh, dqh) in dq.chunks_mut(ql * d).enumerate() {
        for (ib, dqb) in dqh.chunks_mut(cx.bq * d).enumerate() {
            let db = dbs.as_mut().and_then(|it| it.next());
            blocks.push((bh, ib * cx.bq, dqb, db));
        }
    }
    let run = |(bh, i0, dqb, db): (usize, usize, &mut [T], Option<&mut [f32]>)| {
        let (b, h) = (bh / shape.q_heads, bh % shape.q_heads);
        dq_block(cx, shape, &do_op, lse, dd, clip, b, h, i0, dqb, db);
    };
    crate::par::for_each(cx.par, blocks, |_, t| run(t));
}

/// The backward of one (batch, key/value head) pair over the keys `[j_lo, j_hi)` (a multiple of
/// the key block apart from the end): `dk` and `dv` hold those keys' rows; with `dq` (the
/// group's query heads), also the query gradient and, if given, the rows of the score-bias
/// gradient of those heads.
#[allow(clippy::too_many_arguments)]
fn bwd_head<T: Element>(
    cx: &Checked<'_, T>,
    s: &AttentionShape,
    do_op: &Op<'_, T>,
    lse: &[f32],
    dd: &[f32],
    clip: Option<Clip>,
    b: usize,
    hk: usize,
    j_lo: usize,
    j_hi: usize,
    dq: Option<(&mut [T], Option<&mut [f32]>)>,
    dk: &mut [T],
    dv: &mut [T],
) {
    let (d, ql, kl, g) = (s.head_dim, s.q_len, s.kv_len, s.group());
    let (dq, mut d_bias) = match dq {
        Some((q, b)) => (Some(q), b),
        None => (None, None),
    };
    let (bq, bk) = (cx.bq, cx.bk);
    let sc = &cx.sc;
    let mut dq_acc = vec![0.0f32; if dq.is_some() { g * ql * d } else { 0 }];
    let mut dk_acc = vec![0.0f32; bk.min(kl) * d];
    let mut dv_acc = vec![0.0f32; bk.min(kl) * d];
    let tile = bq.min(ql) * bk.min(kl);
    let mut p = vec![0.0f32; tile];
    let mut dp = vec![0.0f32; tile];
    let mut w = vec![0.0f32; if clip.is_some() { tile } else { 0 }];
    let capped = sc.cap != 0.0;
    let mut gcap = vec![0.0f32; if capped { tile } else { 0 }];
    let mut vis = Vec::new();
    let (mut kbuf, mut vbuf, mut qbuf, mut dobuf) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut zbuf, mut zbuf2, mut zbuf3) = (Vec::new(), Vec::new(), Vec::new());
    let mut j0 = j_lo;
    while j0 < j_hi {
        let kn = bk.min(j_hi - j0);
        let (km, vm, kv_bad) = kv_tile(cx, b, hk, j0, kn, d, &mut kbuf, &mut vbuf);
        let dka = &mut dk_acc[..kn * d];
        let dva = &mut dv_acc[..kn * d];
        dka.fill(0.0);
        dva.fill(0.0);
        for hh in 0..g {
            let h = hk * g + hh;
            let mut i0 = 0;
            while i0 < ql {
                let nb = bq.min(ql - i0);
                let (first, last) = (sc.range(i0), sc.range(i0 + nb - 1));
                if first.0 >= j0 + kn || last.1 <= j0 {
                    i0 += nb;
                    continue;
                }
                let qm = rows_f32(&cx.q, b, h, i0, nb, d, &mut qbuf);
                let dom = rows_f32(do_op, b, h, i0, nb, d, &mut dobuf);
                let bad = kv_bad || !all_finite(cx.level, &qm) || !all_finite(cx.level, &dom);
                let pm = &mut p[..nb * kn];
                matmul(pm, kn, qm, km.t(), false, Par::Seq);
                if bad {
                    vis.clear();
                    vis.resize(nb * kn, false);
                }
                let row0 = (b * s.q_heads + h) * ql + i0;
                let lse_rows = &lse[row0..row0 + nb];
                let d_rows = &dd[row0..row0 + nb];
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
                        lse: lse_rows,
                        vis: if bad { Some(&mut vis[..]) } else { None },
                        dcap: capped.then(|| &mut gcap[..nb * kn]),
                    },
                );
                // dV += Wᵀ dO, with W = P (softmax) or the clipped weights.
                let wm = match clip {
                    Some(cl) => {
                        let wt = &mut w[..nb * kn];
                        for (x, &pv) in wt.iter_mut().zip(pm.iter()) {
                            *x = cl.w(pv);
                        }
                        MatRef::row_major(wt, nb, kn)
                    }
                    None => MatRef::row_major(pm, nb, kn),
                };
                // Non-finite rows of dO, K and Q are zeroed for the products that pair them with
                // masked weights, and their visible pairs added back (see `zeroed`).
                let (bad_do, bad_k, bad_q) = if bad {
                    (nonfinite_rows(&dom), nonfinite_rows(&km), nonfinite_rows(&qm))
                } else {
                    (Vec::new(), Vec::new(), Vec::new())
                };
                let dos = zeroed(&dom, &bad_do, &mut zbuf);
                matmul(dva, d, wm.t(), dos, true, Par::Seq);
                for &r in &bad_do {
                    for j in (0..kn).filter(|&j| vis[r * kn + j]) {
                        let wv = wm.data[r * kn + j];
                        for (x, &y) in dva[j * d..(j + 1) * d].iter_mut().zip(row(&dom, r)) {
                            *x += wv * y;
                        }
                    }
                }
                let dpm = &mut dp[..nb * kn];
                matmul(dpm, kn, dom, vm.t(), false, Par::Seq);
                let db = d_bias
                    .as_deref_mut()
                    .map(|db| &mut db[(hh * ql + i0) * kl..][..nb * kl]);
                dispatch(
                    cx.level,
                    DsTile {
                        p: pm,
                        dp: dpm,
                        dd: d_rows,
                        kn,
                        c: sc.c,
                        clip,
                        db: db.map(|x| (x, kl, j0, sc.cb)),
                        dcap: capped.then(|| &gcap[..nb * kn]),
                    },
                );
                let dsm = MatRef::row_major(dpm, nb, kn);
                if dq.is_some() {
                    let dqa = &mut dq_acc[(hh * ql + i0) * d..][..nb * d];
                    add_ds_k(dqa, &dsm, &km, &bad_k, &vis, &mut zbuf2);
                }
                let qs = zeroed(&qm, &bad_q, &mut zbuf3);
                matmul(dka, d, dsm.t(), qs, true, Par::Seq);
                for &r in &bad_q {
                    for j in (0..kn).filter(|&j| vis[r * kn + j]) {
                        let ds = dsm.data[r * kn + j];
                        for (x, &y) in dka[j * d..(j + 1) * d].iter_mut().zip(row(&qm, r)) {
                            *x += ds * y;
                        }
                    }
                }
                i0 += nb;
            }
        }
        for (r, (dkr, dvr)) in dka.chunks(d).zip(dva.chunks(d)).enumerate() {
            let o = (j0 - j_lo + r) * d;
            T::store_f32(dkr, &mut dk[o..o + d]);
            T::store_f32(dvr, &mut dv[o..o + d]);
        }
        j0 += kn;
    }
    if let Some(dq) = dq {
        T::store_f32(&dq_acc, dq);
    }
}

/// `dQ += dS·K` for one tile; key rows holding NaN or infinity (`bad_k`) are zeroed for the
/// product and their visible pairs added back (see [`zeroed`]).
fn add_ds_k(dqa: &mut [f32], dsm: &MatRef<'_>, km: &MatRef<'_>, bad_k: &[usize], vis: &[bool], zbuf: &mut Vec<f32>) {
    let (nb, kn, d) = (dsm.rows, km.rows, km.cols);
    let ks = zeroed(km, bad_k, zbuf);
    matmul(dqa, d, *dsm, ks, true, Par::Seq);
    for &j in bad_k {
        for r in (0..nb).filter(|&r| vis[r * kn + j]) {
            let ds = dsm.data[r * kn + j];
            for (x, &y) in dqa[r * d..(r + 1) * d].iter_mut().zip(row(km, j)) {
                *x += ds * y;
            }
        }
    }
}

/// The query gradient of one query block (the second pass of the few-heads backward): the
/// same tiles, probabilities and `dS` as [`bwd_head`], in the same key order.
#[allow(clippy::too_many_arguments)]
fn dq_block<T: Element>(
    cx: &Checked<'_, T>,
    s: &AttentionShape,
    do_op: &Op<'_, T>,
    lse: &[f32],
    dd: &[f32],
    clip: Option<Clip>,
    b: usize,
    h: usize,
    i0: usize,
    dq: &mut [T],
    mut d_bias: Option<&mut [f32]>,
) {
    let (d, ql, kl, bk) = (s.head_dim, s.q_len, s.kv_len, cx.bk);
    let nb = dq.len() / d;
    let hk = h / s.group();
    let sc = &cx.sc;
    let mut acc = vec![0.0f32; nb * d];
    let (mut qbuf, mut dobuf, mut kbuf, mut vbuf, mut zbuf) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let qm = rows_f32(&cx.q, b, h, i0, nb, d, &mut qbuf);
    let dom = rows_f32(do_op, b, h, i0, nb, d, &mut dobuf);
    let q_bad = !all_finite(cx.level, &qm) || !all_finite(cx.level, &dom);
    let row0 = (b * s.q_heads + h) * ql + i0;
    let (lse_rows, d_rows) = (&lse[row0..row0 + nb], &dd[row0..row0 + nb]);
    let tile = nb * bk.min(kl);
    let (mut p, mut dp, mut vis) = (vec![0.0f32; tile], vec![0.0f32; tile], Vec::new());
    let capped = sc.cap != 0.0;
    let mut gcap = vec![0.0f32; if capped { tile } else { 0 }];
    let (first, last) = (sc.range(i0), sc.range(i0 + nb - 1));
    let mut j0 = 0;
    while j0 < kl {
        let kn = bk.min(kl - j0);
        // The key blocks `bwd_head` visits for this query block, and only those.
        if first.0 >= j0 + kn || last.1 <= j0 {
            j0 += kn;
            continue;
        }
        let (km, vm, kv_bad) = kv_tile(cx, b, hk, j0, kn, d, &mut kbuf, &mut vbuf);
        let bad = q_bad || kv_bad;
        let pm = &mut p[..nb * kn];
        matmul(pm, kn, qm, km.t(), false, Par::Seq);
        if bad {
            vis.clear();
            vis.resize(nb * kn, false);
        }
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
                lse: lse_rows,
                vis: if bad { Some(&mut vis[..]) } else { None },
                dcap: capped.then(|| &mut gcap[..nb * kn]),
            },
        );
        let dpm = &mut dp[..nb * kn];
        matmul(dpm, kn, dom, vm.t(), false, Par::Seq);
        dispatch(
            cx.level,
            DsTile {
                p: pm,
                dp: dpm,
                dd: d_rows,
                kn,
                c: sc.c,
                clip,
                db: d_bias.as_deref_mut().map(|x| (x, kl, j0, sc.cb)),
                dcap: capped.then(|| &gcap[..nb * kn]),
            },
        );
        let bad_k = if bad { nonfinite_rows(&km) } else { Vec::new() };
        add_ds_k(&mut acc, &MatRef::row_major(dpm, nb, kn), &km, &bad_k, &vis, &mut zbuf);
        j0 += kn;
    }
    T::store_f32(&acc, dq);
}

/// Products `q·k` → `P = exp(s − lse)` in place (0 where masked or where the row has no
/// visible key).
pub(crate) struct ProbTile<'a, 'b> {
    pub sc: &'a Scores<'b>,
    pub b: usize,
    pub h: usize,
    pub i0: usize,
    pub j0: usize,
    pub kn: usize,
    pub t: &'a mut [f32],
    pub lse: &'a [f32],
    pub vis: Option<&'a mut [bool]>,
    /// With a soft cap: receives each score's `1 − tanh²` (the backward's chain factor).
    pub dcap: Option<&'a mut [f32]>,
}

impl Task for ProbTile<'_, '_> {
    type Output = ();
    #[inline(always)]
    fn run<S: Isa>(self, s: S) {
        let ProbTile {
            sc,
            b,
            h,
            i0,
            j0,
            kn,
            t,
            lse,
            mut vis,
            mut dcap,
        } = self;
        for (r, row) in t.chunks_mut(kn).enumerate() {
            let g = dcap.as_deref_mut().map(|g| &mut g[r * kn..(r + 1) * kn]);
            sc.prep_row(s, (b, h, i0 + r), j0, row, g);
            if let Some(vis) = vis.as_deref_mut() {
                for (f, &x) in vis[r * kn..(r + 1) * kn].iter_mut().zip(row.iter()) {
                    *f = x != f32::NEG_INFINITY;
                }
            }
            let l = lse[r];
            if l == f32::NEG_INFINITY {
                row.fill(0.0);
                continue;
            }
            k::exp_shift_inplace_sum(s, row, l);
        }
    }
}

/// `dP ← c · P ⊙ (u − D)` in place (`u = dP`, or the clipped rule's `u`), 0 wherever `P = 0`;
/// with `db = (rows, row stride, first column, 1/τ)`, also the score-bias gradient
/// `P ⊙ (u − D) / τ` of the tile.
struct DsTile<'a> {
    p: &'a [f32],
    dp: &'a mut [f32],
    dd: &'a [f32],
    kn: usize,
    c: f32,
    clip: Option<Clip>,
    db: Option<(&'a mut [f32], usize, usize, f32)>,
    /// With a soft cap, each score's `1 − tanh²`.
    dcap: Option<&'a [f32]>,
}

impl Task for DsTile<'_> {
    type Output = ();
    #[inline(always)]
    fn run<S: Isa>(self, _s: S) {
        let DsTile {
            p,
            dp,
            dd,
            kn,
            c,
            clip,
            mut db,
            dcap,
        } = self;
        for (r, ((pr, dr), &di)) in p.chunks(kn).zip(dp.chunks_mut(kn)).zip(dd).enumerate() {
            let mut brow = db
                .as_mut()
                .map(|(rows, stride, j0, cb)| (&mut rows[r * *stride + *j0..][..kn], *cb));
            for (j, (&pv, x)) in pr.iter().zip(dr.iter_mut()).enumerate() {
                let u = match clip {
                    None => *x,
                    Some(cl) => cl.u(pv, *x),
                };
                let raw = pv * (u - di);
                let ds = match dcap {
                    None => raw * c,
                    Some(g) => raw * c * g[r * kn + j],
                };
                *x = if pv == 0.0 { 0.0 } else { ds };
                if let Some((bb, cb)) = brow.as_mut() {
                    bb[j] = if pv == 0.0 { 0.0 } else { raw * *cb };
                }
            }
        }
    }
}
