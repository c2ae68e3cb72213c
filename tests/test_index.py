"""EmbeddingIndex: correctness against numpy, persistence, crash safety, locking, ANN recall."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fiftyone_nola.core.errors import IndexMismatchError, InvalidInputError, MissingEmbeddingsError
from fiftyone_nola.core.index import EmbeddingIndex, IndexLockedError, recall_at_k

REPO = Path(__file__).resolve().parents[1]


def unit(x):
    x = np.asarray(x, dtype=np.float32)
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, n, out=np.zeros_like(x), where=n > 0)


def brute(vecs, ids, q, k):
    sims = unit(q) @ unit(vecs).T
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, order, axis=1), [[ids[j] for j in r] for r in order]


def data(n, d, seed=0):
    rng = np.random.default_rng(seed)
    return [f"id{i:05d}" for i in range(n)], rng.normal(size=(n, d)).astype(np.float32)


def clustered(n, d, n_clusters, seed=0, spread=0.15):
    rng = np.random.default_rng(seed)
    centers = unit(rng.normal(size=(n_clusters, d)))
    lab = rng.integers(0, n_clusters, size=n)
    return unit(centers[lab] + spread * rng.normal(size=(n, d)).astype(np.float32))


@pytest.fixture
def store(tmp_path):
    return tmp_path / "idx"


def test_add_get_search_match_numpy(store):
    ids, v = data(300, 16)
    ix = EmbeddingIndex.create(store, 16, {"model_key": "m"})
    ix.add(ids, v)
    assert len(ix) == 300 and ix.ids == ids and ix.dim == 16
    got, found = ix.get(["id00007", "nope", "id00003"])
    assert found.tolist() == [True, False, True]
    np.testing.assert_allclose(got, unit(v[[7, 3]]), atol=1e-6)
    assert ix.has(["id00001", "x"]).tolist() == [True, False]
    q = np.random.default_rng(1).normal(size=(5, 16)).astype(np.float32)
    scores, res = ix.search(q, 10)
    exp_scores, exp_ids = brute(v, ids, q, 10)
    assert res == exp_ids
    np.testing.assert_allclose(scores, exp_scores, atol=1e-5)
    assert np.all(np.diff(scores, axis=1) <= 1e-7)  # descending
    # single 1-D query and k larger than the index
    s1, r1 = ix.search(q[0], 1000)
    assert s1.shape == (1, 300) and r1[0][:10] == exp_ids[0]


@pytest.mark.parametrize("exact_max", [50_000, 10])  # numpy subset path / faiss IDSelector path
@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_restrict_to(store, monkeypatch, exact_max, kind):
    from fiftyone_nola.core.index import search

    monkeypatch.setattr(search, "EXACT_SUBSET_MAX", exact_max)
    ids, v = data(200, 8)
    ix = EmbeddingIndex.create(store, 8, {}, index_type=kind)
    ix.add(ids, v)
    subset = ids[50:90] + ["unknown"]
    q = v[:3]
    scores, res = ix.search(q, 5, restrict_to=subset)
    exp_scores, exp = brute(v[50:90], ids[50:90], q, 5)
    assert res == exp
    np.testing.assert_allclose(scores, exp_scores, atol=1e-5)
    scores, res = ix.search(q, 5, restrict_to=["unknown"])
    assert scores.shape == (3, 0) and res == [[], [], []]


def test_upsert_replaces_and_fingerprints(store):
    ix = EmbeddingIndex.create(store, 4, {})
    ix.add(["a", "b"], np.eye(4)[:2], fingerprints=["fa", "fb"])
    ix.add(["b", "c"], np.array([[0, 0, 3, 0], [0, 0, 0, 2]]), fingerprints=["fb2", None])
    assert ix.ids == ["a", "b", "c"]
    got, _ = ix.get(["b", "c"])
    np.testing.assert_allclose(got, np.eye(4)[2:])  # normalised
    assert ix.fingerprints == {"a": "fa", "b": "fb2"}
    # repeated id within one call: last wins
    ix.add(["a", "a"], np.array([[1, 1, 0, 0], [0, 1, 0, 0]]))
    np.testing.assert_allclose(ix.get(["a"])[0], [[0, 1, 0, 0]])
    assert len(ix) == 3 and "a" not in ix.fingerprints


def test_remove_and_id_mapping(store):
    ids, v = data(50, 8)
    ix = EmbeddingIndex.create(store, 8, {})
    ix.add(ids, v)
    assert ix.remove(["id00000", "id00010", "id00049", "missing"]) == 3
    assert len(ix) == 47 and "id00010" not in ix
    keep = [i for i in range(50) if i not in (0, 10, 49)]
    assert ix.ids == [ids[i] for i in keep]
    got, found = ix.get(ids)
    assert found.sum() == 47
    np.testing.assert_allclose(got, unit(v[keep]), atol=1e-6)
    # search after removal maps faiss positions back to the right ids
    _, res = ix.search(v[keep[:4]], 3)
    _, exp = brute(v[keep], [ids[i] for i in keep], v[keep[:4]], 3)
    assert res == exp
    assert ix.remove([]) == 0


def test_zero_vector_no_nan(store):
    ix = EmbeddingIndex.create(store, 3, {})
    ix.add(["z", "x"], np.array([[0, 0, 0], [1, 0, 0]], dtype=np.float32))
    got, _ = ix.get(["z"])
    assert np.all(got == 0) and np.isfinite(got).all()
    scores, res = ix.search(np.zeros(3), 2)
    assert np.isfinite(scores).all() and np.allclose(scores, 0)
    scores, res = ix.search(np.array([1.0, 0, 0]), 2)
    assert res[0] == ["x", "z"] and scores[0, 0] == pytest.approx(1.0)
    with pytest.raises(InvalidInputError):
        ix.add(["n"], np.array([[np.nan, 0, 0]]))


def test_bad_inputs(store):
    ix = EmbeddingIndex.create(store, 4, {})
    with pytest.raises(IndexMismatchError):
        ix.add(["a"], np.ones((1, 5)))
    with pytest.raises(InvalidInputError):
        ix.add(["a", "b"], np.ones((1, 4)))
    with pytest.raises(IndexMismatchError):
        ix.search(np.ones((1, 5)), 1)
    assert ix.search(np.ones((2, 4)), 3)[0].shape == (2, 0)  # empty index
    with pytest.raises(InvalidInputError):
        EmbeddingIndex.create(store, 4, {})  # already exists
    with pytest.raises(MissingEmbeddingsError):
        EmbeddingIndex.open(store.parent / "nothing-here")


def test_save_open_roundtrip(store):
    ids, v = data(120, 12)
    ix = EmbeddingIndex.create(store, 12, {"model_key": "clip-x", "extra": [1, 2]})
    ix.add(ids, v, fingerprints=[f"fp{i}" for i in range(120)])
    ix.remove(ids[:20])
    ix.save()
    ix2 = EmbeddingIndex.open(store, expect={"model_key": "clip-x", "dim": 12, "extra": (1, 2)})
    assert ix2.ids == ids[20:] and len(ix2) == 100
    np.testing.assert_array_equal(ix2.get(ids[20:])[0], ix.get(ids[20:])[0])
    assert ix2.fingerprints == {f"id{i:05d}": f"fp{i}" for i in range(20, 120)}
    m = ix2.meta
    assert m["count"] == 100 and m["normalized"] is True and m["metric"] == "ip"
    assert m["format_version"] == 1 and {"faiss", "numpy", "fiftyone_nola"} <= set(m["versions"])
    assert m["created"] and m["updated"] and m["index_type"] == "flat"
    vec_files = sorted(p.name for p in store.glob("vectors-*.npy"))
    assert len(vec_files) == 1  # old generations were cleaned up
    arr = np.load(store / vec_files[0], allow_pickle=False)
    assert arr.dtype == np.float32 and arr.shape == (100, 12)


def test_checkpoint_then_crash_without_save(store):
    ix = EmbeddingIndex.create(store, 6, {"model_key": "m"})
    ids, v = data(90, 6)
    for i in range(3):
        ix.add(ids[i * 30 : (i + 1) * 30], v[i * 30 : (i + 1) * 30], [f"f{i}"] * 30)
        assert ix.checkpoint() is not None
    ix.remove(ids[:5])
    ix.add(["id00001"], v[1:2])  # removed then re-added within one chunk
    ix.checkpoint()
    assert ix.checkpoint() is None  # nothing new
    ix.add(["lost"], np.ones((1, 6)))  # never checkpointed: lost in the "crash"
    del ix
    chunks = sorted(p.name for p in (store / "chunks").iterdir())
    assert chunks == ["000001.npz", "000002.npz", "000003.npz", "000004.npz"]
    re = EmbeddingIndex.open(store, expect={"model_key": "m"})
    expected = ["id00001"] + ids[5:]
    assert sorted(re.ids) == sorted(expected) and "lost" not in re
    np.testing.assert_allclose(re.get(expected)[0], unit(v[[1] + list(range(5, 90))]), atol=1e-6)
    assert "id00001" not in re.fingerprints and re.fingerprints["id00040"] == "f1"
    # saving merges and removes the chunks; a further checkpoint numbers on
    re.save()
    assert list((store / "chunks").iterdir()) == []
    re.add(["new"], np.ones((1, 6)))
    assert re.checkpoint().name == "000005.npz"
    again = EmbeddingIndex.open(store)
    assert len(again) == len(expected) + 1


def test_crash_between_meta_and_chunk_cleanup(store):
    ix = EmbeddingIndex.create(store, 4, {})
    ix.add(["a"], np.eye(4)[:1])
    chunk = ix.checkpoint()
    kept = chunk.read_bytes()
    ix.save()
    chunk.write_bytes(kept)  # as if killed right after meta.json was replaced
    ix.remove(["a"])
    ix.checkpoint()
    re = EmbeddingIndex.open(store)
    assert len(re) == 0  # the stale chunk is not replayed over the newer removal


SIGKILL_CHILD = textwrap.dedent(
    """
    import sys, numpy as np
    from fiftyone_nola.core.index import EmbeddingIndex
    ix = EmbeddingIndex.create(sys.argv[1], 8, {"model_key": "kill"})
    i = 0
    while True:
        rng = np.random.default_rng(i)
        ix.add([f"c{i}-{j}" for j in range(20)], rng.normal(size=(20, 8)))
        if i % 3 == 1:
            ix.remove([f"c{i - 1}-0"])
        ix.checkpoint()
        if i % 4 == 3:
            ix.save()
        print(i, flush=True)
        i += 1
    """
)


def test_sigkill_keeps_every_checkpoint(store):
    proc = subprocess.Popen(
        [sys.executable, "-c", SIGKILL_CHILD, str(store)], stdout=subprocess.PIPE, text=True, cwd=REPO
    )
    done = []
    try:
        for line in proc.stdout:
            done.append(int(line))
            if len(done) >= 12:
                break
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert len(done) >= 12, "child died early"
    ix = EmbeddingIndex.open(store, expect={"model_key": "kill", "dim": 8})
    for i in done:
        v = np.random.default_rng(i).normal(size=(20, 8))
        removed_later = (i + 1) % 3 == 1  # iteration i+1 removes c{i}-0
        if removed_later and (i + 1) in done:
            assert f"c{i}-0" not in ix
        # c{i}-0 is uncertain only if the kill hit iteration i+1 around its checkpoint
        want = list(range(1, 20)) if removed_later else list(range(20))
        got, found = ix.get([f"c{i}-{j}" for j in want])
        assert found.all(), f"checkpointed batch {i} lost"
        np.testing.assert_allclose(got, unit(v[want]), atol=1e-6)
    # whatever the child was doing when killed, the reopened store saves and reopens cleanly
    ix.save()
    assert len(EmbeddingIndex.open(store)) == len(ix)


def _corrupt_store(store, n=30, d=4):
    ids, v = data(n, d)
    ix = EmbeddingIndex.create(store, d, {"model_key": "m"})
    ix.add(ids, v)
    ix.save()
    return ix


def test_corrupt_meta_json(store):
    _corrupt_store(store)
    (store / "meta.json").write_text("{not json")
    with pytest.raises(IndexMismatchError, match="not valid JSON"):
        EmbeddingIndex.open(store)


def test_missing_meta_and_unknown_format(store):
    _corrupt_store(store)
    meta = json.loads((store / "meta.json").read_text())
    meta["format_version"] = 99
    (store / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(IndexMismatchError, match="format_version"):
        EmbeddingIndex.open(store)
    (store / "meta.json").unlink()
    with pytest.raises(IndexMismatchError, match="meta.json"):
        EmbeddingIndex.open(store)
    with pytest.raises(IndexMismatchError):
        EmbeddingIndex.open_or_create(store, 4, {"model_key": "m"})
    assert len(EmbeddingIndex.open_or_create(store, 4, {"model_key": "m"}, overwrite=True)) == 0


def test_truncated_vectors(store):
    _corrupt_store(store)
    (vf,) = store.glob("vectors-*.npy")
    raw = vf.read_bytes()
    vf.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(IndexMismatchError, match="rebuild"):
        EmbeddingIndex.open(store)


def test_vectors_ids_disagree(store):
    _corrupt_store(store)
    (idf,) = store.glob("ids-*.json")
    idf.write_text(json.dumps(json.loads(idf.read_text())[:-1]))
    with pytest.raises(IndexMismatchError, match="inconsistent"):
        EmbeddingIndex.open(store)
    idf.write_text(json.dumps(["same"] * 30))
    with pytest.raises(IndexMismatchError, match="duplicate"):
        EmbeddingIndex.open(store)


def test_dim_mismatch_in_files(store):
    _corrupt_store(store)
    (vf,) = store.glob("vectors-*.npy")
    with open(vf, "wb") as f:
        np.save(f, np.zeros((30, 5), np.float32))
    with pytest.raises(IndexMismatchError, match="float32"):
        EmbeddingIndex.open(store)


def test_expect_mismatch(store):
    _corrupt_store(store)
    with pytest.raises(IndexMismatchError, match="model_key") as e:
        EmbeddingIndex.open(store, expect={"model_key": "other"})
    assert "overwrite=True" in str(e.value)
    with pytest.raises(IndexMismatchError, match="dim"):
        EmbeddingIndex.open_or_create(store, 8, {"model_key": "m"})
    with pytest.raises(IndexMismatchError, match="model_key"):
        EmbeddingIndex.open_or_create(store, 4, {"model_key": "x"})
    ok = EmbeddingIndex.open_or_create(store, 4, {"model_key": "m"}, index_type="hnsw")
    assert len(ok) == 30 and ok.meta["index_type"] == "hnsw"
    fresh = EmbeddingIndex.open_or_create(store, 8, {"model_key": "x"}, overwrite=True)
    assert len(fresh) == 0 and fresh.dim == 8


def test_corrupt_chunk(store):
    ix = EmbeddingIndex.create(store, 4, {})
    ix.add(["a"], np.ones((1, 4)))
    chunk = ix.checkpoint()
    chunk.write_bytes(b"garbage")
    with pytest.raises(IndexMismatchError, match="Checkpoint"):
        EmbeddingIndex.open(store)


LOCK_CHILD = textwrap.dedent(
    """
    import sys, time
    from fiftyone_nola.core.index import EmbeddingIndex
    ix = EmbeddingIndex.open(sys.argv[1])
    with ix.lock():
        print("locked", flush=True)
        time.sleep(60)
    """
)


def test_lock_held_by_other_process(store):
    ix = EmbeddingIndex.create(store, 4, {})
    proc = subprocess.Popen([sys.executable, "-c", LOCK_CHILD, str(store)], stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert proc.stdout.readline().strip() == "locked"
        t0 = time.monotonic()
        with pytest.raises(IndexLockedError, match="locked by another process"):
            with ix.lock(timeout=0.3):
                pass
        assert time.monotonic() - t0 >= 0.25
    finally:
        proc.kill()
        proc.wait(timeout=30)
    with ix.lock(timeout=5):  # released when the holder died
        with ix.lock():  # re-entrant for the same object
            pass


def test_ann_recall(tmp_path):
    n, d = 12_000, 32
    x = clustered(n, d, 60, seed=3)
    ids = [str(i) for i in range(n)]
    q = clustered(200, d, 60, seed=4)
    flat = EmbeddingIndex.create(tmp_path / "flat", d, {})
    flat.add(ids, x)
    _, truth = flat.search(q, 10)
    _, brute_ids = brute(x, ids, q, 10)
    assert recall_at_k(brute_ids, truth) > 0.999
    for kind in ("ivf", "hnsw"):
        ix = EmbeddingIndex.create(tmp_path / kind, d, {}, index_type=kind)
        ix.add(ids, x)
        _, approx = ix.search(q, 10)
        assert ix.meta["built_index_type"] == kind
        r = recall_at_k(truth, approx)
        assert r >= 0.9, f"{kind} recall@10 = {r}"
        ix.save()
        assert list((tmp_path / kind).glob("faiss-*.index"))
        re = EmbeddingIndex.open(tmp_path / kind)
        assert recall_at_k(truth, re.search(q, 10)[1]) >= 0.9
        # restricted search stays exact on a small subset
        sub = ids[:500]
        _, res = re.search(q[:5], 5, restrict_to=sub)
        _, exp = brute(x[:500], sub, q[:5], 5)
        assert res == exp


def test_ivf_falls_back_to_flat_when_small(store):
    ids, v = data(500, 8)
    ix = EmbeddingIndex.create(store, 8, {}, index_type="ivf")
    ix.add(ids, v)
    _, res = ix.search(v[:3], 4)
    assert ix.meta["built_index_type"] == "flat" and res == brute(v, ids, v[:3], 4)[1]


def test_recall_at_k_helper():
    assert recall_at_k([["a", "b"]], [["b", "c"]]) == 0.5
    assert recall_at_k(["a", "b"], ["a", "b", "c"]) == 1.0
    assert recall_at_k([["a"], ["b"]], [["a"], ["c"]]) == 0.5


ops = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.lists(st.integers(0, 15), min_size=1, max_size=6), st.integers(0, 10**6)),
        st.tuples(st.just("remove"), st.lists(st.integers(0, 15), max_size=6), st.just(0)),
        st.tuples(st.just("checkpoint"), st.just([]), st.just(0)),
        st.tuples(st.just("save"), st.just([]), st.just(0)),
    ),
    max_size=25,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops)
def test_property_id_mapping_matches_dict_model(seq):
    with tempfile.TemporaryDirectory() as tmp:
        ix = EmbeddingIndex.create(os.path.join(tmp, "s"), 3, {})
        model: dict[str, np.ndarray] = {}
        for op, keys, seed in seq:
            names = [f"k{k}" for k in keys]
            if op == "add":
                vecs = np.random.default_rng(seed).normal(size=(len(names), 3)).astype(np.float32)
                ix.add(names, vecs)
                for name, vec in zip(names, vecs):
                    model[name] = unit(vec[None])[0]
            elif op == "remove":
                assert ix.remove(names) == len(set(names) & set(model))
                for name in names:
                    model.pop(name, None)
            elif op == "checkpoint":
                ix.checkpoint()
            else:
                ix.save()
            assert len(ix) == len(model) and set(ix.ids) == set(model)
        every = [f"k{k}" for k in range(16)]
        got, found = ix.get(every)
        assert [e for e, f in zip(every, found) if f] == [e for e in every if e in model]
        for name, vec in zip([e for e in every if e in model], got):
            np.testing.assert_allclose(vec, model[name], atol=1e-6)
        if model:
            name = next(iter(model))
            _, res = ix.search(model[name], 1)
            assert np.dot(ix.get(res[0])[0][0], model[name]) == pytest.approx(1.0, abs=1e-5)
        ix.checkpoint()  # state on disk = last save + checkpoints
        re = EmbeddingIndex.open(os.path.join(tmp, "s"))
        assert set(re.ids) == set(model)
        got2, _ = re.get(sorted(model))
        np.testing.assert_allclose(got2, np.array([model[k] for k in sorted(model)]).reshape(-1, 3), atol=1e-6)


def test_faiss_file_is_derived_data(store):
    ids, v = data(300, 8)
    ix = EmbeddingIndex.create(store, 8, {}, index_type="hnsw")
    ix.add(ids, v)
    ix.save()
    (fx,) = store.glob("faiss-*.index")
    fx.write_bytes(b"not a faiss index")  # unreadable: rebuilt from vectors at first search
    re = EmbeddingIndex.open(store)
    assert re.search(v[:2], 3)[1] == brute(v, ids, v[:2], 3)[1]
    with pytest.raises(InvalidInputError):
        re.update_meta({"dim": 3})
    re.update_meta({"ef_search": 200, "note": "x"})
    re.save()
    assert EmbeddingIndex.open(store).meta["note"] == "x"


# ---------------------------------------------------------------- ivfpq and memory-mapped vectors


def tight(n, d, n_clusters=100, seed=0):
    """Clusters as tight as the benchmark's (cosine to the centre ~0.9), unlike clustered()."""
    return clustered(n, d, n_clusters, seed=seed, spread=0.5 / np.sqrt(d))


