//! smax's kernels as [candle](https://github.com/huggingface/candle) ops, with backward passes.
//!
//! `candle_nn::ops::softmax` is a composition of five tensor ops, and its fast path
//! `softmax_last_dim` records no backward (its gradient is silently dropped);
//! `candle_nn::loss::cross_entropy` materialises the log-softmax and has no `ignore_index`,
//! class weights or label smoothing; candle-nn's CPU flash attention has no backward. This
//! crate swaps one call for each:
//!
//! | candle | smax-candle |
//! |---|---|
//! | `candle_nn::ops::softmax(&x, D::Minus1)?` | [`softmax`]`(&x, D::Minus1)?` |
//! | `candle_nn::ops::log_softmax(&x, 1)?` | [`log_softmax`]`(&x, 1)?` |
//! | `x.log_sum_exp(1)?` | [`logsumexp`]`(&x, 1)?` |
//! | `candle_nn::loss::cross_entropy(&logits, &y)?` | [`cross_entropy`]`(&logits, &y, &CrossEntropyOptions::default())?` |
//! | `cross_entropy(&h.matmul(&w.t()?)?, &y)?` | [`linear_cross_entropy`]`(&h, &w, &y, &LinearCrossEntropyOptions::default())?` (never forms the logits) |
//! | — | [`stablemax_cross_entropy`]`(&logits, &y, &LossOptions::default())?` |
//! | `candle_nn::attention::cpu_flash::flash_attn` (no backward) | [`flash_attn`]`(&q, &k, &v, &AttentionOptions::default().causal(true))?` |
//! | `candle_transformers::generation::LogitsProcessor` | [`LogitsProcessor`] (same constructor, `Sampling` and `sample`; exact filters, batched, per-row seeds) |
//!
//! Each op is a candle `CustomOp` whose CPU forward runs smax on the tensor's storage (any
//! dimension, through smax's axis layouts: no transpose; a tensor that is not contiguous is
//! gathered once) and whose backward runs smax's backward kernel, so gradients reach upstream
//! variables. f32, f64, f16 and bf16 (attention: f32, f16, bf16; the linear cross-entropy
//! computes in f32). The numerics are smax's: each row shifted by its maximum,
//! documented results for NaN, `±inf` and fully masked rows, an error bound of a few ULP of the
//! compute type (f32 for f32/f16/bf16, f64 for f64), and bits that do not depend on the thread
//! count. Tensors on other devices use candle-nn's compositions (which have a backward).
//!
//! Gradients are first order: the backward ops themselves record no backward.

use std::borrow::Cow;

use candle_core::backend::BackendStorage;
use candle_core::shape::Dim;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout as CLayout, Result, Shape, Tensor};
use smax::{Element, Layout, Options, View, ViewMut};

mod attention;
mod loss;
mod sampling;

pub use attention::{attention_composed, flash_attn};
pub use loss::{cross_entropy, linear_cross_entropy, stablemax_cross_entropy};
pub use sampling::{LogitsProcessor, Sampling};

/// A smax error as a candle error (its message kept).
fn smax_err(e: smax::Error) -> candle_core::Error {
    candle_core::Error::wrap(e)
}

/// The elements of a CPU tensor in row-major order: borrowed when its layout is contiguous,
/// gathered once otherwise.
fn elements<'a, T: Copy>(v: &'a [T], l: &CLayout) -> Cow<'a, [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Cow::Borrowed(&v[a..b]),
        None => Cow::Owned(candle_core::cpu_backend::unary_map(v, l, |x| x)),
    }
}

/// Runs `$f::<T>(slice, $args)` for the float storage `$s`, rewrapping a `Vec<T>` result;
/// other dtypes are an error naming the op.
macro_rules! per_float {
    ($s:expr, $name:expr, |$v:ident| $body:expr) => {
        match $s {
            CpuStorage::F32($v) => CpuStorage::F32($body),
            CpuStorage::F64($v) => CpuStorage::F64($body),
            CpuStorage::F16($v) => CpuStorage::F16($body),
            CpuStorage::BF16($v) => CpuStorage::BF16($body),
            other => return Err(candle_core::Error::UnsupportedDTypeForOp(other.dtype(), $name)),
        }
    };
}

/// Softmax or log-softmax.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Norm {
    Softmax,
    LogSoftmax,
}

/// The forward op: `y = softmax(x/τ)` or `log_softmax(x/τ)` over `dim`.
struct Normalize {
    norm: Norm,
    dim: usize,
    opts: Options,
}

