"""Read model weights from the file formats users already have, without running pickled code.

Accepted: ``.safetensors``; PyTorch files (``.pt``, ``.pth``, ``.bin``) holding a state dict,
possibly wrapped in ``{"state_dict": ...}`` / ``{"model": ...}`` with a ``module.`` prefix;
and TorchScript archives such as OpenAI's released CLIP files (``ViT-B-32.pt``), whose
weights are read with ``torch.jit.load`` (TorchScript code, not a pickle: ``torch.load`` with
``weights_only=True`` refuses these archives).
"""

from __future__ import annotations

import warnings
import zipfile
from pathlib import Path

import torch

from fiftyone_nola.core.errors import ModelNotFoundError

WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
ACCEPTED_FORMATS = (
    "a .safetensors file, a PyTorch state dict (.pt/.pth/.bin, e.g. open_clip_pytorch_model.bin "
    "or an official DINO release such as dino_vitbase16_pretrain.pth), or a TorchScript archive "
    "as OpenAI releases CLIP (e.g. ViT-B-32.pt)"
)
# Non-weight entries OpenAI's TorchScript CLIP archives carry beside the parameters.
_TORCHSCRIPT_EXTRAS = ("input_resolution", "context_length", "vocab_size")


def is_torchscript(path) -> bool:
    """Whether ``path`` is a TorchScript archive (a zip holding ``constants.pkl`` and ``code/``)."""
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError):
        return False
    return any(n.endswith("/constants.pkl") for n in names) and any("/code/" in n for n in names)


def _unwrap(obj, path: Path) -> dict:
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelNotFoundError(f"{path} holds no state dict of tensors. Accepted: {ACCEPTED_FORMATS}.")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    return obj


def read_state_dict(path) -> dict:
    """The weights in ``path`` as a ``{name: tensor}`` dict on the CPU (formats: module doc)."""
    path = Path(path)
    if path.suffix not in WEIGHT_SUFFIXES:
        raise ModelNotFoundError(
            f"Cannot read weights from {path.name}: unknown file type {path.suffix!r}. Accepted: {ACCEPTED_FORMATS}."
        )
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as e:  # safetensors raises its own error types for a damaged header
            raise ModelNotFoundError(f"{path} is not a readable .safetensors file ({e}).") from e
    if is_torchscript(path):
        with warnings.catch_warnings():
            # torch >= 2.9 announces TorchScript's deprecation; OpenAI's files exist only in it.
            warnings.filterwarnings("ignore", message=r".*torch\.jit\.load. is deprecated", category=FutureWarning)
            sd = dict(torch.jit.load(str(path), map_location="cpu").state_dict())
        for k in _TORCHSCRIPT_EXTRAS:
            sd.pop(k, None)
        return sd
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # a pickle with foreign classes, or not a PyTorch file at all
        raise ModelNotFoundError(
            f"Cannot read weights from {path} ({type(e).__name__}: {str(e)[:200]}). Accepted: {ACCEPTED_FORMATS}."
        ) from e
    return _unwrap(obj, path)
