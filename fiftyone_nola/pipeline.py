"""One call from class names to labels: ``auto_label`` (NoLA) and ``auto_label_multilabel`` (CDUL).

Stages whose stored outputs are present and were made with the same settings are reused, so
re-running after an interruption (or after adding images) only does the missing work.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Callable, Optional

from . import runs
from .classes import ClassesArg, resolve_classes
from .device import hardware_profile, resolve_device
from .embed import EmbedConfig
from .embeddings import compute_embeddings
from .labeling import ZeroShotConfig, dino_labels, predict, tune_prompts, zero_shot
from .models import ClipSpec, DinoSpec
from .progress import ProgressFn, StageTimer, null_progress

Log = Callable[[str], None]

def random_init_banner(clip: Optional[ClipSpec] = None, dino: Optional[DinoSpec] = None) -> str:
    """The loud warning printed around runs on random weights, naming where real weights go."""
    from .models import concrete_dino, models_dir

    clip = clip or ClipSpec()
    dino = concrete_dino(dino or DinoSpec())
    root = models_dir()
    bar = "!" * 78
    return (
        f"\n{bar}\n"
        "!! RANDOMLY INITIALISED MODELS: the labels written by this run are MEANINGLESS.\n"
        "!! It exercises the whole pipeline only. For real labels provide weights:\n"
        f"!!   CLIP: {root}/clip/{clip.arch}/{clip.pretrained or 'openai'}.pt\n"
        f"!!   DINO: {root}/dino/{dino.name}.safetensors\n"
        "!! (or NOLA_MODELS_DIR=..., or run once with internet access).\n"
        f"{bar}\n"
    )


@dataclass
class AutoLabelConfig:
    """Settings of the whole single-label pipeline; each stage's own config is nested."""

    clip: ClipSpec = field(default_factory=ClipSpec)
    dino: DinoSpec = field(default_factory=DinoSpec)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    descriptions_file: Optional[str] = None
    allow_template_fallback: bool = False  # classes the descriptions file lacks get CLIP templates
    use_llm: bool = False
    llm_model: str = "llama3.2"
    llm_host: Optional[str] = None
    include_templates: bool = True  # CDE averages descriptions and CLIP's 80 templates (NoLA)
    max_descriptions_per_class: Optional[int] = None
    tune: bool = True
    tune_epochs: Optional[int] = None  # None: fit the hardware (paper's 50 on GPU, few on CPU)
    tune_max_samples: Optional[int] = -1  # -1: fit the hardware; None: all samples
    tune_batch_size: Optional[int] = None
    device: Optional[str] = None
    zeroshot_field: str = "nola_zeroshot"
    dino_field: str = "nola_dino"
    tuned_field: str = "nola"
    gt_field: Optional[str] = None  # evaluation only
    force: bool = False  # recompute every stage even if its outputs are up to date


def _stage_config_json(obj) -> str:
    return json.dumps(runs._jsonable(obj), sort_keys=True)


def _up_to_date(samples, key: str, config) -> bool:
    run = runs.get_run(samples, key)
    return run is not None and json.dumps(run.get("config"), sort_keys=True) == _stage_config_json(config)


