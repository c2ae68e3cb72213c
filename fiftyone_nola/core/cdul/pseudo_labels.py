"""CDUL's pseudo-labels: global and local scores aggregated into soft labels, and the decision
rules that turn scores into label sets."""

from __future__ import annotations

from typing import Optional

import numpy as np

from fiftyone_nola.core.errors import InvalidInputError


def local_only(local: np.ndarray, t: float = 0.0) -> np.ndarray:
    """CDUL's local score per class: max over crops if it reaches ``t``, else min over crops.

    ``local`` is N×G×C; NaN crops are ignored; an image with no valid crop gets a NaN row.
    ``t = 0`` (the reproduction's best) is the plain max.
    """
    loc = np.asarray(local, dtype=np.float64)
    if loc.ndim != 3:
        raise InvalidInputError(f"local scores must be N×G×C, got shape {loc.shape}")
    missing = np.all(np.isnan(loc), axis=1)  # N×C
    alpha = np.max(np.where(np.isnan(loc), -np.inf, loc), axis=1)
    beta = np.min(np.where(np.isnan(loc), np.inf, loc), axis=1)
    s = np.where(alpha >= t, alpha, beta)
    return np.where(missing, np.nan, s).astype(np.float32)


def aggregate_scores(
    global_: np.ndarray, local: np.ndarray, t: float = 0.0, mode: str = "avg", lam: float = 0.25
) -> np.ndarray:
    """CDUL's initial soft labels from global (N×C) and local (N×G×C) scores: N×C in [0, 1].

    ``avg``: ``y = (s_global + s_local) / 2``. ``lambda``: ``y + lam·|s_global − s_local|``,
    clipped to [0, 1]; ``lam`` must lie in [0, 0.5] so ``y`` stays non-decreasing in both
    scores (CDUL does not state its value; 0.5 makes ``y = max(s_global, s_local)``). Where one
    side is missing (NaN) the other is used alone; where both are, the result is NaN.
    """
    if mode not in ("avg", "lambda"):
        raise InvalidInputError(f"mode must be 'avg' or 'lambda', not {mode!r}")
    if mode == "lambda" and not 0.0 <= lam <= 0.5:
        raise InvalidInputError(f"lam must lie in [0, 0.5] (monotone aggregation), got {lam}")
    g = np.asarray(global_, dtype=np.float64)
    s_loc = local_only(local, t).astype(np.float64)
    if g.shape != s_loc.shape:
        raise InvalidInputError(f"global scores {g.shape} and local scores {np.shape(local)} disagree on N or C")
    g_f, l_f = np.where(np.isnan(g), s_loc, g), np.where(np.isnan(s_loc), g, s_loc)
    y = (g_f + l_f) / 2.0
    if mode == "lambda":
        y = y + lam * np.abs(g_f - l_f)
    return np.clip(y, 0.0, 1.0).astype(np.float32)


RULES = ("relative", "expected_count", "threshold", "topk")


def decide_labels(
    scores: np.ndarray,
    rule: str = "relative",
    *,
    ratio: float = 0.5,
    threshold: float = 0.5,
    k: int = 1,
    max_labels: Optional[int] = None,
    min_labels: int = 1,
) -> np.ndarray:
    """Label sets from N×C scores: bool N×C.

    Rules:

    * ``relative`` (default): keep classes scoring at least ``ratio`` × the image's top score.
    * ``expected_count``: keep the top ``round(Σ_c score)`` classes, i.e. the expected number
      of present classes if each score were a presence probability.
    * ``threshold``: keep classes scoring at least ``threshold``.
    * ``topk``: keep the ``k`` best classes.

    Why ``relative`` is the default: it needs no labeled data and, unlike the others, is
    invariant to the scale of the scores. That scale differs between the stages this module
    produces: softmax-derived pseudo-labels shrink as C grows (so a fixed ``threshold`` means
    something different for 20 and 80 classes); their mass is (1 + Σ_c max-over-crops) / 2,
    which grows only about half as fast as the number of objects (so ``expected_count``
    undercounts busy images; it suits calibrated probabilities, e.g. a BCE-trained head); and
    the KL-trained classifier's softmax scores share one unit of mass per image, so they shrink
    as more classes are present. A ratio to the top score behaves the same on all three, adapts the number of
    labels per image (unlike ``topk``), and drops background classes that only one crop
    supports weakly. Its failure mode is a flat score row (an uncertain image), which keeps
    many classes: cap it with ``max_labels``.

    Every rule keeps at least ``min_labels`` classes of an image (its best ones) unless the
    image's scores are all zero or NaN; zero and NaN scores are never kept. ``max_labels``
    caps every rule.
    """
    if rule not in RULES:
        raise InvalidInputError(f"rule must be one of {', '.join(RULES)}, not {rule!r}")
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2:
        raise InvalidInputError(f"scores must be N×C, got shape {s.shape}")
    n, c = s.shape
    s = np.where(np.isfinite(s), s, 0.0)
    positive = s > 0
    if c == 0 or n == 0:
        return np.zeros((n, c), dtype=bool)
    top = s.max(axis=1, keepdims=True)
    # Rank of each class within its image, 0 = best; stable so ties keep class order.
    order = np.argsort(-s, axis=1, kind="stable")
    rank = np.empty_like(order)
    rank[np.arange(n)[:, None], order] = np.arange(c)[None, :]

    if rule == "relative":
        if not 0.0 <= ratio <= 1.0:
            raise InvalidInputError(f"ratio must lie in [0, 1], got {ratio}")
        keep = s >= ratio * top
    elif rule == "threshold":
        keep = s >= threshold
    else:
        if rule == "topk":
            if k < 0:
                raise InvalidInputError(f"k must be >= 0, got {k}")
            count = np.full((n, 1), int(k))
        else:  # expected_count
            count = np.rint(s.sum(axis=1, keepdims=True)).astype(int)
        keep = rank < count
    keep |= rank < int(min_labels)
    if max_labels is not None:
        keep &= rank < int(max_labels)
    return keep & positive
