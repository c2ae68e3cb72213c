"""ZLaP: zero-shot label propagation over a graph of images and class text embeddings.

Nodes are the C classes' text embeddings, then the N images. Each image links to its ``k - 1``
nearest other images (the official search returns k including the image itself, whose
self-loop is then removed) and to its ``min(k, C)`` most similar classes, with similarity^gamma
on those text links; negative similarities are 0. The affinity is symmetrised (W + W^T),
normalised (D^-1/2 W D^-1/2, degree 0 counted as 1) and, with L = I - alpha·W_n, class c's
score of every node is the solution of L f = e_c, one conjugate-gradient solve per class
(tolerance 1e-6 relative, at most 50 iterations, as the official code). Official defaults
(text classifier): k = 5, gamma = 5, alpha = 0.3.

Inductive labeling of new images (the official "inductive" mode solves L f = y once per image,
y its neighbours' similarities): since L is symmetric, f's class entries equal
``sum_j y_j · F[j]`` with F the (N+C)×C per-class solutions already computed, so new images cost
one kNN search and a weighted sum; "sparse" keeps only each row's largest entry of F, as the
official sparse-inductive mode.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import scipy.sparse as sp
from scipy.sparse.linalg import cg

from fiftyone_nola.core.progress import ProgressFn, null_progress
from fiftyone_nola.core.transductive.config import TransductiveConfig
from fiftyone_nola.core.transductive.graph import KnnGraph


@dataclass
class ZlapResult:
    """``scores`` of the images (N×C); ``nodes``: the solutions at every node, classes first
    ((C+N)×C), what inductive labeling reads."""

    scores: np.ndarray
    nodes: np.ndarray


def text_links(text_sims: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each image's ``min(k, C)`` most similar classes: ``(class indices, similarities)``."""
    s = np.asarray(text_sims, dtype=np.float32)
    kk = min(k, s.shape[1])
    idx = np.argpartition(-s, kk - 1, axis=1)[:, :kk]
    return idx.astype(np.int64), np.take_along_axis(s, idx, axis=1)


def laplacian(graph: KnnGraph, text_sims: np.ndarray, k: int, gamma: float, alpha: float) -> sp.csr_matrix:
    """``I - alpha·D^-1/2 (W + W^T) D^-1/2`` over the C text nodes then the N images."""
    n, c = text_sims.shape
    t_idx, t_sim = text_links(text_sims, k)
    ok = graph.indices >= 0
    rows = np.concatenate([np.repeat(np.arange(n), graph.k)[ok.ravel()], np.repeat(np.arange(n), t_idx.shape[1])])
    cols = np.concatenate([graph.indices[ok] + c, t_idx.ravel()])
    vals = np.concatenate(
        [np.maximum(graph.sims[ok], 0).astype(np.float64), np.maximum(t_sim.ravel(), 0).astype(np.float64) ** gamma]
    )
    W = sp.csr_matrix((vals, (rows + c, cols)), shape=(n + c, n + c))
    W = (W + W.T).tocsr()
    W = (W - sp.diags(W.diagonal())).tocsr()  # no self-loops
    W.eliminate_zeros()
    deg = np.asarray(W.sum(axis=1)).ravel()
    deg[deg == 0] = 1.0
    d = sp.diags(1.0 / np.sqrt(deg))
    return (sp.identity(n + c, format="csr") - alpha * (d @ W @ d)).tocsr()


def zlap(
    graph: KnnGraph,
    text_sims: np.ndarray,
    config: Optional[TransductiveConfig] = None,
    progress: ProgressFn = null_progress,
) -> ZlapResult:
    """ZLaP's transductive scores of N images from their ``graph`` (``zlap_k - 1`` neighbours
    each, self excluded) and ``text_sims`` (N×C cosine similarity to each class text
    embedding); settings ``zlap_*`` of ``config``."""
    cfg = config or TransductiveConfig()
    n, c = text_sims.shape
    L = laplacian(graph, text_sims, cfg.zlap_k, cfg.zlap_gamma, cfg.zlap_alpha)
    nodes = np.empty((n + c, c), np.float64)
    for j in range(c):
        e = np.zeros(n + c)
        e[j] = 1.0
        nodes[:, j] = cg(L, e, rtol=cfg.zlap_tol, maxiter=cfg.zlap_maxiter)[0]
        progress(j + 1, c, "ZLaP: one solve per class")
    return ZlapResult(nodes[c:], nodes)


