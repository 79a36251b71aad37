//! The engine's tasks: each is one work item (a group of rows, or one segment of a long row)
//! entered once through [`crate::arch::dispatch`].

use super::*;

/// A group of rows of a forward call (softmax / log-softmax). With `pipe` (f32, separate
/// output, [`Algorithm::Online`]) the rows run as a software pipeline: the online pass over row
/// `r + 1` runs inside the write pass of row `r` (see [`pipe_row`]), and long rows go chunk by
/// chunk ([`long_rows_pipe`]). Without it, each row is a short row on its own ([`row_fwd`]).
pub(crate) struct RowsFwd<'a, T> {
    pub f: Fwd,
    pub x: Option<&'a [T]>,
    pub y: &'a mut [T],
    /// The group's geometry (`rows` of the group; `x` and `y` start at its first row).
    pub g: RowGeom,
    pub pipe: bool,
}

impl<T: Element> Task for RowsFwd<'_, T> {
    type Output = ();
    #[cfg_attr(not(debug_assertions), inline(always))]
    #[cfg_attr(debug_assertions, inline)]
    fn run<S: Isa>(self, s: S) {
        let RowsFwd { f, x, y, g: RowGeom { rows, len, xs, ys }, pipe } = self;
        if rows == 0 || len == 0 {
            return;
        }
        if let (true, Some(x)) = (pipe, x) {
            rows_pipe(s, &f, x, y, rows, len, xs, ys);
            return;
        }
        if let (true, Some(x), Algorithm::ThreePass, true) = (f.stream, x, f.alg, len >= THREE_PASS_PIPE_MIN_LEN) {
            if let (Some(xf), Some(yf)) = (T::cast::<f32>(x), T::cast_mut::<f32>(y)) {
                rows_three_pass_pipe(s, &f, xf, yf, rows, len, xs, ys);
                return;
            }
        }
        // The prefetch domain of a row runs to the end of the input: rayon hands a thread
        // consecutive groups, so the next group's rows are usually this thread's next work.
        // In place: none (the output borrows the input).
        for r in 0..rows {
            let wr = crate::arch::write_range(&y[r * ys..]);
            let yr = &mut y[r * ys..r * ys + len];
            let (io, pf) = match x {
                // Rows up to NEXT_ROW_PREFETCH_MAX fetch the next row into L2 during their heavy
                // pass (the row, its output and the next row fit there).
                Some(x) if len <= NEXT_ROW_PREFETCH_MAX => {
                    (Io::Sep(&x[r * xs..r * xs + len], yr), ahead(&x[r * xs..]).distance(xs).with_write(wr))
                }
                Some(x) => (Io::Sep(&x[r * xs..r * xs + len], yr), ahead(&x[r * xs..])),
                None => (Io::Same(yr), Ahead::NONE),
            };
            row_fwd(s, &f, io, pf);
        }
    }
}

/// Three-pass rows at least this long whose output streams run as a software pipeline
/// ([`rows_three_pass_pipe`]): each exponential is computed once and only the roofline's bytes
/// move. Shorter rows keep the plain three-pass, whose output is written through the cache with
/// its lines prefetched one row ahead; the crossover is measured in PERF.md ("The pipelined
/// three-pass").
pub(crate) const THREE_PASS_PIPE_MIN_LEN: usize = 1024;

/// Runs `f` on a [`Scratch`] row of `len` f32s (this thread's, kept for its next call), for
/// the pipelined three-pass paths here and in the cross-entropy. The contents are unspecified.
#[cfg_attr(not(debug_assertions), inline(always))]
#[cfg_attr(debug_assertions, inline)]
pub(crate) fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    f(Scratch::take().row(len))
}

