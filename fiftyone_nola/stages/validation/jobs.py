"""The validation pass of each job: every input of a pipeline, an embedding run or one stage."""

from __future__ import annotations

import dataclasses
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
    check_output_fields,
    check_range,
    check_templates,
    check_writable,
)
from fiftyone_nola.stages.validation.plan import (
    _disk_needed,
    _embed_seconds,
    _finish_plan,
    _rate,
    _stage,
    plan_auto_label,
)
from fiftyone_nola.stages.validation.report import Report, _problem
from fiftyone_nola.stages.validation.target import Target, _check_target_gt, resolve_target, target_count


def _job_inputs(target: Target, classes, config, fallback_random_init: bool) -> tuple[Target, list, list]:
    """What every whole-pipeline job checks first: target, class list, models and device."""
    target, problems = resolve_target(target)
    classes_list, p = check_classes(classes, target.samples)
    problems += p
    problems += check_clip(config.clip, fallback_random_init)
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

    target, classes_list, problems = _job_inputs(target, classes, config, fallback_random_init)
    samples = target.samples
    zs, tune = config.zeroshot, config.tune
    problems += check_descriptions(zs.descriptions_file, classes_list, config.allow_template_fallback)
    problems += check_templates(zs.templates, classes_list)
    outputs = {"zeroshot_field": config.zeroshot_field, "dino_field": config.dino_field}
    if not config.skip_tuning:
        outputs["tuned_field"] = config.tuned_field
    problems += check_output_fields(samples, outputs)
    problems += _check_target_gt(target, config.gt_field, classes_list, list(outputs.values()), False)
    problems += check_range("tune_epochs", tune.epochs, lo=1, hi=10_000, integer=True, what="epochs")
    problems += check_range("tune_batch_size", tune.batch_size, lo=1, integer=True, what="batch size")
    problems += check_range(
        "tune_max_samples", tune.max_samples, lo=0, integer=True, what="tuning sample limit (0: all samples)"
    )
    problems += check_range("dino_epochs", config.dino_labeler.epochs, lo=1, hi=100_000, integer=True, what="epochs")
    problems += check_range(
        "max_descriptions_per_class", zs.max_descriptions_per_class, lo=1, integer=True, what="descriptions per class"
    )
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
        except Exception:  # the estimate is advice only
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
    problems += check_range("grid", crop.grid, lo=1, hi=16, integer=True)
    problems += check_range("threshold_t", config.threshold_t, lo=0.0, hi=1.0)
    problems += check_range("lam", config.lam, lo=0.0, hi=1.0)
    problems += check_range("ratio", config.ratio, lo=0.0, hi=1.0)
    problems += check_range("max_labels", config.max_labels, lo=1, integer=True)
    problems += check_range("train_epochs", train.epochs, lo=1, hi=100_000, integer=True, what="epochs")
    problems += check_range(
        "label_update_every", train.update_every, lo=0, integer=True, what="label update interval (0: never)"
    )
    problems += check_range("label_warmup", train.warmup, lo=0, integer=True, what="warm-up epochs")
    problems += check_range("crop_batch_size", crop.batch_size, lo=1, integer=True, what="crop batch size")
    problems += check_range("num_workers", crop.num_workers, lo=0, hi=256, integer=True, what="workers")
    if config.aggregation not in ("avg", "lambda", "global"):
        problems.append(
            _problem("aggregation", f"unknown aggregation {config.aggregation!r}", "use avg, lambda or global")
        )
    problems += check_writable(json_out, "json_out", "summary file", is_file=True)
    problems += check_writable(nola_home(), "storage", "NOLA_HOME")
    report = Report(problems)
    if plan and report.ok:
        n = target_count(target)
        report.plan = {
            "samples": n,
            "stages": [
                _stage("embeddings", "run", n, _embed_seconds(config.clip, n, config.device)),
                _stage("pseudo_labels", "run", n, n * crop.grid**2 / _rate(config.clip, config.device)),
                _stage("classifier", "run", n, 1.0 + n * 1e-4),
            ],
        }
        _finish_plan(report.plan, config.device, 0)
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
        problems += check_clip(clip, fallback_random_init)
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
