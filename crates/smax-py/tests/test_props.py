"""Property tests (hypothesis): every result against a float64 reference on arbitrary shapes,
axes, dtypes, strides and values, including masked entries."""

import warnings

import numpy as np
import scipy.special as sp
from hypothesis import given, settings
from hypothesis import strategies as st

import smax

# (dtype, unit roundoff u, absolute floor) of the documented bounds (the crate docs,
# "Accuracy"): softmax |ŷ − y| ≤ (80 + 2·d + 2·ln n)·u·y + floor with d = |x − max|/τ, and
# logsumexp |ℓ̂ − ℓ| ≤ 3u·|ℓ| + (80 + 4·ln n)·u. The f32 path flushes results below 2^-126.
DT = {"float32": (np.float32, 2.0**-24, 2.0**-125), "float64": (np.float64, 2.0**-53, 5e-324)}


@st.composite
def arrays(draw):
    ndim = draw(st.integers(1, 3))
    shape = tuple(draw(st.lists(st.integers(1, 40), min_size=ndim, max_size=ndim)))
    dtype, u, floor = DT[draw(st.sampled_from(sorted(DT)))]
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape) * draw(st.sampled_from([0.1, 1.0, 30.0, 300.0]))
    if draw(st.booleans()):
        x[rng.uniform(size=shape) < 0.2] = -np.inf
    x = x.astype(dtype)
    axis = draw(st.integers(-ndim, ndim - 1))
    if draw(st.booleans()) and ndim >= 2:
        x = np.swapaxes(x, 0, -1)
    if draw(st.booleans()):
        sl = tuple(slice(None, None, draw(st.sampled_from([1, 2, -1]))) for _ in range(x.ndim))
        x = x[sl]
    return x, axis, (u, floor)


@settings(max_examples=300, deadline=None)
@given(arrays(), st.sampled_from([0.5, 1.0, 3.0]))
def test_normalizers_against_float64(case, t):
    x, axis, (u, floor) = case
    # The reference in extended precision (x86's 64-bit significand), so that its own
    # rounding of the exponent's argument (|x − max|/τ · 2^-64) stays far below the bound.
    xf = x.astype(np.longdouble) / np.longdouble(t)
    n = x.shape[axis]
    with np.errstate(invalid="ignore", divide="ignore"):
        m = np.max(np.where(np.isnan(xf), -np.inf, xf), axis=axis, keepdims=True)
        m = np.where(np.isfinite(m), m, 0)
        e = np.exp(xf - m)
        total = e.sum(axis=axis, keepdims=True)
        want = (e / total).astype(np.float64)
        lse = np.squeeze(np.log(total) + m, axis).astype(np.float64)
    got = smax.softmax(x, axis, temperature=t).astype(np.float64)
    allmasked = np.isneginf(lse)
    rows_nan = np.broadcast_to(np.expand_dims(allmasked, axis), x.shape)
    assert np.all(np.isnan(got[rows_nan]))
    ok = ~rows_nan
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-masked rows: an all-NaN max
        d = np.abs(xf - np.nanmax(np.where(np.isneginf(xf), np.nan, xf), axis=axis, keepdims=True))
    d = np.where(np.isfinite(d), d, 0)
    bound = (80 + 2 * d + 2 * np.log(n)) * u * want + floor
    assert np.all(np.abs(got[ok] - want[ok]) <= bound[ok])
    glse = smax.logsumexp(x, axis, temperature=t).astype(np.float64)
    fin = np.isfinite(lse)
    assert np.all(np.abs(glse[fin] - lse[fin]) <= 3 * u * np.abs(lse[fin]) + (80 + 4 * np.log(n)) * u)
    assert np.all(glse[~fin] == lse[~fin])


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 20), st.integers(1, 60), st.integers(0, 2**32 - 1), st.floats(0.0, 0.9), st.booleans())
def test_cross_entropy_against_float64(n, c, seed, smoothing, weighted):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, c)) * 5
    y = rng.integers(0, c, n)
    y[rng.uniform(size=n) < 0.2] = -100
    w = rng.uniform(0.1, 2, c).astype(np.float32).astype(np.float64) if weighted else np.ones(c)
    lsm = sp.log_softmax(x, axis=-1)
    valid = y != -100
    yy = np.where(valid, y, 0)
    nll = -lsm[np.arange(n), yy] * w[yy]
    smooth = -(lsm * w).sum(-1) / c
    per = np.where(valid, (1 - smoothing) * nll + smoothing * smooth, 0)
    den = w[yy][valid].sum()
    want = per.sum() / den if den > 0 else 0.0
    got = smax.cross_entropy(x, y, weight=w if weighted else None, label_smoothing=smoothing)
    assert abs(got - want) <= 1e-12 * max(abs(want), 1)