def test_ivfpq_recall_exact_scores_and_persistence(store, monkeypatch):
    import faiss

    n, d = 20_000, 64
    x, q = tight(n, d, seed=3), tight(300, d, seed=4)
    ids = [str(i) for i in range(n)]
    ix = EmbeddingIndex.create(store, d, {}, index_type="ivfpq")
    ix.add(ids, x)
    scores, got = ix.search(q, 10)
    assert ix.meta["built_index_type"] == "ivfpq"
    assert isinstance(ix._structure.cpu, faiss.IndexIVFPQ) and ix._structure.cpu.code_size == d // 8
    _, truth = brute(x, ids, q, 10)
    r = recall_at_k(truth, got)
    assert r >= 0.95, f"ivfpq recall@10 = {r}"
    # scores are exact cosines of the returned ids (re-ranked), not PQ estimates
    pos = np.array([[int(i) for i in row] for row in got])
    np.testing.assert_allclose(scores, np.einsum("qkd,qd->qk", x[pos], unit(q)), atol=1e-5)
    assert recall_at_k(truth, ix.search(q, 10, refine_factor=1)[1]) < r  # codes alone rank worse
    with pytest.raises(InvalidInputError):
        ix.search(q, 10, refine_factor=0)
    ix.save()
    assert len(list(store.glob("faiss-*.index"))) == 1
    re = EmbeddingIndex.open(store)

    def no_build(self):
        raise AssertionError("the saved faiss file should have been reused")

    monkeypatch.setattr(EmbeddingIndex, "_build", no_build)
    s2, got2 = re.search(q, 10)
    assert got2 == got
    np.testing.assert_allclose(s2, scores, atol=1e-6)


