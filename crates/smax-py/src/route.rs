//! Mixture-of-experts gating and the softmax quantizers.

use numpy::{Element as NpElement, PyUntypedArray, PyUntypedArrayMethods};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use smax::gate::{Activation, GateOptions, GateOrder};
use smax::quant::{Quantizer, SulqExponent, SulqLevels, ZeroMode};
use smax::{Element, View};

use crate::arrays::{contiguous, dispatch, dtype_of, extent, read, rows_2d, slice, slice_mut, write};
use crate::{err, run};

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(gate, m)?)?;
    m.add_function(wrap_pyfunction!(quantize, m)?)?;
    m.add_function(wrap_pyfunction!(dequantize, m)?)?;
    m.add_function(wrap_pyfunction!(calibrate_quantizer, m)?)?;
    Ok(())
}

/// `a`'s element count, which must be `n`, C-contiguous.
fn sized(a: &Bound<'_, PyUntypedArray>, what: &str, n: usize) -> PyResult<()> {
    if contiguous(a, what, false)? != n {
        return Err(PyValueError::new_err(format!("{what} must hold {n} elements")));
    }
    Ok(())
}

/// `(tokens_per_expert, mean_prob, aux_loss)`.
type Stats = (Vec<usize>, Vec<f64>, f64);

/// Routes each row of the 2-D `logits` (`[tokens, experts]`) to `k` experts: ids into
/// `experts` (uint32 `[tokens, k]`) and weights into `weights` (float32 `[tokens, k]`), best
/// first. `order` is `"softmax_topk"` or `"topk_softmax"`; `activation` `"identity"`,
/// `"tanh"` or `"sigmoid"`. Returns the load statistics, or `None` when the logits' rows are
/// not of unit stride.
#[pyfunction]
#[pyo3(signature = (logits, experts, weights, k, order, renormalize, temperature, activation, threshold, routed_scaling_factor, bias=None))]
#[allow(clippy::too_many_arguments)]
fn gate(
    py: Python<'_>,
    logits: &Bound<'_, PyUntypedArray>,
    experts: &Bound<'_, PyUntypedArray>,
    weights: &Bound<'_, PyUntypedArray>,
    k: usize,
    order: &str,
    renormalize: bool,
    temperature: f64,
    activation: &str,
    threshold: Option<f64>,
    routed_scaling_factor: f64,
    bias: Option<&Bound<'_, PyUntypedArray>>,
) -> PyResult<Option<Stats>> {
    let Some(l) = rows_2d(logits, "logits")? else { return Ok(None) };
    let order = match order {
        "softmax_topk" => GateOrder::SoftmaxThenTopK { renormalize },
        "topk_softmax" => GateOrder::TopKThenSoftmax,
        o => return Err(PyValueError::new_err(format!("order must be 'softmax_topk' or 'topk_softmax', not {o:?}"))),
    };
    let activation = match activation {
        "identity" => Activation::Identity,
        "tanh" => Activation::Tanh,
        "sigmoid" => Activation::Sigmoid,
        a => {
            return Err(PyValueError::new_err(format!(
                "activation must be 'identity', 'tanh' or 'sigmoid', not {a:?}"
            )));
        }
    };
    let mut o = GateOptions::default()
        .k(k)
        .order(order)
        .temperature(temperature)
        .activation(activation)
        .routed_scaling_factor(routed_scaling_factor);
    o.threshold = threshold;
    dispatch!(dtype_of(logits)?, route(py, logits, l, experts, weights, bias, o)).map(Some)
}

fn route<T: Element + NpElement>(
    py: Python<'_>,
    logits: &Bound<'_, PyUntypedArray>,
    l: smax::Layout,
    experts: &Bound<'_, PyUntypedArray>,
    weights: &Bound<'_, PyUntypedArray>,
    bias: Option<&Bound<'_, PyUntypedArray>>,
    o: GateOptions,
) -> PyResult<Stats> {
    let xr = read::<T>(logits)?;
    let xs = slice(&xr, extent(&l)?);
    let (ne, nw) = (experts.len(), weights.len());
    sized(experts, "experts", ne)?;
    sized(weights, "weights", nw)?;
    let br = match bias {
        Some(b) => {
            sized(b, "bias", b.len())?;
            Some((read::<f32>(b)?, b.len()))
        }
        None => None,
    };
    let bs = br.as_ref().map(|(b, n)| slice(b, *n));
    let mut ew = write::<u32>(experts)?;
    let es = slice_mut(&mut ew, ne);
    let mut ww = write::<f32>(weights)?;
    let ws = slice_mut(&mut ww, nw);
    let s = run(py, move |par| smax::gate::gate(View::new(xs, l)?, bs, es, ws, &o.par(par))).map_err(err)?;
    Ok((s.tokens_per_expert, s.mean_prob, s.aux_loss))
}

/// A quantizer from its Python description: `kind` and the parameters it reads.
#[derive(FromPyObject)]
struct Spec {
    kind: String,
    bits: u32,
    delta: f64,
    min: f64,
    max: f64,
    eta: f64,
    y_min: f64,
    y_max: f64,
    zero_mode: String,
    exponent: String,
    levels: String,
}

fn exponent(s: &str) -> PyResult<SulqExponent> {
    match s {
        "rounded" => Ok(SulqExponent::Rounded),
        "exact" => Ok(SulqExponent::Exact),
        o => Err(PyValueError::new_err(format!("exponent must be 'rounded' or 'exact', not {o:?}"))),
    }
}

