""":class:`EmbeddingIndex`: a store's rows, persisted in the on-disk format of :mod:`.format`,
searched exactly (:mod:`.search`) or through a faiss structure (:mod:`.ann`)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Optional

import numpy as np

from fiftyone_nola.core import jobs
from fiftyone_nola.core.errors import IndexMismatchError, InvalidInputError, JobBusyError, MissingEmbeddingsError
from fiftyone_nola.core.index import ann, search
from fiftyone_nola.core.index import format as fmt
from fiftyone_nola.core.index.format import META_FILE, PathLike
from fiftyone_nola.core.index.rows import VectorRows
from fiftyone_nola.core.storage import write_json_atomic

logger = logging.getLogger(__name__)


class IndexLockedError(JobBusyError):
    """Another process held the lock of an embedding index for longer than this one waits."""


class EmbeddingIndex(VectorRows):
    """Embeddings of one model on one dataset, keyed by sample id, with k-NN search.

    Writers should hold :meth:`lock`; readers need not (``save`` never touches the files a
    reader of the previous ``meta.json`` is loading, and ``open`` retries if a save raced it).
    """

    def __init__(self, path: PathLike, meta: dict):
        super().__init__(Path(path), int(meta["dim"]))
        self._meta = dict(meta)
        # ids touched since the last checkpoint/save: the next chunk's content
        self._dirty: set[str] = set()
        self._unsaved = False
        self._next_chunk = int(meta.get("chunks_merged_upto", 0)) + 1
        self._structure: Optional[ann.Structure] = None

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
        full = fmt.new_meta(dim, meta, index_type, metric, ann.search_defaults(int(dim)))
        ann.check_pq_m(full["pq_m"], full["dim"])
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
        if not (path / META_FILE).exists() and not fmt.has_store_files(path):
            raise MissingEmbeddingsError(
                f"No embedding index at {path}: compute embeddings for this dataset and model first."
            )
        # A concurrent save may delete the files of the generation we just read meta for;
        # re-reading meta then finds the new generation.
        last: Optional[Exception] = None
        for _ in range(5):
            meta = fmt.read_meta(path)
            try:
                self = cls._load(path, meta)
            except FileNotFoundError as e:
                last = e
                if fmt.read_meta(path).get("generation") != meta.get("generation"):
                    continue
                raise IndexMismatchError(
                    f"Embedding index at {path} is incomplete: {e.filename or e} is missing. "
                    "Rebuild it with overwrite=True."
                ) from e
            # A save that finished while we listed chunks may have deleted some unseen.
            if fmt.read_meta(path).get("generation") != meta.get("generation"):
                continue
            fmt.check_expect(path, self._meta, expect)
            return self
        raise IndexMismatchError(f"Embedding index at {path} kept changing while being opened ({last}); retry.")

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
            fmt.destroy(path)
        if not (path / META_FILE).exists():
            if fmt.has_store_files(path):
                raise IndexMismatchError(
                    f"Embedding index at {path} has data files but no meta.json; rebuild it with overwrite=True."
                )
            return cls.create(path, dim, meta, index_type=index_type)
        wanted = {**dict(meta or {}), "dim": int(dim)}
        expect = {k: wanted[k] for k in expect_keys if k in wanted}
        self = cls.open(path, expect=expect)
        if index_type != self._meta.get("index_type"):
            logger.info("Switching index at %s to index_type=%s", path, index_type)
            self.set_index_type(index_type)
        return self

    @classmethod
    def _load(cls, path: Path, meta: dict) -> EmbeddingIndex:
        self = cls(path, meta)
        gen = fmt.read_generation(path, meta)
        if gen is not None:
            self._load_rows(gen)
            fx = meta["files"].get("faiss")
            if fx:
                self._structure = ann.Structure.load(path / fx, meta.get("built_index_type"), self._n, self._dim)
        merged = int(meta.get("chunks_merged_upto", 0))
        last = merged
        for seq, chunk in fmt.read_chunks(path, merged, self._dim):
            self.remove(chunk.removed)
            self._put(chunk.ids, chunk.vectors, [chunk.fingerprints.get(i) for i in chunk.ids], chunk.norms)
            last = max(last, seq)
        # Replayed data is already on disk: nothing to checkpoint, but a save would compact it.
        self._dirty.clear()
        self._unsaved = last > merged
        self._next_chunk = last + 1
        return self

    # ------------------------------------------------------------------ meta

    @property
    def meta(self) -> dict:
        m = dict(self._meta)
        m["count"] = self._n
        return m

    def update_meta(self, values: dict) -> None:
        """Set user meta keys (persisted at the next save); store-owned keys are refused."""
        bad = [k for k in values if k in fmt.RESERVED_KEYS]
        if bad:
            raise InvalidInputError(f"meta keys {bad} are managed by the index and cannot be set")
        if "pq_m" in values:
            ann.check_pq_m(values["pq_m"], self._dim)
        self._meta.update(values)
        if any(k in values for k in ann.STRUCTURE_KEYS):
            self._structure = None
        self._unsaved = True

    def set_index_type(self, index_type: str) -> None:
        """Switch the search structure (persisted at the next save); vectors are reused."""
        fmt.check_index_type(index_type)
        if index_type != self._meta.get("index_type"):
            self._meta["index_type"] = index_type
            self._structure = None
            self._unsaved = True

    def __repr__(self) -> str:
        return (
            f"EmbeddingIndex(path={str(self.path)!r}, n={self._n}, dim={self._dim}, "
            f"index_type={self._meta.get('index_type')!r})"
        )

    # ------------------------------------------------------------------ change

    def add(
        self, ids: Sequence[str], vectors: np.ndarray, fingerprints: Optional[Sequence[Optional[str]]] = None
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
                f"add() needs one vector per id: got {len(ids)} ids and vectors of shape {vectors.shape}"
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
        self._put(ids, search.normalize_rows(vectors), fingerprints, norms)

    def _put(self, ids: list[str], vecs: np.ndarray, fps, norms: Optional[np.ndarray]) -> None:
        if ids:
            self._changed(self._upsert(ids, vecs, fps, norms))

    def remove(self, ids: Iterable[str]) -> int:
        """Remove ids (missing ones are ignored); returns how many were removed."""
        rm = self._delete([str(i) for i in ids])
        if rm:
            self._changed(rm)
        return len(rm)

    def _changed(self, ids: Iterable[str]) -> None:
        self._dirty.update(ids)
        self._unsaved = True
        self._structure = None

    # ------------------------------------------------------------------ search

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
        q, k = search.check_queries(queries, k, self._dim, self.path)
        vecs = self._vecs[: self._n]
        flat = ann.effective_type(self._meta, self._n) == "flat"
        rows = None
        if restrict_to is not None:
            rows = np.unique(self.positions(restrict_to))
            rows = rows[rows >= 0]
            if len(rows) == 0:
                return search.no_hits(len(q))
            if search.subset_is_exact(len(rows), flat, ann.num_gpus()):
                return search.exact_search(vecs, self._ids, q, k, rows)
        elif self._n == 0:
            return search.no_hits(len(q))
        elif flat and not ann.num_gpus():
            # Blocked BLAS over the stored (maybe memory-mapped) rows: faster than faiss's
            # IndexFlatIP on CPUs, same results (see search); a GPU keeps faiss.
            self._meta["built_index_type"] = "flat"
            return search.exact_search(vecs, self._ids, q, k)
        if self._structure is None:
            self._build()
        scores, labels = self._structure.search(
            q, k, vecs, self._meta, rows, nprobe=nprobe, ef_search=ef_search, refine_factor=refine_factor
        )
        scores = np.where(labels >= 0, scores, -np.inf).astype(np.float32)
        return scores, [[self._ids[j] for j in r if j >= 0] for r in labels]

    def _build(self) -> None:
        self._structure = ann.Structure.build(self._vecs[: self._n], self._meta)
        if self._structure.kind in ("ivf", "ivfpq"):
            self._meta["nlist"] = int(self._structure.cpu.nlist)
        self._meta["built_index_type"] = self._structure.kind

    # ------------------------------------------------------------------ persistence

    def checkpoint(self) -> Optional[Path]:
        """Persist changes since the last checkpoint/save as one chunk file; O(changes).

        Returns the chunk path, or None if there was nothing to write.
        """
        if not self._dirty:
            return None
        upserts = [s for s in self._dirty if s in self._pos]
        rows = [self._pos[s] for s in upserts]
        chunk = fmt.Chunk(
            ids=upserts,
            vectors=self._vecs[rows] if rows else np.empty((0, self._dim), np.float32),
            norms=self._norms[rows] if rows else np.empty(0, np.float32),
            fingerprints={s: self._fps[s] for s in upserts if s in self._fps},
            removed=[s for s in self._dirty if s not in self._pos],
        )
        on_disk = fmt.chunk_files(self.path)
        seq = max(self._next_chunk, (on_disk[-1][0] if on_disk else 0) + 1)
        out = fmt.write_chunk(self.path, seq, chunk)
        self._next_chunk = seq + 1
        self._dirty.clear()
        return out

    def save(self) -> None:
        """Compact everything into a new generation of data files, then drop merged chunks.

        meta.json is replaced last: until then the previous generation and its chunks stay
        the state any reader (or a restart after a crash) sees.
        """
        if not self._unsaved and not self._dirty and not fmt.chunk_files(self.path):
            return
        gen = int(self._meta.get("generation", 0)) + 1
        files = fmt.generation_files(gen)
        fmt.write_generation(self.path, files, self._rows())
        if ann.effective_type(self._meta, self._n) != "flat" and self._n > 0:
            if self._structure is None:
                self._build()
            self._structure.save(self.path / files["faiss"])
        else:
            files["faiss"] = None
        merged = max(self._next_chunk - 1, int(self._meta.get("chunks_merged_upto", 0)))
        meta = dict(self._meta)
        meta.update(
            count=self._n,
            generation=gen,
            files=files,
            chunks_merged_upto=merged,
            updated=fmt.now(),
            versions=fmt.library_versions(),
            built_index_type=ann.effective_type(self._meta, self._n),
        )
        write_json_atomic(self.path / META_FILE, meta)
        if isinstance(self._vecs, np.memmap):
            # Map the new file: the old generation's disk space is freed once it is deleted.
            self._vecs = fmt.load_vectors(self.path / files["vectors"])
        self._meta = meta
        self._dirty.clear()
        self._unsaved = False
        self._next_chunk = merged + 1
        fmt.cleanup(self.path, gen, merged)

    @contextlib.contextmanager
    def lock(
        self, timeout: Optional[float] = 0, what: str = "", on_wait: Optional[Callable[[str], None]] = None
    ) -> Iterator[EmbeddingIndex]:
        """Exclusive inter-process lock on this store (re-entrant within a thread), its holder
        named beside it (``what``: e.g. "embedding CLIP").

        If another job holds it, ``on_wait`` (default: an INFO line) hears once whom this one
        waits for; :class:`IndexLockedError` if it still holds it after ``timeout`` seconds
        (None: ``NOLA_JOB_WAIT_S``, see :mod:`fiftyone_nola.core.jobs`).
        """
        with jobs.exclusive(
            self.path / fmt.LOCK_FILE,
            what or f"writing the store {self.path.name}",
            timeout,
            say=on_wait or (lambda m: logger.info(f"[index] {self.path.name}: {m}")),
            where=" on this store",
            subject=f"The embedding index at {self.path}",
            error=IndexLockedError,
        ):
            yield self
