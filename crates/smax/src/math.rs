//! The elementary kernel underneath the normalisers, exposed for testing and reuse.

use crate::arch::{Isa, SimdLevel, Task, dispatch};
use crate::error::{Error, Result};

struct ExpTask<'a> {
    x: &'a [f32],
    y: &'a mut [f32],
}

impl Task for ExpTask<'_> {
    type Output = ();
    #[inline(always)]
    fn run<S: Isa>(self, s: S) {
        let (xh, xt) = S::as_simd_f32s(self.x);
        let n = xh.len() * S::F32_LANES;
        let (yh, _) = S::as_mut_simd_f32s(&mut self.y[..n]);
        for (o, &v) in yh.iter_mut().zip(xh) {
            *o = crate::arch::exp::exp(s, v);
        }
        for (o, &v) in self.y[n..].iter_mut().zip(xt) {
            let one = pulp::Scalar::new();
            *o = crate::arch::exp::exp(one, v);
        }
    }
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
    if y.len() != x.len() {
        return Err(Error::BufferTooShort {
            what: "exp output",
            len: y.len(),
            needed: x.len(),
        });
    }
    dispatch(SimdLevel::resolve(level), ExpTask { x, y });
    Ok(())
}
