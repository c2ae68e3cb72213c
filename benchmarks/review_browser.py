"""The review panel in a real browser on a large dataset: each action timed from the click to the
updated view, in the FiftyOne App served by its own server and driven in Debian's Chromium. Both
ends are read on the page's clock: the time of the click (or key) event the page received, and the
first animation frame that shows the result. Playwright's time from its call to that frame, which
adds its own work before the click lands (waiting for the element to be stable, scrolling, the
browser protocol: 0.03-0.4 s here), is reported beside it (``*_wall_s_*``).

Builds (once; reused by name afterwards, ``--rebuild`` to start again) a persistent dataset of
``--n`` samples as the pipeline leaves it: tiny generated thumbnails (16x16 JPEGs, written once
under the cache directory), one ``nola`` Classification with a confidence per sample over 10
classes, a CLIP-sized FAISS store of class-clustered vectors (tests/synthetic_review.py, as
benchmarks/review_scale.py builds them) and the pipeline's review preparation
(``prepare_for_review``: class list, flagging at the default threshold, Brain runs). A reused
dataset has its review reset to that state first. Then starts the App server
(tests/app_harness.py) and times, median of ``--repeats``, what the user waits for:

  panel_open      click on the panel's entry -> "N of M samples flagged" shown
  threshold_move  type a threshold in the number field and leave it (Tab) -> the flagged count and
                  the grid's entry count updated (from leaving the field: the value applies then)
  class_click     a row of the class table -> the grid shows that class's flagged samples
  open_queue      "Review the queue" -> the sample view shows the queue's first sample and its card
  decision        a class button on the sample card -> the next sample shown in the sample view
  next            "Skip" on the sample card -> the next sample shown
  back_to_grid    "Back to the grid" -> the panel's counts include the decision

The panel's own texts (counts, the queue button) are rendered by its Python ``render``: each
such action is watched for ``SETTLE_MS`` more, and a frame that no longer shows the result (a late
render of older state) is recorded under ``undone``.
Each action also checks that what it shows is right (counts against the dataset, decisions
recorded, the sample shown is the queue's next one, one threshold value sent per move): the
same code is run by tests/test_browser_scale.py on a small dataset. Screenshots of each step go
to test-artifacts/browser/review_<n>k/ (a baseline: review_<rev label>_<n>k/).

The baseline (``--baseline-rev``, default v0.2's last commit, as benchmarks/review_scale.py) runs
its own plugin and library in its own App server on an identical dataset of
``--baseline-sizes`` samples (rebuilt each time). JSON keys: ``browser_review_<action>_s_<n>``
(ours) and ``baseline_browser_review_<action>_s_<n>``; an action whose view never showed the
right state within ``--timeout`` is null, with the reason under ``*_failures``.

    nice -n 10 .venv/bin/python benchmarks/review_browser.py \\
        --json benchmarks/results/review_browser.json --txt benchmarks/results/review_browser.txt
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1] / "tests")]
from _common import REPO, baseline_code, finish, loadavg, machine_facts, table  # noqa: E402

BASELINE_REV = "e4f78f0"  # v0.2's last commit: the review workspace before it was reworked for scale
ACTIONS = ("panel_open", "threshold_move", "class_click", "open_queue", "decision", "next", "back_to_grid")
TARGETS = {  # issue 24's targets at 100,000 samples (seconds)
    "panel_open": 1.0,
    "threshold_move": 1.0,
    "class_click": 1.0,
    "decision": 0.3,
    "next": 0.3,
    "back_to_grid": 1.0,
}
# The panel callback each action's input sends (--trace splits the action's time at it).
CALLBACKS = {
    "panel_open": ("on_load",),
    "threshold_move": ("on_number", "on_slider"),
    "class_click": ("on_class_click",),
    "open_queue": ("on_start_review",),
    "decision": ("on_pick", "on_accept"),
    "next": ("on_skip",),
    "back_to_grid": ("on_close",),
}
# Actions whose result is the panel's own text: checked again this long after it showed.
SETTLE, SETTLE_MS = ("panel_open", "threshold_move", "back_to_grid"), 1500
THRESHOLDS = (0.45, 0.55, 0.40, 0.60, 0.35, 0.65)
DB_NAME = "nola_bench_review_browser"
PREFIX = "review-browser"
FLAGGED, QUEUED = "nola:flagged", "nola:review"
DECIDED = ["nola:accepted", "nola:corrected", "nola:rejected"]

NOLA = '[data-cy="panel-content-nola_panel"]'
CARD = '[data-cy="panel-content-nola_sample_review"]'
MODAL = '[data-cy="modal"]'

# True once every condition holds; polled at every animation frame, so a time is the first frame
# that shows the new state. Conditions: text in an element, the grid's entry count, an element
# hidden, the sample view showing another sample than `not` (its id in the URL and the sidebar).
_SHOWN_JS = """(conds) => {
  const text = (sel) => { const e = document.querySelector(sel); return e ? e.innerText : null; };
  for (const c of conds) {
    if (c.kind === "text") {
      const t = text(c.sel);
      if (t === null || !t.includes(c.value)) return false;
    } else if (c.kind === "grid") {
      const t = text('[data-cy="entry-counts"]');
      if (!t || parseInt(t.trim().split(/\\s/)[0].replace(/,/g, ""), 10) !== c.value) return false;
    } else if (c.kind === "hidden") {
      const e = document.querySelector(c.sel);
      if (e && e.offsetParent !== null) return false;
    } else if (c.kind === "sample") {
      const id = new URL(location.href).searchParams.get("id");
      const m = text('[data-cy="modal"]');
      if (!id || id === c.not || m === null || !m.includes(id)) return false;
    }
  }
  if (window.__nolaShownAt == null) window.__nolaShownAt = performance.now();
  return true;
}"""

# The page's own record of what the person did: each click and key, with the event's time on the
# page's clock (the one __nolaShownAt is read on). Playwright's own work before a click lands
# (waiting for the element to be stable, scrolling, the browser protocol) is not the person's wait.
_INPUTS_JS = """
window.__nolaInputs = [];
window.__nolaLongTasks = [];
try {  // main-thread tasks over 50 ms (--trace): the page busy rather than waiting for the server
  new PerformanceObserver((l) => window.__nolaLongTasks.push(...l.getEntries().map((e) => [e.startTime, e.duration])))
    .observe({type: "longtask"});
} catch (e) {}
for (const type of ["click", "keydown"]) {
  window.addEventListener(type, (e) => window.__nolaInputs.push({type, key: e.key || null, t: e.timeStamp}), true);
}
"""


# The first frame within ``ms`` where the conditions no longer hold: its time and the panel's text
# (null: they held throughout).
_STAYS_JS = (
    """async ({conds, ms, sel}) => {
  const shown = """
    + _SHOWN_JS
    + """;
  const t0 = performance.now();
  while (performance.now() - t0 < ms) {
    await new Promise((r) => requestAnimationFrame(r));
    if (!shown(conds)) {
      const e = document.querySelector(sel);
      return {ms: performance.now() - t0, text: e ? e.innerText : ""};
    }
  }
  return null;
}"""
)


def _what(request) -> str:
    """A request in a few words: the GraphQL operation, the operator and its method, or the path."""
    path = request.url.split("?")[0].split("/", 3)[-1]
    try:
        body = json.loads(request.post_data or "{}") if request.method == "POST" else {}
    except ValueError:
        body = {}
    if not isinstance(body, dict):
        return f"{request.method} /{path}"
    if "query" in body:
        m = re.search(r"(query|mutation|subscription)\s+(\w+)", body["query"])
        return f"graphql {m.group(2) if m else '?'}"
    if "operator_uri" in body:
        return f"/{path} {body['operator_uri'].split('/')[-1]} {(body.get('params') or {}).get('__method__') or ''}"
    return f"{request.method} /{path}"


def text(sel: str, value: str) -> dict:
    return {"kind": "text", "sel": sel, "value": value}


def grid(n: int) -> dict:
    return {"kind": "grid", "value": int(n)}


# --------------------------------------------------------------------------- the dataset


def cache_dir() -> Path:
    """Thumbnails and stores live here across runs: under $NOLA_HOME if set, else /tmp."""
    home = os.environ.get("NOLA_HOME")
    return Path(home) / "bench-review-browser" if home else Path(tempfile.gettempdir()) / "nola-bench-review-browser"


def isolate(cache: Path) -> None:
    """Our own database name and NOLA_HOME (set before fiftyone is imported): never the user's."""
    os.environ.setdefault("FIFTYONE_DATABASE_NAME", DB_NAME)
    os.environ.setdefault("FIFTYONE_DATABASE_VALIDATION", "false")
    os.environ.setdefault("FIFTYONE_DO_NOT_TRACK", "true")
    os.environ["NOLA_HOME"] = str(cache / "home")
    os.environ.pop("NOLA_RANDOM_INIT", None)


