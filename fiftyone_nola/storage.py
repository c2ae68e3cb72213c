"""Where artefacts live on disk, and atomic writes.

Layout under ``$NOLA_HOME`` (default ``~/.fiftyone_nola``)::

    datasets/<dataset id>/indexes/<model key>/   FAISS index + ids + meta.json
    datasets/<dataset id>/models/<run key>/      saved heads / tuned prompts + meta.json
    descriptions/                                LLM description cache
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional


def nola_home() -> Path:
    """Root of everything this library stores (``NOLA_HOME``, default ``~/.fiftyone_nola``)."""
    return Path(os.environ.get("NOLA_HOME", Path.home() / ".fiftyone_nola")).expanduser()


def storage_root(root: Optional[str] = None) -> Path:
    """Root directory of stored artefacts (argument, else ``NOLA_HOME``)."""
    return Path(root).expanduser() if root else nola_home()


def dataset_dir(dataset_id: str, root: Optional[str] = None) -> Path:
    """Artefacts of one dataset."""
    return storage_root(root) / "datasets" / str(dataset_id)


def index_dir(dataset_id: str, model_key: str, root: Optional[str] = None) -> Path:
    """The FAISS store of one model for one dataset."""
    return dataset_dir(dataset_id, root) / "indexes" / model_key


def run_dir(dataset_id: str, run_key: str, root: Optional[str] = None) -> Path:
    """Artefacts of one stage run (arrays, saved models) for one dataset."""
    return dataset_dir(dataset_id, root) / "models" / run_key


def descriptions_cache_dir(root: Optional[str] = None) -> Path:
    """Cache of LLM-written class descriptions."""
    return storage_root(root) / "descriptions"


@contextlib.contextmanager
def atomic_path(path: os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside ``path``; on success it is fsynced and renamed over ``path``.

    A crash at any point leaves either the old file or the new one, never a torn one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json_atomic(path: os.PathLike, obj: Any) -> None:
    """Write ``obj`` as JSON to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))


def file_sha256(path: os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes (read in 1 MiB blocks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_json(path: os.PathLike) -> Any:
    """Read a JSON file."""
    return json.loads(Path(path).read_text())
