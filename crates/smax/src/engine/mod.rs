//! The row engine that the softmax family and the cross-entropy both run: the per-call plan
//! (SIMD level, `1/τ`), row geometry, and the row and segment bodies for the f32 compute path
//! (f32, f16, bf16), generic over the ISA and the element type. Each `Task` here is entered once per work item through
//! [`crate::arch::dispatch`]; inside, everything is inlined into one target-feature region.
//!
//! Element types other than f32 are converted in tiles of [`TILE`] elements (a multiple of the
//! reduction block, so tiling never changes a result).

use crate::arch::SimdLevel;
use crate::arch::rows::{self as k, BLOCK, Ext, Online};
use crate::arch::{Ahead, Isa, Task, inl_mut};
use crate::element::Element;
use crate::element::Repr;
use crate::error::Result;
use crate::layout::Layout;
use crate::options::{Algorithm, MaskedRow, Options};

/// Calls whose output is at least this large write it with non-temporal stores (where the ISA
/// has them): the output cannot stay in cache anyway, and streaming saves the
/// read-for-ownership of every output line.
pub(crate) const STREAM_MIN_BYTES: usize = 32 << 20;

pub(crate) struct Plan {
    pub level: SimdLevel,
    pub k: f32,
    pub k64: f64,
}

pub(crate) fn plan<T: Element>(opts: &Options) -> Result<Plan> {
    let (k, k64) = opts.inv_temperature(T::REPR != Repr::F64)?;
    Ok(Plan { level: SimdLevel::resolve(opts.exec.simd), k, k64 })
}

/// Row geometry after validation: rows of `len`, input stride `xs`, output stride `ys`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RowGeom {
    pub rows: usize,
    pub len: usize,
    pub xs: usize,
    pub ys: usize,
}

/// The operands of a backward pass over rows: `y` (the forward output) and `dx` in `g`'s
/// geometry, the upstream gradient `dy` with row stride `gs`; `dy = None` reads the upstream
/// gradient from `dx` (in place).
pub(crate) struct BwdRows<'a, T> {
    pub g: RowGeom,
    pub gs: usize,
    pub y: &'a [T],
    pub dy: Option<&'a [T]>,
    pub dx: &'a mut [T],
}

/// The row geometry of two layouts of the same shape, when both are plain rows (axis
/// layouts with `inner = 1` included).
pub(crate) fn row_geom(x: &Layout, y: &Layout) -> Option<RowGeom> {
    Some(RowGeom { rows: x.row_count(), len: x.row_len(), xs: x.row_stride()?, ys: y.row_stride()? })
}

/// The prefetch domain of `data` (see [`Ahead`]).
#[cfg_attr(not(debug_assertions), inline(always))]
#[cfg_attr(debug_assertions, inline)]
pub(crate) fn ahead<T: Element>(data: &[T]) -> Ahead<'_> {
    Ahead::new(T::as_bytes(data), core::mem::size_of::<T>())
}

pub(crate) const TILE: usize = 4 * BLOCK;

thread_local! {
    /// This thread's spare [`Scratch`] buffers.
    static SPARE: core::cell::RefCell<Vec<Vec<f32>>> = const { core::cell::RefCell::new(Vec::new()) };
}

/// An f32 scratch buffer taken from a per-thread pool and given back on drop, grown to the
/// largest size its users have asked for; a nested user takes a second buffer. Converted rows
/// keep their f32 tiles or their widened copy in it (fresh 4 KiB stack tiles would be zeroed
/// for every row, which costs more than a short row's arithmetic: PERF.md, "f16 and bf16
/// rows"), and the pipelined paths a row. The contents are whatever the last user left: every
/// user writes an entry before reading it.
pub(crate) struct Scratch {
    v: Vec<f32>,
}

impl Scratch {
    #[cfg_attr(not(debug_assertions), inline(always))]
    #[cfg_attr(debug_assertions, inline)]
    pub(crate) fn take() -> Self {
        let spare = SPARE.try_with(|p| p.try_borrow_mut().ok().and_then(|mut p| p.pop())).ok().flatten();
        Scratch { v: spare.unwrap_or_default() }
    }

