"""What the review panel shows, counted by the database in one pass: per class the samples, mean
confidence, flagged, reviewed and remaining; the confidence histogram split at the threshold; the
queue and decision counts; how many samples each stage labeled. Nothing per sample is pulled
into Python: the database groups samples by (label, confidence bin, below the threshold, tags),
a few hundred groups, and the review's tag logic runs on those."""

from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import fiftyone.core.aggregations as foa

from fiftyone_nola.core import cpu_isa
from fiftyone_nola.core.names import (
    ACCEPTED_TAG,
    CORRECTED_TAG,
    DECIDED_TAGS,
    FLAGGED_TAG,
    PREDICTIONS_FIELD,
    REJECTED_TAG,
    REVIEW_TAG,
    SUGGESTED_TAG,
)
from fiftyone_nola.stages import fo_io
from fiftyone_nola.stages.review._db import data_version

BINS = 20
_COUNTED_TAGS = {
    "flagged": FLAGGED_TAG,
    "queued": REVIEW_TAG,
    "accepted": ACCEPTED_TAG,
    "corrected": CORRECTED_TAG,
    "rejected": REJECTED_TAG,
    "suggested": SUGGESTED_TAG,
}
_CLASS_KEYS = ("count", "conf_sum", "conf_n", "flagged", "reviewed")


class ReviewCounts(foa.Aggregation):
    """Samples grouped by (predicted label, confidence bin, below ``threshold``, tags), with their
    count and confidence sum; with ``present``, how many have each of those fields. A FiftyOne
    aggregation: it applies to any view and runs in the database, one pass (the per-sample work
    is the grouping key alone: 2.5x faster than evaluating the tag logic per sample)."""

    def __init__(
        self,
        field: str = PREDICTIONS_FIELD,
        threshold: Optional[float] = None,
        bins: int = BINS,
        present: Sequence[str] = (),
    ):
        super().__init__(None)
        self._field, self._threshold, self._bins, self._present = field, threshold, int(bins), tuple(present)

    def _kwargs(self):
        return [
            ["field", self._field],
            ["threshold", self._threshold],
            ["bins", self._bins],
            ["present", self._present],
        ]

    def to_mongo(self, sample_collection, context=None):
        conf = f"${self._field}.confidence"
        key = {"l": f"${self._field}.label", "h": {"$floor": {"$multiply": [conf, self._bins]}}, "t": "$tags"}
        if self._threshold is not None:
            key["b"] = {"$lt": [conf, float(self._threshold)]}  # a missing confidence is below
        group = {"_id": key, "n": {"$sum": 1}, "conf_sum": {"$sum": conf}}
        for i, f in enumerate(self._present):
            group[f"p{i}"] = {"$sum": {"$cond": [{"$gt": [f"${f}", None]}, 1, 0]}}
        return [{"$group": group}, {"$group": {"_id": None, "rows": {"$push": "$$ROOT"}}}]

    def parse_result(self, d):
        return [_parse_row(r, self._bins, self._present) for r in (d or {}).get("rows") or []]

    def default_result(self):
        return []


def _parse_row(r: dict, bins: int, present: tuple) -> dict:
    """One group: its label, bin, whether below the threshold, count, confidence sum, the review
    counts its tags make, and how many of its samples have each ``present`` field."""
    key, tags = r["_id"], set(r["_id"].get("t") or [])
    label, h, n = key.get("l"), key.get("h"), r["n"]
    decided = bool(tags & set(DECIDED_TAGS))
    below = label is None or h is None or bool(key.get("b"))
    return {
        "label": label,
        "bin": None if h is None else min(int(h), bins - 1),
        "below": below,
        "n": n,
        "conf_sum": r["conf_sum"],
        "conf_n": 0 if h is None else n,
        "reviewed": n if FLAGGED_TAG in tags and decided else 0,
        "below_reviewed": n if below and decided else 0,
        "present": {f: r.get(f"p{i}", 0) for i, f in enumerate(present)},
        **{name: (n if tag in tags else 0) for name, tag in _COUNTED_TAGS.items()},
    }


def _class_rows(rows: list, classes: list) -> list[dict]:
    per: dict = {}
    for r in rows:
        c = per.setdefault(r["label"], dict.fromkeys(_CLASS_KEYS, 0))
        for k in _CLASS_KEYS:
            c[k] += r["n" if k == "count" else k]
    names = list(classes) + sorted(k for k in per if k is not None and k not in classes)
    out = []
    for name in names:
        c = per.get(name) or dict.fromkeys(_CLASS_KEYS, 0)
        out.append(
            {
                "class": name,
                "count": c["count"],
                "mean_confidence": round(c["conf_sum"] / c["conf_n"], 3) if c["conf_n"] else None,
                "flagged": c["flagged"],
                "reviewed": c["reviewed"],
                "remaining": c["flagged"] - c["reviewed"],
            }
        )
    return out


