//! StableMax (N5): the `s(x)` map, its normalisation, its cross-entropy.

use super::*;

// ---------------------------------------------------------------------------------------------
// StableMax (N5).

/// `s(x) = x + 1` for `x ≥ 0`, `1/(1 − x)` below.
fn stable_s(x: f64) -> f64 {
    if x >= 0.0 { x + 1.0 } else { 1.0 / (1.0 - x) }
}

/// `ln s(x)`: `log1p(x)` for `x ≥ 0`, `−log1p(−x)` below (no cancellation either way).
fn stable_ln_s(x: f64) -> f64 {
    if x >= 0.0 { x.ln_1p() } else { -(-x).ln_1p() }
}

/// What [`stablemax`] writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StablemaxOutput {
    /// `s(x_i)/Σ_j s(x_j)`.
    #[default]
    Probs,
    /// `ln s(x_i) − ln Σ_j s(x_j)`.
    LogProbs,
}

/// Options of [`stablemax`]. `Default`: probabilities, rayon.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StablemaxOptions {
    /// Probabilities or log-probabilities.
    pub output: StablemaxOutput,
    /// Threads (computed in scalar f64; `exec.simd` has no effect).
    pub exec: Exec,
}

setters!(StablemaxOptions { output: StablemaxOutput });

/// StableMax (Prieto et al. 2025, "Grokking at the Edge of Numerical Stability"):
/// `StableMax(x)_i = s(x_i)/Σ_j s(x_j)` with `s(x) = x + 1` for `x ≥ 0` and `1/(1 − x)` below;
/// with [`StablemaxOutput::LogProbs`], `ln s(x_i) − ln Σ s` instead. No exponential, so no overflow for finite
/// logits; computed in f64 (the paper's code casts to f64). NaN propagates to its row; a row of
/// only `-inf` gives NaN (0/0, as softmax). `y` has the shape of `x`.
pub fn stablemax<T: Element>(x: View<'_, T>, y: ViewMut<'_, T>, opts: &StablemaxOptions) -> Result<()> {
    let log = opts.output == StablemaxOutput::LogProbs;
    let (rows, len, xs) = rows_of(&x, "input")?;
    x.layout.check_same("output", &y.layout)?;
    let (_, _, ys) = y.row_geometry("output", "stablemax takes row layouts")?;
    if rows == 0 || len == 0 {
        return Ok(());
    }
    let items = par::row_groups(y.data, rows, len, ys);
    par::for_each(opts.exec.par, items, |_, (r0, n, yg)| {
        for i in 0..n {
            let xr = &x.data[(r0 + i) * xs..(r0 + i) * xs + len];
            let total = fsum(xr.iter().map(|v| stable_s(v.to_f64())));
            let ln_total = total.ln();
            for (o, v) in yg[i * ys..i * ys + len].iter_mut().zip(xr) {
                let v = v.to_f64();
                *o = T::from_f64(if log { stable_ln_s(v) - ln_total } else { stable_s(v) / total });
            }
        }
    });
    Ok(())
}

/// StableMax cross-entropy (N5, L4): `ℓ = ln Σ_j s(x_j) − ln s(x_y)`, gradient
/// `s'(x_i)/Σ s − [i = y]·s'(x_y)/s(x_y)` with `s' = 1` for `x ≥ 0` and `s²` below. Targets
/// as in [`cross_entropy`](crate::loss::cross_entropy) (ignore index, mean over non-ignored rows).
/// A target at `-inf` gives `+inf`; NaN propagates; an all `-inf` row gives NaN.
pub fn stablemax_cross_entropy<T: Element>(
    logits: View<'_, T>,
    targets: &[i64],
    grad: Option<ViewMut<'_, T>>,
    rows_out: Option<&mut [f64]>,
    o: &LossOptions,
) -> Result<LossReport> {
    drive_classes(logits, "logits", targets, grad, rows_out, o, |_, y, x, g| {
        let total = fsum(x.iter().map(|&v| stable_s(v)));
        let loss = total.ln() - stable_ln_s(x[y]);
        if let Some(g) = g {
            for (i, (gi, &v)) in g.iter_mut().zip(x).enumerate() {
                let sp = if v >= 0.0 { 1.0 } else { stable_s(v).powi(2) };
                *gi = sp / total;
                if i == y {
                    // s'/s: 1/(x + 1) above 0, s(x) below.
                    *gi -= if v >= 0.0 { 1.0 / (v + 1.0) } else { stable_s(v) };
                }
            }
        }
        (loss, false)
    })
}

