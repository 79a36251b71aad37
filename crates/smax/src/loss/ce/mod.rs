//! The fused cross-entropy row kernel: statistics, loss and gradient of one row in three
//! passes (max and target dot; `Σ exp`; gradient write), the last two over a row that is
//! still in cache. Rows longer than [`PIPE_MIN_LEN`] with plain f32 logits, class targets, no
//! smoothing and a gradient run the online algorithm pipelined across rows instead
//! ([`rows_pipe`]). f32, f16 and bf16 run the SIMD body (f16/bf16 and transformed logits go
//! through f32 tiles of [`TILE`] elements, a multiple of the reduction block, so the tiling
//! never changes a result; plain f32 is cut into the same tiles without a copy); f64 runs the
//! scalar body in [`row_f64`].
//!
//! Indexing invariant: `cross_entropy` validates before any row runs that every class target
//! is in `[0, len)` or the ignore index (`check::targets`), that class weights have `len`
//! entries and that soft targets and gradients have the logits' shape, so the row functions
//! index `x[y]`, `w[y]` and `g[y]` without a check that could fire.

use crate::arch::rows::{self as k, Sub, Xform};
use crate::arch::{Ahead, Isa, Task, inl_mut};
use crate::element::Element;
use crate::engine::{Scratch, Special, ahead, classify, regular, seg_online};

use super::RowOut;

pub(crate) const TILE: usize = crate::engine::TILE;

/// Rows up to this many elements prefetch the next row one row ahead in the gradient pass.
const NEXT_ROW_PREFETCH_MAX: usize = 64 * 1024;

/// Per-call constants of a cross-entropy call (validated by the driver).
#[derive(Clone, Copy)]
pub(crate) struct Ce<'a> {
    pub xf: Xform,
    pub k64: f64,
    pub cap64: f64,
    pub eps: f64,
    pub lambda: f64,
    /// Gradient scale of the main loss of a row (before its weight): upstream / denominator.
    pub main_scale: f64,
    /// Gradient scale of the z-loss of a row.
    pub z_scale: f64,
    pub weights: Option<&'a [f32]>,
    /// `Σ_k w_k` (or the class count without weights).
    pub wsum: f64,
    /// The class count `K`.
    pub classes: f64,
    /// Distance between consecutive logit rows (the prefetch distance of the heavy pass).
    pub row_stride: usize,
    pub ignore_index: i64,
    pub need_lse: bool,
    /// Whether gradient writes bypass the cache (a gradient of at least
    /// [`STREAM_MIN_BYTES`](crate::engine::STREAM_MIN_BYTES)); used by the pipelined path.
    pub stream: bool,
}

/// Rows longer than this run the pipelined online path ([`rows_pipe`]) when [`pipelined`]
/// allows; shorter ones the three-pass shape, pipelined across rows when the gradient streams
/// ([`three_pass_pipelined`]). Above 64 Ki a row, its scratch row and the next row crowd L2,
/// so the one-read online pipeline wins; the measurements are in PERF.md ("Cross-entropy").
pub(crate) const PIPE_MIN_LEN: usize = 64 * 1024;

/// Whether rows of `len` logits run the pipelined online path: plain logits (no cap), class
/// targets without label smoothing, a gradient asked for, rows longer than [`PIPE_MIN_LEN`].
/// The choice depends on the options and the row length only, never on the batch, so a row's
/// result does not depend on the rows beside it. (The element type is checked by the task:
/// f32 only.)
pub(crate) fn pipelined(c: &Ce<'_>, len: usize, class_targets: bool, grad: bool) -> bool {
    len > PIPE_MIN_LEN && plain_class_grad(c, class_targets, grad)
}

/// The options both pipelined paths need: plain logits (no cap), class targets without label
/// smoothing, and a gradient.
fn plain_class_grad(c: &Ce<'_>, class_targets: bool, grad: bool) -> bool {
    c.cap64 == 0.0 && c.eps == 0.0 && class_targets && grad
}

