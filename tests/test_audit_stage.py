"""The audit on a FiftyOne dataset: draw, decide, report, simulate, flag (no images read)."""

import uuid

import numpy as np
import pytest

from fiftyone_nola.core.audit import simulate as sim
from fiftyone_nola.core.audit.config import AuditConfig
from fiftyone_nola.core.audit.report import REPORT_KEYS
from fiftyone_nola.core.errors import InvalidInputError
from fiftyone_nola.core.names import DECIDED_TAGS, EXPORTABLE_TAGS, REVIEW_TAG
from fiftyone_nola.stages import audit, runs
from fiftyone_nola.stages import audit_records as rec
from fiftyone_nola.stages import review as rw

CLASSES = [f"c{i}" for i in range(5)]


@pytest.fixture(scope="module")
def _template():
    """800 samples: ground truth, and predictions in 'nola' with known accuracy (~0.9); cloned per test."""
    import fiftyone as fo

    pop = sim.population(size=800, accuracy=0.9, calibration="calibrated", classes=5, seed=3)
    rng = np.random.default_rng(0)
    pred = [CLASSES[k] for k in pop.label]
    gt = [p if ok else CLASSES[(CLASSES.index(p) + 1 + rng.integers(4)) % 5] for p, ok in zip(pred, pop.correct)]
    ds = fo.Dataset(f"nola-audit-template-{uuid.uuid4().hex[:8]}")
    ds.add_samples(
        [
            fo.Sample(
                filepath=f"/nonexistent/img{i}.jpg",
                ground_truth=fo.Classification(label=g),
                nola=fo.Classification(label=p, confidence=float(c)),
            )
            for i, (g, p, c) in enumerate(zip(gt, pred, pop.conf))
        ],
        progress=False,
    )
    ds.default_classes = CLASSES
    ds.save()
    yield ds, float(np.mean([p == g for p, g in zip(pred, gt)]))
    ds.delete()


@pytest.fixture
def labelled(_template):
    template, accuracy = _template
    ds = template.clone(f"nola-audit-{uuid.uuid4().hex[:8]}")
    yield ds, accuracy
    ds.delete()


def _answer_truthfully(ds, ids):
    """Decide like an honest reviewer who knows the ground truth (one call per kind of answer)."""
    truth = dict(zip(*ds.values(["id", "ground_truth.label"])))
    preds = dict(zip(*ds.values(["id", "nola.label"])))
    right = [i for i in ids if truth[i] == preds[i]]
    if right:
        rw.decide(ds, right, "accept")
    for label in CLASSES:
        wrong = [i for i in ids if truth[i] != preds[i] and truth[i] == label]
        if wrong:
            rw.decide(ds, wrong, "correct", label=label)


def test_a_draw_records_the_design_the_pool_and_the_audit_samples(labelled):
    ds, _ = labelled
    rw.decide(ds, ds.take(20, seed=1).values("id"), "accept")  # decided before: never audited
    out = audit.draw_audit(ds, 120, seed=4)
    assert out["pool"] == 780 and abs(out["drawn"] - 120) < 45
    assert len(ds.match_tags(audit.AUDIT_TAG)) == out["drawn"]
    assert len(ds.exists(rec.PI_FIELD)) == 780 and len(ds.match_tags(list(DECIDED_TAGS)).exists(rec.PI_FIELD)) == 0
    run = runs.get_run(ds, audit.RUN_KEY)
    assert run["config"]["design"]["kind"] == "stratified" and run["config"]["design"]["seed"] == 4
    assert audit.audit_progress(ds) == {"drawn": out["drawn"], "audited": 0, "remaining": out["drawn"]}
    with pytest.raises(InvalidInputError, match="already has an audit"):
        audit.draw_audit(ds, 50)


def test_the_report_from_truthful_decisions_covers_the_true_accuracy(labelled):
    ds, truth = labelled
    audit.draw_audit(ds, 200, seed=1)
    queue = audit.audit_queue(ds)
    _answer_truthfully(ds, queue[:10])
    partial = audit.audit_report(ds)
    assert partial["progress"]["counted"] == 10 and partial["n"] == 10
    _answer_truthfully(ds, audit.audit_queue(ds))
    r = audit.audit_report(ds)
    assert r["progress"]["audited"] == r["progress"]["drawn"] == r["n"]
    assert r["accuracy_low"] <= truth <= r["accuracy_high"]
    assert r["certified"] + r["uncertified"] == 800
    assert {row["class"] for row in r["per_class"]} == set(CLASSES)
    assert r["export_accuracy"]["all_labels"]["exported"] == 800


def test_deciding_out_of_queue_order_is_counted_only_once_the_gap_is_filled(labelled):
    ds, _ = labelled
    audit.draw_audit(ds, 60, seed=2)
    queue = audit.audit_queue(ds)
    _answer_truthfully(ds, [queue[1]])
    r = audit.audit_report(ds)
    assert r["progress"]["audited"] == 1 and r["progress"]["counted"] == 0 and "in order" in r["note"]
    assert audit.audit_decide(ds, queue[0], "accept") == queue[2]
    assert audit.audit_report(ds)["progress"]["counted"] == 2


