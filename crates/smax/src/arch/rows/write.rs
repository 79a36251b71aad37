//! Write passes: the forward's output maps (streaming, or fused with the next row's online
//! pass) and the backward's reductions and maps.

use super::*;

/// How many leading elements of `y` come before its first vector-aligned element (0 without
/// `stream`). The streaming writers store these few with plain stores and start their vector
/// grid after them, so that every full vector lands aligned, as a non-temporal store requires:
/// a buffer from the system allocator is usually 16 bytes past a page boundary, and a grid
/// counted from the row start would then never stream at all. The map is elementwise, so
/// where the grid starts does not change a single output bit.
#[cfg_attr(not(debug_assertions), inline(always))]
#[cfg_attr(debug_assertions, inline)]
pub(super) fn stream_peel<S: Isa>(y: &[f32], stream: bool) -> usize {
    let align = S::F32_LANES * core::mem::size_of::<f32>();
    let mis = y.as_ptr() as usize % align;
    if !stream || mis == 0 {
        return 0;
    }
    ((align - mis) / core::mem::size_of::<f32>()).min(y.len())
}

/// How a write pass stores: `stream` sends aligned full vectors past the cache, `fill` pads
/// the tail lanes before the map, `pf` prefetches the input ahead.
#[derive(Clone, Copy)]
pub(super) struct Store<'p> {
    pub stream: bool,
    pub fill: f32,
    pub pf: Ahead<'p>,
}

/// One block of [`write_map`] (no fence).
#[cfg_attr(not(debug_assertions), inline(always))]
#[cfg_attr(debug_assertions, inline)]
pub(super) fn write_block<S: Isa>(
    s: S,
    (x, y): (&[f32], &mut [f32]),
    Store { stream, fill, pf }: Store,
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
        #[cfg_attr(not(debug_assertions), inline(always))]
        #[cfg_attr(debug_assertions, inline)]
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
#[cfg_attr(not(debug_assertions), inline(always))]
#[cfg_attr(debug_assertions, inline)]
fn write_map<S: Isa>(
    s: S,
    (x, y): (&[f32], &mut [f32]),
    Store { stream, fill, pf }: Store,
    next: Option<Next<'_, '_>>,
    f: impl Fn(S::f32s) -> S::f32s,
) {
    let at = inl(
        #[cfg_attr(not(debug_assertions), inline(always))]
        #[cfg_attr(debug_assertions, inline)]
        |i: usize| Store { stream, fill, pf: pf.skip(i) },
    );
    let h = stream_peel::<S>(y, stream);
    if h > 0 {
        write_block(s, (&x[..h], &mut y[..h]), Store { stream: false, fill, pf: Ahead::NONE }, &f, None);
    }
    let blocks = x[h..].chunks(BLOCK).zip(y[h..].chunks_mut(BLOCK));
    match next {
        None => {
            for (i, (xb, yb)) in blocks.enumerate() {
                write_block(s, (xb, yb), at(h + i * BLOCK), &f, None);
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
                    write_block(s, (xb, yb), at(h + i * BLOCK), &f, None);
                }
            }
        }
    }
    if stream {
        s.stream_fence();
    }
}

/// The map of a row's write pass, from the row's max `m` and inverse temperature `k`.
#[derive(Clone, Copy, Debug)]
pub(crate) enum RowMap {
    /// `y = exp((x − m)·k) · c` (`c = 1/Σ`).
    Softmax { m: f32, k: f32, c: f32 },
    /// `y = (x − m)·k − ls` (`ls = ln Σ`; one rounding: fused multiply-add).
    LogSoftmax { m: f32, k: f32, ls: f32 },
}

