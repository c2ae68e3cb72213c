"""The student: CLIP's ViT with learnable prompt tokens (shallow VPT) and a linear head."""

from __future__ import annotations

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
    """An open_clip ``VisionTransformer`` with ``n_prompts`` learnable tokens after the CLS token.

    Prompts enter after the positional embedding and ``ln_pre`` (shallow VPT, as NoLA) and are
    dropped again before pooling, so with ``n_prompts=0`` this is exactly ``visual.forward``.
    """

    def __init__(self, visual: nn.Module, n_prompts: int = 16, seed: int = 0):
        super().__init__()
        missing = [
            a for a in ("conv1", "class_embedding", "positional_embedding", "transformer") if not hasattr(visual, a)
        ]
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
        self.prompts = nn.Parameter(torch.zeros(1, self.n_prompts, self.width, device=visual.class_embedding.device))
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
            x = torch.cat([x[:, :1], x[:, 1 + n :]], dim=1)
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


def make_optimizer(model: PromptedClassifier, config: TuneConfig) -> torch.optim.AdamW:
    """The official optimiser: AdamW on the trainable parameters, constant lr (the official
    MultiStepLR has no milestones), weight decay on all but biases."""
    return torch.optim.AdamW(_param_groups(model, config.weight_decay), lr=config.lr, betas=config.betas)


def _param_groups(model: PromptedClassifier, weight_decay: float) -> list[dict]:
    params = dict(model.named_parameters())
    decay = [params[n] for n in model.trainable_names if not n.endswith("bias")]
    no_decay = [params[n] for n in model.trainable_names if n.endswith("bias")]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
