//! Kernels over contiguous f32 row segments.
//!
//! Every reduction works in blocks of [`BLOCK`] elements counted from the start of the slice:
//! inside a block, four vector accumulators in f32; at the end of a block, one horizontal
//! reduction whose result is added into an f64 running value owned by the caller. Callers
//! split rows only at multiples of `BLOCK`, so the summation order (and so the result, bit
//! for bit) depends on the row alone, never on how a call tiles, chunks or threads it.

use super::exp::{exp, exp_ext, pow2_nonpositive};
use super::{Ahead, Isa, inl, inl_mut};

/// Reduction block length (elements).
pub(crate) const BLOCK: usize = 256;
/// Widest vector in f32 lanes (AVX-512).
const MAX_LANES: usize = 16;

/// The `tail.len() < S::F32_LANES` elements of `tail` in the first lanes, `fill` in the rest
/// (a masked load where the ISA has one: no call to `memcpy` per row end).
#[cfg_attr(not(debug_assertions), inline(always))]
#[cfg_attr(debug_assertions, inline)]
pub(crate) fn load_padded<S: Isa>(s: S, tail: &[f32], fill: f32) -> S::f32s {
    s.select_f32s(first_lanes(s, tail.len()), s.partial_load_f32s(tail), s.splat_f32s(fill))
}

/// Stores the first `dst.len() < S::F32_LANES` lanes of `v` (a masked store where the ISA has
/// one).
#[cfg_attr(not(debug_assertions), inline(always))]
#[cfg_attr(debug_assertions, inline)]
fn store_partial<S: Isa>(s: S, dst: &mut [f32], v: S::f32s) {
    s.partial_store_f32s(dst, v);
}

/// Lanes of `v` as an array (first `S::F32_LANES` entries meaningful).
#[cfg_attr(not(debug_assertions), inline(always))]
#[cfg_attr(debug_assertions, inline)]
pub(crate) fn lanes<S: Isa>(v: S::f32s) -> [f32; MAX_LANES] {
    let mut buf = [0.0f32; MAX_LANES];
    S::as_mut_simd_f32s(&mut buf[..S::F32_LANES]).0[0] = v;
    buf
}

/// A mask that is true in lanes `0..n`.
#[cfg_attr(not(debug_assertions), inline(always))]
#[cfg_attr(debug_assertions, inline)]
pub(crate) fn first_lanes<S: Isa>(s: S, n: usize) -> S::m32s {
    let iota: [f32; MAX_LANES] = core::array::from_fn(|i| i as f32);
    let v = S::as_simd_f32s(&iota[..S::F32_LANES]).0[0];
    s.less_than_f32s(v, s.splat_f32s(n as f32))
}

/// Maximum of `x` (`-inf` for an empty slice). NaN handling is unspecified (it may or may not
/// be returned); callers detect NaN through the sums instead.
#[cfg_attr(not(debug_assertions), inline(always))]
#[cfg_attr(debug_assertions, inline)]
pub(crate) fn max<S: Isa>(s: S, x: &[f32], pf: Ahead) -> f32 {
    let op = inl(
        #[cfg_attr(not(debug_assertions), inline(always))]
        #[cfg_attr(debug_assertions, inline)]
        |a, v| s.max_f32s(a, v),
    );
    s.reduce_max_f32s(fold4(s, x, f32::NEG_INFINITY, pf, op))
}

/// Folds `x` with `op` into four independent accumulators (so four `op`s are in flight), the
/// tail padded with `pad` (`op`'s identity), and returns `op(op(a0, a1), op(a2, a3))`.
#[cfg_attr(not(debug_assertions), inline(always))]
#[cfg_attr(debug_assertions, inline)]
fn fold4<S: Isa>(s: S, x: &[f32], pad: f32, pf: Ahead, op: impl Fn(S::f32s, S::f32s) -> S::f32s) -> S::f32s {
    let (head, tail) = S::as_simd_f32s(x);
    let p = s.splat_f32s(pad);
    let (mut a0, mut a1, mut a2, mut a3) = (p, p, p, p);
    let mut it = head.chunks_exact(4);
    for (i, c) in (&mut it).enumerate() {
        pf.span(i * 4 * S::F32_LANES, 4 * S::F32_LANES);
        a0 = op(a0, c[0]);
        a1 = op(a1, c[1]);
        a2 = op(a2, c[2]);
        a3 = op(a3, c[3]);
    }
    for &v in it.remainder() {
        a0 = op(a0, v);
    }
    if !tail.is_empty() {
        a1 = op(a1, load_padded(s, tail, pad));
    }
    op(op(a0, a1), op(a2, a3))
}

