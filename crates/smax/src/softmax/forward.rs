//! Drivers for the forward normalisers: validation, work splitting, dispatch.

use super::axis;
use crate::arch::rows::Online;
use crate::arch::{SimdLevel, dispatch};
use crate::element::{Element, Repr};
use crate::engine::{
    self, Fwd, FwdOp, Io, Plan, RowGeom, RowsFwd, RowsLse, STREAM_MIN_BYTES, Seg, SegOut, plan, row_geom,
};
use crate::error::{Error, Result};
use crate::layout::{Kind, View, ViewMut};
use crate::options::{Algorithm, Options};
use crate::par::{self, CHUNK};
use crate::scalar64;

/// Calls with at least this many long rows pipeline them in groups of consecutive rows, one
/// thread per group, instead of one row at a time with its chunks spread over threads: no
/// barrier per row (PERF.md, "The pipelined three-pass").
const LONG_ROWS_GROUPED_MIN: usize = 32;

/// f16 / bf16 log-softmax rows up to this length run three-pass under `Auto` (longer ones the
/// online algorithm, whose write pass has no exponential); softmax rows up to [`CHUNK`].
const NARROW_LOG_SOFTMAX_THREE_PASS_MAX: usize = 32 * 1024;

fn fwd_params(op: FwdOp, p: &Plan, opts: &Options, len: usize, out_bytes: usize, narrow: bool) -> Fwd {
    Fwd {
        op,
        k: p.k,
        alg: match op {
            // A narrow row is widened once into an f32 copy that the three passes read in
            // cache, one exponential per entry (`engine::row_fwd`); the online algorithm
            // converts twice, and for softmax computes each exponential twice. Crossovers
            // measured in PERF.md, "f16 and bf16 rows".
            FwdOp::Softmax if narrow && opts.algorithm == Algorithm::Auto && len <= CHUNK => Algorithm::ThreePass,
            FwdOp::LogSoftmax
                if narrow && opts.algorithm == Algorithm::Auto && len <= NARROW_LOG_SOFTMAX_THREE_PASS_MAX =>
            {
                Algorithm::ThreePass
            }
            FwdOp::Softmax => opts.algorithm.resolve(len),
            FwdOp::LogSoftmax => opts.algorithm.resolve_log_softmax(len),
        },
        masked: opts.masked_row,
        stream: out_bytes >= STREAM_MIN_BYTES,
    }
}