/// Whether rows of `len` logits run the pipelined three-pass path ([`rows_three_pass_pipe`]):
/// the options of [`pipelined`], rows of at least
/// [`THREE_PASS_PIPE_MIN_LEN`](crate::engine::THREE_PASS_PIPE_MIN_LEN) up to [`PIPE_MIN_LEN`],
/// and a streamed gradient. Bit for bit the unpipelined row, so the call's size may decide.
pub(crate) fn three_pass_pipelined(c: &Ce<'_>, len: usize, class_targets: bool, grad: bool) -> bool {
    c.stream
        && (crate::engine::THREE_PASS_PIPE_MIN_LEN..=PIPE_MIN_LEN).contains(&len)
        && plain_class_grad(c, class_targets, grad)
}

/// The rows both pipelined paths take (at least one): plain f32 logits with their stride and
/// length, the class targets, and the f32 gradient with its stride.
struct PlainRows<'a> {
    x: &'a [f32],
    xs: usize,
    len: usize,
    classes: &'a [i64],
    g: &'a mut [f32],
    gs: usize,
}

/// The target of one row.
#[derive(Clone, Copy)]
pub(crate) enum Tgt<'a, T> {
    Class(i64),
    Probs(&'a [T]),
}

/// A group of consecutive rows.
pub(crate) struct CeRows<'a, T> {
    pub c: Ce<'a>,
    pub x: &'a [T],
    pub xs: usize,
    pub len: usize,
    pub classes: Option<&'a [i64]>,
    pub probs: Option<(&'a [T], usize)>,
    pub g: Option<(&'a mut [T], usize)>,
    pub rows: usize,
}

impl<T: Element> Task for CeRows<'_, T> {
    type Output = Vec<RowOut>;
    #[cfg_attr(not(debug_assertions), inline(always))]
    #[cfg_attr(debug_assertions, inline)]
    fn run<S: Isa>(self, s: S) -> Vec<RowOut> {
        let CeRows { c, x, xs, len, classes, probs, mut g, rows } = self;
        let online = pipelined(&c, len, classes.is_some(), g.is_some());
        let three_pass = three_pass_pipelined(&c, len, classes.is_some(), g.is_some());
        if let (true, Some(xf), Some(cl), None, Some((gg, gs))) =
            ((online || three_pass) && rows > 0, T::cast::<f32>(x), classes, probs, g.as_mut())
        {
            if let Some(gf) = T::cast_mut::<f32>(gg) {
                let p = PlainRows { x: xf, xs, len, classes: &cl[..rows], g: gf, gs: *gs };
                return if online { rows_pipe(s, &c, p) } else { rows_three_pass_pipe(s, &c, p) };
            }
        }
        let mut out = Vec::with_capacity(rows);
        for r in 0..rows {
            let xr = &x[r * xs..r * xs + len];
            let pf = ahead(&x[r * xs..]);
            let tgt = match (classes, probs) {
                (Some(cl), _) => Tgt::Class(cl[r]),
                (None, Some((q, qs))) => Tgt::Probs(&q[r * qs..r * qs + len]),
                (None, None) => Tgt::Class(0),
            };
            let gr = g.as_mut().map(|(g, gs)| &mut g[r * *gs..r * *gs + len]);
            let o =
                if T::cast::<f64>(xr).is_some() { row_f64(&c, xr, tgt, gr) } else { row_f32(s, &c, xr, tgt, gr, pf) };
            out.push(o);
        }
        out
    }
}

/// Calls `f(offset, t)` over the transformed f32 view of `x` (zero-copy for plain f32).
#[cfg_attr(not(debug_assertions), inline(always))]
#[cfg_attr(debug_assertions, inline)]
fn tiles<'p, T: Element, S: Isa>(s: S, xf: Xform, x: &[T], pf: Ahead<'p>, mut f: impl FnMut(usize, &[f32], Ahead<'p>)) {
    if xf.is_identity() {
        if let Some(xs) = T::cast::<f32>(x) {
            for (i, c) in xs.chunks(TILE).enumerate() {
                f(i * TILE, c, pf.skip(i * TILE));
            }
            return;
        }
    }
    let mut sc = Scratch::take();
    let [raw, t] = sc.tiles();
    for (i, c) in x.chunks(TILE).enumerate() {
        let n = c.len();
        T::load_f32(c, &mut raw[..n]);
        k::xform(s, xf, &raw[..n], &mut t[..n]);
        f(i * TILE, &t[..n], pf.skip(i * TILE));
    }
}

