"""Row-wise maths on numpy arrays shared by every stage: one normalisation, one softmax."""

from __future__ import annotations

import numpy as np


def l2_normalize(x: np.ndarray, zero_rows: str = "zero") -> np.ndarray:
    """float32 copy of ``x`` with unit-length rows (last axis).

    A zero row has no direction: ``zero_rows="zero"`` keeps it zero (stores, queries),
    ``"nan"`` makes it NaN so a missing embedding scores NaN, never a confident 0. NaN rows
    stay NaN either way.
    """
    if zero_rows not in ("zero", "nan"):
        raise ValueError(f"zero_rows must be 'zero' or 'nan', not {zero_rows!r}")
    out = np.array(x, dtype=np.float32, copy=True)
    norms = np.linalg.norm(out, axis=-1, keepdims=True)
    np.divide(out, norms, out=out, where=norms > 0)
    if zero_rows == "nan":
        out[(norms == 0)[..., 0]] = np.nan
    return out


def softmax(logits: np.ndarray) -> np.ndarray:
    """Softmax over the last axis as float32, stable for large logits; NaN rows stay NaN."""
    z = np.asarray(logits, dtype=np.float32)
    with np.errstate(invalid="ignore"):
        z = z - z.max(axis=-1, keepdims=True)
        e = np.exp(z)
        return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32, copy=False)
