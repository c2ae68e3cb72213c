"""The review workspace on a FiftyOne dataset: the class list, what a threshold flags, the
review queue, decisions on single samples, neighbours and correction suggestions.

Tags: ``nola:flagged`` marks what the last flagging selected (kept after review, so saved views
and progress always match it); ``nola:review`` is the queue: flagged (or suggested) and not yet
decided; ``nola:accepted`` / ``nola:rejected`` are decisions (see :mod:`fiftyone_nola.stages.review`).
Suggestions propagated from corrections go to ``nola_suggested`` and tag ``nola:suggested``;
they are never decisions. ``nola_queue_rank`` orders the queue (see
:func:`fiftyone_nola.core.review_queue.review_order`).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import fiftyone as fo
import numpy as np
from fiftyone import ViewField as F

from fiftyone_nola.core import review_queue as rq
from fiftyone_nola.core.errors import InvalidInputError
from fiftyone_nola.core.index import EmbeddingIndex
from fiftyone_nola.core.storage import dataset_dir, file_lock
from fiftyone_nola.stages import fo_io
from fiftyone_nola.stages.brain_runs import stored_index_path
from fiftyone_nola.stages.review import (
    ACCEPTED_TAG,
    CORRECTIONS_FIELD,
    REJECTED_TAG,
    REVIEW_TAG,
    correct_label,
    set_status,
)

logger = logging.getLogger(__name__)

FLAGGED_TAG = "nola:flagged"
SUGGESTED_TAG = "nola:suggested"
SUGGESTED_FIELD = "nola_suggested"
QUEUE_FIELD = "nola_queue_rank"
SETTINGS_KEY = "nola_review"

VIEW_FLAGGED = "nola-flagged"
VIEW_QUEUE = "nola-review-queue"
VIEW_FLAGGED_PER_CLASS = "nola-flagged-per-class"

STAGE_FIELDS = ("nola_zeroshot", "nola_dino", "nola")
CLUSTERS_MAX = 20


# ---------------------------------------------------------------------------- class list


def _review_lock(samples):
    return file_lock(dataset_dir(str(fo_io.root_dataset(samples)._doc.id)) / "review.lock")


def reload_dataset(samples) -> None:
    """Reload the dataset behind ``samples`` from the database, never while a review write runs.

    FiftyOne keeps one Dataset object per name and process, and the App runs each panel event
    in its own thread: a reload between a writer's steps left it holding references to saved
    views it had just replaced ('view_stages') or without a field it had just added."""
    with _review_lock(samples):
        fo_io.root_dataset(samples).reload()


RACE_RETRIES = 3


def _reload_race(e: Exception) -> bool:
    """Whether ``e`` is what a concurrent reload of the shared Dataset object looks like."""
    return not isinstance(e, ValueError) or "has no field" in str(e) or "no saved view" in str(e)


def _one_review_writer(fn):
    """Run ``fn(samples, ...)`` holding the dataset's review lock, from the database's state.
    Overlapping rewrites of the tags, queue and saved views corrupted the saved-view references."""

    @functools.wraps(fn)
    def locked(samples, *args, **kwargs):
        with _review_lock(samples):
            for attempt in range(RACE_RETRIES + 1):
                fo_io.root_dataset(samples).reload()
                try:
                    return fn(samples, *args, **kwargs)
                except (AttributeError, KeyError, ReferenceError, ValueError) as e:
                    # FiftyOne's own server reloads the shared Dataset object on App requests (no
                    # lock of ours can stop it); mid-reload, a field or saved view is briefly
                    # missing. Start again from the database's state: the writes are idempotent
                    # (tags, queue ranks and views are set, not added). Our input errors
                    # (InvalidInputError) are not caught here: they are not races.
                    if attempt == RACE_RETRIES or not _reload_race(e):
                        raise
                    logger.debug("review write retried after %r", e)

    return locked


def class_list(samples, field: str = "nola") -> list[str]:
    """The dataset's class list (``default_classes``), else the labels present in ``field``."""
    ds = fo_io.root_dataset(samples)
    if ds.default_classes:
        return list(ds.default_classes)
    if ds.has_sample_field(field):
        return sorted(x for x in ds.distinct(f"{field}.label") if x is not None)
    return []


