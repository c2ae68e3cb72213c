"""Resolve and load the CLIP (open_clip) and DINO (timm) models every stage uses.

A model is named by a spec:

* CLIP: an open_clip architecture plus a pretrained tag (``ViT-B-32`` + ``openai``), an
  ``hf-hub:org/repo`` name, or a local checkpoint file.
* DINO: a timm model name (``vit_base_patch16_224.dino``) plus an optional local checkpoint.

Weights are looked up in this order: an explicit checkpoint path; the models directory
(``NOLA_MODELS_DIR``, default ``~/.fiftyone_nola/models``) with the layout::

    <models_dir>/clip/<arch>/<tag>.{pt,bin,safetensors}     e.g. clip/ViT-B-32/openai.pt
    <models_dir>/dino/<timm name>.{safetensors,pth,bin}     e.g. dino/vit_base_patch16_224.dino.safetensors

then the model's hub (only when nothing local exists). ``random_init=True`` (or
``NOLA_RANDOM_INIT=1``) skips weights entirely for smoke runs and tests: labels from such
models are meaningless.
"""

from __future__ import annotations

import hashlib
import logging
import os
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from .errors import ModelNotFoundError
from .storage import nola_home

logger = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
_CONFIG_DIR = Path(__file__).parent / "configs"
RANDOM_INIT_SEED = 0

# Tiny random-initialised models for unit tests: same code paths, milliseconds per image.
TINY_CLIP_ARCH = "nola-tiny-clip"
TINY_DINO_NAME = "nola_tiny_vit"
_TINY_TIMM = {
    TINY_DINO_NAME: (
        "vit_tiny_patch16_224",
        dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=2),
    ),
}


def env_flag(name: str) -> bool:
    """Whether environment variable ``name`` is set to a true value."""
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def random_init_default() -> bool:
    """``NOLA_RANDOM_INIT=1`` turns on random initialisation for every model spec built by default."""
    return env_flag("NOLA_RANDOM_INIT")


def models_dir(path: Optional[str] = None) -> Path:
    """Where local weights are looked up: argument, ``NOLA_MODELS_DIR``, else ``$NOLA_HOME/models``."""
    if path:
        return Path(path).expanduser()
    env = os.environ.get("NOLA_MODELS_DIR")
    return Path(env).expanduser() if env else nola_home() / "models"


@dataclass(frozen=True)
class ClipSpec:
    """Which CLIP to load. ``pretrained`` is an open_clip tag, a file path, or None."""

    arch: str = "ViT-B-32"
    pretrained: Optional[str] = "openai"
    random_init: bool = field(default_factory=random_init_default)
    models_dir: Optional[str] = None

    @property
    def family(self) -> str:
        return "clip"


@dataclass(frozen=True)
class DinoSpec:
    """Which DINO to load: a timm name, optional checkpoint file, and which feature to embed."""

    name: str = "auto"  # auto: the paper's vit_base_patch16_224.dino on a GPU, ViT-S/16 on a CPU
    checkpoint: Optional[str] = None
    feature: str = "cls"  # "cls": CLS token after the final norm; "pooled": the model's own pooling
    random_init: bool = field(default_factory=random_init_default)
    models_dir: Optional[str] = None

    @property
    def family(self) -> str:
        return "dino"


def concrete_dino(spec: DinoSpec) -> DinoSpec:
    """``spec`` with ``name="auto"`` replaced by the model that fits this machine."""
    if spec.name != "auto":
        return spec
    from .device import hardware_profile

    return replace(spec, name=hardware_profile().dino_model)


def tiny_clip_spec() -> ClipSpec:
    """A tiny random-initialised CLIP (tests, smoke runs): same code paths, milliseconds."""
    return ClipSpec(arch=TINY_CLIP_ARCH, pretrained=None, random_init=True)


def tiny_dino_spec() -> DinoSpec:
    """A tiny random-initialised timm ViT standing in for DINO (tests, smoke runs)."""
    return DinoSpec(name=TINY_DINO_NAME, random_init=True)


