"""CDUL multi-label auto-labelling: global + local CLIP pseudo-labels, a classifier trained
with gradient-alignment label updates, decision rules and evaluation (no FiftyOne here).

Pipeline (see ``methods.md``, section CDUL):

1. ``global_scores``: softmax over classes of CLIP image-text cosines of the whole image.
2. ``local_clip_scores``: the same per crop of a ``grid × grid`` tiling of each image.
3. ``aggregate_scores``: per class, max (or min, below a threshold ``t``) over crops, averaged
   with the global score; the initial soft labels.
4. ``train_multilabel_classifier``: a head on cached features fitted to the soft labels, whose
   labels are themselves refined every few epochs along the loss gradient.
5. ``decide_labels``: turn scores into label sets; ``mean_average_precision`` et al. evaluate.

Score arrays use NaN for "unknown" (unreadable image, missing crop); every function here
ignores or propagates NaN rather than treating it as a score.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

from fiftyone_nola.core import device as dev
from fiftyone_nola.core import engines
from fiftyone_nola.core.arrays import l2_normalize, softmax
from fiftyone_nola.core.data import DecodeOptions, ImageFileDataset, collate_skip_bad
from fiftyone_nola.core.embed import calibration_images, engine_module
from fiftyone_nola.core.errors import IndexMismatchError, InvalidInputError, ModelNotFoundError
from fiftyone_nola.core.models import LoadedModel
from fiftyone_nola.core.progress import ProgressFn, null_progress
from fiftyone_nola.core.storage import atomic_path, file_sha256, write_json_atomic

CLIP_LOGIT_SCALE = 100.0  # CLIP's learnt temperature saturates at exp(4.6052) = 100
LABEL_EPS = 1e-6  # soft labels live in [eps, 1 - eps] so logit(y) stays finite
_LATENT_MAX = math.log((1.0 - LABEL_EPS) / LABEL_EPS)
HEAD_FORMAT = "fiftyone_nola.multilabel_head/1"


# --------------------------------------------------------------------------------------------
# Small numeric helpers
# --------------------------------------------------------------------------------------------




def _check_weights(class_weights: np.ndarray, dim: Optional[int] = None) -> np.ndarray:
    w = np.asarray(class_weights, dtype=np.float32)
    if w.ndim != 2 or w.shape[0] < 1:
        raise InvalidInputError(f"class_weights must be a C×D array, got shape {w.shape}")
    if dim is not None and w.shape[1] != dim:
        raise InvalidInputError(
            f"class_weights have dimension {w.shape[1]} but the image embeddings have {dim}: "
            f"build the class weights with the same CLIP model as the images"
        )
    if not np.all(np.isfinite(w)):
        raise InvalidInputError("class_weights contain NaN or inf")
    # Idempotent on normalised input; protects against raw text embeddings being passed.
    return l2_normalize(w)


# --------------------------------------------------------------------------------------------
# Crops and CLIP scores
# --------------------------------------------------------------------------------------------


def grid_boxes(width: int, height: int, grid: int = 3) -> list[tuple[int, int, int, int]]:
    """Non-overlapping ``(left, top, right, bottom)`` tiles of a ``grid × grid`` tiling, row-major.

    Tiles are ``height // grid`` × ``width // grid`` pixels, as in CDUL; the remainder strip at
    the right/bottom edge (< ``grid`` pixels) is not covered. An image narrower or shorter than
    ``grid`` pixels gets ``min(grid, size)`` tiles along that axis (a 2×2 image gives four
    1×1 tiles, a 1×1 image one), so every image yields at least one tile.
    """
    width, height, grid = int(width), int(height), int(grid)
    if grid < 1:
        raise InvalidInputError(f"grid must be >= 1, got {grid}")
    if width < 1 or height < 1:
        raise InvalidInputError(f"image size must be positive, got {width}×{height}")
    cols, rows = min(grid, width), min(grid, height)
    tw, th = width // cols, height // rows
    return [
        (c * tw, r * th, (c + 1) * tw, (r + 1) * th) for r in range(rows) for c in range(cols)
    ]


@dataclass
class CropConfig:
    """Settings of the local (crop) CLIP scoring stage."""

    grid: int = 3
    batch_size: int = 32  # images per forward pass (grid² crops each)
    num_workers: int = 1
    device: Optional[str] = None
    precision: str = "auto"  # auto: AMP on CUDA; on a CPU the engine's (core/engines.py); int8 opt-in
    engine: str = "auto"  # auto | torch | openvino: the crops' CLIP forward (embeddings' cached model)
    logit_scale: float = CLIP_LOGIT_SCALE
    draft_decode: bool = True  # JPEG DCT-scaled decode, never below grid × model input size


class GridCrops:
    """Image -> ``(crops G×3×S×S, valid bool G)``: ``grid²`` tiles, each through ``transform``.

    Images with fewer tiles (smaller than the grid) are padded with zero tensors marked invalid
    so batches stack.
    """

    def __init__(self, transform, grid: int = 3):
        self.transform = transform
        self.grid = int(grid)

    def __call__(self, img):
        crops = [self.transform(img.crop(box)) for box in grid_boxes(*img.size, self.grid)]
        slots = self.grid * self.grid
        valid = torch.zeros(slots, dtype=torch.bool)
        valid[: len(crops)] = True
        crops += [torch.zeros_like(crops[0])] * (slots - len(crops))
        return torch.stack(crops), valid


class CropDataset(ImageFileDataset):
    """Items are ``(index, (crops, valid), None)`` or ``(index, None, reason)``; each image is
    decoded once (bad files are reported by :class:`ImageFileDataset`)."""

    def __init__(self, filepaths: Sequence[str], transform, grid: int = 3,
                 options: DecodeOptions = DecodeOptions()):
        super().__init__(filepaths, GridCrops(transform, grid), options)
        self.grid = int(grid)


def local_clip_scores(
    clip: LoadedModel,
    filepaths: Sequence[str],
    class_weights: np.ndarray,
    config: CropConfig = CropConfig(),
    progress: Optional[ProgressFn] = None,
) -> tuple[np.ndarray, list[tuple[int, str]]]:
    """CLIP class scores of every grid crop: ``(N×G×C float32, failed [(index, reason)])``.

    ``G = grid²``; each crop's row is ``softmax(logit_scale · cos(crop, class))`` over classes.
    Crops of many images share one forward pass. Rows of unreadable images, and the missing
    slots of images smaller than the grid, are NaN.
    """
    progress = progress or null_progress
    if config.batch_size < 1:
        raise InvalidInputError(f"batch_size must be >= 1, got {config.batch_size}")
    w_np = _check_weights(class_weights, clip.embed_dim)
    device = dev.resolve_device(config.device)
    slots = config.grid * config.grid
    draft = clip.image_size * config.grid if config.draft_decode else None
    # The crops go through the very CLIP forward the embedding stage converted (same cache entry).
    choice = engines.resolve(config.engine, config.precision, device)
    runner, choice = engines.load_engine_model(
        engine_module(clip), clip.identity, (3, clip.image_size, clip.image_size), choice,
        calibration=calibration_images(filepaths, clip.transform, clip.image_size))
    if runner is not None:
        device = torch.device("cpu")
    amp = None if runner is not None else engines.torch_amp(choice)
    encode = runner or clip.encode_image
    pin = dev.pin_memory(device) and runner is None
    if runner is None:
        clip.model.to(device)
    weights = torch.from_numpy(w_np).to(device)
    ds = CropDataset(filepaths, clip.transform, config.grid, DecodeOptions(draft_size=draft))
    kwargs = {}
    if config.num_workers > 0:
        # Crop batches are grid² times larger than embedding batches: keep fewer in flight.
        kwargs.update(prefetch_factor=2, persistent_workers=False)
    loader = torch.utils.data.DataLoader(
        ds, batch_size=config.batch_size, shuffle=False, num_workers=config.num_workers,
        collate_fn=collate_skip_bad, pin_memory=pin, **kwargs,
    )
    out = np.full((len(ds), slots, w_np.shape[0]), np.nan, dtype=np.float32)
    failed: list[tuple[int, str]] = []
    total, done = len(ds), 0
    msg = f"scoring {slots} crops per image"
    progress(0, total, msg)
    with torch.inference_mode():
        for idx, batch, bad in loader:
            failed.extend(bad)
            if batch is not None:
                crops, valid = batch
                flat_valid = valid.reshape(-1)
                flat = crops.reshape(-1, *crops.shape[2:])[flat_valid]
                flat = flat.to(device, non_blocking=pin)
                with dev.autocast(device, amp):
                    feats = encode(flat)
                # Cosines and softmax in fp32: logit_scale 100 magnifies half-precision error.
                feats = torch.nn.functional.normalize(feats.float(), dim=-1)
                probs = torch.softmax(config.logit_scale * feats @ weights.T, dim=-1)
                block = np.full((len(idx) * slots, w_np.shape[0]), np.nan, dtype=np.float32)
                block[flat_valid.numpy()] = probs.cpu().numpy()
                out[idx.numpy()] = block.reshape(len(idx), slots, -1)
            done += len(idx) + len(bad)
            progress(done, total, msg)
    failed.sort()
    return out, failed


def global_scores(
    image_embeddings: np.ndarray, class_weights: np.ndarray, logit_scale: float = CLIP_LOGIT_SCALE
) -> np.ndarray:
    """``softmax(logit_scale · cos(image, class))`` over classes: N×C float32, NaN rows kept."""
    emb = np.asarray(image_embeddings, dtype=np.float32)
    if emb.ndim != 2:
        raise InvalidInputError(f"image_embeddings must be N×D, got shape {emb.shape}")
    w = _check_weights(class_weights, emb.shape[1])
    out = np.full((emb.shape[0], w.shape[0]), np.nan, dtype=np.float32)
    ok = np.all(np.isfinite(emb), axis=1)
    out[ok] = softmax(float(logit_scale) * (l2_normalize(emb[ok]) @ w.T)).astype(np.float32)
    return out


# --------------------------------------------------------------------------------------------
# Aggregation of global and local scores
# --------------------------------------------------------------------------------------------


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
    global_: np.ndarray,
    local: np.ndarray,
    t: float = 0.0,
    mode: str = "avg",
    lam: float = 0.25,
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
        raise InvalidInputError(
            f"global scores {g.shape} and local scores {np.shape(local)} disagree on N or C"
        )
    g_f, l_f = np.where(np.isnan(g), s_loc, g), np.where(np.isnan(s_loc), g, s_loc)
    y = (g_f + l_f) / 2.0
    if mode == "lambda":
        y = y + lam * np.abs(g_f - l_f)
    return np.clip(y, 0.0, 1.0).astype(np.float32)


# --------------------------------------------------------------------------------------------
# Decision rules
# --------------------------------------------------------------------------------------------

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

    Why ``relative`` is the default: it needs no labelled data and, unlike the others, is
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


# --------------------------------------------------------------------------------------------
# Classifier with gradient-alignment label updates
# --------------------------------------------------------------------------------------------

# The paper's schedule as the reproduction study (github cs-mshah/CDUL) runs it on VOC2012
# (configs/experiment/voc2012.yaml): 100 epochs; labels refined in every 10th epoch once the
# first 10 (warm-up) have passed, i.e. in epochs 20, 30, ..., 100.
PAPER_SCHEDULE = {"epochs": 100, "update_every": 10, "warmup": 10}
# On a CPU: the same shape at 3/10 of the length (9 label-update epochs, as in the paper's).
CPU_SCHEDULE = {"epochs": 30, "update_every": 3, "warmup": 3}
# The reproduction's label gradient is that of the loss averaged over its batch of 8, so each
# label moves by psi(y) * dKL_i/dy_i / 8; ours uses the per-sample gradient times label_lr.
REFERENCE_LABEL_LR = 1.0 / 8.0
LOSSES = ("kl", "bce")


@dataclass
class TrainConfig:
    """Settings of the multi-label head trained on cached features.

    The defaults are CDUL's formulation and schedule as the reproduction study runs them
    (``PAPER_SCHEDULE``); :meth:`for_hardware` shortens the schedule on a CPU. ``lr``,
    ``batch_size`` and ``hidden`` are head settings: the paper fine-tunes a whole ResNet-101 at
    Adam lr 1e-5, batch 8, which leaves a randomly initialised head on frozen features barely
    trained. Labels are refined during epoch ``e`` (1-based) when ``update_every > 0``,
    ``e > warmup`` and ``e % update_every == 0``.
    """

    hidden: int = 0  # 0: linear head; > 0: one hidden ReLU layer of this width
    epochs: int = PAPER_SCHEDULE["epochs"]
    lr: float = 1e-3
    batch_size: int = 64
    weight_decay: float = 0.0  # the paper's Adam has none
    loss: str = "kl"  # "kl": KL(softmax(logits) || y / Σy), CDUL; "bce": per-class BCE
    update_every: int = PAPER_SCHEDULE["update_every"]  # 0 disables label updates
    warmup: int = PAPER_SCHEDULE["warmup"]  # epochs before the first label update may happen
    label_lr: float = REFERENCE_LABEL_LR  # step on logit(y): label_lr · psi(y) · dloss_i/dy_i
    label_sigma: float = 1.0  # psi = N(0.5, sigma²) density
    seed: int = 0
    device: Optional[str] = None

    @classmethod
    def for_hardware(cls, device=None, log: Optional[Callable[[str], None]] = print,
                     **overrides) -> TrainConfig:
        """The paper's schedule on a GPU, ``CPU_SCHEDULE`` elsewhere; printed through ``log``.

        ``overrides`` (e.g. ``epochs=50``) win over the machine's choice.
        """
        d = dev.resolve_device(device if isinstance(device, (str, type(None))) else str(device))
        sched = dict(PAPER_SCHEDULE if d.type == "cuda" else CPU_SCHEDULE)
        sched.update({k: v for k, v in overrides.items() if v is not None})
        sched.setdefault("device", str(d))
        cfg = cls(**sched)
        if log:
            which = "the paper's" if d.type == "cuda" else (
                "shortened for a CPU; the paper's {epochs}/{update_every}/{warmup} runs on a GPU"
                .format(**PAPER_SCHEDULE))
            log(f"[cdul] classifier schedule on {d.type} ({which}): {cfg.describe_schedule()}")
        return cfg

    def update_epochs(self) -> list[int]:
        """The 1-based epochs in which labels are refined."""
        if self.update_every <= 0:
            return []
        return [e for e in range(1, self.epochs + 1) if e > self.warmup and e % self.update_every == 0]

    def describe_schedule(self) -> str:
        ups = self.update_epochs()
        shown = ", ".join(map(str, ups[:3])) + (f", ..., {ups[-1]}" if len(ups) > 3 else "")
        return (f"{self.epochs} epochs, {self.loss} loss, labels refined every {self.update_every} "
                f"epochs after {self.warmup} warm-up epochs"
                + (f" (in epochs {shown})" if ups else " (never)"))


class MultiLabelHead(nn.Module):
    """Linear (``hidden=0``) or one-hidden-layer MLP mapping features to C logits."""

    def __init__(self, in_features: int, num_classes: int, hidden: int = 0):
        super().__init__()
        self.in_features, self.num_classes, self.hidden = int(in_features), int(num_classes), int(hidden)
        if hidden > 0:
            self.net = nn.Sequential(
                nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)
            )
        else:
            self.net = nn.Linear(in_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def psi(y: np.ndarray, sigma: float = 1.0) -> np.ndarray:
    """CDUL's label-update weight: the N(0.5, sigma²) density at ``y`` (sigma = 1 in CDUL)."""
    y = np.asarray(y, dtype=np.float64)
    return np.exp(-0.5 * ((y - 0.5) / sigma) ** 2) / (sigma * math.sqrt(2.0 * math.pi))


