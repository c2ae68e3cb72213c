"""The embedding stage on FiftyOne collections: compute once into FAISS stores, read anywhere.

Incremental and resumable: only samples that are new or whose file changed are embedded;
progress is checkpointed every ``chunk_size`` samples, so a killed job loses at most one chunk;
samples deleted from the dataset are dropped from the store.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Callable, Optional

import numpy as np

from . import fo_io, runs, storage
from .data import file_fingerprint
from .device import resolve_device
from .embed import EmbedConfig, iter_embeddings
from .errors import IndexMismatchError, InvalidInputError, MissingEmbeddingsError
from .index import EmbeddingIndex
from .models import ClipSpec, DinoSpec, load_model, spec_key
from .progress import ProgressFn, null_progress

FAMILIES = ("clip", "dino")


def embeddings_run_key(family: str) -> str:
    """Run key under which the embedding stage of ``family`` is recorded."""
    return f"nola_embeddings_{family}"


def index_path(samples, spec) -> str:
    """Where the FAISS store of ``spec`` for this dataset lives."""
    return str(storage.index_dir(fo_io.dataset_id(samples), spec_key(spec)))


def _specs(family: str, clip: Optional[ClipSpec], dino: Optional[DinoSpec]) -> list:
    if family not in ("clip", "dino", "both"):
        raise InvalidInputError(f"family must be 'clip', 'dino' or 'both', not {family!r}")
    out = []
    if family in ("clip", "both"):
        out.append(clip or ClipSpec())
    if family in ("dino", "both"):
        out.append(dino or DinoSpec())
    return out


def compute_embeddings(
    samples,
    family: str = "both",
    clip: Optional[ClipSpec] = None,
    dino: Optional[DinoSpec] = None,
    config: Optional[EmbedConfig] = None,
    overwrite: bool = False,
    progress: ProgressFn = null_progress,
    log: Callable[[str], None] = print,
) -> dict:
    """Embed the images of ``samples`` with CLIP and/or DINO into on-disk FAISS stores.

    Returns a summary per family: counts embedded / reused / failed, seconds, images/s and
    the store's path. Unreadable images are skipped, counted and tagged ``nola:unreadable``.
    """
    config = (config or EmbedConfig()).resolved()
    out = {}
    for spec in _specs(family, clip, dino):
        out[spec.family] = _embed_one(samples, spec, config, overwrite, progress, log)
    return out


def _embed_one(samples, spec, cfg: EmbedConfig, overwrite: bool, progress, log) -> dict:
    t0 = time.perf_counter()
    ds = fo_io.root_dataset(samples)
    ids, paths = fo_io.ids_and_paths(samples)
    model = load_model(spec, resolve_device(cfg.device))
    t_load = time.perf_counter() - t0
    meta = {
        "model_key": model.key,
        "model": model.identity,
        "preprocessing": cfg.preprocessing_tag(model),
        "dataset_id": fo_io.dataset_id(ds),
        "dataset_name": ds.name,
    }
    path = storage.index_dir(meta["dataset_id"], model.key)
    lock_holder = EmbeddingIndex.open_or_create(
        path, model.embed_dim, meta, expect_keys=("model_key", "dim", "preprocessing"),
        index_type=cfg.index_type, overwrite=overwrite,
    )
    with lock_holder.lock():
        # Re-read under the lock: another job may have saved since the first open.
        index = EmbeddingIndex.open_or_create(
            path, model.embed_dim, meta, expect_keys=("model_key", "dim", "preprocessing"),
            index_type=cfg.index_type,
        )
        live = set(ds.values("id"))
        stale = [i for i in index.ids if i not in live]
        if stale:
            index.remove(stale)
        fingerprints = [file_fingerprint(p) for p in paths]
        known = index.fingerprints
        todo = [j for j, (i, f) in enumerate(zip(ids, fingerprints)) if known.get(i) != f]
        log(
            f"[embed:{spec.family}] {model.key}: {len(ids)} samples, {len(ids) - len(todo)} up to "
            f"date, {len(todo)} to embed (batch {cfg.batch_size}, {cfg.num_workers} workers, "
            f"device {cfg.device}, {'draft' if cfg.draft_decode else 'exact'} JPEG decode)"
        )
        failures: list[tuple[str, str]] = []
        buf_ids: list[str] = []
        buf_vecs: list[np.ndarray] = []
        buf_fps: list[str] = []
        n_done = 0
        t_embed = time.perf_counter()
        todo_paths = [paths[j] for j in todo]
        for idx, vecs, bad in iter_embeddings(model, todo_paths, cfg, progress):
            for k, j in enumerate(idx):
                sid = ids[todo[j]]
                buf_ids.append(sid)
                buf_vecs.append(vecs[k])
                buf_fps.append(fingerprints[todo[j]])
            failures.extend((ids[todo[j]], reason) for j, reason in bad)
            if len(buf_ids) >= cfg.chunk_size:
                n_done += _flush(index, buf_ids, buf_vecs, buf_fps)
        n_done += _flush(index, buf_ids, buf_vecs, buf_fps)
        failed_ids = [sid for sid, _ in failures]
        if failed_ids:
            index.remove([i for i in failed_ids if i in set(index.ids)])
        index.save()
        t_embed = time.perf_counter() - t_embed
    embedded_ids = set(ids[j] for j in todo) - set(failed_ids)
    if embedded_ids:
        tagged = set(ds.match_tags(fo_io.UNREADABLE_TAG).values("id"))
        fixed = list(embedded_ids & tagged)
        if fixed:
            ds.select(fixed).untag_samples(fo_io.UNREADABLE_TAG)
    fo_io.tag_samples(ds, failed_ids, fo_io.UNREADABLE_TAG)
    for sid, reason in failures[:5]:
        log(f"[embed:{spec.family}] skipped {sid}: {reason}")
    summary = {
        "family": spec.family,
        "model_key": model.key,
        "random_init": bool(model.identity.get("random_init")),
        "samples": len(ids),
        "embedded": n_done,
        "reused": len(ids) - len(todo),
        "failed": len(failures),
        "failures": failures[:100],
        "index_path": str(path),
        "index_size": len(index),
        "seconds": time.perf_counter() - t0,
        "model_load_seconds": t_load,
        "images_per_s": (n_done / t_embed) if t_embed > 0 and n_done else 0.0,
    }
    runs.record_run(ds, embeddings_run_key(spec.family), f"embeddings.{spec.family}",
                    {"spec": spec, "embed": cfg, "model": model.identity}, summary)
    log(
        f"[embed:{spec.family}] embedded {n_done}, reused {summary['reused']}, failed "
        f"{len(failures)} in {summary['seconds']:.1f}s ({summary['images_per_s']:.1f} img/s); "
        f"index: {path}"
    )
    return summary


def _flush(index: EmbeddingIndex, ids: list, vecs: list, fps: list) -> int:
    n = len(ids)
    if n:
        index.add(list(ids), np.stack(vecs).astype(np.float32), list(fps))
        index.checkpoint()
        ids.clear()
        vecs.clear()
        fps.clear()
    return n


def open_index(samples, spec) -> EmbeddingIndex:
    """The stored index of ``spec`` for this dataset, or a clear error saying how to build it."""
    path = storage.index_dir(fo_io.dataset_id(samples), spec_key(spec))
    if not (path / "meta.json").exists():
        raise MissingEmbeddingsError(
            f"No {spec.family.upper()} embeddings for model {spec_key(spec)} on this dataset. "
            f"Run compute_embeddings(dataset, family={spec.family!r}) (or the compute_embeddings "
            f"operator) first."
        )
    return EmbeddingIndex.open(path, expect={"model_key": spec_key(spec)})


def load_embeddings(samples, spec, ids: Optional[Sequence[str]] = None) -> tuple[list[str], np.ndarray]:
    """``(ids, N×D float32)`` for ``ids`` (default: the collection's); NaN rows where missing."""
    if ids is None:
        ids, _ = fo_io.ids_and_paths(samples)
    index = open_index(samples, spec)
    vecs, found = index.get(list(ids))
    out = np.full((len(ids), index.dim), np.nan, dtype=np.float32)
    out[np.asarray(found, dtype=bool)] = vecs
    return list(ids), out


def check_coverage(ids: Sequence[str], vectors: np.ndarray, family: str, log=print) -> np.ndarray:
    """Boolean mask of rows that have an embedding; report the others, fail if none."""
    ok = np.all(np.isfinite(vectors), axis=1)
    missing = int((~ok).sum())
    if missing == len(ids):
        raise MissingEmbeddingsError(
            f"None of the {len(ids)} samples has a {family.upper()} embedding. Run compute_embeddings first."
        )
    if missing:
        log(f"[{family}] {missing} of {len(ids)} samples have no embedding (unreadable or not yet "
            f"embedded): skipped")
    return ok


__all__ = [
    "compute_embeddings", "open_index", "load_embeddings", "index_path", "check_coverage",
    "IndexMismatchError",
]
