"""Jobs on one dataset at the same time, with real processes: two auto-label commands both finish
(the second waits and reuses), a reviewer's decisions made while a run rewrites the predictions
are all kept, and a killed job is taken over at once.

Every child shares this session's database name and NOLA_HOME (conftest sets them in the
environment children inherit); nothing assumes a database service is or is not running. Tiny
random models on generated images, PyTorch engine (no engine measurement): seconds per run.
"""

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
import uuid

import numpy as np
import pytest

from conftest import REPO, REVIEW_CLASSES, tiny_images, tiny_pipeline_config

ENV = dict(os.environ, PYTHONPATH=str(REPO))


def _spawn(code_or_args, out_path, *argv, env=None):
    """A child process writing to files (an unread pipe would block it)."""
    cmd = [sys.executable, *code_or_args] if isinstance(code_or_args, list) else [sys.executable, "-c", code_or_args]
    out = open(out_path, "w")
    return subprocess.Popen([*cmd, *argv], env=env or ENV, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, text=True)


@contextlib.contextmanager
def _reaped(procs):
    """Children never outlive a failed test."""
    try:
        yield
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(30)


# ---------------------------------------------------------------------------- decisions during a run

# Predicts into "nola" in chunks of 3 and re-flags; half-way (30 samples written) it waits until
# the reviewer has made the first half of the decisions, on samples it has not rewritten yet.
PREDICT = textwrap.dedent(
    """
    import os, sys, time
    import fiftyone as fo
    from fiftyone_nola.core.models import tiny_clip_spec
    from fiftyone_nola.logs import lines_to
    from fiftyone_nola.pipeline_steps import flag_for_review
    from fiftyone_nola.stages import fo_io
    from fiftyone_nola.stages.nola import predict

    name, model_dir, classes, sync = sys.argv[1:5]
    fo_io.WRITE_CHUNK = 3  # many small writes
    label, calls = fo_io.classification_label, [0]

    def classification_label(*a, **k):  # builds each chunk's values, before the chunk is written
        if calls[0] == 30:
            open(os.path.join(sync, "half-written"), "w").close()
            t0 = time.monotonic()
            while not os.path.exists(os.path.join(sync, "half-decided")) and time.monotonic() - t0 < 120:
                time.sleep(0.05)
        calls[0] += 1
        return label(*a, **k)

    fo_io.classification_label = classification_label
    ds = fo.load_dataset(name)
    with lines_to(lambda m: print(m, flush=True)):
        predict(ds, model_dir, tiny_clip_spec(), "nola", device="cpu")
        flag_for_review(ds, classes.split(","), "nola")
    print("PREDICT-DONE", flush=True)
    """
)

# Decisions as the sample review makes them (accept the label shown, reject, or pick a class):
# the first batch while the run writes other samples and before it reaches these, the second
# on samples it has rewritten, while it writes the rest and re-flags.
DECIDE = textwrap.dedent(
    """
    import json, os, sys, time
    import fiftyone as fo
    from fiftyone_nola.stages import review

    name, batches, classes, sync = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3].split(","), sys.argv[4]
    ds = fo.load_dataset(name)
    done = []
    for b, ids in enumerate(batches):
        if b == 1:
            open(os.path.join(sync, "half-decided"), "w").close()
            t0 = time.monotonic()
            while not os.path.exists(os.path.join(sync, "half-written")) and time.monotonic() - t0 < 120:
                time.sleep(0.05)
        for sid in ids:
            j = len(done)
            shown = ds.select(sid).values("nola.label")[0]  # what the reviewer sees
            action = ("accept", "reject", "correct")[j % 3]
            label = shown if action == "accept" else classes[j % len(classes)] if action == "correct" else None
            review.decide(ds, [sid], action, label)
            done.append([sid, action, label])
    print("DECISIONS", json.dumps(done), flush=True)
    """
)


