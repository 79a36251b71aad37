//! Calibration and confidence (ALGORITHMS.md D3–D6; NEEDS 24): temperature scaling fitted by
//! Newton on `β = 1/T`, expected / maximum calibration error with reliability-diagram data,
//! the Brier score, and out-of-distribution scores (maximum softmax probability, max-logit,
//! energy, Mahalanobis). Everything is computed in f64 from the given logits, row by row in
//! row order (deterministic).

use crate::check::{product, try_vec, try_with_capacity};
use crate::element::Element;
use crate::error::{Error, Result};
use crate::layout::View;
use crate::options::{Exec, defaults, setters};

fn rows_of<T>(v: &View<'_, T>, what: &'static str) -> Result<(usize, usize, usize)> {
    v.row_geometry(what, "takes row layouts (classes along the last axis)")
}

fn row<T: Element>(v: &View<'_, T>, r: usize, s: usize, k: usize) -> Vec<f64> {
    v.data[r * s..r * s + k].iter().map(|x| x.to_f64()).collect()
}

fn lse(z: &[f64], b: f64) -> f64 {
    crate::scalar64::lse(z.iter().map(|&v| v * b))
}

fn check_labels(labels: &[i64], rows: usize, k: usize) -> Result<()> {
    crate::check::targets(labels, rows, k, None)
}

fn check_finite(z: &[f64], row: usize) -> Result<()> {
    if let Some((index, &v)) = z.iter().enumerate().find(|(_, v)| !v.is_finite()) {
        return Err(Error::NonFiniteLogit { row, index, value: v });
    }
    Ok(())
}

/// The result of [`fit_temperature`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TemperatureFit {
    /// The fitted temperature `T* = 1/β*`.
    pub temperature: f64,
    /// Mean negative log-likelihood at T = 1.
    pub nll_before: f64,
    /// Mean negative log-likelihood at `T*`.
    pub nll_after: f64,
    /// Newton / bisection iterations used.
    pub iterations: usize,
    /// Whether `|dNLL/dβ|` or the step fell below [`FitOptions::tolerance`].
    pub converged: bool,
    /// Whether the fit hit `t_min` or `t_max` (separable or all-wrong data).
    pub capped: bool,
}

defaults! {
    /// Options of [`fit_temperature`]: the interval `[t_min, t_max]` the fitted temperature is
    /// confined to (`0 < t_min < t_max`, finite). `Default`: `[1e-3, 1e3]`.
    #[derive(Debug, Clone, Copy, PartialEq)]
    pub struct FitOptions {
        /// Smallest temperature.
        pub t_min: f64 = 1e-3,
        /// Largest temperature.
        pub t_max: f64 = 1e3,
        /// Convergence: stop when `|dNLL/dβ|` or the relative step in β falls below it
        /// (`0 ≤ tolerance < 1`). The default, 1e-12, suits f64 objectives; an objective
        /// computed in f32 carries ~1e-7 relative noise and needs about 1e-6.
        pub tolerance: f64 = 1e-12,
        /// Execution settings (the fit runs on the calling thread in scalar f64: neither field
        /// changes anything; kept for the one options shape).
        pub exec: Exec = Exec::default(),
    }
}

setters!(FitOptions { t_min: f64, t_max: f64, tolerance: f64 });

/// Temperature scaling (Guo et al. 2017; D3): `T* = argmin_T mean(−log_softmax(z_i/T)_{y_i})`.
/// The NLL is convex in `β = 1/T` (`dNLL/dβ = mean(E_β[z] − z_y)`,
/// `d²NLL/dβ² = mean(Var_β[z]) ≥ 0`), so the fit runs Newton on β from β = 1, falling back to
/// bisection on the bracketing interval whenever a step leaves it or fails to decrease the
/// NLL; [`FitOptions::tolerance`] (1e-12) on the gradient or the step; at most 200 iterations. `T` is confined
/// to `[t_min, t_max]` of [`FitOptions`] (defaults 1e-3 and 1e3), which caps
/// separable (T → 0) and all-wrong (T → ∞) data, reported by `capped`. Accuracy is unchanged
/// by construction (argmax is invariant to T).
///
/// Errors: an empty set, non-finite logits, labels out of range or of the wrong length,
/// `0 < t_min < t_max` violated.
pub fn fit_temperature<T: Element>(logits: View<'_, T>, targets: &[i64], opts: &FitOptions) -> Result<TemperatureFit> {
    let labels = targets;
    let (n, k, s) = rows_of(&logits, "logits")?;
    if n == 0 || k == 0 {
        return Err(Error::bad_parameter("validation set", "empty", "at least one sample with at least one class"));
    }
    check_labels(labels, n, k)?;
    let z: Vec<Vec<f64>> = (0..n).map(|r| row(&logits, r, s, k)).collect();
    for (r, zr) in z.iter().enumerate() {
        check_finite(zr, r)?;
    }
    // (NLL, dNLL/dβ, d²NLL/dβ²) at β.
    let eval = |b: f64| -> Result<(f64, f64, f64)> {
        let (mut f, mut g, mut h) = (0.0, 0.0, 0.0);
        for (zr, &y) in z.iter().zip(labels) {
            // (`y < k`: `check_labels` above.)
            let [a, b1, b2] = nll_moments(zr, y as usize, b)?;
            f += a;
            g += b1;
            h += b2;
        }
        let nf = n as f64;
        Ok((f / nf, g / nf, h / nf))
    };
    fit_temperature_with(eval, opts)
}

