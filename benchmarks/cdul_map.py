"""CDUL on real COCO photos: throughput of global and local (crop) CLIP scoring, classifier
training time, peak memory, batched vs naive crop scoring, and (only with pretrained weights)
mAP of each stage.

What runs (on ``../shared/data/coco256``: 256 full-resolution COCO photos, 80 classes, with
the real open_clip ViT-B-32 architecture):

1. **Embedding pass** (``embeddings.compute_embeddings``, CLIP): images/s, reported apart.
2. **Global scoring** from the stored embeddings (``load_embeddings`` +
   ``multilabel.global_scores``): images/s; the class texts' encoding (CDUL's prompt
   "a photo of a {c}." by default) is timed separately, it does not depend on the images.
3. **Local scoring** (``multilabel.local_clip_scores``, 3x3 grid, batched: crops of many
   images share a forward pass, decoding in a worker): images/s.
4. **Baseline**: a naive per-image loop on the same images (open + full decode, cut 9 crops,
   preprocess, one forward pass of 9 crops, softmax), timed next to the batched call on the
   same subset; also the largest score difference between the two (a correctness check).
5. **Classifier training** (``multilabel.train_multilabel_classifier`` with the machine's
   schedule, ``config.resolve(TrainConfig())``: on a CPU 30 epochs, labels refined every 3rd epoch
   after 3 warm-up epochs; on the stored CLIP features against the initial soft labels): seconds.
6. **mAP** (sklearn AP, classes with a positive) of global-only, local (max over crops),
   CDUL initial labels and the trained classifier: only when ``NOLA_PRETRAINED=1`` with weights
   in ``NOLA_MODELS_DIR``. With random weights no mAP is printed or written.

Usage::

    .venv/bin/python benchmarks/cdul_map.py --quick                    # < 2 minutes
    .venv/bin/python benchmarks/cdul_map.py --json benchmarks/results/cdul_map.json \\
        --txt benchmarks/results/cdul_map.txt
"""

from __future__ import annotations

import argparse
import json
import sys
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import _common as C  # noqa: E402

DATA = C.SHARED_DATA / "coco256"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="16 images, naive baseline on 4: development, < 2 min")
    p.add_argument("--json", metavar="PATH", help="write the figures to this JSON file")
    p.add_argument("--txt", metavar="PATH", help="also write the printed tables to this file")
    p.add_argument("--n", type=int, help="images (first n of the 256, sorted by name); default 256")
    p.add_argument("--naive-n", type=int, help="images for the naive-vs-batched comparison; default 32 (quick 4)")
    p.add_argument("--arch", default="ViT-B-32", help="open_clip architecture (default ViT-B-32)")
    p.add_argument(
        "--clip-pretrained", default="openai", help="open_clip tag or checkpoint file used when NOLA_PRETRAINED=1"
    )
    p.add_argument(
        "--texts",
        choices=("single", "ensemble"),
        default="single",
        help='class texts: CDUL\'s "a photo of a {c}." (default) or the 80-template ensemble',
    )
    p.add_argument("--grid", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32, help="images per batch for the embedding pass")
    p.add_argument(
        "--crop-batch-size",
        type=int,
        default=16,
        help="images per crop batch (x grid^2 crops); default 16 = the pipeline's",
    )
    p.add_argument("--num-workers", type=int, default=1, help="DataLoader workers (default 1)")
    p.add_argument(
        "--train-epochs",
        type=int,
        default=None,
        help="classifier epochs (default: the pipeline's schedule for this machine, 30 on a CPU)",
    )
    a = p.parse_args(argv)
    a.n = a.n or (16 if a.quick else 256)
    a.naive_n = min(a.n, a.naive_n or (4 if a.quick else 32))
    return a


def naive_local_scores(clip, filepaths, weights, grid: int, logit_scale: float = 100.0):
    """The baseline: one image at a time, full decode, its grid crops in one forward pass."""
    import numpy as np
    import torch
    from PIL import Image

    from fiftyone_nola.core.cdul import grid_boxes

    w = torch.from_numpy(np.asarray(weights, dtype=np.float32))
    out = np.full((len(filepaths), grid * grid, w.shape[0]), np.nan, dtype=np.float32)
    with torch.inference_mode():
        for i, path in enumerate(filepaths):
            with Image.open(path) as im:
                img = im.convert("RGB")
            crops = torch.stack([clip.transform(img.crop(b)) for b in grid_boxes(*img.size, grid)])
            f = torch.nn.functional.normalize(clip.encode_image(crops).float(), dim=-1)
            out[i, : len(crops)] = torch.softmax(logit_scale * f @ w.T, dim=-1).numpy()
    return out


