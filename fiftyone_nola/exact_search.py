"""Exact inner-product top-k over a float32 matrix: blocked BLAS matmul + threshold selection.

Pure numpy, so it moves with the vectors it searches (in RAM or memory-mapped). This is the
search of ``flat`` stores on CPUs, in place of ``faiss.IndexFlatIP``, which is 2-4x slower
there with faiss-cpu 1.15: a batch takes faiss's BLAS path only from
``distance_compute_blas_threshold`` (128000) / dim queries on (250 at 512-d); below that each
query scans the whole matrix on its own (memory traffic x nq), and a single query gains nothing
from a second OpenMP thread, while numpy's sgemv splits it over the cores. Here each row block
is read once per chunk of queries, by one BLAS call.

Selection is cheap next to the matmul: each query's k-th best score so far (at first, that of
the first few thousand scores) is a threshold; a block's scores are compared with it in one
pass and only the few rows that beat it are merged (no argpartition over every score). Ties
are broken by position (lower first), so results are deterministic.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

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
        if rows is None:
            block, base = np.asarray(vectors[start:stop], dtype=np.float32), start
        else:
            block, base = np.asarray(vectors[rows[start:stop]], dtype=np.float32), rows[start:stop]
        if nq == 1:
            sc = (block @ q[0])[None, :]  # gemv
        else:
            sc = q @ block.T
        _merge_block(sc, base, best_s, best_i, seed)
    return best_s, best_i


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