/// The soft-target weights of a tile: `u = w ⊙ ((1 − ε)·q + ε/K)` (`w = 1` without weights).
#[cfg_attr(not(debug_assertions), inline(always))]
#[cfg_attr(debug_assertions, inline)]
fn soft_u<T: Element>(c: &Ce<'_>, q: &[T], off: usize, u: &mut [f32]) {
    T::load_f32(q, u);
    let (a, b) = ((1.0 - c.eps) as f32, (c.eps / c.classes) as f32);
    match c.weights {
        Some(w) => {
            for (ui, &wi) in u.iter_mut().zip(&w[off..off + q.len()]) {
                *ui = wi * (a * *ui + b);
            }
        }
        None => {
            for ui in u.iter_mut() {
                *ui = a * *ui + b;
            }
        }
    }
}

/// The result for a row that is not regular: NaN or `+inf` (without a cap) somewhere gives a
/// NaN loss and gradient; every logit `-inf` gives a `+inf` loss and a zero gradient.
fn special_row<T: Element>(c: &Ce<'_>, sp: Special, g: Option<&mut [T]>) -> RowOut {
    let (loss, lse, gv) = match sp {
        Special::Nan => (f64::NAN, f64::NAN, f64::NAN),
        Special::PosInf => (f64::NAN, f64::INFINITY, f64::NAN),
        Special::AllNegInf => (f64::INFINITY, f64::NEG_INFINITY, 0.0),
    };
    if let Some(g) = g {
        crate::engine::fill(g, gv);
    }
    let z = if c.lambda > 0.0 { c.lambda * lse * lse } else { 0.0 };
    RowOut { loss, z, lse }
}

/// The outputs of a regular plain f32 row with class target `yi` (no smoothing or cap) from
/// its statistics, `m` and `d = Σ exp((x − m)·k)`: the row's (loss, z-loss, lse), the gradient
/// constant `A = s·α + s_z·2λ·lse` (the gradient is `A·p` before the chain factor `k`), and
/// the target's correction `s·α·k` subtracted from its gradient entry. The two pipelined
/// paths share it, so they agree with each other and with [`row_f32_hard`] term by term.
#[cfg_attr(not(debug_assertions), inline(always))]
#[cfg_attr(debug_assertions, inline)]
fn class_row(c: &Ce<'_>, xr: &[f32], yi: usize, m: f32, d: f64) -> (RowOut, f64, f32) {
    let kf = c.xf.k;
    let k64 = kf as f64;
    let alpha = c.weights.map_or(1.0, |w| w[yi] as f64);
    let lse = m as f64 * k64 + d.ln();
    let a = c.main_scale * alpha + c.z_scale * 2.0 * c.lambda * lse;
    let out = RowOut { loss: target_term(alpha, xr[yi], m, k64, d), z: c.lambda * lse * lse, lse };
    (out, a, (c.main_scale * alpha) as f32 * kf)
}

/// `α·(lse − x_y·k) = α·(ln d − (x_y − m)·k)` for a regular row with max `m` and
/// `d = Σ exp((x − m)·k)`: the target logit is shifted by the max before it is scaled, in f64
/// (where the difference of two f32 values is exact), so a large `x_y·k` neither overflows f32
/// nor cancels against `lse`.
#[cfg_attr(not(debug_assertions), inline(always))]
#[cfg_attr(debug_assertions, inline)]
fn target_term(alpha: f64, xy: f32, m: f32, k: f64, d: f64) -> f64 {
    weighted(alpha, d.ln() - (xy as f64 - m as f64) * k)
}

/// `α·(lse − t_y)` given `lse − t_y`: a target of weight `α = 0` contributes 0, also when its
/// logit is masked (`0·inf` would be NaN). Every row path forms the target's loss through it.
#[cfg_attr(not(debug_assertions), inline(always))]
#[cfg_attr(debug_assertions, inline)]
fn weighted(alpha: f64, lse_minus_ty: f64) -> f64 {
    if alpha == 0.0 { 0.0 } else { alpha * lse_minus_ty }
}

/// Whether the transformed logits of a row overflowed f32 although the row itself has no
/// NaN or `+inf` and is not all `-inf` (`x·k` or `cap·k` past `f32::MAX`): such a row is
/// computed in f64 ([`row_f64`]), where its scaled logits are ordinary numbers.
fn transform_overflowed<T: Element>(x: &[T], sp: Special) -> bool {
    sp == Special::AllNegInf && x.iter().any(|v| v.to_f64() > f64::NEG_INFINITY)
}

