"""Export what the reviewer accepted, through FiftyOne's exporters, with a report of what was left out.

The exported label of a sample is the reviewer's correction when there is one, else the model's.
Nothing is written outside ``export_dir``.
"""

from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from fiftyone import ViewField as F

from fiftyone_nola.core.errors import InvalidInputError
from fiftyone_nola.core.names import CORRECTIONS_FIELD, EXPORTABLE_TAGS, PREDICTIONS_FIELD, REJECTED_TAG
from fiftyone_nola.core.storage import nola_home
from fiftyone_nola.stages import fo_io

FORMATS = ("classification-tree", "fiftyone", "csv", "coco")
CERTIFIED = "certified"  # min_confidence="certified": the audit's certified threshold, with a certificate


def safe_folder_name(label: str) -> str:
    """A label usable as one folder name inside the export directory."""
    safe = re.sub(r"[/\\\x00]", "_", str(label)).strip()
    return safe if safe not in ("", ".", "..") else f"_{safe}_"


def _resolve_dir(export_dir: str, overwrite: bool) -> Path:
    d = Path(export_dir).expanduser().resolve()
    if d.exists() and not d.is_dir():
        raise InvalidInputError(f"{d} exists and is not a directory")
    if d.exists() and any(d.iterdir()) and not overwrite:
        raise InvalidInputError(f"{d} exists and is not empty: choose another directory or pass overwrite=True")
    return d  # created by the exporter (creating it first makes FiftyOne warn about merging)


def nothing_to_export_message(left_out: dict, report: Optional[dict] = None) -> str:
    """What to tell a user whose export selected nothing, from the counts of what was left out
    (and, for a certified export, the audit's certificate sentence)."""
    why = ", ".join(f"{k}: {v}" for k, v in left_out.items() if v) or "no samples"
    msg = (
        f"Nothing to export ({why}). Accept samples in review first, or also export unreviewed "
        "samples above a confidence (min_confidence)."
    )
    return f"{report['certificate']} {msg}" if report is not None else msg


def suggest_export_dir(samples, label_field: str = PREDICTIONS_FIELD) -> str:
    """A fresh directory under NOLA_HOME/exports named after the dataset (never a non-empty one)."""

    name = safe_folder_name(fo_io.root_dataset(samples).name).replace(" ", "_")
    base = nola_home() / "exports" / f"{name}-{label_field}"
    d, n = base, 1
    while d.exists() and any(d.iterdir()):
        n += 1
        d = base.with_name(f"{base.name}-{n}")
    return str(d)


def _confident(label_field: str, min_confidence: float, multilabel: bool) -> dict:
    """A query: the prediction is at least ``min_confidence`` confident (a multi-label one by its
    least confident label; a missing confidence is not confident)."""
    t = float(min_confidence)
    if not multilabel:
        return {f"{label_field}.confidence": {"$gte": t}}
    doubtful = {"$elemMatch": {"$or": [{"confidence": {"$lt": t}}, {"confidence": None}]}}
    path = f"{label_field}.classifications"
    return {f"{path}.0": {"$exists": True}, path: {"$not": doubtful}}


@dataclass
class ExportPlan:
    """What an export would write: ``view`` (the exported samples, whose ``label_field`` holds
    each one's final label: the reviewer's correction, else the model's), ``count``, and the
    counts left out by reason."""

    view: object
    count: int
    left_out: dict
    corrections_used: int
    report: Optional[dict] = None  # the audit's report, for a certified export


def _is_multilabel(samples, label_field: str) -> bool:
    import fiftyone as fo

    fo_io.check_field(samples, label_field, (fo.Classification, fo.Classifications))
    return issubclass(samples.get_field(label_field).document_type, fo.Classifications)


