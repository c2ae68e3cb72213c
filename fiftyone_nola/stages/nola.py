"""The single-label NoLA stages on FiftyOne collections (I/O at the edges, math elsewhere).

zero-shot (CDE) -> DINO labeler -> prompt tuning -> predict. Every stage reads what the one
before stored (embeddings, class weights, teacher labels) and records itself as a run.
Ground truth is never read here.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from fiftyone_nola.core import descriptions as dsc
from fiftyone_nola.core import dino_labeler as dl
from fiftyone_nola.core import distributed as dt
from fiftyone_nola.core import prompt_tuning as pt
from fiftyone_nola.core import zeroshot as zs
from fiftyone_nola.core.classes import ClassesArg, labels_to_indices, resolve_classes
from fiftyone_nola.core.config import bounded, resolve
from fiftyone_nola.core.device import resolve_device
from fiftyone_nola.core.errors import IndexMismatchError, NolaError
from fiftyone_nola.core.models import ClipSpec, DinoSpec, clip_scoring, load_clip, spec_key
from fiftyone_nola.core.progress import ProgressFn, null_progress
from fiftyone_nola.core.templates import resolve_templates
from fiftyone_nola.core.text_cache import class_weights_from_texts
from fiftyone_nola.stages import fo_io, runs
from fiftyone_nola.stages.artifacts import aligned, load_array, save_array_bundle, stage_dir, stage_meta
from fiftyone_nola.stages.fo_models import load_model as load_tuned_model
from fiftyone_nola.stages.stage import StageRun

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------- zero-shot (CDE)


@dataclass
class ZeroShotConfig:
    """CDE zero-shot: class texts are descriptions (LLM, file or templates) plus templates."""

    clip: ClipSpec = field(default_factory=ClipSpec)
    descriptions_file: Optional[str] = None  # LaFTer/NoLA JSON; else LLM (if use_llm) else templates
    use_llm: bool = False
    llm_model: str = "llama3.2"
    llm_host: Optional[str] = None
    # Template set added to every class's descriptions: a preset name (see templates.presets()),
    # "auto" (the official code's choice for the closest case), or a file of templates.
    templates: str = "auto"
    include_templates: bool = True
    max_descriptions_per_class: Optional[int] = bounded(None, 1, None, True, "descriptions per class")  # None: all
    logit_scale: float = 100.0  # softmax CLIPs; sigmoid ones (SigLIP) use their learnt scale and bias
    store_logits: bool = False
    device: Optional[str] = None


def class_descriptions(classes: Sequence[str], config: ZeroShotConfig):
    """The DescriptionSet for ``classes`` per the config (file > LLM > templates)."""
    source = "file" if config.descriptions_file else "llm" if config.use_llm else "templates"
    if source == "templates":
        logger.info("[zeroshot] no descriptions file and LLM off: class texts are the templates alone")
    llm = dsc.DescribeConfig(model=config.llm_model, host=config.llm_host)
    return dsc.describe_classes(classes, source, config.descriptions_file, llm)


def zero_shot(
    samples,
    classes: ClassesArg = None,
    config: Optional[ZeroShotConfig] = None,
    label_field: str = "nola_zeroshot",
    descriptions=None,
    progress: ProgressFn = null_progress,
) -> dict:
    """Label every sample with the CDE zero-shot classifier from its stored CLIP embedding."""
    config = config or ZeroShotConfig()
    classes = resolve_classes(classes, samples)
    run = StageRun(samples, "zeroshot", label_field, "zeroshot")
    emb, ok = run.embeddings(config.clip)
    desc = descriptions if descriptions is not None else class_descriptions(classes, config)
    template_set, templates = resolve_templates(config.templates, classes)
    logger.info(f"[zeroshot] templates: {template_set} ({len(templates)} per class)")
    texts = {
        c: desc.texts_for(
            c,
            templates=templates,
            include_templates=config.include_templates,
            max_descriptions=config.max_descriptions_per_class,
        )
        for c in classes
    }
    W, tinfo = class_weights_from_texts(config.clip, texts, classes, resolve_device(config.device))
    clip_identity = {
        "key": spec_key(config.clip),
        "random_init": bool(config.clip.random_init or not config.clip.pretrained),
    }
    # the model's own scoring: CLIP's softmax at config.logit_scale, SigLIP's sigmoid (normalised)
    scoring = clip_scoring(config.clip, config.logit_scale, resolve_device(config.device))
    probs = np.full((len(run.ids), len(classes)), np.nan, dtype=np.float32)
    probs[ok] = zs.class_probs(emb[ok], W, scoring)
    with run.writing() as d:
        written = fo_io.write_classifications(samples, run.ids, classes, probs, label_field, config.store_logits)
        meta = {
            "classes": list(classes),
            "clip": clip_identity,
            "field": label_field,
            "descriptions_source": getattr(desc, "source", {}),
            "templates": template_set,
            "n_texts": {c: len(t) for c, t in texts.items()},
            "scoring": scoring.record(),
        }
        save_array_bundle(d, run.ids, {"probs": probs}, meta, shared={"class_weights": W.astype(np.float32)})
        summary = run.record(
            config,
            labelled=written,
            skipped=len(run.ids) - written,
            classes=len(classes),
            random_init=clip_identity["random_init"],
            templates=template_set,
            texts_encoded=tinfo["encoded"],
            texts_cached=tinfo["cached"],
            scoring=scoring.kind,
            warnings=list(getattr(desc, "warnings", [])),
        )
    logger.info(f"[zeroshot] {written} samples -> field '{label_field}' in {summary['seconds']:.2f}s")
    return summary


def load_class_weights(samples, zeroshot_field: str = "nola_zeroshot", classes=None) -> tuple[np.ndarray, list[str]]:
    """The CDE weight matrix stored by the zero-shot stage, checked against ``classes``."""
    d = stage_dir(samples, zeroshot_field)
    meta = stage_meta(d, "zero-shot")
    if classes is not None and list(classes) != meta["classes"]:
        raise IndexMismatchError(
            f"The zero-shot stage in '{zeroshot_field}' was run with classes {meta['classes']}, not "
            f"{list(classes)}. Re-run zero_shot with the new class list first."
        )
    return load_array(d, "class_weights"), meta["classes"]


# --------------------------------------------------------------------------- DINO labeler


def dino_run_config(labeler, dino, zeroshot_field: str, trusted_field: Optional[str] = None) -> dict:
    """The DINO labeler's recorded run settings (a rerun compares against exactly this)."""
    return {"labeler": labeler, "dino": dino, "zeroshot_field": zeroshot_field, "trusted_field": trusted_field}


