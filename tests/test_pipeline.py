"""Integration: real CIFAR images through the whole single-label pipeline with tiny models."""

import json
import logging

import numpy as np
import pytest

from conftest import CIFAR10_CLASSES as CLASSES
from conftest import tiny_pipeline_config
from fiftyone_nola.core.embed import EmbedConfig
from fiftyone_nola.core.models import tiny_clip_spec, tiny_dino_spec
from fiftyone_nola.pipeline import auto_label
from fiftyone_nola.stages import review as rv
from fiftyone_nola.stages import runs
from fiftyone_nola.stages.brain_runs import similarity_key
from fiftyone_nola.stages.nola import dino_labels, zero_shot
from fiftyone_nola.stages.review_stages import stage_status


@pytest.mark.integration
def test_auto_label_end_to_end_then_resume(cifar_dataset, caplog):
    caplog.set_level(logging.INFO, logger="fiftyone_nola")
    s = auto_label(cifar_dataset, CLASSES, tiny_pipeline_config(gt_field="ground_truth"))
    n = len(cifar_dataset)
    for f in ("nola_zeroshot", "nola_dino", "nola"):
        assert cifar_dataset.count(f"{f}.label") == n, f
        conf = np.array(cifar_dataset.values(f"{f}.confidence"))
        assert np.all((conf > 0) & (conf <= 1)), f
        assert set(cifar_dataset.distinct(f"{f}.label")) <= set(CLASSES)
    steps = {"embeddings:clip", "embeddings:dino", "zeroshot", "dino_labeler", "prompt_tuning", "predict"}
    assert set(s["seconds_per_stage"]) >= steps | {"checks", "plan", "review", "app:clip", "evaluate"}
    assert 0.0 <= s["evaluation"]["nola"]["accuracy"] <= 1.0
    for key in ("nola_zeroshot", "nola_dino", "nola_model", "nola"):
        assert runs.get_run(cifar_dataset, key) is not None, key
    json.dumps(s, default=str)  # the summary is serialisable (CLI --json, operators)
    # what the App shows next: the panel's stage table, and text queries on the similarity run
    rows = {r["stage"]: r for r in stage_status(cifar_dataset)}
    assert all(r["state"] == "fresh" for r in rows.values()), rows
    assert rows["Prompt tuning"]["model"] == tiny_pipeline_config().clip.arch
    assert cifar_dataset.get_brain_info(similarity_key("clip")).config.supports_prompts

    caplog.clear()
    auto_label(cifar_dataset, CLASSES, tiny_pipeline_config(skip_tuning=True))
    text = "\n".join(caplog.messages)
    assert "[zeroshot] up to date: reused" in text and "[dino_labeler] up to date: reused" in text
    assert "[embeddings:clip] up to date: reused" in text


@pytest.mark.integration
def test_ground_truth_never_reaches_training(make_dataset):
    """Removing the GT field changes no prediction of any stage."""
    from conftest import cifar_files

    pairs = cifar_files(per_class=3)
    paths, labels = [p for p, _ in pairs], [c for _, c in pairs]
    with_gt = make_dataset(paths, labels)
    without_gt = make_dataset(paths, None)
    cfg = tiny_pipeline_config(tune={"max_samples": 0})
    auto_label(with_gt, CLASSES, tiny_pipeline_config(gt_field="ground_truth", tune={"max_samples": 0}))
    auto_label(without_gt, CLASSES, cfg)
    for f in ("nola_zeroshot", "nola_dino", "nola"):
        a = with_gt.sort_by("filepath").values(f"{f}.label")
        b = without_gt.sort_by("filepath").values(f"{f}.label")
        ca = np.array(with_gt.sort_by("filepath").values(f"{f}.confidence"))
        cb = np.array(without_gt.sort_by("filepath").values(f"{f}.confidence"))
        assert a == b, f
        assert np.allclose(ca, cb, atol=1e-6), f


@pytest.mark.integration
def test_zero_shot_relabel_reads_stored_embeddings(cifar_dataset, monkeypatch):
    from fiftyone_nola.stages.embeddings import compute_embeddings
    from fiftyone_nola.stages.nola import ZeroShotConfig

    compute_embeddings(
        cifar_dataset, "both", tiny_clip_spec(), tiny_dino_spec(), EmbedConfig(batch_size=16, num_workers=0)
    )
    import fiftyone_nola.core.embed as embed_mod

    def no_images(*a, **k):
        raise AssertionError("zero-shot must not re-encode images")

    monkeypatch.setattr(embed_mod, "iter_embeddings", no_images)
    zs = ZeroShotConfig(clip=tiny_clip_spec())
    s = zero_shot(cifar_dataset, ["cat", "dog", "ship"], zs, "zs3")
    assert s["labelled"] == len(cifar_dataset)
    assert set(cifar_dataset.distinct("zs3.label")) <= {"cat", "dog", "ship"}
    d = dino_labels(cifar_dataset, "zs3", tiny_dino_spec(), label_field="dino3")
    assert d["labelled"] == len(cifar_dataset)