def reset_review(ds) -> None:
    """The review as ``prepare_for_review`` leaves it: no decision, flagged at the default threshold."""
    from fiftyone_nola.stages import review as rv

    ds._sample_collection.update_many({}, {"$set": {"tags": [], rv.QUEUE_FIELD: None, rv.CORRECTIONS_FIELD: None}})
    info = dict(ds.info or {})
    info.pop(rv.SETTINGS_KEY, None)
    ds.info = info
    ds.save()
    ds.reload()
    rv.flag_samples(ds, "nola", threshold=rv.DEFAULT_THRESHOLD)


def prepare(samples, classes) -> None:
    """The pipeline's last step on labels made by other means (v0.2: no flagging there; its panel
    flags on first opening)."""
    from fiftyone_nola.pipeline import prepare_for_review

    try:
        prepare_for_review(samples, classes, "nola")
    except TypeError:  # v0.2: prepare_for_review(samples, classes)
        prepare_for_review(samples, classes)


def dataset(n: int, name: str, cache: Path, rebuild: bool, dim: int):
    """The persistent benchmark dataset ``name`` (built, or reused with its review reset)."""
    import fiftyone as fo

    from synthetic_review import CLASSES, build_review_dataset, write_thumbnails

    if fo.dataset_exists(name):
        ds = fo.load_dataset(name)
        if not rebuild and len(ds) == n and _store_exists(ds):
            print(f"reusing dataset {name!r} ({n:,} samples); review reset", flush=True)
            reset_review(ds)
            return ds
        ds.delete()
    t0 = time.perf_counter()
    paths = write_thumbnails(cache / "thumbs", n)
    t1 = time.perf_counter()
    ds = build_review_dataset(n, dim=dim, name=name, filepaths=paths)
    ds.persistent = True
    prepare(ds, CLASSES)
    print(f"built {name!r}: thumbnails {t1 - t0:.0f} s, dataset + review preparation {time.perf_counter() - t1:.0f} s")
    return ds


