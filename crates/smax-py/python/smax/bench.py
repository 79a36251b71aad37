"""``python -m smax.bench``: smax beside PyTorch (and SciPy) in one process.

Prints a table and, with ``--json FILE``, writes one JSON record per measurement (the fields
of ``smax bench``'s records: suite, op, shape, dtype, threads, impl, median seconds, GB/s,
peak bytes). Sections:

* ``overhead``: the median time of one call at small shapes (1×128, 32×1024 float32):
  ``smax`` (NumPy API), ``smax.torch`` (the custom op), ``torch`` and ``scipy``;
* ``throughput``: softmax / log_softmax / logsumexp GB/s (bytes read + written) at the core's
  256 MiB shapes, 1 and 2 threads, smax against torch;
* ``autograd``: forward+backward through autograd for softmax, cross-entropy and the linear
  cross-entropy against torch's native ops (time and peak resident memory above the inputs);
* ``sdpa``: scaled-dot-product attention forward and forward+backward.

Medians of alternated runs (smax, then torch, then smax...), so slow drifts of the machine
hit both sides alike. Absolute figures move between machines: compare the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import threading
import time

import numpy as np

import smax


def _rss() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return None


def _time(fn, reps: int) -> float:
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def _alternate(fns: dict, reps: int, rounds: int) -> dict:
    """Median seconds per call of each function, the functions alternated round by round."""
    for f in fns.values():
        f()  # warm up (allocations, code paths)
    samples = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            samples[k].append(_time(f, reps))
    return {k: statistics.median(v) for k, v in samples.items()}


def _peak(fn) -> int | None:
    """Peak resident memory above the level before the call, sampled every 0.2 ms by a thread
    (the kernels release the GIL, so the sampler runs while they do). Linux only."""
    base = _rss()
    if base is None:
        return None
    peak = [base]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss() or 0)
            time.sleep(0.0002)

    t = threading.Thread(target=sample)
    t.start()
    try:
        fn()
    finally:
        done.set()
        t.join()
    return max(peak[0] - base, 0)


class Report:
    def __init__(self):
        self.records = []

    def add(self, suite, op, shape, dtype, threads, impl, seconds, nbytes=None, peak=None, note=""):
        gbps = nbytes / seconds / 1e9 if nbytes else None
        self.records.append(
            dict(
                suite=suite,
                op=op,
                shape=shape,
                dtype=dtype,
                threads=threads,
                impl=impl,
                median_s=seconds,
                gbps=gbps,
                peak_bytes=peak,
                note=note,
            )
        )
        us = seconds * 1e6
        t = f"{us:10.2f} us" if us < 1e4 else f"{seconds * 1e3:10.2f} ms"
        g = f"{gbps:7.2f} GB/s" if gbps else " " * 12
        p = f"{peak / 2**20:9.1f} MiB peak" if peak is not None else ""
        print(f"{suite:10} {op:22} {shape:18} {dtype:8} t={threads} {impl:12} {t} {g} {p} {note}", flush=True)


def overhead(rep: Report, torch, quick: bool):
    import scipy.special as sp

    import smax.torch as st

    for shape in ((1, 128), (32, 1024)):
        x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
        xt = torch.from_numpy(x)
        fns = {
            "smax": lambda: smax.softmax(x),
            "smax.torch": lambda: st.softmax(xt),
            "torch": lambda: torch.softmax(xt, -1),
            "scipy": lambda: sp.softmax(x, axis=-1),
        }
        res = _alternate(fns, 200 if quick else 2000, 5)
        for k, s in res.items():
            rep.add("overhead", "softmax", f"{shape[0]}x{shape[1]}", "f32", smax.get_num_threads(), k, s)


def throughput(rep: Report, torch, quick: bool, threads):
    shapes = [(65536, 1024), (2048, 32768)] if not quick else [(16384, 1024)]
    for n in threads:
        smax.set_num_threads(n)
        torch.set_num_threads(n)
        for shape in shapes:
            x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
            xt = torch.from_numpy(x)
            nb = x.nbytes
            # Both sides allocate their output, as a caller of either does.
            ops = {
                "softmax": (lambda: smax.softmax(x), lambda: torch.softmax(xt, -1), 2 * nb),
                "log_softmax": (lambda: smax.log_softmax(x), lambda: torch.log_softmax(xt, -1), 2 * nb),
                "logsumexp": (lambda: smax.logsumexp(x), lambda: torch.logsumexp(xt, -1), nb),
            }
            for op, (a, b, traffic) in ops.items():
                res = _alternate({"smax": a, "torch": b}, 3, 3 if quick else 5)
                for k, s in res.items():
                    rep.add("throughput", op, f"{shape[0]}x{shape[1]}", "f32", n, k, s, traffic)
    smax.set_num_threads(0)


def autograd(rep: Report, torch, quick: bool):
    import torch.nn.functional as F

    import smax.torch as st

    n_thr = torch.get_num_threads()
    rows, vocab = (1024, 32768) if quick else (4096, 32768)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, vocab, generator=g)
    t = torch.randint(0, vocab, (rows,), generator=g)
    shape = f"{rows}x{vocab}"

    def fb(fn):
        def run():
            a = x.detach().requires_grad_()
            fn(a).backward()
            return a.grad

        return run

    cases = {
        "softmax": (fb(lambda a: (st.softmax(a) * 1.0).sum()), fb(lambda a: (torch.softmax(a, -1) * 1.0).sum())),
        "cross_entropy": (fb(lambda a: st.cross_entropy(a, t)), fb(lambda a: F.cross_entropy(a, t))),
    }
    for op, (ours, theirs) in cases.items():
        res = _alternate({"smax.torch": ours, "torch": theirs}, 2, 3 if quick else 5)
        peaks = {"smax.torch": _peak(ours), "torch": _peak(theirs)}
        for k, s in res.items():
            rep.add("autograd", op + " fwd+bwd", shape, "f32", n_thr, k, s, peak=peaks[k])

    n, d, v = (1024, 512, 32768) if quick else (2048, 1024, 32768)
    h0 = torch.randn(n, d, generator=g)
    w0 = torch.randn(v, d, generator=g) * 0.02
    tt = torch.randint(0, v, (n,), generator=g)

    def lce(fn):
        def run():
            h = h0.detach().requires_grad_()
            w = w0.detach().requires_grad_()
            fn(h, w).backward()

        return run

    ours = lce(lambda h, w: st.linear_cross_entropy(h, w, tt))
    theirs = lce(lambda h, w: F.cross_entropy(h @ w.T, tt))
    res = _alternate({"smax.torch": ours, "torch": theirs}, 1, 3)
    peaks = {"smax.torch": _peak(ours), "torch": _peak(theirs)}
    logits = n * v * 4
    grads = (n * d + v * d) * 4  # dh and dW, which every implementation returns
    for k, s in res.items():
        note = ""
        if peaks[k] is not None:
            extra = max(peaks[k] - grads, 0)
            note = f"beyond dh+dW: {extra / 2**20:.1f} MiB = {extra / logits:.1%} of the logits' bytes"
        rep.add("autograd", "linear_ce fwd+bwd", f"{n}x{d}x{v}", "f32", n_thr, k, s, peak=peaks[k], note=note)


def sdpa(rep: Report, torch, quick: bool):
    import torch.nn.functional as F

    import smax.torch as st

    b, h, s, d = (1, 8, 1024, 64) if quick else (1, 8, 2048, 64)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, h, s, d, generator=g) for _ in range(3))
    shape = f"{b}x{h}x{s}x{d}"
    for causal in (False, True):
        fwd = {
            "smax.torch": lambda: st.scaled_dot_product_attention(q, k, v, is_causal=causal),
            "torch": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal),
        }

        def fb(fn):
            def run():
                qq, kk, vv = (a.detach().requires_grad_() for a in (q, k, v))
                fn(qq, kk, vv, is_causal=causal).sum().backward()

            return run

        both = {"smax.torch": fb(st.scaled_dot_product_attention), "torch": fb(F.scaled_dot_product_attention)}
        tag = "causal" if causal else "full"
        for label, fns in (("fwd", fwd), ("fwd+bwd", both)):
            res = _alternate(fns, 1, 3 if quick else 5)
            for kk, sec in res.items():
                rep.add("sdpa", f"{label} {tag}", shape, "f32", torch.get_num_threads(), kk, sec)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m smax.bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller shapes and fewer repetitions")
    ap.add_argument("--json", help="write the records to this file")
    ap.add_argument(
        "--sections", default="overhead,throughput,autograd,sdpa", help="comma-separated subset of the sections"
    )
    ap.add_argument("--threads", default="1,2", help="thread counts of the throughput section")
    args = ap.parse_args(argv)
    import torch

    sections = args.sections.split(",")
    print(
        f"# smax {smax.__version__} ({smax.simd_level()}), torch {torch.__version__}, numpy {np.__version__}, "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
    )
    rep = Report()
    if "overhead" in sections:
        overhead(rep, torch, args.quick)
    if "throughput" in sections:
        throughput(rep, torch, args.quick, [int(t) for t in args.threads.split(",")])
    if "autograd" in sections:
        autograd(rep, torch, args.quick)
    if "sdpa" in sections:
        sdpa(rep, torch, args.quick)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rep.records, f, indent=1)


if __name__ == "__main__":
    main()