/// One row on the f32 compute path.
#[cfg_attr(not(debug_assertions), inline(always))]
#[cfg_attr(debug_assertions, inline)]
fn row_f32<S: Isa, T: Element>(s: S, c: &Ce<'_>, x: &[T], tgt: Tgt<'_, T>, g: Option<&mut [T]>, pf: Ahead) -> RowOut {
    let kk = x.len();
    let xf = c.xf;
    // Row weight α of the target class, ε-weight β per unit of v, and whether the row counts.
    let (alpha, beta, y) = match tgt {
        Tgt::Class(y) if y == c.ignore_index => {
            if let Some(g) = g {
                crate::engine::fill(g, 0.0);
            }
            let lse = if c.need_lse { lse_only(s, c, x, pf) } else { f64::NAN };
            return RowOut { loss: 0.0, z: 0.0, lse };
        }
        Tgt::Class(y) => {
            let y = y as usize;
            let wy = c.weights.map_or(1.0, |w| w[y] as f64);
            (((1.0 - c.eps) * wy), c.eps / kk as f64, Some(y))
        }
        Tgt::Probs(_) => (0.0, 0.0, None),
    };
    let smooth = beta != 0.0;
    if let (Some(y), Some(xs), 0.0) = (y, T::cast::<f32>(x), xf.cap) {
        // (`T` is f32 here, so the gradient row converts too.)
        let g = g.and_then(|g| T::cast_mut::<f32>(g));
        // With a gradient, the heavy pass fetches the same block of the next row (while the
        // current row, its gradient and the next row fit in L2); otherwise the usual distance.
        let pf = if g.is_some() && xs.len() <= NEXT_ROW_PREFETCH_MAX { pf.distance(c.row_stride) } else { pf };
        return row_f32_hard(s, c, xs, y, alpha, beta, g, pf);
    }

    // Pass 1: max, and the target mass against the logits.
    let mut m = f32::NEG_INFINITY;
    let mut sv = 0.0f64; // Σ v_k t_k (hard: v = 1 or w; soft: v = u)
    let mut su = 0.0f64; // Σ u_k (soft targets)
    let mut sc = Scratch::take();
    let [u, wbuf, gbuf] = sc.tiles();
    tiles(
        s,
        xf,
        x,
        pf,
        #[cfg_attr(not(debug_assertions), inline(always))]
        #[cfg_attr(debug_assertions, inline)]
        |off, t, p| {
            let bm = match (tgt, c.weights) {
                (Tgt::Probs(q), _) => {
                    let n = t.len();
                    soft_u(c, &q[off..off + n], off, &mut u[..n]);
                    k::dot_guarded(s, &u[..n], t, &mut sv);
                    let mut acc = 0.0f64;
                    let mut mx = f32::NEG_INFINITY;
                    k::sum_and_max(s, &u[..n], t, &mut acc, &mut mx, Ahead::NONE, p);
                    su += acc;
                    mx
                }
                (Tgt::Class(_), Some(w)) if smooth => {
                    k::dot_guarded(s, &w[off..off + t.len()], t, &mut sv);
                    k::max(s, t, p)
                }
                (Tgt::Class(_), _) if smooth => {
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
    // Pass 2: Σ exp(t − m).
    let mut d = 0.0f64;
    if m.is_finite() {
        tiles(
            s,
            xf,
            x,
            Ahead::NONE,
            #[cfg_attr(not(debug_assertions), inline(always))]
            #[cfg_attr(debug_assertions, inline)]
            |_, t, p| k::sum_exp(s, t, m, 1.0, &mut d, p),
        );
    }
    if !regular(k::Online { m, d }) {
        let sp = classify(x);
        if transform_overflowed(x, sp) {
            return row_f64(c, x, tgt, g);
        }
        return special_row(c, sp, g);
    }
    if !(sv.is_finite() && su.is_finite()) {
        // A regular row whose smoothing or soft-target sum `Σ v·t` is not finite: its f32
        // block sums overflowed (logits near `f32::MAX` give `inf`, or `inf − inf = NaN`
        // beside a `-inf` logit), or a masked logit carries target mass (`-inf`). The f64 row
        // sums the shifted logits and gives the loss exactly (`+inf` for mass on a masked one).
        return row_f64(c, x, tgt, g);
    }
    let lse = m as f64 + d.ln();
    // Loss: Σ_k u_k (lse − t_k) with u = α e_y + β v (hard) or u (soft).
    let (loss, big_u, ty) = match y {
        Some(y) => {
            let ty = xf.apply1(x[y].to_f32());
            let mut l = target_term(alpha, ty, m, 1.0, d);
            let ty = ty as f64;
            if smooth {
                l += beta * (c.wsum * lse - sv);
            }
            (l, alpha + beta * c.wsum, ty)
        }
        None => (su * lse - sv, su, 0.0),
    };
    let z = c.lambda * lse * lse;
    let out = RowOut { loss, z, lse };
    let Some(g) = g else { return out };

    // Pass 3: g = (p·A − B·v)·chain, then the target's −α·chain.
    let a = c.main_scale * big_u + c.z_scale * 2.0 * c.lambda * lse;
    let c1 = (a / d) as f32;
    let b = (c.main_scale * beta) as f32;
    let ya = (c.main_scale * alpha) as f32;
    // d(t_y)/d(x_y): the chain factor of the target's one-hot term.
    let ychain = |ty: f64| -> f32 {
        if c.cap64 == 0.0 {
            c.k64 as f32
        } else {
            let r = ty / (c.cap64 * c.k64);
            (c.k64 * (1.0 - r * r).max(0.0)) as f32
        }
    };
    let fix = y.map(|y| (y, ya * ychain(ty)));
    let direct = xf.is_identity() && T::cast::<f32>(x).is_some();
    let mut gopt = Some(g);
    let mut write_tile = inl_mut(
        #[cfg_attr(not(debug_assertions), inline(always))]
        #[cfg_attr(debug_assertions, inline)]
        |off: usize, t: &[f32], gt: &mut [f32]| {
            let n = t.len();
            let sub = match tgt {
                Tgt::Probs(q) => {
                    soft_u(c, &q[off..off + n], off, &mut wbuf[..n]);
                    Sub::Vec(c.main_scale as f32, &wbuf[..n])
                }
                Tgt::Class(_) if !smooth => Sub::None,
                Tgt::Class(_) => match c.weights {
                    Some(w) => Sub::Vec(b, &w[off..off + n]),
                    None => Sub::Const(b),
                },
            };
            k::ce_grad(s, t, gt, m, c1, sub, xf);
            if let Some((y, v)) = fix {
                if (off..off + n).contains(&y) {
                    gt[y - off] -= v;
                }
            }
        },
    );
    if direct {
        if let (Some(t), Some(gf)) = (T::cast::<f32>(x), gopt.as_deref_mut().and_then(|g| T::cast_mut::<f32>(g))) {
            for (i, (tc, gc)) in t.chunks(TILE).zip(gf.chunks_mut(TILE)).enumerate() {
                write_tile(i * TILE, tc, gc);
            }
            return out;
        }
    }
    let g = gopt.take().unwrap_or_default();
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
    out
}

/// The log-sum-exp of the transformed logits of a row (for ignored rows whose lse is asked
/// for).
#[cfg_attr(not(debug_assertions), inline(always))]
#[cfg_attr(debug_assertions, inline)]
fn lse_only<S: Isa, T: Element>(s: S, c: &Ce<'_>, x: &[T], pf: Ahead) -> f64 {
    let mut m = f32::NEG_INFINITY;
    tiles(
        s,
        c.xf,
        x,
        pf,
        #[cfg_attr(not(debug_assertions), inline(always))]
        #[cfg_attr(debug_assertions, inline)]
        |_, t, p| {
            let bm = k::max(s, t, p);
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
    if regular(k::Online { m, d }) {
        return m as f64 + d.ln();
    }
    match classify(x) {
        sp if transform_overflowed(x, sp) => row_f64(c, x, Tgt::Class(c.ignore_index), None).lse,
        sp => crate::engine::special_lse(sp),
    }
}

mod pipe;
pub(crate) mod shard;
mod wide;

use pipe::{row_f32_hard, rows_pipe, rows_three_pass_pipe};
pub(crate) use wide::row_f64;
