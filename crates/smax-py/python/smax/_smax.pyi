"""Type stubs of the native module `smax._smax` (the Python package wraps these; call the
functions of `smax` instead). Functions returning `bool` (or `None` for "no result") report
`False`/`None` when no smax layout expresses an array's strides: the caller copies the array
and calls again."""

from typing import Optional

import numpy as np

class SmaxError(ValueError):
    """An error smax returned for the given input."""

def set_num_threads(n: int) -> None: ...
def get_num_threads() -> int: ...
def simd_level() -> str: ...
def normalize(
    op: str, x: np.ndarray, out: np.ndarray, axis: int, temperature: float, masked_row: str
) -> bool: ...
def logsumexp(x: np.ndarray, out: np.ndarray, axis: int, temperature: float) -> bool: ...
def normalize_backward(
    op: str, y: np.ndarray, dy: np.ndarray, out: np.ndarray, axis: int, temperature: float
) -> bool: ...
def cross_entropy(
    logits: np.ndarray,
    target: np.ndarray,
    weight: Optional[np.ndarray],
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    z_loss: float,
    softcap: Optional[float],
    temperature: float,
    grad_scale: float,
    grad: Optional[np.ndarray] = None,
    loss_out: Optional[np.ndarray] = None,
    z_out: Optional[np.ndarray] = None,
    lse_out: Optional[np.ndarray] = None,
) -> Optional[tuple[float, float, int, float]]: ...
def linear_cross_entropy(
    h: np.ndarray,
    w: np.ndarray,
    target: np.ndarray,
    bias: Optional[np.ndarray],
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    z_loss: float,
    softcap: Optional[float],
    grad_scale: float,
    dh: Optional[np.ndarray] = None,
    dw: Optional[np.ndarray] = None,
    dbias: Optional[np.ndarray] = None,
    loss_out: Optional[np.ndarray] = None,
    z_out: Optional[np.ndarray] = None,
    lse_out: Optional[np.ndarray] = None,
) -> tuple[float, float, int, float]: ...
def attention(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    out: np.ndarray,
    lse: Optional[np.ndarray],
    causal: bool,
    scale: Optional[float],
    window: Optional[tuple[int, int]],
    softcap: Optional[float],
    temperature: float,
    offset: Optional[int] = None,
    bias: Optional[np.ndarray] = None,
    mask: Optional[np.ndarray] = None,
) -> None: ...
def attention_backward(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    out: np.ndarray,
    lse: np.ndarray,
    d_out: np.ndarray,
    dq: np.ndarray,
    dk: np.ndarray,
    dv: np.ndarray,
    causal: bool,
    scale: Optional[float],
    window: Optional[tuple[int, int]],
    softcap: Optional[float],
    temperature: float,
    offset: Optional[int] = None,
    bias: Optional[np.ndarray] = None,
    mask: Optional[np.ndarray] = None,
) -> None: ...
def sample(
    logits: np.ndarray,
    tokens: np.ndarray,
    temperature: float,
    top_k: Optional[int],
    top_p: Optional[float],
    min_p: Optional[float],
    seeds: np.ndarray,
    step: int,
    uniforms: Optional[np.ndarray] = None,
) -> bool: ...
def process(
    logits: np.ndarray,
    out: np.ndarray,
    log: bool,
    temperature: float,
    top_k: Optional[int],
    top_p: Optional[float],
    min_p: Optional[float],
) -> Optional[list[int]]: ...
def fit_temperature(
    logits: np.ndarray, labels: np.ndarray, t_min: float, t_max: float
) -> Optional[tuple[float, float, float, int, bool, bool]]: ...
def calibration_error(
    logits: np.ndarray, labels: np.ndarray, bins: int, binning: str
) -> Optional[tuple[float, float, float, list[tuple[float, float, int, float, float]]]]: ...
def brier_score(logits: np.ndarray, labels: np.ndarray) -> Optional[float]: ...
def ood_scores(logits: np.ndarray, out: np.ndarray, score: str, temperature: float) -> bool: ...