#[cfg_attr(not(debug_assertions), inline(always))]
#[cfg_attr(debug_assertions, inline)]
/// `Σ exp((x − m)·k)` over one block; with `y`, stores each `exp((x − m)·k)` there, or with
/// `shifted`, each `(x − m)·k` (the log-softmax form) instead.
fn sum_exp_block<S: Isa>(s: S, x: &[f32], m: f32, k: f32, y: Option<&mut [f32]>, shifted: bool, pf: Ahead) -> f32 {
    // `(x − m)·1` is `x − m` exactly (NaN and ±inf included), so the unit-temperature loop
    // drops the multiply and returns the same bits with one vector operation less per vector.
    if k == 1.0 {
        sum_exp_block_k::<S, true>(s, x, m, k, y, shifted, pf)
    } else {
        sum_exp_block_k::<S, false>(s, x, m, k, y, shifted, pf)
    }
}

/// [`sum_exp_block`] with `UNIT` meaning `k == 1`.
#[cfg_attr(not(debug_assertions), inline(always))]
#[cfg_attr(debug_assertions, inline)]
fn sum_exp_block_k<S: Isa, const UNIT: bool>(
    s: S,
    x: &[f32],
    m: f32,
    k: f32,
    mut y: Option<&mut [f32]>,
    shifted: bool,
    pf: Ahead,
) -> f32 {
    let step = 4 * S::F32_LANES;
    let vm = s.splat_f32s(m);
    let vk = s.splat_f32s(k);
    let z = s.splat_f32s(0.0);
    let (mut a0, mut a1, mut a2, mut a3) = (z, z, z, z);
    let (head, tail) = S::as_simd_f32s(x);
    // (t, exp(t)) with t = (x − m)·k; `stored` picks which of the two goes to `y`.
    let te = inl(
        #[cfg_attr(not(debug_assertions), inline(always))]
        #[cfg_attr(debug_assertions, inline)]
        |v: S::f32s| {
            let d = s.sub_f32s(v, vm);
            let t = if UNIT { d } else { s.mul_f32s(d, vk) };
            (t, exp(s, t))
        },
    );
    let f = inl(
        #[cfg_attr(not(debug_assertions), inline(always))]
        #[cfg_attr(debug_assertions, inline)]
        |v: S::f32s| te(v).1,
    );
    let stored = inl(
        #[cfg_attr(not(debug_assertions), inline(always))]
        #[cfg_attr(debug_assertions, inline)]
        |(t, e): (S::f32s, S::f32s)| if shifted { t } else { e },
    );
    match y.as_deref_mut() {
        None => {
            let mut it = head.chunks_exact(4);
            for (j, c) in (&mut it).enumerate() {
                pf.span(j * step, step);
                a0 = s.add_f32s(a0, f(c[0]));
                a1 = s.add_f32s(a1, f(c[1]));
                a2 = s.add_f32s(a2, f(c[2]));
                a3 = s.add_f32s(a3, f(c[3]));
            }
            for &v in it.remainder() {
                a0 = s.add_f32s(a0, f(v));
            }
        }
        Some(y) => {
            let (yh, _) = S::as_mut_simd_f32s(&mut y[..head.len() * S::F32_LANES]);
            let mut it = head.chunks_exact(4);
            let mut yit = yh.chunks_exact_mut(4);
            for (j, (c, d)) in (&mut it).zip(&mut yit).enumerate() {
                pf.span(j * step, step);
                let (p0, p1, p2, p3) = (te(c[0]), te(c[1]), te(c[2]), te(c[3]));
                d[0] = stored(p0);
                d[1] = stored(p1);
                d[2] = stored(p2);
                d[3] = stored(p3);
                a0 = s.add_f32s(a0, p0.1);
                a1 = s.add_f32s(a1, p1.1);
                a2 = s.add_f32s(a2, p2.1);
                a3 = s.add_f32s(a3, p3.1);
            }
            for (&v, d) in it.remainder().iter().zip(yit.into_remainder()) {
                let p = te(v);
                *d = stored(p);
                a0 = s.add_f32s(a0, p.1);
            }
        }
    }
    if !tail.is_empty() {
        let p = te(load_padded(s, tail, f32::NEG_INFINITY));
        if let Some(y) = y {
            let n = x.len();
            store_partial(s, &mut y[n - tail.len()..n], stored(p));
        }
        a1 = s.add_f32s(a1, p.1);
    }
    s.reduce_sum_f32s(s.add_f32s(s.add_f32s(a0, a1), s.add_f32s(a2, a3)))
}

