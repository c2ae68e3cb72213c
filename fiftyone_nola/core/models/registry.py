"""One entry point over both families: keys, loading, and whether weights can be had."""

from __future__ import annotations

import logging
from typing import Optional

import torch

from fiftyone_nola.core.models.clip import clip_key, clip_source, load_clip, offline_hint_clip
from fiftyone_nola.core.models.dino import concrete_dino, dino_hub_target, dino_key, dino_weights, load_dino
from fiftyone_nola.core.models.specs import ClipSpec, DinoSpec, LoadedModel, hub_reachable

logger = logging.getLogger(__name__)


def spec_key(spec) -> str:
    """The key ``load_model(spec).key`` will have, computed without loading the model."""
    if isinstance(spec, ClipSpec):
        return clip_key(spec)
    if isinstance(spec, DinoSpec):
        return dino_key(spec)
    raise TypeError(f"expected ClipSpec or DinoSpec, got {type(spec).__name__}")


def load_model(spec, device: Optional[torch.device] = None) -> LoadedModel:
    """Load a ClipSpec or DinoSpec."""
    if isinstance(spec, ClipSpec):
        return load_clip(spec, device)
    if isinstance(spec, DinoSpec):
        return load_dino(spec, device)
    raise TypeError(f"expected ClipSpec or DinoSpec, got {type(spec).__name__}")


def _hub_cached(repo_id: Optional[str], filenames: tuple) -> bool:
    if not repo_id:
        return False
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    repo_id = repo_id.strip("/")
    return any(isinstance(try_to_load_from_cache(repo_id, f), str) for f in filenames)


def _clip_available(spec: ClipSpec) -> tuple[bool, str]:
    if clip_source(spec).tag is None:
        return True, ""
    import open_clip  # seconds to import: only when a tag has to be looked up

    cfg = open_clip.get_pretrained_cfg(spec.arch, clip_source(spec).tag) or {}
    if _hub_cached(cfg.get("hf_hub"), ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")):
        return True, ""
    return (True, "") if hub_reachable() else (False, offline_hint_clip(spec))


def _dino_available(spec: DinoSpec) -> tuple[bool, str]:
    spec = concrete_dino(spec)
    weights, _ = dino_weights(spec)
    if weights != "hub":
        return True, ""
    try:
        import timm  # seconds to import: only when the hub has to be asked

        repo = getattr(timm.models.get_pretrained_cfg(spec.name), "hf_hub_id", None)
    except Exception as e:  # no timm config for the name: the hub cannot be checked, only asked
        logger.debug("no timm pretrained config for %r: %r", spec.name, e)
        repo = None
    if _hub_cached(repo, ("model.safetensors", "pytorch_model.bin")):
        return True, ""
    return (
        (True, "")
        if hub_reachable()
        else (
            False,
            f"No weights for DINO {spec.name!r}: offline and nothing at {dino_hub_target(spec)}. Put "
            f"the timm weights there, pass a checkpoint file, or use --random-init for a smoke run.",
        )
    )


def weights_available(spec) -> tuple[bool, str]:
    """``(True, "")`` if ``spec``'s weights can be had without a failing download, else
    ``(False, what to provide where)``. Raises for a named file that does not exist."""
    if spec.random_init:
        return True, ""
    if isinstance(spec, ClipSpec):
        return _clip_available(spec)
    return _dino_available(spec)
