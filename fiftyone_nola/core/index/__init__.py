"""On-disk FAISS store of embeddings, one per (dataset, model), keyed by sample id.

Layout of a store directory::

    meta.json                  identity + bookkeeping; written last, names the live generation
    vectors-<gen>.npy          float32 N×D, L2-normalised rows (position i <-> ids[i]); memory-
                               mapped copy-on-write when at least format.MMAP_MIN_BYTES
    norms-<gen>.npy            float32 N, the L2 norm each row had before normalisation, so the
                               raw vectors are recoverable (NaN: unknown, written by a version
                               that did not store norms; absent in such stores)
    ids-<gen>.json             N sample ids
    fingerprints-<gen>.json    {sample id: fingerprint} for ids that have one
    faiss-<gen>.index          trained ivf/hnsw/ivfpq structure (absent for flat: searched
                               straight from the vectors, see search)
    chunks/NNNNNN.npz          checkpoints since the last save: upserts + removals
    .lock                      lock file of storage.file_lock (see EmbeddingIndex.lock)

Data files carry a generation number so that ``save`` never overwrites the files the current
``meta.json`` points to: a crash at any moment of a save leaves the previous generation plus its
chunks, which ``open`` replays. No pickle is used anywhere.

Modules: :mod:`.format` (the layout above, read and written), :mod:`.search` (exact search and
the helpers every search shares), :mod:`.ann` (faiss structures), :mod:`.rows` (the in-memory
table) and :mod:`.store` (:class:`EmbeddingIndex`, which composes them). Tunables such as
``format.MMAP_MIN_BYTES`` or ``search.EXACT_SUBSET_MAX`` are read from their own module.
"""

from fiftyone_nola.core.index.ann import (
    DEFAULT_EF_CONSTRUCTION,
    DEFAULT_EF_SEARCH,
    DEFAULT_HNSW_M,
    DEFAULT_IVF_MIN_SIZE,
    DEFAULT_REFINE_FACTOR,
    PQ_MIN_SIZE,
    PQ_NBITS,
    default_pq_m,
    ivf_nlist,
    ivf_train_size,
    new_ivf_index,
    sample_rows,
)
from fiftyone_nola.core.index.format import (
    CHUNK_DIR,
    FORMAT_VERSION,
    INDEX_TYPES,
    LOCK_FILE,
    META_FILE,
    SUPPORTED_FORMAT_VERSIONS,
    PathLike,
    destroy,
    library_versions,
)
from fiftyone_nola.core.index.search import normalize_rows, recall_at_k, rerank_exact, topk_inner_product
from fiftyone_nola.core.index.store import EmbeddingIndex, IndexLockedError

__all__ = [
    "CHUNK_DIR",
    "DEFAULT_EF_CONSTRUCTION",
    "DEFAULT_EF_SEARCH",
    "DEFAULT_HNSW_M",
    "DEFAULT_IVF_MIN_SIZE",
    "DEFAULT_REFINE_FACTOR",
    "FORMAT_VERSION",
    "INDEX_TYPES",
    "LOCK_FILE",
    "META_FILE",
    "PQ_MIN_SIZE",
    "PQ_NBITS",
    "SUPPORTED_FORMAT_VERSIONS",
    "EmbeddingIndex",
    "IndexLockedError",
    "PathLike",
    "default_pq_m",
    "destroy",
    "ivf_nlist",
    "ivf_train_size",
    "library_versions",
    "new_ivf_index",
    "normalize_rows",
    "recall_at_k",
    "rerank_exact",
    "sample_rows",
    "topk_inner_product",
]
