"""TransCLIP's zero-shot solver and StatA: a Gaussian mixture over the image embeddings, a kNN
Laplacian term and a KL term toward a prior (the text zero-shot prediction or another method's).

Both minimise, by block-coordinate descent, over soft assignments z (N×K), class means mu and
diagonal covariances: ``-sum_i z_i·log N(x_i; mu, Sigma) - lap·sum_ij w_ij z_i·z_j + KL(z || y)``.
Each round evaluates the Gaussian log-likelihoods, takes ``z_steps`` closed-form z updates

    z_i ∝ y_i^lambda · exp((loglik_i + lap·50/(2k)·(W^T z + W z)_i) / 50)

then updates mu (normalised weighted means) and Sigma. TransCLIP: one shared diagonal
covariance (start 1/D), means started from each class's 8 most confident samples. StatA (the
safeguard): per-class diagonal covariances whose log-determinant enters the z update; means
start at the class text embeddings and each class's statistics are pulled back to them by
beta = n/(alpha+n), n its sample count, so a class with few or no samples stays at its text
embedding instead of capturing part of another class. Official defaults: 10 rounds, 5 z steps,
k = 3, lambda = 1, lap = 1, alpha = 1, hard counts.

Differences from the official code (same results on its inputs, see the goldens): everything
is streamed over rows (no N×K×D tensor; products over D in float32 like the official code,
the rest in float64); StatA's initial covariance is divided by
N once (the official code divides it again in each 2,500-row chunk, which only matters above
2,500 samples); a class whose assignments underflow to 0 keeps its previous mean.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import scipy.sparse as sp

from fiftyone_nola.core.progress import ProgressFn, null_progress
from fiftyone_nola.core.transductive.config import TransductiveConfig
from fiftyone_nola.core.transductive.graph import KnnGraph

ROW_CHUNK = 4096  # rows per block of the products over D (their float32 sums stay short)
CACHE_BYTES = 1 << 28  # below this the rows' squares are kept (N <= 128k at 512-d)
TEMPERATURE = 50.0  # the official z update's 1/50 scale (and its 50/(2k) Laplacian factor)
INIT_TOP = 8  # TransCLIP: a class's first mean is built from its 8 most confident samples
VAR_FLOOR = 1e-12


def affinity(graph: KnnGraph) -> sp.csr_matrix:
    """The sparse N×N matrix of the graph's inner products (row i: its k neighbours)."""
    n, k = graph.indices.shape
    ok = graph.indices >= 0
    rows = np.repeat(np.arange(n), k)[ok.ravel()]
    return sp.csr_matrix((graph.sims[ok].astype(np.float64), (rows, graph.indices[ok])), shape=(n, n))


def _unit(a: np.ndarray, previous: Optional[np.ndarray] = None) -> np.ndarray:
    norm = np.linalg.norm(a, axis=1, keepdims=True)
    out = np.divide(a, norm, out=np.zeros_like(a), where=norm > 0)
    if previous is not None:
        out = np.where(norm > 0, out, previous)
    return out


class Rows:
    """The rows of ``x`` as float32 blocks with their squares; the squares are computed once
    and kept when they fit in :data:`CACHE_BYTES` (every solver round reads them twice)."""

    def __init__(self, x: np.ndarray):
        self.x = x
        n, d = x.shape
        self._cache = None
        if 4 * n * d <= CACHE_BYTES:
            xc = np.asarray(x, dtype=np.float32)
            self._cache = [(0, xc, xc * xc)]

    def __len__(self) -> int:
        return len(self.x)

    def blocks(self):
        """``(start, rows, rows²)`` float32 blocks of at most :data:`ROW_CHUNK` rows."""
        if self._cache is not None:
            yield from self._cache
            return
        for s in range(0, len(self.x), ROW_CHUNK):
            xc = np.asarray(self.x[s : s + ROW_CHUNK], dtype=np.float32)
            yield s, xc, xc * xc


def loglik(rows: Rows, mu: np.ndarray, var: np.ndarray) -> np.ndarray:
    """``-0.5·sum_d (x_d - mu_kd)² / var_kd`` for every row and class (N×K float64); ``var`` is
    K×D (per class) or 1×D (shared: the ``x²`` term is then the same for every class and, as
    the z update normalises each row, left out). The products over D run in float32 (as the
    official code computes everything), the rest in float64."""
    inv = 1.0 / var
    a = (mu * inv).astype(np.float32)
    c = (mu * mu * inv).sum(axis=1)
    shared = len(var) == 1
    inv32 = inv.astype(np.float32)
    out = np.empty((len(rows), len(mu)), np.float64)
    for s, xc, x2 in rows.blocks():
        lik = c - 2.0 * (xc @ a.T)
        if not shared:
            lik += x2 @ inv32.T
        out[s : s + len(xc)] = -0.5 * lik
    return out


