//! The backend extension: smax's kernels as primitive operations of burn's Flex CPU backend,
//! and their backward passes on `Autodiff<B>` for any backend that has them.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::backend::{Autodiff, Backend, DType, Flex, Shape, TensorData, TensorMetadata, backend_extension};
use smax::attention::{
    AttentionGrads, AttentionInputs, AttentionOptions, AttentionOutputs, AttentionShape, AttnElement, HeadStrides,
    Heads,
};
use smax::loss::{CrossEntropyOptions, Reduction, RowOutputs, Targets};
use smax::{Element, Layout, Options, View, ViewMut};

/// Arguments of the normalisers: the dimension, softmax or log-softmax, and smax's options
/// (temperature, fully masked rows, algorithm, threads).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NormArgs {
    /// The dimension normalised (reduced, for `logsumexp`).
    pub dim: usize,
    /// Log-softmax instead of softmax.
    pub log: bool,
    /// smax's options.
    pub opts: Options,
}

/// Arguments of the cross-entropy: smax's options (their `class_weights` unused), the class
/// weights owned, burn's padding tokens (each ignored like `ignore_index`), and whether the
/// forward pass computes the gradient (set by the autodiff layer).
#[derive(Debug, Clone)]
pub struct CeArgs {
    /// Reduction, ignore index, smoothing, z-loss, cap, temperature, threads.
    pub opts: CrossEntropyOptions<'static>,
    /// One weight per class.
    pub class_weights: Option<Vec<f32>>,
    /// More targets ignored (burn's `pad_tokens`).
    pub pad_tokens: Vec<i64>,
    /// Whether the forward computes the gradient.
    pub want_grad: bool,
}

/// Arguments of attention: smax's options without a borrowed bias or mask.
#[derive(Debug, Clone, Copy)]
pub struct AttnArgs {
    /// Causal, window, positions, scale, soft cap, temperature, tiles, threads.
    pub opts: AttentionOptions<'static>,
}

/// smax's operations as primitives of a burn backend. Implemented for `Flex` (the kernels) and
/// for `Autodiff<B>` of any backend that implements it (the backward passes); `smax_burn`'s
/// functions call it through burn's `Dispatch`.
///
/// burn's primitives cannot return an error: a smax error in a `Flex` primitive is recorded on
/// the calling thread and the primitive returns empty tensors; `smax_burn`'s functions clear
/// the record before the call and return the error after it, so a caller of those functions
/// never sees a panic or an empty result.
#[backend_extension(Flex, Autodiff)]
pub trait SmaxBackend: Backend {
    /// `softmax(x/τ)` or `log_softmax(x/τ)` over `args.dim`.
    fn smax_normalize(x: FloatTensor<Self>, args: NormArgs) -> FloatTensor<Self>;
    /// The gradient of [`SmaxBackend::smax_normalize`] from its output `y` and `dy`.
    fn smax_normalize_backward(y: FloatTensor<Self>, dy: FloatTensor<Self>, args: NormArgs) -> FloatTensor<Self>;
    /// `log Σ exp(x/τ)` over `args.dim`, the dimension kept with size 1.
    fn smax_logsumexp(x: FloatTensor<Self>, args: NormArgs) -> FloatTensor<Self>;
    /// Cross-entropy of `[N, C]` logits against `[N]` class indices: the loss (`[1]`, or `[N]`
    /// for `Reduction::None`) and, when `args.want_grad`, the gradient of the loss (its sum for
    /// `None`) with respect to the logits (else an empty tensor).
    fn smax_cross_entropy(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
        args: CeArgs,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);
    /// Flash attention over `[b, h, s, d]` operands: the output and the per-row log-sum-exp
    /// (f32, `[b, hq, sq]`).
    fn smax_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        args: AttnArgs,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);
    /// The gradients `(dq, dk, dv)` of [`SmaxBackend::smax_attention`].
    fn smax_attention_backward(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        out: FloatTensor<Self>,
        lse: FloatTensor<Self>,
        d_out: FloatTensor<Self>,
        args: AttnArgs,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);
}

thread_local! {
    /// The error of the last smax primitive that failed on this thread (burn's primitives
    /// cannot return one; the public functions clear it before a call and check it after).
    static FAILED: core::cell::RefCell<Option<smax::Error>> = const { core::cell::RefCell::new(None) };
}

