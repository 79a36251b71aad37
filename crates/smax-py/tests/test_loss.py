"""cross_entropy and linear_cross_entropy against PyTorch's F.cross_entropy (float64) and
float64 formulas for the options PyTorch lacks."""

import itertools

import numpy as np
import pytest

import smax

torch = pytest.importorskip("torch")
F = torch.nn.functional
RNG = np.random.default_rng(3)


def torch_ce(x, t, grad=True, **kw):
    xt = torch.tensor(x, requires_grad=True)
    tt = torch.tensor(t)
    w = kw.pop("weight", None)
    loss = F.cross_entropy(xt, tt, None if w is None else torch.tensor(w, dtype=xt.dtype), **kw)
    if grad:
        loss.sum().backward()
        return loss.detach().numpy(), xt.grad.numpy()
    return loss.detach().numpy(), None


@pytest.mark.parametrize(
    "reduction,smoothing,weighted,ignore",
    list(itertools.product(["mean", "sum", "none"], [0.0, 0.2], [False, True], [False, True])),
)
def test_every_pytorch_option_matches(reduction, smoothing, weighted, ignore):
    n, c = 9, 13
    x = RNG.standard_normal((n, c)) * 3
    t = RNG.integers(0, c, n)
    if ignore:
        t[[1, 4]] = -100
    # smax takes class weights in float32: give PyTorch the same values.
    w = RNG.uniform(0.2, 2.0, c).astype(np.float32).astype(np.float64) if weighted else None
    want, want_g = torch_ce(x, t, reduction=reduction, label_smoothing=smoothing, weight=w)
    got, g = smax.cross_entropy(
        x, t, weight=w, reduction=reduction, label_smoothing=smoothing, return_grad=True
    )
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    # For reduction="none" both are the gradient of the sum of the rows.
    np.testing.assert_allclose(g, want_g, rtol=1e-10, atol=1e-13)


def test_probability_targets_and_class_axis_one():
    x = RNG.standard_normal((4, 6, 3, 2))
    q = RNG.uniform(size=(4, 6, 3, 2))
    q /= q.sum(axis=1, keepdims=True)
    for target in (q, RNG.integers(0, 6, (4, 3, 2))):
        for red in ("mean", "none"):
            want, want_g = torch_ce(x, target, reduction=red, label_smoothing=0.1)
            got, g = smax.cross_entropy(x, target, reduction=red, label_smoothing=0.1, return_grad=True)
            np.testing.assert_allclose(got, want, rtol=1e-12)
            np.testing.assert_allclose(g, want_g, rtol=1e-10, atol=1e-14)
    # A single sample [C] with a scalar target.
    x1 = RNG.standard_normal(7)
    np.testing.assert_allclose(smax.cross_entropy(x1, 3), torch_ce(x1, np.int64(3), grad=False)[0], rtol=1e-13)


@pytest.mark.parametrize("dtype,tol", [(np.float32, 2e-6), (np.float16, 2e-3), (smax.bfloat16, 2e-2)])
def test_reduced_precision_against_float64(dtype, tol):
    x = (RNG.standard_normal((16, 300)) * 2).astype(dtype)
    t = RNG.integers(0, 300, 16)
    want, want_g = torch_ce(x.astype(np.float64), t)
    got, g = smax.cross_entropy(x, t, return_grad=True)
    assert abs(got - want) <= tol * abs(want)
    assert g.dtype == np.dtype(dtype)
    assert np.abs(g.astype(np.float64) - want_g).max() <= tol * np.abs(want_g).max()


