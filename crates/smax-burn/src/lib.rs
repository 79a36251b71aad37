//! smax's kernels as [burn](https://burn.dev) operations with backward passes, through burn's
//! backend-extension mechanism.
//!
//! burn's `softmax` and `log_softmax` are compositions of tensor ops (max, subtract, exp, sum,
//! divide: five passes and four temporaries), and its `CrossEntropyLoss` materialises the
//! log-softmax and, with label smoothing, a dense smoothed-target matrix. This crate swaps one
//! call for each:
//!
//! | burn | smax-burn |
//! |---|---|
//! | `activation::softmax(x, 1)` | [`softmax`]`(x, 1)?` |
//! | `activation::log_softmax(x, 1)` | [`log_softmax`]`(x, 1)?` |
//! | `x.exp().sum_dim(1).log()` (or a max-shifted composition) | [`logsumexp`]`(x, 1)?` |
//! | `CrossEntropyLossConfig::new().init(&device).forward(logits, y)` | [`CrossEntropyLossConfig`]`::new().init().forward(logits, y)?`, or [`cross_entropy`]`(logits, y, &CrossEntropyOptions::default())?` |
//! | `attention(q, k, v, mask, None, options)` (materialised scores) | [`attention`]`(q, k, v, &AttentionOptions::default().causal(true))?` |
//!
//! # How it plugs in
//! [`ext::SmaxBackend`] is a backend extension (`#[backend_extension(Flex, Autodiff)]`):
//! its primitives are implemented for burn's pure-Rust CPU backend `Flex` by smax's kernels,
//! and for `Autodiff<B>` by hand-written backward steps that call smax's backward kernels
//! (softmax and log-softmax backward, the cross-entropy gradient computed in the forward pass
//! and scaled by the upstream gradient, flash-attention backward from the saved log-sum-exp).
//! The public functions take burn's backend-independent `Tensor`s: tensors of the Flex backend
//! (with or without autodiff) in f32, f64, f16 or bf16 run smax; every other tensor (another
//! backend, another dtype) runs burn's own composition, so code written against this crate
//! runs everywhere.
//!
//! # Numerics
//! smax's: each row shifted by its maximum; `-inf` entries give exactly 0 (softmax) or `-inf`
//! (log-softmax); a fully masked row gives NaN by default (`Options::masked_row` chooses
//! zeros); errors of a few ULP of the compute type (f32 for f32/f16/bf16, f64 for f64); bits
//! that do not depend on the thread count. Cross-entropy follows PyTorch's definitions:
//! ignored and padding tokens never count in the mean's denominator.
//!
//! # Errors
//! Every function returns `Result<_, smax::Error>`: a dimension out of range, a target outside
//! `[0, C)`, parameters out of range, shapes that disagree. No input panics through this
//! crate's functions.

use burn::backend::{Dispatch, DispatchTensor, DispatchTensorKind, TensorMetadata};
use burn::tensor::{DType, Int, Tensor};
use smax::attention::AttentionOptions;
use smax::loss::{CrossEntropyOptions, Reduction};
use smax::{Error, Options};

pub mod ext;

use ext::{AttnArgs, CeArgs, NormArgs, SmaxBackend};

/// The result of this crate's functions.
pub type Result<T> = core::result::Result<T, Error>;

/// Whether smax runs this tensor: the Flex backend (possibly under autodiff), a float dtype
/// smax computes in.
fn on_smax(t: &DispatchTensor, dtypes: &[DType]) -> bool {
    #[allow(unreachable_patterns)]
    fn flex(k: &DispatchTensorKind) -> bool {
        match k {
            DispatchTensorKind::Flex(_) => true,
            DispatchTensorKind::Autodiff(inner) => flex(inner),
            _ => false,
        }
    }
    flex(&t.kind) && dtypes.contains(&t.dtype())
}

const FLOATS: [DType; 4] = [DType::F32, DType::F64, DType::F16, DType::BF16];
const ATTN_FLOATS: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

/// Runs `f` (one extension call) and returns the error a primitive recorded, if any.
fn checked<R>(f: impl FnOnce() -> R) -> Result<R> {
    ext::clear_error();
    let r = f();
    match ext::take_error() {
        Some(e) => Err(e),
        None => Ok(r),
    }
}

