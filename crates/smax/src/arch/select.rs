//! The sampler's vector passes over a row of f32 logits: one scan for the facts every filter
//! needs (max, invalid entries, masked count), and a block gate that hands the caller only the
//! blocks holding an entry at or above a moving threshold (the candidate search of top-k and
//! min-p; the exact decisions stay in the caller, in f64).

use super::rows::{load_padded, max};
use super::{Ahead, Isa, SimdLevel, Task, dispatch, inl};

/// Elements per gated block: one maximum over it decides whether the caller looks inside.
pub(crate) const GATE_BLOCK: usize = 64;

/// What [`scan`] reports of a row.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct RowFacts {
    /// The largest entry (`-inf` for an empty or fully masked row); meaningless when `invalid`.
    pub max: f32,
    /// Some entry is NaN or `+inf`.
    pub invalid: bool,
    /// Entries equal to `-inf`.
    pub masked: usize,
}

struct Scan<'a>(&'a [f32]);

impl Task for Scan<'_> {
    type Output = RowFacts;
    #[cfg_attr(not(debug_assertions), inline(always))]
    #[cfg_attr(debug_assertions, inline)]
    fn run<S: Isa>(self, s: S) -> RowFacts {
        let ninf = s.splat_f32s(f32::NEG_INFINITY);
        let inf = s.splat_f32s(f32::INFINITY);
        let (zero, one) = (s.splat_f32s(0.0), s.splat_f32s(1.0));
        let mut fm = RowFacts { max: f32::NEG_INFINITY, invalid: false, masked: 0 };
        // Blocks of at most 2^20 elements keep the per-lane f32 counts exact (< 2^24).
        for blk in self.0.chunks(1 << 20) {
            let (head, tail) = S::as_simd_f32s(blk);
            let (mut mx, mut bad, mut masked) = (ninf, zero, zero);
            // `v < inf` is false exactly for NaN and +inf.
            let step = inl(
                #[cfg_attr(not(debug_assertions), inline(always))]
                #[cfg_attr(debug_assertions, inline)]
                |v: S::f32s, mx: S::f32s, bad: S::f32s, masked: S::f32s| {
                    (
                        s.max_f32s(mx, v),
                        s.add_f32s(bad, s.select_f32s(s.less_than_f32s(v, inf), zero, one)),
                        s.add_f32s(masked, s.select_f32s(s.equal_f32s(v, ninf), one, zero)),
                    )
                },
            );
            for &v in head {
                (mx, bad, masked) = step(v, mx, bad, masked);
            }
            if !tail.is_empty() {
                // Padding with -inf: counted as masked below, then taken off.
                let v = load_padded(s, tail, f32::NEG_INFINITY);
                (mx, bad, masked) = step(v, mx, bad, masked);
            }
            let pad = if tail.is_empty() { 0 } else { S::F32_LANES - tail.len() };
            fm.max = fm.max.max(s.reduce_max_f32s(mx));
            fm.invalid |= s.reduce_sum_f32s(bad) != 0.0;
            fm.masked += s.reduce_sum_f32s(masked) as usize - pad;
        }
        fm
    }
}

/// The row's [`RowFacts`] in one vector pass.
pub(crate) fn scan(level: SimdLevel, x: &[f32]) -> RowFacts {
    dispatch(level, Scan(x))
}

struct Gate<'a, F> {
    x: &'a [f32],
    thr: f32,
    visit: F,
}

impl<F: FnMut(usize, &[f32], f32) -> Option<f32>> Task for Gate<'_, F> {
    type Output = Option<f32>;
    #[cfg_attr(not(debug_assertions), inline(always))]
    #[cfg_attr(debug_assertions, inline)]
    fn run<S: Isa>(self, s: S) -> Option<f32> {
        let Gate { x, mut thr, mut visit } = self;
        for (b, blk) in x.chunks(GATE_BLOCK).enumerate() {
            if max(s, blk, Ahead::NONE) >= thr {
                thr = visit(b * GATE_BLOCK, blk, thr)?;
            }
        }
        Some(thr)
    }
}

/// Calls `visit(start, block, thr)` for every block of [`GATE_BLOCK`] elements whose maximum is
/// at least the current threshold `thr` (starting at `thr0`); `visit` returns the new
/// threshold, or `None` to stop (then `gate` returns `None`). Returns the final threshold.
/// Blocks are visited in order; a block whose entries are all below `thr` is skipped (rows
/// reach the gate after [`scan`] found no NaN in them).
/// `visit` runs inside the vector region: callers give it the kernels' inlining attribute (see [`inl`]).
pub(crate) fn gate(
    level: SimdLevel,
    x: &[f32],
    thr0: f32,
    visit: impl FnMut(usize, &[f32], f32) -> Option<f32>,
) -> Option<f32> {
    dispatch(level, Gate { x, thr: thr0, visit })
}
