"""smax kernels as PyTorch custom ops, with autograd and ``torch.compile`` support.

Each op is registered with ``torch.library.custom_op`` under the ``smax::`` namespace (CPU),
with a fake (meta) implementation for tracing and an autograd formula that calls smax's
backward kernels. CPU tensors are shared with smax without copies (bfloat16 included; a
tensor whose strides no smax layout expresses is copied once). Tensors on other devices fall
back to PyTorch's own ops, so a model keeps working when moved to a GPU.

Public functions: :func:`softmax`, :func:`log_softmax`, :func:`logsumexp`,
:func:`cross_entropy`, :func:`linear_cross_entropy`, :func:`scaled_dot_product_attention`;
modules :class:`CrossEntropyLoss` and :class:`LinearCrossEntropyLoss`.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

import smax as _s
from smax import _smax as _native

__all__ = [
    "softmax",
    "log_softmax",
    "logsumexp",
    "cross_entropy",
    "linear_cross_entropy",
    "scaled_dot_product_attention",
    "CrossEntropyLoss",
    "LinearCrossEntropyLoss",
]

_SUPPORTED = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _np(t: Tensor) -> np.ndarray:
    """A NumPy view of a CPU tensor's memory (no copy; bfloat16 through ml_dtypes)."""
    if t.requires_grad:
        t = t.detach()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(_s.bfloat16)
    return t.numpy()


def _t(a: np.ndarray) -> Tensor:
    """A tensor sharing a NumPy array's memory (bfloat16 through an int16 view)."""
    if a.dtype == _s.bfloat16:
        return torch.from_numpy(np.ascontiguousarray(a).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def _usable(*ts: Optional[Tensor]) -> bool:
    return all(t is None or (t.is_cpu and t.dtype in _SUPPORTED) for t in ts)


def _eager() -> bool:
    """True outside torch.compile's tracing: calls then skip the custom-op dispatcher."""
    return not torch.compiler.is_compiling()


def _eager_function(name, impl, setup, backward):
    """An autograd.Function running `impl` with the custom op's own autograd formula: the eager
    path, which skips the dispatcher's per-call cost (tens of microseconds)."""

    def forward(ctx, *args):
        out = impl(*args)
        ctx.eager = True  # the backward may call implementations directly too
        setup(ctx, args, out)
        return out

    fn = type(name, (torch.autograd.Function,), {"forward": staticmethod(forward), "backward": staticmethod(backward)})
    return fn.apply


def _dispatch(op, eager_fn, impl, differentiable, *args):
    """Under torch.compile: the custom op (traceable, with its fake kernel). Eager: the
    autograd.Function when a gradient is needed, else the implementation itself."""
    if not _eager():
        return op(*args)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in differentiable):
        return eager_fn(*args)
    return impl(*args)


# --- softmax, log_softmax ---------------------------------------------------------------------


def _normalize_impl(x: Tensor, dim: int, temperature: float, log: bool) -> Tensor:
    xn = _np(x)
    if x.dtype == torch.bfloat16:
        y = torch.empty_like(x)
        yn = _np(y)
    else:
        # NumPy allocates the output (keeping x's memory order) and torch wraps it: the
        # cheapest pair of views for small calls.
        yn = np.empty_like(xn)
        y = torch.from_numpy(yn)
    # The native call first (the common case, a fraction of a microsecond); the package's
    # function copies what no smax layout expresses, and handles 0-d tensors.
    if x.dim() == 0 or not _native.normalize("log_softmax" if log else "softmax", xn, yn, dim, temperature, "nan"):
        (_s.log_softmax if log else _s.softmax)(xn, axis=dim, temperature=temperature, out=yn)
    return y


_normalize = torch.library.custom_op("smax::normalize", mutates_args=(), device_types="cpu")(_normalize_impl)


@_normalize.register_fake
def _(x, dim, temperature, log):
    return torch.empty_like(x)


