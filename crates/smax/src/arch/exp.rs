//! `exp` for the softmax domain, after XNNPACK's `rr2-p5` recipe (see `shared/spec/KERNELS.md`
//! §2.1, §2.4): magic-bias rounding, two-constant Cody–Waite range reduction, a degree-5
//! minimax polynomial, and a flush to +0 below the normal range.
//!
//! Measured maximum error on [-87.33654, 0]: see the exhaustive test
//! `exp_exhaustive_ulp` (≤ 2 ULP asserted; the closing note of the core issue records the
//! measured figure).

use super::Isa;

/// 1.5·2^23 + 127: adding it rounds to an integer and leaves `n + 127` in the low mantissa bits.
pub(crate) const MAGIC_BIAS: f32 = f32::from_bits(0x4b40_007f);
pub(crate) const LOG2E: f32 = f32::from_bits(0x3fb8_aa3b);
/// High part of ln 2 (trailing zeros, so `n·LN2_HI` is exact for |n| < 2^9).
pub(crate) const LN2_HI: f32 = f32::from_bits(0x3f31_7200);
pub(crate) const LN2_LO: f32 = f32::from_bits(0x35bf_be8e);
pub(crate) const C1: f32 = f32::from_bits(0x3f7f_fffb);
pub(crate) const C2: f32 = f32::from_bits(0x3eff_fee3);
pub(crate) const C3: f32 = f32::from_bits(0x3e2a_ad40);
pub(crate) const C4: f32 = f32::from_bits(0x3d2b_9d0d);
pub(crate) const C5: f32 = f32::from_bits(0x3c07_cfce);
/// Below this, `exp(x)` is subnormal in f32; the kernel returns +0 there.
pub(crate) const DENORM_CUTOFF: f32 = f32::from_bits(0xc2ae_ac4f);

/// `exp(x)` for `x <= 88.7`, accurate to ≤ 2 ULP on `[-87.33654, 0]`, +0 below, NaN for NaN.
/// Inputs above `88.72` are outside the contract (the softmax kernels only pass `x <= 0`,
/// up to a rounding-level positive excess).
#[cfg_attr(not(debug_assertions), inline(always))]
#[cfg_attr(debug_assertions, inline)]
pub(crate) fn exp<S: Isa>(s: S, x: S::f32s) -> S::f32s {
    let magic = s.splat_f32s(MAGIC_BIAS);
    let n = s.mul_add_f32s(x, s.splat_f32s(LOG2E), magic);
    // 2^n: the low 9 mantissa bits of `n` hold n + 127; shifting them into the exponent
    // field builds the power of two directly.
    let two_n = s.transmute_f32s_u32s(s.wrapping_dyn_shl_u32s(s.transmute_u32s_f32s(n), s.splat_u32s(23)));
    let n = s.sub_f32s(n, magic);
    let t = s.mul_add_f32s(n, s.splat_f32s(-LN2_HI), x);
    let t = s.mul_add_f32s(n, s.splat_f32s(-LN2_LO), t);
    let p = s.mul_add_f32s(s.splat_f32s(C5), t, s.splat_f32s(C4));
    let p = s.mul_add_f32s(p, t, s.splat_f32s(C3));
    let p = s.mul_add_f32s(p, t, s.splat_f32s(C2));
    let p = s.mul_add_f32s(p, t, s.splat_f32s(C1));
    let ts = s.mul_f32s(t, two_n);
    let f = s.mul_add_f32s(ts, p, two_n);
    // NaN compares false and so passes through.
    let tiny = s.less_than_f32s(x, s.splat_f32s(DENORM_CUTOFF));
    s.select_f32s(tiny, s.splat_f32s(0.0), f)
}