/// Forward over rows (softmax / log-softmax), f32 compute path.
fn rows_fwd<T: Element>(f: Fwd, level: SimdLevel, opts: &Options, g: RowGeom, x: Option<&[T]>, y: &mut [T]) {
    let RowGeom { rows, len, xs, ys } = g;
    if rows == 0 || len == 0 {
        return;
    }
    // The online algorithm on f32 with a separate output runs as a software pipeline across
    // rows (bit for bit the unpipelined results: in place, it runs row by row).
    let pipe = x.is_some() && T::REPR == Repr::F32 && f.alg == Algorithm::Online; // `f.alg` is resolved
    // Short rows in groups (pipelined: about 1 Mi elements each); many long rows pipelined in
    // groups of at least 4 consecutive rows (each group pays one unpipelined first row), one
    // thread each, at least 8 groups. Other long rows go one at a time, chunks over threads.
    let per = match (len <= CHUNK, pipe) {
        (true, true) => Some(par::pipe_rows_per_task(rows, len)),
        (true, false) => Some(par::rows_per_task(len)),
        (false, true) => (rows >= LONG_ROWS_GROUPED_MIN).then(|| 4usize.max(rows / 16)),
        (false, false) => None,
    };
    if let Some(per) = per {
        let items = par::row_groups_per(y, rows, len, ys, per);
        par::for_each(opts.exec.par, items, |_, (r0, cnt, yg)| {
            dispatch(level, RowsFwd { f, x: x.map(|x| &x[r0 * xs..]), y: yg, g: RowGeom { rows: cnt, ..g }, pipe });
        });
        return;
    }
    if let (true, Some(x)) = (pipe, x) {
        // Long rows, pipelined: the write pass of row r and the online pass of row r + 1 share
        // one parallel loop over chunks; the next row's chunk states merge in chunk order, as
        // `long_row_stats` merges them.
        let row = |r: usize| &x[r * xs..r * xs + len];
        let mut st = long_row_stats(level, opts, Algorithm::Online, row(0), f.k);
        for r in 0..rows {
            let yr = &mut y[r * ys..r * ys + len];
            if r + 1 == rows || !engine::regular(st) {
                long_row_write(f, level, opts, Some(row(r)), yr, st);
                if r + 1 < rows {
                    st = long_row_stats(level, opts, Algorithm::Online, row(r + 1), f.k);
                }
                continue;
            }
            let items: Vec<_> = row(r).chunks(CHUNK).zip(yr.chunks_mut(CHUNK)).zip(row(r + 1).chunks(CHUNK)).collect();
            let outs = par::map(opts.exec.par, items, |((a, b), n)| dispatch(level, Seg::WriteNext(f, a, b, st, n)));
            st = engine::merge_online(&outs, f.k);
        }
        return;
    }
    // Long rows: one at a time, chunks in parallel, partial states merged in chunk order.
    for r in 0..rows {
        let yr = &mut y[r * ys..r * ys + len];
        let xr = x.map(|x| &x[r * xs..r * xs + len]);
        long_row_fwd(f, level, opts, xr, yr);
    }
}

fn chunks_io<'a, T: Element>(x: Option<&'a [T]>, y: &'a mut [T]) -> Vec<Io<'a, T>> {
    match x {
        Some(x) => x.chunks(CHUNK).zip(y.chunks_mut(CHUNK)).map(|(a, b)| Io::Sep(a, b)).collect(),
        None => y.chunks_mut(CHUNK).map(Io::Same).collect(),
    }
}

/// Statistics of a long row: per-chunk states merged in chunk order.
fn long_row_stats<T: Element>(level: SimdLevel, opts: &Options, alg: Algorithm, x: &[T], k: f32) -> Online {
    let chunks: Vec<&[T]> = x.chunks(CHUNK).collect();
    match alg {
        Algorithm::ThreePass => {
            let ms = par::map(opts.exec.par, chunks.clone(), |c| dispatch(level, Seg::Max(c)));
            let mut m = f32::NEG_INFINITY;
            for o in ms {
                if let SegOut::Max(v) = o {
                    if v > m || v.is_nan() {
                        m = v;
                    }
                }
            }
            if !m.is_finite() {
                return Online { m, d: f64::NAN };
            }
            let ds = par::map(opts.exec.par, chunks, |c| dispatch(level, Seg::Sum(c, m, k)));
            let d = ds.into_iter().map(|o| if let SegOut::Sum(v) = o { v } else { 0.0 }).sum();
            Online { m, d }
        }
        Algorithm::TwoPass => {
            let es = par::map(opts.exec.par, chunks, |c| dispatch(level, Seg::Ext(c, k)));
            let mut e = crate::arch::rows::Ext::EMPTY;
            for o in es {
                if let SegOut::Ext(v) = o {
                    e.merge(v);
                }
            }
            if engine::ext_usable(&e, k) {
                engine::ext_to_online(&e, k)
            } else {
                long_row_stats(level, opts, Algorithm::Online, x, k)
            }
        }
        _ => {
            let os = par::map(opts.exec.par, chunks, |c| dispatch(level, Seg::Online(c, k)));
            engine::merge_online(&os, k)
        }
    }
}

