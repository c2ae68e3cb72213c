"""The multi-label head: its network, the scores it ranks by, and its saved form."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

from fiftyone_nola.core import device as dev
from fiftyone_nola.core.errors import IndexMismatchError, InvalidInputError, ModelNotFoundError
from fiftyone_nola.core.storage import atomic_path, file_sha256, write_json_atomic

HEAD_FORMAT = "fiftyone_nola.multilabel_head/1"


class MultiLabelHead(nn.Module):
    """Linear (``hidden=0``) or one-hidden-layer MLP mapping features to C logits."""

    def __init__(self, in_features: int, num_classes: int, hidden: int = 0):
        super().__init__()
        self.in_features, self.num_classes, self.hidden = int(in_features), int(num_classes), int(hidden)
        if hidden > 0:
            self.net = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))
        else:
            self.net = nn.Linear(in_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


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
