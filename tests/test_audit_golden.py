"""Golden values: PPI++ against the authors' package, exact intervals against scipy/statsmodels.

``tests/golden/audit_ppi_reference.json`` holds fixed inputs and ``ppi_py``'s outputs on them
(written by ``tests/golden/make_audit_ppi.py``, ppi-python 0.2.3), so the comparison runs where
ppi-python is not installed; where it is, the same inputs also go through ``ppi_py`` directly.
"""

import json
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from fiftyone_nola.core.audit.estimators import AuditData, estimate
from fiftyone_nola.core.audit.exact import clopper_pearson, clopper_pearson_lower, hypergeom_pvalue
from fiftyone_nola.core.audit.ppi import ppi_mean_interval

GOLDEN = json.loads((Path(__file__).parent / "golden" / "audit_ppi_reference.json").read_text())
CASES = GOLDEN["cases"]


def _inputs(case):
    return (np.array(case["y"]), np.array(case["f_labelled"]), np.array(case["f_unlabelled"]))


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_ppi_matches_the_stored_ppi_py_values(case):
    est, low, high = ppi_mean_interval(*_inputs(case), alpha=case["alpha"])
    assert est == pytest.approx(case["estimate"], abs=1e-6)
    assert low == pytest.approx(case["low"], abs=1e-6)
    assert high == pytest.approx(case["high"], abs=1e-6)


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_ppi_matches_ppi_py_itself(case):
    ppi_py = pytest.importorskip("ppi_py")
    y, f, fu = _inputs(case)
    low, high = ppi_py.ppi_mean_ci(y, f, fu, alpha=case["alpha"])
    ref = float(np.ravel(ppi_py.ppi_mean_pointestimate(y, f, fu))[0])
    est, lo, hi = ppi_mean_interval(y, f, fu, alpha=case["alpha"])
    assert (est, lo, hi) == pytest.approx((ref, float(np.ravel(low)[0]), float(np.ravel(high)[0])), abs=1e-6)


def test_the_ppi_estimator_on_a_uniform_audit_is_ppi_py_s_estimate_over_the_pool():
    """The audit's PPI estimate is PPI++ with the whole pool as the unlabelled set (the golden inputs)."""
    case = CASES[0]
    y, f, fu = _inputs(case)
    pool = np.r_[f, fu]  # the audited units are part of the pool
    data = AuditData(
        conf=pool,
        pi=np.full(len(pool), len(f) / len(pool)),
        stratum=np.zeros(len(pool), dtype=np.int64),
        unit=np.arange(len(f)),
        u=np.zeros(len(f)),
        correct=y.astype(bool),
        trial=np.zeros(len(f), dtype=np.int64),
    )
    est, _, _ = ppi_mean_interval(y, f, pool)
    assert estimate(data, "ppi").estimate[0] == pytest.approx(est, abs=1e-12)


@pytest.mark.parametrize("x,n", [(0, 10), (10, 10), (3, 7), (57, 60), (180, 200), (1, 1), (499, 1000)])
@pytest.mark.parametrize("alpha", [0.05, 0.1, 0.01])
def test_clopper_pearson_matches_scipy_binomtest(x, n, alpha):
    ref = stats.binomtest(x, n).proportion_ci(confidence_level=1 - alpha, method="exact")
    low, high = clopper_pearson(x, n, alpha)
    assert float(low) == pytest.approx(ref.low, abs=1e-9)
    assert float(high) == pytest.approx(ref.high, abs=1e-9)
    one_sided = stats.binomtest(x, n, alternative="greater").proportion_ci(confidence_level=1 - alpha).low
    assert float(clopper_pearson_lower(x, n, alpha)) == pytest.approx(one_sided, abs=1e-9)


def test_clopper_pearson_matches_statsmodels_beta_vectorised():
    smp = pytest.importorskip("statsmodels.stats.proportion")
    x = np.array([0, 1, 5, 49, 50, 97, 200])
    n = np.array([5, 20, 50, 50, 50, 100, 200])
    low, high = clopper_pearson(x, n, 0.05)
    ref_low, ref_high = smp.proportion_confint(x, n, alpha=0.05, method="beta")
    np.testing.assert_allclose(low, np.nan_to_num(ref_low), atol=1e-9)
    np.testing.assert_allclose(high, np.nan_to_num(ref_high, nan=1.0), atol=1e-9)


def test_hypergeometric_pvalue_is_scipy_s_tail_at_the_edge_of_the_null():
    # pool of 40, target 0.9: the null's most accurate pool has 35 right (35/40 < 0.9 <= 36/40)
    for x in range(0, 21):
        assert float(hypergeom_pvalue(x, 20, 40, 0.9)) == pytest.approx(stats.hypergeom.sf(x - 1, 40, 35, 20))


def _one_uniform_audit(seed=4, pool_size=3000, n=250):
    rng = np.random.default_rng(seed)
    conf = rng.beta(5.0, 0.8, pool_size)
    correct_pool = rng.random(pool_size) < conf**1.5  # over-confident: calibration has work to do
    unit = rng.choice(pool_size, n, replace=False)
    return conf, unit, rng.random(n), correct_pool[unit]


def test_calibrated_ppi_is_ppi_py_s_cross_ppi_on_the_fold_out_calibrations():
    """The cross-fitted calibrated PPI: ``ppi_py.crossppi_mean_ci`` on our fold-out predictions
    (labelled) and the K calibrations of the pool (unlabelled, N x K) gives our estimate and interval."""
    ppi_py = pytest.importorskip("ppi_py")
    from fiftyone_nola.core.audit import crossfit

    conf, unit, u, correct = _one_uniform_audit()
    trial = np.zeros(len(unit), dtype=np.int64)
    bins = crossfit.pool_bins(conf, len(unit))
    fit = crossfit.cross_fit(conf, bins, unit, trial, u, correct, 1)
    est, var, n = crossfit.crossppi_mean_and_variance(fit, trial, correct, 1, len(conf))
    y = correct.astype(float)
    pool_preds = fit.per_fold[0][:, bins].T  # N x K
    ref = float(np.ravel(ppi_py.crossppi_mean_pointestimate(y, fit.labelled, pool_preds))[0])
    low, high = ppi_py.crossppi_mean_ci(y, fit.labelled, pool_preds, alpha=0.05)
    half = stats.norm.ppf(0.975) * np.sqrt(var[0])
    assert est[0] == pytest.approx(ref, abs=1e-9)
    assert (est[0] - half, est[0] + half) == pytest.approx(
        (float(np.ravel(low)[0]), float(np.ravel(high)[0])), abs=1e-9
    )


def test_calibrated_ppi_never_predicts_a_unit_from_its_own_label():
    from fiftyone_nola.core.audit import crossfit

    conf, unit, u, correct = _one_uniform_audit()
    trial = np.zeros(len(unit), dtype=np.int64)
    bins = crossfit.pool_bins(conf, len(unit))
    before = crossfit.cross_fit(conf, bins, unit, trial, u, correct, 1).labelled
    flipped = correct.copy()
    flipped[7] = ~flipped[7]
    after = crossfit.cross_fit(conf, bins, unit, trial, u, flipped, 1).labelled
    assert after[7] == before[7]  # its own fold's calibration never saw it
    assert np.sum(after != before) > 0  # the other folds' did
