//! The f64 compute path: plain scalar loops with the libm `exp`/`ln` (≤ 1 ULP), sums in
//! blocks of four accumulators combined with Neumaier compensation. Rows run in parallel;
//! a row is never split, so results do not depend on threads. The `Algorithm` option does
//! not apply (every f64 row runs max; `Σ exp`; write).

use crate::element::Element;
use crate::engine::{self, Fwd, FwdOp};
use crate::engine::{BwdRows, RowGeom};
use crate::options::Options;
use crate::par;

const BLOCK: usize = 256;

/// The logistic function `1/(1 + e^{−x})`, from `e^{−|x|}` so that neither side overflows.
pub(crate) fn sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

/// `softplus(z) = ln(1 + e^z)`, without overflow for large `z`.
pub(crate) fn softplus(z: f64) -> f64 {
    if z > 0.0 { z + (-z).exp().ln_1p() } else { z.exp().ln_1p() }
}

/// `ln Σ exp(v)` over `values` in f64: the max first, then a compensated sum of
/// `exp(v − max)`. The special values of the crate's table: any NaN gives NaN; `+inf` (no
/// NaN) gives `+inf`; an empty or all `-inf` set gives `-inf`. `values` is walked twice. The
/// families' f64 row statistics (calibration, the f64 losses) all go through here; `sample`
/// keeps its own sum order, which its exactness definition and its test reference share.
pub(crate) fn lse(values: impl Iterator<Item = f64> + Clone) -> f64 {
    let m = values.clone().fold(f64::NEG_INFINITY, |m, v| if v > m || v.is_nan() { v } else { m });
    if m.is_nan() || m.is_infinite() {
        return m;
    }
    let mut s = Sum::default();
    for v in values {
        s.add((v - m).exp());
    }
    m + s.get().ln()
}

/// Neumaier-compensated running sum. An infinite sum is returned as it is (the compensation
/// of an infinite term is `inf − inf = NaN`, which must not turn `+inf` into NaN).
#[derive(Default, Clone, Copy)]
pub(crate) struct Sum {
    s: f64,
    c: f64,
}

impl Sum {
    pub(crate) fn add(&mut self, v: f64) {
        let t = self.s + v;
        if self.s.abs() >= v.abs() {
            self.c += (self.s - t) + v;
        } else {
            self.c += (v - t) + self.s;
        }
        self.s = t;
    }
    pub(crate) fn get(self) -> f64 {
        if self.s.is_finite() { self.s + self.c } else { self.s }
    }
}

fn block_sum(it: impl Iterator<Item = f64>) -> f64 {
    let mut a = [0.0f64; 4];
    for (i, v) in it.enumerate() {
        a[i & 3] += v;
    }
    (a[0] + a[1]) + (a[2] + a[3])
}

/// `(max, Σ exp((x − max)·k))`, with NaN and ±inf rows reported through a non-finite result.
fn stats(x: &[f64], k: f64) -> (f64, f64) {
    let mut m = f64::NEG_INFINITY;
    let mut nan = false;
    for &v in x {
        nan |= v.is_nan();
        if v > m {
            m = v;
        }
    }
    if nan || !m.is_finite() {
        return (m, f64::NAN);
    }
    let mut s = Sum::default();
    for b in x.chunks(BLOCK) {
        s.add(block_sum(b.iter().map(|&v| ((v - m) * k).exp())));
    }
    (m, s.get())
}

fn classify(x: &[f64]) -> engine::Special {
    engine::classify(x)
}

/// One row of softmax / log-softmax.
pub(crate) fn row_fwd(f: &Fwd, k: f64, x: &[f64], y: &mut [f64]) {
    if x.is_empty() {
        return;
    }
    let (m, d) = stats(x, k);
    if !(d.is_finite() && d > 0.0) {
        let v = engine::special_fill(classify(x), f.op, f.masked);
        y.iter_mut().for_each(|o| *o = v);
        return;
    }
    match f.op {
        FwdOp::Softmax => {
            for (o, &v) in y.iter_mut().zip(x) {
                *o = ((v - m) * k).exp() / d;
            }
        }
        FwdOp::LogSoftmax => {
            let ls = d.ln();
            for (o, &v) in y.iter_mut().zip(x) {
                *o = (v - m).mul_add(k, -ls);
            }
        }
    }
}

/// One row in place.
fn row_fwd_inplace(f: &Fwd, k: f64, xy: &mut [f64], tmp: &mut Vec<f64>) {
    tmp.clear();
    tmp.extend_from_slice(xy);
    row_fwd(f, k, tmp, xy);
}