def _store_exists(ds) -> bool:
    from fiftyone_nola.stages.brain_runs import stored_index_path

    path = stored_index_path(ds, "clip")
    return bool(path) and Path(path).exists()


# --------------------------------------------------------------------------- the driver


class Truth:
    """What the view must show, read from the dataset with FiftyOne alone (any code version)."""

    def __init__(self, ds):
        import numpy as np

        self.ds = ds
        labels, conf = ds.values(["nola.label", "nola.confidence"])
        self.labels, self.conf, self.n = np.asarray(labels), np.asarray(conf, dtype=float), len(labels)

    def below(self, t: float, cls: Optional[str] = None) -> int:
        mask = self.conf < t
        return int((mask & (self.labels == cls)).sum() if cls else mask.sum())

    def tag_count(self, tags) -> int:
        return len(self.ds.match_tags(tags))

    def progress(self) -> tuple[int, int, int]:
        """(reviewed among the flagged, flagged, queue)."""
        flagged = self.ds.match_tags(FLAGGED)
        return len(flagged.match_tags(DECIDED)), len(flagged), self.tag_count(QUEUED)


class ReviewDriver:
    """A reviewer in the App: each action clicked, timed until the view shows its result, checked.

    ``strict``: a wrong or late view raises (tests); otherwise it is recorded in ``failures`` and
    the run goes on (benchmarks: an old version may never show some states). ``queue_next(after)``
    is the code's own next sample of the queue, checked against the one the sample view shows."""

    def __init__(
        self, page, ds, shots: Optional[Path] = None, timeout_s: float = 60, strict: bool = True, trace: bool = False
    ):
        self.page, self.ds, self.truth = page, ds, Truth(ds)
        self.shots, self.timeout_ms, self.strict = shots, timeout_s * 1000, strict
        self.seconds: dict[str, list] = {a: [] for a in ACTIONS}  # from the click event to the frame
        self.callback: dict[str, list] = {a: [] for a in ACTIONS}  # (start, seconds) of its panel callback
        self.wall: dict[str, list] = {a: [] for a in ACTIONS}  # from Playwright's call to the frame
        self.failures: dict[str, list] = {}
        self.facts: dict = {"threshold_values_sent": [], "decisions": [], "shown_after": [], "undone": []}
        self.nola, self.card = page.locator(NOLA), page.locator(CARD)
        self._sent: list[float] = []
        self._events: list = []  # (seconds since the action's click, panel method) of the current action
        self._t_action = time.perf_counter()
        self._n_shots = 0
        self.trace = trace
        self._open: dict = {}  # request -> (start since the action's click, what it asks)
        self._requests: list = []  # (start, seconds, what) of the current action's finished requests
        page.add_init_script(_INPUTS_JS)
        page.on("request", self._watch)
        if trace:
            page.on("requestfinished", self._finished)
        if shots:
            shots.mkdir(parents=True, exist_ok=True)
            for old in shots.glob("*.png"):
                old.unlink()

    # ------------------------------------------------------------------ plumbing

    def _watch(self, request) -> None:
        """Threshold values the page sends to the panel (each new one is one flagging)."""
        if self.trace:
            self._open[request] = (time.perf_counter() - self._t_action, _what(request))
        if not request.url.endswith("/operators/execute"):
            return
        try:
            body = json.loads(request.post_data or "{}")
        except ValueError:
            return
        params = body.get("params") or {}
        if str(body.get("operator_uri", "")).endswith("/nola_panel"):  # which events render the panel, when
            self._events.append((round(time.perf_counter() - self._t_action, 3), params.get("__method__")))
        if str(body.get("operator_uri", "")).endswith("/nola_panel") and str(params.get("path", "")).startswith(
            "threshold"
        ):
            if isinstance(params.get("value"), (int, float)):
                self._sent.append(round(float(params["value"]), 4))

    def _finished(self, request) -> None:
        start = self._open.pop(request, None)
        if start is not None and start[0] >= 0:
            self._requests.append(
                (round(start[0], 3), round(time.perf_counter() - self._t_action - start[0], 3), start[1])
            )

    def shot(self, name: str) -> None:
        if not self.shots:
            return
        self._n_shots += 1
        try:  # a busy machine can take long to paint: never a reason to fail the run
            self.page.screenshot(path=str(self.shots / f"{self._n_shots:02d}-{name}.png"), timeout=120_000)
        except Exception as e:
            print(f"  (screenshot {name} failed: {e})", flush=True)

    def wait(self, conds: list, timeout_ms: Optional[float] = None) -> None:
        self.page.wait_for_function(_SHOWN_JS, arg=conds, polling="raf", timeout=timeout_ms or self.timeout_ms)

    def timed(self, action: str, act: Callable[[], None], conds: list, trigger: str = "click") -> Optional[float]:
        """Seconds from the person's input to the first frame showing ``conds`` (None if never):
        from the ``trigger`` event (``"click"``, or a key's name: the last such keydown) that
        ``act`` makes the page receive. Playwright's wall time from ``act`` goes to ``wall``."""
        page_t0 = self.page.evaluate("window.__nolaInputs = []; window.__nolaShownAt = null; performance.now()")
        t0 = self._t_action = time.perf_counter()
        self._events, self._requests = [], []
        self._open = {r: (-1.0, w) for r, (_, w) in self._open.items()}  # an earlier action's
        try:
            act()
            self.wait(conds)
        except Exception as e:
            if self.strict:
                raise AssertionError(f"{action}: the view never showed {conds}") from e
            self.failures.setdefault(action, []).append(
                f"not shown within {self.timeout_ms / 1000:.0f} s: {conds} ({e})"
            )
            self.seconds[action].append(None)
            self.wall[action].append(None)
            return None
        wall = time.perf_counter() - t0
        seen = self.page.evaluate(
            "({inputs: window.__nolaInputs, shown: window.__nolaShownAt, long: window.__nolaLongTasks})"
        )
        hits = [
            e["t"]
            for e in seen["inputs"]
            if (e["type"] == "click") == (trigger == "click") and e["key"] in (None, trigger)
        ]
        dt = (seen["shown"] - hits[-1]) / 1000 if hits and seen["shown"] is not None else wall
        self.seconds[action].append(dt)
        self.wall[action].append(wall)
        print(f"  {action:<15} {dt:7.3f} s  (Playwright's call to the frame {wall:.3f} s)", flush=True)
        if self.trace:  # each request's start, from the input event (the page's clock, as near as it can be read)
            click = hits[-1] if hits else page_t0
            since = (click - page_t0) / 1000
            reqs = [(round(start - since, 3), secs, what) for start, secs, what in self._requests]
            reqs += [
                (round((t - click) / 1000, 3), round(ms / 1000, 3), "page busy (a task over 50 ms)")
                for t, ms in seen["long"] or []
                if t + ms >= click
            ]
            self.facts.setdefault("requests", []).append({"action": action, "s": dt, "requests": reqs})
            self.callback[action].append(_callback(action, reqs))
            for start, secs, what in sorted(reqs):
                if start <= dt and not what.startswith("GET /media"):
                    print(f"      +{start:6.3f} {secs:6.3f} s  {what}", flush=True)
        if action in SETTLE:  # the panel's text is its last render: a late stale one would undo it
            undone = self.page.evaluate(_STAYS_JS, {"conds": conds, "ms": SETTLE_MS, "sel": NOLA})
            if undone is not None:
                lines = [x for x in undone["text"].splitlines() if "flagged below" in x or "queue" in x]
                self.page.wait_for_timeout(500)
                self.facts["undone"].append(
                    {
                        "action": action,
                        "after_s": dt,
                        "at_ms": undone["ms"],
                        "shown": lines,
                        "panel_events": list(self._events),
                    }
                )
                print(f"  ({action}: shown, then undone {undone['ms']:.0f} ms later: {lines})", flush=True)
        return dt

    def attempt(self, action: str, step: Callable, *args) -> None:
        """``step(*args)``; a benchmark (not strict) records what broke and goes on with the walk."""
        if self.strict:
            step(*args)
            return
        try:
            step(*args)
        except Exception as e:
            self.failures.setdefault(action, []).append(f"{type(e).__name__}: {str(e)[:300]}")

    def check(self, action: str, ok: bool, what: str) -> None:
        if ok:
            return
        if self.strict:
            raise AssertionError(f"{action}: {what}")
        self.failures.setdefault(action, []).append(what)

    def shown_id(self) -> Optional[str]:
        m = re.search(r"[?&]id=([0-9a-f]{24})", self.page.url)
        return m.group(1) if m else None

    def threshold(self) -> float:
        self.ds.reload()
        t = ((self.ds.info or {}).get("nola_review") or {}).get("threshold")
        return 0.5 if t is None else float(t)

    # ------------------------------------------------------------------ actions

    def open_app(self, base: str) -> None:
        self.page.goto(f"{base}/datasets/{self.ds.name}", wait_until="domcontentloaded", timeout=120_000)
        self.wait([grid(self.truth.n)], timeout_ms=180_000)
        self.shot("grid")

    def panel_open(self, timed: bool = True) -> None:
        t = self.threshold()
        k, n = self.truth.below(t), self.truth.n
        self.page.locator('[data-cy="new-panel-btn"]').first.click(timeout=120_000)
        option = self.page.locator('[data-cy="new-panel-option-nola_panel"]')
        option.wait_for()
        conds = [text(NOLA, f"{k} of {n} samples flagged")]
        if timed:
            self.timed("panel_open", option.click, conds)
        else:  # the first opening loads the plugin's code into the page: timed on its own
            t0 = time.perf_counter()
            option.click()
            self.wait(conds, timeout_ms=max(self.timeout_ms, 180_000))
            self.facts["panel_open_first_s"] = time.perf_counter() - t0

    def panel_close(self) -> None:
        tab = self.page.locator('[data-cy="panel-tab-nola_panel"]')
        tab.hover()
        tab.locator("svg").last.click()
        self.page.locator(NOLA).wait_for(state="hidden")

    def threshold_move(self, t: float) -> None:
        """Type ``t`` in the number field (as a person does: key by key) and leave it with Tab."""
        before = self.threshold()
        k, n = self.truth.below(t), self.truth.n
        field = self.nola.locator('input[type="number"]').first
        # Selected, then typed over: emptying the field first (fill("")) lets the panel put the
        # stored value back before the first key lands, and the keys then edit that value.
        field.click()
        field.press("Control+A")
        self._sent.clear()

        def act():
            field.press_sequentially(str(t))
            field.press("Tab")

        conds = [text(NOLA, f"{k} of {n} samples flagged below {t:.2f}"), grid(k)]
        self.timed("threshold_move", act, conds, trigger="Tab")  # from leaving the field: the value applies
        sent = sorted({v for v in self._sent if abs(v - before) > 1e-9})
        self.facts["threshold_values_sent"].append({"from": before, "to": t, "new_values": sent})
        self.check("threshold_move", sent == [round(t, 4)], f"one flagging per move: {before} -> {t} sent {sent}")
        self.check("threshold_move", self.truth.tag_count(FLAGGED) == k, f"{k} samples tagged {FLAGGED}")
        self.check("threshold_move", self.threshold() == t, f"stored threshold {self.threshold()} != {t}")

    def class_click(self, cls: str) -> None:
        k = self.truth.below(self.threshold(), cls)
        cell = self.nola.get_by_role("cell", name=cls, exact=True).first
        self.timed("class_click", cell.click, [grid(k)])

    def open_queue(self, first_time: bool) -> str:
        reviewed, flagged, _ = self.truth.progress()
        button = self.nola.get_by_role("button", name=re.compile(r"^Review the queue"))
        conds = [{"kind": "sample", "not": None}, text(CARD, f"reviewed {reviewed} of {flagged} flagged")]
        if first_time:  # the sample view's panel tab, chosen once per session
            button.click()
            self.page.locator(MODAL).wait_for()
            self.page.locator('[data-cy="panel-tab-nola_sample_review"]').click()
            self.wait(conds)
        else:
            self.timed("open_queue", button.click, conds)
        return self.shown_id()

    def decision(self, label_of: Callable[[str, list], str], queue_next) -> None:
        """One click on a class button of the card; the sample view moves to the queue's next."""
        sid = self.shown_id()
        reviewed, flagged, _ = self.truth.progress()
        pred = self.card.get_by_role("button", name=re.compile("^Accept: ")).inner_text().split(": ", 1)[1].strip()
        label = label_of(pred, list(self.ds.default_classes))
        button = self.card.get_by_role("button", name=label, exact=True)
        conds = [{"kind": "sample", "not": sid}, text(CARD, f"reviewed {reviewed + 1} of {flagged} flagged")]
        self.timed("decision", button.click, conds)
        shown = self.shown_id()
        tags, stored = (v[0] for v in self.ds.select(sid).values(["tags", "nola_reviewed.label"]))
        want = "nola:accepted" if label == pred else "nola:corrected"
        self.facts["decisions"].append({"id": sid, "prediction": pred, "label": label, "tags": tags})
        self.check("decision", want in tags, f"{sid} decided {label} (prediction {pred}) has tags {tags}")
        if label != pred:
            self.check("decision", stored == label, f"{sid} corrected to {label}: stored {stored}")
        if queue_next is not None:
            self.check(
                "decision", shown == queue_next(sid), f"after {sid} the view shows {shown}, not the queue's next"
            )

    def next(self, queue_next) -> None:
        sid = self.shown_id()
        want = queue_next(sid) if queue_next is not None else None
        button = self.card.get_by_role("button", name="Skip", exact=True)
        self.timed("next", button.click, [{"kind": "sample", "not": sid}])
        self.facts["shown_after"].append({"skipped": sid, "shown": self.shown_id()})
        if want is not None:
            self.check("next", self.shown_id() == want, f"Skip from {sid} shows {self.shown_id()}, not {want}")

    def back_to_grid(self) -> None:
        reviewed, flagged, queue = self.truth.progress()
        button = self.card.get_by_role("button", name="Back to the grid", exact=True)
        conds = [
            {"kind": "hidden", "sel": MODAL},
            text(NOLA, f"review progress {reviewed} / {flagged}"),
            text(NOLA, f"queue {queue}"),
        ]
        self.timed("back_to_grid", button.click, conds)


