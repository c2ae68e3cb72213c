"""Brain runs on the stored vectors, so the App's similarity search and Embeddings panel work
as soon as it opens: a similarity run over the FAISS store (no re-embedding) and a 2-D
visualization computed from the same vectors.

The similarity run uses the ``faiss`` backend of :mod:`fiftyone_nola.stages.brain_backend`; the run
records its config class by name, so the App server loads it with no environment variable.
The visualization uses UMAP when ``umap-learn`` is installed, else t-SNE (scikit-learn) for up
to 5000 samples, else PCA.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Optional

import numpy as np

from fiftyone_nola.core.index import EmbeddingIndex
from fiftyone_nola.core.models import ClipSpec
from fiftyone_nola.core.storage import file_sha256
from fiftyone_nola.stages import fo_io, runs
from fiftyone_nola.stages.embeddings import embeddings_run_key

logger = logging.getLogger(__name__)

TSNE_MAX = 5000


def app_run_key(family: str = "clip") -> str:
    """Our record of the App runs registered on ``family``'s store (which store state they show)."""
    return f"nola_app_{family}"


def store_version(path) -> Optional[str]:
    """A fingerprint of a store's saved state (its meta.json names every file and row count)."""
    meta = Path(path) / "meta.json"
    return file_sha256(meta)[:16] if meta.is_file() else None


def app_runs_current(samples, family: str = "clip") -> tuple[bool, str]:
    """``(current, why)``: whether the similarity run and map of ``family`` show its store as it
    is (registered on this store version, and still there); no store: nothing to register."""
    path = stored_index_path(samples, family)
    if not path and runs.get_run(samples, embeddings_run_key(family)) is None:
        return False, "after the embeddings are stored"
    ds = fo_io.root_dataset(samples)
    record = (runs.get_run(ds, app_run_key(family)) or {}).get("config") or {}
    keys = [k for k in (record.get("similarity"), record.get("visualization")) if k]
    if not record or not keys or any(k not in ds.list_brain_runs() for k in keys):
        return False, "not registered yet"
    if record.get("store_version") != store_version(path) or record.get("index_path") != path:
        return False, "the store changed since"
    return True, "registered on the store as it is"


def similarity_key(family: str = "clip") -> str:
    return f"nola_{family}_sim"


def visualization_key(family: str = "clip") -> str:
    return f"nola_{family}_viz"


def visualization_method(n: int) -> str:
    """UMAP if installed (and enough points), t-SNE for small sets, PCA otherwise."""
    if n >= 20 and importlib.util.find_spec("umap") is not None:
        return "umap"
    if 50 <= n <= TSNE_MAX:
        return "tsne"
    return "pca"


def stored_index_path(samples, family: str = "clip") -> Optional[str]:
    """The FAISS store the embedding stage of ``family`` last wrote for this dataset."""
    run = runs.get_run(samples, embeddings_run_key(family))
    res = (run or {}).get("results") or {}
    return res.get("index_path")


def recorded_clip_spec(value) -> Optional[ClipSpec]:
    """The CLIP spec a run recorded (a dict or a repr string), or None."""
    fields = runs.recorded_fields(value, "ClipSpec")
    try:
        return ClipSpec(**fields) if fields is not None else None
    except TypeError:
        return None


def _spec(samples, family: str) -> Optional[ClipSpec]:
    """The CLIP whose text tower serves the App's text queries on ``family``'s similarity run."""
    if family != "clip":
        return None
    run = runs.get_run(samples, embeddings_run_key(family)) or {}
    return recorded_clip_spec((run.get("config") or {}).get("spec"))


def register_brain_runs(samples, family: str = "clip", visualization: bool = True) -> dict:
    """(Re)register the similarity run and the visualization of ``family``'s stored vectors.

    Returns ``{"similarity": key, "visualization": key, "method": ..., "samples": n}``; an
    absent store (embeddings not computed) returns ``{}``. Existing runs under the same keys
    are replaced, so they always describe the store as it is now.
    """
    import fiftyone.brain as fob

    from fiftyone_nola.stages.brain_backend import compute_faiss_similarity, register_faiss_backend

    path = stored_index_path(samples, family)
    if not path:
        return {}
    register_faiss_backend()
    ds = fo_io.root_dataset(samples)
    out = {}
    sim_key = similarity_key(family)
    if sim_key in ds.list_brain_runs():
        ds.delete_brain_run(sim_key)  # not owned: the store itself is kept
    compute_faiss_similarity(ds, path, sim_key, model=_spec(ds, family))
    out["similarity"] = sim_key
    if visualization:
        ix = EmbeddingIndex.open(path)
        ids = ds.values("id")
        vecs, found = ix.get(ids)
        kept = [i for i, f in zip(ids, found) if f]
        if len(kept) >= 2:
            method = visualization_method(len(kept))
            viz_key = visualization_key(family)
            if viz_key in ds.list_brain_runs():
                ds.delete_brain_run(viz_key)
            target = ds if len(kept) == len(ids) else ds.select(kept, ordered=True)
            # the map's own per-iteration log (57 lines for t-SNE) would drown the stage table
            kwargs = {} if method == "pca" else {"verbose": False}
            if method == "tsne":
                # t-SNE first reduces to 50 dims with PCA, which fails on vectors with fewer
                kwargs.update(perplexity=min(30.0, (len(kept) - 1) / 3), pca_dims=50 if ix.dim > 50 else None)
            fob.compute_visualization(
                target,
                embeddings=np.asarray(vecs, np.float32),
                brain_key=viz_key,
                method=method,
                num_dims=2,
                seed=51,
                progress=False,
                **kwargs,
            )
            out.update(visualization=viz_key, method=method)
        out["samples"] = len(kept)
    runs.record_run(ds, app_run_key(family), "app", {**out, "index_path": path, "store_version": store_version(path)})
    logger.info(
        f"[brain] {family}: similarity run '{sim_key}'"
        + (f", {out.get('method')} map '{out.get('visualization')}'" if out.get("visualization") else "")
        + " on the stored vectors"
    )
    return out
