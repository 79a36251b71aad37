//! Calibration: temperature fit, ECE/MCE with the reliability table, Brier score and the
//! out-of-distribution scores of a 2-D logits array.

use numpy::{Element as NpElement, PyUntypedArray, PyUntypedArrayMethods};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use smax::calibrate::{Binning, CalibrationOptions, FitOptions, OodOptions, OodScore};
use smax::{Element, View};

use crate::arrays::{Kind, dispatch, dtype_of, extent, layout_for, read, slice, slice_mut, write};
use crate::{err, run};

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(fit_temperature, m)?)?;
    m.add_function(wrap_pyfunction!(calibration_error, m)?)?;
    m.add_function(wrap_pyfunction!(brier_score, m)?)?;
    m.add_function(wrap_pyfunction!(ood_scores, m)?)?;
    Ok(())
}

/// The rows layout of a 2-D logits array, or `None` when its rows are not of unit stride.
fn rows_layout(logits: &Bound<'_, PyUntypedArray>) -> PyResult<Option<smax::Layout>> {
    if logits.ndim() != 2 {
        return Err(PyValueError::new_err("logits must be 2-D [samples, classes]"));
    }
    Ok(match layout_for(logits, 1) {
        Some((l, Kind::Rows)) => Some(l),
        _ => None,
    })
}

fn labels<'py>(t: &Bound<'py, PyUntypedArray>) -> PyResult<numpy::PyReadonlyArrayDyn<'py, i64>> {
    if t.ndim() != 1 || !t.is_c_contiguous() {
        return Err(PyValueError::new_err("labels must be a contiguous 1-D int64 array"));
    }
    read::<i64>(t)
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
    let Some(l) = rows_layout(logits)? else { return Ok(None) };
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
    let xr = read::<T>(logits)?;
    let xs = slice(&xr, extent(&l)?);
    let lr = labels(t)?;
    let ls = slice(&lr, t.len());
    let f = run(py, move |_| smax::calibrate::fit_temperature(View::new(xs, l)?, ls, &o)).map_err(err)?;
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
    let Some(l) = rows_layout(logits)? else { return Ok(None) };
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
    let xr = read::<T>(logits)?;
    let xs = slice(&xr, extent(&l)?);
    let lr = labels(t)?;
    let ls = slice(&lr, t.len());
    let c = run(py, move |_| smax::calibrate::calibration_error(View::new(xs, l)?, ls, &o)).map_err(err)?;
    let bins = c.bins.iter().map(|b| (b.lo, b.hi, b.count, b.accuracy, b.confidence)).collect();
    Ok((c.ece, c.ece_l2, c.mce, bins))
}

/// The multi-class Brier score `mean Σ_k (p_k − onehot_k)²`.
#[pyfunction]
fn brier_score(py: Python<'_>, logits: &Bound<'_, PyUntypedArray>, labels: &Bound<'_, PyUntypedArray>) -> Maybe<f64> {
    let Some(l) = rows_layout(logits)? else { return Ok(None) };
    dispatch!(dtype_of(logits)?, brier(py, logits, l, labels)).map(Some)
}

fn brier<T: Element + NpElement>(
    py: Python<'_>,
    logits: &Bound<'_, PyUntypedArray>,
    l: smax::Layout,
    t: &Bound<'_, PyUntypedArray>,
) -> PyResult<f64> {
    let xr = read::<T>(logits)?;
    let xs = slice(&xr, extent(&l)?);
    let lr = labels(t)?;
    let ls = slice(&lr, t.len());
    run(py, move |_| smax::calibrate::brier_score(View::new(xs, l)?, ls)).map_err(err)
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
    let Some(l) = rows_layout(logits)? else { return Ok(false) };
    if out.ndim() != 1 || !out.is_c_contiguous() {
        return Err(PyValueError::new_err("out must be a contiguous 1-D float64 array"));
    }
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
