"""Resolve and load the CLIP (open_clip) and DINO (timm) models every stage uses.

A model is named by a spec:

* CLIP: an open_clip architecture plus a pretrained tag (``ViT-B-32`` + ``openai``), an
  ``hf-hub:org/repo`` name, or a local checkpoint file.
* DINO: a timm model name (``vit_base_patch16_224.dino``) plus an optional local checkpoint.

Weights are looked up in this order: an explicit checkpoint path; the models directory
(``NOLA_MODELS_DIR``, default ``~/.fiftyone_nola/models``) with the layout::

    <models_dir>/clip/<arch>/<tag>.{pt,bin,safetensors}     e.g. clip/ViT-B-32/openai.pt
    <models_dir>/dino/<timm name>.{safetensors,pth,bin}     e.g. dino/vit_base_patch16_224.dino.safetensors
    <models_dir>/dino/<timm name>/{model.safetensors,pytorch_model.bin}   (timm's hub files)
    <models_dir>/dino/<official release file>               e.g. dino/dino_vitbase16_pretrain.pth

then the model's hub (only when nothing local exists). ``random_init=True`` (or
``NOLA_RANDOM_INIT=1``) skips weights entirely for smoke runs and tests: labels from such
models are meaningless.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import pickle
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from fiftyone_nola.core.checkpoints import (
    ACCEPTED_FORMATS,
    WEIGHT_SUFFIXES,
    is_torchscript,
    read_state_dict,
)
from fiftyone_nola.core.errors import ModelNotFoundError
from fiftyone_nola.core.storage import nola_home

logger = logging.getLogger(__name__)

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

    ``preprocess="nola"`` (default) is the official NoLA input of its DINO labeller (the
    ``te_transform`` of fazliimam/NoLA: Resize bicubic, CenterCrop, CLIP's mean/std);
    ``"timm"`` is timm's eval transform for the model (ImageNet mean/std, resize by crop_pct).
    With ``name="auto"`` and a checkpoint, the architecture is read from the file.
    """

    name: str = "auto"  # auto: the paper's vit_base_patch16_224.dino on a GPU, ViT-S/16 on a CPU
    checkpoint: Optional[str] = None  # a weights file (see DINO_WEIGHT_FORMATS) or a folder holding one
    feature: str = "cls"  # "cls": CLS token after the final norm; "pooled": the model's own pooling
    random_init: bool = field(default_factory=random_init_default)
    models_dir: Optional[str] = None
    preprocess: str = "nola"  # "nola": NoLA's te_transform (official); "timm": timm's eval transform

    @property
    def family(self) -> str:
        return "dino"


def concrete_dino(spec: DinoSpec) -> DinoSpec:
    """``spec`` with ``name="auto"`` replaced by the architecture of its checkpoint file, else
    by the model that fits this machine."""
    if spec.name != "auto":
        return spec
    if spec.checkpoint and not spec.random_init:
        name = _dino_name_from_file(spec.checkpoint)
        if name:
            return replace(spec, name=name)
    from fiftyone_nola.core.device import hardware_profile

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


@dataclass(frozen=True)
class _ClipSource:
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

    _register_tiny_configs()
    if (open_clip.get_model_config(spec.arch) or {}).get("quick_gelu"):
        return True
    if tag:
        return bool((open_clip.get_pretrained_cfg(spec.arch, tag) or {}).get("quick_gelu", False))
    return bool(file and is_torchscript(file))  # OpenAI's release format: always QuickGELU


def _clip_source(spec: ClipSpec) -> _ClipSource:
    """Resolve ``spec``'s weights: random, an explicit file, the models directory, or a tag."""
    if spec.random_init or not spec.pretrained:
        tag = spec.pretrained if spec.pretrained and not _looks_like_path(spec.pretrained) else None
        return _ClipSource(None, None, f"random-init-seed{RANDOM_INIT_SEED}", _quick_gelu(spec, tag, None))
    if _looks_like_path(spec.pretrained):
        p = Path(spec.pretrained).expanduser()
        if not p.is_file():
            raise ModelNotFoundError(
                f"CLIP checkpoint file {p} does not exist. Pass the path of a CLIP checkpoint for "
                f"{spec.arch} ({ACCEPTED_FORMATS}), or an open_clip pretrained tag such as 'openai'."
            )
        return _ClipSource(None, str(p), f"file-{_file_identity(p)}", _quick_gelu(spec, None, str(p)))
    qg = _quick_gelu(spec, spec.pretrained, None)
    local = _find_local(models_dir(spec.models_dir) / "clip" / _safe(spec.arch), _safe(spec.pretrained))
    if local is not None:
        return _ClipSource(None, str(local), f"{spec.pretrained}-file-{_file_identity(local)}", qg)
    return _ClipSource(spec.pretrained, None, spec.pretrained, qg)


