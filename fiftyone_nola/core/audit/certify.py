"""A certified confidence threshold (Learn-then-Test, fixed-sequence testing).

For thresholds ``tau_1 > tau_2 > ...`` the null hypothesis of ``tau_k`` is "the labels of the pool
with confidence >= tau_k are less accurate than ``target``". Each is tested at level ``delta``
with an exact p-value, in order, stopping at the first one not rejected; the certificate is the
last rejected threshold. Fixed-sequence testing controls the family-wise error at ``delta``, so
with probability >= 1 - delta every certified region, and the lowest in particular, is at least
``target`` accurate (Angelopoulos, Bates, Candes, Jordan & Lei 2021).

The exact p-value needs a simple random sample of the region. Any Poisson design gives one:
the audited units of the region with key ``u < min pi`` over the region are a Bernoulli sample
with that common probability, hence, given its size, a simple random sample without replacement
of a region whose size is known; the p-value is hypergeometric (exact; the binomial is its limit
for large regions). Under the uniform design nothing is dropped; under weighted designs the units
sampled above the region's lowest rate are dropped, which is why the floor of the stratified and
active designs keeps the confident region's rate flat.

Thresholds start where the region's expected sample could reject at all (twice the all-correct
sample size ``log(delta) / log(target)``) and step by 1 % of the pool; they depend on the pool
and design only, never on the outcomes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from fiftyone_nola.core.audit.estimators import AuditData
from fiftyone_nola.core.audit.exact import hypergeom_critical, hypergeom_lower, hypergeom_pvalue
from fiftyone_nola.core.errors import InvalidInputError

STEPS = 100  # candidate regions: one per 1 % of the pool
START = 2.0  # the first region tested expects START x the smallest sample that can certify


def min_sample(target: float, delta: float) -> int:
    """Audited labels, all right, that the exact test needs to certify anything."""
    return int(np.ceil(np.log(delta) / np.log(target)))


@dataclass
class Candidates:
    """Candidate regions ``conf >= threshold``, most confident first."""

    threshold: np.ndarray  # descending
    size: np.ndarray  # pool units in each region (ascending)
    rate: np.ndarray  # the region's lowest inclusion probability (non-increasing)
    order: np.ndarray  # pool indices by descending confidence
    rank: np.ndarray  # position of each pool unit in ``order``


def candidates(conf: np.ndarray, pi: np.ndarray, target: float, delta: float) -> Candidates:
    """The thresholds to test (see the module doc), from the pool alone."""
    conf = np.asarray(conf, dtype=np.float64)
    order = np.argsort(-conf, kind="stable")
    rank = np.empty(len(conf), dtype=np.int64)
    rank[order] = np.arange(len(conf))
    sorted_conf = conf[order]
    # A region holds every unit tied with its threshold: cut only where the confidence drops.
    ends = np.flatnonzero(np.r_[sorted_conf[1:] < sorted_conf[:-1], True]) + 1
    low_rate = np.minimum.accumulate(np.asarray(pi, dtype=np.float64)[order])
    rate = low_rate[ends - 1]
    expected = rate * ends
    need = min(START * min_sample(target, delta), float(expected[-1]))
    first = int(np.argmax(expected >= need))
    step = max(1, len(conf) // STEPS)
    # one region per `step` more units (the first region reaching each size), and the whole pool
    sizes = np.arange(ends[first], ends[-1] + step, step)
    picked = np.unique(
        np.r_[first, np.searchsorted(ends, sizes, side="left").clip(first, len(ends) - 1), len(ends) - 1]
    )
    return Candidates(sorted_conf[ends[picked] - 1], ends[picked], rate[picked], order, rank)


def thinned_counts(data: AuditData, cand: Candidates) -> tuple[np.ndarray, np.ndarray]:
    """Per audit and candidate (T x C): the equal-probability sample's size and correct count."""
    C = len(cand.size)
    first = np.searchsorted(cand.size, cand.rank[data.unit], side="right")  # first region holding it
    # regions whose lowest rate is still above the unit's key (rates fall as regions grow)
    last = C - np.searchsorted(cand.rate[::-1], data.u, side="right") - 1
    ok = first <= last
    t, first, last, right = data.trial[ok], first[ok], last[ok] + 1, data.correct[ok].astype(np.float64)
    width = C + 1

    def spans(w):
        d = np.bincount(t * width + first, weights=w, minlength=data.trials * width)
        d -= np.bincount(t * width + last, weights=w, minlength=data.trials * width)
        return np.cumsum(d.reshape(data.trials, width), axis=1)[:, :C]

    return spans(np.ones(len(t))), spans(right)


