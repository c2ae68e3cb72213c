"""The CDUL multi-label stages on FiftyOne collections (``auto_label_multilabel`` chains them).

global CLIP scores (stored embeddings) + local crop scores -> aggregated soft pseudo-labels
(field ``cdul_pseudo``) -> classifier on stored features with label refinement (field ``cdul``).
Ground truth is read only by evaluation.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from fiftyone_nola.core import cdul as ml
from fiftyone_nola.core.classes import ClassesArg, resolve_classes
from fiftyone_nola.core.config import as_data, bounded, resolve
from fiftyone_nola.core.descriptions import SIMPLE_TEMPLATE
from fiftyone_nola.core.device import resolve_device
from fiftyone_nola.core.embed import EmbedConfig
from fiftyone_nola.core.models import ClipSpec, DinoSpec, clip_scoring, load_clip, spec_key
from fiftyone_nola.core.progress import ProgressFn, null_progress
from fiftyone_nola.core.text_cache import class_weights_from_texts
from fiftyone_nola.stages import fo_io, runs
from fiftyone_nola.stages.artifacts import aligned, has_array, save_array_bundle, stage_dir, stage_meta
from fiftyone_nola.stages.evaluation import evaluate_multilabel, record_evaluation
from fiftyone_nola.stages.nola import ZeroShotConfig, class_descriptions
from fiftyone_nola.stages.stage import StageRun

logger = logging.getLogger(__name__)


@dataclass
class MultiLabelConfig:
    """Settings of the CDUL pipeline (pseudo-labels + classifier)."""

    clip: ClipSpec = field(default_factory=ClipSpec)
    dino: Optional[DinoSpec] = None  # also train on DINO features when set
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    descriptions_file: Optional[str] = None
    allow_template_fallback: bool = False  # classes the descriptions file lacks get CLIP templates
    use_llm: bool = False
    single_template: bool = False  # CDUL's "a photo of a {c}." only, instead of CDE texts
    # Crop scoring (grid, batch, workers, engine); None fields fit the hardware.
    crop: ml.CropConfig = field(default_factory=lambda: ml.CropConfig(batch_size=16))
    threshold_t: float = bounded(0.0, 0.0, 1.0)  # reproduction: t = 0 (plain max over crops) was best
    aggregation: str = "avg"  # avg | lambda | global (global-only scores, no crops)
    lam: float = bounded(0.25, 0.0, 1.0)
    rule: str = "relative"
    ratio: float = bounded(0.5, 0.0, 1.0)
    max_labels: Optional[int] = bounded(10, 1, None, True)
    # The head and its schedule; None fields fit the machine and are printed: CDUL's 100 epochs with
    # label updates every 10 after 10 warm-up epochs on a GPU, 30 / 3 / 3 on a CPU.
    train: ml.TrainConfig = field(default_factory=ml.TrainConfig)
    device: Optional[str] = None
    pseudo_field: str = "cdul_pseudo"
    pred_field: str = "cdul"
    gt_field: Optional[str] = None  # evaluation only


# The flat names the crop and head settings had in recorded run configs before they were nested.
_FLAT = {
    "crop": {"grid": "grid", "batch_size": "crop_batch_size", "num_workers": "num_workers"},
    "train": {"epochs": "train_epochs", "update_every": "label_update_every", "warmup": "label_warmup"},
}


def recorded_config(config: MultiLabelConfig) -> dict:
    """The pseudo-label stage's run config, in the shape runs recorded before ``crop``/``train`` were
    nested (so datasets labeled then stay up to date). Their other settings are added only when
    changed from the default, under ``crop``/``train``; the run's device is ``device``."""
    out = dataclasses.asdict(dataclasses.replace(config, embed=None))
    for part, flat in _FLAT.items():
        value, default = out.pop(part), dataclasses.asdict(_default_part(part))
        out.update({name: value[key] for key, name in flat.items()})
        extra = {k: v for k, v in value.items() if k not in flat and k != "device" and v != default[k]}
        if extra:
            out[part] = extra
    return as_data(out)


def _default_part(part: str):
    return {f.name: f for f in dataclasses.fields(MultiLabelConfig)}[part].default_factory()


