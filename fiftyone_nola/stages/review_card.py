"""One sample in the review's sample view (its labels, confidences and nearest neighbours), and
correction suggestions propagated to similar samples: never decisions, only tagged for review."""

from __future__ import annotations

import fiftyone as fo

from fiftyone_nola.core import review_queue as rq
from fiftyone_nola.stages import fo_io
from fiftyone_nola.stages.review import ACCEPTED_TAG, CORRECTIONS_FIELD, REJECTED_TAG, REVIEW_TAG
from fiftyone_nola.stages.review_workspace import (
    STAGE_FIELDS,
    SUGGESTED_FIELD,
    SUGGESTED_TAG,
    _one_review_writer,
    neighbours,
    rank_queue,
    save_views,
)


def sample_card(samples, sample_id: str, field: str = "nola", k: int = 6) -> dict:
    """What the sample view shows for one sample: each stage's label and confidence, the
    reviewer's decision or correction, a suggestion, and the nearest neighbours' labels."""
    ds = fo_io.root_dataset(samples)
    sample = ds[sample_id]
    stages = []
    for f in (*STAGE_FIELDS, SUGGESTED_FIELD, CORRECTIONS_FIELD):
        if ds.has_sample_field(f) and sample[f] is not None:
            lab = sample[f]
            stages.append(
                {
                    "field": f,
                    "label": lab.label,
                    "confidence": None if lab.confidence is None else round(float(lab.confidence), 3),
                }
            )
    nb = neighbours(ds, [sample_id], k).get(sample_id, [])
    nview = ds.select([n for n, _ in nb])
    labels = dict(zip(*nview.values(["id", f"{field}.label"]))) if nb and ds.has_sample_field(field) else {}
    paths = dict(zip(*nview.values(["id", "filepath"]))) if nb else {}
    tags = list(sample.tags)
    status = (
        "accepted"
        if ACCEPTED_TAG in tags
        else "rejected"
        if REJECTED_TAG in tags
        else "in queue"
        if REVIEW_TAG in tags
        else "not flagged"
    )
    pred = sample[field] if ds.has_sample_field(field) else None
    sugg = sample[SUGGESTED_FIELD] if ds.has_sample_field(SUGGESTED_FIELD) else None
    return {
        "id": sample_id,
        "filepath": sample.filepath,
        "status": status,
        "prediction": getattr(pred, "label", None),
        "suggestion": getattr(sugg, "label", None) if SUGGESTED_TAG in tags else None,
        "stages": stages,
        "neighbours": [
            {"id": n, "label": labels.get(n), "similarity": round(s, 3), "filepath": paths.get(n)} for n, s in nb
        ],
    }


@_one_review_writer
def propagate_corrections(
    samples,
    field: str = "nola",
    min_similarity: float = 0.9,
    k: int = 10,
    corrections_field: str = CORRECTIONS_FIELD,
    apply: bool = True,
) -> dict:
    """Offer each correction to the corrected sample's nearest undecided neighbours that carry
    the same wrong label: their ``nola_suggested`` gets the reviewer's label (confidence = the
    similarity), they are tagged ``nola:suggested`` and put in the review queue. Nothing is
    accepted. With ``apply=False`` only counts what would be touched."""
    ds = fo_io.root_dataset(samples)
    if not ds.has_sample_field(corrections_field):
        return {"corrections": 0, "suggested": 0, "by_label": {}, "ids": []}
    corr = ds.exists(corrections_field)
    cids, wrong, right = corr.values(["id", f"{field}.label", f"{corrections_field}.label"])
    corrections = [(i, w, r) for i, w, r in zip(cids, wrong, right) if w != r]
    if not corrections:
        return {"corrections": 0, "suggested": 0, "by_label": {}, "ids": []}
    nb = neighbours(ds, [c[0] for c in corrections], k)
    cand = {n for lst in nb.values() for n, _ in lst}
    cview = ds.select(list(cand))
    cid, cpred, ctags = cview.values(["id", f"{field}.label", "tags"])
    predicted = dict(zip(cid, cpred))
    reviewed = {i for i, t in zip(cid, ctags) if ACCEPTED_TAG in t or REJECTED_TAG in t}
    sugg = rq.propagation_suggestions(corrections, nb, predicted, reviewed, float(min_similarity))
    by_label: dict = {}
    for s in sugg.values():
        by_label[s["label"]] = by_label.get(s["label"], 0) + 1
    if apply and sugg:
        ds.set_values(
            SUGGESTED_FIELD,
            {i: fo.Classification(label=s["label"], confidence=s["similarity"]) for i, s in sugg.items()},
            key_field="id",
        )
        fo_io.tag_samples(ds, list(sugg), SUGGESTED_TAG)
        fo_io.tag_samples(ds, list(sugg), REVIEW_TAG)
        rank_queue(ds, field)
        save_views(ds, field)
    return {
        "corrections": len(corrections),
        "suggested": len(sugg),
        "by_label": by_label,
        "ids": sorted(sugg),
        "min_similarity": float(min_similarity),
        "applied": bool(apply),
    }