/// Logsumexp of one row.
pub(crate) fn row_lse(k: f64, x: &[f64]) -> f64 {
    if x.is_empty() {
        return f64::NEG_INFINITY;
    }
    let (m, d) = stats(x, k);
    if d.is_finite() && d > 0.0 { m * k + d.ln() } else { engine::special_lse(classify(x)) }
}

/// One row of softmax backward (`log = false`) or log-softmax backward (`log = true`).
pub(crate) fn row_bwd(log: bool, k: f64, y: &[f64], dy: &[f64], dx: &mut [f64]) {
    let mut s = Sum::default();
    if log {
        let mut ym = f64::NEG_INFINITY;
        for (b, yb) in dy.chunks(BLOCK).zip(y.chunks(BLOCK)) {
            s.add(block_sum(b.iter().copied()));
            for &v in yb {
                if v > ym || v.is_nan() {
                    ym = v;
                }
            }
        }
        let t = s.get();
        if ym == f64::NEG_INFINITY {
            dx.iter_mut().for_each(|o| *o = 0.0);
            return;
        }
        for ((o, &a), &g) in dx.iter_mut().zip(y).zip(dy) {
            *o = k * (-a.exp()).mul_add(t, g);
        }
    } else {
        for (a, b) in y.chunks(BLOCK).zip(dy.chunks(BLOCK)) {
            s.add(block_sum(a.iter().zip(b).map(|(p, q)| p * q)));
        }
        let t = s.get();
        for ((o, &a), &g) in dx.iter_mut().zip(y).zip(dy) {
            *o = k * (a * (g - t));
        }
    }
}

fn f64s<T: Element>(s: &[T]) -> &[f64] {
    T::cast::<f64>(s).unwrap_or(&[])
}

fn f64s_mut<T: Element>(s: &mut [T]) -> &mut [f64] {
    T::cast_mut::<f64>(s).unwrap_or(&mut [])
}

pub(crate) fn rows_fwd<T: Element>(f: Fwd, k: f64, opts: &Options, g: RowGeom, x: Option<&[T]>, y: &mut [T]) {
    if g.rows == 0 || g.len == 0 {
        return;
    }
    let x = x.map(f64s);
    let y = f64s_mut(y);
    par::for_each(opts.exec.par, par::row_groups(y, g.rows, g.len, g.ys), |_, (r0, cnt, yg)| {
        let mut tmp = Vec::new();
        for i in 0..cnt {
            let yr = &mut yg[i * g.ys..i * g.ys + g.len];
            match x {
                Some(x) => row_fwd(&f, k, &x[(r0 + i) * g.xs..(r0 + i) * g.xs + g.len], yr),
                None => row_fwd_inplace(&f, k, yr, &mut tmp),
            }
        }
    });
}

pub(crate) fn rows_lse<T: Element>(k: f64, opts: &Options, g: RowGeom, x: &[T], out: &mut [T]) {
    let x = f64s(x);
    let out = f64s_mut(out);
    let per = par::rows_per_task(g.len);
    let items: Vec<(usize, &mut [f64])> = out.chunks_mut(per).enumerate().collect();
    par::for_each(opts.exec.par, items, |_, (i, o)| {
        for (j, v) in o.iter_mut().enumerate() {
            let r = i * per + j;
            *v = row_lse(k, &x[r * g.xs..r * g.xs + g.len]);
        }
    });
}

/// Backward over rows (see [`BwdRows`]).
pub(crate) fn rows_bwd<T: Element>(log: bool, k: f64, opts: &Options, rows: BwdRows<'_, T>) {
    let BwdRows { g, gs, y, dy, dx } = rows;
    if g.rows == 0 || g.len == 0 {
        return;
    }
    let y = f64s(y);
    let dy = dy.map(f64s);
    let dx = f64s_mut(dx);
    par::for_each(opts.exec.par, par::row_groups(dx, g.rows, g.len, g.ys), |_, (r0, cnt, dg)| {
        let mut tmp = Vec::new();
        for i in 0..cnt {
            let r = r0 + i;
            let yr = &y[r * g.xs..r * g.xs + g.len];
            let dr = &mut dg[i * g.ys..i * g.ys + g.len];
            match dy {
                Some(d) => row_bwd(log, k, yr, &d[r * gs..r * gs + g.len], dr),
                None => {
                    tmp.clear();
                    tmp.extend_from_slice(dr);
                    row_bwd(log, k, yr, &tmp, dr);
                }
            }
        }
    });
}
