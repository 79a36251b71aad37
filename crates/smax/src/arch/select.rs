//! The sampler's vector passes over a row of f32 logits: one scan for the facts every filter
//! needs (max, invalid entries, masked count), and a block gate that hands the caller only the
//! blocks holding an entry at or above a moving threshold (the candidate search of top-k and
//! min-p; the exact decisions stay in the caller, in f64).

use super::exp::exp;
use super::rows::{BLOCK, load_padded, max};
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

/// Thresholds of [`tail_mass`].
pub(crate) const TAILS: usize = 5;

/// What [`tail_mass`] reports of a row.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct TailMass {
    /// `Σ e_i` over the row, `e_i` the f32 `exp((x_i − m)·k)`.
    pub total: f64,
    /// `Σ e_i` over the entries below each threshold (`x_i < thr[j]`).
    pub below: [f64; TAILS],
    /// A bound on the relative rounding error of each of these sums as computed from the
    /// `e_i` (f32 blocks of [`BLOCK`] elements, each at most `BLOCK/lanes` additions per lane
    /// plus a horizontal sum of at most `lanes − 1`, then f64 additions).
    pub sum_rel: f64,
}

struct Tail<'a> {
    x: &'a [f32],
    m: f32,
    k: f32,
    thr: [f32; TAILS],
}

impl Task for Tail<'_> {
    type Output = TailMass;
    #[cfg_attr(not(debug_assertions), inline(always))]
    #[cfg_attr(debug_assertions, inline)]
    fn run<S: Isa>(self, s: S) -> TailMass {
        let Tail { x, m, k, thr } = self;
        let (mv, kv, zero) = (s.splat_f32s(m), s.splat_f32s(k), s.splat_f32s(0.0));
        let th: [S::f32s; TAILS] = core::array::from_fn(|j| s.splat_f32s(thr[j]));
        let lanes = S::F32_LANES as f64;
        let blocks = x.len().div_ceil(BLOCK) as f64;
        let sum_rel = (BLOCK as f64 / lanes + lanes) * f64::from(f32::EPSILON) / 2.0 * 1.01 + blocks * f64::EPSILON;
        let mut out = TailMass { total: 0.0, below: [0.0; TAILS], sum_rel };
        let step = inl(
            #[cfg_attr(not(debug_assertions), inline(always))]
            #[cfg_attr(debug_assertions, inline)]
            |v: S::f32s, acc: &mut S::f32s, b: &mut [S::f32s; TAILS]| {
                // -inf (masked or padding) gives e = +0 and adds nothing.
                let e = exp(s, s.mul_f32s(s.sub_f32s(v, mv), kv));
                *acc = s.add_f32s(*acc, e);
                for j in 0..TAILS {
                    // The select of the sum (not of the addend) compiles to a masked add.
                    b[j] = s.select_f32s(s.less_than_f32s(v, th[j]), s.add_f32s(b[j], e), b[j]);
                }
            },
        );
        for blk in x.chunks(BLOCK) {
            let (head, tail) = S::as_simd_f32s(blk);
            let (mut acc, mut b) = (zero, [zero; TAILS]);
            for &v in head {
                step(v, &mut acc, &mut b);
            }
            if !tail.is_empty() {
                step(load_padded(s, tail, f32::NEG_INFINITY), &mut acc, &mut b);
            }
            out.total += f64::from(s.reduce_sum_f32s(acc));
            for j in 0..TAILS {
                out.below[j] += f64::from(s.reduce_sum_f32s(b[j]));
            }
        }
        out
    }
}

/// One vector pass of `e_i = exp((x_i − m)·k)` in f32 (the ≤ 2 ULP `exp` of the softmax
/// kernels; +0 below its normal range and for `-inf`), summed over the row and over the entries
/// below each of `thr` (see [`TailMass`]). `x_i ≤ m`, no NaN.
pub(crate) fn tail_mass(level: SimdLevel, x: &[f32], m: f32, k: f32, thr: [f32; TAILS]) -> TailMass {
    dispatch(level, Tail { x, m, k, thr })
}

struct Collect<'a> {
    x: &'a [f32],
    thr: f32,
    out: &'a mut Vec<u32>,
}

impl Task for Collect<'_> {
    type Output = ();
    #[cfg_attr(not(debug_assertions), inline(always))]
    #[cfg_attr(debug_assertions, inline)]
    fn run<S: Isa>(self, s: S) {
        let Collect { x, thr, out } = self;
        let tv = s.splat_f32s(thr);
        let (head, tail) = S::as_simd_f32s(x);
        let lanes = S::F32_LANES;
        let at = inl(
            #[cfg_attr(not(debug_assertions), inline(always))]
            #[cfg_attr(debug_assertions, inline)]
            |v: S::f32s| u64::from(s.mask_bits(s.less_than_or_equal_f32s(tv, v))),
        );
        // Four vectors' masks in one word: one loop exit to mispredict per four vectors.
        let mut quads = head.chunks_exact(4);
        for (q, c) in (&mut quads).enumerate() {
            let mut bits = at(c[0]) | at(c[1]) << lanes | at(c[2]) << (2 * lanes) | at(c[3]) << (3 * lanes);
            let base = q * 4 * lanes;
            while bits != 0 {
                out.push((base + bits.trailing_zeros() as usize) as u32);
                bits &= bits - 1;
            }
        }
        let done = head.len() - quads.remainder().len();
        for (j, &v) in quads.remainder().iter().enumerate() {
            let base = (done + j) * lanes;
            let mut bits = at(v);
            while bits != 0 {
                out.push((base + bits.trailing_zeros() as usize) as u32);
                bits &= bits - 1;
            }
        }
        let base = head.len() * S::F32_LANES;
        for (j, &v) in tail.iter().enumerate() {
            if v >= thr {
                out.push((base + j) as u32);
            }
        }
    }
}

