"""Model specs (which CLIP / DINO to load), the loaded-model record, and where weights live."""

from __future__ import annotations

import hashlib
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from fiftyone_nola.core.checkpoints import WEIGHT_SUFFIXES
from fiftyone_nola.core.storage import nola_home

# JSON data of the core package (the tiny CLIP's open_clip config, template presets).
_CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
RANDOM_INIT_SEED = 0

# Tiny random-initialised models for unit tests: same code paths, milliseconds per image.
TINY_CLIP_ARCH = "nola-tiny-clip"  # open_clip VisionTransformer + CLIP text tower (OpenAI layout)
TINY_SIGLIP_ARCH = "nola-tiny-siglip2"  # timm ViT with attention pooling, sigmoid scoring, HF tokenizer
TINY_PE_ARCH = "nola-tiny-pe-core"  # timm Eva (RoPE, class token, attention pooling), CLIP BPE tokenizer
TINY_DINO_NAME = "nola_tiny_vit"
TINY_DINOV2_NAME = "nola_tiny_dinov2"
TINY_DINOV3_NAME = "nola_tiny_dinov3"
_TINY = dict(embed_dim=48, depth=2, num_heads=2)
# name -> (timm architecture, create_model kwargs); DINOv2's is built at its native grid (4x4) and
# run at 2x2 patches, as the real ones are built at 518 px and run at 224 (dino_family.eval_size).
_TINY_TIMM = {
    TINY_DINO_NAME: ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, **_TINY)),
    TINY_DINOV2_NAME: ("vit_small_patch14_dinov2", dict(img_size=56, **_TINY)),
    TINY_DINOV3_NAME: ("vit_small_patch16_dinov3", dict(img_size=32, **_TINY)),
}


def env_flag(name: str) -> bool:
    """Whether environment variable ``name`` is set to a true value."""
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    """Whether the model hub answers; offline machines fail this in milliseconds."""
    if env_flag("HF_HUB_OFFLINE"):
        return False
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


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
    # None: the activation the weights were trained with (the tag's, or QuickGELU for OpenAI's
    # TorchScript files); True/False force it, e.g. for a plain state dict of OpenAI weights.
    quick_gelu: Optional[bool] = None

    @property
    def family(self) -> str:
        return "clip"


@dataclass(frozen=True)
class DinoSpec:
    """Which DINO to load: a timm name, optional checkpoint file, which feature to embed and how
    images are preprocessed.

    ``preprocess="nola"`` (default) is the official NoLA input of its DINO labeler (the
    ``te_transform`` of fazliimam/NoLA: Resize bicubic, CenterCrop, CLIP's mean/std);
    ``"timm"`` is timm's eval transform for the model (ImageNet mean/std, resize by crop_pct).
    With ``name="auto"`` and a checkpoint, the architecture is read from the file.
    """

    name: str = "auto"  # auto: the paper's vit_base_patch16_224.dino on a GPU, ViT-S/16 on a CPU
    checkpoint: Optional[str] = None  # a weights file (see DINO_WEIGHT_FORMATS) or a folder holding one
    feature: str = "cls"  # "cls": CLS token after the final norm; "pooled": the model's own pooling
    random_init: bool = field(default_factory=random_init_default)
    models_dir: Optional[str] = None
    # "nola": NoLA's te_transform (official for DINO v1); "official": the model family's own eval
    # transform (DINOv2/v3: resize 256, crop 224, ImageNet mean/std); "timm": timm's eval transform.
    # None: the family's default, resolved here so the spec (and every run record) names it:
    # "nola" for DINO v1 and other timm models, "official" for DINOv2/DINOv3.
    preprocess: Optional[str] = None

    def __post_init__(self):
        if self.preprocess is None:
            object.__setattr__(self, "preprocess", default_preprocess(self.name))

    @property
    def family(self) -> str:
        return "dino"


def dino_generation(name: str) -> str:
    """``"dinov3"``, ``"dinov2"`` or ``"dino"`` (v1 and any other timm ViT) for a DINO model name."""
    base = _TINY_TIMM.get(name, (name,))[0].split(".")[0].lower()
    return "dinov3" if "dinov3" in base else "dinov2" if "dinov2" in base else "dino"


def default_preprocess(name: str) -> str:
    """The input transform a DINO model is used with unless told otherwise (see ``DinoSpec``)."""
    return "official" if dino_generation(name) in ("dinov2", "dinov3") else "nola"


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


def file_identity(path: Path) -> str:
    """Cheap content identity of a large weights file: size plus hash of its ends."""
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        if size > 2 << 20:
            f.seek(-(1 << 20), os.SEEK_END)
            h.update(f.read(1 << 20))
    return h.hexdigest()[:12]


def safe_name(s: str) -> str:
    """``s`` as one filesystem-safe path component."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in s)


def find_local(root: Path, stem: str) -> Optional[Path]:
    """``root/<stem><suffix>`` for the first weights suffix that exists."""
    for suffix in WEIGHT_SUFFIXES:
        p = root / f"{stem}{suffix}"
        if p.is_file():
            return p
    return None
