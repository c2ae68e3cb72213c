"""Same CLIP weights in, same features out as OpenAI's own CLIP code, for every file format.

The reference is OpenAI's model code as published on PyPI (``clip-anytorch``, module ``clip``).
Random ViT-B/32 weights built by that reference are written in each format a user may hold:
OpenAI's TorchScript release archive (``ViT-B-32.pt``), a plain OpenAI state dict, open_clip's
``open_clip_pytorch_model.bin`` / ``.safetensors``, and a Hugging Face hub cache read offline.
Each is loaded through our model resolution and compared with the reference on real JPEGs:
preprocessing tensor, image features, tokens and text features.

Tolerance: min cosine >= 0.999999 and max |diff| <= 1e-4. Building open_clip's plain
``ViT-B-32`` (GELU) for these QuickGELU weights gives cosine ~0.99997 and |diff| ~0.03 on the
same inputs, so the bound separates the right network from the wrong one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import CIFAR_DIR, COCO_DIR, REPO, data_classes
from fiftyone_nola.core import models
from fiftyone_nola.core.errors import ModelNotFoundError

pytestmark = pytest.mark.integration

MIN_COS, MAX_ABS = 0.999999, 1e-4
TEXTS = ["a photo of a cat.", "a blurry photo of an airplane.", "A caption of an image of a truck"]


def _import_reference_clip():
    """OpenAI's ``clip`` package; its init imports ``pkg_resources`` only for ``packaging``."""
    try:
        import pkg_resources  # noqa: F401
    except ImportError:
        import packaging.version

        sys.modules["pkg_resources"] = types.SimpleNamespace(packaging=packaging)
    return pytest.importorskip("clip", reason="clip-anytorch (dev extra) is the reference")


