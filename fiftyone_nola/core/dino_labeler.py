"""NoLA stage 2: the DINO labelling network (pseudo-labels aligned to DINO's feature space).

The CLIP zero-shot classifier picks, per class, its k most confident images; a small MLP on
frozen DINO features is trained on those picks and then labels every image. Faithful to the
official code (fazliimam/NoLA @ ffd99acda629): ``top_k_indices_per_class2`` for the picks,
``find_k`` for k, ``AdapterMLP`` + ``NoLA.train_taal`` for the network and its training.
Pure numpy / torch: no FiftyOne here.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fiftyone_nola.core import device as dev
from fiftyone_nola.core.config import bounded
from fiftyone_nola.core.errors import IndexMismatchError, InvalidInputError, ModelNotFoundError
from fiftyone_nola.core.progress import ProgressFn, null_progress
from fiftyone_nola.core.storage import atomic_path

CHECKPOINT_FORMAT = "fiftyone_nola.dino_labeler"
CHECKPOINT_VERSION = 1
TOP_RANKS = 3  # fallback depth of the official selection: top-1, then top-2, then top-3
# What the MLP trains on: "raw" DINO CLS features, as the official code (NoLA.select_top_k ->
# dino_emb -> train_taal); "normalized": unit-length rows (this project's behaviour before).
FEATURES = ("raw", "normalized")


def topk_per_class(n_samples: int, n_classes: int) -> int:
    """Picks per class: ``max(16, floor(0.2 * N / C))``, as the official ``find_k`` (no upper cap)."""
    if n_classes < 1:
        raise InvalidInputError(f"n_classes must be >= 1, not {n_classes}")
    if n_samples < 0:
        raise InvalidInputError(f"n_samples must be >= 0, not {n_samples}")
    return max(16, math.floor(n_samples / n_classes * 0.2))


class Selection(NamedTuple):
    """Confident picks: sample ``indices[i]`` gets label ``labels[i]``.

    ``counts[c]`` is how many samples class c kept; ``ranks[c]`` which rank filled it
    (1 = top-1, 2/3 = fallback, 0 = nothing); ``warnings`` explains fallbacks and empty classes.
    """

    indices: np.ndarray
    labels: np.ndarray
    counts: dict
    ranks: dict
    warnings: list


def select_confident(probs: np.ndarray, k: int) -> Selection:
    """Per class, the (at most) ``k`` samples the classifier is most confident about.

    Mirrors the official ``top_k_indices_per_class2``: class c takes the samples whose top-1 is
    c, by top-1 confidence, best first. Only if no sample has c as top-1 does it take those with
    c as top-2 (sorted by the top-2 probability), and only if none has c as top-2, top-3.
    Picks are concatenated in class order and deduplicated keeping the first occurrence, so a
    sample claimed twice (possible only through a fallback) keeps the label of the
    lower-numbered class. Ties break deterministically: among classes of equal probability the
    lower class index ranks first; among samples of equal confidence the lower sample index.
    Rows with NaN are never picked. Unlike the official code (which iterates the classes found
    in the ground truth and raises when one gets nothing) every class 0..C-1 is visited and an
    empty class is reported in ``warnings``.
    """
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] < 1:
        raise InvalidInputError(f"probs must be N x C with C >= 1, got shape {p.shape}")
    if int(k) < 1:
        raise InvalidInputError(f"k must be >= 1, not {k}")
    k = int(k)
    n, c = p.shape
    valid = np.isfinite(p).all(axis=1)
    depth = min(TOP_RANKS, c)
    # Stable sort of -p: equal probabilities rank the lower class first.
    top = np.argsort(-np.where(valid[:, None], p, 0.0), axis=1, kind="stable")[:, :depth]
    top_conf = np.take_along_axis(p, top, axis=1)
    picked_idx, picked_lab = [], []
    counts, ranks, warnings = {}, {}, []
    for cls in range(c):
        cand = np.empty(0, dtype=np.int64)
        rank = 0
        for r in range(depth):
            cand = np.flatnonzero(valid & (top[:, r] == cls))
            if cand.size:
                rank = r + 1
                break
        ranks[cls] = rank
        if rank == 0:
            warnings.append(
                f"class {cls}: no sample has it among its top-{depth} predictions; it gets no pseudo-labels"
            )
            continue
        if rank > 1:
            warnings.append(
                f"class {cls}: no sample has it as top-1; fell back to {cand.size} sample(s) with it as top-{rank}"
            )
        order = np.lexsort((cand, -top_conf[cand, rank - 1]))  # confidence desc, then index asc
        chosen = cand[order][:k]
        picked_idx.append(chosen)
        picked_lab.append(np.full(chosen.size, cls, dtype=np.int64))
    if picked_idx:
        idx = np.concatenate(picked_idx).astype(np.int64)
        lab = np.concatenate(picked_lab)
        _, first = np.unique(idx, return_index=True)
        keep = np.sort(first)
        idx, lab = idx[keep], lab[keep]
    else:
        idx = np.empty(0, dtype=np.int64)
        lab = np.empty(0, dtype=np.int64)
    for cls in range(c):
        counts[cls] = int(np.sum(lab == cls))
        if ranks[cls] and counts[cls] == 0:
            warnings.append(f"class {cls}: all its candidates were already taken by lower-numbered classes")
    return Selection(idx, lab, counts, ranks, warnings)


def check_features_option(features: str) -> None:
    """Raise unless ``features`` is one of :data:`FEATURES`."""
    if features not in FEATURES:
        raise InvalidInputError(
            f"DINO labeller features must be one of {FEATURES} ('raw': the official unnormalised "
            f"CLS features; 'normalized': unit-length rows), not {features!r}"
        )


@dataclass
class DinoLabelerConfig:
    """Stage 2 settings; defaults are the official ones (hidden 256, Adam 1e-3, batch 32, 50 epochs)."""

    hidden: int = 256
    epochs: int = bounded(50, 1, 100_000, True, "epochs")
    lr: float = 1e-3
    batch_size: int = 32
    seed: int = 0
    device: Optional[str] = None
    k: Optional[int] = None  # picks per class; None: topk_per_class(N, C)
    features: str = "raw"  # "raw": unnormalised DINO features (official); "normalized": unit rows


class DinoLabeler(nn.Module):
    """Linear(F -> hidden) -> ReLU -> Linear(hidden -> C) on frozen DINO features."""

    def __init__(self, in_features: int, n_classes: int, hidden: int = 256):
        super().__init__()
        self.in_features, self.n_classes, self.hidden = int(in_features), int(n_classes), int(hidden)
        self.mlp = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, n_classes))
        self.classes: Optional[list] = None
        self.meta: dict = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


def _check_training_set(features, indices, labels, n_classes):
    x = np.asarray(features)
    if x.ndim != 2:
        raise InvalidInputError(f"features must be N x F, got shape {x.shape}")
    idx = np.asarray(indices, dtype=np.int64).ravel()
    lab = np.asarray(labels, dtype=np.int64).ravel()
    if idx.size == 0:
        raise InvalidInputError("no training samples: nothing was selected to train the DINO labeller on")
    if idx.size != lab.size:
        raise InvalidInputError(f"{idx.size} indices but {lab.size} labels")
    if idx.min() < 0 or idx.max() >= len(x):
        raise InvalidInputError(f"training indices must lie in [0, {len(x)})")
    if lab.min() < 0 or lab.max() >= n_classes:
        raise InvalidInputError(f"training labels must lie in [0, {n_classes})")
    xs = np.asarray(x[idx], dtype=np.float32)
    if not np.isfinite(xs).all():
        raise InvalidInputError("some selected samples have missing (NaN) DINO features")
    return xs, lab


def train_labeler(
    features: np.ndarray,
    indices: Sequence[int],
    labels: Sequence[int],
    n_classes: int,
    config: Optional[DinoLabelerConfig] = None,
    progress: ProgressFn = null_progress,
) -> DinoLabeler:
    """Train the MLP on ``features[indices]`` with hard ``labels`` (Adam, cross-entropy, shuffled batches).

    Deterministic for a given ``config.seed``: weight init and batch order come from a private
    RNG stream seeded with it, in the same order as the official ``AdapterMLP`` + ``train_taal``,
    so equal seeds give the official network exactly. The global RNG is left untouched.
    """
    cfg = config or DinoLabelerConfig()
    if n_classes < 1 or cfg.epochs < 0 or cfg.batch_size < 1 or cfg.hidden < 1:
        raise InvalidInputError(f"bad DINO labeller settings: n_classes={n_classes}, {cfg}")
    xs, lab = _check_training_set(features, indices, labels, n_classes)
    device = dev.resolve_device(cfg.device)
    # Callers may sit inside no_grad / inference_mode (e.g. a labelling pipeline): training needs grads.
    with (
        torch.random.fork_rng(devices=[]),
        dev.small_steps_on_cpu(device),
        torch.inference_mode(False),
        torch.enable_grad(),
    ):
        torch.manual_seed(cfg.seed)
        mlp = DinoLabeler(xs.shape[1], n_classes, cfg.hidden)
        mlp.to(device)
        # RandomSampler draws each epoch's permutation from the (forked) global RNG.
        loader = DataLoader(
            TensorDataset(torch.from_numpy(xs), torch.from_numpy(lab)), batch_size=cfg.batch_size, shuffle=True
        )
        opt = torch.optim.Adam(mlp.parameters(), lr=cfg.lr)
        loss_fn = nn.CrossEntropyLoss()
        mlp.train()
        progress(0, cfg.epochs, "training DINO labeller")
        for epoch in range(cfg.epochs):
            for xb, yb in loader:
                xb, yb = xb.to(device), yb.to(device)
                opt.zero_grad()
                loss = loss_fn(mlp(xb), yb)
                loss.backward()
                opt.step()
            progress(epoch + 1, cfg.epochs, "training DINO labeller")
    return mlp.eval()


def label_all(mlp: nn.Module, features: np.ndarray, batch_size: int = 4096, device: Optional[str] = None) -> np.ndarray:
    """Softmax of the MLP over every row: ``N x C`` float32; rows with missing features are NaN."""
    x = np.asarray(features, dtype=np.float32)
    if x.ndim != 2:
        raise InvalidInputError(f"features must be N x F, got shape {x.shape}")
    params = list(mlp.parameters())
    torch_device = dev.resolve_device(device) if device else (params[0].device if params else torch.device("cpu"))
    mlp = mlp.to(torch_device).eval()
    n_out = getattr(mlp, "n_classes", None)
    valid = np.isfinite(x).all(axis=1)
    chunks = []
    with torch.inference_mode():
        for start in range(0, len(x), batch_size):
            xb = torch.from_numpy(np.nan_to_num(x[start : start + batch_size])).to(torch_device)
            chunks.append(torch.softmax(mlp(xb).float(), dim=-1).cpu().numpy())
    if chunks:
        probs = np.concatenate(chunks)
    else:
        probs = np.zeros((0, n_out or 0), dtype=np.float32)
    probs[~valid] = np.nan
    return probs.astype(np.float32, copy=False)


@dataclass
class DinoLabelResult:
    """Stage 2 output. ``labels`` is -1 (and confidence NaN) where a sample had no DINO features.

    ``selected_indices`` / ``selected_labels`` are the training set actually used: the
    confident picks, then the trusted labels (which replace any pick of the same sample).
    """

    labels: np.ndarray
    confidence: np.ndarray
    probs: np.ndarray
    selected_indices: np.ndarray
    selected_labels: np.ndarray
    k: int
    warnings: list = field(default_factory=list)
    counts: dict = field(default_factory=dict)  # training samples per class
    model: Optional[DinoLabeler] = None


def dino_pseudo_labels(
    zs_probs: np.ndarray,
    dino_features: np.ndarray,
    config: Optional[DinoLabelerConfig] = None,
    trusted: Optional[Mapping[int, int]] = None,
    progress: ProgressFn = null_progress,
) -> DinoLabelResult:
    """Stage 2 in one call: confident picks from ``zs_probs``, MLP on ``dino_features``, labels for all.

    ``dino_features`` are used as given with ``config.features="raw"`` (official: the raw CLS
    features), L2-normalised per row with ``"normalized"``.

    ``trusted`` maps sample index -> class (e.g. reviewer-corrected labels); they join the
    training set and take priority over the automatic pick of the same sample. Samples missing
    either a zero-shot score or DINO features are never picked; k counts only usable samples.
    """
    cfg = config or DinoLabelerConfig()
    zs, feats = _checked_inputs(zs_probs, dino_features, cfg.features)
    n, c = zs.shape
    has_feat = np.isfinite(feats).all(axis=1)
    usable = np.isfinite(zs).all(axis=1) & has_feat
    warnings: list = []
    if not usable.all():
        warnings.append(f"{int((~usable).sum())} of {n} samples lack a zero-shot score or DINO features; never picked")
    k = int(cfg.k) if cfg.k is not None else topk_per_class(int(usable.sum()), c)
    sel = select_confident(np.where(usable[:, None], zs, np.nan), k)
    warnings.extend(sel.warnings)
    idx, lab = sel.indices, sel.labels

    if trusted:
        idx, lab = _with_trusted(idx, lab, trusted, has_feat, c, warnings)

    if idx.size == 0:
        raise InvalidInputError(
            "no sample could be selected to train the DINO labeller: compute CLIP scores and DINO features first"
        )
    counts = {cls: int(np.sum(lab == cls)) for cls in range(c)}
    if sum(1 for v in counts.values() if v) < 2:
        warnings.append("the DINO labeller is trained on a single class: its labels will all be that class")
    mlp = train_labeler(feats, idx, lab, c, cfg, progress=progress)
    probs = label_all(mlp, feats)
    valid = ~np.isnan(probs).any(axis=1)
    labels = np.full(n, -1, dtype=np.int64)
    conf = np.full(n, np.nan, dtype=np.float32)
    labels[valid] = probs[valid].argmax(axis=1)
    conf[valid] = probs[valid].max(axis=1)
    return DinoLabelResult(labels, conf, probs, idx, lab, k, warnings, counts, mlp)


def save_labeler(path, mlp: DinoLabeler, classes: Sequence[str], meta: Optional[dict] = None) -> Path:
    """Write the MLP, its class list and JSON-able ``meta`` to ``path`` (atomically)."""
    classes = [str(c) for c in classes]
    sd = {k: v.detach().cpu().clone() for k, v in mlp.state_dict().items()}
    if "mlp.0.weight" not in sd or "mlp.2.weight" not in sd:
        raise InvalidInputError("save_labeler expects a DinoLabeler (Linear -> ReLU -> Linear in .mlp)")
    hidden, in_features = sd["mlp.0.weight"].shape
    n_classes = sd["mlp.2.weight"].shape[0]
    if n_classes != len(classes):
        raise InvalidInputError(f"the labeller has {n_classes} outputs but {len(classes)} classes were given")
    meta = dict(meta or {})
    try:
        meta = json.loads(json.dumps(meta))  # plain types only: the file is read with weights_only=True
    except (TypeError, ValueError) as e:
        raise InvalidInputError(f"labeller meta must be JSON-serialisable: {e}") from e
    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "classes": classes,
        "in_features": int(in_features),
        "hidden": int(hidden),
        "n_classes": int(n_classes),
        "state_dict": sd,
        "meta": meta,
    }
    path = Path(path)
    with atomic_path(path) as tmp:  # unique temp name, fsynced: a kill leaves old or new
        torch.save(payload, tmp)
    return path


def load_labeler(path, classes: Sequence[str]) -> DinoLabeler:
    """Load a labeller saved by ``save_labeler``; refuses one trained for another class list.

    The returned module carries ``.classes`` and ``.meta``.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelNotFoundError(f"no DINO labeller at {path}: run stage 2 (DINO labelling) first")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise IndexMismatchError(f"{path} is not a readable DINO labeller checkpoint ({e}); re-run stage 2") from e
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise IndexMismatchError(f"{path} is not a DINO labeller checkpoint; re-run stage 2")
    stored = list(payload["classes"])
    classes = [str(c) for c in classes]
    if stored != classes:
        extra = sorted(set(classes) - set(stored))[:5]
        gone = sorted(set(stored) - set(classes))[:5]
        detail = f"new {extra}, missing {gone}" if (extra or gone) else "same classes, different order"
        raise IndexMismatchError(
            f"the DINO labeller at {path} was trained for {len(stored)} classes, not these {len(classes)} "
            f"({detail}); re-run stage 2 for the current class list"
        )
    mlp = DinoLabeler(payload["in_features"], payload["n_classes"], payload["hidden"])
    mlp.load_state_dict(payload["state_dict"])
    mlp.classes = stored
    mlp.meta = payload.get("meta", {})
    return mlp.eval()


