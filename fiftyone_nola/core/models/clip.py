"""Load CLIP (open_clip): weights lookup, activation choice, checkpoint files.

open_clip is imported where a model is built or named, not at module top: importing it costs
seconds that spec handling, validation and the CLI's start never need.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from fiftyone_nola.core.checkpoints import ACCEPTED_FORMATS, WEIGHT_SUFFIXES, is_torchscript, read_state_dict
from fiftyone_nola.core.errors import ModelNotFoundError
from fiftyone_nola.core.models.cache import cached, seeded_init
from fiftyone_nola.core.models.scoring import CLIP_LOGIT_SCALE, Scoring, config_scoring_kind, model_scoring
from fiftyone_nola.core.models.specs import (
    RANDOM_INIT_SEED,
    ClipSpec,
    LoadedModel,
    file_identity,
    find_local,
    models_dir,
    safe_name,
)
from fiftyone_nola.core.models.tokenizers import build_tokenizer
from fiftyone_nola.core.models.towers import register_tiny_configs

logger = logging.getLogger(__name__)


def default_pretrained(arch: str) -> Optional[str]:
    """The pretrained tag to use for ``arch`` when none is named: ``openai`` where it exists
    (the paper's), else the architecture's only (first) open_clip tag, else None."""
    if arch.startswith("hf-hub:"):
        return None
    import open_clip

    tags = open_clip.list_pretrained_tags_by_model(arch)
    return ClipSpec.pretrained if ClipSpec.pretrained in tags or not tags else tags[0]


def _preprocess_overrides(spec: ClipSpec, src: ClipSource) -> dict:
    """The tag's own image preprocessing (mean/std, resize mode, interpolation) when open_clip
    does not download the tag itself: random init or a local file named after the tag. Without
    this a SigLIP would get OpenAI's statistics and a centre crop instead of its squash resize."""
    if src.tag is not None or spec.arch.startswith("hf-hub:"):
        return {}
    import open_clip

    tag = pretrained_tag(spec)
    if tag is None and spec.pretrained:  # a file: its architecture's tag when it has only one
        tags = open_clip.list_pretrained_tags_by_model(spec.arch)
        tag = tags[0] if len(tags) == 1 else None
    if tag is None:
        return {}
    cfg = open_clip.get_pretrained_cfg(spec.arch, tag) or {}
    names = {"mean": "image_mean", "std": "image_std", "interpolation": "image_interpolation"}
    names["resize_mode"] = "image_resize_mode"
    return {arg: cfg[k] for k, arg in names.items() if cfg.get(k) is not None}


@dataclass(frozen=True)
class ClipSource:
    """Where a ClipSpec's weights come from and which network they belong to."""

    tag: Optional[str]  # open_clip pretrained tag (downloaded or in the hub cache)
    file: Optional[str]  # local weights file
    weights_id: str
    quick_gelu: Optional[bool]  # None: as the architecture's config says (hf-hub: names)


def _quick_gelu(spec: ClipSpec, tag: Optional[str], file: Optional[str]) -> Optional[bool]:
    """The activation the weights were trained with: OpenAI's CLIPs use QuickGELU, while
    open_clip's plain ``ViT-B-32`` config is GELU; building one for the other silently changes
    every feature (cosine ~0.9999 to the right network on random weights, more on real ones)."""
    if spec.quick_gelu is not None:
        return bool(spec.quick_gelu)
    if spec.arch.startswith("hf-hub:"):
        return None
    import open_clip

    register_tiny_configs()
    if (open_clip.get_model_config(spec.arch) or {}).get("quick_gelu"):
        return True
    if tag:
        return bool((open_clip.get_pretrained_cfg(spec.arch, tag) or {}).get("quick_gelu", False))
    return bool(file and is_torchscript(file))  # OpenAI's release format: always QuickGELU


def _looks_like_path(pretrained: str) -> bool:
    return Path(pretrained).suffix in WEIGHT_SUFFIXES or os.sep in pretrained


def pretrained_tag(spec: ClipSpec) -> Optional[str]:
    """The open_clip tag ``spec.pretrained`` names (None for a file or no weights). The default
    ``openai`` on an architecture that has no such tag means the architecture's own tag."""
    p = spec.pretrained
    if not p or _looks_like_path(p):
        return None
    if p == ClipSpec.pretrained and not spec.arch.startswith("hf-hub:"):
        return default_pretrained(spec.arch) or p
    return p


def clip_source(spec: ClipSpec) -> ClipSource:
    """Resolve ``spec``'s weights: random, an explicit file, the models directory, or a tag."""
    if spec.random_init or not spec.pretrained:
        tag = pretrained_tag(spec)
        return ClipSource(None, None, f"random-init-seed{RANDOM_INIT_SEED}", _quick_gelu(spec, tag, None))
    if _looks_like_path(spec.pretrained):
        p = Path(spec.pretrained).expanduser()
        if not p.is_file():
            raise ModelNotFoundError(
                f"CLIP checkpoint file {p} does not exist. Pass the path of a CLIP checkpoint for "
                f"{spec.arch} ({ACCEPTED_FORMATS}), or an open_clip pretrained tag such as 'openai'."
            )
        return ClipSource(None, str(p), f"file-{file_identity(p)}", _quick_gelu(spec, None, str(p)))
    tag = pretrained_tag(spec)
    qg = _quick_gelu(spec, tag, None)
    local = find_local(models_dir(spec.models_dir) / "clip" / safe_name(spec.arch), safe_name(tag))
    if local is not None:
        return ClipSource(None, str(local), f"{tag}-file-{file_identity(local)}", qg)
    return ClipSource(tag, None, tag, qg)


def clip_key(spec: ClipSpec) -> str:
    """The key ``load_clip(spec).key`` will have, computed without loading the model."""
    src = clip_source(spec)
    # The activation is part of the network: features from GELU and QuickGELU builds differ.
    act = "-quickgelu" if src.quick_gelu and "quickgelu" not in spec.arch.lower() else ""
    # So are the scores: sigmoid models' stores and cached texts never mix with softmax ones
    # (softmax models keep the key they always had).
    sig = "-sigmoid" if config_scoring_kind(spec.arch) == "sigmoid" else ""
    return safe_name(f"clip-{spec.arch}-{src.weights_id}{act}{sig}")


def offline_hint_clip(spec: ClipSpec) -> str:
    """What to do when ``spec``'s weights are neither local nor downloadable."""
    tag = pretrained_tag(spec) or spec.pretrained
    target = models_dir(spec.models_dir) / "clip" / safe_name(spec.arch) / f"{safe_name(tag or 'weights')}.pt"
    return (
        f"Could not load CLIP {spec.arch} weights {tag!r} (no local file and the hub "
        f"download failed: offline?). Put the checkpoint at {target}, pass pretrained=<path to file>, "
        f"set NOLA_MODELS_DIR, or use random_init=True / --random-init / NOLA_RANDOM_INIT=1 for a "
        f"smoke run (labels are then meaningless)."
    )


class _LazyTokenizer:
    """The model's tokenizer (``tokenizers.build_tokenizer``), built on first use: image-only
    jobs never pay its ~0.7 s (nor need a Hugging Face tokenizer at all)."""

    def __init__(self, spec: ClipSpec):
        self.spec = spec
        self._tok = None

    def __call__(self, texts, *args, **kwargs):
        if self._tok is None:
            self._tok = build_tokenizer(self.spec)
        return self._tok(texts, *args, **kwargs)


def _check_arch(spec: ClipSpec) -> None:
    import open_clip

    if spec.arch.startswith("hf-hub:") and spec.random_init:
        raise ModelNotFoundError("random_init is not supported for hf-hub: CLIP names; name an architecture")
    if not spec.arch.startswith("hf-hub:") and spec.arch not in open_clip.list_models():
        raise ModelNotFoundError(
            f"Unknown CLIP architecture {spec.arch!r}. Known ones include: "
            f"{', '.join(sorted(open_clip.list_models())[:12])}, ... (open_clip.list_models())."
        )


def load_clip(
    spec: Optional[ClipSpec] = None, device: Optional[torch.device] = None, cache: bool = True
) -> LoadedModel:
    """Build (or reuse) an open_clip model from ``spec`` (see the package docstring for lookup order).

    Callers must not modify the returned model in place (stages that train copy what they change).
    """
    spec = spec or ClipSpec()
    if cache:
        return cached(spec, clip_key(spec), device, lambda: load_clip(spec, device, cache=False))
    import open_clip

    register_tiny_configs()
    device = device or torch.device("cpu")
    _check_arch(spec)
    src = clip_source(spec)
    force_qg = {"force_quick_gelu": True} if src.quick_gelu else {}
    with seeded_init():
        try:
            with _quiet_random_init_notice(src.file is not None):
                model, _, preprocess = open_clip.create_model_and_transforms(
                    spec.arch, pretrained=src.tag, device=device, **force_qg, **_preprocess_overrides(spec, src)
                )
        except (RuntimeError, OSError, ValueError) as e:  # hub errors surface as these
            if src.tag is None:
                raise
            raise ModelNotFoundError(offline_hint_clip(spec) + f" ({type(e).__name__}: {e})") from e
    if src.file is not None:
        _load_clip_file(model, Path(src.file), spec.arch)
        model.to(device)
    model.eval()
    tanh = _siglip_tanh_gelu(model)
    image_size = model.visual.image_size
    image_size = image_size[0] if isinstance(image_size, (tuple, list)) else int(image_size)
    embed_dim = _embed_dim(model, spec.arch, int(image_size))
    if spec.random_init:
        logger.warning("CLIP %s is randomly initialised: its labels are meaningless", spec.arch)
    identity = {
        "family": "clip",
        "name": spec.arch,
        "weights": src.weights_id,
        "activation": "gelu_tanh"
        if tanh
        else ("default" if src.quick_gelu is None else ("quick_gelu" if src.quick_gelu else "gelu")),
        "random_init": bool(spec.random_init or not spec.pretrained),
        "scoring": model_scoring(model).kind,
        "key": clip_key(spec),
    }
    return LoadedModel(
        family="clip",
        model=model,
        transform=preprocess,
        image_size=int(image_size),
        embed_dim=embed_dim,
        identity=identity,
        encode_image=model.encode_image,
        tokenizer=_LazyTokenizer(spec),
        spec=spec,
    )


def _siglip_tanh_gelu(model: torch.nn.Module) -> bool:
    """SigLIP's vision MLPs use the tanh GELU it was trained with (big_vision's ``nn.gelu``, and
    transformers' ``gelu_pytorch_tanh``); timm builds its SigLIP towers with exact GELU, which
    moves ViT-B/16 features by up to 4e-4 on random weights (tests/test_siglip_faithful.py).
    Applies to timm ViT towers of sigmoid (SigLIP-family) models; returns whether it did."""
    trunk = getattr(model.visual, "trunk", None)
    if getattr(model, "logit_bias", None) is None or type(trunk).__name__ != "VisionTransformer":
        return False
    for m in trunk.modules():
        if isinstance(m, torch.nn.GELU):
            m.approximate = "tanh"
    return True


def _embed_dim(model: torch.nn.Module, arch: str, image_size: int) -> int:
    """Width of the joint image-text space (timm towers have no ``output_dim``)."""
    proj = getattr(model, "text_projection", None)
    if isinstance(proj, torch.nn.Parameter):
        return int(proj.shape[1])
    if getattr(model.visual, "output_dim", None):
        return int(model.visual.output_dim)
    import open_clip

    dim = (open_clip.get_model_config(arch) or {}).get("embed_dim")
    if dim:
        return int(dim)
    with torch.no_grad():  # an hf-hub: config is not kept: measure it
        p = next(model.visual.parameters())
        return int(model.visual(torch.zeros(1, 3, image_size, image_size, device=p.device, dtype=p.dtype)).shape[-1])


@contextlib.contextmanager
def _quiet_random_init_notice(weights_follow: bool):
    """Drop open_clip's "initialized randomly" notice when we load the weights right after."""

    def keep(record: logging.LogRecord) -> bool:
        return "Model initialized randomly" not in record.getMessage()

    root = logging.getLogger()
    if weights_follow:
        root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


def _load_clip_file(model: torch.nn.Module, path: Path, arch: str) -> None:
    """Load a local CLIP checkpoint (formats: ``checkpoints``) into ``model``, strictly."""
    from open_clip.factory import load_checkpoint, resize_pos_embed

    try:
        if is_torchscript(path):
            sd = read_state_dict(path)
            if "logit_scale" in sd:
                sd["logit_scale"] = sd["logit_scale"].reshape(model.logit_scale.shape)
            resize_pos_embed(sd, model)
            model.load_state_dict(sd, strict=True)
        else:
            if path.suffix not in WEIGHT_SUFFIXES:
                read_state_dict(path)  # raises the message naming the accepted formats
            load_checkpoint(model, str(path), strict=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, ValueError) as e:
        if "state_dict" in str(e) or "size mismatch" in str(e):
            raise ModelNotFoundError(
                f"{path} does not hold {arch} CLIP weights ({str(e).splitlines()[0][:200]}). Name "
                f"the architecture the file was trained as (e.g. --clip-arch ViT-B-16)."
            ) from e
        raise ModelNotFoundError(f"Cannot read {path}: {str(e)[:200]}. Accepted: {ACCEPTED_FORMATS}.") from e


def clip_scoring(spec: ClipSpec, softmax_scale: float = CLIP_LOGIT_SCALE, device=None) -> Scoring:
    """``spec``'s scoring (``core/models/scoring.py``): softmax models are known from their config
    (nothing is loaded); sigmoid models' learnt scale and bias come from the (cached) model."""
    if config_scoring_kind(spec.arch) == "softmax":
        return Scoring("softmax", float(softmax_scale))
    return model_scoring(load_clip(spec, device).model, softmax_scale)