def _label_step(y: torch.Tensor, grad: torch.Tensor, label_lr: float, sigma: float) -> torch.Tensor:
    """``sigmoid(logit(y) − label_lr·psi(y)·grad)`` with the latent clamped (torch, any dtype)."""
    y = y.clamp(LABEL_EPS, 1.0 - LABEL_EPS)
    g = torch.nan_to_num(grad, nan=0.0, posinf=1e12, neginf=-1e12)
    w = torch.exp(-0.5 * ((y - 0.5) / sigma) ** 2) / (sigma * math.sqrt(2.0 * math.pi))
    latent = torch.log(y) - torch.log1p(-y)
    return torch.sigmoid((latent - float(label_lr) * w * g).clamp(-_LATENT_MAX, _LATENT_MAX))


def label_update(y: np.ndarray, grad: np.ndarray, label_lr: float, sigma: float = 1.0) -> np.ndarray:
    """One gradient-alignment step on soft labels: ``sigmoid(logit(y) − lr·psi(y)·grad)``.

    Working on the latent ``logit(y)`` keeps labels inside (0, 1) and moves uncertain labels
    (near 0.5, where psi peaks) most. Latents are clamped to ``±logit(1 − 1e-6)`` so labels
    never reach exactly 0 or 1. Computed in float64; returns float32.
    """
    y_t = torch.from_numpy(np.asarray(y, dtype=np.float64))
    g_t = torch.from_numpy(np.asarray(grad, dtype=np.float64))
    return _label_step(y_t, g_t, label_lr, sigma).numpy().astype(np.float32)


