"""One call from class names to labels: ``auto_label`` (NoLA) and ``auto_label_multilabel`` (CDUL).

Stages whose stored outputs are present and were made with the same settings are reused, so
re-running after an interruption (or after adding images) only does the missing work.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from typing import Optional

from fiftyone_nola.core.classes import ClassesArg, resolve_classes
from fiftyone_nola.core.device import hardware_profile, resolve_device
from fiftyone_nola.core.dino_labeler import DinoLabelerConfig
from fiftyone_nola.core.embed import EmbedConfig
from fiftyone_nola.core.models import ClipSpec, DinoSpec, concrete_dino, models_dir
from fiftyone_nola.core.progress import ProgressFn, StageTimer, null_progress
from fiftyone_nola.core.prompt_tuning import TuneConfig
from fiftyone_nola.stages import fo_io, reuse, review, runs
from fiftyone_nola.stages.artifacts import stage_dir
from fiftyone_nola.stages.brain_runs import register_brain_runs
from fiftyone_nola.stages.cdul import (
    MultiLabelConfig,
    apply_multilabel,
    evaluate_multilabel_stages,
    feature_specs,
    multilabel_pseudo_labels,
    recorded_config,
    train_multilabel,
)
from fiftyone_nola.stages.embeddings import compute_embeddings
from fiftyone_nola.stages.evaluation import evaluate_single_label
from fiftyone_nola.stages.jobs import dataset_job
from fiftyone_nola.stages.nola import (
    PredictConfig,
    ZeroShotConfig,
    dino_labels,
    dino_labels_apply,
    predict,
    tune_prompts,
    zero_shot,
)
from fiftyone_nola.stages.review import store_class_list
from fiftyone_nola.stages.validation import Report, Target, check_auto_label, check_multilabel

logger = logging.getLogger(__name__)


def random_init_banner(clip: Optional[ClipSpec] = None, dino: Optional[DinoSpec] = None) -> str:
    """The loud warning printed around runs on random weights, naming where real weights go."""
    clip = clip or ClipSpec()
    dino = concrete_dino(dino or DinoSpec())
    root = models_dir(clip.models_dir)
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
    """Settings of the whole single-label pipeline; each stage's own config is nested.

    Fields left ``None`` fit the hardware (``core.config.resolve``); ``clip`` and ``device``
    apply to every stage, so the stage configs' own ``clip``/``device`` are not read here.
    """

    clip: ClipSpec = field(default_factory=ClipSpec)
    dino: DinoSpec = field(default_factory=DinoSpec)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    zeroshot: ZeroShotConfig = field(default_factory=ZeroShotConfig)
    dino_labeler: DinoLabelerConfig = field(default_factory=DinoLabelerConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    predict: PredictConfig = field(default_factory=PredictConfig)
    skip_tuning: bool = False  # stop after the DINO labeller
    device: Optional[str] = None
    allow_template_fallback: bool = False  # classes the descriptions file lacks get CLIP templates
    zeroshot_field: str = "nola_zeroshot"
    dino_field: str = "nola_dino"
    tuned_field: str = "nola"
    gt_field: Optional[str] = None  # evaluation only
    force: bool = False  # recompute every stage even if its outputs are up to date
    app_ready: bool = True  # class list + Brain similarity/map on the stored vectors, for the App


def auto_label(
    samples, classes: ClassesArg = None, config: Optional[AutoLabelConfig] = None, progress: ProgressFn = null_progress
) -> dict:
    """Run embeddings -> CDE zero-shot -> DINO labeller -> prompt tuning -> predict.

    Returns a summary with each stage's result, per-stage seconds and, when ``gt_field`` is
    given, the accuracy of every stage (ground truth is read only for this evaluation).
    Another job on the dataset is waited for (``NOLA_JOB_WAIT_S``) and its work reused.
    """
    with dataset_job(samples, "auto-label", progress=progress):
        return _auto_label(samples, classes, config, progress)


def _auto_label(samples, classes: ClassesArg, config: Optional[AutoLabelConfig], progress: ProgressFn) -> dict:
    config = config or AutoLabelConfig()
    check_inputs(samples, classes, config)
    classes = resolve_classes(classes, samples)
    device = resolve_device(config.device)
    prof = hardware_profile(device)
    logger.info(f"[auto-label] {len(samples)} samples, {len(classes)} classes; {prof.describe()}")
    if config.clip.random_init or config.dino.random_init:
        logger.info(random_init_banner(config.clip, config.dino))
    timer = StageTimer(echo=logger.info)
    out: dict = {"classes": classes, "stages": {}, "hardware": dataclasses.asdict(prof)}

    ids, paths = fo_io.ids_and_paths(samples)
    changed = set().union(*(reuse.embed_todo(samples, spec, ids, paths) for spec in (config.clip, config.dino)))
    with timer.stage("embeddings"):
        out["stages"]["embeddings"] = compute_embeddings(
            samples,
            "both",
            config.clip,
            config.dino,
            dataclasses.replace(config.embed, device=str(device)),
            progress=progress,
        )
    plan = reuse.decide(samples, classes, config, ids, changed, device)
    processed = {f"embeddings:{k}": v["embedded"] for k, v in out["stages"]["embeddings"].items()}

    with timer.stage("zeroshot"):
        todo = plan.zeroshot
        if todo:
            out["stages"]["zeroshot"] = zero_shot(
                reuse.subset(samples, ids, todo), classes, plan.zs_cfg, config.zeroshot_field, progress=progress
            )
        else:
            logger.info("[zeroshot] up to date: reused")
        processed["zeroshot"] = len(todo)

    with timer.stage("dino_labeler"):
        todo = plan.dino_labeler
        if plan.retrain_labeler:
            out["stages"]["dino_labeler"] = dino_labels(
                samples, config.zeroshot_field, config.dino, plan.dl_cfg, config.dino_field, progress=progress
            )
        elif todo:
            logger.info(f"[dino] labeller up to date: labelling the {len(todo)} new or changed samples with it")
            out["stages"]["dino_labeler"] = dino_labels_apply(
                reuse.subset(samples, ids, todo), config.zeroshot_field, config.dino, config.dino_field
            )
        else:
            logger.info("[dino] up to date: reused")
        processed["dino_labeler"] = len(todo)

    if not config.skip_tuning:
        tune_cfg = plan.tune_cfg
        logger.info(
            f"[tune] settings for this machine: epochs={tune_cfg.epochs}, "
            f"batch={tune_cfg.batch_size}, max_samples={tune_cfg.max_samples}"
        )
        with timer.stage("prompt_tuning"):
            if plan.retrain_tuning:
                out["stages"]["prompt_tuning"] = tune_prompts(
                    samples,
                    config.zeroshot_field,
                    config.dino_field,
                    config.clip,
                    tune_cfg,
                    run_name=config.tuned_field,
                    progress=progress,
                )
            else:
                logger.info(f"[tune] tuned model up to date (same teacher, CLIP and settings): reused {plan.model_dir}")
                out["stages"]["prompt_tuning"] = {
                    "stage": "tune",
                    "field": None,
                    "samples": len(ids),
                    "seconds": 0.0,
                    "model_dir": str(plan.model_dir),
                    "reused": True,
                }
            processed["prompt_tuning"] = int(bool(plan.retrain_tuning))
        with timer.stage("predict"):
            todo = plan.predict
            if todo:
                out["stages"]["predict"] = predict(
                    reuse.subset(samples, ids, todo),
                    out["stages"]["prompt_tuning"]["model_dir"],
                    config.clip,
                    config.tuned_field,
                    config=config.predict,
                    device=str(device),
                    progress=progress,
                )
            else:
                logger.info("[predict] up to date (same tuned model, every sample labelled): reused")
            processed["predict"] = len(todo)
    if config.app_ready:
        out["app"] = prepare_for_review(
            samples, classes, config.dino_field if config.skip_tuning else config.tuned_field
        )
    out["processed"] = processed
    logger.info("[auto-label] processed per stage: " + ", ".join(f"{k} {v}" for k, v in processed.items()))

    if config.gt_field:
        with timer.stage("evaluate"):
            out["evaluation"] = _evaluate(samples, config)
    out["seconds_per_stage"] = timer.seconds
    out["random_init"] = bool(config.clip.random_init or config.dino.random_init)
    return out


def auto_label_multilabel(
    samples, classes: ClassesArg = None, config: Optional[MultiLabelConfig] = None, progress: ProgressFn = null_progress
) -> dict:
    """Embeddings -> CDUL pseudo-labels -> classifier with label refinement (-> mAP if GT).
    Another job on the dataset is waited for (``NOLA_JOB_WAIT_S``) and its work reused."""
    with dataset_job(samples, "auto-label-multilabel", progress=progress):
        return _auto_label_multilabel(samples, classes, config, progress)


def _auto_label_multilabel(
    samples, classes: ClassesArg, config: Optional[MultiLabelConfig], progress: ProgressFn
) -> dict:
    config = config or MultiLabelConfig()
    report = check_multilabel(Target(samples=samples), classes, config)
    for w in report.warnings:
        logger.info(f"[check] {w.render()}")
    report.raise_for_errors()
    classes = resolve_classes(classes, samples)
    timer = StageTimer(echo=logger.info)
    out: dict = {"classes": classes, "stages": {}}
    ids, paths = fo_io.ids_and_paths(samples)
    specs = feature_specs(config)
    changed = set().union(*(reuse.embed_todo(samples, s, ids, paths) for s in specs))
    with timer.stage("embeddings"):
        families = "both" if config.dino is not None else "clip"
        out["stages"]["embeddings"] = compute_embeddings(
            samples,
            families,
            config.clip,
            config.dino,
            dataclasses.replace(config.embed, device=config.device),
            progress=progress,
        )
    processed = {f"embeddings:{k}": v["embedded"] for k, v in out["stages"]["embeddings"].items()}
    # Same rule as auto_label: redo a stage for every sample when its settings or class list
    # changed, else only for samples it has no row for (or whose image changed); the head is
    # retrained only when every pseudo-label was redone, and labels new samples otherwise.
    pseudo_full = (
        not reuse.up_to_date(samples, runs.run_key_for(config.pseudo_field), recorded_config(config))
        or reuse.stored_classes(samples, config.pseudo_field) != classes
    )
    todo = list(ids) if pseudo_full else reuse.missing(samples, config.pseudo_field, ids, changed)
    with timer.stage("pseudo_labels"):
        if todo:
            out["stages"]["pseudo_labels"] = multilabel_pseudo_labels(
                reuse.subset(samples, ids, todo), classes, config, progress
            )
        else:
            logger.info("[cdul] pseudo-labels up to date: reused")
        processed["pseudo_labels"] = len(todo)
    head = stage_dir(samples, config.pred_field) / "classifier.pt"
    train_full = pseudo_full or not head.is_file() or runs.get_run(samples, runs.run_key_for(config.pred_field)) is None
    todo = list(ids) if train_full else sorted(set(reuse.missing(samples, config.pred_field, ids, changed)) | set(todo))
    with timer.stage("classifier"):
        if train_full:
            out["stages"]["classifier"] = train_multilabel(samples, config, progress)
        elif todo:
            out["stages"]["classifier"] = apply_multilabel(reuse.subset(samples, ids, todo), config)
        else:
            logger.info("[cdul] classifier up to date: reused")
        processed["classifier"] = len(todo)
    out["processed"] = processed
    if config.gt_field:
        with timer.stage("evaluate"):
            out["evaluation"] = evaluate_multilabel_stages(samples, config)
    out["seconds_per_stage"] = timer.seconds
    out["random_init"] = bool(config.clip.random_init)
    return out


def _evaluate(samples, config: AutoLabelConfig) -> dict:
    """Accuracy of every labelled field against ``config.gt_field``."""
    out = {}
    fields = [config.zeroshot_field, config.dino_field] + ([] if config.skip_tuning else [config.tuned_field])
    for f in fields:
        out[f] = evaluate_single_label(samples, f, config.gt_field)
        logger.info(f"[evaluate] {f}: accuracy {out[f]['accuracy']:.4f} vs '{config.gt_field}'")
    return out


def prepare_for_review(samples, classes, field: Optional[str] = None) -> dict:
    """What the App needs to review right away: the class list on the dataset (dropdowns, a label
    schema for corrections), Brain runs on the stored vectors (similarity search, map) and, with
    ``field``, its doubtful samples flagged at the review's threshold (the stored one, else the
    default), so the queue is ready when the App opens."""
    store_class_list(samples, classes)
    out = {}
    if field is not None:
        ds = fo_io.root_dataset(samples)
        prev = review.settings(ds)
        same = prev.get("field") in (None, field)
        s = review.flag_samples(
            ds,
            field,
            threshold=prev.get("threshold", review.DEFAULT_THRESHOLD) if same else review.DEFAULT_THRESHOLD,
            bottom_k=prev.get("bottom_k") if same else None,
        )
        out["review"] = {k: s[k] for k in ("field", "threshold", "flagged", "queue")}
    for family in ("clip", "dino"):
        try:
            out[family] = register_brain_runs(samples, family)
        except Exception as e:  # the labels are done; the App extras must never fail the run
            logger.info(f"[brain] {family}: could not register the App's similarity/map runs: {e}")
    return out


def check_inputs(samples, classes, config: AutoLabelConfig) -> None:
    """The validation pass of ``auto_label``: raise one ValidationError listing every problem."""
    report = check_auto_label(Target(samples=samples), classes, config)
    for w in report.warnings:
        logger.info(f"[check] {w.render()}")
    report.raise_for_errors()


def validate(
    samples,
    classes=None,
    config=None,
    *,
    plan: bool = True,
    raise_on_error: bool = False,
    fallback_random_init: bool = False,
) -> Report:
    """Check every input of ``auto_label`` (or ``auto_label_multilabel`` for a ``MultiLabelConfig``)
    without running or writing anything; log (INFO) and return the report with the plan.

    ``samples`` may be a dataset, a view, or a folder of images (not imported).
    """
    target = Target(images_dir=str(samples)) if isinstance(samples, (str, os.PathLike)) else Target(samples=samples)
    config = config or AutoLabelConfig()
    if isinstance(config, MultiLabelConfig):
        report = check_multilabel(target, classes, config, fallback_random_init, plan=plan)
    else:
        report = check_auto_label(target, classes, config, fallback_random_init, plan=plan)
    for line in report.lines():
        logger.info(line)
    if raise_on_error:
        report.raise_for_errors()
    return report


def summary_lines(summary: dict) -> list[str]:
    """Human-readable lines of an auto_label summary (CLI and operators print these)."""
    lines = [f"classes: {len(summary['classes'])}"]
    for name, secs in summary.get("seconds_per_stage", {}).items():
        lines.append(f"  {name:<14} {secs:8.1f} s")
    for f, ev in (summary.get("evaluation") or {}).items():
        lines.append(
            f"  accuracy {f:<14} {ev['accuracy']:.4f}"
            + ("  (random weights: meaningless)" if summary.get("random_init") else "")
        )
    return lines


__all__ = ["AutoLabelConfig", "auto_label", "random_init_banner", "summary_lines", "validate"]