def weighted_moments(rows: Rows, z: np.ndarray, per_class: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(z^T x, z^T x², z.sum(0))``: first and second moments per class, float32 products
    summed in float64 over blocks; with ``per_class=False`` the second moment is summed over
    the classes (1×D)."""
    d = rows.x.shape[1]
    a = np.zeros((d, z.shape[1]))
    b = np.zeros((d, z.shape[1] if per_class else 1))
    for s, xc, x2 in rows.blocks():
        zc = z[s : s + len(xc)].astype(np.float32)
        a += xc.T @ zc  # D×K: x^T z, the fast orientation of this product
        b += x2.T @ (zc if per_class else zc.sum(axis=1, keepdims=True))
    return a.T, b.T, z.sum(axis=0)


def update_z(
    lik: np.ndarray,
    prior: np.ndarray,
    z: np.ndarray,
    W: sp.csr_matrix,
    coef: float,
    steps: int,
    kl_weight: float,
    follow: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """``steps`` z updates; returns ``(z, prior)`` (``follow``: the prior becomes each new z)."""
    Wt = W.T.tocsr()
    py = prior**kl_weight
    for _ in range(steps):
        t = lik + coef * (Wt @ z + W @ z)
        t -= t.max(axis=1, keepdims=True)
        t = py * np.exp(t / TEMPERATURE)
        z = t / t.sum(axis=1, keepdims=True)
        if follow:
            prior, py = z, z**kl_weight
    return z, prior


def init_means(x: np.ndarray, z: np.ndarray, top: int = INIT_TOP) -> np.ndarray:
    """TransCLIP's first means: per class, the z-weighted mean of its ``top`` highest-z samples."""
    top = min(top, len(z))
    rows = np.argpartition(-z, top - 1, axis=0)[:top]  # top×K
    mu = np.empty((z.shape[1], x.shape[1]))
    for c in range(z.shape[1]):
        r = rows[:, c]
        mu[c] = (z[r, c][:, None] * np.asarray(x[r], dtype=np.float64)).sum(axis=0)
    return _unit(mu)


def transclip(
    x: np.ndarray,
    prior: np.ndarray,
    graph: KnnGraph,
    config: Optional[TransductiveConfig] = None,
    progress: ProgressFn = null_progress,
) -> np.ndarray:
    """TransCLIP's zero-shot solver: assignments z (N×K float64) of ``x`` (N×D unit rows) from
    ``prior`` (N×K probabilities); settings from ``config`` (``transclip_k``, ``iterations``,
    ``z_steps``, ``kl_weight``, ``laplacian_weight``, ``prior_follows_iterate``)."""
    c = config or TransductiveConfig()
    prior = np.asarray(prior, dtype=np.float64)
    z = prior.copy()
    W = affinity(graph)
    rows = Rows(x)
    coef = c.laplacian_weight * TEMPERATURE / (2 * c.transclip_k)
    mu = init_means(x, z)
    var = np.full((1, x.shape[1]), 1.0 / x.shape[1])
    for it in range(c.iterations + 1):
        lik = loglik(rows, mu, var)
        z, prior = update_z(lik, prior, z, W, coef, c.z_steps, c.kl_weight, c.prior_follows_iterate)
        progress(it + 1, c.iterations + 1, "TransCLIP")
        if it == c.iterations:
            break
        a, b, n = weighted_moments(rows, z, per_class=False)
        mu = _unit(a / np.maximum(n, np.finfo(float).tiny)[:, None], mu)
        var = np.maximum((b[0] - (2 * mu * a - n[:, None] * mu * mu).sum(axis=0)) / n.sum(), VAR_FLOOR)[None]
    return z


def stata_beta(z: np.ndarray, alpha: float, soft: bool = False) -> np.ndarray:
    """How far each class follows its data rather than its anchor: n / (alpha + n)."""
    n = z.sum(axis=0) if soft else np.bincount(z.argmax(axis=1), minlength=z.shape[1]).astype(np.float64)
    return n / (alpha + n + (0.0 if soft else 1e-12))


def stata(
    x: np.ndarray,
    prior: np.ndarray,
    graph: KnnGraph,
    anchors: Optional[np.ndarray] = None,
    config: Optional[TransductiveConfig] = None,
    progress: ProgressFn = null_progress,
) -> np.ndarray:
    """StatA: assignments z (N×K float64) anchored on ``anchors`` (K×D unit rows in the space of
    ``x``: the class text embeddings). Without anchors (another feature space than the text's),
    the prior-weighted class means of ``x`` are the anchors. Settings from ``config`` (as
    :func:`transclip`, plus ``stata_alpha`` and ``stata_soft_beta``)."""
    c = config or TransductiveConfig()
    prior = np.asarray(prior, dtype=np.float64)
    z = prior.copy()
    rows = Rows(x)
    a0, b0, n0 = weighted_moments(rows, z)
    t = _unit(a0) if anchors is None else np.asarray(anchors, dtype=np.float64)
    # shared start: sum_i sum_k z_ik (x_i - t_k)² / N, for every class
    var0 = (b0.sum(axis=0) - 2 * (t * a0).sum(axis=0) + (n0[:, None] * t * t).sum(axis=0)) / len(x)
    var0 = np.maximum(np.tile(var0, (len(t), 1)), VAR_FLOOR)
    mu, var = t.copy(), var0.copy()
    W = affinity(graph)
    coef = c.laplacian_weight * TEMPERATURE / (2 * c.transclip_k)
    for it in range(c.iterations + 1):
        lik = loglik(rows, mu, var) - 0.5 * np.log(var).sum(axis=1)
        z, _ = update_z(lik, prior, z, W, coef, c.z_steps, c.kl_weight)
        progress(it + 1, c.iterations + 1, "StatA")
        if it == c.iterations:
            break
        beta = stata_beta(z, c.stata_alpha, c.stata_soft_beta)[:, None]
        a, b, n = weighted_moments(rows, z)
        mu = _unit(beta * _unit(a / np.maximum(n, np.finfo(float).tiny)[:, None], mu) + (1 - beta) * t, mu)
        own = (b - 2 * mu * a + n[:, None] * mu * mu) / np.maximum(n, np.finfo(float).tiny)[:, None]
        var = np.maximum(beta * own + (1 - beta) * (var0 + (t - mu) ** 2), VAR_FLOOR)
    return z