def _per_sample_loss(logits: torch.Tensor, y: torch.Tensor, kind: str) -> torch.Tensor:
    """Training loss of each sample, summed over classes.

    ``kl`` (CDUL): ``KL(p || q)`` with ``p = softmax(logits)`` and ``q = y / Σ_c y``, the
    reproduction's ``KLDivergence(preds, pseudo_labels)``. ``bce``: binary cross-entropy of
    ``sigmoid(logits)`` against each label.
    """
    if kind == "bce":
        return nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="none").sum(1)
    logp = torch.log_softmax(logits, dim=1)
    q = y / y.sum(1, keepdim=True)
    return (logp.exp() * (logp - torch.log(q))).sum(1)


def _per_sample_label_loss(logits: torch.Tensor, y: torch.Tensor, kind: str) -> torch.Tensor:
    """The loss whose gradient w.r.t. ``y`` refines the labels, per sample.

    ``kl``: ``KL(q || p)``, the reproduction's ``KLDivergence(pseudo_labels, preds)`` (it swaps
    the arguments of its training loss for the label step). ``bce``: the training loss.
    """
    if kind == "bce":
        return _per_sample_loss(logits, y, kind)
    q = y / y.sum(1, keepdim=True)
    return (torch.xlogy(q, q) - q * torch.log_softmax(logits, dim=1)).sum(1)


