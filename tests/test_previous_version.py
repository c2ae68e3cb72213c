"""A dataset labeled by fiftyone-nola 0.1 (commit 4f0d584) still works with this version.

``tests/golden/v0_1_dataset/`` was written by that version (``tests/golden/make_v0_1_dataset.py``):
the FiftyOne export of a 12-image dataset with its NoLA runs and Brain runs, and its ``NOLA_HOME``
stores. The test imports it with the current code and reads everything back.

Moving the data into the test database is relocation, not conversion. The import keeps every
sample id but gives the dataset a new id, and the stores live under ``NOLA_HOME/datasets/<dataset
id>``; the stored documents also name absolute paths of the machine that wrote them (the staged
images and descriptions, the stores). So the stores are copied under the new dataset id and those
absolute path prefixes are rewritten (old root -> test root, old dataset dir -> new dataset dir)
in the JSON files, exactly as if the same files sat where the old version wrote them. Nothing
else is changed: classes, keys, config classes, formats and fingerprints are the old version's.
"""

import json
import os
import shutil
import uuid
from pathlib import Path

import numpy as np
import pytest

from conftest import tiny_pipeline_config
from fiftyone_nola.core import storage
from fiftyone_nola.core.index import EmbeddingIndex
from fiftyone_nola.core.models import tiny_clip_spec, tiny_dino_spec
from fiftyone_nola.pipeline import auto_label, validate
from fiftyone_nola.stages.brain_backend import FaissSimilarityConfig
from fiftyone_nola.stages.embeddings import index_path, open_index

GOLDEN = Path(__file__).parent / "golden" / "v0_1_dataset"
OLD_CONFIG_CLS = "fiftyone_nola.brain_backend.FaissSimilarityConfig"
LABEL_FIELDS = ("nola_zeroshot", "nola_dino", "nola")


def _relocate(tree: Path, moves: list[tuple[str, str]]) -> None:
    """Rewrite the absolute path prefixes in every JSON file under ``tree``."""
    for path in tree.rglob("*.json"):
        text = path.read_text()
        for old, new in moves:
            text = text.replace(old, new)
        assert all(old not in text for old, _ in moves), path  # every path moved, none left behind
        path.write_text(text)


@pytest.fixture
def v0_1_dataset(tmp_path):
    """The golden dataset imported into the test database, its files placed as the old version left them."""
    import fiftyone as fo

    manifest = json.loads((GOLDEN / "manifest.json").read_text())
    root = tmp_path / "root"
    shutil.copytree(GOLDEN / "images", root / "images")
    for img in (root / "images").rglob("*.jpg"):  # git keeps no mtimes; the stores fingerprint them
        os.utime(img, ns=(manifest["images_mtime_ns"],) * 2)
    shutil.copyfile(GOLDEN / "descriptions.json", root / "descriptions.json")

    ds = fo.Dataset(f"nola-v0_1-{uuid.uuid4().hex[:8]}")  # empty: the import replaces its document
    new_dir = storage.dataset_dir(str(ds._doc.id))
    shutil.copytree(GOLDEN / "nola_home" / "datasets" / manifest["dataset_id"], new_dir)
    shutil.copytree(GOLDEN / "dataset", tmp_path / "export")
    old_dir = f"{manifest['root']}/nola_home/datasets/{manifest['dataset_id']}"
    moves = [(old_dir, str(new_dir)), (manifest["root"], str(root))]
    for tree in (new_dir, tmp_path / "export"):
        _relocate(tree, moves)
    ds.add_dir(str(tmp_path / "export"), fo.types.FiftyOneDataset, rel_dir=str(root / "images"), progress=False)
    yield ds, manifest, root
    ds.delete()
    shutil.rmtree(new_dir, ignore_errors=True)


def test_golden_was_written_by_the_previous_version():
    manifest = json.loads((GOLDEN / "manifest.json").read_text())
    assert manifest["commit"].startswith("4f0d584")
    stored = json.loads((GOLDEN / "dataset" / "metadata.json").read_text())["brain_methods"]
    assert {stored[k]["config"]["cls"] for k in ("nola_clip_sim", "nola_dino_sim")} == {OLD_CONFIG_CLS}


def test_runs_load(v0_1_dataset):
    ds, manifest, _ = v0_1_dataset
    samples = json.loads((GOLDEN / "dataset" / "samples.json").read_text())["samples"]
    assert sorted(ds.values("id")) == sorted(s["_id"]["$oid"] for s in samples)  # sample ids kept
    assert sorted(ds.list_runs()) == sorted(manifest["runs"])
    for key in manifest["runs"]:
        info = ds.get_run_info(key)
        assert info.config.method.startswith("nola."), key
        assert isinstance(info.config.config, dict), key
        assert ds.load_run_results(key, cache=False).summary, key
    for field in LABEL_FIELDS:
        assert ds.count(f"{field}.label") == len(ds), field