def _truth(ds, sid):
    """What the dataset now says a reviewer decided for ``sid``: ('rejected', None) or the label."""
    s = ds[sid]
    if "nola:rejected" in s.tags:
        return "rejected"
    if "nola:corrected" in s.tags:
        return s["nola_reviewed"].label
    if "nola:accepted" in s.tags:
        return s["nola"].label if s["nola"] is not None else None
    return "undecided"


@pytest.mark.slow
def test_decisions_made_while_a_prediction_run_rewrites_the_field_are_all_kept(make_dataset, tmp_path):
    """The reviewer decides 50 samples while another process predicts (in chunks of 3) and
    re-flags: every decision stands afterwards (an accept keeps the label it accepted, as a
    correction if the new run changed it), the predictions are the new run's, and the queue is
    the new run's doubtful samples that nobody decided."""
    from fiftyone_nola.pipeline import auto_label
    from fiftyone_nola.stages import review

    ds = make_dataset(tiny_images(tmp_path / "images", 56))
    cfg = tiny_pipeline_config(descriptions_file=None, allow_template_fallback=True, app_ready=False)
    summary = auto_label(ds, REVIEW_CLASSES, cfg)
    model_dir = summary["stages"]["prompt_tuning"]["model_dir"]
    ids = ds.values("id")
    new = dict(zip(ids, ds.values("nola.label")))
    # An earlier run's predictions, all different from the new run's and all doubtful.
    old = {i: REVIEW_CLASSES[(REVIEW_CLASSES.index(lab) + 1) % 4] for i, lab in new.items()}
    import fiftyone as fo

    ds.set_values("nola", {i: fo.Classification(label=lab, confidence=0.3) for i, lab in old.items()}, key_field="id")
    review.store_class_list(ds, REVIEW_CLASSES)
    review.flag_samples(ds, "nola", threshold=0.5)
    assert review.queue_length(ds) == len(ids)

    batches = [ids[30:55], ids[:25]]  # 25 before the run rewrites them, 25 after
    decided = set(batches[0] + batches[1])
    classes, sync = ",".join(REVIEW_CLASSES), str(tmp_path)
    procs = [
        _spawn(PREDICT, tmp_path / "predict.out", ds.name, model_dir, classes, sync),
        _spawn(DECIDE, tmp_path / "decide.out", ds.name, json.dumps(batches), classes, sync),
    ]
    with _reaped(procs):
        for p, log in zip(procs, ("predict.out", "decide.out")):
            assert p.wait(timeout=300) == 0, (tmp_path / log).read_text()[-3000:]
    decisions = json.loads((tmp_path / "decide.out").read_text().split("DECISIONS", 1)[1])
    assert len(decisions) == 50

    ds.reload()
    assert dict(zip(ds.values("id"), ds.values("nola.label"))) == new  # the new run's labels
    lost = []
    for sid, action, label in decisions:
        want = "rejected" if action == "reject" else label
        got = _truth(ds, sid)
        if got != want or "nola:review" in ds[sid].tags:
            lost.append((sid, action, label, got, ds[sid].tags))
    assert not lost, f"{len(lost)} decisions lost or changed: {lost[:5]}"
    # Accepts of the old label (kept as the reviewer's label) and of the new one (plain accepts).
    accepted = [(sid, label) for sid, action, label in decisions if action == "accept"]
    assert {label == old[sid] for sid, label in accepted} == {True, False}
    # The queue after the run: the new predictions' doubtful samples nobody decided.
    conf = dict(zip(ds.values("id"), ds.values("nola.confidence")))
    want_queue = {i for i in ids if i not in decided and conf[i] < 0.5}
    assert set(review.queue_ids(ds)) == want_queue


# ---------------------------------------------------------------------------- two auto-label commands

TINY = ["--clip-arch", "nola-tiny-clip", "--clip-pretrained", "", "--dino", "nola_tiny_vit", "--random-init"]
TINY += ["--workers", "0", "--epochs", "1", "--batch-size", "4", "--engine", "torch"]
FIELDS = ("nola_zeroshot", "nola_dino", "nola")

