"""The validation pass of each job: every input of a pipeline, an embedding run or one stage."""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Optional

from fiftyone_nola.core.errors import InvalidInputError
from fiftyone_nola.core.index import INDEX_TYPES
from fiftyone_nola.core.jobs import duration, job_wait_s
from fiftyone_nola.core.storage import nola_home
from fiftyone_nola.stages.jobs import running_job
from fiftyone_nola.stages.validation.checks import (
    check_classes,
    check_clip,
    check_descriptions,
    check_device,
    check_dino,
    check_engine,
    check_field,
    check_output_fields,
    check_range,
    check_templates,
    check_writable,
)
from fiftyone_nola.stages.validation.params import check_fields
from fiftyone_nola.stages.validation.plan import _disk_needed, plan_auto_label
from fiftyone_nola.stages.validation.report import Report, _problem
from fiftyone_nola.stages.validation.target import Target, _check_target_gt, resolve_target, target_count

logger = logging.getLogger(__name__)


def _job_inputs(
    target: Target, classes, config, fallback_random_init: bool, prompts: bool = False
) -> tuple[Target, list, list]:
    """What every whole-pipeline job checks first: target, class list, models and device."""
    target, problems = resolve_target(target)
    classes_list, p = check_classes(classes, target.samples)
    problems += p
    problems += check_clip(config.clip, fallback_random_init, prompts=prompts)
    if config.dino is not None:
        problems += check_dino(config.dino, fallback_random_init)
    problems += check_device(config.device)
    problems += check_running_job(target.samples)
    return target, classes_list, problems


def check_running_job(samples) -> list:
    """Information, never an error: another job is running on this dataset, so this one will
    wait for it (bounded) and then reuse what it wrote. A wait setting that is not a number is
    an error."""
    try:
        wait = job_wait_s()
    except InvalidInputError as e:
        return [_problem("job_wait", str(e), "set it to seconds, e.g. 1800 (0: never wait)")]
    who = running_job(samples)
    if who is None:
        return []
    then = (
        f"this run will wait for it (up to {duration(wait)}) and reuse what it writes"
        if wait
        else "this run will stop at once (NOLA_JOB_WAIT_S=0) where it needs what that job holds"
    )
    return [_problem("", f"a job is running on this dataset: {who}; {then}", error=False)]


def _check_refine(samples, config, produced: set) -> list:
    """The transductive step's settings, and the field it starts from: one this run writes, or a
    Classification field the dataset has (ZLaP starts from the text prior only)."""
    problems = [_problem("refine", p, "see TransductiveConfig") for p in config.refine.problems()]
    start = config.refine_from
    if start and config.refine.method == "zlap":
        problems.append(
            _problem("refine_from", "ZLaP propagates from the class text embeddings only", "use --refine transclip")
        )
    elif start and start not in produced:
        problems += check_fields(samples, {"refine_from": (start, ("Classification",))})
    return problems


def check_auto_label(
    target: Target,
    classes,
    config,
    fallback_random_init: bool = False,
    json_out: Optional[str] = None,
    plan: bool = False,
) -> Report:
    """Every input of the single-label pipeline (``auto_label``); the plan when ``plan``."""
    t0 = time.perf_counter()

    target, classes_list, problems = _job_inputs(
        target, classes, config, fallback_random_init, prompts=not config.skip_tuning
    )
    samples = target.samples
    zs, tune = config.zeroshot, config.tune
    problems += check_descriptions(zs.descriptions_file, classes_list, config.allow_template_fallback)
    problems += check_templates(zs.templates, classes_list)
    outputs = {"zeroshot_field": config.zeroshot_field, "dino_field": config.dino_field}
    if not config.skip_tuning:
        outputs["tuned_field"] = config.tuned_field
    if config.refine is not None:
        outputs["refined_field"] = config.refined_field
        problems += _check_refine(samples, config, set(outputs.values()))
    problems += check_output_fields(samples, outputs)
    problems += _check_target_gt(target, config.gt_field, classes_list, list(outputs.values()), False)
    problems += check_field("tune_epochs", tune, "epochs")
    problems += check_field("tune_batch_size", tune, "batch_size")
    problems += check_field("tune_max_samples", tune, "max_samples")
    problems += check_field("dino_epochs", config.dino_labeler, "epochs")
    problems += check_field("max_descriptions_per_class", zs, "max_descriptions_per_class")
    problems += check_embed_config(config.embed, check_device_too=False)
    if zs.use_llm and zs.descriptions_file:
        problems.append(
            _problem(
                "use_llm", "both a descriptions file and LLM descriptions were asked for; the file wins", error=False
            )
        )
    problems += check_writable(json_out, "json_out", "summary file", is_file=True)
    report = Report(problems)
    n = target_count(target) if report.ok or plan else 0
    need = 0
    if report.ok or plan:
        try:
            need = _disk_needed(config, n, len(classes_list or []))
        except Exception as e:  # the estimate is advice only
            logger.debug("no disk estimate: %r", e)
            need = 0
    report.problems += check_writable(nola_home(), "storage", "NOLA_HOME", need_bytes=need)
    if plan and report.ok:
        report.plan = plan_auto_label(target, classes_list, config, n, need)
    report.seconds = time.perf_counter() - t0
    return report