    /// The first `len` entries (grown when shorter).
    #[cfg_attr(not(debug_assertions), inline(always))]
    #[cfg_attr(debug_assertions, inline)]
    pub(crate) fn row(&mut self, len: usize) -> &mut [f32] {
        if self.v.len() < len {
            self.v.resize(len, 0.0);
        }
        &mut self.v[..len]
    }

    /// Two disjoint slices of `len` entries each.
    #[cfg_attr(not(debug_assertions), inline(always))]
    #[cfg_attr(debug_assertions, inline)]
    pub(crate) fn pair(&mut self, len: usize) -> (&mut [f32], &mut [f32]) {
        self.row(2 * len).split_at_mut(len)
    }

    /// `N` disjoint tiles of [`TILE`] entries.
    #[cfg_attr(not(debug_assertions), inline(always))]
    #[cfg_attr(debug_assertions, inline)]
    pub(crate) fn tiles<const N: usize>(&mut self) -> [&mut [f32]; N] {
        let mut it = self.row(N * TILE).chunks_exact_mut(TILE);
        core::array::from_fn(|_| it.next().unwrap_or_default())
    }
}

impl Drop for Scratch {
    // Runs once per converted row: inlined like its users (a profile showed it as a call).
    #[cfg_attr(not(debug_assertions), inline(always))]
    #[cfg_attr(debug_assertions, inline)]
    fn drop(&mut self) {
        let v = core::mem::take(&mut self.v);
        // During thread teardown the pool may be gone: the buffer is then freed.
        let _ = SPARE.try_with(|p| {
            if let Ok(mut p) = p.try_borrow_mut() {
                p.push(v);
            }
        });
    }
}

/// Rows up to this many elements prefetch the next row, one row stride ahead, into L2 during
/// their heavy pass, so the whole next row arrives while this one computes (PERF.md); longer
/// rows use the usual distance.
pub(crate) const NEXT_ROW_PREFETCH_MAX: usize = 64 * 1024;

/// The forward ops that write a row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FwdOp {
    Softmax,
    LogSoftmax,
}

/// Per-call constants of a forward call.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Fwd {
    pub op: FwdOp,
    pub k: f32,
    pub alg: Algorithm,
    pub masked: MaskedRow,
    pub stream: bool,
}

/// Where a row's output goes: a separate buffer, or over its input.
pub(crate) enum Io<'a, T> {
    Sep(&'a [T], &'a mut [T]),
    Same(&'a mut [T]),
}

impl<'a, T: Element> Io<'a, T> {
    fn x(&self) -> &[T] {
        match self {
            Io::Sep(x, _) => x,
            Io::Same(xy) => xy,
        }
    }
    /// The prefetch domain of a separate input (none in place: the output borrows it).
    fn sep_ahead(&self) -> Ahead<'a> {
        match self {
            Io::Sep(x, _) => ahead(x),
            Io::Same(_) => Ahead::NONE,
        }
    }
    fn y(&mut self) -> &mut [T] {
        match self {
            Io::Sep(_, y) => y,
            Io::Same(xy) => xy,
        }
    }
}

/// Calls `f` on the f32 view of `x`, tile by tile when it must be converted.
#[cfg_attr(not(debug_assertions), inline(always))]
#[cfg_attr(debug_assertions, inline)]
fn read_tiles<'p, T: Element>(x: &[T], pf: Ahead<'p>, mut f: impl FnMut(&[f32], Ahead<'p>)) {
    if let Some(xf) = T::cast::<f32>(x) {
        f(xf, pf);
        return;
    }
    let mut sc = Scratch::take();
    let [buf] = sc.tiles();
    for (i, c) in x.chunks(TILE).enumerate() {
        f(widen(c, buf), pf.skip(i * TILE));
    }
}

/// `src` (at most `buf.len()` entries) converted to f32 in `buf`; the converted prefix.
#[cfg_attr(not(debug_assertions), inline(always))]
#[cfg_attr(debug_assertions, inline)]
pub(crate) fn widen<'b, T: Element>(src: &[T], buf: &'b mut [f32]) -> &'b [f32] {
    let t = &mut buf[..src.len()];
    T::load_f32(src, t);
    t
}

