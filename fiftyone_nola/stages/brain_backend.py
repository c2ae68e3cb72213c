"""A FiftyOne Brain similarity backend ("faiss") over :class:`~fiftyone_nola.core.index.EmbeddingIndex`.

Make it available under ``backend="faiss"`` either in code::

    from fiftyone_nola.stages.brain_backend import register_faiss_backend
    register_faiss_backend()
    fob.compute_similarity(dataset, backend="faiss", embeddings=emb, brain_key="sim")

or through the environment, before FiftyOne is imported (names as read by
``fiftyone/brain/config.py``; ``*`` keeps the builtin backends)::

    FIFTYONE_BRAIN_SIMILARITY_BACKENDS="*,faiss"
    FIFTYONE_BRAIN_SIMILARITY_FAISS_CONFIG_CLS=fiftyone_nola.stages.brain_backend.FaissSimilarityConfig
    # optional defaults for any config parameter, e.g.
    FIFTYONE_BRAIN_SIMILARITY_FAISS_INDEX_TYPE=hnsw
    FIFTYONE_BRAIN_DEFAULT_SIMILARITY_BACKEND=faiss

or by passing the config class itself: ``backend=FaissSimilarityConfig``. Brain runs record
the config class by name, so reloading a run needs none of the above.

An index built by the embedding stage is reused without re-embedding by passing its
directory and ``embeddings=False`` (or use :func:`compute_faiss_similarity`). Such an index
is never deleted by the brain; one created under the dataset's storage dir is removed with
its brain run.
"""

from __future__ import annotations

import logging
import shutil
import uuid
from pathlib import Path
from typing import Optional

import eta.core.utils as etau
import faiss
import fiftyone.brain as fob
import fiftyone.brain.internal.core.utils as fbu
import numpy as np
from fiftyone.brain.similarity import DuplicatesMixin, Similarity, SimilarityConfig, SimilarityIndex

from fiftyone_nola.core.errors import IndexMismatchError, InvalidInputError
from fiftyone_nola.core.index import INDEX_TYPES, META_FILE, EmbeddingIndex, destroy, normalize_rows
from fiftyone_nola.core.models import ClipSpec, LoadedModel, load_clip, spec_key
from fiftyone_nola.core.storage import dataset_dir
from fiftyone_nola.stages.brain_neighbors import radius_neighbors, view_kneighbors
from fiftyone_nola.stages.brain_prompts import NolaClipPromptModel, prompt_model_options

logger = logging.getLogger(__name__)

BACKEND_NAME = "faiss"
CONFIG_CLS = "fiftyone_nola.stages.brain_backend.FaissSimilarityConfig"


def register_faiss_backend() -> None:
    """Expose this backend as ``backend="faiss"`` in this process (idempotent)."""
    entry = fob.brain_config.similarity_backends.setdefault(BACKEND_NAME, {})
    entry["config_cls"] = CONFIG_CLS


def default_index_path(samples, brain_key: Optional[str]) -> Path:
    """Where a brain run keeps an index it builds itself."""
    key = brain_key or f"_unsaved-{uuid.uuid4().hex[:8]}"
    return dataset_dir(samples._root_dataset._doc.id) / "brain" / key


class FaissSimilarityConfig(SimilarityConfig):
    """Configuration of the faiss similarity backend.

    Args:
        index_path (None): directory of the :class:`EmbeddingIndex`; default
            ``<dataset dir>/brain/<brain key>`` (then owned, i.e. deleted with the run)
        index_type (None): "flat", "ivf", "hnsw" or "ivfpq"; None keeps an existing index's type,
            "flat" for a new one
        metric ("cosine"): the only supported metric (vectors are L2-normalised)
        nprobe (None), ef_search (None): ivf/hnsw search-time accuracy knobs
        clip_spec (None): ``dataclasses.asdict`` of a :class:`fiftyone_nola.core.models.ClipSpec`
            whose text tower embeds prompts, so text queries work in later sessions too
        owns_index (None): whether the run deletes the index with itself; set automatically
        lock_timeout (10.0): seconds to wait for another writer's lock
        **kwargs: keyword arguments for :class:`fiftyone.brain.similarity.SimilarityConfig`
    """

    def __init__(
        self,
        index_path=None,
        index_type=None,
        metric="cosine",
        nprobe=None,
        ef_search=None,
        clip_spec=None,
        owns_index=None,
        lock_timeout=10.0,
        **kwargs,
    ):
        if metric != "cosine":
            raise InvalidInputError(f"The faiss backend supports metric='cosine' only, got {metric!r}")
        if kwargs.get("patches_field") is not None:
            raise InvalidInputError("The faiss backend indexes whole samples; patches_field is not supported")
        if index_type is not None and index_type not in INDEX_TYPES:
            raise InvalidInputError(f"index_type must be one of {INDEX_TYPES}, got {index_type!r}")
        if clip_spec is not None:
            kwargs["supports_prompts"] = True
        super().__init__(**kwargs)
        self.index_path = str(index_path) if index_path is not None else None
        self.index_type = index_type
        self.metric = metric
        self.nprobe = nprobe
        self.ef_search = ef_search
        self.clip_spec = dict(clip_spec) if clip_spec is not None else None
        self.owns_index = owns_index
        self.lock_timeout = lock_timeout

    @property
    def method(self):
        return BACKEND_NAME

    @property
    def max_k(self):
        return None

    @property
    def supports_least_similarity(self):
        return True

    @property
    def supported_aggregations(self):
        return ("mean",)

    def load_credentials(self, index_path=None):
        # Lets a run be reloaded after its index moved: load_brain_results(key, index_path=...)
        if index_path is not None:
            self.index_path = str(index_path)


