"""attention and attention_backward against a float64 reference (the score matrix formed
explicitly) and against PyTorch's SDPA autograd."""

import numpy as np
import pytest

import smax

RNG = np.random.default_rng(11)


def reference(q, k, v, causal=False, scale=None, window=None, softcap=None, bias=None, mask=None, offset=None):
    """[B, Hq, Sq, D] float64 attention with every option, bottom-right causal by default."""
    q, k, v = (a.astype(np.float64) for a in (q, k, v))
    b, hq, sq, d = q.shape
    hk, sk = k.shape[1], k.shape[2]
    k = np.repeat(k, hq // hk, axis=1)
    v = np.repeat(v, hq // hk, axis=1)
    s = np.einsum("bhqd,bhkd->bhqk", q, k) * (1 / np.sqrt(d) if scale is None else scale)
    if softcap:
        s = softcap * np.tanh(s / softcap)
    if bias is not None:
        s = s + bias
    pos = np.arange(sq)[:, None] + (sk - sq if offset is None else offset)
    key = np.arange(sk)[None, :]
    keep = np.ones((sq, sk), bool)
    if causal:
        keep &= key <= pos
    if window:
        keep &= (key >= pos - window[0]) & (key <= pos + window[1])
    keep = np.broadcast_to(keep, s.shape)
    if mask is not None:
        keep = keep & mask
    s = np.where(keep, s, -np.inf)
    m = s.max(-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0)
    p = np.exp(s - m)
    den = p.sum(-1, keepdims=True)
    out = np.einsum("bhqk,bhkd->bhqd", np.divide(p, den, out=np.zeros_like(p), where=den > 0), v)
    return out


CASES = [
    dict(),
    dict(causal=True),
    dict(causal=True, offset=0),
    dict(window=(3, 1)),
    dict(softcap=5.0, scale=0.5),
    dict(bias=True),
    dict(mask=True),
]


@pytest.mark.parametrize("case", CASES, ids=[",".join(c) or "plain" for c in CASES])
@pytest.mark.parametrize("gqa", [1, 2])
def test_forward_matches_reference(case, gqa):
    b, hq, sq, sk, d = 2, 4, 13, 21, 16
    q = RNG.standard_normal((b, hq, sq, d)).astype(np.float32)
    k = RNG.standard_normal((b, hq // gqa, sk, d)).astype(np.float32)
    v = RNG.standard_normal((b, hq // gqa, sk, d)).astype(np.float32)
    kw = dict(case)
    if kw.get("bias"):
        kw["bias"] = RNG.standard_normal((1, hq, sq, sk)).astype(np.float32)
    if kw.get("mask"):
        kw["mask"] = RNG.uniform(size=(b, 1, sq, sk)) < 0.7
    want = reference(q, k, v, **kw)
    off = kw.pop("offset", None)
    got = smax.attention(q, k, v, query_offset=off, **kw)
    np.testing.assert_allclose(got, want, atol=2e-6 * np.abs(v).max() * 4)


def test_bshd_layout_and_half_types():
    b, s, h, d = 2, 9, 3, 8
    q, k, v = (RNG.standard_normal((b, s, h, d)).astype(np.float32) for _ in range(3))
    got = smax.attention(q, k, v, layout="bshd", causal=True)
    want = reference(*(a.transpose(0, 2, 1, 3) for a in (q, k, v)), causal=True).transpose(0, 2, 1, 3)
    assert got.shape == (b, s, h, d)
    np.testing.assert_allclose(got, want, atol=1e-5)
    for dt, tol in ((np.float16, 5e-3), (smax.bfloat16, 4e-2)):
        g = smax.attention(*(a.astype(dt) for a in (q, k, v)), layout="bshd", causal=True)
        assert g.dtype == np.dtype(dt)
        np.testing.assert_allclose(g.astype(np.float64), want, atol=tol)


def test_fused_qkv_slices_are_read_in_place():
    b, s, h, d = 1, 10, 2, 8
    qkv = RNG.standard_normal((b, s, 3, h, d)).astype(np.float32)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    got = smax.attention(q, k, v, layout="bshd")
    want = reference(*(np.ascontiguousarray(a.transpose(0, 2, 1, 3)) for a in (q, k, v))).transpose(0, 2, 1, 3)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_backward_matches_torch():
    torch = pytest.importorskip("torch")
    b, hq, hk, sq, sk, d = 2, 4, 2, 11, 17, 8
    q = RNG.standard_normal((b, hq, sq, d)).astype(np.float32)
    k = RNG.standard_normal((b, hk, sk, d)).astype(np.float32)
    v = RNG.standard_normal((b, hk, sk, d)).astype(np.float32)
    do = RNG.standard_normal((b, hq, sq, d)).astype(np.float32)
    out, lse = smax.attention(q, k, v, causal=True, query_offset=0, return_lse=True)
    dq, dk, dv = smax.attention_backward(q, k, v, out, lse, do, causal=True, query_offset=0)
    tq, tk, tv = (torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in (q, k, v))
    o = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=True, enable_gqa=True)
    o.backward(torch.tensor(do, dtype=torch.float64))
    np.testing.assert_allclose(out, o.detach().numpy(), atol=1e-5)
    for g, t in ((dq, tq), (dk, tk), (dv, tv)):
        np.testing.assert_allclose(g, t.grad.numpy(), atol=5e-5)


def test_errors():
    q = np.zeros((1, 3, 4, 8), np.float32)
    k = np.zeros((1, 2, 4, 8), np.float32)
    with pytest.raises(smax.SmaxError, match="kv_heads"):
        smax.attention(q, k, k)
    with pytest.raises(TypeError):
        smax.attention(q.astype(np.float64), q.astype(np.float64), q.astype(np.float64))
    with pytest.raises(ValueError):
        smax.attention(q, q[..., :4], q)