def _looks_like_path(pretrained: str) -> bool:
    return Path(pretrained).suffix in WEIGHT_SUFFIXES or os.sep in pretrained


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
    if spec.arch.startswith("hf-hub:") and spec.random_init:
        raise ModelNotFoundError("random_init is not supported for hf-hub: CLIP names; name an architecture")
    if not spec.arch.startswith("hf-hub:") and spec.arch not in open_clip.list_models():
        raise ModelNotFoundError(
            f"Unknown CLIP architecture {spec.arch!r}. Known ones include: "
            f"{', '.join(sorted(open_clip.list_models())[:12])}, ... (open_clip.list_models())."
        )
    src = _clip_source(spec)
    force_qg = {"force_quick_gelu": True} if src.quick_gelu else {}
    with _seeded():
        torch.manual_seed(RANDOM_INIT_SEED)
        try:
            with _quiet_random_init_notice(src.file is not None):
                model, _, preprocess = open_clip.create_model_and_transforms(
                    spec.arch, pretrained=src.tag, device=device, **force_qg
                )
        except (RuntimeError, OSError, ValueError) as e:  # hub errors surface as these
            if src.tag is None:
                raise
            raise ModelNotFoundError(_offline_hint_clip(spec) + f" ({type(e).__name__}: {e})") from e
    if src.file is not None:
        _load_clip_file(model, Path(src.file), spec.arch)
        model.to(device)
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
        "weights": src.weights_id,
        "activation": "default" if src.quick_gelu is None else ("quick_gelu" if src.quick_gelu else "gelu"),
        "random_init": bool(spec.random_init or not spec.pretrained),
        "key": spec_key(spec),
    }
    return LoadedModel(
        family="clip", model=model, transform=preprocess, image_size=int(image_size),
        embed_dim=embed_dim, identity=identity, encode_image=model.encode_image,
        tokenizer=tokenizer, spec=spec,
    )


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


# Official facebookresearch/dino release files (plain state dicts) of the timm DINO models.
DINO_RELEASE_FILES = {
    "vit_small_patch16_224.dino": "dino_deitsmall16_pretrain.pth",
    "vit_small_patch8_224.dino": "dino_deitsmall8_pretrain.pth",
    "vit_base_patch16_224.dino": "dino_vitbase16_pretrain.pth",
    "vit_base_patch8_224.dino": "dino_vitbase8_pretrain.pth",
}
# (embed dim, patch size) of a DINO ViT state dict -> its timm name.
_DINO_ARCHS = {(384, 16): "vit_small_patch16_224.dino", (384, 8): "vit_small_patch8_224.dino",
               (768, 16): "vit_base_patch16_224.dino", (768, 8): "vit_base_patch8_224.dino"}
# timm's own files, as in the hub repo timm/<name> (and its huggingface_hub cache).
TIMM_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
DINO_WEIGHT_FORMATS = (
    "a plain PyTorch state dict (.pth/.pt/.bin): the official facebookresearch/dino release files "
    "(dino_deitsmall16_pretrain.pth, dino_vitbase16_pretrain.pth, ...) or an official "
    "*_full_checkpoint.pth (its teacher backbone is used); timm's files (model.safetensors or "
    "pytorch_model.bin, as in the hub repo timm/<name>, or any .safetensors state dict); or a "
    "folder holding model.safetensors / pytorch_model.bin"
)
DINO_PREPROCESS = ("nola", "timm")
# NoLA's te_transform normalises with CLIP's statistics, for DINO too (utils/model_utils.py).
NOLA_MEAN = (0.48145466, 0.4578275, 0.40821073)
NOLA_STD = (0.26862954, 0.26130258, 0.27577711)


def _convert_rgb(img):
    """``image.convert("RGB")`` of NoLA's te_transform (a no-op on our already-RGB images)."""
    return img if img.mode == "RGB" else img.convert("RGB")


def nola_transform(size: int = 224):
    """NoLA's ``te_transform``: Resize(size, bicubic) -> CenterCrop(size) -> RGB -> ToTensor ->
    Normalize with CLIP's mean/std. The input of the official DINO labeller (and teacher)."""
    from torchvision import transforms
    from torchvision.transforms import InterpolationMode

    return transforms.Compose([
        transforms.Resize(size, interpolation=InterpolationMode.BICUBIC),
        transforms.CenterCrop(size),
        _convert_rgb,
        transforms.ToTensor(),
        transforms.Normalize(NOLA_MEAN, NOLA_STD),
    ])


