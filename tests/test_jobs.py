"""Jobs take turns: the lock that names its holder, the bounded wait and what it says, a killed
holder taken over at once, the validation pass's information, and accepts that keep their label
when a stage rewrites the reviewed field. Generated images only (no ../shared/data)."""

import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

from conftest import REPO, REVIEW_CLASSES
from fiftyone_nola.core import jobs
from fiftyone_nola.core.errors import InvalidInputError, JobBusyError

# Holds argv[1] for argv[2] ("auto-label") until killed or argv[3] seconds pass.
HOLDER = textwrap.dedent(
    """
    import sys, time
    from fiftyone_nola.core import jobs
    with jobs.exclusive(sys.argv[1], sys.argv[2]):
        print("HELD", flush=True)
        time.sleep(float(sys.argv[3]))
    """
)


def _hold(lock, what="auto-label", seconds=60.0) -> subprocess.Popen:
    p = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(lock), what, str(seconds)],
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        stdout=subprocess.PIPE,
        text=True,
    )
    assert p.stdout.readline().strip() == "HELD"
    return p


def test_a_busy_lock_is_waited_for_said_once_with_its_holder_then_taken(tmp_path):
    lock = tmp_path / "job.lock"
    holder = _hold(lock, seconds=1.5)
    said = []
    t0 = time.monotonic()
    with jobs.exclusive(lock, "second", say=said.append, where=" on this dataset"):
        waited = time.monotonic() - t0
        assert jobs.read_holder(lock).pid == os.getpid()  # our facts replaced the holder's
        assert jobs.running(lock) is None  # the holder is this thread: not another job
    holder.wait(30)
    assert waited > 0.5
    assert len(said) == 2, said
    assert said[0].startswith(f"waiting for auto-label (pid {holder.pid}, started ")
    assert said[0].endswith(" ago) on this dataset; up to 30 min")
    assert said[1].startswith("the other job is done (waited ")
    assert not jobs.holder_path(lock).exists()  # released cleanly: no facts left


def test_past_the_bound_a_clear_error_names_the_holder(tmp_path, monkeypatch):
    lock = tmp_path / "job.lock"
    holder = _hold(lock)
    try:
        assert jobs.running(lock).startswith(f"auto-label (pid {holder.pid}, ")
        monkeypatch.setenv(jobs.WAIT_ENV, "0")
        said = []
        t0 = time.monotonic()
        with pytest.raises(
            JobBusyError, match=rf"This dataset is locked by another process: auto-label \(pid {holder.pid}"
        ):
            with jobs.exclusive(lock, "second", say=said.append, subject="This dataset"):
                pass
        assert time.monotonic() - t0 < 5 and said == []  # 0: fail at once, nothing to say
        with pytest.raises(JobBusyError, match=r"waited 0.3 s\). Wait for that job to finish"):
            with jobs.exclusive(lock, "second", wait_s=0.3):
                pass
    finally:
        holder.kill()
        holder.wait(30)


def test_a_killed_holder_is_taken_over_at_once_and_its_facts_never_reported(tmp_path):
    lock = tmp_path / "job.lock"
    holder = _hold(lock)
    said = []
    threading.Timer(0.5, holder.send_signal, (signal.SIGKILL,)).start()
    with jobs.exclusive(lock, "second", say=said.append):  # was waiting: in as soon as it died
        pass
    holder.wait(30)
    assert said[0].startswith("waiting for auto-label")

    holder = _hold(lock)
    holder.send_signal(signal.SIGKILL)
    holder.wait(30)
    assert jobs.read_holder(lock).pid == holder.pid  # the dead holder's facts stay behind...
    assert jobs.running(lock) is None  # ...but are not a running job
    said = []
    with jobs.exclusive(lock, "third", wait_s=0, say=said.append):  # taken at once, no wait
        assert jobs.read_holder(lock).what == "third"
    assert said == []


def test_the_wait_setting(monkeypatch):
    monkeypatch.delenv(jobs.WAIT_ENV, raising=False)
    assert jobs.job_wait_s() == 1800.0
    monkeypatch.setenv(jobs.WAIT_ENV, "12.5")
    assert jobs.job_wait_s() == 12.5 and jobs.job_wait_s(0) == 0.0
    monkeypatch.setenv(jobs.WAIT_ENV, "soon")
    with pytest.raises(InvalidInputError, match="NOLA_JOB_WAIT_S='soon' is not a number"):
        jobs.job_wait_s()
    with pytest.raises(InvalidInputError):
        jobs.job_wait_s(-1)
    assert [jobs.duration(s) for s in (0, 0.5, 45, 1800, 5400 * 2)] == ["0 s", "0.5 s", "45 s", "30 min", "3.0 h"]


def test_nested_locks_name_the_outer_job_and_reenter(tmp_path):
    with jobs.exclusive(tmp_path / "job.lock", "auto-label"):
        with jobs.exclusive(tmp_path / "store.lock", "embedding CLIP"):
            assert jobs.read_holder(tmp_path / "store.lock").what == "auto-label > embedding CLIP"
            with jobs.exclusive(tmp_path / "job.lock", "auto-label"):  # re-entrant: no self-wait
                assert jobs.current_job() == "auto-label"


