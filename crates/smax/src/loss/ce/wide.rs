//! f64: the cross-entropy row in scalar f64 arithmetic (libm exp/ln/tanh, Neumaier-compensated
//! sums).

use super::*;

use crate::scalar64::Sum;

/// The logit before the scale `k`: `x`, or `cap·tanh(x/cap)` with a cap (monotone in `x`, so
/// the row's max is the max of these).
pub(super) fn capped(c: &Ce<'_>, v: f64) -> f64 {
    if c.cap64 == 0.0 || v == f64::NEG_INFINITY { v } else { c.cap64 * (v / c.cap64).tanh() }
}

/// `∂t/∂x` for `t = k·capped(x)`, from the capped value `q`.
pub(super) fn chain64(c: &Ce<'_>, q: f64) -> f64 {
    if c.cap64 == 0.0 {
        c.k64
    } else if q == f64::NEG_INFINITY {
        0.0
    } else {
        let r = q / c.cap64;
        c.k64 * (1.0 - r * r).max(0.0)
    }
}

/// One f64 row (`x` is f64, or an f32-path row whose scaled logits overflow f32; the generic
/// keeps one task type). The row is shifted by its max before the scale:
/// `u = (capped(x) − m)·k ≤ 0`, `lse = m·k + ln Σ exp(u)`, and every loss term `lse − t_i` is
/// `ln d − u_i`, so no scaled logit is formed (it may overflow f64 when `|x|·k` does).
pub(crate) fn row_f64<T: Element>(c: &Ce<'_>, x: &[T], tgt: Tgt<'_, T>, g: Option<&mut [T]>) -> RowOut {
    let kk = x.len();
    let q: Vec<f64> = x.iter().map(|v| capped(c, v.to_f64())).collect();
    let mut m = f64::NEG_INFINITY;
    let mut nan = false;
    for &v in &q {
        nan |= v.is_nan();
        if v > m {
            m = v;
        }
    }
    let u: Vec<f64> = q.iter().map(|&v| (v - m) * c.k64).collect();
    let mut d = Sum::default();
    if !nan && m.is_finite() {
        for &v in &u {
            d.add(v.exp());
        }
    }
    let d = d.get();
    let lse_reg = !nan && m.is_finite() && d.is_finite() && d > 0.0;
    let (alpha, beta, y) = match tgt {
        Tgt::Class(y) if y == c.ignore_index => {
            if let Some(g) = g {
                crate::engine::fill(g, 0.0);
            }
            let lse = if lse_reg { m * c.k64 + d.ln() } else { crate::engine::special_lse(classify(x)) };
            return RowOut { loss: 0.0, z: 0.0, lse };
        }
        Tgt::Class(y) => {
            let y = y as usize;
            let wy = c.weights.map_or(1.0, |w| w[y] as f64);
            ((1.0 - c.eps) * wy, c.eps / kk as f64, Some(y))
        }
        Tgt::Probs(_) => (0.0, 0.0, None),
    };
    if !lse_reg {
        return special_row(c, classify(x), g);
    }
    // (`+inf` when `m·k` is past f64: the rounding of a value that large.)
    let lse = m * c.k64 + d.ln();
    let ld = d.ln();
    let w = |i: usize| c.weights.map_or(1.0, |w| w[i] as f64);
    // v_k: the per-class target mass that is not the one-hot part.
    let v: Vec<f64> = match tgt {
        Tgt::Probs(q) => (0..kk).map(|i| w(i) * ((1.0 - c.eps) * q[i].to_f64() + c.eps / kk as f64)).collect(),
        Tgt::Class(_) => (0..kk).map(w).collect(),
    };
    // Σ v_i (lse − t_i) = Σ v_i (ln d − u_i).
    let (mut sv, mut su) = (Sum::default(), Sum::default());
    for i in 0..kk {
        if v[i] != 0.0 {
            sv.add(v[i] * (ld - u[i]));
        }
        su.add(v[i]);
    }
    let (sv, su) = (sv.get(), su.get());
    let (loss, big_u, b) = match y {
        Some(y) => {
            let mut l = weighted(alpha, ld - u[y]);
            if beta != 0.0 {
                l += beta * sv;
            }
            (l, alpha + beta * c.wsum, c.main_scale * beta)
        }
        None => (sv, su, c.main_scale),
    };
    let z = c.lambda * lse * lse;
    if let Some(g) = g {
        // (Without a z-loss its term is 0, also when `lse` is `+inf`.)
        let zt = if c.lambda == 0.0 { 0.0 } else { c.z_scale * 2.0 * c.lambda * lse };
        let a = c.main_scale * big_u + zt;
        for i in 0..kk {
            let mut gi = (u[i] - ld).exp() * a - b * v[i];
            if y == Some(i) {
                gi -= c.main_scale * alpha;
            }
            g[i] = T::from_f64(gi * chain64(c, q[i]));
        }
    }
    RowOut { loss, z, lse }
}
