//! `cross_entropy` (given logits) and `linear_cross_entropy` (from hidden states and the
//! classifier, never forming the logits).

use numpy::{Element as NpElement, PyArrayDescrMethods, PyUntypedArray, PyUntypedArrayMethods};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use smax::loss::{
    CrossEntropyOptions, LinearCrossEntropyOptions, LinearGrads, LinearInputs, LinearShape, LossReport, Reduction,
    RowOutputs, Targets,
};
use smax::{Element, View, ViewMut};

use crate::arrays::{Kind, dispatch, dtype_of, extent, layout_for, read, rows_2d, slice, slice_mut, write};
use crate::{err, run};

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(cross_entropy, m)?)?;
    m.add_function(wrap_pyfunction!(linear_cross_entropy, m)?)?;
    Ok(())
}

fn reduction(r: &str) -> PyResult<Reduction> {
    match r {
        "mean" => Ok(Reduction::Mean),
        "sum" => Ok(Reduction::Sum),
        "none" => Ok(Reduction::None),
        other => Err(PyValueError::new_err(format!("reduction must be 'mean', 'sum' or 'none', not {other:?}"))),
    }
}

/// `(loss, z_loss, valid_rows, denominator)` of a report.
type Report = (f64, f64, usize, f64);

fn report(r: LossReport) -> Report {
    (r.loss, r.z_loss, r.valid_rows, r.denominator)
}

/// A contiguous 1-D float64 array of `rows` values, writable, for a per-row output.
fn row_out<'py>(
    a: Option<&Bound<'py, PyUntypedArray>>,
    rows: usize,
    what: &str,
) -> PyResult<Option<numpy::PyReadwriteArrayDyn<'py, f64>>> {
    let Some(a) = a else { return Ok(None) };
    if a.ndim() != 1 || a.len() != rows || !a.is_c_contiguous() {
        return Err(PyValueError::new_err(format!("{what} must be a contiguous 1-D float64 array of {rows} values")));
    }
    Ok(Some(write::<f64>(a)?))
}

/// The per-row outputs as slices.
fn rows_slices<'a>(
    [loss, z, lse]: [&'a mut Option<numpy::PyReadwriteArrayDyn<'_, f64>>; 3],
    rows: usize,
) -> RowOutputs<'a> {
    RowOutputs {
        loss: loss.as_mut().map(|a| slice_mut(a, rows)),
        z_loss: z.as_mut().map(|a| slice_mut(a, rows)),
        lse: lse.as_mut().map(|a| slice_mut(a, rows)),
    }
}

/// Fused cross-entropy of a 2-D `[rows, classes]` logits array (any row stride) against class
/// indices (`int64 [rows]`) or probabilities (the logits' shape and dtype). Writes the gradient
/// into `grad`, the per-row loss, z-loss and log-sum-exp into `loss_out`, `z_out` and `lse_out`
/// (float64) when given. Returns `(loss, z_loss, valid_rows, denominator)`, or `None` when the
/// logits' strides (or the probabilities' or the gradient's) are not rows of unit stride.
#[pyfunction]
#[pyo3(signature = (logits, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap, temperature, grad_scale, grad=None, loss_out=None, z_out=None, lse_out=None))]
#[allow(clippy::too_many_arguments)]
fn cross_entropy(
    py: Python<'_>,
    logits: &Bound<'_, PyUntypedArray>,
    target: &Bound<'_, PyUntypedArray>,
    weight: Option<&Bound<'_, PyUntypedArray>>,
    ignore_index: i64,
    reduction: &str,
    label_smoothing: f64,
    z_loss: f64,
    softcap: Option<f64>,
    temperature: f64,
    grad_scale: f64,
    grad: Option<&Bound<'_, PyUntypedArray>>,
    loss_out: Option<&Bound<'_, PyUntypedArray>>,
    z_out: Option<&Bound<'_, PyUntypedArray>>,
    lse_out: Option<&Bound<'_, PyUntypedArray>>,
) -> PyResult<Option<Report>> {
    let red = self::reduction(reduction)?;
    let d = dtype_of(logits)?;
    let Some(ll) = rows_2d(logits, "logits")? else { return Ok(None) };
    let lg = match grad {
        Some(g) => {
            if g.shape() != logits.shape() || !g.dtype().is_equiv_to(&logits.dtype()) {
                return Err(PyValueError::new_err("grad must have the logits' shape and dtype"));
            }
            match layout_for(g, 1) {
                Some((l, Kind::Rows)) => Some(l),
                _ => return Ok(None),
            }
        }
        None => None,
    };
    let weight = match weight {
        Some(w) => {
            if w.ndim() != 1 || !w.is_c_contiguous() {
                return Err(PyValueError::new_err("weight must be a contiguous 1-D float32 array"));
            }
            Some(read::<f32>(w)?)
        }
        None => None,
    };
    let ws = weight.as_ref().map(|w| slice(w, w.len()));
    let rows = logits.shape()[0];
    let mut loss_out = row_out(loss_out, rows, "loss_out")?;
    let mut z_out = row_out(z_out, rows, "z_out")?;
    let mut lse_out = row_out(lse_out, rows, "lse_out")?;
    let p = Params { ignore_index, red, label_smoothing, z_loss, softcap, temperature, grad_scale };
    let rows_out = rows_slices([&mut loss_out, &mut z_out, &mut lse_out], rows);
    dispatch!(d, ce(py, logits, ll, target, grad, lg, ws, rows_out, p))
}