/// A parameter out of range.
pub(crate) fn bad(name: &'static str, value: impl core::fmt::Display, expected: &'static str) -> smax::Error {
    smax::Error::BadParameter { name, value: value.to_string(), expected }
}

/// Clears the failure slot before a call.
pub(crate) fn clear_error() {
    FAILED.with(|f| *f.borrow_mut() = None);
}

/// The error a primitive recorded since [`clear_error`], if any.
pub(crate) fn take_error() -> Option<smax::Error> {
    FAILED.with(|f| f.borrow_mut().take())
}

/// `r`'s value, or, recording its error, `n` empty tensors of `dtype` (the public function that
/// made the call returns the error instead of any of them).
fn record<const N: usize>(r: smax::Result<[FlexTensor; N]>, dtype: DType) -> [FlexTensor; N] {
    r.unwrap_or_else(|e| {
        FAILED.with(|f| *f.borrow_mut() = Some(e));
        core::array::from_fn(|_| FlexTensor::empty(Shape::from([0]), dtype))
    })
}

/// The tensor itself when row-major contiguous, else a contiguous copy.
fn contiguous(t: &FlexTensor) -> FlexTensor {
    if t.is_contiguous() { t.clone() } else { t.to_contiguous() }
}

/// The elements of a contiguous tensor of the dispatched dtype.
fn elems<E: burn::backend::Element + bytemuck::Pod>(t: &FlexTensor) -> smax::Result<&[E]> {
    t.as_slice::<E>().ok_or(smax::Error::LengthMismatch {
        what: "burn tensor",
        len: 0,
        expected: t.shape().num_elements(),
    })
}

fn tensor<E: burn::backend::Element>(v: Vec<E>, shape: impl Into<Shape>) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(v, shape))
}

/// Runs `$body` with `$E` bound to the element type of `$dt` among the listed
/// `DType => type` pairs; any other dtype is an error naming `$accepted`.
macro_rules! dtype_dispatch {
    ($dt:expr, [$($v:ident => $t:ty),+], $accepted:expr, |$E:ident| $body:expr) => {
        match $dt {
            $(DType::$v => {
                type $E = $t;
                $body
            })+
            other => Err(bad("dtype", format!("{other:?}"), $accepted)),
        }
    };
}

/// `dtype_dispatch!` over the normalisers' and losses' f32, f64, f16, bf16.
macro_rules! float_dispatch {
    ($dt:expr, |$E:ident| $body:expr) => {
        dtype_dispatch!($dt, [F32 => f32, F64 => f64, F16 => half::f16, BF16 => half::bf16], "f32, f64, f16 or bf16", |$E| $body)
    };
}

/// `dtype_dispatch!` over attention's f32, f16, bf16.
macro_rules! attn_dispatch {
    ($dt:expr, |$E:ident| $body:expr) => {
        dtype_dispatch!($dt, [F32 => f32, F16 => half::f16, BF16 => half::bf16], "f32, f16 or bf16", |$E| $body)
    };
}

fn normalize<E: Element + burn::backend::Element + bytemuck::Pod>(
    x: &FlexTensor,
    args: NormArgs,
) -> smax::Result<[FlexTensor; 1]> {
    let shape = x.shape();
    let l = Layout::for_axis(&shape, args.dim)?;
    let x = contiguous(x);
    let mut y = vec![E::default(); shape.num_elements()];
    let (xv, yv) = (View::new(elems::<E>(&x)?, l)?, ViewMut::new(&mut y, l)?);
    let o = args.opts;
    if args.log { smax::log_softmax(xv, yv, &o) } else { smax::softmax(xv, yv, &o) }?;
    Ok([tensor(y, shape)])
}

fn normalize_backward<E: Element + burn::backend::Element + bytemuck::Pod>(
    y: &FlexTensor,
    dy: &FlexTensor,
    args: NormArgs,
) -> smax::Result<[FlexTensor; 1]> {
    let shape = y.shape();
    let l = Layout::for_axis(&shape, args.dim)?;
    let (y, dy) = (contiguous(y), contiguous(dy));
    let mut dx = vec![E::default(); shape.num_elements()];
    let (yv, dv) = (View::new(elems::<E>(&y)?, l)?, View::new(elems::<E>(&dy)?, l)?);
    let xv = ViewMut::new(&mut dx, l)?;
    let o = args.opts;
    if args.log { smax::log_softmax_backward(yv, dv, xv, &o) } else { smax::softmax_backward(yv, dv, xv, &o) }?;
    Ok([tensor(dx, shape)])
}

