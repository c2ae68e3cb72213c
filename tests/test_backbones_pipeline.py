"""Every stage end to end on real images with the new backbones (tiny random configs here; the
real-size architectures from the CLI in the slow test at the end).

SigLIP 2-like CLIP (sigmoid scoring, sentencepiece tokenizer, timm ViT tower) + DINOv2, and
PE-Core-like CLIP (timm Eva tower with RoPE) + DINOv3: embeddings, zero-shot, DINO labeler,
prompt tuning, prediction, evaluation; CDUL multi-label with the SigLIP 2-like CLIP.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import DATA_CLASSES as CLASSES  # CIFAR-10's on ../shared, else the committed set's
from conftest import REPO, cifar_files, data_classes, tiny_pipeline_config
from fiftyone_nola.core import models as M
from fiftyone_nola.pipeline import auto_label
from fiftyone_nola.stages import runs
from fiftyone_nola.stages import transductive as td
from fiftyone_nola.stages.artifacts import stage_dir, stage_meta

pytestmark = pytest.mark.integration
STEPS = {"embeddings:clip", "embeddings:dino", "zeroshot", "dino_labeler", "prompt_tuning", "predict"}


def _assert_every_stage_labelled(ds, summary):
    n = len(ds)
    for f in ("nola_zeroshot", "nola_dino", "nola"):
        assert ds.count(f"{f}.label") == n, f
        conf = np.array(ds.values(f"{f}.confidence"))
        assert np.all((conf > 0) & (conf <= 1)), f
        assert set(ds.distinct(f"{f}.label")) <= set(CLASSES)
    assert set(summary["seconds_per_stage"]) >= STEPS
    for key in ("nola_zeroshot", "nola_dino", "nola_model", "nola"):
        assert runs.get_run(ds, key) is not None, key
    assert 0.0 <= summary["evaluation"]["nola"]["accuracy"] <= 1.0


@pytest.mark.parametrize("pair", ["siglip2+dinov2", "pe_core+dinov3"])
def test_auto_label_end_to_end(pair, cifar_dataset, tiny_siglip_spec, tiny_pe_spec):
    clip, dino = {
        "siglip2+dinov2": (tiny_siglip_spec, M.DinoSpec(name=M.TINY_DINOV2_NAME, random_init=True)),
        "pe_core+dinov3": (tiny_pe_spec, M.DinoSpec(name=M.TINY_DINOV3_NAME, random_init=True)),
    }[pair]
    cfg = tiny_pipeline_config(clip=clip, dino=dino, gt_field="ground_truth")
    summary = auto_label(cifar_dataset, CLASSES, cfg)
    _assert_every_stage_labelled(cifar_dataset, summary)
    meta = stage_meta(stage_dir(cifar_dataset, "nola_zeroshot"), "zero-shot")
    scoring = meta["scoring"]
    if pair.startswith("siglip2"):
        assert scoring["kind"] == "sigmoid" and scoring["logit_bias"] == pytest.approx(-10.0)
        # the transductive stage starts from the same sigmoid scores, not a softmax at 100
        assert td._zeroshot_scoring(cifar_dataset, "nola_zeroshot").kind == "sigmoid"
        assert td.transductive_labels(cifar_dataset, label_field="nola_td")["labelled"] == len(cifar_dataset)
    else:
        assert scoring == {"kind": "softmax", "logit_scale": 100.0, "logit_bias": 0.0}
    assert meta["clip"]["key"] == M.spec_key(clip)
    assert "-cls-official-" in M.spec_key(dino)  # the DINO store: the family's own transform
    # a re-run reuses every stage
    again = auto_label(cifar_dataset, CLASSES, tiny_pipeline_config(clip=clip, dino=dino))
    assert set(again["processed"].values()) == {0}, again["processed"]


def test_cdul_with_a_sigmoid_clip(make_dataset, tiny_siglip_spec):
    from fiftyone_nola import MultiLabelConfig, auto_label_multilabel
    from fiftyone_nola.core.cdul import CropConfig
    from fiftyone_nola.core.embed import EmbedConfig

    classes = data_classes(["cat", "dog", "ship"])
    pairs = cifar_files(per_class=2, classes=classes)
    ds = make_dataset([p for p, _ in pairs], [[c] for _, c in pairs])
    cfg = MultiLabelConfig(
        clip=tiny_siglip_spec,
        dino=None,
        embed=EmbedConfig(batch_size=8, num_workers=0),
        crop=CropConfig(batch_size=4, num_workers=0),
        single_template=True,
        device="cpu",
    )
    summary = auto_label_multilabel(ds, classes, cfg)
    assert len(ds.exists(cfg.pseudo_field)) == len(ds) == len(ds.exists(cfg.pred_field))
    assert summary["processed"]["pseudo_labels"] == len(ds)


@pytest.mark.slow
@pytest.mark.heavy
def test_cli_labels_a_folder_with_real_size_pe_core_and_dinov2(tmp_path):
    """The issue's command: --clip-arch PE-Core-B-16 --dino vit_small_patch14_dinov2.lvd142m --random-init."""
    import shutil

    imgs = tmp_path / "imgs"
    for p, c in cifar_files(per_class=2, classes=["cat", "dog", "ship"]):
        (imgs / c).mkdir(parents=True, exist_ok=True)
        shutil.copy(p, imgs / c)
    out = tmp_path / "summary.json"
    cmd = [
        sys.executable,
        "-m",
        "fiftyone_nola",
        "auto-label",
        "--images",
        str(imgs),
        "--classes",
        "cat,dog,ship",
        "--clip-arch",
        "PE-Core-B-16",
        "--dino",
        "vit_small_patch14_dinov2.lvd142m",
        "--random-init",
        "--epochs",
        "1",
        "--tune-max-samples",
        "6",
        "--batch-size",
        "6",
        "--workers",
        "0",
        "--dataset",
        f"nola-cli-pe-{os.getpid()}",
        "--json",
        str(out),
    ]
    r = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary = json.loads(out.read_text())
    assert set(summary["seconds_per_stage"]) >= STEPS
    assert summary["random_init"]
