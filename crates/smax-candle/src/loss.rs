//! The fused losses: softmax and StableMax cross-entropy over given logits, and the linear
//! cross-entropy that never forms them. Each computes its gradient in the forward pass (when an
//! input is tracked) and keeps it for the backward, which only scales it.

use std::borrow::Cow;
use std::sync::Mutex;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Device, Layout as CLayout, Result, Shape, Tensor};
use smax::loss::{
    CrossEntropyOptions, LinearCrossEntropyOptions, LinearGrads, LinearInputs, LinearShape, LossOptions, Reduction,
    RowOutputs, Targets,
};
use smax::{Element, Layout, View, ViewMut};

use crate::{elements, smax_err};

/// Class indices as i64, from u8, u32 or i64 storage; `None` for float storage.
fn class_targets<'a>(s: &'a CpuStorage, l: &CLayout) -> Option<Cow<'a, [i64]>> {
    match s {
        CpuStorage::I64(c) => Some(elements(c, l)),
        CpuStorage::U32(c) => Some(Cow::Owned(elements(c, l).iter().map(|&v| v as i64).collect())),
        CpuStorage::U8(c) => Some(Cow::Owned(elements(c, l).iter().map(|&v| v as i64).collect())),
        _ => None,
    }
}

/// The forward pass's gradient times the upstream gradient `g` (per row when `per_row`); a
/// scalar `g` of exactly 1 (a loss that is the graph's root) returns the gradient unscaled.
fn scaled(grad: Tensor, g: &Tensor, per_row: bool) -> Result<Tensor> {
    if per_row {
        return grad.broadcast_mul(&g.to_dtype(grad.dtype())?.unsqueeze(1)?);
    }
    if g.to_dtype(DType::F64)?.to_scalar::<f64>()? == 1.0 {
        return Ok(grad);
    }
    grad.broadcast_mul(&g.to_dtype(grad.dtype())?)
}

fn take(slot: &Mutex<Option<Tensor>>, what: &str) -> Result<Tensor> {
    slot.lock().unwrap_or_else(|p| p.into_inner()).clone().ok_or_else(|| {
        candle_core::Error::Msg(format!("smax {what}: the forward computed no gradient (no input was tracked)"))
    })
}

fn store<T: candle_core::WithDType>(slot: &Mutex<Option<Tensor>>, grad: Option<Vec<T>>, dims: &[usize]) -> Result<()> {
    if let Some(g) = grad {
        *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(Tensor::from_vec(g, dims, &Device::Cpu)?);
    }
    Ok(())
}

