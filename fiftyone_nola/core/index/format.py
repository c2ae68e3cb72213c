"""The on-disk layout of an embedding store: meta.json, generations of data files, checkpoint
chunks; reading and validating them, writing them atomically (layout: see the package docs)."""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Optional, Union

import faiss
import numpy as np

from fiftyone_nola.core.errors import IndexMismatchError, InvalidInputError
from fiftyone_nola.core.storage import atomic_path

FORMAT_VERSION = 1
SUPPORTED_FORMAT_VERSIONS = (1,)
INDEX_TYPES = ("flat", "ivf", "hnsw", "ivfpq")
META_FILE = "meta.json"
CHUNK_DIR = "chunks"
LOCK_FILE = ".lock"
# Vector files at least this big are memory-mapped (copy-on-write) instead of read into RAM:
# the search structure (for ivfpq, the codes) is then what stays resident, and re-ranking
# touches only the candidates' rows.
MMAP_MIN_BYTES = 1 << 30
_BLOCK_ROWS = 65_536  # rows per block when checking a vectors file

_CHUNK_RE = re.compile(r"^(\d+)\.npz$")
_GEN_FILE_RE = re.compile(r"^(vectors|ids|fingerprints|faiss|norms)-(\d+)\.(npy|json|index)$")
# Keys the store owns; user meta may not override them.
RESERVED_KEYS = (
    "format_version",
    "dim",
    "metric",
    "index_type",
    "normalized",
    "count",
    "created",
    "updated",
    "versions",
    "generation",
    "files",
    "chunks_merged_upto",
    "built_index_type",
    "nlist",
)

PathLike = Union[str, os.PathLike]


def now() -> str:
    """UTC time stamp of meta.json's ``created``/``updated``."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _nola_version() -> str:
    try:
        return version("fiftyone-nola")
    except PackageNotFoundError:  # not installed as a distribution (source checkout)
        return "unknown"


def library_versions() -> dict:
    """Versions recorded in an index's metadata."""
    return {"faiss": faiss.__version__, "numpy": np.__version__, "fiftyone_nola": _nola_version()}


def check_index_type(index_type: str) -> None:
    if index_type not in INDEX_TYPES:
        raise InvalidInputError(f"index_type must be one of {INDEX_TYPES}, got {index_type!r}")


def new_meta(dim: int, meta: Optional[dict], index_type: str, metric: str, defaults: dict) -> dict:
    """meta.json of a new empty store: the user's keys (store-owned ones dropped), the store's
    bookkeeping, and ``defaults`` for keys the user left out."""
    check_index_type(index_type)
    if metric not in ("ip", "cosine"):
        raise InvalidInputError(f"metric must be 'ip' (cosine on normalised vectors), got {metric!r}")
    dim = int(dim)
    if dim <= 0:
        raise InvalidInputError(f"dim must be positive, got {dim}")
    full = {k: v for k, v in dict(meta or {}).items() if k not in RESERVED_KEYS}
    stamp = now()
    full.update(
        format_version=FORMAT_VERSION,
        dim=dim,
        metric="ip",
        index_type=index_type,
        normalized=True,
        count=0,
        created=stamp,
        updated=stamp,
        versions=library_versions(),
        generation=0,
        files=None,
        chunks_merged_upto=0,
    )
    for key, value in defaults.items():
        full.setdefault(key, value)
    return full


def read_meta(path: Path) -> dict:
    """meta.json of the store at ``path``, checked for the keys and values every reader needs."""
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
            raise IndexMismatchError(f"meta.json at {path} lacks {key!r}; rebuild the index with overwrite=True.")
    if not isinstance(meta["dim"], int) or meta["dim"] <= 0:
        raise IndexMismatchError(f"meta.json at {path} has invalid dim={meta['dim']!r}.")
    if meta["index_type"] not in INDEX_TYPES:
        raise IndexMismatchError(f"meta.json at {path} has unknown index_type={meta['index_type']!r}.")
    return meta


