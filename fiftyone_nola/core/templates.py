"""Prompt template sets for the class description embedding: named presets or a user file.

NoLA adds a per-dataset set of hand templates ("a photo of a {}." ...) to each class's
descriptions before averaging. Presets here are the official code's sets (see
``configs/templates.json``) plus CLIP's own lists; ``"auto"`` picks what the official code
uses for the closest case: the CIFAR-10 set for CIFAR-10's classes, otherwise the ImageNet
set of 7 (what the official code uses for ImageNet and Caltech101, its generic-object cases).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

from fiftyone_nola.core.classes import normalize_class_name
from fiftyone_nola.core.errors import InvalidInputError

# CLIP's 80 ImageNet prompt templates, in their original order: OpenAI CLIP repository,
# notebooks/Prompt_Engineering_for_ImageNet.ipynb (also open_clip's OPENAI_IMAGENET_TEMPLATES).
CLIP_TEMPLATES: tuple[str, ...] = (
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a plushie {}.",
    "a photo of the nice {}.",
    "a photo of the small {}.",
    "a photo of the weird {}.",
    "the cartoon {}.",
    "art of the {}.",
    "a drawing of the {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "the plushie {}.",
    "a dark photo of a {}.",
    "itap of a {}.",
    "graffiti of the {}.",
    "a toy {}.",
    "itap of my {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "a tattoo of the {}.",
)

# The 7-template subset CLIP's authors selected for their ImageNet ensemble (same notebook).
CLIP_TEMPLATES_7: tuple[str, ...] = (
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)

SIMPLE_TEMPLATE = "a photo of a {}."

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
AUTO = "auto"
DEFAULT_TEMPLATES = AUTO
_PRESETS_FILE = Path(__file__).parent / "configs" / "templates.json"


@lru_cache(maxsize=1)
def presets() -> dict[str, tuple[str, ...]]:
    """Every named template set: name -> templates (``"none"`` is the empty set)."""
    sets = {k: tuple(v) for k, v in json.loads(_PRESETS_FILE.read_text())["sets"].items()}
    sets.update(
        {
            "imagenet": CLIP_TEMPLATES_7,  # official: ImageNet, ImageNet-A/R/Sketch, Caltech101
            "imagenet80": CLIP_TEMPLATES,  # CLIP's full ImageNet ensemble (fiftyone-nola 0.1's default)
            "cifar100": ("a photo of a {}",) + CLIP_TEMPLATES,  # official CIFAR100_local
            "simple": (SIMPLE_TEMPLATE,),
            "none": (),
        }
    )
    return sets


def auto_preset(classes: Sequence[str]) -> str:
    """The preset the official code would use for ``classes``: see the module docstring."""
    if {normalize_class_name(c) for c in classes} == set(CIFAR10_CLASSES):
        return "cifar10"
    return "imagenet"


def resolve_templates(
    templates: str | Sequence[str] | None, classes: Sequence[str] = ()
) -> tuple[str, tuple[str, ...]]:
    """``(name, templates)`` for a preset name, ``"auto"``, a file (JSON list or one per line)
    or an explicit list. Every template must hold one ``{}`` for the class name."""
    if templates is None:
        templates = DEFAULT_TEMPLATES
    if not isinstance(templates, str):
        name, out = "custom", tuple(str(t) for t in templates)
    elif templates == AUTO:
        name = auto_preset(classes)
        out = presets()[name]
    elif templates in presets():
        name, out = templates, presets()[templates]
    else:
        p = Path(templates).expanduser()
        if not p.is_file():
            raise InvalidInputError(
                f"Unknown template set {templates!r}: use one of {', '.join([AUTO, *sorted(presets())])}, "
                f"or the path of a file of templates (a JSON list, or one template per line)."
            )
        name, out = f"file:{p}", _read_template_file(p)
    bad = [t for t in out if t.count("{}") != 1]
    if bad:
        raise InvalidInputError(f"Each template needs exactly one '{{}}' for the class name; not so: {bad[:3]}")
    return name, out


def _read_template_file(p: Path) -> tuple[str, ...]:
    text = p.read_text(encoding="utf-8")
    if p.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise InvalidInputError(f"The template file {p} is not valid JSON ({e.msg}, line {e.lineno})") from None
        if not isinstance(data, list) or not all(isinstance(t, str) for t in data):
            raise InvalidInputError(f"The template file {p} must hold a JSON list of strings")
        lines = data
    else:
        lines = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    out = tuple(t.strip() for t in lines if t.strip())
    if not out:
        raise InvalidInputError(f"The template file {p} holds no templates")
    return out
