//! Drivers for axis layouts `[outer, axis, inner]` (normalising a non-last axis), vectorised
//! across `inner` in column blocks of [`COLS`]: three passes over the block (max; `Σ exp`;
//! write), with the per-column sums kept in f32 for at most [`FLUSH`] steps of the axis and in
//! f64 across them. f64 data is gathered column by column and runs the scalar f64 row code.

use crate::arch::{Isa, Task, cols, dispatch, inl};
use crate::element::{Element, Repr};
use crate::engine::Plan;
use crate::engine::{self, Fwd, FwdOp};
use crate::options::Options;
use crate::par;
use crate::scalar64;

/// Columns per block.
pub(crate) const COLS: usize = 256;
/// Axis steps between flushes of the f32 column sums into f64.
pub(crate) const FLUSH: usize = 32;

/// One column block of an outer slab's output: `pieces[k]` holds columns `j0..j0 + w` of axis
/// step `k` (`w ≤ COLS`), in a slab whose rows are `inner` long.
struct ColBlock<'a, T> {
    inner: usize,
    j0: usize,
    pieces: Vec<&'a mut [T]>,
}

impl<T> ColBlock<'_, T> {
    /// Axis step `k` of this block's columns, read from `src` (a slab laid out as the output)
    /// or, without one, from the block's own piece (in place).
    #[cfg_attr(not(debug_assertions), inline(always))]
    #[cfg_attr(debug_assertions, inline)]
    fn step<'s>(&'s self, src: Option<&'s [T]>, k: usize) -> &'s [T] {
        match src {
            Some(x) => &x[k * self.inner + self.j0..][..self.pieces[k].len()],
            None => self.pieces[k],
        }
    }
}

/// The column-block work items of every outer slab of `out`, with their outer index.
fn slab_blocks<T>(out: &mut [T], (outer, axis, inner): Dims) -> Vec<(usize, ColBlock<'_, T>)> {
    let mut items = Vec::new();
    for (o, slab) in out.chunks_mut(axis * inner).take(outer).enumerate() {
        let first = items.len();
        for b in 0..inner.div_ceil(COLS) {
            items.push((o, ColBlock { inner, j0: b * COLS, pieces: Vec::with_capacity(axis) }));
        }
        for row in slab.chunks_mut(inner) {
            for (b, piece) in row.chunks_mut(COLS).enumerate() {
                items[first + b].1.pieces.push(piece);
            }
        }
    }
    items
}

/// `[outer, axis, inner]`.
type Dims = (usize, usize, usize);

/// The f64 path of a middle-axis op that writes a column of `out` per column: for every column,
/// `col(base, out, res)` computes its `axis` results into `res` (`base` is the flat index of the
/// column's first element, its elements `inner` apart; `out` as it stands, for in-place calls).
fn columns_f64<T: Element>((outer, axis, inner): Dims, out: &mut [T], mut col: impl FnMut(usize, &[T], &mut [f64])) {
    let mut res = vec![0.0f64; axis];
    for o in 0..outer {
        for j in 0..inner {
            let base = o * axis * inner + j;
            col(base, out, &mut res);
            for (kx, &r) in res.iter().enumerate() {
                out[base + kx * inner] = T::from_f64(r);
            }
        }
    }
}

#[cfg_attr(not(debug_assertions), inline(always))]
#[cfg_attr(debug_assertions, inline)]
fn load<T: Element>(src: &[T], buf: &mut [f32]) {
    T::load_f32(src, buf)
}

struct ColsFwd<'a, T> {
    x: Option<&'a [T]>,
    out: ColBlock<'a, T>,
    f: Fwd,
}

