"""Helpers shared by the benchmark scripts: isolation, timing, peak memory, machine facts, output.

Nothing here imports FiftyOne: :func:`isolate_environment` must run before the first
``import fiftyone`` so that a benchmark never touches a user's datasets or artefacts.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Callable, Optional

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("NOLA_SHARED_DATA", REPO.parent / "shared" / "data"))
RESULTS_DIR = Path(__file__).resolve().parent / "results"


# --------------------------------------------------------------------------- isolation


def isolate_environment(prefix: str = "nola-bench") -> dict:
    """Use a private FiftyOne database name and a temporary ``NOLA_HOME``; call before importing
    fiftyone. Returns what was set (the caller removes the temp dir / drops the database)."""
    session = uuid.uuid4().hex[:8]
    os.environ.setdefault("FIFTYONE_DATABASE_NAME", f"{prefix.replace('-', '_')}_{session}")
    os.environ.setdefault("FIFTYONE_DATABASE_VALIDATION", "false")
    os.environ.setdefault("FIFTYONE_DO_NOT_TRACK", "true")
    home = tempfile.mkdtemp(prefix=f"{prefix}-home-")
    os.environ["NOLA_HOME"] = home
    os.environ.pop("NOLA_RANDOM_INIT", None)  # specs below say explicitly what they load
    return {"database_name": os.environ["FIFTYONE_DATABASE_NAME"], "nola_home": home}


def drop_database() -> None:
    """Drop this process's FiftyOne database (only if fiftyone was imported)."""
    if "fiftyone" not in sys.modules:
        return
    with contextlib.suppress(Exception):
        import fiftyone.core.odm as foo

        db = foo.get_db_conn()
        db.client.drop_database(db.name)


def cleanup(env: dict) -> None:
    drop_database()
    shutil.rmtree(env.get("nola_home", ""), ignore_errors=True)


# --------------------------------------------------------------------------- timing


class Stopwatch:
    """``with Stopwatch() as sw: ...`` then ``sw.seconds``."""

    def __enter__(self) -> Stopwatch:
        self.t0 = time.perf_counter()
        self.seconds = float("nan")
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.t0