def _class_weights(classes, config: MultiLabelConfig, device) -> np.ndarray:
    if config.single_template:
        texts = {c: [SIMPLE_TEMPLATE.format(c)] for c in classes}
    else:
        desc = class_descriptions(
            classes, ZeroShotConfig(descriptions_file=config.descriptions_file, use_llm=config.use_llm)
        )
        texts = {c: desc.texts_for(c) for c in classes}
    return class_weights_from_texts(config.clip, texts, classes, device)[0]


def _local_scores(paths, config: MultiLabelConfig, W: np.ndarray, device, progress: ProgressFn):
    """``(crop scores, failed images, seconds)`` of CLIP on each image's grid of crops."""
    clip = load_clip(config.clip, device)
    t0 = time.perf_counter()
    crop_cfg = dataclasses.replace(resolve(config.crop, device), device=str(device))
    local, failed = ml.local_clip_scores(clip, paths, W, crop_cfg, progress)
    return local, failed, time.perf_counter() - t0


def multilabel_pseudo_labels(
    samples, classes: ClassesArg = None, config: Optional[MultiLabelConfig] = None, progress: ProgressFn = null_progress
) -> dict:
    """CDUL initial pseudo-labels: soft vectors stored per sample, label sets in ``pseudo_field``."""
    config = config or MultiLabelConfig()
    classes = resolve_classes(classes, samples)
    run = StageRun(samples, "cdul_pseudo", config.pseudo_field, "cdul_pseudo_labels")
    emb, ok = run.embeddings(config.clip)
    device = resolve_device(config.device)
    W = _class_weights(classes, config, device)
    g = np.full((len(run.ids), len(classes)), np.nan, dtype=np.float32)
    g[ok] = ml.global_scores(emb[ok], W, scoring=clip_scoring(config.clip, device=device))
    t_global = run.seconds
    local, failed, t_local = None, [], 0.0
    y = g
    if config.aggregation != "global":
        local, failed, t_local = _local_scores(run.paths, config, W, device, progress)
        y = ml.aggregate_scores(
            g, local, config.threshold_t, "lambda" if config.aggregation == "lambda" else "avg", config.lam
        )
    pos = ml.decide_labels(y, config.rule, ratio=config.ratio, max_labels=config.max_labels)
    clip_identity = {"key": spec_key(config.clip), "random_init": bool(config.clip.random_init)}
    with run.writing() as d:
        written = fo_io.write_multilabel(samples, run.ids, classes, y, pos, config.pseudo_field)
        arrays = {"soft_labels": y, "global": g}
        if local is not None:
            arrays["local_max"] = ml.local_only(local, 0.0)
        save_array_bundle(d, run.ids, arrays, {"classes": classes, "field": config.pseudo_field, "clip": clip_identity})
        mean_labels = float(pos[np.all(np.isfinite(y), axis=1)].sum(1).mean()) if written else 0.0
        summary = run.record(
            recorded_config(config),
            labelled=written,
            failed=len(failed),
            mean_labels_per_sample=mean_labels,
            classes_never_positive=[c for c, p in zip(classes, pos.any(0)) if not p],
            seconds_global=t_global,
            seconds_local=t_local,
            images_per_s_local=(len(run.ids) / t_local) if t_local else None,
        )
    logger.info(
        f"[cdul] pseudo-labels for {written} samples -> '{config.pseudo_field}' "
        f"({summary['mean_labels_per_sample']:.2f} labels/sample) in {summary['seconds']:.1f}s"
    )
    return summary


def classifier_config(config: MultiLabelConfig):
    """The head's ``TrainConfig``: the config's explicit values, the rest fitted to the machine."""
    tcfg = resolve(config.train, config.device)
    logger.info(ml.schedule_message(tcfg))
    return tcfg


def feature_specs(config: MultiLabelConfig) -> list:
    """The stored embeddings the head reads, side by side: CLIP, and DINO when configured."""
    return [config.clip] + ([config.dino] if config.dino is not None else [])


def _write_predictions(
    run: StageRun, d, classes: list, probs: np.ndarray, refined: np.ndarray, config: MultiLabelConfig
) -> int:
    """The head's label sets into ``pred_field`` and its arrays into ``d``; returns how many were written."""
    pos = ml.decide_labels(probs, config.rule, ratio=config.ratio, max_labels=config.max_labels)
    written = fo_io.write_multilabel(run.samples, run.ids, classes, probs, pos, config.pred_field)
    save_array_bundle(
        d, run.ids, {"probs": probs, "refined_labels": refined}, {"classes": classes, "field": config.pred_field}
    )
    return written