def label_gradient(logits: torch.Tensor, y: torch.Tensor, kind: str = "kl") -> torch.Tensor:
    """``d label_loss_i / d y_i`` for every row (each label's gradient from its own sample)."""
    y_var = y.detach().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(_per_sample_label_loss(logits.detach(), y_var, kind).sum(), y_var)
    return grad


def _fit(model, opt, x, y, gen, config: TrainConfig, history: dict, progress) -> torch.Tensor:
    """The epoch loop of ``train_multilabel_classifier``; refines ``y`` in place and returns it.

    As in the reproduction, a label-update epoch refines each batch's labels right after the
    optimiser step on that batch, from the predictions of that same forward pass (no extra
    pass); the refined labels are trained on from the next epoch on. Updates in the last epoch
    only change the returned labels.
    """
    n, c = y.shape
    updates = set(config.update_epochs())
    progress(0, config.epochs, "training multi-label classifier")
    for epoch in range(1, config.epochs + 1):
        model.train()
        refine = epoch in updates
        total = torch.zeros((), dtype=torch.float64, device=x.device)
        change = torch.zeros((), dtype=torch.float64, device=x.device)
        for b in torch.randperm(n, generator=gen).split(config.batch_size):
            b = b.to(x.device)
            yb = y[b]
            logits = model(x[b])
            loss = _per_sample_loss(logits, yb, config.loss).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.detach() * len(b)
            if refine:
                new = _label_step(yb, label_gradient(logits, yb, config.loss), config.label_lr,
                                  config.label_sigma)
                change += (new - yb).abs().sum()
                y[b] = new
        history["loss"].append(float(total) / n)
        if refine:
            history["update_epochs"].append(epoch)
            history["label_change"].append(float(change) / (n * c))
        progress(epoch, config.epochs, "training multi-label classifier")
    return y


