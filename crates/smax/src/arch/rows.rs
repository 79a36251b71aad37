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
#[inline(always)]
fn load_padded<S: Isa>(s: S, tail: &[f32], fill: f32) -> S::f32s {
    s.select_f32s(first_lanes(s, tail.len()), s.partial_load_f32s(tail), s.splat_f32s(fill))
}

/// Stores the first `dst.len() < S::F32_LANES` lanes of `v` (a masked store where the ISA has
/// one).
#[inline(always)]
fn store_partial<S: Isa>(s: S, dst: &mut [f32], v: S::f32s) {
    s.partial_store_f32s(dst, v);
}

/// Lanes of `v` as an array (first `S::F32_LANES` entries meaningful).
#[inline(always)]
pub(crate) fn lanes<S: Isa>(v: S::f32s) -> [f32; MAX_LANES] {
    let mut buf = [0.0f32; MAX_LANES];
    S::as_mut_simd_f32s(&mut buf[..S::F32_LANES]).0[0] = v;
    buf
}

/// A mask that is true in lanes `0..n`.
#[inline(always)]
fn first_lanes<S: Isa>(s: S, n: usize) -> S::m32s {
    let iota: [f32; MAX_LANES] = core::array::from_fn(|i| i as f32);
    let v = S::as_simd_f32s(&iota[..S::F32_LANES]).0[0];
    s.less_than_f32s(v, s.splat_f32s(n as f32))
}

/// Maximum of `x` (`-inf` for an empty slice). NaN handling is unspecified (it may or may not
/// be returned); callers detect NaN through the sums instead.
#[inline(always)]
pub(crate) fn max<S: Isa>(s: S, x: &[f32], pf: Ahead) -> f32 {
    let op = inl(
        #[inline(always)]
        |a, v| s.max_f32s(a, v),
    );
    s.reduce_max_f32s(fold4(s, x, f32::NEG_INFINITY, pf, op))
}

/// Folds `x` with `op` into four independent accumulators (so four `op`s are in flight), the
/// tail padded with `pad` (`op`'s identity), and returns `op(op(a0, a1), op(a2, a3))`.
#[inline(always)]
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

#[inline(always)]
/// `Σ exp((x − m)·k)` over one block; with `y`, stores each `exp((x − m)·k)` there, or with
/// `shifted`, each `(x − m)·k` (the log-softmax form) instead.
fn sum_exp_block<S: Isa>(s: S, x: &[f32], m: f32, k: f32, mut y: Option<&mut [f32]>, shifted: bool, pf: Ahead) -> f32 {
    let step = 4 * S::F32_LANES;
    let vm = s.splat_f32s(m);
    let vk = s.splat_f32s(k);
    let z = s.splat_f32s(0.0);
    let (mut a0, mut a1, mut a2, mut a3) = (z, z, z, z);
    let (head, tail) = S::as_simd_f32s(x);
    // (t, exp(t)) with t = (x − m)·k; `stored` picks which of the two goes to `y`.
    let te = inl(
        #[inline(always)]
        |v: S::f32s| {
            let t = s.mul_f32s(s.sub_f32s(v, vm), vk);
            (t, exp(s, t))
        },
    );
    let f = inl(
        #[inline(always)]
        |v: S::f32s| te(v).1,
    );
    let stored = inl(
        #[inline(always)]
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
#[inline(always)]
pub(crate) fn sum_exp<S: Isa>(s: S, x: &[f32], m: f32, k: f32, acc: &mut f64, pf: Ahead) {
    for (i, blk) in x.chunks(BLOCK).enumerate() {
        *acc += sum_exp_block(s, blk, m, k, None, false, pf.skip(i * BLOCK)) as f64;
    }
}

/// `y_i = exp((x_i − m)·k)` and `acc += Σ y_i` (pass 2 of the three-pass algorithm).
#[inline(always)]
pub(crate) fn exp_store_sum<S: Isa>(s: S, x: &[f32], y: &mut [f32], m: f32, k: f32, acc: &mut f64, pf: Ahead) {
    for (i, (blk, yb)) in x.chunks(BLOCK).zip(y.chunks_mut(BLOCK)).enumerate() {
        *acc += sum_exp_block(s, blk, m, k, Some(yb), false, pf.skip(i * BLOCK)) as f64;
    }
}

/// `y_i = (x_i − m)·k` and `acc += Σ exp(y_i)` (log-softmax pass 2: the output row is written
/// while the exponentials are computed, so its cache misses overlap the arithmetic).
#[inline(always)]
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
#[inline(always)]
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
        #[inline(always)]
        move |v: S::f32s| if log { s.sub_f32s(v, vc) } else { s.mul_f32s(v, vc) },
    );
    // `patch` relative to the part of `y` that starts at `at` and runs `len` elements.
    let within = |at: usize, len: usize| patch.filter(|p| p.0 >= at && p.0 < at + len).map(|(i, v)| (i - at, v));
    let h = stream_peel::<S>(y, stream);
    if h > 0 {
        write_block(s, &buf[..h], &mut y[..h], false, 0.0, Ahead::NONE, &f, within(0, h));
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
            write_block(s, xb, yb, stream, 0.0, Ahead::NONE, &f, p);
        }
    }
    m
}