def store_class_list(samples, classes: Sequence[str], corrections_field: str = CORRECTIONS_FIELD) -> None:
    """Keep the class list on the dataset: ``default_classes`` and a label schema making the
    App's editor for ``corrections_field`` a dropdown of exactly these classes."""
    ds = fo_io.root_dataset(samples)
    classes = list(classes)
    if list(ds.default_classes or []) != classes:
        ds.default_classes = classes
        ds.save()
    if not ds.has_sample_field(corrections_field):
        ds.add_sample_field(corrections_field, fo.EmbeddedDocumentField, embedded_doc_type=fo.Classification)
    schema = {"type": "classification", "component": "dropdown", "classes": classes}
    if hasattr(ds, "update_label_schema"):
        try:
            ds.update_label_schema(corrections_field, schema)
        except Exception:  # older FiftyOne without label schemas: default_classes is enough
            pass


def check_class(samples, label: str, field: str = "nola") -> str:
    classes = class_list(samples, field)
    if classes and label not in classes:
        raise InvalidInputError(f"{label!r} is not one of the dataset's classes: {', '.join(classes)}")
    return label


# ---------------------------------------------------------------------------- snapshot


@dataclass
class Snapshot:
    """One read of what the review needs, aligned by position."""

    ids: list
    labels: list
    conf: np.ndarray
    tags: list

    @property
    def reviewed(self) -> np.ndarray:
        return np.array([ACCEPTED_TAG in t or REJECTED_TAG in t for t in self.tags], dtype=bool)

    @property
    def flagged(self) -> np.ndarray:
        return np.array([FLAGGED_TAG in t for t in self.tags], dtype=bool)

    @property
    def queued(self) -> np.ndarray:
        return np.array([REVIEW_TAG in t for t in self.tags], dtype=bool)


def snapshot(samples, field: str = "nola") -> Snapshot:
    fo_io.check_field(samples, field, (fo.Classification,))
    ids, labels, conf, tags = samples.values(["id", f"{field}.label", f"{field}.confidence", "tags"])
    return Snapshot(list(ids), list(labels), rq.as_conf(conf), [list(t or []) for t in tags])


def settings(samples) -> dict:
    """The last flagging's settings stored on the dataset (field, threshold, bottom_k)."""
    ds = fo_io.root_dataset(samples)
    return dict((ds.info or {}).get(SETTINGS_KEY) or {})


# ---------------------------------------------------------------------------- flagging


def preview(
    samples, field: str = "nola", threshold: Optional[float] = 0.5, bottom_k: Optional[int] = None, bins: int = 20
) -> dict:
    """What a threshold would flag, without writing: count, histogram split at the threshold,
    per-class rows (reviewed / remaining as they would be)."""
    s = snapshot(samples, field)
    flag = rq.flag_mask(s.conf, s.labels, threshold, bottom_k)
    return {
        "samples": len(s.ids),
        "flagged": int(flag.sum()),
        "threshold": threshold,
        "reviewed": int((flag & s.reviewed).sum()),
        "remaining": int((flag & ~s.reviewed).sum()),
        "histogram": rq.histogram(s.conf, bins, threshold),
        "classes": rq.class_rows(s.labels, s.conf, flag, s.reviewed, class_list(samples, field)),
    }


def _clusters(samples, ids: list, n_groups: int) -> Optional[np.ndarray]:
    """Embedding clusters of ``ids`` from the stored CLIP vectors (None without a store)."""
    vecs, found = neighbour_index_vectors(samples, ids)
    if vecs is None or not found.any():
        return None
    k = int(np.clip(round(np.sqrt(found.sum() / 2)), 1, CLUSTERS_MAX))
    assign = np.full(len(ids), -1, dtype=int)
    assign[found] = rq.kmeans(vecs, k)
    return assign


def _set_tag(samples, ids_with: Sequence[str], tag: str, scope_ids: Sequence[str]) -> None:
    """Make ``tag`` present exactly on ``ids_with`` among ``scope_ids`` (only changed samples written)."""
    ds = fo_io.root_dataset(samples)
    have = set(ds.select(list(scope_ids)).match_tags(tag).values("id")) if scope_ids else set()
    want = set(ids_with)
    if have - want:
        ds.select(list(have - want)).untag_samples(tag)
    if want - have:
        fo_io.tag_samples(ds, list(want - have), tag)


