"""No finished work redone: a second run processes nothing; added samples only themselves."""

from pathlib import Path

import pytest

from conftest import DATA_CLASSES as CLASSES
from conftest import cifar_files, tiny_pipeline_config
from fiftyone_nola.core.embed import EmbedConfig
from fiftyone_nola.core.models import tiny_clip_spec
from fiftyone_nola.pipeline import auto_label


@pytest.mark.integration
def test_rerun_processes_nothing_then_only_added_samples(make_dataset):
    import fiftyone as fo

    pairs = cifar_files(per_class=3)
    ds = make_dataset([p for p, _ in pairs[:-5]])
    n = len(ds)
    first = auto_label(ds, CLASSES, tiny_pipeline_config())
    assert first["processed"] == {
        "embeddings:clip": n,
        "embeddings:dino": n,
        "zeroshot": n,
        "dino_labeler": n,
        "prompt_tuning": 1,
        "predict": n,
    }
    before = {f: dict(zip(*ds.values(["id", f"{f}.confidence"]))) for f in ("nola_zeroshot", "nola_dino", "nola")}
    model_dir = Path(first["stages"]["prompt_tuning"]["model_dir"])
    model_files = {p.name: p.read_bytes() for p in model_dir.glob("*.*")}

    from fiftyone_nola import validate

    plan = validate(ds, CLASSES, tiny_pipeline_config()).plan  # the --check plan says the same, writing nothing
    assert {s["stage"]: (s["action"], s["samples"]) for s in plan["stages"]} == {
        "embeddings:clip": ("reuse", 0),
        "embeddings:dino": ("reuse", 0),
        "zeroshot": ("reuse", 0),
        "dino_labeler": ("reuse", 0),
        "prompt_tuning": ("reuse", 0),
        "predict": ("reuse", 0),
        "review": ("reuse", 0),
        "app:clip": ("reuse", 0),
        "app:dino": ("reuse", 0),
    }
    ds.reload()
    written = (tuple(ds.values("last_modified_at")), ds._doc.last_modified_at, sorted(ds.list_brain_runs()))

    again = auto_label(ds, CLASSES, tiny_pipeline_config())
    assert again["processed"] == {
        "embeddings:clip": 0,
        "embeddings:dino": 0,
        "zeroshot": 0,
        "dino_labeler": 0,
        "prompt_tuning": 0,
        "predict": 0,
    }
    assert again["stages"] == {}  # every step reused: nothing ran...
    ds.reload()  # ...and nothing was written: no sample, Brain run or run record
    assert (tuple(ds.values("last_modified_at")), ds._doc.last_modified_at, sorted(ds.list_brain_runs())) == written
    assert {p.name: p.read_bytes() for p in model_dir.glob("*.*")} == model_files  # identity kept
    for f, old in before.items():
        assert dict(zip(*ds.values(["id", f"{f}.confidence"]))) == old, f

    ds.add_samples([fo.Sample(filepath=p) for p, _ in pairs[-5:]], progress=False)
    plan = validate(ds, CLASSES, tiny_pipeline_config()).plan
    assert [s["samples"] for s in plan["stages"]][:6] == [5, 5, 5, 5, 0, 5]
    added = auto_label(ds, CLASSES, tiny_pipeline_config())
    # Rule: the labeler and the tuned model are kept; they label the new samples only.
    assert added["processed"] == {
        "embeddings:clip": 5,
        "embeddings:dino": 5,
        "zeroshot": 5,
        "dino_labeler": 5,
        "prompt_tuning": 0,
        "predict": 5,
    }
    for f, old in before.items():
        assert ds.count(f"{f}.label") == n + 5, f
        now = dict(zip(*ds.values(["id", f"{f}.confidence"])))
        assert {k: now[k] for k in old} == old, f  # the earlier samples' labels are untouched


@pytest.mark.integration
def test_changed_settings_redo_the_stages_they_feed(make_dataset):
    pairs = cifar_files(per_class=2)
    ds = make_dataset([p for p, _ in pairs])
    auto_label(ds, CLASSES, tiny_pipeline_config())
    s = auto_label(ds, CLASSES, tiny_pipeline_config(zeroshot={"include_templates": False}))
    n = len(ds)
    assert s["processed"] == {
        "embeddings:clip": 0,
        "embeddings:dino": 0,
        "zeroshot": n,
        "dino_labeler": n,
        "prompt_tuning": 1,
        "predict": n,
    }


@pytest.mark.integration
def test_multilabel_rerun_scores_only_added_samples(make_dataset):
    """CDUL: a re-run scores no crops; added samples alone get pseudo-labels and the saved head's labels."""
    import json

    import fiftyone as fo

    from conftest import COCO_DIR
    from fiftyone_nola.core.cdul import CropConfig, TrainConfig
    from fiftyone_nola.pipeline import MultiLabelConfig, auto_label_multilabel

    if not COCO_DIR.is_dir():
        pytest.skip("no COCO images")
    names = sorted(json.loads((COCO_DIR / "labels.json").read_text()))[:10]
    paths = [str(COCO_DIR / "images" / n) for n in names]
    ds = make_dataset(paths[:7])
    cfg = MultiLabelConfig(
        clip=tiny_clip_spec(),
        embed=EmbedConfig(batch_size=8, num_workers=0),
        crop=CropConfig(grid=2, batch_size=4, num_workers=0),
        train=TrainConfig(epochs=2),
        single_template=True,
        device="cpu",
    )
    classes = ["person", "car", "dog", "pizza"]
    first = auto_label_multilabel(ds, classes, cfg)
    assert first["processed"] == {"embeddings:clip": 7, "pseudo_labels": 7, "classifier": 7}
    before = dict(zip(*ds.values(["id", "cdul.classifications.confidence"])))
    again = auto_label_multilabel(ds, classes, cfg)
    assert again["processed"] == {"embeddings:clip": 0, "pseudo_labels": 0, "classifier": 0}
    assert dict(zip(*ds.values(["id", "cdul.classifications.confidence"]))) == before
    ds.add_samples([fo.Sample(filepath=p) for p in paths[7:]], progress=False)
    added = auto_label_multilabel(ds, classes, cfg)
    assert added["processed"] == {"embeddings:clip": 3, "pseudo_labels": 3, "classifier": 3}
    assert ds.count("cdul") == 10 and ds.count("cdul_pseudo") == 10
    now = dict(zip(*ds.values(["id", "cdul.classifications.confidence"])))
    assert {k: now[k] for k in before} == before
