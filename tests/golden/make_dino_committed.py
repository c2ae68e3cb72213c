"""Official DINO features on four committed images: ``committed_*`` of ``dino_reference.json``.

Runs the official ``vision_transformer.py`` of facebookresearch/dino at the JSON's ``dino_commit``
(7c446df5b9f45747937fb0d72314eb9f7b66930a), exported unmodified into a scratch folder OUTSIDE
this repository, with the JSON's weights rule, NoLA's ``te_transform`` and the official
``forward``. It first recomputes the stored features of the four ``../shared/data`` images from
the rule and stops unless they match (max |diff| <= 1e-5; 1.2e-7 when written), then computes
the same for the images of ``COMMITTED`` and merges them into the JSON (``committed_images``,
``models.*.committed_features``). Exact command used::

    mkdir -p /work/scratch/dino_ref && cd /work/scratch/dino_ref
    git --git-dir=/work/.mirror/facebookresearch+dino/repo show \
        7c446df5b9f45747937fb0d72314eb9f7b66930a:vision_transformer.py > vision_transformer.py
    git --git-dir=/work/.mirror/facebookresearch+dino/repo show \
        7c446df5b9f45747937fb0d72314eb9f7b66930a:utils.py > utils.py
    /work/main/.venv/bin/python <repo>/tests/golden/make_dino_committed.py <repo> /work/shared/data

(the scratch folder is the working directory, so ``import vision_transformer`` finds the
official file). Re-run it whenever ``tests/data/make.py`` rewrites those images: their sha256 in
the JSON is checked by ``tests/test_dino_faithful.py``.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision import transforms

COMMITTED = ["tiny10/astronaut/0000.jpg", "tiny10/cat/0003.jpg", "photos/images/cameraman.jpg"]
COMMITTED += ["photos/images/coffee.jpg"]
MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
SOURCE = (
    "tests/data of this repository (paths relative to it): the same models, weights rule, preprocessing and official"
    " forward, by tests/golden/make_dino_committed.py (vision_transformer.py of facebookresearch/dino at dino_commit,"
    " unmodified, outside the repository), which first reproduced the features of `images` above from the rule"
    " (max |diff| 1.2e-7)"
)


def te_transform():
    """NoLA's te_transform (fazliimam/NoLA @ ffd99acda629, utils/model_utils.py)."""
    return transforms.Compose(
        [
            transforms.Resize(224, interpolation=Image.BICUBIC),
            transforms.CenterCrop(224),
            lambda im: im.convert("RGB"),
            transforms.ToTensor(),
            transforms.Normalize(MEAN, STD),
        ]
    )


def weights(model: dict) -> dict:
    """The JSON's ``weights_rule``, written from its text."""
    rng = np.random.default_rng(model["seed"])
    sd = {}
    for key, shape in model["keys"]:
        z = rng.standard_normal(shape)
        if key in ("cls_token", "pos_embed"):
            a = 0.02 * z
        elif len(shape) == 1 and "norm" in key.rsplit(".", 2)[-2] and key.endswith(".weight"):
            a = 1.0 + 0.1 * z
        elif len(shape) == 1:
            a = 0.02 * z
        else:
            a = z / math.sqrt(math.prod(shape[1:]))
        sd[key] = torch.from_numpy(a.astype(np.float32))
    return sd


def official(builder: str, model: dict, tmp: Path):
    sys.path.insert(0, str(Path.cwd()))  # the official file, in the working directory
    import vision_transformer as vits

    net = vits.__dict__[builder](patch_size=16, num_classes=0)
    path = tmp / model["release_file"]
    torch.save(weights(model), path)
    net.load_state_dict(torch.load(path, map_location="cpu"), strict=True)  # as hubconf does
    return net.eval()


def features(net, paths) -> np.ndarray:
    te = te_transform()
    x = torch.stack([te(Image.open(p).convert("RGB")) for p in paths])  # dassl's read_image
    with torch.no_grad():
        return net(x).numpy()


def layout(o, ind: int = 0) -> str:
    """The JSON's own layout: one key or list item per line, lists of numbers on one line."""
    pad = " " * (ind + 1)
    if isinstance(o, dict):
        items = ",\n".join(f"{pad}{json.dumps(k)}: {layout(v, ind + 1)}" for k, v in o.items())
        return "{\n" + items + "\n" + " " * ind + "}"
    if isinstance(o, list) and any(isinstance(x, (list, dict)) for x in o):
        return "[\n" + ",\n".join(pad + layout(x, ind + 1) for x in o) + "\n" + " " * ind + "]"
    if isinstance(o, list):
        return "[" + ", ".join(json.dumps(x) for x in o) + "]"
    return json.dumps(o)


def main(repo: Path, shared: Path) -> None:
    path = repo / "tests" / "golden" / "dino_reference.json"
    golden = json.loads(path.read_text())
    data = repo / "tests" / "data"
    tmp = Path.cwd() / "weights"
    tmp.mkdir(exist_ok=True)
    images = []
    for p in COMMITTED:
        f = data / p
        with Image.open(f) as im:
            images.append({"path": p, "sha256": hashlib.sha256(f.read_bytes()).hexdigest(), "size": list(im.size)})
    out = {}
    for key, builder in (("vit_small16", "vit_small"), ("vit_base16", "vit_base")):
        model = golden["models"][key]
        net = official(builder, model, tmp)
        again = features(net, [shared / im["path"] for im in golden["images"]])
        diff = float(np.abs(again - np.array(model["features"])).max())
        print(f"{key}: the stored features recomputed from the rule, max |diff| {diff:.2g}", file=sys.stderr)
        assert diff <= 1e-5, "the rule does not reproduce the stored golden: not writing"
        f = features(net, [data / p for p in COMMITTED])
        out[key] = [[float(f"{v:.8g}") for v in row] for row in f]
    merged = {}
    for k, v in golden.items():
        if k not in ("committed_images", "committed_images_source"):
            merged[k] = v
        if k == "images":
            merged.update(committed_images=images, committed_images_source=SOURCE)
    for key, feats in out.items():
        merged["models"][key]["committed_features"] = feats
    path.write_text(layout(merged) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]).resolve(), Path(sys.argv[2]).resolve())