def test_ivfpq_small_is_flat_and_restricted_search(store, monkeypatch):
    from fiftyone_nola.core.index import search

    ids, v = data(500, 8)
    ix = EmbeddingIndex.create(store, 8, {}, index_type="ivfpq")
    ix.add(ids, v)
    assert ix.search(v[:3], 4)[1] == brute(v, ids, v[:3], 4)[1]
    assert ix.meta["built_index_type"] == "flat"
    # above the PQ minimum, a large subset goes through faiss's IDSelector, then re-ranking
    monkeypatch.setattr(search, "EXACT_SUBSET_MAX", 10)
    n, d = 12_000, 32
    x, q = tight(n, d, seed=5), tight(50, d, seed=6)
    big_ids = [str(i) for i in range(n)]
    big = EmbeddingIndex.create(store.parent / "big", d, {}, index_type="ivfpq")
    big.add(big_ids, x)
    sub = big_ids[::2]
    _, res = big.search(q, 10, restrict_to=sub)
    assert big.meta["built_index_type"] == "ivfpq"
    assert set().union(*res) <= set(sub)
    assert recall_at_k(brute(x[::2], sub, q, 10)[1], res) >= 0.9


def test_switch_existing_store_to_ivfpq_and_back(store):
    n, d = 12_000, 32
    x = tight(n, d, seed=7)
    ids = [str(i) for i in range(n)]
    ix = EmbeddingIndex.create(store, d, {"model_key": "m"})
    ix.add(ids, x)
    ix.save()
    # a store written before ivfpq existed has neither key: defaults apply
    meta = json.loads((store / "meta.json").read_text())
    del meta["pq_m"], meta["refine_factor"]
    (store / "meta.json").write_text(json.dumps(meta))
    ix = EmbeddingIndex.open_or_create(store, d, {"model_key": "m"}, index_type="ivfpq")
    _, got = ix.search(x[:20], 5)
    assert ix.meta["built_index_type"] == "ivfpq" and ix._structure.cpu.code_size == d // 8
    assert recall_at_k(brute(x, ids, x[:20], 5)[1], got) >= 0.95
    ix.save()
    assert json.loads((store / "meta.json").read_text())["index_type"] == "ivfpq"
    assert list(store.glob("faiss-*.index"))
    ix = EmbeddingIndex.open_or_create(store, d, {"model_key": "m"}, index_type="flat")
    assert ix.search(x[:3], 5)[1] == brute(x, ids, x[:3], 5)[1]
    ix.save()
    assert not list(store.glob("faiss-*.index"))


