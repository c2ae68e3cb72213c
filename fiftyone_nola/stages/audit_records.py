"""What an audit keeps on the dataset, and reading it back.

A draw writes (all named here, never touched by the labeling stages, so they survive re-runs):

- tag ``nola:audit`` on each sample drawn for audit;
- ``nola_audit_pi`` (inclusion probability) and ``nola_audit_stratum`` (confidence stratum at
  the draw) on every sample of the pool the audit was drawn from: the pool is exactly the
  samples holding ``nola_audit_pi``;
- ``nola_audit_key`` (the uniform key that drew it) and ``nola_audit_label`` (the label shown for
  audit) on each drawn sample;
- the run ``nola_audit``: the design (seed, strata edges, probabilities), the field, the pool size.

With these, every estimate can be recomputed from the dataset alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import fiftyone as fo
import numpy as np

from fiftyone_nola.core.audit.designs import Design, queue_order
from fiftyone_nola.core.audit.estimators import AuditData
from fiftyone_nola.core.errors import InvalidInputError
from fiftyone_nola.core.names import ACCEPTED_TAG, CORRECTIONS_FIELD, DECIDED_TAGS, REJECTED_TAG
from fiftyone_nola.stages import fo_io, runs

AUDIT_TAG = "nola:audit"
PI_FIELD = "nola_audit_pi"
STRATUM_FIELD = "nola_audit_stratum"
KEY_FIELD = "nola_audit_key"
LABEL_FIELD = "nola_audit_label"
AUDIT_FIELDS = (PI_FIELD, STRATUM_FIELD, KEY_FIELD, LABEL_FIELD)
_FIELD_TYPES = {
    PI_FIELD: fo.FloatField,
    STRATUM_FIELD: fo.IntField,
    KEY_FIELD: fo.FloatField,
    LABEL_FIELD: fo.StringField,
}
RUN_KEY = "nola_audit"
NO_LABEL = "(no label)"


def decided(tags: Sequence[str]) -> bool:
    return any(t in tags for t in DECIDED_TAGS)


@dataclass
class Predictions:
    """Samples with their current prediction, tags and correction, aligned by position."""

    ids: list
    labels: list  # current predicted label (None: none)
    conf: np.ndarray  # current confidence (NaN: none)
    tags: list
    corrections: list  # reviewer's label (None: none)

    def decided(self) -> np.ndarray:
        return np.array([decided(t) for t in self.tags], dtype=bool)

    def model_right(self, shown: Optional[Sequence] = None) -> np.ndarray:
        """Per decided sample: was the model's label right? Accepted with no other correction =
        right; corrected to another class or rejected = wrong. ``shown``: the label the reviewer
        judged (default the current one)."""
        shown = self.labels if shown is None else shown
        out = np.zeros(len(self.ids), dtype=bool)
        for i, (t, lab, corr) in enumerate(zip(self.tags, shown, self.corrections)):
            if REJECTED_TAG in t or lab is None:
                continue
            truth = corr if corr is not None else (lab if ACCEPTED_TAG in t else None)
            out[i] = truth is not None and truth == self.labels[i]
        return out


def read_predictions(samples, field: str, corrections_field: str = CORRECTIONS_FIELD, extra=()) -> tuple:
    """``(Predictions, extra values...)`` of ``samples`` for a single-label ``field``."""
    import fiftyone as fo

    fo_io.check_field(samples, field, (fo.Classification,))
    ds = fo_io.root_dataset(samples)
    names = ["id", f"{field}.label", f"{field}.confidence", "tags"]
    has_corr = ds.has_sample_field(corrections_field)
    if has_corr:
        names.append(f"{corrections_field}.label")
    names += list(extra)
    values = samples.values(names)
    ids, labels, conf, tags = values[:4]
    corr = values[4] if has_corr else [None] * len(ids)
    preds = Predictions(
        list(ids),
        list(labels),
        np.array([np.nan if c is None else float(c) for c in conf], dtype=np.float64),
        [list(t or []) for t in tags],
        list(corr),
    )
    return (preds, *values[4 + has_corr :])


def pool_mask(preds: Predictions) -> np.ndarray:
    """Who an audit may draw: a prediction with a confidence, nobody's decision yet, readable."""
    return np.array(
        [
            lab is not None and np.isfinite(c) and not decided(t) and fo_io.UNREADABLE_TAG not in t
            for lab, c, t in zip(preds.labels, preds.conf, preds.tags)
        ],
        dtype=bool,
    )


def recorded(samples) -> Optional[dict]:
    """The current audit's run record (config: field, design, pool), or None."""
    run = runs.get_run(fo_io.root_dataset(samples), RUN_KEY)
    return (run or {}).get("config") or None