class FaissSimilarity(Similarity):
    """Faiss similarity factory."""

    def ensure_requirements(self):
        _ = faiss.IndexFlatIP  # imported at module load; a broken install fails here clearly

    def ensure_usage_requirements(self):
        self.ensure_requirements()

    def initialize(self, samples, brain_key):
        return FaissSimilarityIndex(samples, self.config, brain_key, backend=self)

    def cleanup(self, samples, brain_key):
        _delete_owned(self.config)


def _delete_owned(config) -> None:
    if config.owns_index and config.index_path:
        path = Path(config.index_path)
        destroy(path)
        shutil.rmtree(path, ignore_errors=True)


def _check_missing(sample_ids, found, allow_missing: bool, warn_missing: bool) -> None:
    """Brain's contract for ids absent from the index: raise, warn, or ignore."""
    n_missing = int((~found).sum())
    if not n_missing:
        return
    if not allow_missing:
        first = sample_ids[int(np.argmin(found))]
        raise ValueError(f"Found {n_missing} sample IDs (eg '{first}') that are not present in the index")
    if warn_missing:
        logger.warning("Ignoring %d sample IDs that are not present in the index", n_missing)


class FaissSimilarityIndex(SimilarityIndex, DuplicatesMixin):
    """A brain similarity index whose data lives in an :class:`EmbeddingIndex` directory.

    Embeddings returned by :meth:`get_embeddings` are the stored, L2-normalised vectors.
    """

    def __init__(self, samples, config, brain_key, backend=None):
        self._dataset = samples._dataset
        self._index: Optional[EmbeddingIndex] = None
        self._sample_ids_cache = None
        SimilarityIndex.__init__(self, samples, config, brain_key, backend=backend)
        DuplicatesMixin.__init__(self)
        if config.index_path is None:
            config.index_path = str(default_index_path(samples, brain_key))
            config.owns_index = True
            if brain_key is not None:
                self.save_config()
        elif config.owns_index is None:
            config.owns_index = False
        self._open_if_exists()

    # ------------------------------------------------------------------ index access

    @property
    def index_path(self) -> Path:
        return Path(self.config.index_path)

    @property
    def index(self) -> Optional[EmbeddingIndex]:
        """The underlying :class:`EmbeddingIndex` (None until something was added)."""
        return self._index

    def _open_if_exists(self) -> None:
        if (self.index_path / META_FILE).exists():
            self._set_index(EmbeddingIndex.open(self.index_path))
        else:
            if self.key is not None and not self.config.owns_index:
                logger.warning("No embedding index at %s yet", self.index_path)
            self._set_index(None)

    def _set_index(self, ix: Optional[EmbeddingIndex]) -> None:
        if ix is not None and self.config.index_type is not None:
            ix.set_index_type(self.config.index_type)  # in memory unless we write
        self._index = ix
        self._sample_ids_cache = None
        self._curr_sample_ids = None  # force the current view to be re-resolved

    def _write(self, dim: int, fn) -> None:
        """Apply ``fn(index)`` to the freshest on-disk state under the store lock, then save."""
        path = self.index_path
        if self._index is None and not (path / META_FILE).exists():
            meta = {"source": "fiftyone-brain", "brain_key": self.key, "dataset_id": str(self._dataset._doc.id)}
            ix = EmbeddingIndex.open_or_create(
                path, dim, meta, expect_keys=("dim",), index_type=self.config.index_type or "flat"
            )
        else:
            ix = self._index or EmbeddingIndex.open(path)
        with ix.lock(timeout=self.config.lock_timeout):
            # Another process (the embedding stage) may have written since we loaded.
            fresh = EmbeddingIndex.open(path)
            if fresh.dim != dim:
                raise IndexMismatchError(
                    f"Embeddings have dim {dim} but the index at {path} holds dim {fresh.dim}; "
                    "use another index_path or rebuild the index."
                )
            self._set_index(fresh)
            fn(fresh)
            fresh.save()

    # ------------------------------------------------------------------ SimilarityIndex API

    @property
    def is_external(self):
        return True

    @property
    def supports_prompts(self):
        # compute_similarity() pins False when no in-session model was given; a stored
        # clip_spec still lets us build the text encoder on demand.
        if self.config.clip_spec is not None:
            return True
        return super().supports_prompts

    @property
    def sample_ids(self):
        if self._sample_ids_cache is None:
            ids = self._index.ids if self._index is not None else []
            self._sample_ids_cache = np.array(ids, dtype=str)
        return self._sample_ids_cache

    @property
    def label_ids(self):
        return None

    @property
    def total_index_size(self):
        return len(self._index) if self._index is not None else 0

    def add_to_index(
        self,
        embeddings,
        sample_ids,
        label_ids=None,
        overwrite=True,
        allow_existing=True,
        warn_existing=False,
        reload=True,
    ):
        if label_ids is not None:
            raise ValueError("The faiss backend does not support label IDs")
        embeddings = np.asarray(embeddings, dtype=np.float32)
        sample_ids = [str(s) for s in sample_ids]
        if embeddings.ndim != 2 or len(embeddings) != len(sample_ids):
            raise ValueError("embeddings must be num_ids x num_dims")
        if not sample_ids:
            return
        existing = self._index.has(sample_ids) if self._index is not None else np.zeros(len(sample_ids), bool)
        n_exist = int(existing.sum())
        if n_exist:
            if not allow_existing:
                first = sample_ids[int(np.argmax(existing))]
                raise ValueError(f"Found {n_exist} IDs (eg {first}) that already exist in the index")
            if warn_existing:
                verb = "Overwriting" if overwrite else "Skipping"
                logger.warning("%s %d IDs that already exist in the index", verb, n_exist)
            if not overwrite:
                keep = ~existing
                embeddings = embeddings[keep]
                sample_ids = [s for s, k in zip(sample_ids, keep) if k]
                if not sample_ids:
                    return

        self._write(embeddings.shape[1], lambda ix: ix.add(sample_ids, embeddings))

        if self.config.embeddings_field is not None:
            fbu.add_embeddings(self._dataset, embeddings, sample_ids, None, self.config.embeddings_field)
        if reload:
            SimilarityIndex.reload(self)

    def remove_from_index(self, sample_ids=None, label_ids=None, allow_missing=True, warn_missing=False, reload=True):
        if label_ids is not None:
            raise ValueError("The faiss backend does not support label IDs")
        if sample_ids is None or self._index is None:
            return
        if etau.is_str(sample_ids):
            sample_ids = [sample_ids]
        sample_ids = [str(s) for s in sample_ids]
        found = self._index.has(sample_ids)
        _check_missing(sample_ids, found, allow_missing, warn_missing)
        rm = [s for s, f in zip(sample_ids, found) if f]
        if not rm:
            return
        self._write(self._index.dim, lambda ix: ix.remove(rm))
        if self.config.embeddings_field is not None:
            fbu.remove_embeddings(self._dataset, self.config.embeddings_field, sample_ids=rm)
        if reload:
            SimilarityIndex.reload(self)

    def get_embeddings(self, sample_ids=None, label_ids=None, allow_missing=True, warn_missing=False):
        if label_ids is not None:
            raise ValueError("This index does not support label IDs")
        ix = self._index
        if ix is None:
            return np.empty((0, 0), np.float32), np.array([], dtype=str), None
        if sample_ids is None:
            return np.array(ix.vectors), np.array(ix.ids, dtype=str), None
        if etau.is_str(sample_ids):
            sample_ids = [sample_ids]
        sample_ids = [str(s) for s in sample_ids]
        vecs, found = ix.get(sample_ids)
        _check_missing(sample_ids, found, allow_missing, warn_missing)
        return vecs, np.array(sample_ids, dtype=str)[found], None

    def reload(self):
        # Pick up whatever the embedding stage (or another session) saved meanwhile.
        self._open_if_exists()
        super().reload()

    def cleanup(self):
        _delete_owned(self.config)
        self._set_index(None)

    def get_model(self):
        if self._model is None and self.config.clip_spec is not None:
            self._model = NolaClipPromptModel(load_clip(ClipSpec(**self.config.clip_spec)))
        return super().get_model()

    @classmethod
    def _from_dict(cls, d, samples, config, brain_key):
        return cls(samples, config, brain_key)

    # ------------------------------------------------------------------ queries

    def _restrict(self):
        return list(self.current_sample_ids) if self.has_view else None

    def _parse_neighbors_query(self, query):
        """Query vectors (rows) and whether a single query was given."""
        if etau.is_str(query):
            ids, single = [query], True
        else:
            arr = np.asarray(query)
            if np.issubdtype(arr.dtype, np.number):
                single = arr.ndim == 1
                return np.atleast_2d(arr).astype(np.float32), single
            ids, single = [str(q) for q in query], False
        vecs, found = self._index.get(ids) if self._index is not None else (None, np.zeros(len(ids), bool))
        if not found.all():
            bad = [i for i, f in zip(ids, found) if not f]
            raise ValueError(f"Query IDs {bad} do not exist in this index")
        return vecs, single

    def _kneighbors(self, query=None, k=None, reverse=False, aggregation=None, return_dists=False):
        if aggregation not in (None, "mean"):
            raise ValueError(f"Unsupported aggregation {aggregation!r}; the faiss backend supports 'mean'")
        if query is None:
            return self._full_kneighbors(k or 1, return_dists)
        q, single = self._parse_neighbors_query(query)
        if aggregation == "mean":
            # Aggregated queries always answer with one flat list, as the brain API expects.
            q = normalize_rows(q).mean(axis=0, keepdims=True)
            single = True
        if k is None:
            k = self.index_size
        if self._index is None or k <= 0 or self.index_size == 0:
            scores, ids = np.empty((len(q), 0)), [[] for _ in range(len(q))]
        else:
            sign = -1.0 if reverse else 1.0
            scores, ids = self._index.search(
                sign * q, k, restrict_to=self._restrict(), nprobe=self.config.nprobe, ef_search=self.config.ef_search
            )
            scores = sign * scores
        dists = [list(1.0 - s[: len(i)].astype(float)) for s, i in zip(scores, ids)]
        if single:
            ids, dists = ids[0], dists[0]
        if return_dists:
            return ids, None, dists
        return ids, None

    def _view_vectors(self) -> np.ndarray:
        vecs, _ = self._index.get(self.current_sample_ids)
        return np.ascontiguousarray(vecs)

    def _full_kneighbors(self, k, return_dists):
        # Exact neighbours of every point in the current view, excluding itself.
        v = self._view_vectors() if self._index is not None else np.empty((0, 1), np.float32)
        inds, dists = view_kneighbors(v, k)
        return (inds, dists) if return_dists else inds

    def _radius_neighbors(self, query=None, thresh=None, return_dists=False):
        if thresh is None:
            raise ValueError("thresh is required")
        if self._index is None or self.index_size == 0:
            if query is None:
                return ([], []) if return_dists else []
            return ([], None, []) if return_dists else ([], None)
        v = self._view_vectors()
        if query is None:
            inds, dists = radius_neighbors(v, v, thresh, exclude_self=True)
            return (inds, dists) if return_dists else inds
        q, single = self._parse_neighbors_query(query)
        inds, dists = radius_neighbors(v, normalize_rows(q), thresh, exclude_self=False)
        cur = self.current_sample_ids
        ids = [[str(cur[i]) for i in r] for r in inds]
        dl = [list(d) for d in dists]
        if single:
            ids, dl = ids[0], dl[0]
        return (ids, None, dl) if return_dists else (ids, None)


