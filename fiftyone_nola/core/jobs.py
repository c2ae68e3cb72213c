"""Jobs take turns on what they write: an exclusive lock that names its holder, and a bounded wait.

A lock (:func:`~fiftyone_nola.core.storage.file_lock`: ``flock``, released by the kernel when its
holder dies, however it dies) guards a dataset's job, an embedding store or a stage's field.
Beside it, ``<lock>.holder.json`` names the holder (pid, host, what it does, since when), so a
job that finds the lock busy says once what it waits for, then waits up to ``NOLA_JOB_WAIT_S``
seconds (default 30 minutes; 0: do not wait) before a clear :class:`JobBusyError`. A killed
holder's facts stay behind but are never taken for a running job: its pid is gone and its lock
is free, so the next job takes over at once and writes its own.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Optional

from fiftyone_nola.core import storage
from fiftyone_nola.core.errors import InvalidInputError, JobBusyError

WAIT_ENV = "NOLA_JOB_WAIT_S"
DEFAULT_WAIT_S = 1800.0  # generous: a second job usually wants exactly what the first is making
SETTLE_S = 1.0  # a new holder writes its facts right after taking the lock: read them for this long

_jobs = threading.local()  # what this thread's held locks are for, outermost first


def job_wait_s(wait_s: Optional[float] = None) -> float:
    """Seconds a job waits for another holding what it needs: ``wait_s``, else ``NOLA_JOB_WAIT_S``,
    else :data:`DEFAULT_WAIT_S`. 0 means fail at once."""
    if wait_s is None:
        raw = os.environ.get(WAIT_ENV, "").strip()
        if not raw:
            return DEFAULT_WAIT_S
        try:
            wait_s = float(raw)
        except ValueError:
            raise InvalidInputError(f"{WAIT_ENV}={raw!r} is not a number of seconds (0: never wait)") from None
    wait_s = float(wait_s)
    if math.isnan(wait_s) or wait_s < 0:
        raise InvalidInputError(f"a job's wait must be 0 or more seconds, not {wait_s!r} ({WAIT_ENV})")
    return wait_s


def duration(seconds: float) -> str:
    """``45 s``, ``30 min``, ``1.5 h``: how long, for a person."""
    if seconds < 120:
        return f"{seconds:.0f} s" if seconds >= 10 else f"{round(seconds, 1):g} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


@dataclasses.dataclass
class Holder:
    """Who holds a lock: process, machine, what it does, since when (epoch seconds)."""

    pid: int
    host: str
    what: str
    started_at: float
    command: str = ""

    def alive(self) -> Optional[bool]:
        """Whether the holding process still runs (None: on another machine, unknown)."""
        if self.host != socket.gethostname():
            return None
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # another user's live process
            return True
        return True

    def describe(self, now: Optional[float] = None) -> str:
        """``auto-label (pid 1234, started 12:03:04, 2 min ago)``."""
        ago = max(0.0, (now or time.time()) - self.started_at)
        where = "" if self.host == socket.gethostname() else f" on {self.host}"
        started = time.strftime("%H:%M:%S", time.localtime(self.started_at))
        return f"{self.what} (pid {self.pid}{where}, started {started}, {duration(ago)} ago)"


def holder_path(lock: os.PathLike) -> Path:
    """The holder's facts beside ``lock``."""
    lock = Path(lock)
    return lock.with_name(lock.name + ".holder.json")


def read_holder(lock: os.PathLike) -> Optional[Holder]:
    """The facts the last holder of ``lock`` wrote (maybe a dead one's), or None."""
    try:
        d = json.loads(holder_path(lock).read_text())
        return Holder(**{f.name: d[f.name] for f in dataclasses.fields(Holder) if f.name in d})
    except (OSError, ValueError, TypeError):
        return None


def live_holder(lock: os.PathLike, settle_s: float = SETTLE_S) -> Optional[Holder]:
    """The holder of a busy ``lock``: facts whose process is alive, read for up to ``settle_s``
    (the dead holder's facts stay until the next holder, just after taking the lock, replaces
    them); None if none appear."""
    deadline = time.monotonic() + settle_s
    while True:
        h = read_holder(lock)
        if h is not None and h.alive() is not False:
            return h
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.05)


def running(lock: os.PathLike) -> Optional[str]:
    """Who holds ``lock`` now, described, if another job (or another thread) does; else None.

    Reads and probes only (creates nothing); a killed holder's facts are not a running job."""
    if storage.holds_lock(lock):
        return None
    h = read_holder(lock)
    if h is None or h.alive() is False:
        return None
    if storage.lock_is_free(lock):  # facts left by a holder whose pid now names another process
        return None
    return h.describe()


def current_job() -> str:
    """What the outermost lock this thread holds is for, else this process's command."""
    stack = getattr(_jobs, "stack", None)
    return stack[0] if stack else _command()


def _command() -> str:
    argv = list(sys.argv or ["python"])
    return " ".join([os.path.basename(argv[0] or "python"), *argv[1:3]])[:120]


def _label(what: str) -> str:
    stack = getattr(_jobs, "stack", None) or []
    return what if not stack or stack[0] == what else f"{stack[0]} > {what}"


@contextlib.contextmanager
def exclusive(
    lock: os.PathLike,
    what: str,
    wait_s: Optional[float] = None,
    say: Optional[Callable[[str], None]] = None,
    where: str = "",
    subject: str = "It",
    error: Callable[[str], Exception] = JobBusyError,
) -> Iterator[None]:
    """Hold ``lock`` for ``what`` (re-entrant in a thread), its holder's facts beside it.

    If another job holds it: ``say`` once what this job waits for (``where``: " on this
    dataset"), wait up to ``wait_s`` (None: :func:`job_wait_s`), then raise ``error(message)``
    (``subject``: what is locked, e.g. "The embedding index at ..."); a holder that dies
    meanwhile lets this job in at once.
    """
    lock = Path(lock)
    if storage.holds_lock(lock):  # the outer hold speaks for this one
        yield
        return
    wait = job_wait_s(wait_s)
    waited: dict = {}

    def waiting() -> None:
        h = live_holder(lock)
        waited.update(t0=time.monotonic(), holder=h)
        if say is not None and wait > 0:
            say(f"waiting for {h.describe() if h else 'another job'}{where}; up to {duration(wait)}")

    hold = contextlib.ExitStack()
    try:
        hold.enter_context(storage.file_lock(lock, timeout=wait, on_wait=waiting))
    except storage.LockTimeout:
        h = waited.get("holder") or live_holder(lock, 0.0)
        who = h.describe() if h else "another job"
        raise error(
            f"{subject} is locked by another process: {who} (waited {duration(wait)}). Wait for that job "
            f"to finish, or stop it; the lock is released automatically when it exits. {WAIT_ENV} sets "
            "how long a job waits."
        ) from None
    with hold:
        if waited and say is not None:
            say(f"the other job is done (waited {duration(time.monotonic() - waited['t0'])}); continuing")
        me = Holder(os.getpid(), socket.gethostname(), _label(what), time.time(), _command())
        storage.write_json_atomic(holder_path(lock), dataclasses.asdict(me))
        stack = _jobs.__dict__.setdefault("stack", [])
        stack.append(what)
        try:
            yield
        finally:
            stack.pop()
            # Before the lock goes: the next holder's facts must never be the ones removed.
            if read_holder(lock) == me:
                holder_path(lock).unlink(missing_ok=True)