/// One sample's terms of the temperature-scaling objective at `β = 1/T`:
/// `[NLL, dNLL/dβ, d²NLL/dβ²] = [lse(βz) − β·z_y, E_β[z] − z_y, Var_β[z]]`, in f64 (the
/// probabilities `exp(βz − lse(βz))`). [`fit_temperature`] sums these over its rows. Errors:
/// `y ≥ z.len()` ([`Error::TargetOutOfRange`]). Non-finite logits give non-finite terms.
pub fn nll_moments(z: &[f64], y: usize, beta: f64) -> Result<[f64; 3]> {
    check_labels(&[y as i64], 1, z.len())?;
    let l = lse(z, beta);
    let (mut e1, mut e2) = (0.0, 0.0);
    for &v in z {
        let p = (v * beta - l).exp();
        e1 += p * v;
        e2 += p * v * v;
    }
    Ok([l - beta * z[y], e1 - z[y], e2 - e1 * e1])
}

/// The solver of [`fit_temperature`] on any data source: `eval(β)` returns the mean
/// `(NLL, dNLL/dβ, d²NLL/dβ²)` over the validation set at `β = 1/T` (for instance the means of
/// [`nll_moments`] over rows streamed from a file, as `smax eval` does). Newton on β from β = 1
/// inside the bracket `[1/t_max, 1/t_min]`, bisection whenever a step leaves it or fails to
/// lower the NLL, [`FitOptions::tolerance`] on the gradient or the step, at most 200 iterations; the
/// caps are tried last when the NLL still falls towards one (separable or all-wrong data).
/// `eval` is called about 2–30 times. Errors: `0 < t_min < t_max < ∞` violated, and any error
/// `eval` returns.
pub fn fit_temperature_with(
    mut eval: impl FnMut(f64) -> Result<(f64, f64, f64)>,
    opts: &FitOptions,
) -> Result<TemperatureFit> {
    let FitOptions { t_min, t_max, tolerance: tol, .. } = *opts;
    if !(t_min > 0.0 && t_min < t_max && t_max.is_finite()) {
        return Err(Error::bad_parameter("t_min/t_max", format!("{t_min}/{t_max}"), "0 < t_min < t_max < inf"));
    }
    if !(0.0..1.0).contains(&tol) {
        return Err(Error::bad_parameter("tolerance", tol, "0 <= tolerance < 1"));
    }
    let (b_lo0, b_hi0) = (1.0 / t_max, 1.0 / t_min);
    let (mut lo, mut hi) = (b_lo0, b_hi0);
    let at_one = eval(1.0)?;
    let nll_before = at_one.0;
    let mut b = 1.0f64.clamp(lo, hi);
    let (mut f, mut g, mut h) = if b == 1.0 { at_one } else { eval(b)? };
    let mut iterations = 0;
    let mut converged = false;
    while iterations < 200 {
        iterations += 1;
        if g.abs() < tol.max(f64::MIN_POSITIVE) {
            converged = true;
            break;
        }
        // The minimiser lies on the side the gradient points away from.
        if g > 0.0 {
            hi = b;
        } else {
            lo = b;
        }
        let newton = if h > 0.0 { b - g / h } else { f64::NAN };
        let mut nb = if newton.is_finite() && newton > lo && newton < hi { newton } else { 0.5 * (lo + hi) };
        let (mut nf, mut ng, mut nh) = eval(nb)?;
        if nf > f && nb != 0.5 * (lo + hi) {
            nb = 0.5 * (lo + hi);
            (nf, ng, nh) = eval(nb)?;
        }
        let step = (nb - b).abs();
        (b, f, g, h) = (nb, nf, ng, nh);
        if step <= tol * b.max(1.0) {
            converged = true;
            break;
        }
    }
    // Separable (or all-wrong) data: the NLL keeps falling towards a cap with a gradient that
    // vanishes exponentially, so a small gradient is not a minimum. The NLL is convex: if it is
    // still falling and the cap is no worse, the minimiser is the cap.
    for cap in [b_hi0, b_lo0] {
        let towards = if cap > b { g < 0.0 } else { g > 0.0 };
        if towards && b != cap {
            let fc = eval(cap)?.0;
            if fc <= f {
                (b, f) = (cap, fc);
            }
        }
    }
    let capped = (b - b_lo0).abs() <= 1e-9 * b_lo0 || (b - b_hi0).abs() <= 1e-9 * b_hi0;
    // The search runs on β = 1/T in [1/t_max, 1/t_min]; `1/(1/t)` need not round back to `t`,
    // so the result is clamped to the interval the options promise.
    let temperature = (1.0 / b).clamp(t_min, t_max);
    Ok(TemperatureFit { temperature, nll_before, nll_after: f, iterations, converged, capped })
}

