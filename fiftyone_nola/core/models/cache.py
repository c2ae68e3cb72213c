"""Loaded models kept per process, and the seeded context random initialisation runs in."""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from typing import Callable

import torch

from fiftyone_nola.core.models.specs import RANDOM_INIT_SEED, LoadedModel

_MODEL_CACHE: OrderedDict[tuple, LoadedModel] = OrderedDict()
MODEL_CACHE_SIZE = 2  # a CLIP and a DINO: what one pipeline run alternates between


def cached(spec, key: str, device, build: Callable[[], LoadedModel]) -> LoadedModel:
    """One load per (weights, device) per process: each pipeline stage used to reload CLIP (5-15 s).

    ``key`` is the spec's :func:`spec_key`."""
    key = (type(spec).__name__, key, str(device or "cpu"), getattr(spec, "feature", None))
    hit = _MODEL_CACHE.get(key)
    if hit is not None:
        _MODEL_CACHE.move_to_end(key)
        hit.model.eval()
        return hit
    loaded = build()
    _MODEL_CACHE[key] = loaded
    while len(_MODEL_CACHE) > MODEL_CACHE_SIZE:
        _MODEL_CACHE.popitem(last=False)
    return loaded


def clear_model_cache() -> None:
    """Forget the models loaded in this process."""
    _MODEL_CACHE.clear()


@contextlib.contextmanager
def seeded_init():
    """Random init must give the same weights in every process, so stored indexes stay valid:
    models built inside see the global RNG seeded; its state is restored afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        yield