def tune_run_config(tune: pt.TuneConfig, clip, teacher_field: str) -> dict:
    """Prompt tuning's recorded run settings (a rerun compares against exactly this)."""
    return {"tune": tune.as_recorded(), "clip": clip, "teacher_field": teacher_field}


def dino_labels(
    samples,
    zeroshot_field: str = "nola_zeroshot",
    dino: Optional[DinoSpec] = None,
    config=None,
    label_field: str = "nola_dino",
    trusted_field: Optional[str] = None,
    progress: ProgressFn = null_progress,
) -> dict:
    """Train the DINO labeling MLP on confident zero-shot picks; label every sample.

    ``trusted_field``: a reviewer's corrected labels (``fo.Classification``), added as trusted
    supervision. It must never be a ground-truth field used for evaluation.
    """
    dino = dino or DinoSpec()
    config = config or dl.DinoLabelerConfig()
    run = StageRun(samples, "dino", label_field, "dino_labeler")
    d_zs = stage_dir(samples, zeroshot_field)
    classes = stage_meta(d_zs, "zero-shot")["classes"]
    dl.check_features_option(config.features)
    zs_probs = aligned(d_zs, "probs", run.ids)
    # The official labeler trains on raw DINO features; the store keeps unit rows plus norms.
    feats, ok = run.embeddings(dino, raw=config.features == "raw")
    ok &= np.all(np.isfinite(zs_probs), axis=1)
    trusted = _trusted_picks(samples, trusted_field, run.ids, classes, ok)
    res = dl.dino_pseudo_labels(zs_probs[ok], feats[ok], config, trusted=trusted)
    probs = np.full((len(run.ids), len(classes)), np.nan, dtype=np.float32)
    probs[ok] = res.probs
    with run.writing() as d:
        written = fo_io.write_classifications(samples, run.ids, classes, probs, label_field)
        dl.save_labeler(d / "labeler", res.model, classes, {"dino_key": spec_key(dino), "features": config.features})
        teacher = np.full(len(run.ids), -1, dtype=np.int64)
        teacher[ok] = np.argmax(res.probs, axis=1)
        save_array_bundle(
            d,
            run.ids,
            {"probs": probs, "teacher": teacher},
            {
                "classes": classes,
                "field": label_field,
                "k": int(res.k),
                "selected": int(len(res.selected_indices)),
                "zeroshot_field": zeroshot_field,
            },
        )
        warnings = [re.sub(r"^class (\d+):", lambda m: f"class {classes[int(m.group(1))]!r}:", w) for w in res.warnings]
        for w in warnings:
            logger.info(f"[dino] {w}")
        summary = run.record(
            dino_run_config(config, dino, zeroshot_field, trusted_field),
            labelled=written,
            k=int(res.k),
            selected_for_training=int(len(res.selected_indices)),
            trusted=len(trusted or {}),
            warnings=warnings,
        )
    logger.info(
        f"[dino] k={res.k}, trained on {len(res.selected_indices)} picks, labelled {written} -> "
        f"'{label_field}' in {summary['seconds']:.2f}s"
    )
    return summary


