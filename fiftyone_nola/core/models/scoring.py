"""How a CLIP turns image-text cosines into class scores: each model family's own rule.

* ``softmax`` (CLIP, EVA-02, PE-Core, MetaCLIP 2: contrastive softmax training):
  ``softmax(logit_scale * cos)`` over the classes, with ``logit_scale`` 100 (the learnt
  temperature every released CLIP saturates at, and what the official NoLA code uses; the
  zero-shot config can change it). This is bit-identical to what the library always did.
* ``sigmoid`` (SigLIP, SigLIP 2: pairwise sigmoid training): each class on its own,
  ``p_c = sigmoid(logit_scale * cos_c + logit_bias)`` with the model's own learnt scale and bias
  (read from its weights).

**Confidence for sigmoid models (an explicit choice).** The stages label every image with one
class (single-label NoLA) or build a distribution over classes (CDUL's pseudo-labels, defined
with a softmax), so sigmoid scores are normalised across the classes: ``probs = p / sum(p)``,
computed stably as ``softmax(log sigmoid(logits))``. The argmax is SigLIP's own; the confidence
is the class's share of the sigmoid mass. When every logit is well below zero (the usual case
for a few dozen labels), ``sigmoid(z) ~ exp(z)`` and this equals ``softmax(logit_scale * cos)``
(the bias cancels); when several classes are likely at once it spreads the confidence between
them instead of reporting each as certain, which is what a single-label reviewer needs. A
tilt of ``1e-6 * logit`` inside the softmax keeps SigLIP's order between saturated classes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np
import torch

SCORING_KINDS = ("softmax", "sigmoid")
# Two saturated sigmoids (logits > ~17) are equal in fp32: this tilt (a relative change of
# 1e-6 * logit, below 1e-4) keeps SigLIP's own order between them, so an argmax of the stored
# probabilities is SigLIP's argmax.
SIGMOID_TIE_BREAK = 1e-6
CLIP_LOGIT_SCALE = 100.0


@dataclass(frozen=True)
class Scoring:
    """A CLIP's rule from cosines to class probabilities (module docstring)."""

    kind: str = "softmax"
    logit_scale: float = CLIP_LOGIT_SCALE
    logit_bias: float = 0.0

    def record(self) -> dict:
        """What a stage's metadata keeps about the scores it wrote."""
        return asdict(self)

    def sigmoid_probs(self, cos: np.ndarray) -> np.ndarray:
        """Normalised sigmoid scores ``N x C`` float32 of cosines ``N x C`` (NaN rows stay NaN)."""
        t = torch.from_numpy(np.ascontiguousarray(cos, dtype=np.float32))
        return self.sigmoid_probs_torch(t).numpy()

    def sigmoid_probs_torch(self, cos: torch.Tensor) -> torch.Tensor:
        """:meth:`sigmoid_probs` on a tensor (fp32)."""
        logits = cos.float() * float(self.logit_scale) + float(self.logit_bias)
        return torch.softmax(torch.nn.functional.logsigmoid(logits) + SIGMOID_TIE_BREAK * logits, dim=-1)


def model_scoring(model: torch.nn.Module, softmax_scale: float = CLIP_LOGIT_SCALE) -> Scoring:
    """The scoring of a built open_clip model: sigmoid when it has a learnt ``logit_bias``."""
    bias: Optional[torch.Tensor] = getattr(model, "logit_bias", None)
    if bias is None:
        return Scoring("softmax", float(softmax_scale))
    scale = float(model.logit_scale.detach().float().exp().reshape(-1)[0])
    return Scoring("sigmoid", scale, float(bias.detach().float().reshape(-1)[0]))


def config_scoring_kind(arch: str) -> Optional[str]:
    """``"sigmoid"`` / ``"softmax"`` from open_clip's config of ``arch`` (None for ``hf-hub:``)."""
    if arch.startswith("hf-hub:"):
        return None
    import open_clip

    from fiftyone_nola.core.models.towers import register_tiny_configs

    register_tiny_configs()
    cfg = open_clip.get_model_config(arch) or {}
    return "sigmoid" if cfg.get("init_logit_bias") is not None else "softmax"
