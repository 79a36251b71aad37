"""softmax, log_softmax, logsumexp and their backward passes against SciPy and float64
references: every dtype, axis and layout, the special-value table, out= and errors."""

import threading

import numpy as np
import pytest
import scipy.special as sp

import smax

RNG = np.random.default_rng(7)
DTYPES = [np.float32, np.float64, np.float16, smax.bfloat16]
# Relative error bound per dtype against the float64 reference: the output is rounded once to
# the dtype (f16/bf16) after an f32 computation of a few ULP.
TOL = {np.dtype(np.float32): 2e-6, np.dtype(np.float64): 1e-13, np.dtype(np.float16): 2e-3, smax.bfloat16: 1.6e-2}
# Absolute floor where a relative bound cannot hold: the f32 path flushes results below 2^-126
# to +0 (documented); float16 rounds to its subnormal spacing.
ATOL = {np.dtype(np.float32): 2.0**-126, np.dtype(np.float64): 5e-324, np.dtype(np.float16): 6e-8, smax.bfloat16: 2.0**-126}


def ref_softmax(x, axis, t=1.0):
    return sp.softmax(x.astype(np.float64) / t, axis=axis)


def close(got, want, dtype, scale=None):
    got = np.asarray(got, dtype=np.float64)
    tol = TOL[np.dtype(dtype)]
    s = np.abs(want) if scale is None else scale
    err = np.abs(got - want)
    assert np.all(err <= tol * s + ATOL[np.dtype(dtype)]), (err / np.maximum(s, 1e-300)).max()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,axis", [((7, 33), -1), ((7, 33), 0), ((3, 5, 17), 1), ((2, 3, 4, 65), -1), ((129,), 0)])
def test_softmax_matches_scipy(dtype, shape, axis):
    x = (RNG.standard_normal(shape) * 4).astype(dtype)
    xf = x.astype(np.float64)
    close(smax.softmax(x, axis), ref_softmax(xf, axis), dtype)
    lsm = sp.log_softmax(xf, axis=axis)
    # log-softmax: a few ULP of the result, absolute near 0 (scaled by the row's largest term).
    close(smax.log_softmax(x, axis), lsm, dtype, scale=np.maximum(np.abs(lsm), 1.0))
    lse = sp.logsumexp(xf, axis=axis)
    close(smax.logsumexp(x, axis), lse, dtype, scale=np.maximum(np.abs(lse), 1.0))
    assert smax.softmax(x, axis).dtype == np.dtype(dtype)


