"""One optimiser step of prompt tuning, single-process or data-parallel (torchrun)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from fiftyone_nola.core import device as dev
from fiftyone_nola.core import distributed as dt


@dataclass
class _Step:
    """One optimiser step on the global batch: ``step(x, y) -> this rank's (loss sum, images)``."""

    model: nn.Module
    params: list
    opt: torch.optim.Optimizer
    label_smoothing: float
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    amp: Optional[torch.dtype] = None
    scaler: Optional[torch.amp.GradScaler] = None
    ctx: dt.DistContext = field(default_factory=dt.DistContext)

    def __call__(self, x, y) -> tuple[float, int]:
        n, ctx, scaler = len(y), self.ctx, self.scaler
        if not ctx.enabled and n == 0:
            return 0.0, 0
        self.opt.zero_grad(set_to_none=True)
        loss = None
        if n:
            with dev.autocast(self.device, self.amp):
                logits = self.model(x)
            # fp32 loss: label smoothing spreads mass over all classes, fine for bf16 too.
            loss = F.cross_entropy(logits.float(), y, label_smoothing=self.label_smoothing)
            # Under DDP each rank backpropagates its part of the global batch's loss *sum*;
            # _sync_grads divides by the global count, giving the gradient of the global mean
            # however the images are split.
            objective = loss * n if ctx.enabled else loss
            (scaler.scale(objective) if scaler is not None else objective).backward()
        if ctx.enabled and _sync_grads(ctx, self.params, n) == 0:
            return 0.0, 0
        if scaler is not None:
            scaler.step(self.opt)
            scaler.update()
        else:
            self.opt.step()
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
            p.grad = flat[offset : offset + k].view_as(p).to(p.dtype)
            offset += k
    return total
