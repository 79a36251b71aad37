//! The rest of the softmax loss family (ALGORITHMS.md N5, L3, L5–L8, L10, L11): each returns its
//! value and its gradient with respect to its inputs in one call.
//!
//! These losses are computed per row in f64 (scalar, libm `exp`/`ln`/`log1p`, compensated sums)
//! whatever the element type, so their accuracy is that of f64 before the final rounding to
//! `T`. Rows run in parallel; reductions run in row order, so results do not depend on the
//! thread count. They share [`LossOptions`] for reduction, ignore index and threading.

use crate::element::Element;
use crate::error::{Error, Result};
use crate::layout::{View, ViewMut};
use crate::options::{Exec, setters};
use crate::par;

use super::{AllIgnored, LossReport, Reduction};

/// Options of the losses of this module: the loss's own parameters `params` (a struct named
/// after the loss, e.g. [`CompSum`], `()` for losses without parameters) and the shared
/// reduction settings. `LossOptions::new(params)` takes the defaults for the rest: mean over
/// non-ignored rows, ignore index −100, loss 0 when every row is ignored, upstream gradient 1,
/// rayon.
#[derive(Debug, Clone, Copy)]
pub struct LossOptions<P = ()> {
    /// The loss's own parameters.
    pub params: P,
    /// How rows combine (mean over rows that count).
    pub reduction: Reduction,
    /// Rows whose target equals this count for nothing (losses with class targets).
    pub ignore_index: i64,
    /// The mean over zero rows that count.
    pub all_ignored: AllIgnored,
    /// Upstream gradient of the returned loss.
    pub grad_scale: f64,
    /// Threads (these losses compute in scalar f64; `exec.simd` has no effect).
    pub exec: Exec,
}

impl<P: Default> Default for LossOptions<P> {
    fn default() -> Self {
        LossOptions::new(P::default())
    }
}

impl<P> LossOptions<P> {
    /// The loss's parameters with the default reduction settings.
    pub fn new(params: P) -> Self {
        LossOptions {
            params,
            reduction: Reduction::Mean,
            ignore_index: -100,
            all_ignored: AllIgnored::Zero,
            grad_scale: 1.0,
            exec: Exec::default(),
        }
    }

    /// The shared settings without the parameters (what the row drivers read).
    fn common(&self) -> LossOptions {
        self.map_params(())
    }

    fn map_params<Q>(&self, params: Q) -> LossOptions<Q> {
        LossOptions {
            params,
            reduction: self.reduction,
            ignore_index: self.ignore_index,
            all_ignored: self.all_ignored,
            grad_scale: self.grad_scale,
            exec: self.exec,
        }
    }
}

impl LossOptions {
    /// These settings with a loss's parameters.
    pub fn with_params<P>(self, params: P) -> LossOptions<P> {
        self.map_params(params)
    }
}

setters!(LossOptions<P> { reduction: Reduction, ignore_index: i64, all_ignored: AllIgnored, grad_scale: f64 });

/// Parameters of [`spherical_z_loss`]: sharpness `a > 0` and location `b` (no default: the
/// paper's tuned values were not recovered; `a = 1, b = 0` reproduces the authors' code).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SphericalZ {
    /// Sharpness `a`, finite and > 0.
    pub a: f64,
    /// Location `b`, finite.
    pub b: f64,
}

/// Parameter of [`comp_sum_loss`]: the family index τ (finite, ≥ 0; 1 is cross-entropy).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CompSum {
    /// τ: 0 sum-exponential, 1 cross-entropy, (1, 2) GCE, 2 MAE.
    pub tau: f64,
}

/// Parameters of [`nkd_loss`]: the non-target temperature λ and weight γ (the authors' ImageNet
/// setting λ = 1, γ = 1.5 is the default).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Nkd {
    /// λ, finite and > 0.
    pub temperature: f64,
    /// γ, finite.
    pub gamma: f64,
}

impl Default for Nkd {
    fn default() -> Self {
        Nkd { temperature: 1.0, gamma: 1.5 }
    }
}

