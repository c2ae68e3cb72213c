"""Exact search of flat stores (fiftyone_nola.core.index.search): same results as faiss IndexFlatIP,
ties by position, bounded blocks, and flat stores really take this path (no faiss search)."""

from __future__ import annotations

import faiss
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fiftyone_nola.core.index.format as fmt
import fiftyone_nola.core.index.search as es
from fiftyone_nola.core.index import EmbeddingIndex
from fiftyone_nola.core.index.search import topk_inner_product

_IndexFlatIP = faiss.IndexFlatIP  # the reference, even where a test makes the store's faiss fail


def unit(x):
    x = np.asarray(x, dtype=np.float32)
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, n, out=np.zeros_like(x), where=n > 0)


def faiss_flat(x, q, k):
    ix = _IndexFlatIP(x.shape[1])
    ix.add(np.ascontiguousarray(x, dtype=np.float32))
    return ix.search(np.ascontiguousarray(q, dtype=np.float32), k)


def reference(x, q, k, rows=None):
    """Exact top-k by float64 score, ties by lower position (exact on integer-valued data)."""
    rows = np.arange(len(x)) if rows is None else np.sort(np.asarray(rows))
    sc = q.astype(np.float64) @ x[rows].astype(np.float64).T
    out_s, out_p = [], []
    for r in sc:
        order = np.lexsort((rows, -r))[: min(k, len(rows))]
        out_s.append(r[order])
        out_p.append(rows[order])
    return np.array(out_s), np.array(out_p)


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of a few rows, one query per chunk, partition fallback on, single queries scanned
    by two threads in chunks of a few rows: every path is taken."""
    monkeypatch.setattr(es, "MIN_BLOCK_ROWS", 1)
    monkeypatch.setattr(es, "SCAN_THREADS", 2)
    monkeypatch.setattr(es, "SCAN_CHUNK_BYTES", 64)
    monkeypatch.setattr(es, "SEED_ROWS", 1)
    monkeypatch.setattr(es, "GATHER_BYTES", 64)
    monkeypatch.setattr(es, "PARTITION_MIN", 0)
    monkeypatch.setattr(es, "CANDIDATES_PER_RESULT", 0)
    return 256  # block_bytes


@pytest.mark.parametrize("tiny", [False, True])
@pytest.mark.parametrize(
    "n,d,nq,k", [(5000, 64, 1, 10), (5000, 64, 37, 10), (3000, 32, 300, 5), (700, 16, 4, 700), (50, 8, 3, 80)]
)
def test_matches_faiss_index_flat_ip(request, n, d, nq, k, tiny):
    bb = request.getfixturevalue("small_blocks") if tiny else es.DEFAULT_BLOCK_BYTES
    rng = np.random.default_rng(n + nq)
    x, q = unit(rng.normal(size=(n, d))), unit(rng.normal(size=(nq, d)))
    s, p = topk_inner_product(x, q, k, block_bytes=bb)
    fs, fp = faiss_flat(x, q, min(k, n))
    assert s.shape == p.shape == (nq, min(k, n)) and s.dtype == np.float32 and p.dtype == np.int64
    np.testing.assert_array_equal(p, fp)
    np.testing.assert_allclose(s, fs, atol=1e-5)


@pytest.mark.parametrize("tiny", [False, True])
def test_ties_and_zero_rows_go_to_the_lower_position(request, tiny):
    bb = request.getfixturevalue("small_blocks") if tiny else es.DEFAULT_BLOCK_BYTES
    rng = np.random.default_rng(1)
    base = rng.integers(-2, 3, size=(40, 6)).astype(np.float32)
    x = np.concatenate([base, base, np.zeros((30, 6), np.float32), base[::-1]])  # many exact ties
    q = np.concatenate([rng.integers(-2, 3, size=(5, 6)), np.zeros((1, 6))]).astype(np.float32)
    for k in (1, 7, 40, 75, len(x) + 5):
        s, p = topk_inner_product(x, q, k, block_bytes=bb)
        rs, rp = reference(x, q, k)
        np.testing.assert_array_equal(p, rp)
        np.testing.assert_array_equal(s, rs.astype(np.float32))
        # faiss agrees on the scores; on a tie at the k-th it may pick other equal rows
        fs, fp = faiss_flat(x, q, min(k, len(x)))
        np.testing.assert_array_equal(s, fs)
        for r in range(len(q)):
            strict = s[r] > s[r, -1]
            assert set(p[r][strict]) == set(fp[r][strict])
    # the zero query scores 0 against everything: the first k positions
    assert list(topk_inner_product(x, q[-1:], 5, block_bytes=bb)[1][0]) == [0, 1, 2, 3, 4]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    n=st.integers(1, 120),
    d=st.integers(1, 6),
    nq=st.integers(1, 4),
    k=st.integers(1, 130),
    bb=st.sampled_from([4, 64, 1024, 1 << 20]),
    subset=st.booleans(),
    seed=st.integers(0, 10**6),
)
def test_property_exact_on_integer_data(small_blocks, n, d, nq, k, bb, subset, seed):
    # Small integers: every dot product is exact in float32, so ids and scores must be identical.
    rng = np.random.default_rng(seed)
    x = rng.integers(-3, 4, size=(n, d)).astype(np.float32)
    q = rng.integers(-3, 4, size=(nq, d)).astype(np.float32)
    rows = rng.permutation(n)[: rng.integers(1, n + 1)] if subset else None  # unsorted on purpose
    s, p = topk_inner_product(x, q, k, rows=rows, block_bytes=bb)
    rs, rp = reference(x, q, k, rows)
    np.testing.assert_array_equal(p, rp)
    np.testing.assert_array_equal(s, rs.astype(np.float32))


def test_later_blocks_better_than_earlier(small_blocks):
    # Scores rise with the position: every block beats the running top-k (worst case merging).
    t = np.linspace(0.0, 1.0, 500, dtype=np.float32)
    x = np.stack([t, np.ones_like(t)], axis=1)
    q = np.array([[1.0, 0.0], [-1.0, 0.0]], np.float32)
    s, p = topk_inner_product(x, q, 12, block_bytes=small_blocks)
    assert list(p[0]) == list(range(499, 487, -1)) and list(p[1]) == list(range(12))
    s, p = topk_inner_product(x, q, 12, block_bytes=1 << 20)
    assert list(p[0]) == list(range(499, 487, -1))


def test_restricted_rows_and_empty_inputs():
    rng = np.random.default_rng(2)
    x, q = unit(rng.normal(size=(2000, 16))), unit(rng.normal(size=(3, 16)))
    rows = rng.choice(2000, 300, replace=False)
    s, p = topk_inner_product(x, q, 10, rows=rows)
    fs, fp = faiss_flat(x[np.sort(rows)], q, 10)
    np.testing.assert_array_equal(p, np.sort(rows)[fp])
    np.testing.assert_allclose(s, fs, atol=1e-5)
    assert topk_inner_product(x, q, 10, rows=np.array([], np.int64))[1].shape == (3, 0)
    assert topk_inner_product(x[:0], q, 10)[0].shape == (3, 0)
    with pytest.raises(ValueError):
        topk_inner_product(x, q[:, :8], 10)


def test_single_query_is_scanned_by_the_thread_pool(small_blocks, monkeypatch):
    import threading

    threads = set()
    real = np.einsum

    def spy(*a, **kw):
        threads.add(threading.current_thread().name)
        return real(*a, **kw)

    monkeypatch.setattr(np, "einsum", spy)
    rng = np.random.default_rng(7)
    x, q = unit(rng.normal(size=(400, 8))), unit(rng.normal(size=(1, 8)))
    s, p = topk_inner_product(x, q, 5)
    fs, fp = faiss_flat(x, q, 5)
    np.testing.assert_array_equal(p, fp)
    np.testing.assert_allclose(s, fs, atol=1e-6)
    assert threads and all(t.startswith("nola-exact-search") for t in threads)


def _child_search(x, q, out):
    out.put(topk_inner_product(x, q, 3)[1].tolist())


def test_search_works_in_a_forked_child(small_blocks):
    # The child inherits the parent's pool object but none of its threads: it must not hang.
    import multiprocessing as mp

    rng = np.random.default_rng(8)
    x, q = unit(rng.normal(size=(300, 8))), unit(rng.normal(size=(1, 8)))
    want = topk_inner_product(x, q, 3)[1].tolist()  # the parent's pool now exists
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    child = ctx.Process(target=_child_search, args=(x, q, out))
    child.start()
    got = out.get(timeout=60)
    child.join(60)
    assert child.exitcode == 0 and got == want


# ---------------------------------------------------------------- through EmbeddingIndex


@pytest.fixture
def no_faiss_search(monkeypatch):
    """Fail on any faiss flat search; count calls of the exact path."""
    calls = []
    real = es.topk_inner_product

    def spy(*a, **kw):
        calls.append(a[2])
        return real(*a, **kw)

    def boom(*a, **kw):
        raise AssertionError("a flat store must not search through faiss on a CPU")

    monkeypatch.setattr(es, "topk_inner_product", spy)
    monkeypatch.setattr(faiss, "IndexFlatIP", boom)
    return calls


def store_truth(ix, q, k):
    """faiss IndexFlatIP over the store's own vectors, in store ids; rows with equal scores
    listed by position (faiss's own order of ties differs)."""
    s, lab = faiss_flat(np.asarray(ix.vectors), unit(q), min(k, len(ix)))
    lab = np.array([r[np.lexsort((r, -sr))] for sr, r in zip(s, lab)])
    ids = ix.ids
    return s, [[ids[j] for j in r] for r in lab]


@pytest.mark.parametrize("kind", ["flat", "ivf", "ivfpq"])  # ivf/ivfpq: small, hence flat
def test_flat_store_takes_the_exact_path(tmp_path, no_faiss_search, kind):
    rng = np.random.default_rng(3)
    ids = [f"s{i}" for i in range(3000)]
    x, q = rng.normal(size=(3000, 32)), rng.normal(size=(20, 32))
    ix = EmbeddingIndex.create(tmp_path / "ix", 32, {}, index_type=kind)
    ix.add(ids, x)
    truth_s, truth = store_truth(ix, q, 10)
    for nq in (1, 20):
        s, got = ix.search(q[:nq], 10)
        assert got == truth[:nq]
        np.testing.assert_allclose(s, truth_s[:nq], atol=1e-5)
    _, sub = ix.search(q[:2], 5, restrict_to=ids[::3])
    assert set().union(*sub) <= set(ids[::3])
    assert no_faiss_search == [10, 10, 5] and ix._structure is None
    assert ix.meta["built_index_type"] == "flat"


def test_approximate_store_still_uses_faiss(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(es, "topk_inner_product", lambda *a, **k: calls.append(1))
    rng = np.random.default_rng(4)
    ix = EmbeddingIndex.create(tmp_path / "ix", 8, {}, index_type="hnsw")
    ix.add([str(i) for i in range(200)], rng.normal(size=(200, 8)))
    ix.search(rng.normal(size=(2, 8)), 3)
    assert calls == [] and isinstance(ix._structure.index, faiss.IndexHNSWFlat)


def test_k_larger_than_store_zero_rows_and_reverse_queries(tmp_path, no_faiss_search):
    rng = np.random.default_rng(5)
    x = rng.normal(size=(30, 8))
    x[[4, 17]] = 0.0  # zero rows score 0 against any query
    ids = [f"z{i:02d}" for i in range(30)]
    ix = EmbeddingIndex.create(tmp_path / "ix", 8, {})
    ix.add(ids, x)
    q = rng.normal(size=(3, 8))
    for sign in (1.0, -1.0):  # brain_backend's reverse=True searches with -q
        s, got = ix.search(sign * q, 100)
        ts, truth = store_truth(ix, sign * q, 100)
        assert s.shape == (3, 30) and got == truth
        np.testing.assert_allclose(s, ts, atol=1e-5)
        for r in range(3):  # the two zero rows tie at 0: lower position first
            zeros = [i for i in got[r] if i in ("z04", "z17")]
            assert zeros == ["z04", "z17"]


def test_memory_mapped_store_after_deletions_and_upserts(tmp_path, monkeypatch, no_faiss_search):
    monkeypatch.setattr(fmt, "MMAP_MIN_BYTES", 1)
    monkeypatch.setattr(es, "DEFAULT_BLOCK_BYTES", 4096)  # many blocks over the mapped file
    rng = np.random.default_rng(6)
    ids = [f"m{i:04d}" for i in range(2500)]
    path = tmp_path / "ix"
    ix = EmbeddingIndex.create(path, 16, {})
    ix.add(ids, rng.normal(size=(2500, 16)))
    ix.save()
    re = EmbeddingIndex.open(path)
    assert isinstance(re.vectors, np.memmap)
    q = rng.normal(size=(25, 16))
    ts, truth = store_truth(re, q, 10)
    s, got = re.search(q, 10)
    assert got == truth
    np.testing.assert_allclose(s, ts, atol=1e-5)
    # deletions and in-place upserts (copy-on-write), then a reopen that replays checkpoints
    re.remove(ids[::7])
    re.add(ids[1:40:3], rng.normal(size=(13, 16)))
    assert isinstance(re.vectors, np.memmap)
    re.checkpoint()
    for ix2 in (re, EmbeddingIndex.open(path)):
        ts, truth = store_truth(ix2, q, 10)
        s, got = ix2.search(q, 10)
        assert got == truth and not set().union(*got) & set(ids[::7])
        np.testing.assert_allclose(s, ts, atol=1e-5)
