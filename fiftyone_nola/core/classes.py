"""Resolving the class list from what the user gave: a list, typed text, a file, or the dataset."""

from __future__ import annotations

import os
import re
import unicodedata
from collections.abc import Sequence
from typing import Optional, Union

from fiftyone_nola.core.errors import InvalidInputError

ClassesArg = Union[None, str, Sequence[str]]


def normalize_class_name(name: str) -> str:
    """Matching key: case-, underscore- and whitespace-insensitive ("Sea_Lion" == "sea lion")."""
    return re.sub(r"[\s_]+", " ", unicodedata.normalize("NFC", str(name))).strip().casefold()


def parse_class_text(text: str) -> list[str]:
    """Split ``"a, b, c"`` or one-per-line text (names may hold commas); ``#`` lines are comments."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    if len(lines) == 1:
        lines = lines[0].split(",")
    return [x.strip() for x in lines]


def parse_classes(text_or_list: Union[str, Sequence[str]], min_classes: int = 2) -> list[str]:
    """Class names from text (see :func:`parse_class_text`) or a list, checked.

    Names are stripped and otherwise kept verbatim (unicode, slashes, quotes). Empty names,
    non-strings, duplicates (compared by :func:`normalize_class_name`) and lists shorter than
    ``min_classes`` raise InvalidInputError. Labeling needs 2 classes; describing needs 1.
    """
    if isinstance(text_or_list, str):
        names = parse_class_text(text_or_list)
        where = "the comma-separated list" if "\n" not in text_or_list.strip() else "the text"
    elif isinstance(text_or_list, Sequence):
        names = list(text_or_list)
        bad = [n for n in names if not isinstance(n, str)]
        if bad:
            raise InvalidInputError(f"Class names must be strings, got {bad[:5]!r}")
        where = "the list"
    else:
        raise InvalidInputError(f"Class names must be a list of strings or text, not {type(text_or_list).__name__}")
    names = [n.strip() for n in names]
    if not names:
        raise InvalidInputError("No class names given: pass e.g. 'cat, dog' or one name per line")
    empty = [i + 1 for i, n in enumerate(names) if not n]
    if empty:
        raise InvalidInputError(
            f"Empty class name at position(s) {empty} of {where} ({len(names)} entries): class "
            f"names must not be empty; remove the extra commas or blank entries"
        )
    groups: dict[str, list[str]] = {}
    for n in names:
        groups.setdefault(normalize_class_name(n), []).append(n)
    dups = [g for g in groups.values() if len(g) > 1]
    if dups:
        listed = "; ".join(" = ".join(repr(x) for x in g) for g in dups)
        raise InvalidInputError(
            f"Duplicate class names (case, spaces and underscores are ignored when comparing): {listed}"
        )
    if len(names) < min_classes:
        raise InvalidInputError(
            f"Need at least {min_classes} classes to label with (got {names}); zero-shot labeling "
            f"picks one class per image among several."
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
        return parse_classes(default)
    if isinstance(classes, str):
        if os.path.isfile(os.path.expanduser(classes)):
            with open(os.path.expanduser(classes), encoding="utf-8") as f:
                return parse_classes(f.read())
        return parse_classes(classes)
    return parse_classes(list(classes))


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
