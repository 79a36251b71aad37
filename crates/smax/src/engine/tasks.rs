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
        if let (Some(x), Algorithm::ThreePass) = (x, f.alg) {
            match (T::cast::<f32>(x), T::cast_mut::<f32>(y)) {
                (Some(xf), Some(yf)) if len <= SHORT_GROUP_MAX_LEN => {
                    rows_short_grouped(s, &f, xf, yf, RowGeom { rows, len, xs, ys });
                    return;
                }
                (None, _) if len <= SHORT_GROUP_NARROW_MAX_LEN => {
                    rows_short_grouped_narrow(s, &f, x, y, RowGeom { rows, len, xs, ys });
                    return;
                }
                _ => {}
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

/// Separate f32 three-pass rows up to this long run in groups ([`rows_short_grouped`]), and
/// f32 logsumexp rows; longer rows gain nothing measurable (PERF.md, "Short rows in groups").
pub(crate) const SHORT_GROUP_MAX_LEN: usize = 1024;
/// The same for f16/bf16 rows, widened a group at a time: at 1 Ki the group's two f32 copies
/// measured slower than a row's (PERF.md, "Short rows in groups").
pub(crate) const SHORT_GROUP_NARROW_MAX_LEN: usize = 512;
/// A group of short rows holds about this many elements (its input and output stay in L1).
const SHORT_GROUP_ELEMS: usize = 2048;
/// The most rows in a group.
const SHORT_GROUP_MAX_ROWS: usize = 16;

/// Short f32 three-pass rows with a separate output, a group of rows at a time, pass by pass:
/// the maxima of the group, then its exp-store-sum passes, then its write passes. Each row's
/// passes are [`row_fwd`]'s (the same kernels on the same data in the same order), so every
/// output is bit for bit the row-by-row result. On a short row the tail of each pass (a
/// horizontal reduction, the f64 sum, the reciprocal) is a dependency chain as long as the
/// row's arithmetic; in a group, the next row's independent pass runs beside it.
#[cfg_attr(not(debug_assertions), inline(always))]
#[cfg_attr(debug_assertions, inline)]
fn rows_short_grouped<S: Isa>(s: S, f: &Fwd, x: &[f32], y: &mut [f32], geom: RowGeom) {
    let RowGeom { rows, len, xs, ys } = geom;
    let log = f.op == FwdOp::LogSoftmax;
    let per = group_rows(len);
    run_grouped(
        s,
        x,
        (rows, len, xs),
        y,
        #[cfg_attr(not(debug_assertions), inline(always))]
        #[cfg_attr(debug_assertions, inline)]
        |y: &mut [f32], r, m| {
            // Fetches the rows one group ahead (input and output) into L2.
            let wr = crate::arch::write_range(&y[r * ys..]);
            let pf = ahead(&x[r * xs..]).distance(per * xs).with_write(wr);
            let (xr, yr) = (&x[r * xs..r * xs + len], &mut y[r * ys..r * ys + len]);
            let mut acc = 0.0;
            if log {
                k::shift_store_sum(s, xr, yr, m, f.k, &mut acc, pf);
            } else {
                k::exp_store_sum(s, xr, yr, m, f.k, &mut acc, pf);
            }
            acc
        },
        #[cfg_attr(not(debug_assertions), inline(always))]
        #[cfg_attr(debug_assertions, inline)]
        |y: &mut [f32], r, st| {
            let yr = &mut y[r * ys..r * ys + len];
            if !regular(st) {
                fill(yr, special_fill(classify(&x[r * xs..r * xs + len]), f.op, f.masked));
            } else if log {
                k::scale_or_shift(s, yr, st.d.ln() as f32, true);
            } else {
                k::scale_or_shift(s, yr, (1.0 / st.d) as f32, false);
            }
        },
    );
}

/// Calls `f(r0, g)` for each group of short rows of `len ≥ 1` elements among `rows`: the `g`
/// rows from row `r0`.
#[cfg_attr(not(debug_assertions), inline(always))]
#[cfg_attr(debug_assertions, inline)]
fn for_each_group(rows: usize, len: usize, mut f: impl FnMut(usize, usize)) {
    let per = group_rows(len);
    let mut r0 = 0;
    while r0 < rows {
        let g = (rows - r0).min(per);
        f(r0, g);
        r0 += g;
    }
}

/// Short rows `(rows, len ≥ 1, xs)` of `x` a group at a time (see [`for_each_group`]), pass
/// by pass: every row's max; then `sum(out, r, max)` for each row `r` of the group whose max
/// is finite; then `finish(out, r, stats)` for each row, with the sum NaN where the max is not
/// finite (which [`regular`] rejects). Both callbacks get `out`, where they write the rows'
/// results.
#[cfg_attr(not(debug_assertions), inline(always))]
#[cfg_attr(debug_assertions, inline)]
fn run_grouped<S: Isa, O: ?Sized>(
    s: S,
    x: &[f32],
    (rows, len, xs): (usize, usize, usize),
    out: &mut O,
    mut sum: impl FnMut(&mut O, usize, f32) -> f64,
    mut finish: impl FnMut(&mut O, usize, Online),
) {
    for_each_group(
        rows,
        len,
        #[cfg_attr(not(debug_assertions), inline(always))]
        #[cfg_attr(debug_assertions, inline)]
        |r0, g| {
            let mut st = [Online { m: f32::NEG_INFINITY, d: f64::NAN }; SHORT_GROUP_MAX_ROWS];
            for (i, si) in st[..g].iter_mut().enumerate() {
                si.m = k::max(s, &x[(r0 + i) * xs..(r0 + i) * xs + len], Ahead::NONE);
            }
            for (i, si) in st[..g].iter_mut().enumerate() {
                if si.m.is_finite() {
                    si.d = sum(out, r0 + i, si.m);
                }
            }
            for (i, si) in st[..g].iter().enumerate() {
                finish(out, r0 + i, *si);
            }
        },
    );
}

/// The `g` rows of `len` that start at row `r0` of `x` (row stride `xs`) widened into
/// consecutive rows at the start of `buf`; the widened part.
#[cfg_attr(not(debug_assertions), inline(always))]
#[cfg_attr(debug_assertions, inline)]
fn widen_group<'b, T: Element>(x: &[T], r0: usize, g: usize, len: usize, xs: usize, buf: &'b mut [f32]) -> &'b [f32] {
    for (i, br) in buf.chunks_exact_mut(len).take(g).enumerate() {
        T::load_f32(&x[(r0 + i) * xs..(r0 + i) * xs + len], br);
    }
    &buf[..g * len]
}