def train_multilabel_classifier(
    features: np.ndarray,
    soft_labels: np.ndarray,
    config: TrainConfig = TrainConfig(),
    progress: Optional[ProgressFn] = None,
) -> tuple[MultiLabelHead, np.ndarray, dict]:
    """Fit a head to soft labels, refining the labels in the schedule's update epochs.

    Returns ``(model, refined_labels N×C float32, history)``. Rows whose features or labels
    are not finite (unreadable images) are left out of training and get NaN refined labels.
    Labels are clamped to [1e-6, 1 − 1e-6] first. ``history``: ``loss`` (mean per epoch),
    ``update_epochs``, ``label_change`` (mean |Δy| per update epoch), ``n_train``,
    ``n_skipped``, ``config``. The model's ``score`` attribute names the ranking score
    :func:`predict_multilabel` returns for it. Deterministic for a given ``seed`` on CPU.
    """
    progress = progress or null_progress
    if config.loss not in LOSSES:
        raise InvalidInputError(f"loss must be one of {', '.join(LOSSES)}, not {config.loss!r}")
    if config.epochs < 0 or config.batch_size < 1 or config.update_every < 0 or config.warmup < 0:
        raise InvalidInputError("epochs, update_every and warmup must be >= 0 and batch_size >= 1")
    if not config.label_sigma > 0:
        raise InvalidInputError(f"label_sigma must be > 0, got {config.label_sigma}")
    x_all = np.asarray(features, dtype=np.float32)
    y_all = np.asarray(soft_labels, dtype=np.float32)
    if x_all.ndim != 2 or y_all.ndim != 2 or x_all.shape[0] != y_all.shape[0]:
        raise InvalidInputError(
            f"features must be N×F and soft_labels N×C with the same N, got {x_all.shape} "
            f"and {y_all.shape}"
        )
    ok = np.all(np.isfinite(x_all), axis=1) & np.all(np.isfinite(y_all), axis=1)
    if not ok.any():
        raise InvalidInputError("no sample has finite features and labels to train on")
    device = dev.resolve_device(config.device)
    x = torch.from_numpy(x_all[ok]).to(device)
    y = torch.from_numpy(np.clip(y_all[ok], LABEL_EPS, 1.0 - LABEL_EPS).astype(np.float32)).to(device)
    n, c = y.shape

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = MultiLabelHead(x.shape[1], c, config.hidden).to(device)
    gen = torch.Generator().manual_seed(config.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    history: dict = {"loss": [], "update_epochs": [], "label_change": [], "n_train": int(n),
                     "n_skipped": int((~ok).sum()), "config": asdict(config)}
    width = config.hidden or c
    macs = config.batch_size * (x.shape[1] * width + (width * c if config.hidden else 0))
    with dev.small_steps_on_cpu(device, macs):
        y = _fit(model, opt, x, y, gen, config, history, progress)
    model.eval()
    model.train_config = asdict(config)
    model.score = SCORE_FOR_LOSS[config.loss]
    refined = np.full(y_all.shape, np.nan, dtype=np.float32)
    refined[ok] = y.cpu().numpy()
    return model, refined, history


# What a head's outputs are ranked by, per training loss. A KL loss on normalised distributions
# is blind to adding one constant to all of an image's logits, so training leaves that constant
# (the level of sigmoid(logits)) arbitrary per image; softmax cancels it and is the distribution
# the loss fits (and what the reproduction computes mAP on). BCE fits each class's sigmoid.
SCORE_FOR_LOSS = {"kl": "softmax", "bce": "sigmoid"}
SCORES = ("softmax", "sigmoid")


def head_score(model: nn.Module) -> str:
    """The ranking score of a head: its ``score`` attribute; ``sigmoid`` for heads saved before
    heads recorded one (they were trained with a sigmoid-based loss)."""
    return getattr(model, "score", None) or "sigmoid"


def predict_multilabel(
    model: nn.Module, features: np.ndarray, batch_size: int = 4096, score: Optional[str] = None
) -> np.ndarray:
    """Per-class scores of a head: N×C float32 in [0, 1]; NaN feature rows give NaN.

    ``score`` (default: the head's, see :func:`head_score`): ``softmax`` over classes for a
    KL-trained head (CDUL; its logits are only defined up to a per-image constant, which
    softmax cancels, so scores rank images consistently for mAP), ``sigmoid`` per class for a
    BCE-trained head.
    """
    score = score or head_score(model)
    if score not in SCORES:
        raise InvalidInputError(f"score must be one of {', '.join(SCORES)}, not {score!r}")
    squash = (lambda z: torch.softmax(z.float(), dim=1)) if score == "softmax" else (lambda z: torch.sigmoid(z.float()))
    x_all = np.asarray(features, dtype=np.float32)
    p = next(model.parameters())
    num_classes = getattr(model, "num_classes", None)
    ok = np.all(np.isfinite(x_all), axis=1)
    model.eval()
    chunks = []
    with torch.inference_mode():
        for chunk in torch.from_numpy(x_all[ok]).split(batch_size):
            chunks.append(squash(model(chunk.to(p.device, p.dtype))).cpu().numpy())
    if num_classes is None:
        num_classes = chunks[0].shape[1] if chunks else 0
    out = np.full((x_all.shape[0], num_classes), np.nan, dtype=np.float32)
    if chunks:
        out[ok] = np.concatenate(chunks)
    return out


def _meta_path(path: Path) -> Path:
    return path.with_suffix(".json")


def save_classifier(path, model: MultiLabelHead, classes: Sequence[str], meta: Optional[dict] = None) -> Path:
    """Write the state dict to ``path`` and a JSON sidecar ``path.with_suffix('.json')``.

    The sidecar holds the format tag, ``classes``, the head's dimensions, the training config
    (when the model came from ``train_multilabel_classifier``), the ranking ``score`` of
    :func:`predict_multilabel` and ``meta`` (JSON-serialisable).
    Returns the JSON path.
    """
    path = Path(path)
    if path.suffix == ".json":
        raise InvalidInputError(f"{path}: give the weights file (e.g. head.pt); the .json sidecar is derived")
    classes = [str(x) for x in classes]
    if len(classes) != model.num_classes:
        raise InvalidInputError(f"{len(classes)} class names for a head with {model.num_classes} outputs")
    info = {
        "format": HEAD_FORMAT,
        "classes": classes,
        "in_features": model.in_features,
        "hidden": model.hidden,
        "num_classes": model.num_classes,
        "config": getattr(model, "train_config", None),
        "score": head_score(model),
        "meta": meta or {},
    }
    # Weights first, then the sidecar naming their digest: a kill between the two leaves a
    # sidecar that does not match, which load_classifier refuses instead of mixing old and new.
    with atomic_path(path) as tmp:
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, tmp)
    info["weights_sha256"] = file_sha256(path)
    write_json_atomic(_meta_path(path), info)
    return _meta_path(path)


