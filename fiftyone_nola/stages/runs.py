"""Each stage is recorded as a FiftyOne run (config + results under a key), brain-style.

A reviewer can see how any field was made: ``dataset.get_run_info("nola_zeroshot")`` shows the
stage, its config, model identities and timing; ``dataset.load_run_results(key)`` the summary.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import time
from typing import Any, Optional

from fiftyone_nola.stages.fo_io import root_dataset

RUN_PREFIX = "nola"


def _jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = dataclasses.asdict(obj)
    return json.loads(json.dumps(obj, default=str))


def recorded_fields(value: Any, type_name: Optional[str] = None) -> Optional[dict]:
    """A nested setting as a run config holds it: a dict, or the repr ``Name(field=value, ...)``
    that runs store nested dataclasses as (``_jsonable``), read literally, never evaluated.
    With ``type_name``, a repr of another type gives None."""
    if isinstance(value, dict):
        return value
    if not isinstance(value, str):
        return None
    try:
        call = ast.parse(value, mode="eval").body
        if not isinstance(call, ast.Call) or call.args or not isinstance(call.func, ast.Name):
            return None
        if type_name is not None and call.func.id != type_name:
            return None
        return {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords}
    except (SyntaxError, ValueError, TypeError, RecursionError):  # e.g. an unhashable dict key
        return None


def run_key_for(field: str) -> str:
    """Run keys must be identifiers; fields are too, but be safe."""
    key = "".join(c if c.isalnum() or c == "_" else "_" for c in field)
    return key if key[:1].isalpha() else f"{RUN_PREFIX}_{key}"


def record_run(samples, key: str, method: str, config: Any, results: Optional[dict] = None) -> None:
    """Register (or replace) the run ``key`` on the dataset behind ``samples``."""
    ds = root_dataset(samples)
    cfg = ds.init_run(method=f"{RUN_PREFIX}.{method}", config=_jsonable(config))
    forget_run(ds, key)
    ds.register_run(key, cfg)
    if results is not None:
        # Stored under one attribute: result keys like "samples" would clash with RunResults'.
        res = ds.init_run_results(key, summary=_jsonable({**results, "recorded_at": time.time()}))
        ds.save_run_results(key, res)


def forget_run(samples, key: str) -> bool:
    """Delete the record of run ``key`` if there is one (its stage is being redone)."""
    ds = root_dataset(samples)
    if key not in ds.list_runs():
        return False
    ds.delete_run(key)
    return True


def get_run(samples, key: str) -> Optional[dict]:
    """The stored config and results of run ``key`` as plain dicts, or None if absent."""
    ds = root_dataset(samples)
    if key not in ds.list_runs():
        return None
    info = ds.get_run_info(key)
    out = {
        "key": key,
        "method": info.config.method,
        "timestamp": str(info.timestamp),
        "config": getattr(info.config, "config", None),
    }
    try:
        res = ds.load_run_results(key, cache=False)
        out["results"] = getattr(res, "summary", None)
    except Exception:
        out["results"] = None
    return out
