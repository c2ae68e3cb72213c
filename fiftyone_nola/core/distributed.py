"""Data-parallel prompt tuning under torchrun: process group, sharding and collectives.

``init_distributed()`` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT) and joins the process group: NCCL with one GPU per process (``cuda:LOCAL_RANK``)
on CUDA machines, gloo on CPUs. ``prompt_tuning.tune`` finds the group by itself
(``context()``) and trains data-parallel; with no group or a single process every helper here
is a no-op, so the same code runs with and without torchrun.

The dataset-level entry behind ``torchrun --nproc_per_node=N -m fiftyone_nola tune`` is
``distributed_tuning.tune_prompts_distributed``; this module knows nothing of datasets.
"""

from __future__ import annotations

import math
import os
import pickle
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.distributed as dist

from fiftyone_nola.core import device as dev
from fiftyone_nola.core.errors import InvalidInputError, NolaError

# Seed-derivation tags: the epoch permutation and the per-sample augmentations draw from
# unrelated streams even when their other keys coincide.
PERMUTATION_STREAM = 0
SAMPLE_STREAM = 1


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in the process group (rank 0 of 1 without one)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    backend: Optional[str] = None

    @property
    def enabled(self) -> bool:
        """True when there are other processes to synchronise with."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that logs, writes checkpoints and touches the dataset."""
        return self.rank == 0

    def device_for(self, device: torch.device) -> torch.device:
        """This process's device: under DDP, CUDA means ``cuda:LOCAL_RANK`` (one GPU each)."""
        if self.enabled and device.type == "cuda":
            return torch.device("cuda", self.local_rank)
        return device

    def comm_device(self) -> torch.device:
        """Where collective tensors must live: NCCL only reduces GPU tensors, gloo CPU ones."""
        if self.backend == "nccl":
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")


def context() -> DistContext:
    """The current process group as a DistContext (single-process when there is none)."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistContext()
    world, rank = dist.get_world_size(), dist.get_rank()
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    default_local = rank % gpus if gpus else rank
    return DistContext(
        rank=rank,
        world_size=world,
        local_rank=int(os.environ.get("LOCAL_RANK", default_local)),
        local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", world)),
        backend=str(dist.get_backend()),
    )


def init_distributed(
    device: Optional[str] = None, backend: Optional[str] = None, timeout_minutes: Optional[float] = None
) -> DistContext:
    """Join torchrun's process group once; single-process context without torchrun.

    ``device`` as everywhere (None: ``NOLA_DEVICE``, else CUDA if present): on CUDA the
    backend is NCCL and this process is pinned to ``cuda:LOCAL_RANK``; otherwise gloo.
    """
    if dist.is_available() and dist.is_initialized():
        return context()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    if not dist.is_available():
        raise NolaError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed")
    missing = [v for v in ("RANK", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise InvalidInputError(f"WORLD_SIZE={world} but {', '.join(missing)} unset: start with torchrun")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    d = dev.resolve_device(device)
    if d.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise InvalidInputError(
                f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPU(s) visible: "
                f"use --nproc_per_node <= the number of GPUs"
            )
        torch.cuda.set_device(local_rank)
    kw = {} if timeout_minutes is None else {"timeout": timedelta(minutes=timeout_minutes)}
    dist.init_process_group(backend or ("nccl" if d.type == "cuda" else "gloo"), init_method="env://", **kw)
    return context()


def shutdown() -> None:
    """Leave the process group (if this process is in one)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# --------------------------------------------------------------------------- collectives


