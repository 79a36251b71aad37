//! Post-softmax quantizers (ALGORITHMS.md §5, Q1–Q4; NEEDS 24): integer codes for attention
//! probabilities in `[0, 1]`, their reconstruction, and the error of the round trip.
//!
//! Conventions: rounding is half to even (`round_ties_even`); codes saturate at `[0, 2^b − 1]`;
//! inputs outside `[0, 1]` are clamped and counted ([`QuantReport::clamped`]); NaN is an error
//! (a clamp would turn it into a valid-looking code). TanQ (DopQ-ViT, Q5) is not implemented:
//! its mapping was not recovered (`[UNCONFIRMED]` in the spec); [`Quantizer::Companding`] takes
//! any monotone map and its inverse, so it can be added when the formula is confirmed.

use crate::error::{Error, Result};

/// What a zero input becomes in the log quantizers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ZeroMode {
    /// Codes past the last level reconstruct to exactly 0 (the default for probabilities).
    #[default]
    Zero,
    /// `−log2 0 = +inf` clamps to the last code, reconstructing to `Δ·2^{−(2^b − 1)}`.
    ClampToMin,
}

/// How [`Quantizer::Sulq`] reconstructs: `x̂ = 2^e − η` with the exponent `e = q·δ + y_min`
/// rounded (the released code's behaviour) or as computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SulqExponent {
    /// `2^{round(q·δ + y_min)}` (round half to even), as the released code does.
    #[default]
    Rounded,
    /// `2^{q·δ + y_min}`.
    Exact,
}

/// How many levels [`Quantizer::Sulq`] uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SulqLevels {
    /// `2^b` levels, `δ = (y_max − y_min)/(2^b − 1)`.
    #[default]
    Bits,
    /// The released forward pass: `δ = (y_max − y_min)/2^b` and codes up to `2^b` (`2^b + 1`
    /// levels, one more than b bits hold).
    ReleasedCode,
}

/// A quantizer with its parameters (calibrated or given).
#[derive(Clone, Copy)]
pub enum Quantizer {
    /// Uniform asymmetric (Q4, RepQ-ViT's `UniformQuantizer`): `Δ = (max − min)/(2^b − 1)`,
    /// `zp = round(−min/Δ)`, `q = clamp(round(x/Δ) + zp, 0, 2^b − 1)`, `x̂ = (q − zp)·Δ`;
    /// `max = min` reconstructs every value to `min`.
    Uniform {
        /// Bits (1–16).
        bits: u32,
        /// Range minimum.
        min: f64,
        /// Range maximum.
        max: f64,
    },
    /// Unsigned fixed point with scale `1/2^b` and zero point 0 (the deployed u8 softmax:
    /// `q = clamp(round(x·2^b), 0, 2^b − 1)`, so 1.0 saturates to `255/256` at 8 bits).
    FixedPoint {
        /// Bits (1–16).
        bits: u32,
    },
    /// Plain log2 (Q1, FQ-ViT / PTQ4ViT): `q = clamp(round(−log2(x/Δ)), 0, 2^b − 1)`,
    /// `x̂ = Δ·2^{−q}`; zeros follow `zero_mode`.
    Log2 {
        /// Bits (1–16).
        bits: u32,
        /// Scale Δ (1 for probabilities).
        delta: f64,
        /// What zero becomes.
        zero_mode: ZeroMode,
    },
    /// log√2 (Q2, RepQ-ViT `LogSqrt2Quantizer`): `q_raw = round(−2·log2(x/Δ))`,
    /// `q = clamp(q_raw, 0, 2^b − 1)`, `x̂ = Δ·2^{−⌈q/2⌉}·(√2 if q odd)`, and `x̂ = 0` when
    /// `q_raw ≥ 2^b` (the code is then `2^b − 1`, flagged as zero by [`quantize`]).
    LogSqrt2 {
        /// Bits (1–16).
        bits: u32,
        /// Scale Δ (calibrated: see [`calibrate_log_sqrt2`]).
        delta: f64,
    },
    /// Shift-uniform-log2 (Q3, I&S-ViT's released code): `y = log2(x + η)`,
    /// `δ = (y_max − y_min)/(2^b − 1)`, `q = clamp(round((y − y_min)/δ), 0, 2^b − 1)`,
    /// `x̂ = 2^{round(q·δ + y_min)} − η` (with [`SulqExponent::Rounded`]; reconstructions can be
    /// negative). [`SulqLevels::ReleasedCode`] uses the released forward pass instead:
    /// `δ = (y_max − y_min)/2^b` and codes up to `2^b` (`2^b + 1` levels, one more than b bits
    /// hold). Whether the paper
    /// rounds the exponent is `[UNCONFIRMED]`; the default follows the code.
    Sulq {
        /// Bits (1–15).
        bits: u32,
        /// The shift η > 0.
        eta: f64,
        /// `min log2(x + η)` over the calibration set.
        y_min: f64,
        /// `max log2(x + η)` over the calibration set.
        y_max: f64,
        /// Whether the reconstruction exponent is rounded.
        exponent: SulqExponent,
        /// The paper's `2^b` levels or the released forward pass's `2^b + 1`.
        levels: SulqLevels,
    },
    /// A companding quantizer: `q = round(f(x)·(2^b − 1))`, `x̂ = f⁻¹(q/(2^b − 1))`, for a
    /// monotone `f: [0, 1] → [0, 1]` and its inverse (the interface TanQ will use).
    Companding {
        /// Bits (1–16).
        bits: u32,
        /// The forward map.
        f: fn(f64) -> f64,
        /// Its inverse.
        f_inv: fn(f64) -> f64,
    },
}