def plan_export(
    samples,
    label_field: str = PREDICTIONS_FIELD,
    min_confidence: Optional[Union[float, str]] = None,
    corrections_field: str = CORRECTIONS_FIELD,
    require_accepted: bool = True,
    multilabel: Optional[bool] = None,
) -> ExportPlan:
    """Which samples an export would write: accepted or corrected ones (with ``min_confidence``,
    also undecided predictions that confident; with ``"certified"``, also the undecided samples
    the dataset's audit certifies), never rejected or unreadable ones, nor ones with no label.
    Counted by the database from its indexes (tags, confidence); nothing is read per sample and
    nothing is written (the final label is an expression of the view). ``multilabel``: None
    reads it from the field's type."""
    if multilabel is None:
        multilabel = _is_multilabel(samples, label_field)
    report = _audit_report(samples, label_field, min_confidence, multilabel)
    certified = None
    if report is not None:
        from fiftyone_nola.stages.certificate import certified_query

        certified, min_confidence = certified_query(report), None
    ds = fo_io.root_dataset(samples)
    corr = corrections_field if ds.has_sample_field(corrections_field) else None
    # by label path, so the (label, confidence) index answers it
    label_path = label_field if multilabel else f"{label_field}.label"
    no_label = {label_path: None, **({f"{corr}.label": None} if corr else {})}
    eligible = [{"tags": {"$in": list(EXPORTABLE_TAGS)}}]
    if certified is not None:
        eligible.append(certified)
    elif min_confidence is not None:
        eligible.append(_confident(label_field, min_confidence, multilabel))
    elif not require_accepted:
        eligible = [{}]
    ok = {"tags": {"$nin": [REJECTED_TAG, fo_io.UNREADABLE_TAG]}}
    keep = samples.match({"$and": [ok, {"$nor": [no_label]}, {"$or": eligible}]})
    rejected = samples.match({"tags": REJECTED_TAG}).count()
    unreadable = samples.match({"tags": fo_io.UNREADABLE_TAG, "$nor": [{"tags": REJECTED_TAG}]}).count()
    unlabelled = samples.match({"$and": [ok, no_label]}).count()
    count = keep.count()
    others = fo_io.count(samples) - count - rejected - unreadable - unlabelled
    left_out = {"rejected": rejected, "not accepted": 0, "below confidence": 0, "no label": unlabelled}
    left_out["unreadable"] = unreadable
    why = "not certified" if certified is not None else "not accepted" if min_confidence is None else "below confidence"
    left_out[why] = others
    corrected = keep.match({corr: {"$ne": None}}).count() if corr else 0
    if corr:
        keep = keep.set_field(label_field, F(corr).if_null(F(label_field)))
    return ExportPlan(keep, count, left_out, corrected, report)


def export_accepted(
    samples,
    export_dir: str,
    label_field: str = PREDICTIONS_FIELD,
    format: str = "classification-tree",
    min_confidence: Optional[Union[float, str]] = None,
    corrections_field: str = CORRECTIONS_FIELD,
    require_accepted: bool = True,
    overwrite: bool = False,
) -> dict:
    """Export accepted (and/or above ``min_confidence``) samples; returns counts and reasons left out.

    Formats: ``classification-tree`` (one folder per class), ``fiftyone`` (a FiftyOne dataset
    directory), ``csv`` (filepath + labels; suits multi-label), ``coco`` (multi-label as COCO
    image-level categories via a JSON file). The dataset itself is not modified.

    ``min_confidence="certified"``: the reviewed samples plus the unreviewed ones the dataset's
    audit certifies (confidence at or above its certified threshold), with ``certificate.json``
    beside them (also recorded as the run ``nola_certificate``; see :mod:`.certificate`).
    """
    if format not in FORMATS:
        raise InvalidInputError(f"format must be one of {', '.join(FORMATS)}, not {format!r}")
    if not require_accepted and min_confidence is None:
        raise InvalidInputError("Export needs accepted samples, a min_confidence, or both")
    multilabel = _is_multilabel(samples, label_field)
    if format == "classification-tree" and multilabel:
        raise InvalidInputError("A classification tree needs single labels: use format 'csv' or 'coco'")
    out_dir = _resolve_dir(export_dir, overwrite)
    plan = plan_export(samples, label_field, min_confidence, corrections_field, require_accepted, multilabel)
    report = plan.report
    if not plan.count:
        raise InvalidInputError(nothing_to_export_message(plan.left_out, report))
    renamed = _write(plan.view, out_dir, label_field, format, multilabel, overwrite)
    summary = {
        "exported": plan.count,
        "left_out": plan.left_out,
        "format": format,
        "export_dir": str(out_dir),
        "renamed_labels": renamed,
        "label_field": label_field,
        "corrections_used": plan.corrections_used,
    }
    if report is not None:
        from fiftyone_nola.stages import certificate

        cert = certificate.write(samples, report, summary, out_dir)
        summary.update(certificate=str(out_dir / certificate.CERTIFICATE_FILE), certified_threshold=cert["tau"])
    fo_io.write_text_atomic(out_dir / "export_report.json", summary)
    return summary


