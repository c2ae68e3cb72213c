"""Per-stage artefacts on disk: arrays keyed by sample id, with a meta.json, in a run directory."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from . import fo_io, storage
from .errors import NolaError


def stage_dir(samples, run_key: str) -> Path:
    return storage.run_dir(fo_io.dataset_id(samples), run_key)


def save_array_bundle(d: Path, ids: Sequence[str], arrays: dict, meta: dict) -> None:
    """Arrays keyed by sample id, written atomically (meta.json last)."""
    d.mkdir(parents=True, exist_ok=True)
    for name, arr in arrays.items():
        with storage.atomic_path(d / f"{name}.npy") as tmp:
            with open(tmp, "wb") as f:
                np.save(f, np.asarray(arr), allow_pickle=False)
    storage.write_json_atomic(d / "ids.json", list(ids))
    storage.write_json_atomic(d / "meta.json", meta)


def load_array(d: Path, name: str) -> np.ndarray:
    return np.load(d / f"{name}.npy", allow_pickle=False)


def aligned(d: Path, name: str, ids: Sequence[str]) -> np.ndarray:
    """Rows of a stored per-sample array for ``ids`` (NaN / -1 where the stage did not run)."""
    stored_ids = json.loads((d / "ids.json").read_text())
    arr = load_array(d, name)
    pos = {s: i for i, s in enumerate(stored_ids)}
    fill = np.nan if np.issubdtype(arr.dtype, np.floating) else -1
    out = np.full((len(ids),) + arr.shape[1:], fill, dtype=arr.dtype)
    for j, s in enumerate(ids):
        i = pos.get(s)
        if i is not None:
            out[j] = arr[i]
    return out


def stage_meta(d: Path, what: str) -> dict:
    if not (d / "meta.json").exists():
        raise NolaError(f"The {what} stage has not been run on this dataset yet (no {d}). Run it first.")
    return storage.read_json(d / "meta.json")
