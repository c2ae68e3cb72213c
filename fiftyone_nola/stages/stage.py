"""The skeleton every stage shares, and the one schema of stage summaries.

A stage starts its clock and reads the samples' ids, loads its inputs (stored embeddings,
checked for coverage), takes its output field's writer lock (which drops the field's run
record first), writes the field and its arrays, then builds its summary and records the run
once. :class:`StageRun` does the common steps in that order; a stage supplies its computation.
Reading the stored embeddings (every stage's first input) lives here too.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np

from fiftyone_nola.core import storage
from fiftyone_nola.core.errors import MissingEmbeddingsError
from fiftyone_nola.core.index import EmbeddingIndex
from fiftyone_nola.core.models import spec_key
from fiftyone_nola.stages import fo_io, runs
from fiftyone_nola.stages.artifacts import stage_writer

logger = logging.getLogger(__name__)

# Every stage summary starts with these keys: the stage's name, the field it wrote (None for a
# stage that writes none), how many samples it ran on and its wall time from start to record.
SUMMARY_KEYS = ("stage", "field", "samples", "seconds")
# Stages that write labels also say how many samples got one.
LABEL_KEYS = SUMMARY_KEYS + ("labelled",)


def open_index(samples, spec) -> EmbeddingIndex:
    """The stored index of ``spec`` for this dataset, or a clear error saying how to build it."""
    path = storage.index_dir(fo_io.dataset_id(samples), spec_key(spec))
    if not (path / "meta.json").exists():
        raise MissingEmbeddingsError(
            f"No {spec.family.upper()} embeddings for model {spec_key(spec)} on this dataset. "
            f"Run compute_embeddings(dataset, family={spec.family!r}) (or the compute_embeddings "
            f"operator) first."
        )
    return EmbeddingIndex.open(path, expect={"model_key": spec_key(spec)})


def load_embeddings(
    samples, spec, ids: Optional[Sequence[str]] = None, raw: bool = False
) -> tuple[list[str], np.ndarray]:
    """``(ids, N×D float32)`` for ``ids`` (default: the collection's); NaN rows where missing.

    Rows are L2-normalised (what the FAISS store searches), or with ``raw=True`` the model's
    output as it was stored (e.g. DINO's unnormalised CLS features, the official labeler input).
    """
    if ids is None:
        ids, _ = fo_io.ids_and_paths(samples)
    index = open_index(samples, spec)
    vecs, found = index.get_raw(list(ids)) if raw else index.get(list(ids))
    out = np.full((len(ids), index.dim), np.nan, dtype=np.float32)
    out[np.asarray(found, dtype=bool)] = vecs
    return list(ids), out


def check_coverage(ids: Sequence[str], vectors: np.ndarray, family: str) -> np.ndarray:
    """Boolean mask of rows that have an embedding; report the others, fail if none."""
    ok = np.all(np.isfinite(vectors), axis=1)
    missing = int((~ok).sum())
    if missing == len(ids):
        raise MissingEmbeddingsError(
            f"None of the {len(ids)} samples has a {family.upper()} embedding. Run compute_embeddings first."
        )
    if missing:
        logger.info(
            f"[{family}] {missing} of {len(ids)} samples have no embedding (unreadable or not yet embedded): skipped"
        )
    return ok


class StageRun:
    """One run of a stage on ``samples``, recorded under ``key`` (default: its field's run key)."""

    def __init__(self, samples, stage: str, field: Optional[str], method: str, key: Optional[str] = None):
        self.t0 = time.perf_counter()
        self.samples, self.stage, self.field, self.method = samples, stage, field, method
        self.key = key or runs.run_key_for(field)
        self.ids, self.paths = fo_io.ids_and_paths(samples)
        self.summary: Optional[dict] = None

    @property
    def seconds(self) -> float:
        """Wall time since the stage started."""
        return time.perf_counter() - self.t0

    def embeddings(self, spec, raw: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """``(vectors, ok)``: the stored vectors of ``spec`` for the samples (NaN rows where
        missing) and the mask of samples that have one; the others are reported, none is an error."""
        _, vecs = load_embeddings(self.samples, spec, self.ids, raw=raw)
        return vecs, check_coverage(self.ids, vecs, spec.family)

    def features(self, specs: Sequence) -> np.ndarray:
        """The stored vectors of each of ``specs``, side by side (NaN rows where missing)."""
        return np.concatenate([load_embeddings(self.samples, s, self.ids)[1] for s in specs], axis=1)

    @contextlib.contextmanager
    def writing(self) -> Iterator[Path]:
        """The output field's writer lock (its run record dropped first); yields the stage's directory.

        Write the field and the arrays, then :meth:`record`, inside: a job killed half-way leaves
        the stage not done, so the next run redoes it.
        """
        with stage_writer(self.samples, self.field) as d:
            yield d

    def record(self, config: Any, **extras) -> dict:
        """The summary (the schema's keys, then ``extras``), recorded as the run; returned."""
        if self.summary is not None:
            raise RuntimeError(f"stage {self.stage!r} recorded twice")
        self.summary = {
            "stage": self.stage,
            "field": self.field,
            "samples": len(self.ids),
            "seconds": self.seconds,
            **extras,
        }
        runs.record_run(self.samples, self.key, self.method, config, self.summary)
        return self.summary