def _normalize_backward_impl(y: Tensor, dy: Tensor, dim: int, temperature: float, log: bool) -> Tensor:
    dx = torch.empty_like(y)
    f = _s.log_softmax_backward if log else _s.softmax_backward
    f(_np(y), _np(dy.to(y.dtype)), axis=dim, temperature=temperature, out=_np(dx))
    return dx


_normalize_backward = torch.library.custom_op("smax::normalize_backward", mutates_args=(), device_types="cpu")(
    _normalize_backward_impl
)


@_normalize_backward.register_fake
def _(y, dy, dim, temperature, log):
    return torch.empty_like(y)


def _normalize_setup(ctx, inputs, output):
    _, ctx.dim, ctx.temperature, ctx.log = inputs
    ctx.save_for_backward(output)


def _normalize_bwd(ctx, dy):
    (y,) = ctx.saved_tensors
    back = _normalize_backward_impl if getattr(ctx, "eager", False) else _normalize_backward
    return back(y, dy.contiguous(), ctx.dim, ctx.temperature, ctx.log), None, None, None


_normalize.register_autograd(_normalize_bwd, setup_context=_normalize_setup)
_normalize_eager = _eager_function("Normalize", _normalize_impl, _normalize_setup, _normalize_bwd)


def softmax(x: Tensor, dim: int = -1, *, temperature: float = 1.0) -> Tensor:
    """``torch.softmax(x / temperature, dim)`` through smax (see :func:`smax.softmax` for the
    numerics), differentiable. Non-CPU tensors use PyTorch's op."""
    if not (x.is_cpu and x.dtype in _SUPPORTED):
        return torch.softmax(x / temperature, dim)
    if not (x.requires_grad and torch.is_grad_enabled()) and _eager():
        return _normalize_impl(x, dim, float(temperature), False)
    return _dispatch(_normalize, _normalize_eager, _normalize_impl, (x,), x, dim, float(temperature), False)


def log_softmax(x: Tensor, dim: int = -1, *, temperature: float = 1.0) -> Tensor:
    """``torch.log_softmax(x / temperature, dim)`` through smax, differentiable."""
    if not (x.is_cpu and x.dtype in _SUPPORTED):
        return torch.log_softmax(x / temperature, dim)
    if not (x.requires_grad and torch.is_grad_enabled()) and _eager():
        return _normalize_impl(x, dim, float(temperature), True)
    return _dispatch(_normalize, _normalize_eager, _normalize_impl, (x,), x, dim, float(temperature), True)


# --- logsumexp --------------------------------------------------------------------------------


def _logsumexp_impl(x: Tensor, dim: int, temperature: float) -> Tensor:
    return _t(_s.logsumexp(_np(x), axis=dim, temperature=temperature))


_logsumexp = torch.library.custom_op("smax::logsumexp", mutates_args=(), device_types="cpu")(_logsumexp_impl)


@_logsumexp.register_fake
def _(x, dim, temperature):
    shape = list(x.shape)
    del shape[dim]
    return x.new_empty(shape)


def _lse_setup(ctx, inputs, output):
    x, ctx.dim, ctx.temperature = inputs
    ctx.save_for_backward(x)


def _lse_bwd(ctx, g):
    (x,) = ctx.saved_tensors
    p = (_normalize_impl if getattr(ctx, "eager", False) else _normalize)(x, ctx.dim, ctx.temperature, False)
    return p * (g.unsqueeze(ctx.dim) / ctx.temperature), None, None


_logsumexp.register_autograd(_lse_bwd, setup_context=_lse_setup)
_logsumexp_eager = _eager_function("LogSumExp", _logsumexp_impl, _lse_setup, _lse_bwd)


def logsumexp(x: Tensor, dim: int = -1, keepdim: bool = False, *, temperature: float = 1.0) -> Tensor:
    """``torch.logsumexp(x / temperature, dim)`` through smax, differentiable (the gradient is
    ``softmax(x/τ)/τ`` times the upstream gradient)."""
    if not _usable(x):
        r = torch.logsumexp(x / temperature, dim)
    else:
        r = _dispatch(_logsumexp, _logsumexp_eager, _logsumexp_impl, (x,), x, dim % max(x.dim(), 1), float(temperature))
    return r.unsqueeze(dim) if keepdim else r