/// The equal-width bin of a confidence `c ∈ [0, 1]` among `m ≥ 1` bins: `⌈c·m⌉ − 1`, clamped
/// to `[0, m − 1]` (bins closed on the right: `(k/m, (k+1)/m]`, the first also takes 0). A NaN
/// confidence goes to bin 0. The rule [`Binning::EqualWidth`] uses, exposed so that a streaming
/// evaluator (the `smax eval` command) bins exactly as [`calibration_error`] does.
pub fn equal_width_bin(c: f64, m: usize) -> usize {
    // `as usize` saturates: NaN and negatives give 0, huge values `usize::MAX`.
    ((c * m as f64).ceil() as usize).saturating_sub(1).min(m.saturating_sub(1))
}

/// How [`calibration_error`] bins the confidences.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Binning {
    /// `M` bins of equal width, closed on the right as in Guo et al. 2017: bin `m` (from 0)
    /// holds `(m/M, (m+1)/M]`, so a confidence of exactly 1 lands in the last bin and one on an
    /// inner edge in the bin below it; the first bin also takes 0 (`[0, 1/M]`). The index is
    /// [`equal_width_bin`]`(c, M) = ⌈c·M⌉ − 1` clamped to `[0, M − 1]`.
    EqualWidth(usize),
    /// `M` bins of (as nearly as possible) equal count over the confidences sorted ascending
    /// (ties by sample index): bin m holds samples `⌊m·n/M⌋ .. ⌊(m+1)·n/M⌋`; with fewer samples
    /// than bins, the empty bins are skipped.
    EqualMass(usize),
}

defaults! {
    /// Options of [`calibration_error`]. `Default`: 15 equal-width bins (Guo et al.).
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct CalibrationOptions {
        /// The binning.
        pub binning: Binning = Binning::EqualWidth(15),
        /// Execution settings (computed on the calling thread in scalar f64: neither field
        /// changes anything; kept for the one options shape).
        pub exec: Exec = Exec::default(),
    }
}

setters!(CalibrationOptions { binning: Binning });

/// One bin of a reliability diagram.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bin {
    /// Lower edge (equal width) or smallest confidence in the bin (equal mass).
    pub lo: f64,
    /// Upper edge or largest confidence.
    pub hi: f64,
    /// Samples in the bin.
    pub count: usize,
    /// Accuracy of the bin (NaN when empty).
    pub accuracy: f64,
    /// Mean confidence of the bin (NaN when empty).
    pub confidence: f64,
}

/// [`calibration_error`]'s result.
#[derive(Debug, Clone, PartialEq)]
pub struct Calibration {
    /// `ECE = Σ_m (|B_m|/n)·|acc_m − conf_m|` (the L1 norm).
    pub ece: f64,
    /// The L2 variant `sqrt(Σ_m (|B_m|/n)·(acc_m − conf_m)²)`.
    pub ece_l2: f64,
    /// `MCE = max_m |acc_m − conf_m|` over non-empty bins.
    pub mce: f64,
    /// The reliability diagram.
    pub bins: Vec<Bin>,
}