def _images() -> list[Image.Image]:
    """Two 32x32 images of two classes and a full-size photo (cat/0000, airplane/0001 and COCO's
    first on ../shared)."""
    if not (CIFAR_DIR.is_dir() and COCO_DIR.is_dir()):
        pytest.skip(f"real images not found at {CIFAR_DIR} and {COCO_DIR} (set NOLA_SHARED_DATA)")
    a, b = (sorted((CIFAR_DIR / c).glob("*.jpg")) for c in data_classes(["cat", "airplane"]))
    paths = [a[0], b[1], sorted((COCO_DIR / "images").glob("*.jpg"))[0]]
    return [Image.open(p) for p in paths]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Random OpenAI-format ViT-B/32 weights saved in every format, and the reference outputs."""
    clip = _import_reference_clip()
    torch.manual_seed(1234)
    ref = clip.model.CLIP(
        embed_dim=512,
        image_resolution=224,
        vision_layers=12,
        vision_width=768,
        vision_patch_size=32,
        context_length=77,
        vocab_size=49408,
        transformer_width=512,
        transformer_heads=8,
        transformer_layers=12,
    ).eval()
    # OpenAI released fp16 weights and ``clip.load`` rounds to fp16 (``convert_weights``) before
    # casting back on a CPU: weights exact in fp16 make that rounding a no-op, as for real files.
    with torch.no_grad():
        for t in ref.state_dict().values():
            if t.is_floating_point():
                t.copy_(t.half().float())
    root = tmp_path_factory.mktemp("clip-formats")
    sd = {k: v.detach().clone() for k, v in ref.state_dict().items()}
    files = {
        "state_dict": root / "plain" / "ViT-B-32-state.pt",
        "open_clip_bin": root / "oc" / "open_clip_pytorch_model.bin",
        "open_clip_safetensors": root / "oc" / "open_clip_model.safetensors",
        "torchscript": root / "jit" / "ViT-B-32.pt",
    }
    for p in files.values():
        p.parent.mkdir(parents=True, exist_ok=True)
    torch.save(sd, files["state_dict"])
    torch.save(sd, files["open_clip_bin"])
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in sd.items()}, str(files["open_clip_safetensors"]))
    images = _images()
    tokens = clip.tokenize(TEXTS)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer notices about Python control flow
        traced = torch.jit.trace(ref, (torch.zeros(1, 3, 224, 224), tokens[:1]), check_trace=False)
    traced.save(str(files["torchscript"]))
    # The official loader on the official archive is the reference for everything that follows.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        official, preprocess = clip.load(str(files["torchscript"]), device="cpu", jit=False)
    official = official.float().eval()
    x = torch.stack([preprocess(im) for im in images])
    with torch.no_grad():
        out = {"pixels": x, "image": official.encode_image(x), "tokens": tokens, "text": official.encode_text(tokens)}
    return types.SimpleNamespace(files=files, images=images, out=out, root=root)


def _compare(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    return float(F.cosine_similarity(a, b).min()), float((a - b).abs().max())


def _assert_same_network(loaded: models.LoadedModel, reference) -> None:
    ours_x = torch.stack([loaded.transform(im) for im in reference.images])
    assert torch.equal(ours_x, reference.out["pixels"]), "preprocessing differs from OpenAI's"
    tokens = loaded.tokenizer(TEXTS)
    assert torch.equal(tokens, reference.out["tokens"])
    with torch.no_grad():
        img = loaded.encode_image(reference.out["pixels"])
        txt = loaded.model.encode_text(tokens)
    for name, ours, ref in (("image", img, reference.out["image"]), ("text", txt, reference.out["text"])):
        cos, diff = _compare(ours, ref)
        assert cos >= MIN_COS and diff <= MAX_ABS, f"{name} features: min cos {cos:.8f}, max diff {diff:.2e}"


def test_openai_torchscript_archive_matches_official_clip(reference):
    spec = models.ClipSpec("ViT-B-32", str(reference.files["torchscript"]), random_init=False)
    loaded = models.load_clip(spec, cache=False)
    assert loaded.identity["activation"] == "quick_gelu"
    assert loaded.key.endswith("-quickgelu") and loaded.key == models.spec_key(spec)
    _assert_same_network(loaded, reference)


def test_openai_state_dict_under_the_openai_tag_matches(reference, tmp_path, monkeypatch):
    # The documented models-dir layout: clip/<arch>/<tag>.pt; the tag says QuickGELU.
    d = tmp_path / "models" / "clip" / "ViT-B-32"
    d.mkdir(parents=True)
    os.link(reference.files["state_dict"], d / "openai.pt")
    monkeypatch.setenv("NOLA_MODELS_DIR", str(tmp_path / "models"))
    loaded = models.load_clip(models.ClipSpec("ViT-B-32", "openai", random_init=False), cache=False)
    assert loaded.identity["activation"] == "quick_gelu"
    _assert_same_network(loaded, reference)


@pytest.mark.parametrize(
    "fmt,arch,quick_gelu",
    [
        ("open_clip_bin", "ViT-B-32-quickgelu", None),
        ("open_clip_safetensors", "ViT-B-32", True),
        ("state_dict", "ViT-B-32-quickgelu", None),
    ],
)
def test_open_clip_files_by_path_match(reference, fmt, arch, quick_gelu):
    # A plain state dict cannot say which activation it was trained with: the quickgelu
    # architecture name (or quick_gelu=True) says it, as open_clip itself requires.
    spec = models.ClipSpec(arch, str(reference.files[fmt]), random_init=False, quick_gelu=quick_gelu)
    _assert_same_network(models.load_clip(spec, cache=False), reference)


def test_gelu_build_is_detected_as_a_different_network(reference):
    # Guards the tolerance itself: the network the old code built must fail the comparison.
    spec = models.ClipSpec("ViT-B-32", str(reference.files["open_clip_bin"]), random_init=False, quick_gelu=False)
    loaded = models.load_clip(spec, cache=False)
    assert loaded.identity["activation"] == "gelu"
    with torch.no_grad():
        cos, diff = _compare(loaded.encode_image(reference.out["pixels"]), reference.out["image"])
    assert cos < MIN_COS or diff > MAX_ABS


def test_hub_cache_offline_matches(reference, tmp_path):
    """``ClipSpec("ViT-B-32", "openai")`` from a hub cache as huggingface_hub leaves it, offline."""
    import open_clip

    repo_id = open_clip.get_pretrained_cfg("ViT-B-32", "openai")["hf_hub"].strip("/")
    rev = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = tmp_path / "hub" / ("models--" + repo_id.replace("/", "--"))
    snap = repo_dir / "snapshots" / rev
    snap.mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(rev)
    os.link(reference.files["open_clip_safetensors"], snap / "open_clip_model.safetensors")
    np.save(tmp_path / "pixels.npy", reference.out["pixels"].numpy())
    code = (
        "import numpy as np, torch, json, sys\n"
        "from fiftyone_nola.core import models\n"
        "spec = models.ClipSpec('ViT-B-32', 'openai', random_init=False)\n"
        "ok, why = models.weights_available(spec)\n"
        "m = models.load_clip(spec, cache=False)\n"
        "x = torch.from_numpy(np.load(sys.argv[1]))\n"
        "with torch.no_grad(): np.save(sys.argv[2], m.encode_image(x).numpy())\n"
        "print(json.dumps({'available': ok, 'identity': m.identity}))\n"
    )
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf"),
        "HF_HUB_CACHE": str(tmp_path / "hub"),
        "NOLA_MODELS_DIR": str(tmp_path / "empty"),
    }
    env.pop("NOLA_RANDOM_INIT", None)
    res = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "pixels.npy"), str(tmp_path / "f.npy")],
        env=env,
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    info = json.loads(res.stdout.strip().splitlines()[-1])
    assert info["available"] is True
    assert info["identity"]["activation"] == "quick_gelu" and info["identity"]["weights"] == "openai"
    cos, diff = _compare(torch.from_numpy(np.load(tmp_path / "f.npy")), reference.out["image"])
    assert cos >= MIN_COS and diff <= MAX_ABS, (cos, diff)


def test_default_spec_builds_the_quickgelu_network():
    """The default ``ClipSpec()`` (ViT-B-32 + openai) is OpenAI's network, weights or not."""
    from open_clip.transformer import QuickGELU

    loaded = models.load_clip(models.ClipSpec(random_init=True), cache=False)
    acts = {type(m).__name__ for m in loaded.model.modules() if isinstance(m, (QuickGELU, torch.nn.GELU))}
    assert acts == {"QuickGELU"}
    assert loaded.identity["activation"] == "quick_gelu" and "quickgelu" in loaded.key