impl<T: Element> Task for ColsFwd<'_, T> {
    type Output = ();
    #[cfg_attr(not(debug_assertions), inline(always))]
    #[cfg_attr(debug_assertions, inline)]
    fn run<S: Isa>(self, s: S) {
        let ColsFwd { x, out: mut blk, f } = self;
        let axis = blk.pieces.len();
        let w = blk.pieces[0].len();
        let kk = f.k;
        let mut m = [f32::NEG_INFINITY; COLS];
        let mut a32 = [0.0f32; COLS];
        let mut a64 = [0.0f64; COLS];
        let mut c = [0.0f32; COLS];
        let mut buf = [0.0f32; COLS];
        let mut out = [0.0f32; COLS];
        let mut special: [Option<f64>; COLS] = [None; COLS];
        let (m, a32, a64, c, buf, out) =
            (&mut m[..w], &mut a32[..w], &mut a64[..w], &mut c[..w], &mut buf[..w], &mut out[..w]);
        for kx in 0..axis {
            load(blk.step(x, kx), buf);
            cols::max(s, m, buf);
        }
        for kx in 0..axis {
            load(blk.step(x, kx), buf);
            cols::sum_exp(s, a32, buf, m, kk);
            if (kx + 1) % FLUSH == 0 || kx + 1 == axis {
                for (d, v) in a64.iter_mut().zip(a32.iter_mut()) {
                    *d += *v as f64;
                    *v = 0.0;
                }
            }
        }
        let mut any_special = false;
        for j in 0..w {
            let st = crate::arch::rows::Online { m: m[j], d: a64[j] };
            if engine::regular(st) {
                c[j] = match f.op {
                    FwdOp::Softmax => (1.0 / a64[j]) as f32,
                    FwdOp::LogSoftmax => a64[j].ln() as f32,
                };
            } else {
                let col: Vec<T> = (0..axis).map(|kx| blk.step(x, kx)[j]).collect();
                special[j] = Some(engine::special_fill(engine::classify(&col), f.op, f.masked));
                any_special = true;
                m[j] = 0.0;
                c[j] = 0.0;
            }
        }
        for kx in 0..axis {
            load(blk.step(x, kx), buf);
            match f.op {
                FwdOp::Softmax => cols::write_softmax(s, out, buf, m, c, kk),
                FwdOp::LogSoftmax => cols::write_log_softmax(s, out, buf, m, c, kk),
            }
            T::store_f32(out, blk.pieces[kx]);
            if any_special {
                for (j, sp) in special[..w].iter().enumerate() {
                    if let Some(v) = sp {
                        blk.pieces[kx][j] = T::from_f64(*v);
                    }
                }
            }
        }
    }
}

struct ColsLse<'a, T> {
    kk: f32,
    k64: f64,
    x: &'a [T],
    axis: usize,
    inner: usize,
    j0: usize,
    out: &'a mut [T],
}

impl<T: Element> Task for ColsLse<'_, T> {
    type Output = ();
    #[cfg_attr(not(debug_assertions), inline(always))]
    #[cfg_attr(debug_assertions, inline)]
    fn run<S: Isa>(self, s: S) {
        let ColsLse { kk, k64, x, axis, inner, j0, out } = self;
        let w = out.len();
        let mut m = [f32::NEG_INFINITY; COLS];
        let mut a32 = [0.0f32; COLS];
        let mut a64 = [0.0f64; COLS];
        let mut buf = [0.0f32; COLS];
        let (m, a32, a64, buf) = (&mut m[..w], &mut a32[..w], &mut a64[..w], &mut buf[..w]);
        for kx in 0..axis {
            load(&x[kx * inner + j0..kx * inner + j0 + w], buf);
            cols::max(s, m, buf);
        }
        for kx in 0..axis {
            load(&x[kx * inner + j0..kx * inner + j0 + w], buf);
            cols::sum_exp(s, a32, buf, m, kk);
            if (kx + 1) % FLUSH == 0 || kx + 1 == axis {
                for (d, v) in a64.iter_mut().zip(a32.iter_mut()) {
                    *d += *v as f64;
                    *v = 0.0;
                }
            }
        }
        for j in 0..w {
            let st = crate::arch::rows::Online { m: m[j], d: a64[j] };
            let v = if engine::regular(st) {
                m[j] as f64 * k64 + a64[j].ln()
            } else {
                let col: Vec<T> = (0..axis).map(|kx| x[kx * inner + j0 + j]).collect();
                engine::special_lse(engine::classify(&col))
            };
            out[j] = T::from_f64(v);
        }
    }
}

/// Softmax / log-softmax over the middle axis of `[outer, axis, inner]`.
pub(crate) fn forward<T: Element>(f: Fwd, p: &Plan, opts: &Options, dims: Dims, x: Option<&[T]>, y: &mut [T]) {
    let (outer, axis, inner) = dims;
    if outer == 0 || axis == 0 || inner == 0 {
        return;
    }
    let slab = axis * inner;
    if T::REPR == Repr::F64 {
        let mut col = vec![0.0f64; axis];
        columns_f64(dims, y, |base, y, res| {
            let src = x.unwrap_or(y);
            for (kx, c) in col.iter_mut().enumerate() {
                *c = src[base + kx * inner].to_f64();
            }
            scalar64::row_fwd(&f, p.k64, &col, res);
        });
        return;
    }
    let level = p.level;
    par::for_each(opts.exec.par, slab_blocks(y, dims), |_, (o, out)| {
        let xs = x.map(|x| &x[o * slab..(o + 1) * slab]);
        dispatch(level, ColsFwd { x: xs, out, f });
    });
}