def _write(view, out_dir: Path, label_field: str, format: str, multilabel: bool, overwrite: bool) -> dict:
    """Write ``view`` in ``format`` into ``out_dir``; returns labels renamed to be folder names."""
    import fiftyone as fo

    renamed = {}
    if format == "classification-tree":
        # Labels become folder names: never let one ("../x", "a/b") point outside export_dir.
        labels = view.distinct(f"{label_field}.label")
        renamed = {lab: safe_folder_name(lab) for lab in labels if safe_folder_name(lab) != lab}
        if renamed:
            view = view.map_labels(label_field, renamed)
        tree = fo.types.ImageClassificationDirectoryTree
        view.export(
            export_dir=str(out_dir), dataset_type=tree, label_field=label_field, overwrite=overwrite, progress=False
        )
    elif format == "fiftyone":
        view.export(export_dir=str(out_dir), dataset_type=fo.types.FiftyOneDataset, overwrite=overwrite, progress=False)
    else:
        out_dir.mkdir(parents=True, exist_ok=True)
        rows = list(zip(*view.values(["filepath", _label_path(label_field, multilabel)])))
        (_write_csv if format == "csv" else _write_coco)(rows, out_dir)
    return renamed


def _audit_report(samples, label_field: str, min_confidence, multilabel: bool) -> Optional[dict]:
    """The audit's report when the export is to be certified (``min_confidence="certified"``)."""
    if not isinstance(min_confidence, str):
        return None
    if min_confidence != CERTIFIED:
        raise InvalidInputError(f"min_confidence is a number or {CERTIFIED!r}, not {min_confidence!r}")
    if multilabel:
        raise InvalidInputError("A certified export needs single labels: audits measure single-label accuracy")
    from fiftyone_nola.stages.audit import audit_report

    return audit_report(samples, label_field)


def _label_path(label_field: str, multilabel: bool) -> str:
    return f"{label_field}.classifications.label" if multilabel else f"{label_field}.label"


def _labels_of(labels) -> list:
    return list(labels) if isinstance(labels, list) else [labels]


def _write_csv(rows, out_dir: Path) -> None:
    with open(out_dir / "labels.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["filepath", "labels"])
        for fp, lab in rows:
            w.writerow([fp, ";".join(_labels_of(lab))])


def _write_coco(rows, out_dir: Path) -> None:
    import json

    labels = [(fp, _labels_of(lab)) for fp, lab in rows]
    cats = sorted({x for _, ls in labels for x in ls})
    cid = {c: i + 1 for i, c in enumerate(cats)}
    coco = {
        "categories": [{"id": cid[c], "name": c} for c in cats],
        "images": [{"id": i + 1, "file_name": os.path.basename(fp), "path": fp} for i, (fp, _) in enumerate(labels)],
        # image-level labels: one annotation per (image, class), no boxes
        "annotations": [
            {"id": n + 1, "image_id": i + 1, "category_id": cid[c]}
            for n, (i, c) in enumerate((i, c) for i, (_, ls) in enumerate(labels) for c in ls)
        ],
    }
    (out_dir / "labels.json").write_text(json.dumps(coco, indent=1))
