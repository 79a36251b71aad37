//! Drivers and row bodies for the backward passes (one reduction, one map per row):
//!
//! * softmax: `dx = (1/τ) · y ⊙ (dy − Σ_j dy_j·y_j)`
//! * log-softmax: `dx = (1/τ) · (dy − exp(y) · Σ_j dy_j)`; a row whose `y` is all `-inf`
//!   (a fully masked row under [`MaskedRow::Zero`](crate::MaskedRow::Zero)) gets `dx = 0`.

use super::axis;
use crate::arch::rows::{self as k};
use crate::arch::{Ahead, Isa, SimdLevel, Task, dispatch, inl};
use crate::element::{Element, Repr};
use crate::engine::{BwdRows, RowGeom, plan};
use crate::engine::{Scratch, TILE, ahead, widen};
use crate::error::{Error, Result};
use crate::layout::{Kind, View, ViewMut};
use crate::options::Options;
use crate::par::{self, CHUNK};
use crate::scalar64;

/// Calls `f` on f32 tiles of two equally long inputs.
#[cfg_attr(not(debug_assertions), inline(always))]
#[cfg_attr(debug_assertions, inline)]
fn read2<'p, T: Element>(
    a: &[T],
    b: &[T],
    (pa, pb): (Ahead<'p>, Ahead<'p>),
    mut f: impl FnMut(&[f32], &[f32], Ahead<'p>, Ahead<'p>),
) {
    if let (Some(af), Some(bf)) = (T::cast::<f32>(a), T::cast::<f32>(b)) {
        f(af, bf, pa, pb);
        return;
    }
    let mut sc = Scratch::take();
    let [ba, bb] = sc.tiles();
    for (i, (ca, cb)) in a.chunks(TILE).zip(b.chunks(TILE)).enumerate() {
        f(widen(ca, ba), widen(cb, bb), pa.skip(i * TILE), pb.skip(i * TILE));
    }
}

/// The reduction of one segment: `(Σ y·dy or Σ dy, max y)`.
#[cfg_attr(not(debug_assertions), inline(always))]
#[cfg_attr(debug_assertions, inline)]
/// `py`, `pg`: prefetch domains of `y` and `dy`.
fn reduce<S: Isa, T: Element>(s: S, log: bool, y: &[T], dy: &[T], py: Ahead, pg: Ahead) -> (f64, f32) {
    let mut acc = 0.0f64;
    let mut mx = f32::NEG_INFINITY;
    if log {
        read2(
            dy,
            y,
            (pg, py),
            #[cfg_attr(not(debug_assertions), inline(always))]
            #[cfg_attr(debug_assertions, inline)]
            |g, yy, p1, p2| k::sum_and_max(s, g, yy, &mut acc, &mut mx, p1, p2),
        );
    } else {
        read2(
            y,
            dy,
            (py, pg),
            #[cfg_attr(not(debug_assertions), inline(always))]
            #[cfg_attr(debug_assertions, inline)]
            |yy, g, p1, p2| k::dot(s, yy, g, &mut acc, p1, p2),
        );
    }
    (acc, mx)
}

/// The operands of one row, or one segment of a row, of a backward pass: `y`, the upstream
/// gradient `dy` (`None`: read from `dx`, in place) and `dx`.
struct Grad<'a, T> {
    y: &'a [T],
    dy: Option<&'a [T]>,
    dx: &'a mut [T],
}