/// Calls `f(x_tile, y_tile, pf, direct)` over the f32 views of a row's input and output;
/// `direct` is false when `y_tile` is a stack tile copied to the output afterwards (streaming
/// stores must not go there: they would evict the tile just before it is read back).
#[cfg_attr(not(debug_assertions), inline(always))]
#[cfg_attr(debug_assertions, inline)]
fn write_tiles<'p, T: Element>(
    io: &mut Io<'_, T>,
    pf: Ahead<'p>,
    mut f: impl FnMut(&[f32], &mut [f32], Ahead<'p>, bool),
) {
    match io {
        Io::Sep(x, y) => {
            if let (Some(xf), Some(yf)) = (T::cast::<f32>(x), T::cast_mut::<f32>(y)) {
                f(xf, yf, pf, true);
                return;
            }
            let mut sc = Scratch::take();
            let [bx, by] = sc.tiles();
            for (i, (cx, cy)) in x.chunks(TILE).zip(y.chunks_mut(TILE)).enumerate() {
                let yt = &mut by[..cy.len()];
                f(widen(cx, bx), yt, pf.skip(i * TILE), false);
                T::store_f32(yt, cy);
            }
        }
        Io::Same(xy) => {
            let mut sc = Scratch::take();
            let [bx, by] = sc.tiles();
            for (i, c) in xy.chunks_mut(TILE).enumerate() {
                let yt = &mut by[..c.len()];
                f(widen(c, bx), yt, pf.skip(i * TILE), false);
                T::store_f32(yt, c);
            }
        }
    }
}

/// What a scan of a row that failed the fast path found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Special {
    Nan,
    PosInf,
    /// Every entry is `-inf`, or the row is empty.
    AllNegInf,
}

/// Classifies a row whose statistics came out non-finite (the rare path: a scalar rescan).
pub(crate) fn classify<T: Element>(x: &[T]) -> Special {
    let (mut nan, mut pinf) = (false, false);
    for &v in x {
        let v = v.to_f64();
        nan |= v.is_nan();
        pinf |= v == f64::INFINITY;
    }
    if nan {
        Special::Nan
    } else if pinf {
        Special::PosInf
    } else {
        // No NaN, no +inf, yet no finite maximum: every entry is -inf.
        Special::AllNegInf
    }
}

/// The constant a special row is filled with.
pub(crate) fn special_fill(sp: Special, op: FwdOp, masked: MaskedRow) -> f64 {
    match (sp, op, masked) {
        (Special::AllNegInf, FwdOp::Softmax, MaskedRow::Zero) => 0.0,
        (Special::AllNegInf, FwdOp::LogSoftmax, MaskedRow::Zero) => f64::NEG_INFINITY,
        _ => f64::NAN,
    }
}

/// `logsumexp` of a special row.
pub(crate) fn special_lse(sp: Special) -> f64 {
    match sp {
        Special::Nan => f64::NAN,
        Special::PosInf => f64::INFINITY,
        Special::AllNegInf => f64::NEG_INFINITY,
    }
}

/// True when `(m, d)` describe a row with a finite max and a usable sum.
#[cfg_attr(not(debug_assertions), inline(always))]
#[cfg_attr(debug_assertions, inline)]
pub(crate) fn regular(st: Online) -> bool {
    st.m.is_finite() && st.d.is_finite() && st.d > 0.0
}

// ---------------------------------------------------------------------------------------------
// Segment statistics (a whole short row, or one chunk of a long row).

#[cfg_attr(not(debug_assertions), inline(always))]
#[cfg_attr(debug_assertions, inline)]
pub(crate) fn seg_max<S: Isa, T: Element>(s: S, x: &[T], pf: Ahead) -> f32 {
    let mut m = f32::NEG_INFINITY;
    read_tiles(
        x,
        pf,
        #[cfg_attr(not(debug_assertions), inline(always))]
        #[cfg_attr(debug_assertions, inline)]
        |t, p| {
            let v = k::max(s, t, p);
            if v > m || v.is_nan() {
                m = v;
            }
        },
    );
    m
}

