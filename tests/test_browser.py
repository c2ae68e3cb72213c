"""End to end in the real FiftyOne App: a server subprocess, headless Chromium driven by Playwright.

The plugin's operators must show up in the App's operator browser, and one of them
(``mark_reviewed``, action "accept") is run by clicking through the browser and its form; the
effect is then checked from Python. Screenshots of every step go to test-artifacts/browser/.

Chromium is Debian's (``scripts/install_browser.sh``), driven through ``executable_path``: no
browser build is ever downloaded. The test skips only when that Chromium or the ``playwright``
package is missing (set ``NOLA_REQUIRE_BROWSER=1`` to make that a failure instead, e.g. in CI).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from conftest import REPO, cifar_files

MANIFEST = yaml.safe_load((REPO / "fiftyone.yml").read_text())
PLUGIN = MANIFEST["name"]
CHROMIUM = os.environ.get("NOLA_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = REPO / "test-artifacts" / "browser"
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    # Only the local server resolves: the App's external fonts/links fail at once instead of
    # waiting on a network that is not there (faster, and the same on every machine).
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
]
N_SAMPLES = 8

pytestmark = [pytest.mark.browser, pytest.mark.integration, pytest.mark.timeout(300)]


def _missing_browser_reason() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright Python package is not installed (pip install -e '.[dev]')"
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        return f"Chromium not found at {CHROMIUM} (run scripts/install_browser.sh as root)"
    return None


@pytest.fixture(scope="module")
def browser_ready():
    reason = _missing_browser_reason()
    if reason:
        if os.environ.get("NOLA_REQUIRE_BROWSER") == "1":
            pytest.fail(f"NOLA_REQUIRE_BROWSER=1 but {reason}")
        pytest.skip(reason)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for old in ARTIFACTS.glob("*.png"):
        old.unlink()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http(url: str, data: dict | None = None, timeout: float = 30):
    body = None if data is None else json.dumps(data).encode()
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.status, r.read()


def _stop(proc: subprocess.Popen) -> None:
    """End the server and everything it started: it leads its own process group."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
    try:  # children that outlived the leader (or ignored SIGTERM)
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


class AppServer:
    """The FiftyOne App server on 127.0.0.1:<free port>, in a subprocess (its own process group)
    with this session's database name, NOLA_HOME and the repo root as the plugins directory."""

    def __init__(self, log_path: Path):
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ)
        env.update(FIFTYONE_PLUGINS_DIR=str(REPO), FIFTYONE_DO_NOT_TRACK="true",
                   FIFTYONE_DATABASE_VALIDATION="false")
        for key in ("FIFTYONE_DATABASE_NAME", "NOLA_HOME"):  # set by conftest for this session
            assert env.get(key), f"{key} should have been set by conftest"
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fiftyone.server.main", "--address", "127.0.0.1",
             "--port", str(self.port)],
            env=env, cwd=str(REPO), stdout=self._log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )

    def _log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def wait_ready(self, timeout: float = 90) -> str:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"App server exited with {self.proc.returncode}:\n{self._log_tail()}")
            try:
                if _http(self.base + "/", timeout=5)[0] == 200:
                    return self.base
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"App server gave no HTTP 200 within {timeout:.0f} s:\n{self._log_tail()}")
            time.sleep(0.25)

    def stop(self) -> None:
        _stop(self.proc)
        self._log.close()


@pytest.fixture
def app_server(browser_ready):
    """Started first and not waited for: it boots while the dataset is being made."""
    server = AppServer(ARTIFACTS / "server.log")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def app_dataset(make_dataset):
    import fiftyone as fo

    pairs = cifar_files(per_class=1)[:N_SAMPLES]
    ds = make_dataset([p for p, _ in pairs], [c for _, c in pairs])
    ds.persistent = True  # the server is another process: never let a cleanup there drop it
    ds.untag_samples(ds.distinct("tags"))
    ds.tag_samples("nola:review")  # set_status("accepted") must replace this with nola:accepted
    assert fo.dataset_exists(ds.name)
    return ds


def _plugin_operators() -> dict[str, str]:
    """name -> label of this plugin's operators, from FiftyOne's own registry."""
    import fiftyone.operators as foo

    ops = {op.name: op.config.label for op in foo.list_operators()
           if op.uri.startswith(PLUGIN + "/") and not isinstance(op, foo.Panel)}
    assert set(ops) == set(MANIFEST["operators"]), ops
    return ops