def load_classifier(
    path, classes: Optional[Sequence[str]] = None, device: Optional[str] = None
) -> tuple[MultiLabelHead, dict]:
    """Load a head saved by ``save_classifier``: ``(model in eval mode, sidecar dict)``.

    ``classes``, when given, must equal the saved class list (same names, same order),
    otherwise ``IndexMismatchError``: the head's outputs are positional.
    """
    path = Path(path)
    if not path.is_file() or not _meta_path(path).is_file():
        raise ModelNotFoundError(
            f"No classifier at {path} (needs the weights file and {_meta_path(path).name}); "
            f"train one first or check the path"
        )
    info = json.loads(_meta_path(path).read_text())
    if info.get("weights_sha256") not in (None, file_sha256(path)):
        raise IndexMismatchError(
            f"{path} does not hold the weights its sidecar describes (a save was interrupted): "
            f"train the classifier again"
        )
    if info.get("format") != HEAD_FORMAT:
        raise IndexMismatchError(f"{path} is not a multi-label head (format {info.get('format')!r})")
    if classes is not None and [str(x) for x in classes] != info["classes"]:
        saved, given = info["classes"], [str(x) for x in classes]
        diff = sorted(set(saved) ^ set(given))
        detail = f"differing names: {diff[:10]}" if diff else "same names in a different order"
        raise IndexMismatchError(
            f"The classifier at {path} was trained for {len(saved)} classes and {len(given)} "
            f"were given ({detail}). Retrain for this class list or pass the saved one."
        )
    model = MultiLabelHead(info["in_features"], info["num_classes"], info["hidden"])
    state = torch.load(path, map_location="cpu", weights_only=True)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise IndexMismatchError(f"{path}: weights do not match their sidecar: {e}") from e
    model.train_config = info.get("config")
    model.score = info.get("score")  # absent in heads saved before it was recorded: sigmoid
    model.to(dev.resolve_device(device)).eval()
    return model, info


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------