# --- cross-entropy ----------------------------------------------------------------------------


def _cross_entropy_impl(
    logits: Tensor,
    target: Tensor,
    weight: Optional[Tensor],
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    z_loss: float,
    softcap: Optional[float],
    temperature: float,
    compute_grad: bool,
) -> tuple[Tensor, Tensor]:
    tn = _np(target) if target.is_floating_point() else target.detach().numpy()
    w = None if weight is None else weight.detach().to(torch.float32).numpy()
    r = _s.cross_entropy(
        _np(logits),
        tn,
        weight=w,
        ignore_index=ignore_index,
        reduction=reduction,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        softcap=softcap,
        temperature=temperature,
        return_grad=compute_grad,
    )
    loss, grad = (r[0], r[1]) if compute_grad else (r, None)
    loss_t = torch.as_tensor(np.asarray(loss, dtype=np.float64)).to(logits.dtype)
    return loss_t, (_t(grad) if grad is not None else logits.new_empty(0))


_cross_entropy = torch.library.custom_op("smax::cross_entropy", mutates_args=(), device_types="cpu")(
    _cross_entropy_impl
)


@_cross_entropy.register_fake
def _(logits, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap, temperature, compute_grad):
    loss = logits.new_empty((logits.shape[0],) if reduction == "none" else ())
    return loss, (torch.empty_like(logits) if compute_grad else logits.new_empty(0))


def _ce_setup(ctx, inputs, output):
    ctx.reduction = inputs[4]
    ctx.save_for_backward(output[1])
    ctx.mark_non_differentiable(output[1])


def _ce_bwd(ctx, g_loss, _g_grad):
    (grad,) = ctx.saved_tensors
    if grad.numel() == 0:
        raise RuntimeError("smax cross_entropy: the forward ran without a gradient (was grad mode off?)")
    scale = g_loss.unsqueeze(-1) if ctx.reduction == "none" else g_loss
    return grad * scale.to(grad.dtype), None, None, None, None, None, None, None, None, None


_cross_entropy.register_autograd(_ce_bwd, setup_context=_ce_setup)


def _ce_bwd_eager(ctx, g_loss, g_grad):
    # The gradient stays saved (a second backward through a retained graph, as gradcheck
    # runs, needs it again), so autograd copies it once into a fresh `.grad`.
    (grad,) = ctx.saved_tensors
    if ctx.reduction != "none" and grad.numel() and g_loss.item() == 1.0:
        # The loss is the graph's output: the fused gradient as it is, no pass over it.
        return grad, None, None, None, None, None, None, None, None, None
    return _ce_bwd(ctx, g_loss, g_grad)


_cross_entropy_eager = _eager_function("CrossEntropy", _cross_entropy_impl, _ce_setup, _ce_bwd_eager)


def cross_entropy(
    input: Tensor,
    target: Tensor,
    weight: Optional[Tensor] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    z_loss: float = 0.0,
    softcap: Optional[float] = None,
    temperature: float = 1.0,
) -> Tensor:
    """``F.cross_entropy`` with the gradient computed in the same pass as the loss (one read
    of the logits), plus PaLM's ``z_loss``, a logit ``softcap`` and a ``temperature``.

    Same arguments and semantics as PyTorch (class indices or probabilities; ``[N, C]`` or
    ``[N, C, d...]``; ``weight``; ``ignore_index``; ``label_smoothing``), except that a mean
    over zero non-ignored targets is 0 instead of NaN. The loss has the logits' dtype. The
    gradient flows to ``input`` only (not to probability targets or weights). Non-CPU
    tensors, and calls with z-loss/cap/temperature left at their defaults on them, use
    PyTorch's op.
    """
    if not _usable(input) or input.dim() == 0:
        if z_loss or softcap is not None or temperature != 1.0:
            raise NotImplementedError("z_loss, softcap and temperature need CPU tensors")
        return F.cross_entropy(
            input, target, weight, ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing
        )
    probs = target.is_floating_point()
    x = input
    if x.dim() == 1:
        x2 = x.unsqueeze(0)
        t2 = target.reshape(1, -1) if probs else target.reshape(1)
    elif x.dim() > 2:
        x2 = x.movedim(1, -1).reshape(-1, x.shape[1])
        t2 = target.movedim(1, -1).reshape(-1, x.shape[1]) if probs else target.reshape(-1)
    else:
        x2, t2 = x, target
    t2 = t2.to(x2.dtype) if probs else t2.to(torch.int64)
    need = torch.is_grad_enabled() and x.requires_grad
    loss, _ = _dispatch(
        _cross_entropy,
        _cross_entropy_eager,
        _cross_entropy_impl,
        (x2,),
        x2,
        t2.contiguous(),
        weight,
        int(ignore_index),
        reduction,
        float(label_smoothing),
        float(z_loss),
        None if softcap is None else float(softcap),
        float(temperature),
        need,
    )
    if reduction == "none":
        if x.dim() == 1:
            return loss.reshape(())
        if x.dim() > 2:
            return loss.reshape((x.shape[0],) + tuple(x.shape[2:]))
    return loss


