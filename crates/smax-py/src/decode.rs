//! Sampling: `sample` (one token per row) and `process` (the filtered, renormalised
//! distribution).

use numpy::{Element as NpElement, PyArrayDescrMethods, PyUntypedArray, PyUntypedArrayMethods};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use smax::sample::{Draw, Processed, SampleOptions};
use smax::{Element, View, ViewMut};

use crate::arrays::{contiguous, dispatch, dtype_of, extent, read, rows_2d, slice, slice_mut, write};
use crate::{err, run};

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(sample, m)?)?;
    m.add_function(wrap_pyfunction!(process, m)?)?;
    Ok(())
}

fn options(temperature: f64, top_k: Option<usize>, top_p: Option<f64>, min_p: Option<f64>) -> SampleOptions {
    let mut o = SampleOptions::default().temperature(temperature);
    o.top_k = top_k;
    o.top_p = top_p;
    o.min_p = min_p;
    o
}

/// Draws one token per row of the 2-D `logits` into `tokens` (uint32, one per row) after
/// temperature (0: greedy), top-k, top-p and min-p, with `uniforms` (float64 in `[0, 1)`, one
/// per row) or smax's counter generator keyed by `seeds` (uint64, one per row) and `step`.
/// Returns `False` when the logits' rows are not of unit stride.
#[pyfunction]
#[pyo3(signature = (logits, tokens, temperature, top_k, top_p, min_p, seeds, step, uniforms=None))]
#[allow(clippy::too_many_arguments)]
fn sample(
    py: Python<'_>,
    logits: &Bound<'_, PyUntypedArray>,
    tokens: &Bound<'_, PyUntypedArray>,
    temperature: f64,
    top_k: Option<usize>,
    top_p: Option<f64>,
    min_p: Option<f64>,
    seeds: &Bound<'_, PyUntypedArray>,
    step: u64,
    uniforms: Option<&Bound<'_, PyUntypedArray>>,
) -> PyResult<bool> {
    let Some(l) = rows_2d(logits, "logits")? else { return Ok(false) };
    let o = options(temperature, top_k, top_p, min_p);
    dispatch!(dtype_of(logits)?, draw(py, logits, l, tokens, seeds, step, uniforms, o))?;
    Ok(true)
}

#[allow(clippy::too_many_arguments)]
fn draw<T: Element + NpElement>(
    py: Python<'_>,
    logits: &Bound<'_, PyUntypedArray>,
    l: smax::Layout,
    tokens: &Bound<'_, PyUntypedArray>,
    seeds: &Bound<'_, PyUntypedArray>,
    step: u64,
    uniforms: Option<&Bound<'_, PyUntypedArray>>,
    o: SampleOptions,
) -> PyResult<()> {
    let xr = read::<T>(logits)?;
    let xs = slice(&xr, extent(&l)?);
    let nt = contiguous(tokens, "tokens", true)?;
    let mut tw = write::<u32>(tokens)?;
    let ts = slice_mut(&mut tw, nt);
    let ns = contiguous(seeds, "seeds", true)?;
    let sr = read::<u64>(seeds)?;
    let ss = slice(&sr, ns);
    let ur = match uniforms {
        Some(u) => Some((read::<f64>(u)?, contiguous(u, "uniforms", true)?)),
        None => None,
    };
    let us = ur.as_ref().map(|(u, n)| slice(u, *n));
    run(py, move |par| {
        let d = match us {
            Some(u) => Draw::Uniform(u),
            None => Draw::Counter { seeds: ss, step },
        };
        smax::sample::sample::<T, f32>(View::new(xs, l)?, d, ts, None, &o.par(par))
    })
    .map(|_| ())
    .map_err(err)
}

/// The processed distribution of each row of `logits` into `out` (float32 or float64, the
/// logits' shape): probabilities (`log = False`, 0 outside the kept set) or log-probabilities
/// (`-inf` outside it). Returns the kept-set size per row, or `None` when a layout is not rows
/// of unit stride.
#[pyfunction]
#[pyo3(signature = (logits, out, log, temperature, top_k, top_p, min_p))]
#[allow(clippy::too_many_arguments)]
fn process(
    py: Python<'_>,
    logits: &Bound<'_, PyUntypedArray>,
    out: &Bound<'_, PyUntypedArray>,
    log: bool,
    temperature: f64,
    top_k: Option<usize>,
    top_p: Option<f64>,
    min_p: Option<f64>,
) -> PyResult<Option<Vec<usize>>> {
    let Some(l) = rows_2d(logits, "logits")? else { return Ok(None) };
    if out.shape() != logits.shape() {
        return Err(PyValueError::new_err("out must have the logits' shape"));
    }
    let Some(lo) = rows_2d(out, "out")? else { return Ok(None) };
    let o = options(temperature, top_k, top_p, min_p);
    let what = if log { Processed::LogProbs } else { Processed::Probs };
    let f64_out = out.dtype().is_equiv_to(&numpy::dtype::<f64>(py));
    if !f64_out && !out.dtype().is_equiv_to(&numpy::dtype::<f32>(py)) {
        return Err(pyo3::exceptions::PyTypeError::new_err("out must be float32 or float64"));
    }
    let r = if f64_out {
        dispatch!(dtype_of(logits)?, processed_into_f64(py, logits, l, out, lo, what, o))
    } else {
        dispatch!(dtype_of(logits)?, processed_into_f32(py, logits, l, out, lo, what, o))
    }?;
    Ok(Some(r))
}

macro_rules! processed_into {
    ($name:ident, $u:ty) => {
        fn $name<T: Element + NpElement>(
            py: Python<'_>,
            logits: &Bound<'_, PyUntypedArray>,
            l: smax::Layout,
            out: &Bound<'_, PyUntypedArray>,
            lo: smax::Layout,
            what: Processed,
            o: SampleOptions,
        ) -> PyResult<Vec<usize>> {
            let xr = read::<T>(logits)?;
            let xs = slice(&xr, extent(&l)?);
            let mut ow = write::<$u>(out)?;
            let os = slice_mut(&mut ow, extent(&lo)?);
            run(py, move |par| smax::sample::process(View::new(xs, l)?, ViewMut::new(os, lo)?, what, &o.par(par)))
                .map_err(err)
        }
    };
}
processed_into!(processed_into_f32, f32);
processed_into!(processed_into_f64, f64);