def _check_eval(y_true, scores) -> tuple[np.ndarray, np.ndarray]:
    t = np.asarray(y_true).astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    if t.ndim != 2 or t.shape != s.shape:
        raise InvalidInputError(f"y_true {t.shape} and scores {s.shape} must both be N×C")
    return t, s


def average_precision_per_class(y_true: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """AP of each class (sklearn's step-wise definition): array C, NaN for no positives.

    Samples whose score for the class is NaN are left out of that class's AP.
    """
    from sklearn.metrics import average_precision_score

    t, s = _check_eval(y_true, scores)
    out = np.full(t.shape[1], np.nan)
    for c in range(t.shape[1]):
        ok = np.isfinite(s[:, c])
        if t[ok, c].any():
            out[c] = average_precision_score(t[ok, c], s[ok, c])
    return out


def mean_average_precision(y_true: np.ndarray, scores: np.ndarray, return_count: bool = False):
    """mAP over classes with at least one positive; NaN if none has.

    With ``return_count=True`` returns ``(mAP, number of classes evaluated)``.
    """
    ap = average_precision_per_class(y_true, scores)
    n = int(np.isfinite(ap).sum())
    m = float(np.nanmean(ap)) if n else float("nan")
    return (m, n) if return_count else m


def precision_recall_at(y_true: np.ndarray, y_pred: np.ndarray) -> dict:
    """Micro (overall) and macro (per-class) precision, recall and F1 of label sets.

    Macro averages run over classes with at least one positive; a class never predicted has
    precision 0. Macro F1 is the harmonic mean of macro P and R (the ML-GCN "CF1"
    convention). Keys: ``micro_precision``, ``micro_recall``, ``micro_f1``,
    ``macro_precision``, ``macro_recall``, ``macro_f1``, ``classes_evaluated``.
    """
    t, p = _check_eval(y_true, y_pred)
    p = p.astype(bool)
    tp = (t & p).sum(0).astype(np.float64)
    fp = (~t & p).sum(0).astype(np.float64)
    fn = (t & ~p).sum(0).astype(np.float64)

    def f1(pr: float, rc: float) -> float:
        return float(2 * pr * rc / (pr + rc)) if pr + rc > 0 else 0.0

    mp = tp.sum() / (tp.sum() + fp.sum()) if tp.sum() + fp.sum() > 0 else 0.0
    mr = tp.sum() / (tp.sum() + fn.sum()) if tp.sum() + fn.sum() > 0 else float("nan")
    has_pos = (tp + fn) > 0
    if has_pos.any():
        cp = float(np.mean(np.where(tp + fp > 0, tp / np.maximum(tp + fp, 1), 0.0)[has_pos]))
        cr = float(np.mean((tp / np.maximum(tp + fn, 1))[has_pos]))
    else:
        cp = cr = float("nan")
    return {
        "micro_precision": float(mp),
        "micro_recall": float(mr),
        "micro_f1": f1(mp, mr) if np.isfinite(mr) else float("nan"),
        "macro_precision": cp,
        "macro_recall": cr,
        "macro_f1": f1(cp, cr) if np.isfinite(cp) else float("nan"),
        "classes_evaluated": int(has_pos.sum()),
    }