/// The map of one segment from its reduction `r` (`zero`: the log-softmax row whose outputs
/// were all `-inf`, whose gradient is 0). With `stream` (a large f32 gradient), `dx` is written
/// past the cache.
#[cfg_attr(not(debug_assertions), inline(always))]
#[cfg_attr(debug_assertions, inline)]
fn map<S: Isa, T: Element>(s: S, (log, kk): (bool, f32), (r, zero): (f32, bool), seg: Grad<'_, T>, stream: bool) {
    let Grad { y, dy, dx } = seg;
    if zero {
        dx.iter_mut().for_each(|v| *v = T::from_f32(0.0));
        return;
    }
    let run = inl(
        #[cfg_attr(not(debug_assertions), inline(always))]
        #[cfg_attr(debug_assertions, inline)]
        |yy: &[f32], g: &[f32], o: &mut [f32], stream: bool| {
            if log {
                k::log_softmax_bwd(s, yy, g, o, r, kk, stream);
            } else {
                k::softmax_bwd(s, yy, g, o, r, kk, stream);
            }
        },
    );
    if let (Some(yf), Some(Some(gf))) = (T::cast::<f32>(y), dy.map(T::cast::<f32>)) {
        if let Some(of) = T::cast_mut::<f32>(dx) {
            run(yf, gf, of, stream);
            return;
        }
    }
    let mut sc = Scratch::take();
    let [by, bg, bo] = sc.tiles();
    for (i, (cy, co)) in y.chunks(TILE).zip(dx.chunks_mut(TILE)).enumerate() {
        let n = cy.len();
        T::load_f32(cy, &mut by[..n]);
        match dy {
            Some(d) => T::load_f32(&d[i * TILE..i * TILE + n], &mut bg[..n]),
            None => T::load_f32(co, &mut bg[..n]),
        }
        run(&by[..n], &bg[..n], &mut bo[..n], false);
        T::store_f32(&bo[..n], co);
    }
}

/// One row: its reduction, then its map.
#[cfg_attr(not(debug_assertions), inline(always))]
#[cfg_attr(debug_assertions, inline)]
fn row_bwd<S: Isa, T: Element>(s: S, (log, kk): (bool, f32), row: Grad<'_, T>, (py, pg): (Ahead, Ahead), stream: bool) {
    let Grad { y, dy, dx } = row;
    let (acc, mx) = match dy {
        Some(d) => reduce(s, log, y, d, py, pg),
        None => reduce(s, log, y, dx, py, Ahead::NONE),
    };
    map(s, (log, kk), (acc as f32, log && mx == f32::NEG_INFINITY), Grad { y, dy, dx }, stream);
}

struct RowsBwd<'a, T> {
    log: bool,
    kk: f32,
    y: &'a [T],
    dy: Option<&'a [T]>,
    dx: &'a mut [T],
    rows: usize,
    g: RowGeom,
    gs: usize,
    stream: bool,
}

impl<T: Element> Task for RowsBwd<'_, T> {
    type Output = ();
    #[cfg_attr(not(debug_assertions), inline(always))]
    #[cfg_attr(debug_assertions, inline)]
    fn run<S: Isa>(self, s: S) {
        let RowsBwd { log, kk, y, dy, dx, rows, g, gs, stream } = self;
        // Prefetch domains run to the end of the inputs, as in the forward tasks (the in-place
        // gradient: none, it is borrowed mutably).
        for r in 0..rows {
            let yr = &y[r * g.xs..r * g.xs + g.len];
            let dr = &mut dx[r * g.ys..r * g.ys + g.len];
            let gr = dy.map(|d| &d[r * gs..r * gs + g.len]);
            let pg = dy.map_or(Ahead::NONE, |d| ahead(&d[r * gs..]));
            row_bwd(s, (log, kk), Grad { y: yr, dy: gr, dx: dr }, (ahead(&y[r * g.xs..]), pg), stream);
        }
    }
}

enum SegBwd<'a, T> {
    Reduce(bool, &'a [T], &'a [T]),
    Map { log: bool, kk: f32, r: f32, zero: bool, seg: Grad<'a, T>, stream: bool },
}

impl<T: Element> Task for SegBwd<'_, T> {
    type Output = (f64, f32);
    #[cfg_attr(not(debug_assertions), inline(always))]
    #[cfg_attr(debug_assertions, inline)]
    fn run<S: Isa>(self, s: S) -> (f64, f32) {
        match self {
            SegBwd::Reduce(log, y, dy) => reduce(s, log, y, dy, ahead(y), ahead(dy)),
            SegBwd::Map { log, kk, r, zero, seg, stream } => {
                map(s, (log, kk), (r, zero), seg, stream);
                (0.0, 0.0)
            }
        }
    }
}

