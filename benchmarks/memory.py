"""Bounded memory: peak RSS of each stage at growing N, fiftyone-nola vs FiftyOne's own equivalents.

For every N (default 1k, 10k, 50k) and every side, a FRESH child process imports FiftyOne,
creates a dataset of N distinct JPEG files (copies of CIFAR-10 32x32 images, cached between
runs), loads the model, runs every stage once on a 64-sample warm-up dataset (lazy imports,
thread pools, text cache), and then measures each stage on the N samples:

* peak growth = VmHWM during the stage (reset just before it) minus the RSS just before it,
  after ``gc.collect()`` + ``malloc_trim(0)`` so that memory freed by an earlier stage is not
  silently reused;
* tree growth = sampled peak (every 20 ms) of main-process RSS plus the private memory (USS)
  of its DataLoader workers, minus the RSS before the stage (forked workers share the main
  process's pages; USS counts only what a worker adds, copy-on-write pages included);
* retained = RSS after the stage (gc + trim) minus RSS before it (what the stage leaks or
  caches);
* seconds of wall time (2 shared cores: noisy).

Stages, ours vs baseline (same tiny CLIP weights, same batch size and DataLoader workers):

1. embed: ``fiftyone_nola.stages.embeddings.compute_embeddings(ds, "clip")`` (FAISS flat store) vs
   ``ds.compute_embeddings(model)`` (returns the N x D array);
2. zero-shot labels: ``fiftyone_nola.stages.nola.zero_shot`` (from the stored embeddings, writes
   ``nola_zeroshot``) vs ``ds.apply_model(model, "fo_zeroshot")`` with FiftyOne's open_clip
   zero-shot model (reads every image again);
3. predict: ``fiftyone_nola.stages.nola.predict`` with a saved, untrained prompt-tuned model
   (reads every image, writes ``nola_predict``) vs the same ``apply_model`` run as in 2 (FiftyOne
   has one "run a model over the images and write a field" path; it is measured once).

The model is ``fiftyone_nola.core.models.tiny_clip_spec()``'s architecture (``nola-tiny-clip``,
D = 32, 32 px input) with its random weights saved once to a temporary checkpoint; both sides
load that file (FiftyOne through ``TorchOpenClipModelConfig(clip_model="nola-tiny-clip",
pretrained=<file>)`` after registering the tiny config with ``open_clip.add_model_config``).

Two extra measurements explain what the RSS figures show. A second pass (``--trace-sizes``,
default 1k and 5k, fresh children again) measures each stage's Python-heap peak with
``tracemalloc`` (Python objects and NumPy buffers, not torch or C libraries): deterministic,
so per-sample costs show that 10-20 MB of run-to-run RSS noise would hide. And on our side a
diagnostic row times ``fiftyone_nola.stages.fo_io.write_classifications`` alone (the field write that
zero-shot and predict share) on ids and probabilities built beforehand.

What must grow with N is printed next to each measurement as the "floor": per sample, the
stage's float32 rows (D-dim vectors, C-dim probabilities) plus one id string and one
filepath string where the stage holds the full lists. Flat means measured growth minus floor
does not grow with N: the slope column is MB per 1,000 samples between the smallest and largest N.

Usage::

    .venv/bin/python benchmarks/memory.py --quick                 # N = 500, 2000 (~5 min)
    .venv/bin/python benchmarks/memory.py --json benchmarks/results/memory.json \\
        --txt benchmarks/results/memory.txt      # N = 1k, 10k, 50k (+ 1k, 5k traced): ~36 min
                                                 # on 2 shared cores, 24 of them at N = 50k
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import _common as C  # noqa: E402
from embeddings import CIFAR_DIR, DEFAULT_CACHE, copies_of, make_dataset  # noqa: E402

SIDES = ("ours", "fiftyone")
STAGES = ("embed", "zero-shot labels", "predict")
DIAG = "write_classifications alone"  # ours only: the field write inside zero-shot and predict
ROWS = STAGES + (DIAG,)
WARMUP_N = 64
# A stage is called flat when its growth above the floor rises by less than this many MB per
# 1,000 samples (~520 bytes per sample: 25 MB from 1k to 50k; repeated RSS runs differ by
# 10-20 MB, so a smaller threshold would call noise growth).
FLAT_MB_PER_1K = 0.5


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="N = 500, 2000 (development; ~5 min)")
    p.add_argument("--sizes", help="comma-separated N; default 1000,10000,50000 (quick 500,2000)")
    p.add_argument("--sides", default=",".join(SIDES), help="ours,fiftyone (default both)")
    p.add_argument("--batch-size", type=int, default=32, help="both sides (default 32)")
    p.add_argument("--num-workers", type=int, default=1, help="DataLoader workers, both sides (default 1)")
    p.add_argument(
        "--cache-dir",
        default=str(DEFAULT_CACHE),
        help="where the N image copies are kept between runs (shared with embeddings.py)",
    )
    p.add_argument(
        "--trace-sizes", help="N for the tracemalloc (Python heap) pass; default 1000,5000 (quick 500,2000; '' to skip)"
    )
    p.add_argument("--child-timeout", type=float, default=3600, help="seconds per child process")
    p.add_argument("--json", metavar="PATH", help="write all figures to this JSON file")
    p.add_argument("--txt", metavar="PATH", help="also write the printed tables to this file")
    # internal: one child process = one side at one N
    p.add_argument("--_child", choices=SIDES, help=argparse.SUPPRESS)
    p.add_argument("--_n", type=int, help=argparse.SUPPRESS)
    p.add_argument("--_dir", help=argparse.SUPPRESS)
    p.add_argument("--_ckpt", help=argparse.SUPPRESS)
    p.add_argument("--_out", help=argparse.SUPPRESS)
    p.add_argument("--_trace", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.sizes = sorted(int(s) for s in (a.sizes or ("500,2000" if a.quick else "1000,10000,50000")).split(",") if s)
    a.trace_sizes = sorted(
        int(s)
        for s in (a.trace_sizes if a.trace_sizes is not None else ("500,2000" if a.quick else "1000,5000")).split(",")
        if s
    )
    a.sides = [s for s in a.sides.split(",") if s]
    bad = set(a.sides) - set(SIDES)
    if bad:
        p.error(f"unknown side(s) {sorted(bad)}; choose from {SIDES}")
    return a


# =========================================================================== measuring


def _malloc_trim() -> None:
    """Hand freed heap back to the OS, so an earlier stage's free memory does not hide growth."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _settle() -> float:
    gc.collect()
    _malloc_trim()
    return C.current_rss_mb()