/// Expected and maximum calibration error of the softmax of `logits` against `targets`
/// (Guo et al. 2017; D4, with NEEDS 24's binning): confidence `c = max softmax(z)`, correct when
/// the argmax (lowest index on ties) equals the label. The default of Guo et al. is
/// `Binning::EqualWidth(15)`. Errors: an empty set, no bins, non-finite logits, bad labels, a
/// bin count whose per-bin memory cannot be allocated ([`Error::Allocation`]).
pub fn calibration_error<T: Element>(
    logits: View<'_, T>,
    targets: &[i64],
    opts: &CalibrationOptions,
) -> Result<Calibration> {
    let (labels, binning) = (targets, opts.binning);
    let (n, k, s) = rows_of(&logits, "logits")?;
    let m = match binning {
        Binning::EqualWidth(m) | Binning::EqualMass(m) => m,
    };
    if n == 0 || k == 0 || m == 0 {
        return Err(Error::bad_parameter(if m == 0 { "bins" } else { "samples" }, "0", "at least one"));
    }
    check_labels(labels, n, k)?;
    let mut conf = Vec::with_capacity(n);
    let mut correct = Vec::with_capacity(n);
    for r in 0..n {
        let z = row(&logits, r, s, k);
        check_finite(&z, r)?;
        let l = lse(&z, 1.0);
        let am = (0..k).fold(0, |a, i| if z[i] > z[a] { i } else { a });
        conf.push((z[am] - l).exp());
        correct.push(am as i64 == labels[r]);
    }
    let mut members: Vec<Vec<usize>> = try_vec("calibration bins", m, Vec::new())?;
    match binning {
        Binning::EqualWidth(_) => {
            for (i, &c) in conf.iter().enumerate() {
                members[equal_width_bin(c, m)].push(i);
            }
        }
        Binning::EqualMass(_) => {
            let mut order: Vec<usize> = (0..n).collect();
            order.sort_by(|&a, &b| conf[a].total_cmp(&conf[b]).then(a.cmp(&b)));
            // `b·n/m` in u128: the product of two counts can pass `usize::MAX`.
            let at = |b: usize| (b as u128 * n as u128 / m as u128) as usize;
            for (b, mem) in members.iter_mut().enumerate() {
                mem.extend_from_slice(&order[at(b)..at(b + 1)]);
            }
        }
    }
    let mut out = Calibration { ece: 0.0, ece_l2: 0.0, mce: 0.0, bins: try_with_capacity("calibration bins", m)? };
    for (b, mem) in members.iter().enumerate() {
        let count = mem.len();
        let (lo, hi) = match binning {
            Binning::EqualWidth(_) => (b as f64 / m as f64, (b + 1) as f64 / m as f64),
            Binning::EqualMass(_) if count > 0 => (conf[mem[0]], conf[mem[count - 1]]),
            Binning::EqualMass(_) => continue,
        };
        let (acc, cf) = if count == 0 {
            (f64::NAN, f64::NAN)
        } else {
            let a = mem.iter().filter(|&&i| correct[i]).count() as f64 / count as f64;
            let c = mem.iter().map(|&i| conf[i]).sum::<f64>() / count as f64;
            (a, c)
        };
        if count > 0 {
            let w = count as f64 / n as f64;
            let gap = (acc - cf).abs();
            out.ece += w * gap;
            out.ece_l2 += w * gap * gap;
            out.mce = out.mce.max(gap);
        }
        out.bins.push(Bin { lo, hi, count, accuracy: acc, confidence: cf });
    }
    out.ece_l2 = out.ece_l2.sqrt();
    Ok(out)
}

/// The multi-class Brier score `mean_i Σ_k (softmax(z_i)_k − [k = y_i])²` (in `[0, 2]`).
pub fn brier_score<T: Element>(logits: View<'_, T>, targets: &[i64]) -> Result<f64> {
    let labels = targets;
    let (n, k, s) = rows_of(&logits, "logits")?;
    if n == 0 {
        return Err(Error::bad_parameter("samples", "0", "at least one"));
    }
    check_labels(labels, n, k)?;
    let mut total = 0.0;
    for r in 0..n {
        let z = row(&logits, r, s, k);
        check_finite(&z, r)?;
        let l = lse(&z, 1.0);
        total += (0..k).map(|i| ((z[i] - l).exp() - (i as i64 == labels[r]) as u8 as f64).powi(2)).sum::<f64>();
    }
    Ok(total / n as f64)
}

