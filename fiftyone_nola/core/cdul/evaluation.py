"""Evaluation of multi-label scores and label sets: AP, mAP, precision / recall / F1."""

from __future__ import annotations

import numpy as np

from fiftyone_nola.core.errors import InvalidInputError


def _check_eval(y_true, scores) -> tuple[np.ndarray, np.ndarray]:
    t = np.asarray(y_true).astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    if t.ndim != 2 or t.shape != s.shape:
        raise InvalidInputError(f"y_true {t.shape} and scores {s.shape} must both be N×C")
    return t, s


def average_precision_per_class(y_true: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """AP of each class (sklearn's step-wise definition): array C, NaN for no positives.

    Samples whose score for the class is NaN are left out of that class's AP.
    """
    from sklearn.metrics import average_precision_score  # ~1 s to import: only when evaluating

    t, s = _check_eval(y_true, scores)
    out = np.full(t.shape[1], np.nan)
    for c in range(t.shape[1]):
        ok = np.isfinite(s[:, c])
        if t[ok, c].any():
            out[c] = average_precision_score(t[ok, c], s[ok, c])
    return out


def mean_average_precision(y_true: np.ndarray, scores: np.ndarray, return_count: bool = False):
    """mAP over classes with at least one positive; NaN if none has.

    With ``return_count=True`` returns ``(mAP, number of classes evaluated)``.
    """
    ap = average_precision_per_class(y_true, scores)
    n = int(np.isfinite(ap).sum())
    m = float(np.nanmean(ap)) if n else float("nan")
    return (m, n) if return_count else m


def precision_recall_at(y_true: np.ndarray, y_pred: np.ndarray) -> dict:
    """Micro (overall) and macro (per-class) precision, recall and F1 of label sets.

    Macro averages run over classes with at least one positive; a class never predicted has
    precision 0. Macro F1 is the harmonic mean of macro P and R (the ML-GCN "CF1"
    convention). Keys: ``micro_precision``, ``micro_recall``, ``micro_f1``,
    ``macro_precision``, ``macro_recall``, ``macro_f1``, ``classes_evaluated``.
    """
    t, p = _check_eval(y_true, y_pred)
    p = p.astype(bool)
    tp = (t & p).sum(0).astype(np.float64)
    fp = (~t & p).sum(0).astype(np.float64)
    fn = (t & ~p).sum(0).astype(np.float64)

    def f1(pr: float, rc: float) -> float:
        return float(2 * pr * rc / (pr + rc)) if pr + rc > 0 else 0.0

    mp = tp.sum() / (tp.sum() + fp.sum()) if tp.sum() + fp.sum() > 0 else 0.0
    mr = tp.sum() / (tp.sum() + fn.sum()) if tp.sum() + fn.sum() > 0 else float("nan")
    has_pos = (tp + fn) > 0
    if has_pos.any():
        cp = float(np.mean(np.where(tp + fp > 0, tp / np.maximum(tp + fp, 1), 0.0)[has_pos]))
        cr = float(np.mean((tp / np.maximum(tp + fn, 1))[has_pos]))
    else:
        cp = cr = float("nan")
    return {
        "micro_precision": float(mp),
        "micro_recall": float(mr),
        "micro_f1": f1(mp, mr) if np.isfinite(mr) else float("nan"),
        "macro_precision": cp,
        "macro_recall": cr,
        "macro_f1": f1(cp, cr) if np.isfinite(cp) else float("nan"),
        "classes_evaluated": int(has_pos.sum()),
    }