/// Logsumexp over the middle axis; `out` is `[outer, inner]`.
pub(crate) fn logsumexp<T: Element>(p: &Plan, opts: &Options, (outer, axis, inner): Dims, x: &[T], out: &mut [T]) {
    if outer == 0 || inner == 0 {
        return;
    }
    let slab = axis * inner;
    if T::REPR == Repr::F64 || axis == 0 {
        let mut col = vec![0.0f64; axis];
        for o in 0..outer {
            for j in 0..inner {
                for (kx, c) in col.iter_mut().enumerate() {
                    *c = x[o * slab + kx * inner + j].to_f64();
                }
                out[o * inner + j] = T::from_f64(scalar64::row_lse(p.k64, &col));
            }
        }
        return;
    }
    let mut items = Vec::new();
    for (o, os) in out.chunks_mut(inner).take(outer).enumerate() {
        for (b, ob) in os.chunks_mut(COLS).enumerate() {
            items.push((o, b * COLS, ob));
        }
    }
    let (level, kk, k64) = (p.level, p.k, p.k64);
    par::for_each(opts.exec.par, items, |_, (o, j0, ob)| {
        let xs = &x[o * slab..(o + 1) * slab];
        dispatch(level, ColsLse { kk, k64, x: xs, axis, inner, j0, out: ob });
    });
}

struct ColsBwd<'a, T> {
    log: bool,
    kk: f32,
    y: &'a [T],
    dy: Option<&'a [T]>,
    dx: ColBlock<'a, T>,
}

impl<T: Element> Task for ColsBwd<'_, T> {
    type Output = ();
    #[cfg_attr(not(debug_assertions), inline(always))]
    #[cfg_attr(debug_assertions, inline)]
    fn run<S: Isa>(self, s: S) {
        let ColsBwd { log, kk, y, dy, dx: mut blk } = self;
        let axis = blk.pieces.len();
        let w = blk.pieces[0].len();
        let mut a32 = [0.0f32; COLS];
        let mut a64 = [0.0f64; COLS];
        let mut ym = [f32::NEG_INFINITY; COLS];
        let mut r = [0.0f32; COLS];
        let mut by = [0.0f32; COLS];
        let mut bg = [0.0f32; COLS];
        let mut out = [0.0f32; COLS];
        let (a32, a64, ym, r, by, bg, out) =
            (&mut a32[..w], &mut a64[..w], &mut ym[..w], &mut r[..w], &mut by[..w], &mut bg[..w], &mut out[..w]);
        let load_step = inl(
            #[cfg_attr(not(debug_assertions), inline(always))]
            #[cfg_attr(debug_assertions, inline)]
            |blk: &ColBlock<'_, T>, k: usize, by: &mut [f32], bg: &mut [f32]| {
                load(blk.step(Some(y), k), by);
                load(blk.step(dy, k), bg);
            },
        );
        for kx in 0..axis {
            load_step(&blk, kx, by, bg);
            if log {
                cols::add(s, a32, bg);
                cols::max(s, ym, by);
            } else {
                cols::fma(s, a32, by, bg);
            }
            if (kx + 1) % FLUSH == 0 || kx + 1 == axis {
                for (d, v) in a64.iter_mut().zip(a32.iter_mut()) {
                    *d += *v as f64;
                    *v = 0.0;
                }
            }
        }
        for j in 0..w {
            r[j] = a64[j] as f32;
        }
        for kx in 0..axis {
            load_step(&blk, kx, by, bg);
            if log {
                cols::log_softmax_bwd(s, out, by, bg, r);
            } else {
                cols::softmax_bwd(s, out, by, bg, r);
            }
            if kk != 1.0 {
                for v in out.iter_mut() {
                    *v *= kk;
                }
            }
            if log {
                for j in 0..w {
                    if ym[j] == f32::NEG_INFINITY {
                        out[j] = 0.0;
                    }
                }
            }
            T::store_f32(out, blk.pieces[kx]);
        }
    }
}

/// Backward over the middle axis. `dy = None`: the gradient is read from `dx` (in place).
pub(crate) fn backward<T: Element>(
    log: bool,
    p: &Plan,
    opts: &Options,
    dims: Dims,
    y: &[T],
    dy: Option<&[T]>,
    dx: &mut [T],
) {
    let (outer, axis, inner) = dims;
    if outer == 0 || axis == 0 || inner == 0 {
        return;
    }
    let slab = axis * inner;
    if T::REPR == Repr::F64 {
        let (mut cy, mut cg) = (vec![0.0f64; axis], vec![0.0f64; axis]);
        columns_f64(dims, dx, |base, dx, res| {
            let g = dy.unwrap_or(dx);
            for kx in 0..axis {
                cy[kx] = y[base + kx * inner].to_f64();
                cg[kx] = g[base + kx * inner].to_f64();
            }
            scalar64::row_bwd(log, p.k64, &cy, &cg, res);
        });
        return;
    }
    let (level, kk) = (p.level, p.k);
    par::for_each(opts.exec.par, slab_blocks(dx, dims), |_, (o, dx)| {
        let ys = &y[o * slab..(o + 1) * slab];
        let gs = dy.map(|d| &d[o * slab..(o + 1) * slab]);
        dispatch(level, ColsBwd { log, kk, y: ys, dy: gs, dx });
    });
}
