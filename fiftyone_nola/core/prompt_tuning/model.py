"""The student: CLIP's ViT with learnable prompt tokens (shallow VPT) and a linear head."""

from __future__ import annotations

import contextlib
import copy
import math

import numpy as np
import torch
from torch import nn

from fiftyone_nola.core.errors import IndexMismatchError, InvalidInputError
from fiftyone_nola.core.models import LoadedModel
from fiftyone_nola.core.prompt_tuning.config import TuneConfig
from fiftyone_nola.core.prompt_tuning.transforms import clip_mean_std

# The head of the official code: W on the raw visual output. 0.1 used logit_scale*W on unit rows.
HEAD_FORMULATION = "official-W-raw"


def _pair(v) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, (tuple, list)) else (int(v), int(v))


class PromptedVisual(nn.Module):
    """A CLIP ViT vision tower with ``n_prompts`` learnable tokens (shallow VPT, as NoLA).

    Prompts enter once, right after the patch tokens got their position embedding (and the
    tower's pre-norm), behind the prefix tokens (CLS, registers), and are dropped again before
    the tower's own pooling, head and normalisation; with ``n_prompts=0`` this is exactly the
    tower's forward. Two tower kinds (``core/models/towers.py``):

    * open_clip's ``VisionTransformer`` (OpenAI CLIP, MetaCLIP 2, ...): after ``ln_pre``, behind CLS.
    * open_clip's ``TimmModel`` over timm's ``VisionTransformer`` (SigLIP / SigLIP 2: no class
      token, attention pooling) or ``Eva`` (EVA-02, PE-Core: RoPE). Under RoPE the prompts count
      as prefix tokens while the blocks run, so they get no rotary position, like CLS.
    """

    def __init__(self, visual: nn.Module, n_prompts: int = 16, seed: int = 0):
        super().__init__()
        self.kind = tower_kind(visual)
        if n_prompts < 0:
            raise InvalidInputError(f"n_prompts must be >= 0, not {n_prompts}")
        self.tower = visual
        self.n_prompts = int(n_prompts)
        if self.kind == "open_clip":
            self.width, self.n_prefix = int(visual.class_embedding.shape[-1]), 1
        else:
            self.width, self.n_prefix = int(visual.trunk.embed_dim), int(visual.trunk.num_prefix_tokens)
        device = next(visual.parameters()).device
        self.prompts = nn.Parameter(torch.zeros(1, self.n_prompts, self.width, device=device))
        # Xavier-uniform bound exactly as NoLA's official code: 3*16*16 even for /32 models
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

    def _insert(self, x: torch.Tensor) -> torch.Tensor:
        p = self.prompts.to(x.dtype).expand(x.shape[0], -1, -1)
        return torch.cat([x[:, : self.n_prefix], p, x[:, self.n_prefix :]], dim=1)

    def _drop(self, x: torch.Tensor) -> torch.Tensor:
        # Pooling sees prefix + patches only, so 'avg', CLS and attention pooling keep their meaning.
        return torch.cat([x[:, : self.n_prefix], x[:, self.n_prefix + self.n_prompts :]], dim=1)

    def _forward_open_clip(self, x: torch.Tensor) -> torch.Tensor:
        x = self._embed(x)
        if self.n_prompts:
            x = self._insert(x)
        x = self._blocks(x)
        if self.n_prompts:
            x = self._drop(x)
        pooled = self._pool(x)
        proj = getattr(self.tower, "proj", None)
        return pooled @ proj if proj is not None else pooled

    def _forward_timm(self, x: torch.Tensor) -> torch.Tensor:
        """timm's ``forward_features`` -> ``forward_head``, then open_clip's adapter head."""
        t = self.tower.trunk
        x = t.patch_embed(x)
        rope = None
        if self.kind == "timm_eva":
            x, rope = t._pos_embed(x)
        else:
            x = t.patch_drop(t._pos_embed(x))
        x = t.norm_pre(x)
        if self.n_prompts:
            x = self._insert(x)
        mixed = rope is not None and getattr(t, "rope_mixed", False)  # one rotary table per block
        with _prompts_as_prefix(t, self.n_prompts if rope is not None else 0):
            for i, blk in enumerate(t.blocks):
                x = blk(x, rope=rope[i] if mixed else rope) if self.kind == "timm_eva" else blk(x)
        x = t.norm(x)
        if self.n_prompts:
            x = self._drop(x)
        return self.tower.head(t.forward_head(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._forward_open_clip(x) if self.kind == "open_clip" else self._forward_timm(x)


def tower_kind(visual: nn.Module) -> str:
    """``open_clip`` / ``timm_vit`` / ``timm_eva``: how prompts enter ``visual``; refuses others."""
    if all(hasattr(visual, a) for a in ("conv1", "class_embedding", "positional_embedding", "transformer")):
        return "open_clip"
    trunk = getattr(visual, "trunk", None)
    kind = {"VisionTransformer": "timm_vit", "Eva": "timm_eva"}.get(type(trunk).__name__)
    if kind and all(hasattr(trunk, a) for a in ("patch_embed", "_pos_embed", "norm_pre", "blocks", "forward_head")):
        return kind
    inner = f" over {type(trunk).__name__}" if trunk is not None else ""
    raise InvalidInputError(
        f"prompt tuning needs a ViT vision tower (open_clip's VisionTransformer, or timm's "
        f"VisionTransformer / Eva as in SigLIP, EVA-02, PE-Core); this CLIP's is "
        f"{type(visual).__name__}{inner}, which has no token sequence for the prompts. Use a ViT-* "
        f"CLIP architecture, or skip prompt tuning."
    )


@contextlib.contextmanager
def _prompts_as_prefix(trunk: nn.Module, n: int):
    """While the blocks run, RoPE attention treats ``n`` more leading tokens as prefix (no rotation)."""
    mods = [m for m in trunk.blocks.modules() if isinstance(getattr(m, "num_prefix_tokens", None), int)] if n else []
    for m in mods:
        m.num_prefix_tokens += n
    try:
        yield
    finally:
        for m in mods:
            m.num_prefix_tokens -= n


class PromptedClassifier(nn.Module):
    """PromptedVisual -> bias-free ``Linear(D, C)`` initialised to ``W``, as the official code.

    ``W`` (C×D) holds the unit-norm class description embeddings; the head acts on the visual
    output as it is (no L2 normalisation, no logit scale), exactly NoLA's ``cde_adapter``. So
    the initial argmax is zero-shot CLIP's, while the softmax is at the temperature set by the
    feature norm, and Adam's steps are of the size the official run took. Trainable: prompts,
    every LayerNorm of the vision tower, the head. The tower is copied so tuning never alters
    the caller's CLIP.
    """

    def __init__(self, visual: nn.Module, class_weights, n_prompts: int = 16, seed: int = 0, copy_visual: bool = True):
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
        # the tower's own eval resize (SigLIP / PE-Core squash, OpenAI CLIP crops): the weak view
        pre = getattr(tower, "preprocess_cfg", None) or {}
        self.resize_mode = str(pre.get("resize_mode") or "shortest")
        self.interpolation = str(pre.get("interpolation") or "bicubic")
        self.visual = PromptedVisual(tower, n_prompts=n_prompts, seed=seed)
        self.head = nn.Linear(W.shape[1], W.shape[0], bias=False)
        with torch.no_grad():
            self.head.weight.copy_(W)
        self.head.to(self.visual.prompts.device)
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


def make_optimizer(model: PromptedClassifier, config: TuneConfig) -> torch.optim.AdamW:
    """The official optimiser: AdamW on the trainable parameters, constant lr (the official
    MultiStepLR has no milestones), weight decay on all but biases."""
    return torch.optim.AdamW(_param_groups(model, config.weight_decay), lr=config.lr, betas=config.betas)


def _param_groups(model: PromptedClassifier, weight_decay: float) -> list[dict]:
    params = dict(model.named_parameters())
    decay = [params[n] for n in model.trainable_names if not n.endswith("bias")]
    no_decay = [params[n] for n in model.trainable_names if n.endswith("bias")]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
