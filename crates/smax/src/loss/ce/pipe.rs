//! The cross-entropy rows run as software pipelines across rows, and the three-pass body of a
//! plain f32 row.

use super::*;

/// Long plain f32 rows with class targets, no smoothing and a gradient (see [`pipelined`]): the
/// online algorithm run as a software pipeline across rows, as the core softmax runs it
/// (`engine::pipe_row`). The gradient write of row `r`, `g = exp((x − m)·k)·k·A/Σ` (then the
/// target's `−s·α·k`), carries the online (max, Σ) pass over row `r + 1` in the same loop, so
/// the logits are read from memory once and the gradient streams out: two passes' work,
/// one pass's traffic. Bit for bit what each row computes alone through this path.
#[cfg_attr(not(debug_assertions), inline(always))]
#[cfg_attr(debug_assertions, inline)]
pub(super) fn rows_pipe<S: Isa>(s: S, c: &Ce<'_>, p: PlainRows<'_>) -> Vec<RowOut> {
    let PlainRows { x, xs, len, classes, g, gs } = p;
    let rows = classes.len();
    let mut out = Vec::with_capacity(rows);
    let (kf, k64) = (c.xf.k, c.xf.k as f64);
    let row = |r: usize| &x[r * xs..r * xs + len];
    let mut st = seg_online(s, row(0), kf, ahead(row(0)));
    for (r, &y) in classes.iter().enumerate() {
        let xr = row(r);
        let gr = &mut g[r * gs..r * gs + len];
        let next = (r + 1 < rows).then(|| row(r + 1));
        let mut fused = None;
        let o = if y == c.ignore_index {
            crate::engine::fill(gr, 0.0);
            let lse = match (c.need_lse, regular(st)) {
                (false, _) => f64::NAN,
                (true, true) => st.m as f64 * k64 + st.d.ln(),
                (true, false) => crate::engine::special_lse(classify(xr)),
            };
            RowOut { loss: 0.0, z: 0.0, lse }
        } else if !regular(st) {
            special_row(c, classify(xr), Some(gr))
        } else {
            let yi = y as usize;
            let (o, a, fix) = class_row(c, xr, yi, st.m, st.d);
            // The chain factor ∂t/∂x = k folds into the constant (one rounding).
            let c1 = (a / st.d * k64) as f32;
            let map = k::RowMap::Softmax { m: st.m, k: kf, c: c1 };
            match next {
                Some(nx) => {
                    let mut ns = k::Online::EMPTY;
                    let n = k::Next { x: nx, k: kf, st: &mut ns, pf: ahead(nx) };
                    k::write_row(s, xr, gr, map, c.stream, Ahead::NONE, Some(n));
                    fused = Some(ns);
                }
                None => k::write_row(s, xr, gr, map, c.stream, Ahead::NONE, None),
            }
            gr[yi] -= fix;
            o
        };
        out.push(o);
        if let Some(nx) = next {
            st = match fused {
                Some(ns) => ns,
                None => seg_online(s, nx, kf, ahead(nx)),
            };
        }
    }
    out
}

