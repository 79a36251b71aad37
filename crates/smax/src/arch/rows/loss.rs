//! Loss kernels (see `crate::loss`): the cross-entropy's transformed rows and gradients.

use super::*;

/// The logit transform of the losses: `t = x·k` or, with a soft cap `c > 0`,
/// `t = c·tanh(x/c)·k`, keeping `-inf` as `-inf` (a masked class stays masked).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Xform {
    pub k: f32,
    /// 0 for no cap.
    pub cap: f32,
}

impl Xform {
    #[cfg_attr(not(debug_assertions), inline(always))]
    #[cfg_attr(debug_assertions, inline)]
    pub fn is_identity(&self) -> bool {
        self.k == 1.0 && self.cap == 0.0
    }
    #[cfg_attr(not(debug_assertions), inline(always))]
    #[cfg_attr(debug_assertions, inline)]
    pub fn apply<S: Isa>(&self, s: S, v: S::f32s) -> S::f32s {
        if self.cap == 0.0 {
            return s.mul_f32s(v, s.splat_f32s(self.k));
        }
        let c = s.splat_f32s(self.cap);
        let th = crate::arch::exp::tanh(s, s.div_f32s(v, c));
        let t = s.mul_f32s(s.mul_f32s(th, c), s.splat_f32s(self.k));
        let ninf = s.splat_f32s(f32::NEG_INFINITY);
        s.select_f32s(s.equal_f32s(v, ninf), ninf, t)
    }
    /// The scalar form (one lane of [`Xform::apply`]).
    #[cfg_attr(not(debug_assertions), inline(always))]
    #[cfg_attr(debug_assertions, inline)]
    pub fn apply1(&self, v: f32) -> f32 {
        let sc = pulp::Scalar::new();
        self.apply(sc, v)
    }
}

/// `t = xf(x)` elementwise.
#[cfg_attr(not(debug_assertions), inline(always))]
#[cfg_attr(debug_assertions, inline)]
pub(crate) fn xform<S: Isa>(s: S, xf: Xform, x: &[f32], t: &mut [f32]) {
    let (xh, xt) = S::as_simd_f32s(x);
    let n = xh.len() * S::F32_LANES;
    let (th, _) = S::as_mut_simd_f32s(&mut t[..n]);
    for (o, &v) in th.iter_mut().zip(xh) {
        *o = xf.apply(s, v);
    }
    if !xt.is_empty() {
        store_partial(s, &mut t[n..x.len()], xf.apply(s, load_padded(s, xt, 0.0)));
    }
}

/// `acc += Σ v_i·t_i` in blocks, where a zero weight contributes zero even against an
/// infinite `t_i` (a class with no target mass never turns the loss into NaN).
#[cfg_attr(not(debug_assertions), inline(always))]
#[cfg_attr(debug_assertions, inline)]
pub(crate) fn dot_guarded<S: Isa>(s: S, v: &[f32], t: &[f32], acc: &mut f64) {
    let z = s.splat_f32s(0.0);
    let f = inl(
        #[cfg_attr(not(debug_assertions), inline(always))]
        #[cfg_attr(debug_assertions, inline)]
        |a: S::f32s, b: S::f32s| s.select_f32s(s.equal_f32s(a, z), z, s.mul_f32s(a, b)),
    );
    for (vb, tb) in v.chunks(BLOCK).zip(t.chunks(BLOCK)) {
        let (vh, vt) = S::as_simd_f32s(vb);
        let (th, tt) = S::as_simd_f32s(tb);
        let (mut a0, mut a1) = (z, z);
        let mut iv = vh.chunks_exact(2);
        let mut it = th.chunks_exact(2);
        for (c, d) in (&mut iv).zip(&mut it) {
            a0 = s.add_f32s(a0, f(c[0], d[0]));
            a1 = s.add_f32s(a1, f(c[1], d[1]));
        }
        for (&c, &d) in iv.remainder().iter().zip(it.remainder()) {
            a0 = s.add_f32s(a0, f(c, d));
        }
        if !vt.is_empty() {
            a1 = s.add_f32s(a1, f(load_padded(s, vt, 0.0), load_padded(s, tt, 0.0)));
        }
        *acc += s.reduce_sum_f32s(s.add_f32s(a0, a1)) as f64;
    }
}

/// What the loss gradient subtracts per class: nothing, a constant, or `b·v_i`.
#[derive(Clone, Copy)]
pub(crate) enum Sub<'a> {
    None,
    Const(f32),
    Vec(f32, &'a [f32]),
}