def _histogram(rows: list, bins: int) -> dict:
    below, above = [0] * bins, [0] * bins
    for r in rows:
        if r["bin"] is not None:
            (below if r["below"] else above)[r["bin"]] += r["n"]
    edges = [round(i / bins, 4) for i in range(bins + 1)]
    return {
        "edges": edges,
        "below": below,
        "above": above,
        "centers": [round((i + 0.5) / bins, 4) for i in range(bins)],
    }


SPLIT_FROM = 200_000  # samples: a dataset this large is counted in parallel parts


def _parts() -> int:
    cpus = cpu_isa.usable_cores()
    return max(1, min(cpus, 4))


def parts_for(samples) -> int:
    """In how many parts, one per core, the database is asked to count or write at once: the
    database runs one statement on one core (2.0 s to count 10^6 samples); 1 below
    :data:`SPLIT_FROM` samples."""
    n = fo_io.root_dataset(samples)._sample_collection.estimated_document_count()
    return _parts() if n >= SPLIT_FROM else 1


def at_once(fn, items: Sequence) -> list:
    """``fn`` over ``items``, in a thread each when there are several (each waits on the database)."""
    if len(items) <= 1:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(len(items)) as pool:
        return list(pool.map(fn, items))


def _grouped(samples, agg: ReviewCounts, parts: Optional[int] = None) -> list[dict]:
    """The aggregation's groups. On a large dataset, ranges of ``_id`` are counted at once, one
    per core; every consumer sums the groups, so a key found in two ranges may appear twice."""
    ds = fo_io.root_dataset(samples)
    coll = ds._sample_collection
    n = coll.estimated_document_count()
    parts = parts or parts_for(ds)
    if parts <= 1 or n < parts:
        return samples.aggregate(agg)
    cuts = []
    for i in range(1, parts):
        doc = next(coll.find({}, {"_id": 1}).sort("_id", 1).skip(i * n // parts).limit(1), None)
        if doc is not None:
            cuts.append(doc["_id"])
    bounds = [None, *cuts, None]
    views = []
    for lo, hi in zip(bounds, bounds[1:]):
        rng = {k: v for k, v in (("$gte", lo), ("$lt", hi)) if v is not None}
        views.append(samples.match({"_id": rng}) if rng else samples)
    return [row for rows in at_once(lambda v: v.aggregate(agg), views) for row in rows]


def summary(
    samples,
    field: str = PREDICTIONS_FIELD,
    threshold: Optional[float] = None,
    classes=None,
    bins: int = BINS,
    present: Sequence[str] = (),
    version=None,
) -> dict:
    """Everything the panel shows about the review, from one aggregation.

    Flagged / reviewed / queue counts are the dataset's tags (what the last flagging did);
    ``would_flag`` and the histogram's split are by value at ``threshold`` (what it would flag);
    ``present``: fields whose labeled samples are counted too (the stage table's). With the
    dataset's :func:`~fiftyone_nola.stages.review.data_version`, its groups are kept for the next
    threshold move (:class:`MoveCount`).
    """
    kept = version is not None and samples is fo_io.root_dataset(samples)
    key = _key(samples, field, threshold, bins, present) if kept else None
    rows = _kept(key, version) if kept else None
    if rows is None:
        rows = _grouped(samples, ReviewCounts(field, threshold, bins, present))
        if kept:
            _keep(key, version, rows)
    return _summary_of(rows, samples, threshold, classes, bins, present)


def _summary_of(rows: list, samples, threshold, classes, bins: int, present: Sequence[str]) -> dict:
    total = {k: sum(r[k] for r in rows) for k in ("n", "reviewed", "below_reviewed", *_COUNTED_TAGS)}
    if classes is None:
        classes = list(fo_io.root_dataset(samples).default_classes or [])
    return {
        "samples": total["n"],
        "flagged": total["flagged"],
        "reviewed": total["reviewed"],
        "remaining": total["flagged"] - total["reviewed"],
        "queue": total["queued"],
        "decided": {k: total[k] for k in ("accepted", "corrected", "rejected")},
        "suggested": total["suggested"],
        "would_flag": sum(r["n"] for r in rows if r["below"]),
        "would_flag_reviewed": total["below_reviewed"],
        "threshold": threshold,
        "histogram": _histogram(rows, bins),
        "classes": _class_rows(rows, classes),
        "present": {f: sum(r["present"][f] for r in rows) for f in present},
    }


# ---------------------------------------------------------------------------- kept counts
# A count of the dataset is kept under its data version; a threshold move or a decision updates
# it by the samples it writes, so the panel counts the dataset once, not after every action.

_KEPT: OrderedDict = OrderedDict()  # (dataset, field, threshold, bins, present) -> (data version, groups)
KEPT_MAX = 8
_KEPT_LOCK = threading.Lock()  # the App server counts in a thread per event
_SUMMED = ("n", "conf_sum", "conf_n", "reviewed", "below_reviewed", *_COUNTED_TAGS)


def _key(ds, field: str, threshold, bins: int, present: Sequence[str]) -> tuple:
    return (ds.name, field, None if threshold is None else float(threshold), int(bins), tuple(present))


def _agg(key: tuple) -> ReviewCounts:
    """The aggregation whose groups are kept under ``key``."""
    return ReviewCounts(*key[1:])


def _keep(key: tuple, version, rows: list) -> None:
    with _KEPT_LOCK:
        _KEPT[key] = (version, rows)
        _KEPT.move_to_end(key)
        while len(_KEPT) > KEPT_MAX:
            _KEPT.popitem(last=False)


def _kept(key: tuple, version) -> Optional[list]:
    with _KEPT_LOCK:
        kept = _KEPT.get(key)
    return kept[1] if kept is not None and kept[0] == version else None


def _combined(plus: list, minus: list = ()) -> list:
    """``plus`` less ``minus``, one group per (label, bin, below): every consumer of the groups
    sums them, at most per label or per (bin, below)."""
    out: dict = {}
    for rows, sign in ((plus, 1), (minus, -1)):
        for r in rows:
            key = (r["label"], r["bin"], r["below"])
            c = out.setdefault(key, {"label": r["label"], "bin": r["bin"], "below": r["below"], "present": {}})
            for k in _SUMMED:
                c[k] = c.get(k, 0) + sign * r[k]
            for f, v in r["present"].items():
                c["present"][f] = c["present"].get(f, 0) + sign * v
    return [c for c in out.values() if c["n"]]


@contextlib.contextmanager
def counts_follow(ds, ids: Sequence[str]):
    """Around a write to the samples ``ids`` of the dataset ``ds`` (and to nothing else that is
    counted): the counts kept for its data version now are updated by those samples' groups
    before and after it, and kept under the version it leaves (a decision counts its samples,
    not the dataset: the panel's count after one was 0.16-0.26 s at 100,000 samples)."""
    version = data_version(ds)
    with _KEPT_LOCK:
        entries = [(k, v[1]) for k, v in _KEPT.items() if k[0] == ds.name and v[0] == version]
    view = ds.select(list(ids))
    before = [view.aggregate(_agg(k)) for k, _ in entries]
    yield
    if entries:
        now = data_version(ds)
        for (k, rows), old in zip(entries, before):
            _keep(k, now, _combined(rows + view.aggregate(_agg(k)), old))


def band_parts(field: str, t0: float, t1: float, parts: int) -> list[dict]:
    """Filters of the samples whose ``field`` confidence lies between ``t0`` and ``t1``, in
    ``parts`` consecutive ranges of it (each read from the confidence index)."""
    lo, hi = min(t0, t1), max(t0, t1)
    edges = [lo, *(lo + (hi - lo) * i / parts for i in range(1, parts)), hi]
    return [{f"{field}.confidence": {"$gte": a, "$lt": b}} for a, b in zip(edges, edges[1:])]


class MoveCount:
    """The counts after a threshold move from ``t0`` to ``t1``, from those kept at ``t0``: only the
    samples whose confidence lies between the two are counted, before and after the move's
    writes (at 10^6 samples a full count is ~1.2 s, most of a narrow move). Used when the move
    writes nothing outside that band, on the dataset as it was counted (its data version now);
    otherwise everything is counted again. ``bands``: the band's parts, counted at once."""

    def __init__(self, ds, field: str, t0: float, t1: float, present: Sequence[str], bands: list):
        self._ds, self._field, self._t1, self._present = ds, field, float(t1), tuple(present)
        self._rows = _kept(_key(ds, field, t0, BINS, present), data_version(ds))
        self._bands = [ds.match(b) for b in bands]
        self._before = None if self._rows is None else self._count(t0)

    def _count(self, t: float) -> list:
        agg = _agg(_key(self._ds, self._field, t, BINS, self._present))
        return [r for rows in at_once(lambda v: v.aggregate(agg), self._bands) for r in rows]

    def summary(self, version) -> dict:
        """The summary at ``t1`` once the move's writes are done (``version``: the data version
        they left, under which its groups are kept for the next move)."""
        ds, field, t1, present = self._ds, self._field, self._t1, self._present
        if self._rows is None:
            return summary(ds, field, t1, present=present, version=version)
        rows = _combined(self._rows + self._count(t1), self._before)
        _keep(_key(ds, field, t1, BINS, present), version, rows)
        return _summary_of(rows, ds, t1, None, BINS, present)


def progress(samples) -> dict:
    """Decided / flagged and the queue length, from the tags index (no scan of the dataset)."""
    ds = fo_io.root_dataset(samples)
    flagged = ds.match_tags(FLAGGED_TAG)
    return {
        "flagged": flagged.count(),
        "reviewed": flagged.match_tags(list(DECIDED_TAGS)).count(),
        "queue": ds.match_tags(REVIEW_TAG).count(),
    }