impl core::fmt::Debug for Quantizer {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Quantizer::Uniform { bits, min, max } => write!(f, "Uniform({bits} bits, [{min}, {max}])"),
            Quantizer::FixedPoint { bits } => write!(f, "FixedPoint({bits} bits)"),
            Quantizer::Log2 { bits, delta, zero_mode } => write!(f, "Log2({bits} bits, Δ {delta}, {zero_mode:?})"),
            Quantizer::LogSqrt2 { bits, delta } => write!(f, "LogSqrt2({bits} bits, Δ {delta})"),
            Quantizer::Sulq { bits, eta, .. } => write!(f, "Sulq({bits} bits, η {eta})"),
            Quantizer::Companding { bits, .. } => write!(f, "Companding({bits} bits)"),
        }
    }
}

/// Round-trip statistics of a [`quantize`] call.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct QuantReport {
    /// Mean squared error `mean((x̂ − x)²)` against the (clamped) input.
    pub mse: f64,
    /// Largest `|x̂ − x|`.
    pub max_abs_err: f64,
    /// Inputs outside `[0, 1]` that were clamped.
    pub clamped: usize,
    /// Values whose code hit the top or bottom of the code range from outside it.
    pub saturated: usize,
}

impl Quantizer {
    fn bits(&self) -> u32 {
        match *self {
            Quantizer::Uniform { bits, .. }
            | Quantizer::FixedPoint { bits }
            | Quantizer::Log2 { bits, .. }
            | Quantizer::LogSqrt2 { bits, .. }
            | Quantizer::Sulq { bits, .. }
            | Quantizer::Companding { bits, .. } => bits,
        }
    }