class TreeSampler:
    """Peak of main-process RSS + the private memory (USS) of its DataLoader workers.

    Forked workers share the parent's pages: summing their RSS would count the parent once per
    worker (``_common.TreeRssSampler`` does, which is why it is not used here). USS counts only
    what each worker adds, including pages it copies on write.
    """

    def __init__(self, interval: float = 0.02):
        self.interval = interval
        self.peak_mb = 0.0
        self.workers_peak_mb = 0.0
        self._stop = threading.Event()

    def sample(self) -> tuple[float, float]:
        import psutil

        total = self._proc.memory_info().rss
        workers = 0
        for c in self._proc.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                workers += c.memory_full_info().uss
        return (total + workers) / 2**20, workers / 2**20

    def __enter__(self) -> TreeSampler:
        import psutil

        self._proc = psutil.Process()
        self.start_mb = self.sample()[0]
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(Exception):
                tot, w = self.sample()
                self.peak_mb = max(self.peak_mb, tot)
                self.workers_peak_mb = max(self.workers_peak_mb, w)
            self._stop.wait(self.interval)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


_TRACE = False  # set in a --_trace child: measure the Python heap with tracemalloc instead


def measure_traced(name: str, fn) -> tuple[dict, object]:
    """Peak of the Python heap (tracemalloc: Python objects and NumPy buffers, not torch or C
    libraries) allocated during ``fn()``: deterministic, unlike RSS, so small slopes show."""
    import tracemalloc

    gc.collect()
    tracemalloc.start(1)
    t = time.perf_counter()
    result = fn()
    secs = time.perf_counter() - t
    cur, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    row = {"traced_peak_mb": peak / 2**20, "traced_end_mb": cur / 2**20, "seconds_traced": secs}
    print(f"    {name}: Python heap peak +{row['traced_peak_mb']:.1f} MB, {secs:.1f} s (traced)", flush=True)
    return row, result


