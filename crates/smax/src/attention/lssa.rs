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
        let n = lssa_block(&cx, &shape, (b, h, i0), l.len(), lssa, o);
        uniform.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
    });
    Ok(LssaStats { uniform_rows: uniform.into_inner() })
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
