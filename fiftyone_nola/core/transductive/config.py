"""Settings of transductive labeling: the method, its published hyper-parameters, the safeguard
for datasets holding only some of the classes, the feature space and the neighbour search."""

from __future__ import annotations

from dataclasses import dataclass

from fiftyone_nola.core.errors import InvalidInputError

METHODS = ("transclip", "zlap")
FEATURE_SPACES = ("clip", "dino")
SEARCHES = ("auto", "exact", "ivf")


@dataclass
class TransductiveConfig:
    """Training-free labeling from stored embeddings and the class text prior.

    Defaults are the official code's: TransCLIP / StatA (MaxZanella/transduction-for-vlms,
    MaxZanella/StatA) and ZLaP (vladan-stojnic/ZLaP, its text-classifier setting).

    ``method``: ``"transclip"`` (Gaussian mixture + kNN Laplacian + KL to the prior) or
    ``"zlap"`` (label propagation from the class text nodes over a kNN graph).
    ``safeguard``: protect datasets that hold only some of the classes. TransCLIP then runs as
    StatA (Gaussians start at and are anchored on the class text embeddings, per-class
    covariances); ZLaP gets a presence check: classes the prior's argmax gives fewer than
    ``presence_share`` of an even share of the samples count as absent; with fewer than
    ``zlap_min_present`` of the classes present the prior (zero-shot) is kept, else a sample
    may move to an absent class only if it is its own prior argmax. ``False`` runs the
    methods as published.
    ``features``: the space of the Gaussians / the image graph. ``"dino"`` uses the stored DINO
    vectors with CLIP's text prior (NoLA's idea, without training).
    ``search``: the kNN graph: ``"exact"`` (blocked inner products over every vector),
    ``"ivf"`` (faiss k-means lists; each list's vectors are searched exactly among the
    ``nprobe`` nearest lists), ``"auto"`` (exact up to ``exact_max`` vectors, else ivf).
    """

    method: str = "transclip"
    safeguard: bool = True
    features: str = "clip"
    # TransCLIP / StatA
    transclip_k: int = 3  # neighbours of each sample in the affinity (self excluded)
    iterations: int = 10  # outer (z, mu, sigma) rounds; z is updated once more after the last
    z_steps: int = 5  # z updates per round
    kl_weight: float = 1.0  # lambda: weight of the KL term toward the prior (zero-shot: 1)
    laplacian_weight: float = 1.0  # weight of the kNN term (StatA's lambda_laplacian)
    stata_alpha: float = 1.0  # StatA: anchor weight; a class of n samples moves n/(alpha+n) of the way
    stata_soft_beta: bool = False  # StatA: n from soft assignments instead of argmax counts
    # The official zero-shot code started from predictions aliases its prior to z, so the KL
    # term then anchors on the previous iterate; True reproduces it (False: the paper's fixed prior).
    prior_follows_iterate: bool = False
    # ZLaP
    zlap_k: int = 5  # image neighbours, the sample itself included (as the official search returns it)
    zlap_gamma: float = 5.0  # power of the image-text similarities
    zlap_alpha: float = 0.3  # propagation weight: L = I - alpha * normalised affinity
    zlap_tol: float = 1e-6  # conjugate-gradient relative tolerance
    zlap_maxiter: int = 50  # conjugate-gradient iterations per class
    # ZLaP safeguard: a class is present if the prior's argmax gives it this fraction of N / C
    # samples; with fewer than zlap_min_present of the classes present, the prior is kept.
    presence_share: float = 0.25
    zlap_min_present: float = 0.5
    # The text prior: softmax(logit_scale * cos(image, class text embedding)), as zero-shot; a
    # sigmoid CLIP (SigLIP) uses the zero-shot stage's own scores and its learnt scale instead
    logit_scale: float = 100.0
    # kNN graph
    search: str = "auto"
    exact_max: int = 20_000  # auto: exact search up to this many vectors
    nprobe: int = 8  # ivf: lists searched per list (of about sqrt(N) lists)

    @property
    def k(self) -> int:
        """The neighbours of the chosen method."""
        return self.zlap_k if self.method == "zlap" else self.transclip_k

    def problems(self) -> list[str]:
        """What is wrong with these settings (empty when they are usable)."""
        out = []
        for name, allowed in (("method", METHODS), ("features", FEATURE_SPACES), ("search", SEARCHES)):
            if getattr(self, name) not in allowed:
                out.append(f"{name} must be one of {', '.join(allowed)}, not {getattr(self, name)!r}")
        ints = ("transclip_k", "zlap_k", "iterations", "z_steps", "zlap_maxiter", "nprobe", "exact_max")
        for name in ints:
            v = getattr(self, name)
            low = 0 if name == "iterations" else 1
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                out.append(f"{name} must be an integer >= {low}, not {v!r}")
        if self.zlap_k < 2 and isinstance(self.zlap_k, int):
            out.append("zlap_k counts the sample itself: it must be at least 2")
        for name in (
            "kl_weight", "laplacian_weight", "stata_alpha", "zlap_gamma", "logit_scale", "presence_share",
            "zlap_min_present",
        ):  # fmt: skip
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
                out.append(f"{name} must be a number >= 0, not {v!r}")
        if not (isinstance(self.zlap_alpha, (int, float)) and 0 < self.zlap_alpha < 1):
            out.append(f"zlap_alpha must be in (0, 1), not {self.zlap_alpha!r}")
        if not (isinstance(self.zlap_tol, (int, float)) and self.zlap_tol > 0):
            out.append(f"zlap_tol must be > 0, not {self.zlap_tol!r}")
        return out

    def check(self) -> None:
        """Raise :class:`InvalidInputError` listing every problem of these settings."""
        bad = self.problems()
        if bad:
            raise InvalidInputError("Transductive settings: " + "; ".join(bad))
