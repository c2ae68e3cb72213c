"""The in-memory table of a store: unit vectors, their norms and fingerprints, keyed by sample id."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Optional

import numpy as np

from fiftyone_nola.core.errors import IndexMismatchError
from fiftyone_nola.core.index.format import Generation


class VectorRows:
    """Rows ``0..n-1`` of a growable buffer; row i holds the unit vector of ``ids[i]``.

    Lookups never copy the whole table; the buffers may be memory-mapped copy-on-write.
    """

    def __init__(self, path: Path, dim: int):
        self.path = path
        self._dim = dim
        self._vecs = np.empty((0, dim), dtype=np.float32)
        # Pre-normalisation L2 norm of each row (NaN: unknown); raw vector = row * norm.
        self._norms = np.empty(0, dtype=np.float32)
        self._n = 0
        self._ids: list[str] = []
        self._pos: dict[str, int] = {}
        self._fps: dict[str, str] = {}

    def _load_rows(self, gen: Generation) -> None:
        self._vecs = gen.vectors
        self._norms = gen.norms
        self._n = len(gen.ids)
        self._ids = gen.ids
        self._pos = {s: i for i, s in enumerate(gen.ids)}
        self._fps = gen.fingerprints

    def _rows(self) -> Generation:
        """The live rows (views, not copies)."""
        return Generation(self._vecs[: self._n], self._norms[: self._n], self._ids, self._fps)

    # ------------------------------------------------------------------ lookup

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

    def __len__(self) -> int:
        return self._n

    def __contains__(self, sample_id) -> bool:
        return sample_id in self._pos

    def _lookup(self, ids: Iterable[str]) -> tuple[list[int], np.ndarray]:
        """Rows of the ids that exist (in the given order) and the boolean mask of found."""
        ids = [str(i) for i in ids]
        found = np.array([i in self._pos for i in ids], dtype=bool)
        return [self._pos[i] for i, f in zip(ids, found) if f], found

    def has(self, ids: Iterable[str]) -> np.ndarray:
        return np.array([str(i) in self._pos for i in ids], dtype=bool)

    def get(self, ids: Iterable[str]) -> tuple[np.ndarray, np.ndarray]:
        """``(vectors of the ids that exist, in the given order; boolean mask of found)``."""
        rows, found = self._lookup(ids)
        return self._vecs[rows].copy() if rows else np.empty((0, self._dim), np.float32), found

    def get_raw(self, ids: Iterable[str]) -> tuple[np.ndarray, np.ndarray]:
        """Like :meth:`get`, but the vectors as they were added (unit row × stored norm).

        Raises :class:`IndexMismatchError` if a requested row has no stored norm (added by a
        version that kept only unit vectors): re-embed those samples.
        """
        rows, found = self._lookup(ids)
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

    # ------------------------------------------------------------------ change

    def _upsert(self, ids: list[str], vecs: np.ndarray, fps, norms: Optional[np.ndarray]) -> list[str]:
        """Write unit rows ``vecs`` of ``ids`` (replacing existing ones; the last of a repeated
        id wins, as sequential upserts would); returns the ids written."""
        if norms is None:
            norms = np.full(len(ids), np.nan, dtype=np.float32)
        norms = np.asarray(norms, dtype=np.float32)
        last = {s: j for j, s in enumerate(ids)}
        if len(last) != len(ids):
            keep = sorted(last.values())
            ids = [ids[j] for j in keep]
            vecs, norms = vecs[keep], norms[keep]
            fps = [fps[j] for j in keep] if fps is not None else None
        new = [j for j, s in enumerate(ids) if s not in self._pos]
        old = [j for j, s in enumerate(ids) if s in self._pos]
        if old:
            rows = [self._pos[ids[j]] for j in old]
            self._vecs[rows] = vecs[old]
            self._norms[rows] = norms[old]
        if new:
            self._append([ids[j] for j in new], vecs[new], norms[new])
        for j, s in enumerate(ids):
            fp = fps[j] if fps is not None else None
            if fp is None:
                self._fps.pop(s, None)
            else:
                self._fps[s] = str(fp)
        return ids

    def _append(self, ids: list[str], vecs: np.ndarray, norms: np.ndarray) -> None:
        need = self._n + len(ids)
        if need > self._vecs.shape[0]:
            cap = max(need, int(self._vecs.shape[0] * 1.5) + 16)
            buf = np.empty((cap, self._dim), dtype=np.float32)
            buf[: self._n] = self._vecs[: self._n]
            self._vecs = buf
        if need > self._norms.shape[0]:
            nbuf = np.empty(self._vecs.shape[0], dtype=np.float32)
            nbuf[: self._n] = self._norms[: self._n]
            self._norms = nbuf
        self._vecs[self._n : need] = vecs
        self._norms[self._n : need] = norms
        for s in ids:
            self._pos[s] = len(self._ids)
            self._ids.append(s)
        self._n = need

    def _delete(self, ids: list[str]) -> set[str]:
        """Drop the rows of ``ids`` that exist (later rows move up); returns those ids."""
        rm = {s for s in ids if s in self._pos}
        if not rm:
            return rm
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
        return rm