fn normalize_rows<T: Element>(x: &[T], l: Layout, norm: Norm, opts: &Options) -> Result<Vec<T>> {
    let mut y = vec![T::default(); x.len()];
    let (xv, yv) = (View::new(x, l).map_err(smax_err)?, ViewMut::new(&mut y, l).map_err(smax_err)?);
    match norm {
        Norm::Softmax => smax::softmax(xv, yv, opts),
        Norm::LogSoftmax => smax::log_softmax(xv, yv, opts),
    }
    .map_err(smax_err)?;
    Ok(y)
}

impl CustomOp1 for Normalize {
    fn name(&self) -> &'static str {
        match self.norm {
            Norm::Softmax => "smax-softmax",
            Norm::LogSoftmax => "smax-log-softmax",
        }
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &CLayout) -> Result<(CpuStorage, Shape)> {
        let lay = Layout::for_axis(l.dims(), self.dim).map_err(smax_err)?;
        let out = per_float!(s, self.name(), |v| normalize_rows(&elements(v, l), lay, self.norm, &self.opts)?);
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        let b = NormalizeBwd { norm: self.norm, dim: self.dim, opts: self.opts };
        Ok(Some(y.apply_op2_no_bwd(dy, &b)?))
    }
}

/// The backward op: `dx` from the forward output `y` and `dy`.
struct NormalizeBwd {
    norm: Norm,
    dim: usize,
    opts: Options,
}

fn backward_rows<T: Element>(y: &[T], dy: &[T], l: Layout, norm: Norm, opts: &Options) -> Result<Vec<T>> {
    let mut dx = vec![T::default(); y.len()];
    let (yv, dv) = (View::new(y, l).map_err(smax_err)?, View::new(dy, l).map_err(smax_err)?);
    let xv = ViewMut::new(&mut dx, l).map_err(smax_err)?;
    match norm {
        Norm::Softmax => smax::softmax_backward(yv, dv, xv, opts),
        Norm::LogSoftmax => smax::log_softmax_backward(yv, dv, xv, opts),
    }
    .map_err(smax_err)?;
    Ok(dx)
}

impl CustomOp2 for NormalizeBwd {
    fn name(&self) -> &'static str {
        "smax-softmax-backward"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &CLayout, s2: &CpuStorage, l2: &CLayout) -> Result<(CpuStorage, Shape)> {
        let lay = Layout::for_axis(l1.dims(), self.dim).map_err(smax_err)?;
        let out = match (s1, s2) {
            (CpuStorage::F32(y), CpuStorage::F32(d)) => {
                CpuStorage::F32(backward_rows(&elements(y, l1), &elements(d, l2), lay, self.norm, &self.opts)?)
            }
            (CpuStorage::F64(y), CpuStorage::F64(d)) => {
                CpuStorage::F64(backward_rows(&elements(y, l1), &elements(d, l2), lay, self.norm, &self.opts)?)
            }
            (CpuStorage::F16(y), CpuStorage::F16(d)) => {
                CpuStorage::F16(backward_rows(&elements(y, l1), &elements(d, l2), lay, self.norm, &self.opts)?)
            }
            (CpuStorage::BF16(y), CpuStorage::BF16(d)) => {
                CpuStorage::BF16(backward_rows(&elements(y, l1), &elements(d, l2), lay, self.norm, &self.opts)?)
            }
            (a, b) => {
                return Err(candle_core::Error::DTypeMismatchBinaryOp {
                    lhs: a.dtype(),
                    rhs: b.dtype(),
                    op: self.name(),
                });
            }
        };
        Ok((out, l1.shape().clone()))
    }
}

fn normalize<D: Dim>(x: &Tensor, dim: D, norm: Norm, opts: &Options) -> Result<Tensor> {
    let dim = dim.to_index(x.shape(), "smax softmax")?;
    if !x.device().is_cpu() {
        if opts.masked_row != smax::MaskedRow::Nan {
            return Err(candle_core::Error::Msg(
                "smax softmax off the CPU runs candle-nn's, whose fully masked rows are NaN".into(),
            ));
        }
        let xs = if opts.temperature == 1.0 { x.clone() } else { (x / opts.temperature)? };
        return match norm {
            Norm::Softmax => candle_nn::ops::softmax(&xs, dim),
            Norm::LogSoftmax => candle_nn::ops::log_softmax(&xs, dim),
        };
    }
    x.apply_op1(Normalize { norm, dim, opts: *opts })
}

