"""NoLA stage 1: class description embeddings (CDE) and the CLIP zero-shot classifier.

Every text of a class is encoded with CLIP's text encoder and L2-normalised; the class vector
is their mean, L2-normalised again. Stacked, the class vectors are the zero-shot weights W
(C x D); an image scores ``softmax(logit_scale * cos(image, W))`` with logit_scale 100 (CLIP's
learned temperature, as the official code uses it). Sigmoid-trained models (SigLIP) score with
their own scale and bias instead, normalised over the classes (:class:`Scoring`,
``core/models/scoring.py``). Pure numpy apart from text encoding.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Optional, Union

import numpy as np
import torch

from fiftyone_nola.core import device as dev
from fiftyone_nola.core.arrays import l2_normalize, softmax
from fiftyone_nola.core.errors import InvalidInputError
from fiftyone_nola.core.models import LoadedModel, Scoring

logger = logging.getLogger(__name__)

ClassTexts = Union[Mapping[str, Sequence[str]], Sequence[Sequence[str]]]


def encode_texts(
    clip: LoadedModel, texts: Sequence[str], batch_size: int = 256, device: Optional[str] = None
) -> np.ndarray:
    """Encode ``texts`` with CLIP's text tower: ``T x D`` float32, each row L2-normalised."""
    if clip.tokenizer is None:
        raise InvalidInputError(f"model {clip.identity.get('name', '?')!r} has no tokenizer: pass a CLIP model")
    texts = list(texts)
    if any(not isinstance(t, str) for t in texts):
        raise InvalidInputError("encode_texts expects a list of strings")
    if batch_size < 1:
        raise InvalidInputError(f"batch_size must be >= 1, not {batch_size}")
    if not texts:
        return np.zeros((0, clip.embed_dim), dtype=np.float32)
    torch_device = dev.resolve_device(device)
    model = clip.model.to(torch_device)
    model.eval()
    tokens = clip.tokenizer(texts)
    trim = _can_trim(model)
    # Texts of similar length share a batch, so each batch can stop at its last EOT token.
    order = torch.argsort(tokens.argmax(dim=-1), stable=True) if trim else torch.arange(len(texts))
    out = np.empty((len(texts), clip.embed_dim), dtype=np.float32)
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            idx = order[start : start + batch_size]
            batch = tokens[idx].to(torch_device)
            feats = (_encode_text_trimmed(model, batch) if trim else model.encode_text(batch)).float()
            out[idx.numpy()] = torch.nn.functional.normalize(feats, dim=-1).cpu().numpy()
    return out


def _can_trim(model) -> bool:
    """open_clip CLIP text towers with a causal mask and EOT (argmax) pooling."""
    return (
        getattr(model, "text_pool_type", None) == "argmax"
        and getattr(model, "cls_emb", None) is None
        and getattr(model, "attn_mask", None) is not None
        and all(
            hasattr(model, a)
            for a in ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection")
        )
    )


def _encode_text_trimmed(model, tokens: torch.Tensor) -> torch.Tensor:
    """``model.encode_text(tokens)`` computed on the first L positions only, L = last EOT + 1.

    Under the causal mask no position attends to later ones, so the EOT features (what CLIP
    pools) do not depend on the padding after them: same result, ~77/L times less work. Most
    descriptions are 10-20 tokens of CLIP's 77.
    """
    n = int(tokens.argmax(dim=-1).max()) + 1
    t = tokens[:, :n]
    x = model.token_embedding(t).to(model.transformer.get_cast_dtype())
    x = x + model.positional_embedding[:n].to(x.dtype)
    x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask[:n, :n]))
    x = x[torch.arange(x.shape[0]), t.argmax(dim=-1)]
    proj = model.text_projection
    return proj(x) if isinstance(proj, torch.nn.Linear) else x @ proj


def cde_weights(per_class_text_embeddings: Sequence[np.ndarray]) -> np.ndarray:
    """Class description embeddings: per class the mean of its L2-normalised text rows, re-normalised.

    ``per_class_text_embeddings[c]`` is a ``T_c x D`` array; returns ``C x D`` float32.
    """
    if len(per_class_text_embeddings) == 0:
        raise InvalidInputError("cde_weights needs at least one class")
    rows = []
    dim = None
    for c, emb in enumerate(per_class_text_embeddings):
        emb = np.asarray(emb, dtype=np.float64)
        if emb.ndim != 2 or emb.shape[0] == 0:
            raise InvalidInputError(
                f"class {c} has no text embeddings (shape {emb.shape}): give every class at least "
                f"one description or template"
            )
        if dim is None:
            dim = emb.shape[1]
        elif emb.shape[1] != dim:
            raise InvalidInputError(f"class {c} has embeddings of width {emb.shape[1]}, expected {dim}")
        if not np.all(np.isfinite(emb)):
            raise InvalidInputError(f"class {c} has non-finite text embeddings")
        norms = np.linalg.norm(emb, axis=1, keepdims=True)
        if np.any(norms == 0):
            raise InvalidInputError(f"class {c} has an all-zero text embedding")
        mean = (emb / norms).mean(axis=0)
        n = np.linalg.norm(mean)
        if n == 0:
            raise InvalidInputError(f"class {c}: its text embeddings cancel out (mean is zero)")
        rows.append(mean / n)
    return np.stack(rows).astype(np.float32)


