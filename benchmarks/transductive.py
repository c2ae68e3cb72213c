"""Transductive labeling (TransCLIP / StatA / ZLaP on stored embeddings): seconds and peak
memory from 1,000 to 1,000,000 vectors, and the cost next to prompt tuning + prediction.

1. **1,000 real images**: the class-balanced 1,000 CIFAR-10 images of the demo
   (``../shared/data/cifar10_2k``), CLIP ViT-B-32 embeddings stored by the embedding stage and
   the CDE zero-shot stage with the official description file (not timed), then the
   ``transductive_labels`` stage, timed end to end (stored vectors and class weights read, kNN
   graph, solver, field written, run recorded), cold once then the median of 3, for the default
   (TransCLIP + StatA safeguard) and each other method. Random weights unless
   ``NOLA_PRETRAINED=1`` (then accuracy against the folder labels is printed too).
2. **Ratio to training**: prompt tuning + prediction on the same 1,000 images take 97 s + 75 s
   in ``make demo`` on a 2-core CPU (README.md, "Quick start": the demo's per-stage timings);
   ``--tuning-seconds`` / ``--predict-seconds`` replace them with your own figures.
   ``transductive_vs_tuning_ratio`` = (tuning + prediction) / the default stage's median seconds.
3. **100,000 and 1,000,000 vectors**: synthetic 512-d unit vectors (10 classes of 50 modes
   each, per-dimension noise spread over 1.5 decades, noisy text embeddings: zero-shot ~70 %),
   the core ``label`` call (the stage minus FiftyOne I/O) with the default settings: an ivf kNN
   graph above 20,000 vectors. The 1M case runs in a child process (``nice``) whose peak RSS
   (VmHWM) is reported, the vectors themselves (2 GB, what a loaded store holds) included.
4. **Approximate graph quality** at 20,000 synthetic vectors: recall of the ivf graph against
   the exact one and how many assignments each method keeps.

Usage::

    .venv/bin/python benchmarks/transductive.py --quick          # ~2 min, no 1M
    nice -n 10 .venv/bin/python benchmarks/transductive.py --json benchmarks/results/transductive.json \\
        --txt benchmarks/results/transductive.txt
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import _common as C  # noqa: E402

DATA = C.SHARED_DATA / "cifar10_2k"
TUNING_SECONDS, PREDICT_SECONDS = 97.0, 75.0  # README.md quick start: make demo, 1,000 images, 2-core CPU


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="200 images, 10k synthetic vectors, no 1M (~2 min)")
    p.add_argument("--json", metavar="PATH", help="write the figures to this JSON file")
    p.add_argument("--txt", metavar="PATH", help="also write the printed tables to this file")
    p.add_argument("--n", type=int, help="real images (default 1000, quick 200)")
    p.add_argument("--large", type=int, help="synthetic vectors of the mid-size case (default 100000, quick 10000)")
    p.add_argument("--skip-1m", action="store_true", help="skip the 1,000,000-vector child process")
    p.add_argument("--tuning-seconds", type=float, default=TUNING_SECONDS)
    p.add_argument("--predict-seconds", type=float, default=PREDICT_SECONDS)
    p.add_argument("--child", type=int, help=argparse.SUPPRESS)  # internal: the 1M measurement
    a = p.parse_args(argv)
    a.n = a.n or (200 if a.quick else 1000)
    a.large = a.large or (10_000 if a.quick else 100_000)
    a.skip_1m = a.skip_1m or a.quick
    return a


def synthetic(n: int, d: int = 512, classes: int = 10, modes: int = 50, seed: int = 0):
    """``(x N×d unit float32, text C×d, labels)``: classes of ``modes`` modes sharing a common
    direction, per-dimension noise from 0.01 to 0.2, text = class centre + noise. Built in
    blocks: memory is the N×d result plus one block."""
    import numpy as np

    rng = np.random.default_rng(seed)
    cen = rng.standard_normal((classes, d))
    cen /= np.linalg.norm(cen, axis=1, keepdims=True)
    cen[:, 0] += 2.0
    cen /= np.linalg.norm(cen, axis=1, keepdims=True)
    sub = cen.repeat(modes, 0) + rng.standard_normal((classes * modes, d)) / np.sqrt(d)
    scale = np.exp(rng.uniform(np.log(0.01), np.log(0.2), d))
    lab = rng.integers(0, classes * modes, n)
    x = np.empty((n, d), np.float32)
    for s in range(0, n, 65536):
        e = min(n, s + 65536)
        blk = sub[lab[s:e]] + scale * rng.standard_normal((e - s, d))
        x[s:e] = blk / np.linalg.norm(blk, axis=1, keepdims=True)
    text = cen + 0.9 * rng.standard_normal((classes, d)) / np.sqrt(d)
    text = (text / np.linalg.norm(text, axis=1, keepdims=True)).astype(np.float32)
    return x, text, lab // modes


def core_run(x, text, config):
    """Seconds (total, graph, solve) and the result of ``label`` on unit rows ``x``."""
    from fiftyone_nola.core.transductive import label, text_prior

    t0 = time.perf_counter()
    prior = text_prior(x, text, config.logit_scale)
    res = label(x, prior, config, text, x @ text.T if config.method == "zlap" else None)
    return time.perf_counter() - t0, res


def child(n: int) -> int:
    """The 1M measurement in its own process: synthetic vectors, then ``label`` with the defaults."""
    import numpy as np

    from fiftyone_nola.core.transductive import TransductiveConfig

    t0 = time.perf_counter()
    x, text, lab = synthetic(n)
    gen = time.perf_counter() - t0
    rss_data = C.current_rss_mb()
    seconds, res = core_run(x, text, TransductiveConfig())
    print(
        "RESULT "
        + json.dumps(
            {
                "n": n,
                "generate_seconds": gen,
                "seconds": seconds,
                "graph_seconds": res.info["graph_seconds"],
                "solve_seconds": res.info["solve_seconds"],
                "graph": res.info["graph"],
                "changed": res.info["changed"],
                "vectors_mb": x.nbytes / 2**20,
                "rss_after_data_mb": rss_data,
                "peak_rss_mb": C.peak_rss_mb(),
                "accuracy_on_synthetic_labels": float((res.probs.argmax(1) == lab).mean()),
                "loadavg_end": C.loadavg(),
            }
        ),
        flush=True,
    )
    del np
    return 0


def real_images(args, results, tables, tmp):
    """Part 1: the stage on the stored vectors of ``args.n`` CIFAR-10 images."""
    import fiftyone as fo
    import numpy as np
    from nola_accuracy import balanced_files

    from fiftyone_nola.core.embed import EmbedConfig
    from fiftyone_nola.core.models import ClipSpec
    from fiftyone_nola.core.transductive import TransductiveConfig
    from fiftyone_nola.stages.embeddings import compute_embeddings
    from fiftyone_nola.stages.nola import ZeroShotConfig, zero_shot
    from fiftyone_nola.stages.transductive import transductive_labels

    pretrained = C.pretrained_mode()
    files, labels, classes = balanced_files(args.n)
    ds = fo.Dataset(f"nola-bench-transductive-{os.getpid()}")
    ds.add_samples([fo.Sample(filepath=f, gt=fo.Classification(label=c)) for f, c in zip(files, labels)])
    clip = ClipSpec(random_init=not pretrained)
    with C.Stopwatch() as sw:
        compute_embeddings(ds, "clip", clip, config=EmbedConfig())
        zero_shot(ds, classes, ZeroShotConfig(clip=clip, descriptions_file=str(DATA / "descriptions.json")))
    print(f"embeddings + zero-shot (not timed below): {sw.seconds:.1f} s")
    variants = {
        "transclip+stata (default)": TransductiveConfig(),
        "transclip": TransductiveConfig(safeguard=False),
        "zlap+presence": TransductiveConfig(method="zlap"),
        "zlap": TransductiveConfig(method="zlap", safeguard=False),
    }
    rows, out = [], {}
    gt = np.array(ds.values("gt.label"))
    for name, cfg in variants.items():
        field = "t_" + "".join(ch if ch.isalnum() else "_" for ch in name)
        cold = time.perf_counter()
        transductive_labels(ds, config=cfg, label_field=field)
        cold = time.perf_counter() - cold
        warm = C.repeat_timings(
            lambda cfg=cfg, field=field: transductive_labels(ds, config=cfg, label_field=field), 3, 0
        )
        row = {"cold_seconds": cold, "median_seconds": statistics.median(warm), "runs": warm}
        if pretrained:
            row["accuracy"] = float((np.array(ds.values(f"{field}.label")) == gt).mean())
        out[name] = row
        rows.append([name, cold, row["median_seconds"], row.get("accuracy")])
    if pretrained:
        zs_acc = float((np.array(ds.values("nola_zeroshot.label")) == gt).mean())
        out["zero-shot"] = {"accuracy": zs_acc}
        rows.append(["zero-shot (for reference)", None, None, zs_acc])
    ds.delete()
    results["real"] = {"images": args.n, "clip": "ViT-B-32 " + ("pretrained" if pretrained else "random init"), **out}
    tables.append(
        C.table(
            ["stage transductive_labels", "cold s", "median s (3)", "accuracy"],
            rows,
            f"{args.n} CIFAR-10 images, stored ViT-B-32 vectors (512-d), 10 classes; stage wall time end to end",
        )
    )
    return out["transclip+stata (default)"]["median_seconds"]


def scale(args, results, tables):
    """Parts 3 (mid size, in process) and 4 (approximate graph quality)."""
    import numpy as np

    from fiftyone_nola.core.transductive import TransductiveConfig, knn_graph, text_prior
    from fiftyone_nola.core.transductive.gmm import stata, transclip
    from fiftyone_nola.core.transductive.zlap import zlap

    rows = []
    x, text, lab = synthetic(args.large)
    prior_acc = float((text_prior(x, text).argmax(1) == lab).mean())
    for name, cfg in (
        ("transclip+stata (default)", TransductiveConfig()),
        ("zlap+presence", TransductiveConfig(method="zlap")),
    ):
        C.reset_peak_rss()
        before = C.current_rss_mb()
        seconds, res = core_run(x, text, cfg)
        rows.append([name, args.large, seconds, res.info["graph_seconds"], res.info["solve_seconds"], res.info["graph"],
                     C.peak_rss_mb() - before, float((res.probs.argmax(1) == lab).mean()), prior_acc])  # fmt: skip
        results.setdefault("large", {})[name] = dict(zip(["method", "n", "seconds", "graph_seconds", "solve_seconds", "graph", "peak_growth_mb", "accuracy_synthetic", "zero_shot_synthetic"], rows[-1]))  # fmt: skip
    del x
    tables.append(
        C.table(
            ["method", "vectors", "seconds", "graph s", "solve s", "graph", "peak +MB", "acc (synthetic)", "zero-shot"],
            rows,
            "synthetic 512-d vectors, core label() with default settings (FiftyOne I/O excluded)",
        )
    )
    n_q = 2_000 if args.quick else 20_000
    x, text, lab = synthetic(n_q, seed=1)
    prior = text_prior(x, text)
    cfg = TransductiveConfig()
    ex4, iv4 = knn_graph(x, 4, search="exact"), knn_graph(x, 4, search="ivf", nprobe=cfg.nprobe)
    recall = float(np.mean([len(set(a) & set(b)) / 4 for a, b in zip(ex4.indices, iv4.indices)]))
    qrows = []
    for name, fn in (
        ("transclip", lambda g: transclip(x, prior, type(g)(g.indices[:, :3], g.sims[:, :3], g.exact), TransductiveConfig(safeguard=False))),
        ("stata", lambda g: stata(x, prior, type(g)(g.indices[:, :3], g.sims[:, :3], g.exact), text)),
        ("zlap", lambda g: zlap(g, x @ text.T).scores),
    ):  # fmt: skip
        a, b = fn(ex4).argmax(1), fn(iv4).argmax(1)
        qrows.append([name, n_q, recall, float((a == b).mean())])
    results["graph_quality"] = [dict(zip(["method", "n", "ivf_recall_at_4", "assignment_agreement"], r)) for r in qrows]
    tables.append(
        C.table(
            ["method", "vectors", "ivf recall@4", "same assignment as exact"],
            qrows,
            f"ivf kNN graph (nprobe {cfg.nprobe}) vs exact, synthetic 512-d vectors",
        )
    )


def one_million(args, results, tables):
    """Part 3, 1M: a niced child process, its peak RSS."""
    cmd = ["nice", "-n", "10", sys.executable, str(Path(__file__).resolve()), "--child", "1000000"]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ})
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    if out.returncode or not line:
        raise RuntimeError(f"1M child failed ({out.returncode}): {out.stderr[-2000:]}")
    r = json.loads(line[-1][len("RESULT ") :])
    results["one_million"] = r
    tables.append(
        C.table(
            ["vectors", "seconds", "graph s", "solve s", "graph", "peak RSS MB", "of which vectors MB"],
            [
                [
                    r["n"],
                    r["seconds"],
                    r["graph_seconds"],
                    r["solve_seconds"],
                    r["graph"],
                    r["peak_rss_mb"],
                    r["vectors_mb"],
                ]
            ],
            "1,000,000 synthetic 512-d vectors, default settings (StatA), child process under nice",
        )
    )
    return r


def run(args, results, tables, tmp) -> None:
    cpu = C.machine_facts().get("cpu_model")
    flags = set()
    try:
        flags = set(next(ln for ln in open("/proc/cpuinfo") if ln.startswith("flags")).split())
    except (OSError, StopIteration):
        pass
    results["isa"] = sorted(
        f for f in flags if f in {"avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "fma"}
    )
    print(f"CPU {cpu}, ISA {results['isa']}")
    with C.PartTimer().part("1,000 real images"):
        t1k = real_images(args, results, tables, tmp)
    results["transductive_seconds_1k"] = t1k
    train = args.tuning_seconds + args.predict_seconds
    results["tuning_reference"] = {
        "tuning_seconds": args.tuning_seconds,
        "predict_seconds": args.predict_seconds,
        "source": "README.md quick start: make demo on 1,000 CIFAR-10 images, 2-core CPU"
        if (args.tuning_seconds, args.predict_seconds) == (TUNING_SECONDS, PREDICT_SECONDS)
        else "given on the command line",
    }
    results["transductive_vs_tuning_ratio"] = train / t1k
    tables.append(f"prompt tuning + prediction {train:.0f} s vs transductive {t1k:.2f} s: {train / t1k:.0f}x cheaper")
    with C.PartTimer().part("scale"):
        scale(args, results, tables)
    results[f"transductive_seconds_{'100k' if args.large == 100_000 else args.large}"] = results["large"][
        "transclip+stata (default)"
    ]["seconds"]
    if not args.skip_1m:
        with C.PartTimer().part("1,000,000 vectors (child)"):
            r = one_million(args, results, tables)
        results["transductive_seconds_1m"] = r["seconds"]
        results["transductive_peak_rss_mb_1m"] = r["peak_rss_mb"]


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        return child(args.child)
    from fiftyone_nola.logs import lines_to

    with lines_to(lambda m: print("   ", m, flush=True)):
        return C.run_benchmark("transductive", args, run, "nola-bench-transductive")


if __name__ == "__main__":
    sys.exit(main())
