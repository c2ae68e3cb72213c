"""What each backbone preset costs on this machine: images/s of its CLIP and DINO, peak memory.

For every preset of ``fiftyone_nola/core/models/presets.py`` (``paper``, ``fast-cpu``, ``best``)
and the issue's extra pair (``pe-core``: PE-Core-B-16 + DINOv2 ViT-S/14), a fresh child process
builds the real-size architectures with *random* weights (they run exactly as fast as trained
ones; no number here is an accuracy), then embeds the same real COCO images (~640x480 JPEGs)
through the embedding stage's own path (``core.embed.embed_filepaths``: decoding, each model's
preprocessing, batching and workers fitted to the machine), CLIP first, then DINO. A warm-up
batch is excluded. Peak RSS is the child process's own peak (VmHWM: the models, their inference
and any engine conversion; the DataLoader workers' sum is kept as ``peak_rss_tree_mb``, which
counts pages shared with forked workers once per process). ``gflops`` is the image tower's
forward cost per image (torch's FlopCounterMode on one image): machine-independent, unlike img/s.

With ``--engine-ratio`` the CLIP and DINO towers of the cheaper presets are also run through the
OpenVINO engine (``core/engines.py``, fp32 here: this CPU has no native bf16, where ``auto``
picks PyTorch) and the ratio to PyTorch is recorded; conversion happens once per model and is
not timed.

Usage::

    .venv/bin/python benchmarks/backbones.py --quick                 # ~5 minutes on 2 cores
    nice -n 10 .venv/bin/python benchmarks/backbones.py --engine-ratio \
        --json benchmarks/results/backbones.json --txt benchmarks/results/backbones.txt
    .venv/bin/python benchmarks/backbones.py --no-timing --json benchmarks/results/backbones_flops.json

JSON keys per preset (``-`` in a preset name becomes ``_``): ``images_per_s_<preset>_clip``,
``images_per_s_<preset>_dino``, ``peak_rss_mb_<preset>``, ``gflops_<preset>_clip`` / ``_dino``, and with ``--engine-ratio``
``engine_ratio_<preset>_clip`` / ``_dino`` (OpenVINO fp32 images/s over PyTorch's).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import _common as C  # noqa: E402

COCO_DIR = C.SHARED_DATA / "coco256" / "images"
EXTRA = {"pe-core": ("PE-Core-B-16", "meta", "vit_small_patch14_dinov2.lvd142m")}
ENGINE_PRESETS = ("paper", "fast-cpu", "pe-core")  # converting the 400M-parameter towers takes too long here


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", default="paper,fast-cpu,pe-core,best", help="comma-separated")
    p.add_argument("--images", type=int, default=96, help="COCO images per model (after the warm-up batch)")
    p.add_argument("--batch-size", type=int, default=None, help="default: the machine's embedding batch")
    p.add_argument("--engine-ratio", action="store_true", help="also time the OpenVINO engine (fp32)")
    p.add_argument("--quick", action="store_true", help="32 images, no engine ratio")
    p.add_argument("--no-timing", action="store_true", help="only build the models and count their FLOPs")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--json", default=None)
    p.add_argument("--txt", default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.images, args.engine_ratio = 32, False
    return args


def pair(name: str):
    from fiftyone_nola.core.models import ClipSpec, DinoSpec
    from fiftyone_nola.core.models.presets import PRESETS

    if name in EXTRA:
        arch, tag, dino = EXTRA[name]
        return ClipSpec(arch, tag, random_init=True), DinoSpec(name=dino, random_init=True)
    p = PRESETS[name]
    return p.clip_spec(random_init=True), p.dino_spec(random_init=True)


def _images(n: int) -> list[str]:
    paths = sorted(str(p) for p in COCO_DIR.glob("*.jpg"))
    if len(paths) < 8:
        raise SystemExit(f"COCO images not found at {COCO_DIR} (set NOLA_SHARED_DATA)")
    return [paths[i % len(paths)] for i in range(n)]


def _gflops(loaded) -> float:
    """Forward GFLOPs per image of the image tower (multiply-adds counted as 2)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, 3, loaded.image_size, loaded.image_size)
    with FlopCounterMode(display=False) as counter:  # (its module hooks need autograd on)
        loaded.encode_image(x)
    return counter.get_total_flops() / 1e9


def _time_model(loaded, paths: list[str], cfg, engine: str) -> dict:
    import dataclasses

    from fiftyone_nola.core.embed import embed_filepaths

    cfg = dataclasses.replace(cfg, engine=engine, precision="fp32")
    embed_filepaths(loaded, paths[: cfg.batch_size], cfg)  # warm-up (and engine conversion) untimed
    with C.Stopwatch() as sw:
        out, failed = embed_filepaths(loaded, paths, cfg)
    assert not failed and out.shape == (len(paths), loaded.embed_dim)
    return {"seconds": sw.seconds, "images_per_s": len(paths) / sw.seconds}


