"""The harness keeps markers honest: reading real images (../shared/data or the committed set of
tests/data) without `integration` is an error."""

import os
import subprocess
import sys
import uuid
from pathlib import Path

TESTS = Path(__file__).resolve().parent

PROBE = """
import pytest
from PIL import Image
from conftest import CIFAR_DIR, SHARED_DATA, _copy_of

def test_reads_committed_unmarked():
    list(CIFAR_DIR.iterdir())  # NOLA_SHARED_DATA="": the committed set

def test_reads_shared_unmarked():
    list((SHARED_DATA if SHARED_DATA.is_dir() else CIFAR_DIR).iterdir())  # ../shared when beside the repo

@pytest.mark.integration
def test_reads_marked():
    list(CIFAR_DIR.iterdir())

@pytest.mark.integration
def test_reads_copies_marked():
    files = sorted((CIFAR_DIR / "cat").glob("*.jpg"))
    copies = [_copy_of(files, k) for k in (len(files), 2 * len(files) + 1)]  # beyond the folder: copies
    assert len({Image.open(p).tobytes() for p in [files[0], files[1], *copies]}) == 4  # all distinct

def test_reads_nothing():
    pass
"""


def test_a_test_reading_real_images_must_be_marked_integration():
    """One run on the committed set (NOLA_SHARED_DATA set but empty picks it even beside ../shared),
    which also reads ../shared when it is there: both roots are watched."""
    probe = TESTS / f"test_probe_{uuid.uuid4().hex[:8]}.py"
    probe.write_text(PROBE)
    env = {**os.environ, "NOLA_SHARED_DATA": ""}
    try:
        run = subprocess.run(
            [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", str(probe)],
            capture_output=True,
            text=True,
            cwd=TESTS.parent,
            env=env,
            timeout=120,
        )
    finally:
        probe.unlink()
    for name in ("test_reads_committed_unmarked", "test_reads_shared_unmarked"):
        assert f"{name} reads" in run.stdout, run.stdout
    # a teardown error: the test itself passed
    assert "is not marked integration" in run.stdout and "5 passed, 2 errors" in run.stdout, run.stdout
    assert "(the committed set, tests/data)" in run.stdout  # the report header names the set in use


def test_heavy_tests_run_only_when_asked(monkeypatch):
    from types import SimpleNamespace

    from conftest import heavy_wanted

    def config(m):
        return SimpleNamespace(getoption=lambda name: m)

    monkeypatch.delenv("NOLA_HEAVY", raising=False)
    assert not heavy_wanted(config("")) and not heavy_wanted(config("not integration"))
    assert heavy_wanted(config("heavy"))
    monkeypatch.setenv("NOLA_HEAVY", "1")
    assert heavy_wanted(config(""))
