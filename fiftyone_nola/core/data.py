"""Robust image decoding and the DataLoader that feeds every image model.

Bad files never stop a job: a missing, unreadable or corrupt image yields ``None`` plus a
reason, the batch carries on, and the caller counts and tags the failures.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
from PIL import Image, ImageFile

# Keep PIL's decompression-bomb limit (never disable it): a bomb is an error like any other.
ImageFile.LOAD_TRUNCATED_IMAGES = False


@dataclass(frozen=True)
class DecodeOptions:
    """How to decode. ``draft_size``: let JPEG decode at a reduced DCT scale (>= this size)."""

    draft_size: Optional[int] = None


def file_fingerprint(path: str) -> str:
    """Identity of a file's current content for incremental re-embedding: size + mtime."""
    try:
        st = os.stat(path)
    except OSError:
        return "missing"
    return f"{st.st_size}-{st.st_mtime_ns}"


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode (L, LA, P, RGBA, CMYK, I;16, I, F, ...) to 8-bit RGB."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        arr = ((arr - lo) * scale).clip(0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return img.convert("RGB")


def load_image(path: str, options: DecodeOptions = DecodeOptions()) -> Image.Image:
    """Open, fully decode and convert an image to RGB; raises OSError/ValueError on bad files."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as img:
            if options.draft_size and img.format == "JPEG":
                # DCT-domain downscaling: 4-8x cheaper decode of camera photos, never below target.
                img.draft("RGB", (options.draft_size, options.draft_size))
            img.load()
            return to_rgb(img)


def try_load_image(path: str, options: DecodeOptions = DecodeOptions()):
    """Return ``(image, None)`` or ``(None, reason)`` without raising."""
    if not os.path.exists(path):
        return None, "missing file"
    try:
        return load_image(path, options), None
    except Image.DecompressionBombError as e:
        return None, f"decompression bomb: {e}"
    except Image.DecompressionBombWarning as e:
        return None, f"decompression bomb: {e}"
    except (OSError, ValueError, SyntaxError) as e:
        return None, f"unreadable image: {type(e).__name__}: {e}"


def draft_size_for(image_size: int, enabled: bool) -> Optional[int]:
    """Draft target that keeps the shorter side at least the model's resize target."""
    return image_size if enabled else None


class ImageFileDataset(torch.utils.data.Dataset):
    """Items are ``(index, tensor or None, error or None)``; ``transform`` maps PIL to tensors."""

    def __init__(self, filepaths: Sequence[str], transform: Callable, options: DecodeOptions = DecodeOptions()):
        self.filepaths = list(filepaths)
        self.transform = transform
        self.options = options

    def __len__(self) -> int:
        return len(self.filepaths)

    def __getitem__(self, i: int):
        img, err = try_load_image(self.filepaths[i], self.options)
        if img is None:
            return i, None, err
        try:
            return i, self.transform(img), None
        except Exception as e:  # a transform failure is a bad image, not a crashed job
            return i, None, f"preprocessing failed: {type(e).__name__}: {e}"


def collate_skip_bad(items):
    """Stack the good tensors; keep indices of good ones and (index, reason) of bad ones."""
    good = [(i, t) for i, t, err in items if err is None]
    bad = [(i, err) for i, _, err in items if err is not None]
    if good:
        idx = torch.tensor([i for i, _ in good], dtype=torch.long)
        first = good[0][1]
        if isinstance(first, (tuple, list)):
            batch = tuple(torch.stack([t[k] for _, t in good]) for k in range(len(first)))
        else:
            batch = torch.stack([t for _, t in good])
    else:
        idx, batch = torch.empty(0, dtype=torch.long), None
    return idx, batch, bad


def make_loader(
    dataset: torch.utils.data.Dataset,
    batch_size: Optional[int],
    num_workers: int,
    pin_memory: bool = False,
    batch_sampler: Optional[torch.utils.data.Sampler] = None,
    generator: Optional[torch.Generator] = None,
    worker_init_fn=None,
) -> torch.utils.data.DataLoader:
    """A DataLoader whose workers decode in parallel with inference and skip bad images.

    Batches come in order of ``batch_size``, or from ``batch_sampler`` (``batch_size`` None).
    """
    kwargs = {}
    if num_workers > 0:
        kwargs.update(persistent_workers=False, prefetch_factor=4)
    if batch_sampler is not None:
        kwargs.update(batch_sampler=batch_sampler)
    else:
        kwargs.update(batch_size=batch_size)
    return torch.utils.data.DataLoader(
        dataset,
        num_workers=num_workers,
        collate_fn=collate_skip_bad,
        pin_memory=pin_memory,
        generator=generator,
        worker_init_fn=worker_init_fn,
        **kwargs,
    )
