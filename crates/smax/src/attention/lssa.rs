//! Softplus attention with length scaling and re-weighting (A4, LSSA / LSSAR; N7's stable
//! softplus).

use super::tile::{
    Checked, OnlineTile, RowState, Rows, accumulate_pv, all_finite, blocks, check, for_blocks, hidden, products,
    rows_f32,
};
use super::{AttentionInputs, AttentionOptions, AttentionShape, AttnElement, check_out};
use crate::arch::dispatch;
use crate::arch::gemm::MatRef;
use crate::element::Element;
use crate::error::{Error, Result};
use crate::options::defaults;

defaults! {
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
        pub reweight: Option<f32> = Some(15.0),
        /// Positions that use offset 0 (default 3).
        pub offset_rows: usize = 3,
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
    check_lssa(&shape, lssa, opts)?;
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
        let n = lssa_block(&cx, &shape, (b, h, i0), l.len(), lssa, o);
        uniform.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
    });
    Ok(LssaStats { uniform_rows: uniform.into_inner() })
}

/// What the forward and the backward refuse: the options that do not apply, `head_dim < 2`,
/// a re-weighting power that is not finite and positive.
fn check_lssa(shape: &AttentionShape, lssa: &Lssa, opts: &AttentionOptions<'_>) -> Result<()> {
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
    Ok(())
}