def auto_label(
    samples,
    classes: ClassesArg = None,
    config: Optional[AutoLabelConfig] = None,
    progress: ProgressFn = null_progress,
    log: Log = print,
) -> dict:
    """Run embeddings -> CDE zero-shot -> DINO labeller -> prompt tuning -> predict.

    Returns a summary with each stage's result, per-stage seconds and, when ``gt_field`` is
    given, the accuracy of every stage (ground truth is read only for this evaluation).
    """
    from . import dino_labeler as dl
    from . import prompt_tuning as pt
    from .evaluation import evaluate_single_label

    config = config or AutoLabelConfig()
    check_inputs(samples, classes, config, log)
    classes = resolve_classes(classes, samples)
    device = resolve_device(config.device)
    prof = hardware_profile(device)
    log(f"[auto-label] {len(samples)} samples, {len(classes)} classes; {prof.describe()}")
    if config.clip.random_init or config.dino.random_init:
        log(random_init_banner(config.clip, config.dino))
    timer = StageTimer(echo=log)
    out: dict = {"classes": classes, "stages": {}, "hardware": dataclasses.asdict(prof)}

    with timer.stage("embeddings"):
        out["stages"]["embeddings"] = compute_embeddings(
            samples, "both", config.clip, config.dino, dataclasses.replace(config.embed, device=config.device),
            progress=progress, log=log,
        )

    zs_cfg = ZeroShotConfig(clip=config.clip, descriptions_file=config.descriptions_file,
                            use_llm=config.use_llm, llm_model=config.llm_model,
                            llm_host=config.llm_host, device=config.device,
                            include_templates=config.include_templates,
                            max_descriptions_per_class=config.max_descriptions_per_class)
    zs_key = runs.run_key_for(config.zeroshot_field)
    embedded_now = any(s["embedded"] for s in out["stages"]["embeddings"].values())
    fresh = config.force or embedded_now or not _up_to_date(samples, zs_key, zs_cfg) \
        or _stored_classes(samples, config.zeroshot_field) != classes
    with timer.stage("zeroshot"):
        if fresh:
            out["stages"]["zeroshot"] = zero_shot(samples, classes, zs_cfg, config.zeroshot_field,
                                                  progress=progress, log=log)
        else:
            log("[zeroshot] up to date: reused")

    dl_cfg = dl.DinoLabelerConfig(device=config.device)
    dl_key = runs.run_key_for(config.dino_field)
    with timer.stage("dino_labeler"):
        if fresh or not _up_to_date(samples, dl_key, _dino_run_config(dl_cfg, config)):
            out["stages"]["dino_labeler"] = dino_labels(samples, config.zeroshot_field, config.dino, dl_cfg,
                                                        config.dino_field, progress=progress, log=log)
            fresh = True
        else:
            log("[dino] up to date: reused")

    if config.tune:
        tune_cfg = pt.TuneConfig.for_hardware(device, log=log)
        overrides = {"epochs": config.tune_epochs, "batch_size": config.tune_batch_size}
        tune_cfg = dataclasses.replace(tune_cfg, **{k: v for k, v in overrides.items() if v})
        if config.tune_max_samples != -1:
            tune_cfg = dataclasses.replace(tune_cfg, max_samples=config.tune_max_samples)
        log(f"[tune] settings for this machine: epochs={tune_cfg.epochs}, batch={tune_cfg.batch_size}, "
            f"max_samples={tune_cfg.max_samples}")
        with timer.stage("prompt_tuning"):
            out["stages"]["prompt_tuning"] = tune_prompts(
                samples, config.zeroshot_field, config.dino_field, config.clip, tune_cfg,
                run_name=config.tuned_field, progress=progress, log=log,
            )
        with timer.stage("predict"):
            out["stages"]["predict"] = predict(
                samples, out["stages"]["prompt_tuning"]["model_dir"], config.clip, config.tuned_field,
                device=config.device, progress=progress, log=log,
            )

    if config.gt_field:
        with timer.stage("evaluate"):
            out["evaluation"] = {}
            fields = [config.zeroshot_field, config.dino_field] + ([config.tuned_field] if config.tune else [])
            for f in fields:
                out["evaluation"][f] = evaluate_single_label(samples, f, config.gt_field)
                log(f"[evaluate] {f}: accuracy {out['evaluation'][f]['accuracy']:.4f} "
                    f"vs '{config.gt_field}'")
    out["seconds_per_stage"] = timer.seconds
    out["random_init"] = bool(config.clip.random_init or config.dino.random_init)
    return out


def check_inputs(samples, classes, config: AutoLabelConfig, log: Log = print) -> None:
    """The validation pass of ``auto_label``: raise one ValidationError listing every problem."""
    from .validation import Target, check_auto_label

    report = check_auto_label(Target(samples=samples), classes, config)
    for w in report.warnings:
        log(f"[check] {w.render()}")
    report.raise_for_errors()


def _dino_run_config(dl_cfg, config: AutoLabelConfig) -> dict:
    return {"labeler": dl_cfg, "dino": config.dino, "zeroshot_field": config.zeroshot_field,
            "trusted_field": None}


def _stored_classes(samples, zeroshot_field: str):
    from .artifacts import stage_dir
    from .storage import read_json

    p = stage_dir(samples, zeroshot_field) / "meta.json"
    return read_json(p).get("classes") if p.exists() else None


def summary_lines(summary: dict) -> list[str]:
    """Human-readable lines of an auto_label summary (CLI and operators print these)."""
    lines = [f"classes: {len(summary['classes'])}"]
    for name, secs in summary.get("seconds_per_stage", {}).items():
        lines.append(f"  {name:<14} {secs:8.1f} s")
    for f, ev in (summary.get("evaluation") or {}).items():
        lines.append(f"  accuracy {f:<14} {ev['accuracy']:.4f}" + ("  (random weights: meaningless)"
                                                                  if summary.get("random_init") else ""))
    return lines


__all__ = ["AutoLabelConfig", "auto_label", "random_init_banner", "summary_lines"]
