"""Class probabilities of a tuned model, and the ordered logits loop training reuses."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import numpy as np
import torch

from fiftyone_nola.core import device as dev
from fiftyone_nola.core import engine_choice, engines
from fiftyone_nola.core.data import ImageFileDataset, make_loader
from fiftyone_nola.core.embed import with_images
from fiftyone_nola.core.progress import ProgressFn, null_progress
from fiftyone_nola.core.prompt_tuning.model import PromptedClassifier
from fiftyone_nola.core.prompt_tuning.transforms import model_weak_transform


def _eval_loader(filepaths, transform, batch_size: int, num_workers: int, device: torch.device):
    """An ordered loader of ``filepaths`` for evaluation."""
    ds = ImageFileDataset(filepaths, transform)
    # Own generator: evaluation must not draw from the global RNG the training relies on.
    return make_loader(
        ds, batch_size, num_workers, pin_memory=dev.pin_memory(device), generator=torch.Generator().manual_seed(0)
    )


def _iter_logits(model, loader, device, amp, teacher_fn=None, forward=None):
    """Yield ``(indices, logits float32 CPU, teacher labels or None, failures)`` in order;
    ``forward`` (e.g. a converted engine model) replaces ``model``'s own forward."""
    pin = dev.pin_memory(device)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for idx, batch, bad in loader:
                if batch is None:
                    yield idx, None, None, bad
                    continue
                x = batch.to(device, non_blocking=pin)
                with dev.autocast(device, amp):
                    logits = (forward or model)(x)
                    t = teacher_fn(x) if teacher_fn is not None else None
                t = None if t is None else torch.as_tensor(t).long().cpu()
                yield idx, logits.float().cpu(), t, bad
    finally:
        model.train(was_training)


def predict_tuned(
    model: PromptedClassifier,
    filepaths: Sequence[str],
    batch_size: int = 64,
    num_workers: Optional[int] = None,
    device: Optional[str] = None,
    precision: str = "auto",
    progress: Optional[ProgressFn] = None,
    engine: str = "auto",
) -> tuple[np.ndarray, list[tuple[int, str]]]:
    """Class probabilities on the weak view: ``(N×C float32, NaN rows for failures, failures)``.

    ``engine``/``precision`` choose what runs the forward (core/engines.py: OpenVINO, converted
    once per tuned model and cached, or PyTorch); ``auto`` on a CPU measures on these images
    and keeps an engine only if its labels match PyTorch fp32's (core/engine_choice.py).
    """
    progress = progress or null_progress
    d = dev.resolve_device(device)
    workers = dev.hardware_profile(d).num_workers if num_workers is None else int(num_workers)
    filepaths = [str(p) for p in filepaths]
    out = np.full((len(filepaths), model.num_classes), np.nan, dtype=np.float32)
    failed: list[tuple[int, str]] = []
    weak = model_weak_transform(model)
    choice = engines.resolve(engine, precision, d)
    if choice.engine != "torch":
        model.to("cpu").eval()
    identity = {
        "family": "nola-tuned",
        "key": f"tuned-{getattr(model, 'model_id', None) or 'unsaved'}",
        "n_prompts": model.n_prompts,
        "num_classes": model.num_classes,
    }
    probe = engine_choice.Probe(engine_choice.label_agreement(), "labels", len(filepaths), batch_size)
    runner, choice = engine_choice.select(
        model, identity, (3, model.image_size, model.image_size), choice, with_images(probe, filepaths, weak)
    )
    amp = None if runner is not None else engines.torch_amp(choice)
    model.to(d)
    model.last_engine = choice  # what produced the probabilities (recorded by the predict stage)
    done = 0
    progress(0, len(filepaths), "predicting (tuned CLIP)")
    loader = _eval_loader(filepaths, weak, batch_size, workers, d)
    for idx, logits, _, bad in _iter_logits(model, loader, d, amp, forward=runner):
        failed.extend((int(i), r) for i, r in bad)
        if logits is not None:
            out[idx.numpy()] = torch.softmax(logits, dim=-1).numpy()
        done += len(idx) + len(bad)
        progress(done, len(filepaths), "predicting (tuned CLIP)")
    return out, failed
