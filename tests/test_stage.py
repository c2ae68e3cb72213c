"""The stage skeleton: one summary schema for every stage, one run record per stage run."""

import json
import logging

import pytest

from conftest import COCO_DIR, cifar_files, tiny_pipeline_config
from fiftyone_nola.stages import runs
from fiftyone_nola.stages.stage import LABEL_KEYS, SUMMARY_KEYS, StageRun

CLASSES = ["cat", "dog", "ship"]


APP_STEPS = {"review", "app:clip", "app:dino", "evaluate"}  # steps on the App or the labels, not stages


def _stage_summaries(pipeline_summary: dict) -> dict:
    """Every stage summary of an auto_label / auto_label_multilabel result, by name."""
    return {name: s for name, s in pipeline_summary["stages"].items() if name not in APP_STEPS}


def assert_schema(name: str, s: dict) -> None:
    assert tuple(s)[: len(SUMMARY_KEYS)] == SUMMARY_KEYS, (name, list(s))
    assert isinstance(s["stage"], str) and isinstance(s["samples"], int) and s["seconds"] >= 0, (name, s)
    if s["field"] is not None:  # a stage that writes labels says how many samples got one
        assert set(LABEL_KEYS) <= set(s) and 0 <= s["labelled"] <= s["samples"], (name, s)
    assert not any(k.endswith("_seconds") and k != "model_load_seconds" for k in s), (name, list(s))
    json.dumps(s, default=str)


@pytest.mark.integration
def test_record_builds_the_schema_once_and_records_the_run(make_dataset):
    ds = make_dataset([p for p, _ in cifar_files(per_class=1)[:3]])
    run = StageRun(ds, "demo", "demo_field", "demo")
    with run.writing():
        s = run.record({"setting": 1}, labelled=2, extra="x")
        with pytest.raises(RuntimeError, match="recorded twice"):
            run.record({"setting": 1})
    assert list(s)[:4] == list(SUMMARY_KEYS) and s["samples"] == 3 and s["extra"] == "x"
    stored = runs.get_run(ds, "demo_field")
    assert stored["config"] == {"setting": 1} and stored["results"]["labelled"] == 2


@pytest.mark.integration
def test_every_single_label_stage_summary_follows_the_schema(make_dataset, caplog):
    import fiftyone as fo

    from fiftyone_nola.pipeline import auto_label

    caplog.set_level(logging.INFO, logger="fiftyone_nola")
    pairs = cifar_files(per_class=2, classes=CLASSES)
    ds = make_dataset([p for p, _ in pairs[:-2]])
    first = _stage_summaries(auto_label(ds, CLASSES, tiny_pipeline_config()))
    assert set(first) == {"embeddings:clip", "embeddings:dino", "zeroshot", "dino_labeler", "prompt_tuning", "predict"}
    ds.add_samples([fo.Sample(filepath=p) for p, _ in pairs[-2:]], progress=False)
    added = _stage_summaries(auto_label(ds, CLASSES, tiny_pipeline_config()))  # apply paths, reused tuning
    assert added["dino_labeler"]["retrained"] is False and "prompt_tuning" not in added  # reused: did not run
    for name, s in [*first.items(), *(("added " + k, v) for k, v in added.items())]:
        assert_schema(name, s)
    assert any(m.startswith("[zeroshot] ") for m in caplog.messages)  # lines go through logging


