"""Transductive labelling as a stage: stored embeddings + the zero-shot stage's class text
embeddings (+ optionally another field's predictions) -> a ``fo.Classification`` field, in
seconds and without training (TransCLIP / StatA / ZLaP, :mod:`fiftyone_nola.core.transductive`).

Inputs, all read from what earlier stages stored: the CLIP vectors the zero-shot stage used
(its run names the store) and its class weight matrix, built from the descriptions and
templates exactly as zero-shot builds them; with ``features="dino"`` the stored DINO vectors are
the feature space and CLIP's text prior still comes from the CLIP vectors. ``init_field``
(TransCLIP only) starts from another field's predictions: the probabilities its stage stored
(zero-shot, DINO labeller, NoLA's predictions), else the field's ``logits`` (softmax), else its
label and confidence (the rest of the mass spread evenly over the other classes).
Ground truth is never read.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Optional

import numpy as np

from fiftyone_nola.core import storage
from fiftyone_nola.core.arrays import softmax
from fiftyone_nola.core.classes import ClassesArg, resolve_classes
from fiftyone_nola.core.errors import IndexMismatchError, InvalidInputError, NolaError
from fiftyone_nola.core.index import EmbeddingIndex
from fiftyone_nola.core.models import DinoSpec
from fiftyone_nola.core.progress import ProgressFn, null_progress
from fiftyone_nola.core.transductive import TransductiveConfig, label, method_name, text_prior
from fiftyone_nola.stages import fo_io
from fiftyone_nola.stages.artifacts import aligned, has_array, save_array_bundle, stage_dir, stage_meta
from fiftyone_nola.stages.nola import load_class_weights
from fiftyone_nola.stages.stage import StageRun, check_coverage

logger = logging.getLogger(__name__)

DEFAULT_FIELD = "nola_transductive"


def transductive_run_config(
    config: TransductiveConfig, zeroshot_field: str, init_field: Optional[str], dino: Optional[DinoSpec]
) -> dict:
    """The stage's recorded run settings (a rerun compares against exactly this); the DINO spec
    only when DINO vectors are the feature space."""
    return {
        "transductive": config,
        "zeroshot_field": zeroshot_field,
        "init_field": init_field,
        "dino": dino if config.features == "dino" else None,
    }


def transductive_labels(
    samples,
    classes: ClassesArg = None,
    config: Optional[TransductiveConfig] = None,
    dino: Optional[DinoSpec] = None,
    zeroshot_field: str = "nola_zeroshot",
    init_field: Optional[str] = None,
    label_field: str = DEFAULT_FIELD,
    progress: ProgressFn = null_progress,
) -> dict:
    """Label every sample transductively from its stored embeddings -> ``label_field``.

    Needs the zero-shot stage in ``zeroshot_field`` (its class weights and CLIP store);
    ``classes``, if given, must be its class list. ``dino``: the DINO model whose stored vectors
    are the feature space when ``config.features == "dino"`` (default ``DinoSpec()``).
    Returns the run summary (``labelled``, ``changed``: labels that differ from the prior's argmax).
    """
    config = _checked(config or TransductiveConfig(), init_field)
    run = StageRun(samples, "transductive", label_field, "transductive")
    W, zs_classes = _class_weights(samples, zeroshot_field, classes)
    clip_x, ok = _clip_vectors(samples, zeroshot_field, run.ids)
    prior = text_prior(clip_x, W, config.logit_scale)  # NaN rows where there is no vector
    start = prior
    if init_field:
        start = initial_predictions(samples, init_field, run.ids, zs_classes)
        start = np.where(np.isfinite(start).all(axis=1, keepdims=True), start, prior)
    feats = clip_x
    if config.features == "dino":
        dino = dino or DinoSpec()
        feats, has_dino = run.embeddings(dino)
        ok &= has_dino
    rows = slice(None) if ok.all() else ok  # a mask would copy the vectors (2 GB at 1M x 512)
    res = label(
        feats[rows],
        start[rows],
        config,
        W if config.features == "clip" else None,
        clip_x[rows] @ W.T if config.method == "zlap" else None,
        progress,
    )
    probs = np.full(prior.shape, np.nan, dtype=np.float32)
    probs[ok] = res.probs
    with run.writing() as d:
        written = fo_io.write_classifications(samples, run.ids, zs_classes, probs, label_field)
        meta = {"classes": list(zs_classes), "field": label_field, "method": method_name(config)}
        meta.update(zeroshot_field=zeroshot_field, init_field=init_field)
        save_array_bundle(d, run.ids, {"probs": probs}, meta)
        summary = run.record(
            transductive_run_config(config, zeroshot_field, init_field, dino),
            labelled=written,
            skipped=len(run.ids) - written,
            classes=len(zs_classes),
            **res.info,
        )
    logger.info(
        f"[transductive] {summary['method']} ({summary['graph']} kNN graph): {written} samples -> "
        f"'{label_field}', {summary['changed']} differ from the prior, in {summary['seconds']:.2f}s"
    )
    return summary


def _checked(config: TransductiveConfig, init_field: Optional[str]) -> TransductiveConfig:
    config.check()
    if init_field and config.method == "zlap":
        raise InvalidInputError(
            "ZLaP propagates from the class text embeddings only; use method='transclip' to refine "
            f"the predictions in {init_field!r}."
        )
    return config


def _class_weights(samples, zeroshot_field: str, classes: ClassesArg) -> tuple[np.ndarray, list]:
    """The zero-shot stage's class weights and classes; ``classes``, if given, must be the same."""
    W, zs_classes = load_class_weights(samples, zeroshot_field)
    if classes is not None and resolve_classes(classes, samples) != zs_classes:
        raise IndexMismatchError(
            f"The zero-shot stage in {zeroshot_field!r} was run with classes {zs_classes}: run zero_shot "
            "with the new class list first."
        )
    return W, zs_classes


def _clip_vectors(samples, zeroshot_field: str, ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """The stored CLIP vectors the zero-shot stage used (its meta names the store), unit rows."""
    meta = stage_meta(stage_dir(samples, zeroshot_field), "zero-shot")
    key = (meta.get("clip") or {}).get("key")
    if not key:
        raise NolaError(f"The zero-shot stage in {zeroshot_field!r} does not name its CLIP store: re-run zero_shot.")
    path = storage.index_dir(fo_io.dataset_id(samples), key)
    index = EmbeddingIndex.open(path, expect={"model_key": key})
    vecs, found = index.get(list(ids))
    found = np.asarray(found, dtype=bool)
    if found.all():
        return vecs, check_coverage(ids, vecs, "clip")
    out = np.full((len(ids), index.dim), np.nan, dtype=np.float32)
    out[found] = vecs
    return out, check_coverage(ids, out, "clip")


def initial_predictions(samples, field: str, ids: Sequence[str], classes: Sequence[str]) -> np.ndarray:
    """N×C probabilities of ``field`` for ``ids`` (NaN rows where it has none): the stage's
    stored probabilities if it stored them for these classes, else the field's logits
    (softmax), else its label with its confidence and the rest spread over the other classes."""
    d = stage_dir(samples, field)
    if has_array(d, "probs") and stage_meta(d, field).get("classes") == list(classes):
        return aligned(d, "probs", ids).astype(np.float64)
    import fiftyone as fo

    fo_io.check_field(samples, field, (fo.Classification,))
    view = fo_io.root_dataset(samples).select(list(ids))
    got = {
        sid: (lab, conf, logits)
        for sid, lab, conf, logits in zip(
            *view.values(["id", f"{field}.label", f"{field}.confidence", f"{field}.logits"])
        )
    }
    index = {c: i for i, c in enumerate(classes)}
    out = np.full((len(ids), len(classes)), np.nan)
    unknown = set()
    for j, sid in enumerate(ids):
        lab, conf, logits = got.get(sid, (None, None, None))
        if logits is not None and len(logits) == len(classes):
            out[j] = softmax(np.asarray(logits, dtype=np.float64))
        elif lab in index:
            c = float(conf) if conf is not None else 1.0
            out[j] = (1.0 - c) / (len(classes) - 1)
            out[j, index[lab]] = c
        elif lab is not None:
            unknown.add(lab)
    if unknown:
        logger.info(f"[transductive] labels of {field!r} outside the class list are ignored: {sorted(unknown)}")
    return out