/// The rows in a group of short rows of `len ≥ 1` elements.
#[cfg_attr(not(debug_assertions), inline(always))]
#[cfg_attr(debug_assertions, inline)]
fn group_rows(len: usize) -> usize {
    (SHORT_GROUP_ELEMS / len).clamp(1, SHORT_GROUP_MAX_ROWS)
}

/// [`rows_short_grouped`] over f16/bf16 rows: each group is widened into one scratch buffer,
/// runs there as f32 and is narrowed once; bit for bit [`row_fwd`]'s widened three-pass row,
/// with one scratch buffer per task rather than per row.
#[cfg_attr(not(debug_assertions), inline(always))]
#[cfg_attr(debug_assertions, inline)]
fn rows_short_grouped_narrow<S: Isa, T: Element>(s: S, f: &Fwd, x: &[T], y: &mut [T], geom: RowGeom) {
    let RowGeom { rows, len, xs, ys } = geom;
    let per = group_rows(len);
    let mut sc = Scratch::take();
    let (a, b) = sc.pair(per * len);
    for_each_group(
        rows,
        len,
        #[cfg_attr(not(debug_assertions), inline(always))]
        #[cfg_attr(debug_assertions, inline)]
        |r0, g| {
            let wide = widen_group(x, r0, g, len, xs, a);
            rows_short_grouped(s, f, wide, &mut b[..g * len], RowGeom { rows: g, len, xs: len, ys: len });
            for (i, br) in b.chunks_exact(len).take(g).enumerate() {
                T::store_f32(br, &mut y[(r0 + i) * ys..(r0 + i) * ys + len]);
            }
        },
    );
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
        let RowsLse { alg, k: kk, k64, len, xs, x, out } = self;
        let rows = out.len();
        // A call of one row runs row by row (the grouped rows are tested against it).
        let f32_rows = T::cast::<f32>(x);
        let max_len = if f32_rows.is_some() { SHORT_GROUP_MAX_LEN } else { SHORT_GROUP_NARROW_MAX_LEN };
        if alg.resolve_logsumexp(len) == Algorithm::ThreePass && (1..=max_len).contains(&len) && rows >= 2 {
            if let Some(xf) = f32_rows {
                lse_short_grouped(s, xf, len, xs, kk, k64, out);
            } else {
                // Converted rows: each group is widened into one scratch buffer.
                let per = group_rows(len);
                let mut sc = Scratch::take();
                let a = sc.row(per * len);
                for (gi, og) in out.chunks_mut(per).enumerate() {
                    let wide = widen_group(x, gi * per, og.len(), len, xs, a);
                    lse_short_grouped(s, wide, len, len, kk, k64, og);
                }
            }
            return;
        }
        for (r, o) in out.iter_mut().enumerate() {
            let xr = &x[r * xs..r * xs + len];
            *o = T::from_f64(row_lse(s, xr, alg, kk, k64, ahead(&x[r * xs..])));
        }
    }
}

/// [`RowsLse`] over short f32 three-pass rows (`rows ≥ 1`), a group at a time: the maxima of
/// the group, then its sums, then its results (see [`rows_short_grouped`]). Each row's passes
/// are [`row_lse`]'s, so every result is bit for bit the row-by-row one.
#[cfg_attr(not(debug_assertions), inline(always))]
#[cfg_attr(debug_assertions, inline)]
#[allow(clippy::too_many_arguments)]
fn lse_short_grouped<S: Isa, T: Element>(s: S, x: &[f32], len: usize, xs: usize, kk: f32, k64: f64, out: &mut [T]) {
    let per = group_rows(len);
    run_grouped(
        s,
        x,
        (out.len(), len, xs),
        out,
        #[cfg_attr(not(debug_assertions), inline(always))]
        #[cfg_attr(debug_assertions, inline)]
        |_, r, m| {
            let mut acc = 0.0;
            k::sum_exp(s, &x[r * xs..r * xs + len], m, kk, &mut acc, ahead(&x[r * xs..]).distance(per * xs));
            acc
        },
        #[cfg_attr(not(debug_assertions), inline(always))]
        #[cfg_attr(debug_assertions, inline)]
        |out: &mut [T], r, st| {
            let v = if regular(st) {
                st.m as f64 * k64 + st.d.ln()
            } else {
                special_lse(classify(&x[r * xs..r * xs + len]))
            };
            out[r] = T::from_f64(v);
        },
    );
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