@pytest.mark.integration
def test_every_multilabel_stage_summary_follows_the_schema(make_dataset):
    import fiftyone as fo

    from fiftyone_nola.core.cdul import CropConfig, TrainConfig
    from fiftyone_nola.core.embed import EmbedConfig
    from fiftyone_nola.core.models import tiny_clip_spec
    from fiftyone_nola.pipeline import MultiLabelConfig, auto_label_multilabel

    if not COCO_DIR.is_dir():
        pytest.skip("no COCO images")
    names = sorted(json.loads((COCO_DIR / "labels.json").read_text()))[:6]
    paths = [str(COCO_DIR / "images" / n) for n in names]
    ds = make_dataset(paths[:4])
    cfg = MultiLabelConfig(
        clip=tiny_clip_spec(),
        embed=EmbedConfig(batch_size=8, num_workers=0),
        crop=CropConfig(grid=2, batch_size=4, num_workers=0),
        train=TrainConfig(epochs=1),
        single_template=True,
        device="cpu",
    )
    first = _stage_summaries(auto_label_multilabel(ds, ["person", "car", "dog"], cfg))
    ds.add_samples([fo.Sample(filepath=p) for p in paths[4:]], progress=False)
    added = _stage_summaries(auto_label_multilabel(ds, ["person", "car", "dog"], cfg))
    assert added["classifier"]["retrained"] is False
    for name, s in [*first.items(), *(("added " + k, v) for k, v in added.items())]:
        assert_schema(name, s)


def test_recorded_fields_reads_dicts_and_reprs_literally_never_evaluates():
    rec = "ClipSpec(arch='ViT-B-32', pretrained='openai', random_init=False, models_dir=None, quick_gelu=None)"
    assert runs.recorded_fields(rec)["arch"] == "ViT-B-32"
    assert runs.recorded_fields(rec, "ClipSpec")["pretrained"] == "openai"
    assert runs.recorded_fields(rec, "DinoSpec") is None  # another type's record
    assert runs.recorded_fields({"arch": "x"}) == {"arch": "x"}
    for hostile in (
        "__import__('os').system('true')",
        "ClipSpec(arch=open('/etc/passwd').read())",
        "ClipSpec(",
        "ClipSpec(a={[]: 1})",
        3,
    ):
        assert runs.recorded_fields(hostile) is None, hostile


def test_run_settings_are_stored_as_data_and_old_repr_records_compare_equal(make_dataset):
    """Nested settings are stored as dicts with their type's name (they were repr strings parsed
    back: two bugs came from that); a record written the old way is still the same settings."""
    from fiftyone_nola.core.models import ClipSpec
    from fiftyone_nola.core.prompt_tuning import TuneConfig
    from fiftyone_nola.stages import reuse

    ds = make_dataset()
    config = {"clip": ClipSpec(arch="ViT-B-16", pretrained="openai"), "tune": TuneConfig(epochs=3), "k": (1, 2)}
    runs.record_run(ds, "nola_x", "test", config)
    stored = runs.get_run(ds, "nola_x")["config"]

    def strings(v):
        if isinstance(v, dict):
            return [s for x in v.values() for s in strings(x)]
        return [s for x in v for s in strings(x)] if isinstance(v, list) else [v] if isinstance(v, str) else []

    assert not [s for s in strings(stored) if "(" in s and "=" in s], "a setting stored as a repr string"
    assert stored["clip"]["_type"] == "ClipSpec" and stored["clip"]["arch"] == "ViT-B-16"
    assert stored["tune"]["_type"] == "TuneConfig" and stored["tune"]["epochs"] == 3 and stored["k"] == [1, 2]
    assert runs.recorded_fields(stored["clip"], "ClipSpec") == {k: v for k, v in stored["clip"].items() if k != "_type"}
    assert runs.recorded_fields(stored["clip"], "DinoSpec") is None
    assert reuse.up_to_date(ds, "nola_x", config)
    # the same settings as 0.2 recorded them: nested specs as repr strings, no type tags
    old = {"clip": repr(config["clip"]), "tune": {f: v for f, v in stored["tune"].items() if f != "_type"}}
    runs.record_run(ds, "nola_old", "test", {**old, "k": [1, 2]})
    assert reuse.up_to_date(ds, "nola_old", config)
    assert not reuse.up_to_date(ds, "nola_old", {**config, "clip": ClipSpec(arch="ViT-L-14")})
