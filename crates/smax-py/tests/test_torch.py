"""smax.torch: gradcheck in float64 and torch.library.opcheck for every custom op, values and
gradients against PyTorch's native ops, the modules, bfloat16 sharing and torch.compile."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402
from torch.library import opcheck  # noqa: E402

import smax.torch as st  # noqa: E402

torch.manual_seed(0)


def f64(*shape):
    return torch.randn(*shape, dtype=torch.float64, requires_grad=True)


def test_gradcheck_normalizers():
    x = f64(5, 9)
    assert torch.autograd.gradcheck(lambda x: st.softmax(x, 0, temperature=0.8), (x,))
    assert torch.autograd.gradcheck(lambda x: st.log_softmax(x, -1), (x,))
    assert torch.autograd.gradcheck(lambda x: st.logsumexp(x, 1, temperature=1.7), (x,))
    x3 = f64(2, 3, 4)
    assert torch.autograd.gradcheck(lambda x: st.softmax(x, 1), (x3,))
    assert torch.autograd.gradgradcheck is not None  # second order is not claimed


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gradcheck_cross_entropy(reduction):
    x = f64(6, 10)
    t = torch.tensor([1, 2, -100, 0, 9, 4])
    w = torch.rand(10, dtype=torch.float64) + 0.5
    fn = lambda x: st.cross_entropy(x, t, w, reduction=reduction, label_smoothing=0.1, z_loss=1e-3, softcap=20.0)
    assert torch.autograd.gradcheck(fn, (x,))
    q = torch.softmax(torch.randn(6, 10, dtype=torch.float64), -1)
    assert torch.autograd.gradcheck(lambda x: st.cross_entropy(x, q, reduction=reduction), (x,))


def test_cross_entropy_matches_torch_with_every_option():
    x = torch.randn(4, 7, 3, dtype=torch.float64)
    t = torch.randint(0, 7, (4, 3))
    t[0, 1] = -100
    w = (torch.rand(7) + 0.5).double()  # float32 values: smax takes class weights in float32
    for red in ("mean", "sum", "none"):
        a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
        la = st.cross_entropy(a, t, w, reduction=red, label_smoothing=0.05)
        lb = F.cross_entropy(b, t, w, reduction=red, label_smoothing=0.05)
        torch.testing.assert_close(la, lb, rtol=1e-12, atol=1e-12)
        la.sum().backward()
        lb.sum().backward()
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-13)
    m = st.CrossEntropyLoss(weight=w, ignore_index=-100, label_smoothing=0.05)
    torch.testing.assert_close(m(x, t), torch.nn.CrossEntropyLoss(weight=w, label_smoothing=0.05)(x, t))


def test_gradcheck_attention():
    q, k, v = f64(1, 2, 5, 4), f64(1, 2, 7, 4), f64(1, 2, 7, 4)
    # The kernels compute in float32: compare the float32 op against torch's in float64.
    for causal in (False, True):
        qs, ks, vs = (a.detach().float().requires_grad_() for a in (q, k, v))
        o = st.scaled_dot_product_attention(qs, ks, vs, is_causal=causal)
        o2 = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        g = torch.randn_like(o2)
        o.backward(g.float())
        o2.backward(g)
        torch.testing.assert_close(o.double(), o2.detach(), atol=1e-5, rtol=0)
        for a, b in ((qs, q), (ks, k), (vs, v)):
            torch.testing.assert_close(a.grad.double(), b.grad, atol=1e-4, rtol=0)
            b.grad = None


def test_attention_masks_gqa_and_bf16():
    q = torch.randn(2, 4, 6, 8)
    k = torch.randn(2, 2, 9, 8)
    v = torch.randn(2, 2, 9, 8)
    mask = torch.rand(2, 1, 6, 9) < 0.8
    mask[..., 0] = True
    a = st.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    b = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    bias = torch.randn(1, 4, 6, 9)
    torch.testing.assert_close(
        st.scaled_dot_product_attention(q, k, v, attn_mask=bias, enable_gqa=True),
        F.scaled_dot_product_attention(q, k, v, attn_mask=bias, enable_gqa=True),
        atol=1e-5,
        rtol=0,
    )
    qb, kb, vb = (t.bfloat16() for t in (q, k, v))
    ob = st.scaled_dot_product_attention(qb, kb, vb, enable_gqa=True)
    assert ob.dtype == torch.bfloat16
    torch.testing.assert_close(ob.float(), F.scaled_dot_product_attention(q, k, v, enable_gqa=True), atol=3e-2, rtol=0)


def test_linear_cross_entropy_gradients_and_module():
    h = torch.randn(3, 5, 16, requires_grad=True)
    w = (torch.randn(50, 16) * 0.3).requires_grad_()
    b = torch.randn(50, requires_grad=True)
    t = torch.randint(0, 50, (3, 5))
    loss = st.LinearCrossEntropyLoss(label_smoothing=0.1)(h, w, t, b)
    (loss * 2).backward()
    h2, w2, b2 = (a.detach().clone().requires_grad_() for a in (h, w, b))
    ref = F.cross_entropy(F.linear(h2, w2, b2).reshape(-1, 50), t.reshape(-1), label_smoothing=0.1)
    (ref * 2).backward()
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
    for a, r in ((h, h2), (w, w2), (b, b2)):
        torch.testing.assert_close(a.grad, r.grad, atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        per = st.linear_cross_entropy(h, w, t, b, reduction="none")
    assert per.shape == (3, 5)
    with pytest.raises(NotImplementedError):
        st.linear_cross_entropy(h, w, t, b, reduction="none")


def test_opcheck_every_op():
    x = torch.randn(3, 6, requires_grad=True)
    y = torch.softmax(x, -1).detach()
    t = torch.tensor([0, 5, 2])
    h, w = torch.randn(4, 8, requires_grad=True), torch.randn(10, 8, requires_grad=True)
    q, k, v = (torch.randn(1, 2, 3, 4, requires_grad=True) for _ in range(3))
    out, lse = torch.ops.smax.sdpa(q, k, v, None, True, None)
    ops = [
        (torch.ops.smax.normalize.default, (x, -1, 1.0, False)),
        (torch.ops.smax.normalize.default, (x, 0, 0.5, True)),
        (torch.ops.smax.normalize_backward.default, (y, torch.randn(3, 6), -1, 1.0, False)),
        (torch.ops.smax.logsumexp.default, (x, 1, 1.0)),
        (torch.ops.smax.cross_entropy.default, (x, t, None, -100, "mean", 0.0, 0.0, None, 1.0, True)),
        (torch.ops.smax.cross_entropy.default, (x, t, None, -100, "none", 0.1, 0.0, None, 1.0, True)),
        (torch.ops.smax.linear_cross_entropy.default, (h, w, torch.tensor([1, 2, 3, 9]), None, -100, "mean", 0.0, 0.0, None, True)),
        (torch.ops.smax.sdpa.default, (q, k, v, None, True, None)),
        (
            torch.ops.smax.sdpa_backward.default,
            (q.detach(), k.detach(), v.detach(), out.detach(), lse, torch.randn(1, 2, 3, 4), None, True, None),
        ),
    ]
    for op, args in ops:
        res = opcheck(op, args)
        assert all(v == "SUCCESS" for v in res.values()), (op, res)


def test_bfloat16_is_shared_and_torch_compile_works():
    xb = torch.randn(4, 33, dtype=torch.bfloat16)
    torch.testing.assert_close(st.softmax(xb).float(), torch.softmax(xb.float(), -1), atol=8e-3, rtol=0)
    x = torch.randn(8, 16, requires_grad=True)
    t = torch.randint(0, 16, (8,))

    def f(x):
        return st.cross_entropy(x * 2, t) + st.logsumexp(st.log_softmax(x, -1), -1).sum()

    g = torch.compile(f, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(g(x), f(x))
    gx = torch.autograd.grad(g(x), x)[0]
    fx = torch.autograd.grad(f(x), x)[0]
    torch.testing.assert_close(gx, fx)


def test_non_cpu_style_fallback_for_unsupported_dtype():
    # Integer-free fallback path: float64 attention goes to torch's own op.
    q = torch.randn(1, 1, 3, 4, dtype=torch.float64)
    torch.testing.assert_close(st.scaled_dot_product_attention(q, q, q), F.scaled_dot_product_attention(q, q, q))
