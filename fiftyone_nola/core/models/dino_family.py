"""DINOv2 and DINOv3 as their official code runs them, on timm's implementation.

* Input: the official classification eval transform of each release (facebookresearch/dinov2
  and /dinov3 ``make_classification_eval_transform``): resize the short side to 256 (bicubic),
  centre crop 224, ImageNet mean/std. DINOv2's works on PIL images (torchvision v1), DINOv3's
  on tensors (torchvision v2: ``ToImage`` first, so the resize runs on uint8 tensors); the
  SAT-493M DINOv3 weights use their own mean/std.
* Resolution: DINOv2 is built at its native 518 px (37x37 learned positions) and run at 224 as
  the official hub models are, whose ``interpolate_pos_encoding`` resamples the patch positions
  on every forward: bicubic with a scale factor of (16 + 0.1) / 37 and no antialiasing for the
  plain models, to exactly 16x16 with antialiasing for the register (``reg4``) models. That
  resampling is done here once (timm's own resample antialiases always, which is not what the
  plain models were evaluated with). DINOv3 uses RoPE: any grid, nothing to resample.
* Feature: the CLS token after the final norm (index 0: timm keeps CLS before the registers).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from fiftyone_nola.core.models.specs import TINY_DINOV2_NAME, TINY_DINOV3_NAME, dino_generation

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SAT493M_MEAN = (0.430, 0.411, 0.296)  # DINOv3 satellite weights (its README's transform)
SAT493M_STD = (0.213, 0.156, 0.143)
EVAL_CROP = 224  # the official eval crop; the resize is 256/224 of it
_TINY_EVAL = {TINY_DINOV2_NAME: 28, TINY_DINOV3_NAME: 32}  # tiny test models: 2x2 patches

# Official release files (facebookresearch/dinov2 and /dinov3 hub URLs' file names) -> timm name.
DINOV2_RELEASE_FILES = {
    f"vit_{size}_patch14{reg}_dinov2.lvd142m": f"dinov2_vit{short}14{reg and '_reg4'}_pretrain.pth"
    for size, short in (("small", "s"), ("base", "b"), ("large", "l"), ("giant", "g"))
    for reg in ("", "_reg4")
}
DINOV3_RELEASE_FILES = {
    "vit_small_patch16_dinov3.lvd1689m": "dinov3_vits16_pretrain_lvd1689m-08c60483.pth",
    "vit_small_plus_patch16_dinov3.lvd1689m": "dinov3_vits16plus_pretrain_lvd1689m-4057cbaa.pth",
    "vit_base_patch16_dinov3.lvd1689m": "dinov3_vitb16_pretrain_lvd1689m-73cec8be.pth",
    "vit_large_patch16_dinov3.lvd1689m": "dinov3_vitl16_pretrain_lvd1689m-8aa4cbdd.pth",
    "vit_large_patch16_dinov3.sat493m": "dinov3_vitl16_pretrain_sat493m-eadcf0ff.pth",
    "vit_huge_plus_patch16_dinov3.lvd1689m": "dinov3_vith16plus_pretrain_lvd1689m-7c1da9a5.pth",
}
_V2_SIZES = {384: "small", 768: "base", 1024: "large", 1536: "giant"}
_V3_SIZES = {(384, False): "small", (384, True): "small_plus", (768, False): "base", (1024, False): "large"}
_V3_SIZES[(1280, True)] = "huge_plus"


def eval_size(name: str) -> int:
    """The input size the ``official``/``nola`` transforms feed DINOv2/v3 ``name``."""
    return _TINY_EVAL.get(name, EVAL_CROP)


def official_transform(name: str, size: Optional[int] = None):
    """The official classification eval transform of DINOv2 / DINOv3 model ``name``."""
    from torchvision import transforms as T

    size = size or eval_size(name)
    resize = round(size * 256 / 224)
    sat = "sat493m" in name.lower()
    mean, std = (SAT493M_MEAN, SAT493M_STD) if sat else (IMAGENET_MEAN, IMAGENET_STD)
    bicubic = T.InterpolationMode.BICUBIC
    if dino_generation(name) == "dinov3":
        from torchvision.transforms import v2

        return v2.Compose(
            [
                v2.ToImage(),
                v2.Resize(resize, interpolation=bicubic),
                v2.CenterCrop(size),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(mean, std),
            ]
        )
    return T.Compose(
        [T.Resize(resize, interpolation=bicubic), T.CenterCrop(size), T.ToTensor(), T.Normalize(mean, std)]
    )


def fit_dinov2_input(model: torch.nn.Module, size: int) -> None:
    """Set a timm DINOv2 (built at its native size, weights loaded) to run at ``size`` px with the
    patch positions the official model interpolates for that size (see the module docstring)."""
    grid = size // model.patch_embed.patch_size[0]
    if tuple(model.patch_embed.grid_size) == (grid, grid):
        return
    prefix = 0 if model.no_embed_class else model.num_prefix_tokens
    pos = model.pos_embed.detach().float()
    side = math.isqrt(pos.shape[1] - prefix)
    patches = pos[:, prefix:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
    if model.reg_token is None:  # dinov2_vit*14: interpolate_offset 0.1, interpolate_antialias False
        scale = (grid + 0.1) / side
        patches = F.interpolate(patches, scale_factor=(scale, scale), mode="bicubic", antialias=False)
    else:  # dinov2_vit*14_reg: interpolate_offset 0, interpolate_antialias True
        patches = F.interpolate(patches, size=(grid, grid), mode="bicubic", antialias=True)
    new = torch.cat([pos[:, :prefix], patches.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)], dim=1)
    model.set_input_size(img_size=(size, size))  # resizes the parameter; its values are set next
    with torch.no_grad():
        model.pos_embed.copy_(new.to(model.pos_embed.dtype))


def arch_from_state_dict(sd: dict, patch: int, dim: int) -> Optional[str]:
    """The timm name of the DINOv2 / DINOv3 ViT whose weights ``sd`` holds (official or timm keys)."""
    if patch == 14 and dim in _V2_SIZES:
        reg = "_reg4" if ("register_tokens" in sd or "reg_token" in sd) else ""
        return f"vit_{_V2_SIZES[dim]}_patch14{reg}_dinov2.lvd142m"
    if patch == 16 and ("storage_tokens" in sd or ("reg_token" in sd and "pos_embed" not in sd)):
        swiglu = any(".mlp.w1." in k or ".mlp.fc1_g." in k or ".mlp.w12." in k for k in sd)
        size = _V3_SIZES.get((dim, swiglu))
        return f"vit_{size}_patch16_dinov3.lvd1689m" if size else None
    return None


def check_dinov3_qkv_bias(sd: dict, model: torch.nn.Module, path) -> None:
    """timm's plain DINOv3 ViTs have no q/v bias (the S/B/L releases' are all zero) and its
    converter drops the file's ``qkv.bias``: refuse a file whose bias is not zero instead of
    silently computing another network."""
    has_bias = any(n.endswith("attn.q_bias") for n, _ in model.named_parameters())
    if has_bias:
        return
    nonzero = [k for k, v in sd.items() if k.endswith("attn.qkv.bias") and bool(torch.any(v != 0))]
    if nonzero:
        from fiftyone_nola.core.errors import ModelNotFoundError

        raise ModelNotFoundError(
            f"The DINOv3 weights in {path} have non-zero attention biases ({nonzero[0]}, ...), which "
            f"this timm model lacks: use the '_qkvb' variant of its name (e.g. vit_base_patch16_dinov3_qkvb)."
        )
