"""Batched image embedding with a loaded model (no FiftyOne here).

Decoding and preprocessing run in DataLoader worker processes while the main process runs the
model, so on a CPU the decode of batch i+1 overlaps inference of batch i. JPEG draft decoding
(DCT-domain downscaling) makes camera-sized photos several times cheaper to decode.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

from fiftyone_nola.core import device as dev
from fiftyone_nola.core import engine_choice, engines, zeroshot
from fiftyone_nola.core.data import DecodeOptions, ImageFileDataset, draft_size_for, file_fingerprint, make_loader
from fiftyone_nola.core.models import LoadedModel
from fiftyone_nola.core.progress import ProgressFn, null_progress


@dataclass
class EmbedConfig:
    """Settings of the embedding stage; None means "fit the hardware" (see device.hardware_profile)."""

    batch_size: Optional[int] = None
    num_workers: Optional[int] = None
    device: Optional[str] = None
    # auto: fp16/bf16 autocast on CUDA; on a CPU measured on the images being embedded
    # (core/engine_choice.py: int8/bf16 only where the CPU has them and they agree with fp32).
    precision: str = "auto"
    engine: str = "auto"  # auto | torch | openvino (core/engines.py; NOLA_ENGINE overrides auto)
    allow_mixed_engines: bool = False  # let a store hold vectors of several engines/precisions
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
            engine=self.engine,
            allow_mixed_engines=self.allow_mixed_engines,
            draft_decode=self.draft_decode,
            chunk_size=self.chunk_size,
            index_type=self.index_type,
            compile=self.compile,
        )

    def preprocessing_tag(self, model: LoadedModel) -> str:
        """Identity of the pixels the model saw: part of an index's identity."""
        return f"{model.image_size}px-{'draft' if self.draft_decode else 'exact'}"


def engine_module(model: LoadedModel) -> torch.nn.Module:
    """The module whose forward is ``model.encode_image`` (what an engine converts)."""
    if model.family == "clip" and hasattr(model.model, "visual"):
        return model.model.visual  # encode_image(x) is visual(x); the text tower is not needed
    return engines.Forward(model.model, model.encode_image)


def _evenly(paths: Sequence[str], n: int) -> list[str]:
    paths = list(paths)
    if not paths or n <= 0:
        return []
    return [paths[i] for i in np.unique(np.linspace(0, len(paths) - 1, min(n, len(paths))).astype(int))]


def calibration_images(
    filepaths: Sequence[str], transform, draft_size: Optional[int] = None, n: int = engines.CALIBRATION_IMAGES
) -> Callable[[], Iterator[torch.Tensor]]:
    """A callable yielding up to ``n`` preprocessed images spread evenly over ``filepaths``
    (int8 calibration on the user's own images); unreadable files are skipped."""
    picks = _evenly(filepaths, n)

    def batches() -> Iterator[torch.Tensor]:
        ds = ImageFileDataset(picks, transform, DecodeOptions(draft_size=draft_size))
        for i in range(len(ds)):
            _, t, err = ds[i]
            if err is None:
                yield t.unsqueeze(0)

    # Which images an int8 model was calibrated on (recorded in its meta.json).
    batches.fingerprint = hashlib.sha256(
        json.dumps([[p, file_fingerprint(p)] for p in picks] + [draft_size]).encode()
    ).hexdigest()[:16]
    return batches


def with_images(
    probe: engine_choice.Probe,
    filepaths: Sequence[str],
    transform,
    draft_size: Optional[int] = None,
    num_workers: int = 0,
    dataset: Optional[Callable[[list[str]], torch.utils.data.Dataset]] = None,
    n_check: int = engine_choice.CHECK_IMAGES,
) -> engine_choice.Probe:
    """``probe`` measuring on the user's images: ``n_check`` check images and
    :data:`engines.CALIBRATION_IMAGES` int8 calibration images, disjoint, spread evenly over
    ``filepaths`` and decoded only if a measurement happens. ``dataset(paths)`` replaces the
    check images' dataset (one whose batches are the model's inputs, e.g. crops)."""
    picks = _evenly(filepaths, n_check + engines.CALIBRATION_IMAGES)
    calib = picks[::3] if len(picks) > 1 else []  # one in three: 64 of 192
    check_paths = [p for i, p in enumerate(picks) if i % 3 or len(picks) == 1][:n_check]
    make = dataset or (lambda ps: ImageFileDataset(ps, transform, DecodeOptions(draft_size=draft_size)))

    def check(n: Optional[int] = None) -> torch.Tensor:
        n = min(n or engine_choice.CHECK_IMAGES, engine_choice.CHECK_IMAGES)
        # A custom dataset's items may differ in size (crops of small images): one per batch.
        loader = make_loader(make(check_paths), 1 if dataset else min(n, probe.batch_size), min(num_workers, 2))
        parts, got = [], 0
        for _, b, _ in loader:
            if b is not None:
                parts.append(b.reshape(-1, *b.shape[-3:]))
                got += len(parts[-1])
            if got >= n:
                break
        return torch.cat(parts)[:n] if parts else torch.zeros(0)

    return dataclasses.replace(
        probe, check=check, calibration=calibration_images(calib, transform, draft_size, n=len(calib))
    )


