"""Synthetic labeled pools with known truth, and many simulated audits of them.

A pool of ``size`` predictions: each has a latent score ``s`` (normal, spread ``spread``, shifted
per class so classes differ in accuracy), a true probability of being right
``q = 1/K + (1 - 1/K) sigmoid(s)`` and a realised outcome; the *reported* confidence is ``q``
itself (``calibrated``), more extreme (``over``: ``sigmoid(1.6 s + 1)``) or less
(``under``: ``sigmoid(0.6 s - 0.3)``), mapped to [1/K, 1] like a top softmax probability.
Predicted classes follow a Zipf law (imbalanced). The mean of ``q`` is solved to the accuracy
asked for; the realised accuracy is what intervals must cover.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import brentq
from scipy.special import expit

from fiftyone_nola.core.audit.designs import Design, draw, plan_design
from fiftyone_nola.core.audit.estimators import AuditData

CALIBRATIONS = {"calibrated": (1.0, 0.0), "over": (1.6, 1.0), "under": (0.6, -0.3)}


@dataclass
class Population:
    conf: np.ndarray  # reported confidence
    correct: np.ndarray  # truth: the prediction is right
    label: np.ndarray  # predicted class index

    @property
    def accuracy(self) -> float:
        return float(self.correct.mean())


def population(
    size: int = 10_000,
    accuracy: float = 0.9,
    calibration: str = "calibrated",
    classes: int = 10,
    spread: float = 2.0,
    seed: int = 0,
) -> Population:
    """A synthetic pool (see the module doc)."""
    rng = np.random.default_rng(seed)
    base = 1.0 / classes
    freq = 1.0 / np.arange(1, classes + 1)
    label = rng.choice(classes, size=size, p=freq / freq.sum())
    shift = rng.normal(0.0, 0.5, classes)[label]
    s = spread * rng.standard_normal(size) + shift
    target = (accuracy - base) / (1.0 - base)
    mu = brentq(lambda m: expit(m + s).mean() - target, -50.0, 50.0)
    s = s + mu
    q = base + (1.0 - base) * expit(s)
    correct = rng.random(size) < q
    k, b = CALIBRATIONS[calibration]
    conf = base + (1.0 - base) * expit(k * s + b)
    return Population(conf=conf, correct=correct, label=label)


def audits(
    pop: Population, n: int, kind: str, trials: int, seed: int = 0, design: Design = None, **design_kw
) -> tuple[AuditData, Design]:
    """``trials`` independent audits of ``pop`` under a design, with outcomes from the truth."""
    design = design or plan_design(pop.conf, n, kind, seed=seed, **design_kw)
    pi = design.inclusion(pop.conf)
    d = draw(design, pi, trials=trials, rng=np.random.default_rng(seed))
    data = AuditData(
        conf=pop.conf,
        pi=pi,
        stratum=design.strata(pop.conf),
        unit=d.unit,
        u=d.u,
        correct=pop.correct[d.unit],
        trial=d.trial,
        trials=trials,
    )
    return data, design


def interval_study(
    pop: Population, n: int, kind: str, method: str, trials: int, seed: int = 0, alpha=0.05, **kw
) -> dict:
    """Coverage and width of ``method``'s intervals over ``trials`` audits of ``n`` under ``kind``."""
    from fiftyone_nola.core.audit.estimators import estimate

    data, _ = audits(pop, n, kind, trials, seed=seed, **kw)
    r = estimate(data, method, alpha)
    a = pop.accuracy
    cover = float(np.mean((r.low <= a) & (a <= r.high)))
    return {
        "n": n,
        "coverage": cover,
        "coverage_se": float(np.sqrt(cover * (1 - cover) / trials)),
        "mean_half_width": float(np.mean(r.high - r.low) / 2),
        "mean_audited": float(np.mean(r.n)),
    }


def labels_needed(
    pop: Population, kind: str, method: str, half_width: float = 0.03, trials: int = 1000, seed: int = 0, **kw
) -> dict:
    """Smallest audit size whose intervals' mean half-width is <= ``half_width`` (bisection over
    n with the same random numbers at every n), with the coverage measured there."""

    def width(n: int) -> float:
        return interval_study(pop, n, kind, method, trials, seed, **kw)["mean_half_width"]

    lo, hi = 10, 20
    while width(hi) > half_width:
        lo, hi = hi, hi * 2
        if hi > len(pop.conf):
            raise ValueError("no audit smaller than the pool reaches that width")
    while hi - lo > max(1, lo // 100):
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if width(mid) > half_width else (lo, mid)
    return interval_study(pop, hi, kind, method, trials, seed + 1, **kw)
