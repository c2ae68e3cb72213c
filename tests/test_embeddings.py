"""The embedding stage on real images: incremental, resumable, robust to bad files."""

import shutil

import numpy as np
import pytest
from PIL import Image

from conftest import cifar_files
from fiftyone_nola.core import embed as embed_mod
from fiftyone_nola.core.embed import EmbedConfig, embed_filepaths
from fiftyone_nola.core.errors import EmptyViewError, MissingEmbeddingsError
from fiftyone_nola.core.models import tiny_clip_spec, tiny_dino_spec
from fiftyone_nola.stages import fo_io
from fiftyone_nola.stages.embeddings import compute_embeddings, load_embeddings, open_index

# Every test here embeds real CIFAR images (../shared/data).
pytestmark = pytest.mark.integration

CFG = EmbedConfig(batch_size=4, num_workers=0, chunk_size=4)


@pytest.fixture
def image_dir(tmp_path):
    files = []
    for i, (p, _) in enumerate(cifar_files(per_class=1)):
        dst = tmp_path / f"{i:02d}.jpg"
        shutil.copy(p, dst)
        files.append(str(dst))
    bad = tmp_path / "corrupt.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    gray = tmp_path / "gray.png"
    Image.open(files[0]).convert("L").save(gray)
    return files, str(bad), str(gray), str(tmp_path / "missing.jpg")


def test_embed_counts_tags_and_matches_direct_embedding(make_dataset, image_dir, tiny_clip):
    files, bad, gray, missing = image_dir
    ds = make_dataset(files + [bad, gray, missing])
    out = compute_embeddings(ds, "both", tiny_clip_spec(), tiny_dino_spec(), CFG)
    for fam in ("clip", "dino"):
        s = out[fam]
        assert s["samples"] == 13 and s["embedded"] == 11 and s["failed"] == 2 and s["index_size"] == 11
    tagged = set(ds.match_tags(fo_io.UNREADABLE_TAG).values("filepath"))
    assert tagged == {bad, missing}
    ids, vecs = load_embeddings(ds, tiny_clip_spec())
    assert np.isnan(vecs).any(axis=1).sum() == 2
    direct, failed = embed_filepaths(tiny_clip, files, EmbedConfig(batch_size=3, num_workers=0))
    direct /= np.linalg.norm(direct, axis=1, keepdims=True)
    got = vecs[: len(files)]
    assert np.allclose(got, direct, atol=1e-5)
    # the run is recorded on the dataset
    assert "nola_embeddings_clip" in ds.list_runs()


def test_rerun_is_incremental_and_tracks_changes(make_dataset, image_dir):
    files, *_ = image_dir
    ds = make_dataset(files)
    first = compute_embeddings(ds, "clip", tiny_clip_spec(), config=CFG)["clip"]
    assert first["embedded"] == 10
    again = compute_embeddings(ds, "clip", tiny_clip_spec(), config=CFG)["clip"]
    assert again["embedded"] == 0 and again["reused"] == 10
    # a changed file is re-embedded, a deleted sample leaves the index
    Image.open(files[3]).rotate(90).save(files[3])
    ds.delete_samples(ds.match({"filepath": files[5]}))
    third = compute_embeddings(ds, "clip", tiny_clip_spec(), config=CFG)["clip"]
    assert third["embedded"] == 1 and third["index_size"] == 9


def test_interrupted_job_resumes_losing_at_most_one_chunk(make_dataset, image_dir, monkeypatch):
    files, *_ = image_dir
    ds = make_dataset(files)
    real = embed_mod.iter_embeddings

    def dying(*a, **k):
        for n, item in enumerate(real(*a, **k)):
            if n == 2:  # die after two batches (= two chunks of 4) were handed over
                raise KeyboardInterrupt
            yield item

    import fiftyone_nola.stages.embeddings as emb

    monkeypatch.setattr(emb, "iter_embeddings", dying)
    with pytest.raises(KeyboardInterrupt):
        compute_embeddings(ds, "clip", tiny_clip_spec(), config=CFG)
    monkeypatch.setattr(emb, "iter_embeddings", real)
    assert len(open_index(ds, tiny_clip_spec())) == 8  # both checkpointed chunks survived
    resumed = compute_embeddings(ds, "clip", tiny_clip_spec(), config=CFG)["clip"]
    assert resumed["embedded"] == 2 and resumed["reused"] == 8 and resumed["index_size"] == 10


def test_empty_view_and_missing_embeddings_are_clear(make_dataset, image_dir):
    files, *_ = image_dir
    ds = make_dataset(files)
    with pytest.raises(EmptyViewError, match="no samples"):
        compute_embeddings(ds.limit(0), "clip", tiny_clip_spec(), config=CFG)
    with pytest.raises(MissingEmbeddingsError, match="compute_embeddings"):
        load_embeddings(ds, tiny_dino_spec())


def test_view_only_embeds_its_samples(make_dataset, image_dir):
    files, *_ = image_dir
    ds = make_dataset(files)
    out = compute_embeddings(ds.limit(3), "dino", dino=tiny_dino_spec(), config=CFG)
    assert out["dino"]["embedded"] == 3 and out["dino"]["index_size"] == 3


def _hold_lock(path, ready, release):
    from fiftyone_nola.core.index import EmbeddingIndex

    ix = EmbeddingIndex.open(path)
    with ix.lock(what="a test holding the store"):
        ready.set()
        release.wait(60)


def test_second_job_on_a_locked_index_waits_then_reuses_or_is_refused_clearly(
    make_dataset, image_dir, monkeypatch, caplog
):
    """The second job waits (said once, naming the holder) and reuses what is stored; with
    NOLA_JOB_WAIT_S=0, or past the wait, it is refused with the clear message."""
    import logging
    import multiprocessing as mp
    import threading

    from fiftyone_nola.core.index import IndexLockedError
    from fiftyone_nola.stages.embeddings import index_path

    files, *_ = image_dir
    ds = make_dataset(files)
    compute_embeddings(ds.limit(2), "clip", tiny_clip_spec(), config=CFG)
    ctx = mp.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(index_path(ds, tiny_clip_spec()), ready, release))
    holder.start()
    try:
        assert ready.wait(60)
        monkeypatch.setenv("NOLA_JOB_WAIT_S", "0")
        with pytest.raises(IndexLockedError, match="locked by another process: a test holding the store"):
            compute_embeddings(ds, "clip", tiny_clip_spec(), config=CFG)
        monkeypatch.setenv("NOLA_JOB_WAIT_S", "0.5")
        with pytest.raises(IndexLockedError, match=r"waited 0.5 s.*NOLA_JOB_WAIT_S"):
            compute_embeddings(ds, "clip", tiny_clip_spec(), config=CFG)
        monkeypatch.delenv("NOLA_JOB_WAIT_S")
        caplog.set_level(logging.INFO, logger="fiftyone_nola")
        threading.Timer(1.0, release.set).start()  # the holder finishes a second later
        out = compute_embeddings(ds, "clip", tiny_clip_spec(), config=CFG)["clip"]
    finally:
        release.set()
        holder.join(60)
    waits = [m for m in caplog.messages if "waiting for a test holding the store" in m]
    assert len(waits) == 1 and "up to 30 min" in waits[0], caplog.messages
    assert out["index_size"] == len(files) and out["reused"] == 2  # nothing lost, nothing torn
