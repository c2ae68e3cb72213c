"""The ``audit`` command: draw a random audit, report on it, or simulate one from ground truth."""

from __future__ import annotations

from fiftyone_nola.core.config import given
from fiftyone_nola.core.errors import NolaError
from fiftyone_nola.core.names import PREDICTIONS_FIELD


def _log(msg: str) -> None:
    print(msg, flush=True)


def _write_json(path, obj) -> None:
    import json

    if path:
        with open(path, "w") as f:
            json.dump(obj, f, indent=2, default=str)
        _log(f"report written to {path}")


def _audit_lines(r: dict) -> list[str]:
    """A report's figures as the shell prints them."""
    pct = f"{1 - r['alpha']:.0%}"
    prog = r.get("progress") or {}
    how = f"simulated from '{r['simulated_from']}', seed {r['seed']}" if r.get("simulated") else "decided by reviewers"
    lines = [
        f"audit of '{r['field']}': {r['n']} samples audited ({how}; drawn {prog.get('drawn')}, "
        f"pool {r['pool']}), design {r['design']['kind']}, estimator {r['method']}",
        f"accuracy {r['accuracy']:.3f} ({pct} interval {r['accuracy_low']:.3f} to {r['accuracy_high']:.3f})",
        f"certificate: {r['certificate']}",
    ]
    for row in r["per_class"]:
        lines.append(
            f"  {row['class']}: {row['accuracy']:.3f} [{row['low']:.3f}, {row['high']:.3f}] "
            f"({row['audited']} audited of {row['pool']})"
        )
    ex = r["export_accuracy"]["certified_and_reviewed"]
    if ex.get("exported"):
        lines.append(
            f"export of reviewed + certified labels: {ex['exported']} samples, accuracy {ex['estimate']:.3f} "
            f"({pct} interval {ex['low']:.3f} to {ex['high']:.3f})"
        )
    if r.get("note"):
        lines.append(f"note: {r['note']}")
    return lines


def cmd_audit(args) -> dict:
    """``audit``: draw a random audit, report on it, or simulate one from a ground-truth field."""
    from fiftyone_nola.core.audit.config import AuditConfig
    from fiftyone_nola.stages import audit, fo_io

    if args.simulate_from and args.draw is None:
        raise NolaError("--simulate-from needs --draw N: the size of the simulated audit")
    if args.draw is None and not args.report and not args.flag_uncertified:
        raise NolaError("Give --draw N (draw an audit), --report (report on it) or --simulate-from FIELD --draw N")
    ds = fo_io.get_dataset(args.dataset)
    cfg = given(
        AuditConfig, design=args.design, method=args.method, target=args.target, delta=args.delta, alpha=args.alpha
    )
    seed = 0 if args.seed is None else args.seed
    if args.simulate_from:
        out = audit.simulate_audit(ds, args.simulate_from, args.draw, args.field or PREDICTIONS_FIELD, seed, cfg)
    elif args.draw is not None:
        out = audit.draw_audit(ds, args.draw, args.field or PREDICTIONS_FIELD, seed, cfg, replace_existing=args.replace)
        _log(
            f"drew {out['drawn']} samples for audit (asked {out['requested']}; the size of a Poisson draw varies) "
            f"from {out['pool']} undecided samples of '{out['field']}', design {out['design']}, seed {seed}. "
            "Decide them in the App (NoLA panel, audit) or with fiftyone_nola.decide, then: audit --report"
        )
    else:
        out = audit.audit_report(ds, args.field, args.target, args.delta, args.alpha)
    if "accuracy" in out:
        for line in _audit_lines(out):
            _log(line)
    if args.flag_uncertified:
        flagged = audit.flag_uncertified(ds, args.field, report=out if "threshold" in out else None)
        _log(flagged["message"])
        out = {**out, "flagged": {k: flagged[k] for k in ("flagged", "queue", "certified_threshold")}}
    _write_json(args.json_out, out)
    return out