def class_weights(
    encode: Callable[[list[str]], np.ndarray], class_texts: ClassTexts, classes: Sequence[str]
) -> np.ndarray:
    """Zero-shot weights ``C x D`` for ``classes`` from their texts (dict by class name, or
    lists in class order), with ``encode(texts) -> T x D`` unit rows (plain or cached).

    Texts shared by several classes are encoded once; each class averages its texts as listed.
    """
    classes = list(classes)
    if not classes:
        raise InvalidInputError("no classes given")
    if isinstance(class_texts, Mapping):
        missing = [c for c in classes if c not in class_texts]
        if missing:
            raise InvalidInputError(f"no texts for classes {missing[:10]}: add descriptions or templates for them")
        per_class = [list(class_texts[c]) for c in classes]
    else:
        per_class = [list(t) for t in class_texts]
        if len(per_class) != len(classes):
            raise InvalidInputError(f"{len(per_class)} text lists for {len(classes)} classes")
    empty = [c for c, t in zip(classes, per_class) if not t]
    if empty:
        raise InvalidInputError(f"classes {empty[:10]} have no texts: every class needs at least one")
    unique = list(dict.fromkeys(t for texts in per_class for t in texts))
    emb = encode(unique)
    pos = {t: i for i, t in enumerate(unique)}
    return cde_weights([emb[[pos[t] for t in texts]] for texts in per_class])


def build_class_weights(
    clip: LoadedModel,
    class_texts: ClassTexts,
    classes: Sequence[str],
    batch_size: int = 256,
    device: Optional[str] = None,
) -> np.ndarray:
    """:func:`class_weights` encoding with ``clip`` directly (no cache)."""
    return class_weights(
        lambda texts: encode_texts(clip, texts, batch_size=batch_size, device=device), class_texts, classes
    )


def zeroshot_logits(image_embeddings: np.ndarray, weights: np.ndarray, logit_scale: float = 100.0) -> np.ndarray:
    """``logit_scale * cos(image, class)`` as ``N x C`` float32.

    Image rows are normalised here; ``weights`` are used as given (``cde_weights`` rows are unit).
    Rows that are NaN or all-zero give NaN logits and are logged.
    """
    x = np.asarray(image_embeddings)
    w = np.asarray(weights, dtype=np.float32)
    if x.ndim != 2 or w.ndim != 2:
        raise InvalidInputError(f"expected 2-d arrays, got shapes {x.shape} and {w.shape}")
    if x.shape[1] != w.shape[1]:
        raise InvalidInputError(
            f"image embeddings have width {x.shape[1]} but class weights {w.shape[1]}: were they made "
            f"by the same CLIP model?"
        )
    xn = l2_normalize(x, zero_rows="nan")
    bad = np.isnan(xn).any(axis=1)
    if bad.any():
        logger.warning(
            "%d of %d image embeddings are missing (NaN or zero): their scores are NaN", int(bad.sum()), len(x)
        )
    return (np.float32(logit_scale) * (xn @ w.T)).astype(np.float32, copy=False)


def class_probs(image_embeddings: np.ndarray, weights: np.ndarray, scoring: Optional[Scoring] = None) -> np.ndarray:
    """Class probabilities ``N x C`` float32 under the model's ``scoring`` (default: CLIP's softmax
    at 100). Softmax: ``softmax(zeroshot_logits(...))`` exactly; sigmoid: ``sigmoid(scale * cos +
    bias)`` normalised over the classes (the documented choice of ``core/models/scoring.py``)."""
    scoring = scoring or Scoring()
    if scoring.kind == "sigmoid":
        cos = zeroshot_logits(image_embeddings, weights, 1.0)
        return scoring.sigmoid_probs(cos)
    if scoring.kind != "softmax":
        raise InvalidInputError(f"unknown scoring {scoring.kind!r}: softmax or sigmoid")
    return softmax(zeroshot_logits(image_embeddings, weights, scoring.logit_scale)).astype(np.float32)


def zeroshot_predict(
    image_embeddings: np.ndarray, weights: np.ndarray, logit_scale: float = 100.0, scoring: Optional[Scoring] = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(labels int64 N, confidence N, probs N x C)``; rows without an embedding get label -1, NaN confidence.

    ``scoring`` (the model's, e.g. SigLIP's sigmoid) replaces the softmax at ``logit_scale``."""
    if scoring is not None:
        return _argmax_rows(class_probs(image_embeddings, weights, scoring))
    probs = softmax(zeroshot_logits(image_embeddings, weights, logit_scale))
    return _argmax_rows(probs)


def _argmax_rows(probs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    valid = ~np.isnan(probs).any(axis=1)
    labels = np.full(len(probs), -1, dtype=np.int64)
    conf = np.full(len(probs), np.nan, dtype=np.float32)
    if valid.any():
        labels[valid] = probs[valid].argmax(axis=1)
        conf[valid] = probs[valid].max(axis=1)
    return labels, conf, probs