def test_operator_browser_lists_and_runs_plugin_operators(app_server, app_dataset):
    from playwright.sync_api import expect, sync_playwright

    ds, base = app_dataset, app_server.wait_ready()
    ops = _plugin_operators()

    # The server itself knows the plugin (clear failure here before any browser work).
    status, body = _http(base + "/operators", {"dataset_name": ds.name})
    assert status == 200
    listed = json.loads(body)
    uris = {o["uri"] for o in listed["operators"]}
    assert {f"{PLUGIN}/{n}" for n in ops} <= uris, listed.get("errors")

    shots = []

    def shot(page, name):
        path = ARTIFACTS / f"{len(shots) + 1:02d}-{name}.png"
        page.screenshot(path=str(path))
        shots.append(path)

    user_data = Path(os.environ.get("TMPDIR", "/tmp")) / f"nola-chromium-{os.getpid()}-{time.time_ns()}"
    page_errors: list[str] = []
    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(user_data), executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1400, "height": 900},
        )
        page = None
        try:
            # FiftyOne's own e2e switch: no "Explore Enterprise" popover, analytics or toasts.
            context.add_init_script("window.IS_PLAYWRIGHT = true")
            context.set_default_timeout(30_000)
            page = context.new_page()
            page.on("pageerror", lambda e: page_errors.append(str(e)))

            # 1. the dataset's sample grid
            page.goto(f"{base}/datasets/{ds.name}", wait_until="domcontentloaded", timeout=60_000)
            first_label = ds.first().ground_truth.label
            page.get_by_text(first_label, exact=True).first.wait_for(state="visible", timeout=60_000)
            browse = page.locator('[data-cy="action-browse-operations"]').first
            browse.wait_for(state="visible")
            shot(page, "dataset-grid")

            # 2. the operator browser (toolbar button "Browse operations"), searched by each
            #    label prefix of the plugin ("NoLA: ...", "CDUL: ..."): every operator is listed
            browser = page.locator('[data-cy="operators-browser"]')
            browse.click()
            browser.wait_for(state="visible")
            search = page.locator('[data-cy="operators-browser-search"]')
            prefixes = sorted({label.split(":")[0] for label in ops.values()}, key=lambda p: p != "NoLA")
            for prefix in prefixes:
                search.fill(prefix)
                wanted = {n: label for n, label in ops.items() if label.split(":")[0] == prefix}
                browser.get_by_text(next(iter(wanted.values())), exact=True).wait_for(state="visible")
                shot(page, f"operator-browser-{prefix.lower()}")
                text = browser.inner_text()
                missing = [n for n, label in wanted.items() if n not in text or label not in text]
                assert not missing, f"not listed in the operator browser: {missing}\n{text}"

            # 3. choose mark_reviewed: its form opens
            search.fill("mark_reviewed")
            browser.get_by_text(ops["mark_reviewed"], exact=True).click()
            prompt = page.locator('[data-cy="operators-prompt-modal"], [data-cy="operators-prompt-drawer"]').first
            prompt.get_by_text("Mark reviewed").first.wait_for(state="visible")
            accept = prompt.get_by_label("accept", exact=True)
            accept.check()
            assert accept.is_checked()
            execute = prompt.get_by_role("button", name="Execute")
            expect(execute).to_be_enabled()  # the dynamic form has re-resolved with the choice
            shot(page, "mark-reviewed-form")

            # 4. execute; the operator's output appears in the same prompt
            execute.click()
            prompt.get_by_text(f"accept: {N_SAMPLES} samples").wait_for(state="visible", timeout=60_000)
            shot(page, "mark-reviewed-result")

            # 5. back on the grid, which the operator reloaded with the tags it changed shown
            #    (no "show tags" click needed any more)
            prompt.get_by_role("button", name="Close").click()
            prompt.wait_for(state="hidden")
            expect(page.get_by_text("nola:accepted", exact=True)).to_have_count(N_SAMPLES)
            expect(page.get_by_text("nola:review", exact=True)).to_have_count(0)
            shot(page, "grid-with-tags")
        except Exception:
            if page is not None:
                try:
                    page.screenshot(path=str(ARTIFACTS / "failure.png"))
                except Exception:
                    pass
            raise
        finally:
            (ARTIFACTS / "page-errors.txt").write_text("\n".join(page_errors))
            context.close()
            shutil.rmtree(user_data, ignore_errors=True)

    # The effect, seen from Python: every sample accepted, the review tag gone.
    tags = ds.count_sample_tags()
    assert tags.get("nola:accepted") == N_SAMPLES, tags
    assert "nola:review" not in tags, tags
    assert all(p.stat().st_size > 10_000 for p in shots), shots