/// Which fused loss over given logits.
enum Kind {
    Softmax { opts: CrossEntropyOptions<'static>, weights: Option<Vec<f32>> },
    Stablemax(LossOptions),
}

impl Kind {
    fn reduction(&self) -> Reduction {
        match self {
            Kind::Softmax { opts, .. } => opts.reduction,
            Kind::Stablemax(o) => o.reduction,
        }
    }
}

/// A fused loss op: `(logits, targets) → loss`, the gradient computed in the same pass.
struct Fused {
    kind: Kind,
    want_grad: bool,
    grad: Mutex<Option<Tensor>>,
}

/// Targets as read from their storage.
#[derive(Clone, Copy)]
enum Tgt<'a, T> {
    Classes(&'a [i64]),
    Probs(&'a [T]),
}

impl Fused {
    fn name(&self) -> &'static str {
        match self.kind {
            Kind::Softmax { .. } => "smax-cross-entropy",
            Kind::Stablemax(_) => "smax-stablemax-cross-entropy",
        }
    }

    /// The loss (one value, or one per row for `Reduction::None`) and the gradient.
    fn run<T: Element>(&self, x: &[T], l: Layout, t: Tgt<'_, T>) -> Result<(Vec<f64>, Option<Vec<T>>)> {
        let rows = l.row_count();
        let none = self.kind.reduction() == Reduction::None;
        let mut grad = self.want_grad.then(|| vec![T::default(); x.len()]);
        let g = grad.as_deref_mut().map(|g| ViewMut::new(g, l)).transpose().map_err(smax_err)?;
        let xv = View::new(x, l).map_err(smax_err)?;
        let mut per_row = if none { vec![0.0f64; rows] } else { Vec::new() };
        let loss = match &self.kind {
            Kind::Softmax { opts, weights } => {
                let mut o = *opts;
                o.class_weights = weights.as_deref();
                let targets = match t {
                    Tgt::Classes(c) => Targets::Classes(c),
                    Tgt::Probs(q) => Targets::Probs(View::new(q, l).map_err(smax_err)?),
                };
                let mut z_row = if none { vec![0.0f64; rows] } else { Vec::new() };
                let rows_out = if none {
                    RowOutputs { loss: Some(&mut per_row), z_loss: Some(&mut z_row), lse: None }
                } else {
                    RowOutputs::default()
                };
                let r = smax::loss::cross_entropy(xv, targets, g, rows_out, &o).map_err(smax_err)?;
                if none { per_row.iter().zip(&z_row).map(|(a, b)| a + b).collect() } else { vec![r.loss + r.z_loss] }
            }
            Kind::Stablemax(o) => {
                let Tgt::Classes(c) = t else {
                    return Err(candle_core::Error::Msg(
                        "smax stablemax_cross_entropy: targets must be class indices (u8, u32, i64)".into(),
                    ));
                };
                let rows_out = none.then_some(&mut per_row[..]);
                let r = smax::loss::stablemax_cross_entropy(xv, c, g, rows_out, o).map_err(smax_err)?;
                if none { per_row } else { vec![r.loss] }
            }
        };
        Ok((loss, grad))
    }
}

/// The loss values in the logits' element type.
fn cast_loss<T: Element>(v: &[f64]) -> Vec<T> {
    v.iter().map(|&x| T::from_f64(x)).collect()
}

impl CustomOp2 for Fused {
    fn name(&self) -> &'static str {
        Fused::name(self)
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &CLayout, s2: &CpuStorage, l2: &CLayout) -> Result<(CpuStorage, Shape)> {
        let dims = l1.dims();
        let lay = Layout::rows(dims[0], dims[1]);
        let classes = class_targets(s2, l2);
        let none = self.kind.reduction() == Reduction::None;
        let shape = if none { Shape::from(dims[0]) } else { Shape::from(()) };
        macro_rules! go {
            ($x:expr, $q:expr, $var:ident) => {{
                let x = elements($x, l1);
                let (loss, grad) = match (&classes, $q) {
                    (Some(c), _) => self.run(&x, lay, Tgt::Classes(c))?,
                    (None, Some(q)) => self.run(&x, lay, Tgt::Probs(&elements(q, l2)))?,
                    (None, None) => {
                        return Err(candle_core::Error::Msg(
                            "targets must be class indices (u8, u32, i64) or probabilities of the logits' dtype".into(),
                        ));
                    }
                };
                store(&self.grad, grad, dims)?;
                CpuStorage::$var(cast_loss(&loss))
            }};
        }
        let out = match s1 {
            CpuStorage::F32(x) => go!(x, if let CpuStorage::F32(q) = s2 { Some(q) } else { None }, F32),
            CpuStorage::F64(x) => go!(x, if let CpuStorage::F64(q) = s2 { Some(q) } else { None }, F64),
            CpuStorage::F16(x) => go!(x, if let CpuStorage::F16(q) = s2 { Some(q) } else { None }, F16),
            CpuStorage::BF16(x) => go!(x, if let CpuStorage::BF16(q) = s2 { Some(q) } else { None }, BF16),
            other => return Err(candle_core::Error::UnsupportedDTypeForOp(other.dtype(), Fused::name(self))),
        };
        Ok((out, shape))
    }

    fn bwd(&self, _x: &Tensor, _t: &Tensor, _loss: &Tensor, g: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = take(&self.grad, Fused::name(self))?;
        Ok((Some(scaled(grad, g, self.kind.reduction() == Reduction::None)?), None))
    }
}