/// `y_i = map(x_i)`; with `stream`, aligned full vectors bypass the cache; with `next`, fused
/// with the online pass over the next row (see [`write_map`]). Callers pass `map` and `next`
/// as constants of their branch, so each inlined copy compiles one map and one loop.
#[cfg_attr(not(debug_assertions), inline(always))]
#[cfg_attr(debug_assertions, inline)]
pub(crate) fn write_row<S: Isa>(
    s: S,
    x: &[f32],
    y: &mut [f32],
    map: RowMap,
    stream: bool,
    pf: Ahead,
    next: Option<Next<'_, '_>>,
) {
    match map {
        RowMap::Softmax { m, k: 1.0, c } => {
            // `(x − m)·1` is `x − m` exactly: the same bits, one vector multiply less.
            let (vm, vc) = (s.splat_f32s(m), s.splat_f32s(c));
            let f = inl(
                #[cfg_attr(not(debug_assertions), inline(always))]
                #[cfg_attr(debug_assertions, inline)]
                move |v: S::f32s| s.mul_f32s(exp(s, s.sub_f32s(v, vm)), vc),
            );
            write_map(s, (x, y), Store { stream, fill: f32::NEG_INFINITY, pf }, next, f)
        }
        RowMap::Softmax { m, k, c } => {
            let (vm, vk, vc) = (s.splat_f32s(m), s.splat_f32s(k), s.splat_f32s(c));
            let f = inl(
                #[cfg_attr(not(debug_assertions), inline(always))]
                #[cfg_attr(debug_assertions, inline)]
                move |v: S::f32s| s.mul_f32s(exp(s, s.mul_f32s(s.sub_f32s(v, vm), vk)), vc),
            );
            write_map(s, (x, y), Store { stream, fill: f32::NEG_INFINITY, pf }, next, f)
        }
        RowMap::LogSoftmax { m, k, ls } => {
            let (vm, vk, vl) = (s.splat_f32s(m), s.splat_f32s(k), s.splat_f32s(-ls));
            let f = inl(
                #[cfg_attr(not(debug_assertions), inline(always))]
                #[cfg_attr(debug_assertions, inline)]
                move |v: S::f32s| s.mul_add_f32s(s.sub_f32s(v, vm), vk, vl),
            );
            write_map(s, (x, y), Store { stream, fill: 0.0, pf }, next, f)
        }
    }
}

#[cfg_attr(not(debug_assertions), inline(always))]
#[cfg_attr(debug_assertions, inline)]
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
#[cfg_attr(not(debug_assertions), inline(always))]
#[cfg_attr(debug_assertions, inline)]
pub(crate) fn dot<S: Isa>(s: S, a: &[f32], b: &[f32], acc: &mut f64, pa: Ahead, pb: Ahead) {
    for (i, (x, y)) in a.chunks(BLOCK).zip(b.chunks(BLOCK)).enumerate() {
        *acc += dot_block(s, x, y, pa.skip(i * BLOCK), pb.skip(i * BLOCK)) as f64;
    }
}

/// `acc += Σ a_i` in blocks, and `mx = max(mx, max_i b_i)`.
#[cfg_attr(not(debug_assertions), inline(always))]
#[cfg_attr(debug_assertions, inline)]
pub(crate) fn sum_and_max<S: Isa>(s: S, a: &[f32], b: &[f32], acc: &mut f64, mx: &mut f32, pa: Ahead, pb: Ahead) {
    for (i, (x, y)) in a.chunks(BLOCK).zip(b.chunks(BLOCK)).enumerate() {
        let (pa, pb) = (pa.skip(i * BLOCK), pb.skip(i * BLOCK));
        let op = inl(
            #[cfg_attr(not(debug_assertions), inline(always))]
            #[cfg_attr(debug_assertions, inline)]
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
#[cfg_attr(not(debug_assertions), inline(always))]
#[cfg_attr(debug_assertions, inline)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn softmax_bwd<S: Isa>(s: S, y: &[f32], dy: &[f32], dx: &mut [f32], dot: f32, k: f32, stream: bool) {
    let (vd, vk) = (s.splat_f32s(dot), s.splat_f32s(k));
    let f = inl(
        #[cfg_attr(not(debug_assertions), inline(always))]
        #[cfg_attr(debug_assertions, inline)]
        |a: S::f32s, g: S::f32s| s.mul_f32s(s.mul_f32s(a, s.sub_f32s(g, vd)), vk),
    );
    map2::<S>(s, y, dy, dx, stream, f);
}

/// Log-softmax backward map: `dx_i = (dy_i − exp(y_i)·sum)·k`, as [`softmax_bwd`].
#[cfg_attr(not(debug_assertions), inline(always))]
#[cfg_attr(debug_assertions, inline)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn log_softmax_bwd<S: Isa>(s: S, y: &[f32], dy: &[f32], dx: &mut [f32], sum: f32, k: f32, stream: bool) {
    let (vs, vk) = (s.splat_f32s(-sum), s.splat_f32s(k));
    let f = inl(
        #[cfg_attr(not(debug_assertions), inline(always))]
        #[cfg_attr(debug_assertions, inline)]
        |a: S::f32s, g: S::f32s| s.mul_f32s(s.mul_add_f32s(exp(s, a), vs, g), vk),
    );
    map2::<S>(s, y, dy, dx, stream, f);
}

/// `out_i = f(a_i, b_i)`; with `stream`, the unaligned head of `out` is peeled (see
/// [`stream_peel`]) and the aligned full vectors bypass the cache.
#[cfg_attr(not(debug_assertions), inline(always))]
#[cfg_attr(debug_assertions, inline)]
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
