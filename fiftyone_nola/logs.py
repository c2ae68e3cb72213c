"""Where the package's progress lines go.

Every module logs its progress lines (``[stage] ...``) at INFO on a logger under
``fiftyone_nola``. A library caller configures ``logging`` as usual; the CLI prints them as
plain lines and the operators collect them for their result, both through :func:`lines_to`.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from typing import Callable

LOGGER = "fiftyone_nola"

_level_lock = threading.Lock()
_active = 0
_saved_level = logging.NOTSET


class _LineHandler(logging.Handler):
    """Hands each record's message, as a plain line, to a callable."""

    def __init__(self, emit_line: Callable[[str], None], below: int, thread: int | None):
        super().__init__(logging.INFO)
        self._emit_line, self._below, self._thread = emit_line, below, thread

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= self._below or (self._thread is not None and record.thread != self._thread):
            return
        try:
            self._emit_line(record.getMessage())
        except Exception:
            self.handleError(record)


@contextlib.contextmanager
def lines_to(
    emit_line: Callable[[str], None], below: int = logging.CRITICAL + 1, this_thread: bool = False
) -> Iterator[None]:
    """Send the package's log lines (INFO and up, under ``below``) to ``emit_line`` meanwhile.

    ``this_thread``: only lines logged by the calling thread (an App server runs several
    operators at once, each collecting its own). The package logger is lowered to INFO while
    any such capture is active, then restored.
    """
    global _active, _saved_level
    logger = logging.getLogger(LOGGER)
    handler = _LineHandler(emit_line, below, threading.get_ident() if this_thread else None)
    with _level_lock:
        if _active == 0:
            _saved_level = logger.level
            if logger.getEffectiveLevel() > logging.INFO:
                logger.setLevel(logging.INFO)
        _active += 1
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        with _level_lock:
            _active -= 1
            if _active == 0:
                logger.setLevel(_saved_level)


# Libraries whose own progress lines (a map's fitting, an evaluation's "Evaluating...") would
# flood a run's output: while we call them, their records below WARNING go to our logger at DEBUG.
LIBRARY_LOGGERS = ("fiftyone", "umap", "sklearn", "numba", "pynndescent")


class _ToDebug(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        level = logging.DEBUG if record.levelno < logging.WARNING else record.levelno
        logging.getLogger(f"{LOGGER}.libraries").log(level, "%s: %s", record.name, record.getMessage())


@contextlib.contextmanager
def quiet_libraries(names: tuple[str, ...] = LIBRARY_LOGGERS) -> Iterator[None]:
    """Route the named libraries' log lines through our logger meanwhile: below WARNING at DEBUG,
    warnings and errors as they are."""
    handler = _ToDebug()
    saved = {}
    with _level_lock:
        for name in names:
            lg = logging.getLogger(name)
            saved[name] = (lg.propagate, lg.level)
            lg.addHandler(handler)
            lg.propagate = False
            if lg.getEffectiveLevel() > logging.INFO or lg.level == logging.NOTSET:
                lg.setLevel(logging.INFO)
    try:
        yield
    finally:
        with _level_lock:
            for name, (propagate, level) in saved.items():
                lg = logging.getLogger(name)
                lg.removeHandler(handler)
                lg.propagate, lg.level = propagate, level
