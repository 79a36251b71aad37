//! Attention kernels (see `crate::attention`): tile exponentials, finiteness scans, soft cap.

use super::*;

/// `x_i = exp(x_i − m)` in place; returns `Σ x_i` (f32 inside blocks of [`BLOCK`], f64 across).
/// `m` must not be `-inf` (callers skip fully masked rows); entries equal to `-inf` become 0.
#[cfg_attr(not(debug_assertions), inline(always))]
#[cfg_attr(debug_assertions, inline)]
pub(crate) fn exp_shift_inplace_sum<S: Isa>(s: S, x: &mut [f32], m: f32) -> f64 {
    let vm = s.splat_f32s(m);
    let mut total = 0.0f64;
    for blk in x.chunks_mut(BLOCK) {
        let (head, tail) = S::as_mut_simd_f32s(blk);
        let (mut a0, mut a1) = (s.splat_f32s(0.0), s.splat_f32s(0.0));
        let mut it = head.chunks_exact_mut(2);
        for c in &mut it {
            let e0 = exp(s, s.sub_f32s(c[0], vm));
            let e1 = exp(s, s.sub_f32s(c[1], vm));
            c[0] = e0;
            c[1] = e1;
            a0 = s.add_f32s(a0, e0);
            a1 = s.add_f32s(a1, e1);
        }
        for c in it.into_remainder() {
            let e = exp(s, s.sub_f32s(*c, vm));
            *c = e;
            a0 = s.add_f32s(a0, e);
        }
        if !tail.is_empty() {
            let n = tail.len();
            let v = load_padded(s, tail, f32::NEG_INFINITY);
            let e = exp(s, s.sub_f32s(v, vm));
            store_partial(s, tail, e);
            let keep = first_lanes(s, n);
            a1 = s.add_f32s(a1, s.select_f32s(keep, e, s.splat_f32s(0.0)));
        }
        total += s.reduce_sum_f32s(s.add_f32s(a0, a1)) as f64;
    }
    total
}

/// True when every element of `x` is finite (no NaN, no ±inf): `Σ x_i·0` stays 0 exactly
/// unless some `x_i·0` is NaN.
#[cfg_attr(not(debug_assertions), inline(always))]
#[cfg_attr(debug_assertions, inline)]
pub(crate) fn all_finite<S: Isa>(s: S, x: &[f32]) -> bool {
    let (h, t) = S::as_simd_f32s(x);
    let z = s.splat_f32s(0.0);
    let (mut a0, mut a1) = (z, z);
    let mut it = h.chunks_exact(2);
    for c in &mut it {
        a0 = s.mul_add_f32s(c[0], z, a0);
        a1 = s.mul_add_f32s(c[1], z, a1);
    }
    for &c in it.remainder() {
        a0 = s.mul_add_f32s(c, z, a0);
    }
    s.reduce_sum_f32s(s.add_f32s(a0, a1)) == 0.0 && t.iter().all(|v| v.is_finite())
}

/// Logit soft-capping in place (Gemma 2's attention): `x ← cap·tanh(x·k/cap)`; with `g`, also
/// `g ← 1 − tanh²(x·k/cap)`, the derivative of `cap·tanh(t/cap)` with respect to `t`.
#[cfg_attr(not(debug_assertions), inline(always))]
#[cfg_attr(debug_assertions, inline)]
pub(crate) fn softcap_inplace<S: Isa>(s: S, k: f32, cap: f32, x: &mut [f32], g: Option<&mut [f32]>) {
    let (vk, vc, vic, one) = (s.splat_f32s(k), s.splat_f32s(cap), s.splat_f32s(1.0 / cap), s.splat_f32s(1.0));
    let one_lane = |v: S::f32s| -> (S::f32s, S::f32s) {
        let u = crate::arch::exp::tanh(s, s.mul_f32s(s.mul_f32s(v, vk), vic));
        (s.mul_f32s(u, vc), s.sub_f32s(one, s.mul_f32s(u, u)))
    };
    let n = x.len();
    let full = n / S::F32_LANES * S::F32_LANES;
    let (xh, _) = S::as_mut_simd_f32s(&mut x[..full]);
    match g {
        Some(g) => {
            let (gh, _) = S::as_mut_simd_f32s(&mut g[..full]);
            for (xv, gv) in xh.iter_mut().zip(gh.iter_mut()) {
                let (y, d) = one_lane(*xv);
                *xv = y;
                *gv = d;
            }
            if full < n {
                let (y, d) = one_lane(load_padded(s, &x[full..], 0.0));
                store_partial(s, &mut x[full..], y);
                store_partial(s, &mut g[full..n], d);
            }
        }
        None => {
            for xv in xh.iter_mut() {
                *xv = one_lane(*xv).0;
            }
            if full < n {
                let y = one_lane(load_padded(s, &x[full..], 0.0)).0;
                store_partial(s, &mut x[full..], y);
            }
        }
    }
}