def _callback(action: str, reqs: list) -> Optional[list]:
    """``[start, seconds]`` of the first panel callback the action's input sent (None if none
    was seen): what comes before it is the App sending the event, after it the App showing what
    the callback returned."""
    mine = [(start, secs) for start, secs, what in reqs if what.split()[-1] in CALLBACKS[action] and start >= 0]
    return list(min(mine)) if mine else None


def _alternate(i: int):
    """Round ``i``'s pick: the predicted class (an accept) or the next one (a correction)."""

    def pick(pred: str, classes: list) -> str:
        return pred if i % 2 == 0 else classes[(classes.index(pred) + 1) % len(classes)]

    return pick


def drive(
    page, ds, base: str, repeats: int, shots: Optional[Path], queue_next=None, strict=True, timeout_s=60, trace=False
):
    """The whole walk: open the App and the panel, move the threshold, click classes, then
    ``repeats`` rounds of (review the queue, one decision, skip, back to the grid). Returns the
    driver (its ``seconds``, ``failures`` and ``facts``)."""
    d = ReviewDriver(page, ds, shots, timeout_s, strict, trace)
    d.open_app(base)
    d.panel_open(timed=False)
    d.shot("panel-open")
    for _ in range(repeats):
        d.panel_close()
        d.panel_open()
    for r in range(repeats):
        t = next(x for x in THRESHOLDS[r:] + THRESHOLDS if abs(x - d.threshold()) > 1e-9)
        d.attempt("threshold_move", d.threshold_move, t)
        if r == 0:
            d.shot(f"threshold-{t:.2f}")
    t = d.threshold()
    shown = d.truth.below(t)
    rows = sorted({str(c) for c in d.truth.labels}, key=lambda c: -d.truth.below(t, c))
    for r in range(repeats):  # classes whose grid differs from the one shown before
        cls = next(c for c in rows[r:] + rows if d.truth.below(t, c) != shown)
        d.attempt("class_click", d.class_click, cls)
        shown = d.truth.below(t, cls)
        if r == 0:
            d.shot(f"class-{cls}")
    for r in range(repeats):
        d.attempt("open_queue", d.open_queue, r == 0)
        if r == 0:
            d.shot("sample-view")
        d.attempt("decision", d.decision, _alternate(r), queue_next)
        if r == 0:
            d.shot("decided-next-sample")
        d.attempt("next", d.next, queue_next)
        d.attempt("back_to_grid", d.back_to_grid)
        if r == 0:
            d.shot("back-to-the-grid")
    return d


