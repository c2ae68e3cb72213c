"""Cross-prediction-powered inference (Zrnic & Candes 2024) with a calibrated confidence.

The raw confidence of a zero-shot or prompt-tuned model is often miscalibrated, so as a
predictor of "this label is right" it leaves residuals that PPI must pay for. Here the predictor
is the confidence *calibrated on the audit itself*: histogram binning on the pool's confidence
quantiles (bins fixed from the pool, which needs no label), each bin's rate of correct labels
shrunk towards the bin's mean confidence. Cross-fitting keeps it honest: the audit is split
into ``K`` folds by its random keys, the calibration for fold ``k`` is fitted on the other folds
only, and the pool is scored by the average of the ``K`` calibrations. Then, as in the authors'
``ppi_py.crossppi_mean_ci``::

    estimate = mean over the pool of g_bar(conf) + mean over the audit of (y - g_k(conf))
    variance = var_pool(g_bar) / N + var_audit(y - g_k) / n

Everything is computed from per-(audit, fold, bin) sums, so thousands of simulated audits cost
one pass. ``tests/test_audit_golden.py`` checks the match with ``ppi_py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FOLDS = 5
MAX_BINS = 10
PER_BIN = 20  # audited labels per bin the binning aims at (fewer bins for small audits)
PRIOR = 2.0  # pseudo-labels at the bin's mean confidence: an empty bin is its mean confidence
MIN_EACH = 5  # right and wrong labels an audit needs before the calibrated predictor is trusted


@dataclass
class CrossFit:
    """Per audit: the calibrated prediction of each audited unit (from the folds it was not in)
    and of each pool bin (the folds' average), with the pool's bin shares."""

    labelled: np.ndarray  # M, aligned with the audited units
    bins: np.ndarray  # T x B: g_bar per bin
    share: np.ndarray  # B: share of the pool in each bin
    per_fold: np.ndarray  # T x K x B: g_k per bin


def pool_bins(conf: np.ndarray, n_audited: float) -> np.ndarray:
    """The bin of each pool unit: confidence quantiles of the pool, about PER_BIN audited per bin."""
    B = int(np.clip(n_audited // PER_BIN, 1, MAX_BINS))
    edges = np.unique(np.quantile(conf, np.linspace(0, 1, B + 1)[1:-1]))
    return np.searchsorted(edges, conf, side="right")


def folds_by_key(trial: np.ndarray, u: np.ndarray, folds: int = FOLDS) -> np.ndarray:
    """Fold of each audited unit: its rank by random key within its audit, modulo ``folds``."""
    order = np.lexsort((u, trial))
    starts = np.searchsorted(trial[order], trial[order], side="left")
    fold = np.empty(len(u), dtype=np.int64)
    fold[order] = (np.arange(len(u)) - starts) % folds
    return fold


def cross_fit(conf, bin_of, unit, trial, u, correct, trials: int, folds: int = FOLDS) -> CrossFit:
    """Fold-out binned calibrations of correctness on confidence, for every audit at once."""
    B = int(bin_of.max(initial=0)) + 1
    size = np.bincount(bin_of, minlength=B).astype(np.float64)
    mean_conf = np.bincount(bin_of, weights=conf, minlength=B) / np.maximum(size, 1)
    fold = folds_by_key(trial, u, folds)
    b = bin_of[unit]
    key = (trial * folds + fold) * B + b
    cells = trials * folds * B
    count = np.bincount(key, minlength=cells).reshape(trials, folds, B)
    right = np.bincount(key, weights=correct.astype(np.float64), minlength=cells).reshape(trials, folds, B)
    train_n = count.sum(axis=1, keepdims=True) - count
    train_x = right.sum(axis=1, keepdims=True) - right
    g = (train_x + PRIOR * mean_conf) / (train_n + PRIOR)
    return CrossFit(g[trial, fold, b], g.mean(axis=1), size / max(size.sum(), 1.0), g)


def crossppi_mean_and_variance(fit: CrossFit, trial, correct, trials: int, pool_size: int):
    """``(estimate, variance, n)`` of the cross-PPI mean for each audit."""
    y = correct.astype(np.float64)
    n = np.bincount(trial, minlength=trials).astype(np.float64)
    nn = np.maximum(n, 1.0)
    resid = y - fit.labelled
    r_mean = np.bincount(trial, weights=resid, minlength=trials) / nn
    r_var = np.maximum(np.bincount(trial, weights=resid**2, minlength=trials) / nn - r_mean**2, 0.0)
    pool_mean = fit.bins @ fit.share
    pool_var = np.maximum(fit.bins**2 @ fit.share - pool_mean**2, 0.0)
    return pool_mean + r_mean, pool_var / max(pool_size, 1) + r_var / nn, n