/// Parameter of [`hinton_kd_loss`]: the distillation temperature `T` (finite, > 0).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HintonKd {
    /// `T`.
    pub temperature: f64,
}

/// Parameter of [`decoupled_softmax_loss`]: the temperature τ dividing the similarities
/// (finite, > 0; the authors use 0.05 on cosine similarities, the default).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Decoupled {
    /// τ.
    pub temperature: f64,
}

impl Default for Decoupled {
    fn default() -> Self {
        Decoupled { temperature: 0.05 }
    }
}

/// Parameter of [`tempnet_loss`]: the DRO radius ρ (finite; the authors' GPT-2 setting is 8).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TempNet {
    /// ρ.
    pub rho: f64,
}

/// Parameter of [`normalized_softmax_loss`]: the temperature `T` dividing the cosines (finite,
/// > 0; the released package's default 0.1, i.e. scale 10, is the default).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NormalizedSoftmax {
    /// `T`.
    pub temperature: f64,
}

impl Default for NormalizedSoftmax {
    fn default() -> Self {
        NormalizedSoftmax { temperature: 0.1 }
    }
}

/// What a row function reports: `None` for a row that does not count, else its loss and
/// whether it is flagged.
type RowResult = Option<(f64, bool)>;

/// Validates a row layout and returns (rows, len, stride).
fn rows_of<T>(v: &View<'_, T>, what: &'static str) -> Result<(usize, usize, usize)> {
    v.row_geometry(what, "this loss takes row layouts (classes along the last axis)")
}

fn check_targets(t: &[i64], rows: usize, classes: usize, ignore: impl Into<Option<i64>>) -> Result<()> {
    crate::check::targets(t, rows, classes, ignore.into())
}

fn param(name: &'static str, v: f64, ok: bool, expected: &'static str) -> Result<()> {
    if ok { Ok(()) } else { Err(Error::bad_parameter(name, v, expected)) }
}

/// `v` must be finite and > 0.
fn positive(name: &'static str, v: f64) -> Result<()> {
    param(name, v, v.is_finite() && v > 0.0, "finite and > 0")
}

/// The shared driver: runs `f(row, x, g)` over the rows of `x` (converted to f64) with the
/// row's unscaled gradient buffer `g` (zeroed; `None` when no gradient is asked for), reduces
/// in row order, and writes `g · scale` into `grad`. `counts(row)` says up front whether a row
/// counts (for the mean's denominator).
fn drive<T: Element, F, C>(
    x: View<'_, T>,
    grad: Option<ViewMut<'_, T>>,
    rows_out: Option<&mut [f64]>,
    o: &LossOptions,
    counts: C,
    f: F,
) -> Result<LossReport>
where
    F: Fn(usize, &[f64], Option<&mut [f64]>) -> RowResult + Sync,
    C: Fn(usize) -> bool,
{
    param("grad_scale", o.grad_scale, o.grad_scale.is_finite(), "finite")?;
    let (rows, len, xs) = rows_of(&x, "logits")?;
    if len == 0 && rows > 0 {
        return Err(Error::bad_parameter("classes", "0", "at least one class per row"));
    }
    if let Some(r) = &rows_out {
        if r.len() != rows {
            return Err(Error::RowCountMismatch { what: "loss", len: r.len(), rows });
        }
    }
    let valid_rows = (0..rows).filter(|&r| counts(r)).count();
    let denominator = if o.reduction == Reduction::Mean { valid_rows as f64 } else { 1.0 };
    let scale = if denominator > 0.0 { o.grad_scale / denominator } else { 0.0 };
    let (gdata, gs) = match grad {
        Some(g) => {
            x.layout.check_same("grad", &g.layout)?;
            let (_, _, gs) = g.row_geometry("grad", "the gradient takes row layouts")?;
            (Some(g.data), gs)
        }
        None => (None, 0),
    };
    let items: Vec<(usize, usize, Option<&mut [T]>)> = match gdata {
        Some(g) => par::row_groups(g, rows, len, gs).into_iter().map(|(r0, n, g)| (r0, n, Some(g))).collect(),
        None => {
            let per = par::rows_per_task(len);
            (0..rows).step_by(per).map(|r0| (r0, per.min(rows - r0), None)).collect()
        }
    };
    let out: Vec<Vec<RowResult>> = par::map(o.exec.par, items, |(r0, n, mut g)| {
        let mut xr = vec![0.0f64; len];
        let mut gr = vec![0.0f64; len];
        (0..n)
            .map(|i| {
                let r = r0 + i;
                for (a, b) in xr.iter_mut().zip(&x.data[r * xs..r * xs + len]) {
                    *a = b.to_f64();
                }
                gr.fill(0.0);
                let res = f(r, &xr, g.as_ref().map(|_| &mut gr[..]));
                if let Some(g) = g.as_deref_mut() {
                    let dst = &mut g[i * gs..i * gs + len];
                    let sc = if res.is_some() { scale } else { 0.0 };
                    for (d, &v) in dst.iter_mut().zip(&gr) {
                        *d = T::from_f64(v * sc);
                    }
                }
                res
            })
            .collect()
    });
    Ok(reduce(&out, rows_out, o, valid_rows, denominator))
}

