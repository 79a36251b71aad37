//! The scores `s = c·q·k (+ bias/τ)`, soft cap and masks of one query row, as every attention
//! kernel prepares them.

use super::*;

/// Validated, resolved masking and scaling: everything the kernels need per score.
#[derive(Clone, Copy)]
pub(crate) struct Scores<'a> {
    /// Multiplier of `q·k`: `scale/τ` (the chain-rule factor of `q·k` without a soft cap).
    pub c: f32,
    /// The score scale.
    pub scale: f32,
    /// Soft cap (0 for none).
    pub cap: f32,
    /// Multiplier of the bias: `1/τ`.
    pub cb: f32,
    /// Keys per head.
    pub kv_len: usize,
    /// Causal mask: query `i` sees keys `j ≤ position(i)`.
    pub causal: bool,
    /// The key position of query 0 (see [`Scores::position`]).
    pub offset: i64,
    /// Sliding window around `position(i)`.
    pub window: Option<Window>,
    /// Additive bias, scaled by `cb`.
    pub bias: Option<ScoreBias<'a>>,
    /// Boolean keep mask.
    pub keep: Option<KeepMask<'a>>,
}

/// `x` as i64, saturating (lengths past i64::MAX are positions past every key).
fn wide(x: usize) -> i64 {
    i64::try_from(x).unwrap_or(i64::MAX)
}

/// The key position of query 0 under `positions` for `q_len` queries and `kv_len` keys.
pub(crate) fn query_offset(positions: QueryPositions, q_len: usize, kv_len: usize) -> i64 {
    match positions {
        QueryPositions::BottomRight => wide(kv_len).saturating_sub(wide(q_len)),
        QueryPositions::Offset(x) => x,
    }
}

/// The key position of query `i`, `i + offset`, saturating at the ends of i64.
pub(crate) fn position_of(i: usize, offset: i64) -> i64 {
    wide(i).saturating_add(offset)
}

/// The keys `[lo, hi)` that `causal` and `window` allow for a query at key position `p`.
pub(crate) fn key_range(causal: bool, window: Option<Window>, p: i64, kv_len: usize) -> (usize, usize) {
    let n = wide(kv_len);
    let mut lo = 0i64;
    let mut hi = n;
    if causal {
        hi = hi.min(p.saturating_add(1));
    }
    if let Some(w) = window {
        lo = lo.max(p.saturating_sub(wide(w.left)));
        hi = hi.min(p.saturating_add(wide(w.right)).saturating_add(1));
    }
    let lo = lo.clamp(0, n) as usize;
    let hi = hi.clamp(0, n) as usize;
    (lo, hi.max(lo))
}

impl Scores<'_> {
    /// The key position of query `i`, `i + offset`, saturating at the ends of i64 (masks and
    /// position rules read it from here only).
    #[inline]
    pub fn position(&self, i: usize) -> i64 {
        position_of(i, self.offset)
    }

    /// The keys `[lo, hi)` that causal and window allow for query `i`.
    #[inline]
    pub fn range(&self, i: usize) -> (usize, usize) {
        key_range(self.causal, self.window, self.position(i), self.kv_len)
    }

    /// Turns raw products `q_i·k_j` for keys `j0..j0+row.len()` into scores, in place:
    /// `-inf` outside the visible range or where `keep` is false, `(cap(x·scale) + bias)/τ`
    /// inside (`cap(t) = t` without a soft cap). With a soft cap and `dcap`, also writes
    /// `1 − tanh²(x·scale/cap)` there (the backward's chain factor). Returns the visible range
    /// relative to `j0`.
    #[cfg_attr(not(debug_assertions), inline(always))]
    #[cfg_attr(debug_assertions, inline)]
    pub fn prep_row<S: crate::arch::Isa>(
        &self,
        s: S,
        (b, h, i): (usize, usize, usize),
        j0: usize,
        row: &mut [f32],
        dcap: Option<&mut [f32]>,
    ) -> (usize, usize) {
        let n = row.len();
        let (lo, hi) = self.range(i);
        let lo = lo.clamp(j0, j0 + n) - j0;
        let hi = hi.clamp(j0, j0 + n) - j0;
        let hi = hi.max(lo);
        row[..lo].fill(f32::NEG_INFINITY);
        row[hi..].fill(f32::NEG_INFINITY);
        if self.cap != 0.0 {
            let g = dcap.map(|g| &mut g[lo..hi]);
            crate::arch::rows::softcap_inplace(s, self.scale, self.cap, &mut row[lo..hi], g);
            let cb = self.cb;
            if cb != 1.0 {
                for v in &mut row[lo..hi] {
                    *v *= cb;
                }
            }
        } else {
            let c = self.c;
            for v in &mut row[lo..hi] {
                *v *= c;
            }
        }
        if let Some(bias) = self.bias {
            let o = bias.strides.at(b, h, i) + j0;
            let cb = self.cb;
            for (v, &bv) in row[lo..hi].iter_mut().zip(&bias.data[o + lo..o + hi]) {
                *v += bv * cb;
            }
        }
        if let Some(keep) = self.keep {
            let o = keep.strides.at(b, h, i) + j0;
            for (v, &kp) in row[lo..hi].iter_mut().zip(&keep.data[o + lo..o + hi]) {
                if !kp {
                    *v = f32::NEG_INFINITY;
                }
            }
        }
        (lo, hi)
    }
}

