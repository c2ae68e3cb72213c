"""Resolving the class list from what the user gave: a list, typed text, a file, or the dataset."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Optional, Union

from .errors import InvalidInputError

ClassesArg = Union[None, str, Sequence[str]]


def parse_class_text(text: str) -> list[str]:
    """Split ``"a, b, c"`` or one-per-line text; ``#`` starts a comment line."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    if len(lines) == 1 and "," in lines[0]:
        lines = lines[0].split(",")
    return [x.strip() for x in lines if x.strip()]


def validate_classes(classes: Sequence[str]) -> list[str]:
    """Strip names; reject empty lists, empty names, duplicates and single-class lists."""
    names = [str(c).strip() for c in classes]
    if any(not n for n in names):
        raise InvalidInputError("Class names must not be empty")
    seen, dups = set(), []
    for n in names:
        key = n.casefold()
        if key in seen:
            dups.append(n)
        seen.add(key)
    if dups:
        raise InvalidInputError(f"Duplicate class names: {', '.join(sorted(set(dups)))}")
    if len(names) < 2:
        raise InvalidInputError(
            f"Need at least 2 classes to label with (got {names}); zero-shot labelling picks "
            f"one class per image among several."
        )
    return names


def resolve_classes(classes: ClassesArg = None, samples=None) -> list[str]:
    """The class list from ``classes`` (list, comma/newline text, or a text file path), else
    from the dataset's ``default_classes``."""
    if classes is None or (isinstance(classes, str) and not classes.strip()):
        ds = getattr(samples, "_root_dataset", samples) if samples is not None else None
        default = list(getattr(ds, "default_classes", None) or [])
        if not default:
            raise InvalidInputError(
                "No class names given and the dataset has no default_classes: pass classes=[...], "
                "--classes a,b,c, or --classes-file FILE."
            )
        return validate_classes(default)
    if isinstance(classes, str):
        if os.path.isfile(os.path.expanduser(classes)):
            with open(os.path.expanduser(classes), encoding="utf-8") as f:
                return validate_classes(parse_class_text(f.read()))
        return validate_classes(parse_class_text(classes))
    return validate_classes(list(classes))


def class_index(classes: Sequence[str]) -> dict[str, int]:
    """Map each class name to its index."""
    return {c: i for i, c in enumerate(classes)}


def labels_to_indices(labels: Sequence[Optional[str]], classes: Sequence[str]) -> tuple[list[int], list[str]]:
    """Map label strings to class indices (-1 if missing/unknown); also return unknown labels."""
    idx = class_index(classes)
    out, unknown = [], []
    for lab in labels:
        if lab is None:
            out.append(-1)
        elif lab in idx:
            out.append(idx[lab])
        else:
            out.append(-1)
            unknown.append(lab)
    return out, sorted(set(unknown))
