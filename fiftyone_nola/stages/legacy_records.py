"""Run records written before 0.3 held nested settings as repr strings (``"ClipSpec(arch=...)"``):
they are read here as the data they stand for, literally (parsed, never evaluated). Records
written since hold plain data (:func:`fiftyone_nola.core.config.as_data`)."""

from __future__ import annotations

import ast
from typing import Any, Optional

from fiftyone_nola.core.config import TYPE_KEY


def parse_repr(value: str, type_name: Optional[str] = None) -> Optional[dict]:
    """``Name(field=value, ...)`` as ``{"_type": Name, field: value, ...}``; None for any other
    string, a call with positional arguments, a value that is not a literal, or another type."""
    try:
        call = ast.parse(value, mode="eval").body
        if not isinstance(call, ast.Call) or call.args or not isinstance(call.func, ast.Name):
            return None
        if type_name is not None and call.func.id != type_name:
            return None
        return {TYPE_KEY: call.func.id, **{kw.arg: ast.literal_eval(kw.value) for kw in call.keywords}}
    except (SyntaxError, ValueError, TypeError, RecursionError):  # e.g. an unhashable dict key
        return None


def as_recorded_data(value: Any) -> Any:
    """A stored run config with every repr string of a setting replaced by its data."""
    if isinstance(value, str):
        parsed = parse_repr(value)
        return value if parsed is None else parsed
    if isinstance(value, dict):
        return {k: as_recorded_data(v) for k, v in value.items()}
    if isinstance(value, list):
        return [as_recorded_data(v) for v in value]
    return value
