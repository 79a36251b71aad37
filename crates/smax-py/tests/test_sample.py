"""sample and process: greedy, determinism, the kept sets against a float64 reference of the
definitions and against Hugging Face's warpers; calibration helpers against formulas."""

import numpy as np
import pytest
import scipy.special as sp

import smax

RNG = np.random.default_rng(5)


def kept_reference(z, temperature=1.0, top_k=None, top_p=None, min_p=None):
    """The kept set of one row by the definitions, in float64."""
    t = z.astype(np.float64) / temperature
    keep = np.isfinite(t)
    if top_k is not None:
        kth = np.sort(t[keep])[::-1][min(top_k, keep.sum()) - 1]
        keep &= t >= kth
    if top_p is not None:
        p = np.where(keep, np.exp(t - t[keep].max()), 0)
        p /= p.sum()
        order = np.argsort(-p, kind="stable")
        csum = np.cumsum(p[order])
        n = int(np.searchsorted(csum, top_p - 1e-12)) + 1
        kk = np.zeros_like(keep)
        kk[order[:n]] = True
        keep &= kk
    if min_p is not None:
        p = np.where(keep, np.exp(t - t[keep].max()), 0)
        keep &= p >= min_p * p.max()
    return keep


@pytest.mark.parametrize("params", [dict(top_k=5), dict(top_p=0.8), dict(min_p=0.1), dict(top_k=40, top_p=0.9, temperature=0.7)])
def test_process_keeps_the_defined_set(params):
    z = RNG.standard_normal((8, 500)) * 3
    p = smax.process(z, dtype=np.float64, **params)
    for row in range(8):
        keep = kept_reference(z[row], **params)
        np.testing.assert_array_equal(p[row] > 0, keep)
        t = z[row] / params.get("temperature", 1.0)
        want = np.where(keep, np.exp(t - t[keep].max()), 0)
        np.testing.assert_allclose(p[row], want / want.sum(), rtol=1e-12, atol=1e-300)
    lp = smax.process(z, log=True, **params)
    np.testing.assert_array_equal(np.isfinite(lp), p > 0)


def test_greedy_seeded_and_uniform_draws():
    z = RNG.standard_normal((16, 1000)).astype(np.float32)
    np.testing.assert_array_equal(smax.sample(z, temperature=0), z.argmax(-1))
    a = smax.sample(z, top_p=0.9, seed=123, step=4)
    np.testing.assert_array_equal(a, smax.sample(z, top_p=0.9, seed=123, step=4))
    # One int seed gives the rows distinct seeds: identical rows draw independently.
    same = np.tile(z[:1], (64, 1))
    draws = smax.sample(same, seed=7)
    assert len(set(draws.tolist())) > 16
    np.testing.assert_array_equal(smax.sample(same[:5], seed=7), draws[:5])
    np.testing.assert_array_equal(smax.sample(same, seed=(7 << 32) + np.arange(64, dtype=np.uint64)), draws)
    # Each row depends on its own seed only: the same row alone gives the same token.
    seeds = np.arange(16, dtype=np.uint64) * 977
    both = smax.sample(z, top_k=50, seed=seeds, step=2)
    np.testing.assert_array_equal(smax.sample(z[3:4], top_k=50, seed=seeds[3:4], step=2), both[3:4])
    # A uniform u picks the token where the kept set's cumulative mass passes u.
    u = np.full(16, 0.0)
    first = smax.sample(z, top_k=3, uniforms=u)
    p = smax.process(z, top_k=3, dtype=np.float64)
    assert all(p[i, first[i]] > 0 for i in range(16))
    assert smax.sample(z.reshape(2, 8, 1000), temperature=0).shape == (2, 8)


def test_sampling_errors():
    z = np.zeros((2, 5), np.float32)
    with pytest.raises(smax.SmaxError, match="top_p"):
        smax.sample(z, top_p=1.5)
    bad = z.copy()
    bad[1, 2] = np.nan
    with pytest.raises(smax.SmaxError):
        smax.sample(bad)
    with pytest.raises(smax.SmaxError):
        smax.sample(np.full((1, 4), -np.inf, np.float32))


def test_hugging_face_warpers_keep_the_same_sets():
    torch = pytest.importorskip("torch")
    tf = pytest.importorskip("transformers")
    from smax import hf

    scores = torch.tensor(RNG.standard_normal((6, 300)) * 2, dtype=torch.float32)
    ids = torch.zeros((6, 1), dtype=torch.long)
    pairs = [
        (hf.TopKLogitsWarper(20), tf.TopKLogitsWarper(20)),
        (hf.TopPLogitsWarper(0.85), tf.TopPLogitsWarper(0.85)),
        (hf.MinPLogitsWarper(0.05), tf.MinPLogitsWarper(0.05)),
    ]
    for ours, theirs in pairs:
        a = ours(ids, scores.clone())
        b = theirs(ids, scores.clone())
        assert torch.equal(torch.isfinite(a), torch.isfinite(b)), type(ours).__name__
        # Same distribution: softmax of both agrees.
        torch.testing.assert_close(torch.softmax(a, -1), torch.softmax(b, -1), rtol=1e-5, atol=1e-7)
    t = hf.TemperatureLogitsWarper(0.5)(ids, scores)
    torch.testing.assert_close(torch.softmax(t, -1), torch.softmax(scores / 0.5, -1), rtol=1e-5, atol=1e-7)


