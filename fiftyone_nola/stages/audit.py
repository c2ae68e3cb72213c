"""A random audit of the predictions: how accurate are they, and which may be exported unseen.

``draw_audit`` draws samples nobody has decided yet with a recorded design (see
:mod:`.audit_records` for what it writes); a person decides them like any review (an audit
decision *is* a review decision: :func:`audit_decide` goes through
``review.decide``); ``audit_report`` gives the accuracy with its interval, per class,
against the confidence threshold, and the certificate; ``flag_uncertified`` queues for review
what the certificate does not cover. ``simulate_audit`` answers a fresh draw from a ground-truth
field instead of a person and writes nothing. The statistics are in :mod:`fiftyone_nola.core.audit`.

Assumptions: the audit is random (the draw decides who is audited, nobody else), the reviewer
is honest (a decision is the truth), the audit is finished or stopped for reasons unrelated to
its results, and the labels are single-label classifications.
"""

from __future__ import annotations

from dataclasses import asdict, replace
from typing import Optional

import numpy as np

from fiftyone_nola.core.audit.config import AuditConfig
from fiftyone_nola.core.audit.designs import draw, plan_design
from fiftyone_nola.core.audit.estimators import DEFAULT_FOR_DESIGN, AuditData, estimate
from fiftyone_nola.core.audit.final import ExportCounts, export_accuracy
from fiftyone_nola.core.audit.report import summarize
from fiftyone_nola.core.errors import EmptyViewError, InvalidInputError
from fiftyone_nola.core.names import CORRECTIONS_FIELD, DECIDED_TAGS, EXPORTABLE_TAGS, PREDICTIONS_FIELD
from fiftyone_nola.stages import audit_records as rec
from fiftyone_nola.stages import fo_io, runs
from fiftyone_nola.stages.review import one_review_writer

AUDIT_TAG = rec.AUDIT_TAG
RUN_KEY = rec.RUN_KEY


def _settings(config: Optional[AuditConfig], **given) -> AuditConfig:
    cfg = config or AuditConfig()
    return replace(cfg, **{k: v for k, v in given.items() if v is not None})


def _plan(conf: np.ndarray, n: int, seed: int, cfg: AuditConfig):
    if n < 1:
        raise InvalidInputError(f"Draw at least one sample, not {n}")
    design = plan_design(conf, n, cfg.design, seed=seed, max_strata=cfg.max_strata, floor_share=cfg.floor_share)
    return design, design.inclusion(conf)


@one_review_writer  # tags and fields the review reads: one writer at a time, retried on App reloads
def draw_audit(
    samples,
    n: int,
    field: str = PREDICTIONS_FIELD,
    seed: int = 0,
    config: Optional[AuditConfig] = None,
    replace_existing: bool = False,
) -> dict:
    """Draw about ``n`` samples for audit from the samples of ``field`` nobody has decided yet.

    Poisson sampling: the number drawn varies around ``n``. An existing audit is kept unless
    ``replace_existing`` (its samples keep their review decisions either way)."""
    cfg = config or AuditConfig()
    ds = fo_io.root_dataset(samples)
    old = rec.recorded(ds)
    if old and not replace_existing:
        raise InvalidInputError(
            f"This dataset already has an audit of {old.get('drawn')} samples drawn from '{old.get('field')}': "
            "report on it, or replace it (replace_existing=True, CLI --replace)"
        )
    preds = rec.read_predictions(samples, field)[0]
    in_pool = rec.pool_mask(preds)
    if not in_pool.any():
        raise EmptyViewError(f"No sample has a prediction in '{field}' that nobody has decided yet: nothing to audit")
    pool_ids = [i for i, p in zip(preds.ids, in_pool) if p]
    conf = preds.conf[in_pool]
    labels = [lab for lab, p in zip(preds.labels, in_pool) if p]
    design, pi = _plan(conf, n, seed, cfg)
    d = draw(design, pi)
    if old:
        rec.clear(ds)
    rec.write_draw(ds, pool_ids, pi, design.strata(conf), d.unit, d.u, labels)
    summary = {"field": field, "pool": len(pool_ids), "drawn": int(len(d.unit)), "requested": n, "seed": seed}
    runs.record_run(ds, RUN_KEY, "audit", {**summary, "design": design.to_dict(), "settings": asdict(cfg)}, summary)
    return {**summary, "design": design.kind}


