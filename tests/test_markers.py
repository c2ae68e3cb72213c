"""The harness keeps markers honest: reading ../shared/data without `integration` is an error."""

import subprocess
import sys
import uuid
from pathlib import Path

TESTS = Path(__file__).resolve().parent

PROBE = """
import pytest
from conftest import CIFAR_DIR

def test_reads_unmarked():
    list(CIFAR_DIR.iterdir())

@pytest.mark.integration
def test_reads_marked():
    list(CIFAR_DIR.iterdir())

def test_reads_nothing():
    pass
"""


def test_a_test_reading_shared_data_must_be_marked_integration():
    probe = TESTS / f"test_probe_{uuid.uuid4().hex[:8]}.py"
    probe.write_text(PROBE)
    try:
        run = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(probe)],
            capture_output=True,
            text=True,
            cwd=TESTS.parent,
            timeout=120,
        )
    finally:
        probe.unlink()
    assert "test_reads_unmarked reads" in run.stdout and "is not marked integration" in run.stdout, run.stdout
    assert "3 passed, 1 error" in run.stdout, run.stdout