fn logsumexp<E: Element + burn::backend::Element + bytemuck::Pod>(
    x: &FlexTensor,
    args: NormArgs,
) -> smax::Result<[FlexTensor; 1]> {
    let shape = x.shape();
    let l = Layout::for_axis(&shape, args.dim)?;
    let x = contiguous(x);
    let out = smax::logsumexp_to_vec(View::new(elems::<E>(&x)?, l)?, &args.opts)?;
    let mut dims = shape.to_vec();
    dims[args.dim] = 1;
    Ok([tensor(out, dims)])
}

/// Integer targets as i64, any integer dtype.
fn targets_i64(t: &FlexTensor) -> smax::Result<Vec<i64>> {
    let t = contiguous(t);
    Ok(match t.dtype() {
        DType::I64 => elems::<i64>(&t)?.to_vec(),
        DType::I32 => elems::<i32>(&t)?.iter().map(|&v| v as i64).collect(),
        DType::I16 => elems::<i16>(&t)?.iter().map(|&v| v as i64).collect(),
        DType::I8 => elems::<i8>(&t)?.iter().map(|&v| v as i64).collect(),
        DType::U64 => elems::<u64>(&t)?.iter().map(|&v| v.min(i64::MAX as u64) as i64).collect(),
        DType::U32 => elems::<u32>(&t)?.iter().map(|&v| v as i64).collect(),
        DType::U16 => elems::<u16>(&t)?.iter().map(|&v| v as i64).collect(),
        DType::U8 => elems::<u8>(&t)?.iter().map(|&v| v as i64).collect(),
        other => return Err(bad("targets dtype", format!("{other:?}"), "an integer type")),
    })
}

fn cross_entropy<E: Element + burn::backend::Element + bytemuck::Pod>(
    logits: &FlexTensor,
    targets: &FlexTensor,
    args: &CeArgs,
) -> smax::Result<[FlexTensor; 2]> {
    let shape = logits.shape();
    let (n, c) = (shape[0], shape[1]);
    let l = Layout::rows(n, c);
    let x = contiguous(logits);
    let mut t = targets_i64(targets)?;
    if !args.pad_tokens.is_empty() {
        for v in t.iter_mut() {
            if args.pad_tokens.contains(v) {
                *v = args.opts.ignore_index;
            }
        }
    }
    let mut o = args.opts;
    o.class_weights = args.class_weights.as_deref();
    let none = o.reduction == Reduction::None;
    let mut grad = args.want_grad.then(|| vec![E::default(); n * c]);
    let g = grad.as_deref_mut().map(|g| ViewMut::new(g, l)).transpose()?;
    let (mut per_row, mut z_row) = if none { (vec![0.0f64; n], vec![0.0f64; n]) } else { (Vec::new(), Vec::new()) };
    let rows_out = if none {
        RowOutputs { loss: Some(&mut per_row), z_loss: Some(&mut z_row), lse: None }
    } else {
        RowOutputs::default()
    };
    let r = smax::loss::cross_entropy(View::new(elems::<E>(&x)?, l)?, Targets::Classes(&t), g, rows_out, &o)?;
    let loss: Vec<E> = if none {
        per_row.iter().zip(&z_row).map(|(a, b)| E::from_f64(a + b)).collect()
    } else {
        vec![E::from_f64(r.loss + r.z_loss)]
    };
    let len = loss.len();
    let grad = match grad {
        Some(g) => tensor(g, shape),
        None => tensor(Vec::<E>::new(), [0]),
    };
    Ok([tensor(loss, [len]), grad])
}

/// One `[b, h, s, d]` operand: read through its strides when they are non-negative and its
/// last axis is contiguous, else gathered once. Returns the tensor, its dims, strides and the
/// offset of its first element.
fn heads_of(t: &FlexTensor) -> smax::Result<(FlexTensor, [usize; 4], HeadStrides, usize)> {
    let dims: [usize; 4] = t
        .shape()
        .to_vec()
        .try_into()
        .map_err(|_| bad("attention operand rank", t.shape().num_dims(), "4 ([batch, heads, tokens, head_dim])"))?;
    let l = t.layout();
    let st = l.strides();
    if st.iter().all(|&s| s >= 0) && (dims[3] <= 1 || st[3] == 1) {
        let hs = HeadStrides { batch: st[0] as usize, head: st[1] as usize, token: st[2] as usize };
        return Ok((t.clone(), dims, hs, l.start_offset()));
    }
    Ok((t.to_contiguous(), dims, HeadStrides::bhsd(dims[1], dims[2], dims[3]), 0))
}