def child(args) -> None:
    """One preset in this (fresh) process: its models' images/s and the process tree's peak RSS."""
    from fiftyone_nola.core.embed import EmbedConfig
    from fiftyone_nola.core.models import load_clip, load_dino

    env = C.isolate_environment("nola-bench-backbones")
    clip_spec, dino_spec = pair(args.child)
    cfg = EmbedConfig(batch_size=args.batch_size, device="cpu").resolved()
    paths = _images(args.images)
    out: dict = {"preset": args.child, "clip": repr(clip_spec), "dino": repr(dino_spec), "batch_size": cfg.batch_size}
    out["num_workers"] = cfg.num_workers
    sampler = C.TreeRssSampler()
    try:
        with sampler:
            for family, spec, load in (("clip", clip_spec, load_clip), ("dino", dino_spec, load_dino)):
                with C.Stopwatch() as sw:
                    loaded = load(spec)
                params = sum(p.numel() for p in _image_module(loaded).parameters())
                row = {"load_s": sw.seconds, "image_params_m": params / 1e6, "image_size": loaded.image_size}
                row["gflops"] = _gflops(loaded)
                row["loadavg_start"] = C.loadavg()
                if not args.no_timing:
                    row.update(_time_model(loaded, paths, cfg, "torch"))
                if args.engine_ratio and args.child in ENGINE_PRESETS and not args.no_timing:
                    ov = _time_model(loaded, paths, cfg, "openvino")
                    row["openvino_fp32_images_per_s"] = ov["images_per_s"]
                    row["engine_ratio"] = ov["images_per_s"] / row["images_per_s"]
                row["loadavg_end"] = C.loadavg()
                out[family] = row
                print(f"[{args.child}] {family} {spec!r}: {json.dumps(row)}", flush=True)
                del loaded
        out["peak_rss_tree_mb"] = sampler.peak_mb
        out["peak_rss_main_mb"] = C.peak_rss_mb()
    finally:
        C.cleanup(env)
    Path(args.child_out).write_text(json.dumps(C._jsonable(out)))


def _image_module(loaded):
    """The module whose forward is timed (CLIP: its image tower)."""
    return loaded.model.visual if loaded.family == "clip" else loaded.model


def run(args, results: dict, tables: list[str], tmp: Path) -> None:
    rows = []
    for name in [p.strip() for p in args.presets.split(",") if p.strip()]:
        out = tmp / f"{name}.json"
        cmd = [sys.executable, __file__, "--child", name, "--child-out", str(out), "--images", str(args.images)]
        cmd += ["--batch-size", str(args.batch_size)] if args.batch_size else []
        cmd += ["--engine-ratio"] if args.engine_ratio else []
        cmd += ["--no-timing"] if args.no_timing else []
        print(f"\n=== {name} ===", flush=True)
        subprocess.run(cmd, check=True, env=dict(os.environ, PYTHONPATH=str(C.REPO)))
        r = json.loads(out.read_text())
        results.setdefault("presets", {})[name] = r
        rows.append(_summarise(name, r, results))
    headers = ["preset", "CLIP img M", "CLIP GFLOPs", "CLIP img/s", "DINO M", "DINO GFLOPs", "DINO img/s"]
    headers += ["both img/s", "peak RSS MB", "OV/torch CLIP", "OV/torch DINO"]
    tables.append(C.table(headers, rows, title=f"random real-size weights, {args.images} COCO images per model"))


def _summarise(name: str, r: dict, results: dict) -> list:
    """The preset's flat JSON keys (module docstring) and its table row."""
    key = name.replace("-", "_")
    for fam in ("clip", "dino"):
        results[f"gflops_{key}_{fam}"] = r[fam]["gflops"]
        if "images_per_s" in r[fam]:
            results[f"images_per_s_{key}_{fam}"] = r[fam]["images_per_s"]
        if "engine_ratio" in r[fam]:
            results[f"engine_ratio_{key}_{fam}"] = r[fam]["engine_ratio"]
    results[f"peak_rss_mb_{key}"] = r["peak_rss_main_mb"]
    c, d = r["clip"], r["dino"]
    both = 1.0 / (1.0 / c["images_per_s"] + 1.0 / d["images_per_s"]) if "images_per_s" in c else None
    return [
        name,
        c["image_params_m"],
        c["gflops"],
        c.get("images_per_s"),
        d["image_params_m"],
        d["gflops"],
        d.get("images_per_s"),
        both,
        r["peak_rss_main_mb"],
        c.get("engine_ratio"),
        d.get("engine_ratio"),
    ]


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        child(args)
        return 0
    return C.run_benchmark("backbones", args, run, "nola-bench-backbones")


if __name__ == "__main__":
    sys.exit(main())
