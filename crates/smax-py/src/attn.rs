//! Flash attention forward and backward over `[batch, heads, tokens, head_dim]` arrays in any
//! strides whose `head_dim` axis is contiguous (`bhsd`, `bshd` and slices of a fused QKV).

use numpy::{Element as NpElement, PyUntypedArray, PyUntypedArrayMethods};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use smax::attention::{
    AttentionGrads, AttentionInputs, AttentionOptions, AttentionOutputs, AttnElement, HeadStrides, Heads, KeepMask,
    QueryPositions, ScoreBias, ScoreStrides, Window,
};

use crate::arrays::{Dtype, dtype_of, element_strides, read, slice, slice_mut, write};
use crate::{err, run};

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(attention, m)?)?;
    m.add_function(wrap_pyfunction!(attention_backward, m)?)?;
    Ok(())
}

/// Shape, element strides and extent of a 4-D operand given in `[b, h, s, d]` axis order
/// (the caller transposes `bshd` views to that order, which changes strides, not memory).
struct Operand {
    shape: [usize; 4],
    strides: [usize; 4],
    extent: usize,
}

fn operand(a: &Bound<'_, PyUntypedArray>, what: &str, unit_last: bool) -> PyResult<Operand> {
    if a.ndim() != 4 {
        return Err(PyValueError::new_err(format!("{what} must be 4-D [batch, heads, tokens, head_dim]")));
    }
    let st = element_strides(a)
        .ok_or_else(|| PyValueError::new_err(format!("{what} has a negative or unaligned stride; pass a copy")))?;
    let mut shape = [0usize; 4];
    let mut strides = [0usize; 4];
    let mut extent = 1usize;
    for i in 0..4 {
        shape[i] = a.shape()[i];
        strides[i] = st[i];
        if shape[i] == 0 {
            extent = 0;
        }
    }
    if extent > 0 {
        extent = (0..4)
            .try_fold(1usize, |e, i| (shape[i] - 1).checked_mul(strides[i]).and_then(|x| e.checked_add(x)))
            .ok_or_else(|| PyValueError::new_err(format!("{what} addresses more elements than fit in usize")))?;
    }
    if unit_last && shape[3] > 1 && strides[3] != 1 {
        return Err(PyValueError::new_err(format!("{what}: the last axis must be contiguous")));
    }
    Ok(Operand { shape, strides, extent })
}

fn head_strides(o: &Operand) -> HeadStrides {
    HeadStrides { batch: o.strides[0], head: o.strides[1], token: o.strides[2] }
}

fn score_strides(o: &Operand, what: &str) -> PyResult<ScoreStrides> {
    if o.shape[3] > 1 && o.strides[3] != 1 {
        return Err(PyValueError::new_err(format!("{what}: the key axis must be contiguous")));
    }
    Ok(ScoreStrides { batch: o.strides[0], head: o.strides[1], query: o.strides[2] })
}

/// Options every attention call shares, as the Python side passes them.
#[derive(Clone, Copy)]
struct Opts {
    causal: bool,
    scale: Option<f32>,
    window: Option<(usize, usize)>,
    softcap: Option<f32>,
    temperature: f64,
    /// Query `i` sits at key position `i + offset`; `None`: bottom-right (the last query sees
    /// the last key).
    offset: Option<i64>,
}

type Extras<'a> = (Option<&'a Bound<'a, PyUntypedArray>>, Option<&'a Bound<'a, PyUntypedArray>>);

/// Flash attention: `out [b, hq, sq, d]` (C-contiguous) and, when given, `lse [b, hq, sq]`
/// (float32). `q`, `k`, `v` are `[b, h, s, d]`-ordered views in any strides with a contiguous
/// last axis; `bias` (float32) and `mask` (bool, `True` = attend) are `[b, hq, sq, skv]`-ordered,
/// broadcast axes with stride 0.
#[pyfunction]
#[pyo3(signature = (q, k, v, out, lse, causal, scale, window, softcap, temperature, offset=None, bias=None, mask=None))]
#[allow(clippy::too_many_arguments)]
fn attention(
    py: Python<'_>,
    q: &Bound<'_, PyUntypedArray>,
    k: &Bound<'_, PyUntypedArray>,
    v: &Bound<'_, PyUntypedArray>,
    out: &Bound<'_, PyUntypedArray>,
    lse: Option<&Bound<'_, PyUntypedArray>>,
    causal: bool,
    scale: Option<f32>,
    window: Option<(usize, usize)>,
    softcap: Option<f32>,
    temperature: f64,
    offset: Option<i64>,
    bias: Option<&Bound<'_, PyUntypedArray>>,
    mask: Option<&Bound<'_, PyUntypedArray>>,
) -> PyResult<()> {
    let o = Opts { causal, scale, window, softcap, temperature, offset };
    match dtype_of(q)? {
        Dtype::F32 => fwd::<f32>(py, [q, k, v, out], lse, o, (bias, mask)),
        Dtype::F16 => fwd::<smax::f16>(py, [q, k, v, out], lse, o, (bias, mask)),
        Dtype::Bf16 => fwd::<smax::bf16>(py, [q, k, v, out], lse, o, (bias, mask)),
        Dtype::F64 => Err(PyTypeError::new_err("attention takes float32, float16 or bfloat16")),
    }
}

