"""Progress callbacks and per-stage timing shared by the library, the CLI and the operators."""

from __future__ import annotations

import logging
import sys
import time
from contextlib import contextmanager
from typing import Callable, Optional

logger = logging.getLogger("fiftyone_nola")

# progress(done, total, message)
ProgressFn = Callable[[int, int, str], None]


def null_progress(done: int, total: int, message: str = "") -> None:
    """A progress callback that does nothing."""
    return None


def print_progress(stream=sys.stderr, every_s: float = 10.0) -> ProgressFn:
    """A callback printing done/total, rate and ETA at most every ``every_s`` seconds and at the end."""
    state = {"last": 0.0, "msg": None, "t0": 0.0}

    def fn(done: int, total: int, message: str = "") -> None:
        now = time.monotonic()
        if message != state["msg"]:
            state.update(msg=message, t0=now, last=now)
            return
        if done >= total or now - state["last"] >= every_s:
            state["last"] = now
            rate = done / max(now - state["t0"], 1e-9)
            eta = (total - done) / rate if rate > 0 else float("inf")
            pct = 100.0 * done / total if total else 100.0
            print(f"  {message}: {done}/{total} ({pct:.0f}%, {rate:.3g}/s, ETA {eta:.0f}s)", file=stream, flush=True)

    return fn


class StageTimer:
    """Records the wall time of named stages and prints each as it ends."""

    def __init__(self, echo: Optional[Callable[[str], None]] = None):
        self.seconds: dict[str, float] = {}
        self.echo = echo

    @contextmanager
    def stage(self, name: str):
        if self.echo:
            self.echo(f"[{name}] started")
        t0 = time.perf_counter()
        try:
            yield
        finally:
            dt = time.perf_counter() - t0
            self.seconds[name] = self.seconds.get(name, 0.0) + dt
            if self.echo:
                self.echo(f"[{name}] done in {dt:.1f}s")