fn check_dim<const D: usize>(dim: usize) -> Result<()> {
    if dim >= D {
        return Err(ext::bad("dim", dim, "less than the tensor's rank"));
    }
    Ok(())
}

fn normalize<const D: usize>(x: Tensor<D>, dim: usize, log: bool, opts: &Options) -> Result<Tensor<D>> {
    check_dim::<D>(dim)?;
    let xd = x.into_dispatch();
    if !on_smax(&xd, &FLOATS) {
        if opts.masked_row != smax::MaskedRow::Nan {
            return Err(Error::Unsupported {
                what: "masked_row",
                why: "burn's softmax, which other backends run, gives NaN for fully masked rows",
            });
        }
        let x = Tensor::<D>::from_dispatch(xd) / opts.temperature;
        return Ok(if log {
            burn::tensor::activation::log_softmax(x, dim)
        } else {
            burn::tensor::activation::softmax(x, dim)
        });
    }
    let args = NormArgs { dim, log, opts: *opts };
    checked(|| Tensor::from_dispatch(<Dispatch as SmaxBackend>::smax_normalize(xd, args)))
}

/// `softmax(x)` over `dim`, with backward (smax's softmax backward kernel under autodiff).
///
/// Algorithm: smax's row engine (max, exponentials and sum in one or two passes when `dim` is
/// the last axis; vectorised across the trailing axes otherwise, no transpose). Error: a few
/// ULP of f32 (f64 for f64 tensors). `-inf` entries give exactly 0; a row of `-inf` gives NaN,
/// like burn (see [`softmax_with`] for zeros). Other backends and dtypes: burn's `softmax`.
pub fn softmax<const D: usize>(x: Tensor<D>, dim: usize) -> Result<Tensor<D>> {
    normalize(x, dim, false, &Options::default())
}

/// [`softmax`] with smax's [`Options`]: a temperature (`softmax(x/τ)`, applied after the max
/// shift so no τ overflows), the result of fully masked rows, the algorithm and threads.
pub fn softmax_with<const D: usize>(x: Tensor<D>, dim: usize, opts: &Options) -> Result<Tensor<D>> {
    normalize(x, dim, false, opts)
}

/// `log_softmax(x)` over `dim`, with backward. `-inf` entries stay `-inf`; error a few ULP of
/// the result's magnitude (absolute near 0). Other backends and dtypes: burn's `log_softmax`.
pub fn log_softmax<const D: usize>(x: Tensor<D>, dim: usize) -> Result<Tensor<D>> {
    normalize(x, dim, true, &Options::default())
}

/// [`log_softmax`] with smax's [`Options`].
pub fn log_softmax_with<const D: usize>(x: Tensor<D>, dim: usize, opts: &Options) -> Result<Tensor<D>> {
    normalize(x, dim, true, opts)
}

/// `log Σ exp(x)` over `dim`, kept with size 1 (as burn's reductions keep it), with backward
/// (`softmax(x)` times the upstream gradient). An empty or all-`-inf` row gives `-inf`,
/// `+inf` gives `+inf`, NaN gives NaN. Error: `3u·|ℓ| + (80 + 4 ln n)·u`, `u` the compute
/// type's unit roundoff. Other backends and dtypes: a max-shifted composition of burn ops.
pub fn logsumexp<const D: usize>(x: Tensor<D>, dim: usize) -> Result<Tensor<D>> {
    logsumexp_with(x, dim, &Options::default())
}

/// [`logsumexp`] with smax's [`Options`] (`log Σ exp(x/τ)` with a temperature τ).
pub fn logsumexp_with<const D: usize>(x: Tensor<D>, dim: usize, opts: &Options) -> Result<Tensor<D>> {
    check_dim::<D>(dim)?;
    let xd = x.into_dispatch();
    if !on_smax(&xd, &FLOATS) {
        let x = Tensor::<D>::from_dispatch(xd) / opts.temperature;
        let m = x.clone().max_dim(dim).detach();
        return Ok((x - m.clone()).exp().sum_dim(dim).log() + m);
    }
    let args = NormArgs { dim, log: false, opts: *opts };
    checked(|| Tensor::from_dispatch(<Dispatch as SmaxBackend>::smax_logsumexp(xd, args)))
}