/// `acc += Σ exp((x_i − m)·k)`, in blocks (f32 inside a block, f64 across blocks).
#[cfg_attr(not(debug_assertions), inline(always))]
#[cfg_attr(debug_assertions, inline)]
pub(crate) fn sum_exp<S: Isa>(s: S, x: &[f32], m: f32, k: f32, acc: &mut f64, pf: Ahead) {
    for (i, blk) in x.chunks(BLOCK).enumerate() {
        *acc += sum_exp_block(s, blk, m, k, None, false, pf.skip(i * BLOCK)) as f64;
    }
}

/// `y_i = exp((x_i − m)·k)` and `acc += Σ y_i` (pass 2 of the three-pass algorithm).
#[cfg_attr(not(debug_assertions), inline(always))]
#[cfg_attr(debug_assertions, inline)]
pub(crate) fn exp_store_sum<S: Isa>(s: S, x: &[f32], y: &mut [f32], m: f32, k: f32, acc: &mut f64, pf: Ahead) {
    for (i, (blk, yb)) in x.chunks(BLOCK).zip(y.chunks_mut(BLOCK)).enumerate() {
        *acc += sum_exp_block(s, blk, m, k, Some(yb), false, pf.skip(i * BLOCK)) as f64;
    }
}

/// `y_i = (x_i − m)·k` and `acc += Σ exp(y_i)` (log-softmax pass 2: the output row is written
/// while the exponentials are computed, so its cache misses overlap the arithmetic).
#[cfg_attr(not(debug_assertions), inline(always))]
#[cfg_attr(debug_assertions, inline)]
pub(crate) fn shift_store_sum<S: Isa>(s: S, x: &[f32], y: &mut [f32], m: f32, k: f32, acc: &mut f64, pf: Ahead) {
    for (i, (blk, yb)) in x.chunks(BLOCK).zip(y.chunks_mut(BLOCK)).enumerate() {
        *acc += sum_exp_block(s, blk, m, k, Some(yb), true, pf.skip(i * BLOCK)) as f64;
    }
}

