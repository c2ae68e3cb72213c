"""The review panel driven exactly as benchmarks/review_browser.py drives it at 100,000 samples, on
a small dataset built the same way (generated thumbnails, synthetic predictions, a FAISS store, the
pipeline's review preparation), in the real App: the benchmark's code path, checked for
correctness only (the benchmark reports the times). Every action must show the dataset's state:
counts after opening the panel and after each threshold move, one flagging per move (the one value
typed, never a keystroke's), a class's flagged samples in the grid, each decision recorded with
the sample view on the queue's next sample, Skip on the one after, the panel's counts after Back
to the grid.
"""

from __future__ import annotations

import sys

import pytest
from test_browser import ARTIFACTS, app_server, browser_ready  # noqa: F401

from app_harness import chromium
from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import review_browser as rb  # noqa: E402

pytestmark = [
    pytest.mark.browser,
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.heavy,
    pytest.mark.timeout(600),
]

N = 6_000  # above the t-SNE limit: the review preparation's map is a PCA, seconds, not minutes
REPEATS = 2


def test_review_panel_as_the_benchmark_drives_it(app_server, synthetic, tmp_path):  # noqa: F811 (fixture)
    from playwright.sync_api import sync_playwright

    from fiftyone_nola.stages import review as rv
    from synthetic_review import CLASSES, write_thumbnails

    ds = synthetic(N, filepaths=write_thumbnails(tmp_path / "thumbs", N))
    ds.persistent = True  # the App server is another process
    rb.prepare(ds, CLASSES)
    base = app_server.wait_ready()
    with sync_playwright() as pw, chromium(pw, {"width": 1600, "height": 1000}, 60_000) as context:
        page = context.new_page()
        try:
            d = rb.drive(page, ds, base, REPEATS, shots=None, queue_next=rb.our_queue_next(ds), strict=True)
        except Exception:
            page.screenshot(path=str(ARTIFACTS / "scale-failure.png"), timeout=60_000)
            raise

    # every action was seen through (strict: a wrong or missing view raised above)
    assert not d.failures
    for action in rb.ACTIONS:
        assert len(d.seconds[action]) == (REPEATS - 1 if action == "open_queue" else REPEATS), action
    # one flagging per move: the typed value alone reached the panel, and it is what is stored
    moves = d.facts["threshold_values_sent"]
    assert [m["new_values"] for m in moves] == [[m["to"]] for m in moves]
    ds.reload()
    assert rv.applied_threshold(ds) == moves[-1]["to"]
    # the decisions: an accept then a correction, recorded, out of the queue
    made = d.facts["decisions"]
    assert [m["label"] == m["prediction"] for m in made] == [True, False]
    assert "nola:accepted" in made[0]["tags"] and "nola:corrected" in made[1]["tags"]
    decided = ds.match_tags(list(rv.DECIDED_TAGS))
    assert sorted(decided.values("id")) == sorted(m["id"] for m in made)
    flagged = int((d.truth.conf < moves[-1]["to"]).sum())
    assert rv.queue_length(ds) == flagged - len(made)
    # Back in the grid after a decision, the counts once showed the decision, then a late render
    # of the panel's older state put the old counts back: the texts now live in the panel's state.
    assert not d.facts["undone"], d.facts["undone"]
