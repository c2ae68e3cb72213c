"""Scale: build time, memory and query throughput of the embedding index from 100k to 10M vectors,
each figure next to exact brute-force search measured in the same run.

Data: clustered unit vectors of dim 512 (CLIP ViT-B/32), the mixture of benchmarks/embeddings.py
(log-normal cluster sizes, cosine ~0.9 to the centre, isotropic noise: the hard case for product
quantisation), generated in chunks of 100k rows whose content depends only on (seed, chunk), so
every size is reproducible and the 10M set is never held whole (it would be 20 GB).

Per size:

* up to ``--library-max-n`` (1M): one ``EmbeddingIndex`` store, its search structures built in
  turn over the same vectors: flat, ivf, hnsw (up to ``--hnsw-max-n``; above it extrapolated
  from the largest measured size, and marked so) and ivfpq at several refine factors. Baseline:
  exact brute force in numpy (BLAS matmul + argpartition) over the same matrix.
* above it (10M): filling a store with ``add`` holds every float vector in RAM (20 GB at 10M),
  which does not fit here, so the ivfpq index is built directly from the streamed chunks with
  the library's own pieces
  (``new_ivf_index``, ``ivf_nlist``, ``ivf_train_size``, ``rerank_exact``; trained on the first
  ``ivf_train_size`` rows, a random sample since chunks are i.i.d.), the float vectors go to an
  .npy file that re-ranking reads memory-mapped, and the baseline is exact brute force streamed
  from that file (its read time included).

faiss's OpenMP threads wait passively (``OMP_WAIT_POLICY=PASSIVE`` unless set otherwise): with the
default spinning, two threads on two cores shared with other jobs ran PQ training 5x slower than
one thread; passive waiting removes that artefact of the shared machine.

Measured: build seconds; RSS growth of the build (VmRSS after minus before) and its peak; faiss
index bytes (serialised size); queries/s of a batch of k=10 queries on 1 thread and on all;
recall@10 against the baseline's exact answers. Also: a saved ivfpq store of the largest library
size opened in a fresh process with its vectors memory-mapped vs read into RAM, and the bytes per
vector of the store's id structures. Finally bytes per vector of each index type, projected to
100M vectors on paper.

Usage::

    .venv/bin/python benchmarks/scale.py --quick         # ~2 minutes
    .venv/bin/python benchmarks/scale.py                 # 100k, 1M, 10M: ~30 min on 2 cores
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Before faiss's libgomp loads (see the module docstring).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import _common as C  # noqa: E402

CHUNK = 100_000
CENTER_SEED = 12345  # same mixture as benchmarks/embeddings.py
BASELINE = "exact numpy (baseline)"
# Meta keys recorded with each index type's figures.
PARAMS = {
    "flat": (),
    "ivf": ("nlist",),
    "hnsw": ("hnsw_m", "ef_construction", "ef_search"),
    "ivfpq": ("nlist", "pq_m", "refine_factor"),
}
PROJECT_N = 100_000_000


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="20k and 250k vectors, 200 queries (smoke run, ~2 minutes)")
    p.add_argument("--sizes", help="comma-separated; default 100000,1000000,10000000")
    p.add_argument(
        "--library-max-n", type=int, help="largest size built through EmbeddingIndex (default 1000000; quick 20000)"
    )
    p.add_argument(
        "--hnsw-max-n",
        type=int,
        default=100_000,
        help="largest size at which hnsw is built (slow on 2 cores); extrapolated above",
    )
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--clusters", type=int, help="mixture components; default 3000 (quick 300)")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--queries", type=int, help="batch for approximate indexes; default 1000")
    p.add_argument(
        "--exact-queries",
        type=int,
        default=200,
        help="batch for exact search (baseline, flat) at n >= 1M; also the recall set",
    )
    p.add_argument(
        "--refine-factors", default="10,50,100,400", help="ivfpq refine factors measured besides the library default"
    )
    p.add_argument(
        "--work-dir",
        default=tempfile.gettempdir(),
        help="where stores and the on-disk float vectors of streamed sizes go",
    )
    p.add_argument(
        "--out", default=str(C.RESULTS_DIR / "scale.json"), help="JSON output; the table goes next to it as .txt"
    )
    p.add_argument("--md", help="also write the tables as a Markdown README section here")
    p.add_argument("--_open-child", help=argparse.SUPPRESS)
    p.add_argument("--_child-queries", help=argparse.SUPPRESS)
    p.add_argument("--_mmap-min-bytes", type=int, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    q = a.quick
    a.sizes = [int(s) for s in (a.sizes or ("20000,250000" if q else "100000,1000000,10000000")).split(",") if s]
    a.library_max_n = a.library_max_n or (20_000 if q else 1_000_000)
    a.clusters = a.clusters or (300 if q else 3000)
    a.queries = a.queries or (200 if q else 1000)
    a.exact_queries = min(a.exact_queries, a.queries)
    a.refine_factors = [int(v) for v in a.refine_factors.split(",") if v]
    return a


# =========================================================================== data


class Synth:
    """Clustered unit vectors in fixed chunks: chunk i depends only on (seed, i)."""

    def __init__(self, d: int, n_clusters: int, seed: int):
        crng = np.random.default_rng(CENTER_SEED)
        c = crng.standard_normal((n_clusters, d), dtype=np.float32)
        self.centers = c / np.linalg.norm(c, axis=1, keepdims=True)
        w = crng.lognormal(0.0, 1.0, n_clusters)
        self.p = w / w.sum()
        self.spread = crng.uniform(0.35, 0.7, n_clusters).astype(np.float32)
        self.d, self.seed = d, seed

    def chunk(self, i: int, rows: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, i])
        lab = rng.choice(len(self.centers), size=rows, p=self.p)
        x = rng.standard_normal((rows, self.d), dtype=np.float32)
        x *= (self.spread[lab] / np.sqrt(self.d))[:, None]
        x += self.centers[lab]
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return x

    def blocks(self, n: int):
        """``(start, rows)`` over the first n vectors."""
        for i, s in enumerate(range(0, n, CHUNK)):
            yield s, self.chunk(i, min(CHUNK, n - s))

    def array(self, n: int) -> np.ndarray:
        x = np.empty((n, self.d), dtype=np.float32)
        for s, blk in self.blocks(n):
            x[s : s + len(blk)] = blk
        return x


def make_ids(n: int) -> list[str]:
    # 24 hex characters, like FiftyOne's ObjectId sample ids: the store's id memory depends on it.
    return [f"{i:024x}" for i in range(n)]


# =========================================================================== measuring


def rss() -> dict:
    """VmRSS, RssAnon (heap: cannot be evicted) and RssFile (mapped files) of this process, MB."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key = line.split(":", 1)[0]
            if key in ("VmRSS", "RssAnon", "RssFile"):
                out[key] = float(line.split()[1]) / 1024
    return out