def test_pq_m_is_validated_and_rebuilds(store):
    with pytest.raises(InvalidInputError, match="pq_m"):
        EmbeddingIndex.create(store, 16, {"pq_m": 5}, index_type="ivfpq")
    x = tight(10_000, 16, seed=8)
    ix = EmbeddingIndex.create(store, 16, {}, index_type="ivfpq")
    assert ix.meta["pq_m"] == 2 and ix.meta["refine_factor"] >= 1
    ix.add([str(i) for i in range(len(x))], x)
    ix.search(x[:1], 1)
    assert ix._structure.cpu.code_size == 2
    with pytest.raises(InvalidInputError, match="pq_m"):
        ix.update_meta({"pq_m": 7})
    ix.update_meta({"pq_m": 4})
    ix.search(x[:1], 1)
    assert ix._structure.cpu.code_size == 4


def test_stale_faiss_file_of_another_type_is_rebuilt(store):
    x = tight(10_000, 16, seed=9)
    ids = [str(i) for i in range(len(x))]
    ix = EmbeddingIndex.create(store, 16, {}, index_type="ivf")
    ix.add(ids, x)
    ix.save()
    meta = json.loads((store / "meta.json").read_text())
    meta.update(index_type="ivfpq", built_index_type="ivfpq")  # file still holds an IVFFlat
    (store / "meta.json").write_text(json.dumps(meta))
    re = EmbeddingIndex.open(store)
    assert re._structure is None
    re.search(x[:2], 3)
    assert re.meta["built_index_type"] == "ivfpq"