def _checked_inputs(zs_probs, dino_features, features: str) -> tuple[np.ndarray, np.ndarray]:
    """float32 copies of both arrays, checked to align; DINO rows L2-normalised if asked."""
    check_features_option(features)
    zs = np.asarray(zs_probs, dtype=np.float32)
    feats = np.asarray(dino_features, dtype=np.float32)
    if zs.ndim != 2 or feats.ndim != 2:
        raise InvalidInputError(f"expected N x C probs and N x F features, got {zs.shape} and {feats.shape}")
    if features == "normalized":
        norms = np.linalg.norm(feats, axis=1, keepdims=True)
        feats = np.divide(feats, norms, out=np.zeros_like(feats), where=norms > 0)
        feats[~np.isfinite(norms[:, 0])] = np.nan
    if len(zs) != len(feats):
        raise InvalidInputError(f"{len(zs)} zero-shot rows but {len(feats)} DINO feature rows: they must align")
    return zs, feats


def _with_trusted(idx, lab, trusted: Mapping[int, int], has_feat: np.ndarray, c: int, warnings: list):
    """The picks with ``trusted`` labels joined, replacing automatic picks of the same samples."""
    n = len(has_feat)
    t_idx = np.fromiter((int(i) for i in trusted), dtype=np.int64, count=len(trusted))
    t_lab = np.fromiter((int(trusted[i]) for i in trusted), dtype=np.int64, count=len(trusted))
    if t_idx.min() < 0 or t_idx.max() >= n:
        raise InvalidInputError(f"trusted label indices must lie in [0, {n})")
    if t_lab.min() < 0 or t_lab.max() >= c:
        raise InvalidInputError(f"trusted labels must be class indices in [0, {c})")
    ok = has_feat[t_idx]
    if not ok.all():
        warnings.append(f"{int((~ok).sum())} trusted label(s) skipped: their samples have no DINO features")
    order = np.argsort(t_idx[ok], kind="stable")
    t_idx, t_lab = t_idx[ok][order], t_lab[ok][order]
    keep = ~np.isin(idx, t_idx)
    return np.concatenate([idx[keep], t_idx]), np.concatenate([lab[keep], t_lab])