@dataclass
class LoadedModel:
    """A model ready for inference plus what is needed to feed it and to identify it."""

    family: str  # "clip" or "dino"
    model: torch.nn.Module
    transform: Callable[[Any], torch.Tensor]  # PIL image -> normalised CHW tensor
    image_size: int
    embed_dim: int
    identity: dict  # name, weights identity, random_init: stored in index/checkpoint metadata
    encode_image: Callable[[torch.Tensor], torch.Tensor]
    tokenizer: Optional[Callable] = None  # CLIP only
    spec: Any = None

    @property
    def key(self) -> str:
        """Short filesystem-safe key naming this model and its weights."""
        return self.identity["key"]


def _file_identity(path: Path) -> str:
    """Cheap content identity of a large weights file: size plus hash of its ends."""
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        if size > 2 << 20:
            f.seek(-(1 << 20), os.SEEK_END)
            h.update(f.read(1 << 20))
    return h.hexdigest()[:12]


def _safe(s: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in s)


def _find_local(root: Path, stem: str) -> Optional[Path]:
    for suffix in WEIGHT_SUFFIXES:
        p = root / f"{stem}{suffix}"
        if p.is_file():
            return p
    return None


def _register_tiny_configs() -> None:
    import open_clip

    if TINY_CLIP_ARCH not in open_clip.list_models():
        open_clip.add_model_config(_CONFIG_DIR)


def _clip_weights(spec: ClipSpec) -> tuple[Optional[str], str]:
    """Return (argument for open_clip's ``pretrained``, weights identity)."""
    if spec.random_init or not spec.pretrained:
        return None, f"random-init-seed{RANDOM_INIT_SEED}"
    p = Path(spec.pretrained).expanduser()
    if p.suffix in WEIGHT_SUFFIXES or os.sep in spec.pretrained:
        if not p.is_file():
            raise ModelNotFoundError(
                f"CLIP checkpoint file {p} does not exist. Pass the path of an open_clip "
                f"checkpoint for {spec.arch}, or an open_clip pretrained tag such as 'openai'."
            )
        return str(p), f"file-{_file_identity(p)}"
    local = _find_local(models_dir(spec.models_dir) / "clip" / _safe(spec.arch), _safe(spec.pretrained))
    if local is not None:
        return str(local), f"{spec.pretrained}-file-{_file_identity(local)}"
    return spec.pretrained, spec.pretrained


def _offline_hint_clip(spec: ClipSpec) -> str:
    target = models_dir(spec.models_dir) / "clip" / _safe(spec.arch) / f"{_safe(spec.pretrained or 'weights')}.pt"
    return (
        f"Could not load CLIP {spec.arch} weights {spec.pretrained!r} (no local file and the hub "
        f"download failed: offline?). Put the checkpoint at {target}, pass pretrained=<path to file>, "
        f"set NOLA_MODELS_DIR, or use random_init=True / --random-init / NOLA_RANDOM_INIT=1 for a "
        f"smoke run (labels are then meaningless)."
    )


def _seeded():
    """Random init must give the same weights in every process, so stored indexes stay valid."""
    ctx = torch.random.fork_rng(devices=[])
    return ctx


class _LazyTokenizer:
    """open_clip's tokenizer, built on first use: image-only jobs never pay its ~0.7 s."""

    def __init__(self, arch: str):
        self.arch = arch
        self._tok = None

    def __call__(self, texts, *args, **kwargs):
        if self._tok is None:
            import open_clip

            self._tok = open_clip.get_tokenizer(self.arch)
        return self._tok(texts, *args, **kwargs)


_MODEL_CACHE: OrderedDict[tuple, LoadedModel] = OrderedDict()
MODEL_CACHE_SIZE = 2  # a CLIP and a DINO: what one pipeline run alternates between


def _cached(spec, device, build: Callable[[], LoadedModel]) -> LoadedModel:
    """One load per (weights, device) per process: each pipeline stage used to reload CLIP (5-15 s)."""
    key = (type(spec).__name__, spec_key(spec), str(device or "cpu"),
           getattr(spec, "feature", None))
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