def zlap_inductive(
    nodes: np.ndarray,
    neighbors: np.ndarray,
    neighbor_sims: np.ndarray,
    text_sims: np.ndarray,
    k: int = 5,
    gamma: float = 5.0,
    sparse: bool = False,
) -> np.ndarray:
    """Scores (M×C) of M new images from a transductive run's ``nodes``: ``neighbors`` are
    positions of their k nearest images of that run (M×k, -1 for none), ``neighbor_sims`` the
    similarities, ``text_sims`` (M×C) their class similarities."""
    c = nodes.shape[1]
    F = nodes
    if sparse:
        F = np.zeros_like(nodes)
        top = nodes.argmax(axis=1)
        F[np.arange(len(nodes)), top] = nodes[np.arange(len(nodes)), top]
    t_idx, t_sim = text_links(text_sims, k)
    ok = neighbors >= 0
    img = np.where(ok, np.maximum(neighbor_sims, 0), 0.0).astype(np.float64)
    txt = np.maximum(t_sim, 0).astype(np.float64) ** gamma
    out = np.einsum("mk,mkc->mc", img, F[np.where(ok, neighbors + c, 0)])
    out += np.einsum("mk,mkc->mc", txt, F[t_idx])
    return out


def zlap_probabilities(scores: np.ndarray, fallback: np.ndarray) -> np.ndarray:
    """Scores as probabilities: each row's non-negative scores over their sum (argmax kept);
    a row with no positive score takes ``fallback``'s row (the text prior)."""
    s = np.maximum(np.asarray(scores, dtype=np.float64), 0)
    tot = s.sum(axis=1, keepdims=True)
    return np.where(tot > 0, s / np.where(tot > 0, tot, 1), fallback)


def presence_mask(prior: np.ndarray, share: float) -> np.ndarray:
    """Classes the prior's argmax gives at least ``share`` times as many samples as its most
    frequent class."""
    counts = np.bincount(prior.argmax(axis=1), minlength=prior.shape[1])
    return counts >= share * counts.max()


def presence_check(probs: np.ndarray, prior: np.ndarray, share: float, min_present: float) -> tuple[np.ndarray, dict]:
    """ZLaP's safeguard for datasets holding only some of the classes (where label propagation
    was shown to fall far below zero-shot: StatA, CVPR 2025).

    The prior's argmax counts say which classes are present (:func:`presence_mask`). If fewer
    than ``min_present`` of the classes are, the prior itself is returned (the zero-shot
    labels). Otherwise a sample may take a class deemed absent only if it is its own prior
    argmax: other such probabilities are zeroed and the row renormalised. Returns the
    probabilities and ``{"present": m, "fell_back": bool, "moved": n}``.
    """
    present = presence_mask(prior, share)
    m = int(present.sum())
    if m < min_present * prior.shape[1]:
        return prior.copy(), {"present": m, "fell_back": True, "moved": int((probs.argmax(1) != prior.argmax(1)).sum())}
    allowed = np.broadcast_to(present, probs.shape).copy()
    allowed[np.arange(len(prior)), prior.argmax(axis=1)] = True
    p = np.where(allowed, probs, 0.0)
    tot = p.sum(axis=1, keepdims=True)
    p = np.where(tot > 0, p / np.where(tot > 0, tot, 1), np.where(allowed, prior, 0.0))
    p /= p.sum(axis=1, keepdims=True)
    return p, {"present": m, "fell_back": False, "moved": int((p.argmax(axis=1) != probs.argmax(axis=1)).sum())}