/// Sums the row results in row order into the report, filling the per-row losses.
fn reduce(
    out: &[Vec<RowResult>],
    mut rows_out: Option<&mut [f64]>,
    o: &LossOptions,
    valid_rows: usize,
    denominator: f64,
) -> LossReport {
    let mut sum = 0.0f64;
    let mut flagged_rows = 0;
    for (r, res) in out.iter().flatten().enumerate() {
        let (l, fl) = res.unwrap_or((0.0, false));
        sum += l;
        flagged_rows += fl as usize;
        if let Some(b) = rows_out.as_deref_mut() {
            b[r] = l;
        }
    }
    let loss = match o.reduction {
        Reduction::Mean if denominator > 0.0 => sum / denominator,
        Reduction::Mean => match o.all_ignored {
            AllIgnored::Zero => 0.0,
            AllIgnored::Nan => f64::NAN,
        },
        _ => sum,
    };
    LossReport { loss, z_loss: 0.0, valid_rows, denominator, flagged_rows }
}

/// [`drive`] for losses with one class target per row: validates the targets (in range or the
/// ignore index) and calls `f(row, target, x, g)` for the rows that count.
fn drive_classes<T: Element, F>(
    x: View<'_, T>,
    what: &'static str,
    targets: &[i64],
    grad: Option<ViewMut<'_, T>>,
    rows_out: Option<&mut [f64]>,
    o: &LossOptions,
    f: F,
) -> Result<LossReport>
where
    F: Fn(usize, usize, &[f64], Option<&mut [f64]>) -> (f64, bool) + Sync,
{
    let (rows, len, _) = rows_of(&x, what)?;
    check_targets(targets, rows, len, o.ignore_index)?;
    let ig = o.ignore_index;
    drive(
        x,
        grad,
        rows_out,
        o,
        |r| targets[r] != ig,
        |r, xr, g| (targets[r] != ig).then(|| f(r, targets[r] as usize, xr, g)),
    )
}

/// Neumaier-compensated sum.
fn fsum(it: impl IntoIterator<Item = f64>) -> f64 {
    let mut s = crate::scalar64::Sum::default();
    for v in it {
        s.add(v);
    }
    s.get()
}

/// `ln Σ exp(x·k)` over the entries `keep` accepts, with the special values of
/// `scalar64::lse` (`-inf` for an empty or fully masked set).
fn lse_of(x: &[f64], k: f64, keep: impl Fn(usize) -> bool) -> f64 {
    crate::scalar64::lse(x.iter().enumerate().filter(|(i, _)| keep(*i)).map(|(_, &v)| v * k))
}

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
/// as in [`cross_entropy`](super::cross_entropy) (ignore index, mean over non-ignored rows).
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
// Spherical Z-loss (L3).

