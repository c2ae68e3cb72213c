"""One call from class names to labels: ``auto_label`` (NoLA) and ``auto_label_multilabel`` (CDUL).

Each is a walk over the re-run plan (:mod:`fiftyone_nola.stages.plan`): steps whose stored outputs
were made with the same settings and inputs are reused and write nothing, so re-running after an
interruption (or after adding images) only does the missing work.
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
from fiftyone_nola.core.transductive import TransductiveConfig
from fiftyone_nola.logs import quiet_libraries
from fiftyone_nola.pipeline_steps import MULTILABEL_STEPS, STEPS, RunContext, flag_for_review
from fiftyone_nola.stages.brain_runs import register_brain_runs
from fiftyone_nola.stages.cdul import MultiLabelConfig
from fiftyone_nola.stages.evaluation import recorded_evaluation
from fiftyone_nola.stages.jobs import dataset_job
from fiftyone_nola.stages.nola import PredictConfig, ZeroShotConfig
from fiftyone_nola.stages.plan import REUSE, plan_auto_label, plan_multilabel
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
    skip_tuning: bool = False  # stop after the DINO labeler
    device: Optional[str] = None
    allow_template_fallback: bool = False  # classes the descriptions file lacks get CLIP templates
    zeroshot_field: str = "nola_zeroshot"
    dino_field: str = "nola_dino"
    tuned_field: str = "nola"
    gt_field: Optional[str] = None  # evaluation only
    force: bool = False  # recompute every stage even if its outputs are up to date
    app_ready: bool = True  # class list, review flagging, Brain similarity/maps on the stored vectors
    # Training-free transductive labels (TransCLIP / StatA / ZLaP) from the stored vectors and the
    # zero-shot text prior; ``refine_from``: start from that field's predictions (e.g. "nola").
    refine: Optional[TransductiveConfig] = None
    refine_from: Optional[str] = None
    refined_field: str = "nola_transductive"


_APP_STEPS = ("review", "app:clip", "app:dino", "evaluate")  # steps on the labels, not per sample


def _walk(run: RunContext, steps: dict, timer: StageTimer, out: dict) -> None:
    """Run the plan's steps in order; a reused step does nothing (and writes nothing)."""
    for step in run.plan.steps:
        with timer.stage(step.name):
            if step.action == REUSE:
                logger.info(f"[{step.name}] up to date: reused ({step.why})")
                continue
            logger.info(f"[{step.name}] {'train' if step.train else step.action} ({step.count}): {step.why}")
            result = steps[step.name](run, step)
            if result is not None:
                out["stages"][step.name] = result
    out["plan"] = run.plan.rows()
    out["processed"] = {s.name: s.count for s in run.plan.steps if s.name not in _APP_STEPS}
    logger.info("[auto-label] processed per step: " + ", ".join(f"{k} {v}" for k, v in out["processed"].items()))


def auto_label(
    samples, classes: ClassesArg = None, config: Optional[AutoLabelConfig] = None, progress: ProgressFn = null_progress
) -> dict:
    """Run embeddings -> CDE zero-shot -> DINO labeler -> prompt tuning -> predict (-> transductive
    refinement), then get the App ready (class list, review flagging, similarity and maps).

    Each step runs, updates only new or changed samples, or is reused, as the re-run planner
    (:mod:`fiftyone_nola.stages.plan`) decides. Returns a summary with each step's result, the
    plan, per-step seconds and, when ``gt_field`` is given, the accuracy of every labeled field
    (ground truth is read only for this evaluation).
    Another job on the dataset is waited for (``NOLA_JOB_WAIT_S``) and its work reused.
    """
    with dataset_job(samples, "auto-label", progress=progress):
        return _auto_label(samples, classes, config, progress)


def _auto_label(samples, classes: ClassesArg, config: Optional[AutoLabelConfig], progress: ProgressFn) -> dict:
    config = config or AutoLabelConfig()
    timer = StageTimer(echo=logger.debug)
    with timer.stage("checks"):
        check_inputs(samples, classes, config)
        classes = resolve_classes(classes, samples)
        device = resolve_device(config.device)
    prof = hardware_profile(device)
    logger.info(f"[auto-label] {len(samples)} samples, {len(classes)} classes; {prof.describe()}")
    if config.clip.random_init or config.dino.random_init:
        logger.info(random_init_banner(config.clip, config.dino))
    with timer.stage("plan"):
        plan = plan_auto_label(samples, classes, config, device)
    out: dict = {"classes": classes, "stages": {}, "hardware": dataclasses.asdict(prof)}
    _walk(RunContext(samples, classes, config, device, plan, progress), STEPS, timer, out)
    if config.gt_field:
        out["evaluation"] = out["stages"].get("evaluate") or recorded_evaluation(samples)
    out["seconds_per_stage"] = timer.seconds
    out["random_init"] = bool(config.clip.random_init or config.dino.random_init)
    return out