def test_float64_is_tight_against_scipy():
    x = RNG.standard_normal((50, 1000)) * 30
    np.testing.assert_allclose(smax.softmax(x), sp.softmax(x, axis=-1), rtol=1e-13, atol=0)
    np.testing.assert_allclose(smax.log_softmax(x), sp.log_softmax(x, axis=-1), rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(smax.logsumexp(x), sp.logsumexp(x, axis=-1), rtol=1e-14)


def test_axis_none_and_tuples_as_scipy():
    x = RNG.standard_normal((4, 5, 6))
    np.testing.assert_allclose(smax.softmax(x, axis=None), sp.softmax(x), rtol=1e-13)
    np.testing.assert_allclose(smax.logsumexp(x, axis=None), sp.logsumexp(x), rtol=1e-14)
    np.testing.assert_allclose(smax.logsumexp(x, axis=(0, 2)), sp.logsumexp(x, axis=(0, 2)), rtol=1e-14)
    np.testing.assert_allclose(
        smax.logsumexp(x, axis=(0, 2), keepdims=True), sp.logsumexp(x, axis=(0, 2), keepdims=True), rtol=1e-14
    )
    np.testing.assert_allclose(smax.logsumexp(x, axis=1, keepdims=True), sp.logsumexp(x, axis=1, keepdims=True))
    assert smax.softmax(np.float64(3.0)) == 1.0


def layouts():
    base = RNG.standard_normal((12, 40)).astype(np.float32)
    yield "transposed", base.T, 0
    yield "transposed-last", base.T, -1
    yield "sliced", base[:, 3:30], -1
    yield "strided-rows", base[::3], -1
    yield "every-other", base[:, ::2], -1
    yield "negative", base[::-1], -1
    yield "fortran", np.asfortranarray(base), 0
    yield "broadcast", np.broadcast_to(base[0], (5, 40)), -1
    yield "non-native", base.astype(">f4"), -1
    yield "3d-middle", RNG.standard_normal((3, 9, 5)).astype(np.float32), 1
    yield "3d-sliced", RNG.standard_normal((3, 9, 8)).astype(np.float32)[:, :, 2:7], -1


@pytest.mark.parametrize("name,x,axis", list(layouts()), ids=[n for n, _, _ in layouts()])
def test_layouts(name, x, axis):
    want = ref_softmax(np.asarray(x, np.float64), axis)
    got = smax.softmax(x, axis)
    close(got, want, np.float32)
    lse = sp.logsumexp(np.asarray(x, np.float64), axis=axis)
    close(smax.logsumexp(x, axis), lse, np.float32, scale=np.maximum(np.abs(lse), 1))
    dy = RNG.standard_normal(x.shape).astype(np.float32)
    y = want.astype(np.float32)
    want_dx = y.astype(np.float64) * (dy - np.sum(dy * y, axis=axis, keepdims=True, dtype=np.float64))
    close(smax.softmax_backward(y, dy, axis), want_dx, np.float32, scale=np.abs(want_dx).max())


def test_empty_and_zero_size():
    for shape, axis in [((0, 5), -1), ((5, 0), -1), ((0, 0), 0), ((2, 0, 3), 1)]:
        x = np.zeros(shape, np.float32)
        assert smax.softmax(x, axis).shape == shape
        lse = smax.logsumexp(x, axis)
        assert lse.shape == tuple(n for i, n in enumerate(shape) if i != axis % len(shape))
        assert np.all(lse == -np.inf)


@pytest.mark.parametrize("dtype", DTYPES)
def test_special_value_table(dtype):
    inf, nan = np.inf, np.nan
    x = np.array(
        [
            [0.0, -inf, 1.0, -inf],  # masked entries give exactly 0
            [-inf, -inf, -inf, -inf],  # fully masked row
            [0.0, nan, 1.0, 2.0],  # NaN poisons its row
            [0.0, inf, 1.0, 2.0],  # +inf: NaN (inf - inf), as SciPy
            [1e4, 1e4, -1e4, 0.0],  # no overflow
        ]
    ).astype(dtype)
    p = smax.softmax(x).astype(np.float64)
    assert p[0, 1] == 0 and p[0, 3] == 0 and abs(p[0].sum() - 1) < 2 * TOL[np.dtype(dtype)]
    assert np.all(np.isnan(p[1])) and np.all(np.isnan(p[2])) and np.all(np.isnan(p[3]))
    if np.dtype(dtype) in (np.dtype(np.float32), np.dtype(np.float64)):
        np.testing.assert_allclose(p[4], [0.5, 0.5, 0, 0], atol=1e-7)
    z = smax.softmax(x, masked_row="zero").astype(np.float64)
    assert np.all(z[1] == 0)
    lz = smax.log_softmax(x, masked_row="zero").astype(np.float64)
    assert np.all(lz[1] == -inf)
    lse = smax.logsumexp(x).astype(np.float64)
    assert lse[1] == -inf and np.isnan(lse[2]) and lse[3] == inf


def test_temperature():
    x = RNG.standard_normal((6, 50))
    np.testing.assert_allclose(smax.softmax(x, temperature=0.3), sp.softmax(x / 0.3, axis=-1), rtol=1e-13)
    np.testing.assert_allclose(smax.logsumexp(x, temperature=2.0), sp.logsumexp(x / 2.0, axis=-1), rtol=1e-14)


def test_out_and_in_place():
    x = RNG.standard_normal((8, 30)).astype(np.float32)
    want = smax.softmax(x)
    out = np.empty_like(x)
    assert smax.softmax(x, out=out) is out
    np.testing.assert_array_equal(out, want)
    y = x.copy()
    assert smax.softmax(y, out=y) is y
    np.testing.assert_array_equal(y, want)
    # An output whose strides need the copy path still receives the result.
    big = np.zeros((8, 60), np.float32)
    smax.softmax(x, out=big[:, ::2])
    np.testing.assert_array_equal(big[:, ::2], want)
    dy = RNG.standard_normal(x.shape).astype(np.float32)
    want_dx = smax.softmax_backward(want, dy)
    d2 = dy.copy()
    assert smax.softmax_backward(want, d2, out=d2) is d2
    np.testing.assert_array_equal(d2, want_dx)
    lse = np.empty(8, np.float32)
    assert smax.logsumexp(x, out=lse) is lse


def test_errors():
    x = RNG.standard_normal((3, 4)).astype(np.float32)
    with pytest.raises(smax.SmaxError, match="temperature"):
        smax.softmax(x, temperature=0.0)
    with pytest.raises(smax.SmaxError, match="temperature"):
        smax.softmax(x, temperature=1e-39)  # 1/τ overflows f32
    with pytest.raises(ValueError, match="masked_row"):
        smax.softmax(x, masked_row="drop")
    with pytest.raises(ValueError, match="axis"):
        smax.softmax(x, axis=2)
    with pytest.raises(TypeError):
        smax.softmax(x.astype(np.complex64))
    with pytest.raises(ValueError):
        smax.softmax(x, out=np.empty((3, 5), np.float32))
    with pytest.raises(ValueError):
        smax.softmax_backward(x, x[:, :3])
    assert issubclass(smax.SmaxError, ValueError)
    # Integer input is converted to float64, as SciPy does.
    assert smax.softmax(np.arange(4)).dtype == np.float64


@pytest.mark.parametrize("log", [False, True])
def test_backward_finite_differences(log):
    x = RNG.standard_normal((3, 9))
    dy = RNG.standard_normal((3, 9))
    f = smax.log_softmax if log else smax.softmax
    b = smax.log_softmax_backward if log else smax.softmax_backward
    for t in (1.0, 0.6):
        y = f(x, temperature=t)
        dx = b(y, dy, temperature=t)
        h = 1e-6
        fd = np.zeros_like(x)
        for i in np.ndindex(x.shape):
            e = np.zeros_like(x)
            e[i] = h
            fd[i] = np.sum(dy * (f(x + e, temperature=t) - f(x - e, temperature=t))) / (2 * h)
        np.testing.assert_allclose(dx, fd, rtol=1e-6, atol=1e-8)


def test_bitwise_identical_for_any_thread_count():
    x = RNG.standard_normal((64, 70000)).astype(np.float32)
    try:
        smax.set_num_threads(1)
        assert smax.get_num_threads() == 1
        a = (smax.softmax(x), smax.logsumexp(x), smax.softmax(x, axis=0))
        smax.set_num_threads(2)
        assert smax.get_num_threads() == 2
        b = (smax.softmax(x), smax.logsumexp(x), smax.softmax(x, axis=0))
    finally:
        smax.set_num_threads(0)
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)


