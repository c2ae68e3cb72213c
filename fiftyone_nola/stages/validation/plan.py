"""The plan of a job: stages to run or reuse, estimated time and disk (advice only)."""

from __future__ import annotations

import logging

from fiftyone_nola.core.config import resolve
from fiftyone_nola.core.device import hardware_profile, resolve_device
from fiftyone_nola.core.models import ClipSpec, concrete_dino
from fiftyone_nola.core.storage import nola_home
from fiftyone_nola.stages.cdul import MultiLabelConfig
from fiftyone_nola.stages.validation.target import Target

logger = logging.getLogger(__name__)

# Images per second of one forward pass on a 2-core CPU by model size (patch 16; patch 32 is
# ~3x cheaper), fitted to the README's 1,000-image demo (ViT-B-32 embed/predict ~13 img/s,
# DINO ViT-S/16 ~9 img/s, tuning ~2.5x a forward pass); a GPU is taken as ~40x faster.
# Advice only: the real figure is printed as each stage runs.
_CPU_RATES = {"tiny": 400.0, "S": 9.0, "B": 4.0, "L": 0.8, "H": 0.3, "g": 0.2}
_TRAIN_COST = 2.5
_GPU_SPEEDUP = 40.0


def _size_class(name: str) -> str:
    n = name.lower()
    if "tiny" in n:
        return "tiny"
    for tag, size in (
        ("small", "S"),
        ("-s-", "S"),
        ("base", "B"),
        ("-b-", "B"),
        ("large", "L"),
        ("-l-", "L"),
        ("huge", "H"),
        ("-h-", "H"),
        ("giant", "g"),
        ("-g-", "g"),
    ):
        if tag in f"-{n}-".replace("_", "-"):
            return size
    return "B"


def _rate(spec, device) -> float:

    name = getattr(spec, "arch", None) or getattr(spec, "name", "")
    if getattr(spec, "name", None) == "auto":
        name = concrete_dino(spec).name
    rate = _CPU_RATES[_size_class(name)]
    if "32" in name.replace("224", "").split("patch")[-1].split("-"):
        rate *= 3.25
    try:
        dev = resolve_device(device)
    except Exception as e:  # an estimate only: validation reports a bad device itself
        logger.debug("plan: device %r not resolved (%s); CPU rates assumed", device, e)
        return rate
    return rate * (_GPU_SPEEDUP if dev.type == "cuda" else 1.0)


def _embed_seconds(spec, n: int, device) -> float:
    return n / _rate(spec, device) if n else 0.0


def _embed_dim(spec) -> int:

    if isinstance(spec, ClipSpec):
        import open_clip

        try:
            cfg = open_clip.get_model_config(spec.arch) or {}
            return int(cfg.get("embed_dim", 512))
        except Exception as e:  # an unknown or malformed config: the estimate assumes ViT-B's width
            logger.debug("plan: no open_clip config for %r (%s); 512 dims assumed", spec.arch, e)
            return 512
    name = concrete_dino(spec).name
    return {"tiny": 48, "S": 384, "B": 768, "L": 1024, "H": 1280, "g": 1536}[_size_class(name)]


def _disk_needed(config, n: int, n_classes: int) -> int:
    """Bytes the stores of a run will hold: vectors + ids/fingerprints, and the stage arrays."""
    per_vec = 4 * (_embed_dim(config.clip) + _embed_dim(config.dino)) + 2 * 80
    stage_rows = 4 * max(n_classes, 1) * 4 + 64
    tuned = 0 if config.skip_tuning else 40 << 20
    return int(n * (per_vec + stage_rows) + tuned)


def _seconds(row: dict, config, classes, n: int, dev) -> float:
    """An estimate of a planned step's seconds on this hardware (advice only)."""
    name, todo, action = row["stage"], row["samples"], row["action"]
    if action == "reuse":
        return 0.0
    if name.startswith("embeddings:"):
        return _embed_seconds(config.clip if name.endswith("clip") else config.dino, todo, dev)
    if name == "zeroshot":
        texts = len(classes or []) * 90 / (10 * _rate(config.clip, dev)) if todo == n and n else 0.0
        return 0.05 + todo * 1e-4 + texts
    if name == "dino_labeler":
        return (2.0 if action == "train" else 0.0) + todo * 3e-3
    if name == "prompt_tuning":
        tune = resolve(config.tune, dev)
        m = min(n, tune.max_samples) if tune.max_samples else n  # 0: all samples
        return tune.epochs * m * _TRAIN_COST / _rate(config.clip, dev)
    if name == "predict":
        return todo / _rate(config.clip, dev)
    if name == "pseudo_labels":
        return todo * config.crop.grid**2 / _rate(config.clip, dev)
    if name == "classifier":
        return 1.0 + n * 1e-4
    return {"refine": 1.0 + n * 1e-3, "evaluate": 1.0, "review": 0.5}.get(name, 2.0 + n * 5e-3)


def _first_run_steps(config) -> list[str]:
    if isinstance(config, MultiLabelConfig):
        names = ["embeddings:clip"] + (["embeddings:dino"] if config.dino is not None else [])
        return names + ["pseudo_labels", "classifier"] + (["evaluate"] if config.gt_field else [])
    names = ["embeddings:clip", "embeddings:dino", "zeroshot", "dino_labeler"]
    names += [] if config.skip_tuning else ["prompt_tuning", "predict"]
    names += ["refine"] if config.refine is not None else []
    return names + (["evaluate"] if config.gt_field else [])


def _planned_rows(samples, classes, config, new: int) -> list[dict]:
    """The planner's steps; files of the folder not imported yet are work for every per-sample step."""
    from fiftyone_nola.stages import plan as planner

    if samples is None or len(samples) == 0:
        return [
            {"stage": s, "action": planner.RUN, "samples": new, "why": "a new dataset"}
            for s in _first_run_steps(config)
        ]
    if isinstance(config, MultiLabelConfig):
        rows = planner.plan_multilabel(samples, classes, config).rows()
    else:
        rows = planner.plan_auto_label(samples, classes, config, resolve_device(config.device)).rows()
    for row in rows:
        if new > 0 and row["stage"] not in ("review", "evaluate") and not row["stage"].startswith("app:"):
            row["samples"] += new
            row["action"] = "run" if row["action"] == "reuse" else row["action"]
            row["why"] = f"{new} files not imported yet" + (f"; {row['why']}" if row["action"] != "run" else "")
    return rows


def plan_auto_label(target: Target, classes, config, n: int, disk: int) -> dict:
    """The steps ``auto_label`` (or ``auto_label_multilabel`` for a ``MultiLabelConfig``) would take
    on ``target``, from the re-run planner, with time and disk estimates."""
    samples = target.samples
    new = n - (len(samples) if samples is not None else 0)
    stages = []
    for row in _planned_rows(samples, classes, config, new):
        stages.append({**row, "seconds": float(_seconds(row, config, classes, n, config.device)), "detail": row["why"]})
    plan = {"samples": n, "new_samples": max(new, 0), "classes": len(classes or []), "stages": stages}
    _finish_plan(plan, config.device, disk)
    return plan


def _finish_plan(plan: dict, device, disk: int) -> None:

    try:
        prof = hardware_profile(resolve_device(device))
        plan["hardware"] = prof.describe()
    except Exception as e:  # the plan is still useful without a hardware line
        logger.debug("plan: hardware not profiled (%s)", e)
        plan["hardware"] = "unknown"
    plan["seconds"] = float(sum(s["seconds"] for s in plan["stages"]))
    plan["disk_bytes"] = int(disk)
    plan["storage"] = str(nola_home())
