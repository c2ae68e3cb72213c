"""FAISS search structures of ivf/hnsw/ivfpq stores: their parameters, building, loading and
searching (flat stores have none: they are searched exactly, see :mod:`.search`)."""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import faiss
import numpy as np

from fiftyone_nola.core.errors import InvalidInputError
from fiftyone_nola.core.index.search import rerank_exact
from fiftyone_nola.core.storage import atomic_path

logger = logging.getLogger(__name__)

DEFAULT_IVF_MIN_SIZE = 10_000  # below this an exact flat search is both faster and exact
DEFAULT_HNSW_M = 32
DEFAULT_EF_SEARCH = 128
DEFAULT_EF_CONSTRUCTION = 128  # recall@10 ~0.98 on clustered data (tests)
PQ_NBITS = 8  # one byte per subquantizer code
# Below this many vectors ivfpq is flat: its code books need ~39 training points per code word.
PQ_MIN_SIZE = 39 * 2**PQ_NBITS
# ivfpq searches refine_factor*k candidates on the codes, then re-scores them exactly from the
# stored float vectors: recall near exact while only the codes are scanned. 64-byte codes of
# 512-d isotropic clusters (benchmarks/scale.py; the hard case for PQ) gave recall@10 0.99 at
# 1M and 0.93 at 10M with 200 candidates per hit, 0.94 and 0.67 with 50, for ~20% (1M) and
# <= 12% (10M) of the throughput: the list scan, not the re-ranking, dominates at scale.
DEFAULT_REFINE_FACTOR = 200
ADD_BLOCK_ROWS = 65_536  # rows added to a structure at a time
# Meta keys that change the built structure (the others are read at search time).
STRUCTURE_KEYS = ("ivf_min_size", "hnsw_m", "ef_construction", "pq_m")

_FAISS_CLASSES = {"ivf": faiss.IndexIVFFlat, "hnsw": faiss.IndexHNSWFlat, "ivfpq": faiss.IndexIVFPQ}


def num_gpus() -> int:
    """GPUs faiss can use (0 for CPU builds, which may lack the call entirely)."""
    fn = getattr(faiss, "get_num_gpus", None)
    try:
        return int(fn()) if fn is not None else 0
    except Exception as e:  # a CPU build may raise from the stub; no GPU is the answer either way
        logger.debug("faiss.get_num_gpus failed (%s): no GPU index", e)
        return 0