def check_multilabel(
    target: Target,
    classes,
    config,
    fallback_random_init: bool = False,
    json_out: Optional[str] = None,
    plan: bool = False,
) -> Report:
    """Every input of ``auto_label_multilabel``."""
    t0 = time.perf_counter()

    target, classes_list, problems = _job_inputs(target, classes, config, fallback_random_init)
    samples = target.samples
    if not config.single_template:
        problems += check_descriptions(
            config.descriptions_file, classes_list, getattr(config, "allow_template_fallback", False)
        )
    outputs = {"pseudo_field": config.pseudo_field, "pred_field": config.pred_field}
    problems += check_output_fields(samples, outputs, "Classifications")
    problems += _check_target_gt(target, config.gt_field, classes_list, list(outputs.values()), True)
    crop, train = config.crop, config.train
    problems += check_field("grid", crop, "grid")
    for name in ("threshold_t", "lam", "ratio", "max_labels"):
        problems += check_field(name, config, name)
    problems += check_field("train_epochs", train, "epochs")
    problems += check_field("label_update_every", train, "update_every")
    problems += check_field("label_warmup", train, "warmup")
    problems += check_field("crop_batch_size", crop, "batch_size")
    problems += check_field("num_workers", crop, "num_workers")
    if config.aggregation not in ("avg", "lambda", "global"):
        problems.append(
            _problem("aggregation", f"unknown aggregation {config.aggregation!r}", "use avg, lambda or global")
        )
    problems += check_writable(json_out, "json_out", "summary file", is_file=True)
    problems += check_writable(nola_home(), "storage", "NOLA_HOME")
    report = Report(problems)
    if plan and report.ok:
        report.plan = plan_auto_label(target, classes_list, config, target_count(target), 0)
    report.seconds = time.perf_counter() - t0
    return report


def check_embed(
    target: Target,
    family: str,
    clip,
    dino,
    embed_cfg,
    fallback_random_init: bool = False,
    json_out: Optional[str] = None,
) -> Report:
    """Every input of the embedding stage."""

    t0 = time.perf_counter()
    target, problems = resolve_target(target)
    if family not in ("clip", "dino", "both"):
        problems.append(_problem("family", f"family must be clip, dino or both, not {family!r}"))
    if family in ("clip", "both"):
        problems += check_clip(clip, fallback_random_init, text=False)  # images only: no tokenizer
    if family in ("dino", "both"):
        problems += check_dino(dino, fallback_random_init)
    problems += check_embed_config(embed_cfg)
    problems += check_running_job(target.samples)
    problems += check_writable(json_out, "json_out", "summary file", is_file=True)
    problems += check_writable(nola_home(), "storage", "NOLA_HOME")
    r = Report(problems)
    r.seconds = time.perf_counter() - t0
    return r


def check_embed_config(cfg, check_device_too: bool = True) -> list:
    """An :class:`~fiftyone_nola.core.embed.EmbedConfig`: batch, workers, store type, engine and precision."""
    problems = check_device(cfg.device) if check_device_too else []
    problems += check_range("batch_size", cfg.batch_size, lo=1, integer=True, what="batch size")
    problems += check_range("num_workers", cfg.num_workers, lo=0, hi=256, integer=True, what="workers")
    if cfg.index_type not in INDEX_TYPES:
        problems.append(
            _problem("index_type", f"unknown index type {cfg.index_type!r}", f"use one of {', '.join(INDEX_TYPES)}")
        )
    return problems + check_engine(cfg.engine, cfg.precision)


def replace_random_init(spec):
    """``spec`` with random init on (the explicit fallback of a run without weights)."""
    return dataclasses.replace(spec, random_init=True)
