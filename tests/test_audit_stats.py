"""The audit's statistics piece by piece: designs, exact tests, estimators, certificate, export."""

import numpy as np
import pytest
from scipy import stats

from fiftyone_nola.core.audit import certify as cert_mod
from fiftyone_nola.core.audit import simulate as sim
from fiftyone_nola.core.audit.config import AuditConfig
from fiftyone_nola.core.audit.designs import Design, draw, keys, plan_design, queue_order
from fiftyone_nola.core.audit.estimators import estimate, strata_table
from fiftyone_nola.core.audit.exact import hypergeom_critical, hypergeom_lower, hypergeom_pvalue
from fiftyone_nola.core.audit.final import ExportCounts, export_accuracy
from fiftyone_nola.core.audit.report import REPORT_KEYS, summarize
from fiftyone_nola.core.audit.score import score_interval
from fiftyone_nola.core.errors import InvalidInputError

POP = sim.population(size=4000, accuracy=0.9, calibration="calibrated", classes=5, seed=7)


# ---------------------------------------------------------------- designs


@pytest.mark.parametrize("kind", ["uniform", "stratified", "active"])
def test_inclusion_probabilities_sum_to_the_audit_size_with_the_floor_kept(kind):
    d = plan_design(POP.conf, 200, kind, seed=3, floor_share=0.8)
    pi = d.inclusion(POP.conf)
    assert pi.sum() == pytest.approx(200, rel=1e-6)
    assert pi.min() >= 0.8 * 200 / len(POP.conf) - 1e-12 and pi.max() <= 1.0


def test_stratified_probabilities_are_constant_within_strata_and_larger_where_confidence_is_low():
    d = plan_design(POP.conf, 200, "stratified")
    pi, st = d.inclusion(POP.conf), d.strata(POP.conf)
    for h in np.unique(st):
        assert np.ptp(pi[st == h]) == 0
    assert pi[st == 0][0] > pi[st == st.max()][0]  # Neyman: the least confident stratum is audited most


def test_a_design_round_trips_through_its_record_and_draws_the_same_audit():
    d = plan_design(POP.conf, 150, "stratified", seed=11)
    again = Design.from_dict(d.to_dict())
    assert again == d
    a, b = draw(d, d.inclusion(POP.conf)), draw(again, again.inclusion(POP.conf))
    np.testing.assert_array_equal(a.unit, b.unit)
    np.testing.assert_array_equal(a.u, keys(11, len(POP.conf))[a.unit])
    assert abs(len(a.unit) - 150) < 4 * np.sqrt(150)  # Poisson sampling: the size varies around n


def test_a_census_when_the_audit_is_as_large_as_the_pool():
    d = plan_design(POP.conf[:50], 80, "stratified")
    assert np.all(d.inclusion(POP.conf[:50]) == 1.0)


def test_queue_order_is_by_key_over_probability():
    assert list(queue_order(np.array([0.02, 0.01, 0.03]), np.array([0.1, 0.01, 0.6]))) == [2, 0, 1]


@pytest.mark.parametrize(
    "kwargs", [dict(design="census"), dict(alpha=1.0), dict(target=0), dict(floor_share=0), dict(method="bayes")]
)
def test_bad_settings_are_refused_with_a_plain_message(kwargs):
    with pytest.raises(InvalidInputError):
        AuditConfig(**kwargs)


def test_plan_refuses_an_empty_pool_or_a_missing_confidence():
    with pytest.raises(InvalidInputError):
        plan_design(np.array([]), 10)
    with pytest.raises(InvalidInputError):
        plan_design(np.array([0.5, np.nan]), 1)


# ---------------------------------------------------------------- exact tests


def test_hypergeometric_critical_counts_are_the_smallest_rejecting_ones():
    rng = np.random.default_rng(0)
    for _ in range(300):
        pool = int(rng.integers(1, 500))
        m = int(rng.integers(0, pool + 1))
        target, delta = float(rng.choice([0.8, 0.95, 0.99])), float(rng.choice([0.01, 0.05]))
        p = hypergeom_pvalue(np.arange(m + 1), m, pool, target)
        expected = int(np.argmax(p <= delta)) if m and np.any(p <= delta) else m + 1
        assert int(hypergeom_critical(m, pool, target, delta)) == (1 if m == 0 else expected)