def our_queue_next(ds):
    """This version's next sample of the queue after ``sid`` (what the card must open)."""
    from fiftyone_nola.stages import review as rv

    return lambda sid: rv.next_in_queue(ds, after=sid)


# --------------------------------------------------------------------------- one side, one size


def shots_name(label: str, n: int) -> str:
    """review_100k (ours), review_v0.2_10k (a baseline)."""
    size = f"{n // 1000}k" if n % 1000 == 0 else str(n)
    return f"review_{size}" if label == "ours" else f"review_{label}_{size}"


def worker(args) -> None:
    """One code version on one size, in its own process: dataset, App server, browser, timings."""
    from playwright.sync_api import sync_playwright

    code = Path(args._code)
    sys.path[:0] = [str(code)]
    cache = Path(args.cache_dir) if args.cache_dir else cache_dir()
    isolate(cache)
    import fiftyone as fo

    from app_harness import AppServer, chromium

    ours = code.resolve() == REPO
    name = f"{PREFIX}-{args._n}" if ours else f"{PREFIX}-{args._label}-{args._n}"
    ds = dataset(args._n, name, cache, args.rebuild or not ours, args.dim)
    shots = REPO / "test-artifacts" / "browser" / shots_name(args._label, args._n)
    load0 = loadavg()
    server = AppServer(cache / f"server-{args._label}.log", code=code)
    try:
        base = server.wait_ready()
        with sync_playwright() as pw, chromium(pw, {"width": 1600, "height": 1000}, 120_000) as context:
            page = context.new_page()
            try:
                d = drive(
                    page,
                    ds,
                    base,
                    args.repeats,
                    shots,
                    our_queue_next(ds) if ours else None,
                    strict=False,
                    timeout_s=args.timeout,
                    trace=args.trace,
                )
            except Exception:
                with contextlib.suppress(Exception):
                    page.screenshot(path=str(shots / "failure.png"), timeout=60_000)
                raise
    finally:
        server.stop()
    if not ours:
        ds.delete()
    out = {
        "seconds": d.seconds,
        "wall": d.wall,
        "callback": d.callback,
        "failures": d.failures,
        "facts": d.facts,
        "loadavg": [load0, loadavg()],
    }
    out["fiftyone"] = fo.__version__
    print(json.dumps(out))