def _trusted_picks(samples, trusted_field: Optional[str], ids: list, classes: list, ok: np.ndarray) -> Optional[dict]:
    """Reviewed labels of ``trusted_field`` as ``{row among the ok rows: class index}``."""
    if not trusted_field:
        return None
    labs = fo_io.read_single_labels(samples, trusted_field, ids)
    idx, unknown = labels_to_indices(labs, classes)
    if unknown:
        logger.info(f"[dino] ignoring corrected labels outside the class list: {unknown}")
    sub = np.flatnonzero(ok)
    return {int(np.searchsorted(sub, j)): c for j, c in enumerate(idx) if c >= 0 and ok[j]}


def dino_labels_apply(
    samples, zeroshot_field: str = "nola_zeroshot", dino: Optional[DinoSpec] = None, label_field: str = "nola_dino"
) -> dict:
    """Label ``samples`` with the DINO labeler saved by :func:`dino_labels`, without training.

    What a re-run does for samples added since the labeler was trained: their rows join the
    stored ones and the stage's run record keeps its config, so it stays up to date.
    """
    dino = dino or DinoSpec()
    run = StageRun(samples, "dino", label_field, "dino_labeler")
    d = stage_dir(samples, label_field)
    meta = stage_meta(d, "DINO labeler")
    classes = meta["classes"]
    mlp = dl.load_labeler(d / "labeler", classes)
    prev = runs.get_run(samples, run.key)
    zs_probs = aligned(stage_dir(samples, zeroshot_field), "probs", run.ids)
    # the features the labeler was trained on (raw DINO output when its meta says so)
    feats, ok = run.embeddings(dino, raw=mlp.meta.get("features") == "raw")
    ok &= np.all(np.isfinite(zs_probs), axis=1)
    probs = np.full((len(run.ids), len(classes)), np.nan, dtype=np.float32)
    if ok.any():
        probs[ok] = dl.label_all(mlp, feats[ok])
    teacher = np.where(ok, np.argmax(np.nan_to_num(probs, nan=-1.0), axis=1), -1).astype(np.int64)
    with run.writing() as d:
        written = fo_io.write_classifications(samples, run.ids, classes, probs, label_field)
        save_array_bundle(d, run.ids, {"probs": probs, "teacher": teacher}, meta)
        summary = run.record((prev or {}).get("config") or {}, labelled=written, retrained=False)
    logger.info(f"[dino] saved labeler applied to {written} samples -> '{label_field}' in {summary['seconds']:.2f}s")
    return summary