fn long_row_fwd<T: Element>(f: Fwd, level: SimdLevel, opts: &Options, x: Option<&[T]>, y: &mut [T]) {
    let alg = f.alg; // resolved by `fwd_params`
    let xr: &[T] = match x {
        Some(x) => x,
        None => y,
    };
    if alg == Algorithm::ThreePass && f.op == FwdOp::Softmax && T::REPR == Repr::F32 {
        // max; exp stored + summed; scale. An in-place row that turns out irregular still
        // classifies correctly: NaN stays NaN through exp, and ±inf maxima stop before pass 2.
        let st = long_row_stats(level, opts, Algorithm::ThreePass, xr, f.k);
        if st.m.is_finite() {
            let m = st.m;
            let ds = par::map(opts.exec.par, chunks_io(x, y), |io| dispatch(level, Seg::ExpStoreSum(io, m, f.k)));
            let d: f64 = ds.into_iter().map(|o| if let SegOut::Sum(v) = o { v } else { 0.0 }).sum();
            let st = Online { m, d };
            if engine::regular(st) {
                let c = (1.0 / d) as f32;
                par::for_each(opts.exec.par, y.chunks_mut(CHUNK).collect(), |_, c2| {
                    dispatch(level, Seg::Scale(c2, c));
                });
                return;
            }
        }
        let sp = engine::classify::<T>(x.unwrap_or(y));
        engine::fill(y, engine::special_fill(sp, f.op, f.masked));
        return;
    }
    let st = long_row_stats(level, opts, alg, xr, f.k);
    long_row_write(f, level, opts, x, y, st);
}

/// The write pass of a long row from its statistics (or the fill of a special row).
fn long_row_write<T: Element>(f: Fwd, level: SimdLevel, opts: &Options, x: Option<&[T]>, y: &mut [T], st: Online) {
    if engine::regular(st) {
        par::for_each(opts.exec.par, chunks_io(x, y), |_, io| {
            dispatch(level, Seg::Write(f, io, st));
        });
    } else {
        let sp = engine::classify::<T>(x.unwrap_or(y));
        engine::fill(y, engine::special_fill(sp, f.op, f.masked));
    }
}

/// `softmax` / `log_softmax` (validate, plan, split, dispatch), instantiated once per element
/// type by the family's kernel table.
pub(crate) fn forward_impl<T: Element>(
    op: FwdOp,
    x: Option<View<'_, T>>,
    y: ViewMut<'_, T>,
    opts: &Options,
) -> Result<()> {
    let p = plan::<T>(opts)?;
    let xl = match &x {
        Some(x) => {
            x.layout.check_same("output", &y.layout)?;
            x.layout
        }
        None => y.layout,
    };
    let out_bytes = y.layout.required_len().unwrap_or(0) * core::mem::size_of::<T>();
    let f = fwd_params(op, &p, opts, xl.row_len(), out_bytes, T::REPR == Repr::Narrow);
    if let Some(g) = row_geom(&xl, &y.layout) {
        if T::REPR == Repr::F64 {
            scalar64::rows_fwd(f, p.k64, opts, g, x.map(|x| x.data), &mut *y.data);
        } else {
            rows_fwd(f, p.level, opts, g, x.map(|x| x.data), &mut *y.data);
        }
        return Ok(());
    }
    if let Kind::Axis { outer, axis, inner } = xl.kind {
        axis::forward(f, &p, opts, (outer, axis, inner), x.map(|x| x.data), &mut *y.data);
        return Ok(());
    }
    Err(Error::ShapeMismatch { what: "output", got: y.layout.describe(), expected: xl.describe() })
}