def test_calibration_against_formulas():
    z = RNG.standard_normal((400, 7)) * 2
    # Labels that agree with the logits often, so the fitted temperature is interior.
    y = np.argmax(z + RNG.standard_normal((400, 7)) * 2, axis=-1)
    p = sp.softmax(z, axis=-1)
    np.testing.assert_allclose(smax.brier_score(z, y), np.mean(np.sum((p - np.eye(7)[y]) ** 2, -1)), rtol=1e-12)
    np.testing.assert_allclose(smax.ood_scores(z, "msp"), p.max(-1), rtol=1e-13)
    np.testing.assert_allclose(smax.ood_scores(z, "energy"), sp.logsumexp(z, axis=-1), rtol=1e-13)
    np.testing.assert_allclose(smax.ood_scores(z, "max_logit"), z.max(-1))
    conf, correct = p.max(-1), p.argmax(-1) == y
    idx = np.minimum((conf * 10).astype(int), 9)
    ece = sum(abs(correct[idx == m].mean() - conf[idx == m].mean()) * (idx == m).mean() for m in range(10) if (idx == m).any())
    c = smax.calibration_error(z, y, bins=10)
    np.testing.assert_allclose(c.ece, ece, rtol=1e-12)
    assert sum(b[2] for b in c.bins) == 400
    fit = smax.fit_temperature(z, y)
    # The fitted T minimises the NLL: nearby temperatures do no better.
    nll = lambda t: -np.mean(sp.log_softmax(z / t, axis=-1)[np.arange(400), y])
    assert fit.converged and not fit.capped and nll(fit.temperature) <= min(nll(fit.temperature * 1.01), nll(fit.temperature / 1.01))
    np.testing.assert_allclose(fit.nll_after, nll(fit.temperature), rtol=1e-10)


def test_gate_against_a_float64_reference():
    z = RNG.standard_normal((50, 8))
    experts, weights, stats = smax.gate(z, 2)
    p = sp.softmax(z, axis=-1)
    top = np.argsort(-p, axis=-1, kind="stable")[:, :2]
    np.testing.assert_array_equal(experts, top)
    np.testing.assert_allclose(weights, np.take_along_axis(p, top, -1), rtol=1e-6)
    _, w_renorm, _ = smax.gate(z, 2, renormalize=True)
    np.testing.assert_allclose(w_renorm.sum(-1), 1.0, rtol=1e-6)
    _, w_topk, _ = smax.gate(z, 2, order="topk_softmax")
    np.testing.assert_allclose(w_topk, sp.softmax(np.take_along_axis(z, top, -1), axis=-1), rtol=1e-6)
    assert sum(stats.tokens_per_expert) == 100
    np.testing.assert_allclose(stats.mean_prob, p.mean(0), rtol=1e-12)
    f = np.bincount(top.reshape(-1), minlength=8) / 100
    np.testing.assert_allclose(stats.aux_loss, 8 * np.sum(f * p.mean(0)), rtol=1e-12)
    # The correction bias moves the choice, not the weights.
    bias = np.zeros(8, np.float32)
    bias[5] = 100.0
    e2, w2, _ = smax.gate(z, 1, bias=bias)
    assert np.all(e2[:, 0] == 5)
    np.testing.assert_allclose(w2[:, 0], p[:, 5], rtol=1e-6)
    with pytest.raises(smax.SmaxError, match="k"):
        smax.gate(z, 9)


def test_quantizers_round_trip():
    p = sp.softmax(RNG.standard_normal((64, 100)) * 3, axis=-1).astype(np.float32)
    q = smax.Quantizer("log2", 4)
    codes, zero, recon, rep = smax.quantize(p, q)
    # Plain log2: x̂ = 2^-q with q = clamp(round(-log2 x), 0, 15); zeros past the last level.
    want_q = np.clip(np.round(-np.log2(p.astype(np.float64))), 0, 15)
    np.testing.assert_array_equal(codes, want_q)
    np.testing.assert_allclose(recon[~zero], 2.0 ** -want_q[~zero], rtol=1e-7)
    np.testing.assert_allclose(rep.mse, np.mean((recon.astype(np.float64) - p) ** 2), rtol=1e-6)
    np.testing.assert_array_equal(smax.dequantize(codes, q, zero), recon)
    u = smax.Quantizer("fixed_point", 8)
    c8, _, r8, _ = smax.quantize(p, u)
    np.testing.assert_array_equal(c8, np.clip(np.round(p.astype(np.float64) * 256), 0, 255))
    cal = smax.Quantizer.calibrate("log_sqrt2", p, 4)
    assert cal.kind == "log_sqrt2" and 0 < cal.delta <= p.max()
    s = smax.Quantizer.calibrate("sulq", p, 4)
    assert s.eta > 0 and s.y_min < s.y_max
    with pytest.raises(smax.SmaxError):
        smax.quantize(p, smax.Quantizer("log2", 0))
    with pytest.raises(ValueError, match="kind"):
        smax.quantize(p, smax.Quantizer("cubic", 4))


def test_processors_run_inside_transformers_generate():
    torch = pytest.importorskip("torch")
    tf = pytest.importorskip("transformers")
    from smax import hf

    torch.manual_seed(0)
    cfg = tf.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=64, n_positions=32)
    model = tf.GPT2LMHeadModel(cfg).eval()
    ids = torch.tensor([[1, 2, 3]])
    seen = []

    class Spy(tf.LogitsProcessor):
        def __call__(self, input_ids, scores):
            seen.append(scores.clone())
            return scores

    procs = tf.LogitsProcessorList([hf.SmaxLogitsWarper(top_k=1), Spy()])
    out = model.generate(ids, do_sample=True, max_new_tokens=5, logits_processor=procs, pad_token_id=0)
    assert out.shape == (1, 8)
    # top-1 leaves one finite score per step: sampling must pick it.
    for step, scores in enumerate(seen):
        finite = torch.isfinite(scores[0]).nonzero().flatten()
        assert finite.tolist() == [out[0, 3 + step].item()]