/// Backward over rows (see [`BwdRows`]): short rows in groups, long rows in chunks.
fn rows_bwd<T: Element>(log: bool, kk: f32, level: SimdLevel, opts: &Options, rows: BwdRows<'_, T>) {
    let BwdRows { g, gs, y, dy, dx } = rows;
    let RowGeom { rows, len, xs, ys } = g;
    if rows == 0 || len == 0 {
        return;
    }
    // A large gradient with a separate upstream gradient is written with streaming stores, as
    // the forward output is (it cannot stay in cache anyway).
    let stream = dy.is_some() && rows * len * core::mem::size_of::<T>() >= crate::engine::STREAM_MIN_BYTES;
    if len <= CHUNK {
        let items = par::row_groups(dx, rows, len, ys);
        par::for_each(opts.exec.par, items, |_, (r0, cnt, dg)| {
            let yg = &y[r0 * xs..];
            let gg = dy.map(|d| &d[r0 * gs..]);
            dispatch(level, RowsBwd { log, kk, y: yg, dy: gg, dx: dg, rows: cnt, g, gs, stream });
        });
        return;
    }
    for r in 0..rows {
        let yr = &y[r * xs..r * xs + len];
        let dr = &mut dx[r * ys..r * ys + len];
        let gr = dy.map(|d| &d[r * gs..r * gs + len]);
        let parts: Vec<(&[T], &[T])> = match gr {
            Some(gr) => yr.chunks(CHUNK).zip(gr.chunks(CHUNK)).collect(),
            None => yr.chunks(CHUNK).zip(dr.chunks(CHUNK)).collect(),
        };
        let red = par::map(opts.exec.par, parts, |(a, b)| dispatch(level, SegBwd::Reduce(log, a, b)));
        let mut acc = 0.0f64;
        let mut mx = f32::NEG_INFINITY;
        for (a, m) in red {
            acc += a;
            if m > mx || m.is_nan() {
                mx = m;
            }
        }
        let zero = log && mx == f32::NEG_INFINITY;
        let r32 = acc as f32;
        let items: Vec<(usize, &mut [T])> = dr.chunks_mut(CHUNK).enumerate().collect();
        par::for_each(opts.exec.par, items, |_, (i, dc)| {
            let n = dc.len();
            let yc = &yr[i * CHUNK..i * CHUNK + n];
            let gc = gr.map(|g| &g[i * CHUNK..i * CHUNK + n]);
            dispatch(level, SegBwd::Map { log, kk, r: r32, zero, seg: Grad { y: yc, dy: gc, dx: dc }, stream });
        });
    }
}

/// The softmax and log-softmax backward passes (validate, plan, split, dispatch), instantiated
/// once per element type by the family's kernel table.
pub(crate) fn backward_impl<T: Element>(
    log: bool,
    y: View<'_, T>,
    dy: Option<View<'_, T>>,
    dx: ViewMut<'_, T>,
    opts: &Options,
) -> Result<()> {
    let p = plan::<T>(opts)?;
    y.layout.check_same("dx", &dx.layout)?;
    if let Some(d) = &dy {
        y.layout.check_same("dy", &d.layout)?;
    }
    let geom = crate::engine::row_geom(&y.layout, &dx.layout);
    if let Some(g) = geom {
        let gs = match &dy {
            Some(d) => d.layout.row_stride().unwrap_or(g.ys),
            None => g.ys,
        };
        let rows = BwdRows { g, gs, y: y.data, dy: dy.map(|d| d.data), dx: dx.data };
        if T::REPR == Repr::F64 {
            scalar64::rows_bwd(log, p.k64, opts, rows);
        } else {
            rows_bwd(log, p.k, p.level, opts, rows);
        }
        return Ok(());
    }
    if let Kind::Axis { outer, axis, inner } = y.layout.kind {
        axis::backward(log, &p, opts, (outer, axis, inner), y.data, dy.map(|d| d.data), dx.data);
        return Ok(());
    }
    Err(Error::ShapeMismatch { what: "dx", got: dx.layout.describe(), expected: y.layout.describe() })
}