#[derive(Clone, Copy)]
struct Params {
    ignore_index: i64,
    red: Reduction,
    label_smoothing: f64,
    z_loss: f64,
    softcap: Option<f64>,
    temperature: f64,
    grad_scale: f64,
}

/// The targets as read from their array.
#[derive(Clone, Copy)]
enum Tg<'a, T> {
    Classes(&'a [i64]),
    Probs(&'a [T], smax::Layout),
}

#[allow(clippy::too_many_arguments)]
fn ce<T: Element + NpElement>(
    py: Python<'_>,
    logits: &Bound<'_, PyUntypedArray>,
    ll: smax::Layout,
    target: &Bound<'_, PyUntypedArray>,
    grad: Option<&Bound<'_, PyUntypedArray>>,
    lg: Option<smax::Layout>,
    weight: Option<&[f32]>,
    rows_out: RowOutputs<'_>,
    p: Params,
) -> PyResult<Option<Report>> {
    let xr = read::<T>(logits)?;
    let xs = slice(&xr, extent(&ll)?);
    let classes;
    let probs;
    let tg: Tg<'_, T> = if target.dtype().is_equiv_to(&numpy::dtype::<i64>(py)) {
        if target.ndim() != 1 || !target.is_c_contiguous() {
            return Err(PyValueError::new_err("class targets must be a contiguous 1-D int64 array"));
        }
        classes = read::<i64>(target)?;
        Tg::Classes(slice(&classes, target.len()))
    } else if target.dtype().is_equiv_to(&logits.dtype()) {
        if target.shape() != logits.shape() {
            return Err(PyValueError::new_err("probability targets must have the logits' shape"));
        }
        let Some((lt, Kind::Rows)) = layout_for(target, 1) else { return Ok(None) };
        probs = read::<T>(target)?;
        Tg::Probs(slice(&probs, extent(&lt)?), lt)
    } else {
        return Err(PyTypeError::new_err("target must be int64 class indices or probabilities of the logits' dtype"));
    };
    let mut gw = match grad {
        Some(g) => Some(write::<T>(g)?),
        None => None,
    };
    let gs = match (gw.as_mut(), lg) {
        (Some(w), Some(l)) => Some((slice_mut(w, extent(&l)?), l)),
        _ => None,
    };
    let r = run(py, move |par| {
        let mut o = CrossEntropyOptions::default()
            .reduction(p.red)
            .ignore_index(p.ignore_index)
            .label_smoothing(p.label_smoothing)
            .z_loss(p.z_loss)
            .temperature(p.temperature)
            .grad_scale(p.grad_scale)
            .par(par);
        o.class_weights = weight;
        o.softcap = p.softcap;
        let targets = match tg {
            Tg::Classes(c) => Targets::Classes(c),
            Tg::Probs(q, l) => Targets::Probs(View::new(q, l)?),
        };
        let g = match gs {
            Some((s, l)) => Some(ViewMut::new(s, l)?),
            None => None,
        };
        smax::loss::cross_entropy(View::new(xs, ll)?, targets, g, rows_out, &o)
    });
    r.map(|r| Some(report(r))).map_err(err)
}