def train_multilabel(samples, config: Optional[MultiLabelConfig] = None, progress: ProgressFn = null_progress) -> dict:
    """Train the multi-label head on stored features against the soft pseudo-labels; predict."""
    config = config or MultiLabelConfig()
    run = StageRun(samples, "cdul_train", config.pred_field, "cdul_classifier")
    d = stage_dir(samples, config.pseudo_field)
    classes = stage_meta(d, "multi-label pseudo-label")["classes"]
    y = aligned(d, "soft_labels", run.ids)
    feats = run.features(feature_specs(config))
    tcfg = classifier_config(config)
    model, refined, history = ml.train_multilabel_classifier(feats, y, tcfg, progress)
    probs = ml.predict_multilabel(model, feats)
    with run.writing() as out_dir:
        written = _write_predictions(run, out_dir, classes, probs, refined, config)
        ml.save_classifier(
            out_dir / "classifier.pt",
            model,
            classes,
            {
                "features": "clip" + ("+dino" if config.dino else ""),
                # which models' features: load_multilabel_model refuses others
                "model_keys": [spec_key(s) for s in feature_specs(config)],
            },
        )
        summary = run.record(
            {"train": tcfg, "pseudo_field": config.pseudo_field},
            labelled=written,
            epochs=tcfg.epochs,
            final_loss=(history.get("loss") or [None])[-1],
            schedule=tcfg.describe_schedule(),
            label_update_epochs=history["update_epochs"],
            model_path=str(out_dir / "classifier.pt"),
        )
    logger.info(
        f"[cdul] classifier trained ({tcfg.epochs} epochs) -> '{config.pred_field}' in {summary['seconds']:.1f}s"
    )
    return summary


def apply_multilabel(samples, config: Optional[MultiLabelConfig] = None) -> dict:
    """Label ``samples`` with the head saved by :func:`train_multilabel`, without training
    (what a re-run does for samples added since); their rows join the stored ones."""
    config = config or MultiLabelConfig()
    run = StageRun(samples, "cdul_train", config.pred_field, "cdul_classifier")
    d_pseudo = stage_dir(samples, config.pseudo_field)
    classes = stage_meta(d_pseudo, "multi-label pseudo-label")["classes"]
    model, _ = ml.load_classifier(stage_dir(samples, config.pred_field) / "classifier.pt", classes)
    prev = runs.get_run(samples, run.key)
    y = aligned(d_pseudo, "soft_labels", run.ids)
    probs = ml.predict_multilabel(model, run.features(feature_specs(config)))
    with run.writing() as out_dir:
        written = _write_predictions(run, out_dir, classes, probs, y.astype(np.float32), config)
        summary = run.record((prev or {}).get("config") or {}, labelled=written, retrained=False)
    logger.info(f"[cdul] saved classifier applied to {written} samples -> '{config.pred_field}'")
    return summary


def evaluate_multilabel_stages(samples, config: MultiLabelConfig) -> dict:
    """mAP of global-only, local, initial and trained scores against ``config.gt_field``; recorded
    on the dataset (the run ``nola_evaluation``), so an unchanged re-run reuses it."""
    ids, _ = fo_io.ids_and_paths(samples)
    d = stage_dir(samples, config.pseudo_field)
    classes = stage_meta(d, "multi-label pseudo-label")["classes"]
    out = {}
    score_sets = {"global": aligned(d, "global", ids), "initial": aligned(d, "soft_labels", ids)}
    if has_array(d, "local_max"):
        score_sets["local"] = aligned(d, "local_max", ids)
    for name, scores in score_sets.items():
        out[name] = evaluate_multilabel(samples, config.pseudo_field, config.gt_field, classes, scores, ids)
    p = stage_dir(samples, config.pred_field)
    if has_array(p, "probs"):
        out["trained"] = evaluate_multilabel(
            samples, config.pred_field, config.gt_field, classes, aligned(p, "probs", ids), ids
        )
    for name, ev in out.items():
        logger.info(f"[evaluate] {name:<8} mAP {ev['mAP']:.4f} over {ev['classes_evaluated']} classes")
    record_evaluation(samples, [config.pseudo_field, config.pred_field], config.gt_field, out)
    return out
