"""Batched image embedding with a loaded model (no FiftyOne here).

Decoding and preprocessing run in DataLoader worker processes while the main process runs the
model, so on a CPU the decode of batch i+1 overlaps inference of batch i. JPEG draft decoding
(DCT-domain downscaling) makes camera-sized photos several times cheaper to decode.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from . import device as dev
from .data import DecodeOptions, ImageFileDataset, draft_size_for, make_loader
from .models import LoadedModel
from .progress import ProgressFn, null_progress


@dataclass
class EmbedConfig:
    """Settings of the embedding stage; None means "fit the hardware" (see device.hardware_profile)."""

    batch_size: Optional[int] = None
    num_workers: Optional[int] = None
    device: Optional[str] = None
    precision: str = "auto"  # auto: fp16/bf16 autocast on CUDA, fp32 on CPU
    draft_decode: bool = True  # JPEG DCT-scaled decode; exact decode when False
    chunk_size: int = 512  # samples per index checkpoint: a killed job loses at most this many
    index_type: str = "flat"  # flat (exact) | ivf | hnsw | ivfpq (compressed, exact re-rank)
    compile: str = "auto"  # torch.compile the encoder: auto = CUDA and >= 20k images; on | off

    def resolved(self) -> EmbedConfig:
        """A copy with every automatic setting filled in for this machine."""
        device = dev.resolve_device(self.device)
        prof = dev.hardware_profile(device)
        return EmbedConfig(
            batch_size=self.batch_size or prof.embed_batch_size,
            num_workers=prof.num_workers if self.num_workers is None else self.num_workers,
            device=str(device),
            precision=self.precision,
            draft_decode=self.draft_decode,
            chunk_size=self.chunk_size,
            index_type=self.index_type,
            compile=self.compile,
        )

    def preprocessing_tag(self, model: LoadedModel) -> str:
        """Identity of the pixels the model saw: part of an index's identity."""
        return f"{model.image_size}px-{'draft' if self.draft_decode else 'exact'}"


def iter_embeddings(
    model: LoadedModel,
    filepaths: Sequence[str],
    config: EmbedConfig,
    progress: ProgressFn = null_progress,
) -> Iterator[tuple[np.ndarray, np.ndarray, list[tuple[int, str]]]]:
    """Yield ``(indices, vectors float32, failures)`` per batch, in input order of batches.

    ``indices`` index into ``filepaths``; ``failures`` are ``(index, reason)`` of images that
    could not be read. Vectors are the model's raw embeddings (normalised by the index).
    """
    cfg = config.resolved()
    device = torch.device(cfg.device)
    amp = dev.amp_dtype(device, cfg.precision)
    pin = dev.pin_memory(device)
    model.model.to(device)
    options = DecodeOptions(draft_size=draft_size_for(model.image_size, cfg.draft_decode))
    ds = ImageFileDataset(filepaths, model.transform, options)
    loader = make_loader(ds, cfg.batch_size, cfg.num_workers, pin_memory=pin)
    encode = dev.maybe_compile(model.encode_image, device, len(ds), cfg.compile)
    total, done = len(ds), 0
    progress(0, total, f"embedding ({model.family})")
    with torch.inference_mode():
        for idx, batch, bad in loader:
            vecs = np.empty((0, model.embed_dim), dtype=np.float32)
            if batch is not None:
                batch = batch.to(device, non_blocking=pin)
                with dev.autocast(device, amp):
                    out = encode(batch)
                vecs = out.float().cpu().numpy()
            done += len(idx) + len(bad)
            progress(done, total, f"embedding ({model.family})")
            yield idx.numpy(), vecs, bad


def embed_filepaths(
    model: LoadedModel,
    filepaths: Sequence[str],
    config: EmbedConfig = EmbedConfig(),
    progress: ProgressFn = null_progress,
) -> tuple[np.ndarray, list[tuple[int, str]]]:
    """Embed every file; returns ``(N×D float32 with NaN rows for failures, failures)``."""
    out = np.full((len(filepaths), model.embed_dim), np.nan, dtype=np.float32)
    failures: list[tuple[int, str]] = []
    for idx, vecs, bad in iter_embeddings(model, filepaths, config, progress):
        out[idx] = vecs
        failures.extend(bad)
    return out, failures


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Row-wise L2 normalisation; zero rows stay zero, NaN rows stay NaN."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norms, eps)