/// `y_i −= c` in place.
#[inline(always)]
pub(crate) fn sub_const<S: Isa>(s: S, y: &mut [f32], c: f32) {
    let vc = s.splat_f32s(c);
    let (head, tail) = S::as_mut_simd_f32s(y);
    for v in head.iter_mut() {
        *v = s.sub_f32s(*v, vc);
    }
    for v in tail.iter_mut() {
        *v -= c;
    }
}

/// `y_i *= c` in place.
#[inline(always)]
pub(crate) fn scale<S: Isa>(s: S, y: &mut [f32], c: f32) {
    let vc = s.splat_f32s(c);
    let (head, tail) = S::as_mut_simd_f32s(y);
    for v in head.iter_mut() {
        *v = s.mul_f32s(*v, vc);
    }
    for v in tail.iter_mut() {
        *v *= c;
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
#[inline(always)]
pub(crate) fn online<S: Isa>(s: S, x: &[f32], k: f32, st: &mut Online, pf: Ahead) {
    for (i, blk) in x.chunks(BLOCK).enumerate() {
        online_block(s, blk, k, st, pf.skip(i * BLOCK));
    }
}

/// One block of [`online`].
#[inline(always)]
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

/// Inputs beyond this magnitude (after scaling by `k`) make `x·log2 e` lose integer
/// resolution; rows whose max exceeds it are redone with the online pass.
pub(crate) const EXT_LIMIT: f32 = 4_194_000.0;

/// `2^d` for an integer-valued `d <= 0`, exactly (built from the bits); `0` below `2^-1022`,
/// where the scaled term is below `2^-1000` of the one it is added to (an [`Ext`] block value
/// is at least `2^-0.5`: its largest lane contributes `p·2^0`).
#[inline(always)]
fn pow2_f64(d: f64) -> f64 {
    if d < -1022.0 { 0.0 } else { f64::from_bits(((d as i64 + 1023) as u64) << 52) }
}

/// The two-pass algorithm's first pass (Dukhan & Ablavatski): no max pass; every `exp(x·k)` is
/// kept as `p · 2^n` and accumulated against a running per-lane exponent. Four independent
/// (value, exponent) vector chains per block hide the latency of the rescaling; at the end of
/// each block the lanes are brought to the block's largest exponent in registers (exact
/// powers of two), summed in f32 like every other block reduction here, and the block's one
/// `(value, exponent)` pair is merged into `st` in f64.
#[inline(always)]
pub(crate) fn ext<S: Isa>(s: S, x: &[f32], k: f32, st: &mut Ext, pf: Ahead) {
    let vk = s.splat_f32s(k);
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
            #[inline(always)]
            |xv: S::f32s, keep: Option<S::m32s>, v: &mut S::f32s, e: &mut S::f32s| {
                let xs = s.mul_f32s(xv, vk);
                bad = s.add_f32s(bad, s.mul_f32s(xs, zero));
                let (mut p, mut n) = exp_ext(s, xv, vk);
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

/// How many leading elements of `y` come before its first vector-aligned element (0 without
/// `stream`). The streaming writers store these few with plain stores and start their vector
/// grid after them, so that every full vector lands aligned, as a non-temporal store requires:
/// a buffer from the system allocator is usually 16 bytes past a page boundary, and a grid
/// counted from the row start would then never stream at all. The map is elementwise, so
/// where the grid starts does not change a single output bit.
#[inline(always)]
fn stream_peel<S: Isa>(y: &[f32], stream: bool) -> usize {
    let align = S::F32_LANES * core::mem::size_of::<f32>();
    let mis = y.as_ptr() as usize % align;
    if !stream || mis == 0 {
        return 0;
    }
    ((align - mis) / core::mem::size_of::<f32>()).min(y.len())
}

/// One block of [`write_map`] (no fence).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn write_block<S: Isa>(
    s: S,
    x: &[f32],
    y: &mut [f32],
    stream: bool,
    fill: f32,
    pf: Ahead,
    f: &impl Fn(S::f32s) -> S::f32s,
    patch: Option<(usize, f32)>,
) {
    let (xh, xt) = S::as_simd_f32s(x);
    let n = xh.len() * S::F32_LANES;
    let (yh, _) = S::as_mut_simd_f32s(&mut y[..n]);
    let l = S::F32_LANES;
    // The element `patch.0` of the block gets `patch.1` instead of its mapped value, chosen in
    // the register before the vector is stored (a plain store after a streaming store to the
    // same line would read the line back and stall every later store behind it).
    let pj = patch.filter(|p| p.0 < n).map(|(i, _)| i / l);
    let fp = inl(
        #[inline(always)]
        |j: usize, v: S::f32s| {
            let v = f(v);
            match patch {
                Some((i, pv)) if pj == Some(j) => {
                    let iota: [f32; MAX_LANES] = core::array::from_fn(|i| i as f32);
                    let lane = s.equal_f32s(S::as_simd_f32s(&iota[..l]).0[0], s.splat_f32s((i % l) as f32));
                    s.select_f32s(lane, s.splat_f32s(pv), v)
                }
                _ => v,
            }
        },
    );
    if stream {
        for (j, (d, &v)) in yh.iter_mut().zip(xh).enumerate() {
            if j % 4 == 0 {
                pf.span(j * l, 4 * l);
            }
            s.stream_f32s(d, fp(j, v));
        }
    } else {
        for (j, (d, &v)) in yh.iter_mut().zip(xh).enumerate() {
            if j % 4 == 0 {
                pf.span(j * l, 4 * l);
            }
            *d = fp(j, v);
        }
    }
    if !xt.is_empty() {
        store_partial(s, &mut y[n..x.len()], f(load_padded(s, xt, fill)));
        if let Some((i, pv)) = patch.filter(|p| p.0 >= n) {
            y[i] = pv;
        }
    }
}

/// The next row of a software-pipelined pair (see [`write_map`]): its f32 data (the same
/// length as the row being written), the inverse temperature, its online state and its
/// prefetch domain.
pub(crate) struct Next<'a, 'p> {
    pub x: &'a [f32],
    pub k: f32,
    pub st: &'a mut Online,
    pub pf: Ahead<'p>,
}

/// `y_i = f(x_i)` over a row, prefetching ahead; with `stream`, aligned full vectors bypass the
/// cache. Tail lanes are padded with `fill`.
///
/// With `next`, fused with [`online`] over the next row (software pipelining across rows):
/// block by block, the next row's online step, then this row's block written. The two reads
/// and the write overlap in one loop, the way a triad does, where a write pass followed by a
/// read pass would leave the write bandwidth idle half the time. Bit for bit the same as the
/// two calls made separately: the same blocks, in the same order, through the same code. The
/// callers pass `next` as a constant `None` or `Some`, so each inlined copy compiles one loop.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn write_map<S: Isa>(
    s: S,
    x: &[f32],
    y: &mut [f32],
    stream: bool,
    fill: f32,
    pf: Ahead,
    next: Option<Next<'_, '_>>,
    f: impl Fn(S::f32s) -> S::f32s,
) {
    let h = stream_peel::<S>(y, stream);
    if h > 0 {
        write_block(s, &x[..h], &mut y[..h], false, fill, Ahead::NONE, &f, None);
    }
    let blocks = x[h..].chunks(BLOCK).zip(y[h..].chunks_mut(BLOCK));
    match next {
        None => {
            for (i, (xb, yb)) in blocks.enumerate() {
                write_block(s, xb, yb, stream, fill, pf.skip(h + i * BLOCK), &f, None);
            }
        }
        Some(Next { x: nx, k, st, pf: npf }) => {
            // The next row's blocks count from its start (its state depends on them); this
            // row's write grid starts after the peeled head (see `stream_peel`), so it has at
            // most as many blocks.
            let mut blocks = blocks;
            for (i, nb) in nx.chunks(BLOCK).enumerate() {
                online_block(s, nb, k, st, npf.skip(i * BLOCK));
                if let Some((xb, yb)) = blocks.next() {
                    write_block(s, xb, yb, stream, fill, pf.skip(h + i * BLOCK), &f, None);
                }
            }
        }
    }
    if stream {
        s.stream_fence();
    }
}

/// `y_i = exp((x_i − m)·k) · c`; with `stream`, aligned full vectors bypass the cache.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn write_softmax<S: Isa>(s: S, x: &[f32], y: &mut [f32], m: f32, k: f32, c: f32, stream: bool, pf: Ahead) {
    write_map(s, x, y, stream, f32::NEG_INFINITY, pf, None, softmax_map(s, m, k, c));
}

/// [`write_softmax`] with the online pass over the next row in the same loop (see
/// [`write_map`]). A separate function so the plain write sites do not compile the fused loop.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn write_softmax_next<S: Isa>(
    s: S,
    x: &[f32],
    y: &mut [f32],
    m: f32,
    k: f32,
    c: f32,
    stream: bool,
    pf: Ahead,
    next: Next<'_, '_>,
) {
    write_map(s, x, y, stream, f32::NEG_INFINITY, pf, Some(next), softmax_map(s, m, k, c));
}

