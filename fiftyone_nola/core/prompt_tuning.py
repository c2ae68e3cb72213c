"""NoLA stage 3: visual prompt tuning of CLIP's vision tower against a teacher (no FiftyOne here).

The student is CLIP's ViT with learnable prompt tokens inserted after the CLS token (shallow
VPT), followed by a bias-free linear head initialised from the class description embeddings.
Only the prompts, the LayerNorms of the vision tower and the head are trained, on a strongly
augmented view with label-smoothing cross-entropy against hard teacher labels.

Unlike the official code, which runs the DINO teacher on the weak view of every batch, the
teacher labels are computed once beforehand (from stored DINO embeddings) and looked up per
step; ``tune(teacher_fn=...)`` restores the online behaviour for benchmarks. No ground truth
is used anywhere: the epoch to keep is the last one or the one agreeing most with the teacher
on held-aside images.

Randomness is a pure function of the seed: the epoch's shuffle of ``(seed, epoch)`` and each
image's augmentation of ``(seed, epoch, index)``, whatever the number of loader workers or
processes. That is what makes ``tune`` data-parallel under torchrun without changing its result:
with a process group of N ranks (see ``distributed``) each rank trains on its slice of
every global batch, and its teacher labels; gradients are summed over ranks and divided by the
global batch's size, so each step is the single-process step (up to float rounding).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import math
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter
from torch import nn

from fiftyone_nola.core import device as dev
from fiftyone_nola.core import distributed as dt
from fiftyone_nola.core import engines
from fiftyone_nola.core.data import ImageFileDataset, make_loader
from fiftyone_nola.core.embed import calibration_images
from fiftyone_nola.core.errors import EmptyViewError, IndexMismatchError, InvalidInputError
from fiftyone_nola.core.models import LoadedModel
from fiftyone_nola.core.progress import ProgressFn, null_progress
from fiftyone_nola.core.storage import atomic_path, read_json, write_json_atomic

CHECKPOINT_NAME = "checkpoint.pt"
TUNED_NAME = "tuned.pt"
META_NAME = "meta.json"
# The head of the official code: W on the raw visual output. 0.1 used logit_scale*W on unit rows.
HEAD_FORMULATION = "official-W-raw"
SELECTIONS = ("fixed", "teacher_agreement")
# Settings that may change between a run and its resumption without changing what is learned
# (epochs: extending a finished schedule is how a run is resumed or continued).
_RUNTIME_FIELDS = ("epochs", "num_workers", "device", "precision")


# --------------------------------------------------------------------------- transforms


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


def weak_transform(image_size: int, mean: Sequence[float], std: Sequence[float]):
    """Weak view = CLIP's eval preprocessing: resize (bicubic), centre crop, normalise."""
    from torchvision import transforms as T

    return T.Compose([
        T.Resize(image_size, interpolation=T.InterpolationMode.BICUBIC, antialias=True),
        T.CenterCrop(image_size),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])


def strong_transform(image_size: int, mean: Sequence[float], std: Sequence[float]):
    """Strong view of NoLA/LaFTer (see methods.md), CLIP-normalised."""
    from torchvision import transforms as T

    bicubic = T.InterpolationMode.BICUBIC
    return T.Compose([
        # Bilinear, torchvision's default, as the official get_random_transform leaves it.
        T.RandomResizedCrop(image_size, scale=(0.2, 1.0), antialias=True),
        T.RandomHorizontalFlip(),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        T.RandomPerspective(distortion_scale=0.2, p=0.5, interpolation=bicubic),
        T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1),
        _RandomGaussianBlur((0.1, 2.0)),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])


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


# --------------------------------------------------------------------------- modules


def _pair(v) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, (tuple, list)) else (int(v), int(v))