@dataclass
class Certificate:
    """Per audit: index of the certified candidate (-1: none), its threshold and region size."""

    index: np.ndarray
    threshold: np.ndarray  # NaN when nothing is certified
    certified: np.ndarray  # pool units at or above the threshold (0 when none)
    rejected: np.ndarray  # T x C: the candidate's null hypothesis is rejected at level delta
    candidates: Candidates
    m: np.ndarray  # T x C equal-probability sample sizes
    x: np.ndarray  # T x C of which correct


def certify(data: AuditData, target: float = 0.95, delta: float = 0.05) -> Certificate:
    """Fixed-sequence test of the candidate thresholds for every audit in ``data``."""
    if not 0.0 < target < 1.0 or not 0.0 < delta < 1.0:
        raise InvalidInputError(f"target and delta must be in (0, 1), not {target} and {delta}")
    cand = candidates(data.conf, data.pi, target, delta)
    m, x = thinned_counts(data, cand)
    rejected = x >= _critical(m.astype(np.int64), cand.size, target, delta)
    index = np.cumprod(rejected, axis=1).sum(axis=1) - 1  # fixed sequence: stop at the first failure
    found = index >= 0
    safe = np.maximum(index, 0)
    threshold = np.where(found, cand.threshold[safe], np.nan)
    certified = np.where(found, cand.size[safe], 0)
    return Certificate(index, threshold, certified, rejected, cand, m, x)


def _critical(m: np.ndarray, size: np.ndarray, target: float, delta: float) -> np.ndarray:
    """Critical correct counts for every (audit, candidate), computed once per distinct pair."""
    C = len(size)
    key = m * C + np.arange(C)[None, :]
    uniq, inverse = np.unique(key, return_inverse=True)
    crit = hypergeom_critical(uniq // C, size[uniq % C], target, delta)
    return crit[inverse].reshape(m.shape)


def pvalues(cert: Certificate, target: float, trial: int = 0) -> np.ndarray:
    """Exact p-value of each candidate's null hypothesis for one audit."""
    return hypergeom_pvalue(
        cert.x[trial].astype(np.int64), cert.m[trial].astype(np.int64), cert.candidates.size, target
    )


def certified_lower_bounds(cert: Certificate, delta: float, trial: int = 0) -> np.ndarray:
    """Exact one-sided (1 - delta) lower bound of each candidate region's accuracy (one audit):
    a region is certified exactly when its bound and every bound before it reach the target."""
    return hypergeom_lower(cert.x[trial].astype(np.int64), cert.m[trial].astype(np.int64), cert.candidates.size, delta)


def describe(threshold: Optional[float], certified: int, pool: int, target: float, delta: float) -> str:
    """The certificate in one plain sentence."""
    if threshold is None or not np.isfinite(threshold):
        return (
            f"Nothing can be certified: no confidence threshold is shown to give labels at least "
            f"{target:.0%} accurate with probability {1 - delta:.0%}. Review the labels, or audit more."
        )
    return (
        f"Labels with confidence >= {threshold:.4g} ({certified} of {pool}) are at least {target:.0%} "
        f"accurate with probability >= {1 - delta:.0%}; the other {pool - certified} need review."
    )