/// Softmax Collapse (N5b, Prieto et al. 2025): the fraction of rows whose
/// `Σ_j exp(x_j − max x)` equals 1 exactly in the element type's own arithmetic (f32 for f32,
/// f16 and bf16 round after every addition to their format, f64 for f64), summing sequentially
/// from the max term. A collapsed row has a cross-entropy of exactly 0 at its argmax and a zero
/// gradient there. Rows with NaN or no finite entry do not count as collapsed; an empty batch
/// gives 0.
pub fn softmax_collapse_fraction<T: Element>(logits: View<'_, T>) -> Result<f64> {
    let (rows, len, xs) = rows_of(&logits, "logits")?;
    if rows == 0 {
        return Ok(0.0);
    }
    let mut collapsed = 0usize;
    for r in 0..rows {
        let x = &logits.data[r * xs..r * xs + len];
        let mut mi = None;
        for (i, v) in x.iter().enumerate() {
            let v = v.to_f64();
            if v.is_nan() {
                mi = None;
                break;
            }
            if mi.is_none_or(|j: usize| v > x[j].to_f64()) {
                mi = Some(i);
            }
        }
        let Some(mi) = mi else { continue };
        let m = x[mi].to_f64();
        if !m.is_finite() {
            continue;
        }
        // In the working precision: T's own rounding after each operation.
        let mut s = T::from_f64(1.0);
        for (i, v) in x.iter().enumerate() {
            if i != mi {
                let e = T::from_f64((v.to_f64() - m).exp());
                s = T::from_f64(s.to_f64() + e.to_f64());
            }
        }
        collapsed += (s.to_f64() == 1.0) as usize;
    }
    Ok(collapsed as f64 / rows as f64)
}

// ---------------------------------------------------------------------------------------------
// ⊥Grad (N5c).

defaults! {
    /// Options of [`orthogonal_gradient`]. `Default`: rescaled to the gradient's norm, as the
    /// paper's released code does.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct OrthoGradOptions {
        /// Rescale `g⊥` to `‖g‖` (the released code's step); `false` keeps the bare projection.
        pub renormalize: bool = true,
        /// Accepted for the uniform options shape; the call is sequential (four passes over
        /// one tensor) and reads neither field.
        pub exec: Exec = Exec::default(),
    }
}

setters!(OrthoGradOptions { renormalize: bool });

/// ⊥Grad (Prieto et al. 2025, "Grokking at the Edge of Numerical Stability"): replaces the
/// gradient `g` of one parameter tensor `w` (flattened) by its component orthogonal to `w`,
/// `g⊥ = g − ((w·g)/(w·w + 1e−30))·w`, then, with `renormalize` (the default, as the paper's
/// code), rescales it to the gradient's norm: `g⊥·‖g‖/(‖g⊥‖ + 1e−30)`. It removes the "naive
/// loss minimisation" direction, which only scales the weights (and so the logits) and drives
/// Softmax Collapse; hand the result to the base optimizer (AdamW, SGD). Call it once per
/// parameter tensor per step.
///
/// Dot products and norms in f64 (compensated sums), the update rounded once to `T`. `w = 0`
/// leaves `g` unchanged (the projection is 0); `g = 0` stays 0. NaN in either propagates to
/// `g`. Errors: `w` and `g` of different lengths.
pub fn orthogonal_gradient<T: Element>(w: &[T], g: &mut [T], opts: &OrthoGradOptions) -> Result<()> {
    if w.len() != g.len() {
        return Err(Error::LengthMismatch { what: "gradient", len: g.len(), expected: w.len() });
    }
    let ww = fsum(w.iter().map(|v| v.to_f64() * v.to_f64()));
    let wg = fsum(w.iter().zip(g.iter()).map(|(a, b)| a.to_f64() * b.to_f64()));
    let c = wg / (ww + 1e-30);
    let scale = if opts.renormalize {
        let gg = fsum(g.iter().map(|v| v.to_f64() * v.to_f64()));
        // ‖g⊥‖² = ‖g‖² − 2c(w·g) + c²‖w‖², summed directly for accuracy.
        let pp = fsum(w.iter().zip(g.iter()).map(|(a, b)| {
            let d = b.to_f64() - c * a.to_f64();
            d * d
        }));
        gg.sqrt() / (pp.sqrt() + 1e-30)
    } else {
        1.0
    };
    for (gi, wi) in g.iter_mut().zip(w) {
        *gi = T::from_f64((gi.to_f64() - c * wi.to_f64()) * scale);
    }
    Ok(())
}
