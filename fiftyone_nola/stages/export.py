"""Export what the reviewer accepted, through FiftyOne's exporters, with a report of what was left out.

The exported label of a sample is the reviewer's correction when there is one, else the model's.
Nothing is written outside ``export_dir``.
"""

from __future__ import annotations

import csv
import os
import re
from pathlib import Path
from typing import Optional, Union

from fiftyone_nola.core.errors import InvalidInputError
from fiftyone_nola.core.storage import nola_home
from fiftyone_nola.stages import fo_io
from fiftyone_nola.stages.review import ACCEPTED_TAG, CORRECTIONS_FIELD, REJECTED_TAG

FORMATS = ("classification-tree", "fiftyone", "csv", "coco")
EXPORT_FIELD = "nola_export_label"
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


def nothing_to_export_message(left_out: dict) -> str:
    """What to tell a user whose export selected nothing, from the counts of what was left out."""
    why = ", ".join(f"{k}: {v}" for k, v in left_out.items() if v) or "no samples"
    return (
        f"Nothing to export ({why}). Accept samples in review first, or also export unreviewed "
        "samples above a confidence (min_confidence)."
    )


def suggest_export_dir(samples, label_field: str = "nola") -> str:
    """A fresh directory under NOLA_HOME/exports named after the dataset (never a non-empty one)."""

    name = safe_folder_name(fo_io.root_dataset(samples).name).replace(" ", "_")
    base = nola_home() / "exports" / f"{name}-{label_field}"
    d, n = base, 1
    while d.exists() and any(d.iterdir()):
        n += 1
        d = base.with_name(f"{base.name}-{n}")
    return str(d)


def plan_export(
    samples,
    label_field: str = "nola",
    min_confidence: Optional[float] = None,
    corrections_field: str = CORRECTIONS_FIELD,
    require_accepted: bool = True,
    multilabel: bool = False,
    certified: Optional[set] = None,
) -> tuple[list, dict, dict, list]:
    """Which samples an export would write, without writing: ``(ids, final labels by id,
    counts left out by reason, corrections)``. With ``certified`` (ids), an unreviewed sample is
    exported exactly when the audit certifies it (``min_confidence`` is then not used)."""
    ds = fo_io.root_dataset(samples)
    has_corr = ds.has_sample_field(corrections_field)
    ids, tags, paths = samples.values(["id", "tags", "filepath"])
    preds = samples.values(label_field)
    corr = samples.values(corrections_field) if has_corr else [None] * len(ids)
    keep, left_out = [], {"rejected": 0, "not accepted": 0, "below confidence": 0, "no label": 0, "unreadable": 0}
    final = {}
    for sid, tg, pred, cr in zip(ids, tags, preds, corr):
        if REJECTED_TAG in tg:
            left_out["rejected"] += 1
            continue
        if fo_io.UNREADABLE_TAG in tg:
            left_out["unreadable"] += 1
            continue
        label = cr if cr is not None else pred
        if label is None:
            left_out["no label"] += 1
            continue
        accepted = ACCEPTED_TAG in tg
        if certified is not None:
            if not accepted and sid not in certified:
                left_out["not certified"] = left_out.get("not certified", 0) + 1
                continue
        elif require_accepted and not accepted and min_confidence is None:
            left_out["not accepted"] += 1
            continue
        if certified is None and not accepted and min_confidence is not None and cr is None:
            conf = getattr(label, "confidence", None)
            if multilabel:
                conf = min((c.confidence or 0.0) for c in label.classifications) if label.classifications else 0.0
            if conf is None or conf < min_confidence:
                left_out["below confidence"] += 1
                continue
        keep.append(sid)
        final[sid] = label
    return keep, final, left_out, corr