def rank_queue(samples, field: str = "nola", clusters: bool = True) -> int:
    """Recompute ``nola_queue_rank`` for the queued samples; returns the queue length."""
    ds = fo_io.root_dataset(samples)
    q = ds.match_tags(REVIEW_TAG)
    ids, labels, conf = (
        q.values(["id", f"{field}.label", f"{field}.confidence"])
        if ds.has_sample_field(field)
        else (q.values("id"), [None] * len(q), [None] * len(q))
    )
    cl = _clusters(ds, list(ids), len(ids)) if clusters and ids else None
    order = rq.review_order(conf, labels, cl)
    ranks = {ids[j]: r for r, j in enumerate(order)}
    # One write over every sample (None outside the queue): no schema check that another App
    # event could invalidate in between.
    if ranks or ds.has_sample_field(QUEUE_FIELD):
        ds.set_values(QUEUE_FIELD, [ranks.get(i) for i in ds.values("id")])
    return len(ranks)


@_one_review_writer
def flag_samples(
    samples,
    field: str = "nola",
    threshold: Optional[float] = 0.5,
    bottom_k: Optional[int] = None,
    clusters: bool = True,
) -> dict:
    """Flag what the threshold / bottom-k select, queue those not yet decided, save the views.

    Re-flagging never re-queues a sample a reviewer already accepted or rejected; samples no
    longer flagged leave the queue (unless a correction suggestion put them there).
    """
    if threshold is None and not bottom_k:
        raise InvalidInputError("Give a confidence threshold, a bottom-k per class, or both")
    ds = fo_io.root_dataset(samples)
    s = snapshot(samples, field)
    flag = rq.flag_mask(s.conf, s.labels, threshold, bottom_k)
    flagged = [i for i, f in zip(s.ids, flag) if f]
    suggested = {i for i, t in zip(s.ids, s.tags) if SUGGESTED_TAG in t}
    queued = [i for i, f, r in zip(s.ids, flag, s.reviewed) if not r and (f or i in suggested)]
    _set_tag(ds, flagged, FLAGGED_TAG, s.ids)
    _set_tag(ds, queued, REVIEW_TAG, s.ids)
    info = dict(ds.info or {})
    info[SETTINGS_KEY] = {"field": field, "threshold": threshold, "bottom_k": bottom_k}
    ds.info = info
    ds.save()
    n_queue = rank_queue(ds, field, clusters)
    views = save_views(ds, field)
    return {
        "field": field,
        "threshold": threshold,
        "bottom_k": bottom_k,
        "samples": len(s.ids),
        "flagged": len(flagged),
        "reviewed": int((flag & s.reviewed).sum()),
        "queue": n_queue,
        "views": views,
    }


def _definition(view) -> list:
    return view._serialize(include_uuids=False)


def save_views(samples, field: str = "nola") -> list[str]:
    """Saved views matching the flagged set exactly: all flagged (least confident first), the
    queue (flagged or suggested, not yet decided, in queue order), flagged grouped per class."""
    ds = fo_io.root_dataset(samples)
    flagged = ds.match_tags(FLAGGED_TAG)
    views = {
        VIEW_FLAGGED: (
            flagged.sort_by(F(f"{field}.confidence")),
            "exactly the samples of the last flagging, least confident first",
        ),
        VIEW_QUEUE: (
            queue_view(ds),
            "flagged or suggested and not yet reviewed, in review order (shrinks as you review)",
        ),
        VIEW_FLAGGED_PER_CLASS: (
            flagged.sort_by([(f"{field}.label", 1), (f"{field}.confidence", 1)]),
            f"the flagged samples grouped by {field} label, least confident first",
        ),
    }
    for name, (view, description) in views.items():
        # The views select by tag, so one definition stays exact as tags change: rewrite only
        # when the definition differs (re-flagging from several App events never races on it).
        # (Compared without the stages' random UUIDs, which differ for every view object built.)
        if ds.has_saved_view(name) and _definition(ds.load_saved_view(name)) == _definition(view):
            continue
        try:
            ds.save_view(name, view, description=description, overwrite=True)
        except ValueError:
            if not ds.has_saved_view(name):
                raise
    return list(views)


