//! The tile machinery every attention kernel shares: operand rows as f32 matrices, the
//! finiteness guards, the running row state, and the score-tile tasks (online softmax and
//! recomputed probabilities).

use super::{
    AttentionOptions, AttentionOutputs, AttentionShape, Heads, Op, Scores, check_out, lse_or_own, resolve, scores,
};
use crate::arch::gemm::{MatRef, matmul};
use crate::arch::rows as k;
use crate::arch::{Ahead, Isa, SimdLevel, Task, dispatch};
use crate::element::Element;
use crate::error::Result;
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
    if let Some(x) = T::cast::<f32>(&op.data[start..end]) {
        return MatRef { data: x, rows: n, cols: d, rs: op.st.token, cs: 1 };
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
        #[cfg_attr(not(debug_assertions), inline(always))]
        #[cfg_attr(debug_assertions, inline)]
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
    (0..m.rows).filter(|&r| !row(m, r).iter().all(|x| x.is_finite())).collect()
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
        // Tiles larger than the problem are one tile (the same blocks, so the same bits) and
        // never enter a size product beyond the validated shape.
        bq: o.tiles.q.clamp(1, s.q_len.max(1)),
        bk: o.tiles.kv.clamp(1, s.kv_len.max(1)),
        par: o.exec.par,
    })
}

/// Running state of a block of query rows.
pub(crate) struct RowState {
    pub m: Vec<f32>,
    pub l: Vec<f64>,
    pub acc: Vec<f32>,
}

impl RowState {
    pub fn new(nb: usize, d: usize) -> Self {
        RowState { m: vec![f32::NEG_INFINITY; nb], l: vec![0.0; nb], acc: vec![0.0; nb * d] }
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
    #[cfg_attr(not(debug_assertions), inline(always))]
    #[cfg_attr(debug_assertions, inline)]
    pub fn get(&self, r: usize) -> (usize, usize) {
        match self {
            Rows::Block { h, i0, .. } => (*h, i0 + r),
            Rows::Packed(p) => p[r],
        }
    }
    /// The keys `[lo, hi)` any row can see (causal and window only).
    pub(crate) fn key_span(&self, sc: &Scores<'_>) -> (usize, usize) {
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
    #[cfg_attr(not(debug_assertions), inline(always))]
    #[cfg_attr(debug_assertions, inline)]
    fn run<S: Isa>(self, s: S) {
        let OnlineTile { sc, b, rows, j0, kn, d, t, st, mut vis } = self;
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
                k::scale_or_shift(s, &mut st.acc[r * d..(r + 1) * d], alpha, false);
            }
            st.m[r] = mn;
        }
    }
}

/// Where a score tile lies: query rows `i0 ..` of head `(b, h)` against keys `j0 .. j0 + kn`.
#[derive(Clone, Copy)]
pub(crate) struct TileAt {
    pub b: usize,
    pub h: usize,
    pub i0: usize,
    pub j0: usize,
    pub kn: usize,
}

/// The blocks `(j0, n)` of a key or query range from `start` while `j0 < stop`: `size` each, the
/// last one ending at `end` at the latest (`end ≥ stop`, `size ≥ 1`).
pub(crate) fn blocks(start: usize, stop: usize, end: usize, size: usize) -> impl Iterator<Item = (usize, usize)> {
    let mut j0 = start;
    std::iter::from_fn(move || {
        if j0 >= stop {
            return None;
        }
        let block = (j0, size.min(end - j0));
        j0 += block.1;
        Some(block)
    })
}

/// The raw products `q·kᵀ` of a `qm.rows × km.rows` tile, in `buf`.
pub(crate) fn products<'t>(qm: MatRef<'_>, km: MatRef<'_>, buf: &'t mut [f32]) -> &'t mut [f32] {
    let t = &mut buf[..qm.rows * km.rows];
    matmul(t, km.rows, qm, km.t(), false, Par::Seq);
    t
}

/// `vis` reset to `n` hidden pairs, for a tile task to mark the visible ones.
pub(crate) fn hidden(vis: &mut Vec<bool>, n: usize) -> &mut [bool] {
    vis.clear();
    vis.resize(n, false);
    vis
}

