"""The prompt-tuned CLIP as a FiftyOne model: ``dataset.apply_model`` / ``compute_embeddings``.

::

    model = fiftyone_nola.load_model(model_dir)          # what tune_prompts saved
    dataset.apply_model(model, "nola", batch_size=32)     # = fiftyone_nola.predict(dataset, model_dir)
    dataset.compute_embeddings(model, "nola_emb")         # the prompted image features the head reads

Images are decoded and preprocessed exactly as the library's ``predict`` does (same decoder,
same weak view), so labels and confidences agree with it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import fiftyone.core.models as fom
import fiftyone.utils.torch as fout
import numpy as np
import torch
from PIL import Image

from fiftyone_nola.core import prompt_tuning as pt
from fiftyone_nola.core.data import to_rgb, try_load_image
from fiftyone_nola.core.device import resolve_device
from fiftyone_nola.core.errors import InvalidInputError
from fiftyone_nola.core.models import ClipSpec, load_clip
from fiftyone_nola.core.progress import ProgressFn, null_progress
from fiftyone_nola.stages import fo_io


class _LoadImage(fout.GetItem):
    """Loader input: ``(weak-view tensor, True)`` or ``(zeros, False)`` for an unreadable image,
    so one bad file costs only its own label (as in ``predict``), not the whole batch."""

    def __init__(self, transform, image_size: int, field_mapping=None):
        self.transform = transform
        self.image_size = image_size
        super().__init__(field_mapping=field_mapping)

    @property
    def required_keys(self):
        return ["filepath"]

    def __call__(self, d):
        img, _ = try_load_image(d["filepath"])
        if img is None:
            return torch.zeros(3, self.image_size, self.image_size), False
        return self.transform(img), True


def _collate(batch):
    return torch.stack([x for x, _ in batch]), torch.tensor([ok for _, ok in batch])


class NolaModel(fom.Model, fom.EmbeddingsMixin, fom.TorchModelMixin, fom.SupportsGetItem):
    """What every fiftyone-nola FiftyOne model shares: images in through our own loader
    (:meth:`build_get_item`), embeddings out, on ``device``."""

    def __init__(self, device: torch.device, transform=None):
        self.device = device
        self._transform = transform
        self._preprocess = True

    @property
    def media_type(self):
        return "image"

    @property
    def ragged_batches(self):
        return False

    @property
    def transforms(self):
        return self._transform

    @property
    def preprocess(self):
        return self._preprocess

    @preprocess.setter
    def preprocess(self, value):
        self._preprocess = value

    @property
    def has_embeddings(self):
        return True

    @property
    def has_collate_fn(self):
        return True

    @property
    def _using_gpu(self):
        return self.device.type == "cuda"

    def predict(self, arg):
        return self.predict_all([arg])[0]

    def embed(self, arg):
        return self.embed_all([arg])[0]


class NolaTunedModel(NolaModel, fom.LogitsMixin):
    """A saved prompt-tuned CLIP classifier (``Classification`` per image, with embeddings).

    ``tuned`` is the :class:`~fiftyone_nola.core.prompt_tuning.PromptedClassifier`; ``classes``
    its class list, ``model_dir`` where it was loaded from.
    """

    def __init__(self, tuned, model_dir: Path, device: torch.device):
        NolaModel.__init__(self, device, pt.model_weak_transform(tuned))
        fom.LogitsMixin.__init__(self)
        self.tuned = tuned.to(device).eval()
        self.model_dir = Path(model_dir)
        self.classes = list(tuned.classes)

    @property
    def has_logits(self):
        return True  # log-probabilities, as fo_io.write_classifications(store_logits=True) stores them

    @staticmethod
    def collate_fn(batch):
        return _collate(batch)

    def build_get_item(self, field_mapping=None):
        return _LoadImage(self._transform, self.tuned.image_size, field_mapping=field_mapping)

    # --------------------------------------------------------------- inference

    def _batch(self, args) -> tuple[torch.Tensor, torch.Tensor]:
        """``(N×3×S×S tensor, readable mask)`` from a loader batch or a list of images."""
        if isinstance(args, tuple) and len(args) == 2 and isinstance(args[0], torch.Tensor):
            return args
        if isinstance(args, torch.Tensor):
            return args, torch.ones(len(args), dtype=torch.bool)
        imgs = [a if isinstance(a, torch.Tensor) else self._transform(_to_pil(a)) for a in args]
        return torch.stack(imgs), torch.ones(len(imgs), dtype=torch.bool)

    def _forward(self, args) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(features N×D, probs N×C, readable mask)``; unreadable rows are NaN."""
        x, ok = self._batch(args)
        with torch.inference_mode():
            feats = self.tuned.features(x.to(self.device))
            probs = torch.softmax(self.tuned.head(feats), dim=-1)
        feats, probs = feats.float().cpu().numpy(), probs.float().cpu().numpy()
        ok = ok.numpy().astype(bool)
        feats[~ok], probs[~ok] = np.nan, np.nan
        return feats, probs, ok

    def predict_all(self, args):
        _, probs, _ = self._forward(args)  # unreadable rows are NaN: no label
        return [fo_io.classification_label(self.classes, row, self.store_logits) for row in probs]

    def embed_all(self, args):
        feats, _, _ = self._forward(args)
        return feats

    def predict_files(
        self,
        filepaths: Sequence[str],
        batch_size: int,
        num_workers: int,
        precision: str = "auto",
        progress: ProgressFn = null_progress,
        engine: str = "auto",
    ):
        """The library's batch path (``predict`` stage): ``(N×C probs, failures)`` with the
        inference engine and precision of ``core/engines.py``."""
        return pt.predict_tuned(
            self.tuned, filepaths, batch_size, num_workers, self.device, precision, progress, engine=engine
        )


def _to_pil(img) -> Image.Image:
    if isinstance(img, Image.Image):
        return to_rgb(img)
    return to_rgb(Image.fromarray(np.asarray(img)))


def load_model(
    model_dir, clip: Optional[ClipSpec] = None, classes: Optional[Sequence[str]] = None, device: Optional[str] = None
) -> NolaTunedModel:
    """The tuned model saved in ``model_dir`` as a FiftyOne model.

    ``clip``: the CLIP it was tuned on (default ``ClipSpec()``); ``classes``, when given, must be
    its class list. Another CLIP or class list is refused (IndexMismatchError).
    """
    model_dir = Path(model_dir)
    if not (model_dir / pt.META_NAME).is_file():
        raise InvalidInputError(f"{model_dir} holds no tuned model (no meta.json). Run tune_prompts first.")
    dev = resolve_device(device)
    tuned = pt.load_tuned(model_dir, load_clip(clip or ClipSpec(), dev), classes)
    return NolaTunedModel(tuned, model_dir, dev)