def test_the_exact_lower_bound_certifies_exactly_when_the_test_rejects():
    for x, m, pool in [(60, 60, 1000), (58, 60, 1000), (100, 110, 400), (30, 30, 30), (0, 5, 50)]:
        lb = float(hypergeom_lower(x, m, pool, 0.05))
        for target in np.linspace(0.5, 0.999, 60):
            assert (lb >= target) == (float(hypergeom_pvalue(x, m, pool, target)) <= 0.05)


def test_the_hypergeometric_test_is_never_weaker_than_the_binomial_on_a_small_pool():
    # 40 of 40 audited: the whole pool is known to be right; a binomial test could not say so
    assert float(hypergeom_pvalue(40, 40, 40, 0.95)) == 0.0
    assert stats.binom.sf(39, 40, 0.95) > 0.05


# ---------------------------------------------------------------- estimators


def _one_audit(kind, n=300, seed=1):
    data, design = sim.audits(POP, n, kind, trials=1, seed=seed)
    return data, design


def test_strata_counts_are_plain_counts_when_probabilities_are_constant_in_strata():
    data, _ = _one_audit("stratified")
    t = strata_table(data)
    st = data.stratum[data.unit]
    for h in range(t.n.shape[1]):
        assert t.n[0, h] == pytest.approx((st == h).sum())
        assert t.x[0, h] == pytest.approx(data.correct[st == h].sum())


def test_the_score_interval_of_one_large_stratum_is_wilson_s():
    smp = pytest.importorskip("statsmodels.stats.proportion")
    for x, n in [(45, 50), (50, 50), (12, 40)]:
        est, low, high = score_interval(np.array([1.0]), np.array([[n]]), np.array([[x]]), np.array([1e12]))
        ref = smp.proportion_confint(x, n, alpha=0.05, method="wilson")
        assert (low[0], high[0]) == pytest.approx(ref, abs=1e-6)


@pytest.mark.parametrize(
    "kind,method",
    [
        ("uniform", "exact"),
        ("uniform", "ppi"),
        ("stratified", "stratified"),
        ("active", "active"),
        ("stratified", "exact"),
    ],
)
def test_every_estimator_gives_an_ordered_interval_near_the_truth(kind, method):
    data, _ = _one_audit(kind)
    r = estimate(data, method).row()
    assert 0 <= r["low"] <= r["estimate"] <= r["high"] <= 1
    assert abs(r["estimate"] - POP.accuracy) < 0.08


def test_ppi_refuses_a_weighted_audit():
    data, _ = _one_audit("stratified")
    with pytest.raises(InvalidInputError, match="uniform"):
        estimate(data, "ppi")


def test_a_sub_population_without_audited_units_is_unknown_not_guessed():
    data, _ = _one_audit("stratified", n=40)
    nobody = np.zeros(data.pool_size, dtype=bool)
    nobody[np.setdiff1d(np.arange(data.pool_size), data.unit)[:5]] = True
    r = estimate(data.domain(nobody), "stratified").row()
    assert (r["low"], r["high"]) == (0.0, 1.0)


def test_an_all_correct_audit_is_not_certain():
    data, _ = _one_audit("stratified")
    data.correct[:] = True
    r = estimate(data, "stratified").row()
    assert r["estimate"] == 1.0 and r["low"] < 0.99


# ---------------------------------------------------------------- certificate


def test_thinned_counts_match_a_direct_count():
    data, _ = sim.audits(POP, 300, "stratified", trials=3, seed=5)
    cand = cert_mod.candidates(data.conf, data.pi, 0.95, 0.05)
    m, x = cert_mod.thinned_counts(data, cand)
    for t in range(3):
        for k in range(0, len(cand.size), 7):
            region = np.zeros(data.pool_size, bool)
            region[cand.order[: cand.size[k]]] = True
            sel = (data.trial == t) & region[data.unit] & (data.u < cand.rate[k])
            assert m[t, k] == sel.sum() and x[t, k] == data.correct[sel].sum()


