"""One audit summarised: accuracy with its interval, per predicted class, accuracy against the
confidence threshold with the certified lower bound, and the certificate."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import numpy as np

from fiftyone_nola.core.audit.certify import Certificate, certified_lower_bounds, certify, describe
from fiftyone_nola.core.audit.designs import Design
from fiftyone_nola.core.audit.estimators import DEFAULT_FOR_DESIGN, AuditData, estimate, estimate_domains

CURVE_POINTS = 50
# What every report (and the CLI's --json) holds at least; threshold is None when nothing is certified.
REPORT_KEYS = (
    "n",
    "design",
    "alpha",
    "accuracy",
    "accuracy_low",
    "accuracy_high",
    "target",
    "delta",
    "threshold",
    "certified",
    "uncertified",
)


def _num(v) -> Optional[float]:
    return None if v is None or not np.isfinite(v) else float(v)


def per_class(data: AuditData, labels: Sequence, method: str, alpha: float) -> list[dict]:
    """Accuracy of each predicted class (a sub-population of the pool) with its interval."""
    index: dict = {}
    labels = labels.tolist() if isinstance(labels, np.ndarray) else labels
    first_code = np.array([index.setdefault(str(x), len(index)) for x in labels], dtype=np.int64)
    names = sorted(index)
    code = np.argsort(np.argsort(list(index)))[first_code] if len(index) else first_code  # codes in name order
    pool = np.bincount(code, minlength=len(names))
    audited = np.bincount(code[data.unit], minlength=len(names))
    by_class = np.split(np.argsort(code, kind="stable"), np.cumsum(pool)[:-1])  # pool indices per class
    estimates = estimate_domains(data, by_class, method, alpha)
    return [
        {
            "class": str(name),
            "pool": int(pool[k]),
            "audited": int(audited[k]),
            "accuracy": r["estimate"],
            "low": r["low"],
            "high": r["high"],
        }
        for k, (name, r) in enumerate(zip(names, estimates))
    ]


def curve(data: AuditData, cert: Certificate, method: str, alpha: float, delta: float) -> list[dict]:
    """Per candidate threshold (at most CURVE_POINTS): pool units above it, audited above it,
    the design's estimate and interval of their accuracy, and the exact certified lower bound."""
    cand = cert.candidates
    bounds = certified_lower_bounds(cert, delta)
    certified = np.arange(len(cand.size)) <= cert.index[0]
    keep = np.unique(
        np.r_[np.linspace(0, len(cand.size) - 1, min(CURVE_POINTS, len(cand.size))).astype(int), max(0, cert.index[0])]
    )
    ranked = data.domain(cand.order)  # most confident first: each region is a prefix (contiguous reads)
    regions = [np.arange(cand.size[k]) for k in keep]
    points = []
    for k, r in zip(keep, estimate_domains(ranked, regions, method, alpha)):
        points.append(
            {
                "threshold": float(cand.threshold[k]),
                "above": int(cand.size[k]),
                "audited_above": int((cand.rank[data.unit] < cand.size[k]).sum()),
                "accuracy": r["estimate"],
                "low": r["low"],
                "high": r["high"],
                "certified_lower_bound": float(bounds[k]),
                "test_sample": int(cert.m[0, k]),
                "certified": bool(certified[k]),
            }
        )
    return points


def summarize(
    data: AuditData,
    design: Design,
    labels: Sequence,
    target: float = 0.95,
    delta: float = 0.05,
    alpha: float = 0.05,
    method: Optional[str] = None,
) -> dict:
    """Everything the audit says, as plain values (one audit: ``data.trials == 1``)."""
    method = method or DEFAULT_FOR_DESIGN[design.kind]
    overall = estimate(data, method, alpha).row()
    cert = certify(data, target, delta)
    threshold = _num(cert.threshold[0])
    certified = int(cert.certified[0])
    pool = data.pool_size
    return {
        "n": int(len(data.unit)),
        "pool": pool,
        "design": design.to_dict(),
        "method": method,
        "alpha": alpha,
        "accuracy": overall["estimate"],
        "accuracy_low": overall["low"],
        "accuracy_high": overall["high"],
        "target": target,
        "delta": delta,
        "threshold": threshold,
        "certified": certified,
        "uncertified": pool - certified,
        "certificate": describe(threshold, certified, pool, target, delta),
        "per_class": per_class(data, labels, method, alpha),
        "curve": curve(data, cert, method, alpha, delta),
    }
