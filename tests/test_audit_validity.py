"""Validity by simulation: intervals cover the true accuracy, certificates hold, a wrong estimator fails.

Synthetic pools of 10,000 predictions with known truth (``fiftyone_nola.core.audit.simulate``):
accuracy 0.6 to 0.99, calibrated / over- / under-confident confidences, 2 to 100 imbalanced
classes. Each setting runs 2,000 independent audits (fixed seeds). The bar, from the issue: an
interval covers the truth in at least (1 - alpha) - 2 Monte-Carlo standard errors of the audits;
the certified region's true accuracy reaches the target in at least (1 - delta) - 2 s.e.
"""

import functools

import numpy as np
import pytest

from fiftyone_nola.core.audit import simulate as sim
from fiftyone_nola.core.audit.certify import certify
from fiftyone_nola.core.audit.estimators import AuditData, estimate
from fiftyone_nola.core.audit.exact import clopper_pearson

TRIALS = 2000
ALPHA = DELTA = 0.05
TARGET = 0.95

# (accuracy, confidences, classes, audit size, pool size)
SETTINGS = [
    (0.90, "calibrated", 10, 200, 10_000),
    (0.90, "over", 10, 300, 10_000),
    (0.95, "over", 10, 200, 10_000),
    (0.97, "calibrated", 100, 100, 10_000),
    (0.99, "calibrated", 10, 200, 10_000),
    (0.99, "over", 2, 100, 10_000),
    (0.80, "calibrated", 100, 150, 10_000),
    (0.60, "under", 2, 100, 10_000),
    (0.70, "over", 100, 200, 10_000),
    (0.85, "under", 10, 300, 1_000),  # 30 % of the pool audited: without-replacement effects
]
DESIGNS = {"uniform": ("exact", "ppi", "ppi_calibrated"), "stratified": ("stratified", "exact"), "active": ("active",)}
IDS = [f"acc{a}-{c}-K{k}-n{n}-N{N}" for a, c, k, n, N in SETTINGS]


def floor(level: float) -> float:
    """(level) - 2 Monte-Carlo standard errors over TRIALS audits."""
    return level - 2 * np.sqrt(level * (1 - level) / TRIALS)


@functools.cache
def population(setting):
    acc, cal, classes, _, size = setting
    return sim.population(size=size, accuracy=acc, calibration=cal, classes=classes, seed=1)


def audits(setting, kind) -> AuditData:
    data, _ = sim.audits(population(setting), setting[3], kind, TRIALS, seed=2)
    return data


def covered(low, high, truth) -> float:
    return float(np.mean((low <= truth) & (truth <= high)))


def certificate_held(pop, c) -> np.ndarray:
    """Per audit: nothing certified, or the certified region's true accuracy reaches the target."""
    order = np.argsort(-pop.conf, kind="stable")
    region_accuracy = np.cumsum(pop.correct[order]) / np.arange(1, len(order) + 1)
    return (c.index < 0) | (region_accuracy[c.candidates.size[np.maximum(c.index, 0)] - 1] >= TARGET)


@pytest.mark.parametrize("kind", list(DESIGNS))
@pytest.mark.parametrize("setting", SETTINGS, ids=IDS)
def test_intervals_cover_and_certificates_hold(setting, kind):
    pop = population(setting)
    data = audits(setting, kind)
    for method in DESIGNS[kind]:
        r = estimate(data, method, ALPHA)
        assert covered(r.low, r.high, pop.accuracy) >= floor(1 - ALPHA), (kind, method)
    c = certify(data, TARGET, DELTA)
    assert np.mean(certificate_held(pop, c)) >= floor(1 - DELTA)
    for t in np.flatnonzero(c.index >= 0)[:5]:  # a certified region is the pool at or above its threshold
        assert (pop.conf >= c.threshold[t]).sum() == c.certified[t]


def test_per_class_intervals_cover_each_class_accuracy():
    setting = SETTINGS[1]
    pop, data = population(setting), audits(setting, "stratified")
    sizes = np.bincount(pop.label)
    for k in (int(np.argmax(sizes)), int(np.argsort(sizes)[len(sizes) // 2])):
        mask = pop.label == k
        r = estimate(data.domain(mask), "stratified", ALPHA)
        assert covered(r.low, r.high, pop.correct[mask].mean()) >= floor(1 - ALPHA), k


def test_ignoring_the_stratified_design_s_weights_fails_the_same_check():
    """The deliberately wrong estimator: the audited labels' plain accuracy with Clopper-Pearson,
    as if a stratified audit were a simple random one. It over-counts the low-confidence strata."""
    setting = SETTINGS[0]
    pop, data = population(setting), audits(setting, "stratified")
    n = data.per_trial()
    right = data.per_trial(data.correct)
    low, high = clopper_pearson(right, n, ALPHA)
    assert covered(low, high, pop.accuracy) < floor(1 - ALPHA)
    # while the right estimator on the very same audits passes
    r = estimate(data, "stratified", ALPHA)
    assert covered(r.low, r.high, pop.accuracy) >= floor(1 - ALPHA)
