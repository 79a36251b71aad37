//! The flash-attention backward (A1): recomputes each score tile from the saved log-sum-exp.
use super::tile::{
    Checked, TileAt, all_finite, blocks, check, kv_tile, nonfinite_rows, prob_tile, row, rows_f32, zeroed,
};
use super::{AttentionInputs, AttentionOptions, AttentionShape, AttnElement, Op, check_out};
use crate::arch::gemm::{MatRef, matmul};
use crate::arch::{Isa, Task, dispatch};
use crate::element::Element;
use crate::error::{Error, Result};
use crate::options::Par;

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
/// identical for any thread count. Errors: as [`attention`](super::attention), plus wrong lengths of `out`, `d_out`, `lse` or the
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
    let Some(grads) = backward_outputs(&shape, d_out, lse, grads)? else { return Ok(()) };
    let d = shape.head_dim;
    // D_i = Σ dO_i ⊙ O_i for every query row (f64 dot, one rounding).
    let mut dd = vec![0.0f32; shape.lse_len()];
    let (mut t1, mut t2) = (vec![0.0f32; d], vec![0.0f32; d]);
    for ((x, y), di) in out.chunks(d).zip(d_out.chunks(d)).zip(dd.iter_mut()) {
        T::load_f32(x, &mut t1);
        T::load_f32(y, &mut t2);
        *di = t1.iter().zip(&t2).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>() as f32;
    }
    backward_impl(&cx, &shape, d_out, lse, &dd, None, grads);
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
        AttentionGrads { dq, dk, dv, d_bias: None }
    }
    /// Also writes the score-bias gradient into `d_bias`.
    pub fn with_bias_grad(mut self, d_bias: &'a mut [f32]) -> Self {
        self.d_bias = Some(d_bias);
        self
    }
}

/// The gradient side of a backward call, checked: the lengths of `d_out`, `lse` and the
/// gradients; `d_bias` zeroed. `None` when there is nothing to compute (no query, no key or no
/// batch: every gradient is then zero, as written).
pub(crate) fn backward_outputs<'g, T: Element>(
    s: &AttentionShape,
    d_out: &[T],
    lse: &[f32],
    grads: AttentionGrads<'g, T>,
) -> Result<Option<AttentionGrads<'g, T>>> {
    check_out("d_out", d_out.len(), s.out_len())?;
    check_out("lse", lse.len(), s.lse_len())?;
    let AttentionGrads { dq, dk, dv, mut d_bias } = grads;
    check_out("dq", dq.len(), s.out_len())?;
    check_out("dk", dk.len(), s.kv_len_elems())?;
    check_out("dv", dv.len(), s.kv_len_elems())?;
    if let Some(db) = d_bias.as_deref_mut() {
        let n = s.lse_len().checked_mul(s.kv_len).ok_or(Error::SizeOverflow {
            what: "d_bias",
            shape: format!("{} rows x {} keys", s.lse_len(), s.kv_len),
        })?;
        check_out("d_bias", db.len(), n)?;
        db.fill(0.0);
    }
    if s.batch == 0 || s.q_heads == 0 || s.q_len == 0 || s.kv_len == 0 {
        for g in [&mut *dq, &mut *dk, &mut *dv] {
            g.fill(T::from_f32(0.0));
        }
        return Ok(None);
    }
    Ok(Some(AttentionGrads { dq, dk, dv, d_bias }))
}

/// The clipped-softmax weights `w = clip((ζ − γ)p + γ, 0, 1)` and their backward rule.
#[derive(Clone, Copy)]
pub(crate) struct Clip {
    pub zeta: f32,
    pub gamma: f32,
}

