//! `softmax`, `log_softmax`, `logsumexp` and the backward passes over any axis of an array.

use numpy::{Element as NpElement, PyUntypedArray, PyUntypedArrayMethods};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use smax::{Element, MaskedRow, Options, View, ViewMut};

use crate::arrays::{Kind, dispatch, dtype_of, extent, layout_for, normalize_axis, read, slice, slice_mut, write};
use crate::{err, run};

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(normalize, m)?)?;
    m.add_function(wrap_pyfunction!(logsumexp, m)?)?;
    m.add_function(wrap_pyfunction!(normalize_backward, m)?)?;
    Ok(())
}

fn options(temperature: f64, masked_row: &str) -> PyResult<Options> {
    let masked_row = match masked_row {
        "nan" => MaskedRow::Nan,
        "zero" => MaskedRow::Zero,
        other => return Err(PyValueError::new_err(format!("masked_row must be 'nan' or 'zero', not {other:?}"))),
    };
    Ok(Options::default().temperature(temperature).masked_row(masked_row))
}

fn log_op(op: &str) -> PyResult<bool> {
    match op {
        "softmax" => Ok(false),
        "log_softmax" => Ok(true),
        other => Err(PyValueError::new_err(format!("op must be 'softmax' or 'log_softmax', not {other:?}"))),
    }
}

/// Checks that `out` has the shape and dtype of `x`.
fn same_array(x: &Bound<'_, PyUntypedArray>, out: &Bound<'_, PyUntypedArray>, what: &str) -> PyResult<()> {
    if x.shape() != out.shape() {
        return Err(PyValueError::new_err(format!(
            "{what} has shape {:?} but the input has shape {:?}",
            out.shape(),
            x.shape()
        )));
    }
    if !x.dtype().is_equiv_to(&out.dtype()) {
        return Err(pyo3::exceptions::PyTypeError::new_err(format!("{what} must have the input's dtype")));
    }
    Ok(())
}

use numpy::PyArrayDescrMethods;

/// `out = softmax(x)` (or log-softmax) over `axis`. `out` may be `x` itself (in place).
/// Returns `False`, computing nothing, when no smax layout pair expresses the two arrays'
/// strides.
#[pyfunction]
#[pyo3(signature = (op, x, out, axis, temperature, masked_row))]
fn normalize(
    py: Python<'_>,
    op: &str,
    x: &Bound<'_, PyUntypedArray>,
    out: &Bound<'_, PyUntypedArray>,
    axis: isize,
    temperature: f64,
    masked_row: &str,
) -> PyResult<bool> {
    let log = log_op(op)?;
    same_array(x, out, "out")?;
    let axis = normalize_axis(axis, x.ndim())?;
    let opts = options(temperature, masked_row)?;
    let d = dtype_of(x)?;
    if x.is(out) {
        let Some((l, _)) = layout_for(out, axis) else { return Ok(false) };
        dispatch!(d, forward_inplace(py, out, l, log, opts))?;
        return Ok(true);
    }
    let (Some((lx, kx)), Some((lo, ko))) = (layout_for(x, axis), layout_for(out, axis)) else { return Ok(false) };
    if kx != ko {
        return Ok(false);
    }
    dispatch!(d, forward(py, x, out, (lx, lo), log, opts))?;
    Ok(true)
}

fn forward<T: Element + NpElement>(
    py: Python<'_>,
    x: &Bound<'_, PyUntypedArray>,
    out: &Bound<'_, PyUntypedArray>,
    (lx, lo): (smax::Layout, smax::Layout),
    log: bool,
    opts: Options,
) -> PyResult<()> {
    let xr = read::<T>(x)?;
    let mut or = write::<T>(out)?;
    let xs = slice(&xr, extent(&lx)?);
    let os = slice_mut(&mut or, extent(&lo)?);
    run(py, move |par| {
        let (x, y) = (View::new(xs, lx)?, ViewMut::new(os, lo)?);
        let o = opts.par(par);
        if log { smax::log_softmax(x, y, &o) } else { smax::softmax(x, y, &o) }
    })
    .map_err(err)
}

fn forward_inplace<T: Element + NpElement>(
    py: Python<'_>,
    xy: &Bound<'_, PyUntypedArray>,
    l: smax::Layout,
    log: bool,
    opts: Options,
) -> PyResult<()> {
    let mut w = write::<T>(xy)?;
    let s = slice_mut(&mut w, extent(&l)?);
    run(py, move |par| {
        let v = ViewMut::new(s, l)?;
        let o = opts.par(par);
        if log { smax::log_softmax_inplace(v, &o) } else { smax::softmax_inplace(v, &o) }
    })
    .map_err(err)
}