/// Off the CPU the losses run candle-nn's `cross_entropy`, which has only PyTorch's defaults
/// (mean over every row, no ignore index, weights, smoothing, z-loss, cap or temperature): any
/// other option is an error there rather than silently dropped.
fn check_default_options(
    reduction: Reduction,
    weighted: bool,
    label_smoothing: f64,
    z_loss: f64,
    softcap: Option<f64>,
    temperature: f64,
) -> Result<()> {
    if reduction != Reduction::Mean
        || weighted
        || label_smoothing != 0.0
        || z_loss != 0.0
        || softcap.is_some()
        || temperature != 1.0
    {
        return Err(candle_core::Error::Msg(
            "smax cross-entropy off the CPU runs candle-nn's, which takes only the default options \
             (mean, no weights, smoothing, z-loss, cap or temperature)"
                .into(),
        ));
    }
    Ok(())
}

/// `[N, C]` logits and matching targets from `[N, C]` or `[C]` (one sample).
fn as_rows(logits: &Tensor, targets: &Tensor, what: &str) -> Result<(Tensor, Tensor)> {
    let (x, t) = if logits.rank() == 1 {
        let t = if targets.dtype().is_float() { targets.unsqueeze(0)? } else { targets.reshape(1)? };
        (logits.unsqueeze(0)?, t)
    } else {
        (logits.clone(), targets.clone())
    };
    if x.rank() != 2 {
        return Err(candle_core::Error::Msg(format!("smax {what}: logits must be [N, C], not {:?}", logits.dims())));
    }
    Ok((x, t))
}

fn apply_fused(logits: &Tensor, x: &Tensor, t: &Tensor, kind: Kind) -> Result<Tensor> {
    let none = kind.reduction() == Reduction::None;
    let op = Fused { kind, want_grad: x.track_op(), grad: Mutex::new(None) };
    let loss = x.apply_op2(t, op)?;
    if logits.rank() == 1 && none { loss.squeeze(0) } else { Ok(loss) }
}

/// Fused softmax cross-entropy of `logits` (`[N, C]`, or `[C]` for one sample) against
/// `targets` (class indices `[N]` as u8/u32/i64, or probabilities of the logits' shape and
/// dtype), with every option of smax's [`CrossEntropyOptions`]: reduction (PyTorch's mean
/// divides by the summed class weight of the non-ignored rows: ignored tokens never count),
/// `ignore_index`, class weights, label smoothing, PaLM's z-loss (added to the returned loss),
/// a logit soft cap and a temperature.
///
/// The gradient is computed in the same pass as the loss when `logits` is tracked (a `Var`,
/// or computed from one) and scaled by the upstream gradient in the backward (not at all when
/// the loss is the root of the graph): the logits are read once. The loss has the logits'
/// dtype (`[N]` for `Reduction::None`, a scalar otherwise). Accuracy: as smax's
/// `cross_entropy`, a few ULP of f32 (f64 for f64 logits) relative to the loss plus a term in
/// the row's log-sum-exp magnitude. Non-CPU tensors use candle-nn's `cross_entropy` (class
/// indices, mean, no other option: any other is an error there). Errors: targets out of range
/// (naming the row), parameters out of range, shapes that disagree.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor, opts: &CrossEntropyOptions<'_>) -> Result<Tensor> {
    let (x, t) = as_rows(logits, targets, "cross_entropy")?;
    if !x.device().is_cpu() {
        let o = opts;
        check_default_options(
            o.reduction,
            o.class_weights.is_some(),
            o.label_smoothing,
            o.z_loss,
            o.softcap,
            o.temperature,
        )?;
        return candle_nn::loss::cross_entropy(&x, &t);
    }
    // The options without their borrowed weights, which the op owns instead.
    let owned = opts.without_class_weights();
    let kind = Kind::Softmax { opts: owned, weights: opts.class_weights.map(<[f32]>::to_vec) };
    apply_fused(logits, &x, &t, kind)
}

