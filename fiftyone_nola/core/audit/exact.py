"""Exact intervals and tests for a proportion, vectorised over many audits.

Clopper-Pearson: the exact binomial interval (the same as
``scipy.stats.binomtest(k, n).proportion_ci(method="exact")`` and statsmodels'
``proportion_confint(method="beta")``), written through beta quantiles so that it takes arrays and
non-integer "effective" counts. Hypergeometric: the exact test when a simple random sample is
drawn without replacement from a pool of known size, as an audit is.
"""

from __future__ import annotations

import numpy as np
from scipy import stats


def clopper_pearson(x, n, alpha: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """Two-sided (1 - alpha) Clopper-Pearson interval for ``x`` successes in ``n`` trials.

    ``n == 0`` gives [0, 1]. Non-integer ``x``/``n`` (effective sizes) use the same beta quantiles."""
    x, n = np.broadcast_arrays(np.asarray(x, dtype=np.float64), np.asarray(n, dtype=np.float64))
    with np.errstate(invalid="ignore", divide="ignore"):
        low = np.where(x > 0, stats.beta.ppf(alpha / 2, np.maximum(x, 1e-300), n - x + 1), 0.0)
        high = np.where(x < n, stats.beta.ppf(1 - alpha / 2, x + 1, np.maximum(n - x, 1e-300)), 1.0)
    empty = n <= 0
    return np.where(empty, 0.0, np.nan_to_num(low)), np.where(empty, 1.0, np.nan_to_num(high, nan=1.0))


def clopper_pearson_lower(x, n, delta: float = 0.05) -> np.ndarray:
    """One-sided (1 - delta) Clopper-Pearson lower bound."""
    return clopper_pearson(x, n, 2 * delta)[0]


def _null_correct(target, pool) -> np.ndarray:
    """The most correct units a pool of this size can hold while its accuracy is below ``target``."""
    pool = np.asarray(pool, dtype=np.int64)
    return np.ceil(np.asarray(target, dtype=np.float64) * pool - 1e-9).astype(np.int64) - 1


def hypergeom_pvalue(x, m, pool, target: float) -> np.ndarray:
    """p-value of H0 "accuracy of the pool < target" after ``x`` correct in a simple random sample
    of ``m`` drawn without replacement from ``pool`` units (exact; the sup over H0 is at its edge)."""
    x, m, pool = (np.asarray(a, dtype=np.int64) for a in np.broadcast_arrays(x, m, pool))
    k0 = _null_correct(target, pool)
    p = stats.hypergeom.sf(x - 1, np.maximum(pool, 1), np.clip(k0, 0, None), m)
    p = np.where(k0 < 0, 0.0, p)  # no pool of that size is below the target: H0 is empty
    return np.where(m <= 0, 1.0, np.clip(p, 0.0, 1.0))


def hypergeom_lower(x, m, pool, delta: float = 0.05) -> np.ndarray:
    """One-sided (1 - delta) exact lower bound on a pool's accuracy from a simple random sample
    without replacement: the smallest K/pool with P_K(X >= x) > delta (dual of the test above)."""
    x, m, pool = (np.asarray(a, dtype=np.int64) for a in np.broadcast_arrays(x, m, pool))
    lo = np.zeros(x.shape, dtype=np.int64)  # invariant: P_lo(X >= x) <= delta unless lo == 0
    hi = np.maximum(pool, 0).copy()  # P_hi(X >= x) = 1 > delta
    for _ in range(int(np.ceil(np.log2(max(2, int(hi.max(initial=1)) + 1)))) + 1):
        mid = (lo + hi) // 2
        ok = stats.hypergeom.sf(x - 1, np.maximum(pool, 1), mid, m) > delta
        hi = np.where(ok, mid, hi)
        lo = np.where(ok, lo, mid)
    k = np.where(stats.hypergeom.sf(x - 1, np.maximum(pool, 1), lo, m) > delta, lo, hi)
    return np.where((m <= 0) | (pool <= 0), 0.0, k / np.maximum(pool, 1))


def effective_clopper_pearson(estimate, variance, n, alpha: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """Clopper-Pearson at the effective sample size ``p (1 - p) / variance`` of an estimator
    (Korn & Graubard 1998): exact for a simple random sample, skewed like the binomial near 0
    and 1 for any other. A zero variance (every audited label right, or wrong) takes ``n``."""
    p = np.clip(np.asarray(estimate, dtype=np.float64), 0.0, 1.0)
    variance = np.asarray(variance, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        n_eff = np.where(variance > 0, p * (1 - p) / variance, np.asarray(n, dtype=np.float64))
    return clopper_pearson(p * n_eff, n_eff, alpha)


def hypergeom_critical(m, pool, target: float, delta: float) -> np.ndarray:
    """Smallest correct count ``x`` out of ``m`` whose :func:`hypergeom_pvalue` is <= ``delta``
    (``m + 1`` when none is), for many (m, pool) pairs at once: the whole upper tail of each
    pair from log-binomial coefficients in one array (scipy's discrete inverse is a Python loop)."""
    m, pool = np.broadcast_arrays(np.asarray(m, dtype=np.int64), np.asarray(pool, dtype=np.int64))
    shape = m.shape
    m, pool = m.ravel(), pool.ravel()
    k0 = _null_correct(target, pool)
    k = np.clip(k0, 0, None)
    x = np.arange(int(m.max(initial=0)) + 1)[None, :]
    mm, kk, nn = m[:, None], k[:, None], pool[:, None]
    ok = (x <= mm) & (x <= kk) & (mm - x <= nn - kk)
    with np.errstate(invalid="ignore"):
        logp = _log_choose(kk, x) + _log_choose(nn - kk, mm - x) - _log_choose(nn, mm)
    pmf = np.where(ok, np.exp(np.where(ok, logp, 0.0)), 0.0)
    tail = np.cumsum(pmf[:, ::-1], axis=1)[:, ::-1]  # P(X >= x)
    reject = (tail <= delta) & (x <= mm)
    crit = np.where(reject.any(axis=1), np.argmax(reject, axis=1), m + 1)
    crit = np.where(k0 < 0, 0, crit)  # an empty null is always rejected
    return np.where(m <= 0, 1, crit).reshape(shape)


def _log_choose(a, b):
    from scipy.special import gammaln

    return gammaln(a + 1.0) - gammaln(b + 1.0) - gammaln(a - b + 1.0)
