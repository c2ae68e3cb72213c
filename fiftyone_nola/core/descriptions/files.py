"""Description files: the LaFTer/NoLA JSON ``{"class": ["...", ...]}`` and class-name lists."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Union

from fiftyone_nola.core.classes import normalize_class_name
from fiftyone_nola.core.descriptions.sets import DescriptionSet, fill_templates, parse_class_names, preview
from fiftyone_nola.core.errors import InvalidInputError
from fiftyone_nola.core.storage import atomic_path

logger = logging.getLogger(__name__)

MAX_DESCRIPTIONS_BYTES = 50 * 1024 * 1024
MAX_CLASS_FILE_BYTES = 10 * 1024 * 1024


def _read_text_file(path, max_bytes: int, what: str) -> str:
    p = Path(path).expanduser()
    if not p.is_file():
        raise InvalidInputError(f"The {what} {p} does not exist (or is not a file)")
    size = p.stat().st_size
    if size > max_bytes:
        raise InvalidInputError(
            f"The {what} {p} is {size / 2**20:.1f} MB, over the {max_bytes / 2**20:.0f} MB limit: is it the right file?"
        )
    data = p.read_bytes()
    if b"\x00" in data:
        raise InvalidInputError(f"The {what} {p} is binary, not text: is it the right file?")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise InvalidInputError(f"The {what} {p} is not UTF-8 text ({e})") from None


def load_class_names(path: Union[str, os.PathLike]) -> list[str]:
    """Class names from a text file: one per line, or comma separated; ``#`` lines are comments."""
    text = _read_text_file(path, MAX_CLASS_FILE_BYTES, "class names file")
    try:
        return parse_class_names(text)
    except InvalidInputError as e:
        raise InvalidInputError(f"{path}: {e}") from None


def _no_duplicate_keys(pairs):
    d = {}
    for k, v in pairs:
        if k in d:
            raise InvalidInputError(f"key {k!r} appears twice")
        d[k] = v
    return d


def _validate_mapping(data, origin: str) -> dict[str, list[str]]:
    if not isinstance(data, Mapping):
        raise InvalidInputError(
            f'{origin} must be a JSON object {{"class": ["description", ...]}}, not a {type(data).__name__}'
        )
    bad_keys = [k for k in data if not isinstance(k, str) or not k.strip()]
    if bad_keys:
        raise InvalidInputError(f"{origin}: class names must be non-empty strings, got {bad_keys[:5]!r}")
    bad = [k for k, v in data.items() if not isinstance(v, (list, tuple)) or not all(isinstance(t, str) for t in v)]
    if bad:
        raise InvalidInputError(
            f"{origin}: each value must be a list of description strings; not so for {preview(bad, 5)}"
        )
    return {k.strip(): [t.strip() for t in v if t.strip()] for k, v in data.items()}


def load_descriptions(path: Union[str, os.PathLike], classes=None) -> DescriptionSet:
    """A LaFTer/NoLA description file ``{"class": ["...", ...]}`` as a DescriptionSet.

    With ``classes``, file names are matched case/underscore/space-insensitively and the result
    is keyed by the given names; classes absent (or empty) in the file get templates and a
    warning; extra classes in the file are ignored. Texts are stripped, blanks dropped.
    """
    p = Path(path).expanduser()
    text = _read_text_file(p, MAX_DESCRIPTIONS_BYTES, "descriptions file")
    try:
        data = json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except json.JSONDecodeError as e:
        raise InvalidInputError(
            f"The descriptions file {p} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})"
        ) from None
    except InvalidInputError as e:
        raise InvalidInputError(f"The descriptions file {p} is ambiguous: {e}") from None
    except RecursionError:
        raise InvalidInputError(f"The descriptions file {p} is nested too deeply to be a description file") from None
    table = _validate_mapping(data, f"The descriptions file {p}")
    src = f"import:{p}"
    result = DescriptionSet()
    if classes is None:
        if not table:
            raise InvalidInputError(f"The descriptions file {p} holds no classes")
        names = list(table)
        found = dict(table)
    else:
        names = parse_class_names(classes)
        by_norm: dict[str, list[str]] = {}
        for k in table:
            by_norm.setdefault(normalize_class_name(k), []).append(k)
        found = {}
        for n in names:
            keys = by_norm.get(normalize_class_name(n), [])
            if len(keys) > 1:
                raise InvalidInputError(
                    f"The descriptions file {p} has several entries for class {n!r}: {keys}; keep one"
                )
            if keys:
                found[n] = table[keys[0]]
        extra = len(table) - len(found)
        if extra > 0:
            logger.info("%s: ignoring %d class(es) not in the class list", p, extra)
    missing = []
    for n in names:
        if found.get(n):
            result.descriptions[n] = found[n]
            result.source[n] = src
        else:
            missing.append(n)
            result.descriptions[n] = fill_templates(n)
            result.source[n] = "templates"
    if missing:
        msg = (
            f"The descriptions file {p} has no descriptions for {len(missing)} class(es): "
            f"{preview(missing)}; using CLIP template descriptions for them."
        )
        logger.warning(msg)
        result.warnings.append(msg)
    return result


def save_descriptions(description_set_or_dict, path: Union[str, os.PathLike]) -> Path:
    """Write ``{"class": [...]}`` in the LaFTer/NoLA format, atomically; class order is kept."""
    obj = description_set_or_dict
    data = obj.to_dict() if isinstance(obj, DescriptionSet) else obj
    table = _validate_mapping(data, "Descriptions to save")
    p = Path(path).expanduser()
    with atomic_path(p) as tmp:
        tmp.write_text(json.dumps(table, indent=4, ensure_ascii=False) + "\n", encoding="utf-8")
    return p