/// StableMax cross-entropy (Prieto et al. 2025, "Grokking at the Edge of Numerical
/// Stability"): `ℓ = ln Σ_j s(x_j) − ln s(x_y)` with `s(x) = x + 1` for `x ≥ 0` and
/// `1/(1 − x)` below, which has no exponential and so cannot reach Softmax Collapse (a loss of
/// exactly 0 from floating-point absorption). `logits` `[N, C]` (or `[C]`), class-index targets,
/// smax's [`LossOptions`] (reduction, `ignore_index`). Computed in f64 whatever the dtype; the
/// gradient `s'(x_i)/Σ s − [i = y]·s'(x_y)/s(x_y)` comes from the same pass, with backward
/// as [`cross_entropy`]. A target at `-inf` gives `+inf`; NaN propagates to its row. CPU only
/// (other devices: an error).
pub fn stablemax_cross_entropy(logits: &Tensor, targets: &Tensor, opts: &LossOptions) -> Result<Tensor> {
    let (x, t) = as_rows(logits, targets, "stablemax_cross_entropy")?;
    if !x.device().is_cpu() {
        return Err(candle_core::Error::Msg("smax stablemax_cross_entropy runs on CPU tensors".into()));
    }
    apply_fused(logits, &x, &t, Kind::Stablemax(*opts))
}

/// The linear cross-entropy op: `(h, w, targets) → loss`, `dh` and `dW` computed in the same
/// call when tracked and kept for the backward.
struct LinearCe {
    opts: LinearCrossEntropyOptions,
    want: (bool, bool),
    grads: Mutex<(Option<Tensor>, Option<Tensor>)>,
}

impl CustomOp3 for LinearCe {
    fn name(&self) -> &'static str {
        "smax-linear-cross-entropy"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &CLayout,
        s2: &CpuStorage,
        l2: &CLayout,
        s3: &CpuStorage,
        l3: &CLayout,
    ) -> Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(h), CpuStorage::F32(w)) = (s1, s2) else {
            return Err(candle_core::Error::Msg("smax linear_cross_entropy computes in f32".into()));
        };
        let targets = class_targets(s3, l3)
            .ok_or_else(|| candle_core::Error::Msg("linear_cross_entropy targets must be u8, u32 or i64".into()))?;
        let (n, d) = l1.shape().dims2()?;
        let v = l2.dims()[0];
        let shape = LinearShape { n, d, v };
        let (h, w) = (elements(h, l1), elements(w, l2));
        let mut dh = self.want.0.then(|| vec![0.0f32; h.len()]);
        let mut dw = self.want.1.then(|| vec![0.0f32; w.len()]);
        let none = self.opts.reduction == Reduction::None;
        let mut per_row = if none { vec![0.0f64; n] } else { Vec::new() };
        let mut z_row = if none { vec![0.0f64; n] } else { Vec::new() };
        let rows_out = if none {
            RowOutputs { loss: Some(&mut per_row), z_loss: Some(&mut z_row), lse: None }
        } else {
            RowOutputs::default()
        };
        let grads = LinearGrads { dh: dh.as_deref_mut(), dw: dw.as_deref_mut(), dbias: None };
        let inp = LinearInputs { h: &h, w: &w, bias: None, targets: &targets };
        let r = smax::loss::linear_cross_entropy(shape, inp, grads, rows_out, None, &self.opts).map_err(smax_err)?;
        let as_t = |g: Option<Vec<f32>>, dims: &[usize]| g.map(|g| Tensor::from_vec(g, dims, &Device::Cpu)).transpose();
        *self.grads.lock().unwrap_or_else(|p| p.into_inner()) = (as_t(dh, l1.dims())?, as_t(dw, l2.dims())?);
        let loss: Vec<f32> = if none {
            per_row.iter().zip(&z_row).map(|(a, b)| (a + b) as f32).collect()
        } else {
            vec![(r.loss + r.z_loss) as f32]
        };
        let out_shape = if none { Shape::from(n) } else { Shape::from(()) };
        Ok((CpuStorage::F32(loss), out_shape))
    }

    fn bwd(
        &self,
        _h: &Tensor,
        _w: &Tensor,
        _t: &Tensor,
        _loss: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        if self.opts.reduction == Reduction::None {
            return Err(candle_core::Error::Msg(
                "smax linear_cross_entropy with Reduction::None is forward-only (dW needs one scale per row); \
                 use Mean or Sum"
                    .into(),
            ));
        }
        let (dh, dw) = self.grads.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let dh = dh.map(|t| scaled(t, g, false)).transpose()?;
        let dw = dw.map(|t| scaled(t, g, false)).transpose()?;
        Ok((dh, dw, None))
    }
}

