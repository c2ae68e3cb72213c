"""The real FiftyOne App for browser tests and benchmarks: the App server in a subprocess (its own
process group) and Debian's Chromium driven by Playwright. Imports neither pytest nor conftest, so
benchmarks/review_browser.py uses it outside pytest; tests/test_browser*.py wrap it in fixtures.

Chromium is Debian's (``scripts/install_browser.sh``), driven through ``executable_path``: no
browser build is ever downloaded.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("NOLA_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    # Only the local server resolves: the App's external fonts/links fail at once instead of
    # waiting on a network that is not there (faster, and the same on every machine).
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
]


def missing_browser_reason() -> str | None:
    """Why the browser cannot run here (None: it can)."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright Python package is not installed (pip install -e '.[dev]')"
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        return f"Chromium not found at {CHROMIUM} (run scripts/install_browser.sh as root)"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(url: str, data: dict | None = None, timeout: float = 30):
    body = None if data is None else json.dumps(data).encode()
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.status, r.read()


def _stop(proc: subprocess.Popen, first=()) -> None:
    """End the server and everything it started: it leads its own process group (``first``:
    signals to try before SIGTERM)."""
    # SIGKILL: children that outlived the leader or ignored SIGTERM
    for sig in (*first, signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)


class AppServer:
    """The FiftyOne App server on 127.0.0.1:<free port>, in a subprocess (its own process group)
    with this process's database name and NOLA_HOME, and ``code`` (default: this checkout; an
    older version for a baseline) as its plugins directory and first on its path."""

    def __init__(self, log_path: Path, code: Path = REPO):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ)
        env.update(FIFTYONE_PLUGINS_DIR=str(code), FIFTYONE_DO_NOT_TRACK="true", FIFTYONE_DATABASE_VALIDATION="false")
        # The measured code first, whatever an editable install of the package points at.
        env["PYTHONPATH"] = os.pathsep.join([str(code), *filter(None, [env.get("PYTHONPATH")])])
        for key in ("FIFTYONE_DATABASE_NAME", "NOLA_HOME"):  # never the user's database or storage
            assert env.get(key), f"{key} should have been set (conftest, or the benchmark's isolation)"
        self.log_path = log_path
        self._log = open(log_path, "wb")
        # A profiler to run the server under, e.g. "py-spy record -o server.txt --format raw --".
        prefix = shlex.split(os.environ.get("NOLA_APP_SERVER_PREFIX", ""))
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, "-m", "fiftyone.server.main", "--address", "127.0.0.1", "--port", str(self.port)],
            env=env,
            cwd=str(code),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )

    def _log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def wait_ready(self, timeout: float = 90) -> str:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"App server exited with {self.proc.returncode}:\n{self._log_tail()}")
            try:
                if http(self.base + "/", timeout=5)[0] == 200:
                    return self.base
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"App server gave no HTTP 200 within {timeout:.0f} s:\n{self._log_tail()}")
            time.sleep(0.25)

    def stop(self) -> None:
        _stop(self.proc, (signal.SIGINT,) if os.environ.get("NOLA_APP_SERVER_PREFIX") else ())  # a profiler writes
        self._log.close()


@contextlib.contextmanager
def chromium(pw, viewport: dict, default_timeout_ms: int):
    """A headless Chromium context in a fresh profile (removed afterwards), with FiftyOne's own e2e
    switch on (no "Explore Enterprise" popover, analytics or toasts)."""
    user_data = Path(os.environ.get("TMPDIR", "/tmp")) / f"nola-chromium-{os.getpid()}-{time.time_ns()}"
    context = pw.chromium.launch_persistent_context(
        str(user_data), executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS, viewport=viewport
    )
    try:
        context.add_init_script("window.IS_PLAYWRIGHT = true")
        context.set_default_timeout(default_timeout_ms)
        yield context
    finally:
        context.close()
        shutil.rmtree(user_data, ignore_errors=True)
