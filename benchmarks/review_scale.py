"""Review workspace at the size of real datasets: each panel action, ours and the baseline code.

Builds synthetic datasets (one ``nola`` Classification with a confidence per sample, 10 classes,
a CLIP-sized FAISS store of class-clustered vectors; no image is decoded) of each size, then
times, median of ``--repeats``, the actions a reviewer takes, through the panels' own callbacks
driven by a real ``ExecutionContext`` (as the App sends them):

  panel_open        the NoLA panel opens (stages, counts, histogram, class table)
  threshold_move    the slider moves (flagging, queue, counts, histogram, grid)
  class_click       a row of the class table (the grid filters to it)
  decision          one decision (``decide``)
  next              the next sample of the queue (``next_in_queue``)
  card_click        one click in the sample card (decision + next sample + its card)
  propagation       propagation of 10 corrections to their neighbours
  export            export of the accepted set (1,000 accepted samples, csv)

The baseline is the code of ``--baseline-rev`` (default: the last commit before the review was
reworked for scale), extracted from git and run in its own process on an identical dataset, so
both sides are measured in one run on the same machine. JSON keys: ``review_<action>_s_<n>``
(ours) and ``baseline_review_<action>_s_<n>``.

    .venv/bin/python benchmarks/review_scale.py --json benchmarks/results/review_scale.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, baseline_code, loadavg, run_benchmark, table  # noqa: E402

BASELINE_REV = "e4f78f0"  # v0.2's last commit: the review workspace before this rework
ACTIONS = ("panel_open", "threshold_move", "class_click", "decision", "next", "card_click", "propagation", "export")
THRESHOLDS = (0.45, 0.55, 0.40, 0.60, 0.50, 0.35, 0.65)


# --------------------------------------------------------------------------- the two code versions


def _review_api():
    """The review functions of whichever code version is on the path (new module, else v0.2's)."""
    try:
        from fiftyone_nola.stages import review as api

        api.decide  # noqa: B018 - v0.2's stages.review has no decide
        return api, api
    except (ImportError, AttributeError):
        from fiftyone_nola.stages import review_card, review_workspace

        return review_workspace, review_card


def _timed(fn, repeats: int, setup=None) -> list[float]:
    out = []
    for r in range(repeats):
        arg = setup(r) if setup else None
        t0 = time.perf_counter()
        fn(arg) if setup else fn()
        out.append(time.perf_counter() - t0)
    return out


def run_actions(ds, repeats: int, tmp: Path) -> dict:
    """Seconds of each action (lists, one per repeat) on ``ds``."""
    from operators.panels import NolaPanel
    from operators.sample_panel import NolaSampleReview
    from panel_ctx import PanelCtx
    from synthetic_review import CLASSES

    rw, rc = _review_api()
    from fiftyone_nola.stages.export import export_accepted

    panel, card_panel = NolaPanel(), NolaSampleReview()
    out: dict[str, list[float]] = {}
    state: dict = {}

    def open_panel():
        nonlocal state
        pc = PanelCtx(ds)
        panel.on_load(pc.ctx)
        state = pc.state

    # Not timed: the dataset as the pipeline leaves it, flagged at the default threshold with the
    # review's indexes built (its last step, flag_for_review); v0.2's panel did this on opening.
    rw.flag_samples(ds, "nola", threshold=0.5)
    open_panel()  # first open, not timed
    out["panel_open"] = _timed(open_panel, repeats)

    def move(t):
        nonlocal state
        pc = PanelCtx(ds, state=state, value=t)
        panel.on_slider(pc.ctx)
        state = pc.state

    out["threshold_move"] = _timed(move, repeats, setup=lambda r: THRESHOLDS[r % len(THRESHOLDS)])
    move(0.5)

    def click(row):
        pc = PanelCtx(ds, state=state, row=row)
        panel.on_class_click(pc.ctx)

    out["class_click"] = _timed(click, repeats, setup=lambda r: r % len(CLASSES))

    out["decision"] = _timed(lambda sid: rw.decide(ds, [sid], "accept"), repeats, setup=lambda r: rw.next_in_queue(ds))
    out["next"] = _timed(lambda: rw.next_in_queue(ds), repeats)

    card_state: dict = {}

    def card_click(sid):
        nonlocal card_state
        pc = PanelCtx(ds, state=card_state, current_sample=sid)
        card_panel.on_accept(pc.ctx)
        card_state = pc.state

    def card_setup(r):
        nonlocal card_state
        sid = rw.next_in_queue(ds)
        pc = PanelCtx(ds, state=card_state, current_sample=sid)
        card_panel.on_change_current_sample(pc.ctx)  # the card is shown before the click
        card_state = pc.state
        return sid

    out["card_click"] = _timed(card_click, repeats, setup=card_setup)

    def correct_ten(r):
        try:
            ids = rw.queue_ids(ds, limit=10)
        except TypeError:  # v0.2: the whole queue
            ids = rw.queue_ids(ds)[:10]
        labels = dict(zip(*ds.select(ids).values(["id", "nola.label"])))
        for sid in ids:  # a different class than predicted: a real correction
            rw.decide(ds, [sid], "correct", CLASSES[(CLASSES.index(labels[sid]) + 1) % len(CLASSES)])
        return ids

    out["propagation"] = _timed(lambda ids: rc.propagate_corrections(ds, "nola", 0.9, k=10), repeats, correct_ten)

    ds.take(1000, seed=1).tag_samples("nola:accepted")
    out["export"] = _timed(
        lambda r: export_accepted(ds, str(tmp / f"export-{r}"), "nola", format="csv"), repeats, setup=lambda r: r
    )
    return out


def worker(args) -> None:
    """One code version on one size: build, measure, print JSON on the last line."""
    # The measured code first; the harness (tests/panel_ctx.py, tests/synthetic_review.py) from
    # this checkout if the baseline predates it.
    sys.path[:0] = [str(Path(args._code)), str(Path(args._code) / "tests")]
    sys.path.append(str(REPO / "tests"))
    os.chdir(args._code)
    import fiftyone as fo  # noqa: F401

    from synthetic_review import build_review_dataset

    t0 = time.perf_counter()
    ds = build_review_dataset(args._n, args.dim)
    build_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        t = run_actions(ds, args.repeats, Path(tmp))
    ds.delete()
    print(json.dumps({"build_s": build_s, "seconds": t, "loadavg": loadavg()}))


# --------------------------------------------------------------------------- driver


def measure(code: Path, n: int, args) -> dict:
    cmd = [sys.executable, __file__, "--_worker", "--_code", str(code), "--_n", str(n)]
    cmd += ["--repeats", str(args.repeats), "--dim", str(args.dim)]
    env = {**os.environ, "PYTHONPATH": f"{code}{os.pathsep}{code / 'tests'}"}
    print(f"--- {code.name} n={n:,} ---", flush=True)
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.child_timeout)
    if p.returncode != 0:
        raise RuntimeError(f"{code.name} n={n}: exit {p.returncode}\n{p.stderr[-3000:]}")
    r = json.loads(p.stdout.strip().splitlines()[-1])
    for action, secs in r["seconds"].items():
        print(f"  {action:<15} median {statistics.median(secs):8.3f} s  ({', '.join(f'{s:.3f}' for s in secs)})")
    return r