@pytest.mark.integration
def test_relabel_with_cached_texts_loads_no_model(cifar_dataset, monkeypatch):
    import fiftyone_nola.core.text_cache as tc
    from fiftyone_nola.stages.embeddings import compute_embeddings
    from fiftyone_nola.stages.nola import ZeroShotConfig

    compute_embeddings(cifar_dataset, "clip", tiny_clip_spec(), config=EmbedConfig(num_workers=0))
    zs = ZeroShotConfig(clip=tiny_clip_spec())
    first = zero_shot(cifar_dataset, ["okapi", "narwhal"], zs, "zs_a")  # texts new to the cache
    assert first["texts_encoded"] > 0
    monkeypatch.setattr(tc, "load_clip", lambda *a, **k: (_ for _ in ()).throw(AssertionError("model loaded")))
    again = zero_shot(cifar_dataset, ["narwhal", "okapi"], zs, "zs_b")
    assert again["texts_encoded"] == 0 and again["texts_cached"] == first["texts_encoded"]
    a = dict(zip(*cifar_dataset.values(["id", "zs_a.label"])))
    b = dict(zip(*cifar_dataset.values(["id", "zs_b.label"])))
    assert a == b  # class order does not change the labels


@pytest.mark.integration
def test_retuning_after_the_teacher_changed_starts_over(cifar_dataset, caplog):
    from fiftyone_nola.core.dino_labeler import DinoLabelerConfig
    from fiftyone_nola.core.prompt_tuning import TuneConfig
    from fiftyone_nola.stages.nola import tune_prompts

    auto_label(cifar_dataset, CLASSES, tiny_pipeline_config())
    # new teacher labels: the old checkpoint is stale
    dino_labels(cifar_dataset, dino=tiny_dino_spec(), config=DinoLabelerConfig(epochs=3, seed=7))
    caplog.set_level(logging.INFO, logger="fiftyone_nola")
    cfg = TuneConfig(epochs=1, batch_size=8, max_samples=24, num_workers=0, device="cpu")
    s = tune_prompts(cifar_dataset, clip=tiny_clip_spec(), config=cfg)
    assert "starting over" in "\n".join(caplog.messages) and s["selected_epoch"] == 1


@pytest.mark.integration
def test_transductive_refinement_is_a_pipeline_step_reused_until_its_inputs_change(cifar_dataset):
    """--refine: transductive labels after the stages, from the stored vectors; planned like every
    step (reused on a re-run, redone when zero-shot is); the operator and the CLI reach it."""
    import fiftyone.operators as foo

    from fiftyone_nola.cli import auto_label_config, build_parser
    from fiftyone_nola.core.transductive import TransductiveConfig

    cfg = tiny_pipeline_config(skip_tuning=True, refine=TransductiveConfig(method="transclip"))
    s = auto_label(cifar_dataset, CLASSES, cfg)
    n = len(cifar_dataset)
    assert s["processed"]["refine"] == n and cifar_dataset.count("nola_transductive.label") == n
    assert rv.settings(cifar_dataset)["field"] == "nola_transductive"  # the run's last word is reviewed
    again = auto_label(cifar_dataset, CLASSES, cfg)
    assert {r["stage"]: r["action"] for r in again["plan"]}["refine"] == "reuse"
    redo = auto_label(
        cifar_dataset,
        CLASSES,
        tiny_pipeline_config(skip_tuning=True, refine=TransductiveConfig(), zeroshot={"include_templates": False}),
    )
    assert {r["stage"]: r["action"] for r in redo["plan"]}["refine"] == "run"
    rows = {r["stage"]: r for r in stage_status(cifar_dataset)}
    assert rows["Transductive"]["state"] == "fresh"
    r = foo.execute_operator(
        "@fiftyone-nola/nola/transductive_labels",
        ctx={"dataset": cifar_dataset, "params": {"method": "zlap", "label_field": "nola_zlap"}},
    )
    assert r.error is None and cifar_dataset.count("nola_zlap.label") == n
    args = build_parser().parse_args(["auto-label", "--images", "x", "--classes", "a,b", "--refine", "zlap"])
    assert auto_label_config(args, None, None).refine == TransductiveConfig(method="zlap")