# --------------------------------------------------------------------------- prompt tuning


@dataclass
class TuneInputs:
    """What the prompt-tuning stage trains on, read from the stages before it."""

    paths: list
    teacher: np.ndarray  # class index per sample, -1 where the labeler gave none
    class_weights: np.ndarray
    classes: list
    model_dir: Path

    @property
    def checkpoint_dir(self) -> Path:
        """Where the per-epoch checkpoints of this run live."""
        return self.model_dir / "checkpoints"


def tune_inputs(
    samples, zeroshot_field: str = "nola_zeroshot", teacher_field: str = "nola_dino", run_name: str = "nola"
) -> TuneInputs:
    """The images, cached teacher labels and CDE weights of the tuning stage, checked."""
    W, classes = load_class_weights(samples, zeroshot_field)
    d_t = stage_dir(samples, teacher_field)
    stage_meta(d_t, "DINO labeler")
    ids, paths = fo_io.ids_and_paths(samples)
    teacher = aligned(d_t, "teacher", ids)
    if (teacher >= 0).sum() == 0:
        raise NolaError(f"No teacher labels in '{teacher_field}' for these samples: run dino_labels first.")
    return TuneInputs(paths, teacher, W, classes, stage_dir(samples, f"{run_name}_model"))


def tune_on_inputs(clip_model, inputs: TuneInputs, config, progress: ProgressFn = null_progress):
    """``prompt_tuning.tune`` on ``inputs``, resuming their checkpoint or starting over if stale.

    Under torchrun every rank calls this; only rank 0 deletes a stale checkpoint and says so.
    """

    def run():
        return pt.tune(
            clip_model,
            inputs.paths,
            inputs.teacher,
            inputs.class_weights,
            config,
            checkpoint_dir=inputs.checkpoint_dir,
            progress=progress,
            classes=inputs.classes,
        )

    try:
        return run()
    except IndexMismatchError as e:
        # A checkpoint from other teacher labels, images or settings is stale, not resumable:
        # a re-run after the labeler changed must train anew.
        if dt.context().is_main:
            logger.info(f"[tune] previous checkpoint does not match this run ({e}); starting over")
            shutil.rmtree(inputs.checkpoint_dir, ignore_errors=True)
        return run()


def tune_prompts(
    samples,
    zeroshot_field: str = "nola_zeroshot",
    teacher_field: str = "nola_dino",
    clip: Optional[ClipSpec] = None,
    config=None,
    run_name: str = "nola",
    progress: ProgressFn = null_progress,
) -> dict:
    """Prompt-tune CLIP's vision tower on the DINO labeler's (cached) teacher labels.

    Resumable: epoch checkpoints live in the run directory; re-running continues from them.
    Returns a summary including ``model_dir`` (what ``predict`` loads).
    """
    # No label field: the tuned model is the output, recorded under "<run_name>_model".
    run = StageRun(samples, "tune", None, "prompt_tuning", key=runs.run_key_for(f"{run_name}_model"))
    clip_spec = clip or ClipSpec()
    device = resolve_device(getattr(config, "device", None))
    config = resolve(config or pt.TuneConfig(), device)
    inputs = tune_inputs(samples, zeroshot_field, teacher_field, run_name)
    classes, model_dir = inputs.classes, inputs.model_dir
    clip_model = load_clip(clip_spec, device)
    n_teacher = int((inputs.teacher >= 0).sum())
    logger.info(
        f"[tune] {n_teacher} teacher-labelled samples; epochs={config.epochs} "
        f"batch={config.batch_size} max_samples={config.max_samples} device={device}"
    )
    result = tune_on_inputs(clip_model, inputs, config, progress)
    pt.save_tuned(
        model_dir,
        result.model,
        classes,
        clip_model.identity,
        config,
        {"zeroshot_field": zeroshot_field, "teacher_field": teacher_field, "selected_epoch": result.selected_epoch},
    )
    summary = run.record(
        tune_run_config(config, clip_spec, teacher_field),
        teacher_labelled=n_teacher,
        model_dir=str(model_dir),
        epochs=config.epochs,
        selected_epoch=result.selected_epoch,
        history=result.history,
    )
    logger.info(f"[tune] saved tuned model to {model_dir} ({summary['seconds']:.1f}s)")
    return summary