def repeat_timings(fn: Callable[[], Any], n: int, warmup: int = 1) -> list[float]:
    """Wall seconds of ``n`` calls of ``fn`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def latency_stats(seconds: Sequence[float]) -> dict:
    """Median / p90 / min / mean of a list of seconds, in milliseconds."""
    s = sorted(seconds)
    p90 = s[min(len(s) - 1, int(math.ceil(0.9 * len(s))) - 1)]
    return {
        "median_ms": 1000 * statistics.median(s),
        "p90_ms": 1000 * p90,
        "min_ms": 1000 * s[0],
        "mean_ms": 1000 * statistics.fmean(s),
        "n": len(s),
    }


class PartTimer:
    """Wall time of each benchmark part, printed as it ends and collected for the JSON."""

    def __init__(self) -> None:
        self.parts: dict[str, float] = {}

    @contextlib.contextmanager
    def part(self, name: str) -> Iterator[None]:
        print(f"\n=== {name} ===", flush=True)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            dt = time.perf_counter() - t0
            self.parts[name] = dt
            print(f"=== {name}: {dt:.1f} s wall ===", flush=True)


# --------------------------------------------------------------------------- memory


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS (VmHWM) on Linux; False if unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def current_rss_mb() -> float:
    return _status_kb("VmRSS") / 1024


def peak_rss_mb() -> float:
    """Peak RSS of this process (VmHWM; falls back to getrusage's ru_maxrss)."""
    kb = _status_kb("VmHWM")
    if kb <= 0:
        import resource

        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024


def _status_kb(key: str) -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return float(line.split()[1])
    except OSError:
        pass
    return -1.0


class TreeRssSampler:
    """Samples the summed RSS of this process and all its descendants (DataLoader workers).

    Shared pages are counted once per process, so the sum over-states real use a little; the
    main process's own peak comes from :func:`peak_rss_mb`, which is exact.
    """

    def __init__(self, interval: float = 0.05):
        self.interval = interval
        self.peak_mb = 0.0
        self.peak_children_mb = 0.0
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def __enter__(self) -> TreeRssSampler:
        import psutil

        self._proc = psutil.Process()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            total = children = 0
            try:
                total = self._proc.memory_info().rss
                for c in self._proc.children(recursive=True):
                    with contextlib.suppress(psutil.Error):
                        r = c.memory_info().rss
                        total += r
                        children += r
            except psutil.Error:
                pass
            self.peak_mb = max(self.peak_mb, total / 2**20)
            self.peak_children_mb = max(self.peak_children_mb, children / 2**20)
            self._stop.wait(self.interval)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


# --------------------------------------------------------------------------- machine facts


def _version(dist: str) -> Optional[str]:
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:
        return None


def machine_facts() -> dict:
    """CPU, threads, load and library versions: enough to read a result file on its own."""
    facts: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "loadavg_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                facts["cpu_model"] = line.split(":", 1)[1].strip()
                break
    with contextlib.suppress(OSError):
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal"):
                facts["mem_total_gb"] = round(float(line.split()[1]) / 2**20, 1)
                break
    try:
        import torch

        facts["torch_num_threads"] = torch.get_num_threads()
        facts["torch_num_interop_threads"] = torch.get_num_interop_threads()
        facts["cuda_available"] = torch.cuda.is_available()
    except Exception:
        pass
    with contextlib.suppress(Exception):
        import faiss

        facts["faiss_omp_threads"] = faiss.omp_get_max_threads()
    facts["versions"] = {
        d: _version(d)
        for d in (
            "torch",
            "torchvision",
            "open_clip_torch",
            "fiftyone",
            "fiftyone-brain",
            "faiss-cpu",
            "scikit-learn",
            "numpy",
            "pillow",
            "pillow-simd",
            "fiftyone-nola",
        )
    }
    facts["env"] = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") if os.environ.get(k)}
    return facts


def baseline_code(rev: str, tmp: Path) -> Path:
    """The repository at ``rev``, extracted (no checkout of this working tree is touched)."""
    dest = tmp / f"baseline-{rev}"
    dest.mkdir()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def loadavg() -> Optional[float]:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


# --------------------------------------------------------------------------- output


def _jsonable(o: Any) -> Any:
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:
        pass
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, dict):
        return {str(k): _jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_jsonable(v) for v in o]
    return o


