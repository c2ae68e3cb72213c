"""On-disk FAISS store of embeddings, one per (dataset, model), keyed by sample id.

Layout of a store directory::

    meta.json                  identity + bookkeeping; written last, names the live generation
    vectors-<gen>.npy          float32 N×D, L2-normalised rows (position i <-> ids[i]); memory-
                               mapped copy-on-write when at least MMAP_MIN_BYTES
    norms-<gen>.npy            float32 N, the L2 norm each row had before normalisation, so the
                               raw vectors are recoverable (NaN: unknown, written by a version
                               that did not store norms; absent in such stores)
    ids-<gen>.json             N sample ids
    fingerprints-<gen>.json    {sample id: fingerprint} for ids that have one
    faiss-<gen>.index          trained ivf/hnsw/ivfpq structure (absent for flat: searched
                               straight from the vectors, see exact_search)
    chunks/NNNNNN.npz          checkpoints since the last save: upserts + removals
    .lock                      fcntl lock file (see EmbeddingIndex.lock)

Data files carry a generation number so that ``save`` never overwrites the files the current
``meta.json`` points to: a crash at any moment of a save leaves the previous generation plus its
chunks, which ``open`` replays. No pickle is used anywhere.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import math
import os
import re
import shutil
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Optional, Union

import faiss
import numpy as np

from fiftyone_nola.core.arrays import l2_normalize
from fiftyone_nola.core.errors import (
    IndexMismatchError,
    InvalidInputError,
    MissingEmbeddingsError,
    NolaError,
)
from fiftyone_nola.core.exact_search import topk_inner_product
from fiftyone_nola.core.storage import LockTimeout, atomic_path, file_lock, write_json_atomic

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
SUPPORTED_FORMAT_VERSIONS = (1,)
INDEX_TYPES = ("flat", "ivf", "hnsw", "ivfpq")
META_FILE = "meta.json"
CHUNK_DIR = "chunks"
LOCK_FILE = ".lock"

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
# Vector files at least this big are memory-mapped (copy-on-write) instead of read into RAM:
# the search structure (for ivfpq, the codes) is then what stays resident, and re-ranking
# touches only the candidates' rows.
MMAP_MIN_BYTES = 1 << 30
_BLOCK_ROWS = 65_536  # rows per block when scanning or adding vectors
# A restricted search over at most this many vectors is done exactly in numpy: cheaper than
# a filtered faiss search and never loses recall to the filter. Larger subsets of ivf/hnsw/ivfpq
# stores use a faiss IDSelector; flat stores are always searched exactly in numpy.
EXACT_SUBSET_MAX = 50_000

_CHUNK_RE = re.compile(r"^(\d+)\.npz$")
_GEN_FILE_RE = re.compile(r"^(vectors|ids|fingerprints|faiss|norms)-(\d+)\.(npy|json|index)$")
# Keys the store owns; user meta may not override them.
_RESERVED = (
    "format_version", "dim", "metric", "index_type", "normalized", "count", "created", "updated",
    "versions", "generation", "files", "chunks_merged_upto", "built_index_type", "nlist",
)
# Meta keys that change the built structure (the others are read at search time).
_STRUCTURE_KEYS = ("ivf_min_size", "hnsw_m", "ef_construction", "pq_m")

PathLike = Union[str, os.PathLike]


class IndexLockedError(NolaError):
    """Another process holds the lock of an embedding index."""


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _nola_version() -> str:
    try:
        from importlib.metadata import version

        return version("fiftyone-nola")
    except Exception:  # not installed as a distribution (source checkout)
        return "unknown"


def library_versions() -> dict:
    """Versions recorded in an index's metadata."""
    return {"faiss": faiss.__version__, "numpy": np.__version__, "fiftyone_nola": _nola_version()}


def _num_gpus() -> int:
    # CPU builds of faiss may lack the attribute entirely.
    fn = getattr(faiss, "get_num_gpus", None)
    try:
        return int(fn()) if fn is not None else 0
    except Exception:
        return 0


def normalize_rows(x: np.ndarray) -> np.ndarray:
    """float32 N×D copy with unit-norm rows (a 1-d vector is one row); zero rows stay zero."""
    return l2_normalize(np.atleast_2d(x))


def _json_norm(v):
    # Stored meta went through JSON (tuples became lists); compare like with like.
    return json.loads(json.dumps(v, default=str))


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


