"""End to end on real images: a simulated audit against the measured accuracy, no certificate for
random weights, and a certified export's certificate.json (tiny random CLIP: labels are noise)."""

import json

import pytest

from conftest import DATA_CLASSES, cifar_files
from fiftyone_nola.cli import main
from fiftyone_nola.core.audit.report import REPORT_KEYS
from fiftyone_nola.core.embed import EmbedConfig
from fiftyone_nola.core.models import tiny_clip_spec
from fiftyone_nola.stages import audit, review
from fiftyone_nola.stages.embeddings import compute_embeddings
from fiftyone_nola.stages.evaluation import evaluate_single_label
from fiftyone_nola.stages.export import export_accepted
from fiftyone_nola.stages.nola import ZeroShotConfig, zero_shot

FIELD = "nola_zeroshot"
CERTIFICATE_KEYS = ("design", "n", "alpha", "delta", "target", "tau", "certified", "accuracy", "method", "model")


@pytest.fixture
def labelled_cifar(make_dataset):
    """400 CIFAR-10 images with ground truth, zero-shot labeled by a tiny random CLIP."""
    pairs = cifar_files(per_class=40)
    ds = make_dataset([p for p, _ in pairs], [c for _, c in pairs])
    compute_embeddings(ds, "clip", clip=tiny_clip_spec(), config=EmbedConfig(batch_size=64, num_workers=0))
    zero_shot(ds, DATA_CLASSES, ZeroShotConfig(clip=tiny_clip_spec(), templates="simple", device="cpu"), FIELD)
    review.store_class_list(ds, DATA_CLASSES)  # as the pipeline does: the reviewer's choices
    return ds


@pytest.mark.integration
def test_audit_of_real_labels_end_to_end(labelled_cifar, tmp_path):
    ds = labelled_cifar
    measured = evaluate_single_label(ds, FIELD, "ground_truth")["accuracy"]

    # a simulated audit of 200 from the shell: its interval holds the accuracy measured on all samples
    out = tmp_path / "audit.json"
    argv = ["audit", "--dataset", ds.name, "--field", FIELD, "--simulate-from", "ground_truth", "--draw", "200"]
    assert main([*argv, "--seed", "0", "--target", "0.95", "--delta", "0.05", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert all(k in r for k in REPORT_KEYS)
    assert r["accuracy_low"] <= measured <= r["accuracy_high"], (r["accuracy_low"], measured, r["accuracy_high"])
    # random weights: nothing reaches 95 %, and the report says so
    assert r["threshold"] is None and r["certified"] == 0 and r["uncertified"] == len(ds)
    assert ds.match_tags(audit.AUDIT_TAG).count() == 0  # a simulation writes nothing

    # a real audit, decided by an honest reviewer, then a certified export
    audit.draw_audit(ds, 60, field=FIELD, seed=1)
    drawn = set(ds.match_tags(audit.AUDIT_TAG).values("id"))
    zero_shot(ds, DATA_CLASSES, ZeroShotConfig(clip=tiny_clip_spec(), templates="simple", device="cpu"), FIELD)
    assert set(ds.match_tags(audit.AUDIT_TAG).values("id")) == drawn  # a pipeline re-run keeps the audit
    truth = dict(zip(*ds.values(["id", "ground_truth.label"])))
    queue = audit.audit_queue(ds)
    for label in DATA_CLASSES:  # the reviewer picks the true class: an accept when the model had it
        mine = [i for i in queue if truth[i] == label]
        if mine:
            review.decide(ds, mine, "correct", label=label, field=FIELD)
    assert audit.audit_progress(ds)["remaining"] == 0
    export = export_accepted(ds, str(tmp_path / "export"), FIELD, min_confidence="certified")
    cert = json.loads((tmp_path / "export" / "certificate.json").read_text())
    assert all(k in cert for k in CERTIFICATE_KEYS) and cert["run_keys"]["audit"] == audit.RUN_KEY
    assert cert["tau"] is None and cert["certified"] == 0  # only the reviewed samples go out
    assert export["exported"] == len(queue) == cert["exported"]
    assert cert["model"]["key"] == FIELD and "Nothing can be certified" in cert["statement"]
