"""Official DINOv2 / DINOv3 features on four committed images: ``committed_*`` of ``dinov2_v3_reference.json``.

Runs the official code of facebookresearch/dinov2 at the JSON's ``dinov2_commit``
(b8931f7bf91576930313be2c6d6af376033b35f0) and facebookresearch/dinov3 at its ``dinov3_commit``
(6876159a11b4df116f30f667f8c9888617df0751), exported unmodified into a scratch folder OUTSIDE this
repository, as ``make_dinov2_v3_reference.py`` did: each hub builder (``dinov2_vits14(pretrained=False)``
...) filled by the JSON's weights rule (the same weights ``make_weights`` of
``tests/test_dinov2_faithful.py`` regenerates), saved as the official release file and loaded back
the way the hub loader does (DINOv2: strict ``load_state_dict``; DINOv3: ``dinov3_vits16(weights=<file>)``,
through ``torch.hub.load_state_dict_from_url``), each release's own
``make_classification_eval_transform()`` and the official forward (CLS token after the final norm),
float32 on the CPU. It first recomputes the stored features and pixel hashes of the four
``../shared/data`` images and stops unless they match (pixels identical, max |diff| <= 1e-5:
3.4e-6 when written, on features of magnitude up to 3.9, float32 sums on a 2-core CPU), then
computes the same for the four committed images that ``dino_reference.json``'s
``committed_images`` lists (under tests/data) and merges them into the JSON
(``committed_images``, ``committed_images_source``, ``models.*.committed_pixels_sha256``,
``models.*.committed_features``), every other key unchanged. Exact commands used::

    mkdir -p /work/scratch/dinov2_ref/dinov2 /work/scratch/dinov2_ref/dinov3 && cd /work/scratch/dinov2_ref
    git --git-dir=/work/.mirror/facebookresearch+dinov2/repo archive \
        b8931f7bf91576930313be2c6d6af376033b35f0 | tar -x -C dinov2
    git --git-dir=/work/.mirror/facebookresearch+dinov3/repo archive \
        6876159a11b4df116f30f667f8c9888617df0751 dinov3 hubconf.py | tar -x -C dinov3
    /work/main/.venv/bin/python <repo>/tests/golden/make_dinov2_v3_committed.py <repo> /work/shared/data

(the scratch folder is the working directory, holding the exports ``dinov2/`` and ``dinov3/``; every
exported file's git blob hash was checked against ``git ls-tree -r`` of its commit). Re-run it
whenever ``tests/data/make.py`` rewrites those images: their sha256 in the JSON is checked by
``tests/test_dinov2_faithful.py``.
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from make_dinov2_v3_reference import weight  # the rule, once (this folder is on sys.path)
from PIL import Image

SOURCE = (
    "tests/data of this repository (paths relative to it; dino_reference.json's committed_images): the same"
    " models, weights rule, make_classification_eval_transform() and official forward, by"
    " tests/golden/make_dinov2_v3_committed.py (facebookresearch/dinov2 at dinov2_commit and facebookresearch/dinov3"
    " at dinov3_commit, unmodified, outside the repository), which first reproduced the features and pixel hashes"
    " of `images` above from the rule (max |diff| {diff:.2g})"
)


def generation(key: str) -> str:
    return "dinov3" if key.startswith("dinov3") else "dinov2"


def weights(model: dict, gen: str) -> dict:
    """The JSON's ``weights_rule``, per tensor as make_dinov2_v3_reference.py applies it (buffers:
    the stored ``.periods``, ``.bias_mask`` ones with the middle third zero)."""
    rng = np.random.default_rng(model["seed"])
    sd = {}
    for key, shape in model["keys"]:
        a = weight(key, shape, rng.standard_normal(shape), gen)
        if key.endswith(".periods"):
            sd[key] = torch.tensor(model["buffers"][key], dtype=torch.float32)
        elif key.endswith(".bias_mask"):
            sd[key] = torch.ones(shape)
            sd[key][shape[0] // 3 : 2 * shape[0] // 3] = 0
        else:
            sd[key] = torch.from_numpy(np.asarray(a, dtype=np.float32))
    return sd


def official(key: str, model: dict, tmp: Path):
    """The official hub model with the rule's weights, loaded back from its release file as the hub does."""
    gen = generation(key)
    assert model["builder"] == f"{gen}.hub.backbones.{key}(pretrained=False)", model["builder"]
    builder = getattr(__import__(f"{gen}.hub.backbones", fromlist=["x"]), key)
    net = builder(pretrained=False).eval()
    own = net.state_dict()
    assert [[k, list(v.shape)] for k, v in own.items()] == model["keys"], f"{key}: the layout is not the stored one"
    sd = weights(model, gen)
    for k in own:  # buffers the rule keeps as built
        if k.endswith(".periods") or k.endswith(".bias_mask"):
            assert torch.equal(sd[k], own[k]), f"{key}: buffer {k} differs from the built one"
    path = tmp / model["release_file"]
    torch.save(sd, path)
    if gen == "dinov2":
        net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    else:
        net = builder(pretrained=True, weights=str(path.resolve())).eval()
    return net, __import__(f"{gen}.data.transforms", fromlist=["x"]).make_classification_eval_transform()


