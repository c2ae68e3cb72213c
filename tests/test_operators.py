"""Every operator run through FiftyOne's own execution API: from Python, from the App form's
defaults, and delegated (queued, then run by the delegated-operation service)."""

import functools
import json

import pytest
import yaml

from conftest import CIFAR10_CLASSES, CIFAR_DIR, COCO_DIR, ON_SHARED, REPO, cifar_files

PLUGIN = yaml.safe_load((REPO / "fiftyone.yml").read_text())["name"]
TINY = {
    "clip_arch": "nola-tiny-clip",
    "clip_pretrained": "",
    "random_init": True,
    "dino_model": "nola_tiny_vit",
    "device": "cpu",
}


def run(name, dataset, view=None, selected=None, delegate=False, **params):
    import fiftyone.operators as foo

    ctx = {"dataset": dataset, "params": params, "request_delegation": delegate}
    if view is not None:
        ctx["view"] = view
    if selected is not None:
        ctx["selected"] = selected
    res = foo.execute_operator(f"{PLUGIN}/{name}", ctx=ctx)
    if not delegate:
        assert res.error is None, res.error
    return res


@pytest.fixture
def small(make_dataset):
    pairs = cifar_files(per_class=2)
    ds = make_dataset([p for p, _ in pairs], [c for _, c in pairs])
    ds.default_classes = sorted({c for _, c in pairs})
    ds.save()
    return ds


@pytest.mark.integration
def test_single_label_operators_end_to_end(small, tmp_path):
    n = len(small)
    r = run("compute_embeddings", small, family="both", batch_size=8, num_workers=0, **TINY)
    assert r.result["result"]["clip"]["embedded"] == n

    desc = tmp_path / "desc.json"
    r = run(
        "generate_descriptions",
        small,
        source="file",
        import_file=str(CIFAR_DIR / "descriptions.json"),
        output_file=str(desc),
    )
    assert json.loads(desc.read_text()).keys() == set(small.default_classes)

    run("zero_shot", small, descriptions_file=str(desc), **TINY)  # classes from default_classes
    assert small.count("nola_zeroshot.label") == n
    run("dino_labels", small, epochs=5, **TINY)
    assert small.count("nola_dino.label") == n
    r = run("tune_prompts", small, epochs=1, batch_size=8, max_samples=12, **TINY)
    assert small.count("nola.label") == n
    model_dir = r.result["result"]["model_dir"]

    # apply the saved model to a view only: the others keep their old label
    view = small.limit(5)
    run("apply_tuned_model", small, view=view, model_dir=model_dir, label_field="nola_applied", **TINY)
    assert small.count("nola_applied.label") == 5

    r = run("evaluate_labels", small, pred_field="nola", gt_field="ground_truth")
    assert 0 <= r.result["result"]["accuracy"] <= 1

    r = run("review_low_confidence", small, field="nola", threshold=1.01, bottom_k=0, gt_field="ground_truth")
    assert small.count_sample_tags().get("nola:review") == n  # everything is below 1.01
    assert {"nola-flagged", "nola-review-queue", "nola-flagged-per-class", "nola-stages-disagree"} <= set(
        small.list_saved_views()
    )
    assert r.result["confidence_plot"] and r.result["calibration_plot"]

    ids = small.values("id")
    run("mark_reviewed", small, selected=ids[:2], action="reject")
    run("mark_reviewed", small, selected=ids[2:4], action="correct", label="cat")
    run("mark_reviewed", small, action="accept_above", field="nola", threshold=0.0)
    tags = small.count_sample_tags()
    assert tags["nola:rejected"] == 2 and tags.get("nola:accepted", 0) + tags.get("nola:corrected", 0) == n - 2
    assert small.count("nola_reviewed.label") == 2 and small.count("nola.label") == n  # model field untouched

    out = tmp_path / "export"
    r = run("export_accepted", small, label_field="nola", export_dir=str(out), format="classification-tree")
    rep = r.result["result"]
    assert rep["exported"] == n - 2 and rep["left_out"]["rejected"] == 2
    exported = list(out.rglob("*.jpg"))
    assert len(exported) == n - 2
    assert len(list((out / "cat").glob("*.jpg"))) >= 2  # corrections win over predictions
    assert json.loads((out / "export_report.json").read_text())["exported"] == n - 2

    r = run("retrain_with_corrections", small, tune=False, **TINY)
    assert r.result["result"]["corrections"] == 2