/// The cross-entropy gradient of a tile: `g_i = (exp(t_i − m)·c1 − sub_i)·chain_i`, where
/// `chain_i = k` without a cap and `k·(1 − (t_i/(c·k))²)` with one (the derivative of
/// `c·tanh(x/c)·k`, from the capped value itself).
#[cfg_attr(not(debug_assertions), inline(always))]
#[cfg_attr(debug_assertions, inline)]
pub(crate) fn ce_grad<S: Isa>(s: S, t: &[f32], g: &mut [f32], m: f32, c1: f32, sub: Sub<'_>, xf: Xform) {
    let (vm, vc1) = (s.splat_f32s(m), s.splat_f32s(c1));
    let vk = s.splat_f32s(xf.k);
    let inv_ck = if xf.cap == 0.0 { 0.0 } else { 1.0 / (xf.cap * xf.k) };
    let vick = s.splat_f32s(inv_ck);
    let one = s.splat_f32s(1.0);
    let capped = xf.cap != 0.0;
    let chain = inl(
        #[cfg_attr(not(debug_assertions), inline(always))]
        #[cfg_attr(debug_assertions, inline)]
        |tv: S::f32s, gv: S::f32s| {
            if capped {
                let r = s.mul_f32s(tv, vick);
                // -inf stays -inf through the cap: its gradient is 0, not NaN.
                let d = s.mul_f32s(vk, s.max_f32s(s.negate_mul_add_f32s(r, r, one), s.splat_f32s(0.0)));
                let d = s.select_f32s(s.equal_f32s(tv, s.splat_f32s(f32::NEG_INFINITY)), s.splat_f32s(0.0), d);
                s.mul_f32s(gv, d)
            } else {
                s.mul_f32s(gv, vk)
            }
        },
    );
    let p = inl(
        #[cfg_attr(not(debug_assertions), inline(always))]
        #[cfg_attr(debug_assertions, inline)]
        |tv: S::f32s| s.mul_f32s(exp(s, s.sub_f32s(tv, vm)), vc1),
    );
    let (th, tt) = S::as_simd_f32s(t);
    let n = th.len() * S::F32_LANES;
    {
        let (gh, _) = S::as_mut_simd_f32s(&mut g[..n]);
        match sub {
            Sub::None => {
                for (o, &tv) in gh.iter_mut().zip(th) {
                    *o = chain(tv, p(tv));
                }
            }
            Sub::Const(b) => {
                let vb = s.splat_f32s(b);
                for (o, &tv) in gh.iter_mut().zip(th) {
                    *o = chain(tv, s.sub_f32s(p(tv), vb));
                }
            }
            Sub::Vec(b, v) => {
                let vb = s.splat_f32s(b);
                let (vh, _) = S::as_simd_f32s(&v[..n]);
                for ((o, &tv), &w) in gh.iter_mut().zip(th).zip(vh) {
                    *o = chain(tv, s.negate_mul_add_f32s(vb, w, p(tv)));
                }
            }
        }
    }
    if !tt.is_empty() {
        let tv = load_padded(s, tt, f32::NEG_INFINITY);
        let pv = p(tv);
        let gv = match sub {
            Sub::None => pv,
            Sub::Const(b) => s.sub_f32s(pv, s.splat_f32s(b)),
            Sub::Vec(b, v) => s.negate_mul_add_f32s(s.splat_f32s(b), load_padded(s, &v[n..], 0.0), pv),
        };
        store_partial(s, &mut g[n..t.len()], chain(tv, gv));
    }
}

/// Finishes a cross-entropy gradient over stored exponentials `e_i = exp((x_i − m)·k)`, in
/// place: `g_i = (e_i·c1 − sub_i)·k`.
#[cfg_attr(not(debug_assertions), inline(always))]
#[cfg_attr(debug_assertions, inline)]
pub(crate) fn ce_finish<S: Isa>(s: S, g: &mut [f32], c1: f32, sub: Sub<'_>, k: f32) {
    let (vc1, vk) = (s.splat_f32s(c1), s.splat_f32s(k));
    let (gh, gt) = S::as_mut_simd_f32s(g);
    let nh = gh.len() * S::F32_LANES;
    match sub {
        Sub::None => {
            let c = s.mul_f32s(vc1, vk);
            for o in gh.iter_mut() {
                *o = s.mul_f32s(*o, c);
            }
        }
        Sub::Const(b) => {
            let nb = s.splat_f32s(-b);
            for o in gh.iter_mut() {
                *o = s.mul_f32s(s.mul_add_f32s(*o, vc1, nb), vk);
            }
        }
        Sub::Vec(b, v) => {
            let vb = s.splat_f32s(b);
            let (vh, _) = S::as_simd_f32s(&v[..nh]);
            for (o, &w) in gh.iter_mut().zip(vh) {
                *o = s.mul_f32s(s.negate_mul_add_f32s(vb, w, s.mul_f32s(*o, vc1)), vk);
            }
        }
    }
    for (i, o) in gt.iter_mut().enumerate() {
        let sv = match sub {
            // The vector body's form (one product `c1·k`), so that a streamed finish from a
            // scratch row, whose vector grid starts elsewhere, gives the same bits.
            Sub::None => {
                *o *= c1 * k;
                continue;
            }
            Sub::Const(b) => b,
            Sub::Vec(b, v) => b * v[nh + i],
        };
        *o = (*o).mul_add(c1, -sv) * k;
    }
}