/// The elements of an operand from its first one.
fn from_offset<E: burn::backend::Element + bytemuck::Pod>(t: &FlexTensor, off: usize) -> &[E] {
    let s = t.storage::<E>();
    &s[off.min(s.len())..]
}

fn attn_shape(q: &[usize; 4], k: &[usize; 4], v: &[usize; 4]) -> smax::Result<AttentionShape> {
    if k != v || q[0] != k[0] || q[3] != k[3] {
        return Err(bad(
            "attention shapes",
            format!("q {q:?}, k {k:?}, v {v:?}"),
            "k and v equal; batch and head_dim shared with q",
        ));
    }
    Ok(AttentionShape::new(q[0], q[1], q[2], k[2], q[3]).kv_heads(k[1]))
}

fn attention<E: AttnElement + burn::backend::Element + bytemuck::Pod>(
    q: &FlexTensor,
    k: &FlexTensor,
    v: &FlexTensor,
    args: AttnArgs,
) -> smax::Result<[FlexTensor; 2]> {
    let ((qt, qd, qs, qo), (kt, kd, ks, ko), (vt, vd, vs, vo)) = (heads_of(q)?, heads_of(k)?, heads_of(v)?);
    let shape = attn_shape(&qd, &kd, &vd)?;
    let (qe, ke, ve) = (from_offset::<E>(&qt, qo), from_offset::<E>(&kt, ko), from_offset::<E>(&vt, vo));
    let inputs = AttentionInputs::new(shape, Heads::strided(qe, qs), Heads::strided(ke, ks), Heads::strided(ve, vs));
    let mut out = vec![E::default(); shape.out_len()];
    let mut lse = vec![0.0f32; shape.lse_len()];
    smax::attention::attention(inputs, AttentionOutputs::new(&mut out, Some(&mut lse)), &args.opts)?;
    Ok([tensor(out, qd), tensor(lse, [qd[0], qd[1], qd[2]])])
}

fn attention_backward<E: AttnElement + burn::backend::Element + bytemuck::Pod>(
    [q, k, v, out, lse, d_out]: [&FlexTensor; 6],
    args: AttnArgs,
) -> smax::Result<[FlexTensor; 3]> {
    let ((qt, qd, qs, qo), (kt, kd, ks, ko), (vt, vd, vs, vo)) = (heads_of(q)?, heads_of(k)?, heads_of(v)?);
    let shape = attn_shape(&qd, &kd, &vd)?;
    let (qe, ke, ve) = (from_offset::<E>(&qt, qo), from_offset::<E>(&kt, ko), from_offset::<E>(&vt, vo));
    let inputs = AttentionInputs::new(shape, Heads::strided(qe, qs), Heads::strided(ke, ks), Heads::strided(ve, vs));
    let (out, lse, d_out) = (contiguous(out), contiguous(lse), contiguous(d_out));
    let (n_out, n_kv) = (shape.out_len(), shape.kv_len_elems());
    let (mut dq, mut dk, mut dv) = (vec![E::default(); n_out], vec![E::default(); n_kv], vec![E::default(); n_kv]);
    smax::attention::attention_backward(
        inputs,
        elems::<E>(&out)?,
        elems::<f32>(&lse)?,
        elems::<E>(&d_out)?,
        AttentionGrads::new(&mut dq, &mut dk, &mut dv),
        &args.opts,
    )?;
    Ok([tensor(dq, qd), tensor(dk, kd), tensor(dv, kd)])
}

impl SmaxBackend for Flex {
    fn smax_normalize(x: FlexTensor, args: NormArgs) -> FlexTensor {
        let [y] = record(float_dispatch!(x.dtype(), |E| normalize::<E>(&x, args)), x.dtype());
        y
    }

