"""The embedding stage on FiftyOne collections: compute once into FAISS stores, read anywhere.

Incremental and resumable: only samples that are new or whose file changed are embedded;
progress is checkpointed every ``chunk_size`` samples, so a killed job loses at most one chunk;
samples deleted from the dataset are dropped from the store.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Optional

import numpy as np

from fiftyone_nola.core import engines, storage
from fiftyone_nola.core.data import file_fingerprint
from fiftyone_nola.core.device import resolve_device
from fiftyone_nola.core.embed import EmbedConfig, iter_embeddings, prepare_encoder
from fiftyone_nola.core.errors import IndexMismatchError, InvalidInputError
from fiftyone_nola.core.index import EmbeddingIndex
from fiftyone_nola.core.models import ClipSpec, DinoSpec, load_model, spec_key
from fiftyone_nola.core.progress import ProgressFn, null_progress
from fiftyone_nola.stages import fo_io
from fiftyone_nola.stages.stage import StageRun, check_coverage, load_embeddings, open_index

logger = logging.getLogger(__name__)

FAMILIES = ("clip", "dino")


def embeddings_run_key(family: str) -> str:
    """Run key under which the embedding stage of ``family`` is recorded."""
    return f"nola_embeddings_{family}"


def index_path(samples, spec) -> str:
    """Where the FAISS store of ``spec`` for this dataset lives."""
    return str(storage.index_dir(fo_io.dataset_id(samples), spec_key(spec)))


def _specs(family: str, clip: Optional[ClipSpec], dino: Optional[DinoSpec]) -> list:
    if family not in ("clip", "dino", "both"):
        raise InvalidInputError(f"family must be 'clip', 'dino' or 'both', not {family!r}")
    out = []
    if family in ("clip", "both"):
        out.append(clip or ClipSpec())
    if family in ("dino", "both"):
        out.append(dino or DinoSpec())
    return out


def compute_embeddings(
    samples,
    family: str = "both",
    clip: Optional[ClipSpec] = None,
    dino: Optional[DinoSpec] = None,
    config: Optional[EmbedConfig] = None,
    overwrite: bool = False,
    progress: ProgressFn = null_progress,
    classes: Optional[Sequence[str]] = None,
) -> dict:
    """Embed the images of ``samples`` with CLIP and/or DINO into on-disk FAISS stores.

    Returns a summary per family: counts embedded / reused / failed, seconds, images/s and
    the store's path. Unreadable images are skipped, counted and tagged ``nola:unreadable``.
    ``classes``, when known, add zero-shot agreement to the CLIP engine's ``auto`` check.
    """
    config = (config or EmbedConfig()).resolved()
    out = {}
    for spec in _specs(family, clip, dino):
        out[spec.family] = _embed_one(samples, spec, config, overwrite, progress, classes)
    return out


def _embed_one(samples, spec, cfg: EmbedConfig, overwrite: bool, progress, classes=None) -> dict:
    job = EmbedJob(samples, spec, cfg, resolve_device(cfg.device))
    how = (
        f"batch {cfg.batch_size}, {cfg.num_workers} workers, device {cfg.device}, "
        f"{'draft' if cfg.draft_decode else 'exact'} JPEG decode"
    )
    with job.writing(overwrite, how, progress):
        todo_paths = [job.paths[j] for j in job.todo]
        if todo_paths:
            encoder = job.prepare_engine(todo_paths, classes)
            for idx, vecs, bad in iter_embeddings(
                job.model, todo_paths, cfg, progress, encoder=encoder, timing=job.timing
            ):
                job.add([job.todo[j] for j in idx], vecs)
                job.fail((job.todo[j], reason) for j, reason in bad)
    return job.finish()


def _same_engine(stored: dict, choice: engines.EngineChoice) -> bool:
    return stored.get("engine") == choice.engine and stored.get("precision") in (None, choice.precision)


def stored_engine(meta: dict) -> Optional[dict]:
    """The engine record of a store's vectors; stores written before engines were recorded hold
    PyTorch vectors of an unrecorded precision. None for an empty store."""
    if not meta.get("count"):
        return None
    return meta.get("engine") or {"engine": "torch", "precision": None, "legacy": True}


class EmbedJob:
    """One family's embedding run on one collection, shared by the local and the Ray engines.

    The engine embeds the samples at positions ``todo`` (of ``ids``/``paths``) inside
    :meth:`writing`, handing results to :meth:`add` / :meth:`fail`; :meth:`finish` then tags,
    records the run and returns the summary.
    """

    def __init__(self, samples, spec, cfg: EmbedConfig, device):
        self.run = StageRun(
            samples, "embeddings", None, f"embeddings.{spec.family}", key=embeddings_run_key(spec.family)
        )
        self.ds = fo_io.root_dataset(samples)
        self.spec, self.cfg = spec, cfg
        self.ids, self.paths = self.run.ids, self.run.paths
        self.model = load_model(spec, device)
        self.t_load = self.run.seconds
        self.meta = {
            "model_key": self.model.key,
            "model": self.model.identity,
            "preprocessing": cfg.preprocessing_tag(self.model),
            "dataset_id": fo_io.dataset_id(self.ds),
            "dataset_name": self.ds.name,
        }
        self.path = storage.index_dir(self.meta["dataset_id"], self.model.key)
        self.index: Optional[EmbeddingIndex] = None
        self.fingerprints: list[str] = []
        self.todo: list[int] = []
        self.failures: list[tuple[str, str]] = []
        self.n_done = 0
        self.t_embed = 0.0
        self.timing: dict = {"wait_s": 0.0, "model_s": 0.0, "model_cpu_s": 0.0}
        self.engine: Optional[engines.EngineChoice] = None
        self._t_plan = 0.0
        self._saved = False
        self._buf: list[tuple[list[int], np.ndarray]] = []

    def _open(self, overwrite: bool = False) -> EmbeddingIndex:
        return EmbeddingIndex.open_or_create(
            self.path,
            self.model.embed_dim,
            self.meta,
            expect_keys=("model_key", "dim", "preprocessing"),
            index_type=self.cfg.index_type,
            overwrite=overwrite,
        )

    @contextlib.contextmanager
    def writing(self, overwrite: bool, how: str, progress: ProgressFn = null_progress) -> Iterator[EmbedJob]:
        """Hold the store's lock: drop deleted samples, plan ``todo``, and :meth:`save` at the end.

        Another job embedding into the store is waited for (said once, also to ``progress``; up to
        ``NOLA_JOB_WAIT_S``), and what it stored is then reused. An exception inside leaves the
        checkpointed chunks for the next run to resume from.
        """
        family = self.spec.family

        def waiting(msg: str) -> None:
            logger.info(f"[embed:{family}] another job is embedding into this store: {msg}")
            progress(0, 0, f"embedding {family.upper()}: {msg}")

        with self._open(overwrite).lock(timeout=None, what=f"embedding {family.upper()}", on_wait=waiting):
            # Re-read under the lock: another job may have saved since the first open.
            self.index = self._open()
            # A whole dataset's ids are at hand; only a view needs the dataset's full id list.
            live = set(self.ids)
            if len(live) != len(self.ds):
                live = set(self.ds.values("id"))
            stale = [i for i in self.index.ids if i not in live]
            if stale:
                self.index.remove(stale)
            self.fingerprints = [file_fingerprint(p) for p in self.paths]
            known = self.index.fingerprints
            if self.spec.family == "dino":
                # The DINO labeler reads raw vectors (unit row x norm): rows stored without a
                # norm (by an older version) are embedded again.
                for sid in self.index.missing_norms():
                    known.pop(sid, None)
            self.todo = [j for j, (i, f) in enumerate(zip(self.ids, self.fingerprints)) if known.get(i) != f]
            logger.info(
                f"[embed:{self.spec.family}] {self.model.key}: {len(self.ids)} samples, "
                f"{len(self.ids) - len(self.todo)} up to date, {len(self.todo)} to embed ({how})"
            )
            self._t_plan = time.perf_counter()
            yield self
            if not self._saved:
                self.save()

    def prepare_engine(self, paths: Sequence[str], classes: Optional[Sequence[str]] = None):
        """Prepare the forward that embeds ``paths`` and check it against the store (locked).

        With every setting on ``auto`` a non-empty store is extended with the engine and
        precision its vectors came from, so re-runs never mix engines by accident.
        """
        cfg = self.cfg
        stored = stored_engine(self.index.meta)
        follow = (
            stored is not None
            and not cfg.allow_mixed_engines
            and cfg.engine == "auto"
            and cfg.precision == "auto"
            and not os.environ.get("NOLA_ENGINE")
            and not os.environ.get("NOLA_PRECISION")
        )
        if follow:
            cfg = dataclasses.replace(cfg, engine=stored["engine"], precision=stored.get("precision") or "auto")
        encode, choice = prepare_encoder(self.model, cfg, paths, logger.info, classes)
        self.use_engine(choice)
        return encode, choice

    def use_engine(self, choice: engines.EngineChoice) -> None:
        """Record ``choice`` as the producer of the vectors about to be added; a store holding
        another engine's vectors is refused unless the config allows mixing (then it says so)."""
        self.engine = choice
        meta = self.index.meta
        stored = stored_engine(meta)
        used = list(
            meta.get("engines_used")
            or ([] if stored is None else [f"{stored['engine']}-{stored.get('precision') or 'unrecorded'}"])
        )
        mixed = bool(meta.get("mixed_engines"))
        if stored is not None and not _same_engine(stored, choice):
            if not self.cfg.allow_mixed_engines:
                have = f"{stored['engine']} {stored.get('precision') or '(precision unrecorded)'}"
                same = f"engine={stored['engine']!r}" + (
                    f", precision={stored['precision']!r}" if stored.get("precision") else ""
                )
                raise IndexMismatchError(
                    f"The {self.spec.family.upper()} store at {self.path} holds vectors made by {have}; "
                    f"this run would add {choice.engine} {choice.precision} vectors ({choice.reason}). "
                    f"Use {same} to extend it, overwrite=True (--force) to re-embed everything with the new engine, "
                    f"or allow_mixed_engines=True to mix them (recorded in the store's metadata)."
                )
            mixed = True
        if choice.tag not in used:
            used.append(choice.tag)
        record = choice.record()
        if stored is not None and "auto" not in record and stored.get("auto") and _same_engine(stored, choice):
            record["auto"] = stored["auto"]  # extending the store keeps how auto chose its engine
        self.index.update_meta({"engine": record, "engines_used": used, "mixed_engines": mixed})

    def save(self) -> None:
        """Write what is buffered, drop the failed samples and compact the store (locked)."""
        self._flush()
        self.index.remove([sid for sid, _ in self.failures])
        self.index.save()
        self.t_embed = time.perf_counter() - self._t_plan
        self._saved = True

    def add(self, rows: Sequence[int], vectors: np.ndarray) -> None:
        """Store the vectors of the samples at positions ``rows``; checkpoints every chunk."""
        if len(rows):
            self._buf.append((list(rows), np.asarray(vectors, dtype=np.float32)))
        if sum(len(r) for r, _ in self._buf) >= self.cfg.chunk_size:
            self._flush()

    def fail(self, failures: Iterable[tuple[int, str]]) -> None:
        """Record ``(position, reason)`` of samples whose image could not be embedded."""
        self.failures.extend((self.ids[j], reason) for j, reason in failures)

    def _flush(self) -> None:
        if not self._buf:
            return
        rows = [j for r, _ in self._buf for j in r]
        vecs = np.concatenate([v for _, v in self._buf])
        self.index.add([self.ids[j] for j in rows], vecs, [self.fingerprints[j] for j in rows])
        self.index.checkpoint()
        self.n_done += len(rows)
        self._buf.clear()

    def finish(self, run_config: Optional[dict] = None, extra: Optional[dict] = None) -> dict:
        """Fix the unreadable tags, record the run under the family's key; return the summary."""
        family, ids, failures = self.spec.family, self.ids, self.failures
        failed_ids = [sid for sid, _ in failures]
        embedded_ids = {ids[j] for j in self.todo} - set(failed_ids)
        if embedded_ids:
            tagged = set(self.ds.match_tags(fo_io.UNREADABLE_TAG).values("id"))
            fixed = list(embedded_ids & tagged)
            if fixed:
                self.ds.select(fixed).untag_samples(fo_io.UNREADABLE_TAG)
        fo_io.tag_samples(self.ds, failed_ids, fo_io.UNREADABLE_TAG)
        for sid, reason in failures[:5]:
            logger.info(f"[embed:{family}] skipped {sid}: {reason}")
        n_done, t_embed = self.n_done, self.t_embed
        config = {"spec": self.spec, "embed": self.cfg, "model": self.model.identity}
        summary = self.run.record(
            {**config, **(run_config or {})},
            family=family,
            model_key=self.model.key,
            random_init=bool(self.model.identity.get("random_init")),
            embedded=n_done,
            reused=len(ids) - len(self.todo),
            failed=len(failures),
            failures=failures[:100],
            index_path=str(self.path),
            index_size=len(self.index),
            model_load_seconds=self.t_load,
            images_per_s=(n_done / t_embed) if t_embed > 0 and n_done else 0.0,
            inference=None
            if self.engine is None
            else {
                "engine": self.engine.engine,
                "precision": self.engine.precision,
                "decode_wait_s": round(self.timing["wait_s"], 3),
                "model_s": round(self.timing["model_s"], 3),
                "model_cpu_s": round(self.timing["model_cpu_s"], 3),
            },
            **(extra or {}),
        )
        how = (
            ""
            if self.engine is None
            else (
                f" with {self.engine.engine} {self.engine.precision} (model {self.timing['model_s']:.1f}s, "
                f"waiting for decode {self.timing['wait_s']:.1f}s)"
            )
        )
        logger.info(
            f"[embed:{family}] embedded {n_done}, reused {summary['reused']}, failed "
            f"{len(failures)} in {summary['seconds']:.1f}s ({summary['images_per_s']:.1f} img/s){how}; "
            f"index: {self.path}"
        )
        return summary


__all__ = ["compute_embeddings", "open_index", "load_embeddings", "index_path", "check_coverage", "IndexMismatchError"]
