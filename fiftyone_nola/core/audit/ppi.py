"""Prediction-powered inference for a mean (PPI++, Angelopoulos, Duchi & Zrnic 2023), from sums.

The same estimate and interval as the authors' ``ppi_py.ppi_mean_ci`` / ``ppi_mean_pointestimate``
(power-tuned ``lam`` clipped to [0, 1], chosen as they choose it), written over per-audit sums so
that thousands of simulated audits cost one pass. ``tests/test_audit_golden.py`` checks the match.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats


@dataclass
class LabelledSums:
    """Per audit: count and sums of y, f, f^2, y f, y^2 over the labeled units."""

    n: np.ndarray
    y: np.ndarray
    f: np.ndarray
    ff: np.ndarray
    yf: np.ndarray
    yy: np.ndarray

    @classmethod
    def of(cls, y: np.ndarray, f: np.ndarray) -> LabelledSums:
        y, f = np.asarray(y, dtype=np.float64), np.asarray(f, dtype=np.float64)
        one = np.array
        return cls(
            one([len(y)], float),
            one([y.sum()]),
            one([f.sum()]),
            one([(f * f).sum()]),
            one([(y * f).sum()]),
            one([(y * y).sum()]),
        )


def power_tuning(s: LabelledSums, f_pool: np.ndarray) -> np.ndarray:
    """PPI++'s lam: cov(y, f) / ((1 + n / N) var(f over labeled + unlabeled)), clipped to [0, 1]."""
    N = len(f_pool)
    fp, fpp = float(np.sum(f_pool)), float(np.sum(np.square(f_pool)))
    n = np.maximum(s.n, 1)
    cov = s.yf / n - (s.y / n) * (s.f / n)
    tot = s.n + N
    mean_c = (s.f + fp) / tot
    var_c = (s.ff + fpp - tot * mean_c**2) / np.maximum(tot - 1, 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        lam = cov / ((1 + s.n / N) * var_c)
    return np.clip(np.nan_to_num(lam, nan=0.0, posinf=1.0, neginf=0.0), 0.0, 1.0)


def ppi_mean_and_variance(s: LabelledSums, f_pool: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(estimate, variance)`` of the PPI++ mean for each audit."""
    f_pool = np.asarray(f_pool, dtype=np.float64)
    N = len(f_pool)
    lam = power_tuning(s, f_pool)
    n = np.maximum(s.n, 1)
    mean_fp = f_pool.mean()
    est = lam * mean_fp + (s.y - lam * s.f) / n
    imputed_var = lam**2 * f_pool.var() / N
    r_mean = (s.y - lam * s.f) / n
    r_var = np.maximum((s.yy - 2 * lam * s.yf + lam**2 * s.ff) / n - r_mean**2, 0.0) / n
    return est, imputed_var + r_var


def ppi_mean_interval(y, f, f_pool, alpha: float = 0.05) -> tuple[float, float, float]:
    """One audit: ``(estimate, low, high)`` of PPI++ for the mean of ``y`` (labeled ``y`` with
    predictions ``f``; ``f_pool`` the predictions on the unlabeled data)."""
    est, var = ppi_mean_and_variance(LabelledSums.of(y, f), f_pool)
    half = stats.norm.ppf(1 - alpha / 2) * np.sqrt(var)
    return float(est[0]), float(est[0] - half[0]), float(est[0] + half[0])