    fn smax_normalize_backward(y: FlexTensor, dy: FlexTensor, args: NormArgs) -> FlexTensor {
        let [dx] = record(float_dispatch!(y.dtype(), |E| normalize_backward::<E>(&y, &dy, args)), y.dtype());
        dx
    }

    fn smax_logsumexp(x: FlexTensor, args: NormArgs) -> FlexTensor {
        let [l] = record(float_dispatch!(x.dtype(), |E| logsumexp::<E>(&x, args)), x.dtype());
        l
    }

    fn smax_cross_entropy(logits: FlexTensor, targets: FlexTensor, args: CeArgs) -> (FlexTensor, FlexTensor) {
        let dt = logits.dtype();
        let [loss, grad] = record(float_dispatch!(dt, |E| cross_entropy::<E>(&logits, &targets, &args)), dt);
        (loss, grad)
    }

    fn smax_attention(q: FlexTensor, k: FlexTensor, v: FlexTensor, args: AttnArgs) -> (FlexTensor, FlexTensor) {
        let [o, l] = record(attn_dispatch!(q.dtype(), |E| attention::<E>(&q, &k, &v, args)), q.dtype());
        (o, l)
    }

    fn smax_attention_backward(
        q: FlexTensor,
        k: FlexTensor,
        v: FlexTensor,
        out: FlexTensor,
        lse: FlexTensor,
        d_out: FlexTensor,
        args: AttnArgs,
    ) -> (FlexTensor, FlexTensor, FlexTensor) {
        let all = [&q, &k, &v, &out, &lse, &d_out];
        let [dq, dk, dv] = record(attn_dispatch!(q.dtype(), |E| attention_backward::<E>(all, args)), q.dtype());
        (dq, dk, dv)
    }
}

#[derive(Debug)]
struct NormalizeBackward;

impl<B: SmaxBackend> Backward<B, 1> for NormalizeBackward {
    type State = (FloatTensor<B>, NormArgs);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [parent] = ops.parents;
        let dy = grads.consume::<B>(&ops.node);
        let (y, args) = ops.state;
        if let Some(node) = parent {
            grads.register::<B>(node.id, B::smax_normalize_backward(y, dy, args));
        }
    }
}

#[derive(Debug)]
struct LogSumExpBackward;

impl<B: SmaxBackend> Backward<B, 1> for LogSumExpBackward {
    type State = (FloatTensor<B>, NormArgs);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [parent] = ops.parents;
        let g = grads.consume::<B>(&ops.node);
        let (x, args) = ops.state;
        if let Some(node) = parent {
            // ∂lse/∂x = softmax(x/τ)/τ, broadcast over the reduced dimension.
            let p = B::smax_normalize(x, NormArgs { log: false, ..args });
            let shape = p.shape();
            let g = B::float_expand(g, shape);
            let mut dx = B::float_mul(p, g);
            if args.opts.temperature != 1.0 {
                dx = B::float_div_scalar(dx, args.opts.temperature.into());
            }
            grads.register::<B>(node.id, dx);
        }
    }
}

#[derive(Debug)]
struct CrossEntropyBackward;

impl<B: SmaxBackend> Backward<B, 1> for CrossEntropyBackward {
    type State = (FloatTensor<B>, bool);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [parent] = ops.parents;
        let g = grads.consume::<B>(&ops.node);
        let (grad, per_row) = ops.state;
        if let Some(node) = parent {
            let shape = grad.shape();
            let g = if per_row {
                B::float_reshape(g, Shape::from([shape[0], 1]))
            } else {
                B::float_reshape(g, Shape::from([1, 1]))
            };
            grads.register::<B>(node.id, B::float_mul(grad, B::float_expand(g, shape)));
        }
    }
}

#[derive(Debug)]
struct AttentionBackward;

impl<B: SmaxBackend> Backward<B, 3> for AttentionBackward {
    type State = ([FloatTensor<B>; 5], AttnArgs);

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [pq, pk, pv] = ops.parents;
        let d_out = grads.consume::<B>(&ops.node);
        let ([q, k, v, out, lse], args) = ops.state;
        let (dq, dk, dv) = B::smax_attention_backward(q, k, v, out, lse, d_out, args);
        for (p, d) in [(pq, dq), (pk, dk), (pv, dv)] {
            if let Some(node) = p {
                grads.register::<B>(node.id, d);
            }
        }
    }
}