def measure(name: str, fn) -> tuple[dict, object]:
    """Run ``fn()`` once; return its memory/time row and its result."""
    if _TRACE:
        return measure_traced(name, fn)
    before = _settle()
    C.reset_peak_rss()
    with TreeSampler() as tree:
        t = time.perf_counter()
        result = fn()
        secs = time.perf_counter() - t
    peak = C.peak_rss_mb()
    row = {
        "rss_before_mb": before,
        "peak_rss_mb": peak,
        "peak_growth_mb": peak - before,
        "tree_peak_mb": tree.peak_mb,
        "tree_growth_mb": max(tree.peak_mb, peak) - tree.start_mb,
        "workers_uss_peak_mb": tree.workers_peak_mb,
        "seconds": secs,
        "loadavg": C.loadavg(),
    }
    row["retained_mb"] = _settle() - before
    print(
        f"    {name}: +{row['peak_growth_mb']:.1f} MB peak (tree +{row['tree_growth_mb']:.1f}), "
        f"retained {row['retained_mb']:+.1f} MB, {secs:.1f} s",
        flush=True,
    )
    return row, result


def per_sample_bytes(ds) -> dict:
    """Bytes one sample id / filepath string costs in a Python list (object + list slot)."""
    ids, paths = ds.limit(200).values(["id", "filepath"])
    return {
        "id": sum(sys.getsizeof(s) for s in ids) / len(ids) + 8,
        "path": sum(sys.getsizeof(s) for s in paths) / len(paths) + 8,
    }


def floors(side: str, n: int, d: int, c: int, b: dict) -> dict:
    """Bytes per stage that must grow with N (see the module docstring), in MB."""
    vec, prob, sid, path = 4 * d, 4 * c, b["id"], b["path"]
    per = {
        "ours": {"embed": vec + sid + path, "zero-shot labels": vec + prob + sid, "predict": prob + sid + path},
        "fiftyone": {"embed": vec + sid + path, "zero-shot labels": sid + path, "predict": sid + path},
    }[side]
    per[DIAG] = 0.0
    return {k: n * v / 2**20 for k, v in per.items()}


def class_names() -> list[str]:
    return sorted(p.name for p in CIFAR_DIR.iterdir() if p.is_dir())


# =========================================================================== children


def child(args) -> None:
    global _TRACE
    _TRACE = bool(args._trace)
    env = C.isolate_environment(f"nola-bench-mem-{args._child}")
    tmp = Path(tempfile.mkdtemp(prefix="nola-bench-mem-child-"))
    try:
        import fiftyone as fo

        files = sorted(str(p) for p in Path(args._dir).iterdir())[: args._n]
        if len(files) < args._n:
            raise SystemExit(f"only {len(files)} files in {args._dir}")
        warm_files = files[:WARMUP_N]
        classes = class_names()
        t = time.perf_counter()
        ds = make_dataset(fo, f"mem-{args._n}", files)
        create_s = time.perf_counter() - t
        print(f"  [{args._child} N={args._n:,}] dataset created in {create_s:.1f} s", flush=True)
        run = (_ours_stages if args._child == "ours" else _fiftyone_stages)(args, fo, classes, tmp)
        run(fo, make_dataset(fo, "warmup", warm_files), warm=True)
        fo.delete_dataset("warmup")
        rows, d = run(fo, ds, warm=False)
        b = per_sample_bytes(ds)
        out = {
            "side": args._child,
            "n": args._n,
            "dim": d,
            "classes": len(classes),
            "dataset_create_s": create_s,
            "bytes_per_sample": b,
            "floor_mb": floors(args._child, args._n, d, len(classes), b),
            "stages": rows,
        }
        Path(args._out).write_text(json.dumps(out))
    finally:
        C.cleanup(env)
        shutil.rmtree(tmp, ignore_errors=True)