def _json_norm(v):
    # Stored meta went through JSON (tuples became lists); compare like with like.
    return json.loads(json.dumps(v, default=str))


def check_expect(path: Path, meta: dict, expect: Optional[dict]) -> None:
    """Raise :class:`IndexMismatchError` unless ``meta`` has each ``expect`` key's value."""
    for key, want in (expect or {}).items():
        have = meta.get(key, None)
        if key not in meta or _json_norm(have) != _json_norm(want):
            raise IndexMismatchError(
                f"Embedding index at {path} was built with {key}={have!r} but "
                f"{key}={want!r} is expected. Rebuild it with overwrite=True (or use a "
                "different index path)."
            )


def load_vectors(vp: Path) -> np.ndarray:
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


@dataclass
class Generation:
    """The rows of one saved generation."""

    vectors: np.ndarray
    norms: np.ndarray
    ids: list
    fingerprints: dict


def read_generation(path: Path, meta: dict) -> Optional[Generation]:
    """The generation ``meta`` names, validated; None for a store never saved with data.

    FileNotFoundError passes through: a concurrent save may have just replaced it.
    """
    files = meta.get("files")
    if not files:
        if meta["count"] != 0:
            raise IndexMismatchError(
                f"meta.json at {path} claims {meta['count']} vectors but names no data files; "
                "rebuild the index with overwrite=True."
            )
        return None
    vp, ip, fp = (path / files[k] for k in ("vectors", "ids", "fingerprints"))
    try:
        vecs = load_vectors(vp)
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
            f"ids/fingerprints of the index at {path} are not valid JSON ({e}); rebuild the index with overwrite=True."
        ) from e
    _check_generation(path, meta, vecs, ids, fps)
    norms = _read_norms(path, files.get("norms"), len(ids))
    return Generation(vecs, norms, ids, {str(k): str(v) for k, v in fps.items()})


def _check_generation(path: Path, meta: dict, vecs: np.ndarray, ids, fps) -> None:
    files, dim = meta["files"], meta["dim"]
    vp, ip, fp = (path / files[k] for k in ("vectors", "ids", "fingerprints"))
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
        raise IndexMismatchError(f"{ip} contains duplicate sample ids; rebuild the index with overwrite=True.")
    if not isinstance(fps, dict) or not set(fps) <= set(ids):
        raise IndexMismatchError(f"{fp} does not match the index ids; rebuild the index with overwrite=True.")
    if not _all_finite(vecs, vp):
        raise IndexMismatchError(f"{vp} contains NaN/inf; rebuild the index.")


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
    if norms.shape != (n,) or norms.dtype != np.float32 or bool(np.any(norms < 0)) or bool(np.isinf(norms).any()):
        raise IndexMismatchError(
            f"{np_path} holds {norms.dtype} {norms.shape} but float32 ({n},) non-negative norms "
            "are expected; rebuild the index with overwrite=True."
        )
    return np.array(norms, dtype=np.float32, copy=True)


def generation_files(gen: int) -> dict:
    """File names of generation ``gen`` (meta.json's ``files``)."""
    return {
        "vectors": f"vectors-{gen:06d}.npy",
        "ids": f"ids-{gen:06d}.json",
        "fingerprints": f"fingerprints-{gen:06d}.json",
        "norms": f"norms-{gen:06d}.npy",
        "faiss": f"faiss-{gen:06d}.index",
    }


def write_generation(path: Path, files: dict, rows: Generation) -> None:
    """Write the data files of a generation, each atomically (meta.json is the caller's)."""
    with atomic_path(path / files["vectors"]) as tmp, open(tmp, "wb") as f:
        np.save(f, np.ascontiguousarray(rows.vectors), allow_pickle=False)
    with atomic_path(path / files["norms"]) as tmp, open(tmp, "wb") as f:
        np.save(f, np.ascontiguousarray(rows.norms), allow_pickle=False)
    with atomic_path(path / files["ids"]) as tmp:
        tmp.write_text(json.dumps(rows.ids))
    with atomic_path(path / files["fingerprints"]) as tmp:
        tmp.write_text(json.dumps(rows.fingerprints, sort_keys=True))


