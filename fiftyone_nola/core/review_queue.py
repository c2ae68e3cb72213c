"""Review maths with no FiftyOne in it: the order of the review queue, and which neighbours a
correction should be suggested for. Plain arrays/lists in (aligned by position), plain values out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Optional

import numpy as np


def as_conf(conf: Sequence) -> np.ndarray:
    """Confidences as float64 with NaN for missing (None) values."""
    return np.array([np.nan if c is None else float(c) for c in conf], dtype=np.float64)


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