#[inline(always)]
fn softmax_map<S: Isa>(s: S, m: f32, k: f32, c: f32) -> impl Fn(S::f32s) -> S::f32s {
    let (vm, vk, vc) = (s.splat_f32s(m), s.splat_f32s(k), s.splat_f32s(c));
    inl(
        #[inline(always)]
        move |v: S::f32s| s.mul_f32s(exp(s, s.mul_f32s(s.sub_f32s(v, vm), vk)), vc),
    )
}

/// `y_i = (x_i − m)·k − ls` (one rounding: fused multiply-add).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn write_log_softmax<S: Isa>(
    s: S,
    x: &[f32],
    y: &mut [f32],
    m: f32,
    k: f32,
    ls: f32,
    stream: bool,
    pf: Ahead,
) {
    write_map(s, x, y, stream, 0.0, pf, None, log_softmax_map(s, m, k, ls));
}

/// [`write_log_softmax`] with the online pass over the next row in the same loop.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn write_log_softmax_next<S: Isa>(
    s: S,
    x: &[f32],
    y: &mut [f32],
    m: f32,
    k: f32,
    ls: f32,
    stream: bool,
    pf: Ahead,
    next: Next<'_, '_>,
) {
    write_map(s, x, y, stream, 0.0, pf, Some(next), log_softmax_map(s, m, k, ls));
}