/// The operands read and the options built, handed to one closure.
fn with_options<R>(
    o: Opts,
    (bias, mask): Extras<'_>,
    f: impl FnOnce(AttentionOptions<'_>) -> PyResult<R>,
) -> PyResult<R> {
    let bo = bias.map(|b| operand(b, "bias", false)).transpose()?;
    let mo = mask.map(|m| operand(m, "mask", false)).transpose()?;
    let br = bias.map(read::<f32>).transpose()?;
    let mr = mask.map(read::<bool>).transpose()?;
    let mut opts = AttentionOptions::default().causal(o.causal).temperature(o.temperature);
    opts.scale = o.scale;
    opts.softcap = o.softcap;
    opts.window = o.window.map(|(left, right)| Window { left, right });
    if let Some(off) = o.offset {
        opts.positions = QueryPositions::Offset(off);
    }
    if let (Some(b), Some(bo)) = (br.as_ref(), bo.as_ref()) {
        opts.bias = Some(ScoreBias { data: slice(b, bo.extent), strides: score_strides(bo, "bias")? });
    }
    if let (Some(m), Some(mo)) = (mr.as_ref(), mo.as_ref()) {
        opts.keep = Some(KeepMask { data: slice(m, mo.extent), strides: score_strides(mo, "mask")? });
    }
    f(opts)
}

fn shape_of(q: &Operand, k: &Operand) -> PyResult<smax::attention::AttentionShape> {
    if q.shape[0] != k.shape[0] || q.shape[3] != k.shape[3] {
        return Err(PyValueError::new_err(format!(
            "q {:?} and k {:?} disagree on batch or head_dim",
            q.shape, k.shape
        )));
    }
    Ok(smax::attention::AttentionShape {
        batch: q.shape[0],
        q_heads: q.shape[1],
        kv_heads: k.shape[1],
        q_len: q.shape[2],
        kv_len: k.shape[2],
        head_dim: q.shape[3],
    })
}

/// The three operands' geometry and the call's shape.
struct Operands {
    ops: [Operand; 3],
    shape: smax::attention::AttentionShape,
}

impl Operands {
    fn of([q, k, v]: [&Bound<'_, PyUntypedArray>; 3]) -> PyResult<Self> {
        let ops = [operand(q, "q", true)?, operand(k, "k", true)?, operand(v, "v", true)?];
        if ops[1].shape != ops[2].shape {
            return Err(PyValueError::new_err(format!(
                "k {:?} and v {:?} differ in shape",
                ops[1].shape, ops[2].shape
            )));
        }
        let shape = shape_of(&ops[0], &ops[1])?;
        Ok(Operands { ops, shape })
    }

    /// The inputs of a call over the arrays read as `reads` (q, k, v).
    fn inputs<'a, T: NpElement>(&self, reads: [&'a numpy::PyReadonlyArrayDyn<'_, T>; 3]) -> AttentionInputs<'a, T> {
        let h = |i: usize| Heads::strided(slice(reads[i], self.ops[i].extent), head_strides(&self.ops[i]));
        AttentionInputs::new(self.shape, h(0), h(1), h(2))
    }
}

fn check_contiguous(a: &Bound<'_, PyUntypedArray>, what: &str, n: usize) -> PyResult<()> {
    if !a.is_c_contiguous() || a.len() != n {
        return Err(PyValueError::new_err(format!("{what} must be C-contiguous with {n} elements")));
    }
    Ok(())
}

fn fwd<T: AttnElement + NpElement>(
    py: Python<'_>,
    [q, k, v, out]: [&Bound<'_, PyUntypedArray>; 4],
    lse: Option<&Bound<'_, PyUntypedArray>>,
    o: Opts,
    extras: Extras<'_>,
) -> PyResult<()> {
    let ops = Operands::of([q, k, v])?;
    let shape = ops.shape;
    check_contiguous(out, "out", shape.out_len())?;
    if let Some(l) = lse {
        check_contiguous(l, "lse", shape.lse_len())?;
    }
    let (qr, kr, vr) = (read::<T>(q)?, read::<T>(k)?, read::<T>(v)?);
    let inputs = ops.inputs([&qr, &kr, &vr]);
    let mut ow = write::<T>(out)?;
    let os = slice_mut(&mut ow, shape.out_len());
    let mut lw = lse.map(write::<f32>).transpose()?;
    let ls = lw.as_mut().map(|l| slice_mut(l, shape.lse_len()));
    with_options(o, extras, move |opts| {
        run(py, move |par| smax::attention::attention(inputs, AttentionOutputs::new(os, ls), &opts.par(par)))
            .map_err(err)
    })
}

/// The gradients of [`attention`]: `dq` (`q`'s `[b, hq, sq, d]`, C-contiguous), `dk`, `dv`
/// (`[b, hkv, skv, d]`, C-contiguous) from the forward's `out`, `lse` and `d_out` (C-contiguous
/// `[b, hq, sq, d]`). Same options as the forward.
#[pyfunction]
#[pyo3(signature = (q, k, v, out, lse, d_out, dq, dk, dv, causal, scale, window, softcap, temperature, offset=None, bias=None, mask=None))]
#[allow(clippy::too_many_arguments)]
fn attention_backward(
    py: Python<'_>,
    q: &Bound<'_, PyUntypedArray>,
    k: &Bound<'_, PyUntypedArray>,
    v: &Bound<'_, PyUntypedArray>,
    out: &Bound<'_, PyUntypedArray>,
    lse: &Bound<'_, PyUntypedArray>,
    d_out: &Bound<'_, PyUntypedArray>,
    dq: &Bound<'_, PyUntypedArray>,
    dk: &Bound<'_, PyUntypedArray>,
    dv: &Bound<'_, PyUntypedArray>,
    causal: bool,
    scale: Option<f32>,
    window: Option<(usize, usize)>,
    softcap: Option<f32>,
    temperature: f64,
    offset: Option<i64>,
    bias: Option<&Bound<'_, PyUntypedArray>>,
    mask: Option<&Bound<'_, PyUntypedArray>>,
) -> PyResult<()> {
    let o = Opts { causal, scale, window, softcap, temperature, offset };
    let arrays = [q, k, v, out, lse, d_out, dq, dk, dv];
    match dtype_of(q)? {
        Dtype::F32 => bwd::<f32>(py, arrays, o, (bias, mask)),
        Dtype::F16 => bwd::<smax::f16>(py, arrays, o, (bias, mask)),
        Dtype::Bf16 => bwd::<smax::bf16>(py, arrays, o, (bias, mask)),
        Dtype::F64 => Err(PyTypeError::new_err("attention takes float32, float16 or bfloat16")),
    }
}

fn bwd<T: AttnElement + NpElement>(
    py: Python<'_>,
    [q, k, v, out, lse, d_out, dq, dk, dv]: [&Bound<'_, PyUntypedArray>; 9],
    o: Opts,
    extras: Extras<'_>,
) -> PyResult<()> {
    let ops = Operands::of([q, k, v])?;
    let shape = ops.shape;
    let (n_out, n_lse, n_kv) = (shape.out_len(), shape.lse_len(), shape.kv_len_elems());
    for (a, what, n) in [(out, "out", n_out), (d_out, "d_out", n_out), (dq, "dq", n_out), (lse, "lse", n_lse)] {
        check_contiguous(a, what, n)?;
    }
    check_contiguous(dk, "dk", n_kv)?;
    check_contiguous(dv, "dv", n_kv)?;
    let (qr, kr, vr) = (read::<T>(q)?, read::<T>(k)?, read::<T>(v)?);
    let inputs = ops.inputs([&qr, &kr, &vr]);
    let (or, lr, dor) = (read::<T>(out)?, read::<f32>(lse)?, read::<T>(d_out)?);
    let (os, ls, dos) = (slice(&or, n_out), slice(&lr, n_lse), slice(&dor, n_out));
    let (mut qw, mut kw, mut vw) = (write::<T>(dq)?, write::<T>(dk)?, write::<T>(dv)?);
    let grads = AttentionGrads::new(slice_mut(&mut qw, n_out), slice_mut(&mut kw, n_kv), slice_mut(&mut vw, n_kv));
    with_options(o, extras, move |opts| {
        run(py, move |par| smax::attention::attention_backward(inputs, os, ls, dos, grads, &opts.par(par))).map_err(err)
    })
}
