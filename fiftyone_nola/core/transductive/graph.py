"""The kNN graph of a set of unit vectors: memory O(N·k), never an N×N matrix.

Exact: every vector's top-k by inner product, by the store's blocked search
(:func:`fiftyone_nola.core.index.topk_inner_product`), O(N²·D) time. Approximate (``ivf``): the
vectors are split into about √N lists by faiss k-means (the store's IVF settings); the vectors
of each list are then searched exactly among the vectors of the ``nprobe`` lists nearest to
that list's centroid (up to ~260k vectors a vector is also a candidate of its second-nearest
list), one matrix product per list: O(N·nprobe·√N·D) time in BLAS, where a per-query faiss IVF
scan (no BLAS) ran several times slower on this kind of machine.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional

import numpy as np
from threadpoolctl import threadpool_limits

from fiftyone_nola.core import cpu_isa
from fiftyone_nola.core.index import ivf_nlist, ivf_train_size, new_ivf_index, sample_rows, topk_inner_product
from fiftyone_nola.core.progress import ProgressFn, null_progress

# Queries per exact-search call: bounds the result arrays and paces progress reports.
QUERY_CHUNK = 8192
MAX_WORKERS = 8  # threads of the graph search (the usable CPUs, at most this many)
SECOND_LIST_MAX = 512  # list size (√N: N up to ~260k) below which vectors join two lists


@dataclass
class KnnGraph:
    """Each row's ``k`` nearest other rows: ``indices`` (N×k int64, -1 where none) and their
    inner products ``sims`` (N×k float32), best first."""

    indices: np.ndarray
    sims: np.ndarray
    exact: bool

    @property
    def k(self) -> int:
        return self.indices.shape[1]


def use_exact(n: int, search: str, exact_max: int) -> bool:
    """Whether ``search`` means an exact search for ``n`` vectors."""
    return search == "exact" or (search == "auto" and n <= exact_max)


def knn_graph(
    x: np.ndarray,
    k: int,
    search: str = "auto",
    exact_max: int = 20_000,
    nprobe: int = 8,
    nlist: Optional[int] = None,
    progress: ProgressFn = null_progress,
) -> KnnGraph:
    """The ``k`` nearest neighbours of every row of ``x`` (N×D unit rows), itself excluded.

    ``k + 1`` rows are searched and the row itself dropped (if a duplicate outranks it, the
    last one is dropped instead). ``nlist``: ivf lists (default: the store's √N rule).
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    n = len(x)
    kk = min(k + 1, n)
    if use_exact(n, search, exact_max):
        pos, sims = _exact(x, kk, progress)
        exact = True
    else:
        pos, sims = _ivf(x, kk, nlist or ivf_nlist(n), nprobe, progress)
        exact = False
    idx, val = _drop_self(pos, sims, k)
    return KnnGraph(idx, val, exact)


def knn_search(base: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` rows of ``base`` for each query: ``(positions, inner products)``."""
    scores, pos = topk_inner_product(np.ascontiguousarray(base, np.float32), queries, k)
    return pos, scores


def _workers() -> int:
    n = cpu_isa.usable_cores()
    return max(1, min(MAX_WORKERS, n))


def _in_parallel(fn, items, progress: ProgressFn, total: int, message: str) -> None:
    """``fn(item) -> rows done`` over ``items`` on a few threads, each running BLAS on one thread
    (no OpenBLAS spin-waits between calls: on a busy 2-core machine that was 2x faster than one
    two-threaded BLAS call at a time); progress is reported from this thread."""
    done = 0
    with threadpool_limits(limits=1, user_api="blas"), ThreadPoolExecutor(_workers()) as pool:
        for rows in pool.map(fn, items):
            done += rows
            progress(done, total, message)


def _exact(x: np.ndarray, k: int, progress: ProgressFn) -> tuple[np.ndarray, np.ndarray]:
    n = len(x)
    pos = np.empty((n, k), np.int64)
    sims = np.empty((n, k), np.float32)

    def chunk(a: int) -> int:
        s, p = topk_inner_product(x, x[a : a + QUERY_CHUNK], k)
        pos[a : a + len(p)], sims[a : a + len(p)] = p, s
        return len(p)

    _in_parallel(chunk, range(0, n, QUERY_CHUNK), progress, n, "kNN graph (exact)")
    return pos, sims


def _ivf(x: np.ndarray, k: int, nlist: int, nprobe: int, progress: ProgressFn) -> tuple[np.ndarray, np.ndarray]:
    n, d = x.shape
    nlist = max(1, min(int(nlist), n))
    quantizer = new_ivf_index(d, nlist)  # the store's k-means settings (10 iterations, 64 points a list)
    quantizer.train(np.ascontiguousarray(x[sample_rows(n, ivf_train_size(nlist, False))]))
    centroids = quantizer.quantizer.reconstruct_n(0, nlist)
    # Lists of up to SECOND_LIST_MAX vectors: each vector is searched from its nearest list and
    # is also a candidate of its second nearest, so neighbours across a list boundary are found
    # more often (recall@4 0.86 -> 0.90 at 20k); above, that would cost ~1.5x for the same gain.
    second = nlist > 1 and n / nlist <= SECOND_LIST_MAX
    near = np.empty((n, 2 if second else 1), np.int64)

    def assign(a: int) -> int:
        near[a : a + QUERY_CHUNK] = topk_inner_product(centroids, x[a : a + QUERY_CHUNK], near.shape[1])[1]
        return 0

    _in_parallel(assign, range(0, n, QUERY_CHUNK), null_progress, n, "")
    lists = [_inverted(near[:, j], len(centroids)) for j in range(near.shape[1])]
    probes = topk_inner_product(centroids, centroids, min(nprobe, len(centroids)))[1]
    pos = np.full((n, k), -1, np.int64)
    sims = np.full((n, k), -np.inf, np.float32)

    def search(c: int) -> int:
        members = _members(lists[0], c)
        if len(members) == 0:
            return 0
        cand = np.unique(np.concatenate([_members(lst, p) for lst in lists for p in probes[c]]))
        s, p = topk_inner_product(x, x[members], k, rows=cand)
        pos[members, : p.shape[1]], sims[members, : s.shape[1]] = p, s
        return len(members)

    _in_parallel(search, range(len(centroids)), progress, n, "kNN graph (ivf)")
    return pos, sims


def _inverted(assign: np.ndarray, nlist: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(assign, kind="stable")
    return order, np.searchsorted(assign[order], np.arange(nlist + 1))


def _members(inverted: tuple[np.ndarray, np.ndarray], c: int) -> np.ndarray:
    order, bounds = inverted
    return order[bounds[c] : bounds[c + 1]]


def _drop_self(pos: np.ndarray, sims: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``k`` columns per row without the row itself (or without the last column if absent)."""
    n, kk = pos.shape
    is_self = pos == np.arange(n)[:, None]
    drop = np.where(is_self.any(axis=1), is_self.argmax(axis=1), kk - 1)
    keep = np.ones_like(is_self)
    keep[np.arange(n), drop] = False
    width = min(k, kk - 1)
    idx = pos[keep].reshape(n, kk - 1)[:, :width]
    val = sims[keep].reshape(n, kk - 1)[:, :width]
    idx = np.where(np.isfinite(val), idx, -1)
    return idx, np.where(idx >= 0, val, 0.0).astype(np.float32)
