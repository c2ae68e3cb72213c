"""CDUL's classifier training: a head fitted to soft labels that are themselves refined along
the loss gradient (gradient-alignment label updates) in the schedule's update epochs."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np
import torch
from torch import nn

from fiftyone_nola.core import device as dev
from fiftyone_nola.core.cdul.classifier import SCORE_FOR_LOSS, MultiLabelHead
from fiftyone_nola.core.config import bounded, resolve
from fiftyone_nola.core.errors import InvalidInputError
from fiftyone_nola.core.progress import ProgressFn, null_progress

LABEL_EPS = 1e-6  # soft labels live in [eps, 1 - eps] so logit(y) stays finite
_LATENT_MAX = math.log((1.0 - LABEL_EPS) / LABEL_EPS)

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

    The schedule fields (``epochs``, ``update_every``, ``warmup``) and ``device`` left ``None``
    fit the hardware (:func:`fiftyone_nola.core.config.resolve`): CDUL's schedule as the
    reproduction study runs it (``PAPER_SCHEDULE``) on a GPU, ``CPU_SCHEDULE`` elsewhere.
    ``lr``, ``batch_size`` and ``hidden`` are head settings: the paper fine-tunes a whole
    ResNet-101 at Adam lr 1e-5, batch 8, which leaves a randomly initialised head on frozen
    features barely trained. Labels are refined during epoch ``e`` (1-based) when
    ``update_every > 0``, ``e > warmup`` and ``e % update_every == 0``.
    """

    hidden: int = 0  # 0: linear head; > 0: one hidden ReLU layer of this width
    epochs: Optional[int] = bounded(None, 1, 100_000, True, "epochs")
    lr: float = 1e-3
    batch_size: int = 64
    weight_decay: float = 0.0  # the paper's Adam has none
    loss: str = "kl"  # "kl": KL(softmax(logits) || y / Σy), CDUL; "bce": per-class BCE
    update_every: Optional[int] = bounded(None, 0, None, True, "label update interval (0: never)")
    # epochs before the first label update may happen
    warmup: Optional[int] = bounded(None, 0, None, True, "warm-up epochs")
    label_lr: float = REFERENCE_LABEL_LR  # step on logit(y): label_lr · psi(y) · dloss_i/dy_i
    label_sigma: float = 1.0  # psi = N(0.5, sigma²) density
    seed: int = 0
    device: Optional[str] = None

    def hardware_defaults(self, profile: dev.HardwareProfile) -> dict:
        on_gpu = profile.device.startswith("cuda")
        return {**(PAPER_SCHEDULE if on_gpu else CPU_SCHEDULE), "device": profile.device}

    def update_epochs(self) -> list[int]:
        """The 1-based epochs in which labels are refined."""
        if self.update_every <= 0:
            return []
        return [e for e in range(1, self.epochs + 1) if e > self.warmup and e % self.update_every == 0]

    def describe_schedule(self) -> str:
        ups = self.update_epochs()
        shown = ", ".join(map(str, ups[:3])) + (f", ..., {ups[-1]}" if len(ups) > 3 else "")
        return (
            f"{self.epochs} epochs, {self.loss} loss, labels refined every {self.update_every} "
            f"epochs after {self.warmup} warm-up epochs" + (f" (in epochs {shown})" if ups else " (never)")
        )


def schedule_message(config: TrainConfig) -> str:
    """One line naming a resolved config's schedule and why it was chosen, for the log."""
    kind = torch.device(config.device).type
    which = (
        "the paper's"
        if kind == "cuda"
        else (
            "shortened for a CPU; the paper's {epochs}/{update_every}/{warmup} runs on a GPU".format(**PAPER_SCHEDULE)
        )
    )
    return f"[cdul] classifier schedule on {kind} ({which}): {config.describe_schedule()}"


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


def per_sample_loss(logits: torch.Tensor, y: torch.Tensor, kind: str) -> torch.Tensor:
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


def per_sample_label_loss(logits: torch.Tensor, y: torch.Tensor, kind: str) -> torch.Tensor:
    """The loss whose gradient w.r.t. ``y`` refines the labels, per sample.

    ``kl``: ``KL(q || p)``, the reproduction's ``KLDivergence(pseudo_labels, preds)`` (it swaps
    the arguments of its training loss for the label step). ``bce``: the training loss.
    """
    if kind == "bce":
        return per_sample_loss(logits, y, kind)
    q = y / y.sum(1, keepdim=True)
    return (torch.xlogy(q, q) - q * torch.log_softmax(logits, dim=1)).sum(1)


def label_gradient(logits: torch.Tensor, y: torch.Tensor, kind: str = "kl") -> torch.Tensor:
    """``d label_loss_i / d y_i`` for every row (each label's gradient from its own sample)."""
    y_var = y.detach().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(per_sample_label_loss(logits.detach(), y_var, kind).sum(), y_var)
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
            loss = per_sample_loss(logits, yb, config.loss).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.detach() * len(b)
            if refine:
                new = _label_step(yb, label_gradient(logits, yb, config.loss), config.label_lr, config.label_sigma)
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
    :func:`predict_multilabel` returns for it. ``config``'s ``None`` fields are fitted to the
    hardware first. Deterministic for a given ``seed`` on CPU.
    """
    progress = progress or null_progress
    config = resolve(config, config.device)
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
            f"features must be N×F and soft_labels N×C with the same N, got {x_all.shape} and {y_all.shape}"
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
    history: dict = {
        "loss": [],
        "update_epochs": [],
        "label_change": [],
        "n_train": int(n),
        "n_skipped": int((~ok).sum()),
        "config": asdict(config),
    }
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