/// Stable `softplus(z) = ln(1 + e^z)`.
fn softplus(z: f64) -> f64 {
    if z > 0.0 { z + (-z).exp().ln_1p() } else { z.exp().ln_1p() }
}

fn sigmoid(z: f64) -> f64 {
    if z >= 0.0 {
        1.0 / (1.0 + (-z).exp())
    } else {
        let e = z.exp();
        e / (1.0 + e)
    }
}

/// The spherical Z-loss (de Brébisson & Vincent 2016, arXiv 1604.08859; L3):
/// `z = (o − μ)/σ` with the population mean and deviation of the row, and
/// `ℓ = (1/a)·softplus(a·(b − z_c))`. Gradient
/// `∂ℓ/∂o_k = −σ_sig(a(b − z_c))·(δ_kc − 1/D − z_c z_k/D)/σ`, which sums to 0 over the row.
///
/// The paper's tuned `a` (sharpness) and `b` (location) were not recovered, so there is no
/// default: the caller sets both (`a > 0`); `a = 1, b = 0` reproduces the authors' released
/// code. The `1/a` prefactor is from a secondary source (`[SECONDARY]` in the spec). σ comes from
/// a two-pass mean and variance. A row with `σ = 0` (all outputs equal) has loss
/// `(1/a)·softplus(a·b)` and zero gradient, and is counted in [`LossReport::flagged_rows`].
pub fn spherical_z_loss<T: Element>(
    outputs: View<'_, T>,
    targets: &[i64],
    grad: Option<ViewMut<'_, T>>,
    rows_out: Option<&mut [f64]>,
    opts: &LossOptions<SphericalZ>,
) -> Result<LossReport> {
    let SphericalZ { a, b } = opts.params;
    let o = &opts.common();
    positive("a", a)?;
    param("b", b, b.is_finite(), "finite")?;
    drive_classes(outputs, "outputs", targets, grad, rows_out, o, |_, c, x, g| {
        let dn = x.len() as f64;
        let mu = fsum(x.iter().copied()) / dn;
        let var = fsum(x.iter().map(|&v| (v - mu) * (v - mu))) / dn;
        let sd = var.sqrt();
        if sd == 0.0 {
            return (softplus(a * b) / a, true);
        }
        let zc = (x[c] - mu) / sd;
        let loss = softplus(a * (b - zc)) / a;
        if let Some(g) = g {
            let w = -sigmoid(a * (b - zc)) / sd;
            for (k, (gk, &v)) in g.iter_mut().zip(x).enumerate() {
                let zk = (v - mu) / sd;
                *gk = w * ((k == c) as u8 as f64 - 1.0 / dn - zc * zk / dn);
            }
        }
        (loss, false)
    })
}

// ---------------------------------------------------------------------------------------------
// Comp-sum family (L5).

/// The comp-sum loss family of Mao, Mohri & Zhong (2023, arXiv 2304.07288; L5), in terms of
/// `p_y = softmax(h)_y`: `ℓ_τ = (p_y^{τ−1} − 1)/(1 − τ)` for `τ ≠ 1` and `−ln p_y` for `τ = 1`:
/// τ = 0 sum-exponential, τ = 1 cross-entropy, τ ∈ (1, 2) generalised cross-entropy with
/// `q = τ − 1` (Zhang & Sabuncu 2018 use q = 0.7), τ = 2 MAE in the comp-sum normalisation
/// `1 − p_y` (Ghosh et al.'s MAE is twice that). Gradient `p_y^{τ−1}·(p_k − [k = y])`.
///
/// The closed form of `Φ^τ` is from memory (`[MEMORY]` in the spec): it reproduces every listed
/// member, but the paper's text was not read. `p_y^{τ−1}` is `exp((τ − 1)·log_softmax_y)`. For
/// τ < 1 and `p_y → 0` the loss is unbounded: it returns `+inf`, and the factor saturates at
/// the largest finite f64 so the f64 gradient stays finite. τ must be finite and ≥ 0.
pub fn comp_sum_loss<T: Element>(
    logits: View<'_, T>,
    targets: &[i64],
    grad: Option<ViewMut<'_, T>>,
    rows_out: Option<&mut [f64]>,
    opts: &LossOptions<CompSum>,
) -> Result<LossReport> {
    let CompSum { tau } = opts.params;
    let o = &opts.common();
    param("tau", tau, tau.is_finite() && tau >= 0.0, "finite and >= 0")?;
    drive_classes(logits, "logits", targets, grad, rows_out, o, |_, y, x, g| {
        let lse = lse_of(x, 1.0, |_| true);
        let lp = x[y] - lse;
        let loss = if tau == 1.0 { -lp } else { (((tau - 1.0) * lp).exp() - 1.0) / (1.0 - tau) };
        if let Some(g) = g {
            let f = ((tau - 1.0) * lp).exp().min(f64::MAX);
            for (k, (gk, &v)) in g.iter_mut().zip(x).enumerate() {
                *gk = f * ((v - lse).exp() - (k == y) as u8 as f64);
            }
        }
        (loss, false)
    })
}