def _check_dino_preprocess(spec: DinoSpec) -> None:
    if spec.preprocess not in DINO_PREPROCESS:
        from fiftyone_nola.core.errors import InvalidInputError

        raise InvalidInputError(
            f"DINO preprocess must be one of {DINO_PREPROCESS} ('nola': NoLA's te_transform, the "
            f"official labeller input; 'timm': timm's eval transform), not {spec.preprocess!r}"
        )


def _dino_format_error(path, why: str) -> ModelNotFoundError:
    return ModelNotFoundError(f"Cannot use {path} as DINO weights: {why}. Accepted: {DINO_WEIGHT_FORMATS}.")


def _dino_file(path) -> Path:
    """The weights file a DINO checkpoint argument names (a folder: its timm file)."""
    p = Path(path).expanduser()
    if p.is_dir():
        for f in TIMM_WEIGHT_FILES:
            if (p / f).is_file():
                return p / f
        raise _dino_format_error(p, "the folder holds neither " + " nor ".join(TIMM_WEIGHT_FILES))
    if not p.is_file():
        raise ModelNotFoundError(
            f"DINO checkpoint file {p} does not exist. Pass the path of one of: {DINO_WEIGHT_FORMATS}."
        )
    if p.suffix.lower() not in WEIGHT_SUFFIXES:
        raise _dino_format_error(p, f"unknown file type {p.suffix or '(no suffix)'!r}")
    return p


def _find_local_dino(root: Path, name: str) -> Optional[Path]:
    """A local file for timm model ``name`` under ``<models_dir>/dino`` (see module docstring)."""
    hit = _find_local(root, _safe(name))
    if hit is not None:
        return hit
    for f in TIMM_WEIGHT_FILES:
        if (root / _safe(name) / f).is_file():
            return root / _safe(name) / f
    release = DINO_RELEASE_FILES.get(name)
    if release and (root / release).is_file():
        return root / release
    return None