def export_accepted(
    samples,
    export_dir: str,
    label_field: str = "nola",
    format: str = "classification-tree",
    min_confidence: Optional[Union[float, str]] = None,
    corrections_field: str = CORRECTIONS_FIELD,
    require_accepted: bool = True,
    overwrite: bool = False,
) -> dict:
    """Export accepted (and/or above ``min_confidence``) samples; returns counts and reasons left out.

    ``min_confidence="certified"``: the reviewed samples plus the unreviewed ones the dataset's
    audit certifies (confidence at or above its certified threshold), with ``certificate.json``
    beside them (also recorded as the run ``nola_certificate``; see :mod:`.certificate`).

    Formats: ``classification-tree`` (one folder per class), ``fiftyone`` (a FiftyOne dataset
    directory), ``csv`` (filepath + labels; suits multi-label), ``coco`` (multi-label as COCO
    image-level categories via a JSON file).
    """
    import fiftyone as fo

    if format not in FORMATS:
        raise InvalidInputError(f"format must be one of {', '.join(FORMATS)}, not {format!r}")
    if not require_accepted and min_confidence is None:
        raise InvalidInputError("Export needs accepted samples, a min_confidence, or both")
    fo_io.check_field(samples, label_field, (fo.Classification, fo.Classifications))
    multilabel = issubclass(samples.get_field(label_field).document_type, fo.Classifications)
    report = _audit_report(samples, label_field, min_confidence, multilabel)
    if format == "classification-tree" and multilabel:
        raise InvalidInputError("A classification tree needs single labels: use format 'csv' or 'coco'")
    out_dir = _resolve_dir(export_dir, overwrite)

    ds = fo_io.root_dataset(samples)
    certified = None
    if report is not None:
        from fiftyone_nola.stages.certificate import certified_ids

        certified, min_confidence = certified_ids(samples, report), None
    keep, final, left_out, corr = plan_export(
        samples, label_field, min_confidence, corrections_field, require_accepted, multilabel, certified
    )
    if not keep:
        why = nothing_to_export_message(left_out)
        raise InvalidInputError(f"{report['certificate']} {why}" if report is not None else why)
    renamed = {}
    if format == "classification-tree":
        # Labels become folder names: never let one ("../x", "a/b") point outside export_dir.
        for sid, lab in list(final.items()):
            safe = safe_folder_name(lab.label)
            if safe != lab.label:
                renamed[lab.label] = safe
                final[sid] = lab.copy()
                final[sid].label = safe
    ds.set_values(EXPORT_FIELD, final, key_field="id")
    view = ds.select(keep)
    try:
        if format == "classification-tree":
            view.export(
                export_dir=str(out_dir),
                dataset_type=fo.types.ImageClassificationDirectoryTree,
                label_field=EXPORT_FIELD,
                overwrite=overwrite,
                progress=False,
            )
        elif format == "fiftyone":
            view.export(
                export_dir=str(out_dir), dataset_type=fo.types.FiftyOneDataset, overwrite=overwrite, progress=False
            )
        elif format == "csv":
            out_dir.mkdir(parents=True, exist_ok=True)
            _write_csv(view, out_dir / "labels.csv", multilabel)
        else:
            out_dir.mkdir(parents=True, exist_ok=True)
            _write_coco(view, out_dir / "labels.json", multilabel)
    finally:
        ds.delete_sample_field(EXPORT_FIELD)
    summary = {
        "exported": len(keep),
        "left_out": left_out,
        "format": format,
        "export_dir": str(out_dir),
        "renamed_labels": renamed,
        "label_field": label_field,
        "corrections_used": sum(c is not None for c in corr),
    }
    if report is not None:
        from fiftyone_nola.stages import certificate

        cert = certificate.write(samples, report, summary, out_dir)
        summary.update(certificate=str(out_dir / certificate.CERTIFICATE_FILE), certified_threshold=cert["tau"])
    fo_io.write_text_atomic(out_dir / "export_report.json", summary)
    return summary


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


def _labels_of(label, multilabel: bool) -> list:
    if multilabel:
        return [c.label for c in label.classifications]
    return [label.label]


def _write_csv(view, path: Path, multilabel: bool) -> None:
    rows = zip(view.values("filepath"), view.values(EXPORT_FIELD))
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["filepath", "labels"])
        for fp, lab in rows:
            w.writerow([fp, ";".join(_labels_of(lab, multilabel))])


def _write_coco(view, path: Path, multilabel: bool) -> None:
    import json

    labels = [(fp, _labels_of(lab, multilabel)) for fp, lab in zip(view.values("filepath"), view.values(EXPORT_FIELD))]
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
    path.write_text(json.dumps(coco, indent=1))