def test_brain_runs_load_and_search(v0_1_dataset):
    ds, manifest, _ = v0_1_dataset
    assert sorted(ds.list_brain_runs()) == sorted(manifest["brain_runs"])
    ids = ds.values("id")
    for family in ("clip", "dino"):
        stored = ds._doc.brain_methods[f"nola_{family}_sim"].config["cls"]
        assert stored == OLD_CONFIG_CLS  # the import keeps the old dotted path: the shim resolves it
        assert isinstance(ds.get_brain_info(f"nola_{family}_sim").config, FaissSimilarityConfig)
        index = ds.load_brain_results(f"nola_{family}_sim", cache=False)
        assert index.total_index_size == len(ds)
        near = ds.sort_by_similarity(ids[0], k=4, brain_key=f"nola_{family}_sim")
        assert len(near) == 4 and near.first().id == ids[0]  # a vector is its own nearest neighbour
        points = ds.load_brain_results(f"nola_{family}_viz", cache=False).points
        assert points.shape == (len(ds), 2)


def test_indexes_open(v0_1_dataset):
    ds, _, _ = v0_1_dataset
    ids = set(ds.values("id"))
    for spec in (tiny_clip_spec(), tiny_dino_spec()):
        ix = open_index(ds, spec)
        assert len(ix) == len(ds) and set(ix.ids) == ids
        reopened = EmbeddingIndex.open(index_path(ds, spec))
        vecs, found = reopened.get(sorted(ids))
        assert all(found) and vecs.shape[0] == len(ids)


def test_rerun_with_the_same_settings_reuses_every_stage(v0_1_dataset):
    ds, manifest, root = v0_1_dataset
    before = {f: dict(zip(*ds.values(["id", f"{f}.confidence"]))) for f in LABEL_FIELDS}
    config = tiny_pipeline_config(descriptions_file=str(root / "descriptions.json"))
    plan = validate(ds, manifest["classes"], config).plan  # the --check plan reads the same records
    assert {s["stage"]: (s["action"], s["samples"]) for s in plan["stages"]} == {
        "embeddings:clip": ("reuse", 0),
        "embeddings:dino": ("reuse", 0),
        "zeroshot": ("reuse", 0),
        "dino_labeler": ("reuse", 0),
        "prompt_tuning": ("reuse", 0),
        "predict": ("reuse", 0),
        "review": ("run", 0),  # 0.1 flagged with other tags: the queue is built once
        "app:clip": ("run", 0),  # and its App runs recorded no store state: registered again
        "app:dino": ("run", 0),
    }
    again = auto_label(ds, manifest["classes"], config)
    assert again["processed"] == {
        "embeddings:clip": 0,
        "embeddings:dino": 0,
        "zeroshot": 0,
        "dino_labeler": 0,
        "prompt_tuning": 0,
        "predict": 0,
    }
    for f, old in before.items():
        assert dict(zip(*ds.values(["id", f"{f}.confidence"]))) == old, f


def test_panel_stage_table_reads_old_run_records(v0_1_dataset):
    """0.1 recorded nested settings (the tuned CLIP, the embedding spec) as repr strings."""
    from fiftyone_nola.stages.review_stages import stage_status

    ds, _, _ = v0_1_dataset
    rows = {r["stage"]: r for r in stage_status(ds)}
    assert all(r["state"] != "not run" for r in rows.values()), rows
    assert rows["Prompt tuning"]["model"] == "nola-tiny-clip"


def test_reregistered_similarity_run_takes_text_queries(v0_1_dataset):
    """The App's text search needs the run to know its CLIP: read from 0.1's record too."""
    import torch

    from fiftyone_nola.core.models import load_clip
    from fiftyone_nola.stages.brain_runs import register_brain_runs

    ds, _, _ = v0_1_dataset
    key = register_brain_runs(ds, "clip", visualization=False)["similarity"]
    assert ds.get_brain_info(key).config.supports_prompts  # what the App's Similarity panel reads
    clip = load_clip(tiny_clip_spec(), "cpu")
    with torch.no_grad():
        text = clip.model.encode_text(clip.tokenizer(["a photo of a cat"])).float().numpy()[0]
    vecs, _ = open_index(ds, tiny_clip_spec()).get(ds.values("id"))
    sims = (vecs / np.linalg.norm(vecs, axis=1, keepdims=True)) @ (text / np.linalg.norm(text))
    want = [ds.values("id")[i] for i in np.argsort(-sims)[:3]]
    fresh = ds.load_brain_results(key, cache=False)  # as the App server loads it
    assert fresh.sort_by_similarity("a photo of a cat", k=3).values("id") == want