def _ours_stages(args, fo, classes, tmp: Path):
    import numpy as np

    from fiftyone_nola.core import prompt_tuning
    from fiftyone_nola.core.embed import EmbedConfig
    from fiftyone_nola.core.models import TINY_CLIP_ARCH, ClipSpec, load_clip
    from fiftyone_nola.stages import fo_io
    from fiftyone_nola.stages import nola as labeling
    from fiftyone_nola.stages.embeddings import compute_embeddings

    spec = ClipSpec(arch=TINY_CLIP_ARCH, pretrained=args._ckpt, random_init=False)
    clip = load_clip(spec)  # cached: the stages reuse it (model load is not measured)
    rng = np.random.default_rng(0)
    W = rng.standard_normal((len(classes), clip.embed_dim)).astype(np.float32)
    W /= np.linalg.norm(W, axis=1, keepdims=True)
    model_dir = tmp / "tuned"
    prompt_tuning.save_tuned(model_dir, prompt_tuning.PromptedClassifier.from_clip(clip, W), classes, clip.identity)
    cfg = EmbedConfig(batch_size=args.batch_size, num_workers=args.num_workers, device="cpu")
    zcfg = labeling.ZeroShotConfig(clip=spec, device="cpu")

    def run(fo, ds, warm: bool):
        n = len(ds)
        stages = {
            "embed": lambda: compute_embeddings(ds, "clip", clip=spec, config=cfg)["clip"],
            "zero-shot labels": lambda: labeling.zero_shot(ds, classes, zcfg),
            "predict": lambda: labeling.predict(
                ds,
                str(model_dir),
                clip=spec,
                label_field="nola_predict",
                config=labeling.PredictConfig(batch_size=args.batch_size, num_workers=args.num_workers),
                device="cpu",
            ),
        }
        rows = {}
        for name, fn in stages.items():
            if warm:
                fn()
                continue
            rows[name], s = measure(name, fn)
            rows[name]["function"] = {
                "embed": "fiftyone_nola.stages.embeddings.compute_embeddings",
                "zero-shot labels": "fiftyone_nola.stages.nola.zero_shot",
                "predict": "fiftyone_nola.stages.nola.predict",
            }[name]
            done = s.get("embedded", s.get("labelled"))
            if done != n:
                raise RuntimeError(f"{name}: {done} of {n} samples done ({s})")
        # Diagnostic, not a stage: the field write that zero_shot and predict share, alone, on
        # ids and probabilities built beforehand (so its floor is zero).
        ids = ds.values("id")
        probs = rng.dirichlet(np.ones(len(classes)), size=n).astype(np.float32)
        write = lambda: fo_io.write_classifications(ds, ids, classes, probs, "nola_probe")  # noqa: E731
        if warm:
            write()
        else:
            rows[DIAG], written = measure(DIAG, write)
            rows[DIAG]["function"] = "fiftyone_nola.stages.fo_io.write_classifications"
            assert written == n, written
            for f in ("nola_zeroshot", "nola_predict"):
                assert ds.count(f"{f}.label") == n, (f, ds.count(f"{f}.label"))
        return rows, clip.embed_dim

    return run


