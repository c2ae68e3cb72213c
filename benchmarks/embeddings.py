"""Embedding throughput, k-NN search and peak memory: fiftyone-nola vs FiftyOne / FiftyOne Brain.

Three parts, side by side in one run (each part's wall time is printed):

1. **Throughput**: the same real images through the same CLIP (open_clip ViT-B-32 architecture,
   *random* weights saved once to a temporary checkpoint file that both sides load). Ours is
   ``fiftyone_nola.stages.embeddings.compute_embeddings`` on a fresh dataset (JPEG draft decoding on,
   and again with exact decoding); FiftyOne's is ``dataset.compute_embeddings`` with
   ``fiftyone.utils.open_clip.TorchOpenClipModel`` (``embeddings_layer="visual"``). Same batch
   size and DataLoader worker count on both sides. Image sets: CIFAR-10 (32x32), COCO
   (~640x480) and "camera-sized" 12-megapixel JPEGs made by upscaling COCO images. Also the
   minimum cosine between our vectors and FiftyOne's for the same image (exact and draft).
   Random weights run exactly as fast as trained ones; no number here is an accuracy.
2. **k-NN**: clustered unit vectors (a mixture of a few thousand tight clusters, not an
   isotropic Gaussian) at 100k and 1M x 512: ``EmbeddingIndex`` flat / ivf / hnsw vs the Brain's
   default sklearn backend (its ``NeighborsHelper`` query path on in-memory arrays at every
   size; through a real dataset + ``compute_similarity`` + ``sort_by_similarity`` at sizes up
   to ``--fo-dataset-max-n``). Build time, single-query latency, batch queries/s, recall@10.
   Exact search is timed taking turns, query by query and batch by batch: our flat store (in
   RAM, and saved then reopened with its vectors memory-mapped) vs a plain numpy BLAS matmul +
   argpartition over the same matrix vs faiss ``IndexFlatIP`` (what flat stores ran before).
3. **Peak RSS** of embedding N images with our pipeline in a fresh child process, for two N.

Usage::

    .venv/bin/python benchmarks/embeddings.py --quick            # < 3 minutes
    .venv/bin/python benchmarks/embeddings.py --json benchmarks/results/embeddings.json
    # the k-NN part alone at 1M vectors (~5 minutes on 2 cores)
    .venv/bin/python benchmarks/embeddings.py --skip-throughput --skip-rss --knn-sizes 1000000 \
        --fo-dataset-max-n 0 --json benchmarks/results/embeddings_knn_1m.json \
        --txt benchmarks/results/embeddings_knn_1m.txt
"""

from __future__ import annotations

import argparse
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import _common as C  # noqa: E402

