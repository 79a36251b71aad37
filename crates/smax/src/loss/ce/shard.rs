//! The cross-entropy rows of one vocabulary shard: the statistics of the shard's slice of a
//! row (pass 1), and, once the shards' statistics are combined, the gradient of the slice
//! from the global log-sum-exp (pass 2). The same tile functions as the whole-row kernel.

use super::*;
use crate::loss::ShardRow;
use crate::scalar64::Sum;

/// The local target of a row whose target lies in another shard (no column matches it).
pub(crate) const OUTSIDE: i64 = i64::MAX;
/// The local target of an ignored row: the ignore index of a shard's rows, since the caller's
/// may equal a local column index.
pub(crate) const IGNORED: i64 = i64::MIN;

/// A row's target as a shard's columns see it: `y − start` when it lies in the shard's `len`
/// columns, [`IGNORED`] when it is the caller's ignore index, else [`OUTSIDE`].
pub(crate) fn local_target(y: i64, start: usize, len: usize, ignore: i64) -> i64 {
    if y == ignore {
        return IGNORED;
    }
    let y = y as usize;
    if (start..start + len).contains(&y) { (y - start) as i64 } else { OUTSIDE }
}

/// What pass 2 needs of a row from pass 1: the slice's max transformed logit (f32 rows), or
/// that the row runs in f64.
#[derive(Clone, Copy)]
pub(crate) enum Local {
    /// Plain f32 logits, no cap or smoothing: `m` the max of the raw logits (`t = x·k`), as
    /// the whole-row kernel's pipelined paths take it.
    Raw {
        m: f32,
    },
    /// The max of the transformed logits.
    F32 {
        m: f32,
    },
    Wide,
}

/// Whether a row of `T` takes the raw path ([`Local::Raw`]).
#[inline]
fn raw<T: Element>(c: &Ce<'_>) -> bool {
    T::cast::<f32>(&[] as &[T]).is_some() && c.cap64 == 0.0 && c.eps == 0.0
}

/// The class weight of global class `k` (1 without weights).
#[inline]
fn weight(c: &Ce<'_>, k: usize) -> f64 {
    c.weights.map_or(1.0, |w| w[k] as f64)
}

/// Pass 1 over a group of rows: each row's [`ShardRow`] over this shard and its [`Local`].
/// `y` holds local targets ([`local_target`]); `start` is the shard's first class (the class
/// weights are the whole vocabulary's).
pub(crate) struct ShardStats<'a, T> {
    pub c: Ce<'a>,
    pub x: &'a [T],
    pub xs: usize,
    pub len: usize,
    pub y: &'a [i64],
    pub start: usize,
}

impl<T: Element> Task for ShardStats<'_, T> {
    type Output = Vec<(ShardRow, Local)>;
    #[cfg_attr(not(debug_assertions), inline(always))]
    #[cfg_attr(debug_assertions, inline)]
    fn run<S: Isa>(self, s: S) -> Vec<(ShardRow, Local)> {
        let ShardStats { c, x, xs, len, y, start } = self;
        // A plain loop, no closure: the row code must inline into this ISA's region.
        let mut out = Vec::with_capacity(y.len());
        for (r, &yr) in y.iter().enumerate() {
            let xr = &x[r * xs..r * xs + len];
            // The first pass reads the row from memory: prefetched ahead of it.
            let pf = ahead(&x[r * xs..]);
            let st = if T::cast::<f64>(xr).is_some() { None } else { stats_f32(s, &c, xr, yr, start, pf) };
            out.push(match st {
                Some(st) => st,
                None => (stats_f64(&c, xr, yr, start), Local::Wide),
            });
        }
        out
    }
}