// ---------------------------------------------------------------------------------------------
// Distillation (L6, L11).

/// NKD, normalised knowledge distillation (Yang et al. 2023; L6), with the teacher's gradient
/// stopped: `L = −T_t·ln S_t − γλ²·Σ_{k≠t} T̂_k ln Ŝ_k`, where `S`, `T` are the softmaxes of the
/// student and teacher logits and `Ŝ`, `T̂` the softmaxes of their non-target logits at
/// temperature λ (computed over the K−1 logits, never as `S_k/(1 − S_t)`). Gradient with respect
/// to the student: `T_t(S_k − [k = t]) + [k ≠ t]·γλ(Ŝ_k − T̂_k)`. The authors' defaults: λ = 1,
/// γ = 1.5 (ImageNet ResNet-34→18); λ = 1, γ = 1 (DeiT); λ = 3, γ = 3.5 (CIFAR-100). The trainer
/// adds the ordinary cross-entropy separately. K = 1 has no non-target part; a teacher whose
/// non-target logits are all `-inf` has `L_nt = 0` for that row, which is flagged.
pub fn nkd_loss<T: Element>(
    student: View<'_, T>,
    teacher: View<'_, T>,
    targets: &[i64],
    grad: Option<ViewMut<'_, T>>,
    rows_out: Option<&mut [f64]>,
    opts: &LossOptions<Nkd>,
) -> Result<LossReport> {
    let Nkd { temperature, gamma } = opts.params;
    let o = &opts.common();
    positive("temperature", temperature)?;
    param("gamma", gamma, gamma.is_finite(), "finite")?;
    let (_, _, ts) = rows_of(&teacher, "teacher")?;
    student.layout.check_same("teacher", &teacher.layout)?;
    let lam = temperature;
    drive_classes(student, "student", targets, grad, rows_out, o, |r, t, zs, g| {
        let zt: Vec<f64> = teacher.data[r * ts..r * ts + zs.len()].iter().map(|v| v.to_f64()).collect();
        let (ls, lt) = (lse_of(zs, 1.0, |_| true), lse_of(&zt, 1.0, |_| true));
        let tt = (zt[t] - lt).exp();
        let mut loss = -tt * (zs[t] - ls);
        let nt = |k: usize| k != t;
        let (lsh, lth) = (lse_of(zs, 1.0 / lam, nt), lse_of(&zt, 1.0 / lam, nt));
        let no_nt = zs.len() == 1 || lth == f64::NEG_INFINITY;
        if !no_nt {
            let s = fsum((0..zs.len()).filter(|&k| k != t).map(|k| {
                let th = (zt[k] / lam - lth).exp();
                if th == 0.0 { 0.0 } else { th * (zs[k] / lam - lsh) }
            }));
            loss -= gamma * lam * lam * s;
        }
        if let Some(g) = g {
            for k in 0..zs.len() {
                g[k] = tt * ((zs[k] - ls).exp() - (k == t) as u8 as f64);
                if k != t && !no_nt {
                    g[k] += gamma * lam * ((zs[k] / lam - lsh).exp() - (zt[k] / lam - lth).exp());
                }
            }
        }
        (loss, no_nt && zs.len() > 1)
    })
}

