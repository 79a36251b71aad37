//! Calibration: temperature fit, ECE/MCE with the reliability table, Brier score and the
//! out-of-distribution scores of a 2-D logits array.

use numpy::{Element as NpElement, PyUntypedArray, PyUntypedArrayMethods};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use smax::calibrate::{Binning, CalibrationOptions, FitOptions, OodOptions, OodScore};
use smax::{Element, View};

use crate::arrays::{contiguous, dispatch, dtype_of, extent, read, rows_2d, slice, slice_mut, write};
use crate::{err, run};

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(fit_temperature, m)?)?;
    m.add_function(wrap_pyfunction!(calibration_error, m)?)?;
    m.add_function(wrap_pyfunction!(brier_score, m)?)?;
    m.add_function(wrap_pyfunction!(ood_scores, m)?)?;
    Ok(())
}

/// Reads the logits (rows of layout `l`) and the int64 labels and runs `f` on them with the
/// GIL released.
fn with_labels<T: Element + NpElement, R: Send>(
    py: Python<'_>,
    logits: &Bound<'_, PyUntypedArray>,
    l: smax::Layout,
    labels: &Bound<'_, PyUntypedArray>,
    f: impl FnOnce(View<'_, T>, &[i64]) -> smax::Result<R> + Send,
) -> PyResult<R> {
    let xr = read::<T>(logits)?;
    let xs = slice(&xr, extent(&l)?);
    let n = contiguous(labels, "labels", true)?;
    let lr = read::<i64>(labels)?;
    let ls = slice(&lr, n);
    run(py, move |_| f(View::new(xs, l)?, ls)).map_err(err)
}

/// The result of a calibration call on rows the caller made unit-stride: `None` when they are
/// not.
type Maybe<T> = PyResult<Option<T>>;

/// `(temperature, nll_before, nll_after, iterations, converged, capped)`.
type Fit = (f64, f64, f64, usize, bool, bool);

/// Temperature scaling (Guo et al. 2017): the `T` minimising the mean NLL, in `[t_min, t_max]`.
#[pyfunction]
#[pyo3(signature = (logits, labels, t_min, t_max))]
fn fit_temperature(
    py: Python<'_>,
    logits: &Bound<'_, PyUntypedArray>,
    labels: &Bound<'_, PyUntypedArray>,
    t_min: f64,
    t_max: f64,
) -> Maybe<Fit> {
    let Some(l) = rows_2d(logits, "logits")? else { return Ok(None) };
    let o = FitOptions::default().t_min(t_min).t_max(t_max);
    dispatch!(dtype_of(logits)?, fit(py, logits, l, labels, o)).map(Some)
}

fn fit<T: Element + NpElement>(
    py: Python<'_>,
    logits: &Bound<'_, PyUntypedArray>,
    l: smax::Layout,
    t: &Bound<'_, PyUntypedArray>,
    o: FitOptions,
) -> PyResult<Fit> {
    let f = with_labels(py, logits, l, t, |x: View<'_, T>, y| smax::calibrate::fit_temperature(x, y, &o))?;
    Ok((f.temperature, f.nll_before, f.nll_after, f.iterations, f.converged, f.capped))
}

/// `(ece, ece_l2, mce, bins)` with each bin `(lo, hi, count, accuracy, confidence)`.
type Cal = (f64, f64, f64, Vec<(f64, f64, usize, f64, f64)>);

/// ECE, its L2 form, MCE and the reliability table; `binning` is `"width"` or `"mass"`.
#[pyfunction]
#[pyo3(signature = (logits, labels, bins, binning))]
fn calibration_error(
    py: Python<'_>,
    logits: &Bound<'_, PyUntypedArray>,
    labels: &Bound<'_, PyUntypedArray>,
    bins: usize,
    binning: &str,
) -> Maybe<Cal> {
    let b = match binning {
        "width" => Binning::EqualWidth(bins),
        "mass" => Binning::EqualMass(bins),
        other => return Err(PyValueError::new_err(format!("binning must be 'width' or 'mass', not {other:?}"))),
    };
    let Some(l) = rows_2d(logits, "logits")? else { return Ok(None) };
    let o = CalibrationOptions { binning: b, ..Default::default() };
    dispatch!(dtype_of(logits)?, cal(py, logits, l, labels, o)).map(Some)
}

fn cal<T: Element + NpElement>(
    py: Python<'_>,
    logits: &Bound<'_, PyUntypedArray>,
    l: smax::Layout,
    t: &Bound<'_, PyUntypedArray>,
    o: CalibrationOptions,
) -> PyResult<Cal> {
    let c = with_labels(py, logits, l, t, |x: View<'_, T>, y| smax::calibrate::calibration_error(x, y, &o))?;
    let bins = c.bins.iter().map(|b| (b.lo, b.hi, b.count, b.accuracy, b.confidence)).collect();
    Ok((c.ece, c.ece_l2, c.mce, bins))
}

/// The multi-class Brier score `mean Σ_k (p_k − onehot_k)²`.
#[pyfunction]
fn brier_score(py: Python<'_>, logits: &Bound<'_, PyUntypedArray>, labels: &Bound<'_, PyUntypedArray>) -> Maybe<f64> {
    let Some(l) = rows_2d(logits, "logits")? else { return Ok(None) };
    dispatch!(dtype_of(logits)?, brier(py, logits, l, labels)).map(Some)
}

fn brier<T: Element + NpElement>(
    py: Python<'_>,
    logits: &Bound<'_, PyUntypedArray>,
    l: smax::Layout,
    t: &Bound<'_, PyUntypedArray>,
) -> PyResult<f64> {
    with_labels(py, logits, l, t, |x: View<'_, T>, y| smax::calibrate::brier_score(x, y))
}

/// Per-row out-of-distribution scores into `out` (float64): `"msp"`, `"max_logit"` or
/// `"energy"` (the negative energy `T·lse(z/T)`). Higher means more in-distribution.
#[pyfunction]
#[pyo3(signature = (logits, out, score, temperature))]
fn ood_scores(
    py: Python<'_>,
    logits: &Bound<'_, PyUntypedArray>,
    out: &Bound<'_, PyUntypedArray>,
    score: &str,
    temperature: f64,
) -> PyResult<bool> {
    let s = match score {
        "msp" => OodScore::Msp,
        "max_logit" => OodScore::MaxLogit,
        "energy" => OodScore::NegEnergy(temperature),
        other => {
            return Err(PyValueError::new_err(format!("score must be 'msp', 'max_logit' or 'energy', not {other:?}")));
        }
    };
    let Some(l) = rows_2d(logits, "logits")? else { return Ok(false) };
    contiguous(out, "out", true)?;
    let o = OodOptions { score: s, ..Default::default() };
    dispatch!(dtype_of(logits)?, ood(py, logits, l, out, o))?;
    Ok(true)
}

fn ood<T: Element + NpElement>(
    py: Python<'_>,
    logits: &Bound<'_, PyUntypedArray>,
    l: smax::Layout,
    out: &Bound<'_, PyUntypedArray>,
    o: OodOptions,
) -> PyResult<()> {
    let xr = read::<T>(logits)?;
    let xs = slice(&xr, extent(&l)?);
    let n = out.len();
    let mut ow = write::<f64>(out)?;
    let os = slice_mut(&mut ow, n);
    run(py, move |_| smax::calibrate::ood_scores(View::new(xs, l)?, os, &o)).map_err(err)
}