/// Which out-of-distribution score [`ood_scores`] computes (higher = more in-distribution).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum OodScore {
    /// Maximum softmax probability (Hendrycks & Gimpel 2017).
    Msp,
    /// The largest logit.
    MaxLogit,
    /// Negative energy `T·lse(z/T)` (Liu et al. 2020; T = 1 usually).
    NegEnergy(f64),
}

defaults! {
    /// Options of [`ood_scores`]. `Default`: the maximum softmax probability.
    #[derive(Debug, Clone, Copy, PartialEq)]
    pub struct OodOptions {
        /// Which score.
        pub score: OodScore = OodScore::Msp,
        /// Execution settings (computed on the calling thread in scalar f64: neither field
        /// changes anything; kept for the one options shape).
        pub exec: Exec = Exec::default(),
    }
}

setters!(OodOptions { score: OodScore });

/// One OOD score per row into `out`. Special rows: all `-inf` gives MSP NaN, max-logit `-inf`,
/// negative energy `-inf`; a `+inf` logit gives negative energy `+inf`; NaN propagates.
pub fn ood_scores<T: Element>(logits: View<'_, T>, out: &mut [f64], opts: &OodOptions) -> Result<()> {
    let score = opts.score;
    let (n, k, s) = rows_of(&logits, "logits")?;
    if out.len() != n {
        return Err(Error::RowCountMismatch { what: "out", len: out.len(), rows: n });
    }
    if let OodScore::NegEnergy(t) = score {
        if !(t.is_finite() && t > 0.0) {
            return Err(Error::bad_parameter("temperature", t, "finite and > 0"));
        }
    }
    for (r, o) in out.iter_mut().enumerate() {
        let z = row(&logits, r, s, k);
        let mx = z.iter().fold(f64::NEG_INFINITY, |a, &v| if v > a || v.is_nan() { v } else { a });
        *o = match score {
            OodScore::MaxLogit => mx,
            OodScore::Msp => (mx - lse(&z, 1.0)).exp(),
            OodScore::NegEnergy(t) => t * lse(&z, 1.0 / t),
        };
        if z.iter().any(|v| v.is_nan()) {
            *o = f64::NAN;
        }
    }
    Ok(())
}

/// Class means and the shared covariance's Cholesky factor for [`mahalanobis_scores`].
#[derive(Debug, Clone, PartialEq)]
pub struct Mahalanobis {
    dim: usize,
    means: Vec<Vec<f64>>,
    /// Lower-triangular Cholesky factor of `Σ + ridge·I`, row-major `dim x dim`.
    chol: Vec<f64>,
    /// The shared covariance (before the ridge), row-major.
    pub covariance: Vec<f64>,
    /// The ridge added to the diagonal.
    pub ridge: f64,
}

/// Options of [`mahalanobis_fit`]. `Default`: the automatic ridge.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct MahalanobisOptions {
    /// The ridge added to the covariance's diagonal; `None`: `1e-6·tr(Σ)/dim`, added only
    /// when the plain factorisation fails.
    pub ridge: Option<f64>,
    /// Execution settings (computed on the calling thread in scalar f64: neither field
    /// changes anything; kept for the one options shape).
    pub exec: Exec,
}

setters!(MahalanobisOptions {} some { ridge: f64 });

