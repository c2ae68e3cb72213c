"""Config utilities every layer shares: the "None = fit the hardware" resolver, "only what the user
gave", and settings as plain data (what run records and JSON files store)."""

from __future__ import annotations

import dataclasses
import enum
import math
from pathlib import PurePath
from typing import Any, Optional

import torch

from fiftyone_nola.core.device import hardware_profile, resolve_device

TYPE_KEY = "_type"  # a dataclass's name, kept beside its fields when stored as data


def as_data(obj: Any) -> Any:
    """``obj`` as JSON-able plain data, recursively: a dataclass becomes a dict of its fields plus
    its type's name under ``_type``; tuples become lists; paths, devices, dtypes and enums their
    text; numpy scalars and arrays their Python values. Never a repr string (which is what a
    nested spec used to become, parsed back later)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out = {TYPE_KEY: type(obj).__name__}
        out.update({f.name: as_data(getattr(obj, f.name)) for f in dataclasses.fields(obj)})
        return out
    if isinstance(obj, dict):
        return {str(k): as_data(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [as_data(v) for v in (sorted(obj, key=str) if isinstance(obj, (set, frozenset)) else obj)]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, enum.Enum):
        return as_data(obj.value)
    if isinstance(obj, (PurePath, torch.device, torch.dtype)):
        return str(obj)
    if hasattr(obj, "tolist"):  # numpy scalars and arrays
        return as_data(obj.tolist())
    return str(obj)


def without_types(data: Any) -> Any:
    """Plain data with the ``_type`` tags dropped (settings compared by value)."""
    if isinstance(data, dict):
        return {k: without_types(v) for k, v in data.items() if k != TYPE_KEY}
    if isinstance(data, list):
        return [without_types(v) for v in data]
    return data


def resolve(config, device=None):
    """``config`` with each field left ``None`` ("fit the hardware") filled for ``device``.

    The one rule for defaults: a config dataclass names its hardware-decided fields in
    ``hardware_defaults(profile) -> dict``; a field the user set (0 and False included) is kept.
    Nested config dataclasses are resolved too, so a pipeline config resolves in one call.
    """
    if not dataclasses.is_dataclass(config) or isinstance(config, type):
        return config
    device = device if isinstance(device, torch.device) else resolve_device(device)
    changes = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            resolved = resolve(value, device)
            if resolved is not value:
                changes[f.name] = resolved
    fill = getattr(config, "hardware_defaults", None)
    if fill is not None:
        changes.update({k: v for k, v in fill(hardware_profile(device)).items() if getattr(config, k) is None})
    return dataclasses.replace(config, **changes) if changes else config


def given(cls, **values):
    """``cls`` built from the values a user gave: None is "not given", so the field's default stays.

    The other half of the rule: the CLI, the operators (App form, Python, delegated) and Python
    pass what was set and nothing else, 0 and False included.
    """
    return cls(**{k: v for k, v in values.items() if v is not None})


def given_in(cls, part: str, **values):
    """The default of config ``cls``'s nested config ``part``, with the values a user gave."""
    default = {f.name: f for f in dataclasses.fields(cls)}[part].default_factory()
    return dataclasses.replace(default, **{k: v for k, v in values.items() if v is not None})


@dataclasses.dataclass(frozen=True)
class Bounds:
    """The values a config field accepts: ``lo`` <= v <= ``hi`` (None: open), whole numbers when
    ``integer``; ``what`` names it in messages. Declared once on the field, read by the CLI, the
    App's forms and the validation pass alike."""

    lo: Optional[float] = None
    hi: Optional[float] = None
    integer: bool = False
    what: str = ""

    @property
    def range(self) -> tuple:
        """``(lo, hi, integer)``, the shape the validation's ranges take."""
        return self.lo, self.hi, self.integer


def bounded(default: Any = None, lo=None, hi=None, integer: bool = False, what: str = "") -> Any:
    """A dataclass field with its accepted values declared (see :class:`Bounds`)."""
    return dataclasses.field(default=default, metadata={"bounds": Bounds(lo, hi, integer, what)})


def bounds(cls, name: str) -> Bounds:
    """The declared bounds of field ``name`` of config ``cls`` (open if none were declared)."""
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    return f.metadata.get("bounds", Bounds())
