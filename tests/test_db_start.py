"""Two jobs started at the same moment with no database service running both succeed."""

import os
import shutil
import subprocess
import sys
import time
import uuid

import pytest

from conftest import REPO, cifar_files

SCRIPT = (
    "from fiftyone_nola.stages import fo_io; "
    "ds = fo_io.import_images({folder!r}, 'shared'); "
    "print('RESULT', ds._doc.id, len(ds))"
)


def _services_on(db_dir: str) -> list:
    import psutil

    out = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info.get("cmdline") or [])
        if "--51-service" in cmd and db_dir in cmd:
            out.append(p)
    return out


def _wait_gone(db_dir: str, timeout: float = 60.0) -> None:
    t0 = time.monotonic()
    while _services_on(db_dir) and time.monotonic() - t0 < timeout:
        time.sleep(0.5)


@pytest.mark.integration
@pytest.mark.slow
def test_two_processes_starting_the_database_together_both_succeed(tmp_path):
    """Fresh database directory each time, two CLI-like jobs started together, 5 times.

    FiftyOne attaches to any running database service of the machine; when another job's
    service happens to be up, both processes attach to it and the race is not exercised (they
    must still both succeed).
    """
    folder = tmp_path / "imgs"
    folder.mkdir()
    for p, c in cifar_files(per_class=1):
        shutil.copy(p, folder / f"{c}-{os.path.basename(p)}")
    n = len(list(folder.iterdir()))
    for rep in range(5):
        db_dir = str(tmp_path / f"db{rep}")
        env = {
            **os.environ,
            "FIFTYONE_DATABASE_DIR": db_dir,
            "NOLA_HOME": str(tmp_path / f"home{rep}"),
            "FIFTYONE_DATABASE_NAME": f"nola_dbstart_{uuid.uuid4().hex[:8]}",
        }
        env.pop("FIFTYONE_PRIVATE_DATABASE_PORT", None)
        cmd = [sys.executable, "-c", SCRIPT.format(folder=str(folder))]
        logs = [(tmp_path / f"r{rep}-{i}.out", tmp_path / f"r{rep}-{i}.err") for i in range(2)]
        # files, not pipes: an unread pipe would block one job, and the other waits for it at exit
        procs = [subprocess.Popen(cmd, env=env, cwd=REPO, stdout=open(o, "w"), stderr=open(e, "w")) for o, e in logs]
        for p in procs:
            p.wait(timeout=400)
        outs = [(o.read_text(), e.read_text()) for o, e in logs]
        for p, (_, err) in zip(procs, outs):
            assert p.returncode == 0, f"rep {rep}: {err[-3000:]}"
        results = [next(line.split()[1:] for line in out.splitlines() if line.startswith("RESULT")) for out, _ in outs]
        assert results[0] == results[1] and int(results[0][1]) == n, (rep, results)  # one dataset, no duplicates
        _wait_gone(db_dir)