def _class_weights(model: LoadedModel, classes: Optional[Sequence[str]]) -> Optional[Callable[[], np.ndarray]]:
    """The zero-shot check's class texts ("a photo of a {c}."), encoded only if measured."""
    if not classes or model.family != "clip" or model.tokenizer is None:
        return None
    return lambda: zeroshot.encode_texts(model, [f"a photo of a {c}." for c in classes], device="cpu")


def prepare_encoder(
    model: LoadedModel,
    config: EmbedConfig,
    filepaths: Sequence[str] = (),
    log: Callable[[str], None] = print,
    classes: Optional[Sequence[str]] = None,
) -> tuple[Callable[[torch.Tensor], torch.Tensor], engines.EngineChoice]:
    """``(encode, choice)``: the forward that will embed ``filepaths`` and what runs it.

    ``engine="auto"`` on a CPU is decided by measurement on ``filepaths`` (once per model and
    CPU, cached; with ``classes`` the check includes zero-shot top-1 agreement on them). OpenVINO
    models are converted once and cached on disk; a failure falls back to PyTorch (one
    warning), which ``choice`` then says.
    """
    cfg = config.resolved()
    device = torch.device(cfg.device)
    choice = engines.resolve(cfg.engine, cfg.precision, device)
    draft = draft_size_for(model.image_size, cfg.draft_decode)
    agree = engine_choice.embedding_agreement(_class_weights(model, classes))
    probe = engine_choice.Probe(agree, "embeddings", len(filepaths), cfg.batch_size)
    probe = with_images(probe, filepaths, model.transform, draft, cfg.num_workers)
    runner, choice = engine_choice.select(
        engine_module(model), model.identity, (3, model.image_size, model.image_size), choice, probe, log=log
    )
    if runner is not None:
        return runner, choice
    model.model.to(device)
    return dev.maybe_compile(model.encode_image, device, len(filepaths), cfg.compile), choice


def iter_embeddings(
    model: LoadedModel,
    filepaths: Sequence[str],
    config: EmbedConfig,
    progress: ProgressFn = null_progress,
    encoder: Optional[tuple[Callable, engines.EngineChoice]] = None,
    timing: Optional[dict] = None,
) -> Iterator[tuple[np.ndarray, np.ndarray, list[tuple[int, str]]]]:
    """Yield ``(indices, vectors float32, failures)`` per batch, in input order of batches.

    ``indices`` index into ``filepaths``; ``failures`` are ``(index, reason)`` of images that
    could not be read. Vectors are the model's raw embeddings (normalised by the index).
    ``encoder`` is what :func:`prepare_encoder` returned (prepared here when None). ``timing``,
    if given, receives ``wait_s`` (waiting for decoded batches), ``model_s`` (forward passes)
    and ``model_cpu_s`` (CPU seconds of this process's threads in them: robust to other jobs).
    """
    cfg = config.resolved()
    device = torch.device(cfg.device)
    encode, choice = encoder or prepare_encoder(model, cfg, filepaths)
    on_engine = choice.engine != "torch"
    amp = None if on_engine else engines.torch_amp(choice)
    pin = dev.pin_memory(device) and not on_engine
    if on_engine:
        device = torch.device("cpu")
    options = DecodeOptions(draft_size=draft_size_for(model.image_size, cfg.draft_decode))
    ds = ImageFileDataset(filepaths, model.transform, options)
    loader = make_loader(ds, cfg.batch_size, cfg.num_workers, pin_memory=pin)
    timing = timing if timing is not None else {}
    timing.setdefault("wait_s", 0.0)
    timing.setdefault("model_s", 0.0)
    timing.setdefault("model_cpu_s", 0.0)
    total, done = len(ds), 0
    progress(0, total, f"embedding ({model.family})")
    clock = time.perf_counter
    with torch.inference_mode():
        t = clock()
        for idx, batch, bad in loader:
            t_got, c_got = clock(), time.process_time()
            timing["wait_s"] += t_got - t
            vecs = np.empty((0, model.embed_dim), dtype=np.float32)
            if batch is not None:
                batch = batch.to(device, non_blocking=pin)
                with dev.autocast(device, amp):
                    out = encode(batch)
                vecs = out.float().cpu().numpy()
            timing["model_s"] += clock() - t_got
            timing["model_cpu_s"] += time.process_time() - c_got
            done += len(idx) + len(bad)
            progress(done, total, f"embedding ({model.family})")
            yield idx.numpy(), vecs, bad
            t = clock()  # the consumer's time between batches is neither decode nor model


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