def test_z_loss_softcap_temperature_against_formula():
    x = RNG.standard_normal((5, 11)) * 20
    t = RNG.integers(0, 11, 5)
    lam, cap, tau = 1e-3, 15.0, 0.7
    z = cap * np.tanh(x / cap) / tau
    lse = np.log(np.exp(z - z.max(1, keepdims=True)).sum(1)) + z.max(1)
    want = np.mean(lse - z[np.arange(5), t]) + lam * np.mean(lse**2)
    got, lse_got = smax.cross_entropy(x, t, z_loss=lam, softcap=cap, temperature=tau, return_lse=True)
    np.testing.assert_allclose(got, want, rtol=1e-12)
    np.testing.assert_allclose(lse_got, lse, rtol=1e-13)
    # The gradient against central differences of the same loss.
    _, g = smax.cross_entropy(x, t, z_loss=lam, softcap=cap, temperature=tau, return_grad=True)
    h = 1e-6
    for i in [(0, 0), (2, 5), (4, 10)]:
        e = np.zeros_like(x)
        e[i] = h
        fd = (
            smax.cross_entropy(x + e, t, z_loss=lam, softcap=cap, temperature=tau)
            - smax.cross_entropy(x - e, t, z_loss=lam, softcap=cap, temperature=tau)
        ) / (2 * h)
        assert abs(g[i] - fd) < 1e-7


def test_strided_logits_and_all_ignored():
    x = RNG.standard_normal((6, 20))[:, 2:17]
    t = RNG.integers(0, 15, 6)
    np.testing.assert_allclose(smax.cross_entropy(x, t), torch_ce(np.ascontiguousarray(x), t, grad=False)[0])
    assert smax.cross_entropy(x, np.full(6, -100)) == 0.0


def test_errors():
    x = RNG.standard_normal((3, 4))
    with pytest.raises(smax.SmaxError, match="target 7 of row 1"):
        smax.cross_entropy(x, np.array([0, 7, 1]))
    with pytest.raises(ValueError):
        smax.cross_entropy(x, np.array([0, 1]))
    with pytest.raises(smax.SmaxError, match="label_smoothing"):
        smax.cross_entropy(x, np.array([0, 1, 2]), label_smoothing=1.5)
    with pytest.raises(smax.SmaxError, match="temperature"):
        smax.cross_entropy(x.astype(np.float32), np.array([0, 1, 2]), temperature=1e-39)
    with pytest.raises(smax.SmaxError, match="class_weights"):
        smax.cross_entropy(x, np.array([0, 1, 2]), weight=np.ones(3))


@pytest.mark.parametrize("bias,smoothing,cap", [(False, 0.0, None), (True, 0.1, 10.0)])
def test_linear_cross_entropy_matches_the_materialised_loss(bias, smoothing, cap):
    n, d, v = 37, 16, 301
    h = RNG.standard_normal((n, d)).astype(np.float32)
    w = (RNG.standard_normal((v, d)) * 0.3).astype(np.float32)
    b = RNG.standard_normal(v).astype(np.float32) if bias else None
    t = RNG.integers(0, v, n)
    t[3] = -100
    ht, wt = torch.tensor(h, dtype=torch.float64, requires_grad=True), torch.tensor(w, dtype=torch.float64, requires_grad=True)
    bt = torch.tensor(b, dtype=torch.float64, requires_grad=True) if bias else None
    logits = F.linear(ht, wt, bt)
    if cap:
        logits = cap * torch.tanh(logits / cap)
    want = F.cross_entropy(logits, torch.tensor(t), label_smoothing=smoothing)
    want.backward()
    loss, (dh, dw, db) = smax.linear_cross_entropy(h, w, t, b, label_smoothing=smoothing, softcap=cap, return_grad=True)
    np.testing.assert_allclose(loss, want.item(), rtol=1e-5)
    np.testing.assert_allclose(dh, ht.grad.numpy(), atol=1e-5)
    np.testing.assert_allclose(dw, wt.grad.numpy(), atol=1e-5)
    if bias:
        np.testing.assert_allclose(db, bt.grad.numpy(), atol=1e-5)
    else:
        assert db is None
    # Per-row losses agree with cross_entropy on the materialised float32 logits.
    rows = smax.linear_cross_entropy(h, w, t, b, reduction="none", label_smoothing=smoothing, softcap=cap)
    lg = h @ w.T + (b if bias else 0)
    direct = smax.cross_entropy(lg.astype(np.float32), t, reduction="none", label_smoothing=smoothing, softcap=cap)
    np.testing.assert_allclose(rows, direct, rtol=1e-4, atol=1e-5)