def all_threads() -> int:
    return len(os.sched_getaffinity(0))


@contextlib.contextmanager
def threads(n: int):
    """Limit faiss's OpenMP pool and numpy's BLAS to n threads."""
    import faiss
    from threadpoolctl import threadpool_limits

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(n)
    try:
        with threadpool_limits(limits=n):
            yield
    finally:
        faiss.omp_set_num_threads(before)


def throughput(search, q: np.ndarray, budget_s: float = 20.0):
    """Queries/s of ``search(q)`` on one thread and on all: the best of up to 3 batches while
    they fit in ``budget_s`` (other jobs share the CPU). Returns (figures, all-threads result)."""
    out, res = {"batch_queries": len(q)}, None
    for label, nt in (("1_thread", 1), ("all_threads", all_threads())):
        with threads(nt):
            search(q[:4])  # warm-up: lazy builds, page faults of small structures
            runs: list[float] = []
            while not runs or (len(runs) < 3 and sum(runs) + runs[-1] <= budget_s):
                t = time.perf_counter()
                res = search(q)
                runs.append(time.perf_counter() - t)
        out[f"qps_{label}"] = len(q) / min(runs)
        out[f"qps_{label}_runs"] = [len(q) / r for r in runs]
    return out, res


def ram_blocks(x: np.ndarray):
    yield 0, x


def file_blocks(path: Path, n: int, d: int, rows: int = 65_536):
    """Blocks of an .npy file read with plain reads: pages go to the page cache, not to RSS."""
    with open(path, "rb") as f:
        np.lib.format.read_magic(f)
        np.lib.format.read_array_header_1_0(f)
        for s in range(0, n, rows):
            m = min(rows, n - s)
            yield s, np.fromfile(f, dtype=np.float32, count=m * d).reshape(m, d)