#[inline(always)]
fn log_softmax_map<S: Isa>(s: S, m: f32, k: f32, ls: f32) -> impl Fn(S::f32s) -> S::f32s {
    let (vm, vk, vl) = (s.splat_f32s(m), s.splat_f32s(k), s.splat_f32s(-ls));
    inl(
        #[inline(always)]
        move |v: S::f32s| s.mul_add_f32s(s.sub_f32s(v, vm), vk, vl),
    )
}

#[inline(always)]
fn dot_block<S: Isa>(s: S, a: &[f32], b: &[f32], pa: Ahead, pb: Ahead) -> f32 {
    let z = s.splat_f32s(0.0);
    let (mut a0, mut a1, mut a2, mut a3) = (z, z, z, z);
    let (ah, at) = S::as_simd_f32s(a);
    let (bh, bt) = S::as_simd_f32s(b);
    let mut ia = ah.chunks_exact(4);
    let mut ib = bh.chunks_exact(4);
    let step = 4 * S::F32_LANES;
    for (j, (c, d)) in (&mut ia).zip(&mut ib).enumerate() {
        pa.span(j * step, step);
        pb.span(j * step, step);
        a0 = s.mul_add_f32s(c[0], d[0], a0);
        a1 = s.mul_add_f32s(c[1], d[1], a1);
        a2 = s.mul_add_f32s(c[2], d[2], a2);
        a3 = s.mul_add_f32s(c[3], d[3], a3);
    }
    for (&c, &d) in ia.remainder().iter().zip(ib.remainder()) {
        a0 = s.mul_add_f32s(c, d, a0);
    }
    if !at.is_empty() {
        a1 = s.mul_add_f32s(load_padded(s, at, 0.0), load_padded(s, bt, 0.0), a1);
    }
    s.reduce_sum_f32s(s.add_f32s(s.add_f32s(a0, a1), s.add_f32s(a2, a3)))
}

