"""Named CLIP + DINO pairs (``--preset``), each tested end to end here on random weights.

What each costs on a CPU is measured by ``benchmarks/backbones.py`` (README, "Backbones").
``zeroshot_cifar10`` is the CLIP's published zero-shot CIFAR-10 top-1 (open_clip's
``docs/openclip_classification_results.csv``, the figure ``tests/test_pretrained.py`` checks our
zero-shot against, minus 3 points, for users with the real weights). ``--clip-arch`` /
``--dino`` still take any open_clip / timm name; a preset only fills what is not given.
"""

from __future__ import annotations

from dataclasses import dataclass

from fiftyone_nola.core.errors import InvalidInputError
from fiftyone_nola.core.models.specs import ClipSpec, DinoSpec


@dataclass(frozen=True)
class Preset:
    """A tested CLIP (open_clip architecture + tag) and DINO (timm name) pair."""

    name: str
    clip_arch: str
    clip_pretrained: str
    dino: str
    summary: str
    zeroshot_cifar10: float  # published zero-shot CIFAR-10 top-1 of the CLIP (module docstring)
    zeroshot_source: str

    def clip_spec(self, **fields) -> ClipSpec:
        """The preset's ClipSpec; ``fields`` (random_init, models_dir, ...) are passed on."""
        return ClipSpec(arch=self.clip_arch, pretrained=self.clip_pretrained, **fields)

    def dino_spec(self, **fields) -> DinoSpec:
        """The preset's DinoSpec (its family's default preprocessing unless ``fields`` say)."""
        return DinoSpec(name=self.dino, **fields)


_OPEN_CLIP_TABLE = "open_clip docs/openclip_classification_results.csv"
PRESETS = {
    p.name: p
    for p in (
        Preset(
            "paper",
            "ViT-B-32",
            "openai",
            "vit_base_patch16_224.dino",
            "the papers' pair: OpenAI CLIP ViT-B/32 + DINO ViT-B/16 (NoLA's labeler)",
            89.83,
            f"{_OPEN_CLIP_TABLE}: ViT-B-32 openai",
        ),
        Preset(
            "fast-cpu",
            "ViT-B-32-256",
            "datacomp_s34b_b86k",
            "vit_small_patch14_dinov2.lvd142m",
            "cheap on a CPU: DataComp CLIP ViT-B/32 at 256 px (ImageNet 72.8 % zero-shot vs 63.3 % for "
            "OpenAI's, for 18 % more compute) + DINOv2 ViT-S/14",
            96.53,
            f"{_OPEN_CLIP_TABLE}: ViT-B-32-256 datacomp_s34b_b86k",
        ),
        Preset(
            "best",
            "ViT-SO400M-14-SigLIP2",
            "webli",
            "vit_large_patch16_dinov3.lvd1689m",
            "most accurate here: SigLIP 2 SO400M/14 + DINOv3 ViT-L/16 (DINOv3's weights come under "
            "Meta's DINOv3 license; slow on a CPU)",
            96.79,
            f"{_OPEN_CLIP_TABLE} has no SigLIP 2 row: SigLIP (v1) ViT-SO400M-14 webli's figure, "
            f"which SigLIP 2 reports improving on",
        ),
    )
}


def get_preset(name: str) -> Preset:
    """The preset called ``name``; unknown names list the known ones."""
    try:
        return PRESETS[name]
    except KeyError:
        raise InvalidInputError(f"unknown preset {name!r}: one of {', '.join(PRESETS)}") from None
