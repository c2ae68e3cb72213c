"""Where artefacts live on disk, atomic writes, and the one file lock.

Layout under ``$NOLA_HOME`` (default ``~/.fiftyone_nola``)::

    datasets/<dataset id>/indexes/<model key>/   FAISS index + ids + meta.json
    datasets/<dataset id>/models/<run key>/      saved heads / tuned prompts + meta.json
    descriptions/                                LLM description cache
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
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


class LockTimeout(TimeoutError):
    """Another process held the lock for longer than the caller would wait."""


# Lock files held by this thread: flock belongs to an open file, so a nested acquire through a
# second open() would wait for ourselves. Per thread, because the App server runs operators in
# threads of one process and those must still exclude each other.
_held_locks = threading.local()


@contextlib.contextmanager
def file_lock(
    path: os.PathLike, timeout: Optional[float] = None, on_wait: Optional[Callable[[], None]] = None
) -> Iterator[Path]:
    """Exclusive lock on ``path`` across processes and threads; re-entrant within a thread.

    ``timeout=None`` waits as long as it takes; otherwise :class:`LockTimeout` after that many
    seconds. ``on_wait()`` is called once if the lock is busy, so a waiting job can say so.
    The lock goes with the process: a killed holder never leaves it stuck.
    """
    path = Path(path)
    key = str(path.resolve())
    held = _held_locks.__dict__.setdefault("paths", set())
    if key in held:
        yield path
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait()
            _wait_for_lock(f, path, timeout)
        held.add(key)
        try:
            f.truncate(0)
            f.write(f"{os.getpid()}\n")  # who holds it, for a person looking at a stuck job
            f.flush()
            yield path
        finally:
            held.discard(key)
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def holds_lock(path: os.PathLike) -> bool:
    """Whether this thread holds the :func:`file_lock` on ``path``."""
    return str(Path(path).resolve()) in _held_locks.__dict__.get("paths", ())


def lock_is_free(path: os.PathLike) -> bool:
    """Whether nobody holds the :func:`file_lock` on ``path`` now (a missing file: free). Creates
    nothing; the probe holds the lock for an instant only when it is free."""
    try:
        f = open(path)
    except FileNotFoundError:
        return True
    with f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)
        return True


def _wait_for_lock(f, path: Path, timeout: Optional[float]) -> None:
    if timeout is None:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        return
    deadline = time.monotonic() + max(0.0, float(timeout))
    while True:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise LockTimeout(f"{path} is held by another process (waited {timeout:g} s)") from None
            time.sleep(0.05)


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
