"""Device choice, mixed precision and hardware-fitted defaults, in one place.

Every stage asks this module which device to run on, whether to autocast, and which batch
sizes / epochs / subset sizes fit the machine, so CPU and GPU behaviour never drift apart.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Optional

import torch

from fiftyone_nola.core import cpu_isa
from fiftyone_nola.core.errors import InvalidInputError


def resolve_device(device: Optional[str] = None) -> torch.device:
    """Return the device to use: explicit argument, ``NOLA_DEVICE``, else CUDA if present, else CPU."""
    name = device or os.environ.get("NOLA_DEVICE") or "auto"
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InvalidInputError(f"device={name!r} was requested but CUDA is not available; use device='cpu' or 'auto'")
    return dev


def amp_dtype(device: torch.device, precision: str = "auto") -> Optional[torch.dtype]:
    """Autocast dtype for ``precision`` on ``device`` (None means full fp32).

    ``auto``: fp16 on CUDA (bf16 where supported), fp32 elsewhere. ``bf16``/``fp16``/``fp32``
    force a choice; ``bf16`` works on CPU too and is how the mixed-precision paths are tested.
    """
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if precision != "auto":
        raise InvalidInputError(f"precision must be auto, fp32, bf16 or fp16, not {precision!r}")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return None


def autocast(device: torch.device, dtype: Optional[torch.dtype]):
    """A ``torch.autocast`` context for ``dtype``, or a no-op when ``dtype`` is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(device: torch.device, dtype: Optional[torch.dtype]):
    """A GradScaler when training in fp16 on CUDA (bf16 and fp32 need none), else None."""
    if device.type == "cuda" and dtype == torch.float16:
        return torch.amp.GradScaler("cuda")
    return None


@contextlib.contextmanager
def small_steps_on_cpu(device: torch.device, macs_per_step: int = 0, limit: int = 8_000_000):
    """One intra-op thread on a CPU while each training step is tiny; restored afterwards.

    Steps of small heads are microseconds of work: with several threads OpenMP synchronisation
    dominates, and on shared cores a 30-epoch fit ran ~30x slower (7.6 s vs 0.25 s).
    """
    if device.type != "cpu" or macs_per_step > limit:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# torch.compile costs tens of seconds up front; below this many images it cannot pay back.
COMPILE_MIN_ITEMS = 20_000
COMPILE_SETTINGS = ("auto", "on", "off")


def should_compile(device: torch.device, n_items: int, setting: str = "auto") -> bool:
    """Whether to ``torch.compile`` a model that will see ``n_items`` inputs.

    ``auto``: on CUDA only, for large jobs (on a CPU the compile costs more than it saves);
    ``on``/``off`` force it.
    """
    if setting not in COMPILE_SETTINGS:
        raise InvalidInputError(f"compile must be one of {COMPILE_SETTINGS}, not {setting!r}")
    if setting != "auto":
        return setting == "on"
    return device.type == "cuda" and n_items >= COMPILE_MIN_ITEMS and hasattr(torch, "compile")


def maybe_compile(fn, device: torch.device, n_items: int, setting: str = "auto"):
    """``fn`` compiled with ``torch.compile`` when :func:`should_compile` says so, else ``fn``.

    The backend comes from ``NOLA_COMPILE_BACKEND`` (default inductor). Batches of one size
    compile once; the ragged last batch triggers one dynamic-shape recompile, not one per size.
    """
    if not should_compile(device, n_items, setting):
        return fn
    backend = os.environ.get("NOLA_COMPILE_BACKEND", "inductor")
    return torch.compile(fn, backend=backend, dynamic=None)


def pin_memory(device: torch.device) -> bool:
    """Pinned host memory only helps host-to-GPU copies."""
    return device.type == "cuda"


@dataclass(frozen=True)
class HardwareProfile:
    """Defaults that fit the machine; printed by long jobs so users know what was chosen."""

    device: str
    cpu_count: int
    embed_batch_size: int
    num_workers: int
    tune_epochs: int
    tune_batch_size: int
    tune_max_samples: Optional[int]
    dino_model: str  # the method's ViT-B/16 on a GPU; ViT-S/16 (4x cheaper) on a CPU

    def describe(self) -> str:
        subset = "all samples" if self.tune_max_samples is None else f"<= {self.tune_max_samples} samples"
        return (
            f"device={self.device} cpus={self.cpu_count} embed_batch={self.embed_batch_size} "
            f"workers={self.num_workers} tuning: {self.tune_epochs} epochs, batch {self.tune_batch_size}, "
            f"{subset}; DINO default {self.dino_model}"
        )


def hardware_profile(device: Optional[torch.device] = None) -> HardwareProfile:
    """Paper settings on a GPU; fewer epochs, a subset and small batches on a CPU."""
    device = device or resolve_device()
    cpus = cpu_isa.usable_cores()
    if device.type == "cuda":
        return HardwareProfile(
            device=str(device),
            cpu_count=cpus,
            embed_batch_size=256,
            num_workers=min(8, max(2, cpus - 1)),
            tune_epochs=50,
            tune_batch_size=512,
            tune_max_samples=None,
            dino_model="vit_base_patch16_224.dino",
        )
    # On a CPU, one decode worker beside the inference threads is what keeps 2 cores busy.
    return HardwareProfile(
        device=str(device),
        cpu_count=cpus,
        embed_batch_size=32,
        num_workers=max(1, min(4, cpus // 2)),
        tune_epochs=2,
        tune_batch_size=32,
        tune_max_samples=256,
        dino_model="vit_small_patch16_224.dino",
    )
