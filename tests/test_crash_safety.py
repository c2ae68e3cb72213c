"""Crash safety and concurrent writers, with real processes.

A child process runs the whole NoLA pipeline and is SIGKILLed at chosen points: during
embedding (after some chunk checkpoints), half-way through writing a label field, and during
prompt tuning. After every kill the dataset and the indexes must be valid; re-running resumes,
and the final labels equal those of a run that was never interrupted.
"""

import logging
import os
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

from conftest import CIFAR_DIR, DATA_CLASSES, REPO, cifar_files
from fiftyone_nola.stages import runs
from fiftyone_nola.stages.artifacts import stage_writer

CLASSES = DATA_CLASSES
FIELDS = ("nola_zeroshot", "nola_dino", "nola")

# Runs auto_label on dataset argv[1]; argv[2] says where to SIGKILL itself ("none": nowhere).
# (It must not import conftest: that would give it another NOLA_HOME.)
# SIGKILL cannot be caught, so this is what a kill -9 or an OOM kill does at that point.
CHILD = textwrap.dedent(
    """
    import os, signal, sys
    import fiftyone as fo
    from fiftyone_nola.core.embed import EmbedConfig
    from fiftyone_nola.core.index import EmbeddingIndex
    from fiftyone_nola.core.models import tiny_clip_spec, tiny_dino_spec
    from fiftyone_nola.core.prompt_tuning import TuneConfig
    from fiftyone_nola.logs import lines_to
    from fiftyone_nola.pipeline import AutoLabelConfig, auto_label
    from fiftyone_nola.stages.nola import ZeroShotConfig

    name, point, descriptions = sys.argv[1], sys.argv[2], sys.argv[3]

    def die():
        sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    def log(msg):
        print(msg, flush=True)
        if point.startswith("log:") and point[4:] in msg:
            die()

    if point.startswith("write:"):  # half of the field's values reach the database, then death
        field, orig = point[6:], fo.Dataset.set_values
        def set_values(self, f, values, *a, **kw):
            if f == field and isinstance(values, dict):
                items = list(values.items())
                orig(self, f, dict(items[: len(items) // 2]), *a, **kw)
                die()
            return orig(self, f, values, *a, **kw)
        fo.Dataset.set_values = set_values

    if point.startswith("checkpoint:"):  # the n-th index checkpoint is the last one written
        n, orig_ckpt, calls = int(point.split(":")[1]), EmbeddingIndex.checkpoint, []
        def checkpoint(self):
            out = orig_ckpt(self)
            calls.append(out)
            if len(calls) >= n:
                die()
            return out
        EmbeddingIndex.checkpoint = checkpoint

    cfg = AutoLabelConfig(
        clip=tiny_clip_spec(), dino=tiny_dino_spec(),
        embed=EmbedConfig(batch_size=4, num_workers=0, chunk_size=4),
        zeroshot=ZeroShotConfig(descriptions_file=descriptions),
        tune=TuneConfig(epochs=3, batch_size=8, max_samples=0), device="cpu",
    )
    with lines_to(log):
        auto_label(fo.load_dataset(name), %r, cfg)
    print("CHILD-DONE", flush=True)
    """
) % (CLASSES,)