def load_clip(spec: Optional[ClipSpec] = None, device: Optional[torch.device] = None,
              cache: bool = True) -> LoadedModel:
    """Build (or reuse) an open_clip model from ``spec`` (see module docstring for lookup order).

    Callers must not modify the returned model in place (stages that train copy what they change).
    """
    spec = spec or ClipSpec()
    if cache:
        return _cached(spec, device, lambda: load_clip(spec, device, cache=False))
    import open_clip

    _register_tiny_configs()
    device = device or torch.device("cpu")
    pretrained, weights_id = _clip_weights(spec)
    if spec.arch.startswith("hf-hub:") and spec.random_init:
        raise ModelNotFoundError("random_init is not supported for hf-hub: CLIP names; name an architecture")
    if not spec.arch.startswith("hf-hub:") and spec.arch not in open_clip.list_models():
        raise ModelNotFoundError(
            f"Unknown CLIP architecture {spec.arch!r}. Known ones include: "
            f"{', '.join(sorted(open_clip.list_models())[:12])}, ... (open_clip.list_models())."
        )
    with _seeded():
        torch.manual_seed(RANDOM_INIT_SEED)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model, _, preprocess = open_clip.create_model_and_transforms(
                    spec.arch, pretrained=pretrained, device=device
                )
        except (RuntimeError, OSError, ValueError) as e:  # hub errors surface as these
            if pretrained is None or os.path.isfile(str(pretrained)):
                raise
            raise ModelNotFoundError(_offline_hint_clip(spec) + f" ({type(e).__name__}: {e})") from e
    model.eval()
    tokenizer = _LazyTokenizer(spec.arch)
    image_size = model.visual.image_size
    image_size = image_size[0] if isinstance(image_size, (tuple, list)) else int(image_size)
    embed_dim = int(model.text_projection.shape[1]) if getattr(model, "text_projection", None) is not None \
        else int(model.visual.output_dim)
    if spec.random_init:
        logger.warning("CLIP %s is randomly initialised: its labels are meaningless", spec.arch)
    identity = {
        "family": "clip",
        "name": spec.arch,
        "weights": weights_id,
        "random_init": bool(spec.random_init or not spec.pretrained),
        "key": spec_key(spec),
    }
    return LoadedModel(
        family="clip", model=model, transform=preprocess, image_size=int(image_size),
        embed_dim=embed_dim, identity=identity, encode_image=model.encode_image,
        tokenizer=tokenizer, spec=spec,
    )


def _dino_weights(spec: DinoSpec) -> tuple[Optional[str], str]:
    """Return (local checkpoint file or "hub" or None, weights identity)."""
    spec = concrete_dino(spec)
    if spec.random_init or spec.name in _TINY_TIMM:
        return None, f"random-init-seed{RANDOM_INIT_SEED}"
    if spec.checkpoint:
        p = Path(spec.checkpoint).expanduser()
        if not p.is_file():
            raise ModelNotFoundError(
                f"DINO checkpoint file {p} does not exist. Pass the path of a timm-compatible "
                f"state dict for {spec.name} (.safetensors, .pth or .bin)."
            )
        return str(p), f"file-{_file_identity(p)}"
    local = _find_local(models_dir(spec.models_dir) / "dino", _safe(spec.name))
    if local is not None:
        return str(local), f"file-{_file_identity(local)}"
    return "hub", "hub"


def load_dino(spec: Optional[DinoSpec] = None, device: Optional[torch.device] = None,
              cache: bool = True) -> LoadedModel:
    """Build (or reuse) a timm backbone (no classifier head) from ``spec``."""
    spec = concrete_dino(spec or DinoSpec())
    if cache:
        return _cached(spec, device, lambda: load_dino(spec, device, cache=False))
    import timm
    from timm.data import create_transform, resolve_data_config

    if spec.feature not in {"cls", "pooled"}:
        from .errors import InvalidInputError

        raise InvalidInputError(f"DINO feature must be 'cls' or 'pooled', not {spec.feature!r}")
    device = device or torch.device("cpu")
    name, kwargs = _TINY_TIMM.get(spec.name, (spec.name, {}))
    base = name.split(".")[0]
    if not timm.is_model(base):
        raise ModelNotFoundError(
            f"Unknown timm model {spec.name!r}; DINO examples: vit_small_patch16_224.dino, "
            f"vit_base_patch16_224.dino, vit_small_patch14_dinov2.lvd142m."
        )
    weights, weights_id = _dino_weights(spec)
    with _seeded():
        torch.manual_seed(RANDOM_INIT_SEED)
        try:
            if weights is None:
                model = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
            elif weights == "hub":
                model = timm.create_model(name, pretrained=True, num_classes=0, **kwargs)
            else:
                model = timm.create_model(
                    name, pretrained=True, num_classes=0,
                    pretrained_cfg_overlay=dict(file=weights), **kwargs,
                )
        except (RuntimeError, OSError, ValueError) as e:
            if weights != "hub":
                raise
            target = models_dir(spec.models_dir) / "dino" / f"{_safe(spec.name)}.safetensors"
            raise ModelNotFoundError(
                f"Could not load DINO weights for {spec.name!r} (no local file and the hub download "
                f"failed: offline?). Put the weights at {target}, pass checkpoint=<path>, set "
                f"NOLA_MODELS_DIR, or use random_init=True / --random-init for a smoke run. "
                f"({type(e).__name__}: {e})"
            ) from e
    model.eval().to(device)
    overrides = {"input_size": (3, kwargs["img_size"], kwargs["img_size"])} if "img_size" in kwargs else {}
    data_cfg = resolve_data_config(overrides, model=model)
    transform = create_transform(**data_cfg, is_training=False)
    image_size = int(data_cfg["input_size"][-1])

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
        "random_init": weights is None,
        "key": spec_key(spec),
    }
    return LoadedModel(
        family="dino", model=model, transform=transform, image_size=image_size,
        embed_dim=int(model.num_features), identity=identity, encode_image=encode, spec=spec,
    )


