"""The review workspace in the real FiftyOne App (same harness as test_browser.py: a server
subprocess, Debian's Chromium driven by Playwright). The whole review as a user, with a
screenshot of each step in test-artifacts/browser/review/ (the README's come from there).
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest
from test_browser import ARTIFACTS, PLUGIN, app_server, browser_ready  # noqa: F401

from app_harness import chromium
from conftest import cifar_files

pytestmark = [pytest.mark.browser, pytest.mark.integration, pytest.mark.timeout(600)]

REVIEW_SHOTS = ARTIFACTS / "review"
N_REVIEW = 40  # 4 CIFAR-10 images per class


@pytest.fixture
def review_dataset(make_dataset):
    """What the pipeline leaves behind, made fast: predictions (some wrong, known confidences),
    CLIP vectors in the FAISS store (tiny random CLIP), and the pipeline's last step
    (class list, Brain similarity + map on the stored vectors). No ground truth."""
    import faiss
    import fiftyone as fo
    import numpy as np

    from fiftyone_nola.core.embed import EmbedConfig
    from fiftyone_nola.core.models import tiny_clip_spec
    from fiftyone_nola.pipeline import prepare_for_review
    from fiftyone_nola.stages.embeddings import compute_embeddings, load_embeddings

    pairs = cifar_files(per_class=4)
    ds = make_dataset([p for p, _ in pairs])
    ds.persistent = True
    classes = sorted({c for _, c in pairs})
    spec = tiny_clip_spec()
    compute_embeddings(ds, "clip", spec, config=EmbedConfig(num_workers=0, device="cpu"))
    # A model's mistakes come in groups of similar images: predictions follow clusters of the
    # stored vectors, so a correction has neighbours carrying the same wrong label.
    _, vecs = load_embeddings(ds, spec)
    km = faiss.Kmeans(vecs.shape[1], len(classes), niter=20, seed=3, min_points_per_centroid=1)
    km.train(vecs)
    preds = [classes[j % len(classes)] for j in km.index.search(vecs, 1)[1][:, 0]]
    conf = np.round(np.random.default_rng(0).uniform(0.2, 0.99, len(pairs)), 3)
    ds.set_values("nola", [fo.Classification(label=p, confidence=float(c)) for p, c in zip(preds, conf)])
    prepare_for_review(ds, classes, "nola")  # as the pipeline leaves it: flagged at the default threshold
    return ds


def written(ds) -> tuple:
    """Every sample's and the dataset's last modification (a write changes one of them)."""
    ds.reload()
    return tuple(ds.values("last_modified_at")), ds._doc.last_modified_at


def test_review_workspace_in_the_app(app_server, review_dataset, tmp_path):  # noqa: F811 (fixture)
    """The whole review as a user: panel, threshold, class filter, 5 samples reviewed in the
    sample view with one click each, the queue shrinking, a correction propagated, similarity
    search and the embeddings map (no environment variable), export, files checked."""
    import fiftyone as fo
    import numpy as np
    from fiftyone.operators.delegated import DelegatedOperationService
    from fiftyone.operators.executor import ExecutionContext, ExecutionProgress
    from playwright.sync_api import expect, sync_playwright

    from fiftyone_nola.stages import review as rw

    expect.set_options(timeout=30_000)  # a shared 2-core machine: App events can take seconds
    ds = review_dataset
    assert not any(k.startswith("FIFTYONE_BRAIN_") for k in os.environ), "the App must need no Brain env var"
    base = app_server.wait_ready()
    REVIEW_SHOTS.mkdir(parents=True, exist_ok=True)
    for old in REVIEW_SHOTS.glob("*.png"):
        old.unlink()
    shots, timings, clicks_per_sample, corrected_at_export = [], {}, [], []

    def shot(page, name):
        path = REVIEW_SHOTS / f"{len(shots) + 1:02d}-{name}.png"
        page.wait_for_timeout(400)
        page.screenshot(path=str(path))
        shots.append(path)

    def grid_count(page) -> int:
        text = page.locator('[data-cy="entry-counts"]').first.inner_text()
        return int(text.split()[0].replace(",", ""))

    def wait_grid(page, n, timeout=30):
        """The grid's count is ``n``, and so is its number of tiles while all fit on the screen: a
        samples reload on closing the sample view updated the count and left the old tiles."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if grid_count(page) == n:
                    break
            except Exception:
                pass
            page.wait_for_timeout(250)
        assert grid_count(page) == n
        if n <= 20:
            expect(page.locator('[data-cy="looker"]')).to_have_count(n)

    jobs = DelegatedOperationService()
    job = None
    page_errors: list[str] = []
    with sync_playwright() as pw, chromium(pw, {"width": 1600, "height": 1000}, 45_000) as context:
        page = None
        try:
            page = context.new_page()
            page.on("pageerror", lambda e: page_errors.append(str(e)))

            # 1. open the App on the dataset; open the NoLA panel beside the grid
            t_open = time.monotonic()
            page.goto(f"{base}/datasets/{ds.name}", wait_until="domcontentloaded", timeout=60_000)
            page.locator('[data-cy="new-panel-btn"]').first.click(timeout=60_000)
            page.locator('[data-cy="new-panel-option-nola_panel"]').click()
            nola = page.locator('[data-cy="panel-content-nola_panel"]')
            nola.get_by_text("Confidence threshold").wait_for()
            flagged_05 = int((np.asarray(ds.values("nola.confidence")) < 0.5).sum())
            expect(nola.get_by_text(f"{flagged_05} of {N_REVIEW} samples flagged")).to_be_visible()
            shot(page, "nola-panel")
            # opening the panel, and reloading the page, write nothing to the dataset
            untouched = written(ds)
            page.reload(wait_until="domcontentloaded")
            nola.get_by_text("Confidence threshold").wait_for(timeout=60_000)
            expect(nola.get_by_text(f"{flagged_05} of {N_REVIEW} samples flagged below 0.50")).to_be_visible()
            page.wait_for_timeout(2000)  # any echo of the controls' defaults would have arrived
            assert written(ds) == untouched

            # 1b. a stage runs delegated: its row shows done/total while it runs, polled by the
            #     panel's timer (the executor's progress reports are written here, as an executor
            #     would; launching from the stage's "Run" button is covered without a browser)
            job = jobs.queue_operation(
                f"{PLUGIN}/compute_embeddings",
                context=ExecutionContext(request_params={"dataset_name": ds.name, "params": {"family": "clip"}}),
            )
            nola.get_by_role("button", name="Refresh").click()
            expect(nola.get_by_role("cell", name="queued", exact=True)).to_be_visible()
            jobs.set_running(job.id)
            jobs.set_progress(job.id, ExecutionProgress(0.3, "Embedding images 12/40"))
            expect(nola.get_by_role("cell", name="running 12/40 (30%)")).to_be_visible()  # no click: the timer
            expect(nola.get_by_text("Embedding images 12/40 (30%)")).to_be_visible()
            shot(page, "stage-progress")
            jobs.set_completed(job.id)
            expect(nola.get_by_text("Embedding images 12/40")).to_have_count(0)
            expect(nola.get_by_role("cell", name="fresh").first).to_be_visible()

            # 2. move the threshold: typed (applied once, when the field is left: never per
            #    keystroke), the slider follows; with the slider, the number follows; the count
            #    and the grid change each time
            conf = np.asarray(ds.values("nola.confidence"))
            field = nola.locator('input[type="number"]').first
            slider = nola.locator('input[type="range"]').first
            field.fill("0.4")
            page.wait_for_timeout(1500)  # typed, not applied: no keystroke flags ("0", "0.", ...)
            ds.reload()
            assert rw.settings(ds)["threshold"] == 0.5
            field.press("Tab")
            expect(nola.get_by_text(f"{int((conf < 0.4).sum())} of {N_REVIEW} samples flagged")).to_be_visible()
            expect(slider).to_have_attribute("aria-valuenow", "0.4")
            wait_grid(page, int((conf < 0.4).sum()))
            ds.reload()
            assert rw.settings(ds)["threshold"] == 0.4
            shot(page, "threshold-typed-slider-follows")
            threshold = 0.37
            flagged_t = int((conf < threshold).sum())
            # FiftyOne's SliderView remounts itself whenever its value changes (its React key
            # follows the data), so the focus is gone after each step: a keyboard user, like
            # this test, focuses it again. Each step's value must reach the number field.
            for step in (0.39, 0.38, threshold):
                slider.focus()
                slider.press("ArrowLeft")
                expect(field).to_have_value(str(step))
            expect(nola.get_by_text(f"{flagged_t} of {N_REVIEW} samples flagged below {threshold:.2f}")).to_be_visible()
            wait_grid(page, flagged_t)
            assert len(ds.match_tags(rw.FLAGGED_TAG)) == flagged_t
            ds.reload()  # the App server wrote the threshold: this process's Dataset caches its info
            assert rw.settings(ds)["threshold"] == threshold
            shot(page, "threshold-moved-grid-follows")

            # 3. click a class in the table: the grid shows its flagged samples
            rows = rw.summary(ds, "nola", threshold)["classes"]
            cls = max(rows, key=lambda r: r["flagged"])
            nola.get_by_role("cell", name=cls["class"], exact=True).first.click()
            wait_grid(page, cls["flagged"])
            shot(page, f"class-{cls['class']}-filters-grid")

            # 4. review the queue in the sample view: one click per sample
            queue_before = len(rw.queue_ids(ds))
            nola.get_by_role("button", name="Review the queue").click()
            modal = page.locator('[data-cy="modal"]')
            modal.wait_for()
            # the sample view lists the plugin's modal panel as a tab beside "Sample"
            page.locator('[data-cy="panel-tab-nola_sample_review"]').click()
            setup_clicks = 2  # "Review the queue" + the tab (once per session)
            review = page.locator('[data-cy="panel-content-nola_sample_review"]')
            review.get_by_text("Nearest neighbours").wait_for()
            shot(page, "sample-view-review-panel")
            decided = []
            decided_tags = ["nola:accepted", "nola:corrected"]
            for i in range(5):
                before = set(ds.match_tags(decided_tags).values("id"))
                if i in (1, 3):  # pick a class other than the prediction: a correction
                    pred = review.get_by_role("button", name=re.compile("^Accept: ")).inner_text().split(": ")[1]
                    pick = next(c for c in ds.default_classes if c != pred)
                    review.get_by_role("button", name=pick, exact=True).click()
                else:
                    review.get_by_role("button", name=re.compile("^Accept: ")).click()
                clicks_per_sample.append(1)
                expect(review.get_by_text(f"reviewed {i + 1} of {flagged_t} flagged")).to_be_visible()
                if i == 0:
                    timings["open_app_to_first_reviewed_s"] = round(time.monotonic() - t_open, 1)
                after = set(ds.match_tags(decided_tags).values("id"))
                assert len(after - before) == 1
                decided.append((after - before).pop())
                if i in (0, 1, 4):
                    shot(page, f"reviewed-{i + 1}")
            assert len(set(decided)) == 5
            queue_after = len(rw.queue_ids(ds))
            assert queue_after == queue_before - 5  # the worklist shrinks
            expect(review.get_by_text(f"queue: {queue_after} left")).to_be_visible()
            n_corrected = ds.exists("nola_reviewed").count()
            assert n_corrected == 2
            review.get_by_role("button", name="Back to the grid").click()
            modal.wait_for(state="hidden")
            # the grid's panel shows the decisions at once: no Refresh
            expect(nola.get_by_text(f"review progress 5 / {flagged_t}")).to_be_visible()
            expect(nola.get_by_text(f"queue {queue_after}")).to_be_visible()
            wait_grid(page, queue_after)  # its tiles too: the decided ones are gone
            shot(page, "back-to-the-grid-counts-follow")

            # 4b. a decision in the grid: select a tile, Accept selected; the grid and counts follow
            page.locator('[data-cy="looker"]').first.hover()
            page.locator('[data-cy="looker-checkbox-"]').first.click()
            expect(nola.get_by_text("Selected: 1 sample (")).to_be_visible()
            nola.get_by_role("button", name="Accept selected").click()
            expect(nola.get_by_text(f"review progress 6 / {flagged_t}")).to_be_visible()
            expect(nola.get_by_text(f"queue {queue_after - 1}")).to_be_visible()
            wait_grid(page, queue_after - 1)
            assert len(ds.match_tags(decided_tags)) == 6
            expect(page.get_by_text(f"1 sample accepted; {queue_after - 1} left in the review queue")).to_be_visible()
            shot(page, "accepted-in-the-grid")

            # 5. propagate the corrections to similar undecided samples with the same wrong label
            nola.get_by_role("button", name="Show all samples").click()
            wait_grid(page, N_REVIEW)
            sim = nola.locator('input[type="number"]').nth(1)
            preview = rw.propagate_corrections(ds, "nola", 0.5, apply=False)
            assert preview["suggested"] > 0, preview
            sim.fill("0.5")
            sim.press("Tab")
            nola.get_by_text(f"{preview['suggested']} undecided neighbours would get a suggestion").wait_for()
            button = nola.get_by_role("button", name="Suggest to neighbours")
            shot(page, "propagation-offered")
            if preview["suggested"]:
                button.click()
                wait_grid(page, preview["suggested"])
                expect(nola.get_by_text(f"{preview['suggested']} samples carry a suggestion now")).to_be_visible()
                shot(page, "suggestions-in-grid")
            sugg = ds.match_tags(rw.SUGGESTED_TAG)
            assert len(sugg) == preview["suggested"]
            assert not len(sugg.match_tags(decided_tags))  # suggestions are never decisions
            nola.get_by_role("button", name="Show all samples").click()
            wait_grid(page, N_REVIEW)

            # 6. export with the form's defaults: whole dataset, suggested directory
            nola.get_by_role("button", name="Export…").click()
            prompt = page.locator('[data-cy="operators-prompt-modal"], [data-cy="operators-prompt-drawer"]').first
            prompt.get_by_text("samples will be exported").wait_for()
            shot(page, "export-form")
            prompt.get_by_role("button", name="Execute").click()
            prompt.get_by_text("Exported 6 samples").wait_for(timeout=60_000)
            corrected_at_export = ds.exists("nola_reviewed").values("id")
            shot(page, "export-done")
            prompt.get_by_role("button", name="Close").click()
            prompt.wait_for(state="hidden")

            # 6b. evaluation against ground truth (added now, as a user would import it): the
            #     output's button opens FiftyOne's Model Evaluation panel
            truth = dict(cifar_files(per_class=4))
            ds.set_values("ground_truth", [fo.Classification(label=truth[p]) for p in ds.values("filepath")])
            nola.get_by_role("button", name="Refresh").click()  # the App server's Dataset learns the new field
            nola.get_by_role("button", name="Evaluate…").click()
            execute = prompt.get_by_role("button", name="Execute")
            expect(execute).to_be_enabled()
            shot(page, "evaluation-form")
            execute.click()
            # from the panel, the run opens FiftyOne's Model Evaluation panel: no dialog to close
            prompt.wait_for(state="hidden")
            evaluation = page.locator('[data-cy="panel-content-model_evaluation_panel_builtin"]')
            evaluation.get_by_text("eval_nola").first.wait_for()
            shot(page, "model-evaluation-panel")
            page.locator('[data-cy="panel-tab-model_evaluation_panel_builtin"]').hover()
            page.locator('[data-cy="panel-tab-model_evaluation_panel_builtin"] svg').last.click()
            evaluation.wait_for(state="hidden")

            # 6c. the audit: draw a random sample, decide 10 of them with one click each in the
            #     sample view (each opens the next audit sample), the estimate and its plot follow
            nola.get_by_role("tab", name="Audit").click()
            nola.get_by_role("button", name="Draw for audit").click()
            nola.get_by_text("Audit progress: 0 /").wait_for()
            drawn = int(re.search(r"Audit progress: 0 / (\d+)", nola.inner_text()).group(1))
            assert drawn >= 10, drawn
            shot(page, "audit-drawn")
            nola.get_by_role("button", name=re.compile("^Audit the drawn samples")).click()
            modal.wait_for()
            review.get_by_text("Audit sample").wait_for()
            for i in range(10):  # one click each: accept, or (every third) pick another class
                expect(review.get_by_text(f"audited {i} of {drawn}")).to_be_visible()
                pred = review.get_by_role("button", name=re.compile("^Accept: ")).inner_text().split(": ")[1]
                if i % 3 == 2:
                    review.get_by_role(
                        "button", name=next(c for c in ds.default_classes if c != pred), exact=True
                    ).click()
                else:
                    review.get_by_role("button", name=re.compile("^Accept: ")).click()
                clicks_per_sample.append(1)
            expect(review.get_by_text(f"audited 10 of {drawn}")).to_be_visible()
            shot(page, "audit-10-decided")
            review.get_by_role("button", name="Back to the grid").click()
            modal.wait_for(state="hidden")
            nola.get_by_text(re.compile(r"Accuracy \d\.\d{3} \[")).wait_for()
            # the App may re-apply the panel's state from before the sample view for a moment
            # (seen: 3, 0, 3 within a second); what stays is the dataset's
            page.wait_for_timeout(3000)
            expect(nola.get_by_text(f"Audit progress: 10 / {drawn} decided")).to_be_visible()
            expect(nola.get_by_text("Accuracy at or above a confidence threshold")).to_be_visible()
            shot(page, "audit-estimate-and-curve")
            assert len(ds.match_tags("nola:audit").match_tags(decided_tags + ["nola:rejected"])) == 10
            nola.get_by_role("tab", name="Review").click()

            # 7. similarity search on the stored index (full-width grid: close the NoLA panel)
            page.locator('[data-cy="panel-tab-nola_panel"]').hover()
            page.locator('[data-cy="panel-tab-nola_panel"] svg').last.click()
            nola.wait_for(state="hidden")
            page.locator('[data-cy="looker"]').first.hover()
            page.locator('[data-cy="looker-checkbox-"]').first.click()
            page.locator('[data-cy="action-sort-by-similarity"]').click()
            page.locator('[data-cy="button-Search by similarity to the selected images"]').first.click()
            # the App runs it on the FAISS run registered by the pipeline, in its Similarity panel
            found = page.get_by_text("nola_clip_sim").first
            found.wait_for(timeout=60_000)
            page.get_by_text("Completed").first.wait_for(timeout=60_000)
            assert "results" in page.get_by_text(re.compile(r"\d+ results")).first.inner_text()
            shot(page, "similarity-search")

            # 7b. text search on the same run, from the Similarity Search panel: its CLIP (rebuilt
            #     in the App server from the embedding run's record) encodes the prompt; random
            #     weights, so the ranking means nothing: the path is what is checked
            page.get_by_role("button", name="New Search").click()
            page.get_by_role("button", name="Text Search").click()
            page.get_by_placeholder("Enter a text prompt...").fill("a photo of a cat")
            page.get_by_role("button", name="Search", exact=True).click()
            page.get_by_text("Run this operation synchronously").click()  # "Execute" (no delegated executor here)
            expect(page.get_by_text("Completed")).to_have_count(2, timeout=60_000)
            expect(page.get_by_text("a photo of a cat").first).to_be_visible()
            wait_grid(page, 25)  # the grid shows the k=25 matches
            page.wait_for_timeout(1500)  # their thumbnails, for the screenshot
            shot(page, "text-similarity-search")

            # 8. the embeddings map from the stored vectors
            page.locator('[data-cy="new-panel-btn"]').first.click()
            page.locator('[data-cy="new-panel-option-Embeddings"]').click()
            emb = page.locator('[data-cy="panel-content-Embeddings"]')
            emb.wait_for()
            emb.get_by_text("nola_clip_viz").first.click()  # listed "Ready" with no setup: open it
            emb.get_by_text(f"{N_REVIEW} points").wait_for(timeout=45_000)
            shot(page, "embeddings-map")

            # 9. lasso points in the map ("Select" mode, drag around the left part of the cloud):
            #    the App's selection is what the NoLA panel's review buttons act on (that callback
            #    path is tested without a browser, test_review_buttons_act_on_a_lasso_in_the_map)
            emb.get_by_text("Select", exact=True).first.click()
            emb.get_by_text("Drag to lasso").wait_for()
            box = emb.locator(".emb-plot-scene").first.bounding_box()
            x0, y0 = box["x"] + 0.02 * box["width"], box["y"] + 0.1 * box["height"]
            x1, y1 = box["x"] + 0.45 * box["width"], box["y"] + 0.9 * box["height"]
            page.mouse.move(x0, y0)
            page.mouse.down()
            for px, py in ((x1, y0), (x1, y1), (x0, y1), (x0, y0 + 2)):
                page.mouse.move(px, py, steps=10)
            page.mouse.up()
            counter = emb.get_by_text(re.compile(r"\d+ selected")).first
            expect(counter).to_be_visible()
            n_lassoed = int(re.search(r"(\d+) selected", counter.inner_text()).group(1))
            shot(page, "lasso-in-the-map")
        except Exception:
            if page is not None:
                try:
                    page.screenshot(path=str(REVIEW_SHOTS / "failure.png"))
                    # an operator error's whole trace is in the page, cut off in the screenshot
                    (REVIEW_SHOTS / "failure.txt").write_text(page.locator("body").inner_text())
                except Exception:
                    pass
            raise
        finally:
            if job is not None:
                jobs.delete_operation(job.id)
            (REVIEW_SHOTS / "page-errors.txt").write_text("\n".join(page_errors))

    # the exported files, checked from Python: 6 accepted (5 in the sample view, 1 in the grid),
    # corrections win
    from fiftyone_nola.stages.review import class_list

    reports = list(Path(os.environ["NOLA_HOME"]).glob("exports/*/export_report.json"))
    assert len(reports) == 1, reports
    out = reports[0].parent
    rep = json.loads(reports[0].read_text())
    assert rep["exported"] == 6 and rep["corrections_used"] == 2
    files = sorted(out.rglob("*.jpg"))
    assert len(files) == 6 and {f.parent.name for f in files} <= set(class_list(ds))
    for sid in corrected_at_export:
        name = Path(ds[sid].filepath).name
        assert any(f.name == name and f.parent.name == ds[sid].nola_reviewed.label for f in files)
    measurements = {
        "interactions_per_reviewed_sample": clicks_per_sample,
        "setup_clicks_to_first_sample": 3 + setup_clicks,
        **timings,
    }
    (REVIEW_SHOTS / "measurements.json").write_text(json.dumps(measurements, indent=1))
    assert max(clicks_per_sample) <= 2
    assert 0 < n_lassoed < N_REVIEW  # a lasso around part of the cloud selects part of it
    assert all(p.stat().st_size > 10_000 for p in shots), shots