    fn check(&self) -> Result<()> {
        let b = self.bits();
        let max_bits = if matches!(self, Quantizer::Sulq { levels: SulqLevels::ReleasedCode, .. }) { 15 } else { 16 };
        let bad = |name, v: String, expected| Err(Error::bad_parameter(name, v, expected));
        if !(1..=max_bits).contains(&b) {
            return bad("bits", format!("{b}"), "1 to 16 (15 for SULQ's code-compatible mode)");
        }
        match *self {
            Quantizer::Uniform { min, max, .. } if !(min.is_finite() && max.is_finite() && min <= max) => {
                bad("min/max", format!("[{min}, {max}]"), "finite with min <= max")
            }
            // The step `Δ = (max − min)/(2^b − 1)` must be finite and > 0 unless the range is
            // one point: else every code reconstructs to NaN or ±inf. (With a finite `min` and
            // such a Δ, the zero point `−min/Δ` stays below 2^69.)
            Quantizer::Uniform { min, max, .. }
                if max > min && {
                    let d = (max - min) / ((1u64 << b) - 1) as f64;
                    !(d.is_finite() && d > 0.0)
                } =>
            {
                bad("min/max", format!("[{min}, {max}]"), "a range whose step is finite and nonzero")
            }
            Quantizer::Log2 { delta, .. } | Quantizer::LogSqrt2 { delta, .. }
                if !(delta.is_finite() && delta > 0.0) =>
            {
                bad("delta", format!("{delta}"), "finite and > 0")
            }
            Quantizer::Sulq { eta, y_min, y_max, .. }
                if !(eta.is_finite() && eta > 0.0 && y_min.is_finite() && y_max.is_finite() && y_min <= y_max) =>
            {
                bad("eta/y_min/y_max", format!("{eta}, [{y_min}, {y_max}]"), "η > 0, finite y_min <= y_max")
            }
            Quantizer::Sulq { y_min, y_max, .. } if !(y_max - y_min).is_finite() => {
                bad("y_min/y_max", format!("[{y_min}, {y_max}]"), "a range whose width is finite")
            }
            _ => Ok(()),
        }
    }

    /// The code of one (clamped, non-NaN) value and whether it saturated.
    fn code(&self, x: f64) -> (u32, bool) {
        let top = (1u64 << self.bits()) - 1;
        let clampq = |v: f64, hi: u64| -> (u32, bool) {
            if v < 0.0 {
                (0, true)
            } else if v > hi as f64 {
                (hi as u32, true)
            } else {
                (v as u32, false)
            }
        };
        match *self {
            Quantizer::Uniform { min, max, .. } => {
                if max == min {
                    return (0, false);
                }
                let d = (max - min) / top as f64;
                let zp = (-min / d).round_ties_even();
                clampq((x / d).round_ties_even() + zp, top)
            }
            Quantizer::FixedPoint { bits } => clampq((x * (1u64 << bits) as f64).round_ties_even(), top),
            Quantizer::Log2 { delta, .. } => clampq((-(x / delta).log2()).round_ties_even(), top),
            Quantizer::LogSqrt2 { delta, .. } => clampq((-2.0 * (x / delta).log2()).round_ties_even(), top),
            Quantizer::Sulq { eta, y_min, y_max, levels, .. } => {
                let levels = if levels == SulqLevels::ReleasedCode { top + 1 } else { top };
                let d = (y_max - y_min) / levels as f64;
                if d == 0.0 {
                    return (0, false);
                }
                clampq((((x + eta).log2() - y_min) / d).round_ties_even(), levels)
            }
            Quantizer::Companding { f, .. } => clampq((f(x) * top as f64).round_ties_even(), top),
        }
    }

    /// The reconstruction of a code (`zero`: the log√2 / log2 zero flag).
    fn value(&self, q: u32, zero: bool) -> f64 {
        let top = (1u64 << self.bits()) - 1;
        match *self {
            Quantizer::Uniform { min, max, .. } => {
                if max == min {
                    return min;
                }
                let d = (max - min) / top as f64;
                let zp = (-min / d).round_ties_even();
                (q as f64 - zp) * d
            }
            Quantizer::FixedPoint { bits } => q as f64 / (1u64 << bits) as f64,
            Quantizer::Log2 { delta, .. } => {
                if zero {
                    0.0
                } else {
                    delta * (-(q as f64)).exp2()
                }
            }
            Quantizer::LogSqrt2 { delta, .. } => {
                if zero {
                    0.0
                } else {
                    let half = q.div_ceil(2) as f64;
                    delta * (-half).exp2() * if q % 2 == 1 { core::f64::consts::SQRT_2 } else { 1.0 }
                }
            }
            Quantizer::Sulq { eta, y_min, y_max, exponent, levels, .. } => {
                let levels = if levels == SulqLevels::ReleasedCode { top + 1 } else { top };
                let d = (y_max - y_min) / levels as f64;
                let e = q as f64 * d + y_min;
                let e = if exponent == SulqExponent::Rounded { e.round_ties_even() } else { e };
                e.exp2() - eta
            }
            Quantizer::Companding { f_inv, .. } => f_inv(q as f64 / top as f64),
        }
    }