/// The reduced form used by the two-pass algorithm: returns `(p, n)` with
/// `exp(x·k) = p · 2^n`, `n = round(x·k·log2 e)` as a float and `p ∈ [2^-0.5, 2^0.5]`
/// (up to polynomial error). The product `x·k` is carried as an unevaluated sum `hi + lo`
/// (`lo` from a fused multiply-add), so its rounding does not reach the result.
/// Valid for `|x·k| < 2^22`; no clamping, no cutoff.
#[cfg_attr(not(debug_assertions), inline(always))]
#[cfg_attr(debug_assertions, inline)]
pub(crate) fn exp_ext<S: Isa>(s: S, x: S::f32s, k: S::f32s) -> (S::f32s, S::f32s) {
    let magic = s.splat_f32s(MAGIC_BIAS);
    let hi = s.mul_f32s(x, k);
    let lo = s.mul_add_f32s(x, k, s.neg_f32s(hi));
    let n = s.sub_f32s(s.mul_add_f32s(hi, s.splat_f32s(LOG2E), magic), magic);
    let t = s.mul_add_f32s(n, s.splat_f32s(-LN2_HI), hi);
    let t = s.add_f32s(t, lo);
    let t = s.mul_add_f32s(n, s.splat_f32s(-LN2_LO), t);
    let p = s.mul_add_f32s(s.splat_f32s(C5), t, s.splat_f32s(C4));
    let p = s.mul_add_f32s(p, t, s.splat_f32s(C3));
    let p = s.mul_add_f32s(p, t, s.splat_f32s(C2));
    let p = s.mul_add_f32s(p, t, s.splat_f32s(C1));
    let p = s.mul_add_f32s(p, t, s.splat_f32s(1.0));
    (p, n)
}

/// `2^d` for integer-valued `d <= 0`; exactly +0 for `d <= -127` (including `-inf`).
#[cfg_attr(not(debug_assertions), inline(always))]
#[cfg_attr(debug_assertions, inline)]
pub(crate) fn pow2_nonpositive<S: Isa>(s: S, d: S::f32s) -> S::f32s {
    let d = s.max_f32s(d, s.splat_f32s(-127.0));
    let b = s.add_f32s(d, s.splat_f32s(MAGIC_BIAS));
    s.transmute_f32s_u32s(s.wrapping_dyn_shl_u32s(s.transmute_u32s_f32s(b), s.splat_u32s(23)))
}

/// Below this magnitude `tanh` uses its odd Taylor polynomial; above, the `exp` form.
const TANH_SMALL: f32 = 0.4;
/// Taylor coefficients of `tanh x = x + x³·(T3 + x²·(T5 + ...))`, through x¹⁵. The first
/// omitted term, `x¹⁷·0.000590`, is below `2.5e-10·|x|` on `|x| < 0.4`.
const TANH_T: [f32; 7] = [
    -1.0 / 3.0,
    2.0 / 15.0,
    -17.0 / 315.0,
    62.0 / 2835.0,
    -1382.0 / 155_925.0,
    21_844.0 / 6_081_075.0,
    -929_569.0 / 638_512_875.0,
];

/// `tanh(x)` for every f32: the odd Taylor polynomial through x¹⁵ for `|x| < 0.4`, else
/// `sign(x)·(1 − e)/(1 + e)` with `e = exp(−2|x|)` (where the subtraction loses at most a
/// factor 1.8 of `exp`'s relative error). `±inf → ±1`, NaN → NaN, `−0 → −0`. The accuracy is
/// asserted by a sampled test against f64 (`tanh_sampled`, ≤ 4 ULP).
#[cfg_attr(not(debug_assertions), inline(always))]
#[cfg_attr(debug_assertions, inline)]
pub(crate) fn tanh<S: Isa>(s: S, x: S::f32s) -> S::f32s {
    let one = s.splat_f32s(1.0);
    let ax = s.abs_f32s(x);
    let e = exp(s, s.mul_f32s(ax, s.splat_f32s(-2.0)));
    let big = s.div_f32s(s.sub_f32s(one, e), s.add_f32s(one, e));
    // Copy the sign of x onto the (non-negative) large-argument result.
    let sign = s.and_f32s(x, s.splat_f32s(-0.0));
    let big = s.or_f32s(big, sign);
    let x2 = s.mul_f32s(x, x);
    let mut p = s.splat_f32s(TANH_T[6]);
    for &c in TANH_T[..6].iter().rev() {
        p = s.mul_add_f32s(p, x2, s.splat_f32s(c));
    }
    // (The sign bit again, for x = −0, where x + x³·p rounds to +0.)
    let small = s.or_f32s(s.mul_add_f32s(s.mul_f32s(x, x2), p, x), sign);
    // NaN compares false and takes the `exp` form, which keeps it NaN.
    s.select_f32s(s.less_than_f32s(ax, s.splat_f32s(TANH_SMALL)), small, big)
}
