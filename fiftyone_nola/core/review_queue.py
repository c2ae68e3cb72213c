"""Review maths with no FiftyOne in it: what a threshold flags, histograms, per-class counts,
the order of the review queue, and which neighbours a correction should be suggested for.

Everything here takes plain arrays/lists (aligned by position) and returns plain values, so the
panel, the operators and the tests share one definition of "flagged", "reviewed" and "queue".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Optional

import numpy as np


def as_conf(conf: Sequence) -> np.ndarray:
    """Confidences as float64 with NaN for missing (None) values."""
    return np.array([np.nan if c is None else float(c) for c in conf], dtype=np.float64)


def flag_mask(
    conf: Sequence, labels: Sequence, threshold: Optional[float] = None, bottom_k_per_class: Optional[int] = None
) -> np.ndarray:
    """Which samples a threshold and/or the k least confident per predicted class flag.

    Samples with no prediction (NaN confidence or no label) are always flagged.
    """
    c = as_conf(conf)
    labels = list(labels)
    flag = np.isnan(c) | np.array([lab is None for lab in labels], dtype=bool)
    if threshold is not None:
        flag |= c < float(threshold)
    if bottom_k_per_class:
        by_class: dict = {}
        for i, lab in enumerate(labels):
            if lab is not None and not np.isnan(c[i]):
                by_class.setdefault(lab, []).append(i)
        for rows in by_class.values():
            rows.sort(key=lambda i: (c[i], i))
            flag[rows[: int(bottom_k_per_class)]] = True
    return flag


def histogram(conf: Sequence, bins: int = 20, threshold: Optional[float] = None) -> dict:
    """Counts of confidences in ``bins`` equal bins over [0, 1]; with a threshold, the counts
    split into below (flagged) and at-or-above, bin by bin (a bin holding the threshold is split
    exactly by value)."""
    c = as_conf(conf)
    c = c[np.isfinite(c)]
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(c, edges[1:-1]), 0, bins - 1)
    below = c < threshold if threshold is not None else np.zeros(len(c), bool)
    lo = np.bincount(which[below], minlength=bins)
    hi = np.bincount(which[~below], minlength=bins)
    return {
        "edges": [round(float(e), 4) for e in edges],
        "below": lo.tolist(),
        "above": hi.tolist(),
        "centers": [round(float(e), 4) for e in (edges[:-1] + edges[1:]) / 2],
    }


def class_rows(
    labels: Sequence,
    conf: Sequence,
    flagged: Sequence[bool],
    reviewed: Sequence[bool],
    classes: Optional[Sequence[str]] = None,
    digits: int = 3,
) -> list[dict]:
    """Per predicted class: count, mean confidence (rounded), flagged, reviewed (of the flagged)
    and remaining (flagged, not reviewed). Classes of ``classes`` with no sample get a zero row."""
    c = as_conf(conf)
    flagged = np.asarray(flagged, dtype=bool)
    reviewed = np.asarray(reviewed, dtype=bool)
    names = list(classes or [])
    names += sorted({lab for lab in labels if lab is not None and lab not in names})
    rows = []
    for name in names:
        idx = np.array([i for i, lab in enumerate(labels) if lab == name], dtype=int)
        cc = c[idx] if len(idx) else np.array([])
        f = flagged[idx] if len(idx) else np.array([], bool)
        r = reviewed[idx] if len(idx) else np.array([], bool)
        mean = float(np.nanmean(cc)) if len(cc) and np.isfinite(cc).any() else None
        rows.append(
            {
                "class": name,
                "count": int(len(idx)),
                "mean_confidence": None if mean is None else round(mean, digits),
                "flagged": int(f.sum()),
                "reviewed": int((f & r).sum()),
                "remaining": int((f & ~r).sum()),
            }
        )
    return rows


def kmeans(vectors: np.ndarray, k: int, iters: int = 20, seed: int = 0) -> np.ndarray:
    """Cluster assignments of the rows of ``vectors`` (k-means++ start, Lloyd steps)."""
    x = np.asarray(vectors, dtype=np.float32)
    n = len(x)
    k = max(1, min(int(k), n))
    if n == 0:
        return np.zeros(0, dtype=int)
    rng = np.random.default_rng(seed)
    centers = [x[rng.integers(n)]]
    d2 = ((x - centers[0]) ** 2).sum(1)
    for _ in range(1, k):
        p = d2 / d2.sum() if d2.sum() > 0 else np.full(n, 1.0 / n)
        centers.append(x[rng.choice(n, p=p)])
        d2 = np.minimum(d2, ((x - centers[-1]) ** 2).sum(1))
    cen = np.stack(centers)
    assign = np.zeros(n, dtype=int)
    for _ in range(iters):
        dist = (x * x).sum(1)[:, None] - 2 * x @ cen.T + (cen * cen).sum(1)[None, :]
        new = dist.argmin(1)
        if (new == assign).all() and _ > 0:
            break
        assign = new
        for j in range(k):
            m = assign == j
            if m.any():
                cen[j] = x[m].mean(0)
    return assign


def review_order(conf: Sequence, labels: Sequence, clusters: Optional[Sequence[int]] = None) -> list[int]:
    """Positions in review order: the most doubtful first, spread over classes and clusters.

    Samples are grouped by (predicted class, embedding cluster); inside a group the least
    confident comes first. The queue takes the least confident sample of every group (lowest
    confidence first), then the second of every group, and so on: a run of near-duplicates
    in one group never fills the head of the queue.
    """
    c = as_conf(conf)
    key_conf = np.where(np.isnan(c), -1.0, c)  # no prediction: most doubtful
    clusters = list(clusters) if clusters is not None else [0] * len(c)
    groups: dict = {}
    for i in range(len(c)):
        groups.setdefault((str(labels[i]), int(clusters[i])), []).append(i)
    rank = np.zeros(len(c), dtype=int)
    for rows in groups.values():
        rows.sort(key=lambda i: (key_conf[i], i))
        for r, i in enumerate(rows):
            rank[i] = r
    return sorted(range(len(c)), key=lambda i: (rank[i], key_conf[i], i))


def propagation_suggestions(
    corrections: Sequence[tuple[str, Optional[str], str]],
    neighbours: Mapping[str, Sequence[tuple[str, float]]],
    predicted: Mapping[str, Optional[str]],
    reviewed: set,
    min_similarity: float,
) -> dict[str, dict]:
    """Which unreviewed neighbours should get a corrected label as a suggestion.

    ``corrections``: (sample id, the model's wrong label, the reviewer's label) for each
    corrected sample; ``neighbours``: id -> [(neighbour id, cosine similarity)];
    ``predicted``: id -> the model's label; ``reviewed``: ids a person already decided.
    A neighbour qualifies when it is not reviewed, is at least ``min_similarity`` similar and
    carries the same wrong label as the corrected sample. If several corrections reach one
    neighbour, the most similar wins. Returns neighbour id -> {label, similarity, source, wrong}.
    """
    out: dict[str, dict] = {}
    for sid, wrong, right in corrections:
        if wrong is None or wrong == right:
            continue
        for nid, sim in neighbours.get(sid, ()):
            if nid == sid or nid in reviewed or sim < min_similarity or predicted.get(nid) != wrong:
                continue
            if nid not in out or sim > out[nid]["similarity"]:
                out[nid] = {"label": right, "similarity": round(float(sim), 4), "source": sid, "wrong": wrong}
    return out