# ---------------------------------------------------------------------------- the review workspace

REVIEW_SHOTS = ARTIFACTS / "review"
N_REVIEW = 40  # 4 CIFAR-10 images per class


@pytest.fixture
def review_dataset(make_dataset):
    """What the pipeline leaves behind, made fast: predictions (some wrong, known confidences),
    CLIP vectors in the FAISS store (tiny random CLIP), and the pipeline's last step
    (class list, Brain similarity + map on the stored vectors). No ground truth."""
    import fiftyone as fo
    import numpy as np

    from fiftyone_nola.core.embed import EmbedConfig
    from fiftyone_nola.core.models import tiny_clip_spec
    from fiftyone_nola.core.review_queue import kmeans
    from fiftyone_nola.pipeline import prepare_for_review
    from fiftyone_nola.stages.embeddings import compute_embeddings, load_embeddings

    pairs = cifar_files(per_class=4)
    ds = make_dataset([p for p, _ in pairs])
    ds.persistent = True
    classes = sorted({c for _, c in pairs})
    spec = tiny_clip_spec()
    compute_embeddings(ds, "clip", spec, config=EmbedConfig(num_workers=0, device="cpu"), log=lambda m: None)
    # A model's mistakes come in groups of similar images: predictions follow clusters of the
    # stored vectors, so a correction has neighbours carrying the same wrong label.
    _, vecs = load_embeddings(ds, spec)
    preds = [classes[j % len(classes)] for j in kmeans(vecs, len(classes), seed=3)]
    conf = np.round(np.random.default_rng(0).uniform(0.2, 0.99, len(pairs)), 3)
    ds.set_values("nola", [fo.Classification(label=p, confidence=float(c)) for p, c in zip(preds, conf)])
    prepare_for_review(ds, classes, log=lambda m: None)
    return ds