/// A row's statistics on the f32 path, or `None` when the row is not regular there (NaN,
/// `±inf` after the transform, every logit `-inf`, or a smoothing sum that overflowed): the
/// f64 path takes it.
#[cfg_attr(not(debug_assertions), inline(always))]
#[cfg_attr(debug_assertions, inline)]
fn stats_f32<S: Isa, T: Element>(
    s: S,
    c: &Ce<'_>,
    x: &[T],
    y: i64,
    start: usize,
    pf: Ahead,
) -> Option<(ShardRow, Local)> {
    if let (true, Some(xr)) = (raw::<T>(c), T::cast::<f32>(x)) {
        // `lse = m·k + ln Σ exp((x − m)·k)` over the raw logits, in one online pass (the
        // row's first read, from memory, overlaps the exponentials).
        let st = seg_online(s, xr, c.xf.k, pf);
        if !regular(st) {
            return None;
        }
        let (m, d) = (st.m, st.d);
        let ty = if y >= 0 && (y as usize) < x.len() { xr[y as usize] as f64 * c.k64 } else { 0.0 };
        return Some((ShardRow { lse: m as f64 * c.k64 + d.ln(), target_logit: ty, logit_sum: 0.0 }, Local::Raw { m }));
    }
    let smooth = c.eps != 0.0;
    let mut m = f32::NEG_INFINITY;
    let mut sv = 0.0f64;
    tiles(
        s,
        c.xf,
        x,
        pf,
        #[cfg_attr(not(debug_assertions), inline(always))]
        #[cfg_attr(debug_assertions, inline)]
        |off, t, p| {
            let bm = match c.weights {
                Some(w) if smooth => {
                    let o = start + off;
                    k::dot_guarded(s, &w[o..o + t.len()], t, &mut sv);
                    k::max(s, t, p)
                }
                None if smooth => {
                    let mut mx = f32::NEG_INFINITY;
                    k::sum_and_max(s, t, t, &mut sv, &mut mx, p, Ahead::NONE);
                    mx
                }
                _ => k::max(s, t, p),
            };
            if bm > m || bm.is_nan() {
                m = bm;
            }
        },
    );
    let mut d = 0.0f64;
    if m.is_finite() {
        tiles(
            s,
            c.xf,
            x,
            Ahead::NONE,
            #[cfg_attr(not(debug_assertions), inline(always))]
            #[cfg_attr(debug_assertions, inline)]
            |_, t, p| k::sum_exp(s, t, m, 1.0, &mut d, p),
        );
    }
    if !regular(k::Online { m, d }) || !sv.is_finite() {
        return None;
    }
    let ty = if y >= 0 && (y as usize) < x.len() { c.xf.apply1(x[y as usize].to_f32()) as f64 } else { 0.0 };
    Some((ShardRow { lse: m as f64 + d.ln(), target_logit: ty, logit_sum: sv }, Local::F32 { m }))
}

/// The transformed logit `t = k·cap(x)` in f64 (the cap keeps `-inf`).
#[inline]
fn t64(c: &Ce<'_>, v: f64) -> f64 {
    super::wide::capped(c, v) * c.k64
}

/// A row's statistics in f64 (f64 logits, and rows the f32 path does not take): NaN anywhere
/// gives NaN, `+inf` (no cap) `+inf`, every logit `-inf` gives `-inf`.
fn stats_f64<T: Element>(c: &Ce<'_>, x: &[T], y: i64, start: usize) -> ShardRow {
    let (mut m, mut nan) = (f64::NEG_INFINITY, false);
    for v in x {
        let t = t64(c, v.to_f64());
        nan |= t.is_nan();
        m = m.max(t);
    }
    let lse = if nan {
        f64::NAN
    } else if !m.is_finite() {
        m
    } else {
        let mut d = Sum::default();
        for v in x {
            d.add((t64(c, v.to_f64()) - m).exp());
        }
        m + d.get().ln()
    };
    let ty = if y >= 0 && (y as usize) < x.len() { t64(c, x[y as usize].to_f64()) } else { 0.0 };
    let logit_sum = if c.eps != 0.0 {
        let mut s = Sum::default();
        for (i, v) in x.iter().enumerate() {
            s.add(weight(c, start + i) * t64(c, v.to_f64()));
        }
        s.get()
    } else {
        0.0
    };
    ShardRow { lse, target_logit: ty, logit_sum }
}

/// Pass 2 over a group of rows: the gradient of the shard's slice from the global statistics
/// `rows` and pass 1's [`Local`] of each row.
pub(crate) struct ShardGrad<'a, T> {
    pub c: Ce<'a>,
    pub x: &'a [T],
    pub xs: usize,
    pub len: usize,
    pub y: &'a [i64],
    /// The rows' global targets (for the class weight of a target in another shard).
    pub y_global: &'a [i64],
    pub start: usize,
    pub rows: &'a [ShardRow],
    pub local: &'a [Local],
    pub g: &'a mut [T],
    pub gs: usize,
    /// Whether gradient rows of the raw path bypass the cache.
    pub stream: bool,
}

