"""The weak and strong views of prompt tuning, and per-sample seeded augmentation."""

from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageFilter
from torch import nn

from fiftyone_nola.core import distributed as dt
from fiftyone_nola.core.data import ImageFileDataset

# open_clip and torchvision are imported where used: each costs seconds at import time, and
# `fiftyone_nola.core.prompt_tuning` is imported by commands that never build a transform.


class _RandomGaussianBlur:
    """PIL Gaussian blur with radius drawn uniformly from ``sigma`` (SimCLR/official NoLA).

    Draws from torch's RNG (not ``random``), like torchvision's transforms, so seeding that one
    generator per sample (``_KeyedImageDataset``) fixes the whole augmentation.
    """

    def __init__(self, sigma=(0.1, 2.0)):
        self.sigma = sigma

    def __call__(self, img: Image.Image) -> Image.Image:
        s = float(torch.empty(1).uniform_(self.sigma[0], self.sigma[1]))
        return img.filter(ImageFilter.GaussianBlur(radius=s))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(sigma={self.sigma})"


def clip_mean_std(model: nn.Module) -> tuple[tuple, tuple]:
    """CLIP normalisation constants of an open_clip model (its visual's, else OpenAI's)."""
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    visual = getattr(model, "visual", model)
    mean = getattr(visual, "image_mean", None) or OPENAI_DATASET_MEAN
    std = getattr(visual, "image_std", None) or OPENAI_DATASET_STD
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def weak_transform(
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    resize_mode: str = "shortest",
    interpolation: str = "bicubic",
):
    """Weak view = the CLIP's eval preprocessing: resize, centre crop, normalise.

    ``resize_mode="shortest"`` (OpenAI CLIP, EVA-02, MetaCLIP): short side to ``image_size``,
    then the centre crop; ``"squash"`` (SigLIP, PE-Core): the whole image to a square."""
    from torchvision import transforms as T

    mode = T.InterpolationMode(interpolation)
    size = (image_size, image_size) if resize_mode == "squash" else image_size
    return T.Compose(
        [
            T.Resize(size, interpolation=mode, antialias=True),
            T.CenterCrop(image_size),
            T.ToTensor(),
            T.Normalize(mean, std),
        ]
    )


def model_weak_transform(model):
    """:func:`weak_transform` of a ``PromptedClassifier`` (its tower's size, statistics and resize)."""
    return weak_transform(
        model.image_size,
        model.mean,
        model.std,
        getattr(model, "resize_mode", "shortest"),
        getattr(model, "interpolation", "bicubic"),
    )


def strong_transform(image_size: int, mean: Sequence[float], std: Sequence[float]):
    """Strong view of NoLA/LaFTer (their official ``get_random_transform``; README, "Limitations and
    differences from the papers"), CLIP-normalised."""
    from torchvision import transforms as T

    bicubic = T.InterpolationMode.BICUBIC
    return T.Compose(
        [
            # Bilinear, torchvision's default, as the official get_random_transform leaves it.
            T.RandomResizedCrop(image_size, scale=(0.2, 1.0), antialias=True),
            T.RandomHorizontalFlip(),
            T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
            T.RandomPerspective(distortion_scale=0.2, p=0.5, interpolation=bicubic),
            T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1),
            _RandomGaussianBlur((0.1, 2.0)),
            T.ToTensor(),
            T.Normalize(mean, std),
        ]
    )


class _KeyedImageDataset(ImageFileDataset):
    """Items keyed by ``(epoch, index)``; the augmentation is a function of (seed, epoch, index).

    Seeding per sample instead of per worker process is what lets any number of workers or
    DDP ranks see the same pixels for an image as a single process does.
    """

    def __init__(self, filepaths, transform, seed: int):
        super().__init__(filepaths, transform)
        self.seed = int(seed)

    def __getitem__(self, key):
        epoch, i = key
        with torch.random.fork_rng(devices=[]):
            # The CPU generator only: torch.manual_seed would also reseed every CUDA device.
            seed = dt.derive_seed(self.seed, epoch, i, dt.SAMPLE_STREAM)
            torch.default_generator.manual_seed(seed)
            return super().__getitem__(i)


class _TwoViews:
    """(weak, strong) pair: the online teacher sees the weak view, the student the strong one."""

    def __init__(self, weak, strong):
        self.weak, self.strong = weak, strong

    def __call__(self, img):
        return self.weak(img), self.strong(img)


def _seed_worker(worker_id: int) -> None:
    # torch seeds each worker from the loader generator; derive numpy/random from it too.
    s = torch.initial_seed() % 2**32
    np.random.seed(s)
    random.seed(s)