def _run_child(name: str, point: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, "-c", CHILD, name, point, str(CIFAR_DIR / "descriptions.json")],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _killed(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == -9, f"expected a SIGKILL, got {r.returncode}:\n{r.stdout[-3000:]}{r.stderr[-3000:]}"
    return r.stdout


def _labels(ds, field):
    return ds.values(f"{field}.label"), np.array(ds.values(f"{field}.confidence"), dtype=float)


def _assert_valid(ds, n):
    """The dataset reloads, keeps every sample, and each label is absent or whole and sane."""
    import fiftyone as fo

    from fiftyone_nola.core.models import tiny_clip_spec, tiny_dino_spec
    from fiftyone_nola.stages.embeddings import open_index

    ds.reload()
    assert len(ds) == n
    schema = ds.get_field_schema()
    for f in FIELDS:
        if f not in schema:
            continue
        for lab in ds.values(f):
            if lab is not None:
                assert isinstance(lab, fo.Classification)
                assert lab.label in CLASSES and 0.0 < lab.confidence <= 1.0
    for spec in (tiny_clip_spec(), tiny_dino_spec()):
        try:
            ix = open_index(ds, spec)
        except Exception as e:  # a store that was never created is fine, a broken one is not
            assert "No " in str(e) and "embeddings" in str(e), e
            continue
        assert set(ix.ids) <= set(ds.values("id"))


@pytest.mark.slow
@pytest.mark.integration
def test_sigkill_at_every_stage_then_resume_matches_uninterrupted(make_dataset):
    pairs = cifar_files(per_class=2)
    paths = [p for p, _ in pairs]
    ref, ds = make_dataset(paths), make_dataset(paths)
    n = len(paths)

    r = _run_child(ref.name, "none")
    assert r.returncode == 0 and "CHILD-DONE" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]

    # 1. killed while embedding, after 3 chunk checkpoints of 4 images
    _killed(_run_child(ds.name, "checkpoint:3"))
    _assert_valid(ds, n)

    # 2. killed half-way through writing the zero-shot field: embedding resumed first
    out = _killed(_run_child(ds.name, "write:nola_zeroshot"))
    assert f"{n - 12} to embed" in out, out  # the 12 checkpointed images were not redone
    _assert_valid(ds, n)
    assert 0 < ds.count("nola_zeroshot.label") < n  # really half-written...
    assert runs.get_run(ds, "nola_zeroshot") is None  # ...and not recorded as done

    # 3. killed during prompt tuning, after epoch 1's checkpoint and before epoch 2's
    out = _killed(_run_child(ds.name, "log:epoch 2/3"))
    assert "[embeddings:clip] up to date: reused" in out and "[zeroshot] up to date" not in out  # redone, not trusted
    _assert_valid(ds, n)
    assert ds.count("nola_zeroshot.label") == n

    # 4. killed half-way through writing the final predictions
    out = _killed(_run_child(ds.name, "write:nola"))
    assert "resuming prompt tuning" in out and "after epoch 1/3" in out, out
    assert "epoch 1/3" not in out.replace("after epoch 1/3", "")  # epoch 1 was not trained again
    _assert_valid(ds, n)

    # 5. an uninterrupted re-run completes: same labels as the run that was never killed
    r = _run_child(ds.name, "none")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "[zeroshot] up to date: reused" in r.stdout and "[dino_labeler] up to date: reused" in r.stdout
    ds.reload()
    ref.reload()
    for f in FIELDS:
        got, want = _labels(ds, f), _labels(ref, f)
        assert got[0] == want[0], f
        np.testing.assert_allclose(got[1], want[1], rtol=0, atol=1e-5, err_msg=f)
        assert runs.get_run(ds, runs.run_key_for(f)) is not None


@pytest.mark.integration
def test_stage_writer_forgets_the_run_record_of_an_unfinished_write(make_dataset):
    pairs = cifar_files(per_class=1)
    ds = make_dataset([p for p, _ in pairs])
    runs.record_run(ds, "nola_zeroshot", "zeroshot", {"x": 1}, {"done": True})
    with pytest.raises(RuntimeError), stage_writer(ds, "nola_zeroshot"):
        raise RuntimeError("died mid-write")
    assert runs.get_run(ds, "nola_zeroshot") is None


@pytest.mark.integration
def test_stage_writer_is_reentrant_and_excludes_other_threads(make_dataset, caplog):
    caplog.set_level(logging.INFO, logger="fiftyone_nola")
    pairs = cifar_files(per_class=1)
    ds = make_dataset([p for p, _ in pairs])
    events = []

    def other():
        with stage_writer(ds, "f"):
            events.append("other")

    with stage_writer(ds, "f"), stage_writer(ds, "f"):  # nested: no self-deadlock
        t = threading.Thread(target=other)
        t.start()
        time.sleep(1.0)
        events.append("first-done")
    t.join(timeout=30)
    assert events == ["first-done", "other"]
    assert any("another job is writing this stage" in m for m in caplog.messages)


SECOND_WRITER = textwrap.dedent(
    """
    import sys
    import fiftyone as fo
    from fiftyone_nola.stages.nola import ZeroShotConfig, zero_shot
    from fiftyone_nola.core.models import tiny_clip_spec
    from fiftyone_nola.logs import lines_to
    ds = fo.load_dataset(sys.argv[1])
    with lines_to(lambda m: print(m, flush=True)):
        zero_shot(ds, sys.argv[2].split(","), ZeroShotConfig(clip=tiny_clip_spec(), device="cpu"))
    print("CHILD-DONE", flush=True)
    """
)