/// Three-pass over f32 rows whose output streams, as a software pipeline across rows: pass 2
/// of row `r` stores its exponentials (or shifted logits) in a cached scratch row while
/// prefetching row `r + 1`; pass 3 then writes row `r` from the scratch row with streaming
/// stores while pass 1 (the max) of row `r + 1` runs in the same loop. Bit for bit what
/// [`row_fwd`] computes for each row (the same max, the same stored values, the same
/// scaling), so the choice may depend on the size of the call. Rows `1 ≤ len ≤ CHUNK`; one
/// fence at the end orders the task's streaming stores. Tasks hold `par::rows_per_task` rows
/// (16 Ki elements: one row from 16 Ki up), so on longer rows the gain is the write streamed
/// from a cached row rather than the overlap (PERF.md).
#[cfg_attr(not(debug_assertions), inline(always))]
#[cfg_attr(debug_assertions, inline)]
#[allow(clippy::too_many_arguments)]
fn rows_three_pass_pipe<S: Isa>(
    s: S,
    f: &Fwd,
    x: &[f32],
    y: &mut [f32],
    rows: usize,
    len: usize,
    xs: usize,
    ys: usize,
) {
    let log = f.op == FwdOp::LogSoftmax;
    with_scratch(
        len,
        #[cfg_attr(not(debug_assertions), inline(always))]
        #[cfg_attr(debug_assertions, inline)]
        |b| {
            let mut m = k::max(s, &x[..len], Ahead::NONE);
            for r in 0..rows {
                let xr = &x[r * xs..r * xs + len];
                let yr = &mut y[r * ys..r * ys + len];
                let next: &[f32] = if r + 1 < rows { &x[(r + 1) * xs..(r + 1) * xs + len] } else { &[] };
                let mut d = f64::NAN;
                if m.is_finite() {
                    d = 0.0;
                    let pf = ahead(&x[r * xs..]).distance(xs);
                    if log {
                        k::shift_store_sum(s, xr, b, m, f.k, &mut d, pf);
                    } else {
                        k::exp_store_sum(s, xr, b, m, f.k, &mut d, pf);
                    }
                }
                if regular(Online { m, d }) {
                    // No prefetch in this loop: pass 2 above fetched row r + 1 into L2, and
                    // hints further ahead only compete with it (PERF.md).
                    let c = if log { d.ln() as f32 } else { (1.0 / d) as f32 };
                    m = k::finish_max_next(s, b, yr, c, log, true, next, None);
                } else {
                    fill(yr, special_fill(classify(xr), f.op, f.masked));
                    let npf = if r + 1 < rows { ahead(&x[(r + 1) * xs..]) } else { Ahead::NONE };
                    m = k::max(s, next, npf);
                }
            }
        },
    );
    s.stream_fence();
}

/// The pipelined form of [`RowsFwd`] (`rows ≥ 1`, `len ≥ 1`).
#[cfg_attr(not(debug_assertions), inline(always))]
#[cfg_attr(debug_assertions, inline)]
#[allow(clippy::too_many_arguments)]
fn rows_pipe<S: Isa, T: Element>(s: S, f: &Fwd, x: &[T], y: &mut [T], rows: usize, len: usize, xs: usize, ys: usize) {
    if len > crate::par::CHUNK {
        long_rows_pipe(s, f, x, y, rows, len, xs, ys);
        return;
    }
    // Each row's input was read (as the "next" row) one row earlier, so it is in L2 when its
    // write pass re-reads it; only the next row is prefetched.
    let mut st = seg_online(s, &x[..len], f.k, ahead(x));
    for r in 0..rows {
        let next = (r + 1 < rows).then(|| (&x[(r + 1) * xs..(r + 1) * xs + len], ahead(&x[(r + 1) * xs..])));
        st = pipe_row(s, f, &x[r * xs..r * xs + len], &mut y[r * ys..r * ys + len], st, Ahead::NONE, next);
    }
}

/// [`rows_pipe`] over long rows, chunk by chunk: each chunk of row `r` is written while the same
/// chunk of row `r + 1` is read, and row `r + 1`'s chunk states merge in chunk order, so every
/// row is bit for bit what the chunk-parallel path computes; the rows of a group run on one
/// thread with no barrier between them.
#[cfg_attr(not(debug_assertions), inline(always))]
#[cfg_attr(debug_assertions, inline)]
#[allow(clippy::too_many_arguments)]
fn long_rows_pipe<S: Isa, T: Element>(
    s: S,
    f: &Fwd,
    x: &[T],
    y: &mut [T],
    rows: usize,
    len: usize,
    xs: usize,
    ys: usize,
) {
    use crate::par::CHUNK;
    let row = |r: usize| &x[r * xs..r * xs + len];
    let stats = crate::arch::inl(
        #[cfg_attr(not(debug_assertions), inline(always))]
        #[cfg_attr(debug_assertions, inline)]
        |xr: &[T]| {
            let mut st = Online::EMPTY;
            for c in xr.chunks(CHUNK) {
                st.merge(seg_online(s, c, f.k, ahead(c)), f.k);
            }
            st
        },
    );
    let mut st = stats(row(0));
    for r in 0..rows {
        let yr = &mut y[r * ys..r * ys + len];
        if r + 1 == rows || !regular(st) {
            if regular(st) {
                for (a, b) in row(r).chunks(CHUNK).zip(yr.chunks_mut(CHUNK)) {
                    seg_write(s, f, &mut Io::Sep(a, b), st, ahead(a));
                }
            } else {
                fill(yr, special_fill(classify(row(r)), f.op, f.masked));
            }
            if r + 1 < rows {
                st = stats(row(r + 1));
            }
            continue;
        }
        let mut next = Online::EMPTY;
        for ((a, b), n) in row(r).chunks(CHUNK).zip(yr.chunks_mut(CHUNK)).zip(row(r + 1).chunks(CHUNK)) {
            next.merge(pipe_row(s, f, a, b, st, ahead(a), Some((n, ahead(n)))), f.k);
        }
        st = next;
    }
}