def compute_faiss_similarity(samples, index_path, brain_key, model=None, index_type=None, **kwargs):
    """Register a similarity brain run over an existing :class:`EmbeddingIndex` (no re-embedding).

    ``model`` enables text-prompt queries: a :class:`~fiftyone_nola.core.models.ClipSpec`, a loaded
    CLIP (:class:`~fiftyone_nola.core.models.LoadedModel`), a FiftyOne zoo model name or a FiftyOne
    model that can embed prompts. Index ids must be sample ids of ``samples``' dataset.
    """
    ix = EmbeddingIndex.open(index_path)
    dataset_ids = set(samples._root_dataset.values("id"))
    if len(ix) and not any(s in dataset_ids for s in ix.ids[:1000]):
        raise InvalidInputError(
            f"The index at {index_path} holds no sample ids of dataset "
            f"{samples._root_dataset.name!r}; was it built for another dataset?"
        )
    spec = model.spec if isinstance(model, LoadedModel) else model
    if isinstance(spec, ClipSpec) and ix.meta.get("model_key") not in (None, spec_key(spec)):
        raise IndexMismatchError(
            f"The index at {index_path} was built with model {ix.meta['model_key']!r}, not "
            f"{spec_key(spec)!r}: text queries would be meaningless. Pass the index's model."
        )
    opts, session_model = prompt_model_options(model)
    results = fob.compute_similarity(
        samples,
        embeddings=False,
        brain_key=brain_key,
        backend=FaissSimilarityConfig,
        index_path=str(index_path),
        index_type=index_type,
        **opts,
        **kwargs,
    )
    if session_model is not None:
        results._model = session_model
        results._supports_prompts = True
    return results