def audit_queue(samples) -> list[str]:
    """Ids of the drawn samples nobody has decided yet, in audit order (the order estimates count)."""
    ds = fo_io.root_dataset(samples)
    if not ds.has_sample_field(rec.KEY_FIELD):
        return []
    ids, key, pi, tags = ds.match_tags(AUDIT_TAG).values(["id", rec.KEY_FIELD, rec.PI_FIELD, "tags"])
    order = np.argsort(np.array(key, dtype=float) / np.maximum(np.array(pi, dtype=float), 1e-12), kind="stable")
    return [ids[i] for i in order if not rec.decided(tags[i] or [])]


def audit_progress(samples) -> dict:
    """Drawn, decided (audited) and remaining audit samples."""
    ds = fo_io.root_dataset(samples)
    drawn = ds.match_tags(AUDIT_TAG)
    audited = len(drawn.match_tags(list(DECIDED_TAGS)))
    return {"drawn": len(drawn), "audited": audited, "remaining": len(drawn) - audited}


def audit_decide(
    samples,
    sample_id: str,
    action: str,
    label: Optional[str] = None,
    field: str = PREDICTIONS_FIELD,
    corrections_field: str = CORRECTIONS_FIELD,
) -> Optional[str]:
    """Record a decision on an audit sample (a review decision) and return the next one's id."""
    from fiftyone_nola.stages.review import decide

    decide(samples, [sample_id], action, label, field, corrections_field)
    return next(iter(audit_queue(samples)), None)


def _export_accuracies(data: AuditData, preds: rec.Predictions, pool_pos: np.ndarray, report: dict, method, alpha):
    """Accuracy of two exports: reviewed + certified, and reviewed + every unreviewed prediction.
    ``preds``: every sample; ``pool_pos``: where the audited pool's units are among them."""
    done = preds.decided()
    accepted = np.array([any(e in t for e in EXPORTABLE_TAGS) for t in preds.tags], dtype=bool)
    right = preds.model_right()
    has_label = np.array([lab is not None for lab in preds.labels], dtype=bool)
    out = {}
    tau = report["threshold"]
    pool_conf = data.conf
    for name, region in (
        ("certified_and_reviewed", pool_conf >= tau if tau is not None else np.zeros(len(pool_conf), bool)),
        ("all_labels", np.ones(len(pool_conf), bool)),
    ):
        r = estimate(data.domain(region), method, alpha).row() if region.any() else {"estimate": 0, "low": 0, "high": 0}
        region_in_all = np.zeros(len(preds.ids), bool)
        region_in_all[pool_pos[region]] = True
        in_pool = np.zeros(len(preds.ids), bool)
        in_pool[pool_pos] = True
        unknown = 0 if name != "all_labels" else int((has_label & ~done & ~in_pool).sum())
        counts = ExportCounts(
            human=int(accepted.sum()),
            region=int(region.sum()),
            region_reviewed=int((region_in_all & done).sum()),
            region_reviewed_right=int((region_in_all & done & right).sum()),
            unknown=unknown,
        )
        out[name] = export_accuracy(counts, r["estimate"], r["low"], r["high"])
    return out


def _report(data, design, preds, pool_pos: np.ndarray, cfg: AuditConfig) -> dict:
    method = cfg.method or DEFAULT_FOR_DESIGN[design.kind]
    labels = rec.labels_for_classes([preds.labels[i] for i in pool_pos])
    out = summarize(data, design, labels, cfg.target, cfg.delta, cfg.alpha, method)
    out["export_accuracy"] = _export_accuracies(data, preds, pool_pos, out, method, cfg.alpha)
    out["settings"] = asdict(cfg)
    return out


