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

/// `ln 2` split for Cody–Waite reduction (fdlibm's constants): `LN2_HI` has 32 significant
/// bits, so `n·LN2_HI` is exact for `|n| < 2^21`.
const LN2_HI_F64: f64 = f64::from_bits(0x3fe6_2e42_fee0_0000);
const LN2_LO_F64: f64 = f64::from_bits(0x3dea_39ef_3579_3c76);
/// 1.5·2^52: adding it rounds an f64 of magnitude below 2^51 to an integer held in the low
/// mantissa bits.
const SHIFTER_F64: f64 = 6_755_399_441_055_744.0;
/// Below this, `exp` is under 2^−1021 and [`exp64`] returns +0.
const EXP64_FLOOR: f64 = -708.0;

/// `exp(x)` in f64 for `x ≤ 0`, branch-free so that a loop of it vectorizes inside a
/// [`dispatch`] region: Cody–Waite reduction `x = n·ln 2 + r` with `|r| ≤ ln 2 / 2`, the Taylor
/// polynomial of degree 12 in Horner form (truncation below `2e-16` relative), and `2^n` built
/// from the exponent bits. Plain multiplies and adds (no fused multiply-add), so every level
/// gives the same bits. `+0` below −708 (where `exp(x) < 2^−1021`) and for `-inf`; the
/// relative error against libm is asserted by the test `exp64_matches_libm` (≤ 1e-14).
#[cfg_attr(not(debug_assertions), inline(always))]
#[cfg_attr(debug_assertions, inline)]
pub(crate) fn exp64(x: f64) -> f64 {
    const C: [f64; 13] = [
        1.0,
        1.0,
        1.0 / 2.0,
        1.0 / 6.0,
        1.0 / 24.0,
        1.0 / 120.0,
        1.0 / 720.0,
        1.0 / 5040.0,
        1.0 / 40_320.0,
        1.0 / 362_880.0,
        1.0 / 3_628_800.0,
        1.0 / 39_916_800.0,
        1.0 / 479_001_600.0,
    ];
    let low = x < EXP64_FLOOR;
    let xc = if low { EXP64_FLOOR } else { x };
    let k = xc * core::f64::consts::LOG2_E + SHIFTER_F64;
    let n = k - SHIFTER_F64;
    let r = (xc - n * LN2_HI_F64) - n * LN2_LO_F64;
    let mut p = C[12];
    for &c in C[..12].iter().rev() {
        p = p * r + c;
    }
    // n + 1023 in [1, 1023]: a normal power of two.
    let e = (k.to_bits().wrapping_sub(SHIFTER_F64.to_bits()) as i64 + 1023) as u64;
    let v = p * f64::from_bits(e << 52);
    if low { 0.0 } else { v }
}

struct ExpSum<'a> {
    t: &'a [f64],
    m: f64,
    e: &'a mut [f64],
}

impl Task for ExpSum<'_> {
    type Output = f64;
    #[cfg_attr(not(debug_assertions), inline(always))]
    #[cfg_attr(debug_assertions, inline)]
    fn run<S: Isa>(self, _s: S) -> f64 {
        let ExpSum { t, m, e } = self;
        // Two loops that vectorize: the map (no reduction in it), then eight running sums.
        for (&tv, ev) in t.iter().zip(e.iter_mut()) {
            *ev = exp64(tv - m);
        }
        let mut acc = [0.0f64; 8];
        let mut ec = e.chunks_exact(8);
        for c in &mut ec {
            for j in 0..8 {
                acc[j] += c[j];
            }
        }
        for (j, &v) in ec.remainder().iter().enumerate() {
            acc[j] += v;
        }
        ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]))
    }
}

/// `e_i = exp(t_i − m)` by [`exp64`] for every `t_i` (`-inf` gives 0), and returns `Σ e_i` (eight
/// running sums, combined in a fixed order). `t_i ≤ m`. Relative error of the sum against the
/// sequential libm sum: at most `1e-13 + 2·n·2^−53`.
pub(crate) fn exp_sum_f64(level: SimdLevel, t: &[f64], m: f64, e: &mut [f64]) -> f64 {
    dispatch(level, ExpSum { t, m, e })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp64_matches_libm() {
        let mut worst = 0.0f64;
        let mut x = 0.0f64;
        while x > -708.0 {
            for d in [0.0, 1e-7, 0.3466, 0.5, core::f64::consts::LN_2] {
                let y = x - d;
                if y < -708.0 {
                    continue;
                }
                let want = y.exp();
                let rel = ((exp64(y) - want) / want).abs();
                worst = worst.max(rel);
            }
            x -= 0.013_7;
        }
        assert!(worst <= 1e-14, "exp64 relative error {worst:e}");
        assert_eq!(exp64(-708.5), 0.0);
        assert_eq!(exp64(f64::NEG_INFINITY), 0.0);
        assert_eq!(exp64(0.0), 1.0);
        assert_eq!(exp64(-0.0), 1.0);
        // Every level: the same bits, and the documented sum bound.
        let t: Vec<f64> =
            (0..1003).map(|i| if i % 17 == 3 { f64::NEG_INFINITY } else { -(i as f64) * 0.037 }).collect();
        let exact: f64 = t.iter().map(|v| v.exp()).sum();
        let mut first: Option<(f64, Vec<f64>)> = None;
        for level in SimdLevel::available() {
            let mut e = vec![0.0; t.len()];
            let s = exp_sum_f64(level, &t, 0.0, &mut e);
            assert!(((s - exact) / exact).abs() <= 1e-13 + 2.0 * t.len() as f64 * f64::EPSILON / 2.0);
            match &first {
                None => first = Some((s, e)),
                Some((s0, e0)) => {
                    assert_eq!(s.to_bits(), s0.to_bits(), "{level:?}");
                    assert!(e.iter().zip(e0).all(|(a, b)| a.to_bits() == b.to_bits()), "{level:?}");
                }
            }
        }
    }
}