/// `acc += Σ a_i·b_i` in blocks.
#[inline(always)]
pub(crate) fn dot<S: Isa>(s: S, a: &[f32], b: &[f32], acc: &mut f64, pa: Ahead, pb: Ahead) {
    for (i, (x, y)) in a.chunks(BLOCK).zip(b.chunks(BLOCK)).enumerate() {
        *acc += dot_block(s, x, y, pa.skip(i * BLOCK), pb.skip(i * BLOCK)) as f64;
    }
}

/// `acc += Σ a_i` in blocks, and `mx = max(mx, max_i b_i)`.
#[inline(always)]
pub(crate) fn sum_and_max<S: Isa>(s: S, a: &[f32], b: &[f32], acc: &mut f64, mx: &mut f32, pa: Ahead, pb: Ahead) {
    for (i, (x, y)) in a.chunks(BLOCK).zip(b.chunks(BLOCK)).enumerate() {
        let (pa, pb) = (pa.skip(i * BLOCK), pb.skip(i * BLOCK));
        let op = inl(
            #[inline(always)]
            |a, v| s.add_f32s(a, v),
        );
        *acc += s.reduce_sum_f32s(fold4(s, x, 0.0, pa, op)) as f64;
        let bm = max(s, y, pb);
        if bm > *mx {
            *mx = bm;
        }
    }
}

/// Softmax backward map: `dx_i = (y_i·(dy_i − dot))·k` (`k = 1/τ`; multiplying by 1 is exact).
/// With `stream`, aligned full vectors of `dx` bypass the cache.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn softmax_bwd<S: Isa>(s: S, y: &[f32], dy: &[f32], dx: &mut [f32], dot: f32, k: f32, stream: bool) {
    let (vd, vk) = (s.splat_f32s(dot), s.splat_f32s(k));
    let f = inl(
        #[inline(always)]
        |a: S::f32s, g: S::f32s| s.mul_f32s(s.mul_f32s(a, s.sub_f32s(g, vd)), vk),
    );
    map2::<S>(s, y, dy, dx, stream, f);
}

/// Log-softmax backward map: `dx_i = (dy_i − exp(y_i)·sum)·k`, as [`softmax_bwd`].
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn log_softmax_bwd<S: Isa>(s: S, y: &[f32], dy: &[f32], dx: &mut [f32], sum: f32, k: f32, stream: bool) {
    let (vs, vk) = (s.splat_f32s(-sum), s.splat_f32s(k));
    let f = inl(
        #[inline(always)]
        |a: S::f32s, g: S::f32s| s.mul_f32s(s.mul_add_f32s(exp(s, a), vs, g), vk),
    );
    map2::<S>(s, y, dy, dx, stream, f);
}

/// `out_i = f(a_i, b_i)`; with `stream`, the unaligned head of `out` is peeled (see
/// [`stream_peel`]) and the aligned full vectors bypass the cache.
#[inline(always)]
fn map2<S: Isa>(s: S, a: &[f32], b: &[f32], out: &mut [f32], stream: bool, f: impl Fn(S::f32s, S::f32s) -> S::f32s) {
    let h = stream_peel::<S>(out, stream);
    if h > 0 {
        let v = f(load_padded(s, &a[..h], 0.0), load_padded(s, &b[..h], 0.0));
        store_partial(s, &mut out[..h], v);
    }
    let (a, b, out) = (&a[h..], &b[h..], &mut out[h..]);
    let (ah, at) = S::as_simd_f32s(a);
    let (bh, bt) = S::as_simd_f32s(b);
    let n = ah.len() * S::F32_LANES;
    let (oh, _) = S::as_mut_simd_f32s(&mut out[..n]);
    if stream {
        for ((o, &x), &y) in oh.iter_mut().zip(ah).zip(bh) {
            s.stream_f32s(o, f(x, y));
        }
    } else {
        for ((o, &x), &y) in oh.iter_mut().zip(ah).zip(bh) {
            *o = f(x, y);
        }
    }
    if !at.is_empty() {
        let v = f(load_padded(s, at, 0.0), load_padded(s, bt, 0.0));
        store_partial(s, &mut out[n..a.len()], v);
    }
    if stream {
        s.stream_fence();
    }
}

// ---------------------------------------------------------------------------------------------
// Loss kernels (see `crate::loss`).