/// Fused softmax cross-entropy of `logits` `[N, C]` against class indices `targets` `[N]`,
/// with every option of smax's [`CrossEntropyOptions`]: reduction (PyTorch's mean divides by
/// the summed class weight of the rows that count: ignored tokens never count), `ignore_index`,
/// class weights, label smoothing, PaLM's z-loss (added to the returned loss), a soft cap, a
/// temperature.
///
/// One pass over the logits computes the loss and, under autodiff when the logits are tracked,
/// the gradient, which the backward step scales by the upstream gradient (no log-softmax or
/// one-hot matrix is formed). Returns `[1]` (or `[N]` for `Reduction::None`) in the logits'
/// dtype. Accuracy: a few ULP of f32 (f64 for f64) relative to the loss. Other backends: a
/// composition of burn ops (class weights, smoothing and ignore index honoured; z-loss, cap
/// and temperature are errors there). Errors: a target outside `[0, C)` that is not ignored
/// (naming the row), parameters out of range.
pub fn cross_entropy(logits: Tensor<2>, targets: Tensor<1, Int>, opts: &CrossEntropyOptions<'_>) -> Result<Tensor<1>> {
    cross_entropy_padded(logits, targets, opts, &[])
}

fn cross_entropy_padded(
    logits: Tensor<2>,
    targets: Tensor<1, Int>,
    opts: &CrossEntropyOptions<'_>,
    pad_tokens: &[i64],
) -> Result<Tensor<1>> {
    let [n, c] = logits.dims();
    if targets.dims()[0] != n {
        return Err(Error::RowCountMismatch { what: "targets", len: targets.dims()[0], rows: n });
    }
    if let Some(w) = opts.class_weights.filter(|w| w.len() != c) {
        return Err(Error::LengthMismatch { what: "class_weights", len: w.len(), expected: c });
    }
    let xd = logits.into_dispatch();
    if !on_smax(&xd, &FLOATS) {
        return composed::cross_entropy(Tensor::from_dispatch(xd), targets, opts, pad_tokens);
    }
    let args = CeArgs {
        opts: opts.without_class_weights(),
        class_weights: opts.class_weights.map(<[f32]>::to_vec),
        pad_tokens: pad_tokens.to_vec(),
        want_grad: false,
    };
    let td = targets.into_dispatch();
    checked(|| Tensor::from_dispatch(<Dispatch as SmaxBackend>::smax_cross_entropy(xd, td, args).0))
}

/// Exact softmax attention `softmax(q·kᵀ·scale [capped, masked] / τ)·v` by smax's flash
/// kernels (online softmax over key tiles; the score matrix never exists), with backward
/// (smax's flash backward from the saved per-row log-sum-exp).
///
/// `q` `[batch, q_heads, q_len, head_dim]`, `k` and `v` `[batch, kv_heads, kv_len, head_dim]`
/// with `q_heads` a multiple of `kv_heads` (grouped-query attention); strided views (a
/// `[b, s, h, d]` tensor passed as `x.swap_dims(1, 2)`) are read in place when their last
/// axis is contiguous. f32, f16 or bf16 (f16/bf16 compute in f32). From smax's
/// [`AttentionOptions`]: `causal` (bottom-right by default), `window`, `positions`, `scale`
/// (default `1/sqrt(head_dim)`), `softcap`, `temperature`. A query that sees no key returns 0.
/// A borrowed `bias` or `keep` mask is not taken here (an error). Error: f32 accumulation,
/// about `1e-6` relative for f32. Other backends and dtypes: burn's matmul/softmax
/// composition (materialises the scores; a row with no key gives NaN there).
pub fn attention(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, opts: &AttentionOptions<'_>) -> Result<Tensor<4>> {
    let owned = opts.without_borrows().ok_or(Error::Unsupported {
        what: "attention options",
        why: "smax-burn takes causal, window, positions, scale, softcap and temperature; not a borrowed bias or mask",
    })?;
    let (qd, kd, vd) = (q.into_dispatch(), k.into_dispatch(), v.into_dispatch());
    let same = qd.dtype() == kd.dtype() && kd.dtype() == vd.dtype();
    if !(same && on_smax(&qd, &ATTN_FLOATS) && on_smax(&kd, &ATTN_FLOATS) && on_smax(&vd, &ATTN_FLOATS)) {
        return composed::attention(
            Tensor::from_dispatch(qd),
            Tensor::from_dispatch(kd),
            Tensor::from_dispatch(vd),
            &owned,
        );
    }
    let args = AttnArgs { opts: owned };
    checked(|| Tensor::from_dispatch(<Dispatch as SmaxBackend>::smax_attention(qd, kd, vd, args).0))
}

