//! The rest of the softmax loss family (ALGORITHMS.md N5, L3, L5–L8, L10, L11): each returns its
//! value and its gradient with respect to its inputs in one call.
//!
//! These losses are computed per row in f64 (scalar, libm `exp`/`ln`/`log1p`, compensated sums)
//! whatever the element type, so their accuracy is that of f64 before the final rounding to
//! `T`. Rows run in parallel; reductions run in row order, so results do not depend on the
//! thread count. They share [`LossOptions`] for reduction, ignore index and threading.
//!
//! Indexing invariant: [`drive_classes`] (and `uskd_loss`, `tempnet_loss`, `normalized_softmax_loss` through
//! `check_targets`) validates every target against the row length before a row runs, and the
//! drivers take second inputs and gradients only with the logits' layout, so the per-row
//! closures index `x[t]`, `teacher[t]` and `g[k]` without a check that could fire.

use crate::element::Element;
use crate::error::{Error, Result};
use crate::layout::{View, ViewMut};
use crate::options::{Exec, defaults, setters};
use crate::par;
use crate::scalar64::{sigmoid, softplus};

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

defaults! {
    /// Parameters of [`nkd_loss`]: the non-target temperature λ and weight γ (the authors' ImageNet
    /// setting λ = 1, γ = 1.5 is the default).
    #[derive(Debug, Clone, Copy, PartialEq)]
    pub struct Nkd {
        /// λ, finite and > 0.
        pub temperature: f64 = 1.0,
        /// γ, finite.
        pub gamma: f64 = 1.5,
    }
}

/// Parameter of [`hinton_kd_loss`]: the distillation temperature `T` (finite, > 0).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HintonKd {
    /// `T`.
    pub temperature: f64,
}

defaults! {
    /// Parameter of [`decoupled_softmax_loss`]: the temperature τ dividing the similarities
    /// (finite, > 0; the authors use 0.05 on cosine similarities, the default).
    #[derive(Debug, Clone, Copy, PartialEq)]
    pub struct Decoupled {
        /// τ.
        pub temperature: f64 = 0.05,
    }
}

/// Parameter of [`tempnet_loss`]: the DRO radius ρ (finite; the authors' GPT-2 setting is 8).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TempNet {
    /// ρ.
    pub rho: f64,
}

defaults! {
    /// Parameter of [`normalized_softmax_loss`]: the temperature `T` dividing the cosines (finite,
    /// > 0; the released package's default 0.1, i.e. scale 10, is the default).
    #[derive(Debug, Clone, Copy, PartialEq)]
    pub struct NormalizedSoftmax {
        /// `T`.
        pub temperature: f64 = 0.1,
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
// Spherical Z-loss (L3).

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

mod distill;
mod stablemax;
mod variants;

pub use distill::*;
pub use stablemax::*;
pub use variants::*;
