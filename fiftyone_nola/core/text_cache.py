"""CLIP text embeddings cached on disk per model, so re-labeling with new classes or
descriptions encodes only texts never seen before (and loads no model when none are new)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Optional

import numpy as np

from fiftyone_nola.core import storage, zeroshot
from fiftyone_nola.core.models import ClipSpec, load_clip, spec_key


def _digest(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


def cache_path(spec: ClipSpec):
    """The text-embedding cache file of one CLIP model."""
    return storage.storage_root() / "text_cache" / f"{spec_key(spec)}.npz"


def encode_texts_cached(spec: ClipSpec, texts: Sequence[str], device=None, clip=None) -> tuple[np.ndarray, dict]:
    """``(T×D float32 L2-normalised rows, info)``; ``info`` says how many texts were encoded now."""
    path = cache_path(spec)
    keys = [_digest(t) for t in texts]
    known: dict[str, np.ndarray] = {}
    if path.exists():
        with np.load(path, allow_pickle=False) as z:
            known = dict(zip(z["keys"].tolist(), z["vectors"]))
    missing = list(dict.fromkeys(t for t, k in zip(texts, keys) if k not in known))
    loaded: Optional[object] = clip
    if missing:
        loaded = loaded or load_clip(spec, device)
        vecs = zeroshot.encode_texts(loaded, missing)
        known.update(zip((_digest(t) for t in missing), vecs))
        all_keys = list(known)
        with storage.atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, keys=np.asarray(all_keys, dtype=str), vectors=np.stack([known[k] for k in all_keys]))
    out = np.stack([known[k] for k in keys]).astype(np.float32) if keys else np.zeros((0, 0), np.float32)
    return out, {"encoded": len(missing), "cached": len(set(keys)) - len(missing), "model": loaded}


def class_weights_from_texts(
    spec: ClipSpec, texts: dict, classes: Sequence[str], device=None
) -> tuple[np.ndarray, dict]:
    """``zeroshot.class_weights`` (C×D) encoding through the text cache; also returns its info."""
    info: dict = {}

    def encode(unique: list[str]) -> np.ndarray:
        emb, got = encode_texts_cached(spec, unique, device)
        info.update(got)
        return emb

    return zeroshot.class_weights(encode, texts, classes), info