fn check_score_tensor(what: &'static str, len: usize, st: ScoreStrides, s: &AttentionShape) -> Result<()> {
    if s.batch == 0 || s.q_heads == 0 || s.q_len == 0 || s.kv_len == 0 {
        return Ok(());
    }
    let last = (s.batch - 1)
        .checked_mul(st.batch)
        .and_then(|a| (s.q_heads - 1).checked_mul(st.head).and_then(|b| a.checked_add(b)))
        .and_then(|a| (s.q_len - 1).checked_mul(st.query).and_then(|b| a.checked_add(b)))
        .and_then(|a| a.checked_add(s.kv_len));
    match last {
        Some(n) if n <= len => Ok(()),
        Some(n) => Err(Error::BufferTooShort { what, len, needed: n }),
        None => Err(Error::SizeOverflow { what, shape: s.describe() }),
    }
}

/// Validates the options against a shape and resolves them.
pub(crate) fn scores<'a>(s: &AttentionShape, o: &AttentionOptions<'a>) -> Result<Scores<'a>> {
    let scale = o.scale.unwrap_or(1.0 / (s.head_dim.max(1) as f32).sqrt());
    if !scale.is_finite() {
        return Err(Error::bad_parameter("scale", scale, "finite"));
    }
    let t = o.temperature as f32;
    if !(o.temperature.is_finite() && o.temperature > 0.0 && t.is_finite() && t > 0.0 && (1.0 / t).is_finite()) {
        return Err(Error::bad_parameter("temperature", t, "finite and > 0, with 1/temperature finite"));
    }
    // The kernels multiply `q·k` by `scale/τ`, or the capped `c·tanh(q·k·scale/c)` by `1/τ`:
    // the factor, or the largest capped score over τ, must be finite in f32.
    let cap = match o.softcap {
        None if (scale / t).is_finite() => 0.0,
        None => return Err(Error::bad_parameter("scale", scale, "finite, with scale/temperature finite in f32")),
        Some(c) if c.is_finite() && c > 0.0 && (c / t).is_finite() => c,
        Some(c) => {
            return Err(Error::bad_parameter("softcap", c, "finite and > 0, with softcap/temperature finite in f32"));
        }
    };
    if let Some(b) = o.bias {
        check_score_tensor("bias", b.data.len(), b.strides, s)?;
    }
    if let Some(k) = o.keep {
        check_score_tensor("keep", k.data.len(), k.strides, s)?;
    }
    let offset = query_offset(o.positions, s.q_len, s.kv_len);
    Ok(Scores {
        c: scale / t,
        scale,
        cap,
        cb: 1.0 / t,
        kv_len: s.kv_len,
        causal: o.causal,
        offset,
        window: o.window,
        bias: o.bias,
        keep: o.keep,
    })
}