/// Hinton knowledge distillation (L11): `L = T²·KL(softmax(z^t/T) ‖ softmax(z^s/T))` per row,
/// with the teacher's gradient stopped; gradient with respect to the student logits
/// `T·(softmax(z^s/T) − softmax(z^t/T))`. Every row counts (no targets); the mean is PyTorch's
/// `batchmean`. Teacher classes of probability 0 contribute 0.
pub fn hinton_kd_loss<T: Element>(
    student: View<'_, T>,
    teacher: View<'_, T>,
    grad: Option<ViewMut<'_, T>>,
    rows_out: Option<&mut [f64]>,
    opts: &LossOptions<HintonKd>,
) -> Result<LossReport> {
    let HintonKd { temperature } = opts.params;
    let o = &opts.common();
    positive("temperature", temperature)?;
    rows_of(&student, "student")?;
    let (_, _, ts) = rows_of(&teacher, "teacher")?;
    student.layout.check_same("teacher", &teacher.layout)?;
    let k = 1.0 / temperature;
    drive(
        student,
        grad,
        rows_out,
        o,
        |_| true,
        |r, zs, g| {
            let zt: Vec<f64> = teacher.data[r * ts..r * ts + zs.len()].iter().map(|v| v.to_f64()).collect();
            let (ls, lt) = (lse_of(zs, k, |_| true), lse_of(&zt, k, |_| true));
            let kl = fsum((0..zs.len()).map(|i| {
                let lpt = zt[i] * k - lt;
                let pt = lpt.exp();
                if pt == 0.0 { 0.0 } else { pt * (lpt - (zs[i] * k - ls)) }
            }));
            if let Some(g) = g {
                for i in 0..zs.len() {
                    g[i] = temperature * ((zs[i] * k - ls).exp() - (zt[i] * k - lt).exp());
                }
            }
            Some((temperature * temperature * kl, false))
        },
    )
}

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
    let wn: Vec<f64> = (0..c).map(|k| norm(&w[k * dim..(k + 1) * dim])).collect();
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
    let res = super::cross_entropy(
        View::rows(&logits, b, c)?,
        super::Targets::Classes(targets),
        if want_grad { Some(ViewMut::rows(&mut g, b, c)?) } else { None },
        super::RowOutputs::default(),
        &super::CrossEntropyOptions {
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
            let xn = norm(xi);
            for d in 0..dim {
                dx[i * dim + d] = fsum((0..c).map(|k| {
                    let gk = g[i * c + k] / temperature;
                    gk * (w[k * dim + d] / wn[k] - cos[i * c + k] * xi[d] / xn) / xn
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
                    gk * (xi[d] / norm(xi) - cos[i * c + k] * w[k * dim + d] / wn[k]) / wn[k]
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

// ---------------------------------------------------------------------------------------------
// USKD (L6b).

/// How USKD ranks the non-target classes for its Zipf labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UskdRanking {
    /// The paper's score `W_k/(1 − W_t) + S_k/(1 − S_t)` (probabilities).
    #[default]
    PaperProb,
    /// The released code's score, whose student term uses log-probabilities:
    /// `W_k/(1 − W_t) + ln S_k/(1 − ln S_t)` (a variable reassigned before the ranking).
    CodeLogProb,
}

/// Options of [`uskd_loss`]. `Default` is the authors' ImageNet setting (α = 1, β = 0.1,
/// μ = 0.005); their CIFAR-100 setting is α = 0.1, β = 0.1, μ = 0.1.
#[derive(Debug, Clone, Copy)]
pub struct UskdOptions {
    /// Weight α of the soft target term.
    pub alpha: f64,
    /// Weight β of the Zipf non-target term.
    pub beta: f64,
    /// Weight μ of the weak-supervision term.
    pub mu: f64,
    /// The ranking score.
    pub ranking: UskdRanking,
    /// Execution settings (USKD runs on the calling thread in scalar f64: neither field
    /// changes anything; kept for the one options shape).
    pub exec: Exec,
}

impl Default for UskdOptions {
    fn default() -> Self {
        UskdOptions { alpha: 1.0, beta: 0.1, mu: 0.005, ranking: UskdRanking::PaperProb, exec: Exec::default() }
    }
}

setters!(UskdOptions { alpha: f64, beta: f64, mu: f64, ranking: UskdRanking });

/// The parts of a USKD loss (each a batch mean, before its weight, except `total`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct UskdReport {
    /// `α·target + β·non_target + weak`.
    pub total: f64,
    /// `L_t = −mean(p_t·ln S_t)`.
    pub target: f64,
    /// `L_nt = −mean(Σ_{k≠t} ẑ_k ln softmax(z_{¬t})_k)`.
    pub non_target: f64,
    /// `L_weak = μ·mean(CE(w, 0.9·onehot + 0.1/C))` (μ included).
    pub weak: f64,
}

/// USKD's Zipf labels for one row: the classes ranked by `ranking` (rank 0 the largest score,
/// ties to the lower index) get weight `1/(rank + 1)`; the target `t` is dropped and the rest
/// renormalised. `z` are the student logits (`ls` their log-sum-exp), `s` and `wp` the student
/// and weak softmaxes.
fn zipf_labels(z: &[f64], s: &[f64], wp: &[f64], t: usize, ls: f64, ranking: UskdRanking) -> Vec<f64> {
    let c = z.len();
    let score: Vec<f64> = (0..c)
        .map(|k| {
            let a = wp[k] / (1.0 - wp[t]);
            match ranking {
                UskdRanking::PaperProb => a + s[k] / (1.0 - s[t]),
                UskdRanking::CodeLogProb => a + (z[k] - ls) / (1.0 - (z[t] - ls)),
            }
        })
        .collect();
    let mut order: Vec<usize> = (0..c).collect();
    order.sort_by(|&i, &j| score[j].partial_cmp(&score[i]).unwrap_or(core::cmp::Ordering::Equal).then(i.cmp(&j)));
    let mut zipf = vec![0.0f64; c];
    for (rank, &k) in order.iter().enumerate() {
        zipf[k] = 1.0 / (rank as f64 + 1.0);
    }
    zipf[t] = 0.0;
    let zs = fsum(zipf.iter().copied());
    zipf.iter_mut().for_each(|v| *v /= zs);
    zipf
}

/// USKD, teacher-free self-distillation (Yang et al. 2023, same paper as NKD; L6b), over a batch
/// of student logits `z` and weak-head logits `w` (both `[batch x classes]`) with hard labels:
///
/// 1. soft target `p_t = S_t² + 1 − mean_batch(S_t²)` (no gradient), `L_t = −mean(p_t ln S_t)`;
/// 2. weak supervision `L_weak = μ·mean(−Σ_k q_k ln softmax(w)_k)`, `q = 0.9·onehot + 0.1/C`;
/// 3. Zipf labels: classes ranked by [`UskdRanking`] (rank 0 the largest score, ties to the
///    lower index) get weight `1/(rank + 1)`; the target is dropped and the rest renormalised to
///    `ẑ`; `L_nt = −mean(Σ_{k≠t} ẑ_k ln softmax(z_{¬t})_k)`;
/// 4. `total = α L_t + β L_nt + L_weak` (the trainer adds the ordinary cross-entropy).
///
/// Gradients (labels, `p_t` and ranks carry none): `∂/∂z_k = (α p_t (S_k − [k = t]) +
/// β [k ≠ t](Ŝ_k − ẑ_k))/B` into `dstudent`, `∂/∂w_k = μ (W_k − q_k)/B` into `dweak`. Every row
/// counts (no ignore index); targets must be in `[0, C)`; `C ≥ 2`.
pub fn uskd_loss<T: Element>(
    student: View<'_, T>,
    weak: View<'_, T>,
    targets: &[i64],
    dstudent: Option<ViewMut<'_, T>>,
    dweak: Option<ViewMut<'_, T>>,
    p: &UskdOptions,
) -> Result<UskdReport> {
    for (n, v) in [("alpha", p.alpha), ("beta", p.beta), ("mu", p.mu)] {
        param(n, v, v.is_finite(), "finite")?;
    }
    let (b, c, ss) = rows_of(&student, "student")?;
    let (_, _, ws) = rows_of(&weak, "weak")?;
    student.layout.check_same("weak", &weak.layout)?;
    if c < 2 && b > 0 {
        return Err(Error::bad_parameter("classes", c, "at least 2 classes (USKD ranks the non-target classes)"));
    }
    check_targets(targets, b, c, None)?;
    let mut outs = [dstudent, dweak];
    let mut strides = [0usize; 2];
    for (i, (o, what)) in outs.iter().zip(["dstudent", "dweak"]).enumerate() {
        if let Some(g) = o {
            student.layout.check_same(what, &g.layout)?;
            strides[i] = g.row_geometry(what, "gradients take row layouts")?.2;
        }
    }
    if b == 0 {
        return Ok(UskdReport { total: 0.0, target: 0.0, non_target: 0.0, weak: 0.0 });
    }
    let row = |v: &View<'_, T>, s: usize, r: usize| -> Vec<f64> {
        v.data[r * s..r * s + c].iter().map(|x| x.to_f64()).collect()
    };
    let softmax = |x: &[f64]| -> Vec<f64> {
        let l = lse_of(x, 1.0, |_| true);
        x.iter().map(|v| (v - l).exp()).collect()
    };
    // Per row: student logits, weak logits, and their softmaxes.
    type Row = (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>);
    let rows: Vec<Row> = (0..b)
        .map(|r| {
            let (z, w) = (row(&student, ss, r), row(&weak, ws, r));
            let (s, wp) = (softmax(&z), softmax(&w));
            (z, w, s, wp)
        })
        .collect();
    let mean_st2 = fsum(rows.iter().zip(targets).map(|((_, _, s, _), &t)| s[t as usize].powi(2))) / b as f64;
    let (mut lt, mut lnt, mut lw) = (Vec::new(), Vec::new(), Vec::new());
    let bf = b as f64;
    for (r, (z, w, s, wp)) in rows.iter().enumerate() {
        let t = targets[r] as usize;
        let pt = s[t].powi(2) + 1.0 - mean_st2;
        let ls = lse_of(z, 1.0, |_| true);
        lt.push(-pt * (z[t] - ls));
        // Weak supervision.
        let lw_ = lse_of(w, 1.0, |_| true);
        let q = |k: usize| 0.9 * (k == t) as u8 as f64 + 0.1 / c as f64;
        lw.push(p.mu * fsum((0..c).map(|k| -q(k) * (w[k] - lw_))));
        let zipf = zipf_labels(z, s, wp, t, ls, p.ranking);
        let lsn = lse_of(z, 1.0, |k| k != t);
        lnt.push(-fsum((0..c).filter(|&k| k != t).map(|k| zipf[k] * (z[k] - lsn))));
        if let Some(g) = outs[0].as_mut() {
            let st = strides[0];
            for k in 0..c {
                let mut v = p.alpha * pt * (s[k] - (k == t) as u8 as f64);
                if k != t {
                    v += p.beta * ((z[k] - lsn).exp() - zipf[k]);
                }
                g.data[r * st + k] = T::from_f64(v / bf);
            }
        }
        if let Some(g) = outs[1].as_mut() {
            let st = strides[1];
            for k in 0..c {
                g.data[r * st + k] = T::from_f64(p.mu * (wp[k] - q(k)) / bf);
            }
        }
    }
    let (target, non_target, weak_l) = (fsum(lt) / bf, fsum(lnt) / bf, fsum(lw) / bf);
    Ok(UskdReport { total: p.alpha * target + p.beta * non_target + weak_l, target, non_target, weak: weak_l })
}