def spec_key(spec) -> str:
    """The key ``load_model(spec).key`` will have, computed without loading the model."""
    if isinstance(spec, ClipSpec):
        _, weights_id = _clip_weights(spec)
        return _safe(f"clip-{spec.arch}-{weights_id}")
    if isinstance(spec, DinoSpec):
        spec = concrete_dino(spec)
        weights, weights_id = _dino_weights(spec)
        return _safe(f"dino-{spec.name}-{spec.feature}-{weights_id}")
    raise TypeError(f"expected ClipSpec or DinoSpec, got {type(spec).__name__}")


def load_model(spec, device: Optional[torch.device] = None) -> LoadedModel:
    """Load a ClipSpec or DinoSpec."""
    if isinstance(spec, ClipSpec):
        return load_clip(spec, device)
    if isinstance(spec, DinoSpec):
        return load_dino(spec, device)
    raise TypeError(f"expected ClipSpec or DinoSpec, got {type(spec).__name__}")


def with_random_init(spec, random_init: bool = True):
    """A copy of ``spec`` with random initialisation switched on or off."""
    return replace(spec, random_init=random_init)


def hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    """Whether the model hub answers; offline machines fail this in milliseconds."""
    import socket

    if env_flag("HF_HUB_OFFLINE"):
        return False
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _hub_cached(repo_id: Optional[str], filenames: tuple) -> bool:
    if not repo_id:
        return False
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    repo_id = repo_id.strip("/")
    return any(isinstance(try_to_load_from_cache(repo_id, f), str) for f in filenames)


def weights_available(spec) -> tuple[bool, str]:
    """``(True, "")`` if ``spec``'s weights can be had without a failing download, else
    ``(False, what to provide where)``. Raises for a named file that does not exist."""
    if spec.random_init:
        return True, ""
    if isinstance(spec, ClipSpec):
        pretrained, _ = _clip_weights(spec)
        if pretrained is None or os.path.isfile(str(pretrained)):
            return True, ""
        import open_clip

        cfg = open_clip.get_pretrained_cfg(spec.arch, spec.pretrained) or {}
        if _hub_cached(cfg.get("hf_hub"), ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")):
            return True, ""
        return (True, "") if hub_reachable() else (False, _offline_hint_clip(spec))
    spec = concrete_dino(spec)
    weights, _ = _dino_weights(spec)
    if weights != "hub":
        return True, ""
    try:
        import timm

        cfg = timm.models.get_pretrained_cfg(spec.name)
        repo = getattr(cfg, "hf_hub_id", None)
    except Exception:
        repo = None
    if _hub_cached(repo, ("model.safetensors", "pytorch_model.bin")):
        return True, ""
    target = models_dir(spec.models_dir) / "dino" / f"{_safe(spec.name)}.safetensors"
    return (True, "") if hub_reachable() else (
        False, f"No weights for DINO {spec.name!r}: offline and nothing at {target}. Put the timm "
               f"weights there, pass a checkpoint file, or use --random-init for a smoke run.")