def require_audit(samples) -> dict:
    rec = recorded(samples)
    if not rec:
        raise InvalidInputError("This dataset has no audit yet: draw one first (audit --draw N)")
    return rec


def write_draw(samples, pool_ids: list, pi: np.ndarray, strata: np.ndarray, drawn: np.ndarray, u, labels) -> None:
    """Write the pool's and the drawn samples' audit fields, and the tag. The fields are declared
    first and written raw (``fo_io.set_by_id``): the App server reloading its Dataset object
    meanwhile made a new field vanish mid-write ('Dataset has no field nola_audit_pi')."""
    from bson import ObjectId

    ds = fo_io.root_dataset(samples)
    for f, kind in _FIELD_TYPES.items():
        if not ds.has_sample_field(f):
            ds.add_sample_field(f, kind)
    fo_io.set_by_id(ds, PI_FIELD, dict(zip(pool_ids, map(float, pi))))
    fo_io.set_by_id(ds, STRATUM_FIELD, dict(zip(pool_ids, map(int, strata))))
    ids = [pool_ids[i] for i in drawn]
    fo_io.set_by_id(ds, KEY_FIELD, dict(zip(ids, map(float, u))))
    fo_io.set_by_id(ds, LABEL_FIELD, dict(zip(ids, [labels[i] for i in drawn])))
    fo_io.update_where(ds, {"_id": {"$in": [ObjectId(i) for i in ids]}}, {"$addToSet": {"tags": AUDIT_TAG}})


def clear(samples) -> None:
    """Forget the current audit's records (its samples keep their review decisions; the fields
    stay declared, emptied)."""
    ds = fo_io.root_dataset(samples)
    fo_io.update_where(ds, {"tags": AUDIT_TAG}, {"$pull": {"tags": AUDIT_TAG}})
    for f in AUDIT_FIELDS:
        if ds.has_sample_field(f):
            fo_io.update_where(ds, {f: {"$exists": True}}, {"$unset": {f: ""}})
    runs.forget_run(ds, RUN_KEY)


@dataclass
class Recorded:
    """A real audit read back: the data the estimators take, and its bookkeeping."""

    data: AuditData
    design: Design
    preds: Predictions
    drawn: int
    audited: int  # drawn and decided
    counted: int  # decided, in queue order up to the first undecided one
    changed: int  # drawn samples whose prediction differs from the label shown for audit


def read_audit(samples, field: str, corrections_field: str = CORRECTIONS_FIELD) -> Recorded:
    """The pool, the drawn samples and their outcomes, as the audit's estimators take them.

    Outcomes judge the *current* prediction against what the reviewer decided: the shown label
    if accepted, the correction if corrected, wrong if rejected. A partial audit counts the
    decided samples in queue order up to the first undecided one: they are a Poisson sample of
    the keys reached (probabilities scaled by that point's key / pi)."""
    rec = require_audit(samples)
    design = Design.from_dict(rec["design"])
    pool = fo_io.root_dataset(samples).exists(PI_FIELD)
    preds, pi, strata, key, shown = read_predictions(
        pool, field, corrections_field, extra=(PI_FIELD, STRATUM_FIELD, KEY_FIELD, LABEL_FIELD)
    )
    pi = np.asarray(pi, dtype=np.float64)
    drawn = np.array([k is not None for k in key], dtype=bool)
    idx = np.flatnonzero(drawn)
    u = np.array([key[i] for i in idx], dtype=np.float64)
    order = idx[queue_order(u, pi[idx])]
    done = preds.decided()
    undecided = np.flatnonzero(~done[order])
    stop = undecided[0] if len(undecided) else len(order)
    counted = order[:stop]
    scale = 1.0 if stop == len(order) else float(key[order[stop]] / pi[order[stop]])
    right = preds.model_right(shown=[s if s is not None else lab for s, lab in zip(shown, preds.labels)])
    conf = np.nan_to_num(preds.conf, nan=0.0)  # a sample that lost its prediction: unsure
    data = AuditData(
        conf=conf,
        pi=pi * scale,
        stratum=np.asarray(strata, dtype=np.int64),
        unit=counted,
        u=np.array([key[i] for i in counted], dtype=np.float64),
        correct=right[counted],
        trial=np.zeros(len(counted), dtype=np.int64),
    )
    changed = sum(shown[i] != preds.labels[i] for i in idx)
    return Recorded(data, design, preds, len(idx), int(done[idx].sum()), len(counted), int(changed))


def labels_for_classes(labels: Sequence) -> np.ndarray:
    return np.array([NO_LABEL if lab is None else str(lab) for lab in labels], dtype=object)