    /// Whether `x` maps to the explicit zero of the log quantizers.
    fn is_zero(&self, x: f64) -> bool {
        let levels = (1u64 << self.bits()) as f64;
        match *self {
            Quantizer::Log2 { zero_mode: ZeroMode::Zero, delta, .. } => {
                (-(x / delta).log2()).round_ties_even() >= levels
            }
            Quantizer::LogSqrt2 { delta, .. } => (-2.0 * (x / delta).log2()).round_ties_even() >= levels,
            _ => false,
        }
    }
}

/// Quantizes `x` (probabilities) into `codes` (and, when given, `zero` flags for the log
/// quantizers' exact zero), optionally writing the reconstruction `x̂` into `recon`, and
/// reports the round-trip error. All buffers have the length of `x`.
///
/// Errors: NaN input ([`Error::NonFiniteLogit`] naming its index, row 0), buffers of the wrong
/// length, parameters out of range.
pub fn quantize(
    x: &[f32],
    q: &Quantizer,
    codes: &mut [u16],
    zero: Option<&mut [bool]>,
    recon: Option<&mut [f32]>,
) -> Result<QuantReport> {
    q.check()?;
    let n = x.len();
    let lens = [Some(codes.len()), zero.as_ref().map(|z| z.len()), recon.as_ref().map(|r| r.len())];
    for (what, l) in ["codes", "zero", "recon"].iter().zip(lens) {
        if let Some(l) = l {
            if l != n {
                return Err(Error::LengthMismatch { what, len: l, expected: n });
            }
        }
    }
    if let Some(i) = x.iter().position(|v| v.is_nan()) {
        return Err(Error::NonFiniteLogit { row: 0, index: i, value: f64::NAN });
    }
    let (mut zero, mut recon) = (zero, recon);
    let mut rep = QuantReport::default();
    let mut sq = 0.0f64;
    for i in 0..n {
        let raw = x[i] as f64;
        let v = raw.clamp(0.0, 1.0);
        rep.clamped += (v != raw) as usize;
        let (c, sat) = q.code(v);
        let z = q.is_zero(v);
        rep.saturated += (sat && !z) as usize;
        codes[i] = c as u16;
        if let Some(zf) = zero.as_deref_mut() {
            zf[i] = z;
        }
        let xh = q.value(c, z);
        if let Some(r) = recon.as_deref_mut() {
            r[i] = xh as f32;
        }
        let e = xh - v;
        sq += e * e;
        rep.max_abs_err = rep.max_abs_err.max(e.abs());
    }
    rep.mse = if n > 0 { sq / n as f64 } else { 0.0 };
    Ok(rep)
}

