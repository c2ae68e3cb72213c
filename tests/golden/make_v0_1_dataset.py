"""Write ``tests/golden/v0_1_dataset/``: a dataset labelled by fiftyone-nola 0.1 (commit 4f0d584).

Run by the OLD code, in a checkout of that commit (see ``v0_1_dataset/README.md``)::

    git worktree add /work/scratch/v01 4f0d584
    cd /work/scratch/v01 && PYTHONPATH=/work/scratch/v01 /work/main/.venv/bin/python \\
        /work/main/tests/golden/make_v0_1_dataset.py /work/main/tests/golden/v0_1_dataset

It stages 12 CIFAR-10 images (a fixed mtime: the embedding stage fingerprints files by size and
mtime) and the class descriptions under one root, runs ``auto_label`` with the tiny models of the
test suite and ``app_ready`` (Brain similarity and map runs), then keeps what a later version has
to read: the FiftyOne export with its runs and Brain runs (media referenced relative to the
staged root) and the ``NOLA_HOME`` tree of the dataset (embedding stores, stage arrays, DINO labeller, tuned model), plus
``manifest.json`` naming the paths and ids the stored documents contain.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

COMMIT = "4f0d584"
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
IMAGE_CLASSES = CLASSES[:6]
PER_CLASS = 2
MTIME_NS = 1_700_000_000 * 10**9
DATASET_NAME = "nola-v0_1-golden"

# Before FiftyOne and the package are imported: a database and NOLA_HOME of our own (as tests/conftest.py).
STAGE = Path(tempfile.mkdtemp(prefix="nola-v0_1-"))
os.environ["FIFTYONE_DATABASE_NAME"] = f"nola_golden_{uuid.uuid4().hex[:8]}"
os.environ["FIFTYONE_DATABASE_VALIDATION"] = "false"
os.environ["FIFTYONE_DO_NOT_TRACK"] = "true"
os.environ["NOLA_HOME"] = str(STAGE / "nola_home")
os.environ["NOLA_ENGINE"] = "torch"
os.environ["OLLAMA_HOST"] = "http://127.0.0.1:9"
os.environ.pop("NOLA_RANDOM_INIT", None)

import fiftyone as fo  # noqa: E402
import fiftyone.core.odm as foo  # noqa: E402

import fiftyone_nola  # noqa: E402
from fiftyone_nola.embed import EmbedConfig  # noqa: E402
from fiftyone_nola.models import tiny_clip_spec, tiny_dino_spec  # noqa: E402
from fiftyone_nola.pipeline import AutoLabelConfig, auto_label  # noqa: E402

SHARED_DATA = Path(os.environ.get("NOLA_SHARED_DATA", Path(__file__).resolve().parents[3] / "shared" / "data"))
CIFAR_DIR = SHARED_DATA / "cifar10_2k"


def old_checkout() -> str:
    """The commit the imported package comes from; refuses anything but the previous version."""
    src = Path(fiftyone_nola.__file__).resolve().parents[1]
    head = subprocess.run(
        ["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
    if not head.startswith(COMMIT):
        sys.exit(f"fiftyone_nola is imported from {src} at {head}, not {COMMIT}: set PYTHONPATH to its checkout")
    return head


def stage_inputs() -> list[tuple[str, str]]:
    """Copy the images (fixed mtime) and the descriptions under STAGE; ``(relative path, class)`` pairs."""
    pairs = []
    for cls in IMAGE_CLASSES:
        for src in sorted((CIFAR_DIR / cls).glob("*.jpg"))[:PER_CLASS]:
            rel = f"{cls}/{src.name}"
            dst = STAGE / "images" / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
            os.utime(dst, ns=(MTIME_NS, MTIME_NS))
            pairs.append((rel, cls))
    shutil.copyfile(CIFAR_DIR / "descriptions.json", STAGE / "descriptions.json")
    return pairs


def config() -> AutoLabelConfig:
    """tests/conftest.py's tiny_pipeline_config at that commit, descriptions read from STAGE."""
    return AutoLabelConfig(
        clip=tiny_clip_spec(),
        dino=tiny_dino_spec(),
        embed=EmbedConfig(batch_size=16, num_workers=0),
        descriptions_file=str(STAGE / "descriptions.json"),
        tune_epochs=1,
        tune_batch_size=8,
        tune_max_samples=24,
        device="cpu",
    )


def main(out: Path) -> None:
    head = old_checkout()
    pairs = stage_inputs()
    ds = fo.Dataset(DATASET_NAME)
    ds.add_samples(
        [
            fo.Sample(filepath=str(STAGE / "images" / rel), ground_truth=fo.Classification(label=cls))
            for rel, cls in pairs
        ],
        progress=False,
    )
    summary = auto_label(ds, CLASSES, config())
    assert set(summary["app"]["clip"]) >= {"similarity", "visualization"}, summary["app"]

    out.mkdir(parents=True, exist_ok=True)
    for old in out.iterdir():  # this run's files replace the last ones; the README stays
        if old.name != "README.md":
            shutil.rmtree(old) if old.is_dir() else old.unlink()
    ds.export(
        export_dir=str(out / "dataset"),
        dataset_type=fo.types.FiftyOneDataset,
        export_media=False,
        rel_dir=str(STAGE / "images"),
        export_runs=True,
        progress=False,
    )
    shutil.copytree(STAGE / "images", out / "images")
    shutil.copyfile(STAGE / "descriptions.json", out / "descriptions.json")
    # The dataset's stores; not the text-embedding cache (rebuilt on demand, 185 KB) nor lock files.
    shutil.copytree(
        STAGE / "nola_home" / "datasets", out / "nola_home" / "datasets", ignore=shutil.ignore_patterns(".lock")
    )
    manifest = {
        "commit": head,
        "fiftyone": fo.__version__,
        "root": str(STAGE),
        "dataset_id": str(ds._doc.id),
        "dataset_name": DATASET_NAME,
        "classes": CLASSES,
        "images_mtime_ns": MTIME_NS,
        "processed": summary["processed"],
        "runs": ds.list_runs(),
        "brain_runs": ds.list_brain_runs(),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    print(json.dumps(manifest, indent=2, sort_keys=True))


if __name__ == "__main__":
    try:
        main(Path(sys.argv[1]).resolve())
    finally:
        db = foo.get_db_conn()
        db.client.drop_database(db.name)
        shutil.rmtree(STAGE, ignore_errors=True)
