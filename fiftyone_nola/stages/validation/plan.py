"""The plan of a job: stages to run or reuse, estimated time and disk (advice only)."""

from __future__ import annotations

from fiftyone_nola.core.config import resolve
from fiftyone_nola.core.device import hardware_profile, resolve_device
from fiftyone_nola.core.models import ClipSpec, concrete_dino
from fiftyone_nola.core.storage import nola_home
from fiftyone_nola.stages.reuse import plan_stages
from fiftyone_nola.stages.validation.target import Target

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
    except Exception:
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
        except Exception:
            return 512
    name = concrete_dino(spec).name
    return {"tiny": 48, "S": 384, "B": 768, "L": 1024, "H": 1280, "g": 1536}[_size_class(name)]


def _disk_needed(config, n: int, n_classes: int) -> int:
    """Bytes the stores of a run will hold: vectors + ids/fingerprints, and the stage arrays."""
    per_vec = 4 * (_embed_dim(config.clip) + _embed_dim(config.dino)) + 2 * 80
    stage_rows = 4 * max(n_classes, 1) * 4 + 64
    tuned = 0 if config.skip_tuning else 40 << 20
    return int(n * (per_vec + stage_rows) + tuned)


def _stage(name: str, action: str, todo: int, seconds: float, detail: str = "") -> dict:
    return {"stage": name, "action": action, "samples": int(todo), "seconds": float(seconds), "detail": detail}


def plan_auto_label(target: Target, classes, config, n: int, disk: int) -> dict:
    """Stages ``auto_label`` would run or reuse on ``target``, with time and disk estimates."""
    samples = target.samples
    new = n - (len(samples) if samples is not None else 0)
    if samples is None or len(samples) == 0:
        todo = {s: n for s in ("clip", "dino", "zeroshot", "dino_labeler", "predict")}
        retrain = {"dino_labeler": True, "prompt_tuning": True}
    else:
        todo, retrain = plan_stages(samples, classes, config, extra_new=new)
    dev = config.device
    stages = [
        _stage(f"embeddings:{fam}", "run" if todo[fam] else "reuse", todo[fam], _embed_seconds(spec, todo[fam], dev))
        for fam, spec in (("clip", config.clip), ("dino", config.dino))
    ]
    stages.append(
        _stage(
            "zeroshot",
            "run" if todo["zeroshot"] else "reuse",
            todo["zeroshot"],
            0.05
            + todo["zeroshot"] * 1e-4
            + (len(classes or []) * 90 / (10 * _rate(config.clip, dev)) if todo["zeroshot"] == n and n else 0.0),
            "texts encoded once, then cached",
        )
    )
    stages.append(
        _stage(
            "dino_labeler",
            "train+label" if retrain["dino_labeler"] else ("label new" if todo["dino_labeler"] else "reuse"),
            todo["dino_labeler"],
            (2.0 if retrain["dino_labeler"] else 0.0) + todo["dino_labeler"] * 3e-3,
        )
    )
    if not config.skip_tuning:
        try:
            tune = resolve(config.tune, dev)
        except Exception:
            tune = resolve(config.tune)
        epochs, cap = tune.epochs, tune.max_samples or None  # 0: all samples
        m = min(n, cap) if cap else n
        stages.append(
            _stage(
                "prompt_tuning",
                "train" if retrain["prompt_tuning"] else "reuse",
                m if retrain["prompt_tuning"] else 0,
                epochs * m * _TRAIN_COST / _rate(config.clip, dev) if retrain["prompt_tuning"] else 0.0,
                f"{epochs} epochs on <= {m} samples",
            )
        )
        stages.append(
            _stage(
                "predict",
                "run" if todo["predict"] else "reuse",
                todo["predict"],
                todo["predict"] / _rate(config.clip, dev),
            )
        )
    if config.gt_field:
        stages.append(_stage("evaluate", "run", n, 1.0))
    plan = {"samples": n, "new_samples": max(new, 0), "classes": len(classes or []), "stages": stages}
    _finish_plan(plan, dev, disk)
    return plan


def _finish_plan(plan: dict, device, disk: int) -> None:

    try:
        prof = hardware_profile(resolve_device(device))
        plan["hardware"] = prof.describe()
    except Exception:
        plan["hardware"] = "unknown"
    plan["seconds"] = float(sum(s["seconds"] for s in plan["stages"]))
    plan["disk_bytes"] = int(disk)
    plan["storage"] = str(nola_home())
