"""Load DINO (a timm ViT backbone) and NoLA's input transform for it.

timm and torchvision are imported where a model is built, not at module top: importing them
costs seconds that spec handling, validation and the CLI's start never need.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Optional

import torch

from fiftyone_nola.core.device import hardware_profile
from fiftyone_nola.core.errors import InvalidInputError, ModelNotFoundError
from fiftyone_nola.core.models.cache import cached, seeded_init
from fiftyone_nola.core.models.dino_family import eval_size, fit_dinov2_input, official_transform
from fiftyone_nola.core.models.dino_weights import dino_file, dino_name_from_file, find_local_dino, load_dino_weights
from fiftyone_nola.core.models.specs import (
    _TINY_TIMM,
    RANDOM_INIT_SEED,
    DinoSpec,
    LoadedModel,
    default_preprocess,
    dino_generation,
    file_identity,
    models_dir,
    safe_name,
)

logger = logging.getLogger(__name__)

DINO_PREPROCESS = ("nola", "timm", "official")
# NoLA's te_transform normalises with CLIP's statistics, for DINO too (utils/model_utils.py).
NOLA_MEAN = (0.48145466, 0.4578275, 0.40821073)
NOLA_STD = (0.26862954, 0.26130258, 0.27577711)


def _convert_rgb(img):
    """``image.convert("RGB")`` of NoLA's te_transform (a no-op on our already-RGB images)."""
    return img if img.mode == "RGB" else img.convert("RGB")


def nola_transform(size: int = 224):
    """NoLA's ``te_transform``: Resize(size, bicubic) -> CenterCrop(size) -> RGB -> ToTensor ->
    Normalize with CLIP's mean/std. The input of the official DINO labeler (and teacher)."""
    from torchvision import transforms
    from torchvision.transforms import InterpolationMode

    return transforms.Compose(
        [
            transforms.Resize(size, interpolation=InterpolationMode.BICUBIC),
            transforms.CenterCrop(size),
            _convert_rgb,
            transforms.ToTensor(),
            transforms.Normalize(NOLA_MEAN, NOLA_STD),
        ]
    )


def _check_dino_preprocess(spec: DinoSpec) -> None:
    if spec.preprocess not in DINO_PREPROCESS:
        raise InvalidInputError(
            f"DINO preprocess must be one of {DINO_PREPROCESS} ('nola': NoLA's te_transform, the "
            f"official labeler input; 'official': the DINO release's own eval transform; 'timm': "
            f"timm's eval transform), not {spec.preprocess!r}"
        )


def concrete_dino(spec: DinoSpec) -> DinoSpec:
    """``spec`` with ``name="auto"`` replaced by the architecture of its checkpoint file, else
    by the model that fits this machine. With ``auto``, a default ``preprocess`` follows the
    architecture found (a DINOv2 file gets its official transform)."""
    if spec.name != "auto":
        return spec
    name = dino_name_from_file(spec.checkpoint) if spec.checkpoint and not spec.random_init else None
    name = name or hardware_profile().dino_model
    pre = default_preprocess(name) if spec.preprocess == default_preprocess("auto") else spec.preprocess
    return replace(spec, name=name, preprocess=pre)


def dino_weights(spec: DinoSpec) -> tuple[Optional[str], str]:
    """Return (local checkpoint file or "hub" or None, weights identity)."""
    spec = concrete_dino(spec)
    if spec.random_init or spec.name in _TINY_TIMM:
        return None, f"random-init-seed{RANDOM_INIT_SEED}"
    if spec.checkpoint:
        p = dino_file(spec.checkpoint)
        return str(p), f"file-{file_identity(p)}"
    local = find_local_dino(models_dir(spec.models_dir) / "dino", spec.name)
    if local is not None:
        return str(local), f"file-{file_identity(local)}"
    return "hub", "hub"


def dino_key(spec: DinoSpec) -> str:
    """The key ``load_dino(spec).key`` will have, computed without loading the model."""
    spec = concrete_dino(spec)
    _check_dino_preprocess(spec)
    _, weights_id = dino_weights(spec)
    # "timm" keeps the key stores had before the option existed (they were built that way).
    pre = "" if spec.preprocess == "timm" else f"-{spec.preprocess}"
    return safe_name(f"dino-{spec.name}-{spec.feature}{pre}-{weights_id}")


def dino_hub_target(spec: DinoSpec):
    """Where to put the weights of ``spec`` when the hub cannot be reached."""
    return models_dir(spec.models_dir) / "dino" / f"{safe_name(spec.name)}.safetensors"