# `python -m fiftyone_nola ARGS` (its main) once per repetition, each started by the test at one
# moment: the child imports once, then per repetition says it is ready and runs when told to.
AT_ONCE = textwrap.dedent(
    """
    import json, os, sys, time
    import fiftyone_nola.pipeline
    from fiftyone_nola.cli import main

    sync, reps = sys.argv[1], json.loads(sys.argv[2])
    for rep, argv in enumerate(reps):
        open(os.path.join(sync, f"ready{rep}.{os.getpid()}"), "w").close()
        while not os.path.exists(os.path.join(sync, f"start{rep}")):
            time.sleep(0.005)
        print(f"=== REP {rep} ===", flush=True)
        code = main(argv)
        print(f"=== REP-DONE {rep} {code} ===", flush=True)
    """
)


# The same command, SIGKILLed once the embedding stage has stored its first batch of vectors.
KILLED_MID_EMBEDDING = textwrap.dedent(
    """
    import os, signal, sys
    from fiftyone_nola.cli import main
    from fiftyone_nola.stages.embeddings import EmbedJob

    add = EmbedJob.add
    def add_then_die(self, rows, vectors):
        add(self, rows, vectors)
        print("KILLED-MID-EMBEDDING", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    EmbedJob.add = add_then_die
    sys.exit(main(sys.argv[1:]))
    """
)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("jobs-images")
    tiny_images(d, 8)
    return d


def _args(images, name):
    return ["auto-label", "--images", str(images), "--classes", ",".join(REVIEW_CLASSES), "--dataset", name, *TINY]


def _snapshot(name) -> dict:
    """What a run leaves, by file: every stage's labels, the stores' vectors, the review queue."""
    import fiftyone as fo

    from fiftyone_nola.core.index import EmbeddingIndex
    from fiftyone_nola.stages import review, runs

    ds = fo.load_dataset(name)
    ds.reload()
    ids, paths = ds.values("id"), ds.values("filepath")
    snap = {"n": len(ds), "queue": sorted(ds.select(review.queue_ids(ds)).values("filepath"))}
    for f in FIELDS:
        snap[f] = dict(zip(paths, ds.values(f"{f}.label")))
        snap[f + ".confidence"] = np.array(ds.values(f"{f}.confidence"), dtype=float)
        assert runs.get_run(ds, runs.run_key_for(f)) is not None, f
    for family in ("clip", "dino"):
        ix = EmbeddingIndex.open(runs.get_run(ds, f"nola_embeddings_{family}")["results"]["index_path"])
        assert sorted(ix.ids) == sorted(ids)  # every sample once
        snap[family] = ix.get(ids)[0]
    return snap


def _assert_same(got: dict, want: dict) -> None:
    assert got["n"] == want["n"] and got["queue"] == want["queue"]
    for f in FIELDS:
        assert got[f] == want[f], f
        np.testing.assert_allclose(got[f + ".confidence"], want[f + ".confidence"], atol=1e-5, err_msg=f)
    for family in ("clip", "dino"):
        np.testing.assert_allclose(got[family], want[family], atol=1e-5, err_msg=family)


def _processed(out: str) -> dict:
    line = next(x for x in out.splitlines() if "processed per step:" in x)
    return {k: int(v) for k, v in (p.rsplit(" ", 1) for p in line.split("processed per step: ", 1)[1].split(", "))}


@pytest.fixture(scope="module")
def reference(images):
    """One clean run of the command on its own dataset."""
    import fiftyone as fo

    from fiftyone_nola.cli import main

    name = f"jobs-ref-{uuid.uuid4().hex[:8]}"
    assert main(_args(images, name)) == 0
    yield _snapshot(name)
    fo.delete_dataset(name)