/// `logsumexp` (validate, plan, split, dispatch), instantiated once per element type by the
/// family's kernel table.
pub(crate) fn logsumexp_impl<T: Element>(x: View<'_, T>, out: &mut [T], opts: &Options) -> Result<()> {
    let p = plan::<T>(opts)?;
    let rows = x.layout.row_count();
    if out.len() != rows {
        return Err(Error::RowCountMismatch { what: "logsumexp output", len: out.len(), rows });
    }
    if let Some(g) = row_geom(&x.layout, &x.layout) {
        if T::REPR == Repr::F64 {
            scalar64::rows_lse(p.k64, opts, g, x.data, out);
            return Ok(());
        }
        let RowGeom { rows, len, xs, .. } = g;
        if rows == 0 {
            return Ok(());
        }
        if len <= CHUNK {
            let per = par::rows_per_task(len);
            let items: Vec<(usize, &mut [T])> = out.chunks_mut(per).enumerate().collect();
            let alg = opts.algorithm;
            par::for_each(opts.exec.par, items, |_, (i, o)| {
                let r0 = i * per;
                dispatch(p.level, RowsLse { x: &x.data[r0 * xs..], out: o, len, xs, alg, k: p.k, k64: p.k64 });
            });
        } else {
            let alg = opts.algorithm.resolve_logsumexp(len);
            let row = |r: usize| &x.data[r * xs..r * xs + len];
            let finish = |st: Online, xr: &[T]| {
                T::from_f64(if engine::regular(st) {
                    st.m as f64 * p.k64 + st.d.ln()
                } else {
                    engine::special_lse(engine::classify(xr))
                })
            };
            if alg == Algorithm::Online {
                // One parallel pass over every chunk of every row (no per-row barrier); each
                // row's chunk states merge in chunk order, as `long_row_stats` merges them.
                let per_row = len.div_ceil(CHUNK);
                let chunks: Vec<&[T]> = (0..rows).flat_map(|r| row(r).chunks(CHUNK)).collect();
                let states = par::map(opts.exec.par, chunks, |c| dispatch(p.level, Seg::Online(c, p.k)));
                for (r, (o, sts)) in out.iter_mut().zip(states.chunks(per_row)).enumerate() {
                    *o = finish(engine::merge_online(sts, p.k), row(r));
                }
            } else {
                for (r, o) in out.iter_mut().enumerate() {
                    *o = finish(long_row_stats(p.level, opts, alg, row(r), p.k), row(r));
                }
            }
        }
        return Ok(());
    }
    if let Kind::Axis { outer, axis, inner } = x.layout.kind {
        axis::logsumexp(&p, opts, (outer, axis, inner), x.data, out);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `Auto`'s choice per element type at the crossovers: f16/bf16 softmax three-pass up to
    /// [`CHUNK`] and log-softmax up to [`NARROW_LOG_SOFTMAX_THREE_PASS_MAX`]; f32 keeps
    /// [`Algorithm::resolve`]'s rule; an explicit algorithm is kept.
    #[test]
    fn auto_takes_three_pass_for_narrow_rows_up_to_their_crossovers() {
        let p = Plan { level: SimdLevel::Scalar, k: 1.0, k64: 1.0 };
        let auto = Options::default();
        let alg = |op, o: &Options, len, narrow| fwd_params(op, &p, o, len, 0, narrow).alg;
        assert_eq!(alg(FwdOp::Softmax, &auto, CHUNK, true), Algorithm::ThreePass);
        assert_eq!(alg(FwdOp::Softmax, &auto, CHUNK + 1, true), Algorithm::Online);
        assert_eq!(alg(FwdOp::Softmax, &auto, CHUNK, false), Algorithm::Online);
        let lmax = NARROW_LOG_SOFTMAX_THREE_PASS_MAX;
        assert_eq!(alg(FwdOp::LogSoftmax, &auto, lmax, true), Algorithm::ThreePass);
        assert_eq!(alg(FwdOp::LogSoftmax, &auto, lmax + 1, true), Algorithm::Online);
        assert_eq!(alg(FwdOp::LogSoftmax, &auto, 2048, false), Algorithm::Online);
        let online = Options::default().algorithm(Algorithm::Online);
        assert_eq!(alg(FwdOp::Softmax, &online, 100, true), Algorithm::Online);
    }
}
