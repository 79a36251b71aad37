"""smax: the softmax family, exact and fast, on NumPy arrays.

Every function takes float32, float64, float16 and bfloat16 (``ml_dtypes.bfloat16``) arrays
(attention: all but float64; the linear cross-entropy: float32) and computes in float32 or
wider (float64 input in float64). Arrays are used in place whenever smax's layouts express
their strides: the last axis of any array whose other axes collapse into evenly spaced rows
(a C array, a sliced matrix, a Fortran array's first axis), and any axis of a C-contiguous
array. Other arrays (negative strides, broadcasts, non-native byte order) are copied once.
Integer and bool input is converted to float64, as SciPy does.

The GIL is released while a kernel runs, so Python threads calling smax at once run in
parallel. ``set_num_threads(n)`` runs every call on a dedicated pool of ``n`` threads; results
are bitwise identical for every thread count.

Errors in the input (a target out of range, a bad parameter, a shape mismatch) raise
:class:`SmaxError`, a ``ValueError`` carrying smax's message; an unsupported dtype raises
``TypeError``.

PyTorch users: :mod:`smax.torch` registers the same kernels as autograd-aware custom ops.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import NamedTuple

import ml_dtypes  # registers NumPy's bfloat16 dtype, which the native module reads
import numpy as np

from . import _smax
from ._smax import SmaxError, get_num_threads, set_num_threads, simd_level

__all__ = [
    "SmaxError",
    "set_num_threads",
    "get_num_threads",
    "simd_level",
    "bfloat16",
    "softmax",
    "log_softmax",
    "logsumexp",
    "softmax_backward",
    "log_softmax_backward",
    "cross_entropy",
    "linear_cross_entropy",
    "attention",
    "attention_backward",
    "sample",
    "process",
    "fit_temperature",
    "calibration_error",
    "brier_score",
    "ood_scores",
    "TemperatureFit",
    "Calibration",
    "gate",
    "GateStats",
    "Quantizer",
    "quantize",
    "dequantize",
    "QuantReport",
]

__version__ = "0.1.0"

bfloat16 = np.dtype(ml_dtypes.bfloat16)
_FLOATS = (np.dtype(np.float32), np.dtype(np.float64), np.dtype(np.float16), bfloat16)


def _float_array(x, name: str = "x") -> np.ndarray:
    """`x` as an array of a dtype smax computes in, in native byte order."""
    a = np.asarray(x)
    if a.dtype.kind in "biu":
        return a.astype(np.float64)
    native = a.dtype.newbyteorder("=") if a.dtype.byteorder not in "=|" else a.dtype
    if native not in _FLOATS:
        raise TypeError(f"{name}: smax takes float32, float64, float16 or bfloat16 arrays, not {a.dtype}")
    return a.astype(native) if native != a.dtype else a


def _copied(r):
    """The result of a call on contiguous copies, which always have a smax layout."""
    if r is None or r is False:
        raise RuntimeError("smax: no layout for a C-contiguous array (a bug; please report it)")
    return r


def _temperature(t) -> float:
    if not isinstance(t, numbers.Real):
        raise TypeError(f"temperature must be a real number, not {type(t).__name__}")
    return float(t)


def _check_out(out, shape, dtype, name: str = "out") -> np.ndarray:
    if not isinstance(out, np.ndarray):
        raise TypeError(f"{name} must be a NumPy array")
    if out.shape != tuple(shape) or out.dtype != dtype:
        raise ValueError(f"{name} must have shape {tuple(shape)} and dtype {dtype}, not {out.shape} {out.dtype}")
    return out


def _normalize(op, x, axis, temperature, masked_row, out):
    x = _float_array(x)
    if axis is None:
        flat = softmax if op == "softmax" else log_softmax
        r = flat(x.reshape(-1), axis=0, temperature=temperature, masked_row=masked_row)
        r = r.reshape(x.shape)
        if out is None:
            return r
        _check_out(out, x.shape, x.dtype)[...] = r
        return out
    if x.ndim == 0:
        r = _normalize(op, x.reshape(1), 0, temperature, masked_row, None).reshape(())
        if out is None:
            return r
        _check_out(out, x.shape, x.dtype)[...] = r
        return out
    target = np.empty_like(x) if out is None else _check_out(out, x.shape, x.dtype)
    t = _temperature(temperature)
    if _smax.normalize(op, x, target, axis, t, masked_row):
        return target
    # No smax layout expresses these strides: one contiguous copy, then back into `target`.
    xc = np.ascontiguousarray(x)
    tmp = np.empty_like(xc)
    _copied(_smax.normalize(op, xc, tmp, axis, t, masked_row))
    target[...] = tmp
    return target


def softmax(x, axis=-1, *, temperature=1.0, masked_row="nan", out=None):
    """``exp(x/τ) / Σ exp(x/τ)`` over ``axis`` (``None``: over every element, as SciPy).

    Matches ``scipy.special.softmax`` (float64: within a few ULP). Each row is shifted by its
    maximum before the exponent, so no finite input overflows; ``-inf`` entries give exactly 0;
    a row with NaN gives NaN; a row whose entries are all ``-inf`` gives NaN (``masked_row=
    "nan"``, PyTorch's answer) or zeros (``"zero"``). float32/float16/bfloat16 compute in f32
    with a relative error of a few ULP of f32 per entry (results below 2⁻¹²⁶ flush to +0);
    float64 in f64.

    ``out`` may be ``x`` itself (in place). Returns the result (``out`` when given).
    """
    return _normalize("softmax", x, axis, temperature, masked_row, out)


def log_softmax(x, axis=-1, *, temperature=1.0, masked_row="nan", out=None):
    """``x/τ − logsumexp(x/τ)`` over ``axis``; matches ``scipy.special.log_softmax``.

    ``-inf`` entries stay ``-inf``; an all-``-inf`` row gives NaN (``masked_row="nan"``) or
    ``-inf`` (``"zero"``). Error: a few ULP of the result's magnitude (absolute, near 0).
    """
    return _normalize("log_softmax", x, axis, temperature, masked_row, out)


def logsumexp(x, axis=-1, *, temperature=1.0, keepdims=False, out=None):
    """``log Σ exp(x/τ)`` over ``axis`` (an int, a tuple of ints, or ``None`` for all).

    With a ``temperature`` τ the result is not multiplied back by τ.
    Matches ``scipy.special.logsumexp`` without its ``b``/``return_sign`` arguments: an empty
    or all-``-inf`` row gives ``-inf``, ``+inf`` in a row gives ``+inf``, NaN gives NaN.
    Computed in one pass (online) or two, in f32 for float32/16/bfloat16 (a few ULP).
    """
    x = _float_array(x)
    if axis is None or isinstance(axis, tuple):
        axes = tuple(range(x.ndim)) if axis is None else tuple(a % max(x.ndim, 1) for a in axis)
        rest = [a for a in range(x.ndim) if a not in axes]
        moved = np.transpose(x, rest + list(axes)).reshape([x.shape[a] for a in rest] + [-1])
        r = logsumexp(moved, -1, temperature=temperature)
        if keepdims:
            r = r.reshape([1 if a in axes else n for a, n in enumerate(x.shape)])
        if out is None:
            return r
        _check_out(out, r.shape, x.dtype)[...] = r
        return out
    if x.ndim == 0:
        x = x.reshape(1)
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(f"axis {axis} is out of bounds for an array of dimension {x.ndim}")
    ax = axis % x.ndim
    reduced = x.shape[:ax] + x.shape[ax + 1 :]
    target = np.empty(reduced, dtype=x.dtype)
    t = _temperature(temperature)
    if not _smax.logsumexp(x, target, axis, t):
        _copied(_smax.logsumexp(np.ascontiguousarray(x), target, axis, t))
    r = np.expand_dims(target, ax) if keepdims else target
    if out is None:
        return r
    _check_out(out, r.shape, x.dtype)[...] = r
    return out


def _backward(op, y, dy, axis, temperature, out):
    y, dy = _float_array(y, "y"), _float_array(dy, "dy")
    if y.shape != dy.shape or y.dtype != dy.dtype:
        raise ValueError(f"y {y.shape} {y.dtype} and dy {dy.shape} {dy.dtype} must match")
    target = np.empty_like(y) if out is None else _check_out(out, y.shape, y.dtype)
    t = _temperature(temperature)
    if y.ndim == 0:
        return _backward(op, y.reshape(1), dy.reshape(1), 0, t, None).reshape(())
    if _smax.normalize_backward(op, y, dy, target, axis, t):
        return target
    yc, dc = np.ascontiguousarray(y), np.ascontiguousarray(dy)
    tmp = np.empty_like(yc)
    _copied(_smax.normalize_backward(op, yc, dc, tmp, axis, t))
    target[...] = tmp
    return target


def softmax_backward(y, dy, axis=-1, *, temperature=1.0, out=None):
    """``∂L/∂x`` of ``y = softmax(x/τ)`` given ``dy = ∂L/∂y``: ``y ⊙ (dy − Σ dy ⊙ y) / τ``.

    The dot product accumulates in f32 with a compensated sum (f64 for float64). ``out`` may
    be ``dy`` (in place).
    """
    return _backward("softmax", y, dy, axis, temperature, out)


def log_softmax_backward(y, dy, axis=-1, *, temperature=1.0, out=None):
    """``∂L/∂x`` of ``y = log_softmax(x/τ)`` given ``dy``: ``(dy − exp(y)·Σ dy) / τ``."""
    return _backward("log_softmax", y, dy, axis, temperature, out)


def _targets_for(logits2d, target, ndim_logits, class_axis_moved):
    """Class targets as a flat int64 array, or probabilities in the logits' 2-D form."""
    t = np.asarray(target)
    if t.dtype.kind in "iu":
        return np.ascontiguousarray(t.reshape(-1), dtype=np.int64), False
    t = _float_array(t, "target").astype(logits2d.dtype, copy=False)
    if ndim_logits == 1:
        t = t.reshape(1, -1)
    elif class_axis_moved:
        t = np.moveaxis(t, 1, -1).reshape(logits2d.shape)
    return t, True


def cross_entropy(
    logits,
    target,
    *,
    weight=None,
    ignore_index=-100,
    reduction="mean",
    label_smoothing=0.0,
    z_loss=0.0,
    softcap=None,
    temperature=1.0,
    grad_scale=1.0,
    return_grad=False,
    return_lse=False,
):
    """Fused softmax cross-entropy with PyTorch's ``F.cross_entropy`` semantics.

    ``logits`` is ``[C]``, ``[N, C]`` or ``[N, C, d1, ...]`` (classes on axis 1, as PyTorch);
    ``target`` holds class indices (any integer dtype, ``[N, d1, ...]``) or probabilities
    (``logits``' shape). ``weight`` (per class, used as float32), ``ignore_index``, ``reduction`` (``"mean"``
    divides by the summed weight of the non-ignored rows, as PyTorch; a mean over no valid row
    is 0, not PyTorch's NaN) and ``label_smoothing`` follow PyTorch. Extras: ``z_loss`` λ adds
    PaLM's ``λ·lse²`` per row (included in the returned loss and gradient), ``softcap`` c maps
    logits to ``c·tanh(x/c)`` first (Gemma 2), ``temperature`` divides them after the cap.

    Returns the loss (a float, or a float64 array ``[N, d1, ...]`` for ``reduction="none"``),
    then, when asked, the gradient ``∂loss/∂logits`` (``grad_scale`` times it, the logits'
    shape and dtype; computed in the same pass) and the per-row log-sum-exp (float64).
    Accuracy: the loss within a few roundings of the compute type of ``lse`` and the target
    logit; gradient entries to a few ULP. ``[N, C, d...]`` inputs are copied once to put the
    classes last.
    """
    x = _float_array(logits, "logits")
    if x.ndim == 0:
        raise ValueError("logits must have a class axis")
    moved = x.ndim > 2
    if x.ndim == 1:
        x2 = x.reshape(1, -1)
    elif moved:
        x2 = np.ascontiguousarray(np.moveaxis(x, 1, -1)).reshape(-1, x.shape[1])
    else:
        x2 = x
    t, probs = _targets_for(x2, target, x.ndim, moved)
    rows = x2.shape[0]
    if not probs and t.size != rows:
        raise ValueError(f"target holds {t.size} class indices but the logits have {rows} rows")
    w = None if weight is None else np.ascontiguousarray(weight, dtype=np.float32).reshape(-1)
    grad = np.empty_like(x2) if return_grad else None
    loss_rows = np.empty(rows, np.float64) if reduction == "none" else None
    z_rows = np.empty(rows, np.float64) if reduction == "none" and z_loss else None
    lse = np.empty(rows, np.float64) if return_lse else None
    args = (
        int(ignore_index),
        reduction,
        float(label_smoothing),
        float(z_loss),
        None if softcap is None else float(softcap),
        _temperature(temperature),
        float(grad_scale),
    )
    r = _smax.cross_entropy(x2, t, w, *args, grad, loss_rows, z_rows, lse)
    if r is None:
        x2 = np.ascontiguousarray(x2)
        t = np.ascontiguousarray(t) if probs else t
        g2 = np.empty_like(x2) if return_grad else None
        r = _copied(_smax.cross_entropy(x2, t, w, *args, g2, loss_rows, z_rows, lse))
        if return_grad:
            grad[...] = g2
    loss, zl, _, _ = r
    if reduction == "none":
        per = loss_rows + (z_rows if z_rows is not None else 0.0)
        batch_shape = () if x.ndim == 1 else (x.shape[:1] + x.shape[2:] if moved else x.shape[:1])
        out = per.reshape(batch_shape)
    else:
        out = loss + zl
    extras = []
    if return_grad:
        if x.ndim == 1:
            g = grad.reshape(x.shape)
        elif moved:
            g = np.moveaxis(grad.reshape((x.shape[0],) + x.shape[2:] + (x.shape[1],)), -1, 1)
        else:
            g = grad
        extras.append(g)
    if return_lse:
        extras.append(lse.reshape(() if x.ndim == 1 else (x.shape[:1] + x.shape[2:] if moved else x.shape[:1])))
    return (out, *extras) if extras else out


def linear_cross_entropy(
    h,
    w,
    target,
    bias=None,
    *,
    ignore_index=-100,
    reduction="mean",
    label_smoothing=0.0,
    z_loss=0.0,
    softcap=None,
    grad_scale=1.0,
    return_grad=False,
    return_lse=False,
):
    """Cross-entropy of ``logits = h @ w.T + bias`` without forming the ``[N, V]`` logits
    (Cut Cross-Entropy, Wijmans et al. 2024): tiles of logits live in a small scratch, and the
    gradients for ``h``, ``w`` and ``bias`` come from the same pass.

    float32; ``h`` is ``[..., D]`` (flattened to ``N`` rows), ``w`` is ``[V, D]``, ``target``
    ``[...]`` integer classes. Options as :func:`cross_entropy` (no temperature). Returns the
    loss, then ``(dh, dw, dbias)`` when ``return_grad`` (``dbias`` is ``None`` without a bias)
    and the per-row log-sum-exp when ``return_lse``. Exact: the same loss and gradients as
    :func:`cross_entropy` on the materialised logits, to f32 rounding of the products.
    """
    h = np.asarray(h)
    batch_shape = h.shape[:-1]
    h2 = np.ascontiguousarray(h.reshape(-1, h.shape[-1]), dtype=np.float32)
    w2 = np.ascontiguousarray(w, dtype=np.float32)
    t = np.ascontiguousarray(np.asarray(target).reshape(-1), dtype=np.int64)
    b = None if bias is None else np.ascontiguousarray(bias, dtype=np.float32)
    n = h2.shape[0]
    dh = np.empty_like(h2) if return_grad else None
    dw = np.empty_like(w2) if return_grad else None
    db = np.empty_like(b) if return_grad and b is not None else None
    loss_rows = np.empty(n, np.float64) if reduction == "none" else None
    z_rows = np.empty(n, np.float64) if reduction == "none" and z_loss else None
    lse = np.empty(n, np.float64) if return_lse else None
    loss, zl, _, _ = _smax.linear_cross_entropy(
        h2,
        w2,
        t,
        b,
        int(ignore_index),
        reduction,
        float(label_smoothing),
        float(z_loss),
        None if softcap is None else float(softcap),
        float(grad_scale),
        dh,
        dw,
        db,
        loss_rows,
        z_rows,
        lse,
    )
    out = (loss_rows + (z_rows if z_rows is not None else 0.0)).reshape(batch_shape) if reduction == "none" else loss + zl
    extras = []
    if return_grad:
        extras.append((dh.reshape(h.shape), dw, db))
    if return_lse:
        extras.append(lse.reshape(batch_shape))
    return (out, *extras) if extras else out


def _heads(a, layout, name):
    """A `[b, h, s, d]`-ordered view of an attention operand (no copy where strides allow)."""
    a = _float_array(a, name)
    if a.ndim == 3:
        a = a[None]
    if a.ndim != 4:
        raise ValueError(f"{name} must be [batch, heads, tokens, head_dim] (or without the batch axis)")
    if layout == "bshd":
        a = a.transpose(0, 2, 1, 3)
    elif layout != "bhsd":
        raise ValueError(f"layout must be 'bhsd' or 'bshd', not {layout!r}")
    if a.shape[3] > 1 and a.strides[3] != a.itemsize or any(s < 0 for s in a.strides):
        a = np.ascontiguousarray(a)
    return a


def _scores(a, shape, dtype, name):
    """A bias or mask broadcast to the `[b, hq, sq, skv]` score shape (stride 0 where broadcast)."""
    if a is None:
        return None
    a = np.broadcast_to(np.asarray(a, dtype=dtype), shape)
    if shape[3] > 1 and a.strides[3] != a.itemsize:
        a = np.ascontiguousarray(a)
    return a


def _attention_args(q, k, v, layout, causal, scale, window, softcap, temperature, query_offset, bias, mask):
    squeeze = np.asarray(q).ndim == 3
    q, k, v = _heads(q, layout, "q"), _heads(k, layout, "k"), _heads(v, layout, "v")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError("q, k and v must share one dtype")
    sshape = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    if window is not None:
        window = (int(window[0]), int(window[1]))
    opts = (
        bool(causal),
        None if scale is None else float(scale),
        window,
        None if softcap is None else float(softcap),
        _temperature(temperature),
        None if query_offset is None else int(query_offset),
    )
    scores = {"bias": _scores(bias, sshape, np.float32, "bias"), "mask": _scores(mask, sshape, np.bool_, "mask")}
    return q, k, v, opts, scores, squeeze


def _unlayout(a, layout, squeeze):
    if layout == "bshd":
        a = a.transpose(0, 2, 1, 3)
    return a[0] if squeeze else a


def attention(
    q,
    k,
    v,
    *,
    layout="bhsd",
    causal=False,
    scale=None,
    window=None,
    softcap=None,
    temperature=1.0,
    query_offset=None,
    bias=None,
    mask=None,
    return_lse=False,
):
    """Flash attention ``softmax(q·kᵀ·scale + bias) · v`` without forming the score matrix.

    ``q`` is ``[B, Hq, Sq, D]`` (``layout="bhsd"``) or ``[B, Sq, Hq, D]`` (``"bshd"``), or
    either without ``B``; ``k``, ``v`` likewise with ``Hkv`` heads (``Hq`` a multiple:
    grouped-query attention). ``scale`` defaults to ``1/sqrt(D)``; ``causal`` uses
    bottom-right alignment (the last query sees the last key); ``window=(left, right)`` keeps
    keys ``p − left ..= p + right``; ``softcap`` c maps scores to ``c·tanh(s/c)`` (Gemma 2);
    ``bias`` (float) and ``mask`` (bool, ``True`` = attend, PyTorch's SDPA convention)
    broadcast to ``[B, Hq, Sq, Skv]``; ``temperature`` divides the scores last. A query that
    sees no key gets 0. float32/float16/bfloat16, accumulated in f32.

    Returns ``out`` in ``q``'s layout (for ``"bshd"`` a transposed view of a contiguous
    ``[B, Hq, Sq, D]`` buffer) and, with ``return_lse``, the per-query log-sum-exp of the
    scores (float32 ``[B, Hq, Sq]``) that :func:`attention_backward` takes.
    """
    q, k, v, opts, scores, squeeze = _attention_args(
        q, k, v, layout, causal, scale, window, softcap, temperature, query_offset, bias, mask
    )
    out = np.empty(q.shape, q.dtype)
    lse = np.empty(q.shape[:3], np.float32)
    _smax.attention(q, k, v, out, lse, *opts, **scores)
    o = _unlayout(out, layout, squeeze)
    if return_lse:
        return o, (lse[0] if squeeze else lse)
    return o


def attention_backward(
    q,
    k,
    v,
    out,
    lse,
    d_out,
    *,
    layout="bhsd",
    causal=False,
    scale=None,
    window=None,
    softcap=None,
    temperature=1.0,
    query_offset=None,
    bias=None,
    mask=None,
):
    """Gradients ``(dq, dk, dv)`` of :func:`attention` (FlashAttention-2's backward: the score
    tiles are recomputed from ``lse``, never stored). Pass the forward's options, ``out`` and
    ``lse``; ``d_out`` is ``∂L/∂out`` in the same layout. Grouped heads' ``dk``/``dv`` are
    summed. Returned in the operands' layout.
    """
    q, k, v, opts, scores, squeeze = _attention_args(
        q, k, v, layout, causal, scale, window, softcap, temperature, query_offset, bias, mask
    )
    o4 = _heads(out, layout, "out")
    d4 = _heads(d_out, layout, "d_out")
    o4 = np.ascontiguousarray(o4, dtype=q.dtype)
    d4 = np.ascontiguousarray(d4, dtype=q.dtype)
    l4 = np.ascontiguousarray(np.asarray(lse, np.float32).reshape(q.shape[:3]))
    dq = np.empty(q.shape, q.dtype)
    dk = np.empty(k.shape, q.dtype)
    dv = np.empty(v.shape, q.dtype)
    _smax.attention_backward(q, k, v, o4, l4, d4, dq, dk, dv, *opts, **scores)
    return tuple(_unlayout(g, layout, squeeze) for g in (dq, dk, dv))


def _rows2d(logits):
    x = _float_array(logits, "logits")
    if x.ndim == 0:
        raise ValueError("logits must have a vocabulary axis")
    return x, x.reshape(-1, x.shape[-1]) if x.ndim != 2 else x


def sample(logits, *, temperature=1.0, top_k=None, top_p=None, min_p=None, seed=0, step=0, uniforms=None):
    """One token per row of ``logits`` (``[..., V]``) after temperature (0: greedy argmax,
    lowest index on ties), top-k, top-p (nucleus) and min-p, renormalised over the kept set.

    Exact: every decision is taken in f64 over the true distribution (no approximate
    top-p). The draw is ``uniforms`` (one per row, in ``[0, 1)``) or smax's counter-based
    generator keyed by a seed per row and ``step``: ``seed`` is one per row (a request's own
    seed), or an int ``s`` that gives row ``r`` the seed ``s·2³² + r`` (independent draws
    across the batch; a shared seed would give every row the same uniform). A row's token
    depends only on its logits, parameters, seed and step: not on its batch neighbours or the
    thread count. NaN or ``+inf`` logits, or a row with every token masked, raise :class:`SmaxError`.
    Returns int64 token ids of shape ``logits.shape[:-1]``.
    """
    x, x2 = _rows2d(logits)
    rows = x2.shape[0]
    tokens = np.empty(rows, np.uint32)
    if np.ndim(seed) == 0:
        # One seed for the call: a distinct seed per row, so the rows draw independently.
        seeds = (np.uint64(int(seed) % 2**64) << np.uint64(32)) + np.arange(rows, dtype=np.uint64)
    else:
        seeds = np.ascontiguousarray(np.asarray(seed, dtype=np.uint64).reshape(-1))
    u = None if uniforms is None else np.ascontiguousarray(np.asarray(uniforms, np.float64).reshape(-1))
    opts = (float(temperature), _opt_int(top_k), _opt_float(top_p), _opt_float(min_p))
    if not _smax.sample(x2, tokens, *opts, seeds, int(step), u):
        _copied(_smax.sample(np.ascontiguousarray(x2), tokens, *opts, seeds, int(step), u))
    return tokens.astype(np.int64).reshape(x.shape[:-1])


def _opt_int(v):
    return None if v is None else int(v)


def _opt_float(v):
    return None if v is None else float(v)


def process(logits, *, temperature=1.0, top_k=None, top_p=None, min_p=None, log=False, dtype=np.float32):
    """The distribution :func:`sample` draws from: probabilities (``log=False``; 0 outside the
    kept set) or log-probabilities (``-inf`` outside), renormalised over the kept set, as
    float32 or float64 of ``logits``' shape."""
    x, x2 = _rows2d(logits)
    out = np.empty(x2.shape, np.dtype(dtype))
    opts = (float(temperature), _opt_int(top_k), _opt_float(top_p), _opt_float(min_p))
    if _smax.process(x2, out, bool(log), *opts) is None:
        _copied(_smax.process(np.ascontiguousarray(x2), out, bool(log), *opts))
    return out.reshape(x.shape)


class TemperatureFit(NamedTuple):
    """The result of :func:`fit_temperature`."""

    temperature: float
    nll_before: float
    nll_after: float
    iterations: int
    converged: bool
    capped: bool


class Calibration(NamedTuple):
    """The result of :func:`calibration_error`: ECE (L1), its L2 form, MCE and the
    reliability table, one ``(lo, hi, count, accuracy, confidence)`` per bin."""

    ece: float
    ece_l2: float
    mce: float
    bins: list


def _labels(labels):
    return np.ascontiguousarray(np.asarray(labels).reshape(-1), dtype=np.int64)


def _with_rows(f, logits, *args):
    x, x2 = _rows2d(logits)
    r = f(x2, *args)
    return r if r is not None else _copied(f(np.ascontiguousarray(x2), *args))


def fit_temperature(logits, labels, *, t_min=1e-3, t_max=1e3):
    """Temperature scaling (Guo et al. 2017): the ``T`` in ``[t_min, t_max]`` minimising the
    mean NLL of ``softmax(logits/T)``, by Newton's method on ``1/T`` (the NLL is convex in it)
    with bisection as a fallback, in f64. Returns a :class:`TemperatureFit`."""
    return TemperatureFit(*_with_rows(_smax.fit_temperature, logits, _labels(labels), float(t_min), float(t_max)))


def calibration_error(logits, labels, *, bins=15, binning="width"):
    """Expected and maximum calibration error of ``softmax(logits)`` (Guo et al. 2017):
    confidence ``max p``, correct when the argmax (lowest index on ties) is the label;
    ``bins`` equal-width (``"width"``; closed on the right, ``(k/M, (k+1)/M]``, so a
    confidence of 1 lands in the last bin) or equal-count (``"mass"``) bins. Returns a :class:`Calibration`."""
    return Calibration(*_with_rows(_smax.calibration_error, logits, _labels(labels), int(bins), binning))


def brier_score(logits, labels):
    """The multi-class Brier score ``mean_i Σ_k (p_ik − [k = y_i])²`` of ``softmax(logits)``."""
    return _with_rows(_smax.brier_score, logits, _labels(labels))


def ood_scores(logits, score="msp", *, temperature=1.0):
    """Per-row out-of-distribution scores (higher = more in-distribution): ``"msp"`` (maximum
    softmax probability, Hendrycks & Gimpel 2017), ``"max_logit"``, or ``"energy"`` (the
    negative energy ``T·logsumexp(z/T)``, Liu et al. 2020). float64 ``logits.shape[:-1]``."""
    x, x2 = _rows2d(logits)
    out = np.empty(x2.shape[0], np.float64)
    if not _smax.ood_scores(x2, out, score, float(temperature)):
        _copied(_smax.ood_scores(np.ascontiguousarray(x2), out, score, float(temperature)))
    return out.reshape(x.shape[:-1])


class GateStats(NamedTuple):
    """Load-balancing statistics of :func:`gate`: assignments per expert, the mean router
    probability per expert, and the Switch Transformer auxiliary loss without its coefficient
    (``E·Σ f_i·P_i``, 1 when balanced)."""

    tokens_per_expert: list
    mean_prob: list
    aux_loss: float


def gate(
    logits,
    k=2,
    *,
    order="softmax_topk",
    renormalize=False,
    temperature=1.0,
    activation="identity",
    threshold=None,
    routed_scaling_factor=1.0,
    bias=None,
):
    """Mixture-of-experts routing of each token (row of ``logits``, ``[tokens, experts]``) to
    ``k`` experts, in f64.

    ``order="softmax_topk"`` takes the softmax over every expert and keeps the top k (Switch,
    GShard, Mixtral; ``renormalize=True`` divides the kept weights by their sum);
    ``"topk_softmax"`` keeps the top k logits and takes the softmax over them (Shazeer et al.
    2017). ``bias`` (one per expert) shifts the selection only (DeepSeek-V3's correction bias);
    ``activation`` (``"tanh"``, ``"sigmoid"``) and ``temperature`` transform the logits first;
    ``threshold`` drops weights below it and renormalises (the largest is kept);
    ``routed_scaling_factor`` multiplies the final weights. Ties go to the lower index.

    Returns ``(experts, weights, stats)``: int64 and float32 ``[tokens, k]`` (best first) and
    :class:`GateStats`.
    """
    x = _float_array(logits, "logits")
    if x.ndim != 2:
        raise ValueError("logits must be 2-D [tokens, experts]")
    experts = np.empty((x.shape[0], int(k)), np.uint32)
    weights = np.empty((x.shape[0], int(k)), np.float32)
    b = None if bias is None else np.ascontiguousarray(bias, dtype=np.float32).reshape(-1)
    args = (
        int(k),
        order,
        bool(renormalize),
        float(temperature),
        activation,
        None if threshold is None else float(threshold),
        float(routed_scaling_factor),
    )
    r = _smax.gate(x, experts, weights, *args, b)
    if r is None:
        r = _copied(_smax.gate(np.ascontiguousarray(x), experts, weights, *args, b))
    return experts.astype(np.int64), weights, GateStats(*r)


@dataclasses.dataclass(frozen=True)
class Quantizer:
    """A quantizer of probabilities (softmax outputs) and its parameters.

    ``kind``: ``"uniform"`` (asymmetric over ``[min, max]``), ``"fixed_point"`` (scale
    ``2^-bits``, the deployed u8 softmax), ``"log2"`` (FQ-ViT / PTQ4ViT: ``Δ·2^-q``;
    ``zero_mode`` ``"zero"`` or ``"clamp"``), ``"log_sqrt2"`` (RepQ-ViT, base √2) or ``"sulq"``
    (I&S-ViT's shift-uniform-log2 with shift ``eta`` over ``[y_min, y_max]``; ``exponent``
    ``"rounded"``/``"exact"``, ``levels`` ``"bits"``/``"released"``). :meth:`calibrate` fits the
    log√2 and SULQ parameters to data.
    """

    kind: str
    bits: int
    delta: float = 1.0
    min: float = 0.0
    max: float = 1.0
    eta: float = 0.0
    y_min: float = 0.0
    y_max: float = 0.0
    zero_mode: str = "zero"
    exponent: str = "rounded"
    levels: str = "bits"

    @classmethod
    def calibrate(cls, kind, values, bits, *, exponent="rounded", levels="bits"):
        """RepQ-ViT's Δ search (``kind="log_sqrt2"``: the 0.999/0.9999/0.99999 quantiles and the
        max, smallest reconstruction error wins) or I&S-ViT's η search (``"sulq"``)."""
        v = np.ascontiguousarray(np.asarray(values, np.float32).reshape(-1))
        delta, eta, y_min, y_max = _smax.calibrate_quantizer(v, kind, int(bits), exponent, levels)
        if kind == "log_sqrt2":
            return cls(kind, int(bits), delta=delta)
        return cls(kind, int(bits), eta=eta, y_min=y_min, y_max=y_max, exponent=exponent, levels=levels)


class QuantReport(NamedTuple):
    """Round-trip statistics of :func:`quantize`."""

    mse: float
    max_abs_err: float
    clamped: int
    saturated: int


def quantize(x, quantizer: Quantizer):
    """Quantizes probabilities ``x`` (float32, any shape). Returns ``(codes, zero, recon,
    report)``: uint16 codes, the bool flags of inputs that the log quantizers reconstruct as
    exactly 0, the float32 reconstruction and a :class:`QuantReport`."""
    a = np.ascontiguousarray(np.asarray(x, np.float32))
    codes = np.empty(a.shape, np.uint16)
    zero = np.empty(a.shape, np.bool_)
    recon = np.empty(a.shape, np.float32)
    r = _smax.quantize(a, quantizer, codes, zero, recon)
    return codes, zero, recon, QuantReport(*r)


def dequantize(codes, quantizer: Quantizer, zero=None):
    """The float32 reconstruction of ``codes`` (and the zero flags of :func:`quantize`)."""
    c = np.ascontiguousarray(np.asarray(codes, np.uint16))
    out = np.empty(c.shape, np.float32)
    z = None if zero is None else np.ascontiguousarray(np.asarray(zero, np.bool_))
    _smax.dequantize(c, quantizer, out, z)
    return out
