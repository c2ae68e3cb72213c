"""What a re-run must redo: each stage's stored outputs are reused when made with the same settings.

Rule: a stage redoes every sample when its recorded settings, class list or model changed (or
``force``); else only samples it has no stored row for, plus samples whose image changed.
Shared by ``auto_label``, ``auto_label_multilabel`` and the ``--check`` plan.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from fiftyone_nola.core.config import as_data, resolve, without_types
from fiftyone_nola.core.data import file_fingerprint
from fiftyone_nola.core.device import resolve_device
from fiftyone_nola.core.index import EmbeddingIndex
from fiftyone_nola.core.prompt_tuning import TuneConfig
from fiftyone_nola.core.storage import read_json
from fiftyone_nola.stages import fo_io, runs
from fiftyone_nola.stages.artifacts import stage_dir, stored_ids
from fiftyone_nola.stages.embeddings import index_path
from fiftyone_nola.stages.legacy_records import as_recorded_data
from fiftyone_nola.stages.nola import ZeroShotConfig, dino_run_config, tune_run_config


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


def tune_settings(tune: TuneConfig, device) -> TuneConfig:
    """``tune`` as a tuning run uses it: the user's settings, the rest fitted to ``device``.

    Runs record it as ``TuneConfig.as_recorded`` ("all samples" as ``max_samples=None``, as
    before the config rule), so the same settings stay up to date.
    """
    device = device if isinstance(device, torch.device) else resolve_device(device)
    return dataclasses.replace(resolve(tune, device), device=str(device))


def tune_config(config, device: torch.device) -> TuneConfig:
    """The tuning settings of a pipeline run (``AutoLabelConfig``)."""
    return tune_settings(config.tune, device)


def subset(samples, ids: list, todo: list):
    """``samples`` itself when every sample is to be processed, else a view of ``todo``."""
    return samples if len(todo) == len(ids) else fo_io.root_dataset(samples).select(todo, ordered=True)


def embed_todo(samples, spec, ids: list, paths: list) -> set:
    """Ids the embedding stage of ``spec`` will (re-)embed: new samples or changed files."""
    path = Path(index_path(samples, spec))
    if not (path / "meta.json").exists():
        return set(ids)
    try:
        known = EmbeddingIndex.open(path).fingerprints
    except Exception:  # a store that does not open is rebuilt by the stage
        return set(ids)
    return {i for i, p in zip(ids, paths) if known.get(i) != file_fingerprint(p)}


@dataclass
class Plan:
    """Which samples each stage processes, and whether the trained stages train again.

    Rule: a stage redoes everything when its settings, class list or model changed (or
    ``force``); otherwise it processes only samples it has no stored row for, plus samples
    whose image changed. The DINO labeller is retrained only when zero-shot was redone for
    every sample (or its settings changed); new samples are labelled by the saved labeller.
    Prompt tuning retrains only when the labeller was retrained or its settings / CLIP
    changed; new samples are predicted by the saved tuned model.
    """

    zeroshot: list
    dino_labeler: list
    predict: list
    retrain_labeler: bool
    retrain_tuning: bool
    zs_cfg: Any = None
    dl_cfg: Any = None
    tune_cfg: Any = None
    model_dir: Optional[Path] = None


def decide(samples, classes, config, ids: list, changed: set, device: torch.device) -> Plan:
    zs_cfg = zeroshot_config(config)
    zs_full = (
        config.force
        or not up_to_date(samples, runs.run_key_for(config.zeroshot_field), zs_cfg)
        or stored_classes(samples, config.zeroshot_field) != classes
    )
    zs_todo = list(ids) if zs_full else missing(samples, config.zeroshot_field, ids, changed)
    dl_cfg = dataclasses.replace(config.dino_labeler, device=config.device)
    dl_full = (
        zs_full
        or not up_to_date(
            samples, runs.run_key_for(config.dino_field), dino_run_config(dl_cfg, config.dino, config.zeroshot_field)
        )
        or not (stage_dir(samples, config.dino_field) / "labeler").is_file()
    )
    dl_todo = list(ids) if dl_full else sorted(set(missing(samples, config.dino_field, ids, changed)) | set(zs_todo))
    tune_cfg = model_dir = None
    tune_full, pred_todo = False, []
    if not config.skip_tuning:
        tune_cfg = tune_config(config, device)
        model_dir = stage_dir(samples, f"{config.tuned_field}_model")
        tune_run = tune_run_config(tune_cfg, config.clip, config.dino_field)
        tune_full = (
            dl_full
            or config.force
            or not (model_dir / "meta.json").is_file()
            or not up_to_date(samples, runs.run_key_for(f"{config.tuned_field}_model"), tune_run)
        )
        pred_full = tune_full or not predict_up_to_date(samples, config.tuned_field, model_dir)
        pred_todo = list(ids) if pred_full else missing(samples, config.tuned_field, ids, changed)
    return Plan(zs_todo, dl_todo, pred_todo, dl_full, tune_full, zs_cfg, dl_cfg, tune_cfg, model_dir)


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


def plan_stages(samples, classes, config, extra_new: int = 0) -> tuple[dict, dict]:
    """``(samples to process per stage, retrain flags)`` ``auto_label`` would use now; reads only.

    ``extra_new``: samples not in ``samples`` yet (a folder's new files) that every stage will process.
    """
    ids, paths = fo_io.ids_and_paths(samples)
    emb = {spec.family: embed_todo(samples, spec, ids, paths) for spec in (config.clip, config.dino)}
    plan = decide(samples, classes, config, ids, emb["clip"] | emb["dino"], resolve_device(config.device))
    todo = {
        "clip": len(emb["clip"]),
        "dino": len(emb["dino"]),
        "zeroshot": len(plan.zeroshot),
        "dino_labeler": len(plan.dino_labeler),
        "predict": len(plan.predict),
    }
    todo = {k: v + max(extra_new, 0) for k, v in todo.items()}
    return todo, {"dino_labeler": plan.retrain_labeler, "prompt_tuning": plan.retrain_tuning}


def stored_classes(samples, zeroshot_field: str):
    """The class list the stage of ``zeroshot_field`` stored, None before it ran."""
    p = stage_dir(samples, zeroshot_field) / "meta.json"
    return read_json(p).get("classes") if p.exists() else None