/// Reconstructs values from `codes` (and the zero flags of [`quantize`], if any) into `out`.
pub fn dequantize(codes: &[u16], zero: Option<&[bool]>, q: &Quantizer, out: &mut [f32]) -> Result<()> {
    q.check()?;
    if out.len() != codes.len() {
        return Err(Error::LengthMismatch { what: "out", len: out.len(), expected: codes.len() });
    }
    if let Some(z) = zero {
        if z.len() != codes.len() {
            return Err(Error::LengthMismatch { what: "zero", len: z.len(), expected: codes.len() });
        }
    }
    let top = (1u64 << q.bits()) - 1;
    let levels = if matches!(q, Quantizer::Sulq { levels: SulqLevels::ReleasedCode, .. }) { top + 1 } else { top };
    for (i, (o, &c)) in out.iter_mut().zip(codes).enumerate() {
        if c as u64 > levels {
            return Err(Error::bad_parameter("codes", format!("{c} at {i}"), "codes within the quantizer's range"));
        }
        *o = q.value(c as u32, zero.is_some_and(|z| z[i])) as f32;
    }
    Ok(())
}

/// (`sorted` is non-empty, from `nonempty_finite`, and `pct ∈ [0, 1]`: `lo ≤ hi < len`.)
fn quantile(sorted: &[f64], pct: f64) -> f64 {
    let pos = pct * (sorted.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
}

fn mse_of(x: &[f32], q: &Quantizer) -> Result<f64> {
    let mut codes = vec![0u16; x.len()];
    Ok(quantize(x, q, &mut codes, None, None)?.mse)
}

fn nonempty_finite(x: &[f32]) -> Result<Vec<f64>> {
    if x.is_empty() {
        return Err(Error::bad_parameter("calibration set", "empty", "at least one value"));
    }
    if let Some(i) = x.iter().position(|v| v.is_nan()) {
        return Err(Error::NonFiniteLogit { row: 0, index: i, value: f64::NAN });
    }
    let mut s: Vec<f64> = x.iter().map(|&v| (v as f64).clamp(0.0, 1.0)).collect();
    s.sort_by(|a, b| a.total_cmp(b));
    Ok(s)
}

/// RepQ-ViT's Δ calibration for [`Quantizer::LogSqrt2`] (Q2): Δ = the pct-quantile (linear
/// interpolation) of the calibration values for pct ∈ {0.999, 0.9999, 0.99999}, and the
/// fallback Δ = max, keeping the one with the smallest mean squared reconstruction error
/// (earlier candidates win ties). Returns the calibrated quantizer.
pub fn calibrate_log_sqrt2(calib: &[f32], bits: u32) -> Result<Quantizer> {
    let s = nonempty_finite(calib)?;
    let max = s[s.len() - 1].max(f64::MIN_POSITIVE);
    let mut best = Quantizer::LogSqrt2 { bits, delta: max };
    let mut best_e = mse_of(calib, &best)?;
    for pct in [0.999, 0.9999, 0.99999] {
        let d = quantile(&s, pct);
        if d > 0.0 {
            let q = Quantizer::LogSqrt2 { bits, delta: d };
            let e = mse_of(calib, &q)?;
            if e < best_e {
                best = q;
                best_e = e;
            }
        }
    }
    Ok(best)
}

/// I&S-ViT's SULQ calibration (Q3): for each η in {0.001, 0.005, 0.01, 0.02, 0.03, 0.04, 0.05,
/// 0.1, 0.2, 0.5, 1.0}, `y_min`/`y_max` of `log2(x + η)` over the calibration values, keeping
/// the η with the smallest mean squared reconstruction error (earlier wins ties).
pub fn calibrate_sulq(calib: &[f32], bits: u32, exponent: SulqExponent, levels: SulqLevels) -> Result<Quantizer> {
    let s = nonempty_finite(calib)?;
    let mut best: Option<(Quantizer, f64)> = None;
    for eta in [0.001, 0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.1, 0.2, 0.5, 1.0] {
        let q = Quantizer::Sulq {
            bits,
            eta,
            y_min: (s[0] + eta).log2(),
            y_max: (s[s.len() - 1] + eta).log2(),
            exponent,
            levels,
        };
        let e = mse_of(calib, &q)?;
        if best.as_ref().is_none_or(|b| e < b.1) {
            best = Some((q, e));
        }
    }
    best.map(|b| b.0).ok_or(Error::bad_parameter("calibration set", "empty", "at least one value"))
}
