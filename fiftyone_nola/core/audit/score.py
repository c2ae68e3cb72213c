"""The score interval for a stratified proportion ``sum_h W_h p_h`` (the stratified analogue of
Wilson's interval), through the constrained maximum-likelihood estimate.

For a candidate accuracy ``t``, the per-stratum proportions closest to the audit (in likelihood)
among those with ``sum_h W_h p_h = t`` move first where a stratum is sampled thinly for its weight
(the multiplier of stratum h is ``lam W_h / n_h``): errors the audit may have missed are looked for
where it looked least. ``t`` is in the interval when ``|estimate - t| <= z sqrt(V(t))`` with the
variance ``V(t) = sum_h W_h^2 (1 - f_h) p_h(t) (1 - p_h(t)) / n_h`` taken *at* ``t``, so a
stratum whose audited labels were all right still carries variance away from 1.
"""

from __future__ import annotations

import numpy as np
from scipy import stats

ITERATIONS = 34  # bisection steps on log10 of the multiplier over [LOG_LOW, LOG_HIGH]: 1e-9 decades
LOG_LOW, LOG_HIGH = -8.0, 12.0


def constrained_p(a: np.ndarray, p_hat: np.ndarray) -> np.ndarray:
    """Root in [0, 1] of ``p_hat - p = a p (1 - p)``: the stratum's proportion at multiplier ``a``."""
    disc = np.sqrt(np.maximum((a + 1) ** 2 - 4 * a * p_hat, 0.0))
    with np.errstate(divide="ignore", invalid="ignore"):
        up = 2 * p_hat / ((a + 1) + disc)  # stable form for a >= 0
        down = ((a + 1) - disc) / (2 * a)  # a < 0
    return np.clip(np.nan_to_num(np.where(a >= 0, up, down), nan=0.0), 0.0, 1.0)


def score_interval(
    W: np.ndarray, n: np.ndarray, x: np.ndarray, size: np.ndarray, alpha: float = 0.05
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(estimate, low, high)`` per audit for strata weights ``W`` (H), audited ``n`` and correct
    ``x`` per audit and stratum (T x H, may be non-integer effective counts), stratum sizes ``size``.
    Every stratum with weight must have ``n > 0`` (the caller handles empty ones)."""
    z = stats.norm.ppf(1 - alpha / 2)
    nn = np.maximum(n, 1e-12)
    p_hat = np.clip(x / nn, 0.0, 1.0)
    est = (W * p_hat).sum(axis=1)
    fpc = 1.0 - np.minimum(n / np.maximum(size, 1.0), 1.0)
    coef = W**2 * fpc / nn
    bounds = []
    for sign in (1.0, -1.0):  # lower bound: push proportions down; upper: up
        lo = np.full(len(est), LOG_LOW)
        hi = np.full(len(est), LOG_HIGH)
        for _ in range(ITERATIONS):
            mid = 0.5 * (lo + hi)
            p = constrained_p(sign * 10.0 ** mid[:, None] * W / nn, p_hat)
            beyond = sign * (est - (W * p).sum(axis=1)) > z * np.sqrt((coef * p * (1 - p)).sum(axis=1))
            hi = np.where(beyond, mid, hi)
            lo = np.where(beyond, lo, mid)
        p = constrained_p(sign * 10.0 ** lo[:, None] * W / nn, p_hat)
        bounds.append((W * p).sum(axis=1))
    return est, np.minimum(bounds[0], est), np.maximum(bounds[1], est)
