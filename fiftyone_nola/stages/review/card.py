"""One sample in the review's sample view (its labels per stage and its nearest neighbours), and
corrections propagated to similar samples as suggestions: never decisions, only queued.

The stored FAISS index is opened once per process and version (a 1,000,000-vector store takes
seconds to open); neighbours of a sample are remembered per store version, so the panel's
"suggest to N neighbours" count costs a search only for corrections made since."""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

from fiftyone_nola.core import review_queue as rq
from fiftyone_nola.core.errors import IndexMismatchError, MissingEmbeddingsError
from fiftyone_nola.core.index import EmbeddingIndex
from fiftyone_nola.core.names import (
    ACCEPTED_TAG,
    CORRECTED_TAG,
    CORRECTIONS_FIELD,
    DECIDED_TAGS,
    PREDICTIONS_FIELD,
    REJECTED_TAG,
    REVIEW_TAG,
    STAGE_FIELDS,
    SUGGESTED_FIELD,
    SUGGESTED_TAG,
)
from fiftyone_nola.core.progress import ProgressFn, null_progress
from fiftyone_nola.stages import fo_io
from fiftyone_nola.stages.brain_runs import stored_index_path

logger = logging.getLogger(__name__)

_NEIGHBOURS_KEPT = 100_000  # remembered neighbour lists (sample, k) per process


@functools.lru_cache(maxsize=2)
def _open(path: str, version: int) -> EmbeddingIndex:
    return EmbeddingIndex.open(path)


def open_store(samples) -> Optional[EmbeddingIndex]:
    """The dataset's stored CLIP index (else DINO), opened once per process and saved version."""
    for family in ("clip", "dino"):
        path = stored_index_path(samples, family)
        meta = Path(path) / "meta.json" if path else None
        if meta is None or not meta.is_file():
            continue
        try:
            return _open(str(path), meta.stat().st_mtime_ns)
        except (IndexMismatchError, MissingEmbeddingsError, OSError) as e:
            logger.info(f"[review] the {family} store at {path} does not open ({e}); trying the next")
    return None


def store_vectors(samples, ids: Sequence[str]):
    """``(vectors of the found ids, found mask)`` from the stored index, or ``(None, None)``."""
    ix = open_store(samples)
    return (None, None) if ix is None else ix.get(list(ids))


@functools.lru_cache(maxsize=_NEIGHBOURS_KEPT)
def _neighbours_of(path: str, version: int, sid: str, k: int) -> tuple:
    ix = _open(path, version)
    vecs, found = ix.get([sid])
    if not found.any():
        return ()
    scores, hits = ix.search(vecs, k + 1)
    return tuple((h, float(s)) for h, s in zip(hits[0], scores[0]) if h != sid)[:k]


def neighbours(samples, sample_ids: Sequence[str], k: int = 6) -> dict[str, list[tuple[str, float]]]:
    """Nearest neighbours (id, cosine similarity) of each sample in the stored index, itself excluded."""
    ix = open_store(samples)
    if ix is None:
        return {}
    version = (Path(ix.path) / "meta.json").stat().st_mtime_ns
    out = {}
    for sid in map(str, sample_ids):
        nb = _neighbours_of(str(ix.path), version, sid, int(k))
        if nb:
            out[sid] = list(nb)
    return out


def _status(tags: Sequence[str]) -> str:
    for tag, name in ((ACCEPTED_TAG, "accepted"), (CORRECTED_TAG, "corrected"), (REJECTED_TAG, "rejected")):
        if tag in tags:
            return name
    return "in queue" if REVIEW_TAG in tags else "not flagged"


def sample_card(samples, sample_id: str, field: str = PREDICTIONS_FIELD, k: int = 6) -> dict:
    """What the sample view shows for one sample: each stage's label and confidence, the
    reviewer's decision or correction, a suggestion, and the nearest neighbours' labels."""
    ds = fo_io.root_dataset(samples)
    sample = ds[sample_id]
    stages = []
    for f in (*STAGE_FIELDS, SUGGESTED_FIELD, CORRECTIONS_FIELD):
        lab = sample[f] if ds.has_sample_field(f) else None
        if lab is not None:
            conf = None if lab.confidence is None else round(float(lab.confidence), 3)
            stages.append({"field": f, "label": lab.label, "confidence": conf})
    nb = neighbours(ds, [sample_id], k).get(sample_id, [])
    nview = ds.select([n for n, _ in nb])
    labels = dict(zip(*nview.values(["id", f"{field}.label"]))) if nb and ds.has_sample_field(field) else {}
    paths = dict(zip(*nview.values(["id", "filepath"]))) if nb else {}
    tags = list(sample.tags)
    pred = sample[field] if ds.has_sample_field(field) else None
    sugg = sample[SUGGESTED_FIELD] if ds.has_sample_field(SUGGESTED_FIELD) else None
    return {
        "id": sample_id,
        "filepath": sample.filepath,
        "status": _status(tags),
        "tags": tags,
        "prediction": getattr(pred, "label", None),
        "suggestion": getattr(sugg, "label", None) if SUGGESTED_TAG in tags else None,
        "stages": stages,
        "neighbours": [
            {"id": n, "label": labels.get(n), "similarity": round(s, 3), "filepath": paths.get(n)} for n, s in nb
        ],
    }


def _corrections(ds, field: str, corrections_field: str) -> list[tuple[str, Optional[str], str]]:
    """(sample id, the model's label, the reviewer's) of every correction (tagged, so indexed)."""
    if not ds.has_sample_field(corrections_field):
        return []
    corr = ds.match_tags(CORRECTED_TAG)
    cids, wrong, right = corr.values(["id", f"{field}.label", f"{corrections_field}.label"])
    return [(i, w, r) for i, w, r in zip(cids, wrong, right) if r is not None and w != r]


def suggestions(
    samples,
    field: str = PREDICTIONS_FIELD,
    min_similarity: float = 0.9,
    k: int = 10,
    corrections_field: str = CORRECTIONS_FIELD,
    progress: ProgressFn = null_progress,
) -> tuple[list, dict]:
    """``(corrections, neighbour id -> suggestion)``: what propagating would suggest, writing nothing."""
    ds = fo_io.root_dataset(samples)
    corrections = _corrections(ds, field, corrections_field)
    if not corrections:
        return [], {}
    nb: dict = {}
    step = max(1, len(corrections) // 20)
    for j, (sid, _, _) in enumerate(corrections):
        nb.update(neighbours(ds, [sid], k))
        if j % step == 0 or j + 1 == len(corrections):
            progress(j + 1, len(corrections), "Searching the neighbours of corrections")
    cand = sorted({n for lst in nb.values() for n, _ in lst})
    paths = ["id", f"{field}.label", "tags"] + (
        [f"{SUGGESTED_FIELD}.label"] if ds.has_sample_field(SUGGESTED_FIELD) else []
    )
    got = ds.select(cand).values(paths) if cand else [[]] * len(paths)
    cid, cpred, ctags = got[:3]
    decided = {i for i, t in zip(cid, ctags) if any(d in (t or []) for d in DECIDED_TAGS)}
    sugg = rq.propagation_suggestions(corrections, nb, dict(zip(cid, cpred)), decided, float(min_similarity))
    if len(got) > 3:  # already carrying that very suggestion: nothing to do for them
        have = {i: lab for i, lab, t in zip(cid, got[3], ctags) if SUGGESTED_TAG in (t or [])}
        sugg = {i: s for i, s in sugg.items() if have.get(i) != s["label"]}
    return corrections, sugg
