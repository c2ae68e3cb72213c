"""What each step of a pipeline run does when the plan says it runs: one small function per step,
each a call to its stage. :mod:`fiftyone_nola.pipeline` walks the plan and calls them."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from fiftyone_nola.core.progress import ProgressFn
from fiftyone_nola.logs import quiet_libraries
from fiftyone_nola.stages import reuse
from fiftyone_nola.stages import review as rv
from fiftyone_nola.stages.brain_runs import register_brain_runs
from fiftyone_nola.stages.cdul import (
    apply_multilabel,
    evaluate_multilabel_stages,
    multilabel_pseudo_labels,
    train_multilabel,
)
from fiftyone_nola.stages.embeddings import compute_embeddings
from fiftyone_nola.stages.evaluation import evaluate_single_label, record_evaluation
from fiftyone_nola.stages.nola import dino_labels, dino_labels_apply, predict, tune_prompts, zero_shot
from fiftyone_nola.stages.plan import RunPlan, Step, labelled_fields, review_field
from fiftyone_nola.stages.transductive import transductive_labels

logger = logging.getLogger(__name__)


@dataclass
class RunContext:
    """Everything a step needs: the samples, classes, config, device, plan and progress."""

    samples: Any
    classes: list
    config: Any
    device: torch.device
    plan: RunPlan
    progress: ProgressFn

    def subset(self, step: Step):
        return reuse.subset(self.samples, self.plan.ids, step.todo)


def _embeddings(run: RunContext, step: Step) -> dict:
    family = step.name.split(":")[1]
    cfg = dataclasses.replace(run.config.embed, device=str(run.device))
    dino = getattr(run.config, "dino", None)
    # the classes let the engine's agreement check compare zero-shot labels too
    return compute_embeddings(
        run.samples, family, run.config.clip, dino, cfg, progress=run.progress, classes=run.classes
    )[family]


def _zeroshot(run: RunContext, step: Step) -> dict:
    cfg = run.config
    return zero_shot(
        run.subset(step), run.classes, run.plan.settings["zs_cfg"], cfg.zeroshot_field, progress=run.progress
    )


def _labeler(run: RunContext, step: Step) -> dict:
    cfg = run.config
    if step.train:
        dl_cfg = run.plan.settings["dl_cfg"]
        return dino_labels(run.samples, cfg.zeroshot_field, cfg.dino, dl_cfg, cfg.dino_field, progress=run.progress)
    logger.info(f"[dino] labeler up to date: labeling the {len(step.todo)} new or changed samples with it")
    return dino_labels_apply(run.subset(step), cfg.zeroshot_field, cfg.dino, cfg.dino_field)


def _tuning(run: RunContext, step: Step) -> dict:
    cfg, tune_cfg = run.config, run.plan.settings["tune_cfg"]
    logger.info(
        f"[tune] settings for this machine: epochs={tune_cfg.epochs}, batch={tune_cfg.batch_size}, "
        f"max_samples={tune_cfg.max_samples}"
    )
    return tune_prompts(
        run.samples,
        cfg.zeroshot_field,
        cfg.dino_field,
        cfg.clip,
        tune_cfg,
        run_name=cfg.tuned_field,
        progress=run.progress,
    )


def _predict(run: RunContext, step: Step) -> dict:
    cfg = run.config
    return predict(
        run.subset(step),
        run.plan.settings["model_dir"],
        cfg.clip,
        cfg.tuned_field,
        config=cfg.predict,
        device=str(run.device),
        progress=run.progress,
    )


def _refine(run: RunContext, step: Step) -> dict:
    cfg = run.config
    return transductive_labels(
        run.samples,
        run.classes,
        cfg.refine,
        dino=cfg.dino,
        zeroshot_field=cfg.zeroshot_field,
        init_field=cfg.refine_from,
        label_field=cfg.refined_field,
        progress=run.progress,
    )


def flag_for_review(samples, classes, field: str) -> dict:
    """The class list and its label schema on the dataset, and ``field`` flagged at the review's
    threshold (the stored one, else the default), so the queue is ready when the App opens."""
    rv.store_class_list(samples, classes)
    prev = rv.settings(samples)
    same = prev.get("field") in (None, field)
    threshold = prev.get("threshold", rv.DEFAULT_THRESHOLD) if same else rv.DEFAULT_THRESHOLD
    s = rv.flag_samples(samples, field, threshold=threshold, bottom_k=prev.get("bottom_k") if same else None)
    return {k: s[k] for k in ("field", "threshold", "flagged", "queue")}


def _review(run: RunContext, step: Step) -> dict:
    return flag_for_review(run.samples, run.classes, review_field(run.config))


def _app(run: RunContext, step: Step) -> dict:
    """The App's similarity run and map on ``family``'s stored vectors (the labels are done: a
    failure here is reported, never fatal)."""
    family = step.name.split(":")[1]
    try:
        with quiet_libraries():
            return register_brain_runs(run.samples, family)
    except (ValueError, RuntimeError, OSError, ImportError) as e:
        logger.info(f"[brain] {family}: could not register the App's similarity/map runs: {e}")
        return {}


def _evaluate(run: RunContext, step: Step) -> dict:
    """Accuracy of every labeled field against the ground truth (read for this only)."""
    cfg, out = run.config, {}
    fields = labelled_fields(cfg)
    with quiet_libraries():
        for f in fields:
            out[f] = evaluate_single_label(run.samples, f, cfg.gt_field, overwrite=True)
            logger.info(f"[evaluate] {f}: accuracy {out[f]['accuracy']:.4f} vs '{cfg.gt_field}'")
    record_evaluation(run.samples, fields, cfg.gt_field, out)
    return out


def _pseudo_labels(run: RunContext, step: Step) -> dict:
    return multilabel_pseudo_labels(run.subset(step), run.classes, run.config, run.progress)


def _classifier(run: RunContext, step: Step) -> dict:
    if step.train:
        return train_multilabel(run.samples, run.config, run.progress)
    return apply_multilabel(run.subset(step), run.config)


def _evaluate_multilabel(run: RunContext, step: Step) -> dict:
    return evaluate_multilabel_stages(run.samples, run.config)


STEPS: dict[str, Callable[[RunContext, Step], Optional[dict]]] = {
    "embeddings:clip": _embeddings,
    "embeddings:dino": _embeddings,
    "zeroshot": _zeroshot,
    "dino_labeler": _labeler,
    "prompt_tuning": _tuning,
    "predict": _predict,
    "refine": _refine,
    "review": _review,
    "app:clip": _app,
    "app:dino": _app,
    "evaluate": _evaluate,
}
MULTILABEL_STEPS: dict[str, Callable[[RunContext, Step], Optional[dict]]] = {
    "embeddings:clip": _embeddings,
    "embeddings:dino": _embeddings,
    "pseudo_labels": _pseudo_labels,
    "classifier": _classifier,
    "evaluate": _evaluate_multilabel,
}