/// Fits Lee et al. (2018)'s Mahalanobis score (D6) on training features `f` (`n x dim`,
/// row-major) with class targets in `[0, classes)`: class means and the shared covariance
/// `Σ = (1/N) Σ_c Σ_{i∈c} (f_i − μ_c)(f_i − μ_c)ᵀ`, factored by Cholesky after adding
/// `ridge·I` (`None`: `1e-6·tr(Σ)/dim`, added only when the plain factorisation fails).
/// Errors: no samples, a class without samples (more classes than samples included), non-finite
/// features, a covariance that stays singular, a `dim x dim` covariance that does not fit in
/// memory ([`Error::SizeOverflow`], [`Error::Allocation`]).
pub fn mahalanobis_fit(
    f: &[f64],
    dim: usize,
    targets: &[i64],
    classes: usize,
    opts: &MahalanobisOptions,
) -> Result<Mahalanobis> {
    let (labels, ridge) = (targets, opts.ridge);
    if dim == 0 || f.is_empty() || !f.len().is_multiple_of(dim) || classes == 0 {
        return Err(Error::LengthMismatch {
            what: "features",
            len: f.len(),
            expected: dim.max(1) * labels.len().max(1),
        });
    }
    let n = f.len() / dim;
    check_labels(labels, n, classes)?;
    check_finite(f, 0)?;
    if classes > n {
        // Some class has no sample; said before `classes` sizes any buffer.
        return Err(Error::bad_parameter(
            "labels",
            format!("{classes} classes, {n} samples"),
            "every class represented",
        ));
    }
    let cov_len = product("covariance", &[dim, dim])?;
    let mut means = vec![vec![0.0; dim]; classes];
    let mut counts = vec![0usize; classes];
    // (Every `y < classes`: `check_labels` above; `f` holds `n·dim` features.)
    for (i, &y) in labels.iter().enumerate() {
        counts[y as usize] += 1;
        for d in 0..dim {
            means[y as usize][d] += f[i * dim + d];
        }
    }
    if let Some(c) = counts.iter().position(|&c| c == 0) {
        return Err(Error::bad_parameter("labels", format!("class {c} has no sample"), "every class represented"));
    }
    for (m, &c) in means.iter_mut().zip(&counts) {
        m.iter_mut().for_each(|v| *v /= c as f64);
    }
    let mut cov = try_vec("covariance", cov_len, 0.0)?;
    for (i, &y) in labels.iter().enumerate() {
        for a in 0..dim {
            let da = f[i * dim + a] - means[y as usize][a];
            for b in 0..dim {
                cov[a * dim + b] += da * (f[i * dim + b] - means[y as usize][b]);
            }
        }
    }
    cov.iter_mut().for_each(|v| *v /= n as f64);
    let tr: f64 = (0..dim).map(|d| cov[d * dim + d]).sum();
    let tries: Vec<f64> = match ridge {
        Some(r) => vec![r],
        None => vec![0.0, 1e-6 * tr / dim as f64],
    };
    for r in tries {
        if let Some(chol) = cholesky(&cov, dim, r) {
            return Ok(Mahalanobis { dim, means, chol, covariance: cov, ridge: r });
        }
    }
    Err(Error::bad_parameter(
        "features",
        "singular covariance",
        "a covariance that is positive definite after the ridge",
    ))
}

fn cholesky(a: &[f64], n: usize, ridge: f64) -> Option<Vec<f64>> {
    let mut l = vec![0.0; n * n];
    for i in 0..n {
        for j in 0..=i {
            let mut s = a[i * n + j] + if i == j { ridge } else { 0.0 };
            for k in 0..j {
                s -= l[i * n + k] * l[j * n + k];
            }
            if i == j {
                if s <= 0.0 || !s.is_finite() {
                    return None;
                }
                l[i * n + i] = s.sqrt();
            } else {
                l[i * n + j] = s / l[j * n + j];
            }
        }
    }
    Some(l)
}

impl Mahalanobis {
    /// `−(x − μ_c)ᵀ Σ⁻¹ (x − μ_c)` for every class `c` (a triangular solve, no inverse).
    pub fn class_scores(&self, x: &[f64]) -> Result<Vec<f64>> {
        if x.len() != self.dim {
            return Err(Error::LengthMismatch { what: "x", len: x.len(), expected: self.dim });
        }
        let n = self.dim;
        Ok(self
            .means
            .iter()
            .map(|mu| {
                // Solve L w = (x − μ); the quadratic form is |w|².
                let mut w = vec![0.0; n];
                for i in 0..n {
                    let mut s = x[i] - mu[i];
                    for k in 0..i {
                        s -= self.chol[i * n + k] * w[k];
                    }
                    w[i] = s / self.chol[i * n + i];
                }
                -w.iter().map(|v| v * v).sum::<f64>()
            })
            .collect())
    }
}

/// The Mahalanobis confidence score `M(x) = max_c −(x − μ_c)ᵀ Σ⁻¹ (x − μ_c)` of each row of
/// `x` (`rows x dim`, row-major) into `out`.
pub fn mahalanobis_scores(m: &Mahalanobis, x: &[f64], out: &mut [f64]) -> Result<()> {
    if !x.len().is_multiple_of(m.dim) || out.len() != x.len() / m.dim {
        return Err(Error::LengthMismatch { what: "x / out", len: x.len(), expected: out.len() * m.dim });
    }
    for (o, xr) in out.iter_mut().zip(x.chunks(m.dim)) {
        *o = m.class_scores(xr)?.into_iter().fold(f64::NEG_INFINITY, f64::max);
    }
    Ok(())
}