def tune_settings(tune: Optional[pt.TuneConfig], device) -> pt.TuneConfig:
    """``tune`` as a tuning run uses it: the user's settings, the rest fitted to ``device``
    (resolved once). Runs record it as ``TuneConfig.as_recorded`` ("all samples" as
    ``max_samples=None``, as before the config rule), so the same settings stay up to date."""
    device = device if isinstance(device, torch.device) else resolve_device(device)
    return dataclasses.replace(resolve(tune or pt.TuneConfig(), device), device=str(device))


def tune_and_predict(
    samples,
    clip: Optional[ClipSpec] = None,
    tune: Optional[pt.TuneConfig] = None,
    predict_config: Optional[PredictConfig] = None,
    label_field: str = "nola",
    zeroshot_field: str = "nola_zeroshot",
    teacher_field: str = "nola_dino",
    progress: ProgressFn = null_progress,
) -> dict:
    """Prompt tuning on the DINO labeler's labels, then every sample labeled by the tuned model
    into ``label_field``, on one device (the tuning's, resolved once). The tuning's summary plus
    ``labeled`` and ``field``."""
    tune = tune_settings(tune, getattr(tune, "device", None))
    s = tune_prompts(samples, zeroshot_field, teacher_field, clip, tune, run_name=label_field, progress=progress)
    p = predict(
        samples, s["model_dir"], clip, label_field, config=predict_config, device=tune.device, progress=progress
    )
    return {**s, "labelled": p["labelled"], "field": label_field}


@dataclass
class PredictConfig:
    """How :func:`predict` runs the tuned model; None fields fit the hardware (``config.resolve``).

    ``engine``/``precision``: what runs the forward (core/engines.py; ``auto``: measured on the
    images, an engine kept only if its labels match PyTorch fp32's (core/engine_choice.py);
    ``engine="torch"`` forces PyTorch).
    """

    batch_size: Optional[int] = None
    num_workers: Optional[int] = None
    precision: str = "auto"
    engine: str = "auto"

    def hardware_defaults(self, profile) -> dict:
        """The machine's inference batch and loader workers."""
        return {"batch_size": profile.embed_batch_size, "num_workers": profile.num_workers}


def predict(
    samples,
    model_dir: str,
    clip: Optional[ClipSpec] = None,
    label_field: str = "nola",
    config: Optional[PredictConfig] = None,
    device: Optional[str] = None,
    progress: ProgressFn = null_progress,
) -> dict:
    """Apply a saved prompt-tuned model to any dataset or view -> ``label_field``."""
    run = StageRun(samples, "predict", label_field, "predict")
    model = load_tuned_model(model_dir, clip, device=device)  # the FiftyOne model apply_model runs
    cfg = resolve(config or PredictConfig(), model.device)
    classes = model.classes
    probs, failed = model.predict_files(
        run.paths, cfg.batch_size, cfg.num_workers, cfg.precision, progress, engine=cfg.engine
    )
    ran = getattr(model.tuned, "last_engine", None)
    with run.writing() as d:
        written = fo_io.write_classifications(samples, run.ids, classes, probs, label_field)
        fo_io.tag_samples(samples, [run.ids[i] for i, _ in failed], fo_io.UNREADABLE_TAG)
        save_array_bundle(
            d, run.ids, {"probs": probs}, {"classes": classes, "field": label_field, "model_dir": str(model_dir)}
        )
        summary = run.record(
            {"model_dir": str(model_dir), "precision": cfg.precision, "model_id": model.tuned.model_id},
            labelled=written,
            failed=len(failed),
            inference=None
            if ran is None
            else {"engine": ran.engine, "precision": ran.precision, **({"auto": ran.measured} if ran.measured else {})},
        )
    logger.info(f"[predict] {written} samples -> '{label_field}' in {summary['seconds']:.1f}s")
    return summary
