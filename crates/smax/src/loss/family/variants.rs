//! Softmax variants as losses: decoupled softmax (L7), TempNet (L10), normalised (cosine)
//! softmax (L8).

use super::*;

// ---------------------------------------------------------------------------------------------
// Decoupled softmax (L7).

/// The decoupled softmax loss for multi-positive retrieval (DEXML, Gupta et al. 2024; L7):
/// with scores `s = sims/τ` and the row's positives `P` (`positives[r·cols + j]`), each positive
/// competes only with the negatives:
/// `L_r = (1/|P|)·Σ_{p∈P} [ln(e^{s_p} + Σ_{n∉P} e^{s_n}) − s_p]`.
/// The negatives' log-sum-exp is taken once per row and combined per positive with a guarded
/// `logaddexp`. Gradient with respect to the raw similarities: `(π_p^{(p)} − 1)/(|P|τ)` at a
/// positive and `Σ_p π_n^{(p)}/(|P|τ)` at a negative, `π^{(p)}` being the softmax over `{p} ∪ N`.
/// Rows without positives count for nothing; rows without negatives have loss 0. The authors
/// use τ = 0.05 on cosine similarities; positives are masked out of the negatives exactly (the
/// code's −100 sentinel is not needed).
pub fn decoupled_softmax_loss<T: Element>(
    sims: View<'_, T>,
    positives: &[bool],
    grad: Option<ViewMut<'_, T>>,
    rows_out: Option<&mut [f64]>,
    opts: &LossOptions<Decoupled>,
) -> Result<LossReport> {
    let Decoupled { temperature: tau } = opts.params;
    let o = &opts.common();
    positive("tau", tau)?;
    let (rows, len, _) = rows_of(&sims, "sims")?;
    if positives.len() != rows * len {
        return Err(Error::LengthMismatch { what: "positives", len: positives.len(), expected: rows * len });
    }
    let k = 1.0 / tau;
    let pos = |r: usize| &positives[r * len..(r + 1) * len];
    drive(
        sims,
        grad,
        rows_out,
        o,
        |r| pos(r).iter().any(|&p| p),
        |r, x, g| {
            let p = pos(r);
            let np = p.iter().filter(|&&b| b).count();
            if np == 0 {
                return None;
            }
            let lneg = lse_of(x, k, |i| !p[i]);
            let mut terms = Vec::with_capacity(np);
            let mut g = g;
            for j in (0..len).filter(|&j| p[j]) {
                let sp = x[j] * k;
                // logaddexp(sp, lneg), guarded for lneg = -inf.
                let l = if lneg == f64::NEG_INFINITY {
                    sp
                } else {
                    let m = sp.max(lneg);
                    m + ((sp - m).exp() + (lneg - m).exp()).ln()
                };
                terms.push(l - sp);
                if let Some(g) = g.as_deref_mut() {
                    g[j] += ((sp - l).exp() - 1.0) * k / np as f64;
                    for n in (0..len).filter(|&n| !p[n]) {
                        g[n] += (x[n] * k - l).exp() * k / np as f64;
                    }
                }
            }
            Some((fsum(terms) / np as f64, false))
        },
    )
}

// ---------------------------------------------------------------------------------------------
// TempNet (L10).

