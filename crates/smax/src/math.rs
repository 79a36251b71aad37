//! The elementary kernel underneath the normalisers, exposed for testing and reuse.

use crate::arch::{Isa, SimdLevel, Task, dispatch};
use crate::error::{Error, Result};

#[derive(Clone, Copy)]
enum Fun {
    Exp,
    Tanh,
}

struct MapTask<'a> {
    f: Fun,
    x: &'a [f32],
    y: &'a mut [f32],
}

#[cfg_attr(not(debug_assertions), inline(always))]
#[cfg_attr(debug_assertions, inline)]
fn apply<S: Isa>(s: S, f: Fun, v: S::f32s) -> S::f32s {
    match f {
        Fun::Exp => crate::arch::exp::exp(s, v),
        Fun::Tanh => crate::arch::exp::tanh(s, v),
    }
}

impl Task for MapTask<'_> {
    type Output = ();
    #[cfg_attr(not(debug_assertions), inline(always))]
    #[cfg_attr(debug_assertions, inline)]
    fn run<S: Isa>(self, s: S) {
        let (xh, xt) = S::as_simd_f32s(self.x);
        let n = xh.len() * S::F32_LANES;
        let (yh, _) = S::as_mut_simd_f32s(&mut self.y[..n]);
        for (o, &v) in yh.iter_mut().zip(xh) {
            *o = apply(s, self.f, v);
        }
        for (o, &v) in self.y[n..].iter_mut().zip(xt) {
            *o = apply(pulp::Scalar::new(), self.f, v);
        }
    }
}

fn map(f: Fun, x: &[f32], y: &mut [f32], level: Option<SimdLevel>) -> Result<()> {
    if y.len() != x.len() {
        return Err(Error::BufferTooShort { what: "output", len: y.len(), needed: x.len() });
    }
    dispatch(SimdLevel::resolve(level), MapTask { f, x, y });
    Ok(())
}

/// `y_i = exp(x_i)` for `x_i ≤ 0` with the softmax kernels' `exp` (XNNPACK's rr2-p5 recipe:
/// magic-bias rounding, two-constant Cody–Waite reduction, degree-5 minimax polynomial).
///
/// Contract: ≤ 2 ULP on `[−87.33654, 0]` (checked against f64 `exp` over every f32 in that
/// range by an exhaustive test); exactly `+0` below (no subnormal results); `exp(0) = 1`
/// exactly; `-inf → +0`; NaN → NaN. Inputs above 0 are outside the contract (correct to a
/// few ULP up to 88.7, garbage above).
///
/// `level` forces a SIMD level (clamped to the CPU); `None` uses the default.
pub fn exp_nonpositive(x: &[f32], y: &mut [f32], level: Option<SimdLevel>) -> Result<()> {
    map(Fun::Exp, x, y, level)
}

/// `y_i = tanh(x_i)` with the kernel the losses use for logit soft-capping (`c·tanh(x/c)`).
///
/// Algorithm: the odd Taylor polynomial through x¹⁵ for `|x| < 0.4` (truncation below
/// `2.5e-10·|x|`), else `sign(x)·(1 − e)/(1 + e)` with `e = exp(−2|x|)` from the rr2-p5 `exp`.
/// Contract: ≤ 4 ULP everywhere (a sampled test against f64 asserts it at every SIMD level);
/// `±inf → ±1`, `±0 → ±0`, NaN → NaN. `y` must be as long as `x`.
pub fn tanh(x: &[f32], y: &mut [f32], level: Option<SimdLevel>) -> Result<()> {
    map(Fun::Tanh, x, y, level)
}
