"""DINO weights files: where they are, what formats are read, which ViT a file holds."""

from __future__ import annotations

import contextlib
import io
import logging
import sys
import zipfile
from pathlib import Path
from typing import Optional

import torch

from fiftyone_nola.core.checkpoints import WEIGHT_SUFFIXES
from fiftyone_nola.core.errors import ModelNotFoundError
from fiftyone_nola.core.models.dino_family import (
    DINOV2_RELEASE_FILES,
    DINOV3_RELEASE_FILES,
    arch_from_state_dict,
    check_dinov3_qkv_bias,
)
from fiftyone_nola.core.models.specs import dino_generation, find_local, safe_name

logger = logging.getLogger(__name__)

# Official release files (plain state dicts) of the timm DINO models: facebookresearch/dino,
# /dinov2 (hub .pth) and /dinov3 (its release .pth, file names with their hash).
DINO_RELEASE_FILES = {
    "vit_small_patch16_224.dino": "dino_deitsmall16_pretrain.pth",
    "vit_small_patch8_224.dino": "dino_deitsmall8_pretrain.pth",
    "vit_base_patch16_224.dino": "dino_vitbase16_pretrain.pth",
    "vit_base_patch8_224.dino": "dino_vitbase8_pretrain.pth",
    **DINOV2_RELEASE_FILES,
    **DINOV3_RELEASE_FILES,
}
# (embed dim, patch size) of a DINO ViT state dict -> its timm name.
_DINO_ARCHS = {
    (384, 16): "vit_small_patch16_224.dino",
    (384, 8): "vit_small_patch8_224.dino",
    (768, 16): "vit_base_patch16_224.dino",
    (768, 8): "vit_base_patch8_224.dino",
}
# timm's own files, as in the hub repo timm/<name> (and its huggingface_hub cache).
TIMM_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
DINO_WEIGHT_FORMATS = (
    "a plain PyTorch state dict (.pth/.pt/.bin): the official facebookresearch/dino release files "
    "(dino_deitsmall16_pretrain.pth, dino_vitbase16_pretrain.pth, ...) or an official "
    "*_full_checkpoint.pth (its teacher backbone is used), DINOv2's hub files "
    "(dinov2_vits14_pretrain.pth, dinov2_vitb14_reg4_pretrain.pth, ...), DINOv3's release files "
    "(dinov3_vits16_pretrain_lvd1689m-08c60483.pth, ...); timm's files (model.safetensors or "
    "pytorch_model.bin, as in the hub repo timm/<name>, or any .safetensors state dict); or a "
    "folder holding model.safetensors / pytorch_model.bin"
)


def _format_error(path, why: str) -> ModelNotFoundError:
    return ModelNotFoundError(f"Cannot use {path} as DINO weights: {why}. Accepted: {DINO_WEIGHT_FORMATS}.")


def dino_file(path) -> Path:
    """The weights file a DINO checkpoint argument names (a folder: its timm file)."""
    p = Path(path).expanduser()
    if p.is_dir():
        for f in TIMM_WEIGHT_FILES:
            if (p / f).is_file():
                return p / f
        raise _format_error(p, "the folder holds neither " + " nor ".join(TIMM_WEIGHT_FILES))
    if not p.is_file():
        raise ModelNotFoundError(
            f"DINO checkpoint file {p} does not exist. Pass the path of one of: {DINO_WEIGHT_FORMATS}."
        )
    if p.suffix.lower() not in WEIGHT_SUFFIXES:
        raise _format_error(p, f"unknown file type {p.suffix or '(no suffix)'!r}")
    return p


def find_local_dino(root: Path, name: str) -> Optional[Path]:
    """A local file for timm model ``name`` under ``<models_dir>/dino`` (see the package docstring)."""
    hit = find_local(root, safe_name(name))
    if hit is not None:
        return hit
    for f in TIMM_WEIGHT_FILES:
        if (root / safe_name(name) / f).is_file():
            return root / safe_name(name) / f
    release = DINO_RELEASE_FILES.get(name)
    if release:
        # the models dir, then torch.hub's cache (where the official hub loaders download to)
        for folder in (root, Path(torch.hub.get_dir()) / "checkpoints"):
            if (folder / release).is_file():
                return folder / release
    return None