class CrossEntropyLoss(torch.nn.Module):
    """Drop-in for ``torch.nn.CrossEntropyLoss`` backed by :func:`cross_entropy` (same
    constructor arguments, plus ``z_loss``, ``softcap`` and ``temperature``)."""

    def __init__(
        self,
        weight: Optional[Tensor] = None,
        size_average=None,
        ignore_index: int = -100,
        reduce=None,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        *,
        z_loss: float = 0.0,
        softcap: Optional[float] = None,
        temperature: float = 1.0,
    ):
        super().__init__()
        if size_average is not None or reduce is not None:
            reduction = torch.nn._reduction.legacy_get_string(size_average, reduce)
        self.register_buffer("weight", weight)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.softcap = softcap
        self.temperature = temperature

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return cross_entropy(
            input,
            target,
            self.weight,
            self.ignore_index,
            self.reduction,
            self.label_smoothing,
            z_loss=self.z_loss,
            softcap=self.softcap,
            temperature=self.temperature,
        )


# --- linear cross-entropy ---------------------------------------------------------------------


def _linear_ce_impl(
    h: Tensor,
    w: Tensor,
    target: Tensor,
    bias: Optional[Tensor],
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    z_loss: float,
    softcap: Optional[float],
    compute_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    b = None if bias is None else bias.detach().numpy()
    r = _s.linear_cross_entropy(
        h.detach().numpy(),
        w.detach().numpy(),
        target.detach().numpy(),
        b,
        ignore_index=ignore_index,
        reduction=reduction,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        softcap=softcap,
        return_grad=compute_grad,
    )
    empty = h.new_empty(0)
    if not compute_grad:
        return torch.as_tensor(np.asarray(r, np.float64)).to(h.dtype), empty, empty.clone(), empty.clone()
    loss, (dh, dw, db) = r
    return (
        torch.as_tensor(np.asarray(loss, np.float64)).to(h.dtype),
        torch.from_numpy(dh),
        torch.from_numpy(dw),
        torch.from_numpy(db) if db is not None else empty,
    )


_linear_ce = torch.library.custom_op("smax::linear_cross_entropy", mutates_args=(), device_types="cpu")(
    _linear_ce_impl
)


@_linear_ce.register_fake
def _(h, w, target, bias, ignore_index, reduction, label_smoothing, z_loss, softcap, compute_grad):
    loss = h.new_empty((h.shape[0],) if reduction == "none" else ())
    if not compute_grad:
        return loss, h.new_empty(0), h.new_empty(0), h.new_empty(0)
    db = torch.empty_like(bias) if bias is not None else h.new_empty(0)
    return loss, torch.empty_like(h), torch.empty_like(w), db


def _lce_setup(ctx, inputs, output):
    ctx.has_bias = inputs[3] is not None
    ctx.save_for_backward(*output[1:])
    ctx.mark_non_differentiable(*output[1:])


def _lce_bwd(ctx, g_loss, *_):
    dh, dw, db = ctx.saved_tensors
    if dh.numel() == 0 and dw.numel() == 0:
        raise RuntimeError("smax linear_cross_entropy: the forward ran without gradients (was grad mode off?)")
    g = g_loss.to(dh.dtype)
    return dh * g, dw * g, None, (db * g if ctx.has_bias else None), None, None, None, None, None, None


_linear_ce.register_autograd(_lce_bwd, setup_context=_lce_setup)


def _lce_bwd_eager(ctx, g_loss, *rest):
    # As `_ce_bwd_eager`: the gradients stay saved for a second backward.
    dh, dw, db = ctx.saved_tensors
    if (dh.numel() or dw.numel()) and g_loss.item() == 1.0:
        # The loss is the graph's output: the gradients of the forward as they are.
        return dh, dw, None, (db if ctx.has_bias else None), None, None, None, None, None, None
    return _lce_bwd(ctx, g_loss, *rest)


_linear_ce_eager = _eager_function("LinearCrossEntropy", _linear_ce_impl, _lce_setup, _lce_bwd_eager)


def linear_cross_entropy(
    h: Tensor,
    w: Tensor,
    target: Tensor,
    bias: Optional[Tensor] = None,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: Optional[float] = None,
) -> Tensor:
    """``F.cross_entropy(h @ w.T + bias, target)`` without forming the ``[N, V]`` logits
    (Cut Cross-Entropy): the forward computes the loss and the gradients for ``h``, ``w`` and
    ``bias`` in one tiled pass holding one tile of logits; the backward scales them. ``h`` is
    ``[..., D]``, ``w`` ``[V, D]``, ``target`` ``[...]``. Computed in float32 (other dtypes are
    converted and the gradients converted back). ``reduction="none"`` is forward-only (a
    per-row upstream gradient cannot be applied to the precomputed ``dw``). Non-CPU tensors use
    the materialised ``F.cross_entropy``.
    """
    if not _usable(h, w, bias):
        logits = F.linear(h, w, bias)
        if softcap is not None:
            logits = softcap * torch.tanh(logits / softcap)
        return F.cross_entropy(
            logits.reshape(-1, w.shape[0]).float(),
            target.reshape(-1),
            ignore_index=ignore_index,
            reduction=reduction,
            label_smoothing=label_smoothing,
        )
    need = torch.is_grad_enabled() and (h.requires_grad or w.requires_grad or (bias is not None and bias.requires_grad))
    if need and reduction == "none":
        raise NotImplementedError("linear_cross_entropy with reduction='none' is forward-only; use 'mean' or 'sum'")
    dtype = h.dtype
    h2 = h.reshape(-1, h.shape[-1]).to(torch.float32).contiguous()
    w2 = w.to(torch.float32).contiguous()
    b2 = None if bias is None else bias.to(torch.float32).contiguous()
    loss, *_ = _dispatch(
        _linear_ce,
        _linear_ce_eager,
        _linear_ce_impl,
        (h2, w2, b2),
        h2,
        w2,
        target.reshape(-1).to(torch.int64).contiguous(),
        b2,
        int(ignore_index),
        reduction,
        float(label_smoothing),
        float(z_loss),
        None if softcap is None else float(softcap),
        need,
    )
    loss = loss.to(dtype)
    return loss.reshape(h.shape[:-1]) if reduction == "none" else loss


class LinearCrossEntropyLoss(torch.nn.Module):
    """``loss(h, w, target, bias=None)``: :func:`linear_cross_entropy` as a module (the
    classifier weight is an argument so it can stay tied to the embedding)."""

    def __init__(
        self,
        ignore_index: int = -100,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        *,
        z_loss: float = 0.0,
        softcap: Optional[float] = None,
    ):
        super().__init__()
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.softcap = softcap

    def forward(self, h: Tensor, w: Tensor, target: Tensor, bias: Optional[Tensor] = None) -> Tensor:
        return linear_cross_entropy(
            h,
            w,
            target,
            bias,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
            z_loss=self.z_loss,
            softcap=self.softcap,
        )


# --- scaled dot-product attention -------------------------------------------------------------


def _attn_kwargs(mask: Optional[Tensor], is_causal: bool, scale: Optional[float]):
    kw = {"causal": is_causal, "scale": scale, "query_offset": 0}
    if mask is not None:
        if mask.dtype == torch.bool:
            kw["mask"] = mask.detach().numpy()
        else:
            kw["bias"] = mask.detach().to(torch.float32).numpy()
    return kw


def _sdpa_impl(
    q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], is_causal: bool, scale: Optional[float]
) -> tuple[Tensor, Tensor]:
    out, lse = _s.attention(_np(q), _np(k), _np(v), return_lse=True, **_attn_kwargs(mask, is_causal, scale))
    return _t(out), torch.from_numpy(lse)