def chunk_files(path: Path) -> list[tuple[int, Path]]:
    """(sequence number, path) of each checkpoint chunk, in order."""
    d = path / CHUNK_DIR
    if not d.is_dir():
        return []
    out = []
    for p in d.iterdir():
        m = _CHUNK_RE.match(p.name)
        if m:
            out.append((int(m.group(1)), p))
    return sorted(out)


@dataclass
class Chunk:
    """One checkpoint: rows upserted (norms None if written before norms existed) and ids
    removed since the previous one."""

    ids: list
    vectors: np.ndarray
    norms: Optional[np.ndarray]
    fingerprints: dict
    removed: list


def write_chunk(path: Path, seq: int, chunk: Chunk) -> Path:
    """Write checkpoint ``seq`` atomically; returns its path."""
    fp_ids = list(chunk.fingerprints)
    out = path / CHUNK_DIR / f"{seq:06d}.npz"
    with atomic_path(out) as tmp, open(tmp, "wb") as f:
        np.savez(
            f,
            ids=np.array(chunk.ids, dtype=str),
            vectors=chunk.vectors,
            norms=chunk.norms,
            removed=np.array(chunk.removed, dtype=str),
            fp_ids=np.array(fp_ids, dtype=str),
            fp_vals=np.array([chunk.fingerprints[s] for s in fp_ids], dtype=str),
        )
    return out


def read_chunks(path: Path, merged: int, dim: int) -> Iterator[tuple[int, Chunk]]:
    """The checkpoints after ``merged`` (those up to it are in the saved generation: a crash
    came between meta.json and their cleanup), validated, in order."""
    for seq, p in chunk_files(path):
        if seq > merged:
            yield seq, _read_chunk(p, dim)


def _read_chunk(p: Path, dim: int) -> Chunk:
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
    if vecs.ndim != 2 or vecs.shape != (len(ids), dim):
        raise IndexMismatchError(
            f"Checkpoint {p} holds vectors {vecs.shape}, expected ({len(ids)}, "
            f"{dim}); delete it or rebuild the index with overwrite=True."
        )
    norms = data.get("norms")  # absent in checkpoints of versions without norms
    if norms is not None and norms.shape != (len(ids),):
        raise IndexMismatchError(
            f"Checkpoint {p} holds norms {norms.shape}, expected ({len(ids)},); delete it "
            "or rebuild the index with overwrite=True."
        )
    return Chunk(ids, vecs, norms, fp_map, removed)


def cleanup(path: Path, gen: int, merged: int) -> None:
    """Delete the chunks up to ``merged`` and the data files of generations other than ``gen``."""
    for seq, p in chunk_files(path):
        if seq <= merged:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
    for p in path.iterdir():
        m = _GEN_FILE_RE.match(p.name)
        if m and int(m.group(2)) != gen:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()


def has_store_files(path: Path) -> bool:
    """Whether ``path`` holds data files or chunks of a store (with or without meta.json)."""
    if not path.is_dir():
        return False
    chunks = path / CHUNK_DIR
    return any(_GEN_FILE_RE.match(p.name) for p in path.iterdir()) or (chunks.is_dir() and any(chunks.iterdir()))


def destroy(path: PathLike) -> None:
    """Delete the store files at ``path`` (only files an index writes; other files are kept)."""
    path = Path(path)
    if not path.is_dir():
        return
    for p in path.iterdir():
        if p.name == META_FILE or _GEN_FILE_RE.match(p.name) or (p.name.startswith(".") and p.name.endswith(".tmp")):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
    shutil.rmtree(path / CHUNK_DIR, ignore_errors=True)