def _delete(name):
    import fiftyone as fo

    if name in fo.list_datasets():
        fo.delete_dataset(name)


def _wait_for(cond, procs, logs, timeout=300.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, [log.read_text()[-3000:] for log in logs]
        assert all(p.poll() in (None, 0) for p in procs), [log.read_text()[-3000:] for log in logs]
        time.sleep(0.05)


REPS = 5


@pytest.mark.slow
def test_two_auto_label_commands_on_one_new_dataset_both_finish_the_second_reusing(images, reference, tmp_path):
    """Two processes run the command on a dataset that does not exist yet, started at one moment,
    5 times: both exit 0; the one that found the other running says whom it waited for and
    processes nothing; the dataset and stores are those of a single run."""
    names = [f"jobs-two-{uuid.uuid4().hex[:8]}" for _ in range(REPS)]
    logs = [tmp_path / f"job{i}.out" for i in range(2)]
    reps = json.dumps([_args(images, name) for name in names])
    procs = [_spawn(AT_ONCE, log, str(tmp_path), reps) for log in logs]
    try:
        with _reaped(procs):
            for rep, name in enumerate(names):
                _wait_for(lambda rep=rep: len(list(tmp_path.glob(f"ready{rep}.*"))) == 2, procs, logs)
                (tmp_path / f"start{rep}").touch()
                done = f"=== REP-DONE {rep} "
                _wait_for(lambda done=done: all(done in log.read_text() for log in logs), procs, logs)
                outs = [log.read_text().split(f"=== REP {rep} ===", 1)[1].split(done, 1) for log in logs]
                assert all(tail.startswith("0 ") for _, tail in outs), [out[-3000:] for out, _ in outs]
                outs = [out for out, _ in outs]
                waited = [o for o in outs if "[auto-label] waiting for auto-label (pid " in o]
                assert len(waited) == 1, (rep, [o[-2000:] for o in outs])
                second, first = waited[0], next(o for o in outs if o is not waited[0])
                assert re.search(
                    r"waiting for auto-label \(pid \d+, started [\d:]+, .* ago\) on this dataset; up to 30 min", second
                )
                assert "the other job is done (waited" in second
                assert set(_processed(second).values()) == {0}, second[-3000:]  # reused everything
                assert _processed(first)["predict"] == reference["n"]
                _assert_same(_snapshot(name), reference)
            for p in procs:
                assert p.wait(timeout=60) == 0
    finally:
        for name in names:
            _delete(name)


@pytest.mark.slow
def test_a_job_killed_mid_embedding_is_taken_over_at_once_with_a_clean_runs_result(images, reference, tmp_path, capsys):
    from fiftyone_nola.cli import main
    from fiftyone_nola.core import jobs
    from fiftyone_nola.stages import fo_io
    from fiftyone_nola.stages.jobs import job_lock_path, running_job

    name = f"jobs-killed-{uuid.uuid4().hex[:8]}"
    try:
        first = _spawn(KILLED_MID_EMBEDDING, tmp_path / "first.out", *_args(images, name))
        assert first.wait(timeout=300) == -signal.SIGKILL, (tmp_path / "first.out").read_text()[-3000:]
        assert "KILLED-MID-EMBEDDING" in (tmp_path / "first.out").read_text()
        ds = fo_io.get_dataset(name)
        assert jobs.read_holder(job_lock_path(ds)).pid == first.pid  # its facts stay behind...
        assert running_job(ds) is None  # ...and are not taken for a running job

        capsys.readouterr()
        code = main(_args(images, name))  # the second job, in this process (one import less)
        out = capsys.readouterr().out
        assert code == 0, out[-3000:]
        said = [x for x in out.splitlines() if any(m in x for m in ("(pid ", "another job", "a job is running"))]
        assert not said, said
        assert _processed(out)["embeddings:clip"] > 0  # it did the killed job's work
        _assert_same(_snapshot(name), reference)
    finally:
        _delete(name)