/// `softmax(x)` over `dim` (any dimension; `D::Minus1` for the last), with backward.
///
/// Algorithm: smax's row engine (max, exponentials and sum in one or two passes; an axis that
/// is not the last is vectorised across the trailing dimensions). Error: a few ULP of f32
/// (f64 for f64 tensors); `-inf` entries give exactly 0; a row of `-inf` gives NaN, like
/// PyTorch (see [`softmax_with`] for zeros). Errors: a dtype other than f32/f64/f16/bf16.
pub fn softmax<D: Dim>(x: &Tensor, dim: D) -> Result<Tensor> {
    normalize(x, dim, Norm::Softmax, &Options::default())
}

/// [`softmax`] with smax's [`Options`]: a temperature (`softmax(x/τ)`, applied after the max
/// shift so no τ overflows), the result for fully masked rows, the algorithm and threads.
pub fn softmax_with<D: Dim>(x: &Tensor, dim: D, opts: &Options) -> Result<Tensor> {
    normalize(x, dim, Norm::Softmax, opts)
}

/// `log_softmax(x)` over `dim`, with backward. `-inf` entries stay `-inf`; error a few ULP of
/// the result's magnitude (absolute near 0).
pub fn log_softmax<D: Dim>(x: &Tensor, dim: D) -> Result<Tensor> {
    normalize(x, dim, Norm::LogSoftmax, &Options::default())
}

/// [`log_softmax`] with smax's [`Options`].
pub fn log_softmax_with<D: Dim>(x: &Tensor, dim: D, opts: &Options) -> Result<Tensor> {
    normalize(x, dim, Norm::LogSoftmax, opts)
}

/// The log-sum-exp op over `dim` (the dimension removed).
struct LogSumExp {
    dim: usize,
    opts: Options,
}

fn lse_rows<T: Element>(x: &[T], l: Layout, opts: &Options) -> Result<Vec<T>> {
    smax::logsumexp_to_vec(View::new(x, l).map_err(smax_err)?, opts).map_err(smax_err)
}

impl CustomOp1 for LogSumExp {
    fn name(&self) -> &'static str {
        "smax-logsumexp"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &CLayout) -> Result<(CpuStorage, Shape)> {
        let lay = Layout::for_axis(l.dims(), self.dim).map_err(smax_err)?;
        let out = per_float!(s, self.name(), |v| lse_rows(&elements(v, l), lay, &self.opts)?);
        let mut dims = l.dims().to_vec();
        dims.remove(self.dim);
        Ok((out, Shape::from(dims)))
    }

    fn bwd(&self, x: &Tensor, _lse: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        // ∂lse/∂x = softmax(x/τ)/τ.
        let p = x.apply_op1_no_bwd(&Normalize { norm: Norm::Softmax, dim: self.dim, opts: self.opts })?;
        let dx = p.broadcast_mul(&g.unsqueeze(self.dim)?)?;
        Ok(Some(if self.opts.temperature == 1.0 { dx } else { (dx / self.opts.temperature)? }))
    }
}

/// `log Σ exp(x)` over `dim` (removed from the shape), with backward (`softmax(x)` times the
/// upstream gradient). An empty or all-`-inf` row gives `-inf`, `+inf` gives `+inf`, NaN gives
/// NaN. Error: `3u·|ℓ| + (80 + 4 ln n)·u` with `u` the compute type's unit roundoff.
pub fn logsumexp<D: Dim>(x: &Tensor, dim: D) -> Result<Tensor> {
    logsumexp_with(x, dim, &Options::default())
}

/// [`logsumexp`] with smax's [`Options`] (`log Σ exp(x/τ)` with a temperature τ).
pub fn logsumexp_with<D: Dim>(x: &Tensor, dim: D, opts: &Options) -> Result<Tensor> {
    let dim = dim.to_index(x.shape(), "smax logsumexp")?;
    if !x.device().is_cpu() {
        let xs = if opts.temperature == 1.0 { x.clone() } else { (x / opts.temperature)? };
        return xs.log_sum_exp(dim);
    }
    x.apply_op1(LogSumExp { dim, opts: *opts })
}

/// The element types this crate computes in.
pub fn supports(dtype: DType) -> bool {
    matches!(dtype, DType::F32 | DType::F64 | DType::F16 | DType::BF16)
}