def test_rerank_exact_pads_missing_candidates():
    from fiftyone_nola.core.index import rerank_exact

    vecs = np.eye(4, dtype=np.float32)
    q = np.array([[0.1, 0.9, 0.2, 0.0], [1.0, 0.0, 0.0, 0.0]], dtype=np.float32)
    labels = np.array([[0, 1, 2], [3, -1, -1]])
    scores, out = rerank_exact(q, labels, vecs, 2)
    assert out.tolist() == [[1, 2], [3, -1]]
    np.testing.assert_allclose(scores[0], [0.9, 0.2], atol=1e-6)
    assert scores[1, 0] == 0 and scores[1, 1] == -np.inf


def test_large_vector_files_are_memory_mapped_copy_on_write(store, monkeypatch):
    from fiftyone_nola.core.index import format as fmt

    monkeypatch.setattr(fmt, "MMAP_MIN_BYTES", 1)
    monkeypatch.setattr(fmt, "_BLOCK_ROWS", 7)  # the finite check reads the file in blocks
    ids, v = data(100, 8)
    ix = EmbeddingIndex.create(store, 8, {})
    ix.add(ids, v)
    ix.save()
    re = EmbeddingIndex.open(store)
    assert isinstance(re.vectors, np.memmap)
    assert re.search(v[:3], 5)[1] == brute(v, ids, v[:3], 5)[1]
    (vf,) = store.glob("vectors-*.npy")
    on_disk = np.load(vf)
    re.add(["id00001"], np.ones((1, 8)))  # in place: copy-on-write, the file is untouched
    re.remove(["id00002"])
    np.testing.assert_array_equal(np.load(vf), on_disk)
    re.save()
    (vf2,) = store.glob("vectors-*.npy")
    assert vf2 != vf and isinstance(re.vectors, np.memmap)
    assert Path(re.vectors.filename) == vf2.resolve()
    again = EmbeddingIndex.open(store)
    np.testing.assert_allclose(again.get(["id00001"])[0], unit(np.ones((1, 8))), atol=1e-6)
    assert "id00002" not in again and len(again) == 99
    again.add(["new"], np.ones((1, 8)))  # growing copies the map into RAM
    assert not isinstance(again.vectors, np.memmap) and len(again) == 100


def test_memory_mapped_corruption_is_detected(store, monkeypatch):
    from fiftyone_nola.core.index import format as fmt

    monkeypatch.setattr(fmt, "MMAP_MIN_BYTES", 1)
    monkeypatch.setattr(fmt, "_BLOCK_ROWS", 7)
    _corrupt_store(store)
    (vf,) = store.glob("vectors-*.npy")
    arr = np.load(vf)
    arr[29, 3] = np.nan  # in the last block
    with open(vf, "wb") as f:
        np.save(f, arr)
    with pytest.raises(IndexMismatchError, match="NaN"):
        EmbeddingIndex.open(store)
    raw = vf.read_bytes()
    vf.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(IndexMismatchError, match="rebuild"):
        EmbeddingIndex.open(store)