/// TempNet's DRO loss with a per-sample temperature (Qiu et al. 2024; L10):
/// `L = τ·CE(z/τ, y) + τ·(ρ − ln V)` with `V` the vocabulary size. Gradients:
/// `∂L/∂z_k = softmax(z/τ)_k − [k = y]` (τ cancels) into `grad`, and
/// `∂L/∂τ = H(softmax(z/τ)) + ρ − ln V` into `dtau` (both times the reduction scale). τ per
/// row must be finite and > 0 (the authors clamp it to `[0.5, 5]` with a sigmoid head); their
/// GPT-2 configuration uses ρ = 8 (code default 1). Ignored rows count for nothing (the released
/// code does not mask them; here they are masked).
pub fn tempnet_loss<T: Element>(
    logits: View<'_, T>,
    targets: &[i64],
    tau: &[f64],
    grad: Option<ViewMut<'_, T>>,
    dtau: Option<&mut [f64]>,
    rows_out: Option<&mut [f64]>,
    opts: &LossOptions<TempNet>,
) -> Result<LossReport> {
    let TempNet { rho } = opts.params;
    let o = &opts.common();
    param("rho", rho, rho.is_finite(), "finite")?;
    let (rows, len, _) = rows_of(&logits, "logits")?;
    check_targets(targets, rows, len, o.ignore_index)?;
    if tau.len() != rows {
        return Err(Error::LengthMismatch { what: "tau", len: tau.len(), expected: rows });
    }
    if let Some(&t) = tau.iter().find(|t| !(t.is_finite() && **t > 0.0)) {
        param("tau", t, false, "finite and > 0 in every row")?;
    }
    if let Some(d) = &dtau {
        if d.len() != rows {
            return Err(Error::LengthMismatch { what: "dtau", len: d.len(), expected: rows });
        }
    }
    let ig = o.ignore_index;
    let lnv = (len as f64).ln();
    // dL/dτ per row (unscaled), collected beside the driver.
    let dt: Vec<std::sync::Mutex<f64>> = (0..rows).map(|_| std::sync::Mutex::new(0.0)).collect();
    let res = drive_classes(logits, "logits", targets, grad, rows_out, o, |r, y, x, g| {
        let t = tau[r];
        let lse = lse_of(x, 1.0 / t, |_| true);
        let ce = lse - x[y] / t;
        let ent = -fsum(x.iter().map(|&v| {
            let lp = v / t - lse;
            let p = lp.exp();
            if p == 0.0 { 0.0 } else { p * lp }
        }));
        if let Ok(mut d) = dt[r].lock() {
            *d = ent + rho - lnv;
        }
        if let Some(g) = g {
            for (k, (gk, &v)) in g.iter_mut().zip(x).enumerate() {
                *gk = (v / t - lse).exp() - (k == y) as u8 as f64;
            }
        }
        (t * ce + t * (rho - lnv), false)
    })?;
    if let Some(d) = dtau {
        let scale = if res.denominator > 0.0 { o.grad_scale / res.denominator } else { 0.0 };
        for (r, (o, m)) in d.iter_mut().zip(&dt).enumerate() {
            let v = m.lock().map(|v| *v).unwrap_or(f64::NAN);
            *o = if targets[r] == ig { 0.0 } else { v * scale };
        }
    }
    Ok(res)
}

// ---------------------------------------------------------------------------------------------
// Normalised (cosine) softmax (L8).

/// Gradients of [`normalized_softmax_loss`].
#[derive(Debug, Default)]
pub struct CosineGrads<'a> {
    /// `∂L/∂x`, `[batch x dim]`.
    pub dx: Option<&'a mut [f64]>,
    /// `∂L/∂W`, `[classes x dim]`.
    pub dw: Option<&'a mut [f64]>,
}

