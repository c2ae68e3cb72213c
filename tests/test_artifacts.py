"""Per-stage array bundles: one atomic file, rows merged across views and concurrent writers."""

import multiprocessing as mp

import numpy as np
import pytest

from fiftyone_nola.core.errors import NolaError
from fiftyone_nola.stages.artifacts import aligned, has_array, load_array, save_array_bundle

META = {"classes": ["a", "b"]}


def test_round_trip_and_alignment(tmp_path):
    save_array_bundle(
        tmp_path,
        ["x", "y"],
        {"probs": np.array([[0.1, 0.9], [0.7, 0.3]]), "teacher": np.array([1, 0])},
        META,
        shared={"W": np.eye(2)},
    )
    got = aligned(tmp_path, "probs", ["y", "z", "x"])
    assert np.allclose(got[0], [0.7, 0.3]) and np.isnan(got[1]).all() and np.allclose(got[2], [0.1, 0.9])
    assert aligned(tmp_path, "teacher", ["z", "x"]).tolist() == [-1, 1]
    assert np.array_equal(load_array(tmp_path, "W"), np.eye(2))
    assert has_array(tmp_path, "probs") and not has_array(tmp_path, "nope")
    with pytest.raises(NolaError, match="no per-sample array"):
        aligned(tmp_path, "nope", ["x"])


def test_views_add_up_and_rerun_replaces(tmp_path):
    save_array_bundle(tmp_path, ["x", "y"], {"p": np.array([1.0, 2.0])}, META)
    save_array_bundle(tmp_path, ["y", "z"], {"p": np.array([20.0, 30.0])}, META)
    assert aligned(tmp_path, "p", ["x", "y", "z"]).tolist() == [1.0, 20.0, 30.0]
    # a different class list invalidates old rows
    save_array_bundle(tmp_path, ["z"], {"p": np.array([5.0])}, {"classes": ["a", "c"]})
    out = aligned(tmp_path, "p", ["x", "z"])
    assert np.isnan(out[0]) and out[1] == 5.0


def _writer(path, start):
    for k in range(10):
        ids = [f"s{start + 10 * k + j}" for j in range(10)]
        save_array_bundle(path, ids, {"p": np.arange(10, dtype=float) + start + 10 * k}, META)


def test_concurrent_writers_on_disjoint_ids_lose_nothing(tmp_path):
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(tmp_path, s)) for s in (0, 1000)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    ids = [f"s{i}" for i in range(100)] + [f"s{1000 + i}" for i in range(100)]
    got = aligned(tmp_path, "p", ids)
    assert np.isfinite(got).all()
    assert got.tolist() == [float(i) for i in range(100)] + [float(1000 + i) for i in range(100)]


def test_one_file_lock_reentrant_per_thread_exclusive_across_threads(tmp_path):
    """storage.file_lock serves every lock (stage writers, stores, imports, database start)."""
    import threading

    from fiftyone_nola.core.storage import LockTimeout, file_lock

    path = tmp_path / "x.lock"
    with file_lock(path), file_lock(path):  # nested in one thread: no self-deadlock
        got = []

        def other():
            try:
                with file_lock(path, timeout=0.2):
                    got.append("acquired")
            except LockTimeout:
                got.append("timeout")

        t = threading.Thread(target=other)
        t.start()
        t.join()
        assert got == ["timeout"]
        assert path.read_text().strip() == str(__import__("os").getpid())
    waited = []
    with file_lock(path, timeout=0, on_wait=lambda: waited.append(1)):
        pass
    assert waited == []
