"""Integration: real COCO images through the CDUL multi-label pipeline with a tiny CLIP."""

import json
import logging

import numpy as np
import pytest

from conftest import COCO_DIR
from fiftyone_nola.core.cdul import CropConfig, TrainConfig
from fiftyone_nola.core.embed import EmbedConfig
from fiftyone_nola.core.models import tiny_clip_spec
from fiftyone_nola.pipeline import auto_label_multilabel
from fiftyone_nola.stages.cdul import MultiLabelConfig, classifier_config


@pytest.fixture
def coco_dataset(make_dataset):
    if not COCO_DIR.is_dir():
        pytest.skip(f"no COCO images at {COCO_DIR}")
    labels = json.loads((COCO_DIR / "labels.json").read_text())
    names = sorted(labels)[:12]
    ds = make_dataset([str(COCO_DIR / "images" / n) for n in names], [labels[n] or None for n in names])
    # one label outside the class list, one sample without any GT
    import fiftyone as fo

    first = ds.first()
    first.ground_truth.classifications.append(fo.Classification(label="unicorn"))
    first.save()
    return ds


@pytest.mark.integration
def test_auto_label_multilabel_end_to_end(coco_dataset):
    classes = (COCO_DIR / "classes.txt").read_text().split("\n")
    classes = [c for c in classes if c.strip()]
    cfg = MultiLabelConfig(
        clip=tiny_clip_spec(),
        embed=EmbedConfig(batch_size=8, num_workers=0),
        crop=CropConfig(batch_size=4, num_workers=0),
        gt_field="ground_truth",
        train=TrainConfig(epochs=3, update_every=1, warmup=1),
        single_template=True,
        device="cpu",
    )
    s = auto_label_multilabel(coco_dataset, classes, cfg)
    n = len(coco_dataset)
    for f in ("cdul_pseudo", "cdul"):
        counts = [len(c.classifications) for c in coco_dataset.values(f)]
        assert len(counts) == n and min(counts) >= 1, f
        confs = [x for cs in coco_dataset.values(f"{f}.classifications.confidence") for x in cs]
        assert all(0 <= x <= 1 for x in confs)
    ev = s["evaluation"]
    assert set(ev) == {"global", "local", "initial", "trained"}
    for name, e in ev.items():
        assert 0 <= e["mAP"] <= 1 and e["classes_evaluated"] > 0, name
    assert ev["initial"]["labels_outside_class_list"] == ["unicorn"]  # reported, not crashing
    assert s["stages"]["pseudo_labels"]["images_per_s_local"] > 0
    assert np.isfinite(s["stages"]["classifier"]["final_loss"])
    assert s["stages"]["classifier"]["label_update_epochs"] == [2, 3]


def test_classifier_schedule_fits_the_machine_and_is_printed(caplog):
    caplog.set_level(logging.INFO, logger="fiftyone_nola")
    cfg = classifier_config(MultiLabelConfig(device="cpu"))
    lines = caplog.messages
    assert (cfg.epochs, cfg.update_every, cfg.warmup, cfg.loss) == (30, 3, 3, "kl")
    assert lines[0].startswith("[cdul] classifier schedule on cpu") and "30 epochs" in lines[0]
    cfg = classifier_config(MultiLabelConfig(device="cpu", train=TrainConfig(epochs=12, update_every=4, warmup=0)))
    assert cfg.update_epochs() == [4, 8, 12]