def progress(samples) -> dict:
    """Review progress from the dataset itself: decided / flagged, and the queue length."""
    ds = fo_io.root_dataset(samples)
    flagged = ds.match_tags(FLAGGED_TAG)
    return {
        "flagged": len(flagged),
        "reviewed": len(flagged.match_tags([ACCEPTED_TAG, REJECTED_TAG])),
        "queue": len(ds.match_tags(REVIEW_TAG)),
    }


def queue_view(samples):
    """Flagged (or suggested) samples nobody decided yet, in review order."""
    ds = fo_io.root_dataset(samples)
    q = ds.match_tags(REVIEW_TAG)
    return q.sort_by(QUEUE_FIELD) if ds.has_sample_field(QUEUE_FIELD) else q


def queue_ids(samples, within=None) -> list[str]:
    """Ids of the queue in review order (optionally only those inside ``within``)."""
    q = queue_view(samples)
    ids = q.values("id")
    if within is not None and len(within) != len(fo_io.root_dataset(samples)):
        keep = set(within.values("id"))
        ids = [i for i in ids if i in keep]
    return ids


def next_in_queue(samples, after: Optional[str] = None, within=None) -> Optional[str]:
    """The queue's first sample other than ``after`` (the one just decided)."""
    for i in queue_ids(samples, within):
        if i != after:
            return i
    return None


# ---------------------------------------------------------------------------- decisions


@_one_review_writer
def decide(
    samples,
    sample_ids: Sequence[str],
    action: str,
    label: Optional[str] = None,
    field: str = "nola",
    corrections_field: str = CORRECTIONS_FIELD,
) -> dict:
    """Record a reviewer's decision on samples: ``accept`` (the model's label, or the
    suggestion when one is shown and accepted via ``label``), ``reject``, or ``correct`` to
    ``label`` from the class list. Picking the model's own label is an accept. Decided samples
    leave the queue and lose any suggestion tag."""
    ds = fo_io.root_dataset(samples)
    ids = [str(i) for i in sample_ids]
    if not ids:
        raise InvalidInputError("No samples to act on: select samples in the grid (or lasso them in the map) first")
    view = ds.select(ids)
    if action == "accept" and label is None:
        n = set_status(view, "accepted")
    elif action == "reject":
        n = set_status(view, "rejected")
    elif action in ("correct", "accept"):
        if not label:
            raise InvalidInputError("Choose the right class from the class list")
        check_class(ds, label, field)
        classes = class_list(ds, field) or None
        preds = dict(zip(*view.values(["id", f"{field}.label"]))) if ds.has_sample_field(field) else {}
        same = [i for i in ids if preds.get(i) == label]
        other = [i for i in ids if preds.get(i) != label]
        n = 0
        if same:
            n += set_status(ds.select(same), "accepted")
            if ds.has_sample_field(corrections_field):
                ds.select(same).set_field(corrections_field, None).save()
        if other:
            n += correct_label(ds.select(other), label, classes, corrections_field)
    else:
        raise InvalidInputError(f"action must be accept, reject or correct, not {action!r}")
    view.untag_samples(SUGGESTED_TAG)
    return {"action": action, "label": label, "samples": n, "queue": len(ds.match_tags(REVIEW_TAG))}


# ---------------------------------------------------------------------------- neighbours


def _open_store(samples):
    for family in ("clip", "dino"):
        path = stored_index_path(samples, family)
        if path:
            try:
                return EmbeddingIndex.open(path)
            except Exception:
                continue
    return None


def neighbour_index_vectors(samples, ids: Sequence[str]):
    """``(vectors of the found ids, found mask)`` from the stored index, or ``(None, None)``."""
    ix = _open_store(samples)
    if ix is None:
        return None, None
    return ix.get(list(ids))


def neighbours(samples, sample_ids: Sequence[str], k: int = 6, index=None) -> dict[str, list[tuple[str, float]]]:
    """Nearest neighbours (id, cosine similarity) of each sample in the stored index, itself excluded."""
    ix = index or _open_store(samples)
    if ix is None:
        return {}
    ids = [str(i) for i in sample_ids]
    vecs, found = ix.get(ids)
    if not found.any():
        return {}
    scores, hits = ix.search(vecs, k + 1)
    out = {}
    for sid, sc, hs in zip([i for i, f in zip(ids, found) if f], scores, hits):
        out[sid] = [(h, float(s)) for h, s in zip(hs, sc) if h != sid][:k]
    return out