def all_reduce_sum(ctx: DistContext, tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all ranks in place (moved to the backend's device for the trip)."""
    if not ctx.enabled:
        return tensor
    where = ctx.comm_device()
    buf = tensor if tensor.device == where else tensor.to(where)
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    if buf is not tensor:
        tensor.copy_(buf)
    return tensor


def sum_over_ranks(ctx: DistContext, *values: float) -> tuple[float, ...]:
    """The sums over all ranks of a few Python numbers (float64, so counts stay exact)."""
    if not ctx.enabled:
        return tuple(float(v) for v in values)
    t = torch.tensor(values, dtype=torch.float64, device=ctx.comm_device())
    return tuple(float(v) for v in all_reduce_sum(ctx, t).tolist())


def broadcast_object(ctx: DistContext, obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (pickled)."""
    if not ctx.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, device=ctx.comm_device())
    return box[0]


def all_gather_objects(ctx: DistContext, obj: Any) -> list:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not ctx.enabled:
        return [obj]
    out: list = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def run_on_main(ctx: DistContext, fn: Callable[[], Any]) -> Any:
    """``fn()`` on rank 0 only; its result, or its exception, reaches every rank.

    Doubles as a barrier. Sending the exception makes the other ranks fail with rank 0
    instead of waiting for it in their next collective until the timeout.
    """
    if not ctx.enabled:
        return fn()
    payload, error = None, None
    if ctx.is_main:
        try:
            payload = ("ok", fn())
        except Exception as e:  # re-raised below, on every rank
            error = e
            payload = ("error", _picklable(e))
    status, value = broadcast_object(ctx, payload)
    if status == "error":
        raise error if error is not None else value
    return value


def _picklable(e: Exception) -> Exception:
    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception as why:  # any exception may refuse pickling; its message still crosses ranks
        return NolaError(f"rank 0 failed: {type(e).__name__}: {e} (not picklable: {type(why).__name__})")


def barrier(ctx: DistContext) -> None:
    """Wait for every rank (no-op in a single process)."""
    if ctx.enabled:
        run_on_main(ctx, lambda: None)


@torch.no_grad()
def broadcast_module(ctx: DistContext, module: torch.nn.Module) -> None:
    """Copy rank 0's parameters and buffers into every rank's ``module`` (as DDP does at start)."""
    if not ctx.enabled:
        return
    where = ctx.comm_device()
    for t in module.state_dict(keep_vars=False).values():
        buf = t if t.device == where else t.to(where)
        dist.broadcast(buf, src=0)
        if buf is not t:
            t.copy_(buf)


# --------------------------------------------------------------------------- sharding


def derive_seed(*keys: int) -> int:
    """A well-mixed 64-bit seed that is a pure function of ``keys`` (same in every process)."""
    entropy = [int(k) & 0xFFFF_FFFF_FFFF_FFFF for k in keys]
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0])


def shard_slice(n: int, rank: int, world_size: int) -> slice:
    """Rank ``rank``'s contiguous part of ``n`` items; sizes differ by at most one."""
    q, r = divmod(int(n), int(world_size))
    start = rank * q + min(rank, r)
    return slice(start, start + q + (1 if rank < r else 0))


class EpochBatchSampler(torch.utils.data.Sampler):
    """Batches of a seeded per-epoch permutation; each rank yields its slice of every batch.

    All ranks draw the same permutation from ``(seed, epoch)``, so at every step the ranks'
    batches together are exactly the single-process batch of ``batch_size`` (the *global*
    batch; each rank gets ``batch_size // world_size``, one more on the first
    ``batch_size % world_size`` ranks). Items are ``(epoch, index)`` so a dataset can derive
    per-sample randomness from them in whichever process or worker loads the item.
    """

    def __init__(
        self, n: int, batch_size: int, seed: int = 0, drop_last: bool = False, rank: int = 0, world_size: int = 1
    ):
        if batch_size < 1 or not 0 <= rank < world_size:
            raise InvalidInputError(f"bad sampler settings: batch {batch_size}, rank {rank}/{world_size}")
        self.n, self.batch_size, self.seed = int(n), int(batch_size), int(seed)
        self.drop_last = bool(drop_last)
        self.rank, self.world_size = int(rank), int(world_size)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the permutation of ``epoch`` (call before iterating, as DistributedSampler)."""
        self.epoch = int(epoch)

    def global_batches(self) -> list[np.ndarray]:
        """This epoch's batches as a single process would see them."""
        g = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch, PERMUTATION_STREAM))
        perm = torch.randperm(self.n, generator=g).numpy()
        stop = self.n - self.n % self.batch_size if self.drop_last else self.n
        return [perm[i : i + self.batch_size] for i in range(0, stop, self.batch_size)]

    def __len__(self) -> int:
        if self.drop_last:
            return self.n // self.batch_size
        return math.ceil(self.n / self.batch_size)

    def __iter__(self):
        for b in self.global_batches():
            part = b[shard_slice(len(b), self.rank, self.world_size)]
            yield [(self.epoch, int(i)) for i in part]


# --------------------------------------------------------------------------- dataset entry