def test_candidates_are_nested_regions_closed_under_ties():
    conf = np.r_[np.full(500, 0.99), np.linspace(0.3, 0.98, 1500)]
    cand = cert_mod.candidates(conf, np.full(len(conf), 0.05), 0.95, 0.05)
    assert np.all(np.diff(cand.size) > 0) and np.all(np.diff(cand.threshold) < 0)
    for t, s in zip(cand.threshold, cand.size):
        assert (conf >= t).sum() == s


def test_nothing_is_certified_from_an_audit_of_random_labels():
    pop = sim.population(size=3000, accuracy=0.12, calibration="calibrated", classes=10, spread=0.3, seed=2)
    data, _ = sim.audits(pop, 200, "stratified", trials=50, seed=1)
    c = cert_mod.certify(data, 0.95, 0.05)
    assert np.all(c.index < 0) and np.all(np.isnan(c.threshold))


def test_a_good_model_gets_a_certificate_and_a_plain_sentence():
    pop = sim.population(size=5000, accuracy=0.97, calibration="calibrated", seed=4)
    data, design = sim.audits(pop, 400, "uniform", trials=1, seed=2)
    s = summarize(data, design, pop.label, 0.95, 0.05)
    assert s["threshold"] is not None and s["certified"] + s["uncertified"] == s["pool"]
    assert str(s["certified"]) in s["certificate"] and "95%" in s["certificate"]
    assert [p["certified"] for p in s["curve"]][0]  # the first tested region is the certified one's subset


def test_the_report_has_every_field_and_per_class_rows():
    data, design = _one_audit("stratified")
    s = summarize(data, design, POP.label.astype(str))
    assert set(REPORT_KEYS) <= set(s)
    assert {r["class"] for r in s["per_class"]} == {str(c) for c in np.unique(POP.label)}
    assert sum(r["audited"] for r in s["per_class"]) == s["n"]
    above = [p["above"] for p in s["curve"]]
    assert above == sorted(above)


# ---------------------------------------------------------------- final export


def test_export_accuracy_combines_known_decisions_with_the_audit_interval():
    counts = ExportCounts(human=100, region=900, region_reviewed=50, region_reviewed_right=45)
    r = export_accuracy(counts, 0.96, 0.94, 0.98)
    assert r["exported"] == 100 + 850
    # right unreviewed = 0.96 * 900 - 45
    assert r["estimate"] == pytest.approx((100 + 0.96 * 900 - 45) / 950)
    assert r["low"] == pytest.approx((100 + 0.94 * 900 - 45) / 950)
    assert r["low"] <= r["estimate"] <= r["high"] <= 1


def test_export_accuracy_allows_anything_for_labels_outside_the_audited_pool():
    r = export_accuracy(
        ExportCounts(human=10, region=0, region_reviewed=0, region_reviewed_right=0, unknown=10), 0.9, 0.8, 1.0
    )
    assert (r["low"], r["high"]) == (0.5, 1.0)
    assert export_accuracy(ExportCounts(0, 0, 0, 0), 0.9, 0.8, 1.0)["estimate"] is None


def test_many_simulated_draws_are_poisson_samples_of_the_design():
    d = plan_design(POP.conf, 300, "stratified")
    pi = d.inclusion(POP.conf)
    many = draw(d, pi, trials=4000, rng=np.random.default_rng(0))
    rate = np.bincount(many.unit, minlength=len(pi)) / 4000
    st = d.strata(POP.conf)
    for h in np.unique(st):  # inclusion frequency per stratum = its probability
        assert rate[st == h].mean() == pytest.approx(pi[st == h][0], rel=0.02)
    sizes = np.bincount(many.trial, minlength=4000)
    assert sizes.mean() == pytest.approx(300, rel=0.01)
    assert sizes.var() == pytest.approx((pi * (1 - pi)).sum(), rel=0.1)
    assert np.all(many.u < pi[many.unit]) and many.u.mean() / pi[many.unit].mean() == pytest.approx(0.5, abs=0.01)
    assert not np.any(np.bincount(many.trial * len(pi) + many.unit) > 1)  # a unit once per audit at most