#[cfg_attr(not(debug_assertions), inline(always))]
#[cfg_attr(debug_assertions, inline)]
pub(crate) fn seg_sum<S: Isa, T: Element>(s: S, x: &[T], m: f32, kk: f32, pf: Ahead) -> f64 {
    let mut acc = 0.0f64;
    read_tiles(
        x,
        pf,
        #[cfg_attr(not(debug_assertions), inline(always))]
        #[cfg_attr(debug_assertions, inline)]
        |t, p| k::sum_exp(s, t, m, kk, &mut acc, p),
    );
    acc
}

/// A running row state that takes a row one f32 tile at a time: the online `(max, sum)` or
/// the extended-exponent state.
pub(crate) trait RowFold: Sized {
    const EMPTY: Self;
    fn add<S: Isa>(&mut self, s: S, tile: &[f32], kk: f32, pf: Ahead);
}

impl RowFold for Online {
    const EMPTY: Self = Online::EMPTY;
    #[cfg_attr(not(debug_assertions), inline(always))]
    #[cfg_attr(debug_assertions, inline)]
    fn add<S: Isa>(&mut self, s: S, tile: &[f32], kk: f32, pf: Ahead) {
        k::online(s, tile, kk, self, pf)
    }
}

impl RowFold for Ext {
    const EMPTY: Self = Ext::EMPTY;
    #[cfg_attr(not(debug_assertions), inline(always))]
    #[cfg_attr(debug_assertions, inline)]
    fn add<S: Isa>(&mut self, s: S, tile: &[f32], kk: f32, pf: Ahead) {
        k::ext(s, tile, kk, self, pf)
    }
}

/// The running state `St` of a segment at inverse temperature `kk`.
#[cfg_attr(not(debug_assertions), inline(always))]
#[cfg_attr(debug_assertions, inline)]
pub(crate) fn seg_fold<St: RowFold, S: Isa, T: Element>(s: S, x: &[T], kk: f32, pf: Ahead) -> St {
    let mut st = St::EMPTY;
    read_tiles(
        x,
        pf,
        #[cfg_attr(not(debug_assertions), inline(always))]
        #[cfg_attr(debug_assertions, inline)]
        |t, p| st.add(s, t, kk, p),
    );
    st
}

/// The online `(max, sum)` of a segment.
#[cfg_attr(not(debug_assertions), inline(always))]
#[cfg_attr(debug_assertions, inline)]
pub(crate) fn seg_online<S: Isa, T: Element>(s: S, x: &[T], kk: f32, pf: Ahead) -> Online {
    seg_fold(s, x, kk, pf)
}

/// Whether an extended-exponent state can be used as is (else: redo with the online pass).
#[cfg_attr(not(debug_assertions), inline(always))]
#[cfg_attr(debug_assertions, inline)]
pub(crate) fn ext_usable(e: &Ext, kk: f32) -> bool {
    !e.nonfinite && (e.m * kk).abs() < k::EXT_LIMIT
}

pub(crate) fn ext_to_online(e: &Ext, kk: f32) -> Online {
    Online { m: e.m, d: e.sum_relative_to_max(kk) }
}

/// Writes the output of a regular row from its statistics.
#[cfg_attr(not(debug_assertions), inline(always))]
#[cfg_attr(debug_assertions, inline)]
pub(crate) fn seg_write<S: Isa, T: Element>(s: S, f: &Fwd, io: &mut Io<'_, T>, st: Online, pf: Ahead) {
    let map = row_map(f, st);
    write_tiles(
        io,
        pf,
        #[cfg_attr(not(debug_assertions), inline(always))]
        #[cfg_attr(debug_assertions, inline)]
        |x, y, p, direct| k::write_row(s, x, y, map, f.stream && direct, p, None),
    );
}

/// The write map of a regular row from its statistics.
#[cfg_attr(not(debug_assertions), inline(always))]
#[cfg_attr(debug_assertions, inline)]
fn row_map(f: &Fwd, st: Online) -> k::RowMap {
    match f.op {
        FwdOp::Softmax => k::RowMap::Softmax { m: st.m, k: f.k, c: (1.0 / st.d) as f32 },
        FwdOp::LogSoftmax => k::RowMap::LogSoftmax { m: st.m, k: f.k, ls: st.d.ln() as f32 },
    }
}