impl Clip {
    #[cfg_attr(not(debug_assertions), inline(always))]
    #[cfg_attr(debug_assertions, inline)]
    pub fn r(&self, p: f32) -> f32 {
        (self.zeta - self.gamma) * p + self.gamma
    }
    #[cfg_attr(not(debug_assertions), inline(always))]
    #[cfg_attr(debug_assertions, inline)]
    pub fn w(&self, p: f32) -> f32 {
        let r = self.r(p);
        if r.is_nan() { r } else { r.clamp(0.0, 1.0) }
    }
    /// `u = g·(ζ − γ)·1[0 ≤ r ≤ 1]` (inclusive, as `torch.clamp`'s backward).
    #[cfg_attr(not(debug_assertions), inline(always))]
    #[cfg_attr(debug_assertions, inline)]
    pub fn u(&self, p: f32, g: f32) -> f32 {
        let r = self.r(p);
        if (0.0..=1.0).contains(&r) { g * (self.zeta - self.gamma) } else { 0.0 }
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
    grads: AttentionGrads<'_, T>,
) {
    let AttentionGrads { dq, dk, dv, d_bias } = grads;
    let (d, ql, kl, g) = (shape.head_dim, shape.q_len, shape.kv_len, shape.group());
    let do_op = Op { data: d_out, st: super::HeadStrides::bhsd(shape.q_heads, ql, d) };
    let pairs = shape.batch * shape.kv_heads;
    let tile = cx.bq.min(ql) * cx.bk.min(kl);
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
            let mut step = BwdStep::new(cx, shape, lse, dd, clip, tile);
            bwd_head(&mut step, &do_op, b, hk, 0, kl, Some((dqh, dbh)), dkh, dvh);
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
        let mut step = BwdStep::new(cx, shape, lse, dd, clip, tile);
        bwd_head(&mut step, &do_op, b, hk, j0, j1, None, dkb, dvb);
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
        let mut step = BwdStep::new(cx, shape, lse, dd, clip, dqb.len() / d * cx.bk.min(kl));
        dq_block(&mut step, &do_op, (b, h, i0), dqb, db);
    };
    crate::par::for_each(cx.par, blocks, |_, t| run(t));
}

/// The tile step both backward drivers run ([`bwd_head`] and [`dq_block`]), so both compute the
/// same `P` and `dS` bits: its scratch, and the inputs fixed for the whole call.
struct BwdStep<'c, 'x, T> {
    cx: &'c Checked<'x, T>,
    s: &'c AttentionShape,
    lse: &'c [f32],
    dd: &'c [f32],
    clip: Option<Clip>,
    p: Vec<f32>,
    dp: Vec<f32>,
    /// With a soft cap, each score's `1 − tanh²`.
    gcap: Vec<f32>,
    vis: Vec<bool>,
}

impl<'c, 'x, T: Element> BwdStep<'c, 'x, T> {
    /// Scratch for tiles of up to `tile` scores.
    fn new(
        cx: &'c Checked<'x, T>,
        s: &'c AttentionShape,
        lse: &'c [f32],
        dd: &'c [f32],
        clip: Option<Clip>,
        tile: usize,
    ) -> Self {
        let capped = cx.sc.cap != 0.0;
        BwdStep {
            cx,
            s,
            lse,
            dd,
            clip,
            p: vec![0.0; tile],
            dp: vec![0.0; tile],
            gcap: vec![0.0; if capped { tile } else { 0 }],
            vis: Vec::new(),
        }
    }

    /// `P` (in `p`) and `dS` (in `dp`) of tile `at`, from its query rows `q = (Q, dO)` and key
    /// rows `kv = (K, V)`. `bad`: some of those rows hold NaN or infinity (then `vis` holds the
    /// tile's visible pairs). `db`: the score-bias gradient rows of the tile's queries (row
    /// stride `kv_len`), written at this tile's keys.
    fn run(
        &mut self,
        at: TileAt,
        q: (MatRef<'_>, MatRef<'_>),
        kv: (MatRef<'_>, MatRef<'_>),
        bad: bool,
        db: Option<&mut [f32]>,
    ) {
        let ((qm, dom), (km, vm)) = (q, kv);
        let (cx, s) = (self.cx, self.s);
        let (nb, kn) = (qm.rows, at.kn);
        let row0 = (at.b * s.q_heads + at.h) * s.q_len + at.i0;
        let capped = cx.sc.cap != 0.0;
        let lse = &self.lse[row0..row0 + nb];
        let vis = bad.then_some(&mut self.vis);
        let pm = prob_tile(cx, at, qm, km, lse, &mut self.p, vis, capped.then_some(&mut self.gcap[..]));
        let dpm = &mut self.dp[..nb * kn];
        matmul(dpm, kn, dom, vm.t(), false, Par::Seq);
        dispatch(
            cx.level,
            DsTile {
                p: pm,
                dp: dpm,
                dd: &self.dd[row0..row0 + nb],
                kn,
                c: cx.sc.c,
                clip: self.clip,
                db: db.map(|x| (x, s.kv_len, at.j0, cx.sc.cb)),
                dcap: capped.then(|| &self.gcap[..nb * kn]),
            },
        );
    }
}

