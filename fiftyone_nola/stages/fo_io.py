"""FiftyOne I/O at the edges: datasets, views, bulk field writes, tags.

Writes are always bulk (``set_values`` keyed by sample id): never one round-trip per sample.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Optional

import numpy as np

from fiftyone_nola.core.errors import DatabaseUnavailableError, DatasetNotFoundError, EmptyViewError, InvalidInputError
from fiftyone_nola.core.files import list_images, spread_over_folders
from fiftyone_nola.core.storage import file_lock, nola_home, write_json_atomic

UNREADABLE_TAG = "nola:unreadable"


def _fo():
    try:
        import fiftyone as fo
    except Exception as e:  # the import itself starts/contacts the database
        raise DatabaseUnavailableError(_db_hint(e)) from e
    return fo


def _db_hint(e: Exception) -> str:
    uri = os.environ.get("FIFTYONE_DATABASE_URI")
    what = f"{type(e).__name__}: {e}"
    if uri:
        return f"Could not reach the MongoDB at FIFTYONE_DATABASE_URI={uri} ({what}). Start that server or fix the URI."
    if "ServiceExecutableNotFound" in what or "could not be installed" in what or "find `mongod`" in what:
        return (
            f"Could not reach FiftyOne's embedded database ({what}): its mongod is not installed. Run "
            f"`make setup`, or start your MongoDB and set FIFTYONE_DATABASE_URI."
        )
    log = _database_dir() / "log" / "mongo.log"
    return (
        f"Could not reach FiftyOne's embedded database ({what}): its mongod did not start. See its log "
        f"{log} (a full disk, a database directory it cannot write, or a mongod of another FiftyOne "
        f"version holding that directory are the usual causes), or start your MongoDB and set "
        f"FIFTYONE_DATABASE_URI."
    )


def _database_dir() -> Path:
    try:
        import fiftyone.core.config as focn

        return Path(focn.load_config().database_dir).expanduser()
    except Exception:
        return Path(os.environ.get("FIFTYONE_DATABASE_DIR", "~/.fiftyone/var/lib/mongo")).expanduser()


def connect_database(attempts: int = 3, backoff_s: float = 2.0) -> None:
    """Connect to FiftyOne's database; the embedded one is started by one process at a time.

    Processes started at the same moment with no database service running would each launch
    mongod on the same directory, and all but one died (DBPathInUse, then FiftyOne's
    ServiceListenTimeout). A file lock beside FiftyOne's database directory, held only while
    connecting, makes the others wait and then attach to the service the first one started;
    a failed start is retried with backoff before one clear error.
    """
    import time

    _fo()
    import fiftyone.core.odm.database as fodb

    if not fodb._is_client_closed(fodb._client):
        return
    if os.environ.get("FIFTYONE_DATABASE_URI"):
        try:
            fodb.get_db_conn()
            return
        except Exception as e:
            raise DatabaseUnavailableError(_db_hint(e)) from e
    db_dir = _database_dir()
    lock = db_dir.parent / f".{db_dir.name}.nola-start.lock"
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(file_lock(lock))
        except OSError:  # an unwritable parent: connect without the lock, FiftyOne will say why
            pass
        last: Optional[Exception] = None
        for attempt in range(attempts):
            try:
                fodb.get_db_conn()
                return
            except Exception as e:  # noqa: BLE001 - any failure to start or reach it
                last = e
                _forget_database_service(fodb)
                if attempt + 1 < attempts:
                    time.sleep(backoff_s * 2**attempt)
        raise DatabaseUnavailableError(_db_hint(last)) from last


def _forget_database_service(fodb) -> None:
    """Drop a half-started service so the next attempt searches for (or starts) one afresh."""
    svc, fodb._db_service = fodb._db_service, None
    fodb._client = None
    os.environ.pop("FIFTYONE_PRIVATE_DATABASE_PORT", None)
    fodb._connection_kwargs.pop("port", None)
    if svc is not None:
        try:
            svc.stop()
        except Exception:
            pass


def check_database() -> None:
    """Raise DatabaseUnavailableError with a clear message if the database cannot be reached."""
    connect_database()
    fo = _fo()
    try:
        fo.list_datasets()
    except Exception as e:
        raise DatabaseUnavailableError(_db_hint(e)) from e


def get_dataset(name: str):
    """Load a dataset by name, or raise DatasetNotFoundError listing what exists."""
    connect_database()
    fo = _fo()
    try:
        names = fo.list_datasets()
    except Exception as e:
        raise DatabaseUnavailableError(_db_hint(e)) from e
    if name not in names:
        shown = ", ".join(names[:10]) + (" ..." if len(names) > 10 else "")
        raise DatasetNotFoundError(
            f"No dataset named {name!r}. Existing datasets: {shown or '(none)'}. Create one with --images DIR."
        )
    return fo.load_dataset(name)


def root_dataset(samples):
    """The dataset behind a dataset or view."""
    return samples._root_dataset if hasattr(samples, "_root_dataset") else samples


def reload_document(samples) -> None:
    """Re-read the dataset's document (info, saved views, runs, schema) from the database.

    ``Dataset.reload()`` also re-reads every ``Sample`` object the process holds, one query
    each: a notebook holding 10,000 samples made every review decision cost 10,000 queries.
    That full reload is needed only when another process added a field (this process's
    sample class, shared by the samples it holds, must learn it); otherwise the document is
    enough."""
    ds = root_dataset(samples)
    ds._doc.reload()
    known = set(ds._sample_doc_cls._fields)
    if any(f.name not in known for f in ds._doc.sample_fields):
        ds.reload()


def dataset_id(samples) -> str:
    """Id of the dataset behind a dataset or view (names can change, ids do not)."""
    return str(root_dataset(samples)._doc.id)


def ids_and_paths(samples) -> tuple[list[str], list[str]]:
    """Sample ids and filepaths of a non-empty collection, in one query."""
    if len(samples) == 0:
        raise EmptyViewError("The dataset or view has no samples. Add images, or clear the view's filters.")
    ids, paths = samples.values(["id", "filepath"])
    return list(ids), list(paths)


def check_field(samples, field: str, label_types: Optional[tuple] = None) -> None:
    """Raise InvalidInputError if ``field`` is missing or holds the wrong label type."""
    schema = samples.get_field_schema(flat=True)
    if field not in schema:
        fields = ", ".join(sorted(k for k in schema if "." not in k))
        raise InvalidInputError(f"Field {field!r} does not exist. Fields: {fields}")
    if label_types:
        doc_type = getattr(schema[field], "document_type", None)
        if doc_type is None or not issubclass(doc_type, label_types):
            names = "/".join(t.__name__ for t in label_types)
            got = getattr(doc_type, "__name__", type(schema[field]).__name__)
            raise InvalidInputError(f"Field {field!r} holds {got}; expected {names}")


# Labels per set_values call: FiftyOne turns every value into an update op before one bulk
# write, so one call for the whole dataset costs ~3.4 KB per sample (170 MB at 50k); chunks
# keep a write's memory flat in N (benchmarks/memory.py).
WRITE_CHUNK = 2000


def _write_in_chunks(samples, ids: Sequence[str], field: str, make_value) -> int:
    """``set_values`` of ``make_value(j)`` (None: no label) for ``ids``, chunk by chunk."""
    ds = root_dataset(samples)
    written = 0
    for start in range(0, len(ids), WRITE_CHUNK):
        values = {}
        for j in range(start, min(start + WRITE_CHUNK, len(ids))):
            values[ids[j]] = v = make_value(j)
            written += v is not None
        ds.set_values(field, values, key_field="id")
    return written


def write_classifications(
    samples, ids: Sequence[str], classes: Sequence[str], probs: np.ndarray, field: str, store_logits: bool = False
) -> int:
    """Write argmax labels with confidence for the rows of ``probs`` that are finite.

    Rows with NaN (no embedding, unreadable image) are written as None. Returns rows written.
    """
    probs = np.asarray(probs, dtype=np.float32)
    record_classes(samples, field, classes)
    return _write_in_chunks(samples, ids, field, lambda j: classification_label(classes, probs[j], store_logits))


def record_classes(samples, field: str, classes: Sequence[str]) -> None:
    """Keep the classes ``field`` was predicted over in ``dataset.classes[field]`` (FiftyOne's
    per-field class list), so a correction may name a class no sample was predicted as."""
    ds = root_dataset(samples)
    classes = list(classes)
    if ds.classes.get(field) != classes:
        ds.classes[field] = classes
        ds.save()


def classification_label(classes: Sequence[str], row: np.ndarray, store_logits: bool = False):
    """The argmax ``fo.Classification`` of one probability row; None if the row is not finite."""
    if not np.all(np.isfinite(row)):
        return None
    k = int(np.argmax(row))
    c = _fo().Classification(label=classes[k], confidence=float(row[k]))
    if store_logits:
        c.logits = np.log(np.clip(row, 1e-12, 1.0))
    return c


def write_multilabel(
    samples, ids: Sequence[str], classes: Sequence[str], scores: np.ndarray, positives: np.ndarray, field: str
) -> int:
    """Write ``fo.Classifications`` of the positive classes of each row, with their scores."""
    scores = np.asarray(scores)
    positives = np.asarray(positives, dtype=bool)
    record_classes(samples, field, classes)
    return _write_in_chunks(samples, ids, field, lambda j: multilabel_labels(classes, scores[j], positives[j]))


def multilabel_labels(classes: Sequence[str], row: np.ndarray, positives: np.ndarray):
    """``fo.Classifications`` of the positive classes of one score row, best first; None if the
    row is not finite."""
    if not np.all(np.isfinite(row)):
        return None
    fo = _fo()
    return fo.Classifications(
        classifications=[
            fo.Classification(label=classes[i], confidence=float(row[i])) for i in np.argsort(-row) if positives[i]
        ]
    )


def read_single_labels(samples, field: str, ids: Sequence[str]) -> list[Optional[str]]:
    """Labels of a ``fo.Classification`` field, aligned to ``ids`` (None where missing)."""
    fo = _fo()
    check_field(samples, field, (fo.Classification,))
    view = root_dataset(samples).select(list(ids))
    got = dict(zip(*view.values(["id", f"{field}.label"])))
    return [got.get(i) for i in ids]


def label_path(field: str, doc_type) -> str:
    """The path of the label strings in ``field`` by its label type (Classifications,
    Detections, or a single Classification)."""
    fo = _fo()
    if issubclass(doc_type, fo.Classifications):
        return f"{field}.classifications.label"
    if issubclass(doc_type, fo.Detections):
        return f"{field}.detections.label"
    return f"{field}.label"


def read_label_sets(samples, field: str, ids: Sequence[str]) -> list[Optional[set]]:
    """Label sets of a Classifications/Detections/Classification field, aligned to ``ids``."""
    fo = _fo()
    check_field(samples, field, (fo.Classifications, fo.Detections, fo.Classification))
    schema = samples.get_field_schema(flat=True)
    doc_type = schema[field].document_type
    view = root_dataset(samples).select(list(ids))
    sids, labels = view.values(["id", label_path(field, doc_type)])
    got = {}
    for sid, lab in zip(sids, labels):
        if lab is None:
            got[sid] = None
        elif isinstance(lab, str):
            got[sid] = {lab}
        else:
            got[sid] = set(lab)
    return [got.get(i) for i in ids]


def count(samples) -> int:
    """How many samples: a dataset's from its ``_id`` index, a view's by its pipeline."""
    if samples is root_dataset(samples):
        return samples._sample_collection.count_documents({})
    return samples.count()


def _held_ids(ds, query: dict) -> list:
    """Ids of the Sample objects this process holds that match ``query`` (re-read after a raw write)."""
    import fiftyone.core.sample as fos
    from bson import ObjectId

    held = list(fos.Sample._instances.get(ds._sample_collection_name, {}).keys())
    if not held:
        return []
    mine = {"$and": [query, {"_id": {"$in": [ObjectId(i) for i in held]}}]}
    return [str(d["_id"]) for d in ds._sample_collection.find(mine, {"_id": 1})]


def _reread(ds, ids: list) -> None:
    import fiftyone.core.sample as fos

    if ids:
        fos.Sample._reload_docs(ds._sample_collection_name, sample_ids=ids)


def _stamped(update: dict) -> dict:
    import datetime

    return {**update, "$set": {**update.get("$set", {}), "last_modified_at": datetime.datetime.utcnow()}}


def update_where(samples, query: dict, update: dict) -> int:
    """Apply the MongoDB ``update`` to the dataset's samples matching ``query``, in one statement
    the database answers from its indexes (no ids listed in Python), stamping
    ``last_modified_at`` as FiftyOne's own writes do. Sample objects this process holds for
    matching samples are re-read, as after FiftyOne's writes. Returns how many changed.

    A raw write never goes through this process's copy of the dataset's schema, which FiftyOne's
    App server may be reloading meanwhile; fields it sets must be declared already."""
    ds = root_dataset(samples)
    touched = _held_ids(ds, query)
    changed = ds._sample_collection.update_many(query, _stamped(update)).modified_count
    _reread(ds, touched)
    return changed


def set_by_id(samples, field: str, values: dict) -> None:
    """Set a declared primitive field (number, string, None) per sample id, in bulk, as a raw write
    (see :func:`update_where`)."""
    from bson import ObjectId
    from pymongo import UpdateOne

    ds = root_dataset(samples)
    items = list(values.items())
    for start in range(0, len(items), WRITE_CHUNK):
        chunk = items[start : start + WRITE_CHUNK]
        oids = [ObjectId(i) for i, _ in chunk]
        touched = _held_ids(ds, {"_id": {"$in": oids}})
        ops = [UpdateOne({"_id": o}, _stamped({"$set": {field: v}})) for o, (_, v) in zip(oids, chunk)]
        ds._sample_collection.bulk_write(ops, ordered=False)
        _reread(ds, touched)


def tag_samples(samples, ids: Iterable[str], tag: str) -> None:
    """Tag the samples with these ids (one bulk update)."""
    ids = list(ids)
    if ids:
        root_dataset(samples).select(ids).tag_samples(tag)


def import_images(
    directory: str,
    dataset_name: Optional[str] = None,
    gt_from_subfolders: Optional[str] = None,
    overwrite: bool = False,
    max_samples: Optional[int] = None,
):
    """Create (or reuse) a dataset of the images under ``directory``.

    ``gt_from_subfolders``: a field name; when set, each image's parent folder name is stored
    there as ``fo.Classification`` (for evaluation only: no stage trains on ground truth).
    An existing dataset of that name gets only the files it lacks (re-runs are incremental).
    """
    fo = _fo()
    files = list_images(directory)
    if max_samples:
        files = spread_over_folders(files, max_samples)  # every class folder stays represented
    name = dataset_name or Path(directory).expanduser().resolve().name
    connect_database()
    # One importer per dataset name at a time: two jobs started together on one folder must
    # neither both create the dataset nor both add its files.
    with _import_lock(name):
        try:
            exists = name in fo.list_datasets()
        except Exception as e:
            raise DatabaseUnavailableError(_db_hint(e)) from e
        if exists and overwrite:
            fo.delete_dataset(name)
            exists = False
        ds = fo.load_dataset(name) if exists else fo.Dataset(name, persistent=True)
        have = set(ds.values("filepath")) if exists else set()
        samples = []
        for f in files:
            if f in have:
                continue
            s = fo.Sample(filepath=f)
            if gt_from_subfolders:
                s[gt_from_subfolders] = fo.Classification(label=Path(f).parent.name)
            samples.append(s)
        if samples:
            ds.add_samples(samples, progress=False)
    return ds


def _import_lock(name: str):
    """An exclusive lock on importing into dataset ``name`` (a file under ``$NOLA_HOME/locks``)."""

    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    return file_lock(nola_home() / "locks" / f"import-{safe}.lock")


def write_text_atomic(path, obj) -> None:
    """JSON-serialise ``obj`` to ``path`` atomically."""

    write_json_atomic(path, obj)