/// The logit transform of the losses: `t = x·k` or, with a soft cap `c > 0`,
/// `t = c·tanh(x/c)·k`, keeping `-inf` as `-inf` (a masked class stays masked).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Xform {
    pub k: f32,
    /// 0 for no cap.
    pub cap: f32,
}

impl Xform {
    #[inline(always)]
    pub fn is_identity(&self) -> bool {
        self.k == 1.0 && self.cap == 0.0
    }
    #[inline(always)]
    pub fn apply<S: Isa>(&self, s: S, v: S::f32s) -> S::f32s {
        if self.cap == 0.0 {
            return s.mul_f32s(v, s.splat_f32s(self.k));
        }
        let c = s.splat_f32s(self.cap);
        let th = super::exp::tanh(s, s.div_f32s(v, c));
        let t = s.mul_f32s(s.mul_f32s(th, c), s.splat_f32s(self.k));
        let ninf = s.splat_f32s(f32::NEG_INFINITY);
        s.select_f32s(s.equal_f32s(v, ninf), ninf, t)
    }
    /// The scalar form (one lane of [`Xform::apply`]).
    #[inline(always)]
    pub fn apply1(&self, v: f32) -> f32 {
        let sc = pulp::Scalar::new();
        self.apply(sc, v)
    }
}

