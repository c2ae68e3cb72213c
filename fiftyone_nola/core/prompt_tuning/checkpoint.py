"""What prompt tuning stores: resumable epoch checkpoints (with RNG state) and tuned models."""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from fiftyone_nola.core.errors import IndexMismatchError, InvalidInputError
from fiftyone_nola.core.models import LoadedModel
from fiftyone_nola.core.prompt_tuning.config import TuneConfig
from fiftyone_nola.core.prompt_tuning.model import HEAD_FORMULATION, PromptedClassifier
from fiftyone_nola.core.storage import atomic_path, read_json, write_json_atomic

CHECKPOINT_NAME = "checkpoint.pt"
TUNED_NAME = "tuned.pt"
META_NAME = "meta.json"


def _rng_state(gen: torch.Generator, device: torch.device) -> dict:
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "loader": gen.get_state(),
        # Plain ints/tensors so the checkpoint loads with torch.load(weights_only=True).
        "numpy": {
            "key": np_state[0],
            "state": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached": float(np_state[4]),
        },
        "python": {"version": py_state[0], "state": list(py_state[1]), "gauss": py_state[2]},
    }
    if device.type == "cuda":
        # This device's state only: querying all GPUs would open a context on each from every
        # DDP rank.
        state["cuda_device"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, gen: torch.Generator, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    gen.set_state(state["loader"])
    n = state["numpy"]
    np.random.set_state((n["key"], n["state"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if device.type == "cuda" and "cuda_device" in state:
        torch.cuda.set_rng_state(state["cuda_device"], device)
    elif device.type == "cuda" and "cuda" in state:  # checkpoints of earlier versions
        torch.cuda.set_rng_state_all(state["cuda"])


def _fingerprint(paths: Sequence[str], labels: Optional[np.ndarray]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(str(p).encode() + b"\0")
    if labels is not None:
        h.update(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
    return h.hexdigest()[:16]


def _check_identity(stored: dict, identity: dict, where: str) -> None:
    if stored.get("key") != identity.get("key"):
        raise IndexMismatchError(
            f"{where} was made with CLIP {stored.get('key')!r}, but the loaded CLIP is "
            f"{identity.get('key')!r}. Load the same CLIP model, or tune again for this one."
        )


def _check_classes(stored: Sequence[str], classes: Sequence[str], where: str) -> None:
    if list(stored) != list(classes):
        diff = [f"{a!r}->{b!r}" for a, b in zip(stored, classes) if a != b][:3]
        raise IndexMismatchError(
            f"{where} was made for {len(stored)} classes {list(stored)[:5]}..., not these "
            f"{len(classes)} classes ({'; '.join(diff) or 'different length'}). Use the same "
            f"class list, or another directory / delete it to start over."
        )


def _check_resumable(ckpt: dict, fingerprint: dict, identity: dict, where: str) -> None:
    """Refuse a checkpoint made for another CLIP, class list, config, teacher or data."""
    _check_identity({"key": ckpt["fingerprint"]["model"]}, identity, where)
    _check_classes(ckpt["fingerprint"]["classes"], fingerprint["classes"], where)
    for k in ("config", "teacher", "head", "data"):
        if ckpt["fingerprint"].get(k) != fingerprint[k]:
            raise IndexMismatchError(
                f"{where} was made with different {k} ({ckpt['fingerprint'].get(k)} vs "
                f"{fingerprint[k]}); use another checkpoint_dir or delete it to start over"
            )


def _read_checkpoint(path: Optional[Path]) -> Optional[dict]:
    if path is None or not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)


def _write_checkpoint(path: Path, state: dict) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def save_tuned(
    path_dir,
    model: PromptedClassifier,
    classes: Sequence[str],
    clip_identity: dict,
    config: Optional[TuneConfig] = None,
    extra_meta: Optional[dict] = None,
) -> Path:
    """Write ``tuned.pt`` (trained parameters only) and ``meta.json`` into ``path_dir``.

    ``meta["model_id"]`` hashes the parameters, classes and CLIP: re-saving an unchanged model
    rewrites nothing and keeps its identity, so predictions made with it stay up to date.
    """
    path_dir = Path(path_dir)
    classes = [str(c) for c in classes]
    if len(classes) != model.num_classes:
        raise InvalidInputError(f"{len(classes)} class names for a {model.num_classes}-class model")
    state = model.trainable_state_dict()
    model_id = tuned_model_id(state, classes, clip_identity)
    if (
        (path_dir / TUNED_NAME).is_file()
        and (path_dir / META_NAME).is_file()
        and read_json(path_dir / META_NAME).get("model_id") == model_id
    ):
        return path_dir
    with atomic_path(path_dir / TUNED_NAME) as tmp:
        torch.save(state, tmp)
    meta = {
        "kind": "nola-prompt-tuned",
        "head": HEAD_FORMULATION,
        "model_id": model_id,
        "classes": classes,
        "clip_identity": dict(clip_identity),
        "n_prompts": model.n_prompts,
        "num_classes": model.num_classes,
        "embed_dim": model.embed_dim,
        "image_size": model.image_size,
        "config": config.as_recorded().to_dict() if config is not None else None,
        "extra": dict(extra_meta or {}),
    }
    # meta.json last: its presence marks a complete save.
    write_json_atomic(path_dir / META_NAME, json.loads(json.dumps(meta, default=str)))
    return path_dir


def tuned_model_id(state: dict, classes: Sequence[str], clip_identity: dict) -> str:
    """Content identity of a tuned model: its parameters, class list and CLIP weights."""
    h = hashlib.sha256(json.dumps([list(classes), clip_identity.get("key")]).encode())
    for k in sorted(state):
        t = state[k].detach().cpu().contiguous()
        h.update(f"{k}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return h.hexdigest()[:16]


def load_tuned(path_dir, clip: LoadedModel, classes: Optional[Sequence[str]] = None) -> PromptedClassifier:
    """Rebuild a saved PromptedClassifier on ``clip``; refuses another CLIP or class list."""
    path_dir = Path(path_dir)
    if not (path_dir / META_NAME).is_file() or not (path_dir / TUNED_NAME).is_file():
        raise InvalidInputError(f"no tuned model in {path_dir} (expected {TUNED_NAME} and {META_NAME})")
    meta = read_json(path_dir / META_NAME)
    where = f"tuned model in {path_dir}"
    if meta.get("head") != HEAD_FORMULATION:
        raise IndexMismatchError(
            f"The {where} was trained by fiftyone-nola 0.1 with a scaled head on normalised "
            f"features, not the official head this version uses: its logits would be wrong. "
            f"Re-run prompt tuning (tune) to replace it."
        )
    _check_identity(meta["clip_identity"], clip.identity, where)
    if classes is not None:
        _check_classes(meta["classes"], [str(c) for c in classes], where)
    W = np.zeros((meta["num_classes"], meta["embed_dim"]), np.float32)  # head is loaded below
    model = PromptedClassifier.from_clip(clip, W, n_prompts=meta["n_prompts"])
    state = torch.load(path_dir / TUNED_NAME, map_location="cpu", weights_only=True)
    model.load_trainable_state_dict(state)
    model.classes = list(meta["classes"])
    model.model_id = meta.get("model_id")  # names its converted engine model (core/engines.py)
    return model.eval()