def test_a_rejected_or_corrected_audit_sample_counts_as_wrong(labelled):
    ds, _ = labelled
    audit.draw_audit(ds, 40, seed=3, config=AuditConfig(design="uniform"))
    rw.decide(ds, audit.audit_queue(ds), "reject")
    assert audit.audit_report(ds)["accuracy"] == 0.0
    got = rec.read_audit(ds, "nola")
    assert not got.data.correct.any()


def test_a_simulated_audit_writes_nothing_and_seeds_are_independent(labelled):
    ds, truth = labelled
    before = (sorted(ds.get_field_schema()), ds.count_sample_tags(), ds.list_runs())
    a = audit.simulate_audit(ds, "ground_truth", 200, seed=1)
    again = audit.simulate_audit(ds, "ground_truth", 200, seed=1)
    other = audit.simulate_audit(ds, "ground_truth", 200, seed=2)
    assert (sorted(ds.get_field_schema()), ds.count_sample_tags(), ds.list_runs()) == before
    assert a["accuracy"] == again["accuracy"] and a["accuracy"] != other["accuracy"]
    assert a["simulated"] and a["accuracy_low"] <= truth <= a["accuracy_high"]
    with pytest.raises(InvalidInputError, match="ground truth"):
        audit.simulate_audit(ds, "nola", 100)


def test_random_predictions_certify_nothing_and_say_so(labelled):
    import fiftyone as fo

    ds, _ = labelled
    rng = np.random.default_rng(1)
    ds.set_values(
        "nola", [fo.Classification(label=CLASSES[rng.integers(5)], confidence=float(rng.uniform(0.2, 0.4))) for _ in ds]
    )
    r = audit.simulate_audit(ds, "ground_truth", 200, seed=3)
    assert r["threshold"] is None and r["certified"] == 0 and r["uncertified"] == 800
    assert r["certificate"].startswith("Nothing can be certified")


def test_flag_uncertified_queues_exactly_what_the_certificate_leaves(labelled):
    ds, _ = labelled
    r = audit.simulate_audit(ds, "ground_truth", 300, seed=5, config=AuditConfig(design="uniform"))
    out = audit.flag_uncertified(ds, "nola", report=r, clusters=False)
    conf = np.array(ds.values("nola.confidence"))
    queued = np.array([REVIEW_TAG in t for t in ds.values("tags")])
    tau = r["threshold"]
    expected = conf < (tau if tau is not None else 2.0)
    np.testing.assert_array_equal(queued, expected)
    assert out["queue"] == expected.sum()


def test_a_new_audit_replaces_the_old_one_but_keeps_its_decisions(labelled):
    ds, _ = labelled
    audit.draw_audit(ds, 50, seed=1)
    first = audit.audit_queue(ds)[:5]
    _answer_truthfully(ds, first)
    out = audit.draw_audit(ds, 50, seed=2, replace_existing=True)
    assert out["pool"] == 795 and len(ds.match_tags(list(DECIDED_TAGS)).exists(rec.PI_FIELD)) == 0
    assert set(first) <= set(ds.match_tags(list(DECIDED_TAGS)).values("id"))


# ---------------------------------------------------------------- certificate on export, CLI

CERTIFICATE_KEYS = {
    "design",
    "n",
    "alpha",
    "delta",
    "target",
    "tau",
    "certified",
    "uncertified",
    "accuracy",
    "certified_region_accuracy",
    "export_accuracy",
    "method",
    "model",
    "run_keys",
    "statement",
    "assumptions",
}


def test_a_certified_export_holds_reviewed_and_certified_samples_and_its_certificate(labelled, tmp_path):
    import json

    from fiftyone_nola.stages.export import export_accepted

    ds, _ = labelled
    audit.draw_audit(ds, 300, seed=6, config=AuditConfig(design="uniform"))
    _answer_truthfully(ds, audit.audit_queue(ds))
    report = audit.audit_report(ds)
    out = export_accepted(ds, str(tmp_path / "exp"), "nola", format="csv", min_confidence="certified")
    cert = json.loads((tmp_path / "exp" / "certificate.json").read_text())
    assert CERTIFICATE_KEYS <= set(cert)
    assert cert["tau"] == report["threshold"] and cert["certified"] == report["certified"]
    decided = len(ds.match_tags(list(EXPORTABLE_TAGS)))
    from fiftyone import ViewField as F

    above = F("nola.confidence") >= (report["threshold"] or 2.0)
    certified_undecided = len(ds.match_tags(list(DECIDED_TAGS), bool=False).exists(rec.PI_FIELD).match(above))
    assert out["exported"] == decided + certified_undecided == cert["exported"]
    assert runs.get_run(ds, "nola_certificate")["results"]["tau"] == cert["tau"]
    assert cert["run_keys"]["audit"] == "nola_audit"