def auto_label_multilabel(
    samples, classes: ClassesArg = None, config: Optional[MultiLabelConfig] = None, progress: ProgressFn = null_progress
) -> dict:
    """Embeddings -> CDUL pseudo-labels -> classifier with label refinement (-> mAP if GT), each
    step run, updated or reused as the re-run planner decides. Another job on the dataset is
    waited for (``NOLA_JOB_WAIT_S``) and its work reused."""
    with dataset_job(samples, "auto-label-multilabel", progress=progress):
        return _auto_label_multilabel(samples, classes, config, progress)


def _auto_label_multilabel(
    samples, classes: ClassesArg, config: Optional[MultiLabelConfig], progress: ProgressFn
) -> dict:
    config = config or MultiLabelConfig()
    timer = StageTimer(echo=logger.debug)
    with timer.stage("checks"):
        report = check_multilabel(Target(samples=samples), classes, config)
        for w in report.warnings:
            logger.info(f"[check] {w.render()}")
        report.raise_for_errors()
        classes = resolve_classes(classes, samples)
    with timer.stage("plan"):
        plan = plan_multilabel(samples, classes, config)
    out: dict = {"classes": classes, "stages": {}}
    run = RunContext(samples, classes, config, resolve_device(config.device), plan, progress)
    _walk(run, MULTILABEL_STEPS, timer, out)
    if config.gt_field:
        out["evaluation"] = out["stages"].get("evaluate") or recorded_evaluation(samples)
    out["seconds_per_stage"] = timer.seconds
    out["random_init"] = bool(config.clip.random_init)
    return out


def prepare_for_review(samples, classes, field: Optional[str] = None) -> dict:
    """What the App needs to review right away: the class list (dropdowns, a label schema for
    corrections), ``field`` flagged at the review's threshold when given, and the Brain runs on the
    stored vectors (similarity search, maps) — the pipeline's last steps, for a dataset labeled
    by other means."""
    out = {"review": flag_for_review(samples, classes, field)} if field else {}
    if not field:
        store_class_list(samples, classes)
    with quiet_libraries():
        for family in ("clip", "dino"):
            out[family] = register_brain_runs(samples, family)
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


def summary_lines(summary: dict, setup_s: Optional[float] = None, total_s: Optional[float] = None) -> list[str]:
    """The run's table, as a person reads it: every step with what it did (run / update / reuse),
    how many samples and its seconds; ``setup_s`` (imports, database, dataset, checks before the
    run) and ``total_s`` (the whole command) as their own lines, so the seconds add up."""
    actions = {r["stage"]: r for r in summary.get("plan", [])}
    lines = [f"classes: {len(summary['classes'])}", f"  {'step':<16} {'action':<7} {'samples':>8} {'seconds':>9}"]
    if setup_s is not None:
        lines.append(f"  {'setup':<16} {'':<7} {'':>8} {setup_s:9.1f}")
    for name, secs in summary.get("seconds_per_stage", {}).items():
        row = actions.get(name, {})
        samples = "" if name in ("checks", "plan") or row.get("action") == "reuse" else row.get("samples", "")
        lines.append(f"  {name:<16} {row.get('action', ''):<7} {samples!s:>8} {secs:9.1f}")
    if total_s is not None:
        lines.append(f"  {'total':<16} {'':<7} {'':>8} {total_s:9.1f}")
    for f, ev in (summary.get("evaluation") or {}).items():
        if isinstance(ev, dict) and "accuracy" in ev:
            note = "  (random weights: meaningless)" if summary.get("random_init") else ""
            lines.append(f"  accuracy {f:<14} {ev['accuracy']:.4f}{note}")
    return lines


__all__ = ["AutoLabelConfig", "auto_label", "random_init_banner", "summary_lines", "validate"]
