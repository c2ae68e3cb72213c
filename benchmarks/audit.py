"""Labels an audit needs, by design: how many audited samples give a +-0.03 interval at 95 %.

Synthetic pools with known truth (``fiftyone_nola.core.audit.simulate``; no images, no model):
10,000 predictions, accuracy 0.90, 10 imbalanced classes, confidences that inform about
correctness (latent logit spread 2.0: the confidence tells right from wrong with an AUROC of
about 0.88, typical of a trained classifier). For each design and its estimator:

- ``classical``: a simple random audit, exact Clopper-Pearson interval;
- ``stratified``: confidence strata, Neyman allocation with an 80 % uniform floor (the default);
- ``ppi``: a simple random audit, prediction-powered inference with the confidence as predictor;
- ``ppi_calibrated``: the same audit, cross-prediction-powered inference with the confidence
  calibrated on the audit by cross-fitting (5 folds, binned);
- ``active``: inclusion probability growing with the expected error, the active-inference estimator.

The audit size is found by bisection on the mean interval half-width (1,000 simulated audits per
size, the same random numbers at every size), then its coverage of the true accuracy is measured
on 2,000 fresh audits ("validated": coverage >= 0.95 - 2 s.e.). The certificate's power at a
300-label audit (target 0.95, delta 0.05) and a sensitivity sweep (weaker / stronger confidences,
over- and under-confident ones) are reported next to it. Pure numpy: no database, seconds to minutes.

Usage::

    .venv/bin/python benchmarks/audit.py --json benchmarks/results/audit.json --txt benchmarks/results/audit.txt
    .venv/bin/python benchmarks/audit.py --quick    # fewer audits, no sweep: development
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import _common as C  # noqa: E402

from fiftyone_nola.core.audit import simulate as sim  # noqa: E402
from fiftyone_nola.core.audit.certify import certify  # noqa: E402
from fiftyone_nola.core.audit.designs import DEFAULT_KIND  # noqa: E402

DESIGNS = {  # benchmark name -> (design, estimator)
    "classical": ("uniform", "exact"),
    "stratified": ("stratified", "stratified"),
    "ppi": ("uniform", "ppi"),
    "ppi_calibrated": ("uniform", "ppi_calibrated"),
    "active": ("active", "active"),
}
DEFAULT = "stratified" if DEFAULT_KIND == "stratified" else DEFAULT_KIND


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="300 / 600 audits per size, no sweep")
    p.add_argument("--json", metavar="PATH", help="write the figures to this JSON file")
    p.add_argument("--txt", metavar="PATH", help="also write the printed tables to this file")
    p.add_argument("--half-width", type=float, default=0.03)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def describe(pop: sim.Population) -> dict:
    from sklearn.metrics import roc_auc_score

    bins = np.clip((pop.conf * 10).astype(int), 0, 9)
    ece = sum(
        abs(pop.conf[bins == b].mean() - pop.correct[bins == b].mean()) * np.mean(bins == b)
        for b in range(10)
        if np.any(bins == b)
    )
    return {
        "size": len(pop.conf),
        "accuracy": pop.accuracy,
        "auroc_confidence_vs_correct": float(roc_auc_score(pop.correct, pop.conf)),
        "ece": float(ece),
        "mean_confidence": float(pop.conf.mean()),
    }


def needed(pop, name: str, args, search_trials: int, check_trials: int) -> dict:
    kind, method = DESIGNS[name]
    found = sim.labels_needed(pop, kind, method, args.half_width, trials=search_trials, seed=args.seed)
    check = sim.interval_study(pop, found["n"], kind, method, check_trials, seed=args.seed + 7)
    floor = 0.95 - 2 * np.sqrt(0.95 * 0.05 / check_trials)
    return {
        "design": kind,
        "estimator": method,
        "labels": found["n"],
        "mean_audited": check["mean_audited"],
        "mean_half_width": check["mean_half_width"],
        "coverage": check["coverage"],
        "coverage_se": check["coverage_se"],
        "coverage_valid": check["coverage"] >= floor,
    }


def certificate_power(pop, name: str, n: int, trials: int, seed: int) -> dict:
    kind, _ = DESIGNS[name]
    data, _ = sim.audits(pop, n, kind, trials, seed=seed)
    c = certify(data, 0.95, 0.05)
    order = np.argsort(-pop.conf, kind="stable")
    region_acc = np.cumsum(pop.correct[order]) / np.arange(1, len(order) + 1)
    ok = region_acc >= 0.95
    best = int(np.flatnonzero(ok).max() + 1) if ok.any() else 0
    held = (c.index < 0) | (region_acc[c.candidates.size[np.maximum(c.index, 0)] - 1] >= 0.95)
    return {
        "audit": n,
        "mean_certified": float(c.certified.mean()),
        "mean_certified_share_of_largest_valid": float(c.certified.mean() / best) if best else None,
        "nothing_certified": float(np.mean(c.index < 0)),
        "held": float(np.mean(held)),
    }


def run(args) -> tuple[dict, list[str]]:
    search, check = (300, 600) if args.quick else (1000, 2000)
    results: dict = {"benchmark": "audit", "quick": args.quick, "half_width": args.half_width, "alpha": 0.05}
    tables = []
    pop = sim.population(size=10_000, accuracy=0.9, calibration="calibrated", classes=10, spread=2.0, seed=1)
    results["population"] = describe(pop)
    rows = {}
    for name in DESIGNS:
        t0 = time.perf_counter()
        rows[name] = needed(pop, name, args, search, check)
        rows[name]["seconds"] = time.perf_counter() - t0
        print(f"{name}: {rows[name]['labels']} labels, coverage {rows[name]['coverage']:.3f}", flush=True)
    base = rows["classical"]["labels"]
    for name, row in rows.items():
        row["fewer_than_classical"] = 1 - row["labels"] / base
        results[f"audit_labels_needed_{name}"] = row["labels"]
        results[f"audit_coverage_{name}"] = row["coverage"]
    results["designs"] = rows
    results["default_design"] = DEFAULT
    results["default_fewer_labels_than_classical"] = rows[DEFAULT]["fewer_than_classical"]
    results["goal_30pct_fewer_met"] = bool(
        rows[DEFAULT]["fewer_than_classical"] >= 0.30 and rows[DEFAULT]["coverage_valid"]
    )
    tables.append(
        C.table(
            ["design", "estimator", "labels", "fewer than classical", "half-width", "coverage", "valid"],
            [
                [
                    n,
                    r["estimator"],
                    r["labels"],
                    f"{r['fewer_than_classical']:.0%}",
                    r["mean_half_width"],
                    r["coverage"],
                    r["coverage_valid"],
                ]
                for n, r in rows.items()
            ],
            title=f"labels for a +-{args.half_width} interval at 95 % (accuracy {pop.accuracy:.3f}, "
            f"AUROC {results['population']['auroc_confidence_vs_correct']:.2f}); default: {DEFAULT}",
        )
    )
    power = {
        name: certificate_power(pop, name, 300, check, args.seed + 3) for name in DESIGNS if not name.startswith("ppi")
    }
    results["certificate_at_300"] = power
    tables.append(
        C.table(
            ["design", "mean certified", "share of largest valid region", "nothing certified", "held"],
            [
                [n, p["mean_certified"], p["mean_certified_share_of_largest_valid"], p["nothing_certified"], p["held"]]
                for n, p in power.items()
            ],
            title="certificate from a 300-label audit (target 0.95, delta 0.05; the ppi estimators use the classical audit's)",
        )
    )
    if not args.quick:
        results["sweep"] = sweep(args, search, check)
        tables.append(
            C.table(
                ["confidences", "AUROC", *DESIGNS],
                [[k, v["auroc"], *[v["labels"][n] for n in DESIGNS]] for k, v in results["sweep"].items()],
                title="labels needed (same target) for other pools, all at validated coverage unless marked",
            )
        )
    return results, tables


def sweep(args, search: int, check: int) -> dict:
    out = {}
    for label, cal, spread in (
        ("weaker (spread 1.5)", "calibrated", 1.5),
        ("stronger (spread 2.5)", "calibrated", 2.5),
        ("over-confident", "over", 2.0),
        ("under-confident", "under", 2.0),
    ):
        pop = sim.population(size=10_000, accuracy=0.9, calibration=cal, classes=10, spread=spread, seed=1)
        rows = {name: needed(pop, name, args, search, check) for name in DESIGNS}
        out[label] = {
            "auroc": describe(pop)["auroc_confidence_vs_correct"],
            "labels": {
                n: r["labels"] if r["coverage_valid"] else f"{r['labels']} (coverage {r['coverage']:.3f})"
                for n, r in rows.items()
            },
            "designs": rows,
        }
        print(f"{label}: {out[label]['labels']}", flush=True)
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    results, tables = run(args)
    results["machine"] = C.machine_facts()
    results["note"] = "pure numpy simulation: figures are labels and coverages, not speeds"
    return C.finish(results, tables, t0, args)


if __name__ == "__main__":
    raise SystemExit(main())