def test_the_gil_is_released_during_a_call():
    # While one thread is inside a long smax call, Python code in another thread keeps
    # running: it could not if the call held the GIL.
    x = RNG.standard_normal((512, 1 << 16)).astype(np.float32)
    started, done = threading.Event(), threading.Event()

    def work():
        started.set()
        for _ in range(3):
            smax.softmax(x)
        done.set()

    t = threading.Thread(target=work)
    t.start()
    started.wait()
    ticks = 0
    while not done.is_set():
        ticks += 1
    t.join()
    assert ticks > 1000, ticks


def test_expressible_strides_are_read_in_place_and_others_copied_once():
    import tracemalloc

    big = RNG.standard_normal((256, 1024)).astype(np.float32)

    def peak(fn):
        tracemalloc.start()
        fn()
        p = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return p

    for name, x, axis in [("sliced", big[:, 5:900], -1), ("axis 0", big, 0), ("fortran", np.asfortranarray(big), 0)]:
        out = np.empty_like(x)
        # NumPy reports its allocations to tracemalloc: no copy of x is made.
        assert peak(lambda: smax.softmax(x, axis, out=out)) < 64 * 1024, name
        np.testing.assert_allclose(out, ref_softmax(np.asarray(x, np.float64), axis), rtol=2e-6)
    rev = big[::-1]
    out = np.empty_like(rev)
    assert peak(lambda: smax.softmax(rev, out=out)) >= rev.nbytes  # negative strides: one copy
    np.testing.assert_allclose(out, ref_softmax(rev.astype(np.float64), -1), rtol=2e-6)