def test_foreign_file_format_names_the_accepted_ones(tmp_path):
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"not weights")
    with pytest.raises(ModelNotFoundError, match="Accepted: .*safetensors.*TorchScript"):
        models.load_clip(models.ClipSpec("ViT-B-32", str(bad), random_init=False), cache=False)
    junk = tmp_path / "weights.pt"
    junk.write_bytes(b"\x00garbage")
    with pytest.raises(ModelNotFoundError, match="Accepted: "):
        models.load_clip(models.ClipSpec("ViT-B-32", str(junk), random_init=False), cache=False)


def test_weights_of_another_architecture_are_refused_clearly(reference):
    with pytest.raises(ModelNotFoundError, match="does not hold ViT-B-16 CLIP weights"):
        models.load_clip(
            models.ClipSpec("ViT-B-16", str(reference.files["torchscript"]), random_init=False), cache=False
        )


def test_open_clip_warnings_are_not_silenced(monkeypatch):
    """Only known-harmless messages are filtered; anything open_clip warns about reaches the user."""
    import open_clip

    real = open_clip.create_model_and_transforms

    def warn_then_build(*a, **k):
        warnings.warn("something the user must see", UserWarning, stacklevel=2)
        return real(*a, **k)

    monkeypatch.setattr(open_clip, "create_model_and_transforms", warn_then_build)
    with pytest.warns(UserWarning, match="something the user must see"):
        models.load_clip(models.tiny_clip_spec(), cache=False)
    assert not any('simplefilter("ignore")' in p.read_text() for p in Path(models.__file__).parent.glob("*.py"))
