"""Evaluation against a ground-truth field, when the user has one. Never used for training."""

from __future__ import annotations

from typing import Optional

import numpy as np

from fiftyone_nola.core import cdul as ml
from fiftyone_nola.core.errors import InvalidInputError
from fiftyone_nola.core.names import CORRECTIONS_FIELD
from fiftyone_nola.stages import fo_io, runs

EVALUATION_RUN = "nola_evaluation"  # the pipeline's evaluation: which labels and ground truth it scored


def _versions(samples, fields) -> dict:
    """When the stage that wrote each field last recorded its run (new labels: new version)."""
    return {
        f: ((runs.get_run(samples, runs.run_key_for(f)) or {}).get("results") or {}).get("recorded_at") for f in fields
    }


def evaluations_current(samples, fields, gt_field: str) -> tuple[bool, str]:
    """``(current, why)``: whether the pipeline's evaluation of ``fields`` against ``gt_field``
    scored the labels and ground truth as they are now."""
    run = runs.get_run(samples, EVALUATION_RUN)
    if run is None:
        return False, "not evaluated yet"
    config, results = run.get("config") or {}, run.get("results") or {}
    if config.get("gt_field") != gt_field or config.get("fields") != list(fields):
        return False, "other fields or ground truth than last time"
    if results.get("versions") != _versions(samples, fields):
        return False, "new labels since the last evaluation"
    if results.get("gt_labelled") != samples.count(f"{gt_field}.label"):
        return False, "the ground truth changed"
    return True, "same labels and ground truth"


def record_evaluation(samples, fields, gt_field: str, scores: dict) -> None:
    """Remember what the pipeline's evaluation scored, so an unchanged re-run reuses it."""
    runs.record_run(
        samples,
        EVALUATION_RUN,
        "evaluation",
        {"fields": list(fields), "gt_field": gt_field},
        {"versions": _versions(samples, fields), "gt_labelled": samples.count(f"{gt_field}.label"), "scores": scores},
    )


def recorded_evaluation(samples) -> dict:
    """The scores the pipeline's last evaluation recorded (what a reused evaluation reports)."""
    return ((runs.get_run(samples, EVALUATION_RUN) or {}).get("results") or {}).get("scores") or {}


def default_eval_key(pred_field: str, final_labels: bool = False) -> str:
    """The evaluation key of ``pred_field``'s predictions (or of its final labels)."""
    return f"eval_{runs.run_key_for(pred_field)}" + ("_final" if final_labels else "")


def free_eval_key(samples, pred_field: str, final_labels: bool = False) -> str:
    """``default_eval_key``, numbered ``_2``, ``_3``... past the evaluations the dataset holds."""
    base = default_eval_key(pred_field, final_labels)
    taken = set(fo_io.root_dataset(samples).list_evaluations())
    key, n = base, 1
    while key in taken:
        n += 1
        key = f"{base}_{n}"
    return key


def evaluate_single_label(
    samples,
    pred_field: str,
    gt_field: str,
    eval_key: Optional[str] = None,
    overwrite: bool = False,
    final_labels: bool = False,
) -> dict:
    """FiftyOne's ``evaluate_classifications`` (accuracy, per-class report, confusion matrix in the App).

    ``final_labels``: evaluate the labels an export writes (a reviewer's correction where there is
    one). An existing evaluation under ``eval_key`` is replaced only with ``overwrite``."""
    import fiftyone as fo

    if final_labels:
        pred_field = final_labels_field(samples, pred_field)
    fo_io.check_field(samples, pred_field, (fo.Classification,))
    fo_io.check_field(samples, gt_field, (fo.Classification,))
    if pred_field == gt_field:
        raise InvalidInputError(f"'{gt_field}' is the predicted field itself: choose a ground-truth field")
    view = samples.exists(pred_field).exists(gt_field)
    if len(view) == 0:
        raise InvalidInputError(f"No sample has both '{pred_field}' and '{gt_field}' to compare")
    eval_key = eval_key or default_eval_key(pred_field)
    ds = fo_io.root_dataset(samples)
    if eval_key in ds.list_evaluations():
        if not overwrite:
            raise InvalidInputError(
                f"An evaluation '{eval_key}' already exists: choose another key "
                f"(e.g. {free_eval_key(ds, pred_field)}), or replace it (overwrite)"
            )
        ds.delete_evaluation(eval_key)
    res = view.evaluate_classifications(pred_field, gt_field=gt_field, eval_key=eval_key)
    report = res.report()
    return {
        "pred_field": pred_field,
        "gt_field": gt_field,
        "eval_key": eval_key,
        "samples": len(view),
        "accuracy": float(res.metrics()["accuracy"]),
        "macro_f1": float(report.get("macro avg", {}).get("f1-score", float("nan"))),
        "per_class": {k: v for k, v in report.items() if isinstance(v, dict) and "avg" not in k},
    }


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
    """Reliability curve of ``field``'s confidences against the ground truth in ``gt_field``."""
    import fiftyone as fo

    if gt_field == field:
        raise InvalidInputError(f"'{gt_field}' is the predictions field itself: calibration needs ground truth")
    fo_io.check_field(samples, field, (fo.Classification,))
    labels, conf, gt = samples.values([f"{field}.label", f"{field}.confidence", f"{gt_field}.label"])
    has = np.array([g is not None and lab is not None and c is not None for g, lab, c in zip(gt, labels, conf)])
    correct = np.array([g == lab for g, lab in zip(gt, labels)])
    conf = np.array([np.nan if c is None else c for c in conf], dtype=np.float64)
    return reliability_curve(conf[has], correct[has], bins)