def _unwrap_state_dict(obj) -> dict:
    """The backbone's tensors of a loaded checkpoint: official full checkpoints keep them under
    ``teacher``/``student`` with ``module.``/``backbone.`` prefixes (and a ``head.`` DINOHead)."""
    if isinstance(obj, dict):
        for key in ("teacher", "student", "model", "state_dict"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if (
        not isinstance(obj, dict)
        or not obj
        or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    ):
        return {}
    sd = {}
    for k, v in obj.items():
        for prefix in ("module.", "backbone."):
            if k.startswith(prefix):
                k = k[len(prefix) :]
        sd[k] = v
    return sd


def _is_torchscript_zip(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.split("/", 1)[-1].startswith("code/") for n in z.namelist())
    except zipfile.BadZipFile:
        return False


def _read_torch_file(path: Path, mmap: bool):
    with open(path, "rb") as f:
        head = f.read(4)
    if head.startswith(b"PK") and _is_torchscript_zip(path):
        raise _format_error(path, "it is a TorchScript archive (a whole scripted model, not a state dict)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and head.startswith(b"PK"))
    except Exception as e:
        raise _format_error(
            path,
            f"not a PyTorch state dict readable with weights_only=True ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''})",
        ) from e


def read_dino_state_dict(path, mmap: bool = False) -> dict:
    """The state dict in a DINO weights file, or one clear error naming the accepted formats."""
    path = Path(path)
    if path.suffix.lower() == ".safetensors":
        try:
            from safetensors.torch import load_file

            obj = load_file(str(path), device="cpu")
        except Exception as e:
            raise _format_error(path, f"not a readable safetensors file ({type(e).__name__}: {e})") from e
    else:
        obj = _read_torch_file(path, mmap)
    sd = _unwrap_state_dict(obj)
    if not sd:
        raise _format_error(path, "it holds no mapping of parameter names to tensors")
    return sd


def _arch_of(sd: dict) -> Optional[str]:
    """The timm DINO / DINOv2 / DINOv3 name whose weights ``sd`` holds (None if unknown)."""
    w = next((v for k, v in sd.items() if k.endswith("patch_embed.proj.weight")), None)
    if w is None or w.ndim != 4:
        return None
    dim, patch = int(w.shape[0]), int(w.shape[-1])
    return arch_from_state_dict(sd, patch, dim) or _DINO_ARCHS.get((dim, patch))


_ARCH_CACHE: dict = {}


def dino_name_from_file(checkpoint) -> Optional[str]:
    """The timm name of the DINO ViT whose weights ``checkpoint`` holds (None if unknown)."""
    try:
        path = dino_file(checkpoint)
        st = path.stat()
    except (ModelNotFoundError, OSError):
        return None  # dino_weights reports it
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _ARCH_CACHE:
        try:
            _ARCH_CACHE[key] = _arch_of(read_dino_state_dict(path, mmap=True))
        except ModelNotFoundError:
            _ARCH_CACHE[key] = None
    return _ARCH_CACHE[key]


def load_dino_weights(model: torch.nn.Module, path, name: str) -> None:
    """Load a DINO weights file into ``model`` strictly; mismatches name the file's architecture."""
    sd = read_dino_state_dict(path)
    if dino_generation(name) == "dinov3":
        check_dinov3_qkv_bias(sd, model, path)
    own = model.state_dict()
    if not any(k.startswith("head.") for k in own):
        sd = {k: v for k, v in sd.items() if not k.startswith("head.")}  # classifier / DINOHead: unused
    if set(sd) != set(own):
        # Another layout of the same network (e.g. old timm checkpoints): timm's own converter.
        filter_fn = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
        if filter_fn is not None:
            try:
                with contextlib.redirect_stdout(io.StringIO()):  # timm prints a line per dropped bias
                    sd = filter_fn(sd, model)
            except Exception as e:  # a layout the converter does not know: the report below says what it holds
                logger.debug("timm's checkpoint converter cannot read %s: %r", path, e)
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    wrong = sorted(k for k in set(own) & set(sd) if tuple(own[k].shape) != tuple(sd[k].shape))
    if missing or unexpected or wrong:
        found = _arch_of(sd)
        detail = "; ".join(
            f"{what} {keys[:3]}{' ...' if len(keys) > 3 else ''}"
            for what, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
            if keys
        )
        hint = f" It holds {found}: pass name={found!r} or name='auto'." if found and found != name else ""
        raise ModelNotFoundError(f"The DINO weights in {path} do not fit {name} ({detail}).{hint}")
    model.load_state_dict(sd, strict=True)