# ---------------------------------------------------------------------------- on a dataset

DATASET_HOLDER = textwrap.dedent(
    """
    import sys, time
    from fiftyone_nola.stages.jobs import dataset_job
    with dataset_job(sys.argv[1], "auto-label"):
        print("HELD", flush=True)
        time.sleep(60)
    """
)


def test_check_reports_a_running_job_as_information_and_the_job_waits_for_it(make_dataset, tmp_path, caplog):
    from conftest import tiny_images, tiny_pipeline_config
    from fiftyone_nola.stages import fo_io
    from fiftyone_nola.stages.jobs import dataset_job
    from fiftyone_nola.stages.validation import Target, check_auto_label

    ds = make_dataset(tiny_images(tmp_path / "images", 4))
    cfg = tiny_pipeline_config(descriptions_file=None, allow_template_fallback=True)
    assert not check_auto_label(Target(samples=ds), REVIEW_CLASSES, cfg).warnings
    holder = subprocess.Popen(
        [sys.executable, "-c", DATASET_HOLDER, fo_io.dataset_id(ds)],
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "HELD"
        report = check_auto_label(Target(samples=ds), REVIEW_CLASSES, cfg)
        assert report.ok  # information, not an error
        notes = [w.render() for w in report.warnings if "a job is running" in w.message]
        assert len(notes) == 1 and f"auto-label (pid {holder.pid}, " in notes[0]
        assert "this run will wait for it (up to 30 min) and reuse what it writes" in notes[0]
        progress = []
        caplog.set_level(logging.INFO, logger="fiftyone_nola")
        threading.Timer(1.0, holder.kill).start()
        with dataset_job(ds, "auto-label", progress=lambda d, t, m: progress.append((d, t, m))):
            assert not [w for w in check_auto_label(Target(samples=ds), REVIEW_CLASSES, cfg).warnings]
    finally:
        holder.kill()
        holder.wait(30)
    assert progress and progress[0][:2] == (0, 0) and progress[0][2].startswith("waiting for auto-label (pid ")
    assert sum("waiting for auto-label" in m for m in caplog.messages) == 1


# ---------------------------------------------------------------------------- accepts keep their label


def test_a_stage_rewriting_the_reviewed_field_keeps_what_reviewers_accepted(review_ds):
    from fiftyone_nola.stages import fo_io
    from fiftyone_nola.stages import review as rv

    ds = review_ds
    ids = ds.values("id")
    before = dict(zip(ids, ds.values("nola.label")))
    rv.decide(ds, ids[:4], "accept")
    rv.decide(ds, ids[4:6], "reject")
    rv.decide(ds, ids[6:8], "correct", "ship")
    # A new run: every label moves to the next class, except sample 0 keeps its label.
    nxt = [REVIEW_CLASSES[(REVIEW_CLASSES.index(before[i]) + (0 if k == 0 else 1)) % 4] for k, i in enumerate(ids)]
    probs = np.full((len(ids), 4), 0.1, dtype=np.float32)
    probs[np.arange(len(ids)), [REVIEW_CLASSES.index(c) for c in nxt]] = 0.7
    fo_io.write_classifications(ds, ids, REVIEW_CLASSES, probs, "nola")
    ds.reload()
    assert ds.values("nola.label") == nxt  # the new run's labels
    tags = dict(zip(ids, ds.values("tags")))
    reviewed = dict(zip(ids, ds.values("nola_reviewed.label")))
    assert "nola:accepted" in tags[ids[0]] and reviewed[ids[0]] is None  # same label: still an accept
    for i in ids[1:4]:  # changed: the accepted label is now the reviewer's, a correction of the new one
        assert "nola:corrected" in tags[i] and "nola:accepted" not in tags[i] and reviewed[i] == before[i]
    assert all("nola:rejected" in tags[i] for i in ids[4:6])
    assert all(reviewed[i] == "ship" and "nola:corrected" in tags[i] for i in ids[6:8])
    # Another field than the reviewed one: accepts are not about it.
    fo_io.write_classifications(ds, ids, REVIEW_CLASSES, probs[:, ::-1], "nola_zeroshot")
    ds.reload()
    assert "nola:accepted" in ds[ids[0]].tags


def test_an_operator_shows_what_its_job_waits_for_as_its_progress():
    """A message with no count (what the job waits for) reaches the App as the progress label;
    without the special case it read 'waiting for ... 0/0' at 100 %."""
    from operators import _common

    class Ctx:
        def __init__(self):
            self.calls = []

        def set_progress(self, progress, label):
            self.calls.append((progress, label))

    ctx = Ctx()
    fn = _common.progress_fn(ctx)
    fn(0, 0, "waiting for auto-label (pid 1, started 12:00:00, 2 min ago) on this dataset; up to 30 min")
    fn(3, 3, "embedding")
    assert ctx.calls == [
        (0.0, "waiting for auto-label (pid 1, started 12:00:00, 2 min ago) on this dataset; up to 30 min"),
        (1.0, "embedding 3/3"),
    ]
