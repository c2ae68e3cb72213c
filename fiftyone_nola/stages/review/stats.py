"""What the review panel shows, counted by the database in one pass: per class the samples, mean
confidence, flagged, reviewed and remaining; the confidence histogram split at the threshold; the
queue and decision counts. Nothing per sample is pulled into Python."""

from __future__ import annotations

from typing import Optional

import fiftyone.core.aggregations as foa

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

BINS = 20
_COUNTED_TAGS = {
    "flagged": FLAGGED_TAG,
    "queued": REVIEW_TAG,
    "accepted": ACCEPTED_TAG,
    "corrected": CORRECTED_TAG,
    "rejected": REJECTED_TAG,
    "suggested": SUGGESTED_TAG,
}


def _has(tag) -> dict:
    return {"$in": [tag, {"$ifNull": ["$tags", []]}]}


def _count_if(cond) -> dict:
    return {"$sum": {"$cond": [cond, 1, 0]}}


class ReviewCounts(foa.Aggregation):
    """One ``$group`` over (predicted label, confidence bin, below the threshold): counts of each
    review tag, of flagged-and-decided samples, and the confidence sums, per group. A FiftyOne
    aggregation, so it applies to any view and runs in the database."""

    def __init__(self, field: str = PREDICTIONS_FIELD, threshold: Optional[float] = None, bins: int = BINS):
        super().__init__(None)
        self._field, self._threshold, self._bins = field, threshold, int(bins)

    def _kwargs(self):
        return [["field", self._field], ["threshold", self._threshold], ["bins", self._bins]]

    def to_mongo(self, sample_collection, context=None):
        conf, label = f"${self._field}.confidence", f"${self._field}.label"
        has_conf = {"$isNumber": conf}
        below = {"$or": [{"$not": [has_conf]}, {"$eq": [{"$ifNull": [label, None]}, None]}]}
        if self._threshold is not None:
            below["$or"].append({"$lt": [conf, float(self._threshold)]})
        decided = {"$gt": [{"$size": {"$setIntersection": [{"$ifNull": ["$tags", []]}, list(DECIDED_TAGS)]}}, 0]}
        group = {
            "_id": {
                "l": {"$ifNull": [label, None]},
                "h": {
                    "$cond": [has_conf, {"$min": [self._bins - 1, {"$floor": {"$multiply": [conf, self._bins]}}]}, None]
                },
                "b": below,
            },
            "n": {"$sum": 1},
            "conf_sum": {"$sum": {"$cond": [has_conf, conf, 0]}},
            "conf_n": _count_if(has_conf),
            "reviewed": _count_if({"$and": [_has(FLAGGED_TAG), decided]}),
            "below_reviewed": _count_if({"$and": [below, decided]}),
            **{k: _count_if(_has(tag)) for k, tag in _COUNTED_TAGS.items()},
        }
        return [{"$group": group}, {"$group": {"_id": None, "rows": {"$push": "$$ROOT"}}}]

    def parse_result(self, d):
        return (d or {}).get("rows") or []

    def default_result(self):
        return []


def _class_rows(rows: list, classes: list) -> list[dict]:
    per: dict = {}
    for r in rows:
        c = per.setdefault(r["_id"]["l"], dict.fromkeys(("count", "conf_sum", "conf_n", "flagged", "reviewed"), 0))
        for k in c:
            c[k] += r["n" if k == "count" else k]
    names = list(classes) + sorted(k for k in per if k is not None and k not in classes)
    out = []
    for name in names:
        c = per.get(name) or dict.fromkeys(("count", "conf_sum", "conf_n", "flagged", "reviewed"), 0)
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
        h = r["_id"]["h"]
        if h is not None:
            (below if r["_id"]["b"] else above)[int(h)] += r["n"]
    edges = [round(i / bins, 4) for i in range(bins + 1)]
    return {
        "edges": edges,
        "below": below,
        "above": above,
        "centers": [round((i + 0.5) / bins, 4) for i in range(bins)],
    }


def summary(
    samples, field: str = PREDICTIONS_FIELD, threshold: Optional[float] = None, classes=None, bins: int = BINS
) -> dict:
    """Everything the panel shows about the review, from one aggregation.

    Flagged / reviewed / queue counts are the dataset's tags (what the last flagging did);
    ``would_flag`` and the histogram's split are by value at ``threshold`` (what it would flag).
    """
    rows = samples.aggregate(ReviewCounts(field, threshold, bins))
    total = {k: sum(r[k] for r in rows) for k in ("n", "reviewed", "below_reviewed", *_COUNTED_TAGS)}
    would = sum(r["n"] for r in rows if r["_id"]["b"])
    if classes is None:
        ds = fo_io.root_dataset(samples)
        classes = list(ds.default_classes or [])
    return {
        "samples": total["n"],
        "flagged": total["flagged"],
        "reviewed": total["reviewed"],
        "remaining": total["flagged"] - total["reviewed"],
        "queue": total["queued"],
        "decided": {k: total[k] for k in ("accepted", "corrected", "rejected")},
        "suggested": total["suggested"],
        "would_flag": would,
        "would_flag_reviewed": total["below_reviewed"],
        "threshold": threshold,
        "histogram": _histogram(rows, bins),
        "classes": _class_rows(rows, classes),
    }


def progress(samples) -> dict:
    """Decided / flagged and the queue length, from the tags index (no scan of the dataset)."""
    ds = fo_io.root_dataset(samples)
    flagged = ds.match_tags(FLAGGED_TAG)
    return {
        "flagged": flagged.count(),
        "reviewed": flagged.match_tags(list(DECIDED_TAGS)).count(),
        "queue": ds.match_tags(REVIEW_TAG).count(),
    }