/// A group of short rows of a logsumexp call.
pub(crate) struct RowsLse<'a, T> {
    pub alg: Algorithm,
    pub k: f32,
    pub k64: f64,
    /// Rows of `len`, `xs` apart; one result per row in `out`.
    pub len: usize,
    pub xs: usize,
    pub x: &'a [T],
    pub out: &'a mut [T],
}

impl<T: Element> Task for RowsLse<'_, T> {
    type Output = ();
    #[cfg_attr(not(debug_assertions), inline(always))]
    #[cfg_attr(debug_assertions, inline)]
    fn run<S: Isa>(self, s: S) {
        for (r, o) in self.out.iter_mut().enumerate() {
            let xr = &self.x[r * self.xs..r * self.xs + self.len];
            let pf = ahead(&self.x[r * self.xs..]);
            *o = T::from_f64(row_lse(s, xr, self.alg, self.k, self.k64, pf));
        }
    }
}

/// One step of a long row, on one chunk.
pub(crate) enum Seg<'a, T> {
    Max(&'a [T]),
    Sum(&'a [T], f32, f32),
    Online(&'a [T], f32),
    Ext(&'a [T], f32),
    /// Three-pass pass 2 on f32: store exp, return the sum.
    ExpStoreSum(Io<'a, T>, f32, f32),
    Scale(&'a mut [T], f32),
    Write(Fwd, Io<'a, T>, Online),
    /// A chunk written from its row's statistics while the same chunk of the next row is
    /// read (see [`pipe_row`]); returns the next chunk's online state.
    WriteNext(Fwd, &'a [T], &'a mut [T], Online, &'a [T]),
}

pub(crate) enum SegOut {
    None,
    Max(f32),
    Sum(f64),
    Online(Online),
    Ext(Ext),
}

/// Merges the online states among `outs` in their order (the chunk order of a long row, so the
/// result is the same bits for any thread count).
pub(crate) fn merge_online(outs: &[SegOut], k: f32) -> Online {
    let mut st = Online::EMPTY;
    for o in outs {
        if let SegOut::Online(v) = o {
            st.merge(*v, k);
        }
    }
    st
}

impl<T: Element> Task for Seg<'_, T> {
    type Output = SegOut;
    #[cfg_attr(not(debug_assertions), inline(always))]
    #[cfg_attr(debug_assertions, inline)]
    fn run<S: Isa>(self, s: S) -> SegOut {
        match self {
            // Every pass over a chunk of a long row reads from memory: all prefetch.
            Seg::Max(x) => SegOut::Max(seg_max(s, x, ahead(x))),
            Seg::Sum(x, m, kk) => SegOut::Sum(seg_sum(s, x, m, kk, ahead(x))),
            Seg::Online(x, kk) => SegOut::Online(seg_online(s, x, kk, ahead(x))),
            Seg::Ext(x, kk) => SegOut::Ext(seg_fold(s, x, kk, ahead(x))),
            Seg::ExpStoreSum(mut io, m, kk) => {
                let pf = io.sep_ahead();
                let d = exp_store_sum_io(s, &mut io, m, kk, false, pf);
                SegOut::Sum(d)
            }
            Seg::Scale(y, c) => {
                if let Some(yf) = T::cast_mut::<f32>(y) {
                    k::scale_or_shift(s, yf, c, false);
                }
                SegOut::None
            }
            Seg::Write(f, mut io, st) => {
                let pf = io.sep_ahead();
                seg_write(s, &f, &mut io, st, pf);
                SegOut::None
            }
            Seg::WriteNext(f, x, y, st, next) => {
                SegOut::Online(pipe_row(s, &f, x, y, st, ahead(x), Some((next, ahead(next)))))
            }
        }
    }
}