/// `acc += Mᵀ·X` for one tile (`m`: `nb × kn` weights, `x`: `nb` rows), where the rows of `x`
/// listed in `bad` (NaN or infinity) are zeroed for the product and their visible pairs added
/// back one by one (see [`zeroed`]).
fn add_mt_x(acc: &mut [f32], m: &MatRef<'_>, x: &MatRef<'_>, bad: &[usize], vis: &[bool], zbuf: &mut Vec<f32>) {
    let (kn, d) = (m.cols, x.cols);
    let xs = zeroed(x, bad, zbuf);
    matmul(acc, d, m.t(), xs, true, Par::Seq);
    for &r in bad {
        for j in (0..kn).filter(|&j| vis[r * kn + j]) {
            let w = m.data[r * kn + j];
            for (a, &y) in acc[j * d..(j + 1) * d].iter_mut().zip(row(x, r)) {
                *a += w * y;
            }
        }
    }
}

/// The backward of one (batch, key/value head) pair over the keys `[j_lo, j_hi)` (a multiple of
/// the key block apart from the end): `dk` and `dv` hold those keys' rows; with `dq` (the
/// group's query heads), also the query gradient and, if given, the rows of the score-bias
/// gradient of those heads.
#[allow(clippy::too_many_arguments)]
fn bwd_head<T: Element>(
    step: &mut BwdStep<'_, '_, T>,
    do_op: &Op<'_, T>,
    b: usize,
    hk: usize,
    j_lo: usize,
    j_hi: usize,
    dq: Option<(&mut [T], Option<&mut [f32]>)>,
    dk: &mut [T],
    dv: &mut [T],
) {
    let (cx, s) = (step.cx, step.s);
    let (d, ql, kl, g) = (s.head_dim, s.q_len, s.kv_len, s.group());
    let (dq, mut d_bias) = match dq {
        Some((q, b)) => (Some(q), b),
        None => (None, None),
    };
    let (bq, bk) = (cx.bq, cx.bk);
    let mut dq_acc = vec![0.0f32; if dq.is_some() { g * ql * d } else { 0 }];
    let mut dk_acc = vec![0.0f32; bk.min(kl) * d];
    let mut dv_acc = vec![0.0f32; bk.min(kl) * d];
    let mut w = vec![0.0f32; if step.clip.is_some() { bq.min(ql) * bk.min(kl) } else { 0 }];
    let (mut kbuf, mut vbuf, mut qbuf, mut dobuf) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut zbuf, mut zbuf2, mut zbuf3) = (Vec::new(), Vec::new(), Vec::new());
    for (j0, kn) in blocks(j_lo, j_hi, j_hi, bk) {
        let (km, vm, kv_bad) = kv_tile(cx, b, hk, j0, kn, d, &mut kbuf, &mut vbuf);
        let dka = &mut dk_acc[..kn * d];
        let dva = &mut dv_acc[..kn * d];
        dka.fill(0.0);
        dva.fill(0.0);
        for hh in 0..g {
            let h = hk * g + hh;
            for (i0, nb) in blocks(0, ql, ql, bq) {
                let (first, last) = (cx.sc.range(i0), cx.sc.range(i0 + nb - 1));
                if first.0 >= j0 + kn || last.1 <= j0 {
                    continue;
                }
                let qm = rows_f32(&cx.q, b, h, i0, nb, d, &mut qbuf);
                let dom = rows_f32(do_op, b, h, i0, nb, d, &mut dobuf);
                let bad = kv_bad || !all_finite(cx.level, &qm) || !all_finite(cx.level, &dom);
                let db = d_bias.as_deref_mut().map(|db| &mut db[(hh * ql + i0) * kl..][..nb * kl]);
                step.run(TileAt { b, h, i0, j0, kn }, (qm, dom), (km, vm), bad, db);
                let pm = &step.p[..nb * kn];
                // dV += Wᵀ dO, with W = P (softmax) or the clipped weights.
                let wm = match step.clip {
                    Some(cl) => {
                        let wt = &mut w[..nb * kn];
                        for (x, &pv) in wt.iter_mut().zip(pm) {
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
                add_mt_x(dva, &wm, &dom, &bad_do, &step.vis, &mut zbuf);
                let dsm = MatRef::row_major(&step.dp[..nb * kn], nb, kn);
                if dq.is_some() {
                    let dqa = &mut dq_acc[(hh * ql + i0) * d..][..nb * d];
                    add_ds_k(dqa, &dsm, &km, &bad_k, &step.vis, &mut zbuf2);
                }
                add_mt_x(dka, &dsm, &qm, &bad_q, &step.vis, &mut zbuf3);
            }
        }
        for (r, (dkr, dvr)) in dka.chunks(d).zip(dva.chunks(d)).enumerate() {
            let o = (j0 - j_lo + r) * d;
            T::store_f32(dkr, &mut dk[o..o + d]);
            T::store_f32(dvr, &mut dv[o..o + d]);
        }
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
fn dq_block<T: Element>(
    step: &mut BwdStep<'_, '_, T>,
    do_op: &Op<'_, T>,
    (b, h, i0): (usize, usize, usize),
    dq: &mut [T],
    mut d_bias: Option<&mut [f32]>,
) {
    let (cx, s) = (step.cx, step.s);
    let (d, kl) = (s.head_dim, s.kv_len);
    let nb = dq.len() / d;
    let hk = h / s.group();
    let mut acc = vec![0.0f32; nb * d];
    let (mut qbuf, mut dobuf, mut kbuf, mut vbuf, mut zbuf) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let qm = rows_f32(&cx.q, b, h, i0, nb, d, &mut qbuf);
    let dom = rows_f32(do_op, b, h, i0, nb, d, &mut dobuf);
    let q_bad = !all_finite(cx.level, &qm) || !all_finite(cx.level, &dom);
    let (first, last) = (cx.sc.range(i0), cx.sc.range(i0 + nb - 1));
    for (j0, kn) in blocks(0, kl, kl, cx.bk) {
        // The key blocks `bwd_head` visits for this query block, and only those.
        if first.0 >= j0 + kn || last.1 <= j0 {
            continue;
        }
        let (km, vm, kv_bad) = kv_tile(cx, b, hk, j0, kn, d, &mut kbuf, &mut vbuf);
        let bad = q_bad || kv_bad;
        step.run(TileAt { b, h, i0, j0, kn }, (qm, dom), (km, vm), bad, d_bias.as_deref_mut());
        let bad_k = if bad { nonfinite_rows(&km) } else { Vec::new() };
        add_ds_k(&mut acc, &MatRef::row_major(&step.dp[..nb * kn], nb, kn), &km, &bad_k, &step.vis, &mut zbuf);
    }
    T::store_f32(&acc, dq);
}

/// `dP ← c · P ⊙ (u − D)` in place (`u = dP`, or the clipped rule's `u`), 0 wherever `P = 0`;
/// with `db = (rows, row stride, first column, 1/τ)`, also the score-bias gradient
/// `P ⊙ (u − D) / τ` of the tile.
struct DsTile<'a> {
    /// The tile's probabilities.
    p: &'a [f32],
    /// `dP = dO·Vᵀ` in, `dS` out.
    dp: &'a mut [f32],
    /// The rows' `D_i`.
    dd: &'a [f32],
    /// Keys in the tile (the row length of `p` and `dp`).
    kn: usize,
    /// `scale/τ`, the chain factor of the scores.
    c: f32,
    clip: Option<Clip>,
    db: Option<(&'a mut [f32], usize, usize, f32)>,
    /// With a soft cap, each score's `1 − tanh²`.
    dcap: Option<&'a [f32]>,
}

impl Task for DsTile<'_> {
    type Output = ();
    #[cfg_attr(not(debug_assertions), inline(always))]
    #[cfg_attr(debug_assertions, inline)]
    fn run<S: Isa>(self, _s: S) {
        let DsTile { p, dp, dd, kn, c, clip, mut db, dcap } = self;
        for (r, ((pr, dr), &di)) in p.chunks(kn).zip(dp.chunks_mut(kn)).zip(dd).enumerate() {
            let mut brow = db.as_mut().map(|(rows, stride, j0, cb)| (&mut rows[r * *stride + *j0..][..kn], *cb));
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
