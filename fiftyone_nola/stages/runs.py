"""Each stage is recorded as a FiftyOne run (config + results under a key), brain-style.

A reviewer can see how any field was made: ``dataset.get_run_info("nola_zeroshot")`` shows the
stage, its config, model identities and timing; ``dataset.load_run_results(key)`` the summary.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Optional

from fiftyone_nola.core.config import TYPE_KEY, as_data
from fiftyone_nola.stages.fo_io import root_dataset
from fiftyone_nola.stages.legacy_records import parse_repr

RUN_PREFIX = "nola"
RECORD_ATTEMPTS = 3
logger = logging.getLogger(__name__)


def recorded_fields(value: Any, type_name: Optional[str] = None) -> Optional[dict]:
    """The fields of a nested setting as a run config holds it: data (a dict), or, in records
    written before 0.3, a repr string read literally. With ``type_name``, None if it records
    another type. The type tag itself is not among the fields."""
    if isinstance(value, str):
        value = parse_repr(value, type_name)
    if not isinstance(value, dict):
        return None
    kind = value.get(TYPE_KEY)
    if type_name is not None and kind is not None and kind != type_name:
        return None
    return {k: v for k, v in value.items() if k != TYPE_KEY}


def run_key_for(field: str) -> str:
    """Run keys must be identifiers; fields are too, but be safe."""
    key = "".join(c if c.isalnum() or c == "_" else "_" for c in field)
    return key if key[:1].isalpha() else f"{RUN_PREFIX}_{key}"


def record_run(samples, key: str, method: str, config: Any, results: Optional[dict] = None) -> None:
    """Register (or replace) the run ``key`` on the dataset behind ``samples``.

    FiftyOne's App server may reload the shared Dataset object between the register and the
    results' save ('has no run key'): the record is then written again, from the database."""
    ds = root_dataset(samples)
    for attempt in range(RECORD_ATTEMPTS):
        cfg = ds.init_run(method=f"{RUN_PREFIX}.{method}", config=as_data(config))
        forget_run(ds, key)
        try:
            ds.register_run(key, cfg)
            if results is not None:
                # Stored under one attribute: result keys like "samples" would clash with RunResults'.
                res = ds.init_run_results(key, summary=as_data({**results, "recorded_at": time.time()}))
                ds.save_run_results(key, res)
            return
        except ValueError as e:
            if "run key" not in str(e) or attempt + 1 == RECORD_ATTEMPTS:
                raise
            ds._doc.reload()


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
    try:
        info = ds.get_run_info(key)
    except ValueError:  # dropped by a concurrent reload of the shared Dataset object meanwhile
        return None
    out = {
        "key": key,
        "method": info.config.method,
        "timestamp": str(info.timestamp),
        "config": getattr(info.config, "config", None),
    }
    try:
        res = ds.load_run_results(key, cache=False)
        out["results"] = getattr(res, "summary", None)
    except (ValueError, KeyError, AttributeError, TypeError) as e:  # a record from another version
        logger.debug("run %s: results not readable (%r)", key, e)
        out["results"] = None
    return out