/// `out = logsumexp(x)` over `axis`; `out` is C-contiguous with the shape of `x` without that
/// axis. Returns `False` when no smax layout expresses the strides of `x`.
#[pyfunction]
#[pyo3(signature = (x, out, axis, temperature))]
fn logsumexp(
    py: Python<'_>,
    x: &Bound<'_, PyUntypedArray>,
    out: &Bound<'_, PyUntypedArray>,
    axis: isize,
    temperature: f64,
) -> PyResult<bool> {
    let axis = normalize_axis(axis, x.ndim())?;
    let mut reduced = x.shape().to_vec();
    reduced.remove(axis);
    if out.shape() != reduced.as_slice() || !out.is_c_contiguous() {
        return Err(PyValueError::new_err(format!("out must be a C-contiguous array of shape {reduced:?}")));
    }
    if !x.dtype().is_equiv_to(&out.dtype()) {
        return Err(pyo3::exceptions::PyTypeError::new_err("out must have the input's dtype"));
    }
    let opts = options(temperature, "nan")?;
    let Some((l, _)) = layout_for(x, axis) else { return Ok(false) };
    dispatch!(dtype_of(x)?, lse(py, x, out, l, opts))?;
    Ok(true)
}

fn lse<T: Element + NpElement>(
    py: Python<'_>,
    x: &Bound<'_, PyUntypedArray>,
    out: &Bound<'_, PyUntypedArray>,
    l: smax::Layout,
    opts: Options,
) -> PyResult<()> {
    let xr = read::<T>(x)?;
    let mut or = write::<T>(out)?;
    let xs = slice(&xr, extent(&l)?);
    let n = out.len();
    let os = slice_mut(&mut or, n);
    run(py, move |par| smax::logsumexp(View::new(xs, l)?, os, &opts.par(par))).map_err(err)
}

/// `out = ∂L/∂x` from the forward output `y` and `dy = ∂L/∂y`, over `axis`. `out` may be `dy`
/// itself. Returns `False` when no smax layouts of one kind express the arrays' strides.
#[pyfunction]
#[pyo3(signature = (op, y, dy, out, axis, temperature))]
fn normalize_backward(
    py: Python<'_>,
    op: &str,
    y: &Bound<'_, PyUntypedArray>,
    dy: &Bound<'_, PyUntypedArray>,
    out: &Bound<'_, PyUntypedArray>,
    axis: isize,
    temperature: f64,
) -> PyResult<bool> {
    let log = log_op(op)?;
    same_array(y, dy, "dy")?;
    same_array(y, out, "out")?;
    let axis = normalize_axis(axis, y.ndim())?;
    let opts = options(temperature, "nan")?;
    let (Some((ly, ky)), Some((ld, kd)), Some((lo, ko))) =
        (layout_for(y, axis), layout_for(dy, axis), layout_for(out, axis))
    else {
        return Ok(false);
    };
    if ky != kd || ky != ko || (ky == Kind::Axis && (ly != ld || ly != lo)) {
        return Ok(false);
    }
    let inplace = dy.is(out);
    dispatch!(dtype_of(y)?, backward(py, [y, dy, out], [ly, ld, lo], inplace, log, opts))?;
    Ok(true)
}

fn backward<T: Element + NpElement>(
    py: Python<'_>,
    [y, dy, out]: [&Bound<'_, PyUntypedArray>; 3],
    [ly, ld, lo]: [smax::Layout; 3],
    inplace: bool,
    log: bool,
    opts: Options,
) -> PyResult<()> {
    let yr = read::<T>(y)?;
    let ys = slice(&yr, extent(&ly)?);
    if inplace {
        let mut w = write::<T>(out)?;
        let s = slice_mut(&mut w, extent(&lo)?);
        return run(py, move |par| {
            let (y, d) = (View::new(ys, ly)?, ViewMut::new(s, lo)?);
            let o = opts.par(par);
            if log { smax::log_softmax_backward_inplace(y, d, &o) } else { smax::softmax_backward_inplace(y, d, &o) }
        })
        .map_err(err);
    }
    let dr = read::<T>(dy)?;
    let ds = slice(&dr, extent(&ld)?);
    let mut w = write::<T>(out)?;
    let s = slice_mut(&mut w, extent(&lo)?);
    run(py, move |par| {
        let (y, d, dx) = (View::new(ys, ly)?, View::new(ds, ld)?, ViewMut::new(s, lo)?);
        let o = opts.par(par);
        if log { smax::log_softmax_backward(y, d, dx, &o) } else { smax::softmax_backward(y, d, dx, &o) }
    })
    .map_err(err)
}