def write_json(path: os.PathLike, data: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(_jsonable(data), indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)
    print(f"\nwrote {path}", flush=True)


def fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if not math.isfinite(v):
            return "-"
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        if abs(v) >= 100:
            return f"{v:.1f}"
        return f"{v:.{digits}g}"
    return str(v)


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]], title: str = "") -> str:
    """A plain-text table (right-aligned numbers) for terminals and .txt result files."""
    cells = [[fmt(c) for c in r] for r in rows]
    widths = [len(h) for h in headers]
    for r in cells:
        for i, c in enumerate(r):
            widths[i] = max(widths[i], len(c))
    line = "  ".join("-" * w for w in widths)
    out = []
    if title:
        out.append(title)
    out.append("  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(headers, widths))))
    out.append(line)
    for r in cells:
        out.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
    return "\n".join(out)


def run_benchmark(name: str, args, run: Callable, tmp_prefix: str) -> int:
    """The shared frame of a benchmark: isolated NOLA_HOME/database, machine facts, peak RSS of
    the whole process tree, whatever was measured kept if a part fails, table + JSON output."""
    import shutil
    import tempfile

    env = isolate_environment(tmp_prefix)
    results: dict = {
        "benchmark": name,
        "quick": getattr(args, "quick", False),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "args": vars(args).copy(),
    }
    tables: list[str] = []
    tmp = Path(tempfile.mkdtemp(prefix=f"{tmp_prefix}-"))
    t_all = time.perf_counter()
    sampler = TreeRssSampler()
    try:
        import fiftyone  # noqa: F401  (database start-up, outside every timing)

        results["machine"] = machine_facts()
        print(
            "machine:",
            json.dumps(
                {
                    k: results["machine"].get(k)
                    for k in ("cpu_count", "cpu_affinity", "torch_num_threads", "loadavg_at_start")
                }
            ),
        )
        with sampler:
            try:
                run(args, results, tables, tmp)
            except Exception as e:  # keep what was measured; say what broke
                import traceback

                traceback.print_exc()
                results["error"] = f"{type(e).__name__}: {e}"
                tables.append(f"ERROR (run stopped): {results['error']}")
        results["peak_rss_tree_mb"] = sampler.peak_mb
    finally:
        cleanup(env)
        shutil.rmtree(tmp, ignore_errors=True)
    return finish(results, tables, t_all, args)


def finish(results: dict, tables: list[str], t_all: float, args) -> int:
    """Total wall time and load into ``results``; print the tables; write ``--txt``/``--json``."""
    results["total_wall_s"] = time.perf_counter() - t_all
    results.setdefault("machine", {})["loadavg_at_end"] = list(os.getloadavg())
    start = results["machine"].get("loadavg_at_start") or [float("nan")]
    report = "\n\n".join(tables) + (
        f"\n\ntotal wall {results['total_wall_s']:.0f} s; load average at start "
        f"{start[0]:.2f}, at end {os.getloadavg()[0]:.2f} "
        f"(2 cores shared with other jobs: figures include that contention)\n"
    )
    print("\n" + report)
    if args.txt:
        Path(args.txt).parent.mkdir(parents=True, exist_ok=True)
        Path(args.txt).write_text(report)
    if args.json:
        write_json(args.json, results)
    return 0


def pretrained_mode() -> bool:
    """Accuracy figures only with real weights (``NOLA_PRETRAINED=1``)."""
    return os.environ.get("NOLA_PRETRAINED", "").strip().lower() in {"1", "true", "yes", "on"}


class Parts:
    """Wall seconds, images/s, peak RSS (VmHWM, reset per part) and load of each measured part."""

    def __init__(self):
        self.rows: dict[str, dict] = {}

    @contextlib.contextmanager
    def part(self, name: str, images: int):
        print(f"\n=== {name} ({images} images) ===", flush=True)
        reset_peak_rss()
        load0 = loadavg()
        t0 = time.perf_counter()
        row = {"images": images, "loadavg_start": load0}
        self.rows[name] = row
        yield row
        dt = time.perf_counter() - t0
        row.update(
            seconds=dt,
            images_per_s=images / dt if dt > 0 and images else None,
            peak_rss_mb=peak_rss_mb(),
            loadavg_end=loadavg(),
        )
        ips = f"{row['images_per_s']:.2f} img/s, " if row["images_per_s"] else ""
        print(
            f"=== {name}: {dt:.2f} s, {ips}peak RSS {row['peak_rss_mb']:.0f} MB, "
            f"load {load0:.2f} -> {row['loadavg_end']:.2f} ===",
            flush=True,
        )


# --------------------------------------------------------------------------- exact search


def exact_topk(blocks, q, k: int):
    """Exact inner-product top-k positions over ``(start, rows)`` blocks, best first (numpy BLAS)."""
    import numpy as np

    nq = len(q)
    best_s = np.full((nq, 0), -np.inf, dtype=np.float32)
    best_i = np.empty((nq, 0), dtype=np.int64)
    for s, x in blocks:
        # Score blocks of <= 128 MB, whatever the block size handed in.
        step = max(4096, (1 << 27) // (4 * max(1, nq)))
        for o in range(0, len(x), step):
            sc = q @ x[o : o + step].T
            kk = min(k, sc.shape[1])
            part = np.argpartition(-sc, kk - 1, axis=1)[:, :kk]
            best_s = np.concatenate([best_s, np.take_along_axis(sc, part, axis=1)], axis=1)
            best_i = np.concatenate([best_i, part + s + o], axis=1)
            if best_s.shape[1] > k:
                keep = np.argpartition(-best_s, k - 1, axis=1)[:, :k]
                best_s = np.take_along_axis(best_s, keep, axis=1)
                best_i = np.take_along_axis(best_i, keep, axis=1)
    order = np.argsort(-best_s, axis=1, kind="stable")
    return np.take_along_axis(best_i, order, axis=1)