def _fiftyone_stages(args, fo, classes, tmp: Path):
    import fiftyone.utils.open_clip as fouc
    import numpy as np
    import open_clip

    import fiftyone_nola.core.models as nm

    # What fiftyone_nola.core.models.load_clip does on first use: make "nola-tiny-clip" known to
    # open_clip (the config file ships in fiftyone_nola/configs/).
    if nm.TINY_CLIP_ARCH not in open_clip.list_models():
        open_clip.add_model_config(nm._CONFIG_DIR)
    model = fouc.TorchOpenClipModel(
        fouc.TorchOpenClipModelConfig(
            dict(
                clip_model=nm.TINY_CLIP_ARCH,
                pretrained=args._ckpt,
                embeddings_layer="visual",  # as the zoo's open-clip-torch entry
                classes=classes,
                text_prompt="A photo of a",
                output_processor_cls="fiftyone.utils.torch.ClassifierOutputProcessor",
                device="cpu",
            )
        )
    )
    kw = dict(batch_size=args.batch_size, num_workers=args.num_workers, progress=False)

    def run(fo, ds, warm: bool):
        n = len(ds)
        rows = {}
        if warm:
            ds.compute_embeddings(model, **kw)
            ds.apply_model(model, "fo_zeroshot", **kw)
            return rows, None
        rows["embed"], emb = measure("embed", lambda: np.asarray(ds.compute_embeddings(model, **kw)))
        rows["embed"]["function"] = "fiftyone.core.collections.SampleCollection.compute_embeddings"
        if emb.shape[0] != n:
            raise RuntimeError(f"FiftyOne returned {emb.shape} embeddings for {n} samples")
        d = int(emb.shape[1])
        del emb
        row, _ = measure("apply_model", lambda: ds.apply_model(model, "fo_zeroshot", **kw))
        row["function"] = "fiftyone.core.collections.SampleCollection.apply_model"
        got = ds.count("fo_zeroshot.label")
        if got != n:
            raise RuntimeError(f"apply_model labelled {got} of {n} samples")
        rows["zero-shot labels"] = row
        rows["predict"] = {**row, "same_run_as": "zero-shot labels"}
        return rows, d

    return run


# =========================================================================== parent


def make_checkpoint(path: Path) -> dict:
    """Save the tiny CLIP's random weights (what tiny_clip_spec() builds) to ``path``."""
    import torch

    from fiftyone_nola.core.models import load_clip, tiny_clip_spec

    m = load_clip(tiny_clip_spec(), cache=False)
    torch.save(m.model.state_dict(), path)
    return {
        "arch": m.spec.arch,
        "embed_dim": m.embed_dim,
        "image_size": m.image_size,
        "parameters": sum(p.numel() for p in m.model.parameters()),
        "checkpoint_bytes": path.stat().st_size,
    }


def run_child(args, side: str, n: int, img_dir: Path, ckpt: Path, trace: bool = False) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        outp = f.name
    cmd = [
        sys.executable,
        __file__,
        "--_child",
        side,
        "--_n",
        str(n),
        "--_dir",
        str(img_dir),
        "--_ckpt",
        str(ckpt),
        "--_out",
        outp,
        "--batch-size",
        str(args.batch_size),
        "--num-workers",
        str(args.num_workers),
    ] + (["--_trace"] if trace else [])
    t = time.perf_counter()
    try:
        subprocess.run(cmd, check=True, timeout=args.child_timeout)
        r = json.loads(Path(outp).read_text())
    finally:
        with contextlib.suppress(OSError):
            os.unlink(outp)
    r["child_wall_s"] = time.perf_counter() - t
    return r


def slope(by_n: dict, key) -> float:
    """MB per 1,000 samples between the smallest and largest N."""
    ns = sorted(by_n)
    lo, hi = ns[0], ns[-1]
    return (key(by_n[hi]) - key(by_n[lo])) / ((hi - lo) / 1000) if hi > lo else float("nan")


def _slopes(res: dict, metric: str) -> dict:
    """slopes[stage][side] of ``metric`` and of the floor, and their difference (the excess)."""
    out: dict = {}
    for st in ROWS:
        out[st] = {}
        for side, by_n in res.items():
            if len(by_n) < 2 or any(st not in r["stages"] for r in by_n.values()):
                continue
            g = slope(by_n, lambda r, st=st: r["stages"][st][metric])
            f = slope(by_n, lambda r, st=st: r["floor_mb"][st])
            excess = g - f
            out[st][side] = {
                "growth_mb_per_1k": g,
                "floor_mb_per_1k": f,
                "excess_mb_per_1k": excess,
                "excess_bytes_per_sample": excess * 2**20 / 1000,
                "flat": bool(excess < FLAT_MB_PER_1K),
            }
            if metric == "peak_growth_mb":
                out[st][side]["tree_growth_mb_per_1k"] = slope(by_n, lambda r, st=st: r["stages"][st]["tree_growth_mb"])
                out[st][side]["retained_mb_per_1k"] = slope(by_n, lambda r, st=st: r["stages"][st]["retained_mb"])
    return out