def ivf_nlist(n: int) -> int:
    """Inverted lists for ``n`` vectors: √n, capped so that k-means gets 39 points per list."""
    return max(1, min(int(round(math.sqrt(n))), n // 39))


def default_pq_m(dim: int) -> int:
    """PQ subquantizers: the largest divisor of ``dim`` up to dim/8 (64-byte codes at 512-d)."""
    target = max(1, dim // 8)
    return max(m for m in range(1, target + 1) if dim % m == 0)


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


def rerank_exact(
    queries: np.ndarray, labels: np.ndarray, vectors: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
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


def _load_vectors(vp: Path) -> np.ndarray:
    """The vectors file, memory-mapped copy-on-write if large (edits never reach the file)."""
    if vp.stat().st_size >= MMAP_MIN_BYTES:
        return np.load(vp, mmap_mode="c", allow_pickle=False)
    with open(vp, "rb") as f:
        return np.load(f, allow_pickle=False)


def _all_finite(vecs: np.ndarray, vp: Path) -> bool:
    """NaN/inf check in blocks; a memory-mapped file is read with plain reads so its pages go
    to the page cache, not into this process's resident set."""
    n, d = vecs.shape
    if not isinstance(vecs, np.memmap):
        return all(np.isfinite(vecs[s : s + _BLOCK_ROWS]).all() for s in range(0, n, _BLOCK_ROWS))
    with open(vp, "rb") as f:
        f.seek(vecs.offset)
        for s in range(0, n, _BLOCK_ROWS):
            blk = np.fromfile(f, dtype=np.float32, count=min(_BLOCK_ROWS, n - s) * d)
            if not np.isfinite(blk).all():
                return False
    return True


def _check_pq_m(m, dim: int) -> None:
    if isinstance(m, bool) or not isinstance(m, int) or m <= 0 or dim % m:
        raise InvalidInputError(f"pq_m must be a positive divisor of dim={dim}, got {m!r}")


_FAISS_CLASSES = {"ivf": faiss.IndexIVFFlat, "hnsw": faiss.IndexHNSWFlat, "ivfpq": faiss.IndexIVFPQ}


class EmbeddingIndex:
    """Embeddings of one model on one dataset, keyed by sample id, with k-NN search.

    Writers should hold :meth:`lock`; readers need not (``save`` never touches the files a
    reader of the previous ``meta.json`` is loading, and ``open`` retries if a save raced it).
    """

    def __init__(self, path: PathLike, meta: dict):
        self.path = Path(path)
        self._meta = dict(meta)
        self._dim = int(meta["dim"])
        self._vecs = np.empty((0, self._dim), dtype=np.float32)
        # Pre-normalisation L2 norm of each row (NaN: unknown); raw vector = row * norm.
        self._norms = np.empty(0, dtype=np.float32)
        self._n = 0
        self._ids: list[str] = []
        self._pos: dict[str, int] = {}
        self._fps: dict[str, str] = {}
        # ids touched since the last checkpoint/save: the next chunk's content
        self._dirty: set[str] = set()
        self._unsaved = False
        self._next_chunk = int(meta.get("chunks_merged_upto", 0)) + 1
        self._faiss = None  # search structure (maybe on GPU)
        self._faiss_cpu = None  # CPU copy, what save() writes
        self._built_type: Optional[str] = None

    # ------------------------------------------------------------------ construction

    @classmethod
    def create(
        cls, path: PathLike, dim: int, meta: dict, index_type: str = "flat", metric: str = "ip"
    ) -> EmbeddingIndex:
        """Start an empty store at ``path`` (must not already hold one) and persist it at once.

        Writing ``meta.json`` immediately means a job killed before its first save still
        leaves a store whose checkpoints ``open`` can replay.
        """
        path = Path(path)
        if (path / META_FILE).exists():
            raise InvalidInputError(
                f"An embedding index already exists at {path}; open it, or pass overwrite=True "
                "to open_or_create to rebuild it."
            )
        if index_type not in INDEX_TYPES:
            raise InvalidInputError(f"index_type must be one of {INDEX_TYPES}, got {index_type!r}")
        if metric not in ("ip", "cosine"):
            raise InvalidInputError(
                f"metric must be 'ip' (cosine on normalised vectors), got {metric!r}"
            )
        dim = int(dim)
        if dim <= 0:
            raise InvalidInputError(f"dim must be positive, got {dim}")
        full = {k: v for k, v in dict(meta or {}).items() if k not in _RESERVED}
        now = _now()
        full.update(
            format_version=FORMAT_VERSION,
            dim=dim,
            metric="ip",
            index_type=index_type,
            normalized=True,
            count=0,
            created=now,
            updated=now,
            versions=library_versions(),
            generation=0,
            files=None,
            chunks_merged_upto=0,
        )
        full.setdefault("ivf_min_size", DEFAULT_IVF_MIN_SIZE)
        full.setdefault("hnsw_m", DEFAULT_HNSW_M)
        full.setdefault("ef_search", DEFAULT_EF_SEARCH)
        full.setdefault("ef_construction", DEFAULT_EF_CONSTRUCTION)
        full.setdefault("pq_m", default_pq_m(dim))
        full.setdefault("refine_factor", DEFAULT_REFINE_FACTOR)
        _check_pq_m(full["pq_m"], dim)
        path.mkdir(parents=True, exist_ok=True)
        self = cls(path, full)
        self._unsaved = True
        self.save()
        return self

    @classmethod
    def open(cls, path: PathLike, expect: Optional[dict] = None) -> EmbeddingIndex:
        """Load the last save plus every checkpoint after it; validate everything on the way.

        ``expect`` maps meta keys to required values (e.g. ``{"model_key": ..., "dim": ...}``).
        Raises :class:`MissingEmbeddingsError` if there is no store at ``path`` and
        :class:`IndexMismatchError` on corruption or an ``expect`` mismatch.
        """
        path = Path(path)
        if not (path / META_FILE).exists() and not _has_store_files(path):
            raise MissingEmbeddingsError(
                f"No embedding index at {path}: compute embeddings for this dataset and model first."
            )
        # A concurrent save may delete the files of the generation we just read meta for;
        # re-reading meta then finds the new generation.
        last: Optional[Exception] = None
        for _ in range(5):
            meta = cls._read_meta(path)
            try:
                self = cls._load(path, meta)
            except FileNotFoundError as e:
                last = e
                if cls._read_meta(path).get("generation") != meta.get("generation"):
                    continue
                raise IndexMismatchError(
                    f"Embedding index at {path} is incomplete: {e.filename or e} is missing. "
                    "Rebuild it with overwrite=True."
                ) from e
            # A save that finished while we listed chunks may have deleted some unseen.
            if cls._read_meta(path).get("generation") != meta.get("generation"):
                continue
            self._check_expect(expect)
            return self
        raise IndexMismatchError(
            f"Embedding index at {path} kept changing while being opened ({last}); retry."
        )

    @classmethod
    def open_or_create(
        cls,
        path: PathLike,
        dim: int,
        meta: dict,
        expect_keys: Iterable[str] = ("model_key", "dim"),
        index_type: str = "flat",
        overwrite: bool = False,
    ) -> EmbeddingIndex:
        """Open the store at ``path`` if it matches ``meta`` on ``expect_keys``, else create it.

        ``overwrite=True`` discards any existing store first. Asking for a different
        ``index_type`` than stored just switches the search structure (vectors are reused).
        """
        path = Path(path)
        if overwrite:
            destroy(path)
        if not (path / META_FILE).exists():
            if _has_store_files(path):
                raise IndexMismatchError(
                    f"Embedding index at {path} has data files but no meta.json; rebuild it "
                    "with overwrite=True."
                )
            return cls.create(path, dim, meta, index_type=index_type)
        wanted = {**dict(meta or {}), "dim": int(dim)}
        expect = {k: wanted[k] for k in expect_keys if k in wanted}
        self = cls.open(path, expect=expect)
        if index_type != self._meta.get("index_type"):
            logger.info("Switching index at %s to index_type=%s", path, index_type)
            self.set_index_type(index_type)
        return self

    @staticmethod
    def _read_meta(path: Path) -> dict:
        mp = path / META_FILE
        if not mp.is_file():
            raise IndexMismatchError(
                f"Embedding index at {path} has no meta.json (killed before it was created, or "
                "not an index). Rebuild it with overwrite=True."
            )
        try:
            meta = json.loads(mp.read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise IndexMismatchError(
                f"meta.json of the embedding index at {path} is not valid JSON ({e}); "
                "rebuild the index with overwrite=True."
            ) from e
        if not isinstance(meta, dict):
            raise IndexMismatchError(f"meta.json at {path} is not a JSON object; rebuild the index.")
        fv = meta.get("format_version")
        if fv not in SUPPORTED_FORMAT_VERSIONS:
            raise IndexMismatchError(
                f"Embedding index at {path} has format_version={fv!r}; this version of "
                f"fiftyone_nola reads {SUPPORTED_FORMAT_VERSIONS}. Rebuild it with overwrite=True "
                "or use the fiftyone_nola version that wrote it."
            )
        for key in ("dim", "index_type", "generation", "count", "chunks_merged_upto"):
            if key not in meta:
                raise IndexMismatchError(
                    f"meta.json at {path} lacks {key!r}; rebuild the index with overwrite=True."
                )
        if not isinstance(meta["dim"], int) or meta["dim"] <= 0:
            raise IndexMismatchError(f"meta.json at {path} has invalid dim={meta['dim']!r}.")
        if meta["index_type"] not in INDEX_TYPES:
            raise IndexMismatchError(
                f"meta.json at {path} has unknown index_type={meta['index_type']!r}."
            )
        return meta

    @classmethod
    def _load(cls, path: Path, meta: dict) -> EmbeddingIndex:
        self = cls(path, meta)
        dim = self._dim
        files = meta.get("files")
        if files:
            vp, ip, fp = (path / files[k] for k in ("vectors", "ids", "fingerprints"))
            try:
                vecs = _load_vectors(vp)
            except FileNotFoundError:
                raise
            except (ValueError, OSError, EOFError) as e:
                raise IndexMismatchError(
                    f"{vp} is unreadable or truncated ({e}); rebuild the index with overwrite=True."
                ) from e
            try:
                ids = json.loads(ip.read_text())
                fps = json.loads(fp.read_text())
            except FileNotFoundError:
                raise
            except (ValueError, UnicodeDecodeError) as e:
                raise IndexMismatchError(
                    f"ids/fingerprints of the index at {path} are not valid JSON ({e}); rebuild "
                    "the index with overwrite=True."
                ) from e
            if vecs.ndim != 2 or vecs.shape[1] != dim or vecs.dtype != np.float32:
                raise IndexMismatchError(
                    f"{vp} holds {vecs.dtype} {vecs.shape} but meta.json says float32 (N, {dim}); "
                    "rebuild the index with overwrite=True."
                )
            if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
                raise IndexMismatchError(f"{ip} is not a list of string ids; rebuild the index.")
            if not (len(ids) == vecs.shape[0] == meta["count"]):
                raise IndexMismatchError(
                    f"Embedding index at {path} is inconsistent: {len(ids)} ids, "
                    f"{vecs.shape[0]} vectors, meta count {meta['count']}; rebuild it with "
                    "overwrite=True."
                )
            if len(set(ids)) != len(ids):
                raise IndexMismatchError(
                    f"{ip} contains duplicate sample ids; rebuild the index with overwrite=True."
                )
            if not isinstance(fps, dict) or not set(fps) <= set(ids):
                raise IndexMismatchError(
                    f"{fp} does not match the index ids; rebuild the index with overwrite=True."
                )
            if not _all_finite(vecs, vp):
                raise IndexMismatchError(f"{vp} contains NaN/inf; rebuild the index.")
            self._norms = self._read_norms(path, files.get("norms"), len(ids))
            self._vecs = vecs
            self._n = len(ids)
            self._ids = ids
            self._pos = {s: i for i, s in enumerate(ids)}
            self._fps = {str(k): str(v) for k, v in fps.items()}
            fx = files.get("faiss")
            if fx:
                self._load_faiss(path / fx)
        elif meta["count"] != 0:
            raise IndexMismatchError(
                f"meta.json at {path} claims {meta['count']} vectors but names no data files; "
                "rebuild the index with overwrite=True."
            )
        self._replay_chunks()
        return self

    @staticmethod
    def _read_norms(path: Path, name: Optional[str], n: int) -> np.ndarray:
        """The stored row norms; all NaN (unknown) for a store written before norms existed."""
        if not name:
            return np.full(n, np.nan, dtype=np.float32)
        np_path = path / name
        try:
            with open(np_path, "rb") as f:
                norms = np.load(f, allow_pickle=False)
        except FileNotFoundError:
            raise
        except (ValueError, OSError, EOFError) as e:
            raise IndexMismatchError(
                f"{np_path} is unreadable or truncated ({e}); rebuild the index with overwrite=True."
            ) from e
        if norms.shape != (n,) or norms.dtype != np.float32 or bool(np.any(norms < 0)) \
                or bool(np.isinf(norms).any()):
            raise IndexMismatchError(
                f"{np_path} holds {norms.dtype} {norms.shape} but float32 ({n},) non-negative norms "
                "are expected; rebuild the index with overwrite=True."
            )
        return np.array(norms, dtype=np.float32, copy=True)

    def _load_faiss(self, fpath: Path) -> None:
        # The faiss file is derived data: if unusable, rebuild it at the first search.
        try:
            idx = faiss.read_index(str(fpath))
        except Exception as e:  # faiss raises RuntimeError on missing or bad files
            logger.warning("Ignoring unreadable %s (%s); it will be rebuilt", fpath, e)
            return
        built = self._meta.get("built_index_type")
        kind = _FAISS_CLASSES.get(built)
        if idx.ntotal != self._n or idx.d != self._dim or kind is None or not isinstance(idx, kind):
            logger.warning("Ignoring stale %s; it will be rebuilt", fpath)
            return
        self._faiss_cpu = idx
        self._faiss = self._maybe_gpu(idx)
        self._built_type = built

    def _chunk_files(self) -> list[tuple[int, Path]]:
        d = self.path / CHUNK_DIR
        if not d.is_dir():
            return []
        out = []
        for p in d.iterdir():
            m = _CHUNK_RE.match(p.name)
            if m:
                out.append((int(m.group(1)), p))
        return sorted(out)

    def _replay_chunks(self) -> None:
        merged = int(self._meta.get("chunks_merged_upto", 0))
        last = merged
        for seq, p in self._chunk_files():
            if seq <= merged:
                continue  # already in the saved generation (crash between meta and cleanup)
            try:
                with open(p, "rb") as f, np.load(f, allow_pickle=False) as z:
                    data = {k: z[k] for k in z.files}
            except FileNotFoundError:
                raise
            except Exception as e:
                raise IndexMismatchError(
                    f"Checkpoint {p} is unreadable ({e}). Delete it to keep everything before "
                    "it, or rebuild the index with overwrite=True."
                ) from e
            try:
                removed = [str(s) for s in data["removed"]]
                ids = [str(s) for s in data["ids"]]
                vecs = data["vectors"]
                fp_map = dict(zip((str(s) for s in data["fp_ids"]), (str(v) for v in data["fp_vals"])))
            except KeyError as e:
                raise IndexMismatchError(f"Checkpoint {p} lacks {e}; delete it or rebuild.") from e
            if vecs.ndim != 2 or vecs.shape != (len(ids), self._dim):
                raise IndexMismatchError(
                    f"Checkpoint {p} holds vectors {vecs.shape}, expected ({len(ids)}, "
                    f"{self._dim}); delete it or rebuild the index with overwrite=True."
                )
            norms = data.get("norms")  # absent in checkpoints of versions without norms
            if norms is not None and norms.shape != (len(ids),):
                raise IndexMismatchError(
                    f"Checkpoint {p} holds norms {norms.shape}, expected ({len(ids)},); delete it "
                    "or rebuild the index with overwrite=True."
                )
            self._remove(removed)
            self._add(ids, vecs, [fp_map.get(i) for i in ids], norms)
            last = max(last, seq)
        # Replayed data is already on disk: nothing to checkpoint, but a save would compact it.
        self._dirty.clear()
        self._unsaved = last > merged
        self._next_chunk = last + 1

    def _check_expect(self, expect: Optional[dict]) -> None:
        for key, want in (expect or {}).items():
            have = self._meta.get(key, None)
            if key not in self._meta or _json_norm(have) != _json_norm(want):
                raise IndexMismatchError(
                    f"Embedding index at {self.path} was built with {key}={have!r} but "
                    f"{key}={want!r} is expected. Rebuild it with overwrite=True (or use a "
                    "different index path)."
                )

    # ------------------------------------------------------------------ properties

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def ids(self) -> list[str]:
        """Sample ids in storage order (position i of :attr:`vectors`)."""
        return list(self._ids)

    @property
    def vectors(self) -> np.ndarray:
        """Read-only view of all vectors (rows follow :attr:`ids`); valid until the next change."""
        v = self._vecs[: self._n]
        v = v.view()
        v.flags.writeable = False
        return v

    @property
    def norms(self) -> np.ndarray:
        """Read-only view of each row's L2 norm before normalisation (NaN: unknown, stored by a
        version without norms); ``vectors * norms[:, None]`` are the raw vectors."""
        v = self._norms[: self._n].view()
        v.flags.writeable = False
        return v

    @property
    def fingerprints(self) -> dict[str, str]:
        return dict(self._fps)

    @property
    def meta(self) -> dict:
        m = dict(self._meta)
        m["count"] = self._n
        return m

    def update_meta(self, values: dict) -> None:
        """Set user meta keys (persisted at the next save); store-owned keys are refused."""
        bad = [k for k in values if k in _RESERVED]
        if bad:
            raise InvalidInputError(f"meta keys {bad} are managed by the index and cannot be set")
        if "pq_m" in values:
            _check_pq_m(values["pq_m"], self._dim)
        self._meta.update(values)
        if any(k in values for k in _STRUCTURE_KEYS):
            self._invalidate()
        self._unsaved = True

    def set_index_type(self, index_type: str) -> None:
        """Switch the search structure (persisted at the next save); vectors are reused."""
        if index_type not in INDEX_TYPES:
            raise InvalidInputError(f"index_type must be one of {INDEX_TYPES}, got {index_type!r}")
        if index_type != self._meta.get("index_type"):
            self._meta["index_type"] = index_type
            self._invalidate()
            self._unsaved = True

    def __len__(self) -> int:
        return self._n

    def __contains__(self, sample_id) -> bool:
        return sample_id in self._pos

    def __repr__(self) -> str:
        return (
            f"EmbeddingIndex(path={str(self.path)!r}, n={self._n}, dim={self._dim}, "
            f"index_type={self._meta.get('index_type')!r})"
        )

    # ------------------------------------------------------------------ mutation

    def add(
        self,
        ids: Sequence[str],
        vectors: np.ndarray,
        fingerprints: Optional[Sequence[Optional[str]]] = None,
    ) -> None:
        """Upsert: rows are L2-normalised to float32; existing ids are replaced (last one wins).

        Each row's norm is kept beside it, so :meth:`get_raw` returns the vectors as given.
        """
        ids = [str(i) for i in ids]
        vectors = np.asarray(vectors)
        if vectors.ndim == 1 and len(ids) == 1:
            vectors = vectors[None, :]
        if vectors.ndim != 2 or vectors.shape[0] != len(ids):
            raise InvalidInputError(
                f"add() needs one vector per id: got {len(ids)} ids and vectors of shape "
                f"{vectors.shape}"
            )
        if vectors.shape[1] != self._dim:
            raise IndexMismatchError(
                f"Vectors have dim {vectors.shape[1]} but the index at {self.path} holds dim "
                f"{self._dim} (a different model?). Rebuild it with overwrite=True."
            )
        if not np.isfinite(vectors).all():
            raise InvalidInputError("add() got NaN/inf vectors; drop failed embeddings first")
        if fingerprints is not None and len(fingerprints) != len(ids):
            raise InvalidInputError("fingerprints must have one entry per id")
        # float32 throughout: a float64 copy of 1M x 512 rows is 4 GB and 10-20 s for no gain
        # (the raw vectors come back to float32 precision either way).
        vectors = np.asarray(vectors, dtype=np.float32)
        norms = np.linalg.norm(vectors, axis=1)
        self._add(ids, normalize_rows(vectors), fingerprints, norms)

    def _add(self, ids: list[str], vecs: np.ndarray, fps, norms: Optional[np.ndarray] = None) -> None:
        if not ids:
            return
        if norms is None:
            norms = np.full(len(ids), np.nan, dtype=np.float32)
        norms = np.asarray(norms, dtype=np.float32)
        # Last occurrence of a repeated id wins, as sequential upserts would.
        last = {s: j for j, s in enumerate(ids)}
        if len(last) != len(ids):
            keep = sorted(last.values())
            ids = [ids[j] for j in keep]
            vecs = vecs[keep]
            norms = norms[keep]
            fps = [fps[j] for j in keep] if fps is not None else None
        new = [j for j, s in enumerate(ids) if s not in self._pos]
        old = [j for j, s in enumerate(ids) if s in self._pos]
        if old:
            rows = [self._pos[ids[j]] for j in old]
            self._vecs[rows] = vecs[old]
            self._norms[rows] = norms[old]
        if new:
            need = self._n + len(new)
            if need > self._vecs.shape[0]:
                cap = max(need, int(self._vecs.shape[0] * 1.5) + 16)
                buf = np.empty((cap, self._dim), dtype=np.float32)
                buf[: self._n] = self._vecs[: self._n]
                self._vecs = buf
            if need > self._norms.shape[0]:
                nbuf = np.empty(self._vecs.shape[0], dtype=np.float32)
                nbuf[: self._n] = self._norms[: self._n]
                self._norms = nbuf
            self._vecs[self._n : need] = vecs[new]
            self._norms[self._n : need] = norms[new]
            for j in new:
                self._pos[ids[j]] = len(self._ids)
                self._ids.append(ids[j])
            self._n = need
        for j, s in enumerate(ids):
            fp = fps[j] if fps is not None else None
            if fp is None:
                self._fps.pop(s, None)
            else:
                self._fps[s] = str(fp)
        self._dirty.update(ids)
        self._changed()

    def remove(self, ids: Iterable[str]) -> int:
        """Remove ids (missing ones are ignored); returns how many were removed."""
        return self._remove([str(i) for i in ids])

    def _remove(self, ids: list[str]) -> int:
        rm = {s for s in ids if s in self._pos}
        if not rm:
            return 0
        keep = np.ones(self._n, dtype=bool)
        keep[[self._pos[s] for s in rm]] = False
        kept = self._vecs[: self._n][keep]
        self._vecs[: len(kept)] = kept
        kept_norms = self._norms[: self._n][keep]
        self._norms[: len(kept_norms)] = kept_norms
        self._ids = [s for s in self._ids if s not in rm]
        self._pos = {s: i for i, s in enumerate(self._ids)}
        self._n = len(self._ids)
        for s in rm:
            self._fps.pop(s, None)
        self._dirty.update(rm)
        self._changed()
        return len(rm)

    def _changed(self) -> None:
        self._unsaved = True
        self._invalidate()

    def _invalidate(self) -> None:
        self._faiss = None
        self._faiss_cpu = None
        self._built_type = None

    # ------------------------------------------------------------------ lookup

    def has(self, ids: Iterable[str]) -> np.ndarray:
        return np.array([str(i) in self._pos for i in ids], dtype=bool)

    def get(self, ids: Iterable[str]) -> tuple[np.ndarray, np.ndarray]:
        """``(vectors of the ids that exist, in the given order; boolean mask of found)``."""
        ids = [str(i) for i in ids]
        found = np.array([i in self._pos for i in ids], dtype=bool)
        rows = [self._pos[i] for i, f in zip(ids, found) if f]
        return self._vecs[rows].copy() if rows else np.empty((0, self._dim), np.float32), found

    def get_raw(self, ids: Iterable[str]) -> tuple[np.ndarray, np.ndarray]:
        """Like :meth:`get`, but the vectors as they were added (unit row × stored norm).

        Raises :class:`IndexMismatchError` if a requested row has no stored norm (added by a
        version that kept only unit vectors): re-embed those samples.
        """
        ids = [str(i) for i in ids]
        found = np.array([i in self._pos for i in ids], dtype=bool)
        rows = [self._pos[i] for i, f in zip(ids, found) if f]
        if not rows:
            return np.empty((0, self._dim), np.float32), found
        norms = self._norms[rows]
        unknown = int(np.isnan(norms).sum())
        if unknown:
            raise IndexMismatchError(
                f"The embedding index at {self.path} holds only unit-length vectors for {unknown} of "
                f"these {len(rows)} samples (stored by a version of fiftyone_nola that did not keep "
                "vector norms), so their raw vectors cannot be recovered. Re-embed them: run "
                "compute_embeddings again (it re-embeds such samples) or with overwrite=True."
            )
        return self._vecs[rows] * norms[:, None], found

    def missing_norms(self) -> list[str]:
        """Ids whose pre-normalisation norm is unknown (stored by a version without norms)."""
        bad = np.flatnonzero(np.isnan(self._norms[: self._n]))
        return [self._ids[j] for j in bad]

    def positions(self, ids: Iterable[str]) -> np.ndarray:
        """Storage positions of ids (-1 where missing)."""
        return np.array([self._pos.get(str(i), -1) for i in ids], dtype=np.int64)

    # ------------------------------------------------------------------ search

    def _maybe_gpu(self, idx):
        if _num_gpus() > 0 and not isinstance(idx, faiss.IndexHNSWFlat):
            try:
                return faiss.index_cpu_to_all_gpus(idx)
            except Exception as e:  # unsupported index type / out of memory: stay on CPU
                logger.warning("FAISS GPU transfer failed (%s); searching on CPU", e)
        return idx

    def _effective_type(self) -> str:
        t = self._meta.get("index_type", "flat")
        min_size = int(self._meta.get("ivf_min_size", DEFAULT_IVF_MIN_SIZE))
        if t == "ivfpq":
            min_size = max(min_size, PQ_MIN_SIZE)
        if t in ("ivf", "ivfpq") and self._n < min_size:
            return "flat"
        return t

    def _pq_m(self) -> int:
        # Stores created before ivfpq existed have no pq_m.
        return int(self._meta.get("pq_m") or default_pq_m(self._dim))

    def _build_ivf(self, x: np.ndarray, pq: bool):
        n = len(x)
        nlist = ivf_nlist(n)
        idx = new_ivf_index(self._dim, nlist, self._pq_m() if pq else None)
        rows = sample_rows(n, ivf_train_size(nlist, pq))
        idx.train(np.ascontiguousarray(x[rows]))
        # In blocks: a memory-mapped x is then read once, never copied whole.
        for s in range(0, n, _BLOCK_ROWS):
            idx.add(np.ascontiguousarray(x[s : s + _BLOCK_ROWS]))
        self._meta["nlist"] = nlist
        return idx

    def _build(self) -> None:
        x = np.ascontiguousarray(self._vecs[: self._n])
        t = self._effective_type()
        d = self._dim
        if t in ("ivf", "ivfpq"):
            idx = self._build_ivf(x, pq=t == "ivfpq")
        elif t == "hnsw":
            idx = faiss.IndexHNSWFlat(d, int(self._meta.get("hnsw_m", DEFAULT_HNSW_M)),
                                      faiss.METRIC_INNER_PRODUCT)
            idx.hnsw.efConstruction = int(self._meta.get("ef_construction", DEFAULT_EF_CONSTRUCTION))
            idx.add(x)
        else:
            idx = faiss.IndexFlatIP(d)
            idx.add(x)
        self._faiss_cpu = idx
        self._faiss = self._maybe_gpu(idx)
        self._built_type = t
        self._meta["built_index_type"] = t

    def _search_params(self, k: int, nprobe: Optional[int], ef_search: Optional[int], sel=None):
        t = self._built_type
        if t in ("ivf", "ivfpq"):
            nlist = int(self._meta.get("nlist") or self._faiss_cpu.nlist)
            n = nprobe or self._meta.get("nprobe") or min(nlist, max(16, nlist // 8))
            return faiss.SearchParametersIVF(nprobe=int(min(n, nlist)), sel=sel)
        if t == "hnsw":
            ef = ef_search or self._meta.get("ef_search") or DEFAULT_EF_SEARCH
            return faiss.SearchParametersHNSW(efSearch=int(max(ef, k)), sel=sel)
        return faiss.SearchParameters(sel=sel) if sel is not None else None

    def search(
        self,
        queries: np.ndarray,
        k: int,
        restrict_to: Optional[Sequence[str]] = None,
        nprobe: Optional[int] = None,
        ef_search: Optional[int] = None,
        refine_factor: Optional[int] = None,
    ) -> tuple[np.ndarray, list[list[str]]]:
        """Cosine k-NN: ``(scores nq×k' descending, ids per query)``, k' = min(k, candidates).

        ``restrict_to`` limits results to those ids (unknown ones are ignored). With
        ivf/hnsw/ivfpq a query may find fewer than k' hits: its scores are padded with -inf and
        its id list is shorter. ivfpq takes ``refine_factor``·k candidates from the PQ codes and
        returns the best k by exact score (default: the ``refine_factor`` meta key).
        """
        q = normalize_rows(np.asarray(queries, dtype=np.float32))
        if q.shape[1] != self._dim:
            raise IndexMismatchError(
                f"Query dim {q.shape[1]} does not match the index dim {self._dim} at {self.path}."
            )
        if not np.isfinite(q).all():
            raise InvalidInputError("search() got NaN/inf query vectors")
        k = int(k)
        if k <= 0:
            raise InvalidInputError(f"k must be positive, got {k}")
        nq = q.shape[0]
        if restrict_to is not None:
            rows = np.unique(self.positions(restrict_to))
            rows = rows[rows >= 0]
            if len(rows) == 0:
                return np.empty((nq, 0), np.float32), [[] for _ in range(nq)]
            if len(rows) <= EXACT_SUBSET_MAX or _num_gpus() or self._effective_type() == "flat":
                return self._exact(q, k, rows)
            if self._faiss is None:
                self._build()
            sel = faiss.IDSelectorBatch(rows.astype(np.int64))
            k = min(k, len(rows))
            kc = self._n_candidates(k, len(rows), refine_factor)
            params = self._search_params(kc, nprobe, ef_search, sel=sel)
            scores, labels = self._faiss_cpu.search(q, kc, params=params)
            return self._format(*self._refine(q, scores, labels, k))
        if self._n == 0:
            return np.empty((nq, 0), np.float32), [[] for _ in range(nq)]
        if self._effective_type() == "flat" and not _num_gpus():
            # Blocked BLAS over the stored (maybe memory-mapped) rows: faster than faiss's
            # IndexFlatIP on CPUs, same results (see exact_search); a GPU keeps faiss.
            self._meta["built_index_type"] = "flat"
            return self._exact(q, k)
        if self._faiss is None:
            self._build()
        k = min(k, self._n)
        kc = self._n_candidates(k, self._n, refine_factor)
        params = self._search_params(kc, nprobe, ef_search)
        if params is None or self._faiss is self._faiss_cpu:
            scores, labels = self._faiss.search(q, kc, params=params)
        else:
            # GPU indexes take parameters as attributes, not SearchParameters.
            with contextlib.suppress(Exception):
                faiss.GpuParameterSpace().set_index_parameter(self._faiss, "nprobe", params.nprobe)
            scores, labels = self._faiss.search(q, kc)
        return self._format(*self._refine(q, scores, labels, k))

    def _n_candidates(self, k: int, available: int, refine_factor: Optional[int]) -> int:
        if self._built_type != "ivfpq":
            return k
        rf = refine_factor
        if rf is None:
            rf = self._meta.get("refine_factor") or DEFAULT_REFINE_FACTOR
        if int(rf) < 1:
            raise InvalidInputError(f"refine_factor must be >= 1, got {rf}")
        return min(k * int(rf), available)

    def _refine(self, q: np.ndarray, scores: np.ndarray, labels: np.ndarray, k: int):
        # PQ scores are approximate: rank the candidates by their exact scores instead.
        if self._built_type != "ivfpq":
            return scores, labels
        return rerank_exact(q, labels, self._vecs, k)

    def _exact(self, q: np.ndarray, k: int, rows: Optional[np.ndarray] = None):
        # Exact top-k over all rows, or over the positions ``rows``; ties go to the lower one.
        scores, pos = topk_inner_product(self._vecs[: self._n], q, k, rows)
        return scores, [[self._ids[j] for j in r] for r in pos]

    def _format(self, scores: np.ndarray, labels: np.ndarray):
        scores = np.where(labels >= 0, scores, -np.inf).astype(np.float32)
        return scores, [[self._ids[j] for j in r if j >= 0] for r in labels]

    # ------------------------------------------------------------------ persistence

    def checkpoint(self) -> Optional[Path]:
        """Persist changes since the last checkpoint/save as one chunk file; O(changes).

        Returns the chunk path, or None if there was nothing to write.
        """
        if not self._dirty:
            return None
        upserts = [s for s in self._dirty if s in self._pos]
        removed = [s for s in self._dirty if s not in self._pos]
        rows = [self._pos[s] for s in upserts]
        fp_ids = [s for s in upserts if s in self._fps]
        arrays = dict(
            ids=np.array(upserts, dtype=str),
            vectors=self._vecs[rows] if rows else np.empty((0, self._dim), np.float32),
            norms=self._norms[rows] if rows else np.empty(0, np.float32),
            removed=np.array(removed, dtype=str),
            fp_ids=np.array(fp_ids, dtype=str),
            fp_vals=np.array([self._fps[s] for s in fp_ids], dtype=str),
        )
        seq = max(self._next_chunk, self._max_chunk_on_disk() + 1)
        out = self.path / CHUNK_DIR / f"{seq:06d}.npz"
        with atomic_path(out) as tmp, open(tmp, "wb") as f:
            np.savez(f, **arrays)
        self._next_chunk = seq + 1
        self._dirty.clear()
        return out

    def _max_chunk_on_disk(self) -> int:
        files = self._chunk_files()
        return files[-1][0] if files else 0

    def save(self) -> None:
        """Compact everything into a new generation of data files, then drop merged chunks.

        meta.json is replaced last: until then the previous generation and its chunks stay
        the state any reader (or a restart after a crash) sees.
        """
        if not self._unsaved and not self._dirty and not self._chunk_files():
            return
        gen = int(self._meta.get("generation", 0)) + 1
        files = {
            "vectors": f"vectors-{gen:06d}.npy",
            "ids": f"ids-{gen:06d}.json",
            "fingerprints": f"fingerprints-{gen:06d}.json",
            "norms": f"norms-{gen:06d}.npy",
            "faiss": None,
        }
        with atomic_path(self.path / files["vectors"]) as tmp, open(tmp, "wb") as f:
            np.save(f, np.ascontiguousarray(self._vecs[: self._n]), allow_pickle=False)
        with atomic_path(self.path / files["norms"]) as tmp, open(tmp, "wb") as f:
            np.save(f, np.ascontiguousarray(self._norms[: self._n]), allow_pickle=False)
        with atomic_path(self.path / files["ids"]) as tmp:
            tmp.write_text(json.dumps(self._ids))
        with atomic_path(self.path / files["fingerprints"]) as tmp:
            tmp.write_text(json.dumps(self._fps, sort_keys=True))
        if self._effective_type() != "flat" and self._n > 0:
            if self._faiss_cpu is None:
                self._build()
            files["faiss"] = f"faiss-{gen:06d}.index"
            with atomic_path(self.path / files["faiss"]) as tmp:
                faiss.write_index(self._faiss_cpu, str(tmp))
        merged = max(self._next_chunk - 1, int(self._meta.get("chunks_merged_upto", 0)))
        meta = dict(self._meta)
        meta.update(
            count=self._n,
            generation=gen,
            files=files,
            chunks_merged_upto=merged,
            updated=_now(),
            versions=library_versions(),
            built_index_type=self._effective_type(),
        )
        write_json_atomic(self.path / META_FILE, meta)
        if isinstance(self._vecs, np.memmap):
            # Map the new file: the old generation's disk space is freed once it is deleted.
            self._vecs = _load_vectors(self.path / files["vectors"])
        self._meta = meta
        self._dirty.clear()
        self._unsaved = False
        self._next_chunk = merged + 1
        self._cleanup(gen, merged)

    def _cleanup(self, gen: int, merged: int) -> None:
        for seq, p in self._chunk_files():
            if seq <= merged:
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
        for p in self.path.iterdir():
            m = _GEN_FILE_RE.match(p.name)
            if m and int(m.group(2)) != gen:
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()

    # ------------------------------------------------------------------ locking

    @contextlib.contextmanager
    def lock(self, timeout: float = 0) -> Iterator[EmbeddingIndex]:
        """Exclusive inter-process lock on this store (re-entrant within this object).

        Raises :class:`IndexLockedError` if another process still holds it after ``timeout``
        seconds.
        """
        try:
            with file_lock(self.path / LOCK_FILE, timeout=max(0.0, float(timeout))):
                yield self
        except LockTimeout:
            raise IndexLockedError(
                f"The embedding index at {self.path} is locked by another process "
                f"(waited {timeout:g} s). Wait for that job to finish, or stop it; "
                "the lock is released automatically when it exits."
            ) from None


def _has_store_files(path: Path) -> bool:
    if not path.is_dir():
        return False
    chunks = path / CHUNK_DIR
    return any(_GEN_FILE_RE.match(p.name) for p in path.iterdir()) or (
        chunks.is_dir() and any(chunks.iterdir())
    )


def destroy(path: PathLike) -> None:
    """Delete the store files at ``path`` (only files an index writes; other files are kept)."""
    path = Path(path)
    if not path.is_dir():
        return
    for p in path.iterdir():
        if p.name == META_FILE or _GEN_FILE_RE.match(p.name) or (
            p.name.startswith(".") and p.name.endswith(".tmp")
        ):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
    shutil.rmtree(path / CHUNK_DIR, ignore_errors=True)