def recall(truth: np.ndarray, got) -> float:
    """recall@k of position lists, by the library's definition (missing hits count as misses)."""
    from fiftyone_nola.core.index import recall_at_k

    return recall_at_k([list(t) for t in truth], [list(g) for g in got])


def faiss_bytes(index, tmp: Path) -> int:
    """Serialised size of a faiss index (via a file: serialize_index would copy it in RAM)."""
    import faiss

    path = tmp / "size-probe.index"
    faiss.write_index(index, str(path))
    try:
        return path.stat().st_size
    finally:
        path.unlink()


def release_free_memory() -> None:
    """Hand freed heap pages back to the OS (glibc keeps them otherwise), so that the RSS growth
    of the next build is not hidden by memory a previous one freed."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class Build:
    """Wall seconds, RSS growth and peak RSS growth of a build."""

    def __enter__(self) -> Build:
        release_free_memory()
        C.reset_peak_rss()
        self.r0 = rss()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.t0
        gc.collect()
        r1 = rss()
        self.rss_delta_mb = r1["VmRSS"] - self.r0["VmRSS"]
        self.anon_delta_mb = r1["RssAnon"] - self.r0["RssAnon"]
        self.peak_delta_mb = C.peak_rss_mb() - self.r0["VmRSS"]


def id_bytes(store) -> dict:
    """Bytes per vector of the store's id list and id->position dict (object sizes, no
    allocator slack): what the store holds per vector besides the vectors."""
    ids, pos = store._ids, store._pos
    n = len(ids)
    strings = sum(sys.getsizeof(s) for s in ids)
    ints = sum(sys.getsizeof(v) for v in pos.values() if v > 256)  # small ints are shared
    return {
        "ids_list_bytes_per_vector": (sys.getsizeof(ids) + strings) / n,
        "id_dict_bytes_per_vector": (sys.getsizeof(pos) + ints) / n,
    }


def row(method: str, n: int, build_s, mem: dict, index_bytes, tp: dict, rec, **extra) -> dict:
    r = {
        "method": method,
        "n": n,
        "build_s": build_s,
        **mem,
        "index_bytes": index_bytes,
        "index_bytes_per_vector": index_bytes / n if index_bytes else None,
        **tp,
        "recall_at_10": rec,
        "measured": True,
        **extra,
    }
    print(
        f"  {method:34s} build {C.fmt(build_s):>7} s  RSS +{C.fmt(mem.get('rss_delta_mb')):>6} MB"
        f"  index {C.fmt((index_bytes or 0) / 2**20):>6} MB  q/s 1t {C.fmt(tp.get('qps_1_thread')):>7}"
        f"  all {C.fmt(tp.get('qps_all_threads')):>7}  recall {C.fmt(rec)}",
        flush=True,
    )
    return r


def mem_of(b: Build) -> dict:
    return {
        "rss_delta_mb": b.rss_delta_mb,
        "rss_anon_delta_mb": b.anon_delta_mb,
        "peak_build_delta_mb": b.peak_delta_mb,
    }


# =========================================================================== library sizes


def run_library_size(args, n: int, synth: Synth, q: np.ndarray, work: Path) -> dict:
    from fiftyone_nola.core.index import EmbeddingIndex

    k, d = args.k, args.dim
    t = time.perf_counter()
    x = synth.array(n)
    entry = {"n": n, "path": "library (EmbeddingIndex)", "data_gen_s": time.perf_counter() - t, "rows": []}
    nq_exact = args.queries if n < 1_000_000 else args.exact_queries
    qe = q[:nq_exact]

    # ------------------------------------------------ baseline: exact numpy over the same matrix
    tp, pos = throughput(lambda qq: C.exact_topk(ram_blocks(x), qq, k), qe)
    truth = pos
    entry["rows"].append(
        row(BASELINE, n, 0.0, {"rss_delta_mb": x.nbytes / 2**20}, x.nbytes, tp, 1.0, note="the float32 matrix itself")
    )

    # ------------------------------------------------ the store: vectors + ids
    release_free_memory()
    r0 = rss()
    store = EmbeddingIndex.create(work / f"store-{n}", d, {"bench": "scale"}, index_type="flat")
    with Build() as b:
        store.add(make_ids(n), x)
    entry["store"] = {
        **id_bytes(store),
        "vectors_bytes_per_vector": 4 * d,
        "add_s": b.seconds,
        "rss_delta_bytes_per_vector": (rss()["VmRSS"] - r0["VmRSS"]) * 2**20 / n,
    }
    print(
        f"  store ids: list {entry['store']['ids_list_bytes_per_vector']:.0f} B/vector, "
        f"id->position dict {entry['store']['id_dict_bytes_per_vector']:.0f} B/vector",
        flush=True,
    )

    def lib_search(**kw):
        return lambda qq: store.search(qq, k, **kw)[1]

    def pos_of(id_lists):
        return [[int(s, 16) for s in r] for r in id_lists]

    for itype in ("flat", "ivf", "hnsw", "ivfpq"):
        if itype == "hnsw" and n > args.hnsw_max_n:
            continue
        store.set_index_type(itype)
        with Build() as b:
            store.search(q[:1], k)
        # flat stores hold no faiss structure (they search the vectors): nothing beyond them
        nbytes = faiss_bytes(store._structure.cpu, work) if store._structure is not None else 0
        meta = store.meta
        params = {key: meta[key] for key in PARAMS[itype]}
        if itype in ("ivf", "ivfpq"):
            params["nprobe"] = min(meta["nlist"], max(16, meta["nlist"] // 8))  # library default
        batch = qe if itype == "flat" else q
        tp, got = throughput(lib_search(), batch)
        label = itype if itype != "ivfpq" else f"ivfpq (refine x{meta['refine_factor']}, default)"
        entry["rows"].append(
            row(
                label,
                n,
                b.seconds,
                mem_of(b),
                nbytes,
                tp,
                recall(truth, pos_of(got[:nq_exact])),
                index_type=itype,
                params=params,
            )
        )
        if itype == "ivfpq":
            for rf in args.refine_factors:
                if rf == meta["refine_factor"]:
                    continue
                tp, got = throughput(lib_search(refine_factor=rf), q)
                entry["rows"].append(
                    row(
                        f"ivfpq (refine x{rf})",
                        n,
                        b.seconds,
                        mem_of(b),
                        nbytes,
                        tp,
                        recall(truth, pos_of(got[:nq_exact])),
                        index_type=itype,
                        params={**params, "refine_factor": rf},
                        same_build_as="ivfpq default",
                    )
                )

    if n == max(s for s in args.sizes if s <= args.library_max_n):
        store.save()  # vectors + ivfpq faiss file, for the fresh-process open below
        entry["open_fresh_process"] = open_in_children(args, store.path, q, work)
    return entry  # the store and x are freed here


def open_in_children(args, path: Path, q: np.ndarray, work: Path) -> dict:
    """Open the saved ivfpq store in fresh processes, vectors memory-mapped vs read into RAM."""
    qpath = work / "child-queries.npy"
    np.save(qpath, q)
    out = {}
    for label, min_bytes in (("memory-mapped", 0), ("in RAM", 2**62)):
        cmd = [
            sys.executable,
            __file__,
            "--_open-child",
            str(path),
            "--_child-queries",
            str(qpath),
            "--_mmap-min-bytes",
            str(min_bytes),
            "--k",
            str(args.k),
        ]
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
        out[label] = json.loads(res.stdout.strip().splitlines()[-1])
        r = out[label]
        a, b = r["rss_after_open_mb"], r["rss_after_search_mb"]
        print(
            f"  fresh process, vectors {label:13s}: open {r['open_s']:.1f} s, RSS "
            f"{a['VmRSS']:.0f} MB (anon {a['RssAnon']:.0f}) after open, {b['VmRSS']:.0f} MB "
            f"(anon {b['RssAnon']:.0f}) after {r['queries']} queries "
            f"({r['qps_all_threads']:.0f} q/s)",
            flush=True,
        )
    qpath.unlink()
    return out


def open_child(args) -> None:
    import fiftyone_nola.core.index.format as fmt
    from fiftyone_nola.core.index import EmbeddingIndex

    fmt.MMAP_MIN_BYTES = args._mmap_min_bytes
    q = np.load(args._child_queries)
    r0 = rss()
    t = time.perf_counter()
    ix = EmbeddingIndex.open(args._open_child)
    open_s = time.perf_counter() - t
    gc.collect()
    r1 = rss()
    ix.search(q[:4], args.k)  # uses the saved faiss file: nothing is rebuilt
    t = time.perf_counter()
    ix.search(q, args.k)
    qps = len(q) / (time.perf_counter() - t)
    print(
        json.dumps(
            {
                "n": len(ix),
                "index_type": ix.meta["built_index_type"],
                "open_s": open_s,
                "vectors_memory_mapped": isinstance(ix.vectors, np.memmap),
                "rss_before_open_mb": r0,
                "rss_after_open_mb": r1,
                "rss_after_search_mb": rss(),
                "queries": len(q),
                "qps_all_threads": qps,
            }
        )
    )


# =========================================================================== streamed sizes


def write_npy_header(f, n: int, d: int) -> None:
    np.lib.format.write_array_header_1_0(
        f, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)), "fortran_order": False, "shape": (n, d)}
    )


def stream_build(idx, synth: Synth, n: int, n_train: int, vec_path: Path) -> dict:
    """Train ``idx`` on the first ``n_train`` rows and add all n, chunk by chunk, while writing
    the rows to an .npy file; seconds of each activity. Holds at most the training chunks."""
    secs = dict.fromkeys(("data_gen_s", "vectors_write_s", "train_s", "add_s"), 0.0)
    pending: list[np.ndarray] = []  # chunks kept until the training sample is complete

    def lap(key: str, t: float) -> float:
        now = time.perf_counter()
        secs[key] += now - t
        return now

    with open(vec_path, "wb") as f:
        write_npy_header(f, n, synth.d)
        t = time.perf_counter()
        for s, blk in synth.blocks(n):
            t = lap("data_gen_s", t)
            blk.tofile(f)  # plain writes: the page cache holds them, not this process's RSS
            t = lap("vectors_write_s", t)
            if idx.is_trained:
                idx.add(blk)
                t = lap("add_s", t)
            else:
                pending.append(blk)
                if sum(len(p) for p in pending) >= n_train or s + len(blk) == n:
                    idx.train(np.concatenate(pending)[:n_train])
                    t = lap("train_s", t)
                    while pending:
                        idx.add(pending.pop(0))
                    t = lap("add_s", t)
            if s // CHUNK % 10 == 0:
                print(
                    f"    {s + len(blk):>11,} / {n:,} rows: "
                    + ", ".join(f"{k[:-2]} {v:.0f} s" for k, v in secs.items()),
                    flush=True,
                )
            t = time.perf_counter()
    return secs


def run_streamed_size(args, n: int, synth: Synth, q: np.ndarray, work: Path) -> dict:
    import faiss

    from fiftyone_nola.core.index import (
        DEFAULT_REFINE_FACTOR,
        default_pq_m,
        ivf_nlist,
        ivf_train_size,
        new_ivf_index,
        rerank_exact,
    )

    k, d = args.k, args.dim
    need = n * d * 4
    free = shutil.disk_usage(work).free
    entry = {
        "n": n,
        "path": "streamed: faiss IVFPQ built from chunks with the library's "
        "constructors; float vectors on disk (memory-mapped for re-ranking)",
        "rows": [],
    }
    if free < need + (8 << 30):
        entry["skipped"] = (
            f"needs {need / 2**30:.0f} GB of disk for the float vectors + 8 GB "
            f"margin; {free / 2**30:.0f} GB free in {work}"
        )
        print("  SKIPPED:", entry["skipped"], flush=True)
        return entry
    nlist, m = ivf_nlist(n), default_pq_m(d)
    n_train = min(n, ivf_train_size(nlist, pq=True))
    vec_path = work / f"vectors-{n}.npy"
    idx = new_ivf_index(d, nlist, m)
    with Build() as b:
        times = stream_build(idx, synth, n, n_train, vec_path)
    build_s = times["train_s"] + times["add_s"]
    entry.update(**times, wall_s=b.seconds)
    nbytes = faiss_bytes(idx, work)

    # ------------------------------------------------ baseline: exact brute force from the file
    qe = q[: args.exact_queries]
    tp, truth = throughput(lambda qq: C.exact_topk(file_blocks(vec_path, n, d), qq, k), qe)
    entry["rows"].append(
        row(
            BASELINE,
            n,
            0.0,
            {"rss_delta_mb": None},
            need,
            tp,
            1.0,
            note="streamed from the float32 .npy on disk, read time included",
        )
    )

    # ------------------------------------------------ ivfpq with re-ranking from the mmap
    vecs = np.load(vec_path, mmap_mode="r")
    nprobe = min(nlist, max(16, nlist // 8))
    params = faiss.SearchParametersIVF(nprobe=nprobe)

    def search(rf):
        def run(qq):
            _, lab = idx.search(qq, k * rf, params=params)
            return rerank_exact(qq, lab, vecs, k)[1]

        return run

    info = {"nlist": nlist, "nprobe": nprobe, "pq_m": m, "train_rows": n_train}
    for rf in [DEFAULT_REFINE_FACTOR] + [r for r in args.refine_factors if r != DEFAULT_REFINE_FACTOR]:
        default = rf == DEFAULT_REFINE_FACTOR
        tp, got = throughput(search(rf), q if default else qe)
        label = f"ivfpq (refine x{rf}{', default' if default else ''})"
        entry["rows"].append(
            row(
                label,
                n,
                build_s,
                mem_of(b),
                nbytes,
                tp,
                recall(truth, got[: len(qe)]),
                index_type="ivfpq",
                params={**info, "refine_factor": rf},
            )
        )
    entry["rss_after_searches_mb"] = rss()
    vec_path.unlink()  # its space is freed when the map goes, on return
    return entry


# =========================================================================== projection


def projection(args, results: dict) -> dict:
    """Bytes per vector of each structure (formula and measured) and GB at 100M vectors."""
    from fiftyone_nola.core.index import DEFAULT_HNSW_M, default_pq_m

    d, M, m = args.dim, DEFAULT_HNSW_M, default_pq_m(args.dim)
    measured: dict[str, tuple[int, float]] = {}
    for entry in results["sizes"].values():
        for r in entry.get("rows", []):
            key = r.get("index_type", r["method"])
            if r["measured"] and r.get("index_bytes_per_vector") and r["n"] >= measured.get(key, (0, 0))[0]:
                measured[key] = (r["n"], r["index_bytes_per_vector"])
    ids = [e["store"] for e in results["sizes"].values() if "store" in e]
    id_bpv = ids[-1]["ids_list_bytes_per_vector"] + ids[-1]["id_dict_bytes_per_vector"] if ids else None
    formulas = {
        BASELINE: (4 * d, "4·d float32 matrix"),
        "flat": (0, "0 (no structure: exact search reads the store's vectors, memory-mapped when reopened)"),
        "ivf": (4 * d + 8, "4·d + 8 (int64 id per vector in the inverted lists)"),
        "hnsw": (4 * d + 2 * M * 4, f"4·d + 2·M·4 (level-0 links, M={M}) + upper levels"),
        "ivfpq": (m + 8, f"m + 8 (m={m} one-byte PQ codes + int64 id); float re-rank store 4·d on disk, memory-mapped"),
    }
    out = {"n": PROJECT_N, "dim": d, "types": {}, "store_ids_bytes_per_vector": id_bpv}
    for key, (bpv, formula) in formulas.items():
        n_meas, meas = measured.get(key, (None, None))
        use = meas if meas else bpv
        out["types"][key] = {
            "formula": formula,
            "formula_bytes_per_vector": bpv,
            "measured_bytes_per_vector": meas,
            "measured_at_n": n_meas,
            "gb_at_100m": use * PROJECT_N / 1e9,
        }
    pq = out["types"]["ivfpq"]["gb_at_100m"]
    ids_gb = id_bpv * PROJECT_N / 1e9 if id_bpv else None
    out["ram_gb_at_100m"] = {
        "flat/ivf/hnsw while adding (store vectors in RAM + structure + ids)": {
            k: 4 * d * PROJECT_N / 1e9 + out["types"][k]["gb_at_100m"] + (ids_gb or 0) for k in ("flat", "ivf", "hnsw")
        },
        "flat/ivf/hnsw reopened (vectors memory-mapped; structure + ids)": {
            k: out["types"][k]["gb_at_100m"] + (ids_gb or 0) for k in ("flat", "ivf", "hnsw")
        },
        "ivfpq, vectors memory-mapped (codes + ids in RAM; floats on disk)": pq + (ids_gb or 0),
        "ivfpq codes alone": pq,
        "python id list + dict": ids_gb,
    }
    out["disk_gb_at_100m"] = {"float vectors": 4 * d * PROJECT_N / 1e9, "ivfpq index": pq}
    streamed = [e for e in results["sizes"].values() if e.get("train_s") is not None]
    if streamed:
        e = max(streamed, key=lambda e: e["n"])
        # Adding is dominated by assigning each vector to one of nlist = √n centroids: ∝ n^1.5.
        out["ivfpq_build_s_at_100m_projected"] = (e["train_s"] + e["add_s"]) * (PROJECT_N / e["n"]) ** 1.5
        out["ivfpq_build_projection_basis"] = (
            f"measured train+add at n={e['n']:,} scaled by (100M/n)^1.5 (coarse assignment "
            "to √n centroids dominates); 2 shared cores"
        )
    return out


# =========================================================================== output


def extrapolate_hnsw(results: dict, sizes: list[int]) -> list[dict]:
    """hnsw rows for library sizes above --hnsw-max-n, scaled from the largest measured one."""
    base = None
    for n in sorted(sizes):
        e = results["sizes"].get(str(n), {})
        for r in e.get("rows", []):
            if r.get("index_type") == "hnsw":
                base = r
    if base is None:
        return []
    out = []
    for n in sorted(sizes):
        e = results["sizes"].get(str(n), {})
        if n <= base["n"] or "store" not in e:
            continue
        g = (n / base["n"]) * math.log(n) / math.log(base["n"])  # HNSW inserts cost ~log n each
        h = math.log(base["n"]) / math.log(n)
        r = {
            **base,
            "n": n,
            "build_s": base["build_s"] * g,
            "rss_delta_mb": base["rss_delta_mb"] * n / base["n"],
            "index_bytes": base["index_bytes"] * n / base["n"],
            "qps_1_thread": base["qps_1_thread"] * h,
            "qps_all_threads": base["qps_all_threads"] * h,
            "recall_at_10": None,
            "measured": False,
            "method": "hnsw (extrapolated)",
            "note": f"not built at {n:,} (too slow on 2 cores): build time scaled by n·log n, "
            f"memory by n, q/s by 1/log n from n={base['n']:,}; recall not estimated",
        }
        for key in ("rss_anon_delta_mb", "peak_build_delta_mb"):
            r[key] = base.get(key, 0) * n / base["n"] if base.get(key) is not None else None
        e["rows"].append(r)
        out.append(r)
    return out


HEADERS = ["n", "method", "build s", "RSS +MB", "index MB", "B/vector", "q/s 1 thread", "q/s all", "recall@10"]


def table_rows(results: dict) -> list[list]:
    rows = []
    for e in results["sizes"].values():
        for r in e.get("rows", []):
            rows.append(
                [
                    f"{r['n']:,}",
                    r["method"] + ("" if r["measured"] else " *"),
                    r["build_s"],
                    r.get("rss_delta_mb"),
                    r["index_bytes"] / 2**20 if r.get("index_bytes") else None,
                    r.get("index_bytes_per_vector"),
                    r.get("qps_1_thread"),
                    r.get("qps_all_threads"),
                    r.get("recall_at_10"),
                ]
            )
        if e.get("skipped"):
            rows.append([f"{e['n']:,}", "skipped: " + e["skipped"]] + [None] * 7)
    return rows


def projection_rows(p: dict) -> list[list]:
    return [[k, v["formula"], v["measured_bytes_per_vector"], v["gb_at_100m"]] for k, v in p["types"].items()]


def report(args, results: dict) -> str:
    parts = [
        C.table(
            HEADERS,
            table_rows(results),
            title=(
                f"Scale: dim {args.dim}, {args.clusters} clusters, k={args.k}; q/s over a batch of "
                f"{args.queries} queries ({args.exact_queries} for exact search at n >= 1M and for "
                f"recall); {all_threads()} threads = all. RSS +MB: resident growth of the build. "
                "* = extrapolated, not measured."
            ),
        )
    ]
    for n, e in results["sizes"].items():
        if "store" in e:
            s = e["store"]
            parts.append(
                f"store at n={int(n):,}: ids list {s['ids_list_bytes_per_vector']:.0f} "
                f"B/vector + id->position dict {s['id_dict_bytes_per_vector']:.0f} "
                f"B/vector + float vectors {s['vectors_bytes_per_vector']} B/vector "
                f"(RSS growth of create + add: {s['rss_delta_bytes_per_vector']:.0f} "
                f"B/vector; add {s['add_s']:.1f} s)"
            )
        for label, r in (e.get("open_fresh_process") or {}).items():
            parts.append(
                f"saved {r['index_type']} store of {r['n']:,} opened in a fresh process, vectors "
                f"{label}: open {r['open_s']:.1f} s; RSS after open {r['rss_after_open_mb']['VmRSS']:.0f}"
                f" MB (anon {r['rss_after_open_mb']['RssAnon']:.0f}, file "
                f"{r['rss_after_open_mb']['RssFile']:.0f}; interpreter + imports "
                f"{r['rss_before_open_mb']['VmRSS']:.0f}); after {r['queries']} queries "
                f"{r['rss_after_search_mb']['VmRSS']:.0f} MB (anon "
                f"{r['rss_after_search_mb']['RssAnon']:.0f}); {r['qps_all_threads']:.0f} q/s"
            )
        if e.get("train_s") is not None:
            parts.append(
                f"streamed n={int(n):,}: generate {e['data_gen_s']:.0f} s, write floats "
                f"{e['vectors_write_s']:.0f} s, train {e['train_s']:.0f} s, add "
                f"{e['add_s']:.0f} s"
            )
    p = results.get("projection_100m")
    if p:
        parts.append(
            C.table(
                ["index", "bytes per vector (formula)", "measured B/vector", "GB at 100M"],
                projection_rows(p),
                title=f"Projection to 100M vectors of dim {args.dim} (on paper)",
            )
        )
        ram = p["ram_gb_at_100m"]
        lines = [
            f"  {k}: "
            + (", ".join(f"{kk} {vv:.0f} GB" for kk, vv in v.items()) if isinstance(v, dict) else C.fmt(v) + " GB")
            for k, v in ram.items()
        ]
        parts.append("RAM at 100M:\n" + "\n".join(lines))
        if "ivfpq_build_s_at_100m_projected" in p:
            parts.append(
                f"ivfpq build at 100M, projected: "
                f"{p['ivfpq_build_s_at_100m_projected'] / 3600:.1f} h "
                f"({p['ivfpq_build_projection_basis']})"
            )
    return "\n\n".join(parts)


def markdown(args, results: dict) -> str:
    def md_table(headers, rows):
        out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        out += ["| " + " | ".join(C.fmt(c) for c in r) + " |" for r in rows]
        return "\n".join(out)

    p = results["projection_100m"]
    return (
        "\n\n".join(
            [
                "## Scale",
                md_table(HEADERS, table_rows(results)),
                md_table(
                    ["index", "bytes per vector (formula)", "measured B/vector", "GB at 100M"], projection_rows(p)
                ),
            ]
        )
        + "\n"
    )


# =========================================================================== main


def main(argv=None) -> int:
    args = parse_args(argv)
    if args._open_child:
        open_child(args)
        return 0
    out = Path(args.out)
    results: dict = {
        "benchmark": "scale",
        "quick": args.quick,
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "args": {k: v for k, v in vars(args).items() if not k.startswith("_")},
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "loadavg_at_start": list(os.getloadavg()),
        "sizes": {},
    }
    work = Path(tempfile.mkdtemp(prefix="nola-scale-", dir=args.work_dir))
    timer = C.PartTimer()
    t_all = time.perf_counter()
    synth = Synth(args.dim, args.clusters, seed=1)
    q = Synth(args.dim, args.clusters, seed=2).chunk(0, args.queries)
    try:
        for n in args.sizes:
            with timer.part(f"n={n:,}"):
                run = run_library_size if n <= args.library_max_n else run_streamed_size
                results["sizes"][str(n)] = run(args, n, synth, q, work)
            C.write_json(out, {**results, "partial": True})  # survives an interrupted run
    finally:
        shutil.rmtree(work, ignore_errors=True)
    extrapolate_hnsw(results, [n for n in args.sizes if n <= args.library_max_n])
    results["projection_100m"] = projection(args, results)
    results["part_wall_s"] = timer.parts
    results["total_wall_s"] = time.perf_counter() - t_all
    results["machine"] = C.machine_facts()  # last: it imports torch, which measurements avoid
    results["machine"]["loadavg_at_end"] = list(os.getloadavg())
    text = report(args, results) + (
        f"\n\ntotal wall {results['total_wall_s'] / 60:.0f} min; load average at start "
        f"{results['loadavg_at_start'][0]:.1f}, at end {os.getloadavg()[0]:.1f} ({all_threads()} "
        "cores shared with other jobs: timings include that contention)\n"
    )
    print("\n" + text)
    C.write_json(out, results)
    out.with_suffix(".txt").write_text(text)
    if args.md:
        Path(args.md).write_text(markdown(args, results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