fn levels(s: &str) -> PyResult<SulqLevels> {
    match s {
        "bits" => Ok(SulqLevels::Bits),
        "released" => Ok(SulqLevels::ReleasedCode),
        o => Err(PyValueError::new_err(format!("levels must be 'bits' or 'released', not {o:?}"))),
    }
}

impl Spec {
    fn quantizer(&self) -> PyResult<Quantizer> {
        let bits = self.bits;
        Ok(match self.kind.as_str() {
            "uniform" => Quantizer::Uniform { bits, min: self.min, max: self.max },
            "fixed_point" => Quantizer::FixedPoint { bits },
            "log2" => Quantizer::Log2 {
                bits,
                delta: self.delta,
                zero_mode: match self.zero_mode.as_str() {
                    "zero" => ZeroMode::Zero,
                    "clamp" => ZeroMode::ClampToMin,
                    o => return Err(PyValueError::new_err(format!("zero_mode must be 'zero' or 'clamp', not {o:?}"))),
                },
            },
            "log_sqrt2" => Quantizer::LogSqrt2 { bits, delta: self.delta },
            "sulq" => Quantizer::Sulq {
                bits,
                eta: self.eta,
                y_min: self.y_min,
                y_max: self.y_max,
                exponent: exponent(&self.exponent)?,
                levels: levels(&self.levels)?,
            },
            o => {
                return Err(PyValueError::new_err(format!(
                    "kind must be 'uniform', 'fixed_point', 'log2', 'log_sqrt2' or 'sulq', not {o:?}"
                )));
            }
        })
    }
}

/// `(mse, max_abs_err, clamped, saturated)`.
type QuantStats = (f64, f64, usize, usize);

/// Quantizes the float32 `x` into `codes` (uint16), the zero flags `zero` (bool) and the
/// reconstruction `recon` (float32), all of `x`'s length and C-contiguous.
#[pyfunction]
fn quantize(
    py: Python<'_>,
    x: &Bound<'_, PyUntypedArray>,
    spec: Spec,
    codes: &Bound<'_, PyUntypedArray>,
    zero: &Bound<'_, PyUntypedArray>,
    recon: &Bound<'_, PyUntypedArray>,
) -> PyResult<QuantStats> {
    let q = spec.quantizer()?;
    let n = x.len();
    for (a, what) in [(x, "x"), (codes, "codes"), (zero, "zero"), (recon, "recon")] {
        sized(a, what, n)?;
    }
    let xr = read::<f32>(x)?;
    let xs = slice(&xr, n);
    let (mut cw, mut zw, mut rw) = (write::<u16>(codes)?, write::<bool>(zero)?, write::<f32>(recon)?);
    let (cs, zs, rs) = (slice_mut(&mut cw, n), slice_mut(&mut zw, n), slice_mut(&mut rw, n));
    let r = run(py, move |_| smax::quant::quantize(xs, &q, cs, Some(zs), Some(rs))).map_err(err)?;
    Ok((r.mse, r.max_abs_err, r.clamped, r.saturated))
}

/// Reconstructs `out` (float32) from `codes` (uint16) and the zero flags `zero` (bool, or
/// `None`).
#[pyfunction]
#[pyo3(signature = (codes, spec, out, zero=None))]
fn dequantize(
    py: Python<'_>,
    codes: &Bound<'_, PyUntypedArray>,
    spec: Spec,
    out: &Bound<'_, PyUntypedArray>,
    zero: Option<&Bound<'_, PyUntypedArray>>,
) -> PyResult<()> {
    let q = spec.quantizer()?;
    let n = codes.len();
    sized(codes, "codes", n)?;
    sized(out, "out", n)?;
    let cr = read::<u16>(codes)?;
    let cs = slice(&cr, n);
    let zr = match zero {
        Some(z) => {
            sized(z, "zero", n)?;
            Some(read::<bool>(z)?)
        }
        None => None,
    };
    let zs = zr.as_ref().map(|z| slice(z, n));
    let mut ow = write::<f32>(out)?;
    let os = slice_mut(&mut ow, n);
    run(py, move |_| smax::quant::dequantize(cs, zs, &q, os)).map_err(err)
}

/// Calibrates a quantizer on the float32 `calib` values: `"log_sqrt2"` (RepQ-ViT's Δ search)
/// or `"sulq"` (I&S-ViT's η search). Returns `(delta, eta, y_min, y_max)` (the fields the
/// kind does not use are 0).
#[pyfunction]
#[pyo3(signature = (calib, kind, bits, exponent="rounded", levels="bits"))]
fn calibrate_quantizer(
    py: Python<'_>,
    calib: &Bound<'_, PyUntypedArray>,
    kind: &str,
    bits: u32,
    exponent: &str,
    levels: &str,
) -> PyResult<(f64, f64, f64, f64)> {
    let n = calib.len();
    sized(calib, "calib", n)?;
    let cr = read::<f32>(calib)?;
    let cs = slice(&cr, n);
    let q = match kind {
        "log_sqrt2" => run(py, move |_| smax::quant::calibrate_log_sqrt2(cs, bits)),
        "sulq" => {
            let (e, l) = (self::exponent(exponent)?, self::levels(levels)?);
            run(py, move |_| smax::quant::calibrate_sulq(cs, bits, e, l))
        }
        o => return Err(PyValueError::new_err(format!("kind must be 'log_sqrt2' or 'sulq', not {o:?}"))),
    }
    .map_err(err)?;
    Ok(match q {
        Quantizer::LogSqrt2 { delta, .. } => (delta, 0.0, 0.0, 0.0),
        Quantizer::Sulq { eta, y_min, y_max, .. } => (0.0, eta, y_min, y_max),
        _ => (0.0, 0.0, 0.0, 0.0),
    })
}