@pytest.mark.integration
def test_auto_label_operator_and_multilabel_operators(make_dataset, tmp_path):
    if not COCO_DIR.is_dir():
        pytest.skip("no COCO images")
    labels = json.loads((COCO_DIR / "labels.json").read_text())
    names = sorted(labels)[:6]
    ds = make_dataset([str(COCO_DIR / "images" / f) for f in names], [labels[f] or None for f in names])
    # COCO's on ../shared; on the committed photos their own (with COCO's, the tiny CDUL gives these
    # six photos no label above the threshold and there is nothing to export)
    own = sorted((COCO_DIR / "classes.txt").read_text().split())[:6]
    classes = ", ".join(["person", "car", "dog", "bowl", "broccoli", "pizza"] if ON_SHARED else own)
    run("compute_embeddings", ds, family="clip", batch_size=4, num_workers=0, **TINY)
    run("multilabel_pseudo_labels", ds, classes=classes, grid=2, **TINY)
    assert ds.count("cdul_pseudo") == 6
    run("train_multilabel", ds, epochs=2, **TINY)
    assert ds.count("cdul") == 6
    r = run("evaluate_multilabel", ds, gt_field="ground_truth", **TINY)
    assert set(r.result["result"]) >= {"global", "initial", "trained"}
    out = tmp_path / "csv"
    run("mark_reviewed", ds, action="accept")
    r = run("export_accepted", ds, label_field="cdul", export_dir=str(out), format="csv")
    assert (out / "labels.csv").read_text().count("\n") == 7

    ds2 = make_dataset([p for p, _ in cifar_files(per_class=1)])
    run("auto_label", ds2, classes="cat, dog, ship", tune=False, **TINY)
    assert ds2.count("nola_dino.label") == len(ds2)


@pytest.mark.integration
def test_form_defaults_behave_like_python_params(small):
    """The App form's defaults, sent back as params, are valid and mean the same as omitting them."""
    import fiftyone.operators as foo
    from fiftyone.operators.executor import ExecutionContext

    op = foo.get_operator(f"{PLUGIN}/compute_embeddings")
    ctx = ExecutionContext(request_params={"dataset_name": small.name, "params": {}})
    form = op.resolve_input(ctx)
    defaults = {
        name: prop.default for name, prop in form.type.properties.items() if getattr(prop, "default", None) is not None
    }
    assert defaults["family"] == "both" and defaults["draft_decode"] is True
    assert defaults["index_type"] == "flat"
    params = {**defaults, **TINY, "family": "clip", "num_workers": 0}
    r = run("compute_embeddings", small, **params)
    assert r.result["result"]["clip"]["embedded"] == len(small)
    # the same call without the form's defaults reuses the index: parameters meant the same thing
    r2 = run("compute_embeddings", small, family="clip", num_workers=0, **TINY)
    assert r2.result["result"]["clip"]["reused"] == len(small)


@pytest.mark.integration
def test_delegated_execution(small):
    from fiftyone.factory.repo_factory import RepositoryFactory  # noqa: F401  (service needs its repo)
    from fiftyone.operators.delegated import DelegatedOperationService

    from fiftyone_nola.core.models import tiny_clip_spec
    from fiftyone_nola.stages.embeddings import open_index

    run("compute_embeddings", small, delegate=True, family="clip", num_workers=0, index_type="ivfpq", **TINY)
    svc = DelegatedOperationService()
    queued = svc.list_operations(dataset_name=small.name)
    assert len(queued) >= 1 and queued[-1].operator.endswith("compute_embeddings")
    svc.execute_queued_operations(dataset_name=small.name)
    done = svc.get(queued[-1].id)
    assert str(done.run_state).lower().endswith("completed"), done.result
    assert "nola_embeddings_clip" in small.list_runs()
    # the delegated run received the same parameter the form or Python would have sent
    assert open_index(small, tiny_clip_spec()).meta["index_type"] == "ivfpq"


@pytest.mark.integration
def test_zero_shot_templates_from_the_form_python_and_delegated(small, tmp_path):
    """The template choice means the same from Python, the form and a delegated run."""

    run("compute_embeddings", small, family="clip", batch_size=8, num_workers=0, **TINY)
    r = run("zero_shot", small, templates="simple", label_field="zs_simple", **TINY)
    assert r.result["result"]["templates"] == "simple"
    f = tmp_path / "mine.txt"
    f.write_text("a drawing of a {}.\n")
    r = run("zero_shot", small, templates="simple", templates_file=str(f), label_field="zs_file", **TINY)
    assert r.result["result"]["templates"] == f"file:{f}"
    r = run("zero_shot", small, label_field="zs_default", **TINY)  # the form's default
    # auto: the official CIFAR-10 set for CIFAR-10's classes (../shared), ImageNet's for others
    cifar10 = set(small.default_classes) == set(CIFAR10_CLASSES)
    assert r.result["result"]["templates"] == ("cifar10" if cifar10 else "imagenet")
    run("zero_shot", small, delegate=True, templates="simple", label_field="zs_delegated", **TINY)
    from fiftyone.operators.delegated import DelegatedOperationService

    DelegatedOperationService().execute_queued_operations(dataset_name=small.name)
    assert small.values("zs_delegated.label") == small.values("zs_simple.label")


