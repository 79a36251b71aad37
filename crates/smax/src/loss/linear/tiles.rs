//! The tile tasks of the linear cross-entropy: a logit tile's online statistics (forward) and
//! its gradient (backward).

use super::*;

/// Forward work on some rows of a tile: bias, cap, and the merge into each row's state.
pub(super) struct TileFwd<'a> {
    pub(super) t: &'a mut [f32],
    pub(super) vb: usize,
    pub(super) bias: Option<&'a [f32]>,
    pub(super) xf: Xform,
    pub(super) st: &'a mut [Tok],
    pub(super) y: &'a [i64],
    pub(super) j0: usize,
    pub(super) smooth: bool,
}

impl Task for TileFwd<'_> {
    type Output = ();
    #[cfg_attr(not(debug_assertions), inline(always))]
    #[cfg_attr(debug_assertions, inline)]
    fn run<S: Isa>(self, s: S) {
        let TileFwd { t, vb, bias, xf, st, y, j0, smooth } = self;
        for (r, (row, tok)) in t.chunks_mut(vb).zip(st.iter_mut()).enumerate() {
            prep_row(s, row, bias, xf);
            let m = k::max(s, row, Ahead::NONE);
            let yr = y[r];
            if yr >= j0 as i64 && yr < (j0 + vb) as i64 {
                tok.ty = row[yr as usize - j0];
            }
            if smooth {
                let mut acc = 0.0f64;
                let mut mx = f32::NEG_INFINITY;
                k::sum_and_max(s, row, row, &mut acc, &mut mx, Ahead::NONE, Ahead::NONE);
                tok.sum_t += acc;
            }
            // `k::max` does not promise to see a NaN: a row whose max is not finite is scanned
            // for one, so a NaN row is NaN here as in `cross_entropy` (a finite max lets the
            // NaN reach the sum below).
            if m.is_nan() || (!m.is_finite() && row.iter().any(|v| v.is_nan())) {
                tok.nan = true;
                continue;
            }
            if m == f32::NEG_INFINITY {
                continue;
            }
            if m == f32::INFINITY {
                tok.m = f32::INFINITY;
                continue;
            }
            let mut d = 0.0f64;
            k::sum_exp(s, row, m, 1.0, &mut d, Ahead::NONE);
            if d.is_nan() {
                tok.nan = true;
                continue;
            }
            // Merge (m, d) into the running state, guarding −inf − (−inf).
            if tok.m == f32::INFINITY {
                continue;
            }
            if m > tok.m {
                tok.s = if tok.m == f32::NEG_INFINITY { d } else { tok.s * ((tok.m - m) as f64).exp() + d };
                tok.m = m;
            } else {
                tok.s += d * ((m - tok.m) as f64).exp();
            }
        }
    }
}

/// `row = cap(row + bias)`.
#[cfg_attr(not(debug_assertions), inline(always))]
#[cfg_attr(debug_assertions, inline)]
fn prep_row<S: Isa>(s: S, row: &mut [f32], bias: Option<&[f32]>, xf: Xform) {
    if let Some(b) = bias {
        for (o, &bv) in row.iter_mut().zip(b) {
            *o += bv;
        }
    }
    if xf.cap != 0.0 {
        let mut buf = [0.0f32; crate::loss::ce::TILE];
        for c in row.chunks_mut(crate::loss::ce::TILE) {
            let n = c.len();
            buf[..n].copy_from_slice(c);
            k::xform(s, xf, &buf[..n], c);
        }
    }
}

#[derive(Clone, Copy)]
pub(super) struct GradConsts {
    pub(super) xf: Xform,
    pub(super) cap64: f64,
    pub(super) scale: f64,
    pub(super) z_scale: f64,
    pub(super) lambda: f64,
    pub(super) alpha: f64,
    pub(super) beta: f64,
    pub(super) big_u: f64,
    pub(super) ignore: i64,
    /// Measure the filter on the gradient before the soft cap's chain factor (CCE's code
    /// compares `p − onehot`, then applies the chain factor); only set with a cap and a filter.
    pub(super) pre_chain: bool,
}

