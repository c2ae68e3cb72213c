"""CLIP vision towers: which can take NoLA's visual prompts, and the tiny timm towers of the tests.

Prompts go into a token sequence after its position embedding, so towers that are ViTs take
them: open_clip's own ``VisionTransformer`` (OpenAI CLIP, MetaCLIP 2, LAION, ...) and the
timm-backed towers built from timm's ``VisionTransformer`` (SigLIP, SigLIP 2) or ``Eva``
(EVA-02, Perception Encoder). Convolutional and hybrid towers (ResNet, ConvNeXt, FastViT,
ViTamin, Swin) have no such sequence: prompt tuning is refused for them before any work.
"""

from __future__ import annotations

from typing import Optional

# timm modules whose models prompts can enter (core/prompt_tuning/model.py drives their blocks).
PROMPTABLE_TIMM_MODULES = ("vision_transformer", "eva")

# Tiny timm towers of the tiny open_clip configs in core/configs (SigLIP 2-like and PE-Core-like).
TINY_TOWERS = {
    "nola_tiny_siglip_vit": (
        "vit_base_patch16_siglip_224",
        dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2),
    ),
    "nola_tiny_pe_vit": (
        "vit_pe_core_base_patch16_224",
        dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, ref_feat_shape=(4, 4)),
    ),
}


def _tiny_entrypoint(name: str, base: str, kwargs: dict):
    import timm

    def build(pretrained: bool = False, **overrides):
        return timm.create_model(base, pretrained=False, **{**kwargs, **overrides})

    build.__name__ = name
    build.__module__ = __name__
    return build


def register_tiny_configs() -> None:
    """Make the tiny test CLIPs' architectures (and their timm towers) known to open_clip."""
    import open_clip

    from fiftyone_nola.core.models.specs import _CONFIG_DIR, TINY_CLIP_ARCH

    if TINY_CLIP_ARCH not in open_clip.list_models():
        register_tiny_towers()
        open_clip.add_model_config(_CONFIG_DIR)


def register_tiny_towers() -> None:
    """Make the tiny test towers known to timm (open_clip builds timm towers by name)."""
    import timm
    from timm.models import register_model

    for name, (base, kwargs) in TINY_TOWERS.items():
        if not timm.is_model(name):
            register_model(_tiny_entrypoint(name, base, kwargs))


def prompt_support(arch: str) -> tuple[bool, str]:
    """``(True, "")`` if CLIP ``arch``'s vision tower can take visual prompts, else ``(False, why)``.

    Read from open_clip's config (no weights are built). ``hf-hub:`` names are checked when the
    model is built (their config is on the hub).
    """
    if arch.startswith("hf-hub:"):
        return True, ""
    import open_clip

    vision = (open_clip.get_model_config(arch) or {}).get("vision_cfg", {})
    timm_name: Optional[str] = vision.get("timm_model_name")
    if timm_name:
        import timm.models

        base = TINY_TOWERS.get(timm_name, (timm_name,))[0]
        if timm.models.is_model_in_modules(base, list(PROMPTABLE_TIMM_MODULES)):
            return True, ""
        return False, (
            f"CLIP {arch}'s vision tower is timm's {timm_name}, not a ViT: it has no token sequence "
            f"to insert the visual prompts into"
        )
    if isinstance(vision.get("layers"), (list, tuple)):
        return False, f"CLIP {arch}'s vision tower is a ResNet: it has no token sequence to insert the prompts into"
    return True, ""