/// Three-pass pass 3 of one row fused with pass 1 of the next (software pipelining across
/// rows): `y_i = buf_i · c` (softmax) or `y_i = buf_i − c` (`log`), streamed past the cache
/// when `stream`, while the max of `next` is taken in the same loop, block by block. Returns
/// that max (the same value [`max`] returns; NaN handling unspecified likewise). With
/// `patch = Some((i, v))`, `y_i` is `v` instead (the cross-entropy's target entry), placed
/// before the store. No prefetch: the callers' pass 2 has fetched `next` into L2. No fence:
/// the caller orders the streaming stores of a whole task with one `stream_fence`.
#[cfg_attr(not(debug_assertions), inline(always))]
#[cfg_attr(debug_assertions, inline)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn finish_max_next<S: Isa>(
    s: S,
    buf: &[f32],
    y: &mut [f32],
    c: f32,
    log: bool,
    stream: bool,
    next: &[f32],
    patch: Option<(usize, f32)>,
) -> f32 {
    let vc = s.splat_f32s(c);
    let f = inl(
        #[cfg_attr(not(debug_assertions), inline(always))]
        #[cfg_attr(debug_assertions, inline)]
        move |v: S::f32s| if log { s.sub_f32s(v, vc) } else { s.mul_f32s(v, vc) },
    );
    // `patch` relative to the part of `y` that starts at `at` and runs `len` elements.
    let within = |at: usize, len: usize| patch.filter(|p| p.0 >= at && p.0 < at + len).map(|(i, v)| (i - at, v));
    let h = stream_peel::<S>(y, stream);
    if h > 0 {
        let plain = Store { stream: false, fill: 0.0, pf: Ahead::NONE };
        write_block(s, (&buf[..h], &mut y[..h]), plain, &f, within(0, h));
    }
    let mut wx = buf[h..].chunks(BLOCK);
    let mut wy = y[h..].chunks_mut(BLOCK);
    let mut m = f32::NEG_INFINITY;
    let blocks = next.len().max(buf.len()).div_ceil(BLOCK);
    for i in 0..blocks {
        if let Some(nb) = next.get(i * BLOCK..((i + 1) * BLOCK).min(next.len())) {
            let bm = max(s, nb, Ahead::NONE);
            if bm > m || bm.is_nan() {
                m = bm;
            }
        }
        if let (Some(xb), Some(yb)) = (wx.next(), wy.next()) {
            let p = within(h + i * BLOCK, xb.len());
            write_block(s, (xb, yb), Store { stream, fill: 0.0, pf: Ahead::NONE }, &f, p);
        }
    }
    m
}

/// `y_i *= c` in place, or `y_i −= c` with `sub` (callers pass it as a constant).
#[cfg_attr(not(debug_assertions), inline(always))]
#[cfg_attr(debug_assertions, inline)]
pub(crate) fn scale_or_shift<S: Isa>(s: S, y: &mut [f32], c: f32, sub: bool) {
    let vc = s.splat_f32s(c);
    let (head, tail) = S::as_mut_simd_f32s(y);
    for v in head.iter_mut() {
        *v = if sub { s.sub_f32s(*v, vc) } else { s.mul_f32s(*v, vc) };
    }
    for v in tail.iter_mut() {
        *v = if sub { *v - c } else { *v * c };
    }
}

/// The running state of the blocked online pass: `d · e^{m·k} = Σ exp(x_i·k)` with the shift
/// `m` (a max of the raw inputs) in f32 and the scaled sum in f64.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Online {
    pub m: f32,
    pub d: f64,
}

impl Online {
    pub const EMPTY: Online = Online { m: f32::NEG_INFINITY, d: 0.0 };

    /// Merges another state into this one (fixed operand order: `self` is the earlier part).
    /// Guards `-inf − (-inf)`: merging with an empty state is the identity.
    #[inline]
    pub fn merge(&mut self, o: Online, k: f32) {
        if self.d.is_nan() || o.d.is_nan() || o.m.is_nan() || self.m.is_nan() {
            self.d = f64::NAN;
        } else if o.m == f32::NEG_INFINITY {
        } else if self.m == f32::NEG_INFINITY {
            *self = o;
        } else if o.m > self.m {
            self.d = self.d * ((self.m as f64 - o.m as f64) * k as f64).exp() + o.d;
            self.m = o.m;
        } else if o.m == self.m {
            self.d += o.d;
        } else {
            self.d += o.d * ((o.m as f64 - self.m as f64) * k as f64).exp();
        }
    }
}

/// One online step per block: block max, rescale the running sum if the max grew, then add the
/// block's `Σ exp((x − m)·k)`. Blocks that are entirely `-inf` add nothing, but are scanned for
/// NaN so that a NaN can never hide in a masked block.
#[cfg_attr(not(debug_assertions), inline(always))]
#[cfg_attr(debug_assertions, inline)]
pub(crate) fn online<S: Isa>(s: S, x: &[f32], k: f32, st: &mut Online, pf: Ahead) {
    for (i, blk) in x.chunks(BLOCK).enumerate() {
        online_block(s, blk, k, st, pf.skip(i * BLOCK));
    }
}