/// burn's `CrossEntropyLossConfig`, for smax's cross-entropy: padding tokens, class weights
/// and label smoothing, plus smax's z-loss, ignore index and reduction.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CrossEntropyLossConfig {
    /// Targets that count for nothing (neither in the sum nor in the mean's denominator).
    pub pad_tokens: Option<Vec<usize>>,
    /// One weight per class.
    pub weights: Option<Vec<f32>>,
    /// Label smoothing α in `[0, 1]`: the target distribution is `(1 − α)·onehot + α/C`.
    pub smoothing: Option<f32>,
    /// PaLM's z-loss coefficient (0: none).
    pub z_loss: f64,
}

impl CrossEntropyLossConfig {
    /// No padding, weights or smoothing.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the padding tokens.
    pub fn with_pad_tokens(mut self, pad_tokens: Option<Vec<usize>>) -> Self {
        self.pad_tokens = pad_tokens;
        self
    }

    /// Sets the class weights.
    pub fn with_weights(mut self, weights: Option<Vec<f32>>) -> Self {
        self.weights = weights;
        self
    }

    /// Sets the label smoothing.
    pub fn with_smoothing(mut self, smoothing: Option<f32>) -> Self {
        self.smoothing = smoothing;
        self
    }

    /// Sets the z-loss coefficient.
    pub fn with_z_loss(mut self, z_loss: f64) -> Self {
        self.z_loss = z_loss;
        self
    }

    /// The loss.
    pub fn init(&self) -> CrossEntropyLoss {
        CrossEntropyLoss { config: self.clone() }
    }
}

/// Mean softmax cross-entropy over the non-padding rows, as burn's `CrossEntropyLoss` with
/// logits (mean weighted by the targets' class weights), computed by [`cross_entropy`].
#[derive(Debug, Clone, PartialEq)]
pub struct CrossEntropyLoss {
    config: CrossEntropyLossConfig,
}

impl CrossEntropyLoss {
    /// The loss of `logits` `[N, C]` against `targets` `[N]`, shape `[1]`. Every row padding:
    /// 0 (burn's composition gives NaN).
    pub fn forward(&self, logits: Tensor<2>, targets: Tensor<1, Int>) -> Result<Tensor<1>> {
        let c = &self.config;
        let mut opts = CrossEntropyOptions::default()
            .reduction(Reduction::Mean)
            .label_smoothing(c.smoothing.unwrap_or(0.0) as f64)
            .z_loss(c.z_loss);
        opts.class_weights = c.weights.as_deref();
        let pads: Vec<i64> = c.pad_tokens.iter().flatten().map(|&t| t.min(i64::MAX as usize) as i64).collect();
        cross_entropy_padded(logits, targets, &opts, &pads)
    }
}

/// The same operations composed of burn ops: what tensors of other backends and dtypes run,
/// and independent references for tests. They materialise what smax's kernels avoid (the
/// log-softmax, the attention scores).
pub mod composed {
    use burn::tensor::{Int, Tensor, activation};
    use smax::attention::AttentionOptions;
    use smax::loss::{CrossEntropyOptions, Reduction};

    use crate::{Error, Result};