/// An autodiff tensor over `B` (burn-autodiff does not export the type's name).
type AutodiffTensor<B, C> = FloatTensor<Autodiff<B, C>>;

impl<B: SmaxBackend, C: CheckpointStrategy> SmaxBackend for Autodiff<B, C> {
    fn smax_normalize(x: AutodiffTensor<B, C>, args: NormArgs) -> AutodiffTensor<B, C> {
        let node = x.node();
        match NormalizeBackward.prepare::<C>([node]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let y = B::smax_normalize(x.into_primitive(), args);
                prep.finish((y.clone(), args), y)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::smax_normalize(x.into_primitive(), args)),
        }
    }

    fn smax_normalize_backward(
        y: AutodiffTensor<B, C>,
        dy: AutodiffTensor<B, C>,
        args: NormArgs,
    ) -> AutodiffTensor<B, C> {
        AutodiffTensor::<B, C>::new(B::smax_normalize_backward(y.into_primitive(), dy.into_primitive(), args))
    }

    fn smax_logsumexp(x: AutodiffTensor<B, C>, args: NormArgs) -> AutodiffTensor<B, C> {
        let node = x.node();
        match LogSumExpBackward.prepare::<C>([node]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                // The backward recomputes softmax from x (shared, not copied): the forward
                // makes no full-size tensor beyond its output.
                let xp = x.into_primitive();
                prep.finish((xp.clone(), args), B::smax_logsumexp(xp, args))
            }
            OpsKind::UnTracked(prep) => prep.finish(B::smax_logsumexp(x.into_primitive(), args)),
        }
    }

    fn smax_cross_entropy(
        logits: AutodiffTensor<B, C>,
        targets: IntTensor<B>,
        args: CeArgs,
    ) -> (AutodiffTensor<B, C>, AutodiffTensor<B, C>) {
        let node = logits.node();
        let per_row = args.opts.reduction == Reduction::None;
        match CrossEntropyBackward.prepare::<C>([node]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let (loss, grad) =
                    B::smax_cross_entropy(logits.into_primitive(), targets, CeArgs { want_grad: true, ..args });
                let g = AutodiffTensor::<B, C>::new(grad.clone());
                (prep.finish((grad, per_row), loss), g)
            }
            OpsKind::UnTracked(prep) => {
                let (loss, grad) = B::smax_cross_entropy(logits.into_primitive(), targets, args);
                (prep.finish(loss), AutodiffTensor::<B, C>::new(grad))
            }
        }
    }

    fn smax_attention(
        q: AutodiffTensor<B, C>,
        k: AutodiffTensor<B, C>,
        v: AutodiffTensor<B, C>,
        args: AttnArgs,
    ) -> (AutodiffTensor<B, C>, AutodiffTensor<B, C>) {
        let nodes = [q.node(), k.node(), v.node()];
        match AttentionBackward.prepare::<C>(nodes).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let (qp, kp, vp) = (q.into_primitive(), k.into_primitive(), v.into_primitive());
                let (out, lse) = B::smax_attention(qp.clone(), kp.clone(), vp.clone(), args);
                let state = ([qp, kp, vp, out.clone(), lse.clone()], args);
                (prep.finish(state, out), AutodiffTensor::<B, C>::new(lse))
            }
            OpsKind::UnTracked(prep) => {
                let (out, lse) = B::smax_attention(q.into_primitive(), k.into_primitive(), v.into_primitive(), args);
                (prep.finish(out), AutodiffTensor::<B, C>::new(lse))
            }
        }
    }

    fn smax_attention_backward(
        q: AutodiffTensor<B, C>,
        k: AutodiffTensor<B, C>,
        v: AutodiffTensor<B, C>,
        out: AutodiffTensor<B, C>,
        lse: AutodiffTensor<B, C>,
        d_out: AutodiffTensor<B, C>,
        args: AttnArgs,
    ) -> (AutodiffTensor<B, C>, AutodiffTensor<B, C>, AutodiffTensor<B, C>) {
        let (dq, dk, dv) = B::smax_attention_backward(
            q.into_primitive(),
            k.into_primitive(),
            v.into_primitive(),
            out.into_primitive(),
            lse.into_primitive(),
            d_out.into_primitive(),
            args,
        );
        (AutodiffTensor::<B, C>::new(dq), AutodiffTensor::<B, C>::new(dk), AutodiffTensor::<B, C>::new(dv))
    }
}