CIFAR_DIR = C.SHARED_DATA / "cifar10_2k"
COCO_DIR = C.SHARED_DATA / "coco256" / "images"
DEFAULT_CACHE = Path(tempfile.gettempdir()) / "fiftyone_nola_bench_cache"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--quick",
        action="store_true",
        help="small sizes: 8+8 small and 2 camera images, 20k vectors, 1k RSS (development; < 3 min)",
    )
    p.add_argument("--json", metavar="PATH", help="write all figures to this JSON file")
    p.add_argument("--txt", metavar="PATH", help="also write the printed tables to this file")
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--skip-knn", action="store_true")
    p.add_argument("--skip-rss", action="store_true")
    g = p.add_argument_group("throughput")
    g.add_argument("--n-cifar", type=int, help="CIFAR-10 images (32x32); default 256 (quick 32)")
    g.add_argument("--n-coco", type=int, help="COCO images (~640x480); default 256 (quick 32)")
    g.add_argument("--n-camera", type=int, help="12 MP JPEGs; default 48 (quick 8)")
    g.add_argument("--camera-size", default="4000x3000")
    g.add_argument("--camera-quality", type=int, default=92)
    g.add_argument(
        "--camera-noise",
        type=float,
        default=3.0,
        help="std of pixel noise added after upscaling so files have photo-like entropy (0: smooth upscale)",
    )
    g.add_argument("--batch-size", type=int, default=32, help="both sides (default 32)")
    g.add_argument(
        "--num-workers",
        type=int,
        default=1,
        help="DataLoader workers, both sides (default 1 = FiftyOne's and ours' default on a 2-core CPU)",
    )
    g.add_argument(
        "--repeats", type=int, default=1, help="runs per side and set, alternating order; the median is reported"
    )
    g.add_argument("--arch", default="ViT-B-32", help="open_clip architecture (random init)")
    g.add_argument(
        "--no-engine", action="store_true", help="skip the engine variants (ours runs PyTorch fp32 either way)"
    )
    g.add_argument(
        "--engine-variants",
        default="auto,int8",
        help="comma-separated engine variants beside PyTorch: 'auto' (engine='auto': the choice measured "
        "on this CPU, once, before timing; the JSON's speedup_*_engine keys), and OpenVINO precisions "
        "asked for explicitly (fp32, bf16, int8: speedup_*_engine_<precision>). Default auto,int8",
    )
    g.add_argument(
        "--choice-images",
        type=int,
        default=192,
        help="COCO images auto measures its choice on before timing (128 checked, 64 calibrate int8)",
    )
    g.add_argument(
        "--cache-dir", default=str(DEFAULT_CACHE), help="where generated camera-sized JPEGs and image copies are kept"
    )
    g = p.add_argument_group("k-NN")
    g.add_argument("--knn-sizes", help="comma-separated; default 100000,1000000 (quick 20000)")
    g.add_argument("--dim", type=int, default=512)
    g.add_argument("--clusters", type=int, help="mixture components; default 3000 (quick 300)")
    g.add_argument("--k", type=int, default=10)
    g.add_argument("--single-queries", type=int, default=50, help="single-query latency samples")
    g.add_argument("--batch-queries", type=int, default=1000, help="queries in the batch test")
    g.add_argument(
        "--batch-queries-large",
        type=int,
        default=200,
        help="queries in the batch test at n >= 1M (exact batch search is slow there)",
    )
    g.add_argument(
        "--exact-repeats",
        type=int,
        default=3,
        help="batch runs of each exact search, taking turns; the median is reported",
    )
    g.add_argument(
        "--approx-default-max-n",
        type=int,
        default=100_000,
        help="largest size at which ivf/hnsw are built with the library defaults "
        "(their builds grow too slow beyond it on a 2-core CPU)",
    )
    g.add_argument(
        "--large-hnsw",
        default="32,64",
        help="hnsw_m,ef_construction set through update_meta above that size ('' to skip)",
    )
    g.add_argument(
        "--fo-dataset-max-n",
        type=int,
        default=100_000,
        help="largest size at which a real FiftyOne dataset + compute_similarity is built",
    )
    g = p.add_argument_group("peak RSS")
    g.add_argument("--rss-sizes", help="comma-separated image counts; default 1000,10000 (quick 1000)")
    g.add_argument(
        "--rss-model",
        default="tiny",
        choices=["tiny", "vit"],
        help="tiny: fiftyone_nola.core.models.tiny_clip_spec() (fast); vit: the ViT-B-32",
    )
    # internal: the RSS child process
    p.add_argument("--_rss-child", type=int, help=argparse.SUPPRESS)
    p.add_argument("--_rss-dir", help=argparse.SUPPRESS)
    p.add_argument("--_rss-out", help=argparse.SUPPRESS)
    p.add_argument("--_rss-ckpt", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    q = a.quick
    a.n_cifar = a.n_cifar if a.n_cifar is not None else (8 if q else 256)
    a.n_coco = a.n_coco if a.n_coco is not None else (8 if q else 256)
    a.n_camera = a.n_camera if a.n_camera is not None else (2 if q else 48)
    a.knn_sizes = [int(s) for s in (a.knn_sizes or ("20000" if q else "100000,1000000")).split(",") if s]
    a.clusters = a.clusters or (300 if q else 3000)
    a.rss_sizes = [int(s) for s in (a.rss_sizes or ("1000" if q else "1000,10000")).split(",") if s]
    if q:
        a.batch_queries = min(a.batch_queries, 200)
    return a


# =========================================================================== images


def cifar_files(n: int) -> list[str]:
    files = sorted(str(p) for p in CIFAR_DIR.rglob("*.jpg"))
    if not files:
        raise SystemExit(f"no CIFAR images under {CIFAR_DIR}")
    step = max(1, len(files) // max(1, n))  # spread over the 10 classes
    return files[::step][:n]


def coco_files(n: int) -> list[str]:
    files = sorted(str(p) for p in COCO_DIR.glob("*.jpg"))
    if not files:
        raise SystemExit(f"no COCO images under {COCO_DIR}")
    return files[:n]


def camera_files(n: int, size: str, quality: int, noise: float, cache: Path) -> list[str]:
    """``n`` camera-sized JPEGs made by upscaling COCO images (cached between runs)."""
    import numpy as np
    from PIL import Image, ImageOps

    w, h = (int(v) for v in size.lower().split("x"))
    out_dir = cache / f"camera_{w}x{h}_q{quality}_noise{noise:g}"
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    out = []
    for src in coco_files(n):
        dst = out_dir / (Path(src).stem + ".jpg")
        if not dst.exists():
            with Image.open(src) as im:
                big = ImageOps.fit(im.convert("RGB"), (w, h), Image.BICUBIC)
            if noise > 0:
                arr = np.asarray(big, dtype=np.float32)
                arr += rng.normal(0, noise, arr.shape).astype(np.float32)
                big = Image.fromarray(arr.clip(0, 255).astype(np.uint8))
            tmp = dst.with_suffix(".tmp.jpg")
            big.save(tmp, quality=quality)
            os.replace(tmp, dst)
        out.append(str(dst))
    if len(out) < n:
        raise SystemExit(f"only {len(out)} COCO images available for camera-sized set")
    return out


def copies_of(files: list[str], n: int, cache: Path, tag: str) -> list[str]:
    """``n`` distinct files (copies named by index) cycling through ``files``."""
    out_dir = cache / f"{tag}_copies"
    out_dir.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        src = files[i % len(files)]
        dst = out_dir / f"{i:06d}{Path(src).suffix}"
        if not dst.exists():
            shutil.copyfile(src, dst)
        out.append(str(dst))
    return out


def image_facts(files: list[str]) -> dict:
    from PIL import Image

    sizes = []
    for f in files[:64]:
        with Image.open(f) as im:
            sizes.append(im.size)
    mp = [w * h / 1e6 for w, h in sizes]
    return {
        "n": len(files),
        "typical_size": f"{sizes[0][0]}x{sizes[0][1]}" if sizes else None,
        "mean_megapixels": sum(mp) / len(mp) if mp else 0,
        "mean_file_kb": sum(os.path.getsize(f) for f in files) / len(files) / 1024,
    }


def warm_page_cache(files: list[str]) -> None:
    for f in files:
        with open(f, "rb") as fh:
            while fh.read(1 << 22):
                pass


# =========================================================================== part 1


def make_dataset(fo, name: str, files: list[str]):
    ds = fo.Dataset(name)
    ds.add_samples([fo.Sample(filepath=f) for f in files], progress=False)
    return ds


def prepare_engine_variants(args, spec, bs: int, nw: int) -> dict:
    """Convert each engine variant and measure auto's choice once, before any timing."""
    from fiftyone_nola.core.embed import EmbedConfig, prepare_encoder
    from fiftyone_nola.core.models import load_clip

    files = coco_files(args.choice_images) or cifar_files(args.choice_images)
    out = {}
    for p in [v.strip() for v in args.engine_variants.split(",") if v.strip()]:
        name = "engine" if p == "auto" else f"engine_{p}"
        engine = "auto" if p == "auto" else "openvino"
        os.environ["NOLA_ENGINE_MIN_IMAGES"] = "0"  # measure on these images whatever their number
        t = time.perf_counter()
        try:
            _, choice = prepare_encoder(
                load_clip(spec),
                EmbedConfig(batch_size=bs, num_workers=nw, device="cpu", engine=engine, precision=p),
                files,
            )
        finally:
            os.environ.pop("NOLA_ENGINE_MIN_IMAGES", None)
        secs = time.perf_counter() - t
        if choice.engine == "torch" and p != "auto":
            print(f"{name}: OpenVINO unavailable ({choice.reason}): variant skipped")
            continue
        out[name] = {"engine": engine, "precision": p, "ran": choice.tag, "prepare_seconds": secs}
        if choice.measured:
            out[name]["auto"] = choice.measured
        print(f"{name}: {choice.tag} ready in {secs:.1f} s (conversion and choice, once)", flush=True)
    return out


def run_throughput(args, results: dict, tables: list[str]) -> None:
    import fiftyone as fo
    import fiftyone.utils.open_clip as fouc
    import numpy as np
    import open_clip
    import torch

    from fiftyone_nola.core.embed import EmbedConfig
    from fiftyone_nola.core.models import ClipSpec
    from fiftyone_nola.stages.embeddings import compute_embeddings, load_embeddings

    cache = Path(args.cache_dir)
    tmp = Path(tempfile.mkdtemp(prefix="nola-bench-ckpt-"))
    try:
        # One random-init model, saved once: both sides load exactly these weights.
        torch.manual_seed(0)
        model, _, _ = open_clip.create_model_and_transforms(args.arch, pretrained=None)
        ckpt = tmp / f"{args.arch}-random.pt"
        torch.save(model.state_dict(), ckpt)
        del model
        print(f"random-init {args.arch} checkpoint: {ckpt} ({ckpt.stat().st_size / 2**20:.0f} MB)")

        t0 = time.perf_counter()
        sets = {
            "cifar10 32x32": cifar_files(args.n_cifar),
            "coco ~640x480": coco_files(args.n_coco),
            f"camera {args.camera_size}": camera_files(
                args.n_camera, args.camera_size, args.camera_quality, args.camera_noise, cache
            ),
        }
        print(f"image sets ready in {time.perf_counter() - t0:.1f} s")
        sets = {k: v for k, v in sets.items() if v}

        bs, nw = args.batch_size, args.num_workers
        spec = ClipSpec(arch=args.arch, pretrained=str(ckpt), random_init=False)
        fo_model = fouc.TorchOpenClipModel(
            fouc.TorchOpenClipModelConfig(
                dict(
                    clip_model=args.arch,
                    pretrained=str(ckpt),
                    embeddings_layer="visual",  # as the zoo's open-clip-torch entry
                    classes=["object"],  # compute_embeddings also runs its (cached) text tower
                    text_prompt="A photo of",
                    output_processor_cls="fiftyone.utils.torch.ClassifierOutputProcessor",
                    device="cpu",
                )
            )
        )
        counter = iter(range(10**6))

        def ours(files, draft: bool, engine: str = "torch", precision: str = "fp32"):
            ds = make_dataset(fo, f"ours-{next(counter)}", files)
            cfg = EmbedConfig(
                batch_size=bs, num_workers=nw, device="cpu", draft_decode=draft, engine=engine, precision=precision
            )
            lav = C.loadavg()
            t = time.perf_counter()
            summary = compute_embeddings(ds, "clip", clip=spec, config=cfg)["clip"]
            wall = time.perf_counter() - t
            secs = wall - summary["model_load_seconds"]  # model construction excluded, as for FO
            ids, vecs = load_embeddings(ds, spec)
            assert summary["embedded"] == len(files) and summary["failed"] == 0, summary
            ds.delete()
            return {
                "seconds": secs,
                "images_per_s": len(files) / secs,
                "loadavg": lav,
                "internal_images_per_s": summary["images_per_s"],
                "model_load_seconds": summary["model_load_seconds"],
                "inference": summary.get("inference"),
            }, vecs

        def fiftyone(files):
            ds = make_dataset(fo, f"fo-{next(counter)}", files)
            lav = C.loadavg()
            t = time.perf_counter()
            emb = ds.compute_embeddings(fo_model, batch_size=bs, num_workers=nw, progress=False)
            secs = time.perf_counter() - t
            emb = np.asarray(emb, dtype=np.float64)
            assert emb.shape == (len(files), 512) or emb.shape[0] == len(files), emb.shape
            ds.delete()
            return {"seconds": secs, "images_per_s": len(files) / secs, "loadavg": lav}, emb

        # Warm-up, excluded on both sides: worker start-up paths, BLAS/oneDNN init, file cache.
        warm = coco_files(2 if args.quick else 8)
        for files in sets.values():
            warm_page_cache(files)
        # The engine variants: converted (int8 calibrated on COCO images) and auto's choice
        # measured once, before timing, as a user's first run would; their cost reported on its own.
        engine_variants = {} if args.no_engine else prepare_engine_variants(args, spec, bs, nw)
        fiftyone(warm)
        ours(warm, True)
        for v in engine_variants.values():
            ours(warm, True, v["engine"], v["precision"])

        def unit(x):
            x = np.asarray(x, dtype=np.float64)
            with np.errstate(invalid="ignore", divide="ignore"):  # 1-image sets: centred = 0
                return x / np.linalg.norm(x, axis=1, keepdims=True)

        rows, per_set = [], {}
        for name, files in sets.items():
            facts = image_facts(files)
            print(
                f"\n[{name}] {len(files)} images, {facts['mean_megapixels']:.2f} MP, "
                f"{facts['mean_file_kb']:.0f} KB each; batch {bs}, {nw} worker(s)",
                flush=True,
            )
            # Draft decoding only ever reduces by powers of two while staying >= the model's
            # input size: for images smaller than twice that it decodes the same pixels.
            small = facts["mean_megapixels"] < (2 * 224) ** 2 / 1e6
            runs = {"fiftyone": [], "draft": [], "exact": [], **{k: [] for k in engine_variants}}
            for rep in range(args.repeats):
                order = ["fiftyone", "draft", "exact", *engine_variants]
                if rep % 2:  # alternate who goes first: load from other jobs drifts
                    order = order[::-1]
                for who in order:
                    if who == "exact" and small:
                        continue
                    if who == "fiftyone":
                        r, v = fiftyone(files)
                    elif who in engine_variants:
                        r, v = ours(files, True, engine_variants[who]["engine"], engine_variants[who]["precision"])
                    else:
                        r, v = ours(files, who == "draft")
                    runs[who].append((r, v))
                    print(
                        f"  {who:10s} run {rep + 1}: {r['images_per_s']:7.2f} img/s "
                        f"({r['seconds']:.1f} s, load {r['loadavg']:.1f})",
                        flush=True,
                    )

            def med(rs):
                rs = sorted(rs, key=lambda rv: rv[0]["seconds"])
                r, v = rs[len(rs) // 2]
                return dict(r, all_images_per_s=[x[0]["images_per_s"] for x in rs]), v

            r_fo, v_fo = med(runs["fiftyone"])
            r_d, v_d = med(runs["draft"])
            if small:
                r_e, v_e = dict(r_d, note="same pixels as draft (image < 2x model input)"), v_d
            else:
                r_e, v_e = med(runs["exact"])
            f, e, d = unit(v_fo), unit(v_e), unit(v_d)
            cos_e = (f * e).sum(1)
            cos_d = (f * d).sum(1)
            # How different are *different* images under this random model? If they are nearly
            # parallel, cosine ~1 between sides proves little; the centred cosine is stricter.
            mu = f.mean(0, keepdims=True)
            fc, ec, dc = unit(f - mu), unit(e - mu), unit(d - mu)
            other = (f * np.roll(f, 1, axis=0)).sum(1)
            entry = {
                "images": facts,
                "fiftyone": r_fo,
                "ours_draft": r_d,
                "ours_exact": r_e,
                "speedup": r_d["images_per_s"] / r_fo["images_per_s"],
                "speedup_exact_decode": r_e["images_per_s"] / r_fo["images_per_s"],
                "min_cosine": float(cos_e.min()),
                "min_cosine_draft": float(cos_d.min()),
                "median_cosine_draft": float(np.median(cos_d)),
                "min_centered_cosine": float((fc * ec).sum(1).min()),
                "min_centered_cosine_draft": float((fc * dc).sum(1).min()),
                "median_cosine_between_different_images": float(np.median(other)),
            }
            for ev in engine_variants:  # vs our PyTorch fp32 on the same (draft) pixels
                r_v, v_v = med(runs[ev])
                cos_v = (unit(v_v) * d).sum(1)
                entry[ev] = r_v
                entry[f"speedup_{ev}"] = r_v["images_per_s"] / r_fo["images_per_s"]
                entry[f"speedup_{ev}_vs_torch"] = r_v["images_per_s"] / r_d["images_per_s"]
                entry[f"min_cosine_{ev}"] = float(cos_v.min())
            per_set[name] = entry
            rows.append(
                [
                    name,
                    len(files),
                    r_fo["images_per_s"],
                    r_d["images_per_s"],
                    r_e["images_per_s"],
                    entry["speedup"],
                    entry["speedup_exact_decode"],
                    entry["min_cosine"],
                    entry["min_cosine_draft"],
                    entry["median_cosine_between_different_images"],
                ]
            )

        cam = next(v for k, v in per_set.items() if k.startswith("camera"))
        small_sets = [v for k, v in per_set.items() if not k.startswith("camera")]
        fo_small = sum(v["fiftyone"]["seconds"] for v in small_sets)
        ours_small = sum(v["ours_draft"]["seconds"] for v in small_sets)
        n_small = sum(v["images"]["n"] for v in small_sets)
        engine_keys = {}
        for ev in engine_variants:
            ev_small = sum(v[ev]["seconds"] for v in small_sets)
            model_small = sum((v[ev].get("inference") or {}).get("model_s") or 0.0 for v in small_sets)
            engine_keys.update(
                {
                    f"speedup_small_{ev}": fo_small / ev_small,
                    f"speedup_{ev}": cam[f"speedup_{ev}"],
                    f"min_cosine_{ev}": min(v[f"min_cosine_{ev}"] for v in per_set.values()),
                    f"speedup_small_{ev}_vs_torch": ours_small / ev_small,
                    f"{ev}_images_per_s_small": n_small / ev_small,
                    f"{ev}_images_per_s": cam[ev]["images_per_s"],
                    # end-to-end images/s over model-only images/s (the model's seconds inside the
                    # same runs): 1.0 = nothing but the model costs time
                    f"{ev}_end_to_end_vs_model": model_small / ev_small if model_small else None,
                }
            )
        results["throughput"] = {
            "model": f"open_clip {args.arch}, random init (same checkpoint file both sides)",
            "batch_size": bs,
            "num_workers": nw,
            "device": "cpu",
            "measured": {
                "ours": "fiftyone_nola.stages.embeddings.compute_embeddings(fresh dataset, 'clip', "
                "ClipSpec(arch, pretrained=<ckpt>), EmbedConfig(batch_size, num_workers, "
                "draft_decode)) wall time minus its model_load_seconds: decode, "
                "preprocess, inference, FAISS store writes + checkpoints, run record",
                "fiftyone": "dataset.compute_embeddings(TorchOpenClipModel(clip_model=arch, "
                "pretrained=<ckpt>, embeddings_layer='visual'), batch_size, "
                "num_workers, progress=False) returning the array (no field "
                "written: FiftyOne's cheapest path); model built beforehand",
                "warmup": "one 8-image (quick: 2) run per side before timing, excluded",
            },
            "sets": per_set,
            "engine_variants": engine_variants,
            "engine_note": "ours with PyTorch = 'ours_draft' (engine='torch', fp32); 'engine' runs "
            "compute_embeddings(engine='auto') with the choice measured beforehand on COCO images "
            "(engine_variants.engine.auto: figures); engine_<p> asks for OpenVINO at precision p; all "
            "on the same draft-decoded pixels; min_cosine_engine* is vs ours PyTorch fp32 on the "
            "same images. inference.decode_wait_s / model_s split each run's time between waiting "
            "for decoded batches and the model.",
        }
        results.update(
            ours_images_per_s=cam["ours_draft"]["images_per_s"],
            fiftyone_images_per_s=cam["fiftyone"]["images_per_s"],
            ours_images_per_s_small=n_small / ours_small,
            fiftyone_images_per_s_small=n_small / fo_small,
            speedup=cam["speedup"],
            speedup_exact_decode=cam["speedup_exact_decode"],
            speedup_small=fo_small / ours_small,
            min_cosine=min(v["min_cosine"] for v in per_set.values()),
            min_cosine_draft=min(v["min_cosine_draft"] for v in per_set.values()),
            min_centered_cosine=min(v["min_centered_cosine"] for v in per_set.values()),
            min_centered_cosine_draft=min(v["min_centered_cosine_draft"] for v in per_set.values()),
            **engine_keys,
        )
        tables.append(
            C.table(
                [
                    "image set",
                    "n",
                    "FO img/s",
                    "ours img/s",
                    "ours exact",
                    "speedup",
                    "spd exact",
                    "min cos exact",
                    "min cos draft",
                    "cos diff imgs",
                ],
                rows,
                title=f"Embedding throughput: {args.arch} (random init), CPU, batch {bs}, {nw} "
                f"DataLoader worker(s) on both sides",
            )
            + f"\nspeedup (camera-sized) = {results['speedup']:.2f}x   speedup_small (cifar+coco "
            f"time ratio) = {results['speedup_small']:.2f}x   min_cosine = "
            f"{results['min_cosine']:.5f}   min_cosine_draft = {results['min_cosine_draft']:.4f}"
        )
        if engine_variants:
            erows = []
            for name, v in per_set.items():
                for ev in engine_variants:
                    inf = v[ev].get("inference") or {}
                    tinf = v["ours_draft"].get("inference") or {}
                    erows.append(
                        [
                            name,
                            f"{ev}: {inf.get('engine')}-{inf.get('precision')}",
                            v["fiftyone"]["images_per_s"],
                            v["ours_draft"]["images_per_s"],
                            v[ev]["images_per_s"],
                            v[f"speedup_{ev}"],
                            v[f"speedup_{ev}_vs_torch"],
                            v[f"min_cosine_{ev}"],
                            tinf.get("model_s"),
                            tinf.get("model_cpu_s"),
                            tinf.get("decode_wait_s"),
                            inf.get("model_s"),
                            inf.get("model_cpu_s"),
                            inf.get("decode_wait_s"),
                        ]
                    )
            tables.append(
                C.table(
                    [
                        "image set",
                        "engine",
                        "FO img/s",
                        "torch img/s",
                        "engine img/s",
                        "vs FO",
                        "vs torch",
                        "min cos",
                        "torch model s",
                        "torch cpu s",
                        "torch wait s",
                        "eng model s",
                        "eng cpu s",
                        "eng wait s",
                    ],
                    erows,
                    title=f"Inference engine (ours, draft decode) on {results.get('cpu_model')} "
                    f"({results.get('cpu_isa')}): auto / OpenVINO vs PyTorch fp32 vs FiftyOne; "
                    "medians of interleaved runs; 'wait s' = waiting for decoded batches; "
                    "'cpu s' = CPU seconds of the model's threads (robust to other jobs)",
                )
                + "\n"
                + "   ".join(f"{k} = {C.fmt(v, 4)}" for k, v in engine_keys.items())
                + "".join(
                    f"\nauto's choice ({meta['prepare_seconds']:.0f} s with conversions): {meta['ran']}; "
                    + json.dumps(meta["auto"].get("candidates"))
                    for meta in engine_variants.values()
                    if meta.get("auto")
                )
            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# =========================================================================== part 2


def clustered_unit_vectors(n: int, d: int, n_clusters: int, seed: int, centers=None):
    """Unit vectors from a mixture of tight clusters with uneven sizes and spreads.

    Each point is ``normalize(center + s * g / sqrt(d))`` with ``s`` in [0.35, 0.7] per cluster,
    so its cosine to its centre is 0.82-0.94 and to a cluster-mate ~0.7-0.9; cluster sizes are
    log-normal (a few big ones, many small), like embeddings of real collections.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    if centers is None:
        crng = np.random.default_rng(12345)
        centers = crng.standard_normal((n_clusters, d), dtype=np.float32)
        centers /= np.linalg.norm(centers, axis=1, keepdims=True)
        weights = crng.lognormal(0.0, 1.0, n_clusters)
        spread = crng.uniform(0.35, 0.7, n_clusters).astype(np.float32)
        centers = (centers, weights / weights.sum(), spread)
    cent, p, spread = centers
    labels = rng.choice(len(cent), size=n, p=p)
    x = np.empty((n, d), dtype=np.float32)
    step = 65536
    for s in range(0, n, step):
        lab = labels[s : s + step]
        blk = rng.standard_normal((len(lab), d), dtype=np.float32)
        blk *= (spread[lab] / np.sqrt(d))[:, None]
        blk += cent[lab]
        blk /= np.linalg.norm(blk, axis=1, keepdims=True)
        x[s : s + step] = blk
    return x, centers


EXACT_OURS = "ours flat (exact_search, in RAM)"
EXACT_MMAP = "ours flat (saved + reopened: memory-mapped)"
EXACT_NUMPY = "numpy BLAS matmul + argpartition (baseline)*"
EXACT_FAISS = "faiss IndexFlatIP (flat store before)*"


def numpy_topk(x, q, k):
    """Exact inner-product top-k of each row of ``q`` over ``x``: positions (nq x k), best first."""
    return C.exact_topk([(0, x)], q, k)


def recall(truth: list[list[str]], got: list[list[str]], k: int) -> float:
    return float(sum(len(set(t[:k]) & set(g[:k])) for t, g in zip(truth, got)) / (k * len(truth)))


def time_single(fn, queries, n: int) -> dict:
    times = []
    for i in range(n):
        q = queries[i % len(queries)]
        t = time.perf_counter()
        fn(q)
        times.append(time.perf_counter() - t)
    return C.latency_stats(times)


def time_taking_turns(fns: dict, queries, batch, n_single: int, repeats: int, pause: float = 0.15):
    """Single-query seconds and batch seconds of each search, the searches taking turns (the
    order rotating) query by query and batch by batch, so load from other jobs falls on all
    alike. Each call starts ``pause`` s after the previous one ended: BLAS and OpenMP worker
    threads keep spinning for a while after a call (OpenBLAS up to ~0.1 s), which would take
    the CPU from whichever search comes next. Returns ``(singles, batches, results of the
    last batch run)``, keyed like ``fns``."""
    names = list(fns)
    singles = {m: [] for m in names}
    batches = {m: [] for m in names}
    got = {}
    for i in range(n_single):
        q = queries[i % len(queries)][None]
        for m in names[i % len(names) :] + names[: i % len(names)]:
            time.sleep(pause)
            t = time.perf_counter()
            fns[m](q)
            singles[m].append(time.perf_counter() - t)
    for r in range(repeats):
        for m in names[r % len(names) :] + names[: r % len(names)]:
            time.sleep(pause)
            t = time.perf_counter()
            got[m] = fns[m](batch)
            batches[m].append(time.perf_counter() - t)
    return singles, batches, got


def blas_facts() -> dict:
    """Which BLAS (and kernel) numpy and faiss run, and the OpenBLAS overrides in effect."""
    from threadpoolctl import threadpool_info

    return {
        "libraries": [
            {k: i.get(k) for k in ("prefix", "version", "architecture", "num_threads", "threading_layer")}
            for i in threadpool_info()
            if i.get("user_api") == "blas"
        ],
        "env": {
            k: os.environ.get(k)
            for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")
            if os.environ.get(k)
        },
    }


def run_knn(args, results: dict, tables: list[str]) -> None:
    import numpy as np
    from fiftyone.brain.internal.core.sklearn import NeighborsHelper

    from fiftyone_nola.core.index import EmbeddingIndex

    k, d = args.k, args.dim
    rows, out = [], {}
    for n in args.knn_sizes:
        print(f"\n[k-NN n={n:,} dim={d}] generating {args.clusters} clusters ...", flush=True)
        t = time.perf_counter()
        x, cents = clustered_unit_vectors(n, d, args.clusters, seed=1)
        nq = max(args.batch_queries, args.single_queries)
        qs, _ = clustered_unit_vectors(nq, d, args.clusters, seed=2, centers=cents)
        print(f"  data: {x.nbytes / 2**20:.0f} MB in {time.perf_counter() - t:.1f} s", flush=True)
        ids = [f"{i:07d}" for i in range(n)]
        nb = args.batch_queries if n < 1_000_000 else min(args.batch_queries, args.batch_queries_large)
        bq = qs[:nb]
        entry = {"n": n, "dim": d, "clusters": args.clusters, "k": k, "methods": {}}
        truth = None

        def record(name, build_s, single, batch_s, got, extra=None, truth_ids=None):
            ref = truth_ids if truth_ids is not None else truth
            rec = recall(ref, got, k) if ref is not None else 1.0
            m = {
                "build_s": build_s,
                "single_query": single,
                "batch_queries": len(bq),
                "batch_s": batch_s,
                "batch_qps": len(bq) / batch_s,
                f"recall_at_{k}": rec,
                **(extra or {}),
            }
            entry["methods"][name] = m
            rows.append([f"{n:,}", name, build_s, single["median_ms"], single["p90_ms"], m["batch_qps"], rec])
            print(
                f"  {name:42s} build {build_s:7.2f} s  single {single['median_ms']:8.2f} ms  "
                f"batch {m['batch_qps']:8.1f} q/s  recall@{k} {rec:.4f}",
                flush=True,
            )
            return m

        # ---------------- exact search, taking turns: our flat store (in RAM; saved and
        # reopened, vectors memory-mapped), numpy BLAS (benchmark code, not the library's) and
        # faiss IndexFlatIP (what flat stores searched with before)
        import faiss

        home = Path(tempfile.mkdtemp(prefix="nola-bench-knn-"))
        try:
            t = time.perf_counter()
            idx = EmbeddingIndex.create(home / "ix", d, {"bench": True}, index_type="flat")
            idx.add(ids, x)
            idx.search(qs[:1], k)  # nothing to build: flat stores search the vectors
            builds = {EXACT_OURS: time.perf_counter() - t}
            idx.save()
            t = time.perf_counter()
            reopened = EmbeddingIndex.open(home / "ix")
            reopened.search(qs[:1], k)  # maps the file's pages (from the page cache)
            builds[EXACT_MMAP] = time.perf_counter() - t
            entry["flat_reopened_memory_mapped"] = isinstance(reopened.vectors, np.memmap)
            t = time.perf_counter()
            ff = faiss.IndexFlatIP(d)
            ff.add(x)
            builds[EXACT_FAISS] = time.perf_counter() - t
            xn_np = np.ascontiguousarray(x)  # the store's own unit-norm float32 matrix would do
            builds[EXACT_NUMPY] = 0.0

            def np_search(q):
                return [[ids[j] for j in r] for r in numpy_topk(xn_np, q, k)]

            def faiss_search(q):
                return [[ids[j] for j in r] for r in ff.search(q, k)[1]]

            exact = {
                EXACT_OURS: lambda q: idx.search(q, k)[1],
                EXACT_MMAP: lambda q: reopened.search(q, k)[1],
                EXACT_NUMPY: np_search,
                EXACT_FAISS: faiss_search,
            }
            entry["blas"] = blas_facts()
            print(
                f"  exact search, taking turns ({args.single_queries} single queries, "
                f"{args.exact_repeats} batches of {len(bq)} each) ...",
                flush=True,
            )
            singles, batches, got = time_taking_turns(exact, qs, bq, args.single_queries, args.exact_repeats)
            truth = got[EXACT_NUMPY]
            for name in exact:
                bt = float(np.median(batches[name]))
                record(
                    name,
                    builds[name],
                    C.latency_stats(singles[name]),
                    bt,
                    got[name],
                    {"batch_s_runs": batches[name], "taking_turns": True},
                )
            entry["exact_vs_numpy"] = {
                name: {
                    "single": C.latency_stats(singles[EXACT_NUMPY])["median_ms"]
                    / C.latency_stats(singles[name])["median_ms"],
                    "batch": float(np.median(batches[EXACT_NUMPY]) / np.median(batches[name])),
                    # the same query's two times side by side, then the median of the ratios
                    "single_paired": float(np.median(np.array(singles[EXACT_NUMPY]) / np.array(singles[name]))),
                }
                for name in exact
            }
            del ff, reopened
            gc.collect()

            # IVF trains k-means on a sample, so the library default is affordable at any n.
            plans = [("ivf", {}, "ours ivf (library defaults)")]
            if n <= args.approx_default_max_n:
                plans += [("hnsw", {}, "ours hnsw (library defaults)")]
            elif args.large_hnsw:
                m_, efc = (int(v) for v in args.large_hnsw.split(","))
                plans += [("hnsw", {"hnsw_m": m_, "ef_construction": efc}, f"ours hnsw (M={m_}, efConstruction={efc})")]
                entry["note_approx"] = (
                    f"ivf and default hnsw (M=32, efConstruction=128) not built at n={n:,}: at "
                    f"100k they took the build times above; ivf trains k-means on all points "
                    f"with nlist=4*sqrt(n), ~30x the 100k cost at 1M"
                )
            for itype, meta, label in plans:
                if meta:
                    idx.update_meta(meta)
                idx.set_index_type(itype)
                t = time.perf_counter()
                idx.search(qs[:1], k)
                build = time.perf_counter() - t
                variants = [(None, label)]
                if itype == "hnsw":
                    variants.append((256, label + " efSearch=256"))
                for ef, lab in variants:
                    kw = {"ef_search": ef} if ef else {}
                    single = time_single(lambda q: idx.search(q[None], k, **kw), qs, args.single_queries)
                    t = time.perf_counter()
                    _, got = idx.search(bq, k, **kw)
                    bt = time.perf_counter() - t
                    extra = {
                        "index_meta": {
                            kk: idx.meta.get(kk) for kk in ("nlist", "hnsw_m", "ef_construction", "ef_search")
                        }
                    }
                    if ef:
                        extra["ef_search"] = ef
                    record(lab, build, single, bt, got, extra)
            del idx
            gc.collect()
        finally:
            shutil.rmtree(home, ignore_errors=True)

        # ---------------- proposed IVF build (NOT library code): subsampled, fewer centroids
        import faiss

        t = time.perf_counter()
        nlist = max(1, int(round(math.sqrt(n))))
        xn = x  # already unit-norm
        quant = faiss.IndexFlatIP(d)
        ivf = faiss.IndexIVFFlat(quant, d, nlist, faiss.METRIC_INNER_PRODUCT)
        ivf.cp.niter = 10
        sub = np.random.default_rng(0).choice(n, size=min(n, 64 * nlist), replace=False)
        ivf.train(np.ascontiguousarray(xn[np.sort(sub)]))
        ivf.add(xn)
        build = time.perf_counter() - t
        params = faiss.SearchParametersIVF(nprobe=min(nlist, max(16, nlist // 8)))

        def ivf_search(q):
            _, lab = ivf.search(np.ascontiguousarray(q, dtype=np.float32), k, params=params)
            return [[ids[j] for j in r if j >= 0] for r in lab]

        single = time_single(lambda q: ivf_search(q[None]), qs, args.single_queries)
        t = time.perf_counter()
        got = ivf_search(bq)
        bt = time.perf_counter() - t
        record(
            f"proposed ivf (nlist=sqrt(n)={nlist}, 64/centroid, 10 it)*",
            build,
            single,
            bt,
            got,
            {"not_library_code": True, "nprobe": params.nprobe},
        )
        del ivf, quant
        gc.collect()

        # ---------------- FiftyOne Brain sklearn backend: its NeighborsHelper on arrays
        t = time.perf_counter()
        helper = NeighborsHelper(x.copy(), "cosine")  # it centres its input in place
        neighbors, _ = helper.get_neighbors(can_use_dists=False)
        build = time.perf_counter() - t

        def sk_query(q):
            inds = neighbors.kneighbors(X=np.atleast_2d(q), n_neighbors=k, return_distance=False)
            return [[ids[i] for i in r] for r in inds]

        single = time_single(lambda q: sk_query(q), qs, args.single_queries)
        t = time.perf_counter()
        got = sk_query(bq)
        bt = time.perf_counter() - t
        record(
            "FO sklearn (NeighborsHelper, brute)",
            build,
            single,
            bt,
            got,
            {
                "measured": "fiftyone.brain.internal.core.sklearn.NeighborsHelper(embeddings, "
                "'cosine').get_neighbors(can_use_dists=False) then "
                "neighbors.kneighbors(query vector(s), k) + id lookup: the path "
                "SklearnSimilarityIndex._kneighbors takes for a vector query"
            },
        )
        del helper, neighbors
        gc.collect()

        # ---------------- real FiftyOne datasets: compute_similarity + sort_by_similarity
        if n <= args.fo_dataset_max_n:
            fo_dataset_knn(args, x, qs, bq, entry, record)
        out[str(n)] = entry
        del x, qs, bq
        gc.collect()

    results["knn"] = out
    big = out[str(max(args.knn_sizes))]
    meths = big["methods"]
    sk = meths["FO sklearn (NeighborsHelper, brute)"]["single_query"]["median_ms"]
    ok = {m: v for m, v in meths.items() if m.startswith("ours") and v[f"recall_at_{k}"] >= 0.95}
    best = min(ok, key=lambda m: ok[m]["single_query"]["median_ms"])
    approx = [m for m in meths if m.startswith("ours") and "flat" not in m and m in ok]
    suffix = "1m" if max(args.knn_sizes) >= 1_000_000 else f"{max(args.knn_sizes) // 1000}k"
    results[f"knn_single_query_speedup_{suffix}"] = sk / ok[best]["single_query"]["median_ms"]
    results[f"knn_best_index_{suffix}"] = best
    results[f"knn_recall_at_10_{suffix}"] = ok[best][f"recall_at_{k}"]
    if approx:
        fastest_approx = min(approx, key=lambda m: ok[m]["single_query"]["median_ms"])
        results[f"knn_approx_index_{suffix}"] = fastest_approx
        results[f"knn_approx_recall_at_10_{suffix}"] = ok[fastest_approx][f"recall_at_{k}"]
    prop = {m: v for m, v in meths.items() if m.startswith("proposed") and v[f"recall_at_{k}"] >= 0.95}
    if prop:
        pbest = min(prop, key=lambda m: prop[m]["single_query"]["median_ms"])
        results[f"knn_single_query_speedup_{suffix}_proposed"] = sk / prop[pbest]["single_query"]["median_ms"]
        results[f"knn_best_proposed_{suffix}"] = pbest
    flat = meths[EXACT_OURS]["single_query"]["median_ms"]
    results[f"knn_single_query_speedup_exact_{suffix}"] = sk / flat
    results[f"knn_batch_qps_speedup_exact_{suffix}"] = (
        meths[EXACT_OURS]["batch_qps"] / meths["FO sklearn (NeighborsHelper, brute)"]["batch_qps"]
    )
    # Exact search vs numpy BLAS, same run, taking turns: the worse of our two flat stores
    # (in RAM, reopened memory-mapped); >= 1 means at least as fast. faiss: the store before.
    vs = big["exact_vs_numpy"]
    for kind in ("single", "batch"):
        results[f"knn_exact_{kind}_vs_numpy_{suffix}"] = min(vs[EXACT_OURS][kind], vs[EXACT_MMAP][kind])
        results[f"knn_exact_{kind}_faiss_flat_vs_numpy_{suffix}"] = vs[EXACT_FAISS][kind]
    tables.append(
        C.table(
            ["n", "method", "build s", "1-query ms (median)", "p90 ms", "batch q/s", f"recall@{k}"],
            rows,
            title=f"k-NN top-{k}, dim {d}, clustered unit vectors; single-query latency over "
            f"{args.single_queries} queries, batch of {args.batch_queries} "
            f"({args.batch_queries_large} at n >= 1M)",
        )
        + "\n* proposed = FAISS called directly with the IVF build recommended for the library "
        "(not what the library does today)\n"
        + f"knn_single_query_speedup_{suffix} = {results[f'knn_single_query_speedup_{suffix}']:.1f}x "
        f"(sklearn median / {best}, recall@{k} {results[f'knn_recall_at_10_{suffix}']:.3f})\n"
        + "exact search vs numpy BLAS (taking turns; single = median latency ratio, batch = "
        "median q/s ratio; >= 1 is as fast or faster): "
        + "; ".join(
            f"{name}: single {v['single']:.2f}x, batch {v['batch']:.2f}x"
            for name, v in vs.items()
            if name != EXACT_NUMPY
        )
        + f"\nknn_exact_single_vs_numpy_{suffix} = {results[f'knn_exact_single_vs_numpy_{suffix}']:.2f}, "
        f"knn_exact_batch_vs_numpy_{suffix} = {results[f'knn_exact_batch_vs_numpy_{suffix}']:.2f} "
        f"(the worse of our two flat stores)"
    )


def fo_dataset_knn(args, x, qs, bq, entry, record) -> None:
    """The App's path on a real dataset: compute_similarity, then sort_by_similarity(vector)."""

    import fiftyone as fo
    import fiftyone.brain as fob

    from fiftyone_nola.stages.brain_backend import FaissSimilarityConfig  # noqa: F401 (registers class)

    n, k = len(x), args.k
    t = time.perf_counter()
    ds = fo.Dataset(f"knn-{n}-{os.getpid()}")
    ds.add_samples([fo.Sample(filepath=f"/nonexistent/{i:07d}.jpg") for i in range(n)], progress=False)
    sample_ids = ds.values("id")
    t_ds = time.perf_counter() - t
    print(f"  FiftyOne dataset of {n:,} samples created in {t_ds:.1f} s", flush=True)
    entry["fo_dataset_create_s"] = t_ds
    # ground truth in dataset ids
    gt_idx = EmbeddingTruth(x, k)
    truth = [[sample_ids[j] for j in r] for r in gt_idx.search(bq)]
    for backend, label, kwargs in [
        ("sklearn", "FO dataset: compute_similarity(sklearn)", {}),
        (
            "faiss",
            "FO dataset: compute_similarity(ours faiss, flat)",
            {"backend": "fiftyone_nola.stages.brain_backend.FaissSimilarityConfig", "index_type": "flat"},
        ),
    ]:
        t = time.perf_counter()
        try:
            bk = dict(kwargs)
            be = bk.pop("backend", backend)
            if be != "sklearn":
                import importlib

                mod, cls = be.rsplit(".", 1)
                be = getattr(importlib.import_module(mod), cls)
            res = fob.compute_similarity(ds, embeddings=x, brain_key=f"sim_{backend}", backend=be, progress=False, **bk)
            res.sort_by_similarity(qs[0], k=k)  # first query builds the search structure
        except Exception as e:  # report, keep benchmarking
            print(f"  {label}: failed: {type(e).__name__}: {e}", flush=True)
            entry.setdefault("errors", {})[label] = f"{type(e).__name__}: {e}"
            continue
        build = time.perf_counter() - t

        def app_query(q):
            view = res.sort_by_similarity(q, k=k)
            return view.values("id")  # the App then fetches these samples

        single = time_single(app_query, qs, args.single_queries)
        t = time.perf_counter()
        got_ids, _ = res._kneighbors(query=bq, k=k)
        bt = time.perf_counter() - t
        record(
            label + " + sort_by_similarity + values('id')",
            build,
            single,
            bt,
            got_ids,
            {
                "measured": "build = compute_similarity(embeddings=array) + first query; "
                "single = results.sort_by_similarity(vector, k) then "
                "view.values('id') (DB round trip); batch = "
                "results._kneighbors(query=batch, k)"
            },
            truth_ids=truth,
        )
        del res
        gc.collect()
    ds.delete()


class EmbeddingTruth:
    """Exact cosine top-k positions (FAISS flat) for translating ground truth to dataset ids."""

    def __init__(self, x, k):
        import faiss

        self.k = k
        self.ix = faiss.IndexFlatIP(x.shape[1])
        self.ix.add(x)

    def search(self, q):
        _, lab = self.ix.search(q, self.k)
        return lab


# =========================================================================== part 3


def rss_child(args) -> None:
    """Runs in a fresh process: embed N files of ``--_rss-dir`` and report memory."""
    env = C.isolate_environment("nola-bench-rss")
    try:
        import fiftyone as fo

        from fiftyone_nola.core.embed import EmbedConfig
        from fiftyone_nola.core.models import ClipSpec, tiny_clip_spec
        from fiftyone_nola.stages.embeddings import compute_embeddings

        files = sorted(str(p) for p in Path(args._rss_dir).iterdir())[: args._rss_child]
        ds = make_dataset(fo, f"rss-{args._rss_child}", files)
        spec = (
            tiny_clip_spec()
            if not args._rss_ckpt
            else ClipSpec(arch=args.arch, pretrained=args._rss_ckpt, random_init=False)
        )
        cfg = EmbedConfig(batch_size=args.batch_size, num_workers=args.num_workers, device="cpu")
        from fiftyone_nola.core.models import load_model

        load_model(spec)  # imports open_clip/torch once: the baseline then holds them
        gc.collect()
        base = C.current_rss_mb()
        C.reset_peak_rss()
        with C.TreeRssSampler() as tree:
            t = time.perf_counter()
            s = compute_embeddings(ds, "clip", clip=spec, config=cfg)["clip"]
            secs = time.perf_counter() - t
        out = {
            "n": len(files),
            "model": "tiny_clip_spec()" if not args._rss_ckpt else args.arch,
            "rss_before_mb": base,
            "peak_rss_mb": C.peak_rss_mb(),
            "peak_growth_mb": C.peak_rss_mb() - base,
            "peak_tree_rss_mb": tree.peak_mb,
            "peak_workers_rss_mb": tree.peak_children_mb,
            "index_vectors_mb": s["index_size"] * 4 * 32 / 2**20,
            "embedded": s["embedded"],
            "seconds": secs,
        }
        Path(args._rss_out).write_text(json.dumps(out))
    finally:
        C.cleanup(env)


def run_rss(args, results: dict, tables: list[str]) -> None:
    cache = Path(args.cache_dir)
    n_max = max(args.rss_sizes)
    copies_of(sorted(str(p) for p in CIFAR_DIR.rglob("*.jpg")), n_max, cache, "cifar")
    d = cache / "cifar_copies"
    rows, out = [], {}
    for n in args.rss_sizes:
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
            outp = f.name
        cmd = [
            sys.executable,
            __file__,
            "--_rss-child",
            str(n),
            "--_rss-dir",
            str(d),
            "--_rss-out",
            outp,
            "--batch-size",
            str(args.batch_size),
            "--num-workers",
            str(args.num_workers),
        ]
        t = time.perf_counter()
        subprocess.run(cmd, check=True)
        r = json.loads(Path(outp).read_text())
        os.unlink(outp)
        r["wall_s"] = time.perf_counter() - t
        out[str(n)] = r
        rows.append(
            [
                f"{n:,}",
                r["rss_before_mb"],
                r["peak_rss_mb"],
                r["peak_growth_mb"],
                r["peak_workers_rss_mb"],
                r["peak_tree_rss_mb"],
                r["seconds"],
            ]
        )
        print(
            f"  N={n:,}: main before {r['rss_before_mb']:.0f} MB, peak {r['peak_rss_mb']:.0f} MB "
            f"(+{r['peak_growth_mb']:.0f}), tree peak {r['peak_tree_rss_mb']:.0f} MB, "
            f"{r['seconds']:.1f} s",
            flush=True,
        )
        if n == 1000:
            results["peak_rss_mb_1k"] = r["peak_rss_mb"]
        if n == 10000:
            results["peak_rss_mb_10k"] = r["peak_rss_mb"]
        results[f"peak_rss_mb_{n}"] = r["peak_rss_mb"]
    results["rss"] = {
        "model": "fiftyone_nola.core.models.tiny_clip_spec() (random, 32 px input) on CIFAR-10 32x32 JPEG copies",
        "measured": "fresh child process per N: FiftyOne imported and dataset created, then "
        "VmHWM reset; peak = VmHWM of the main process during compute_embeddings; "
        "tree = sampled RSS sum of main + DataLoader workers (shared pages counted "
        "per process)",
        "by_n": out,
    }
    tables.append(
        C.table(
            ["N images", "RSS before MB", "peak MB", "growth MB", "workers MB", "tree peak MB", "s"],
            rows,
            title="Peak memory of compute_embeddings (tiny CLIP, 32x32 images), fresh process per N",
        )
    )


# =========================================================================== main


def main(argv=None) -> int:
    args = parse_args(argv)
    if args._rss_child:
        rss_child(args)
        return 0
    env = C.isolate_environment()
    timer = C.PartTimer()
    results: dict = {
        "benchmark": "embeddings",
        "quick": args.quick,
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "args": {k: v for k, v in vars(args).items() if not k.startswith("_")},
    }
    tables: list[str] = []
    t_all = time.perf_counter()
    try:
        import fiftyone  # noqa: F401  (starts the database once, outside any timing)

        from fiftyone_nola.core import cpu_isa

        results["machine"] = C.machine_facts()
        # Every speed figure is read against what this CPU offers (avx2 ... amx).
        results["cpu_isa"] = results["machine"]["cpu_isa"] = cpu_isa.cpu_isa()
        results["cpu_model"] = results["machine"].get("cpu_model") or cpu_isa.cpu_name()
        # A CPU simulated on a better one: NOLA_CPU_ISA picks the candidates, ONEDNN_MAX_CPU_ISA
        # caps the instructions OpenVINO's kernels use (AVX512_CORE_VNNI: no AMX, no bf16).
        results["cpu_isa_detected"] = cpu_isa._detected()[0]
        results["onednn_max_cpu_isa"] = os.environ.get("ONEDNN_MAX_CPU_ISA") or None
        print(
            "machine:",
            json.dumps(
                {
                    k: results["machine"].get(k)
                    for k in (
                        "cpu_model",
                        "cpu_isa",
                        "cpu_count",
                        "cpu_affinity",
                        "torch_num_threads",
                        "faiss_omp_threads",
                        "loadavg_at_start",
                    )
                }
            ),
        )
        parts = [
            ("throughput", args.skip_throughput, run_throughput),
            ("peak RSS", args.skip_rss, run_rss),
            ("k-NN", args.skip_knn, run_knn),
        ]
        for name, skip, fn in parts:
            if skip:
                continue
            with timer.part(name):
                fn(args, results, tables)
            print(tables[-1])
            if args.json:  # partial results survive an interrupted run
                C.write_json(args.json, {**results, "part_wall_s": timer.parts, "partial": True})
    finally:
        C.cleanup(env)
    results["part_wall_s"] = timer.parts
    results["total_wall_s"] = time.perf_counter() - t_all
    results["machine"]["loadavg_at_end"] = list(os.getloadavg())
    summary_keys = [
        k
        for k in (
            "ours_images_per_s",
            "fiftyone_images_per_s",
            "speedup",
            "speedup_small",
            "min_cosine",
            "min_cosine_draft",
            "cpu_isa",
            "speedup_small_engine",
            "speedup_engine",
            "min_cosine_engine",
            "engine_end_to_end_vs_model",
            "speedup_small_engine_int8",
            "speedup_engine_int8",
            "min_cosine_engine_int8",
            "engine_int8_end_to_end_vs_model",
            "knn_single_query_speedup_1m",
            "knn_recall_at_10_1m",
            "peak_rss_mb_1k",
            "peak_rss_mb_10k",
        )
        if k in results
    ]
    report = (
        "\n\n".join(tables)
        + "\n\nsummary: "
        + ", ".join(f"{k}={C.fmt(results[k], 4)}" for k in summary_keys)
        + "\nwall time per part: "
        + ", ".join(f"{k} {v:.0f} s" for k, v in timer.parts.items())
        + f"; total {results['total_wall_s']:.0f} s"
        + f"\nmachine: {results['machine'].get('cpu_count')} CPUs, torch threads "
        f"{results['machine'].get('torch_num_threads')}, load average start "
        f"{results['machine']['loadavg_at_start'][0]:.1f} / end {results['machine']['loadavg_at_end'][0]:.1f}"
        " (other jobs were sharing the CPU)" * (results["machine"]["loadavg_at_start"][0] > 1.5)
    )
    print("\n" + "=" * 80 + "\n" + report)
    if args.json:
        C.write_json(args.json, results)
    if args.txt:
        Path(args.txt).parent.mkdir(parents=True, exist_ok=True)
        Path(args.txt).write_text(report + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