    /// [`cross_entropy`](crate::cross_entropy) from `log_softmax`, `gather` and sums, with
    /// `pad_tokens` ignored like `ignore_index`. z-loss, a soft cap and a temperature are
    /// errors here.
    pub fn cross_entropy(
        logits: Tensor<2>,
        targets: Tensor<1, Int>,
        o: &CrossEntropyOptions<'_>,
        pad_tokens: &[i64],
    ) -> Result<Tensor<1>> {
        if o.z_loss != 0.0 || o.softcap.is_some() || o.temperature != 1.0 {
            return Err(Error::Unsupported {
                what: "cross_entropy options",
                why: "z-loss, soft cap and temperature run on the Flex backend only",
            });
        }
        let [n, c] = logits.dims();
        let device = logits.device();
        let t: Vec<i64> = targets.clone().into_data().convert::<i64>().try_to_vec::<i64>().unwrap_or_default();
        let mut keep = vec![0.0f32; n];
        let mut safe = vec![0i64; n];
        for (r, &y) in t.iter().enumerate() {
            let ignored = y == o.ignore_index || pad_tokens.contains(&y);
            if !ignored && !(0..c as i64).contains(&y) {
                return Err(Error::TargetOutOfRange { row: r, target: y, classes: c });
            }
            keep[r] = if ignored { 0.0 } else { 1.0 };
            safe[r] = if ignored { 0 } else { y };
        }
        let dtype = logits.dtype();
        let lp = activation::log_softmax(logits, 1);
        let idx = Tensor::<1, Int>::from_data(safe.as_slice(), &device).reshape([n, 1]);
        let eps = o.label_smoothing;
        let w: Vec<f32> = match o.class_weights {
            Some(w) => safe.iter().zip(&keep).map(|(&y, &k)| k * w[y as usize]).collect(),
            None => keep.clone(),
        };
        let wt = Tensor::<1>::from_data(w.as_slice(), (&device, dtype));
        let nll = lp.clone().gather(1, idx).reshape([n]).neg();
        let mut per_row = nll * (1.0 - eps);
        if eps != 0.0 {
            let smooth = match o.class_weights {
                Some(cw) => (lp * Tensor::<1>::from_data(cw, (&device, dtype)).reshape([1, c])).sum_dim(1).reshape([n]),
                None => lp.sum_dim(1).reshape([n]),
            };
            let kt = Tensor::<1>::from_data(keep.as_slice(), (&device, dtype));
            per_row = per_row * wt.clone() - smooth * kt * (eps / c as f64);
        } else {
            per_row = per_row * wt.clone();
        }
        Ok(match o.reduction {
            Reduction::None => per_row,
            Reduction::Sum => per_row.sum(),
            Reduction::Mean => {
                let denom: f64 = w.iter().map(|&v| v as f64).sum();
                if denom == 0.0 { per_row.sum() * 0.0 } else { per_row.sum() / denom }
            }
        })
    }

    /// [`attention`](crate::attention) from `matmul`, an additive mask and burn's `softmax`
    /// (a query that sees no key gives NaN here).
    pub fn attention(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, o: &AttentionOptions<'_>) -> Result<Tensor<4>> {
        let [b, hq, sq, d] = q.dims();
        let [_, hkv, skv, _] = k.dims();
        if hkv == 0 || hq % hkv != 0 || k.dims() != v.dims() || k.dims()[0] != b || k.dims()[3] != d {
            return Err(Error::Unsupported {
                what: "attention shapes",
                why: "q_heads must be a multiple of kv_heads; k and v equal",
            });
        }
        let rep = hq / hkv;
        let group = |x: Tensor<4>| {
            if rep == 1 {
                x
            } else {
                x.reshape([b, hkv, 1, skv, d]).expand([b, hkv, rep, skv, d]).reshape([b, hq, skv, d])
            }
        };
        let (k, v) = (group(k), group(v));
        let scale = o.scale.map_or(1.0 / (d as f64).sqrt(), f64::from);
        let mut s = q.matmul(k.swap_dims(2, 3)) * scale;
        if let Some(c) = o.softcap {
            s = (s / f64::from(c)).tanh() * f64::from(c);
        }
        s = s / o.temperature;
        if o.causal || o.window.is_some() {
            let mut mask = vec![f32::NEG_INFINITY; sq * skv];
            for i in 0..sq {
                mask[i * skv..(i + 1) * skv][o.visible_keys(sq, skv, i)].fill(0.0);
            }
            let m = Tensor::<1>::from_data(mask.as_slice(), (&s.device(), s.dtype())).reshape([1, 1, sq, skv]);
            s = s + m;
        }
        Ok(activation::softmax(s, 3).matmul(v))
    }
}
