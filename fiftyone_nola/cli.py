"""Shell commands: ``python -m fiftyone_nola auto-label --images DIR --classes a,b,c``."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Optional

from fiftyone_nola import STARTED, logs
from fiftyone_nola.cli_args import build_parser
from fiftyone_nola.cli_audit import cmd_audit
from fiftyone_nola.core import distributed as dt
from fiftyone_nola.core.config import bounds, given, given_in
from fiftyone_nola.core.device import hardware_profile, resolve_device
from fiftyone_nola.core.embed import EmbedConfig
from fiftyone_nola.core.errors import ModelNotFoundError, NolaError
from fiftyone_nola.core.models import ClipSpec, DinoSpec, concrete_dino
from fiftyone_nola.core.progress import print_progress
from fiftyone_nola.core.prompt_tuning import TuneConfig
from fiftyone_nola.core.transductive import TransductiveConfig

# FiftyOne reads FIFTYONE_DATABASE_VALIDATION when imported, and main() sets it: the modules that
# import FiftyOne (pipeline, stages) are imported by the commands.


def _log(msg: str) -> None:
    print(msg, flush=True)


# Inputs as the validation pass names them -> the flags a user typed.
CLI_NAMES = {
    "classes": "--classes",
    "descriptions_file": "--descriptions",
    "gt_field": "--gt-field",
    "clip_arch": "--clip-arch",
    "clip_pretrained": "--clip-pretrained",
    "dino_model": "--dino",
    "dino_checkpoint": "--dino-checkpoint",
    "device": "--device",
    "images": "--images",
    "dataset": "--dataset",
    "samples": "--dataset",
    "json_out": "--json",
    "tune_epochs": "--epochs",
    "tune_batch_size": "--batch-size",
    "tune_max_samples": "--tune-max-samples",
    "batch_size": "--batch-size",
    "num_workers": "--workers",
    "max_descriptions_per_class": "--max-descriptions",
    "grid": "--grid",
    "storage": "NOLA_HOME",
    "job_wait": "NOLA_JOB_WAIT_S",
    "max_samples": "--max-samples",
    "index_type": "--index-type",
    "family": "--family",
    "use_llm": "--use-llm",
    "templates": "--templates",
    "engine": "--engine",
    "precision": "--engine-precision",
    "zeroshot_field": "output field",
    "dino_field": "output field",
    "tuned_field": "output field",
    "pseudo_field": "output field",
    "pred_field": "output field",
}


def _names(args) -> dict:
    names = dict(CLI_NAMES, teacher_field="--dataset (its DINO labeler stage)")
    if getattr(args, "classes_file", None):
        names["classes"] = "--classes-file"
    if getattr(args, "gt_from_subfolders", None) and not getattr(args, "gt_field", None):
        names["gt_field"] = "--gt-from-subfolders"
    return names


def _target(args):
    from fiftyone_nola.stages.validation import Target

    return Target(
        images_dir=args.images,
        dataset_name=args.dataset,
        gt_from_subfolders=args.gt_from_subfolders,
        max_samples=args.max_samples,
    )


def _checked(args, report) -> bool:
    """Stop on problems (exit 2, nothing written); print warnings; with --check print the plan.

    Returns True when the command should stop here (``--check``)."""
    from fiftyone_nola.core.errors import ValidationError

    names = _names(args)
    if not report.ok:
        raise ValidationError(report.problems, names)
    if args.check:
        _log("== check ==")
        for line in report.lines(names):
            _log(line)
        return True
    for w in report.warnings:
        _log(f"[check] {w.render(names)}")
    return False


def _preset(args):
    """The ``--preset`` chosen (core/models/presets.py), or None."""
    from fiftyone_nola.core.models.presets import get_preset

    return get_preset(args.preset) if getattr(args, "preset", None) else None


def _clip_spec(args) -> ClipSpec:
    """The ClipSpec of the CLIP options (a preset fills the architecture when none is named)."""
    preset = None if args.clip_arch else _preset(args)
    return given(
        ClipSpec,
        arch=args.clip_arch or (preset and preset.clip_arch),
        pretrained=args.clip_pretrained or (preset and preset.clip_pretrained),
        random_init=args.random_init,
        models_dir=args.models_dir,
    )


def _specs(args):
    clip = _clip_spec(args)
    preset = None if args.dino or args.dino_checkpoint else _preset(args)
    dino = given(
        DinoSpec,
        name=args.dino or (preset and preset.dino),
        checkpoint=args.dino_checkpoint,
        random_init=args.random_init,
        models_dir=args.models_dir,
    )
    if dino.name == "auto":
        dino = concrete_dino(dino)
        _log(f"[models] DINO for this machine: {dino.name} (override with --dino)")
    return clip, dino


def _check_weights(clip, dino, fallback: bool):
    """Resolve weights before any long work; optionally fall back to random init, loudly."""
    from fiftyone_nola.stages.validation import _weights as weights_available

    missing = [(s, why) for s in (clip, dino) for ok, why in [weights_available(s)] if not ok]
    if not missing:
        return clip, dino
    if not fallback:
        raise ModelNotFoundError("\n".join(why for _, why in missing))
    for _, why in missing:
        _log(f"[models] {why}")
    _log("[models] --fallback-random-init: continuing with RANDOMLY INITIALISED models")
    return replace(clip, random_init=True), replace(dino, random_init=True)


def _samples(args):
    from fiftyone_nola.stages import fo_io

    if args.images:
        ds = fo_io.import_images(args.images, args.dataset, args.gt_from_subfolders, max_samples=args.max_samples)
        _log(f"[data] dataset '{ds.name}': {len(ds)} samples from {args.images}")
        return ds
    if args.dataset:
        return fo_io.get_dataset(args.dataset)
    raise NolaError("Give --images DIR (a folder of images) or --dataset NAME (an existing dataset)")


def _classes(args):
    return args.classes_file or args.classes


def _write_json(path: Optional[str], obj) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(obj, f, indent=2, default=str)
        _log(f"summary written to {path}")


def _engine(args) -> dict:
    """--engine / --engine-precision as config fields (absent when not given: the configs' auto)."""
    return {"engine": getattr(args, "engine", None), "precision": getattr(args, "engine_precision", None)}


def _embed_config(args) -> EmbedConfig:
    return given(
        EmbedConfig,
        batch_size=args.batch_size,
        num_workers=args.workers,
        index_type=getattr(args, "index_type", None),
        **_engine(args),
    )


def _tune_config(args) -> TuneConfig:
    return given(
        TuneConfig,
        epochs=args.epochs,
        batch_size=args.batch_size,
        max_samples=args.tune_max_samples,
        num_workers=args.workers,
    )


def _tune_flags(args) -> dict:
    return {"epochs": args.epochs, "max_samples": args.tune_max_samples}


def _tune_flag_problems(name: str, value) -> list:
    """Problems of a tuning flag TuneConfig would refuse to hold. Such a flag stays out of the
    config, so the validation pass still reports it with every other problem, by its flag."""
    from fiftyone_nola.stages.validation import check_range

    lo, what = (1, "epochs") if name == "epochs" else (0, "tuning sample limit (0: all samples)")
    return check_range(f"tune_{name}", value, lo=lo, integer=True, what=what)


def auto_label_config(args, clip: ClipSpec, dino: DinoSpec):
    """The pipeline config of the ``auto-label`` flags: only what was given, nested by stage."""
    from fiftyone_nola.pipeline import AutoLabelConfig
    from fiftyone_nola.stages.nola import PredictConfig, ZeroShotConfig

    zeroshot = given(
        ZeroShotConfig,
        descriptions_file=args.descriptions,
        use_llm=args.use_llm or None,
        llm_model=args.llm_model,
        llm_host=args.ollama_host,
        templates=args.templates,
        include_templates=False if args.no_templates else None,
        max_descriptions_per_class=args.max_descriptions,
    )
    tune = given(TuneConfig, **{k: v for k, v in _tune_flags(args).items() if not _tune_flag_problems(k, v)})
    return given(
        AutoLabelConfig,
        clip=clip,
        dino=dino,
        embed=_embed_config(args),
        zeroshot=zeroshot,
        tune=tune,
        predict=given(PredictConfig, **_engine(args)),
        skip_tuning=args.no_tune or None,
        device=args.device,
        gt_field=args.gt_field or args.gt_from_subfolders,
        force=args.force or None,
        allow_template_fallback=args.allow_template_fallback or None,
        refine=TransductiveConfig(method=args.refine) if args.refine else None,
        refine_from=args.refine_from,
    )


def _log_summary(command: str, summary: dict, setup_s: float) -> None:
    """The pipeline's summary table, its seconds adding up to the wall time since start."""
    from fiftyone_nola.pipeline import summary_lines

    _log(f"\n== {command} summary ==")
    for line in summary_lines(summary, setup_s, time.perf_counter() - STARTED):
        _log(line)


def cmd_auto_label(args) -> dict:
    """``auto-label``: import (or load) a dataset, label it, print per-stage results."""
    from fiftyone_nola.pipeline import auto_label, random_init_banner
    from fiftyone_nola.stages.validation import check_auto_label

    clip, dino = _specs(args)
    cfg = auto_label_config(args, clip, dino)
    report = check_auto_label(
        _target(args), _classes(args), cfg, args.fallback_random_init, args.json_out, plan=args.check
    )
    report.problems += [p for k, v in _tune_flags(args).items() for p in _tune_flag_problems(k, v)]
    if _checked(args, report):
        return {"check": True, "plan": report.plan}
    clip, dino = _check_weights(clip, dino, args.fallback_random_init)
    cfg = replace(cfg, clip=clip, dino=dino)
    ds = _samples(args)
    setup_s = time.perf_counter() - STARTED
    summary = auto_label(ds, _classes(args), cfg, progress=print_progress(sys.stdout))
    _log_summary("auto-label", summary, setup_s)
    _log(
        f"dataset '{ds.name}': fields {cfg.zeroshot_field}, {cfg.dino_field}"
        + ("" if cfg.skip_tuning else f", {cfg.tuned_field}")
        + f". Open it: python -c \"import fiftyone as fo; fo.launch_app(fo.load_dataset('{ds.name}')).wait()\""
    )
    if summary.get("random_init"):
        _log(random_init_banner(clip, dino))
    _write_json(args.json_out, summary)
    return summary


def cmd_auto_label_multilabel(args) -> dict:
    """``auto-label-multilabel``: the CDUL pipeline from the shell."""
    from fiftyone_nola.pipeline import MultiLabelConfig, auto_label_multilabel
    from fiftyone_nola.stages.validation import check_multilabel

    clip, dino = _specs(args)
    crop = given_in(MultiLabelConfig, "crop", grid=args.grid, num_workers=args.workers, **_engine(args))
    cfg = given(
        MultiLabelConfig,
        clip=clip,
        descriptions_file=args.descriptions,
        crop=crop,
        device=args.device,
        gt_field=args.gt_field or args.gt_from_subfolders,
        embed=_embed_config(args),
        allow_template_fallback=args.allow_template_fallback,
    )
    report = check_multilabel(
        _target(args), _classes(args), cfg, args.fallback_random_init, args.json_out, plan=args.check
    )
    if _checked(args, report):
        return {"check": True, "plan": report.plan}
    clip, _ = _check_weights(clip, dino, args.fallback_random_init)
    cfg = replace(cfg, clip=clip)
    ds = _samples(args)
    setup_s = time.perf_counter() - STARTED
    summary = auto_label_multilabel(ds, _classes(args), cfg, progress=print_progress(sys.stdout))
    _log_summary("auto-label-multilabel", summary, setup_s)
    _write_json(args.json_out, summary)
    return summary


def cmd_embed(args) -> dict:
    """``embed``: CLIP and/or DINO embeddings into FAISS stores."""
    from fiftyone_nola.stages.embeddings import compute_embeddings
    from fiftyone_nola.stages.validation import check_embed

    clip, dino = _specs(args)
    cfg = replace(_embed_config(args), device=args.device, draft_decode=not args.exact_decode)
    report = check_embed(_target(args), args.family, clip, dino, cfg, args.fallback_random_init, args.json_out)
    if _checked(args, report):
        return {"check": True}
    clip, dino = _check_weights(clip, dino, args.fallback_random_init)
    ds = _samples(args)
    if args.ray is not None:
        from fiftyone_nola.stages.embeddings_ray import RayEmbedConfig, compute_embeddings_ray

        ray_cfg = RayEmbedConfig(address=args.ray or None, num_actors=args.ray_actors)
        summary = compute_embeddings_ray(ds, args.family, clip, dino, cfg, ray_cfg, progress=print_progress(sys.stdout))
    else:
        summary = compute_embeddings(ds, args.family, clip, dino, cfg, progress=print_progress(sys.stdout))
    _write_json(args.json_out, summary)
    return summary


def cmd_tune(args) -> dict:
    """``tune``: the prompt-tuning stage and predict; under torchrun, data-parallel.

    Every torchrun process runs this; rank 0 alone reads and writes the dataset and prints.
    """
    from fiftyone_nola.stages import fo_io
    from fiftyone_nola.stages.nola import PredictConfig, tune_settings
    from fiftyone_nola.stages.tuning_ddp import tune_prompts_distributed
    from fiftyone_nola.stages.validation import check_params

    # Every rank checks (read-only) before the process group forms, so all stop together.
    report = check_params(
        fo_io.get_dataset(args.dataset),
        clip=_clip_spec(args),
        prompt_tuning=True,
        device=args.device,
        stages={"dataset": ("nola_zeroshot", "zero-shot"), "teacher_field": ("nola_dino", "DINO labeler")},
        ranges={
            "tune_epochs": (args.epochs, *bounds(TuneConfig, "epochs").range),
            "batch_size": (args.batch_size, *bounds(TuneConfig, "batch_size").range),
            "num_workers": (args.workers, *bounds(TuneConfig, "num_workers").range),
            "tune_max_samples": (args.tune_max_samples, *bounds(TuneConfig, "max_samples").range),
        },
        writable={"json_out": (args.json_out, "summary file", True)},
    )
    if _checked(args, report):
        return {"check": True}
    ctx = dt.init_distributed(args.device)
    if not ctx.is_main:  # rank 0 alone prints the stages' lines
        logging.getLogger(logs.LOGGER).setLevel(logging.WARNING)
    log = _log if ctx.is_main else (lambda _msg: None)
    clip = _clip_spec(args)
    config = tune_settings(_tune_config(args), args.device)
    log(f"prompt tuning settings for this machine: {hardware_profile(resolve_device(args.device)).describe()}")
    try:
        summary = tune_prompts_distributed(
            args.dataset,
            clip,
            config,
            predict=False if args.no_predict else given(PredictConfig, **_engine(args)),
            progress=print_progress(sys.stdout) if ctx.is_main else None,
        )
    finally:
        dt.shutdown()
    if ctx.is_main:
        _write_json(args.json_out, summary)
    return summary or {}


def cmd_plugin(args) -> dict:
    """``plugin install``: link (or copy) the packaged FiftyOne plugin into FiftyOne's plugins dir."""
    from fiftyone_nola.plugin_install import install_plugin  # imports FiftyOne: only when asked

    result = install_plugin(args.plugins_dir, copy=args.copy)
    _log(result.message())
    return {"plugin_dir": str(result.target), "action": result.action}


COMMANDS = {
    "auto-label": cmd_auto_label,
    "auto-label-multilabel": cmd_auto_label_multilabel,
    "embed": cmd_embed,
    "tune": cmd_tune,
    "audit": cmd_audit,
    "plugin": cmd_plugin,
}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point; returns the exit code (2 for a NolaError, printed without a traceback)."""
    os.environ.setdefault("FIFTYONE_DATABASE_VALIDATION", "false")
    # Warnings go to stderr as before; the stages' INFO lines are printed plainly to stdout below.
    warnings = logging.StreamHandler()
    warnings.setLevel(logging.WARNING)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", handlers=[warnings])
    args = build_parser().parse_args(argv)
    t0 = time.perf_counter()
    try:
        with logs.lines_to(_log, below=logging.WARNING):
            COMMANDS[args.command](args)
    except NolaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    _log(f"done in {time.perf_counter() - t0:.1f}s ({time.perf_counter() - STARTED:.1f}s since start-up)")
    return 0