@pytest.mark.slow
@pytest.mark.integration
def test_second_process_waits_for_the_writer_of_the_same_field(make_dataset):
    from fiftyone_nola.core.embed import EmbedConfig
    from fiftyone_nola.core.models import tiny_clip_spec
    from fiftyone_nola.stages.embeddings import compute_embeddings

    pairs = cifar_files(per_class=1)
    ds = make_dataset([p for p, _ in pairs])
    compute_embeddings(ds, "clip", clip=tiny_clip_spec(), config=EmbedConfig(num_workers=0, device="cpu"))
    env = dict(os.environ, PYTHONPATH=str(REPO))
    with stage_writer(ds, "nola_zeroshot"):
        proc = subprocess.Popen(
            [sys.executable, "-c", SECOND_WRITER, ds.name, ",".join(CLASSES)],
            env=env,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        seen = []
        for line in proc.stdout:
            seen.append(line)
            if "another job is writing this stage" in line:
                break
        assert any("another job is writing" in m for m in seen), "".join(seen) + proc.stderr.read()
        time.sleep(1.0)
        ds.reload()
        assert "nola_zeroshot" not in ds.get_field_schema()  # nothing written while we hold it
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0 and "CHILD-DONE" in out, out + err
    ds.reload()
    assert ds.count("nola_zeroshot.label") == len(ds)


# Saves the DINO labeler or the CDUL head to argv[2], SIGKILLed at argv[3]: "mid-write" (half
# the bytes of the file reach the disk), "before-sidecar" (CDUL: weights renamed in, sidecar not).
SAVE_CHILD = textwrap.dedent(
    """
    import os, signal, sys
    import torch
    from fiftyone_nola.core import dino_labeler as dl, cdul as ml, storage

    kind, path, point, seed = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    die = lambda: os.kill(os.getpid(), signal.SIGKILL)
    torch.manual_seed(seed)
    if point == "mid-write":
        orig = torch.save
        def torn_save(obj, f, *a, **k):
            orig(obj, f, *a, **k)
            with open(f, "r+b") as fh:
                fh.truncate(os.path.getsize(f) // 2)
            die()
        torch.save = torn_save
    if point == "before-sidecar":
        ml.classifier.write_json_atomic = lambda *a, **k: die()
    if kind == "dino":
        dl.save_labeler(path, dl.DinoLabeler(8, 3, hidden=4), ["a", "b", "c"])
    else:
        ml.save_classifier(path, ml.MultiLabelHead(8, 3), ["a", "b", "c"])
    print("SAVED", flush=True)
    """
)


def _save_child(kind: str, path, point: str, seed: int) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", SAVE_CHILD, kind, str(path), point, str(seed)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )


@pytest.mark.parametrize("kind", ["dino", "cdul"])
def test_sigkill_while_saving_a_labeler_or_head_keeps_the_previous_one(kind, tmp_path):
    from fiftyone_nola.core import cdul as ml
    from fiftyone_nola.core import dino_labeler as dl

    path = tmp_path / ("labeler.pt" if kind == "dino" else "head.pt")

    def load():
        if kind == "dino":
            return {k: v.clone() for k, v in dl.load_labeler(path, ["a", "b", "c"]).state_dict().items()}
        return {k: v.clone() for k, v in ml.load_classifier(path, ["a", "b", "c"])[0].state_dict().items()}

    assert "SAVED" in _save_child(kind, path, "none", 1).stdout
    before = load()
    r = _save_child(kind, path, "mid-write", 2)
    assert r.returncode == -9 and "SAVED" not in r.stdout
    after = load()  # the torn temp file never replaced the saved one
    assert all(np.array_equal(before[k].numpy(), after[k].numpy()) for k in before)


def test_sigkill_between_cdul_weights_and_sidecar_is_refused_not_mixed(tmp_path):
    from fiftyone_nola.core import cdul as ml
    from fiftyone_nola.core.errors import IndexMismatchError

    path = tmp_path / "head.pt"
    assert "SAVED" in _save_child("cdul", path, "none", 1).stdout
    r = _save_child("cdul", path, "before-sidecar", 2)
    assert r.returncode == -9
    with pytest.raises(IndexMismatchError, match="save was interrupted"):
        ml.load_classifier(path, ["a", "b", "c"])
    assert "SAVED" in _save_child("cdul", path, "none", 3).stdout  # a new save repairs it
    ml.load_classifier(path, ["a", "b", "c"])