impl<T: Element> Task for ShardGrad<'_, T> {
    type Output = ();
    #[cfg_attr(not(debug_assertions), inline(always))]
    #[cfg_attr(debug_assertions, inline)]
    fn run<S: Isa>(self, s: S) {
        let ShardGrad { c, x, xs, len, y, y_global, start, rows, local, g, gs, stream } = self;
        for (r, &yr) in y.iter().enumerate() {
            let xr = &x[r * xs..r * xs + len];
            let gr = &mut g[r * gs..r * gs + len];
            let lse = rows[r].lse;
            if yr == c.ignore_index {
                crate::engine::fill(gr, 0.0);
                continue;
            }
            // As `cross_entropy`: every logit `-inf` gives a zero gradient, NaN (or `+inf`
            // without a cap) a NaN one.
            if !lse.is_finite() {
                crate::engine::fill(gr, if lse == f64::NEG_INFINITY { 0.0 } else { f64::NAN });
                continue;
            }
            let wy = weight(&c, y_global[r] as usize);
            let alpha = (1.0 - c.eps) * wy;
            let beta = c.eps / c.classes;
            let a = c.main_scale * (alpha + beta * c.wsum) + c.z_scale * 2.0 * c.lambda * lse;
            let ya = c.main_scale * alpha;
            let b = c.main_scale * beta;
            let local_y = (yr >= 0 && (yr as usize) < len).then_some(yr as usize);
            match local[r] {
                Local::Wide => grad_f64(&c, xr, gr, lse, a, b, ya, local_y, start),
                Local::F32 { m } => grad_f32(s, &c, xr, gr, lse, m, a, b, ya, local_y, start),
                Local::Raw { m } => {
                    if let (Some(xf), Some(gf)) = (T::cast::<f32>(xr), T::cast_mut::<f32>(gr)) {
                        // `g = exp((x − m)·k)·exp(m·k − lse)·a·k`: the chain factor `k` folded
                        // into the constant, as the whole-row kernel does.
                        let c1 = (a * (m as f64 * c.k64 - lse).exp() * c.k64) as f32;
                        let map = k::RowMap::Softmax { m, k: c.xf.k, c: c1 };
                        k::write_row(s, xf, gf, map, stream, Ahead::NONE, None);
                        if let Some(yi) = local_y {
                            gf[yi] -= (ya * c.k64) as f32;
                        }
                    }
                }
            }
        }
        if stream {
            s.stream_fence();
        }
    }
}

/// `g = (a·exp(t − lse) − b·w)·chain`, minus `ya·chain` at the target, on the f32 path: the
/// exponential is `exp(t − m)·exp(m − lse)` with `m` the slice's max.
#[allow(clippy::too_many_arguments)]
#[cfg_attr(not(debug_assertions), inline(always))]
#[cfg_attr(debug_assertions, inline)]
fn grad_f32<S: Isa, T: Element>(
    s: S,
    c: &Ce<'_>,
    x: &[T],
    g: &mut [T],
    lse: f64,
    m: f32,
    a: f64,
    b: f64,
    ya: f64,
    y: Option<usize>,
    start: usize,
) {
    let xf = c.xf;
    let c1 = (a * (m as f64 - lse).exp()) as f32;
    let b32 = b as f32;
    let ychain = |ty: f64| -> f32 {
        if c.cap64 == 0.0 {
            c.k64 as f32
        } else {
            let r = ty / (c.cap64 * c.k64);
            (c.k64 * (1.0 - r * r).max(0.0)) as f32
        }
    };
    let fix = y.map(|y| (y, ya as f32 * ychain(xf.apply1(x[y].to_f32()) as f64)));
    let write_tile = inl_mut(
        #[cfg_attr(not(debug_assertions), inline(always))]
        #[cfg_attr(debug_assertions, inline)]
        |off: usize, t: &[f32], gt: &mut [f32]| {
            let n = t.len();
            let sub = match c.weights {
                _ if c.eps == 0.0 => Sub::None,
                Some(w) => Sub::Vec(b32, &w[start + off..start + off + n]),
                None => Sub::Const(b32),
            };
            k::ce_grad(s, t, gt, m, c1, sub, xf);
            if let Some((y, v)) = fix {
                if (off..off + n).contains(&y) {
                    gt[y - off] -= v;
                }
            }
        },
    );
    if xf.is_identity() {
        if let (Some(t), Some(gf)) = (T::cast::<f32>(x), T::cast_mut::<f32>(g)) {
            for (i, (tc, gc)) in t.chunks(TILE).zip(gf.chunks_mut(TILE)).enumerate() {
                write_tile(i * TILE, tc, gc);
            }
            return;
        }
    }
    let mut sc = crate::engine::Scratch::take();
    let [gbuf] = sc.tiles();
    let mut gchunks = g.chunks_mut(TILE);
    tiles(
        s,
        xf,
        x,
        Ahead::NONE,
        #[cfg_attr(not(debug_assertions), inline(always))]
        #[cfg_attr(debug_assertions, inline)]
        |off, t, _| {
            if let Some(gc) = gchunks.next() {
                let n = t.len();
                write_tile(off, t, &mut gbuf[..n]);
                T::store_f32(&gbuf[..n], gc);
            }
        },
    );
}

/// The same gradient in scalar f64.
#[allow(clippy::too_many_arguments)]
fn grad_f64<T: Element>(
    c: &Ce<'_>,
    x: &[T],
    g: &mut [T],
    lse: f64,
    a: f64,
    b: f64,
    ya: f64,
    y: Option<usize>,
    start: usize,
) {
    for (i, (o, v)) in g.iter_mut().zip(x).enumerate() {
        let q = super::wide::capped(c, v.to_f64());
        let chain = super::wide::chain64(c, q);
        let p = if q == f64::NEG_INFINITY { 0.0 } else { (q * c.k64 - lse).exp() };
        let sub = if c.eps == 0.0 { 0.0 } else { b * weight(c, start + i) };
        let mut gi = (a * p - sub) * chain;
        if y == Some(i) {
            gi -= ya * chain;
        }
        *o = T::from_f64(gi);
    }
}
