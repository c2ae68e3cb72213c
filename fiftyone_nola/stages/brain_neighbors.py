"""Exact neighbour queries within a Brain view's vectors (rows L2-normalised; distance is
``1 - cosine``), as the "faiss" backend answers full-view and radius queries."""

from __future__ import annotations

import faiss
import numpy as np


def _flat(v: np.ndarray):
    flat = faiss.IndexFlatIP(v.shape[1])
    flat.add(v)
    return flat


def view_kneighbors(v: np.ndarray, k: int) -> tuple[list, list]:
    """``(indices, distances)`` of the ``k`` nearest rows of ``v`` to each row, itself excluded."""
    inds, dists = [], []
    if len(v):
        sims, labels = _flat(v).search(v, min(k + 1, len(v)))
        for row, (s, lab) in enumerate(zip(sims, labels)):
            keep = lab != row
            s, lab = s[keep][:k], lab[keep][:k]
            inds.append(lab.astype(int))
            dists.append(1.0 - s.astype(float))
    return inds, dists


def radius_neighbors(v: np.ndarray, q: np.ndarray, thresh: float, exclude_self: bool) -> tuple[list, list]:
    """``(indices, distances)`` per query row of the rows of ``v`` within distance ``thresh``,
    nearest first; ``exclude_self`` (``q`` is ``v``) drops each row's own match."""
    # cosine distance <= thresh  <=>  similarity >= 1 - thresh
    lims, sims, labels = _flat(v).range_search(np.ascontiguousarray(q, np.float32), 1.0 - thresh - 1e-6)
    inds, dists = [], []
    for row in range(len(q)):
        lab = labels[lims[row] : lims[row + 1]]
        s = sims[lims[row] : lims[row + 1]]
        if exclude_self:
            keep = lab != row
            lab, s = lab[keep], s[keep]
        order = np.argsort(-s, kind="stable")
        inds.append(lab[order].astype(int))
        dists.append(1.0 - s[order].astype(float))
    return inds, dists
