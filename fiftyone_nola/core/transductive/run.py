"""One call from stored vectors to probabilities: the kNN graph, then the configured solver."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

import numpy as np
from threadpoolctl import threadpool_limits

from fiftyone_nola.core.errors import InvalidInputError
from fiftyone_nola.core.progress import ProgressFn, null_progress
from fiftyone_nola.core.transductive.config import TransductiveConfig
from fiftyone_nola.core.transductive.gmm import stata, transclip
from fiftyone_nola.core.transductive.graph import knn_graph
from fiftyone_nola.core.transductive.zlap import presence_check, zlap, zlap_probabilities

if TYPE_CHECKING:  # the scores' rule only; this module never needs torch itself
    from fiftyone_nola.core.models.scoring import Scoring


@dataclass
class TransductiveResult:
    """``probs``: N×C float32 rows summing to 1; ``info``: what ran and how it went."""

    probs: np.ndarray
    info: dict = field(default_factory=dict)


def text_prior(
    x: np.ndarray, class_weights: np.ndarray, logit_scale: float = 100.0, scoring: Optional[Scoring] = None
) -> np.ndarray:
    """The zero-shot prediction (N×C float64) of unit rows ``x``: softmax(logit_scale · x·W^T) for
    a softmax CLIP; for a sigmoid one (SigLIP: ``scoring``), the zero-shot stage's own normalised
    sigmoid scores at the model's learnt scale and bias."""
    # float32 product (as the official code; no float64 copy of x), softmax in float64
    cos = np.asarray(x, dtype=np.float32) @ np.asarray(class_weights, dtype=np.float32).T
    if scoring is not None and scoring.kind == "sigmoid":
        return scoring.sigmoid_probs(cos).astype(np.float64)
    logits = logit_scale * cos.astype(np.float64)
    logits -= logits.max(axis=1, keepdims=True)
    e = np.exp(logits)
    return e / e.sum(axis=1, keepdims=True)


def method_name(config: TransductiveConfig) -> str:
    """What runs: ``stata``, ``transclip``, ``zlap+presence`` or ``zlap``."""
    if config.method == "zlap":
        return "zlap+presence" if config.safeguard else "zlap"
    return "stata" if config.safeguard else "transclip"


def _check_inputs(features, prior, text, text_sims, config: TransductiveConfig) -> None:
    n = len(features)
    if prior.ndim != 2 or len(prior) != n:
        raise InvalidInputError(f"the prior must be N×C for the {n} samples, got shape {prior.shape}")
    if prior.shape[1] < 2:
        raise InvalidInputError("transductive labeling needs at least 2 classes")
    # a row sum is NaN/inf if any entry is: no N×D boolean temporary (512 MB at 1M×512)
    if not (np.isfinite(prior).all() and np.isfinite(features.sum(axis=1)).all()):
        raise InvalidInputError("features and prior must be finite (drop samples without embeddings first)")
    if text is not None and text.shape != (prior.shape[1], features.shape[1]):
        raise InvalidInputError(
            f"class embeddings of shape {text.shape} do not match C×D {prior.shape[1]}×{features.shape[1]}"
        )
    if config.method == "zlap" and (text_sims is None or text_sims.shape != prior.shape):
        raise InvalidInputError("ZLaP needs the N×C image-text similarities (text_sims)")


def label(
    features: np.ndarray,
    prior: np.ndarray,
    config: Optional[TransductiveConfig] = None,
    text: Optional[np.ndarray] = None,
    text_sims: Optional[np.ndarray] = None,
    progress: ProgressFn = null_progress,
) -> TransductiveResult:
    """Transductive probabilities of N samples.

    ``features``: N×D unit rows (CLIP, or DINO); ``prior``: N×C probabilities (the text prior,
    or another method's predictions for TransCLIP); ``text``: the C×D class text embeddings in
    the space of ``features`` (StatA's anchors; None in another space); ``text_sims``: N×C
    cosine similarities of the images' CLIP vectors to the class text embeddings (ZLaP).
    """
    config = config or TransductiveConfig()
    config.check()
    prior = np.asarray(prior, dtype=np.float64)
    _check_inputs(features, prior, text, text_sims, config)
    t0 = time.perf_counter()
    # ZLaP's k counts the sample itself (the official search returns it, then drops the self-loop)
    graph = knn_graph(
        features,
        config.k - 1 if config.method == "zlap" else config.k,
        config.search,
        config.exact_max,
        config.nprobe,
        progress=progress,
    )
    t1 = time.perf_counter()
    info = {"method": method_name(config), "k": config.k, "graph": "exact" if graph.exact else "ivf"}
    # The solvers' products have C columns and blocks of 4,096 rows: memory-bound, where a second
    # BLAS thread gains little and, on a busy machine, its spin-waits made a 1,000-sample
    # TransCLIP 3-4x slower.
    with threadpool_limits(limits=1, user_api="blas"):
        probs = _solve(features, prior, graph, text, text_sims, config, info, progress)
    info.update(
        changed=int((probs.argmax(axis=1) != prior.argmax(axis=1)).sum()),
        graph_seconds=t1 - t0,
        solve_seconds=time.perf_counter() - t1,
    )
    return TransductiveResult(probs.astype(np.float32), info)


def _solve(features, prior, graph, text, text_sims, config: TransductiveConfig, info: dict, progress) -> np.ndarray:
    if config.method == "zlap":
        probs = zlap_probabilities(zlap(graph, text_sims, config, progress).scores, prior)
        if config.safeguard:
            probs, info["safeguard"] = presence_check(probs, prior, config.presence_share, config.zlap_min_present)
    elif config.safeguard:
        probs = stata(features, prior, graph, text, config, progress)
    else:
        probs = transclip(features, prior, graph, config, progress)
    return probs