/// One block of [`online`].
#[cfg_attr(not(debug_assertions), inline(always))]
#[cfg_attr(debug_assertions, inline)]
fn online_block<S: Isa>(s: S, blk: &[f32], k: f32, st: &mut Online, pf: Ahead) {
    let bm = max(s, blk, Ahead::NONE);
    if bm == f32::NEG_INFINITY {
        if blk.iter().any(|v| v.is_nan()) {
            st.d = f64::NAN;
        }
        return;
    }
    if bm.is_nan() {
        st.d = f64::NAN;
        return;
    }
    if bm > st.m {
        if st.m != f32::NEG_INFINITY {
            st.d *= ((st.m as f64 - bm as f64) * k as f64).exp();
        }
        st.m = bm;
    }
    st.d += sum_exp_block(s, blk, st.m, k, None, false, pf) as f64;
}

/// The running state of the two-pass (extended exponent) pass: `Σ exp(x_i·k) = v · 2^e`
/// (`v`, `e` in f64, `e` integer-valued), plus the running max of the raw inputs and a flag
/// raised by any non-finite input (such rows are redone with the online pass).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Ext {
    pub v: f64,
    pub e: f64,
    pub m: f32,
    pub nonfinite: bool,
}

impl Ext {
    pub const EMPTY: Ext = Ext { v: 0.0, e: f64::NEG_INFINITY, m: f32::NEG_INFINITY, nonfinite: false };

    #[inline]
    fn add_scaled(&mut self, v: f64, e: f64) {
        if v == 0.0 {
            return;
        }
        if self.v == 0.0 {
            self.v = v;
            self.e = e;
        } else if e > self.e {
            self.v = self.v * pow2_f64(self.e - e) + v;
            self.e = e;
        } else {
            self.v += v * pow2_f64(e - self.e);
        }
    }

    /// Merges another state into this one (fixed order).
    #[inline]
    pub fn merge(&mut self, o: Ext) {
        self.add_scaled(o.v, o.e);
        self.m = if o.m > self.m { o.m } else { self.m };
        self.nonfinite |= o.nonfinite;
    }
}

/// Inputs beyond `2^22` in magnitude (after scaling by `k`) make `x·log2 e` lose integer
/// resolution in [`exp_ext`]. Rows whose max exceeds this limit are redone with the online
/// pass; inputs below `−EXT_FLOOR` are raised to it before [`exp_ext`] (see [`ext`]).
pub(crate) const EXT_LIMIT: f32 = 4_192_000.0;

/// The floor of the scaled inputs of [`ext`]: 2000 below any usable max, so a raised input
/// contributes less than `e^−2000` of the max's term, which the f64 merge drops
/// (`pow2_f64` is 0 below `2^−1022`) exactly as it drops the true value.
const EXT_FLOOR: f32 = 4_194_000.0;

/// `2^d` for an integer-valued `d <= 0`, exactly (built from the bits); `0` below `2^-1022`,
/// where the scaled term is below `2^-1000` of the one it is added to (an [`Ext`] block value
/// is at least `2^-0.5`: its largest lane contributes `p·2^0`).
#[cfg_attr(not(debug_assertions), inline(always))]
#[cfg_attr(debug_assertions, inline)]
fn pow2_f64(d: f64) -> f64 {
    if d < -1022.0 { 0.0 } else { f64::from_bits(((d as i64 + 1023) as u64) << 52) }
}