/// A plain f32 row with a class target and no cap: the three-pass shape of the core softmax.
/// Pass 1 takes the max (and the smoothing dot) of the raw logits, pass 2 stores
/// `exp((x − m)·k)` into the gradient row and sums it, pass 3 finishes the gradient in place
/// while the row is still in cache. The temperature is folded into `k`.
#[cfg_attr(not(debug_assertions), inline(always))]
#[cfg_attr(debug_assertions, inline)]
#[allow(clippy::too_many_arguments)]
pub(super) fn row_f32_hard<S: Isa>(
    s: S,
    c: &Ce<'_>,
    x: &[f32],
    y: usize,
    alpha: f64,
    beta: f64,
    g: Option<&mut [f32]>,
    pf: Ahead,
) -> RowOut {
    let kf = c.xf.k;
    let k64 = kf as f64;
    let smooth = beta != 0.0;
    let mut sv = 0.0f64;
    let m = match (smooth, c.weights) {
        (true, Some(w)) => {
            k::dot_guarded(s, w, x, &mut sv);
            k::max(s, x, Ahead::NONE)
        }
        (true, None) => {
            let mut mx = f32::NEG_INFINITY;
            k::sum_and_max(s, x, x, &mut sv, &mut mx, Ahead::NONE, Ahead::NONE);
            mx
        }
        _ => k::max(s, x, Ahead::NONE),
    };
    // The heavy pass prefetches ahead (into the next rows), as the core's three-pass does.
    // The exponentials are stored into the gradient row; a streamed gradient of 1–64 Ki rows
    // goes through a scratch row instead (`rows_three_pass_pipe`).
    let mut d = 0.0f64;
    let mut g = g;
    if m.is_finite() {
        match g.as_deref_mut() {
            Some(gf) => k::exp_store_sum(s, x, gf, m, kf, &mut d, pf),
            None => k::sum_exp(s, x, m, kf, &mut d, pf),
        }
    }
    if !regular(k::Online { m, d }) {
        return special_row(c, classify(x), g);
    }
    if !sv.is_finite() {
        // The smoothing sum overflowed or met a masked logit: the f64 row (as in `row_f32`).
        return row_f64(c, x, Tgt::Class(y as i64), g);
    }
    let lse = m as f64 * k64 + d.ln();
    let mut loss = target_term(alpha, x[y], m, k64, d);
    if smooth {
        loss += beta * (c.wsum * lse - sv * k64);
    }
    let out = RowOut { loss, z: c.lambda * lse * lse, lse };
    if let Some(g) = g {
        let big_u = alpha + beta * c.wsum;
        let a = c.main_scale * big_u + c.z_scale * 2.0 * c.lambda * lse;
        let c1 = (a / d) as f32;
        let b = (c.main_scale * beta) as f32;
        let sub = match (smooth, c.weights) {
            (false, _) => Sub::None,
            (true, Some(w)) => Sub::Vec(b, w),
            (true, None) => Sub::Const(b),
        };
        k::ce_finish(s, g, c1, sub, kf);
        g[y] -= (c.main_scale * alpha) as f32 * kf;
    }
    out
}

/// Plain f32 rows of 1–64 Ki logits with class targets, no smoothing or cap, and a streamed
/// gradient (see [`three_pass_pipelined`]): [`row_f32_hard`] run as a software pipeline across
/// rows, as the core runs its three-pass (`engine::rows_three_pass_pipe`). Pass 2 of row `r`
/// stores its exponentials in a cached scratch row; pass 3 streams the gradient out of it
/// while pass 1 (the max) of row `r + 1` runs in the same loop. Ignored and special rows go
/// through [`row_f32_hard`]'s own code. Bit for bit what each row computes alone.
#[cfg_attr(not(debug_assertions), inline(always))]
#[cfg_attr(debug_assertions, inline)]
pub(super) fn rows_three_pass_pipe<S: Isa>(s: S, c: &Ce<'_>, p: PlainRows<'_>) -> Vec<RowOut> {
    let PlainRows { x, xs, len, classes, g, gs } = p;
    let rows = classes.len();
    let mut out = Vec::with_capacity(rows);
    let kf = c.xf.k;
    let row = |r: usize| &x[r * xs..r * xs + len];
    crate::engine::with_scratch(
        len,
        #[cfg_attr(not(debug_assertions), inline(always))]
        #[cfg_attr(debug_assertions, inline)]
        |b| {
            let mut m = k::max(s, row(0), Ahead::NONE);
            for (r, &y) in classes.iter().enumerate() {
                let xr = row(r);
                let gr = &mut g[r * gs..r * gs + len];
                let next: &[f32] = if r + 1 < rows { row(r + 1) } else { &[] };
                let pf = ahead(&x[r * xs..]).distance(xs);
                let mut d = 0.0f64;
                if y != c.ignore_index && m.is_finite() {
                    k::exp_store_sum(s, xr, b, m, kf, &mut d, pf);
                }
                if y == c.ignore_index || !regular(k::Online { m, d }) {
                    // The row as it runs alone (it redoes its max; rare rows).
                    out.push(row_f32(s, c, xr, Tgt::Class(y), Some(gr), pf));
                    // Only a row that skipped pass 2 (which fetches row r + 1 into L2)
                    // prefetches in its max of row r + 1 (see `engine::rows_three_pass_pipe`).
                    let npf = if r + 1 < rows { ahead(&x[(r + 1) * xs..]) } else { Ahead::NONE };
                    m = k::max(s, next, npf);
                    continue;
                }
                let yi = y as usize;
                let (o, a, fix) = class_row(c, xr, yi, m, d);
                let c1 = (a / d) as f32;
                // `ce_finish` with no smoothing: g = e·(c1·k) in one product, then the target's
                // `− fix`, computed here with the same two roundings and placed in the register
                // before the streaming store (see `k::finish_max_next`).
                let c1k = c1 * kf;
                let target = (yi, b[yi] * c1k - fix);
                m = k::finish_max_next(s, b, gr, c1k, false, true, next, Some(target));
                out.push(o);
            }
            s.stream_fence();
        },
    );
    out
}