def _unwrap_dino_state_dict(obj) -> dict:
    """The backbone's tensors of a loaded checkpoint: official full checkpoints keep them under
    ``teacher``/``student`` with ``module.``/``backbone.`` prefixes (and a ``head.`` DINOHead)."""
    if isinstance(obj, dict):
        for key in ("teacher", "student", "model", "state_dict"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        return {}
    sd = {}
    for k, v in obj.items():
        for prefix in ("module.", "backbone."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        sd[k] = v
    return sd


def _read_dino_state_dict(path, mmap: bool = False) -> dict:
    """The state dict in a DINO weights file, or one clear error naming the accepted formats."""
    path = Path(path)
    if path.suffix.lower() == ".safetensors":
        try:
            from safetensors.torch import load_file

            obj = load_file(str(path), device="cpu")
        except Exception as e:
            raise _dino_format_error(path, f"not a readable safetensors file ({type(e).__name__}: {e})") from e
    else:
        with open(path, "rb") as f:
            head = f.read(4)
        if head.startswith(b"PK"):
            import zipfile

            try:
                with zipfile.ZipFile(path) as z:
                    scripted = any(n.split("/", 1)[-1].startswith("code/") for n in z.namelist())
            except zipfile.BadZipFile:
                scripted = False
            if scripted:
                raise _dino_format_error(path, "it is a TorchScript archive (a whole scripted model, not "
                                               "a state dict)")
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and head.startswith(b"PK"))
        except Exception as e:
            raise _dino_format_error(
                path, f"not a PyTorch state dict readable with weights_only=True ({type(e).__name__}: "
                      f"{str(e).splitlines()[0] if str(e) else ''})") from e
    sd = _unwrap_dino_state_dict(obj)
    if not sd:
        raise _dino_format_error(path, "it holds no mapping of parameter names to tensors")
    return sd


_ARCH_CACHE: dict = {}


def _dino_name_from_file(checkpoint) -> Optional[str]:
    """The timm name of the DINO ViT whose weights ``checkpoint`` holds (None if unknown)."""
    try:
        path = _dino_file(checkpoint)
        st = path.stat()
    except (ModelNotFoundError, OSError):
        return None  # _dino_weights reports it
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _ARCH_CACHE:
        try:
            sd = _read_dino_state_dict(path, mmap=True)
            w = next((v for k, v in sd.items() if k.endswith("patch_embed.proj.weight")), None)
            _ARCH_CACHE[key] = _DINO_ARCHS.get((int(w.shape[0]), int(w.shape[-1]))) if w is not None \
                and w.ndim == 4 else None
        except ModelNotFoundError:
            _ARCH_CACHE[key] = None
    return _ARCH_CACHE[key]


def _load_dino_weights(model: torch.nn.Module, path, name: str) -> None:
    """Load a DINO weights file into ``model`` strictly; mismatches name the file's architecture."""
    sd = _read_dino_state_dict(path)
    own = model.state_dict()
    if not any(k.startswith("head.") for k in own):
        sd = {k: v for k, v in sd.items() if not k.startswith("head.")}  # classifier / DINOHead: unused
    if set(sd) != set(own):
        # Another layout of the same network (e.g. old timm checkpoints): timm's own converter.
        import sys

        filter_fn = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
        if filter_fn is not None:
            try:
                sd = filter_fn(sd, model)
            except Exception:
                pass
    w = sd.get("patch_embed.proj.weight")
    found = _DINO_ARCHS.get((int(w.shape[0]), int(w.shape[-1]))) if w is not None and w.ndim == 4 else None
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    wrong = sorted(k for k in set(own) & set(sd) if tuple(own[k].shape) != tuple(sd[k].shape))
    if missing or unexpected or wrong:
        detail = "; ".join(f"{what} {keys[:3]}{' ...' if len(keys) > 3 else ''}" for what, keys in (
            ("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if keys)
        hint = f" It holds {found}: pass name={found!r} or name='auto'." if found and found != name else ""
        raise ModelNotFoundError(f"The DINO weights in {path} do not fit {name} ({detail}).{hint}")
    model.load_state_dict(sd, strict=True)


def _dino_weights(spec: DinoSpec) -> tuple[Optional[str], str]:
    """Return (local checkpoint file or "hub" or None, weights identity)."""
    spec = concrete_dino(spec)
    if spec.random_init or spec.name in _TINY_TIMM:
        return None, f"random-init-seed{RANDOM_INIT_SEED}"
    if spec.checkpoint:
        p = _dino_file(spec.checkpoint)
        return str(p), f"file-{_file_identity(p)}"
    local = _find_local_dino(models_dir(spec.models_dir) / "dino", spec.name)
    if local is not None:
        return str(local), f"file-{_file_identity(local)}"
    return "hub", "hub"


def load_dino(spec: Optional[DinoSpec] = None, device: Optional[torch.device] = None,
              cache: bool = True) -> LoadedModel:
    """Build (or reuse) a timm backbone (no classifier head) from ``spec``.

    Local weights (a checkpoint or the models dir) load in any of ``DINO_WEIGHT_FORMATS``;
    otherwise timm fetches them from its hub (its cache is used offline, ``HF_HUB_OFFLINE=1``).
    """
    spec = concrete_dino(spec or DinoSpec())
    if cache:
        return _cached(spec, device, lambda: load_dino(spec, device, cache=False))
    import timm
    from timm.data import create_transform, resolve_data_config

    if spec.feature not in {"cls", "pooled"}:
        from fiftyone_nola.core.errors import InvalidInputError

        raise InvalidInputError(f"DINO feature must be 'cls' or 'pooled', not {spec.feature!r}")
    _check_dino_preprocess(spec)
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
            if weights == "hub":
                model = timm.create_model(name, pretrained=True, num_classes=0, **kwargs)
            else:
                model = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
                if weights is not None:
                    _load_dino_weights(model, weights, spec.name)
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
    image_size = int(data_cfg["input_size"][-1])
    if spec.preprocess == "nola":
        transform = nola_transform(image_size)
    else:
        transform = create_transform(**data_cfg, is_training=False)

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
        "key": spec_key(spec),
    }
    return LoadedModel(
        family="dino", model=model, transform=transform, image_size=image_size,
        embed_dim=int(model.num_features), identity=identity, encode_image=encode, spec=spec,
    )


def spec_key(spec) -> str:
    """The key ``load_model(spec).key`` will have, computed without loading the model."""
    if isinstance(spec, ClipSpec):
        src = _clip_source(spec)
        # The activation is part of the network: features from GELU and QuickGELU builds differ.
        act = "-quickgelu" if src.quick_gelu and "quickgelu" not in spec.arch.lower() else ""
        return _safe(f"clip-{spec.arch}-{src.weights_id}{act}")
    if isinstance(spec, DinoSpec):
        spec = concrete_dino(spec)
        _check_dino_preprocess(spec)
        weights, weights_id = _dino_weights(spec)
        # "timm" keeps the key stores had before the option existed (they were built that way).
        pre = "" if spec.preprocess == "timm" else f"-{spec.preprocess}"
        return _safe(f"dino-{spec.name}-{spec.feature}{pre}-{weights_id}")
    raise TypeError(f"expected ClipSpec or DinoSpec, got {type(spec).__name__}")


def load_model(spec, device: Optional[torch.device] = None) -> LoadedModel:
    """Load a ClipSpec or DinoSpec."""
    if isinstance(spec, ClipSpec):
        return load_clip(spec, device)
    if isinstance(spec, DinoSpec):
        return load_dino(spec, device)
    raise TypeError(f"expected ClipSpec or DinoSpec, got {type(spec).__name__}")


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
        src = _clip_source(spec)
        if src.tag is None:
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
