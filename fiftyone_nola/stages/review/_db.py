"""What every review write shares: one writer per dataset, started from the database's state, and
the indexes the workspace filters and sorts on, so an action costs what it changes."""

from __future__ import annotations

import functools
import logging

import fiftyone as fo

from fiftyone_nola.core.names import ACCEPTED_TAG, CORRECTED_TAG, CORRECTIONS_FIELD, QUEUE_FIELD
from fiftyone_nola.stages import fo_io
from fiftyone_nola.stages.fo_io import review_lock

logger = logging.getLogger(__name__)

RACE_RETRIES = 3
TAGS_VERSION_KEY = "nola_review_tags"  # 2: corrections carry their own tag


def reload_dataset(samples) -> None:
    """Re-read the dataset's document, never while a review write runs.

    FiftyOne keeps one Dataset object per name and process, and the App runs each panel event
    in its own thread: a reload between a writer's steps left it holding references to saved
    views it had just replaced ('view_stages') or without a field it had just added."""
    with review_lock(samples):
        fo_io.reload_document(samples)


def data_version(samples) -> tuple:
    """A value that changes whenever what the review shows may have: the dataset document's
    modification time (settings, runs, fields), the newest sample modification (every write,
    FiftyOne's and ours, stamps ``last_modified_at``) and the sample count (a deletion stamps
    nothing). One read of FiftyOne's ``last_modified_at`` index and the collection's metadata:
    the same cost at any size. Call after :func:`reload_dataset`, or after this process's own
    writes (the document's time is read to the millisecond, as the database stores it)."""
    ds = fo_io.root_dataset(samples)
    coll = ds._sample_collection
    newest = next(iter(coll.find({}, {"_id": 0, "last_modified_at": 1}).sort("last_modified_at", -1).limit(1)), {})
    doc_time = ds.last_modified_at
    if doc_time is not None:
        doc_time = doc_time.replace(microsecond=doc_time.microsecond // 1000 * 1000)
    return (ds.name, doc_time, newest.get("last_modified_at"), coll.estimated_document_count())


def _reload_race(e: Exception) -> bool:
    """Whether ``e`` is what a concurrent reload of the shared Dataset object looks like."""
    return not isinstance(e, ValueError) or any(m in str(e) for m in ("has no field", "no saved view", "no run key"))


def one_review_writer(fn):
    """Run ``fn(samples, ...)`` holding the dataset's review lock, from the database's state.
    Overlapping rewrites of the tags, queue and saved views corrupted the saved-view references."""

    @functools.wraps(fn)
    def locked(samples, *args, **kwargs):
        with review_lock(samples):
            for attempt in range(RACE_RETRIES + 1):
                fo_io.reload_document(samples)
                try:
                    _tag_corrections_apart(samples)
                    return fn(samples, *args, **kwargs)
                except (AttributeError, KeyError, ReferenceError, ValueError) as e:
                    # FiftyOne's own server reloads the shared Dataset object on App requests (no
                    # lock of ours can stop it); mid-reload, a field or saved view is briefly
                    # missing. Start again from the database's state: the writes are idempotent
                    # (tags, queue priorities and views are set, not added). Our input errors
                    # (InvalidInputError) are not caught here: they are not races.
                    if attempt == RACE_RETRIES or not _reload_race(e):
                        raise
                    logger.debug("review write retried after %r", e)

    return locked


def _tag_corrections_apart(samples) -> None:
    """Datasets reviewed before 0.3 tagged a correction ``nola:accepted`` like an accept; give
    those (accepted with a stored correction) the correction's own tag, once per dataset."""
    ds = fo_io.root_dataset(samples)
    info = dict(ds.info or {})
    if info.get(TAGS_VERSION_KEY) == 2:
        return
    if ds.has_sample_field(CORRECTIONS_FIELD):
        ids = ds.match_tags(ACCEPTED_TAG).match({f"{CORRECTIONS_FIELD}.label": {"$ne": None}}).values("id")
        if ids:
            ds.select(ids).untag_samples(ACCEPTED_TAG)
            ds.select(ids).tag_samples(CORRECTED_TAG)
            logger.info(f"[review] {len(ids)} earlier corrections now tagged {CORRECTED_TAG}")
    info[TAGS_VERSION_KEY] = 2
    ds.info = info
    ds.save()


def _index_specs(field: str) -> list:
    conf, label = f"{field}.confidence", f"{field}.label"
    return [
        [(conf, 1)],  # threshold ranges, least confident first
        [(label, 1), (conf, 1)],  # per class: counts, bottom-k
        [("tags", 1)],  # flagged / queue / decisions
        [(QUEUE_FIELD, -1), (conf, 1)],  # the queue in review order, with no sort in memory
    ]


def ensure_review_schema(samples, field: str) -> None:
    """The queue field and the workspace's indexes on ``field``; created once, checked cheaply."""
    ds = fo_io.root_dataset(samples)
    if not ds.has_sample_field(QUEUE_FIELD):
        ds.add_sample_field(QUEUE_FIELD, fo.IntField)
    have = set(ds.list_indexes())
    for spec in _index_specs(field):
        # FiftyOne lists a one-field index by its path, a compound one by MongoDB's name
        name = spec[0][0] if len(spec) == 1 else "_".join(f"{k}_{d}" for k, d in spec)
        if name not in have:
            logger.info(f"[review] indexing {name} (once per dataset)")
            ds.create_index(spec)
