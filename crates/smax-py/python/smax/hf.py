"""Logits processors for Hugging Face ``transformers``' ``generate``, backed by smax's exact
sampler filters (temperature, top-k, top-p, min-p).

Each processor returns the log-probabilities of the filtered distribution renormalised over
the kept set (``-inf`` outside it). They differ from the kept scores ``transformers``' own
warpers return by a constant per row, so the softmax ``generate`` takes next is the same
distribution. Use them in a ``LogitsProcessorList`` (with ``do_sample=True``), or call them
on a ``[batch, vocab]`` tensor directly. ``min_tokens_to_keep`` must be 1 (smax always keeps
the most likely token).
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch

import smax as _s

try:
    from transformers import LogitsProcessor as _Base
except ImportError:  # transformers is optional: the processors are plain callables then

    class _Base:  # type: ignore[no-redef]
        """Stand-in for ``transformers.LogitsProcessor`` when it is not installed."""


__all__ = [
    "SmaxLogitsWarper",
    "TemperatureLogitsWarper",
    "TopKLogitsWarper",
    "TopPLogitsWarper",
    "MinPLogitsWarper",
]


class SmaxLogitsWarper(_Base):
    """Temperature, top-k, top-p and min-p in one pass (smax's order: temperature, then top-k,
    then top-p over the top-k set, then min-p)."""

    def __init__(
        self,
        temperature: float = 1.0,
        top_k: Optional[int] = None,
        top_p: Optional[float] = None,
        min_p: Optional[float] = None,
        filter_value: float = -math.inf,
        min_tokens_to_keep: int = 1,
    ):
        if min_tokens_to_keep != 1:
            raise ValueError("smax keeps at least the most likely token; min_tokens_to_keep must be 1")
        if filter_value != -math.inf:
            raise ValueError("smax marks removed tokens with -inf; filter_value must be -inf")
        self.temperature = temperature
        self.top_k = top_k
        self.top_p = top_p
        self.min_p = min_p

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        x = scores.detach().to("cpu", torch.float32).numpy()
        lp = _s.process(x, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, min_p=self.min_p, log=True)
        return torch.from_numpy(np.ascontiguousarray(lp)).to(device=scores.device, dtype=scores.dtype)


class TemperatureLogitsWarper(SmaxLogitsWarper):
    """``scores / temperature`` (as log-probabilities)."""

    def __init__(self, temperature: float):
        super().__init__(temperature=temperature)


class TopKLogitsWarper(SmaxLogitsWarper):
    """Keeps the ``top_k`` most likely tokens and every token tied with the k-th."""

    def __init__(self, top_k: int, filter_value: float = -math.inf, min_tokens_to_keep: int = 1):
        super().__init__(top_k=top_k, filter_value=filter_value, min_tokens_to_keep=min_tokens_to_keep)


class TopPLogitsWarper(SmaxLogitsWarper):
    """Keeps the smallest set of most likely tokens whose probability reaches ``top_p``."""

    def __init__(self, top_p: float, filter_value: float = -math.inf, min_tokens_to_keep: int = 1):
        super().__init__(top_p=top_p, filter_value=filter_value, min_tokens_to_keep=min_tokens_to_keep)


class MinPLogitsWarper(SmaxLogitsWarper):
    """Keeps the tokens whose probability is at least ``min_p`` times the largest one."""

    def __init__(self, min_p: float, filter_value: float = -math.inf, min_tokens_to_keep: int = 1):
        super().__init__(min_p=min_p, filter_value=filter_value, min_tokens_to_keep=min_tokens_to_keep)
