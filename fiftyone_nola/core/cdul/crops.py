"""CDUL's CLIP scores: global (whole image) and local (each crop of a ``grid × grid`` tiling)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from fiftyone_nola.core import device as dev
from fiftyone_nola.core import engine_choice, engines
from fiftyone_nola.core.arrays import l2_normalize, softmax
from fiftyone_nola.core.config import bounded, resolve
from fiftyone_nola.core.data import DecodeOptions, ImageFileDataset, collate_skip_bad
from fiftyone_nola.core.embed import engine_module, with_images
from fiftyone_nola.core.errors import InvalidInputError
from fiftyone_nola.core.models import LoadedModel, Scoring, model_scoring
from fiftyone_nola.core.progress import ProgressFn, null_progress

CLIP_LOGIT_SCALE = 100.0  # CLIP's learnt temperature saturates at exp(4.6052) = 100


def _check_weights(class_weights: np.ndarray, dim: Optional[int] = None) -> np.ndarray:
    w = np.asarray(class_weights, dtype=np.float32)
    if w.ndim != 2 or w.shape[0] < 1:
        raise InvalidInputError(f"class_weights must be a C×D array, got shape {w.shape}")
    if dim is not None and w.shape[1] != dim:
        raise InvalidInputError(
            f"class_weights have dimension {w.shape[1]} but the image embeddings have {dim}: "
            f"build the class weights with the same CLIP model as the images"
        )
    if not np.all(np.isfinite(w)):
        raise InvalidInputError("class_weights contain NaN or inf")
    # Idempotent on normalised input; protects against raw text embeddings being passed.
    return l2_normalize(w)


def grid_boxes(width: int, height: int, grid: int = 3) -> list[tuple[int, int, int, int]]:
    """Non-overlapping ``(left, top, right, bottom)`` tiles of a ``grid × grid`` tiling, row-major.

    Tiles are ``height // grid`` × ``width // grid`` pixels, as in CDUL; the remainder strip at
    the right/bottom edge (< ``grid`` pixels) is not covered. An image narrower or shorter than
    ``grid`` pixels gets ``min(grid, size)`` tiles along that axis (a 2×2 image gives four
    1×1 tiles, a 1×1 image one), so every image yields at least one tile.
    """
    width, height, grid = int(width), int(height), int(grid)
    if grid < 1:
        raise InvalidInputError(f"grid must be >= 1, got {grid}")
    if width < 1 or height < 1:
        raise InvalidInputError(f"image size must be positive, got {width}×{height}")
    cols, rows = min(grid, width), min(grid, height)
    tw, th = width // cols, height // rows
    return [(c * tw, r * th, (c + 1) * tw, (r + 1) * th) for r in range(rows) for c in range(cols)]


@dataclass
class CropConfig:
    """Settings of the local (crop) CLIP scoring stage; ``None`` fields fit the hardware
    (:func:`fiftyone_nola.core.config.resolve`)."""

    grid: int = bounded(3, 1, 16, True, "crop grid")
    batch_size: int = bounded(32, 1, None, True, "crop batch size")  # images per forward pass (grid² crops each)
    num_workers: Optional[int] = bounded(None, 0, 256, True, "workers")  # None: the machine's decode workers
    device: Optional[str] = None  # None: CUDA if present, else the CPU
    precision: str = "auto"  # auto: AMP on CUDA; on a CPU measured (core/engine_choice.py)
    engine: str = "auto"  # auto | torch | openvino: the crops' CLIP forward (embeddings' cached model)
    logit_scale: float = CLIP_LOGIT_SCALE
    draft_decode: bool = True  # JPEG DCT-scaled decode, never below grid × model input size

    def hardware_defaults(self, profile: dev.HardwareProfile) -> dict:
        return {"num_workers": profile.num_workers, "device": profile.device}


class GridCrops:
    """Image -> ``(crops G×3×S×S, valid bool G)``: ``grid²`` tiles, each through ``transform``.

    Images with fewer tiles (smaller than the grid) are padded with zero tensors marked invalid
    so batches stack.
    """

    def __init__(self, transform, grid: int = 3):
        self.transform = transform
        self.grid = int(grid)

    def __call__(self, img):
        crops = [self.transform(img.crop(box)) for box in grid_boxes(*img.size, self.grid)]
        slots = self.grid * self.grid
        valid = torch.zeros(slots, dtype=torch.bool)
        valid[: len(crops)] = True
        crops += [torch.zeros_like(crops[0])] * (slots - len(crops))
        return torch.stack(crops), valid


class CropDataset(ImageFileDataset):
    """Items are ``(index, (crops, valid), None)`` or ``(index, None, reason)``; each image is
    decoded once (bad files are reported by :class:`ImageFileDataset`)."""

    def __init__(self, filepaths: Sequence[str], transform, grid: int = 3, options: DecodeOptions = DecodeOptions()):
        super().__init__(filepaths, GridCrops(transform, grid), options)
        self.grid = int(grid)


def _crop_encoder(clip: LoadedModel, filepaths: Sequence[str], config: CropConfig, weights: np.ndarray):
    """``(encode, device, amp dtype, pin)``: the CLIP image forward the crops go through.

    It is the very forward the embedding stage converted (same engine cache entry); ``auto``
    keeps an engine only if the crops' labels under ``weights`` match PyTorch fp32's."""
    device = dev.resolve_device(config.device)
    choice = engines.resolve(config.engine, config.precision, device)
    slots = config.grid * config.grid

    def labels(feats: np.ndarray) -> np.ndarray:
        return (l2_normalize(feats) @ weights.T).argmax(1)

    def crops(paths: list[str]) -> CropDataset:
        draft = clip.image_size * config.grid if config.draft_decode else None
        return _FlatCrops(paths, clip.transform, config.grid, DecodeOptions(draft_size=draft))

    probe = engine_choice.Probe(
        engine_choice.label_agreement(labels), "crop-labels", len(filepaths) * slots, config.batch_size
    )
    probe = with_images(
        probe,
        filepaths,
        clip.transform,
        clip.image_size,
        config.num_workers,
        crops,
        -(-engine_choice.CHECK_IMAGES // slots),
    )
    runner, choice = engine_choice.select(
        engine_module(clip), clip.identity, (3, clip.image_size, clip.image_size), choice, probe
    )
    if runner is not None:
        return runner, torch.device("cpu"), None, False
    clip.model.to(device)
    return clip.encode_image, device, engines.torch_amp(choice), dev.pin_memory(device)


class _FlatCrops(CropDataset):
    """Items are the valid crops of one image (G' x 3 x S x S), so a batch is a stack of crops
    (the inputs of the crops' forward; the engine choice measures on them)."""

    def __getitem__(self, i):
        idx, item, err = super().__getitem__(i)
        return (idx, None, err) if item is None else (idx, item[0][item[1]], None)


def _crop_loader(clip: LoadedModel, filepaths: Sequence[str], config: CropConfig, pin: bool):
    draft = clip.image_size * config.grid if config.draft_decode else None
    ds = CropDataset(filepaths, clip.transform, config.grid, DecodeOptions(draft_size=draft))
    kwargs = {}
    if config.num_workers > 0:
        # Crop batches are grid² times larger than embedding batches: keep fewer in flight.
        kwargs.update(prefetch_factor=2, persistent_workers=False)
    return torch.utils.data.DataLoader(
        ds,
        batch_size=config.batch_size,
        shuffle=False,
        num_workers=config.num_workers,
        collate_fn=collate_skip_bad,
        pin_memory=pin,
        **kwargs,
    )


def local_clip_scores(
    clip: LoadedModel,
    filepaths: Sequence[str],
    class_weights: np.ndarray,
    config: CropConfig = CropConfig(),
    progress: Optional[ProgressFn] = None,
) -> tuple[np.ndarray, list[tuple[int, str]]]:
    """CLIP class scores of every grid crop: ``(N×G×C float32, failed [(index, reason)])``.

    ``G = grid²``; each crop's row is ``softmax(logit_scale · cos(crop, class))`` over classes
    (sigmoid models: their normalised sigmoid scores, ``core/models/scoring.py``).
    Crops of many images share one forward pass. Rows of unreadable images, and the missing
    slots of images smaller than the grid, are NaN.
    """
    progress = progress or null_progress
    config = resolve(config, config.device)
    if config.batch_size < 1:
        raise InvalidInputError(f"batch_size must be >= 1, got {config.batch_size}")
    w_np = _check_weights(class_weights, clip.embed_dim)
    slots = config.grid * config.grid
    scoring = model_scoring(clip.model, config.logit_scale)
    encode, device, amp, pin = _crop_encoder(clip, filepaths, config, w_np)
    weights = torch.from_numpy(w_np).to(device)
    loader = _crop_loader(clip, filepaths, config, pin)
    out = np.full((len(loader.dataset), slots, w_np.shape[0]), np.nan, dtype=np.float32)
    failed: list[tuple[int, str]] = []
    total, done = len(loader.dataset), 0
    msg = f"scoring {slots} crops per image"
    progress(0, total, msg)
    with torch.inference_mode():
        for idx, batch, bad in loader:
            failed.extend(bad)
            if batch is not None:
                crops, valid = batch
                flat_valid = valid.reshape(-1)
                flat = crops.reshape(-1, *crops.shape[2:])[flat_valid]
                flat = flat.to(device, non_blocking=pin)
                with dev.autocast(device, amp):
                    feats = encode(flat)
                # Cosines and softmax in fp32: logit_scale 100 magnifies half-precision error.
                feats = torch.nn.functional.normalize(feats.float(), dim=-1)
                if scoring.kind == "sigmoid":
                    probs = scoring.sigmoid_probs_torch(feats @ weights.T)
                else:
                    probs = torch.softmax(config.logit_scale * feats @ weights.T, dim=-1)
                block = np.full((len(idx) * slots, w_np.shape[0]), np.nan, dtype=np.float32)
                block[flat_valid.numpy()] = probs.cpu().numpy()
                out[idx.numpy()] = block.reshape(len(idx), slots, -1)
            done += len(idx) + len(bad)
            progress(done, total, msg)
    failed.sort()
    return out, failed


def global_scores(
    image_embeddings: np.ndarray,
    class_weights: np.ndarray,
    logit_scale: float = CLIP_LOGIT_SCALE,
    scoring: Optional[Scoring] = None,
) -> np.ndarray:
    """``softmax(logit_scale · cos(image, class))`` over classes: N×C float32, NaN rows kept.

    A sigmoid ``scoring`` (SigLIP's) gives its normalised sigmoid scores instead."""
    emb = np.asarray(image_embeddings, dtype=np.float32)
    if emb.ndim != 2:
        raise InvalidInputError(f"image_embeddings must be N×D, got shape {emb.shape}")
    w = _check_weights(class_weights, emb.shape[1])
    out = np.full((emb.shape[0], w.shape[0]), np.nan, dtype=np.float32)
    ok = np.all(np.isfinite(emb), axis=1)
    if scoring is not None and scoring.kind == "sigmoid":
        out[ok] = scoring.sigmoid_probs(l2_normalize(emb[ok]) @ w.T)
        return out
    out[ok] = softmax(float(logit_scale) * (l2_normalize(emb[ok]) @ w.T)).astype(np.float32)
    return out