def audit_report(
    samples,
    field: Optional[str] = None,
    target: Optional[float] = None,
    delta: Optional[float] = None,
    alpha: Optional[float] = None,
    config: Optional[AuditConfig] = None,
) -> dict:
    """Estimates, per-class rows, accuracy-vs-threshold curve, certificate and progress of the
    dataset's audit (``field``: the predictions judged; default the audited field)."""
    recd = rec.require_audit(samples)
    field = field or recd["field"]
    cfg = _settings(config or AuditConfig(**_stored_settings(recd)), target=target, delta=delta, alpha=alpha)
    ds = fo_io.root_dataset(samples)
    got = rec.read_audit(ds, field)
    everyone = rec.read_predictions(ds, field)[0]
    where = {sid: j for j, sid in enumerate(everyone.ids)}
    out = _report(got.data, got.design, everyone, np.array([where[i] for i in got.preds.ids], dtype=np.int64), cfg)
    out.update(
        field=field,
        simulated=False,
        progress={"drawn": got.drawn, "audited": got.audited, "counted": got.counted},
        changed_since_draw=got.changed,
    )
    if got.counted < got.audited:
        out["note"] = (
            f"{got.audited - got.counted} decided audit samples come after an undecided one in the audit "
            "order and are not counted yet: decide the queue in order"
        )
    return out


def _stored_settings(recd: dict) -> dict:
    s = dict(recd.get("settings") or {})
    return {k: v for k, v in s.items() if k in AuditConfig.__dataclass_fields__}


def simulate_audit(
    samples, gt_field: str, n: int, field: str = PREDICTIONS_FIELD, seed: int = 0, config: Optional[AuditConfig] = None
) -> dict:
    """A fresh audit of ``n`` answered from ``gt_field`` instead of a person. Writes nothing, so
    simulations with different seeds are independent. Its pool: the undecided samples of
    ``field`` that have a ground-truth label (the estimates are about those)."""
    import fiftyone as fo

    cfg = config or AuditConfig()
    if gt_field == field:
        raise InvalidInputError(f"'{gt_field}' is the predictions field itself: a simulated audit needs ground truth")
    fo_io.check_field(samples, gt_field, (fo.Classification,))
    preds, gt = rec.read_predictions(samples, field, extra=(f"{gt_field}.label",))
    in_pool = rec.pool_mask(preds) & np.array([g is not None for g in gt], dtype=bool)
    if not in_pool.any():
        raise EmptyViewError(f"No undecided sample has both '{field}' and '{gt_field}': nothing to simulate")
    idx = np.flatnonzero(in_pool)
    conf = preds.conf[idx]
    design, pi = _plan(conf, n, seed, cfg)
    d = draw(design, pi)
    truth = np.array([gt[i] == preds.labels[i] for i in idx], dtype=bool)
    data = AuditData(
        conf=conf,
        pi=pi,
        stratum=design.strata(conf),
        unit=d.unit,
        u=d.u,
        correct=truth[d.unit],
        trial=np.zeros(len(d.unit), dtype=np.int64),
    )
    out = _report(data, design, preds, idx, cfg)
    out.update(
        field=field,
        simulated=True,
        simulated_from=gt_field,
        seed=seed,
        progress={"drawn": int(len(d.unit)), "audited": int(len(d.unit)), "counted": int(len(d.unit))},
    )
    return out


def flag_uncertified(
    samples, field: Optional[str] = None, report: Optional[dict] = None, clusters: bool = True
) -> dict:
    """Make the review queue exactly what the certificate does not cover: flag (and queue, when
    undecided) every sample below the certified threshold, or every sample when nothing is
    certified (``review.flag_samples`` with that threshold)."""
    from fiftyone_nola.stages.review import flag_samples

    report = report or audit_report(samples, field)
    field = field or report["field"]
    tau = report["threshold"]
    threshold = float(tau) if tau is not None else float(np.nextafter(1.0, 2.0))
    out = flag_samples(samples, field, threshold=threshold, clusters=clusters)
    from fiftyone import ViewField as F

    ds = fo_io.root_dataset(samples)
    outside = ds.exists(field).match_tags(list(DECIDED_TAGS), bool=False)
    outside = outside.exists(rec.PI_FIELD, bool=False) if ds.has_sample_field(rec.PI_FIELD) else outside
    # covered only from the audited pool: undecided samples above the threshold outside it are not
    outside = outside.match(F(f"{field}.confidence") >= threshold) if tau is not None else outside.limit(0)
    out.update(
        certified_threshold=tau,
        not_in_audited_pool=len(outside),
        message=(
            f"{out['queue']} samples queued for review: "
            + ("those below the certified threshold" if tau is not None else "nothing is certified")
            + (
                f"; {len(outside)} undecided samples were not in the audited pool (added or relabelled "
                "after the draw) and are not covered: draw a new audit for them"
                if len(outside)
                else ""
            )
        ),
    )
    return out