def _slope_table(slopes: dict, sides: list[str], ns: list[int], what: str) -> str:
    head, rows = ["stage"], []
    for s in sides:
        head += [f"{s} MB/1k", f"{s} floor MB/1k", f"{s} excess B/sample", s]
    for st in ROWS:
        row = [st]
        for s in sides:
            v = slopes[st].get(s)
            row += (
                [
                    v["growth_mb_per_1k"],
                    v["floor_mb_per_1k"],
                    v["excess_bytes_per_sample"],
                    "flat" if v["flat"] else "GROWS",
                ]
                if v
                else [None] * 4
            )
        rows.append(row)
    return C.table(
        head,
        rows,
        title=(
            f"Slope of {what} between N={ns[0]:,} and N={ns[-1]:,} (MB per 1,000 samples); excess = "
            f"slope - floor slope, in bytes per sample; flat = excess < {FLAT_MB_PER_1K} MB per 1k "
            f"({FLAT_MB_PER_1K * 2**20 / 1000:.0f} B/sample)"
        ),
    )


def summarise(args, res: dict, traced: dict, results: dict, tables: list[str]) -> None:
    """res / traced [side][n] = child output (RSS pass / tracemalloc pass)."""
    first = _first(res) or _first(traced)
    if res:
        sides = [s for s in SIDES if s in res]
        ns = sorted({n for s in sides for n in res[s]})
        head = ["stage", "N"]
        for s in sides:
            head += [f"{s} growth MB", f"{s} floor MB", f"{s} tree MB", f"{s} retained MB", f"{s} s"]
        rows = []
        for st in ROWS:
            for n in ns:
                row = [st, f"{n:,}"]
                for s in sides:
                    r = res[s].get(n)
                    if r is None or st not in r["stages"]:
                        row += [None] * 5
                        continue
                    m = r["stages"][st]
                    row += [m["peak_growth_mb"], r["floor_mb"][st], m["tree_growth_mb"], m["retained_mb"], m["seconds"]]
                rows.append(row)
        tables.append(
            C.table(
                head,
                rows,
                title=(
                    f"Peak RSS growth per stage (main process; VmHWM reset before each stage), fresh child "
                    f"process per side and N; tiny CLIP (D={first['dim']}, 32 px), {first['classes']} classes, "
                    f"batch {args.batch_size}, {args.num_workers} DataLoader worker(s)\n"
                    f"floor = what must grow (float32 rows + id/path strings); tree = main RSS + workers' USS; "
                    f"retained = RSS after - before; FiftyOne's zero-shot and predict rows are its one "
                    f"apply_model run"
                ),
            )
        )
        if len(ns) >= 2:
            results["slopes"] = _slopes(res, "peak_growth_mb")
            tables.append(_slope_table(results["slopes"], sides, ns, "peak RSS growth"))
        results["by_side"] = {s: {str(n): r for n, r in res[s].items()} for s in sides}
        for s in sides:
            r = res[s].get(ns[-1])
            for st in ROWS:
                if r and st in r["stages"]:
                    key = st.replace("-", "").replace(" ", "_")
                    results[f"{s}_{key}_growth_mb_{ns[-1]}"] = r["stages"][st]["peak_growth_mb"]
    if traced:
        sides = [s for s in SIDES if s in traced]
        ns = sorted({n for s in sides for n in traced[s]})
        head = ["stage", "N"]
        for s in sides:
            head += [f"{s} heap peak MB", f"{s} floor MB", f"{s} s (traced)"]
        rows = []
        for st in ROWS:
            for n in ns:
                row = [st, f"{n:,}"]
                for s in sides:
                    r = traced[s].get(n)
                    row += (
                        [r["stages"][st]["traced_peak_mb"], r["floor_mb"][st], r["stages"][st]["seconds_traced"]]
                        if r and st in r["stages"]
                        else [None] * 3
                    )
                rows.append(row)
        tables.append(
            C.table(
                head,
                rows,
                title=(
                    "Python heap (tracemalloc: Python objects + NumPy buffers; not torch/C libraries) "
                    "allocated at the peak of each stage, fresh child per side and N (deterministic: "
                    "shows per-sample costs that RSS noise hides)"
                ),
            )
        )
        if len(ns) >= 2:
            results["traced_slopes"] = _slopes(traced, "traced_peak_mb")
            tables.append(_slope_table(results["traced_slopes"], sides, ns, "Python-heap peak"))
        results["traced_by_side"] = {s: {str(n): r for n, r in traced[s].items()} for s in sides}
    flat = {}
    for key in ("slopes", "traced_slopes"):
        for st, v in results.get(key, {}).items():
            if "ours" in v and st in STAGES:
                flat[st] = flat.get(st, True) and v["ours"]["flat"]
    if flat:
        results["ours_flat"] = flat
        results["ours_flat_all_stages"] = all(flat.values())