def main(argv=None) -> int:
    from fiftyone_nola.logs import lines_to

    with lines_to(lambda m: print("   ", m, flush=True)):  # the stages' progress lines
        return C.run_benchmark("cdul_map", parse_args(argv), run, "nola-bench-cdul")


def run(args, results: dict, tables: list, tmp: Path) -> None:
    import fiftyone as fo
    import numpy as np
    import torch

    from fiftyone_nola.core import cdul as ml
    from fiftyone_nola.core import models
    from fiftyone_nola.core import zeroshot as zs
    from fiftyone_nola.core.config import resolve
    from fiftyone_nola.core.descriptions import SIMPLE_TEMPLATE, fill_templates, load_class_names
    from fiftyone_nola.core.embed import EmbedConfig
    from fiftyone_nola.core.models import ClipSpec
    from fiftyone_nola.stages import fo_io
    from fiftyone_nola.stages.embeddings import compute_embeddings, load_embeddings

    pretrained = C.pretrained_mode()
    results["pretrained"] = pretrained
    log = lambda m: print("   ", m, flush=True)  # noqa: E731
    if pretrained:
        clip_spec = ClipSpec(arch=args.arch, pretrained=args.clip_pretrained, random_init=False)
        ok, hint = models.weights_available(clip_spec)
        if not ok:
            raise SystemExit(f"NOLA_PRETRAINED=1 but weights are missing: {hint}")
    else:
        import open_clip

        torch.manual_seed(0)
        m, _, _ = open_clip.create_model_and_transforms(args.arch, pretrained=None)
        ckpt = tmp / f"{args.arch}-random.pt"
        torch.save(m.state_dict(), ckpt)
        del m
        clip_spec = ClipSpec(arch=args.arch, pretrained=str(ckpt), random_init=False)
        print(
            "\n" + "!" * 78 + "\n!! RANDOM WEIGHTS (no NOLA_PRETRAINED=1): speed and memory figures are "
            "valid,\n!! mAP is NOT meaningful and is neither printed nor written.\n" + "!" * 78
        )
    results["models"] = {"clip": f"{args.arch} ({'pretrained' if pretrained else 'random init'})"}

    classes = load_class_names(DATA / "classes.txt")
    labels = json.loads((DATA / "labels.json").read_text())
    names = sorted(labels)[: args.n]
    files = [str(DATA / "images" / f) for f in names]
    for f in files:
        Path(f).read_bytes()  # page cache warm for every part alike
    ds = fo.Dataset(f"nola-bench-cdul-{uuid.uuid4().hex[:8]}")
    ds.add_samples(
        [
            fo.Sample(
                filepath=f,
                ground_truth=fo.Classifications(classifications=[fo.Classification(label=lab) for lab in labels[nm]]),
            )
            for f, nm in zip(files, names)
        ],
        progress=False,
    )
    ids, paths = fo_io.ids_and_paths(ds)
    by_path = dict(zip(files, names))
    y_true = np.zeros((len(paths), len(classes)), dtype=bool)
    for i, p in enumerate(paths):
        for lab in labels[by_path[p]]:
            y_true[i, classes.index(lab)] = True
    n = len(paths)
    print(f"{n} COCO images, {len(classes)} classes, {y_true.sum(1).mean():.2f} labels/image")

    P = C.Parts()
    results["parts"] = P.rows  # filled as parts finish
    with P.part("embedding pass (CLIP)", n) as row:
        s = compute_embeddings(
            ds,
            "clip",
            clip=clip_spec,
            config=EmbedConfig(batch_size=args.batch_size, num_workers=args.num_workers, device="cpu"),
        )["clip"]
        row["model_load_seconds"] = s["model_load_seconds"]
        row["images_per_s_excl_model_load"] = s["images_per_s"]
    with P.part("load CLIP", 0):
        clip = models.load_clip(clip_spec, torch.device("cpu"))
    texts = (
        {c: [SIMPLE_TEMPLATE.format(c)] for c in classes}
        if args.texts == "single"
        else {c: fill_templates(c) for c in classes}
    )
    with P.part("class texts (text tower)", 0) as row:
        W = zs.build_class_weights(clip, texts, classes)
        row["texts"] = sum(len(t) for t in texts.values())
    with P.part("global scoring (stored embeddings)", n):
        _, emb = load_embeddings(ds, clip_spec, ids)
        g = ml.global_scores(emb, W)
    ccfg = ml.CropConfig(grid=args.grid, batch_size=args.crop_batch_size, num_workers=args.num_workers, device="cpu")
    with P.part(f"local scoring ({args.grid}x{args.grid}, batched)", n):
        local, failed = ml.local_clip_scores(clip, paths, W, ccfg)
    assert not failed, failed
    k = args.naive_n
    with P.part(f"local scoring, batched, first {k}", k):
        local_k, _ = ml.local_clip_scores(clip, paths[:k], W, ccfg)
    with P.part(f"local scoring, naive per-image loop, first {k}", k):
        naive_k = naive_local_scores(clip, paths[:k], W, args.grid)
    max_diff = float(np.nanmax(np.abs(naive_k - local_k)))
    with P.part("aggregate (initial labels)", n):
        y0 = ml.aggregate_scores(g, local, 0.0, "avg")
    tcfg = resolve(ml.TrainConfig(epochs=args.train_epochs), "cpu")
    log(ml.schedule_message(tcfg))
    train_key = f"classifier training ({tcfg.epochs} epochs)"
    with P.part(train_key, n) as row:
        model, refined, hist = ml.train_multilabel_classifier(emb, y0, tcfg)
        row["final_loss"] = hist["loss"][-1] if hist["loss"] else None
        row["label_update_epochs"] = hist["update_epochs"]
    with P.part("classifier predict", n):
        probs = ml.predict_multilabel(model, emb)

    r = P.rows
    loc_key = f"local scoring ({args.grid}x{args.grid}, batched)"
    glob_key = "global scoring (stored embeddings)"
    emb_key = "embedding pass (CLIP)"
    results["parts"] = r
    results["images_per_s_global"] = r[glob_key]["images_per_s"]
    results["images_per_s_embedding_pass"] = r[emb_key]["images_per_s"]
    results["images_per_s_global_incl_embedding"] = n / (r[emb_key]["seconds"] + r[glob_key]["seconds"])
    results["images_per_s_local"] = r[loc_key]["images_per_s"]
    results["text_seconds"] = r["class texts (text tower)"]["seconds"]
    results["train_seconds"] = r[train_key]["seconds"]
    nb, nv = r[f"local scoring, batched, first {k}"], r[f"local scoring, naive per-image loop, first {k}"]
    results["naive_vs_batched"] = {
        "images": k,
        "batched_images_per_s": nb["images_per_s"],
        "naive_images_per_s": nv["images_per_s"],
        "speedup": nb["images_per_s"] / nv["images_per_s"],
        "max_abs_score_difference": max_diff,
    }
    results["peak_rss_mb"] = max(v["peak_rss_mb"] for v in r.values())
    rows = []
    for name, v in r.items():
        note = ""
        if name == emb_key:
            note = (
                f"model load {v['model_load_seconds']:.1f}s; {v['images_per_s_excl_model_load']:.1f} img/s excl. load"
            )
        elif "texts" in v:
            note = f"{v['texts']} texts"
        elif name == train_key:
            note = f"final loss {v['final_loss']:.4f}; labels refined {len(v['label_update_epochs'])}x"
        rows.append(
            [name, v["seconds"], v["images"] or "-", v["images_per_s"], v["peak_rss_mb"], v["loadavg_start"], note]
        )
    tables.append(
        C.table(
            ["part", "wall s", "images", "img/s", "peak RSS MB", "load", "notes"],
            rows,
            title=f"CDUL on {n} COCO images ({args.arch}, {len(classes)} classes, crop batch "
            f"{args.crop_batch_size} images x {args.grid**2} crops, "
            f"{args.num_workers} worker(s))",
        )
    )
    nvb = results["naive_vs_batched"]
    tables[-1] += (
        f"\nbatched vs naive crop scoring on the same {k} images: {nvb['batched_images_per_s']:.2f} vs "
        f"{nvb['naive_images_per_s']:.2f} img/s = {nvb['speedup']:.2f}x; max |score difference| "
        f"{max_diff:.2e}"
    )
    print("\n" + tables[-1])

    if pretrained:
        maps = {
            "map_global": ml.mean_average_precision(y_true, g),
            "map_local": ml.mean_average_precision(y_true, ml.local_only(local, 0.0)),
            "map_initial": ml.mean_average_precision(y_true, y0),
            "map_trained": ml.mean_average_precision(y_true, probs),
        }
        results.update(maps)
        _, n_eval = ml.mean_average_precision(y_true, g, return_count=True)
        tables.append(
            C.table(
                ["scores", "mAP"],
                [[k, v] for k, v in maps.items()],
                title=f"mAP on {n} COCO images over {n_eval} classes with a positive "
                f"(pretrained {args.arch}, texts: {args.texts})",
            )
        )
    else:
        tables.append(
            "mAP: not meaningful with random weights; none is printed or written. "
            "Set NOLA_PRETRAINED=1 with weights in NOLA_MODELS_DIR to measure it."
        )
    print("\n" + tables[-1])
    ds.delete()


if __name__ == "__main__":
    sys.exit(main())