/// Appends to `out` the index of every entry `x_i ≥ thr`, ascending (from each vector's compare
/// mask, one push per set bit). `x.len() ≤ 2^32`.
pub(crate) fn collect_at_least(level: SimdLevel, x: &[f32], thr: f32, out: &mut Vec<u32>) {
    dispatch(level, Collect { x, thr, out })
}

struct ExpSumRow<'a> {
    x: &'a [f32],
    m: f64,
    temp: f64,
}

impl Task for ExpSumRow<'_> {
    type Output = f64;
    #[cfg_attr(not(debug_assertions), inline(always))]
    #[cfg_attr(debug_assertions, inline)]
    fn run<S: Isa>(self, _s: S) -> f64 {
        let ExpSumRow { x, m, temp } = self;
        let mut acc = [0.0f64; 8];
        let mut ch = x.chunks_exact(8);
        // `(x − m)/1` is `x − m` exactly: the same bits without the divisions.
        let unit = temp == 1.0;
        let t = inl(
            #[cfg_attr(not(debug_assertions), inline(always))]
            #[cfg_attr(debug_assertions, inline)]
            |v: f32| if unit { f64::from(v) - m } else { (f64::from(v) - m) / temp },
        );
        for c in &mut ch {
            for j in 0..8 {
                acc[j] += exp64(t(c[j]));
            }
        }
        for (j, &v) in ch.remainder().iter().enumerate() {
            acc[j] += exp64(t(v));
        }
        ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]))
    }
}

/// `Σ exp64((x_i − m)/temp)` over an f32 row in f64, `t_i = (x_i − m)/temp` formed exactly as the
/// sampler forms it (`x_i ≤ m`; `-inf` adds 0). Same bound as [`exp_sum_f64`]: within
/// `1e-13 + 2·n·2^−53` (relative) of the sequential libm sum.
pub(crate) fn exp_sum_row(level: SimdLevel, x: &[f32], m: f64, temp: f64) -> f64 {
    dispatch(level, ExpSumRow { x, m, temp })
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

    #[test]
    fn top_p_passes_match_plain_loops_on_every_level_and_length() {
        let mut st = 0x2545_f491_4f6c_dd1du64;
        let mut uni = || {
            st ^= st << 13;
            st ^= st >> 7;
            st ^= st << 17;
            (st >> 11) as f64 / (1u64 << 53) as f64
        };
        for n in (0..70).chain([255, 256, 257, 1000, 4099]) {
            let x: Vec<f32> =
                (0..n).map(|i| if i % 13 == 5 { f32::NEG_INFINITY } else { ((uni() - 0.5) * 60.0) as f32 }).collect();
            let m = x.iter().copied().fold(f32::NEG_INFINITY, f32::max).max(-1e30);
            let k = 0.8f32;
            let thr = [m - 2.0, m - 5.0, m - 8.0, m - 11.0, m - 30.0];
            // Plain f64 references.
            let e = |v: f32| ((f64::from(v) - f64::from(m)) * f64::from(k)).exp();
            let total: f64 = x.iter().map(|&v| e(v)).sum();
            let want_idx: Vec<u32> = (0..n as u32).filter(|&i| x[i as usize] >= thr[1]).collect();
            let row_m = f64::from(m);
            let exact: f64 = x.iter().map(|&v| ((f64::from(v) - row_m) / 1.25).exp()).sum();
            for level in SimdLevel::available() {
                let tm = tail_mass(level, &x, m, k, thr);
                // f32 terms: 2 ULP exp, three roundings of t (|t| ≤ 48 here), the block sums.
                let rel = 2f64.powi(-22) + 3.1 * 2f64.powi(-24) * 48.0 + tm.sum_rel;
                assert!((tm.total - total).abs() <= rel * total + 1e-30, "{level:?} n={n} total");
                for j in 0..TAILS {
                    let b: f64 = x.iter().filter(|&&v| v < thr[j]).map(|&v| e(v)).sum();
                    assert!((tm.below[j] - b).abs() <= rel * b + 1e-30, "{level:?} n={n} below {j}");
                }
                let mut idx = Vec::new();
                collect_at_least(level, &x, thr[1], &mut idx);
                assert_eq!(idx, want_idx, "{level:?} n={n} collect");
                let s = exp_sum_row(level, &x, row_m, 1.25);
                assert!(
                    (s - exact).abs() <= (1e-13 + 2.0 * n as f64 * f64::EPSILON) * exact,
                    "{level:?} n={n} row sum"
                );
            }
        }
    }

    #[test]
    fn mask_bits_reads_every_lane() {
        struct Bits(Vec<f32>);
        impl Task for Bits {
            type Output = Vec<u32>;
            fn run<S: Isa>(self, s: S) -> Vec<u32> {
                let (head, _) = S::as_simd_f32s(&self.0);
                head.iter().map(|&v| s.mask_bits(s.less_than_f32s(v, s.splat_f32s(0.5)))).collect()
            }
        }
        let x: Vec<f32> = (0..64u32).map(|i| ((i * 37 + i / 3) % 5) as f32 / 4.0).collect();
        for level in SimdLevel::available() {
            let got = dispatch(level, Bits(x.clone()));
            let lanes = x.len() / got.len().max(1);
            for (c, &bits) in got.iter().enumerate() {
                let want = (0..lanes).fold(0u32, |acc, j| acc | (((x[c * lanes + j] < 0.5) as u32) << j));
                assert_eq!(bits, want, "{level:?} vector {c}");
            }
        }
    }
}
