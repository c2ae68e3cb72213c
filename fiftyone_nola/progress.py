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
    return None


def print_progress(stream=sys.stderr, every_s: float = 2.0) -> ProgressFn:
    """A callback that prints at most every ``every_s`` seconds, and always at completion."""
    last = [0.0]

    def fn(done: int, total: int, message: str = "") -> None:
        now = time.monotonic()
        if done >= total or now - last[0] >= every_s:
            last[0] = now
            pct = 100.0 * done / total if total else 100.0
            print(f"  {message} {done}/{total} ({pct:.0f}%)", file=stream, flush=True)

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
