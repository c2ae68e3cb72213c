"""Text prompts for the Brain "faiss" backend: a FiftyOne prompt model over a fiftyone_nola CLIP,
and what a similarity run records so prompt queries work in later sessions too."""

from __future__ import annotations

import dataclasses
from typing import Any

import fiftyone.core.models as fom
import torch

from fiftyone_nola.core.errors import InvalidInputError
from fiftyone_nola.core.index import normalize_rows
from fiftyone_nola.core.models import ClipSpec, LoadedModel


class NolaClipPromptModel(fom.Model, fom.PromptMixin):
    """Text-prompt encoder over a loaded fiftyone_nola CLIP, for prompt queries."""

    def __init__(self, loaded):
        if getattr(loaded, "tokenizer", None) is None:
            raise InvalidInputError("Text queries need a CLIP model (it has a tokenizer); got a DINO model")
        self.loaded = loaded

    @property
    def media_type(self):
        return "image"

    @property
    def ragged_batches(self):
        return False

    @property
    def transforms(self):
        return None

    @property
    def preprocess(self):
        return False

    @preprocess.setter
    def preprocess(self, value):
        pass

    @property
    def can_embed_prompts(self):
        return True

    def predict(self, arg):
        raise NotImplementedError("NolaClipPromptModel only embeds text prompts")

    def embed_prompt(self, arg):
        return self.embed_prompts([arg])[0]

    def embed_prompts(self, args):
        model = self.loaded.model
        device = next(model.parameters()).device
        tokens = self.loaded.tokenizer(list(args)).to(device)
        with torch.inference_mode():
            out = model.encode_text(tokens).float().cpu().numpy()
        return normalize_rows(out)


def prompt_model_options(model: Any) -> tuple[dict, Any]:
    """``(config kwargs, in-session model)`` for compute_faiss_similarity's ``model``."""
    if model is None:
        return {}, None
    if isinstance(model, ClipSpec):
        return {"clip_spec": dataclasses.asdict(model)}, None
    if isinstance(model, LoadedModel):
        if model.family != "clip":
            return {}, None  # DINO has no text tower: no prompt queries
        opts = {"clip_spec": dataclasses.asdict(model.spec)} if isinstance(model.spec, ClipSpec) else {}
        return opts, NolaClipPromptModel(model)
    return {"model": model}, None
