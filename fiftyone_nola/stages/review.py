"""Human review of auto-labels: what to look at, accept/reject, corrections in their own field.

Tags: ``nola:review`` (flagged for a look), ``nola:accepted``, ``nola:rejected``. A reviewer's
fixed label goes to ``corrections_field`` (default ``nola_reviewed``) and never overwrites the
model's field. Saved views give the reviewer one click to each worklist.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import numpy as np

from fiftyone_nola.core.errors import InvalidInputError
from fiftyone_nola.stages import fo_io

REVIEW_TAG = "nola:review"
ACCEPTED_TAG = "nola:accepted"
REJECTED_TAG = "nola:rejected"
CORRECTIONS_FIELD = "nola_reviewed"

VIEW_LOW_CONFIDENCE = "nola-low-confidence"
VIEW_DISAGREE = "nola-stages-disagree"
VIEW_LEAST_CONFIDENT = "nola-least-confident-per-class"


def _conf_label(samples, field: str):
    import fiftyone as fo

    fo_io.check_field(samples, field, (fo.Classification,))
    ids, labels, conf = samples.values(["id", f"{field}.label", f"{field}.confidence"])
    conf = np.array([np.nan if c is None else c for c in conf], dtype=np.float64)
    return list(ids), list(labels), conf


def flag_for_review(
    samples,
    field: str = "nola",
    threshold: Optional[float] = None,
    bottom_k_per_class: Optional[int] = None,
    tag: str = REVIEW_TAG,
    clear_existing: bool = True,
) -> dict:
    """Tag samples whose confidence is below ``threshold`` and/or the ``bottom_k_per_class``
    least confident of each predicted class (samples with no prediction are always flagged)."""
    if threshold is None and bottom_k_per_class is None:
        raise InvalidInputError("Give a confidence threshold, a bottom-k per class, or both")
    ids, labels, conf = _conf_label(samples, field)
    flag = np.isnan(conf)
    if threshold is not None:
        flag |= conf < float(threshold)
    if bottom_k_per_class:
        for lab in {lab for lab in labels if lab is not None}:
            rows = [i for i, x in enumerate(labels) if x == lab]
            rows.sort(key=lambda i: conf[i])
            flag[rows[: int(bottom_k_per_class)]] = True
    if clear_existing:
        samples.untag_samples(tag)
    flagged = [ids[i] for i in np.flatnonzero(flag)]
    fo_io.tag_samples(samples, flagged, tag)
    return {
        "field": field,
        "flagged": len(flagged),
        "samples": len(ids),
        "tag": tag,
        "threshold": threshold,
        "bottom_k_per_class": bottom_k_per_class,
    }


def class_table(samples, field: str = "nola", gt_field: Optional[str] = None) -> list[dict]:
    """Per class: count, mean / min confidence, flagged and accepted counts (and accuracy vs GT)."""
    ids, labels, conf = _conf_label(samples, field)
    tags = samples.values("tags")
    gt = samples.values(f"{gt_field}.label") if gt_field else None
    rows = []
    for lab in sorted({x for x in labels if x is not None}):
        idx = [i for i, x in enumerate(labels) if x == lab]
        c = conf[idx]
        row = {
            "class": lab,
            "count": len(idx),
            "mean_confidence": float(np.nanmean(c)),
            "min_confidence": float(np.nanmin(c)),
            "flagged": sum(REVIEW_TAG in tags[i] for i in idx),
            "accepted": sum(ACCEPTED_TAG in tags[i] for i in idx),
        }
        if gt is not None:
            known = [i for i in idx if gt[i] is not None]
            row["accuracy"] = float(np.mean([gt[i] == lab for i in known])) if known else None
        rows.append(row)
    return rows


def reliability_curve(confidence: np.ndarray, correct: np.ndarray, bins: int = 10) -> dict:
    """Calibration: per confidence bin, mean confidence vs accuracy; plus expected calibration error."""
    confidence = np.asarray(confidence, dtype=np.float64)
    correct = np.asarray(correct, dtype=np.float64)
    keep = np.isfinite(confidence)
    confidence, correct = confidence[keep], correct[keep]
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1]), 0, bins - 1)
    out = {"bin_lower": edges[:-1].tolist(), "count": [], "mean_confidence": [], "accuracy": []}
    ece = 0.0
    for b in range(bins):
        m = which == b
        n = int(m.sum())
        out["count"].append(n)
        out["mean_confidence"].append(float(confidence[m].mean()) if n else None)
        out["accuracy"].append(float(correct[m].mean()) if n else None)
        if n:
            ece += n / max(1, len(confidence)) * abs(confidence[m].mean() - correct[m].mean())
    out["ece"] = float(ece)
    return out


def calibration(samples, field: str, gt_field: str, bins: int = 10) -> dict:
    """Reliability curve of ``field`` against the ground truth in ``gt_field``."""
    if gt_field == field:
        raise InvalidInputError(f"'{gt_field}' is the predictions field itself: calibration needs ground truth")
    ids, labels, conf = _conf_label(samples, field)
    gt = samples.values(f"{gt_field}.label")
    has = np.array([g is not None and lab is not None for g, lab in zip(gt, labels)])
    correct = np.array([g == lab for g, lab in zip(gt, labels)])
    return reliability_curve(conf[has], correct[has], bins)


def save_review_views(
    dataset,
    field: str = "nola",
    threshold: float = 0.5,
    compare_fields: Sequence[str] = ("nola_zeroshot", "nola_dino", "nola"),
) -> list[str]:
    """Saved views: low confidence; stages disagree; per class, least confident first."""
    from fiftyone import ViewField as F

    ds = fo_io.root_dataset(dataset)
    made = []
    low = ds.exists(field).match(F(f"{field}.confidence") < threshold).sort_by(F(f"{field}.confidence"))
    ds.save_view(VIEW_LOW_CONFIDENCE, low, description=f"{field} confidence < {threshold}", overwrite=True)
    made.append(VIEW_LOW_CONFIDENCE)
    present = [f for f in compare_fields if ds.has_sample_field(f)]
    if len(present) >= 2:
        expr = None
        for a, b in zip(present, present[1:]):
            e = F(f"{a}.label") != F(f"{b}.label")
            expr = e if expr is None else (expr | e)
        ds.save_view(
            VIEW_DISAGREE,
            ds.match(expr),
            overwrite=True,
            description=f"samples where {', '.join(present)} do not all agree",
        )
        made.append(VIEW_DISAGREE)
    per_class = ds.exists(field).sort_by([(f"{field}.label", 1), (f"{field}.confidence", 1)])
    ds.save_view(
        VIEW_LEAST_CONFIDENT, per_class, overwrite=True, description=f"grouped by {field} label, least confident first"
    )
    made.append(VIEW_LEAST_CONFIDENT)
    return made


def disagreement_count(samples, fields: Sequence[str]) -> int:
    """How many samples get different labels from the given fields."""
    vals = [samples.values(f"{f}.label") for f in fields]
    return int(sum(len(set(v)) > 1 for v in zip(*vals)))


def set_status(samples, status: str) -> int:
    """Mark the given samples accepted or rejected (the other status tag is removed)."""
    if status not in ("accepted", "rejected"):
        raise InvalidInputError(f"status must be 'accepted' or 'rejected', not {status!r}")
    tag, other = (ACCEPTED_TAG, REJECTED_TAG) if status == "accepted" else (REJECTED_TAG, ACCEPTED_TAG)
    samples.untag_samples(other)
    samples.untag_samples(REVIEW_TAG)
    samples.tag_samples(tag)
    return len(samples)


def correct_label(
    samples, label: str, classes: Optional[Sequence[str]] = None, corrections_field: str = CORRECTIONS_FIELD
) -> int:
    """Store a reviewer's label for the given samples in ``corrections_field`` and accept them."""
    import fiftyone as fo

    if classes is not None and label not in classes:
        raise InvalidInputError(f"{label!r} is not one of the classes: {', '.join(classes)}")
    ids = samples.values("id")
    fo_io.root_dataset(samples).set_values(
        corrections_field, {i: fo.Classification(label=label, confidence=1.0) for i in ids}, key_field="id"
    )
    set_status(samples, "accepted")
    return len(ids)


def accept_above(samples, field: str, threshold: float) -> int:
    """Accept every not-rejected sample whose ``field`` confidence is at least ``threshold``."""
    from fiftyone import ViewField as F

    view = samples.exists(field).match(F(f"{field}.confidence") >= threshold).match_tags(REJECTED_TAG, bool=False)
    view.tag_samples(ACCEPTED_TAG)
    return len(view)


def final_label_view(samples, field: str, corrections_field: str = CORRECTIONS_FIELD):
    """Accepted samples; a reviewer's correction (when present) wins over the model's label."""
    return samples.match_tags(ACCEPTED_TAG).match_tags(REJECTED_TAG, bool=False), field, corrections_field
