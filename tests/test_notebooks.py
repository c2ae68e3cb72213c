"""The example notebooks run top to bottom (FAST mode: tiny models, a few images, one epoch).

Each notebook is copied to ``tmp_path`` and executed there with nbclient, so nothing is written
into ``notebooks/``. The kernel is this interpreter (a kernelspec written to ``tmp_path`` names
``sys.executable``), and it inherits this session's isolated ``FIFTYONE_DATABASE_NAME`` and
``NOLA_HOME`` (set by conftest), so it never touches a user's datasets or artefacts.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from conftest import LOCAL_DATA, ON_SHARED, REPO, SHARED_DATA

NOTEBOOKS_DIR = REPO / "notebooks"
NOTEBOOKS = ["01_auto_label_quickstart.ipynb", "02_multilabel_cdul.ipynb", "03_review_and_export.ipynb"]
CELL_TIMEOUT_S = 300  # per cell; the whole notebook takes well under 2 minutes in FAST mode
NOTEBOOK_TIMEOUT_S = 420

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")


KERNEL_NAME = "nola-test-python"


def _install_kernelspec(root: Path) -> Path:
    """A kernelspec that runs ``sys.executable`` (this venv's Python); returns its JUPYTER_PATH entry."""
    spec_dir = root / "kernels" / KERNEL_NAME
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "nola tests (this interpreter)",
                "language": "python",
            }
        )
    )
    return root


def _check_cell(expected: dict):
    """First cell of the executed copy: the kernel's interpreter and isolation variables."""
    src = (
        "import os, sys\n"
        f"_expected = {expected!r}\n"
        "assert os.path.realpath(sys.executable) == os.path.realpath(_expected.pop('executable')), sys.executable\n"
        "for _k, _v in _expected.items():\n"
        "    assert os.environ.get(_k) == _v, (_k, os.environ.get(_k), _v)\n"
    )
    return nbformat.v4.new_code_cell(src)


def test_notebooks_exist_with_parameters_cell():
    for name in NOTEBOOKS:
        nb = nbformat.read(NOTEBOOKS_DIR / name, as_version=4)
        params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
        assert len(params) == 1, f"{name}: exactly one cell tagged 'parameters'"
        src = params[0].source
        for word in ("DATA_DIR", "NOLA_SHARED_DATA", "FAST", "NOLA_NOTEBOOK_FAST", "NOLA_PRETRAINED"):
            assert word in src, f"{name}: parameters cell lacks {word}"
        assert nb.metadata["kernelspec"]["name"] == "python3"


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(NOTEBOOK_TIMEOUT_S)
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_in_fast_mode(name, tmp_path, monkeypatch):
    data = SHARED_DATA if ON_SHARED else LOCAL_DATA  # a notebook takes either layout
    if not data.is_dir():
        pytest.skip(f"real images not found at {data} (set NOLA_SHARED_DATA)")
    work = tmp_path / "run"
    work.mkdir()
    copy = work / name
    shutil.copy(NOTEBOOKS_DIR / name, copy)
    before = sorted(p.name for p in NOTEBOOKS_DIR.iterdir())

    env = dict(os.environ)
    env.update(
        {
            "NOLA_NOTEBOOK_FAST": "1",
            "NOLA_SHARED_DATA": str(data),
            "NOLA_EXPORT_DIR": str(tmp_path / "export"),
            "MPLBACKEND": "Agg",
            "PYDEVD_DISABLE_FILE_VALIDATION": "1",
        }
    )
    env.pop("NOLA_PRETRAINED", None)  # FAST means tiny random models whatever the caller has set
    expected = {"executable": sys.executable, "NOLA_NOTEBOOK_FAST": "1"}
    for key in ("FIFTYONE_DATABASE_NAME", "NOLA_HOME"):
        assert os.environ.get(key), f"conftest should have set {key}"
        expected[key] = os.environ[key]

    # nbclient looks the kernel up when it starts it: only our kernelspec has this name
    monkeypatch.setenv("JUPYTER_PATH", str(_install_kernelspec(tmp_path / "jupyter")))
    nb = nbformat.read(copy, as_version=4)
    nb.cells.insert(0, _check_cell(expected))
    client = nbclient.NotebookClient(
        nb,
        timeout=CELL_TIMEOUT_S,
        kernel_name=KERNEL_NAME,
        resources={"metadata": {"path": str(work)}},
        allow_errors=False,
    )
    try:
        client.execute(env=env)
    finally:
        nbformat.write(nb, copy)  # executed copy stays in tmp_path for inspection on failure

    errors = [
        o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.get("output_type") == "error"
    ]
    assert not errors, errors
    text = "\n".join(
        o.get("text", "")
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.get("outputs", [])
        if o.get("output_type") == "stream"
    )
    assert "FAST" in text and "RANDOMLY INITIALISED" in text
    assert sorted(p.name for p in NOTEBOOKS_DIR.iterdir()) == before, "the test wrote into notebooks/"