/// The two-pass algorithm's first pass (Dukhan & Ablavatski): no max pass; every `exp(x·k)` is
/// kept as `p · 2^n` and accumulated against a running per-lane exponent. Four independent
/// (value, exponent) vector chains per block hide the latency of the rescaling; at the end of
/// each block the lanes are brought to the block's largest exponent in registers (exact
/// powers of two), summed in f32 like every other block reduction here, and the block's one
/// `(value, exponent)` pair is merged into `st` in f64.
#[cfg_attr(not(debug_assertions), inline(always))]
#[cfg_attr(debug_assertions, inline)]
pub(crate) fn ext<S: Isa>(s: S, x: &[f32], k: f32, st: &mut Ext, pf: Ahead) {
    let vk = s.splat_f32s(k);
    // `x ≥ −EXT_FLOOR/k` keeps `x·k` within `exp_ext`'s range (`k > 0`, validated).
    let floor = s.splat_f32s(-EXT_FLOOR / k);
    let zero = s.splat_f32s(0.0);
    let far = s.splat_f32s(-1.0e9);
    let step4 = 4 * S::F32_LANES;
    for (bi, blk) in x.chunks(BLOCK).enumerate() {
        let bpf = pf.skip(bi * BLOCK);
        let (head, tail) = S::as_simd_f32s(blk);
        let mut v = [zero; 4];
        let mut e = [far; 4];
        let mut mx = s.splat_f32s(f32::NEG_INFINITY);
        let mut bad = zero;
        let mut step = inl_mut(
            #[cfg_attr(not(debug_assertions), inline(always))]
            #[cfg_attr(debug_assertions, inline)]
            |xv: S::f32s, keep: Option<S::m32s>, v: &mut S::f32s, e: &mut S::f32s| {
                let xs = s.mul_f32s(xv, vk);
                bad = s.add_f32s(bad, s.mul_f32s(xs, zero));
                // NaN and ±inf are caught by `bad` (from `xs`), whatever the max makes of them.
                let (mut p, mut n) = exp_ext(s, s.max_f32s(xv, floor), vk);
                let mut xm = xv;
                if let Some(mask) = keep {
                    // Padding lanes contribute nothing and must not raise the lane exponent.
                    p = s.select_f32s(mask, p, zero);
                    n = s.select_f32s(mask, n, far);
                    xm = s.select_f32s(mask, xv, s.splat_f32s(f32::NEG_INFINITY));
                }
                mx = s.max_f32s(mx, xm);
                let ne = s.max_f32s(*e, n);
                *v = s.mul_add_f32s(
                    p,
                    pow2_nonpositive(s, s.sub_f32s(n, ne)),
                    s.mul_f32s(*v, pow2_nonpositive(s, s.sub_f32s(*e, ne))),
                );
                *e = ne;
            },
        );
        let mut it = head.chunks_exact(4);
        for (j, c) in (&mut it).enumerate() {
            bpf.span(j * step4, step4);
            let [v0, v1, v2, v3] = &mut v;
            let [e0, e1, e2, e3] = &mut e;
            step(c[0], None, v0, e0);
            step(c[1], None, v1, e1);
            step(c[2], None, v2, e2);
            step(c[3], None, v3, e3);
        }
        for ((&xv, vi), ei) in it.remainder().iter().zip(&mut v).zip(&mut e) {
            step(xv, None, vi, ei);
        }
        if !tail.is_empty() {
            let xv = load_padded(s, tail, 0.0);
            step(xv, Some(first_lanes(s, tail.len())), &mut v[3], &mut e[3]);
        }
        if lanes::<S>(bad)[..S::F32_LANES].iter().any(|b| !b.is_finite()) {
            st.nonfinite = true;
        }
        // Lanes to the largest exponent of the block (unused lanes: v = 0 at e = −1e9).
        let em = s.max_f32s(s.max_f32s(e[0], e[1]), s.max_f32s(e[2], e[3]));
        let top = s.reduce_max_f32s(em);
        let emv = s.splat_f32s(top);
        let mut acc = zero;
        for (&vi, &ei) in v.iter().zip(&e) {
            acc = s.mul_add_f32s(vi, pow2_nonpositive(s, s.sub_f32s(ei, emv)), acc);
        }
        st.add_scaled(s.reduce_sum_f32s(acc) as f64, top as f64);
        let bm = s.reduce_max_f32s(mx);
        if bm > st.m {
            st.m = bm;
        }
    }
}

impl Ext {
    /// `Σ exp((x_i − m)·k)` for the tracked max `m`, in f64.
    pub fn sum_relative_to_max(&self, k: f32) -> f64 {
        if self.v == 0.0 {
            return 0.0;
        }
        self.v * (self.e * core::f64::consts::LN_2 - self.m as f64 * k as f64).exp()
    }
}

mod attention;
mod loss;
#[cfg(test)]
mod tests;
mod write;

pub(crate) use attention::*;
pub(crate) use loss::*;
pub(crate) use write::*;
