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

import pytest
import yaml

from app_harness import AppServer, chromium, missing_browser_reason
from app_harness import http as _http
from conftest import REPO, cifar_files

MANIFEST = yaml.safe_load((REPO / "fiftyone.yml").read_text())
PLUGIN = MANIFEST["name"]
ARTIFACTS = REPO / "test-artifacts" / "browser"
N_SAMPLES = 8

pytestmark = [pytest.mark.browser, pytest.mark.integration, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def browser_ready():
    reason = missing_browser_reason()
    if reason:
        if os.environ.get("NOLA_REQUIRE_BROWSER") == "1":
            pytest.fail(f"NOLA_REQUIRE_BROWSER=1 but {reason}")
        pytest.skip(reason)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for old in ARTIFACTS.glob("*.png"):
        old.unlink()


@pytest.fixture
def app_server(browser_ready):
    """Started first and not waited for: it boots while the dataset is being made. This process
    connects to the database before: with no database running, both started one on the same
    directory, and this process's lost (DBPathInUse, then ServiceListenTimeout)."""
    from fiftyone.core.odm.database import get_db_conn

    get_db_conn()
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

    ops = {
        op.name: op.config.label
        for op in foo.list_operators()
        if op.uri.startswith(PLUGIN + "/") and not isinstance(op, foo.Panel)
    }
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

    page_errors: list[str] = []
    with sync_playwright() as pw, chromium(pw, {"width": 1400, "height": 900}, 30_000) as context:
        page = None
        try:
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

    # The effect, seen from Python: every sample accepted, the review tag gone.
    tags = ds.count_sample_tags()
    assert tags.get("nola:accepted") == N_SAMPLES, tags
    assert "nola:review" not in tags, tags
    assert all(p.stat().st_size > 10_000 for p in shots), shots
