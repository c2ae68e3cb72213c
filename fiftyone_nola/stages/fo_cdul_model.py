"""The CDUL multi-label head as a FiftyOne model (``Classifications`` per image, with embeddings).

::

    model = fiftyone_nola.load_multilabel_model(head_path, config)   # what train_multilabel saved
    dataset.apply_model(model, "cdul_applied", batch_size=32)

The head reads the features the embedding stage stores (each model's image embedding,
L2-normalised, side by side); here they are computed by the same code (decoding, engine,
precision) from the image files, then scored and turned into label sets by ``config``'s rule.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import fiftyone.utils.torch as fout
import numpy as np
import torch

from fiftyone_nola.core import cdul as ml
from fiftyone_nola.core.device import resolve_device
from fiftyone_nola.core.embed import iter_embeddings, prepare_encoder
from fiftyone_nola.core.errors import IndexMismatchError, InvalidInputError
from fiftyone_nola.core.index import normalize_rows
from fiftyone_nola.core.models import LoadedModel, load_model, spec_key
from fiftyone_nola.stages import fo_io
from fiftyone_nola.stages.cdul import MultiLabelConfig, feature_specs
from fiftyone_nola.stages.fo_models import NolaModel


class _Filepath(fout.GetItem):
    """Loader input: the image's path (the embedding code decodes it, as the stage does)."""

    @property
    def required_keys(self):
        return ["filepath"]

    def __call__(self, d):
        return d["filepath"]


class NolaMultiLabelModel(NolaModel):
    """A saved CDUL head over CLIP (and DINO) features; ``classes`` is its class list."""

    def __init__(self, head, info: dict, encoders: list[LoadedModel], config: MultiLabelConfig, device: torch.device):
        super().__init__(device)
        self.head = head
        self.classes = list(info["classes"])
        self.config = config
        self.encoders = encoders
        self._embed = dataclasses.replace(config.embed, device=str(device))
        self._prepared: dict[str, tuple] = {}

    @staticmethod
    def collate_fn(batch):
        return list(batch)

    def build_get_item(self, field_mapping=None):
        return _Filepath(field_mapping=field_mapping)

    def _features_of(self, loaded: LoadedModel, paths: list[str]) -> np.ndarray:
        if loaded.key not in self._prepared:  # an engine model is converted/loaded once
            self._prepared[loaded.key] = prepare_encoder(loaded, self._embed, paths)
        out = np.full((len(paths), loaded.embed_dim), np.nan, dtype=np.float32)
        for idx, vecs, _ in iter_embeddings(loaded, paths, self._embed, encoder=self._prepared[loaded.key]):
            out[idx] = normalize_rows(vecs) if len(vecs) else vecs
        return out

    def embed_all(self, args):
        if not all(isinstance(a, (str, Path)) for a in args):
            raise InvalidInputError("The CDUL model reads image files: apply it to a dataset, or pass paths")
        paths = [str(a) for a in args]
        return np.concatenate([self._features_of(m, paths) for m in self.encoders], axis=1)

    def predict_all(self, args):
        scores = ml.predict_multilabel(self.head, self.embed_all(args))
        c = self.config
        positives = ml.decide_labels(scores, c.rule, ratio=c.ratio, max_labels=c.max_labels)
        return [fo_io.multilabel_labels(self.classes, row, pos) for row, pos in zip(scores, positives)]


def load_multilabel_model(
    head_path, config: Optional[MultiLabelConfig] = None, classes: Optional[Sequence[str]] = None
) -> NolaMultiLabelModel:
    """The CDUL head saved at ``head_path`` (``classifier.pt``) as a FiftyOne model.

    ``config`` gives the models whose features it reads (``clip``, ``dino``), the embedding
    settings, the decision rule and the device, as for ``train_multilabel``. A head trained on
    other features (another CLIP/DINO) or, when ``classes`` is given, for another class list is
    refused (IndexMismatchError).
    """
    config = config or MultiLabelConfig()
    device = resolve_device(config.device)
    head, info = ml.load_classifier(head_path, classes, device=str(device))
    specs = feature_specs(config)
    keys = [spec_key(s) for s in specs]
    saved = (info.get("meta") or {}).get("model_keys")
    encoders = [load_model(s, device) for s in specs]
    dim = sum(m.embed_dim for m in encoders)
    if (saved is not None and saved != keys) or dim != info["in_features"]:
        raise IndexMismatchError(
            f"The head at {head_path} was trained on {saved or info['in_features']} features, not "
            f"{keys} ({dim} dims): pass the MultiLabelConfig (clip, dino) it was trained with."
        )
    return NolaMultiLabelModel(head, info, encoders, config, device)
