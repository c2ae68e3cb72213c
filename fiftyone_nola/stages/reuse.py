"""The facts the re-run planner (:mod:`fiftyone_nola.stages.plan`) decides from: whether a run
was recorded with the same settings, which samples a stage has no stored row for, which images
a store lacks, and the settings a run resolves to."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from fiftyone_nola.core.config import as_data, without_types
from fiftyone_nola.core.data import file_fingerprint
from fiftyone_nola.core.errors import IndexMismatchError, MissingEmbeddingsError
from fiftyone_nola.core.index import EmbeddingIndex
from fiftyone_nola.core.prompt_tuning import TuneConfig
from fiftyone_nola.core.storage import read_json
from fiftyone_nola.stages import fo_io, runs
from fiftyone_nola.stages.artifacts import stage_dir, stored_ids
from fiftyone_nola.stages.embeddings import index_path
from fiftyone_nola.stages.legacy_records import as_recorded_data
from fiftyone_nola.stages.nola import ZeroShotConfig, tune_settings


def _without_models_dir(obj):
    """Where weights are looked up is not what they are (the model's key is); runs recorded
    before it was a spec field have it ``None``."""
    if isinstance(obj, dict):
        return {k: _without_models_dir(v) for k, v in obj.items() if k != "models_dir"}
    if isinstance(obj, list):
        return [_without_models_dir(v) for v in obj]
    return obj


def _config_json(obj) -> str:
    """Settings by value: as data (records before 0.3 held nested ones as repr strings), type tags
    and ``models_dir`` left out."""
    return json.dumps(_without_models_dir(without_types(as_recorded_data(as_data(obj)))), sort_keys=True)


def up_to_date(samples, key: str, config) -> bool:
    """Whether run ``key`` was recorded with ``config`` (same settings: its outputs are reusable)."""
    run = runs.get_run(samples, key)
    return run is not None and _config_json(run.get("config")) == _config_json(config)


def zeroshot_config(config) -> ZeroShotConfig:
    """The zero-shot settings of a pipeline config (``AutoLabelConfig``)."""
    # The user's device setting (not the resolved one) is what runs recorded: same JSON, same run.
    return dataclasses.replace(config.zeroshot, clip=config.clip, device=config.device)


def tune_config(config, device: torch.device) -> TuneConfig:
    """The tuning settings of a pipeline run (``AutoLabelConfig``)."""
    return tune_settings(config.tune, device)


def subset(samples, ids: list, todo: list):
    """``samples`` itself when every sample is to be processed, else a view of ``todo``."""
    return samples if len(todo) == len(ids) else fo_io.root_dataset(samples).select(todo, ordered=True)


def embed_todo(samples, spec, ids: list, paths: list) -> tuple[set, set, str]:
    """``(ids to embed, stored ids no longer in the dataset, why)`` for the store of ``spec``:
    new samples, changed files, rows of deleted samples."""
    path = Path(index_path(samples, spec))
    if not (path / "meta.json").exists():
        return set(ids), set(), "no store yet"
    try:
        ix = EmbeddingIndex.open(path)
    except (IndexMismatchError, MissingEmbeddingsError, OSError):  # a store that does not open is rebuilt
        return set(ids), set(), "the store does not open: rebuilt"
    known = ix.fingerprints
    todo = {i for i, p in zip(ids, paths) if known.get(i) != file_fingerprint(p)}
    gone = set(known) - set(ids)
    parts = [f"{len(todo)} new or changed images"] if todo else []
    parts += [f"{len(gone)} deleted samples to drop"] if gone else []
    return todo, gone, "; ".join(parts)


def missing(samples, field_: str, ids: list, changed: set) -> list:
    """Ids with no stored row in the stage of ``field_``, or whose image changed."""
    have = stored_ids(stage_dir(samples, field_))
    return [i for i in ids if i not in have or i in changed]


def predict_up_to_date(samples, field_: str, model_dir: Path) -> bool:
    run = runs.get_run(samples, runs.run_key_for(field_))
    if run is None or not (model_dir / "meta.json").is_file():
        return False
    model_id = read_json(model_dir / "meta.json").get("model_id")
    return model_id is not None and (run.get("config") or {}).get("model_id") == model_id


def stored_classes(samples, zeroshot_field: str):
    """The class list the stage of ``zeroshot_field`` stored, None before it ran."""
    p = stage_dir(samples, zeroshot_field) / "meta.json"
    return read_json(p).get("classes") if p.exists() else None