/// `x / max(‖x‖, 1e-12)` into `dst`.
fn normalize_into(x: &[f32], dst: &mut [f32]) {
    let n = x.iter().map(|v| (*v as f64) * (*v as f64)).sum::<f64>().sqrt().max(1e-12);
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

/// One query block of LSSA / LSSAR: the normalised queries, each row's visible-key count `N_i`
/// and scale `s_i`, and the key range any row sees.
struct Block<'c, 'x, T> {
    cx: &'c Checked<'x, T>,
    b: usize,
    h: usize,
    i0: usize,
    qn: Vec<f32>,
    count: Vec<usize>,
    scale: Vec<f32>,
    lo: usize,
    hi: usize,
}

impl<'c, 'x, T: Element> Block<'c, 'x, T> {
    fn new(cx: &'c Checked<'x, T>, s: &AttentionShape, (b, h, i0): (usize, usize, usize), nb: usize) -> Self {
        let d = s.head_dim;
        let sc = &cx.sc;
        let ln_d = (d as f64).ln();
        let count: Vec<usize> = (0..nb)
            .map(|r| {
                let (lo, hi) = sc.range(i0 + r);
                match sc.keep {
                    None => hi - lo,
                    Some(kp) => {
                        let o = kp.strides.at(b, h, i0 + r);
                        kp.data[o + lo..o + hi].iter().filter(|&&x| x).count()
                    }
                }
            })
            .collect();
        let scale = count.iter().map(|&n| if n == 0 { 0.0 } else { (ln_d * (n as f64).ln()) as f32 }).collect();
        Block {
            cx,
            b,
            h,
            i0,
            qn: normalized_rows(&cx.q, b, h, i0, nb, d),
            count,
            scale,
            lo: sc.range(i0).0,
            hi: sc.range(i0 + nb - 1).1,
        }
    }

    fn rows(&self) -> usize {
        self.count.len()
    }

    /// The key blocks of the pass, aligned to the key tile.
    fn key_blocks(&self, s: &AttentionShape) -> impl Iterator<Item = (usize, usize)> {
        let bk = self.cx.bk;
        blocks(self.lo / bk * bk, self.hi, s.kv_len, bk)
    }

    /// One tile of softplus weights `softplus(s_i c_ij)` (0 where masked) into `sm`, the visible
    /// pairs into `vis`.
    fn tile(&self, s: &AttentionShape, (j0, kn): (usize, usize), sm: &mut [f32], vis: &mut Vec<bool>) {
        let (d, sc) = (s.head_dim, &self.cx.sc);
        let nb = self.rows();
        let kn_rows = normalized_rows(&self.cx.k, self.b, self.h / s.group(), j0, kn, d);
        let km = MatRef::row_major(&kn_rows, kn, d);
        let sm = products(MatRef::row_major(&self.qn, nb, d), km, sm);
        let vis = hidden(vis, nb * kn);
        for (r, rw) in sm.chunks_mut(kn).enumerate() {
            sc.prep_row(pulp::Scalar::new(), (self.b, self.h, self.i0 + r), j0, rw, None);
            for (j, x) in rw.iter_mut().enumerate() {
                let visible = *x != f32::NEG_INFINITY;
                vis[r * kn + j] = visible;
                *x = if visible { softplus(self.scale[r] * *x) } else { 0.0 };
            }
        }
    }

    /// `acc += W·V` for the tile's weights `sm` (the visible pairs in `vis`).
    /// `vbuf` holds the value rows widened to f32 (non-f32 types), reused across tiles.
    fn add_values(
        &self,
        s: &AttentionShape,
        (j0, kn): (usize, usize),
        (acc, sm, vis): (&mut [f32], &[f32], &[bool]),
        vbuf: &mut Vec<f32>,
    ) {
        let vm = rows_f32(&self.cx.v, self.b, self.h / s.group(), j0, kn, s.head_dim, vbuf);
        let bad = !all_finite(self.cx.level, &vm);
        accumulate_pv(acc, sm, &vm, bad.then_some(vis));
    }

    /// `out_r = acc_r / den_r` (0 for a row that sees nothing), on the rows `keep` selects.
    fn finish(&self, d: usize, acc: &[f32], den: &[f64], out: &mut [T], keep: impl Fn(usize) -> bool) {
        let mut tmp = vec![0.0f32; d];
        for r in (0..self.rows()).filter(|&r| keep(r)) {
            let o = &mut out[r * d..(r + 1) * d];
            if den[r] == 0.0 || self.count[r] == 0 {
                o.fill(T::from_f32(0.0));
                continue;
            }
            let inv = 1.0 / den[r];
            for (t, &x) in tmp.iter_mut().zip(&acc[r * d..(r + 1) * d]) {
                *t = (x as f64 * inv) as f32;
            }
            T::store_f32(&tmp, o);
        }
    }
}

/// One query block of LSSA / LSSAR; returns the number of uniform LSSAR rows.
fn lssa_block<T: Element>(
    cx: &Checked<'_, T>,
    s: &AttentionShape,
    at: (usize, usize, usize),
    nb: usize,
    lssa: &Lssa,
    out: &mut [T],
) -> usize {
    let (d, bk) = (s.head_dim, cx.bk);
    let blk = Block::new(cx, s, at, nb);
    let mut sbuf = vec![0.0f32; nb * bk.min(s.kv_len).max(1)];
    let (mut vis, mut vbuf) = (Vec::new(), Vec::new());
    // Pass 1: S_i = Σ softplus, and (LSSA) acc = Σ softplus · v.
    let mut ssum = vec![0.0f64; nb];
    let mut acc = vec![0.0f32; nb * d];
    let want_lssa = lssa.reweight.is_none();
    for kb in blk.key_blocks(s) {
        let sm = &mut sbuf[..nb * kb.1];
        blk.tile(s, kb, sm, &mut vis);
        for (r, rw) in sm.chunks(kb.1).enumerate() {
            ssum[r] += rw.iter().map(|&x| x as f64).sum::<f64>();
        }
        if want_lssa {
            blk.add_values(s, kb, (&mut acc, sm, &vis), &mut vbuf);
        }
    }
    let Some(p) = lssa.reweight else {
        blk.finish(d, &acc, &ssum, out, |_| true);
        return 0;
    };
    let st = lssar_pass(&blk, s, lssa.offset_rows, p, &ssum, &mut sbuf);
    // Rows with no positive entry (and some visible key) fall back to their LSSA row.
    let uniform: Vec<bool> = (0..nb).map(|r| blk.count[r] > 0 && st.m[r] == f32::NEG_INFINITY).collect();
    let n_uniform = uniform.iter().filter(|&&x| x).count();
    blk.finish(d, &st.acc, &st.l, out, |_| true);
    if n_uniform > 0 {
        let mut acc = vec![0.0f32; nb * d];
        for kb in blk.key_blocks(s) {
            let sm = &mut sbuf[..nb * kb.1];
            blk.tile(s, kb, sm, &mut vis);
            blk.add_values(s, kb, (&mut acc, sm, &vis), &mut vbuf);
        }
        blk.finish(d, &acc, &ssum, out, |r| uniform[r]);
    }
    n_uniform
}

/// Pass 2 (LSSAR): the online softmax over `z_ij = p·ln(N_i·A_ij − o_i)` on the positive
/// entries, given the pass-1 sums `ssum`.
fn lssar_pass<T: Element>(
    blk: &Block<'_, '_, T>,
    s: &AttentionShape,
    offset_rows: usize,
    p: f32,
    ssum: &[f64],
    sbuf: &mut [f32],
) -> RowState {
    let (d, sc) = (s.head_dim, &blk.cx.sc);
    let nb = blk.rows();
    let mut st = RowState::new(nb, d);
    let (mut vis, mut vbuf) = (Vec::new(), Vec::new());
    for kb in blk.key_blocks(s) {
        let (j0, kn) = kb;
        let sm = &mut sbuf[..nb * kn];
        blk.tile(s, kb, sm, &mut vis);
        for (r, rw) in sm.chunks_mut(kn).enumerate() {
            // 1-based position ≤ offset_rows, i.e. 0-based < offset_rows (in i128: neither side wraps).
            let off = if (sc.position(blk.i0 + r) as i128) < offset_rows as i128 { 0.0 } else { 1.0 };
            let nn = blk.count[r] as f64;
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
        let rows = Rows::Block { h: blk.h, i0: blk.i0, n: nb };
        dispatch(blk.cx.level, OnlineTile { sc: None, b: blk.b, rows, j0, kn, d, t: &mut *sm, st: &mut st, vis: None });
        blk.add_values(s, kb, (&mut st.acc, sm, &vis), &mut vbuf);
    }
    st
}

/// The backward pass of [`attention_lssa`] (LSSA and LSSAR): from the upstream gradient
/// `d_out` (`[batch, q_heads, q_len, head_dim]`, contiguous) the gradients of the queries, keys
/// and values into `grads` (contiguous `bhsd`; `d_bias` must be `None`). Per query row, in
/// f64, with the row's weights recomputed (O(kv_len) memory per row):
///
/// - `dv_j += w_ij·dO_i`, `dw_ij = dO_i·v_j`;
/// - LSSAR: `z_ij = p·ln u_ij` with `u_ij = N_i·A_ij − o_i` on the positive entries `P_i`, so
///   `dA_ij = N_i·(p/u_ij)·w_ij(dw_ij − Σ_l w_il dw_il)` on `P_i` (0 elsewhere); a row with no
///   positive entry is its LSSA row (the forward's fallback) and takes `dA = dw`;
/// - `A_ij = sp_ij/Σ_l sp_il`: `dsp_ij = (dA_ij − Σ_l A_il dA_il)/Σ_l sp_il`;
/// - `sp = softplus(x)`, `x_ij = s_i·c_ij`: `dc_ij = dsp_ij·σ(x_ij)·s_i` (`s_i = ln d·ln N_i`
///   depends on the count of visible keys only);
/// - `c_ij = q̂_i·k̂_j` and `x̂ = x/max(‖x‖, 1e−12)`: `dq_i = (dq̂_i − q̂_i(q̂_i·dq̂_i))/‖q_i‖`
///   (`dq̂_i/1e−12` where the floor is active), the same for the keys after their sums over
///   every query row and query head of the group.
///
/// Masks as the forward; masked pairs and rows with no visible key pass no gradient.
/// Returns the forward's [`LssaStats`] (uniform LSSAR rows). Tested against finite differences
/// of an f64 forward. Errors: as [`attention_lssa`], and gradient buffers of the wrong size.
pub fn attention_lssa_backward<T: AttnElement>(
    inputs: AttentionInputs<'_, T>,
    d_out: &[T],
    grads: super::AttentionGrads<'_, T>,
    opts: &AttentionOptions<'_, Lssa>,
) -> Result<LssaStats> {
    let AttentionInputs { shape, q, k, v } = inputs;
    let (lssa, base) = (&opts.variant, &opts.base());
    check_lssa(&shape, lssa, base)?;
    if grads.d_bias.is_some() {
        return Err(Error::Unsupported { what: "d_bias", why: "softplus attention takes no score bias" });
    }
    let cx = check(&shape, q, k, v, base)?;
    check_out("d_out", d_out.len(), shape.out_len())?;
    let super::AttentionGrads { dq, dk, dv, .. } = grads;
    check_out("dq", dq.len(), shape.out_len())?;
    check_out("dk", dk.len(), shape.kv_len_elems())?;
    check_out("dv", dv.len(), shape.kv_len_elems())?;
    for g in [&mut *dq, &mut *dk, &mut *dv] {
        g.fill(T::from_f32(0.0));
    }
    let (d, ql, kl) = (shape.head_dim, shape.q_len, shape.kv_len);
    if shape.out_len() == 0 || kl == 0 {
        return Ok(LssaStats::default());
    }
    let grp = shape.group();
    // One task per (batch, KV head): it owns that head's dk, dv and its query heads' dq.
    let tasks: Vec<(usize, (&mut [T], (&mut [T], &mut [T])))> =
        dq.chunks_mut(grp * ql * d).zip(dk.chunks_mut(kl * d).zip(dv.chunks_mut(kl * d))).enumerate().collect();
    let uniform = std::sync::atomic::AtomicUsize::new(0);
    crate::par::for_each(cx.par, tasks, |_, (bg, (dqg, (dkg, dvg)))| {
        let (b, g) = (bg / shape.kv_heads, bg % shape.kv_heads);
        let n = lssa_backward_group(&cx, &shape, lssa, d_out, (b, g), dqg, dkg, dvg);
        uniform.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
    });
    Ok(LssaStats { uniform_rows: uniform.into_inner() })
}

/// `(x̂, ‖x‖)` of one row in f64 (`x̂ = x/max(‖x‖, 1e−12)`).
fn unit64<T: Element>(x: &[T]) -> (Vec<f64>, f64) {
    let v: Vec<f64> = x.iter().map(|t| t.to_f64()).collect();
    let n = v.iter().map(|a| a * a).sum::<f64>().sqrt();
    let f = n.max(1e-12);
    (v.iter().map(|a| a / f).collect(), n)
}

/// `dx = (dx̂ − x̂(x̂·dx̂))/‖x‖`, or `dx̂/1e−12` where the norm floor is active.
fn unit_backward(xh: &[f64], norm: f64, dxh: &[f64], out: &mut [f64]) {
    if norm <= 1e-12 {
        for (o, g) in out.iter_mut().zip(dxh) {
            *o = g / 1e-12;
        }
        return;
    }
    let dot: f64 = xh.iter().zip(dxh).map(|(a, b)| a * b).sum();
    for ((o, g), x) in out.iter_mut().zip(dxh).zip(xh) {
        *o = (g - x * dot) / norm;
    }
}

/// One (batch, KV head) group of [`attention_lssa_backward`]; returns its uniform LSSAR rows.
#[allow(clippy::too_many_arguments)]
fn lssa_backward_group<T: Element>(
    cx: &Checked<'_, T>,
    s: &AttentionShape,
    lssa: &Lssa,
    d_out: &[T],
    (b, g): (usize, usize),
    dq: &mut [T],
    dk: &mut [T],
    dv: &mut [T],
) -> usize {
    let (d, ql, kl, grp) = (s.head_dim, s.q_len, s.kv_len, s.group());
    let sc = &cx.sc;
    let ln_d = (d as f64).ln();
    let keys: Vec<(Vec<f64>, f64)> = (0..kl).map(|j| unit64(cx.k.row(b, g, j, d))).collect();
    let vals: Vec<Vec<f64>> = (0..kl).map(|j| cx.v.row(b, g, j, d).iter().map(|t| t.to_f64()).collect()).collect();
    let (mut dkh, mut dv64) = (vec![0.0f64; kl * d], vec![0.0f64; kl * d]);
    let mut uniform = 0;
    let sigmoid = |x: f64| 1.0 / (1.0 + (-x).exp());
    let sp = |x: f64| x.max(0.0) + (-x.abs()).exp().ln_1p();
    for hq in 0..grp {
        let h = g * grp + hq;
        for i in 0..ql {
            let (lo, hi) = sc.range(i);
            let vis: Vec<usize> =
                (lo..hi).filter(|&j| sc.keep.is_none_or(|kp| kp.data[kp.strides.at(b, h, i) + j])).collect();
            if vis.is_empty() {
                continue;
            }
            let nn = vis.len() as f64;
            let scale = ln_d * nn.ln();
            let (qh, qn) = unit64(cx.q.row(b, h, i, d));
            let go: Vec<f64> = d_out[((b * s.q_heads + h) * ql + i) * d..][..d].iter().map(|t| t.to_f64()).collect();
            let x: Vec<f64> =
                vis.iter().map(|&j| scale * qh.iter().zip(&keys[j].0).map(|(a, c)| a * c).sum::<f64>()).collect();
            let spv: Vec<f64> = x.iter().map(|&x| sp(x)).collect();
            let tot: f64 = spv.iter().sum();
            let a: Vec<f64> = spv.iter().map(|v| v / tot).collect();
            // The weights (LSSAR, or LSSA) and dL/dA.
            let dw: Vec<f64> = vis.iter().map(|&j| go.iter().zip(&vals[j]).map(|(p, q)| p * q).sum()).collect();
            let (w, da) = match lssa.reweight {
                None => (a.clone(), dw.clone()),
                Some(p) => {
                    let p = p as f64;
                    let off = if (sc.position(i) as i128) < lssa.offset_rows as i128 { 0.0 } else { 1.0 };
                    let u: Vec<f64> = a.iter().map(|&a| nn * a - off).collect();
                    let z: Vec<f64> = u.iter().map(|&u| if u > 0.0 { p * u.ln() } else { f64::NEG_INFINITY }).collect();
                    let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    if m == f64::NEG_INFINITY {
                        uniform += 1;
                        (a.clone(), dw.clone())
                    } else {
                        let e: Vec<f64> = z.iter().map(|&z| (z - m).exp()).collect();
                        let t: f64 = e.iter().sum();
                        let w: Vec<f64> = e.iter().map(|v| v / t).collect();
                        let wd: f64 = w.iter().zip(&dw).map(|(a, b)| a * b).sum();
                        let da = (0..w.len())
                            .map(|l| if u[l] > 0.0 { nn * p / u[l] * w[l] * (dw[l] - wd) } else { 0.0 })
                            .collect();
                        (w, da)
                    }
                }
            };
            for (l, &j) in vis.iter().enumerate() {
                for (o, &gv) in dv64[j * d..(j + 1) * d].iter_mut().zip(&go) {
                    *o += w[l] * gv;
                }
            }
            let ad: f64 = a.iter().zip(&da).map(|(x, y)| x * y).sum();
            let mut dqh = vec![0.0f64; d];
            for (l, &j) in vis.iter().enumerate() {
                let dc = (da[l] - ad) / tot * sigmoid(x[l]) * scale;
                if dc == 0.0 {
                    continue;
                }
                for t in 0..d {
                    dqh[t] += dc * keys[j].0[t];
                    dkh[j * d + t] += dc * qh[t];
                }
            }
            let mut dqi = vec![0.0f64; d];
            unit_backward(&qh, qn, &dqh, &mut dqi);
            for (o, &v) in dq[(hq * ql + i) * d..][..d].iter_mut().zip(&dqi) {
                *o = T::from_f64(v);
            }
        }
    }
    let mut dkj = vec![0.0f64; d];
    for j in 0..kl {
        unit_backward(&keys[j].0, keys[j].1, &dkh[j * d..(j + 1) * d], &mut dkj);
        for (o, &v) in dk[j * d..(j + 1) * d].iter_mut().zip(&dkj) {
            *o = T::from_f64(v);
        }
        for (o, &v) in dv[j * d..(j + 1) * d].iter_mut().zip(&dv64[j * d..(j + 1) * d]) {
            *o = T::from_f64(v);
        }
    }
    uniform
}
