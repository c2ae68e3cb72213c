"""The training loop of prompt tuning: ``tune`` settles its inputs, a ``_Trainer`` runs the epochs."""

from __future__ import annotations

import functools
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from fiftyone_nola.core import device as dev
from fiftyone_nola.core import distributed as dt
from fiftyone_nola.core.config import resolve
from fiftyone_nola.core.data import make_loader
from fiftyone_nola.core.errors import EmptyViewError, InvalidInputError
from fiftyone_nola.core.models import LoadedModel
from fiftyone_nola.core.progress import ProgressFn, null_progress
from fiftyone_nola.core.prompt_tuning.checkpoint import (
    CHECKPOINT_NAME,
    _check_resumable,
    _fingerprint,
    _read_checkpoint,
    _rng_state,
    _set_rng_state,
    _write_checkpoint,
)
from fiftyone_nola.core.prompt_tuning.config import TuneConfig
from fiftyone_nola.core.prompt_tuning.model import HEAD_FORMULATION, PromptedClassifier, make_optimizer
from fiftyone_nola.core.prompt_tuning.predict import _eval_loader, _iter_logits
from fiftyone_nola.core.prompt_tuning.step import _Step
from fiftyone_nola.core.prompt_tuning.transforms import (
    _KeyedImageDataset,
    _seed_worker,
    _TwoViews,
    model_weak_transform,
    strong_transform,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class OnlineTeacher:
    """A teacher run on each batch's weak view, as the official code does (for benchmarks).

    ``fn(weak_batch) -> labels``; ``labels`` (cached, N int64), if given, still decide which
    images are used and the subset strata.
    """

    fn: Callable[[torch.Tensor], torch.Tensor]
    labels: Optional[np.ndarray] = None


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


def tune(
    clip: LoadedModel,
    filepaths: Sequence[str],
    teacher,
    class_weights,
    config: Optional[TuneConfig] = None,
    checkpoint_dir=None,
    progress: Optional[ProgressFn] = None,
    *,
    classes: Optional[Sequence[str]] = None,
) -> TuneResult:
    """Prompt-tune ``clip`` on ``filepaths`` against hard teacher labels (-1: skip the image).

    ``teacher``: precomputed labels (N int64), or an :class:`OnlineTeacher` that runs on the
    weak view of each batch instead (official behaviour, for benchmarks). ``config`` fields left
    None fit this machine (``config.resolve``). ``checkpoint_dir``: a checkpoint is written
    there after every epoch and a matching one is resumed. ``classes`` names the rows of
    ``class_weights`` and is checked on resume.

    Under torchrun (a ``torch.distributed`` group of N > 1 processes) every rank calls this with
    the same arguments: ``config.batch_size`` is the global batch, split over the ranks;
    CUDA means ``cuda:LOCAL_RANK``; only rank 0 logs, reports progress and writes the
    checkpoint; every rank returns the same model.
    """
    t_start = time.perf_counter()
    ctx = dt.context()
    online = teacher if isinstance(teacher, OnlineTeacher) else None
    filepaths = [str(p) for p in filepaths]
    W = np.asarray(class_weights, dtype=np.float32)
    classes, labels = _check_inputs(filepaths, online.labels if online else teacher, W, classes, online)

    config = config or TuneConfig()
    device = ctx.device_for(dev.resolve_device(config.device))
    if ctx.enabled and device.type == "cuda":
        torch.cuda.set_device(device)  # object collectives use the current device with NCCL
    workers = _workers(config, device, ctx)  # before resolve: DDP ranks share the machine's cores
    config = resolve(config, device)
    train, holdout = _split(labels, len(filepaths), config)
    run = _Run(
        clip=clip,
        W=W,
        classes=classes,
        config=config,
        filepaths=filepaths,
        labels=labels,
        teacher_fn=online.fn if online else None,
        train=train,
        holdout=holdout,
        device=device,
        workers=workers,
        ctx=ctx,
        t_start=t_start,
        progress=progress if progress and ctx.is_main else null_progress,
        ckpt_path=Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir is not None else None,
    )
    _check_same_on_all_ranks(ctx, run.fingerprint, config)
    # Rank 0 reads, every rank resumes from what it read (no shared filesystem needed).
    ckpt = dt.run_on_main(ctx, lambda: _read_checkpoint(run.ckpt_path))
    if ckpt is not None:
        _check_resumable(ckpt, run.fingerprint, run.identity, f"checkpoint {run.ckpt_path}")

    torch_devices = [device.index or 0] if device.type == "cuda" else []
    np_state, py_state = np.random.get_state(), random.getstate()
    # Seeding must not leak into the caller's RNG streams.
    with torch.random.fork_rng(devices=torch_devices):
        try:
            random.seed(config.seed)
            np.random.seed(config.seed)
            torch.manual_seed(config.seed)
            return _Trainer(run, ckpt).fit()
        finally:
            np.random.set_state(np_state)
            random.setstate(py_state)


def _check_inputs(
    filepaths: list, teacher_labels, W: np.ndarray, classes, online: Optional[OnlineTeacher]
) -> tuple[list, Optional[np.ndarray]]:
    """``(class names, teacher labels or None)``, checked against the images and weights."""
    if W.ndim != 2 or W.shape[0] < 1:
        raise InvalidInputError(f"class_weights must be a C×D matrix, got shape {W.shape}")
    C = W.shape[0]
    classes = [str(c) for c in classes] if classes is not None else [str(i) for i in range(C)]
    if len(classes) != C:
        raise InvalidInputError(f"{len(classes)} class names for {C} rows of class_weights")
    if teacher_labels is None:
        if online is None:
            raise InvalidInputError("tune needs teacher labels (precomputed) or an OnlineTeacher")
        return classes, None
    labels = np.asarray(teacher_labels, dtype=np.int64).reshape(-1)
    if len(labels) != len(filepaths):
        raise InvalidInputError(f"{len(labels)} teacher labels for {len(filepaths)} images")
    if (labels >= C).any() or (labels < -1).any():
        raise InvalidInputError(f"teacher labels must be -1 (skip) or in [0, {C})")
    return classes, labels


def _split(labels: Optional[np.ndarray], n: int, config: TuneConfig) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-aside) indices: labeled images, optionally a stratified subset."""
    pool = np.arange(n, dtype=np.int64) if labels is None else np.flatnonzero(labels >= 0)
    if len(pool) == 0:
        raise EmptyViewError("no image has a teacher label (all -1): nothing to tune on")
    cap = config.sample_cap
    if cap is not None and len(pool) > cap:
        pool = stratified_subset(pool, labels, cap, config.seed)
    holdout = np.empty(0, np.int64)
    if config.selection == "teacher_agreement":
        if len(pool) < 2:
            raise EmptyViewError("teacher_agreement selection needs at least 2 labelled images")
        n_hold = min(len(pool) - 1, max(1, int(round(config.holdout_fraction * len(pool)))))
        holdout = stratified_subset(pool, labels, n_hold, config.seed + 1)
    return np.setdiff1d(pool, holdout), holdout


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


@dataclass
class _Run:
    """What ``tune`` settled before training: checked inputs, the split, the machine."""

    clip: LoadedModel
    W: np.ndarray
    classes: list
    config: TuneConfig  # resolved
    filepaths: list
    labels: Optional[np.ndarray]
    teacher_fn: Optional[Callable]
    train: np.ndarray
    holdout: np.ndarray
    device: torch.device
    workers: int
    ctx: dt.DistContext
    t_start: float
    progress: ProgressFn
    ckpt_path: Optional[Path]

    def __post_init__(self):
        self.amp = dev.amp_dtype(self.device, self.config.precision)
        self.pin = dev.pin_memory(self.device)
        self.identity = dict(self.clip.identity)
        self.train_labels = None if self.labels is None else self.labels[self.train]
        self.hold_teacher = None if self.labels is None else self.labels[self.holdout]
        self.fingerprint = {
            "config": self.config.resume_key(),
            "classes": self.classes,
            "model": self.identity.get("key"),
            "teacher": "online" if self.teacher_fn is not None else "cached",
            "head": HEAD_FORMULATION,
            "data": _fingerprint(self.paths(self.train), self.train_labels)
            + "-"
            + _fingerprint(self.paths(self.holdout), self.hold_teacher),
        }

    def paths(self, indices) -> list:
        return [self.filepaths[i] for i in indices]

    def log(self, msg: str) -> None:
        if self.ctx.is_main:
            logger.info(msg)


class _Trainer:
    """The model, optimiser, loader and everything an epoch changes (what a checkpoint holds)."""

    def __init__(self, run: _Run, ckpt: Optional[dict]):
        self.run = run
        cfg, ctx = run.config, run.ctx
        self.model = PromptedClassifier.from_clip(run.clip, run.W, n_prompts=cfg.n_prompts, seed=cfg.seed)
        self.model.to(run.device)
        # As DDP at construction: every rank starts from rank 0's weights, frozen ones included.
        dt.broadcast_module(ctx, self.model)
        params = [dict(self.model.named_parameters())[n] for n in self.model.trainable_names]
        self.step = _Step(
            self.model,
            params,
            make_optimizer(self.model, cfg),
            cfg.label_smoothing,
            run.device,
            run.amp,
            dev.grad_scaler(run.device, run.amp),
            ctx,
        )
        self.gen = torch.Generator().manual_seed(cfg.seed)
        m = self.model
        self.weak = model_weak_transform(m)
        strong = strong_transform(m.image_size, m.mean, m.std)
        ds = _KeyedImageDataset(
            run.paths(run.train), _TwoViews(self.weak, strong) if run.teacher_fn else strong, cfg.seed
        )
        # As dassl's loader in the official code: drop the ragged last batch when there is a full one.
        self.sampler = dt.EpochBatchSampler(
            len(ds),
            cfg.batch_size,
            cfg.seed,
            drop_last=len(ds) >= cfg.batch_size,
            rank=ctx.rank,
            world_size=ctx.world_size,
        )
        self.loader = make_loader(
            ds,
            None,
            run.workers,
            pin_memory=run.pin,
            generator=self.gen,
            batch_sampler=self.sampler,
            worker_init_fn=_seed_worker,
        )
        self.history = {"loss": [], "agreement": [], "seconds": []}
        self.best_state, self.best_epoch, self.best_agree = None, 0, -1.0
        self.failed: dict[int, str] = {}
        self.start = 0
        if ckpt is not None:
            self._resume(ckpt)

    def _resume(self, ckpt: dict) -> None:
        step = self.step
        self.model.load_trainable_state_dict(ckpt["model"])
        step.opt.load_state_dict(ckpt["optimizer"])
        if step.scaler is not None and ckpt.get("scaler"):
            step.scaler.load_state_dict(ckpt["scaler"])
        _set_rng_state(ckpt["rng"], self.gen, self.run.device)
        self.history = {k: list(v) for k, v in ckpt["history"].items()}
        self.best_state, self.best_epoch = ckpt.get("best_state"), int(ckpt.get("best_epoch", 0))
        self.best_agree = float(ckpt.get("best_agreement", -1.0))
        self.failed = {int(i): r for i, r in ckpt.get("failed", [])}
        self.start = int(ckpt["epoch"])
        self.run.log(
            f"resuming prompt tuning from {self.run.ckpt_path} after epoch {self.start}/{self.run.config.epochs}"
        )

    def fit(self) -> TuneResult:
        run, cfg, ctx = self.run, self.run.config, self.run.ctx
        steps = max(1, len(self.loader))
        batch_desc = f"batch {cfg.batch_size}"
        if ctx.enabled:
            batch_desc += f" over {ctx.world_size} processes ({cfg.batch_size / ctx.world_size:g} each)"
        run.log(
            f"prompt tuning: {len(run.train)} training images, {len(run.holdout)} held aside, "
            f"{len(run.classes)} classes, {cfg.epochs} epochs, {batch_desc}, "
            f"device {run.device}, precision {run.amp or 'fp32'}, workers {run.workers}"
        )
        run.progress(self.start * steps, steps * cfg.epochs, "prompt tuning")
        for epoch in range(self.start, cfg.epochs):
            self._epoch(epoch, steps)
        done = len(self.history["loss"])
        selected = done
        if cfg.selection == "teacher_agreement" and self.best_state is not None:
            self.model.load_trainable_state_dict(self.best_state)
            selected = self.best_epoch
        self.model.eval()
        seconds = time.perf_counter() - run.t_start
        run.log(f"prompt tuning done in {seconds:.1f}s; kept epoch {selected}")
        return TuneResult(
            model=self.model,
            history=self.history,
            selected_epoch=selected,
            seconds=seconds,
            failed=sorted(self.failed.items()),
            train_indices=run.train,
            holdout_indices=run.holdout,
            start_epoch=self.start,
            world_size=ctx.world_size,
        )

    def _epoch(self, epoch: int, steps: int) -> None:
        run, cfg = self.run, self.run.config
        t0 = time.perf_counter()
        self.model.train()
        self.sampler.set_epoch(epoch)
        loss_sum, seen = 0.0, 0
        for step, (idx, batch, bad) in enumerate(self.loader):
            for i, reason in bad:
                self.failed.setdefault(int(run.train[i]), reason)
            loss, n = self.step(*self._inputs_and_labels(batch, idx))
            loss_sum += loss
            seen += n
            run.progress(epoch * steps + step + 1, steps * cfg.epochs, "prompt tuning")
        loss_sum, seen = dt.sum_over_ranks(run.ctx, loss_sum, seen)
        seen = int(seen)
        epoch_loss = loss_sum / seen if seen else float("nan")

        agreement = None
        if cfg.selection == "teacher_agreement":
            agreement, counted = self._agreement()
            # Ties go to the later epoch: equally consistent with the teacher, more trained.
            if counted and agreement >= self.best_agree:
                self.best_agree, self.best_epoch = agreement, epoch + 1
                self.best_state = self.model.trainable_state_dict()
        self.failed = _merge_failed(dt.all_gather_objects(run.ctx, self.failed))

        seconds = time.perf_counter() - t0
        self.history["loss"].append(epoch_loss)
        self.history["agreement"].append(agreement)
        self.history["seconds"].append(seconds)
        msg = f"epoch {epoch + 1}/{cfg.epochs}: loss {epoch_loss:.4f}"
        if agreement is not None:
            msg += f", teacher agreement {agreement:.3f}"
        run.log(msg + f" ({seconds:.1f}s, {seen} images)")
        if epoch == self.start and self.failed:
            run.log(f"{len(self.failed)} unreadable image(s) skipped")
        if run.ckpt_path is not None:
            # Rank 0 writes; the others wait for it, so no rank runs ahead of a failed write.
            dt.run_on_main(run.ctx, functools.partial(_write_checkpoint, run.ckpt_path, self._checkpoint(epoch + 1)))

    def _inputs_and_labels(self, batch, idx):
        """The strong view and its teacher labels, without -1s; empty when the batch is."""
        run = self.run
        if batch is None:
            return None, torch.empty(0, dtype=torch.long, device=run.device)
        if run.teacher_fn is not None:
            weak_x, x = (b.to(run.device, non_blocking=run.pin) for b in batch)
            with torch.no_grad(), dev.autocast(run.device, run.amp):
                y = torch.as_tensor(run.teacher_fn(weak_x)).to(run.device).long()
        else:
            x = batch.to(run.device, non_blocking=run.pin)
            y = torch.from_numpy(run.train_labels[idx.numpy()]).to(run.device, non_blocking=run.pin)
        keep = y >= 0
        if not bool(keep.all()):
            x, y = x[keep], y[keep]
        return x, y

    def _agreement(self) -> tuple[float, int]:
        """Share of held-aside images whose argmax is the teacher's label, each rank on its part."""
        run = self.run
        hold_paths = run.paths(run.holdout)
        part = dt.shard_slice(len(hold_paths), run.ctx.rank, run.ctx.world_size)
        agree, counted = 0, 0
        loader = _eval_loader(hold_paths[part], self.weak, run.config.batch_size, run.workers, run.device)
        online = run.teacher_fn if run.hold_teacher is None else None
        for idx, logits, t, bad in _iter_logits(self.model, loader, run.device, run.amp, online):
            for i, reason in bad:
                self.failed.setdefault(int(run.holdout[part.start + i]), reason)
            if logits is None:
                continue
            ref = t if run.hold_teacher is None else torch.from_numpy(run.hold_teacher[part][idx.numpy()])
            ok = ref >= 0
            agree += int((logits.argmax(1)[ok] == ref[ok]).sum())
            counted += int(ok.sum())
        agree, counted = dt.sum_over_ranks(run.ctx, agree, counted)
        return (agree / counted if counted else float("nan")), int(counted)

    def _checkpoint(self, epoch: int) -> dict:
        run, step = self.run, self.step
        return {
            "epoch": epoch,
            "model": self.model.trainable_state_dict(),
            "optimizer": step.opt.state_dict(),
            "scaler": step.scaler.state_dict() if step.scaler is not None else None,
            "rng": _rng_state(self.gen, run.device),
            "history": self.history,
            "best_state": self.best_state,
            "best_epoch": self.best_epoch,
            "best_agreement": self.best_agree,
            "failed": sorted(self.failed.items()),
            "fingerprint": run.fingerprint,
            "config": run.config.as_recorded().to_dict(),
            "classes": list(run.classes),
            "identity": run.identity,
        }


def _merge_failed(per_rank: list[dict]) -> dict[int, str]:
    out: dict[int, str] = {}
    for failed in per_rank:
        for i, reason in failed.items():
            out.setdefault(int(i), reason)
    return out
