"""Datasets as the pipeline leaves them, built in bulk without decoding images: ``n`` samples with a
``nola`` Classification (imbalanced classes, confidences spread over [0.1, 1]) and a FAISS store of
class-clustered vectors; their files are absent, or tiny generated thumbnails for the App.
Shared by the review tests and benchmarks/review_scale.py, review_browser.py."""

from __future__ import annotations

import datetime
import os
import time
from pathlib import Path

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CHUNK = 50_000


def write_thumbnails(folder: Path, n: int, size: int = 16) -> list[str]:
    """``n`` tiny JPEGs (``size`` pixels square, a colour each) in ``folder``; existing ones are kept."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = [str(folder / f"{i:07d}.jpg") for i in range(n)]
    have = set(os.listdir(folder))
    ramp = np.linspace(0.6, 1.0, size, dtype=np.float32)[:, None, None]  # a shade: not a flat square
    for i, p in enumerate(paths):
        if os.path.basename(p) not in have:
            rgb = np.array([(i * 37) % 256, (i * 101) % 256, (i * 211) % 256], np.float32)
            Image.fromarray(np.broadcast_to(ramp * rgb, (size, size, 3)).astype(np.uint8)).save(p, quality=90)
    return paths


def build_review_dataset(
    n: int, dim: int = 64, seed: int = 0, name: str | None = None, classes=CLASSES, filepaths=None
):
    """The dataset (persistent=False) with predictions, the store and its embedding run recorded;
    ``filepaths``: the samples' files (default: absent ones)."""
    import fiftyone as fo
    import numpy as np
    from bson import ObjectId

    from fiftyone_nola.core.index import EmbeddingIndex
    from fiftyone_nola.core.storage import index_dir
    from fiftyone_nola.stages import runs

    rng = np.random.default_rng(seed)
    ds = fo.Dataset(name or f"review-synthetic-{n}-{os.getpid()}-{time.time_ns()}")
    ds.add_sample_field("nola", fo.EmbeddedDocumentField, embedded_doc_type=fo.Classification)
    ds.default_classes = list(classes)
    ds.save()
    weights = np.linspace(2.0, 0.5, len(classes))
    labels = rng.choice(len(classes), size=n, p=weights / weights.sum())
    conf = np.round(0.1 + 0.9 * rng.beta(2.5, 1.5, size=n), 4)
    now = datetime.datetime.utcnow()
    ids = [ObjectId() for _ in range(n)]
    for s in range(0, n, CHUNK):
        docs = [
            {
                "_id": ids[i],
                "filepath": filepaths[i] if filepaths is not None else f"/synthetic/{i:07d}.jpg",
                "tags": [],
                "_media_type": "image",
                "_rand": float(rng.random()),
                "_dataset_id": ds._doc.id,
                "created_at": now,
                "last_modified_at": now,
                "nola": {
                    "_id": ObjectId(),
                    "_cls": "Classification",
                    "tags": [],
                    "label": classes[labels[i]],
                    "confidence": float(conf[i]),
                },
            }
            for i in range(s, min(n, s + CHUNK))
        ]
        ds._sample_collection.insert_many(docs, ordered=False)
    ds.reload()
    sids = [str(i) for i in ids]
    centers = rng.normal(size=(len(classes) * 8, dim)).astype(np.float32)
    path = index_dir(str(ds._doc.id), "clip-synthetic")
    ix = EmbeddingIndex.create(path, dim, {"dataset_id": str(ds._doc.id), "model_key": "clip-synthetic"})
    for s in range(0, n, CHUNK):
        e = min(n, s + CHUNK)
        c = labels[s:e] * 8 + rng.integers(0, 8, size=e - s)
        ix.add(sids[s:e], centers[c] + rng.normal(scale=0.6, size=(e - s, dim)).astype(np.float32))
    ix.save()
    runs.record_run(
        ds, "nola_embeddings_clip", "embeddings.clip", {"spec": None}, {"index_path": str(path), "index_size": n}
    )
    return ds