def features(net, transform, paths) -> tuple[list[str], np.ndarray]:
    x = torch.stack([transform(Image.open(p).convert("RGB")) for p in paths])
    pixels = [hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest() for t in x]
    with torch.no_grad():
        return pixels, net(x).numpy()


def checked(root: Path, images: list[dict]) -> list[Path]:
    paths = [root / im["path"] for im in images]
    for p, im in zip(paths, images):
        assert hashlib.sha256(p.read_bytes()).hexdigest() == im["sha256"], f"{p} is not the stored image"
        with Image.open(p) as f:
            assert list(f.size) == im["size"], p
    return paths


def main(repo: Path, shared: Path) -> None:
    path = repo / "tests" / "golden" / "dinov2_v3_reference.json"
    golden = json.loads(path.read_text())
    committed = json.loads((repo / "tests" / "golden" / "dino_reference.json").read_text())["committed_images"]
    assert golden["dinov2_commit"] == "b8931f7bf91576930313be2c6d6af376033b35f0"
    assert golden["dinov3_commit"] == "6876159a11b4df116f30f667f8c9888617df0751"
    sys.path[:0] = [str(Path.cwd() / "dinov2"), str(Path.cwd() / "dinov3")]  # the official exports
    stored_paths = checked(shared, golden["images"])
    committed_paths = checked(repo / "tests" / "data", committed)
    out, worst = {}, 0.0
    with tempfile.TemporaryDirectory(prefix="dinov2_v3_weights-", dir=Path.cwd()) as tmp:
        torch.hub.set_dir(str(Path(tmp) / "torch_hub"))  # DINOv3 copies its file:// release here: never a stale one
        for key, model in golden["models"].items():
            net, transform = official(key, model, Path(tmp))
            pixels, again = features(net, transform, stored_paths)
            diff = float(np.abs(again - np.array(model["features"])).max())
            worst = max(worst, diff)
            print(f"{key}: the stored features recomputed from the rule, max |diff| {diff:.2g}", file=sys.stderr)
            assert pixels == model["pixels_sha256"], f"{key}: the stored pixels are not reproduced: not writing"
            assert diff <= 1e-5, "the rule does not reproduce the stored golden: not writing"
            pixels, f = features(net, transform, committed_paths)
            out[key] = {"committed_pixels_sha256": pixels, "committed_features": f.astype(float).round(7).tolist()}
    merged = {}
    for k, v in golden.items():
        if k not in ("committed_images", "committed_images_source"):
            merged[k] = v
        if k == "images":
            merged.update(committed_images=committed, committed_images_source=SOURCE.format(diff=worst))
    for key, new in out.items():
        merged["models"][key] = {k: v for k, v in merged["models"][key].items() if k not in new} | new
    before = json.loads(path.read_text())
    for k, v in before.items():  # every existing key unchanged
        if k == "models":
            for key, m in v.items():
                assert all(merged[k][key][x] == m[x] for x in m if not x.startswith("committed_")), key
        elif not k.startswith("committed_"):
            assert merged[k] == v, k
    path.write_text(json.dumps(merged, indent=1) + "\n")
    print(f"wrote {path}: max |diff| of the stored features {worst:.2g}", file=sys.stderr)


if __name__ == "__main__":
    main(Path(sys.argv[1]).resolve(), Path(sys.argv[2]).resolve())