def test_review_workspace_in_the_app(app_server, review_dataset, tmp_path):
    """The whole review as a user: panel, threshold, class filter, 5 samples reviewed in the
    sample view with one click each, the queue shrinking, a correction propagated, similarity
    search and the embeddings map (no environment variable), export, files checked."""
    import numpy as np
    from playwright.sync_api import expect, sync_playwright

    from fiftyone_nola.stages import review_workspace as rw

    expect.set_options(timeout=30_000)  # a shared 2-core machine: App events can take seconds
    ds = review_dataset
    assert not any(k.startswith("FIFTYONE_BRAIN_") for k in os.environ), "the App must need no Brain env var"
    base = app_server.wait_ready()
    REVIEW_SHOTS.mkdir(parents=True, exist_ok=True)
    for old in REVIEW_SHOTS.glob("*.png"):
        old.unlink()
    shots, timings, clicks_per_sample = [], {}, []

    def shot(page, name):
        path = REVIEW_SHOTS / f"{len(shots) + 1:02d}-{name}.png"
        page.wait_for_timeout(400)
        page.screenshot(path=str(path))
        shots.append(path)

    def grid_count(page) -> int:
        text = page.locator('[data-cy="entry-counts"]').first.inner_text()
        return int(text.split()[0].replace(",", ""))

    def wait_grid(page, n, timeout=30):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if grid_count(page) == n:
                    return
            except Exception:
                pass
            page.wait_for_timeout(250)
        assert grid_count(page) == n

    user_data = Path(os.environ.get("TMPDIR", "/tmp")) / f"nola-chromium-{os.getpid()}-{time.time_ns()}"
    page_errors: list[str] = []
    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(user_data), executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1600, "height": 1000},
        )
        page = None
        try:
            context.add_init_script("window.IS_PLAYWRIGHT = true")
            context.set_default_timeout(45_000)
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

            # 2. move the threshold (typed): the count and the grid change live
            conf = np.asarray(ds.values("nola.confidence"))
            flagged_04 = int((conf < 0.4).sum())
            field = nola.locator('input[type="number"]').first
            field.fill("0.4")
            field.press("Enter")
            expect(nola.get_by_text(f"{flagged_04} of {N_REVIEW} samples flagged")).to_be_visible()
            wait_grid(page, flagged_04)
            assert len(ds.match_tags(rw.FLAGGED_TAG)) == flagged_04
            shot(page, "threshold-moved-grid-follows")

            # 3. click a class in the table: the grid shows its flagged samples
            rows = rw.preview(ds, "nola", 0.4)["classes"]
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
            for i in range(5):
                before = set(ds.match_tags("nola:accepted").values("id"))
                if i in (1, 3):  # pick a class other than the prediction: a correction
                    pred = review.get_by_role("button", name=re.compile("^Accept: ")).inner_text().split(": ")[1]
                    pick = next(c for c in ds.default_classes if c != pred)
                    review.get_by_role("button", name=pick, exact=True).click()
                else:
                    review.get_by_role("button", name=re.compile("^Accept: ")).click()
                clicks_per_sample.append(1)
                expect(review.get_by_text(f"reviewed {i + 1} of {flagged_04} flagged")).to_be_visible()
                if i == 0:
                    timings["open_app_to_first_reviewed_s"] = round(time.monotonic() - t_open, 1)
                after = set(ds.match_tags("nola:accepted").values("id"))
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

            # 5. propagate the corrections to similar undecided samples with the same wrong label
            nola.get_by_role("button", name="Show all samples").click()
            wait_grid(page, N_REVIEW)
            sim = nola.locator('input[type="number"]').nth(1)
            preview = rw.propagate_corrections(ds, "nola", 0.5, apply=False)
            assert preview["suggested"] > 0, preview
            sim.fill("0.5")
            sim.press("Enter")
            button = nola.get_by_role("button", name=f"Suggest to {preview['suggested']} neighbours")
            button.wait_for()
            shot(page, "propagation-offered")
            if preview["suggested"]:
                button.click()
                wait_grid(page, preview["suggested"])
                expect(nola.get_by_text(f"Last run: {preview['suggested']} neighbours touched")).to_be_visible()
                shot(page, "suggestions-in-grid")
            sugg = ds.match_tags(rw.SUGGESTED_TAG)
            assert len(sugg) == preview["suggested"]
            assert not len(sugg.match_tags("nola:accepted"))  # suggestions are never decisions
            nola.get_by_role("button", name="Show all samples").click()
            wait_grid(page, N_REVIEW)

            # 6. export with the form's defaults: whole dataset, suggested directory
            nola.get_by_role("button", name="Export…").click()
            prompt = page.locator('[data-cy="operators-prompt-modal"], [data-cy="operators-prompt-drawer"]').first
            prompt.get_by_text("samples will be exported").wait_for()
            shot(page, "export-form")
            prompt.get_by_role("button", name="Execute").click()
            prompt.get_by_text("Exported 5 samples").wait_for(timeout=60_000)
            shot(page, "export-done")
            prompt.get_by_role("button", name="Close").click()
            prompt.wait_for(state="hidden")
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

            # 8. the embeddings map from the stored vectors
            page.locator('[data-cy="new-panel-btn"]').first.click()
            page.locator('[data-cy="new-panel-option-Embeddings"]').click()
            emb = page.locator('[data-cy="panel-content-Embeddings"]')
            emb.wait_for()
            emb.get_by_text("nola_clip_viz").first.click()  # listed "Ready" with no setup: open it
            emb.get_by_text(f"{N_REVIEW} points").wait_for(timeout=45_000)
            shot(page, "embeddings-map")
        except Exception:
            if page is not None:
                try:
                    page.screenshot(path=str(REVIEW_SHOTS / "failure.png"))
                except Exception:
                    pass
            raise
        finally:
            (REVIEW_SHOTS / "page-errors.txt").write_text("\n".join(page_errors))
            context.close()
            shutil.rmtree(user_data, ignore_errors=True)

    # the exported files, checked from Python: 5 accepted, corrections win
    from fiftyone_nola.stages.review_workspace import class_list

    reports = list(Path(os.environ["NOLA_HOME"]).glob("exports/*/export_report.json"))
    assert len(reports) == 1, reports
    out = reports[0].parent
    rep = json.loads(reports[0].read_text())
    assert rep["exported"] == 5 and rep["corrections_used"] == 2
    files = sorted(out.rglob("*.jpg"))
    assert len(files) == 5 and {f.parent.name for f in files} <= set(class_list(ds))
    for sid in ds.exists("nola_reviewed").values("id"):
        name = Path(ds[sid].filepath).name
        assert any(f.name == name and f.parent.name == ds[sid].nola_reviewed.label for f in files)
    measurements = {"interactions_per_reviewed_sample": clicks_per_sample, "setup_clicks_to_first_sample":
                    3 + setup_clicks, **timings}
    (REVIEW_SHOTS / "measurements.json").write_text(json.dumps(measurements, indent=1))
    assert max(clicks_per_sample) <= 2
    assert all(p.stat().st_size > 10_000 for p in shots), shots