/// Cross-entropy of `logits = h·Wᵀ` against `targets` without forming the `N x V` logits
/// (Cut Cross-Entropy, Wijmans et al. 2024): `h` is `[N, D]` (or `[.., D]`, flattened), `w` the
/// `[V, D]` classifier (candle's `Linear` weight, no bias), `targets` class indices `[N]`
/// (u8/u32/i64). Every option of smax's [`LinearCrossEntropyOptions`]: reduction (ignored tokens
/// never counted in the mean), `ignore_index`, label smoothing, z-loss, soft cap, CCE's
/// gradient filter, tile sizes.
///
/// Algorithm: tiles of `h·Wᵀ` (the `gemm` crate, f32 accumulation) merged per token into a
/// running (max, Σ exp) state, bitwise independent of the thread count; when `h` or `w` is
/// tracked the same call computes `dh` and `dW` (recomputing each tile), which the backward
/// scales by the upstream gradient. Memory beyond the gradients: one tile and 40 bytes per
/// token. Computes in f32: f16/bf16/f64 inputs are converted (the gradients flow back through
/// the conversion) and the loss has `h`'s dtype. Accuracy: the logits are f32 dot products of
/// length `D`; past them, as [`cross_entropy`]. `Reduction::None` gives the per-token loss and
/// is forward-only (its backward is an error: `dW` would need one scale per token). Non-CPU
/// tensors: the materialised `h·Wᵀ` through [`cross_entropy`]'s fallback (default options
/// only).
pub fn linear_cross_entropy(
    h: &Tensor,
    w: &Tensor,
    targets: &Tensor,
    opts: &LinearCrossEntropyOptions,
) -> Result<Tensor> {
    let d = h.dim(candle_core::D::Minus1)?;
    let h2 = h.reshape(((), d))?;
    let t = targets.flatten_all()?;
    if w.rank() != 2 || w.dim(1)? != d {
        return Err(candle_core::Error::Msg(format!(
            "smax linear_cross_entropy: w must be [V, {d}], not {:?}",
            w.dims()
        )));
    }
    if !h.device().is_cpu() {
        let o = opts;
        check_default_options(o.reduction, false, o.label_smoothing, o.z_loss, o.softcap, 1.0)?;
        return candle_nn::loss::cross_entropy(&h2.matmul(&w.t()?)?, &t);
    }
    let dtype = h.dtype();
    let (hf, wf) = (h2.to_dtype(DType::F32)?, w.to_dtype(DType::F32)?);
    let op = LinearCe { opts: *opts, want: (hf.track_op(), wf.track_op()), grads: Mutex::new((None, None)) };
    let loss = hf.apply_op3(&wf, &t, op)?.to_dtype(dtype)?;
    if opts.reduction == Reduction::None { loss.reshape(&h.dims()[..h.rank() - 1]) } else { Ok(loss) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn off_cpu_fallback_refuses_every_option_it_would_drop() {
        assert!(check_default_options(Reduction::Mean, false, 0.0, 0.0, None, 1.0).is_ok());
        assert!(check_default_options(Reduction::Sum, false, 0.0, 0.0, None, 1.0).is_err());
        assert!(check_default_options(Reduction::None, false, 0.0, 0.0, None, 1.0).is_err());
        assert!(check_default_options(Reduction::Mean, true, 0.0, 0.0, None, 1.0).is_err());
        assert!(check_default_options(Reduction::Mean, false, 0.1, 0.0, None, 1.0).is_err());
        assert!(check_default_options(Reduction::Mean, false, 0.0, 1e-4, None, 1.0).is_err());
        assert!(check_default_options(Reduction::Mean, false, 0.0, 0.0, Some(30.0), 1.0).is_err());
        assert!(check_default_options(Reduction::Mean, false, 0.0, 0.0, None, 2.0).is_err());
    }
}
