"""Prompt-tuning settings (``TuneConfig``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Optional

from fiftyone_nola.core.config import bounded
from fiftyone_nola.core.device import HardwareProfile
from fiftyone_nola.core.errors import InvalidInputError

SELECTIONS = ("fixed", "teacher_agreement")
# Settings that may change between a run and its resumption without changing what is learned
# (epochs: extending a finished schedule is how a run is resumed or continued).
_RUNTIME_FIELDS = ("epochs", "num_workers", "device", "precision")
# max_samples value that asks for every labeled image whatever the hardware.
ALL_SAMPLES = 0


@dataclass
class TuneConfig:
    """Stage 3 settings; the fixed ones are the official (lr 4e-3, AdamW, 16 prompts).

    Fields left ``None`` fit the hardware (``config.resolve``; ``tune`` resolves them too): on a
    GPU the official 50 epochs, batch 512 and all samples; on a CPU a few epochs on a subset
    with small batches.
    """

    epochs: Optional[int] = bounded(None, 1, 10_000, True, "epochs")
    batch_size: Optional[int] = bounded(None, 1, None, True, "batch size")
    lr: float = 4e-3
    weight_decay: float = 0.01  # AdamW, 0 on biases (official no-decay rule)
    betas: tuple = (0.9, 0.999)
    n_prompts: int = 16
    label_smoothing: float = 0.1
    precision: str = "auto"  # auto: AMP on CUDA, fp32 elsewhere; bf16/fp16/fp32 force it
    seed: int = 0
    # Train on a teacher-stratified subset of this size; ALL_SAMPLES (0): every labeled image.
    # After resolution None also means every image: it is what a GPU's profile chooses.
    max_samples: Optional[int] = bounded(None, 0, None, True, "tuning sample limit (0: all samples)")
    num_workers: Optional[int] = bounded(None, 0, 256, True, "workers")
    device: Optional[str] = None
    selection: str = "fixed"  # "fixed": last epoch | "teacher_agreement": label-free best epoch
    holdout_fraction: float = 0.1  # share of images held aside for "teacher_agreement"

    def __post_init__(self):
        self.betas = tuple(float(b) for b in self.betas)
        if self.selection not in SELECTIONS:
            raise InvalidInputError(f"selection must be one of {SELECTIONS}, not {self.selection!r}")
        if (self.epochs is not None and self.epochs < 1) or (self.batch_size is not None and self.batch_size < 1):
            raise InvalidInputError("epochs and batch_size must be >= 1")
        if not 0.0 < self.holdout_fraction < 1.0:
            raise InvalidInputError(f"holdout_fraction must be in (0, 1), not {self.holdout_fraction}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise InvalidInputError(f"label_smoothing must be in [0, 1), not {self.label_smoothing}")
        if self.max_samples is not None and self.max_samples < 0:
            raise InvalidInputError(
                f"max_samples must be >= 1, {ALL_SAMPLES} (all samples) or None (fit the hardware), "
                f"not {self.max_samples}"
            )

    def hardware_defaults(self, profile: HardwareProfile) -> dict:
        """Paper settings on a GPU; a few epochs on a subset with small batches on a CPU."""
        return dict(
            epochs=profile.tune_epochs,
            batch_size=profile.tune_batch_size,
            max_samples=profile.tune_max_samples,
            num_workers=profile.num_workers,
            device=profile.device,
        )

    @property
    def sample_cap(self) -> Optional[int]:
        """The subset size of a resolved config, None for every labeled image."""
        return self.max_samples or None

    def as_recorded(self) -> TuneConfig:
        """This resolved config as run records, checkpoints and meta.json store it.

        "All samples" is ``max_samples=None`` there, as before ``ALL_SAMPLES`` existed, so the
        tuned models and checkpoints of earlier runs stay up to date. Only for storing: resolving
        the result again would refit its None.
        """
        return replace(self, max_samples=self.sample_cap)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TuneConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def resume_key(self) -> dict:
        """The settings a checkpoint must share with a run that resumes it."""
        return {k: v for k, v in self.as_recorded().to_dict().items() if k not in _RUNTIME_FIELDS}