def _timm_name(spec: DinoSpec) -> tuple[str, dict]:
    """``(timm model name, create_model kwargs)`` of ``spec``; unknown names fail clearly."""
    import timm

    name, kwargs = _TINY_TIMM.get(spec.name, (spec.name, {}))
    if not timm.is_model(name.split(".")[0]):
        raise ModelNotFoundError(
            f"Unknown timm model {spec.name!r}; DINO examples: vit_small_patch16_224.dino, "
            f"vit_base_patch16_224.dino, vit_small_patch14_dinov2.lvd142m."
        )
    return name, kwargs


def _build_timm(spec: DinoSpec, name: str, kwargs: dict, weights: Optional[str]) -> torch.nn.Module:
    """The timm backbone ``name`` of ``spec`` (no classifier head) with its weights loaded."""
    import timm

    with seeded_init():
        try:
            model = timm.create_model(name, pretrained=weights == "hub", num_classes=0, **kwargs)
            if weights not in (None, "hub"):
                load_dino_weights(model, weights, spec.name)
        except (RuntimeError, OSError, ValueError) as e:
            if weights != "hub":
                raise
            raise ModelNotFoundError(
                f"Could not load DINO weights for {spec.name!r} (no local file and the hub download "
                f"failed: offline?). Put the weights at {dino_hub_target(spec)}, pass checkpoint=<path>, "
                f"set NOLA_MODELS_DIR, or use random_init=True / --random-init for a smoke run. "
                f"({type(e).__name__}: {e})"
            ) from e
    if dino_generation(spec.name) == "dinov2" and spec.preprocess != "timm":
        fit_dinov2_input(model, eval_size(spec.name))  # run at 224 as the official model does
    return model


def _transform(spec: DinoSpec, model: torch.nn.Module, kwargs: dict):
    """``(transform, image size)`` feeding ``model`` (built with ``kwargs``) as ``spec.preprocess`` says."""
    from timm.data import create_transform, resolve_data_config

    overrides = {"input_size": (3, kwargs["img_size"], kwargs["img_size"])} if "img_size" in kwargs else {}
    data_cfg = resolve_data_config(overrides, model=model)
    image_size = int(data_cfg["input_size"][-1])
    if spec.preprocess == "timm":
        return create_transform(**data_cfg, is_training=False), image_size
    if dino_generation(spec.name) != "dino":
        image_size = eval_size(spec.name)  # DINOv2/v3 are evaluated at 224, not timm's 518 / 256
    if spec.preprocess == "official":
        return official_transform(spec.name, image_size), image_size
    return nola_transform(image_size), image_size


def load_dino(
    spec: Optional[DinoSpec] = None, device: Optional[torch.device] = None, cache: bool = True
) -> LoadedModel:
    """Build (or reuse) a timm backbone (no classifier head) from ``spec``.

    Local weights (a checkpoint or the models dir) load in any of ``DINO_WEIGHT_FORMATS``;
    otherwise timm fetches them from its hub (its cache is used offline, ``HF_HUB_OFFLINE=1``).
    """
    spec = concrete_dino(spec or DinoSpec())
    if cache:
        return cached(spec, dino_key(spec), device, lambda: load_dino(spec, device, cache=False))
    if spec.feature not in {"cls", "pooled"}:
        raise InvalidInputError(f"DINO feature must be 'cls' or 'pooled', not {spec.feature!r}")
    _check_dino_preprocess(spec)
    name, kwargs = _timm_name(spec)
    weights, weights_id = dino_weights(spec)
    model = _build_timm(spec, name, kwargs, weights)
    model.eval().to(device or torch.device("cpu"))
    transform, image_size = _transform(spec, model, kwargs)

    if spec.feature == "cls":

        def encode(x: torch.Tensor) -> torch.Tensor:
            return model.forward_features(x)[:, 0]
    else:
        encode = model

    if spec.random_init or weights is None:
        logger.warning("DINO %s is randomly initialised: its labels are meaningless", spec.name)
    identity = {
        "family": "dino",
        "name": spec.name,
        "weights": weights_id,
        "feature": spec.feature,
        "preprocess": spec.preprocess,
        "random_init": weights is None,
        "key": dino_key(spec),
    }
    return LoadedModel(
        family="dino",
        model=model,
        transform=transform,
        image_size=image_size,
        embed_dim=int(model.num_features),
        identity=identity,
        encode_image=encode,
        spec=spec,
    )
