//! Kernels for reductions over a non-last axis, vectorised across the inner dimension.
//!
//! A column block is `w` adjacent inner positions; each call below processes one step `k`
//! of the reduced axis for the whole block (one contiguous slice of `w` elements), with
//! per-column state held in small caller-owned slices.

use super::exp::exp;
use super::{Isa, inl};

const MAX_LANES: usize = 16;

#[cfg_attr(not(debug_assertions), inline(always))]
#[cfg_attr(debug_assertions, inline)]
fn pad<S: Isa>(t: &[f32]) -> S::f32s {
    let mut buf = [0.0f32; MAX_LANES];
    buf[..t.len()].copy_from_slice(t);
    S::as_simd_f32s(&buf[..S::F32_LANES]).0[0]
}

/// `out_j = f(out_j, a_j, b_j, c_j)` over equal-length slices (missing inputs pass `&[]`
/// and read as zeros).
#[cfg_attr(not(debug_assertions), inline(always))]
#[cfg_attr(debug_assertions, inline)]
fn zip4<S: Isa>(
    s: S,
    out: &mut [f32],
    a: &[f32],
    b: &[f32],
    c: &[f32],
    f: impl Fn(S::f32s, S::f32s, S::f32s, S::f32s) -> S::f32s,
) {
    let w = out.len();
    let z = s.splat_f32s(0.0);
    let l = S::F32_LANES;
    let full = w / l * l;
    {
        let (oh, _) = S::as_mut_simd_f32s(&mut out[..full]);
        let ah = if a.is_empty() { &[][..] } else { S::as_simd_f32s(&a[..full]).0 };
        let bh = if b.is_empty() { &[][..] } else { S::as_simd_f32s(&b[..full]).0 };
        let ch = if c.is_empty() { &[][..] } else { S::as_simd_f32s(&c[..full]).0 };
        for (i, o) in oh.iter_mut().enumerate() {
            let va = if a.is_empty() { z } else { ah[i] };
            let vb = if b.is_empty() { z } else { bh[i] };
            let vc = if c.is_empty() { z } else { ch[i] };
            *o = f(*o, va, vb, vc);
        }
    }
    if full < w {
        let get = inl(
            #[cfg_attr(not(debug_assertions), inline(always))]
            #[cfg_attr(debug_assertions, inline)]
            |x: &[f32]| {
                if x.is_empty() { z } else { pad::<S>(&x[full..w]) }
            },
        );
        let v = f(pad::<S>(&out[full..w]), get(a), get(b), get(c));
        let mut buf = [0.0f32; MAX_LANES];
        S::as_mut_simd_f32s(&mut buf[..l]).0[0] = v;
        out[full..w].copy_from_slice(&buf[..w - full]);
    }
}

/// `acc_j = max(acc_j, x_j)`.
#[cfg_attr(not(debug_assertions), inline(always))]
#[cfg_attr(debug_assertions, inline)]
pub(crate) fn max<S: Isa>(s: S, acc: &mut [f32], x: &[f32]) {
    zip4(
        s,
        acc,
        x,
        &[],
        &[],
        #[cfg_attr(not(debug_assertions), inline(always))]
        #[cfg_attr(debug_assertions, inline)]
        |o, a, _, _| s.max_f32s(o, a),
    );
}

/// `acc_j += exp((x_j − m_j)·k)`.
#[cfg_attr(not(debug_assertions), inline(always))]
#[cfg_attr(debug_assertions, inline)]
pub(crate) fn sum_exp<S: Isa>(s: S, acc: &mut [f32], x: &[f32], m: &[f32], k: f32) {
    let vk = s.splat_f32s(k);
    zip4(
        s,
        acc,
        x,
        m,
        &[],
        #[cfg_attr(not(debug_assertions), inline(always))]
        #[cfg_attr(debug_assertions, inline)]
        |o, a, mm, _| s.add_f32s(o, exp(s, s.mul_f32s(s.sub_f32s(a, mm), vk))),
    );
}