# --------------------------------------------------------------------------- driver


def measure(code: Path, label: str, n: int, args) -> dict:
    cmd = [sys.executable, __file__, "--_worker", "--_code", str(code), "--_n", str(n), "--_label", label]
    cmd += ["--repeats", str(args.repeats), "--dim", str(args.dim), "--timeout", str(args.timeout)]
    cmd += ["--rebuild"] if args.rebuild else []
    cmd += ["--trace"] if args.trace else []
    cmd += ["--cache-dir", args.cache_dir] if args.cache_dir else []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(code), str(REPO / "tests")])}
    print(f"--- {label} n={n:,} ---", flush=True)
    p = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True, timeout=args.child_timeout)
    if p.returncode != 0:
        raise RuntimeError(f"{label} n={n}: exit {p.returncode}\n{p.stdout[-3000:]}")
    print(p.stdout, end="", flush=True)
    return json.loads(p.stdout.strip().splitlines()[-1])


def median(secs: list) -> Optional[float]:
    done = [s for s in secs if s is not None]
    return statistics.median(done) if done and len(done) == len(secs) else None


def split_at_callback(seconds: list, callbacks: list) -> dict:
    """Medians of the three parts of an action (--trace): the App until it sends the panel's
    callback (``app_before``), the callback on the server (``callback``), the App from its reply to
    the frame (``app_after``). Empty without a trace."""
    parts = [(cb[0], cb[1], s - cb[0] - cb[1]) for s, cb in zip(seconds, callbacks) if s is not None and cb is not None]
    if not parts:
        return {}
    names = ("app_before", "callback", "app_after")
    return {k: round(statistics.median(p[i] for p in parts), 3) for i, k in enumerate(names)}