/// The normalised (cosine) softmax loss (L8), as parametrised by Pereira et al.'s released
/// package for arXiv 2102.03243: `logit_k = cos(x, w_k)/T`, cross-entropy against `y`, with
/// `cos(x, w) = x·w/(max(‖x‖, 1e-12)·max(‖w‖, 1e-12))`. Presets: the package's default
/// `s = 10` (T = 0.1), and `T = 0.05` (Zhai & Wu 2019, `[MEMORY]`); the identity of the paper's
/// reference for the loss is `[UNCONFIRMED]`, and both candidates share this formula.
/// Gradients through the normalisation: with `g_k = (p_k − [k = y])/T`,
/// `∂L/∂x = Σ_k g_k (ŵ_k − ĉ_k x̂)/‖x‖` and `∂L/∂w_k = g_k (x̂ − ĉ_k ŵ_k)/‖w_k‖`; a zero vector
/// has cosine 0 and zero gradient. `x` is `[batch x dim]`, `w` `[classes x dim]`, row-major,
/// in f64. Mean over non-ignored rows.
pub fn normalized_softmax_loss(
    x: &[f64],
    w: &[f64],
    dim: usize,
    targets: &[i64],
    grads: CosineGrads<'_>,
    opts: &LossOptions<NormalizedSoftmax>,
) -> Result<LossReport> {
    let NormalizedSoftmax { temperature } = opts.params;
    let o = &opts.common();
    positive("temperature", temperature)?;
    if dim == 0 || !x.len().is_multiple_of(dim) || !w.len().is_multiple_of(dim) || w.is_empty() {
        return Err(Error::LengthMismatch { what: "x / w", len: x.len(), expected: dim.max(1) * targets.len() });
    }
    let (b, c) = (x.len() / dim, w.len() / dim);
    check_targets(targets, b, c, o.ignore_index)?;
    let norm = |v: &[f64]| fsum(v.iter().map(|a| a * a)).sqrt().max(1e-12);
    // The gradient's 1/‖v‖ factor: 0 for a zero vector (its cosine is 0 whatever it points
    // at, and the spec gives it a zero gradient), not 1/1e-12.
    let inv = |v: &[f64]| if v.iter().all(|&a| a == 0.0) { 0.0 } else { 1.0 / norm(v) };
    let wn: Vec<f64> = (0..c).map(|k| norm(&w[k * dim..(k + 1) * dim])).collect();
    let w_inv: Vec<f64> = (0..c).map(|k| inv(&w[k * dim..(k + 1) * dim])).collect();
    let mut cos = vec![0.0f64; b * c];
    for i in 0..b {
        let xi = &x[i * dim..(i + 1) * dim];
        let xn = norm(xi);
        for k in 0..c {
            let wk = &w[k * dim..(k + 1) * dim];
            cos[i * c + k] = fsum(xi.iter().zip(wk).map(|(a, b)| a * b)) / (xn * wn[k]);
        }
    }
    let logits: Vec<f64> = cos.iter().map(|v| v / temperature).collect();
    let mut g = vec![0.0f64; b * c];
    let want_grad = grads.dx.is_some() || grads.dw.is_some();
    let res = crate::loss::cross_entropy(
        View::rows(&logits, b, c)?,
        crate::loss::Targets::Classes(targets),
        if want_grad { Some(ViewMut::rows(&mut g, b, c)?) } else { None },
        crate::loss::RowOutputs::default(),
        &crate::loss::CrossEntropyOptions {
            reduction: o.reduction,
            ignore_index: o.ignore_index,
            all_ignored: o.all_ignored,
            grad_scale: o.grad_scale,
            exec: o.exec,
            ..Default::default()
        },
    )?;
    let CosineGrads { dx, dw } = grads;
    if let Some(dx) = dx {
        if dx.len() != x.len() {
            return Err(Error::LengthMismatch { what: "dx", len: dx.len(), expected: x.len() });
        }
        for i in 0..b {
            let xi = &x[i * dim..(i + 1) * dim];
            let (xn, x_inv) = (norm(xi), inv(xi));
            for d in 0..dim {
                dx[i * dim + d] = fsum((0..c).map(|k| {
                    let gk = g[i * c + k] / temperature;
                    gk * (w[k * dim + d] / wn[k] - cos[i * c + k] * xi[d] / xn) * x_inv
                }));
            }
        }
    }
    if let Some(dw) = dw {
        if dw.len() != w.len() {
            return Err(Error::LengthMismatch { what: "dw", len: dw.len(), expected: w.len() });
        }
        for k in 0..c {
            for d in 0..dim {
                dw[k * dim + d] = fsum((0..b).map(|i| {
                    let xi = &x[i * dim..(i + 1) * dim];
                    let gk = g[i * c + k] / temperature;
                    gk * (xi[d] / norm(xi) - cos[i * c + k] * w[k * dim + d] / wn[k]) * w_inv[k]
                }));
            }
        }
    }
    Ok(res)
}

/// A novel class's weight vector for the normalised softmax classifier (L8, the paper's
/// method): the ℓ2-normalised mean of the examples' embeddings `s·x/‖x‖`. Errors when there are
/// no examples or the mean is 0 (the examples cancel out and give no direction).
pub fn novel_class_prototype(examples: &[f64], dim: usize, s: f64) -> Result<Vec<f64>> {
    positive("s", s)?;
    if dim == 0 || examples.is_empty() || !examples.len().is_multiple_of(dim) {
        return Err(Error::LengthMismatch { what: "examples", len: examples.len(), expected: dim.max(1) });
    }
    let n = examples.len() / dim;
    let mut mean = vec![0.0f64; dim];
    for e in examples.chunks(dim) {
        let nrm = fsum(e.iter().map(|a| a * a)).sqrt().max(1e-12);
        for (m, v) in mean.iter_mut().zip(e) {
            *m += s * v / nrm / n as f64;
        }
    }
    let nrm = fsum(mean.iter().map(|a| a * a)).sqrt();
    if !(nrm > 0.0 && nrm.is_finite()) {
        return Err(Error::bad_parameter(
            "examples",
            format!("mean norm {nrm}"),
            "examples whose mean embedding is not zero",
        ));
    }
    Ok(mean.iter().map(|v| v / nrm).collect())
}
