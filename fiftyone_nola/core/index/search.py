"""Search over a store's unit vectors: the exact top-k of flat stores and the helpers every
store search shares (query checks, exact re-ranking, recall).

Exact top-k is an inner-product scan by blocked BLAS matmul + threshold selection. Pure numpy,
so it moves with the vectors it searches (in RAM or memory-mapped). It is the search of ``flat``
stores on CPUs, in place of ``faiss.IndexFlatIP``, which is 2-4x slower there with faiss-cpu
1.15: a batch takes faiss's BLAS path only from ``distance_compute_blas_threshold`` (128000) /
dim queries on (250 at 512-d); below that each query scans the whole matrix on its own (memory
traffic x nq), and a single query gains nothing from a second OpenMP thread, while numpy's sgemv
splits it over the cores. Here a batch reads each row block once per chunk of queries, by one
BLAS call, and a single query is scanned by a few threads taking chunks of rows as they go (see
SCAN_THREADS).

Selection is cheap next to the matmul: each query's k-th best score so far (at first, that of
the first few thousand scores) is a threshold; a block's scores are compared with it in one
pass and only the few rows that beat it are merged (no argpartition over every score). Ties
are broken by position (lower first), so results are deterministic.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import numpy as np

from fiftyone_nola.core import cpu_isa
from fiftyone_nola.core.arrays import l2_normalize
from fiftyone_nola.core.errors import IndexMismatchError, InvalidInputError

# Scores of one (query chunk x row block) at most this big: bounds the working memory whatever
# the number of queries (32 MB: one BLAS call per 8M rows for a single query, per 84k rows
# for a batch of 100).
DEFAULT_BLOCK_BYTES = 1 << 25
# Rows of a restricted search are gathered (copied) at most this many bytes at a time.
GATHER_BYTES = 1 << 26
# Until a query has k results, the k-th best of the first this many scores of a block is its
# threshold: tight enough that few other rows pass it, with no extra BLAS call.
SEED_ROWS = 8192
# No block is smaller than this (nor than 4k rows): per-call overheads stay negligible.
MIN_BLOCK_ROWS = 1024
# When more than this many scores of a block, and more than CANDIDATES_PER_RESULT per wanted
# result, beat the running thresholds, the block's own top k is taken first (np.partition)
# before merging: sorting that many candidates would cost more.
PARTITION_MIN = 1 << 16
CANDIDATES_PER_RESULT = 8
# A single query is scanned by this many threads (None: the usable CPUs, at most 8), each
# taking the next chunk of rows when done with one and computing it single-threaded (einsum).
# On a 2-core machine shared with other jobs this was 1.25-1.3x faster than one multi-threaded
# BLAS gemv, whose threads each own a fixed half of the rows: a descheduled one stalls the
# call. Batches stay on BLAS (gemm is compute-bound, einsum is not a gemm).
SCAN_THREADS: Optional[int] = None
# Rows per chunk: 32 MB of vectors (16384 rows at 512-d; 8 and 128 MB were slower / no faster).
# Restricted rows are gathered per chunk, at most GATHER_BYTES / 8 at a time.
SCAN_CHUNK_BYTES = 1 << 25

# A restricted search over at most this many vectors is done exactly in numpy: cheaper than
# a filtered faiss search and never loses recall to the filter. Larger subsets of ivf/hnsw/ivfpq
# stores use a faiss IDSelector; flat stores are always searched exactly in numpy.
EXACT_SUBSET_MAX = 50_000

_pool: Optional[ThreadPoolExecutor] = None
_pool_size = 0
_pool_lock = threading.Lock()


def _scan_pool() -> Optional[ThreadPoolExecutor]:
    global _pool, _pool_size
    n = SCAN_THREADS
    if n is None:
        n = min(8, cpu_isa.usable_cores())
    if n <= 1:
        return None
    with _pool_lock:
        if _pool is None or _pool_size != n:
            _pool, _pool_size = ThreadPoolExecutor(n, thread_name_prefix="nola-exact-search"), n
        return _pool


def _forget_pool() -> None:
    # A forked child inherits the executor but not its threads: it starts its own.
    global _pool
    _pool = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def topk_inner_product(
    vectors: np.ndarray,
    queries: np.ndarray,
    k: int,
    rows: Optional[np.ndarray] = None,
    block_bytes: Optional[int] = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` rows of ``vectors`` by inner product with each query.

    ``vectors`` is an N×D float32 array (a memory map is read in place, never copied whole);
    ``rows`` optionally restricts the search to those positions. Returns ``(scores, positions)``,
    both nq×k' with k' = min(k, rows searched): scores float32 descending, positions int64 into
    ``vectors``; equal scores are ordered by position. Working memory is bounded by
    ``block_bytes`` (scores; default :data:`DEFAULT_BLOCK_BYTES`) and :data:`GATHER_BYTES`
    (gathered restricted rows), plus the nq×k' result itself.
    """
    block_bytes = int(block_bytes or DEFAULT_BLOCK_BYTES)
    q = np.ascontiguousarray(queries, dtype=np.float32)
    if q.ndim != 2 or vectors.ndim != 2 or q.shape[1] != vectors.shape[1]:
        raise ValueError(f"queries {q.shape} and vectors {vectors.shape} do not match")
    if rows is not None:
        rows = np.sort(np.asarray(rows, dtype=np.int64))  # increasing: ties go to the lower
    m = len(vectors) if rows is None else len(rows)
    nq = len(q)
    kk = min(int(k), m)
    if kk <= 0 or nq == 0:
        return np.empty((nq, 0), np.float32), np.empty((nq, 0), np.int64)
    min_rows = min(m, max(4 * kk, MIN_BLOCK_ROWS))
    qchunk = max(1, min(nq, block_bytes // (4 * min_rows)))
    step = min(m, max(min_rows, block_bytes // (4 * qchunk)))
    if rows is not None:
        step = min(step, max(min_rows, GATHER_BYTES // (4 * vectors.shape[1])))
    seed = max(4 * kk, SEED_ROWS)
    scores = np.empty((nq, kk), np.float32)
    pos = np.empty((nq, kk), np.int64)
    for a in range(0, nq, qchunk):
        s, p = _search_chunk(vectors, q[a : a + qchunk], kk, rows, m, seed, step)
        scores[a : a + qchunk] = s
        pos[a : a + qchunk] = p
    return scores, pos


def _search_chunk(vectors, q, k, rows, m, seed, step):
    nq = len(q)
    best_s = np.full((nq, k), -np.inf, np.float32)
    best_i = np.full((nq, k), -1, np.int64)
    for start in range(0, m, step):
        stop = min(m, start + step)
        base = start if rows is None else rows[start:stop]
        if nq == 1:
            sc = _scan_one(vectors, q[0], rows, start, stop)[None, :]
        else:
            if rows is None:
                block = np.asarray(vectors[start:stop], dtype=np.float32)
            else:
                block = np.asarray(vectors[rows[start:stop]], dtype=np.float32)
            sc = q @ block.T
        _merge_block(sc, base, best_s, best_i, seed)
    return best_s, best_i


def _scan_one(vectors, q0: np.ndarray, rows, start: int, stop: int) -> np.ndarray:
    """Scores of rows ``start:stop`` (of ``rows`` if given) against one query, by chunks."""
    out = np.empty(stop - start, np.float32)
    nbytes = SCAN_CHUNK_BYTES if rows is None else min(SCAN_CHUNK_BYTES, GATHER_BYTES // 8)
    chunk = max(MIN_BLOCK_ROWS, nbytes // (4 * vectors.shape[1]))

    def work(o: int) -> None:
        e = min(stop - start, o + chunk)
        blk = vectors[start + o : start + e] if rows is None else vectors[rows[start + o : start + e]]
        np.einsum("nd,d->n", np.asarray(blk, dtype=np.float32), q0, out=out[o:e])

    offsets = range(0, stop - start, chunk)
    pool = _scan_pool() if len(offsets) > 1 else None
    if pool is None:
        for o in offsets:
            work(o)
    else:
        for f in [pool.submit(work, o) for o in offsets]:
            f.result()
    return out


def _merge_block(sc: np.ndarray, base, best_s: np.ndarray, best_i: np.ndarray, seed: int) -> None:
    """Fold one block's scores (nq×b) into the running best (nq×k, in place).

    ``base`` is the block's first position (an int) or each column's position (an array).
    Rows are merged if they may enter the top k; the merge ranks by score, then position.
    """
    nq, k = best_s.shape
    b = sc.shape[1]
    filled = best_i[:, -1] >= 0
    # A row tying with the current k-th best loses (it comes later than every row kept): > it.
    thr = best_s[:, -1].copy()
    if not filled.all():
        # No k-th best yet: the k-th best of the block's first scores bounds it from below (>=).
        s0 = min(b, seed)
        k0 = min(k, s0)
        first = np.partition(sc[:, :s0], s0 - k0, axis=1)[:, s0 - k0]
        thr[~filled] = np.nextafter(first[~filled], np.float32(-np.inf))
    mask = sc > thr[:, None]
    if np.count_nonzero(mask) > max(CANDIDATES_PER_RESULT * k * nq, PARTITION_MIN):
        # Few thresholds yet (first block) or a block better than all before: keep only each
        # query's k best of the block (all of them on a tie at the k-th).
        kb = min(k, b)
        kth = np.partition(sc, b - kb, axis=1)[:, b - kb]
        mask &= sc >= kth[:, None]
    qi, ji = np.nonzero(mask)
    if len(qi) == 0:
        return
    cand_i = ji + base if np.isscalar(base) else base[ji]
    kept = best_i >= 0
    all_q = np.concatenate([np.nonzero(kept)[0], qi])
    all_s = np.concatenate([best_s[kept], sc[qi, ji]])
    all_i = np.concatenate([best_i[kept], cand_i])
    order = np.lexsort((all_i, -all_s, all_q))  # by query, score descending, position
    all_q, all_s, all_i = all_q[order], all_s[order], all_i[order]
    rank = np.arange(len(all_q)) - np.searchsorted(all_q, all_q, side="left")
    top = rank < k
    best_s.fill(-np.inf)
    best_i.fill(-1)
    best_s[all_q[top], rank[top]] = all_s[top]
    best_i[all_q[top], rank[top]] = all_i[top]


def exact_search(
    vectors: np.ndarray, ids: Sequence[str], q: np.ndarray, k: int, rows: Optional[np.ndarray] = None
) -> tuple[np.ndarray, list[list[str]]]:
    """Exact top-k over all ``vectors``, or over the positions ``rows``, as ids; ties go to the
    lower position."""
    scores, pos = topk_inner_product(vectors, q, k, rows)
    return scores, [[ids[j] for j in r] for r in pos]


def subset_is_exact(n_rows: int, flat: bool, gpus: int) -> bool:
    """Whether a search restricted to ``n_rows`` rows is done exactly in numpy."""
    return n_rows <= EXACT_SUBSET_MAX or bool(gpus) or flat


def normalize_rows(x: np.ndarray) -> np.ndarray:
    """float32 N×D copy with unit-norm rows (a 1-d vector is one row); zero rows stay zero."""
    return l2_normalize(np.atleast_2d(x))


def check_queries(queries: np.ndarray, k: int, dim: int, path: Path) -> tuple[np.ndarray, int]:
    """Unit-norm float32 queries and an int ``k``; refuses a wrong dim, NaN/inf or ``k <= 0``."""
    q = normalize_rows(np.asarray(queries, dtype=np.float32))
    if q.shape[1] != dim:
        raise IndexMismatchError(f"Query dim {q.shape[1]} does not match the index dim {dim} at {path}.")
    if not np.isfinite(q).all():
        raise InvalidInputError("search() got NaN/inf query vectors")
    k = int(k)
    if k <= 0:
        raise InvalidInputError(f"k must be positive, got {k}")
    return q, k


def no_hits(nq: int) -> tuple[np.ndarray, list[list[str]]]:
    """The result of a search that has no candidate rows."""
    return np.empty((nq, 0), np.float32), [[] for _ in range(nq)]


def rerank_exact(queries: np.ndarray, labels: np.ndarray, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner products of each query with its candidate rows; the best ``k`` of them.

    ``labels`` (nq×c) are row positions in ``vectors``, -1 for none. Returns scores (nq×k,
    descending, -inf where a query had fewer candidates) and their labels (-1 there).
    """
    nq, c = labels.shape
    k = min(k, c)
    scores = np.full((nq, k), -np.inf, dtype=np.float32)
    out = np.full((nq, k), -1, dtype=np.int64)
    # One query at a time: only its candidates' rows are gathered (a memory-mapped file is
    # read nowhere else). einsum, not BLAS: a threaded gemv this small ran 3x slower than a
    # single-threaded loop on a busy 2-core machine.
    for i in range(nq):
        lab = labels[i][labels[i] >= 0]
        sc = np.einsum("cd,d->c", np.asarray(vectors[lab], dtype=np.float32), queries[i])
        top = np.argsort(-sc, kind="stable")[:k]
        scores[i, : len(top)] = sc[top]
        out[i, : len(top)] = lab[top]
    return scores, out


def recall_at_k(true_ids: Sequence, approx_ids: Sequence) -> float:
    """Mean over queries of |true ∩ approx| / |true| (k = length of each true row).

    Accepts one query (a list of ids) or many (a list of lists).
    """
    if len(true_ids) == 0:
        return 1.0
    if isinstance(true_ids[0], str):
        true_ids, approx_ids = [true_ids], [approx_ids]
    scores = []
    for t, a in zip(true_ids, approx_ids):
        t = list(t)
        if not t:
            scores.append(1.0)
            continue
        scores.append(len(set(t) & set(list(a)[: len(t)])) / len(t))
    return float(np.mean(scores))
