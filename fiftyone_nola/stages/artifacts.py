"""Per-stage artefacts on disk: arrays keyed by sample id, with a meta.json, in a run directory."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import numpy as np

from fiftyone_nola.core import jobs, storage
from fiftyone_nola.core.errors import NolaError
from fiftyone_nola.stages import fo_io, runs

logger = logging.getLogger(__name__)


def stage_dir(samples, run_key: str) -> Path:
    """Directory of a stage's artefacts for the dataset behind ``samples``."""
    return storage.run_dir(fo_io.dataset_id(samples), run_key)


BUNDLE = "arrays.npz"


@contextlib.contextmanager
def _locked(d: Path, what: str = ""):
    """Serialise writers of one stage directory, across processes and threads; re-entrant.

    A job finding another one writing the stage says once whom it waits for (an INFO line) and
    waits up to ``NOLA_JOB_WAIT_S`` (:mod:`fiftyone_nola.core.jobs`), then raises a clear
    :class:`~fiftyone_nola.core.errors.JobBusyError`.
    """
    name = what or d.name

    def waiting(msg: str) -> None:
        logger.info(f"[{name}] another job is writing this stage: {msg}")

    with jobs.exclusive(
        d / ".lock", f"writing {name}", say=waiting, subject=f"The stage {name!r} of this dataset ({d})"
    ):
        yield


@contextlib.contextmanager
def stage_writer(samples, field: str):
    """Publish a stage's outputs (field values, arrays, run record) as one serialised step.

    Two jobs writing the same field take turns (never interleaved values), and the stage's run
    record is dropped first: a job killed half-way through leaves the stage "not done", so the
    next run recomputes it instead of trusting a half-written field.
    """
    d = stage_dir(samples, field)
    with _locked(d, field):
        runs.forget_run(samples, runs.run_key_for(field))
        yield d


def _read_bundle(d: Path) -> Optional[dict]:
    p = d / BUNDLE
    if not p.exists():
        return None
    with np.load(p, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def save_array_bundle(d: Path, ids: Sequence[str], arrays: dict, meta: dict, shared: Optional[dict] = None) -> None:
    """Store per-sample ``arrays`` (rows aligned to ``ids``) and ``shared`` arrays in one file.

    One ``.npz`` renamed into place, so ids and rows can never disagree after a crash. Rows of
    samples not in ``ids`` that an earlier run stored are kept when the class list is the same,
    so stages run on different views (or by concurrent jobs on disjoint views) add up.
    """
    ids = [str(i) for i in ids]
    with _locked(d):
        old = _read_bundle(d)
        old_meta = storage.read_json(d / "meta.json") if (d / "meta.json").exists() else None
        out = {"ids": np.asarray(ids, dtype=str)}
        keep = None
        if old is not None and old_meta is not None and old_meta.get("classes") == meta.get("classes"):
            new_set = set(ids)
            keep = [i for i, s in enumerate(old["ids"].tolist()) if s not in new_set]
            if not all(f"s_{k}" in old and old[f"s_{k}"].shape[1:] == np.shape(v)[1:] for k, v in arrays.items()):
                keep = None
        if keep:
            out["ids"] = np.concatenate([old["ids"][keep], out["ids"]])
        for k, v in arrays.items():
            v = np.asarray(v)
            out[f"s_{k}"] = np.concatenate([old[f"s_{k}"][keep], v]) if keep else v
        for k, v in (shared or {}).items():
            out[f"g_{k}"] = np.asarray(v)
        with storage.atomic_path(d / BUNDLE) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, **out)
        storage.write_json_atomic(d / "meta.json", meta)


def stored_ids(d: Path) -> set:
    """Ids of the samples the stage in ``d`` holds rows for (empty if it never ran)."""
    p = d / BUNDLE
    if not p.exists() or not (d / "meta.json").exists():
        return set()
    with np.load(p, allow_pickle=False) as z:
        return set(z["ids"].tolist()) if "ids" in z.files else set()


def load_array(d: Path, name: str) -> np.ndarray:
    """A shared (not per-sample) array of a stage, e.g. its class weight matrix."""
    b = _read_bundle(d)
    if b is None or f"g_{name}" not in b:
        raise NolaError(f"{d} holds no array {name!r}: re-run the stage that makes it")
    return b[f"g_{name}"]


def has_array(d: Path, name: str) -> bool:
    """Whether the stage in ``d`` stored an array called ``name``."""
    b = _read_bundle(d)
    return b is not None and (f"s_{name}" in b or f"g_{name}" in b)


def aligned(d: Path, name: str, ids: Sequence[str]) -> np.ndarray:
    """Rows of a stored per-sample array for ``ids`` (NaN / -1 where the stage did not run)."""
    b = _read_bundle(d)
    if b is None or f"s_{name}" not in b:
        raise NolaError(f"{d} holds no per-sample array {name!r}: re-run the stage that makes it")
    arr = b[f"s_{name}"]
    pos = {s: i for i, s in enumerate(b["ids"].tolist())}
    fill = np.nan if np.issubdtype(arr.dtype, np.floating) else -1
    out = np.full((len(ids),) + arr.shape[1:], fill, dtype=arr.dtype)
    for j, s in enumerate(ids):
        i = pos.get(str(s))
        if i is not None:
            out[j] = arr[i]
    return out


def stage_meta(d: Path, what: str) -> dict:
    """The stage's meta.json, or a clear error if the stage never ran here."""
    if not (d / "meta.json").exists():
        raise NolaError(f"The {what} stage has not been run on this dataset yet (no {d}). Run it first.")
    return storage.read_json(d / "meta.json")