/// The probabilities `P = exp(s − lse)` of tile `at` in `buf` (0 where masked or where the row
/// has no visible key), from the query rows `qm` and key rows `km`: one f32 product, then
/// [`ProbTile`]. `vis`, when given, is reset and receives the tile's visible pairs; `dcap`, when
/// given (a soft cap), each score's `1 − tanh²`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn prob_tile<'t, T>(
    cx: &Checked<'_, T>,
    at: TileAt,
    qm: MatRef<'_>,
    km: MatRef<'_>,
    lse: &[f32],
    buf: &'t mut [f32],
    vis: Option<&mut Vec<bool>>,
    dcap: Option<&mut [f32]>,
) -> &'t mut [f32] {
    let t = products(qm, km, buf);
    let n = t.len();
    let vis = vis.map(|v| hidden(v, n));
    let dcap = dcap.map(|g| &mut g[..n]);
    dispatch(cx.level, ProbTile { sc: &cx.sc, at, t: &mut *t, lse, vis, dcap });
    t
}

/// Products `q·k` → `P = exp(s − lse)` in place (0 where masked or where the row has no
/// visible key).
pub(crate) struct ProbTile<'a, 'b> {
    pub sc: &'a Scores<'b>,
    pub at: TileAt,
    pub t: &'a mut [f32],
    pub lse: &'a [f32],
    pub vis: Option<&'a mut [bool]>,
    /// With a soft cap: receives each score's `1 − tanh²` (the backward's chain factor).
    pub dcap: Option<&'a mut [f32]>,
}

impl Task for ProbTile<'_, '_> {
    type Output = ();
    #[cfg_attr(not(debug_assertions), inline(always))]
    #[cfg_attr(debug_assertions, inline)]
    fn run<S: Isa>(self, s: S) {
        let ProbTile { sc, at, t, lse, mut vis, mut dcap } = self;
        let kn = at.kn;
        for (r, row) in t.chunks_mut(kn).enumerate() {
            let g = dcap.as_deref_mut().map(|g| &mut g[r * kn..(r + 1) * kn]);
            sc.prep_row(s, (at.b, at.h, at.i0 + r), at.j0, row, g);
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

/// Walks the key tiles that query block `(b, h, i0)` (rows `qm`, row lse `lse`) can see, in key
/// order: `f(p, v, vis, bad)` gets the tile's probabilities `p = exp(s − lse)` (a masked pair:
/// `vis` false, `p = 0`; `kn` columns), its value rows `v`, and whether its key or value rows
/// hold a non-finite value.
pub(crate) fn for_prob_tiles<T: Element>(
    cx: &Checked<'_, T>,
    s: &AttentionShape,
    (b, h, i0): (usize, usize, usize),
    (qm, lse): (MatRef<'_>, &[f32]),
    mut f: impl FnMut(&mut [f32], MatRef<'_>, &[bool], bool),
) {
    let (d, kl, nb, bk) = (s.head_dim, s.kv_len, lse.len(), cx.bk);
    let hk = h / s.group();
    let (lo, hi) = (cx.sc.range(i0).0, cx.sc.range(i0 + nb - 1).1);
    let mut pbuf = vec![0.0f32; nb * bk.min(kl)];
    let (mut kbuf, mut vbuf, mut vis) = (Vec::new(), Vec::new(), Vec::new());
    for (j0, kn) in blocks(lo / bk * bk, hi, kl, bk) {
        let (km, vm, bad) = kv_tile(cx, b, hk, j0, kn, d, &mut kbuf, &mut vbuf);
        let at = TileAt { b, h, i0, j0, kn };
        let pm = prob_tile(cx, at, qm, km, lse, &mut pbuf, Some(&mut vis), None);
        f(pm, vm, &vis, bad);
    }
}

/// Runs `f(b, h, i0, out_block, lse_block)` for every query block, in parallel.
pub(crate) fn for_blocks<T: Element, F>(cx: &Checked<'_, T>, s: &AttentionShape, out: &mut [T], lse: &mut [f32], f: F)
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

/// The output side of a forward call, checked: `out` and `lse` (the caller's, or a scratch one
/// in `own`). `None` when there is nothing to compute (`lse` then holds `-inf`).
pub(crate) fn forward_outputs<'o, T>(
    shape: &AttentionShape,
    outputs: AttentionOutputs<'o, T>,
    own: &'o mut Vec<f32>,
) -> Result<Option<(&'o mut [T], &'o mut [f32])>> {
    let AttentionOutputs { out, lse } = outputs;
    check_out("out", out.len(), shape.out_len())?;
    let lse = lse_or_own(lse, own, shape.lse_len())?;
    if shape.out_len() == 0 {
        lse.fill(f32::NEG_INFINITY);
        return Ok(None);
    }
    Ok(Some((out, lse)))
}