def run(args, results: dict, tables: list, tmp: Path) -> None:
    sides = [("review", REPO, args.sizes)]
    if args.baseline_rev != "none":
        sides.append(("baseline_review", baseline_code(args.baseline_rev, tmp), args.baseline_sizes))
    results["baseline_rev"] = args.baseline_rev
    medians: dict = {}
    for prefix, code, sizes in sides:
        for n in sizes:
            r = measure(code, n, args)
            results[f"{prefix}_raw_{n}"] = r
            for action, secs in r["seconds"].items():
                medians[(prefix, action, n)] = results[f"{prefix}_{action}_s_{n}"] = statistics.median(secs)
    for n in args.sizes:
        rows = []
        for a in ACTIONS:
            ours, base = medians.get(("review", a, n)), medians.get(("baseline_review", a, n))
            rows.append([a, base, ours, base / ours if base and ours else None])
        tables.append(table(["action", "baseline s", "ours s", "speed-up"], rows, f"n = {n:,} (median)"))
    if 100_000 in args.sizes and 1_000_000 in args.sizes:
        results["review_decision_ratio_1m_100k"] = (
            medians[("review", "decision", 1_000_000)] / medians[("review", "decision", 100_000)]
        )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--baseline-sizes", type=int, nargs="+", default=[10_000, 100_000])
    p.add_argument("--baseline-rev", default=BASELINE_REV, help="git revision of the baseline, or 'none'")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dim", type=int, default=512, help="stored vector width (CLIP ViT-B/32: 512)")
    p.add_argument("--child-timeout", type=float, default=7200)
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--txt", metavar="PATH")
    p.add_argument("--_worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--_code", help=argparse.SUPPRESS)
    p.add_argument("--_n", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._worker:
        worker(args)
        return 0
    return run_benchmark("review_scale", args, run, "nola-bench-review")


if __name__ == "__main__":
    sys.exit(main())
