"""The certificate an export carries: what the audit says about the exported labels.

``export_accepted(..., min_confidence="certified")`` exports the reviewed samples and the
unreviewed ones the audit certifies, writes ``certificate.json`` beside them and records it as
the run ``nola_certificate`` on the dataset.
"""

from __future__ import annotations

import time
from typing import Optional

from fiftyone_nola.stages import audit_records as rec
from fiftyone_nola.stages import fo_io, runs

CERTIFICATE_FILE = "certificate.json"
CERTIFICATE_RUN_KEY = "nola_certificate"
ASSUMPTIONS = (
    "The audit is a random sample drawn by the recorded design (nobody chose which samples to audit).",
    "Reviewers are honest and right: an accepted label is correct, a corrected one is the truth.",
    "The audit was finished, or stopped for reasons unrelated to its results.",
    "The guarantee is about the audited pool's labels at or above the threshold, as a whole, "
    "not about any single label or class.",
)


def certified_query(report: dict) -> dict:
    """A query for the samples of the audited pool at or above the certified threshold (none if
    nothing is certified); an export adds the undecided ones of them to the reviewed samples."""
    tau = report.get("threshold")
    if tau is None:
        return {"_id": {"$in": []}}
    return {rec.PI_FIELD: {"$ne": None}, f"{report['field']}.confidence": {"$gte": float(tau)}}


def _region_row(report: dict) -> Optional[dict]:
    tau = report.get("threshold")
    if tau is None:
        return None
    for point in report.get("curve", []):
        if point["certified"] and point["threshold"] == tau:
            return {k: point[k] for k in ("accuracy", "low", "high", "certified_lower_bound", "above")}
    return None


def build(samples, report: dict, export: dict) -> dict:
    """The certificate's content (every figure from ``report``; the model from the field's run)."""
    ds = fo_io.root_dataset(samples)
    field = report["field"]
    labels_run = runs.get_run(ds, runs.run_key_for(field))
    return {
        "dataset": ds.name,
        "label_field": field,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "statement": report["certificate"],
        "simulated": bool(report.get("simulated")),
        "design": report["design"],
        "method": report["method"],
        "n": report["n"],
        "pool": report["pool"],
        "progress": report.get("progress"),
        "alpha": report["alpha"],
        "delta": report["delta"],
        "target": report["target"],
        "tau": report["threshold"],
        "threshold": report["threshold"],
        "certified": report["certified"],
        "uncertified": report["uncertified"],
        "accuracy": {"estimate": report["accuracy"], "low": report["accuracy_low"], "high": report["accuracy_high"]},
        "certified_region_accuracy": _region_row(report),
        "export_accuracy": report["export_accuracy"]["certified_and_reviewed"],
        "per_class": report["per_class"],
        "exported": export["exported"],
        "export_dir": export["export_dir"],
        "model": labels_run,
        "run_keys": {
            "audit": rec.RUN_KEY,
            "labels": runs.run_key_for(field) if labels_run else None,
            "certificate": CERTIFICATE_RUN_KEY,
        },
        "assumptions": list(ASSUMPTIONS),
    }


def write(samples, report: dict, export: dict, out_dir) -> dict:
    """Write ``certificate.json`` into ``out_dir`` and record it as a run; returns it."""
    cert = build(samples, report, export)
    fo_io.write_text_atomic(out_dir / CERTIFICATE_FILE, cert)
    runs.record_run(samples, CERTIFICATE_RUN_KEY, "certificate", {"export_dir": str(out_dir)}, cert)
    return cert


def nothing_certified_message(report: dict) -> str:
    return f"{report['certificate']} No sample is accepted in review either: nothing to export."