def ivf_nlist(n: int) -> int:
    """Inverted lists for ``n`` vectors: √n, capped so that k-means gets 39 points per list."""
    return max(1, min(int(round(math.sqrt(n))), n // 39))


def default_pq_m(dim: int) -> int:
    """PQ subquantizers: the largest divisor of ``dim`` up to dim/8 (64-byte codes at 512-d)."""
    target = max(1, dim // 8)
    return max(m for m in range(1, target + 1) if dim % m == 0)


def check_pq_m(m, dim: int) -> None:
    """Refuse a ``pq_m`` that is not a positive divisor of ``dim``."""
    if isinstance(m, bool) or not isinstance(m, int) or m <= 0 or dim % m:
        raise InvalidInputError(f"pq_m must be a positive divisor of dim={dim}, got {m!r}")


def search_defaults(dim: int) -> dict:
    """Meta keys of the search structures and their defaults for a new store of ``dim``."""
    return {
        "ivf_min_size": DEFAULT_IVF_MIN_SIZE,
        "hnsw_m": DEFAULT_HNSW_M,
        "ef_search": DEFAULT_EF_SEARCH,
        "ef_construction": DEFAULT_EF_CONSTRUCTION,
        "pq_m": default_pq_m(dim),
        "refine_factor": DEFAULT_REFINE_FACTOR,
    }


def new_ivf_index(dim: int, nlist: int, pq_m: Optional[int] = None):
    """Untrained inner-product IVF index: IVFFlat, or IVFPQ with ``pq_m`` 8-bit codes."""
    quantizer = faiss.IndexFlatIP(dim)
    if pq_m is None:
        idx = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
    else:
        idx = faiss.IndexIVFPQ(quantizer, dim, nlist, pq_m, PQ_NBITS, faiss.METRIC_INNER_PRODUCT)
    # 10 k-means iterations on a sample of 64 points per list keep recall (0.989 at 100k) at
    # ~1/25 of the build time of faiss's defaults.
    idx.cp.niter = 10
    if pq_m is not None:
        # Same for the code books (faiss: 25 iterations, up to 256 points per code word);
        # exact re-ranking makes up for the coarser codes.
        idx.pq.cp.niter = 10
        idx.pq.cp.max_points_per_centroid = 64
    return idx


def ivf_train_size(nlist: int, pq: bool) -> int:
    """Training points for an IVF index: 64 per list, and enough for the PQ code books."""
    return max(64 * nlist, PQ_MIN_SIZE) if pq else 64 * nlist


def sample_rows(n: int, size: int, seed: int = 0) -> np.ndarray:
    """Sorted positions of a reproducible random sample of ``min(size, n)`` of ``n`` rows."""
    if size >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size, replace=False))


def effective_type(meta: dict, n: int) -> str:
    """The structure a store of ``n`` vectors searches with: ivf/ivfpq too small to pay off
    are flat."""
    t = meta.get("index_type", "flat")
    min_size = int(meta.get("ivf_min_size", DEFAULT_IVF_MIN_SIZE))
    if t == "ivfpq":
        min_size = max(min_size, PQ_MIN_SIZE)
    if t in ("ivf", "ivfpq") and n < min_size:
        return "flat"
    return t


def _maybe_gpu(idx):
    if num_gpus() > 0 and not isinstance(idx, faiss.IndexHNSWFlat):
        try:
            return faiss.index_cpu_to_all_gpus(idx)
        except Exception as e:  # unsupported index type / out of memory: stay on CPU
            logger.warning("FAISS GPU transfer failed (%s); searching on CPU", e)
    return idx


def _build_ivf(x: np.ndarray, dim: int, pq_m: Optional[int]):
    n = len(x)
    nlist = ivf_nlist(n)
    idx = new_ivf_index(dim, nlist, pq_m)
    rows = sample_rows(n, ivf_train_size(nlist, pq_m is not None))
    idx.train(np.ascontiguousarray(x[rows]))
    # In blocks: a memory-mapped x is then read once, never copied whole.
    for s in range(0, n, ADD_BLOCK_ROWS):
        idx.add(np.ascontiguousarray(x[s : s + ADD_BLOCK_ROWS]))
    return idx


@dataclass
class Structure:
    """A built faiss index: ``cpu`` is what a save writes, ``index`` what is searched (a GPU
    copy when there is a GPU)."""

    kind: str
    cpu: Any
    index: Any

    @classmethod
    def build(cls, vectors: np.ndarray, meta: dict) -> Structure:
        """The structure ``meta`` asks for over ``vectors`` (N×D unit rows)."""
        x = np.ascontiguousarray(vectors)
        n, d = x.shape
        t = effective_type(meta, n)
        if t in ("ivf", "ivfpq"):
            # Stores created before ivfpq existed have no pq_m.
            pq_m = int(meta.get("pq_m") or default_pq_m(d)) if t == "ivfpq" else None
            idx = _build_ivf(x, d, pq_m)
        elif t == "hnsw":
            idx = faiss.IndexHNSWFlat(d, int(meta.get("hnsw_m", DEFAULT_HNSW_M)), faiss.METRIC_INNER_PRODUCT)
            idx.hnsw.efConstruction = int(meta.get("ef_construction", DEFAULT_EF_CONSTRUCTION))
            idx.add(x)
        else:
            idx = faiss.IndexFlatIP(d)
            idx.add(x)
        return cls(t, idx, _maybe_gpu(idx))

    @classmethod
    def load(cls, fpath: Path, kind: Optional[str], n: int, dim: int) -> Optional[Structure]:
        """The saved structure at ``fpath`` if it is a ``kind`` index of ``n`` vectors of ``dim``;
        None otherwise (it is derived data: rebuilt at the first search)."""
        try:
            idx = faiss.read_index(str(fpath))
        except Exception as e:  # faiss raises RuntimeError on missing or bad files
            logger.warning("Ignoring unreadable %s (%s); it will be rebuilt", fpath, e)
            return None
        cls_ = _FAISS_CLASSES.get(kind)
        if idx.ntotal != n or idx.d != dim or cls_ is None or not isinstance(idx, cls_):
            logger.warning("Ignoring stale %s; it will be rebuilt", fpath)
            return None
        return cls(kind, idx, _maybe_gpu(idx))

    def save(self, path: Path) -> None:
        """Write the CPU copy to ``path`` atomically."""
        with atomic_path(path) as tmp:
            faiss.write_index(self.cpu, str(tmp))

    def search(
        self,
        q: np.ndarray,
        k: int,
        vectors: np.ndarray,
        meta: dict,
        rows: Optional[np.ndarray] = None,
        *,
        nprobe: Optional[int] = None,
        ef_search: Optional[int] = None,
        refine_factor: Optional[int] = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` (scores, row labels; -1 where fewer hits) of unit queries ``q``, over the
        positions ``rows`` only if given; ivfpq candidates are re-ranked exactly on ``vectors``."""
        k = min(k, len(vectors) if rows is None else len(rows))
        kc = self._n_candidates(k, len(vectors) if rows is None else len(rows), meta, refine_factor)
        sel = None if rows is None else faiss.IDSelectorBatch(rows.astype(np.int64))
        params = self._params(kc, meta, nprobe, ef_search, sel)
        if sel is not None or params is None or self.index is self.cpu:
            # A filtered search always runs on the CPU copy.
            scores, labels = (self.cpu if sel is not None else self.index).search(q, kc, params=params)
        else:
            # GPU indexes take parameters as attributes, not SearchParameters.
            with contextlib.suppress(Exception):
                faiss.GpuParameterSpace().set_index_parameter(self.index, "nprobe", params.nprobe)
            scores, labels = self.index.search(q, kc)
        if self.kind == "ivfpq":
            # PQ scores are approximate: rank the candidates by their exact scores instead.
            scores, labels = rerank_exact(q, labels, vectors, k)
        return scores, labels

    def _params(self, k: int, meta: dict, nprobe: Optional[int], ef_search: Optional[int], sel):
        if self.kind in ("ivf", "ivfpq"):
            nlist = int(meta.get("nlist") or self.cpu.nlist)
            n = nprobe or meta.get("nprobe") or min(nlist, max(16, nlist // 8))
            return faiss.SearchParametersIVF(nprobe=int(min(n, nlist)), sel=sel)
        if self.kind == "hnsw":
            ef = ef_search or meta.get("ef_search") or DEFAULT_EF_SEARCH
            return faiss.SearchParametersHNSW(efSearch=int(max(ef, k)), sel=sel)
        return faiss.SearchParameters(sel=sel) if sel is not None else None

    def _n_candidates(self, k: int, available: int, meta: dict, refine_factor: Optional[int]) -> int:
        if self.kind != "ivfpq":
            return k
        rf = refine_factor
        if rf is None:
            rf = meta.get("refine_factor") or DEFAULT_REFINE_FACTOR
        if int(rf) < 1:
            raise InvalidInputError(f"refine_factor must be >= 1, got {rf}")
        return min(k * int(rf), available)