def final_labels_field(
    samples, pred_field: str, corrections_field: str = CORRECTIONS_FIELD, out_field: Optional[str] = None
) -> str:
    """A field holding each sample's final label: the reviewer's correction when there is one,
    else the model's prediction (what an export writes). Returns its name."""
    import fiftyone as fo

    fo_io.check_field(samples, pred_field, (fo.Classification,))
    ds = fo_io.root_dataset(samples)
    out_field = out_field or f"{pred_field}_final"
    ids, preds = samples.values(["id", pred_field])
    corr = samples.values(corrections_field) if ds.has_sample_field(corrections_field) else [None] * len(ids)
    ds.set_values(
        out_field,
        {
            i: (c if c is not None else p)
            for i, p, c in zip(ids, preds, corr)
            if (c if c is not None else p) is not None
        },
        key_field="id",
    )
    return out_field


def evaluate_multilabel(
    samples,
    pred_field: str,
    gt_field: str,
    classes: list,
    scores: Optional[np.ndarray] = None,
    ids: Optional[list] = None,
) -> dict:
    """mAP over classes (+ per-class AP) and precision/recall of the predicted label sets.

    ``scores`` (N×C aligned to ``ids``) ranks samples for AP; without it the confidences in
    ``pred_field`` are used (0 for classes not predicted).
    """

    if ids is None:
        ids, _ = fo_io.ids_and_paths(samples)
    gt_sets = fo_io.read_label_sets(samples, gt_field, ids)
    cidx = {c: i for i, c in enumerate(classes)}
    outside = sorted({lab for s in gt_sets if s for lab in s if lab not in cidx})
    has_gt = np.array([s is not None for s in gt_sets])
    y_true = np.zeros((len(ids), len(classes)), dtype=bool)
    for i, s in enumerate(gt_sets):
        for lab in s or ():
            if lab in cidx:
                y_true[i, cidx[lab]] = True
    pred_sets = fo_io.read_label_sets(samples, pred_field, ids)
    y_pred = np.zeros_like(y_true)
    for i, s in enumerate(pred_sets):
        for lab in s or ():
            if lab in cidx:
                y_pred[i, cidx[lab]] = True
    if scores is None:
        scores = _confidences(samples, pred_field, ids, classes)
    keep = has_gt & np.all(np.isfinite(scores), axis=1)
    ap = ml.average_precision_per_class(y_true[keep], scores[keep])
    pr = ml.precision_recall_at(y_true[keep], y_pred[keep])
    return {
        "pred_field": pred_field,
        "gt_field": gt_field,
        "samples": int(keep.sum()),
        "mAP": float(np.nanmean(ap)) if np.isfinite(ap).any() else float("nan"),
        **{k: v for k, v in pr.items() if k != "classes_evaluated"},
        "classes_with_positives_in_labels": pr.get("classes_evaluated"),
        "classes_evaluated": int(np.isfinite(ap).sum()),  # AP needs a positive: mAP's denominator
        "per_class_ap": {c: (None if not np.isfinite(a) else float(a)) for c, a in zip(classes, ap)},
        "labels_outside_class_list": outside,
    }


def _confidences(samples, field: str, ids: list, classes: list) -> np.ndarray:
    ds = fo_io.root_dataset(samples)
    view = ds.select(ids)
    sids, labels, confs = view.values(["id", f"{field}.classifications.label", f"{field}.classifications.confidence"])
    cidx = {c: i for i, c in enumerate(classes)}
    by_id = {}
    for sid, labs, cs in zip(sids, labels, confs):
        row = np.zeros(len(classes), dtype=np.float32)
        for lab, c in zip(labs or [], cs or []):
            if lab in cidx:
                row[cidx[lab]] = c if c is not None else 1.0
        by_id[sid] = row
    return np.stack([by_id.get(i, np.full(len(classes), np.nan, np.float32)) for i in ids])