/// Backward work on some rows of a tile: the tile becomes `∂loss/∂logits` in place; returns the
/// largest magnitude of the gradient before the soft cap's chain factor (for filtering; equal
/// to the largest of the tile without a cap).
pub(super) struct TileBwd<'a> {
    pub(super) t: &'a mut [f32],
    pub(super) vb: usize,
    pub(super) bias: Option<&'a [f32]>,
    pub(super) st: &'a [Tok],
    pub(super) y: &'a [i64],
    pub(super) j0: usize,
    pub(super) c: GradConsts,
}

impl Task for TileBwd<'_> {
    type Output = f32;
    #[cfg_attr(not(debug_assertions), inline(always))]
    #[cfg_attr(debug_assertions, inline)]
    fn run<S: Isa>(self, s: S) -> f32 {
        let TileBwd { t, vb, bias, st, y, j0, c } = self;
        let mut mx = 0.0f32;
        for (r, (row, tok)) in t.chunks_mut(vb).zip(st.iter()).enumerate() {
            let lse = tok.lse;
            if y[r] == c.ignore || !lse.is_finite() {
                // Ignored tokens and tokens whose logits are all −inf get a zero gradient;
                // a NaN or +inf logit (a NaN loss) gets a NaN one, as in `cross_entropy`.
                let bad = y[r] != c.ignore && (lse.is_nan() || lse == f64::INFINITY);
                row.fill(if bad { f32::NAN } else { 0.0 });
                continue;
            }
            prep_row(s, row, bias, c.xf);
            let a = c.scale * c.big_u + c.z_scale * 2.0 * c.lambda * lse;
            let b = (c.scale * c.beta) as f32;
            let sub = if c.beta != 0.0 { k::Sub::Const(b) } else { k::Sub::None };
            // p = exp(t − lse) = exp(t − m)·(1/s): m = lse, c1 = a.
            let lse32 = lse as f32;
            let corr = (lse - lse32 as f64).exp();
            let c1 = (a / corr) as f32;
            let mut buf = [0.0f32; crate::loss::ce::TILE];
            for (ci, ch) in row.chunks_mut(crate::loss::ce::TILE).enumerate() {
                let n = ch.len();
                buf[..n].copy_from_slice(ch);
                // The tile already holds capped logits: the gradient kernel's chain factor
                // takes the cap from `xf`.
                k::ce_grad(s, &buf[..n], ch, lse32, c1, sub, c.xf);
                let yr = y[r] as usize;
                let off = j0 + ci * crate::loss::ce::TILE;
                if (off..off + n).contains(&yr) {
                    let ty = buf[yr - off] as f64;
                    let ch_y = if c.cap64 == 0.0 {
                        1.0
                    } else {
                        let q = ty / c.cap64;
                        (1.0 - q * q).max(0.0)
                    };
                    ch[yr - off] -= (c.scale * c.alpha * ch_y) as f32;
                }
                if c.pre_chain {
                    // Before the chain factor a non-target entry is `f(t) = a·exp(t − lse) − s·β`,
                    // monotone in the capped logit `t`, so its largest magnitude over the chunk
                    // is at the chunk's smallest or largest non-target logit; the target entry
                    // is `f(t_y) − s·α`.
                    let yi = (off..off + n).contains(&yr).then(|| yr - off);
                    let (mut lo, mut hi) = (f32::INFINITY, f32::NEG_INFINITY);
                    for (i, &t) in buf[..n].iter().enumerate() {
                        if Some(i) != yi {
                            lo = lo.min(t);
                            hi = hi.max(t);
                        }
                    }
                    let f = |t: f32| a * (t as f64 - lse).exp() - c.scale * c.beta;
                    if lo <= hi {
                        mx = mx.max(f(lo).abs().max(f(hi).abs()) as f32);
                    }
                    if let Some(i) = yi {
                        mx = mx.max((f(buf[i]) - c.scale * c.alpha).abs() as f32);
                    }
                } else {
                    for &g in ch.iter() {
                        mx = mx.max(g.abs());
                    }
                }
            }
        }
        mx
    }
}