class PromptedVisual(nn.Module):
    """An open_clip ``VisionTransformer`` with ``n_prompts`` learnable tokens after the CLS token.

    Prompts enter after the positional embedding and ``ln_pre`` (shallow VPT, as NoLA) and are
    dropped again before pooling, so with ``n_prompts=0`` this is exactly ``visual.forward``.
    """

    def __init__(self, visual: nn.Module, n_prompts: int = 16, seed: int = 0):
        super().__init__()
        missing = [a for a in ("conv1", "class_embedding", "positional_embedding", "transformer")
                   if not hasattr(visual, a)]
        if missing:
            raise InvalidInputError(
                f"prompt tuning needs a ViT CLIP (open_clip VisionTransformer); "
                f"{type(visual).__name__} lacks {', '.join(missing)}. Use a ViT-* CLIP architecture."
            )
        if n_prompts < 0:
            raise InvalidInputError(f"n_prompts must be >= 0, not {n_prompts}")
        self.tower = visual
        self.n_prompts = int(n_prompts)
        self.width = int(visual.class_embedding.shape[-1])
        self.prompts = nn.Parameter(torch.zeros(1, self.n_prompts, self.width,
                                                device=visual.class_embedding.device))
        # Xavier-uniform bound exactly as NoLA's code and methods.md: 3*16*16 even for /32 models
        # (the bound the published numbers were produced with), not this model's patch size.
        bound = math.sqrt(6.0 / float(3 * 16 * 16 + self.width))
        if self.n_prompts:
            g = torch.Generator().manual_seed(int(seed))
            init = torch.empty(self.prompts.shape).uniform_(-bound, bound, generator=g)
            with torch.no_grad():
                self.prompts.copy_(init)
        self.init_bound = bound

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        v = self.tower
        if hasattr(v, "_embeds"):
            return v._embeds(x)
        # Older open_clip: the same steps spelled out (conv stem, CLS, positions, ln_pre).
        x = v.conv1(x)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        cls = v.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype)
        x = getattr(v, "patch_dropout", nn.Identity())(x)
        return getattr(v, "ln_pre", nn.Identity())(x)

    def _blocks(self, x: torch.Tensor) -> torch.Tensor:
        t = self.tower.transformer
        if getattr(t, "batch_first", None) is None:
            # Older open_clip transformers take LND and leave the permutes to the caller.
            return t(x.permute(1, 0, 2)).permute(1, 0, 2)
        return t(x)  # newer ones transpose internally when not batch_first

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        v = self.tower
        if hasattr(v, "_pool"):
            return v._pool(x)[0]
        if hasattr(v, "_global_pool"):
            return v._global_pool(v.ln_post(x))[0]
        return v.ln_post(x[:, 0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._embed(x)
        n = self.n_prompts
        if n:
            p = self.prompts.to(x.dtype).expand(x.shape[0], -1, -1)
            x = torch.cat([x[:, :1], p, x[:, 1:]], dim=1)
        x = self._blocks(x)
        if n:
            # Pooling sees CLS + patches only, so 'avg' and attention pooling keep their meaning.
            x = torch.cat([x[:, :1], x[:, 1 + n:]], dim=1)
        pooled = self._pool(x)
        proj = getattr(self.tower, "proj", None)
        return pooled @ proj if proj is not None else pooled


class PromptedClassifier(nn.Module):
    """PromptedVisual -> bias-free ``Linear(D, C)`` initialised to ``W``, as the official code.

    ``W`` (C×D) holds the unit-norm class description embeddings; the head acts on the visual
    output as it is (no L2 normalisation, no logit scale), exactly NoLA's ``cde_adapter``. So
    the initial argmax is zero-shot CLIP's, while the softmax is at the temperature set by the
    feature norm, and Adam's steps are of the size the official run took. Trainable: prompts,
    every LayerNorm of the vision tower, the head. The tower is copied so tuning never alters
    the caller's CLIP.
    """

    def __init__(
        self,
        visual: nn.Module,
        class_weights,
        n_prompts: int = 16,
        seed: int = 0,
        copy_visual: bool = True,
    ):
        super().__init__()
        W = torch.as_tensor(np.asarray(class_weights, dtype=np.float32))
        if W.ndim != 2:
            raise InvalidInputError(f"class_weights must be C×D, got shape {tuple(W.shape)}")
        out_dim = getattr(visual, "output_dim", None)
        if out_dim is not None and int(out_dim) != W.shape[1]:
            raise InvalidInputError(
                f"class_weights have D={W.shape[1]} but the CLIP image embedding has {out_dim} "
                f"dims; compute the class embeddings with the same CLIP model"
            )
        tower = copy.deepcopy(visual) if copy_visual else visual
        self.image_size = _pair(getattr(tower, "image_size", 224))[0]
        self.mean, self.std = clip_mean_std(tower)
        self.visual = PromptedVisual(tower, n_prompts=n_prompts, seed=seed)
        self.head = nn.Linear(W.shape[1], W.shape[0], bias=False)
        with torch.no_grad():
            self.head.weight.copy_(W)
        self.head.to(tower.class_embedding.device)
        self.num_classes, self.embed_dim = int(W.shape[0]), int(W.shape[1])
        self.n_prompts = self.visual.n_prompts
        for p in self.parameters():
            p.requires_grad_(False)
        names = ["visual.prompts"] if self.n_prompts else []
        for mname, m in self.visual.tower.named_modules():
            if isinstance(m, nn.LayerNorm):
                names += [f"visual.tower.{mname}.{pn}" for pn, _ in m.named_parameters()]
        names.append("head.weight")
        params = dict(self.named_parameters())
        self._trainable = tuple(names)
        for n in names:
            params[n].requires_grad_(True)

    @classmethod
    def from_clip(cls, clip: LoadedModel, class_weights, n_prompts: int = 16, seed: int = 0):
        """Build on ``clip``'s vision tower with the head set to ``class_weights``."""
        return cls(clip.model.visual, class_weights, n_prompts=n_prompts, seed=seed)

    @property
    def trainable_names(self) -> tuple[str, ...]:
        return self._trainable

    def train(self, mode: bool = True):
        super().train(mode)
        # The frozen tower always runs as at inference (official code: model.eval() while
        # training); e.g. open_clip patch dropout stays off.
        self.visual.tower.eval()
        return self

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The prompted image embedding the head reads (unnormalised, as CLIP's encode_image)."""
        return self.visual(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.visual(x))

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Detached CPU copies of exactly the trained parameters (a few hundred KB for ViT-B)."""
        params = dict(self.named_parameters())
        return {n: params[n].detach().to("cpu", copy=True) for n in self._trainable}

    def load_trainable_state_dict(self, state: dict) -> None:
        """Load what ``trainable_state_dict`` returned; names and shapes must match."""
        params = dict(self.named_parameters())
        if set(state) != set(self._trainable):
            extra = sorted(set(state) - set(self._trainable))
            missing = sorted(set(self._trainable) - set(state))
            raise IndexMismatchError(
                f"tuned parameters do not fit this model (missing {missing[:4]}, unexpected "
                f"{extra[:4]}): it was saved for another CLIP architecture or prompt count"
            )
        for n in self._trainable:
            t = torch.as_tensor(state[n])
            if tuple(t.shape) != tuple(params[n].shape):
                raise IndexMismatchError(
                    f"tuned parameter {n} has shape {tuple(t.shape)}, this model expects "
                    f"{tuple(params[n].shape)} (different CLIP, prompt count or class list)"
                )
            with torch.no_grad():
                params[n].copy_(t.to(params[n].device, params[n].dtype))


# --------------------------------------------------------------------------- config


@dataclass
class TuneConfig:
    """Stage 3 settings; defaults are the official ones (50 epochs, batch 512, lr 4e-3)."""

    epochs: int = 50
    batch_size: int = 512
    lr: float = 4e-3
    weight_decay: float = 0.01  # AdamW, 0 on biases (official no-decay rule)
    betas: tuple = (0.9, 0.999)
    n_prompts: int = 16
    label_smoothing: float = 0.1
    precision: str = "auto"  # auto: AMP on CUDA, fp32 elsewhere; bf16/fp16/fp32 force it
    seed: int = 0
    max_samples: Optional[int] = None  # train on a teacher-stratified subset of this size
    num_workers: Optional[int] = None  # None: from the hardware profile
    device: Optional[str] = None
    selection: str = "fixed"  # "fixed": last epoch | "teacher_agreement": label-free best epoch
    holdout_fraction: float = 0.1  # share of images held aside for "teacher_agreement"

    def __post_init__(self):
        self.betas = tuple(float(b) for b in self.betas)
        if self.selection not in SELECTIONS:
            raise InvalidInputError(f"selection must be one of {SELECTIONS}, not {self.selection!r}")
        if self.epochs < 1 or self.batch_size < 1:
            raise InvalidInputError("epochs and batch_size must be >= 1")
        if not 0.0 < self.holdout_fraction < 1.0:
            raise InvalidInputError(f"holdout_fraction must be in (0, 1), not {self.holdout_fraction}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise InvalidInputError(f"label_smoothing must be in [0, 1), not {self.label_smoothing}")
        if self.max_samples is not None and self.max_samples < 1:
            raise InvalidInputError(f"max_samples must be >= 1 or None, not {self.max_samples}")

    @classmethod
    def for_hardware(cls, device=None, log: Optional[Callable[[str], None]] = print, **overrides):
        """Paper settings on a GPU; a few epochs on a subset with small batches on a CPU."""
        d = dev.resolve_device(device if isinstance(device, (str, type(None))) else str(device))
        prof = dev.hardware_profile(d)
        kw = dict(epochs=prof.tune_epochs, batch_size=prof.tune_batch_size,
                  max_samples=prof.tune_max_samples, num_workers=prof.num_workers, device=str(d))
        kw.update(overrides)
        cfg = cls(**kw)
        if log:
            log(f"prompt tuning settings for this machine: {prof.describe()}")
        return cfg

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
        return {k: v for k, v in self.to_dict().items() if k not in _RUNTIME_FIELDS}


@dataclass
class TuneResult:
    """Tuned model (selected epoch's parameters loaded) plus per-epoch history."""

    model: PromptedClassifier
    history: dict  # {"loss": [...], "agreement": [... or None], "seconds": [...]}
    selected_epoch: int  # 1-based
    seconds: float
    failed: list = field(default_factory=list)  # (index into filepaths, reason)
    train_indices: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    holdout_indices: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    start_epoch: int = 0  # epochs already done when this call began (resumed checkpoint)
    world_size: int = 1  # data-parallel processes that trained it (torchrun)


# --------------------------------------------------------------------------- helpers


def stratified_subset(indices, labels, n: int, seed: int) -> np.ndarray:
    """Deterministic, sorted subset of ``n`` of ``indices`` keeping each label's share.

    ``labels`` is indexed by the values in ``indices`` (None: one stratum). Quotas use largest
    remainders, so every label with enough weight is represented.
    """
    indices = np.asarray(indices, dtype=np.int64)
    if n >= len(indices):
        return np.sort(indices)
    lab = np.zeros(len(indices), np.int64) if labels is None else np.asarray(labels)[indices]
    uniq, counts = np.unique(lab, return_counts=True)
    exact = counts * (n / len(indices))
    quota = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - quota), kind="stable")
    quota[order[: n - int(quota.sum())]] += 1
    rng = np.random.RandomState(seed)
    chosen = [rng.permutation(indices[lab == u])[:q] for u, q in zip(uniq, quota)]
    return np.sort(np.concatenate(chosen))


def _seed_worker(worker_id: int) -> None:
    # torch seeds each worker from the loader generator; derive numpy/random from it too.
    s = torch.initial_seed() % 2**32
    np.random.seed(s)
    random.seed(s)


def _rng_state(gen: torch.Generator, device: torch.device) -> dict:
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "loader": gen.get_state(),
        # Plain ints/tensors so the checkpoint loads with torch.load(weights_only=True).
        "numpy": {"key": np_state[0], "state": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]),
                  "cached": float(np_state[4])},
        "python": {"version": py_state[0], "state": list(py_state[1]), "gauss": py_state[2]},
    }
    if device.type == "cuda":
        # This device's state only: querying all GPUs would open a context on each from every
        # DDP rank.
        state["cuda_device"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, gen: torch.Generator, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    gen.set_state(state["loader"])
    n = state["numpy"]
    np.random.set_state((n["key"], n["state"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if device.type == "cuda" and "cuda_device" in state:
        torch.cuda.set_rng_state(state["cuda_device"], device)
    elif device.type == "cuda" and "cuda" in state:  # checkpoints of earlier versions
        torch.cuda.set_rng_state_all(state["cuda"])


def _fingerprint(paths: Sequence[str], labels: Optional[np.ndarray]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(str(p).encode() + b"\0")
    if labels is not None:
        h.update(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
    return h.hexdigest()[:16]


def make_optimizer(model: PromptedClassifier, config: TuneConfig) -> torch.optim.AdamW:
    """The official optimiser: AdamW on the trainable parameters, constant lr (the official
    MultiStepLR has no milestones), weight decay on all but biases."""
    return torch.optim.AdamW(_param_groups(model, config.weight_decay), lr=config.lr, betas=config.betas)


def _param_groups(model: PromptedClassifier, weight_decay: float) -> list[dict]:
    params = dict(model.named_parameters())
    decay = [params[n] for n in model.trainable_names if not n.endswith("bias")]
    no_decay = [params[n] for n in model.trainable_names if n.endswith("bias")]
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def _iter_logits(model, filepaths, transform, batch_size, num_workers, device, amp,
                 teacher_fn=None, forward=None):
    """Yield ``(indices, logits float32 CPU, teacher labels or None, failures)`` in order;
    ``forward`` (e.g. a converted engine model) replaces ``model``'s own forward."""
    pin = dev.pin_memory(device)
    ds = ImageFileDataset(filepaths, transform)
    # Own generator: evaluation must not draw from the global RNG the training relies on.
    loader = make_loader(ds, batch_size, num_workers, pin_memory=pin,
                         generator=torch.Generator().manual_seed(0))
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


def _check_identity(stored: dict, identity: dict, where: str) -> None:
    if stored.get("key") != identity.get("key"):
        raise IndexMismatchError(
            f"{where} was made with CLIP {stored.get('key')!r}, but the loaded CLIP is "
            f"{identity.get('key')!r}. Load the same CLIP model, or tune again for this one."
        )


def _check_classes(stored: Sequence[str], classes: Sequence[str], where: str) -> None:
    if list(stored) != list(classes):
        diff = [f"{a!r}->{b!r}" for a, b in zip(stored, classes) if a != b][:3]
        raise IndexMismatchError(
            f"{where} was made for {len(stored)} classes {list(stored)[:5]}..., not these "
            f"{len(classes)} classes ({'; '.join(diff) or 'different length'}). Use the same "
            f"class list, or another directory / delete it to start over."
        )


# --------------------------------------------------------------------------- training


def tune(
    clip: LoadedModel,
    filepaths: Sequence[str],
    teacher_labels,
    class_weights,
    config: Optional[TuneConfig] = None,
    checkpoint_dir=None,
    progress: Optional[ProgressFn] = None,
    log: Optional[Callable[[str], None]] = print,
    *,
    classes: Optional[Sequence[str]] = None,
    teacher_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
) -> TuneResult:
    """Prompt-tune ``clip`` on ``filepaths`` against hard teacher labels (-1: skip the image).

    ``teacher_labels`` are precomputed (N int64); with ``teacher_fn(weak_batch) -> labels`` the
    teacher runs online on the weak view instead (official behaviour, for benchmarks; cached
    labels, if also given, still decide which images are used and the subset strata).
    ``checkpoint_dir``: a checkpoint is written there after every epoch and a matching one is
    resumed. ``classes`` names the rows of ``class_weights`` and is checked on resume.

    Under torchrun (a ``torch.distributed`` group of N > 1 processes) every rank calls this with
    the same arguments: ``config.batch_size`` is the global batch, split over the ranks;
    CUDA means ``cuda:LOCAL_RANK``; only rank 0 logs, reports progress and writes the
    checkpoint; every rank returns the same model.
    """
    config = config or TuneConfig()
    ctx = dt.context()
    progress = progress if progress and ctx.is_main else null_progress
    log = log if log and ctx.is_main else (lambda _msg: None)
    t_start = time.perf_counter()
    filepaths = [str(p) for p in filepaths]
    N = len(filepaths)
    W = np.asarray(class_weights, dtype=np.float32)
    if W.ndim != 2 or W.shape[0] < 1:
        raise InvalidInputError(f"class_weights must be a C×D matrix, got shape {W.shape}")
    C = W.shape[0]
    classes = [str(c) for c in classes] if classes is not None else [str(i) for i in range(C)]
    if len(classes) != C:
        raise InvalidInputError(f"{len(classes)} class names for {C} rows of class_weights")
    labels = None
    if teacher_labels is not None:
        labels = np.asarray(teacher_labels, dtype=np.int64).reshape(-1)
        if len(labels) != N:
            raise InvalidInputError(f"{len(labels)} teacher labels for {N} images")
        if (labels >= C).any() or (labels < -1).any():
            raise InvalidInputError(f"teacher labels must be -1 (skip) or in [0, {C})")
    elif teacher_fn is None:
        raise InvalidInputError("tune needs teacher_labels (precomputed) or a teacher_fn")

    device = ctx.device_for(dev.resolve_device(config.device))
    if ctx.enabled and device.type == "cuda":
        torch.cuda.set_device(device)  # object collectives use the current device with NCCL
    amp = dev.amp_dtype(device, config.precision)
    pin = dev.pin_memory(device)
    workers = _workers(config, device, ctx)

    # Which images: labelled ones, optionally a stratified subset, minus a held-aside part.
    pool = np.arange(N, dtype=np.int64) if labels is None else np.flatnonzero(labels >= 0)
    if len(pool) == 0:
        raise EmptyViewError("no image has a teacher label (all -1): nothing to tune on")
    if config.max_samples is not None and len(pool) > config.max_samples:
        pool = stratified_subset(pool, labels, config.max_samples, config.seed)
    holdout = np.empty(0, np.int64)
    if config.selection == "teacher_agreement":
        if len(pool) < 2:
            raise EmptyViewError("teacher_agreement selection needs at least 2 labelled images")
        n_hold = min(len(pool) - 1, max(1, int(round(config.holdout_fraction * len(pool)))))
        holdout = stratified_subset(pool, labels, n_hold, config.seed + 1)
    train = np.setdiff1d(pool, holdout)
    train_paths = [filepaths[i] for i in train]
    train_labels = None if labels is None else labels[train]

    identity = dict(clip.identity)
    fingerprint = {
        "config": config.resume_key(),
        "classes": classes,
        "model": identity.get("key"),
        "teacher": "online" if teacher_fn is not None else "cached",
        "head": HEAD_FORMULATION,
        "data": _fingerprint(train_paths, train_labels) + "-" +
                _fingerprint([filepaths[i] for i in holdout], None if labels is None else labels[holdout]),
    }
    _check_same_on_all_ranks(ctx, fingerprint, config)
    ckpt_path = Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir is not None else None
    # Rank 0 reads, every rank resumes from what it read (no shared filesystem needed).
    ckpt = dt.run_on_main(ctx, lambda: _read_checkpoint(ckpt_path))
    if ckpt is not None:
        where = f"checkpoint {ckpt_path}"
        _check_identity({"key": ckpt["fingerprint"]["model"]}, identity, where)
        _check_classes(ckpt["fingerprint"]["classes"], classes, where)
        for k in ("config", "teacher", "head", "data"):
            if ckpt["fingerprint"].get(k) != fingerprint[k]:
                raise IndexMismatchError(
                    f"{where} was made with different {k} ({ckpt['fingerprint'].get(k)} vs "
                    f"{fingerprint[k]}); use another checkpoint_dir or delete it to start over"
                )

    torch_devices = [device.index or 0] if device.type == "cuda" else []
    np_state, py_state = np.random.get_state(), random.getstate()
    # Seeding must not leak into the caller's RNG streams.
    with torch.random.fork_rng(devices=torch_devices):
        try:
            random.seed(config.seed)
            np.random.seed(config.seed)
            torch.manual_seed(config.seed)
            return _train(clip, W, classes, config, device, amp, pin, workers, train,
                          train_paths, train_labels, holdout, labels, filepaths, teacher_fn,
                          ckpt, ckpt_path, fingerprint, identity, progress, log, t_start, ctx)
        finally:
            np.random.set_state(np_state)
            random.setstate(py_state)


def _workers(config: TuneConfig, device: torch.device, ctx: dt.DistContext) -> int:
    if config.num_workers is not None:
        return int(config.num_workers)
    prof = dev.hardware_profile(device)
    if not ctx.enabled:
        return prof.num_workers
    # The ranks on one machine share its cores.
    return max(1, min(prof.num_workers, prof.cpu_count // ctx.local_world_size))


def _check_same_on_all_ranks(ctx: dt.DistContext, fingerprint: dict, config: TuneConfig) -> None:
    """Every rank must train on the same images, labels and settings, or the steps diverge."""
    mine = {"fingerprint": fingerprint, "epochs": config.epochs}
    seen = dt.all_gather_objects(ctx, mine)
    odd = [r for r, v in enumerate(seen) if v != seen[0]]
    if odd:
        raise InvalidInputError(
            f"tune was called with other images, teacher labels, classes, model or config on "
            f"rank(s) {odd} than on rank 0; every torchrun process must pass the same inputs"
        )


def _read_checkpoint(path: Optional[Path]) -> Optional[dict]:
    if path is None or not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)


def _train(clip, W, classes, config, device, amp, pin, workers, train, train_paths,
           train_labels, holdout, labels, filepaths, teacher_fn, ckpt, ckpt_path, fingerprint,
           identity, progress, log, t_start, ctx) -> TuneResult:
    model = PromptedClassifier.from_clip(clip, W, n_prompts=config.n_prompts, seed=config.seed)
    model.to(device)
    # As DDP at construction: every rank starts from rank 0's weights, frozen ones included.
    dt.broadcast_module(ctx, model)
    params = [dict(model.named_parameters())[n] for n in model.trainable_names]
    opt = make_optimizer(model, config)
    scaler = dev.grad_scaler(device, amp)
    gen = torch.Generator().manual_seed(config.seed)

    weak = weak_transform(model.image_size, model.mean, model.std)
    strong = strong_transform(model.image_size, model.mean, model.std)
    ds = _KeyedImageDataset(train_paths, _TwoViews(weak, strong) if teacher_fn else strong,
                            config.seed)
    # As dassl's loader in the official code: drop the ragged last batch when there is a full one.
    sampler = dt.EpochBatchSampler(len(ds), config.batch_size, config.seed,
                                   drop_last=len(ds) >= config.batch_size,
                                   rank=ctx.rank, world_size=ctx.world_size)
    loader = make_loader(ds, None, workers, pin_memory=pin, generator=gen,
                         batch_sampler=sampler, worker_init_fn=_seed_worker)

    history = {"loss": [], "agreement": [], "seconds": []}
    best_state, best_epoch, best_agree = None, 0, -1.0
    failed: dict[int, str] = {}
    start = 0
    if ckpt is not None:
        model.load_trainable_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        _set_rng_state(ckpt["rng"], gen, device)
        history = {k: list(v) for k, v in ckpt["history"].items()}
        best_state, best_epoch = ckpt.get("best_state"), int(ckpt.get("best_epoch", 0))
        best_agree = float(ckpt.get("best_agreement", -1.0))
        failed = {int(i): r for i, r in ckpt.get("failed", [])}
        start = int(ckpt["epoch"])
        log(f"resuming prompt tuning from {ckpt_path} after epoch {start}/{config.epochs}")

    hold_teacher = None if labels is None else labels[holdout]
    hold_paths = [filepaths[i] for i in holdout]
    steps_per_epoch = max(1, len(loader))
    total_steps = steps_per_epoch * config.epochs
    batch_desc = f"batch {config.batch_size}"
    if ctx.enabled:
        per_rank = config.batch_size / ctx.world_size
        batch_desc += f" over {ctx.world_size} processes ({per_rank:g} each)"
    log(f"prompt tuning: {len(train)} training images, {len(holdout)} held aside, "
        f"{len(classes)} classes, {config.epochs} epochs, {batch_desc}, "
        f"device {device}, precision {amp or 'fp32'}, workers {workers}")
    progress(start * steps_per_epoch, total_steps, "prompt tuning")

    for epoch in range(start, config.epochs):
        t0 = time.perf_counter()
        model.train()
        sampler.set_epoch(epoch)
        loss_sum, seen = 0.0, 0
        for step, (idx, batch, bad) in enumerate(loader):
            for i, reason in bad:
                failed.setdefault(int(train[i]), reason)
            x, y = _inputs_and_labels(batch, idx, train_labels, teacher_fn, device, pin, amp)
            loss, n = _step(model, params, opt, scaler, x, y, config, device, amp, ctx)
            loss_sum += loss
            seen += n
            progress(epoch * steps_per_epoch + step + 1, total_steps, "prompt tuning")
        loss_sum, seen = dt.sum_over_ranks(ctx, loss_sum, seen)
        seen = int(seen)
        epoch_loss = loss_sum / seen if seen else float("nan")

        agreement = None
        if config.selection == "teacher_agreement":
            agreement, counted = _agreement(model, hold_paths, hold_teacher, holdout, weak, config,
                                            workers, device, amp, teacher_fn, failed, ctx)
            # Ties go to the later epoch: equally consistent with the teacher, more trained.
            if counted and agreement >= best_agree:
                best_agree, best_epoch, best_state = agreement, epoch + 1, model.trainable_state_dict()
        failed = _merge_failed(dt.all_gather_objects(ctx, failed))

        dt_epoch = time.perf_counter() - t0
        history["loss"].append(epoch_loss)
        history["agreement"].append(agreement)
        history["seconds"].append(dt_epoch)
        msg = f"epoch {epoch + 1}/{config.epochs}: loss {epoch_loss:.4f}"
        if agreement is not None:
            msg += f", teacher agreement {agreement:.3f}"
        log(msg + f" ({dt_epoch:.1f}s, {seen} images)")
        if epoch == start and failed:
            log(f"{len(failed)} unreadable image(s) skipped")

        if ckpt_path is not None:
            state = {
                "epoch": epoch + 1,
                "model": model.trainable_state_dict(),
                "optimizer": opt.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
                "rng": _rng_state(gen, device),
                "history": history,
                "best_state": best_state,
                "best_epoch": best_epoch,
                "best_agreement": best_agree,
                "failed": sorted(failed.items()),
                "fingerprint": fingerprint,
                "config": config.to_dict(),
                "classes": list(classes),
                "identity": identity,
            }
            # Rank 0 writes; the others wait for it, so no rank runs ahead of a failed write.
            dt.run_on_main(ctx, functools.partial(_write_checkpoint, ckpt_path, state))

    done = len(history["loss"])
    if config.selection == "teacher_agreement" and best_state is not None:
        model.load_trainable_state_dict(best_state)
        selected = best_epoch
    else:
        selected = done
    model.eval()
    seconds = time.perf_counter() - t_start
    log(f"prompt tuning done in {seconds:.1f}s; kept epoch {selected}")
    return TuneResult(model=model, history=history, selected_epoch=selected, seconds=seconds,
                      failed=sorted(failed.items()), train_indices=train,
                      holdout_indices=holdout, start_epoch=start, world_size=ctx.world_size)


def _inputs_and_labels(batch, idx, train_labels, teacher_fn, device, pin, amp):
    """The strong view and its teacher labels, without -1s; empty when the batch is."""
    if batch is None:
        return None, torch.empty(0, dtype=torch.long, device=device)
    if teacher_fn is not None:
        weak_x, x = (b.to(device, non_blocking=pin) for b in batch)
        with torch.no_grad(), dev.autocast(device, amp):
            y = torch.as_tensor(teacher_fn(weak_x)).to(device).long()
    else:
        x = batch.to(device, non_blocking=pin)
        y = torch.from_numpy(train_labels[idx.numpy()]).to(device, non_blocking=pin)
    keep = y >= 0
    if not bool(keep.all()):
        x, y = x[keep], y[keep]
    return x, y


def _step(model, params, opt, scaler, x, y, config, device, amp, ctx) -> tuple[float, int]:
    """One optimiser step on the global batch; returns this rank's (loss sum, images)."""
    n = len(y)
    if not ctx.enabled and n == 0:
        return 0.0, 0
    opt.zero_grad(set_to_none=True)
    loss = None
    if n:
        with dev.autocast(device, amp):
            logits = model(x)
        # fp32 loss: label smoothing spreads mass over all classes, fine for bf16 too.
        loss = F.cross_entropy(logits.float(), y, label_smoothing=config.label_smoothing)
        # Under DDP each rank backpropagates its part of the global batch's loss *sum*;
        # _sync_grads divides by the global count, giving the gradient of the global mean
        # however the images are split.
        objective = loss * n if ctx.enabled else loss
        (scaler.scale(objective) if scaler is not None else objective).backward()
    if ctx.enabled and _sync_grads(ctx, params, n) == 0:
        return 0.0, 0
    if scaler is not None:
        scaler.step(opt)
        scaler.update()
    else:
        opt.step()
    return float(loss.detach()) * n if n else 0.0, n


def _sync_grads(ctx: dt.DistContext, params: list, n_local: int) -> int:
    """Sum gradients and image counts over ranks in one all_reduce; grads become global means.

    A manual all_reduce rather than a DistributedDataParallel wrapper: only the few prompt, LN
    and head tensors need it (no bucketing worth overlapping), and a rank whose slice of a
    ragged or all-unreadable batch is empty still takes part with zero gradients, where DDP
    would need a forward pass on every rank (or find_unused_parameters) to avoid a hang.
    """
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    count = torch.tensor([float(n_local)], device=params[0].device)
    flat = torch.cat([g.reshape(-1).float() for g in grads] + [count])
    dt.all_reduce_sum(ctx, flat)
    total = int(round(float(flat[-1])))
    if total:
        flat /= total
        offset = 0
        for p in params:
            k = p.numel()
            p.grad = flat[offset:offset + k].view_as(p).to(p.dtype)
            offset += k
    return total


def _agreement(model, hold_paths, hold_teacher, holdout, weak, config, workers, device, amp,
               teacher_fn, failed, ctx) -> tuple[float, int]:
    """Share of held-aside images whose argmax is the teacher's label, each rank on its part."""
    part = dt.shard_slice(len(hold_paths), ctx.rank, ctx.world_size)
    agree, counted = 0, 0
    for idx, logits, t, bad in _iter_logits(
        model, hold_paths[part], weak, config.batch_size, workers, device, amp,
        teacher_fn if hold_teacher is None else None,
    ):
        for i, reason in bad:
            failed.setdefault(int(holdout[part.start + i]), reason)
        if logits is None:
            continue
        ref = torch.from_numpy(hold_teacher[part][idx.numpy()]) if hold_teacher is not None else t
        ok = ref >= 0
        agree += int((logits.argmax(1)[ok] == ref[ok]).sum())
        counted += int(ok.sum())
    agree, counted = dt.sum_over_ranks(ctx, agree, counted)
    return (agree / counted if counted else float("nan")), int(counted)


def _merge_failed(per_rank: list[dict]) -> dict[int, str]:
    out: dict[int, str] = {}
    for failed in per_rank:
        for i, reason in failed.items():
            out.setdefault(int(i), reason)
    return out


def _write_checkpoint(path: Path, state: dict) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


# --------------------------------------------------------------------------- save / load / predict


def save_tuned(path_dir, model: PromptedClassifier, classes: Sequence[str], clip_identity: dict,
               config: Optional[TuneConfig] = None, extra_meta: Optional[dict] = None) -> Path:
    """Write ``tuned.pt`` (trained parameters only) and ``meta.json`` into ``path_dir``.

    ``meta["model_id"]`` hashes the parameters, classes and CLIP: re-saving an unchanged model
    rewrites nothing and keeps its identity, so predictions made with it stay up to date.
    """
    path_dir = Path(path_dir)
    classes = [str(c) for c in classes]
    if len(classes) != model.num_classes:
        raise InvalidInputError(f"{len(classes)} class names for a {model.num_classes}-class model")
    state = model.trainable_state_dict()
    model_id = tuned_model_id(state, classes, clip_identity)
    if (path_dir / TUNED_NAME).is_file() and (path_dir / META_NAME).is_file() \
            and read_json(path_dir / META_NAME).get("model_id") == model_id:
        return path_dir
    with atomic_path(path_dir / TUNED_NAME) as tmp:
        torch.save(state, tmp)
    meta = {
        "kind": "nola-prompt-tuned",
        "head": HEAD_FORMULATION,
        "model_id": model_id,
        "classes": classes,
        "clip_identity": dict(clip_identity),
        "n_prompts": model.n_prompts,
        "num_classes": model.num_classes,
        "embed_dim": model.embed_dim,
        "image_size": model.image_size,
        "config": config.to_dict() if config is not None else None,
        "extra": dict(extra_meta or {}),
    }
    # meta.json last: its presence marks a complete save.
    write_json_atomic(path_dir / META_NAME, json.loads(json.dumps(meta, default=str)))
    return path_dir


def tuned_model_id(state: dict, classes: Sequence[str], clip_identity: dict) -> str:
    """Content identity of a tuned model: its parameters, class list and CLIP weights."""
    import hashlib

    h = hashlib.sha256(json.dumps([list(classes), clip_identity.get("key")]).encode())
    for k in sorted(state):
        t = state[k].detach().cpu().contiguous()
        h.update(f"{k}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return h.hexdigest()[:16]


def load_tuned(path_dir, clip: LoadedModel, classes: Optional[Sequence[str]] = None
               ) -> PromptedClassifier:
    """Rebuild a saved PromptedClassifier on ``clip``; refuses another CLIP or class list."""
    path_dir = Path(path_dir)
    if not (path_dir / META_NAME).is_file() or not (path_dir / TUNED_NAME).is_file():
        raise InvalidInputError(f"no tuned model in {path_dir} (expected {TUNED_NAME} and {META_NAME})")
    meta = read_json(path_dir / META_NAME)
    where = f"tuned model in {path_dir}"
    if meta.get("head") != HEAD_FORMULATION:
        raise IndexMismatchError(
            f"The {where} was trained by fiftyone-nola 0.1 with a scaled head on normalised "
            f"features, not the official head this version uses: its logits would be wrong. "
            f"Re-run prompt tuning (tune) to replace it."
        )
    _check_identity(meta["clip_identity"], clip.identity, where)
    if classes is not None:
        _check_classes(meta["classes"], [str(c) for c in classes], where)
    W = np.zeros((meta["num_classes"], meta["embed_dim"]), np.float32)  # head is loaded below
    model = PromptedClassifier.from_clip(clip, W, n_prompts=meta["n_prompts"])
    state = torch.load(path_dir / TUNED_NAME, map_location="cpu", weights_only=True)
    model.load_trainable_state_dict(state)
    model.classes = list(meta["classes"])
    model.model_id = meta.get("model_id")  # names its converted engine model (core/engines.py)
    return model.eval()


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
    once per tuned model and cached, or PyTorch).
    """
    progress = progress or null_progress
    d = dev.resolve_device(device)
    workers = dev.hardware_profile(d).num_workers if num_workers is None else int(num_workers)
    filepaths = [str(p) for p in filepaths]
    out = np.full((len(filepaths), model.num_classes), np.nan, dtype=np.float32)
    failed: list[tuple[int, str]] = []
    weak = weak_transform(model.image_size, model.mean, model.std)
    choice = engines.resolve(engine, precision, d)
    if choice.engine != "torch":
        model.to("cpu").eval()
    identity = {"family": "nola-tuned", "key": f"tuned-{getattr(model, 'model_id', None) or 'unsaved'}",
                "n_prompts": model.n_prompts, "num_classes": model.num_classes}
    runner, choice = engines.load_engine_model(
        model, identity, (3, model.image_size, model.image_size), choice,
        calibration=calibration_images(filepaths, weak))
    amp = None if runner is not None else engines.torch_amp(choice)
    model.to(d)
    model.last_engine = choice  # what produced the probabilities (recorded by the predict stage)
    done = 0
    progress(0, len(filepaths), "predicting (tuned CLIP)")
    for idx, logits, _, bad in _iter_logits(model, filepaths, weak, batch_size, workers, d, amp,
                                            forward=runner):
        failed.extend((int(i), r) for i, r in bad)
        if logits is not None:
            out[idx.numpy()] = torch.softmax(logits, dim=-1).numpy()
        done += len(idx) + len(bad)
        progress(done, len(filepaths), "predicting (tuned CLIP)")
    return out, failed