def _first(res: dict) -> dict:
    for s in res.values():
        for r in s.values():
            return r
    return {}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args._child:
        child(args)
        return 0
    env = C.isolate_environment("nola-bench-mem")
    tmp = Path(tempfile.mkdtemp(prefix="nola-bench-mem-"))
    results: dict = {
        "benchmark": "memory",
        "quick": args.quick,
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "args": {k: v for k, v in vars(args).items() if not k.startswith("_")},
        "flat_threshold_mb_per_1k": FLAT_MB_PER_1K,
        "measured": __doc__.split("\n\n")[1].strip(),
    }
    tables: list[str] = []
    t_all = time.perf_counter()
    res: dict = {s: {} for s in args.sides}
    traced: dict = {s: {} for s in args.sides}

    def partial() -> None:
        if args.json:  # partial results survive an interrupted run
            C.write_json(
                args.json,
                {
                    **results,
                    "partial": True,
                    "by_side": {s: {str(k): v for k, v in r.items()} for s, r in res.items()},
                    "traced_by_side": {s: {str(k): v for k, v in r.items()} for s, r in traced.items()},
                },
            )

    def one(side: str, n: int, trace: bool) -> None:
        what = "tracemalloc" if trace else "RSS"
        print(f"\n=== {side}, N={n:,}, {what} (fresh process) ===", flush=True)
        try:
            (traced if trace else res)[side][n] = r = run_child(args, side, n, img_dir, ckpt, trace)
        except Exception as e:  # keep the rest; say what broke
            print(f"  FAILED: {type(e).__name__}: {e}", flush=True)
            results.setdefault("errors", {})[f"{side}_{n}_{what}"] = f"{type(e).__name__}: {e}"
            return
        print(f"  child wall {r['child_wall_s']:.0f} s", flush=True)

    try:
        results["machine"] = C.machine_facts()
        print(
            "machine:",
            json.dumps(
                {
                    k: results["machine"].get(k)
                    for k in ("cpu_count", "cpu_affinity", "torch_num_threads", "loadavg_at_start")
                }
            ),
        )
        t = time.perf_counter()
        files = sorted(str(p) for p in CIFAR_DIR.rglob("*.jpg"))
        n_max = max(args.sizes + args.trace_sizes)
        copies_of(files, n_max, Path(args.cache_dir), "cifar")
        img_dir = Path(args.cache_dir) / "cifar_copies"
        print(f"{n_max:,} image copies ready in {img_dir} ({time.perf_counter() - t:.1f} s)")
        ckpt = tmp / "nola-tiny-clip-random.pt"
        results["model"] = make_checkpoint(ckpt)
        results["images"] = {
            "source": str(CIFAR_DIR),
            "distinct_sources": len(files),
            "copies_dir": str(img_dir),
            "size": "32x32 JPEG",
        }
        # The deterministic tracemalloc pass first (small N, quick), then the RSS pass.
        for n in args.trace_sizes:
            for side in args.sides:
                one(side, n, trace=True)
            partial()
        for n in args.sizes:
            for side in args.sides:
                one(side, n, trace=False)
            partial()
        summarise(args, {s: r for s, r in res.items() if r}, {s: r for s, r in traced.items() if r}, results, tables)
    finally:
        C.cleanup(env)
        shutil.rmtree(tmp, ignore_errors=True)
    return C.finish(results, tables, t_all, args)


if __name__ == "__main__":
    sys.exit(main())