def test_blank_epochs_mean_fit_the_hardware_in_every_path():
    """An empty epochs field leaves the schedule to the hardware (100 epochs on a GPU), instead
    of a number the form made up."""
    from types import SimpleNamespace

    from operators.multilabel import _config

    assert _config(SimpleNamespace(params={})).train.epochs is None
    assert _config(SimpleNamespace(params={"epochs": 7})).train.epochs == 7


@pytest.mark.integration
def test_form_python_and_delegated_runs_record_the_same_config(small):
    """The same inputs (a 0 among them) give the same stage config from the App form (its defaults
    sent back with the user's values), from Python and in a delegated run."""
    import fiftyone.operators as foo
    from fiftyone.operators.delegated import DelegatedOperationService
    from fiftyone.operators.executor import ExecutionContext

    from fiftyone_nola.stages import runs

    run("compute_embeddings", small, family="clip", batch_size=8, num_workers=0, **TINY)
    params = dict(threshold_t=0.0, grid=1, aggregation="global", **TINY)
    op = foo.get_operator(f"{PLUGIN}/multilabel_pseudo_labels")
    form = op.resolve_input(ExecutionContext(request_params={"dataset_name": small.name, "params": {}}))
    defaults = {k: p.default for k, p in form.type.properties.items() if getattr(p, "default", None) is not None}
    run("multilabel_pseudo_labels", small, **{**defaults, **params, "pseudo_field": "p_form"})
    run("multilabel_pseudo_labels", small, pseudo_field="p_python", **params)
    run("multilabel_pseudo_labels", small, delegate=True, pseudo_field="p_delegated", **params)
    DelegatedOperationService().execute_queued_operations(dataset_name=small.name)

    def recorded(field):
        cfg = dict(runs.get_run(small, runs.run_key_for(field))["config"])
        cfg.pop("pseudo_field")
        return cfg

    assert recorded("p_form") == recorded("p_python") == recorded("p_delegated")
    assert recorded("p_python")["threshold_t"] == 0.0 and recorded("p_python")["grid"] == 1


@pytest.mark.integration
def test_engine_fields_are_on_every_form_that_predicts_and_reach_the_prediction(small, monkeypatch, tmp_path):
    """compute_embeddings, tune_prompts (which predicts after tuning) and apply_tuned_model offer
    the engine and precision, defaulting to the configs', and what the user picks is used."""
    import fiftyone.operators as foo
    from fiftyone.operators.executor import ExecutionContext

    from fiftyone_nola.core.embed import EmbedConfig
    from fiftyone_nola.stages import nola
    from fiftyone_nola.stages.artifacts import stage_dir

    for name, config in (
        ("compute_embeddings", EmbedConfig),
        ("tune_prompts", nola.PredictConfig),
        ("apply_tuned_model", nola.PredictConfig),
    ):
        op = foo.get_operator(f"{PLUGIN}/{name}")
        props = op.resolve_input(
            ExecutionContext(request_params={"dataset_name": small.name, "params": {}})
        ).type.properties
        assert (props["engine"].default, props["precision"].default) == (config.engine, config.precision), name

    seen = []

    @functools.wraps(nola.tune_prompts)  # the forms read their defaults from the signature
    def tune(*a, **k):
        return {"stage": "tune", "model_dir": "m", "samples": 0}

    @functools.wraps(nola.predict)
    def predict(*a, config=None, **k):
        seen.append(config)
        return {"labelled": 0}

    monkeypatch.setattr(nola, "tune_prompts", tune)
    monkeypatch.setattr(nola, "predict", predict)
    for f in ("nola_zeroshot", "nola_dino"):  # the stages tuning reads, as the forms check them
        (stage_dir(small, f) / "meta.json").parent.mkdir(parents=True, exist_ok=True)
        (stage_dir(small, f) / "meta.json").write_text("{}")
    (tmp_path / "meta.json").write_text("{}")
    run("tune_prompts", small, engine="torch", precision="fp32", **TINY)
    run("apply_tuned_model", small, model_dir=str(tmp_path), engine="openvino", precision="int8", **TINY)
    run("apply_tuned_model", small, model_dir=str(tmp_path), **TINY)
    assert seen == [
        nola.PredictConfig(engine="torch", precision="fp32"),
        nola.PredictConfig(engine="openvino", precision="int8"),
        nola.PredictConfig(),
    ]