/// One row of a pipelined run: writes row `x → y` from its online statistics `st` (or fills a
/// special row) and returns the online statistics of `next` (the next row, with its prefetch
/// domain). When the row is regular and `x`, `y` and `next` are f32 slices of one length,
/// the next row's online pass runs inside this row's write loop (software pipelining across
/// rows; see `rows::write_map`). Every output and state is bit for bit what [`row_fwd`] with
/// [`Algorithm::Online`] computes.
#[cfg_attr(not(debug_assertions), inline(always))]
#[cfg_attr(debug_assertions, inline)]
pub(crate) fn pipe_row<S: Isa, T: Element>(
    s: S,
    f: &Fwd,
    x: &[T],
    y: &mut [T],
    st: Online,
    pf: Ahead,
    next: Option<(&[T], Ahead)>,
) -> Online {
    if regular(st) {
        if let Some((nx, npf)) = next {
            if let (Some(xf), Some(nf), Some(yf)) = (T::cast::<f32>(x), T::cast::<f32>(nx), T::cast_mut::<f32>(y)) {
                if xf.len() == nf.len() && xf.len() == yf.len() {
                    let mut ns = Online::EMPTY;
                    let n = k::Next { x: nf, k: f.k, st: &mut ns, pf: npf };
                    k::write_row(s, xf, yf, row_map(f, st), f.stream, pf, Some(n));
                    return ns;
                }
            }
        }
        seg_write(s, f, &mut Io::Sep(x, y), st, pf);
    } else if !x.is_empty() {
        fill(y, special_fill(classify(x), f.op, f.masked));
    }
    match next {
        Some((nx, npf)) => seg_online(s, nx, f.k, npf),
        None => Online::EMPTY,
    }
}

/// Three-pass pass 2 on f32 data: `y = exp((x − m)·k)` stored (with `shifted`, the
/// log-softmax form `y = (x − m)·k`), `Σ exp((x − m)·k)` returned. In place, each tile is
/// copied aside first (the kernel reads and writes separate slices).
#[cfg_attr(not(debug_assertions), inline(always))]
#[cfg_attr(debug_assertions, inline)]
fn exp_store_sum_io<S: Isa, T: Element>(s: S, io: &mut Io<'_, T>, m: f32, kk: f32, shifted: bool, pf: Ahead) -> f64 {
    let mut d = 0.0f64;
    let pass = inl_mut(
        #[cfg_attr(not(debug_assertions), inline(always))]
        #[cfg_attr(debug_assertions, inline)]
        |x: &[f32], y: &mut [f32], d: &mut f64, p: Ahead| {
            if shifted { k::shift_store_sum(s, x, y, m, kk, d, p) } else { k::exp_store_sum(s, x, y, m, kk, d, p) }
        },
    );
    match io {
        Io::Sep(x, y) => {
            if let (Some(xf), Some(yf)) = (T::cast::<f32>(x), T::cast_mut::<f32>(y)) {
                pass(xf, yf, &mut d, pf);
            }
        }
        Io::Same(xy) => {
            if let Some(yf) = T::cast_mut::<f32>(xy) {
                let mut sc = Scratch::take();
                let [buf] = sc.tiles();
                for (i, c) in yf.chunks_mut(TILE).enumerate() {
                    let b = &mut buf[..c.len()];
                    b.copy_from_slice(c);
                    pass(b, c, &mut d, pf.skip(i * TILE));
                }
            }
        }
    }
    d
}

/// Fills a row with one value.
pub(crate) fn fill<T: Element>(y: &mut [T], v: f64) {
    let v = T::from_f64(v);
    for o in y {
        *o = v;
    }
}

/// Statistics of a short row (≤ one chunk) for `alg` (not `ThreePass`'s store variant).
#[cfg_attr(not(debug_assertions), inline(always))]
#[cfg_attr(debug_assertions, inline)]
/// `pf` is the prefetch domain for the heavy pass (the max pass of three-pass reads what the
/// previous row's heavy pass prefetched).
pub(crate) fn row_stats<S: Isa, T: Element>(s: S, x: &[T], alg: Algorithm, kk: f32, pf: Ahead) -> Online {
    match alg {
        Algorithm::Online => seg_online(s, x, kk, pf),
        Algorithm::TwoPass => {
            let e: Ext = seg_fold(s, x, kk, pf);
            if ext_usable(&e, kk) { ext_to_online(&e, kk) } else { seg_online(s, x, kk, Ahead::NONE) }
        }
        _ => {
            let m = seg_max(s, x, Ahead::NONE);
            if !m.is_finite() {
                return Online { m, d: f64::NAN };
            }
            Online { m, d: seg_sum(s, x, m, kk, pf) }
        }
    }
}