def run(args, results: dict, tables: list) -> None:
    sides = [("ours", "browser_review", REPO, args.sizes)]
    tmp = Path(tempfile.mkdtemp(prefix="nola-bench-review-browser-"))
    if args.baseline_rev != "none":
        sides.append(("v0.2", "baseline_browser_review", baseline_code(args.baseline_rev, tmp), args.baseline_sizes))
    results["baseline_rev"] = args.baseline_rev
    for label, prefix, code, sizes in sides:
        for n in sizes:
            r = measure(code, label, n, args)
            results[f"{prefix}_raw_{n}"] = r
            results.setdefault("fiftyone_version", r["fiftyone"])
            rows = []
            for a in ACTIONS:
                m = results[f"{prefix}_{a}_s_{n}"] = median(r["seconds"][a])
                results[f"{prefix}_{a}_wall_s_{n}"] = median(r["wall"][a])
                cb = split_at_callback(r["seconds"][a], (r.get("callback") or {}).get(a) or [])
                for part, v in cb.items():
                    results[f"{prefix}_{a}_{part}_s_{n}"] = v
                target = TARGETS.get(a) if n >= 100_000 else None
                secs = ", ".join("-" if s is None else f"{s:.3f}" for s in r["seconds"][a])
                ok = None if m is None or target is None else ("yes" if m <= target else "NO")
                parts = [cb.get(k) for k in ("app_before", "callback", "app_after")]
                rows.append([a, m, secs, results[f"{prefix}_{a}_wall_s_{n}"], *parts, target, ok])
            if r["failures"]:
                results[f"{prefix}_failures_{n}"] = r["failures"]
            undone = r["facts"].get("undone") or []
            results[f"{prefix}_undone_{n}"] = undone
            title = (
                f"{label}, n = {n:,} (median of {args.repeats}; load {r['loadavg'][0]:.1f} -> {r['loadavg'][1]:.1f})"
            )
            head = [
                "action",
                "median s",
                "each s",
                "Playwright call s",
                "App before s",
                "our callback s",
                "App after s",
            ]
            tables.append(table([*head, "target s", "met"], rows, title))
            tables += [f"  {a}: {'; '.join(f)}" for a, f in r["failures"].items()]
            tables += [f"  {u['action']}: shown, then undone {u['at_ms']:.0f} ms later: {u['shown']}" for u in undone]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000])
    p.add_argument("--baseline-sizes", type=int, nargs="+", default=[10_000])
    p.add_argument("--baseline-rev", default=BASELINE_REV, help="git revision of the baseline, or 'none'")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rebuild", action="store_true", help="build the dataset again even if it exists")
    p.add_argument("--dim", type=int, default=512, help="stored vector width (CLIP ViT-B/32: 512)")
    p.add_argument("--timeout", type=float, default=60, help="seconds an action may take before it counts as failed")
    p.add_argument("--cache-dir", help="thumbnails, stores and server logs (default: $NOLA_HOME/... or /tmp/...)")
    p.add_argument("--trace", action="store_true", help="print and store each action's requests and their seconds")
    p.add_argument("--child-timeout", type=float, default=7200)
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--txt", metavar="PATH")
    p.add_argument("--_worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--_code", help=argparse.SUPPRESS)
    p.add_argument("--_n", type=int, help=argparse.SUPPRESS)
    p.add_argument("--_label", default="ours", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._worker:
        worker(args)
        return 0
    from fiftyone_nola.core import cpu_isa

    results: dict = {"benchmark": "review_browser", "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    results["args"] = vars(args).copy()
    results["machine"] = machine_facts()
    results["cpu_model"], results["cpu_isa"] = results["machine"].get("cpu_model"), cpu_isa.cpu_isa()
    results["loadavg_start"] = list(os.getloadavg())
    tables = [f"CPU {results['cpu_model']} ({results['cpu_isa']}), {os.cpu_count()} cores"]
    t0 = time.perf_counter()
    try:
        run(args, results, tables)
    except Exception as e:  # keep what was measured; say what broke
        import traceback

        traceback.print_exc()
        results["error"] = f"{type(e).__name__}: {e}"
        tables.append(f"ERROR (run stopped): {results['error']}")
    return finish(results, tables, t0, args)


if __name__ == "__main__":
    sys.exit(main())
