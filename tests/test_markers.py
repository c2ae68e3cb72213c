"""The harness keeps markers honest: reading real images (../shared/data or the committed set of
tests/data) without `integration` is an error."""

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent

PROBE = """
import pytest
from conftest import CIFAR_DIR, DATA_CLASSES, cifar_files

def test_reads_unmarked():
    list(CIFAR_DIR.iterdir())

@pytest.mark.integration
def test_reads_marked():
    list(CIFAR_DIR.iterdir())

@pytest.mark.integration
def test_reads_copies_marked():
    assert len(set(cifar_files(per_class=8))) == 8 * len(DATA_CLASSES)  # the committed set has 6: copies

def test_reads_nothing():
    pass
"""


# "": the committed set even beside ../shared (NOLA_SHARED_DATA set but empty)
@pytest.mark.parametrize("root", [None, ""], ids=["default", "committed"])
def test_a_test_reading_real_images_must_be_marked_integration(root):
    probe = TESTS / f"test_probe_{uuid.uuid4().hex[:8]}.py"
    probe.write_text(PROBE)
    env = {k: v for k, v in os.environ.items() if k != "NOLA_SHARED_DATA"}
    if root is not None:
        env["NOLA_SHARED_DATA"] = root
    try:
        run = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(probe)],
            capture_output=True,
            text=True,
            cwd=TESTS.parent,
            env=env,
            timeout=120,
        )
    finally:
        probe.unlink()
    assert "test_reads_unmarked reads" in run.stdout and "is not marked integration" in run.stdout, run.stdout
    assert "4 passed, 1 error" in run.stdout, run.stdout
    if root == "":
        assert "tests/data/tiny10" in run.stdout  # the report header names the set in use