/// Computes one short row of softmax or log-softmax.
#[cfg_attr(not(debug_assertions), inline(always))]
#[cfg_attr(debug_assertions, inline)]
/// `pf`: the prefetch domain of the row's input (see [`Ahead`]).
pub(crate) fn row_fwd<S: Isa, T: Element>(s: S, f: &Fwd, mut io: Io<'_, T>, pf: Ahead) {
    let n = io.x().len();
    if n == 0 {
        return;
    }
    let alg = f.alg; // resolved by `fwd_params` for this row length
    if alg == Algorithm::ThreePass {
        if T::cast::<f32>(io.x()).is_some() {
            three_pass(s, f, &mut io, pf);
        } else {
            // A converted row is widened once and runs the f32 three-pass on the widened
            // copy (one exponential per entry; the statistics-then-write path computes two),
            // then is narrowed once: the f32 result of the widened row, rounded once.
            let mut sc = Scratch::take();
            let (a, b) = sc.pair(n);
            let a = widen(io.x(), a);
            three_pass(s, f, &mut Io::Sep(a, &mut *b), Ahead::NONE);
            T::store_f32(b, io.y());
        }
        return;
    }
    let st = row_stats(s, io.x(), alg, f.k, pf);
    if regular(st) {
        seg_write(s, f, &mut io, st, Ahead::NONE);
    } else {
        let sp = classify(io.x());
        fill(io.y(), special_fill(sp, f.op, f.masked));
    }
}

/// The three-pass algorithm over one f32 row (`T` is f32; other types reach it through
/// [`row_fwd`]'s widened copy). Pass 2 writes the output (so its cache misses overlap the exp
/// arithmetic) and pass 3 finishes it in cache: softmax stores exp and rescales, log-softmax
/// stores (x − m)·k and subtracts ln Σ.
#[cfg_attr(not(debug_assertions), inline(always))]
#[cfg_attr(debug_assertions, inline)]
fn three_pass<S: Isa, T: Element>(s: S, f: &Fwd, io: &mut Io<'_, T>, pf: Ahead) {
    let log = f.op == FwdOp::LogSoftmax;
    let m = seg_max(s, io.x(), Ahead::NONE);
    if m.is_finite() {
        let d = exp_store_sum_io(s, io, m, f.k, log, pf);
        if regular(Online { m, d }) {
            if let Some(yf) = T::cast_mut::<f32>(io.y()) {
                if log {
                    k::scale_or_shift(s, yf, d.ln() as f32, true);
                } else {
                    k::scale_or_shift(s, yf, (1.0 / d) as f32, false);
                }
            }
            return;
        }
    }
    let sp = classify(io.x());
    fill(io.y(), special_fill(sp, f.op, f.masked));
}

/// The logsumexp of one short row (f64 result).
#[cfg_attr(not(debug_assertions), inline(always))]
#[cfg_attr(debug_assertions, inline)]
pub(crate) fn row_lse<S: Isa, T: Element>(s: S, x: &[T], alg: Algorithm, kk: f32, k64: f64, pf: Ahead) -> f64 {
    if x.is_empty() {
        return f64::NEG_INFINITY;
    }
    let alg = alg.resolve_logsumexp(x.len());
    let st = if alg == Algorithm::ThreePass && T::cast::<f32>(x).is_none() {
        // Both passes read the row: a converted row is widened once.
        let mut sc = Scratch::take();
        row_stats(s, widen(x, sc.row(x.len())), alg, kk, Ahead::NONE)
    } else {
        row_stats(s, x, alg, kk, pf)
    };
    if regular(st) { st.m as f64 * k64 + st.d.ln() } else { special_lse(classify(x)) }
}

mod tasks;

pub(crate) use tasks::*;