/// Cross-entropy of `logits = h·Wᵀ + bias` (float32, C-contiguous `h [n, d]`, `w [v, d]`,
/// `bias [v]`) against `target` (`int64 [n]`), without forming the logits; writes the
/// gradients into `dh`, `dw`, `dbias` and the per-row loss, z-loss and log-sum-exp when given.
/// Returns `(loss, z_loss, valid_rows, denominator)`.
#[pyfunction]
#[pyo3(signature = (h, w, target, bias, ignore_index, reduction, label_smoothing, z_loss, softcap, grad_scale, dh=None, dw=None, dbias=None, loss_out=None, z_out=None, lse_out=None))]
#[allow(clippy::too_many_arguments)]
fn linear_cross_entropy(
    py: Python<'_>,
    h: &Bound<'_, PyUntypedArray>,
    w: &Bound<'_, PyUntypedArray>,
    target: &Bound<'_, PyUntypedArray>,
    bias: Option<&Bound<'_, PyUntypedArray>>,
    ignore_index: i64,
    reduction: &str,
    label_smoothing: f64,
    z_loss: f64,
    softcap: Option<f64>,
    grad_scale: f64,
    dh: Option<&Bound<'_, PyUntypedArray>>,
    dw: Option<&Bound<'_, PyUntypedArray>>,
    dbias: Option<&Bound<'_, PyUntypedArray>>,
    loss_out: Option<&Bound<'_, PyUntypedArray>>,
    z_out: Option<&Bound<'_, PyUntypedArray>>,
    lse_out: Option<&Bound<'_, PyUntypedArray>>,
) -> PyResult<Report> {
    let red = self::reduction(reduction)?;
    if h.ndim() != 2 || w.ndim() != 2 {
        return Err(PyValueError::new_err("h must be [n, d] and w [v, d]"));
    }
    let shape = LinearShape { n: h.shape()[0], d: h.shape()[1], v: w.shape()[0] };
    if w.shape()[1] != shape.d {
        return Err(PyValueError::new_err(format!("w has {} columns but h has {}", w.shape()[1], shape.d)));
    }
    let c = |a: &Bound<'_, PyUntypedArray>, what: &str| -> PyResult<usize> {
        if !a.is_c_contiguous() {
            return Err(PyValueError::new_err(format!("{what} must be C-contiguous")));
        }
        Ok(a.len())
    };
    let (hr, wr) = (read::<f32>(h)?, read::<f32>(w)?);
    let (hs, wsl) = (slice(&hr, c(h, "h")?), slice(&wr, c(w, "w")?));
    let tr = read::<i64>(target)?;
    let ts = slice(&tr, c(target, "target")?);
    let br = match bias {
        Some(b) => Some((read::<f32>(b)?, c(b, "bias")?)),
        None => None,
    };
    let bs = br.as_ref().map(|(b, n)| slice(b, *n));
    let (mut dhw, mut dww, mut dbw) = (grad_out(dh, "dh")?, grad_out(dw, "dw")?, grad_out(dbias, "dbias")?);
    let grads = LinearGrads {
        dh: dhw.as_mut().map(|(a, n)| slice_mut(a, *n)),
        dw: dww.as_mut().map(|(a, n)| slice_mut(a, *n)),
        dbias: dbw.as_mut().map(|(a, n)| slice_mut(a, *n)),
    };
    let mut loss_out = row_out(loss_out, shape.n, "loss_out")?;
    let mut z_out = row_out(z_out, shape.n, "z_out")?;
    let mut lse_out = row_out(lse_out, shape.n, "lse_out")?;
    let rows_out = rows_slices([&mut loss_out, &mut z_out, &mut lse_out], shape.n);
    let inp = LinearInputs { h: hs, w: wsl, bias: bs, targets: ts };
    run(py, move |par| {
        let mut o = LinearCrossEntropyOptions::default()
            .reduction(red)
            .ignore_index(ignore_index)
            .label_smoothing(label_smoothing)
            .z_loss(z_loss)
            .grad_scale(grad_scale)
            .par(par);
        o.softcap = softcap;
        smax::loss::linear_cross_entropy(shape, inp, grads, rows_out, None, &o)
    })
    .map(report)
    .map_err(err)
}

/// A C-contiguous float32 gradient output and its element count.
fn grad_out<'py>(
    a: Option<&Bound<'py, PyUntypedArray>>,
    what: &str,
) -> PyResult<Option<(numpy::PyReadwriteArrayDyn<'py, f32>, usize)>> {
    match a {
        Some(a) => {
            if !a.is_c_contiguous() {
                return Err(PyValueError::new_err(format!("{what} must be C-contiguous")));
            }
            Ok(Some((write::<f32>(a)?, a.len())))
        }
        None => Ok(None),
    }
}
