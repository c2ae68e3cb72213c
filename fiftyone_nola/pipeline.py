"""One call from class names to labels: ``auto_label`` (NoLA) and ``auto_label_multilabel`` (CDUL).

Stages whose stored outputs are present and were made with the same settings are reused, so
re-running after an interruption (or after adding images) only does the missing work.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from fiftyone_nola.core.classes import ClassesArg, resolve_classes
from fiftyone_nola.core.device import hardware_profile, resolve, resolve_device
from fiftyone_nola.core.embed import EmbedConfig
from fiftyone_nola.core.models import ClipSpec, DinoSpec
from fiftyone_nola.core.progress import ProgressFn, StageTimer, null_progress
from fiftyone_nola.stages import fo_io, runs
from fiftyone_nola.stages.embeddings import compute_embeddings
from fiftyone_nola.stages.nola import (
    ZeroShotConfig,
    dino_labels,
    dino_labels_apply,
    predict,
    tune_prompts,
    zero_shot,
)

Log = Callable[[str], None]

def random_init_banner(clip: Optional[ClipSpec] = None, dino: Optional[DinoSpec] = None) -> str:
    """The loud warning printed around runs on random weights, naming where real weights go."""
    from fiftyone_nola.core.models import concrete_dino, models_dir

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
    templates: str = "auto"  # template set added to descriptions (templates.py; official per dataset)
    include_templates: bool = True
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
    app_ready: bool = True  # class list + Brain similarity/map on the stored vectors, for the App


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
    from fiftyone_nola.stages.evaluation import evaluate_single_label

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

    ids, paths = fo_io.ids_and_paths(samples)
    changed = set().union(*(_embed_todo(samples, spec, ids, paths) for spec in (config.clip, config.dino)))
    with timer.stage("embeddings"):
        out["stages"]["embeddings"] = compute_embeddings(
            samples, "both", config.clip, config.dino, dataclasses.replace(config.embed, device=config.device),
            progress=progress, log=log,
        )
    plan = _decide(samples, classes, config, ids, changed, device, log)
    processed = {f"embeddings:{k}": v["embedded"] for k, v in out["stages"]["embeddings"].items()}

    with timer.stage("zeroshot"):
        todo = plan.zeroshot
        if todo:
            out["stages"]["zeroshot"] = zero_shot(_subset(samples, ids, todo), classes, plan.zs_cfg,
                                                  config.zeroshot_field, progress=progress, log=log)
        else:
            log("[zeroshot] up to date: reused")
        processed["zeroshot"] = len(todo)

    with timer.stage("dino_labeler"):
        todo = plan.dino_labeler
        if plan.retrain_labeler:
            out["stages"]["dino_labeler"] = dino_labels(samples, config.zeroshot_field, config.dino, plan.dl_cfg,
                                                        config.dino_field, progress=progress, log=log)
        elif todo:
            log(f"[dino] labeller up to date: labelling the {len(todo)} new or changed samples with it")
            out["stages"]["dino_labeler"] = dino_labels_apply(_subset(samples, ids, todo), config.zeroshot_field,
                                                              config.dino, config.dino_field, log=log)
        else:
            log("[dino] up to date: reused")
        processed["dino_labeler"] = len(todo)

    if config.tune:
        tune_cfg = plan.tune_cfg
        log(f"[tune] settings for this machine: epochs={tune_cfg.epochs}, batch={tune_cfg.batch_size}, "
            f"max_samples={tune_cfg.max_samples}")
        with timer.stage("prompt_tuning"):
            if plan.retrain_tuning:
                out["stages"]["prompt_tuning"] = tune_prompts(
                    samples, config.zeroshot_field, config.dino_field, config.clip, tune_cfg,
                    run_name=config.tuned_field, progress=progress, log=log,
                )
            else:
                log(f"[tune] tuned model up to date (same teacher, CLIP and settings): reused {plan.model_dir}")
                out["stages"]["prompt_tuning"] = {"stage": "tune", "model_dir": str(plan.model_dir),
                                                  "reused": True}
            processed["prompt_tuning"] = int(bool(plan.retrain_tuning))
        with timer.stage("predict"):
            todo = plan.predict
            if todo:
                out["stages"]["predict"] = predict(
                    _subset(samples, ids, todo), out["stages"]["prompt_tuning"]["model_dir"], config.clip,
                    config.tuned_field, device=config.device, progress=progress, log=log,
                )
            else:
                log("[predict] up to date (same tuned model, every sample labelled): reused")
            processed["predict"] = len(todo)
    if config.app_ready:
        out["app"] = prepare_for_review(samples, classes, log)
    out["processed"] = processed
    log("[auto-label] processed per stage: " + ", ".join(f"{k} {v}" for k, v in processed.items()))

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


def prepare_for_review(samples, classes, log: Log = print) -> dict:
    """What the App needs to review right away: the class list on the dataset (dropdowns, a label
    schema for corrections) and Brain runs on the stored vectors (similarity search, map)."""
    from fiftyone_nola.stages.brain_runs import register_brain_runs
    from fiftyone_nola.stages.review_workspace import store_class_list

    store_class_list(samples, classes)
    out = {}
    for family in ("clip", "dino"):
        try:
            out[family] = register_brain_runs(samples, family, log=log)
        except Exception as e:  # the labels are done; the App extras must never fail the run
            log(f"[brain] {family}: could not register the App's similarity/map runs: {e}")
    return out


def _zs_config(config: AutoLabelConfig) -> ZeroShotConfig:
    return ZeroShotConfig(clip=config.clip, descriptions_file=config.descriptions_file,
                          use_llm=config.use_llm, llm_model=config.llm_model,
                          llm_host=config.llm_host, device=config.device,
                          templates=config.templates, include_templates=config.include_templates,
                          max_descriptions_per_class=config.max_descriptions_per_class)


def _tune_config(config: AutoLabelConfig, device, log: Optional[Log] = None):
    from fiftyone_nola.core import prompt_tuning as pt

    overrides = {"epochs": config.tune_epochs, "batch_size": config.tune_batch_size}
    tune_cfg = pt.TuneConfig(**{k: v for k, v in overrides.items() if v})
    if config.tune_max_samples != -1:
        # None means all samples here; TuneConfig spells that ALL_SAMPLES (its None fits the hardware).
        cap = config.tune_max_samples
        tune_cfg = dataclasses.replace(tune_cfg, max_samples=pt.ALL_SAMPLES if cap is None else cap)
    return resolve(tune_cfg, device)


def _subset(samples, ids: list, todo: list):
    """``samples`` itself when every sample is to be processed, else a view of ``todo``."""
    return samples if len(todo) == len(ids) else fo_io.root_dataset(samples).select(todo, ordered=True)


def _embed_todo(samples, spec, ids: list, paths: list) -> set:
    """Ids the embedding stage of ``spec`` will (re-)embed: new samples or changed files."""
    from fiftyone_nola.core.data import file_fingerprint
    from fiftyone_nola.core.index import EmbeddingIndex
    from fiftyone_nola.stages.embeddings import index_path

    path = Path(index_path(samples, spec))
    if not (path / "meta.json").exists():
        return set(ids)
    try:
        known = EmbeddingIndex.open(path).fingerprints
    except Exception:  # a store that does not open is rebuilt by the stage
        return set(ids)
    return {i for i, p in zip(ids, paths) if known.get(i) != file_fingerprint(p)}


@dataclass
class _Plan:
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


def _decide(samples, classes, config: AutoLabelConfig, ids: list, changed: set, device,
            log: Optional[Log] = None) -> _Plan:
    from fiftyone_nola.core import dino_labeler as dl
    from fiftyone_nola.stages.artifacts import stage_dir

    zs_cfg = _zs_config(config)
    zs_full = (config.force or not _up_to_date(samples, runs.run_key_for(config.zeroshot_field), zs_cfg)
               or _stored_classes(samples, config.zeroshot_field) != classes)
    zs_todo = list(ids) if zs_full else _missing(samples, config.zeroshot_field, ids, changed)
    dl_cfg = dl.DinoLabelerConfig(device=config.device)
    dl_full = (zs_full or not _up_to_date(samples, runs.run_key_for(config.dino_field), _dino_run_config(dl_cfg, config))
               or not (stage_dir(samples, config.dino_field) / "labeler").is_file())
    dl_todo = list(ids) if dl_full else sorted(set(_missing(samples, config.dino_field, ids, changed)) | set(zs_todo))
    tune_cfg = model_dir = None
    tune_full, pred_todo = False, []
    if config.tune:
        tune_cfg = _tune_config(config, device, log)
        model_dir = stage_dir(samples, f"{config.tuned_field}_model")
        tune_run = {"tune": tune_cfg, "clip": config.clip, "teacher_field": config.dino_field}
        tune_full = (dl_full or config.force or not (model_dir / "meta.json").is_file()
                     or not _up_to_date(samples, runs.run_key_for(f"{config.tuned_field}_model"), tune_run))
        pred_full = tune_full or not _predict_up_to_date(samples, config.tuned_field, model_dir)
        pred_todo = list(ids) if pred_full else _missing(samples, config.tuned_field, ids, changed)
    return _Plan(zs_todo, dl_todo, pred_todo, dl_full, tune_full, zs_cfg, dl_cfg, tune_cfg, model_dir)


def _missing(samples, field_: str, ids: list, changed: set) -> list:
    """Ids with no stored row in the stage of ``field_``, or whose image changed."""
    from fiftyone_nola.stages.artifacts import stage_dir, stored_ids

    have = stored_ids(stage_dir(samples, field_))
    return [i for i in ids if i not in have or i in changed]


def _predict_up_to_date(samples, field_: str, model_dir: Path) -> bool:
    from fiftyone_nola.core.storage import read_json

    run = runs.get_run(samples, runs.run_key_for(field_))
    if run is None or not (model_dir / "meta.json").is_file():
        return False
    model_id = read_json(model_dir / "meta.json").get("model_id")
    return model_id is not None and (run.get("config") or {}).get("model_id") == model_id


def plan_stages(samples, classes, config: AutoLabelConfig, extra_new: int = 0) -> tuple[dict, dict]:
    """``(samples to process per stage, retrain flags)`` ``auto_label`` would use now; reads only.

    ``extra_new``: samples not in ``samples`` yet (a folder's new files) that every stage will process.
    """
    from fiftyone_nola.core.device import resolve_device

    ids, paths = fo_io.ids_and_paths(samples)
    emb = {spec.family: _embed_todo(samples, spec, ids, paths) for spec in (config.clip, config.dino)}
    plan = _decide(samples, classes, config, ids, emb["clip"] | emb["dino"], resolve_device(config.device))
    todo = {"clip": len(emb["clip"]), "dino": len(emb["dino"]), "zeroshot": len(plan.zeroshot),
            "dino_labeler": len(plan.dino_labeler), "predict": len(plan.predict)}
    todo = {k: v + max(extra_new, 0) for k, v in todo.items()}
    return todo, {"dino_labeler": plan.retrain_labeler, "prompt_tuning": plan.retrain_tuning}


def check_inputs(samples, classes, config: AutoLabelConfig, log: Log = print) -> None:
    """The validation pass of ``auto_label``: raise one ValidationError listing every problem."""
    from fiftyone_nola.stages.validation import Target, check_auto_label

    report = check_auto_label(Target(samples=samples), classes, config)
    for w in report.warnings:
        log(f"[check] {w.render()}")
    report.raise_for_errors()


def _dino_run_config(dl_cfg, config: AutoLabelConfig) -> dict:
    return {"labeler": dl_cfg, "dino": config.dino, "zeroshot_field": config.zeroshot_field,
            "trusted_field": None}


def _stored_classes(samples, zeroshot_field: str):
    from fiftyone_nola.core.storage import read_json
    from fiftyone_nola.stages.artifacts import stage_dir

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