/// `t = xf(x)` elementwise.
#[inline(always)]
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
#[inline(always)]
pub(crate) fn dot_guarded<S: Isa>(s: S, v: &[f32], t: &[f32], acc: &mut f64) {
    let z = s.splat_f32s(0.0);
    let f = inl(
        #[inline(always)]
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
#[inline(always)]
pub(crate) fn ce_grad<S: Isa>(s: S, t: &[f32], g: &mut [f32], m: f32, c1: f32, sub: Sub<'_>, xf: Xform) {
    let (vm, vc1) = (s.splat_f32s(m), s.splat_f32s(c1));
    let vk = s.splat_f32s(xf.k);
    let inv_ck = if xf.cap == 0.0 { 0.0 } else { 1.0 / (xf.cap * xf.k) };
    let vick = s.splat_f32s(inv_ck);
    let one = s.splat_f32s(1.0);
    let capped = xf.cap != 0.0;
    let chain = inl(
        #[inline(always)]
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
        #[inline(always)]
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
#[inline(always)]
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

// ---------------------------------------------------------------------------------------------
// Attention kernels (see `crate::attention`).

/// `x_i = exp(x_i − m)` in place; returns `Σ x_i` (f32 inside blocks of [`BLOCK`], f64 across).
/// `m` must not be `-inf` (callers skip fully masked rows); entries equal to `-inf` become 0.
#[inline(always)]
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
#[inline(always)]
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
#[inline(always)]
pub(crate) fn softcap_inplace<S: Isa>(s: S, k: f32, cap: f32, x: &mut [f32], g: Option<&mut [f32]>) {
    let (vk, vc, vic, one) = (s.splat_f32s(k), s.splat_f32s(cap), s.splat_f32s(1.0 / cap), s.splat_f32s(1.0));
    let one_lane = |v: S::f32s| -> (S::f32s, S::f32s) {
        let u = super::exp::tanh(s, s.mul_f32s(s.mul_f32s(v, vk), vic));
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::{SimdLevel, Task, dispatch};

    /// What [`WritePass`] runs.
    #[derive(Clone, Copy, Debug)]
    enum Kind {
        /// `write_softmax` / `write_log_softmax`.
        Write,
        /// The same fused with the online pass over the second input.
        WriteNext,
        /// `softmax_bwd` / `log_softmax_bwd`, the second input as the upstream gradient.
        Backward,
        /// `finish_max_next`, the max of the second input returned.
        FinishMaxNext,
    }

    /// One write pass over `x → y` (the softmax or the log-softmax form); returns the fused
    /// next-row state (`WriteNext`; empty otherwise).
    struct WritePass<'a> {
        x: &'a [f32],
        y: &'a mut [f32],
        other: &'a [f32],
        kind: Kind,
        log: bool,
        stream: bool,
    }

    impl Task for WritePass<'_> {
        type Output = (f32, f64);
        #[inline(always)]
        fn run<S: Isa>(self, s: S) -> (f32, f64) {
            let (m, k, c) = (0.75f32, 1.25f32, 0.3f32);
            let WritePass { x, y, other, kind, log, stream } = self;
            let mut st = Online::EMPTY;
            match (kind, log) {
                (Kind::Write, false) => write_softmax(s, x, y, m, k, c, stream, Ahead::NONE),
                (Kind::Write, true) => write_log_softmax(s, x, y, m, k, c, stream, Ahead::NONE),
                (Kind::WriteNext, log) => {
                    let n = Next { x: other, k, st: &mut st, pf: Ahead::NONE };
                    if log {
                        write_log_softmax_next(s, x, y, m, k, c, stream, Ahead::NONE, n);
                    } else {
                        write_softmax_next(s, x, y, m, k, c, stream, Ahead::NONE, n);
                    }
                }
                (Kind::Backward, false) => softmax_bwd(s, x, other, y, c, k, stream),
                (Kind::Backward, true) => log_softmax_bwd(s, x, other, y, c, k, stream),
                (Kind::FinishMaxNext, log) => {
                    st.m = finish_max_next(s, x, y, c, log, stream, other, None);
                    s.stream_fence();
                    assert_eq!(st.m.to_bits(), max(s, other, Ahead::NONE).to_bits());
                }
            }
            (st.m, st.d)
        }
    }

    /// The streaming writers peel the output's unaligned head (see `stream_peel`), so they
    /// reach aligned vectors wherever the output starts: at every offset from a 64-byte
    /// boundary and every length (tails, and rows shorter than the peel), the streamed output
    /// and the fused next-row state are bit for bit the plain (cached) ones, at every level,
    /// for the forward writes, the backward maps and the pipelined three-pass finish (whose
    /// fused max must also be the plain max).
    #[test]
    fn streamed_writes_match_plain_writes_at_every_alignment() {
        let len_max = 3 * BLOCK + 40;
        let x: Vec<f32> = (0..len_max).map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.07).collect();
        let nx: Vec<f32> = (0..len_max).map(|i| ((i * 53 % 89) as f32 - 44.0) * 0.11).collect();
        // 64-byte aligned backing store, so `off` is the output's exact misalignment in f32s.
        let mut back = vec![[0.0f32; 16]; len_max / 16 + 2];
        for level in SimdLevel::available() {
            for log in [false, true] {
                for kind in [Kind::Write, Kind::WriteNext, Kind::Backward, Kind::FinishMaxNext] {
                    for len in (0..70).chain([BLOCK - 1, BLOCK + 17, len_max - 16]) {
                        for off in 0..16 {
                            let mut want = vec![0.0f32; len];
                            let (xr, other) = (&x[..len], &nx[..len]);
                            let run = |y: &mut [f32], stream| {
                                dispatch(level, WritePass { x: xr, y, other, kind, log, stream })
                            };
                            let sw = run(&mut want, false);
                            let flat = back.as_flattened_mut();
                            let y = &mut flat[off..off + len];
                            let sg = run(y, true);
                            let same = y.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits());
                            assert!(same, "{level:?} log={log} {kind:?} len={len} off={off}");
                            assert_eq!(sg.0.to_bits(), sw.0.to_bits());
                            assert_eq!(sg.1.to_bits(), sw.1.to_bits());
                        }
                    }
                }
            }
        }
    }

    /// `stream_peel` stops exactly at the first vector-aligned element (or the end of a short
    /// row), and peels nothing when not streaming.
    #[test]
    fn stream_peel_reaches_the_first_aligned_vector() {
        fn check<S: Isa>() {
            let align = S::F32_LANES * 4;
            let mut back = vec![[0.0f32; 16]; 4];
            let flat = back.as_flattened_mut();
            for off in 0..16 {
                for len in [0, 1, 5, 15, 16, 40] {
                    let y = &flat[off..off + len];
                    let h = stream_peel::<S>(y, true);
                    assert_eq!(stream_peel::<S>(y, false), 0);
                    assert!(h < S::F32_LANES.max(1) && h <= len, "off={off} len={len} h={h}");
                    if h < len {
                        assert_eq!(y[h..].as_ptr() as usize % align, 0, "off={off} len={len}");
                    }
                }
            }
        }
        check::<pulp::Scalar>();
        #[cfg(target_arch = "x86_64")]
        {
            check::<pulp::x86::V3>();
            check::<pulp::x86::V4>();
        }
        #[cfg(target_arch = "aarch64")]
        check::<pulp::aarch64::Neon>();
    }
}