/// `y_j = exp((x_j − m_j)·k)·c_j`.
#[cfg_attr(not(debug_assertions), inline(always))]
#[cfg_attr(debug_assertions, inline)]
pub(crate) fn write_softmax<S: Isa>(s: S, y: &mut [f32], x: &[f32], m: &[f32], c: &[f32], k: f32) {
    let vk = s.splat_f32s(k);
    zip4(
        s,
        y,
        x,
        m,
        c,
        #[cfg_attr(not(debug_assertions), inline(always))]
        #[cfg_attr(debug_assertions, inline)]
        |_, a, mm, cc| s.mul_f32s(exp(s, s.mul_f32s(s.sub_f32s(a, mm), vk)), cc),
    );
}

/// `y_j = (x_j − m_j)·k − ls_j`.
#[cfg_attr(not(debug_assertions), inline(always))]
#[cfg_attr(debug_assertions, inline)]
pub(crate) fn write_log_softmax<S: Isa>(s: S, y: &mut [f32], x: &[f32], m: &[f32], ls: &[f32], k: f32) {
    let vk = s.splat_f32s(k);
    zip4(
        s,
        y,
        x,
        m,
        ls,
        #[cfg_attr(not(debug_assertions), inline(always))]
        #[cfg_attr(debug_assertions, inline)]
        |_, a, mm, l| s.sub_f32s(s.mul_f32s(s.sub_f32s(a, mm), vk), l),
    );
}

/// `acc_j += a_j·b_j`.
#[cfg_attr(not(debug_assertions), inline(always))]
#[cfg_attr(debug_assertions, inline)]
pub(crate) fn fma<S: Isa>(s: S, acc: &mut [f32], a: &[f32], b: &[f32]) {
    zip4(
        s,
        acc,
        a,
        b,
        &[],
        #[cfg_attr(not(debug_assertions), inline(always))]
        #[cfg_attr(debug_assertions, inline)]
        |o, x, y, _| s.mul_add_f32s(x, y, o),
    );
}

/// `acc_j += a_j`.
#[cfg_attr(not(debug_assertions), inline(always))]
#[cfg_attr(debug_assertions, inline)]
pub(crate) fn add<S: Isa>(s: S, acc: &mut [f32], a: &[f32]) {
    zip4(
        s,
        acc,
        a,
        &[],
        &[],
        #[cfg_attr(not(debug_assertions), inline(always))]
        #[cfg_attr(debug_assertions, inline)]
        |o, x, _, _| s.add_f32s(o, x),
    );
}

/// `dx_j = y_j·(dy_j − dot_j)`.
#[cfg_attr(not(debug_assertions), inline(always))]
#[cfg_attr(debug_assertions, inline)]
pub(crate) fn softmax_bwd<S: Isa>(s: S, dx: &mut [f32], y: &[f32], dy: &[f32], dot: &[f32]) {
    zip4(
        s,
        dx,
        y,
        dy,
        dot,
        #[cfg_attr(not(debug_assertions), inline(always))]
        #[cfg_attr(debug_assertions, inline)]
        |_, a, g, d| s.mul_f32s(a, s.sub_f32s(g, d)),
    );
}

/// `dx_j = dy_j − exp(y_j)·sum_j`.
#[cfg_attr(not(debug_assertions), inline(always))]
#[cfg_attr(debug_assertions, inline)]
pub(crate) fn log_softmax_bwd<S: Isa>(s: S, dx: &mut [f32], y: &[f32], dy: &[f32], sum: &[f32]) {
    zip4(
        s,
        dx,
        y,
        dy,
        sum,
        #[cfg_attr(not(debug_assertions), inline(always))]
        #[cfg_attr(debug_assertions, inline)]
        |_, a, g, t| s.sub_f32s(g, s.mul_f32s(exp(s, a), t)),
    );
}