def test_a_certified_export_without_an_audit_says_so(labelled, tmp_path):
    from fiftyone_nola.stages.export import export_accepted

    ds, _ = labelled
    with pytest.raises(InvalidInputError, match="no audit"):
        export_accepted(ds, str(tmp_path / "e"), "nola", format="csv", min_confidence="certified")
    with pytest.raises(InvalidInputError, match="certified"):
        export_accepted(ds, str(tmp_path / "e"), "nola", format="csv", min_confidence="high")


def test_the_export_form_offers_a_certified_export(labelled, tmp_path):
    """The App's export form: 'what the audit certifies' is a choice; without an audit the form
    says so beside it; with one, the plan quotes the certificate and the run writes it."""
    import json

    import fiftyone.operators as foo
    import yaml
    from fiftyone.operators.executor import ExecutionContext
    from PIL import Image

    from conftest import REPO

    plugin = yaml.safe_load((REPO / "fiftyone.yml").read_text())["name"]
    op = foo.get_operator(f"{plugin}/export_accepted")
    ds, _ = labelled
    files = [str(tmp_path / "img" / f"{i}.png") for i in range(len(ds))]  # the form checks images are readable
    (tmp_path / "img").mkdir()
    for f in files:
        Image.new("RGB", (4, 4)).save(f)
    ds.set_values("filepath", files)

    def form(**params):
        params = {"label_field": "nola", "export_dir": str(tmp_path / "exp"), "format": "csv", **params}
        return op.resolve_input(ExecutionContext(request_params={"dataset_name": ds.name, "params": params}))

    props = form().type.properties
    assert set(props["include"].type.values) == {"reviewed", "confident", "certified"}
    assert props["include"].default == "reviewed" and "min_confidence" not in props
    assert "min_confidence" in form(include="confident").type.properties
    assert form(min_confidence=0.9).type.properties["include"].default == "confident"  # an older call
    no_audit = form(include="certified").type.properties["include"]
    assert no_audit.invalid and "no audit" in no_audit.error_message

    audit.draw_audit(ds, 300, seed=6, config=AuditConfig(design="uniform"))
    _answer_truthfully(ds, audit.audit_queue(ds))
    report = audit.audit_report(ds)
    props = form(include="certified").type.properties
    assert not props["include"].invalid
    assert report["certificate"] in props["plan"].view.label
    params = {"label_field": "nola", "export_dir": str(tmp_path / "exp"), "format": "csv", "include": "certified"}
    res = foo.execute_operator(f"{plugin}/export_accepted", ctx={"dataset": ds, "params": params})
    assert res.error is None, res.error
    cert = json.loads((tmp_path / "exp" / "certificate.json").read_text())
    assert res.result["result"]["exported"] == cert["exported"] and cert["tau"] == report["threshold"]


def test_the_audit_command_draws_reports_and_simulates(labelled, tmp_path, capsys):
    import json

    from fiftyone_nola.cli import main

    ds, _ = labelled
    sim_json = tmp_path / "sim.json"
    args = ["audit", "--dataset", ds.name, "--field", "nola", "--simulate-from", "ground_truth"]
    assert (
        main([*args, "--draw", "150", "--seed", "3", "--target", "0.9", "--delta", "0.1", "--json", str(sim_json)]) == 0
    )
    r = json.loads(sim_json.read_text())
    assert set(REPORT_KEYS) <= set(r)
    assert r["target"] == 0.9 and r["delta"] == 0.1 and r["simulated"]
    cal_json = tmp_path / "cal.json"
    assert (
        main([*args, "--draw", "150", "--design", "uniform", "--method", "ppi_calibrated", "--json", str(cal_json)])
        == 0
    )
    assert json.loads(cal_json.read_text())["method"] == "ppi_calibrated"
    assert main(["audit", "--dataset", ds.name, "--draw", "80"]) == 0
    assert "drew" in capsys.readouterr().out
    _answer_truthfully(ds, audit.audit_queue(ds))
    assert main(["audit", "--dataset", ds.name, "--report", "--json", str(tmp_path / "r.json")]) == 0
    text = capsys.readouterr().out
    assert "accuracy" in text and "certificate:" in text
    assert json.loads((tmp_path / "r.json").read_text())["progress"]["counted"] > 0


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--report"], "no audit yet"),
        (["--simulate-from", "ground_truth"], "needs --draw"),
        ([], "Give --draw"),
        (["--draw", "50", "--alpha", "2"], "alpha must be"),
        (["--simulate-from", "nope", "--draw", "50"], "does not exist"),
        (["--simulate-from", "ground_truth", "--draw", "50", "--method", "ppi_calibrated"], "needs a uniform audit"),
    ],
)
def test_the_audit_command_s_mistakes_are_one_clear_message(labelled, capsys, argv, message):
    from fiftyone_nola.cli import main

    ds, _ = labelled
    assert main(["audit", "--dataset", ds.name, *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