_sdpa = torch.library.custom_op("smax::sdpa", mutates_args=(), device_types="cpu")(_sdpa_impl)


@_sdpa.register_fake
def _(q, k, v, mask, is_causal, scale):
    return q.new_empty(q.shape), q.new_empty(q.shape[:-1], dtype=torch.float32)


def _sdpa_backward_impl(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    d_out: Tensor,
    mask: Optional[Tensor],
    is_causal: bool,
    scale: Optional[float],
) -> tuple[Tensor, Tensor, Tensor]:
    grads = _s.attention_backward(
        _np(q), _np(k), _np(v), _np(out), lse.numpy(), _np(d_out.to(q.dtype)), **_attn_kwargs(mask, is_causal, scale)
    )
    return tuple(_t(g) for g in grads)


_sdpa_backward = torch.library.custom_op("smax::sdpa_backward", mutates_args=(), device_types="cpu")(
    _sdpa_backward_impl
)


@_sdpa_backward.register_fake
def _(q, k, v, out, lse, d_out, mask, is_causal, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _sdpa_setup(ctx, inputs, output):
    q, k, v, mask, ctx.is_causal, ctx.scale = inputs
    ctx.save_for_backward(q, k, v, mask if mask is not None else q.new_empty(0), *output)
    ctx.has_mask = mask is not None
    ctx.mark_non_differentiable(output[1])


def _sdpa_bwd(ctx, d_out, _d_lse):
    q, k, v, mask, out, lse = ctx.saved_tensors
    m = mask if ctx.has_mask else None
    back = _sdpa_backward_impl if getattr(ctx, "eager", False) else _sdpa_backward
    dq, dk, dv = back(q, k, v, out, lse, d_out.contiguous(), m, ctx.is_causal, ctx.scale)
    return dq, dk, dv, None, None, None


_sdpa.register_autograd(_sdpa_bwd, setup_context=_sdpa_setup)
_sdpa_eager = _eager_function("Sdpa", _sdpa_impl, _sdpa_setup, _sdpa_bwd)


def scaled_dot_product_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
) -> Tensor:
    """``F.scaled_dot_product_attention`` through smax's flash kernels (forward and backward;
    the score matrix is never stored). ``[B, H, L, E]`` or ``[H, L, E]`` tensors, float32,
    float16 or bfloat16; ``attn_mask`` boolean (``True`` = attend) or additive float (no
    gradient flows to it); ``is_causal`` with PyTorch's top-left alignment; grouped-query
    heads with ``enable_gqa``. A query row that sees no key gives 0 (PyTorch gives NaN).
    Dropout, non-CPU tensors and float64 use PyTorch's op.
    """
    if dropout_p or not _usable(query, key, value) or query.dtype == torch.float64 or query.dim() not in (3, 4):
        return F.scaled_dot_product_attention(
            query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa
        )
    if key.shape[-3] != query.shape[-3] and not enable_gqa:
        raise ValueError("query and key have different head counts; pass enable_gqa=True for grouped-query attention")
    if attn_mask is not None and attn_mask.device.type != "cpu":
        raise ValueError("attn_mask must be on the CPU with the other tensors")
    args = (query, key, value, attn_mask, bool(is_causal), None if scale is None else float(scale))
    out, _ = _dispatch(_sdpa, _sdpa_eager, _sdpa_impl, (query, key, value), *args)
    return out
