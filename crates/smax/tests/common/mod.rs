//! Shared test helpers: an f64 reference written from the formulas (not from the kernels),
//! a deterministic generator, and the documented error bounds.
#![allow(dead_code)]

use smax::Element;

pub const U32: f64 = 1.0 / (1u64 << 24) as f64; // f32 unit roundoff
pub const U64: f64 = 1.0 / (1u64 << 53) as f64;

/// xorshift64*; deterministic.
pub struct Rng(pub u64);
impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// Uniform in [-1, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 52) as f64 - 1.0
    }
    pub fn vec(&mut self, n: usize, scale: f64) -> Vec<f64> {
        (0..n).map(|_| self.uniform() * scale).collect()
    }
}

/// Neumaier-compensated sum (the reference must be more accurate than the f64 kernels).
pub fn fsum(it: impl IntoIterator<Item = f64>) -> f64 {
    let (mut s, mut c) = (0.0f64, 0.0f64);
    for v in it {
        let t = s + v;
        c += if s.abs() >= v.abs() { (s - t) + v } else { (v - t) + s };
        s = t;
    }
    s + c
}

/// Reference row statistics in f64 (`x` already at the element type's precision).
pub fn ref_lse(x: &[f64], tau: f64) -> f64 {
    if x.iter().any(|v| v.is_nan()) {
        return f64::NAN;
    }
    if x.contains(&f64::INFINITY) {
        return f64::INFINITY;
    }
    let m = x.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    if m == f64::NEG_INFINITY {
        return f64::NEG_INFINITY;
    }
    let s = fsum(x.iter().map(|&v| ((v - m) / tau).exp()));
    m / tau + s.ln()
}

pub fn ref_softmax(x: &[f64], tau: f64) -> Vec<f64> {
    let m = x.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let s = fsum(x.iter().map(|&v| ((v - m) / tau).exp()));
    x.iter().map(|&v| ((v - m) / tau).exp() / s).collect()
}

pub fn ref_log_softmax(x: &[f64], tau: f64) -> Vec<f64> {
    let m = x.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let s = fsum(x.iter().map(|&v| ((v - m) / tau).exp()));
    x.iter().map(|&v| (v - m) / tau - s.ln()).collect()
}

pub fn ref_softmax_bwd(y: &[f64], g: &[f64], tau: f64) -> Vec<f64> {
    let d = fsum(y.iter().zip(g).map(|(a, b)| a * b));
    y.iter().zip(g).map(|(a, b)| a * (b - d) / tau).collect()
}

pub fn ref_log_softmax_bwd(y: &[f64], g: &[f64], tau: f64) -> Vec<f64> {
    let s = fsum(g.iter().copied());
    y.iter().zip(g).map(|(a, b)| (b - a.exp() * s) / tau).collect()
}

/// Final rounding of the element type (relative) and its absolute floor near zero.
pub fn rounding<T: Element>() -> (f64, f64) {
    match T::NAME {
        "f32" => (0.0, 2f64.powi(-125)),
        "f64" => (0.0, 1e-300),
        "f16" => (2f64.powi(-11), 2f64.powi(-24)),
        _ => (2f64.powi(-8), 2f64.powi(-125)),
    }
}

pub fn unit<T: Element>() -> f64 {
    if T::NAME == "f64" { U64 } else { U32 }
}

/// The documented softmax bound for element `i`.
pub fn softmax_bound<T: Element>(y: f64, d: f64, n: usize) -> f64 {
    let (r, a) = rounding::<T>();
    let u = unit::<T>();
    let ln_n = (n.max(1) as f64).ln();
    (80.0 + 2.0 * d + 2.0 * ln_n) * u * y + r * y + a
}

/// The documented log-softmax bound.
pub fn log_softmax_bound<T: Element>(l: f64, d: f64, n: usize) -> f64 {
    let (r, _) = rounding::<T>();
    let u = unit::<T>();
    let ln_n = (n.max(1) as f64).ln();
    2.0 * u * (d + l.abs()) + (80.0 + 2.0 * ln_n) * u + r * l.abs()
}

/// The documented logsumexp bound.
pub fn lse_bound<T: Element>(l: f64, n: usize) -> f64 {
    let (r, _) = rounding::<T>();
    let u = unit::<T>();
    let ln_n = (n.max(1) as f64).ln();
    3.0 * u * l.abs() + (80.0 + 4.0 * ln_n) * u + r * l.abs()
}

/// NaN-aware closeness: NaN must match NaN, infinities must match exactly.
pub fn close(got: f64, want: f64, tol: f64) -> bool {
    if want.is_nan() || got.is_nan() {
        return want.is_nan() && got.is_nan();
    }
    if want.is_infinite() || got.is_infinite() {
        return got == want;
    }
    (got - want).abs() <= tol
}

pub fn to_t<T: Element>(v: &[f64]) -> Vec<T> {
    v.iter().map(|&x| T::from_f64(x)).collect()
}

pub fn to_f64<T: Element>(v: &[T]) -> Vec<f64> {
    v.iter().map(|x| x.to_f64()).collect()
}
