"""DINOv2 and DINOv3 as their official code runs them: same weights in -> same CLS features out.

``tests/golden/dinov2_v3_reference.json`` was written by ``tests/golden/make_dinov2_v3_reference.py``
(its docstring has the exact commands) from unmodified exports of github.com/facebookresearch/dinov2
@ b8931f7bf915 and github.com/facebookresearch/dinov3 @ 6876159a11b4, run outside this repository:
each hub builder (``dinov2_vits14``, ``dinov2_vits14_reg``, ``dinov2_vitb14_reg``, ``dinov3_vits16``,
``dinov3_vitb16``) filled with deterministic random weights (the rule in the JSON, regenerated
here), saved as its official release file and loaded back the way the hub loader does, on four
real images of ``../shared/data`` (the DINO v1 golden's ``images``) through each release's
``make_classification_eval_transform()`` (resize 256, crop 224). ``tests/golden/make_dinov2_v3_committed.py``
(same exports, rule, transforms and forward; it first reproduced those stored features, max abs diff
3.4e-6, pixels identical) added the features and pixel hashes of four committed images of tests/data
(``committed_images``: the DINO v1 golden's, tiny10/astronaut/0000, tiny10/cat/0003,
photos/images/cameraman and coffee): the tests use the committed set, and ``../shared``'s as well
when it is here (``golden_sets`` in conftest), so a lone clone runs them too.

Here the same weights are written in each format a user has (the official release file, found
by name in the models dir or torch.hub's cache, with the architecture read from the file; timm's
``model.safetensors``; a Hugging Face hub cache read offline) and loaded through
``models.load_dino`` with its default preprocessing (``official``): pixels must be bit-identical
and features within min cosine >= 0.999999, max abs diff <= 1e-4. DINOv2 runs at 224 with the
position table the official model interpolates (bicubic, scale (16 + 0.1) / 37, no antialias;
registers: to 16x16 with antialias); timm's own resample (always antialiased) is detected as a
different network by the same bound.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import (
    assert_reference_features,
    dino_features_from_offline_hub_cache,
    golden_features,
    golden_image_paths,
    golden_per_image,
    golden_rgb_images,
)
from fiftyone_nola.core import models as M

GOLDEN = json.loads((Path(__file__).parent / "golden" / "dinov2_v3_reference.json").read_text())
MODELS = GOLDEN["models"]
TOKENS = ("cls_token", "pos_embed", "register_tokens", "storage_tokens", "mask_token")


def make_weights(model: dict, generation: str) -> dict:
    """The golden weights in the official layout, regenerated from the rule stored in the JSON."""
    rng = np.random.default_rng(model["seed"])
    out = {}
    for key, shape in model["keys"]:
        z = rng.standard_normal(shape)
        if key.endswith(".periods"):
            out[key] = torch.tensor(model["buffers"][key], dtype=torch.float32)
            continue
        if key.endswith(".bias_mask"):
            m = torch.ones(shape)
            m[shape[0] // 3 : 2 * shape[0] // 3] = 0
            out[key] = m
            continue
        if key in TOKENS:
            a = 0.5 * z
        elif key.endswith(".gamma"):
            a = 0.5 + 0.1 * z
        elif generation == "dinov3" and key.endswith("attn.qkv.bias"):
            a = 0.0 * z
        elif len(shape) == 1 and "norm" in key.rsplit(".", 2)[-2] and key.endswith(".weight"):
            a = 1.0 + 0.1 * z
        elif len(shape) == 1:
            a = 0.02 * z
        else:
            a = z / math.sqrt(math.prod(shape[1:]))
        out[key] = torch.from_numpy(np.asarray(a, dtype=np.float32))
    return out


def assert_official(loaded, images, model: dict) -> None:
    x = torch.stack([loaded.transform(im) for im in images])
    pixels = [hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest() for t in x]
    assert pixels == golden_per_image(GOLDEN, model, "pixels_sha256"), "preprocessing differs from the eval transform"
    with torch.no_grad():
        f = loaded.encode_image(x).numpy()
    assert_reference_features(f, golden_features(GOLDEN, model))


def _generation(key: str) -> str:
    return "dinov3" if key.startswith("dinov3") else "dinov2"


@pytest.fixture(scope="module")
def images():
    return golden_rgb_images(GOLDEN)


def release_file(key: str, folder: Path) -> Path:
    m = MODELS[key]
    path = folder / m["release_file"]
    torch.save(make_weights(m, _generation(key)), path)
    return path


def test_golden_provenance():
    assert GOLDEN["dinov2_commit"] == "b8931f7bf91576930313be2c6d6af376033b35f0"
    assert GOLDEN["dinov3_commit"] == "6876159a11b4df116f30f667f8c9888617df0751"
    for m in MODELS.values():
        assert M.DINO_RELEASE_FILES[m["timm_name"]] == m["release_file"]


# --------------------------------------------------------------------------- official release files


@pytest.mark.integration
@pytest.mark.parametrize("key", ["dinov2_vits14", "dinov2_vits14_reg", "dinov3_vits16"])
def test_official_release_file_by_path(key, images, tmp_path):
    """checkpoint=<the release .pth>: the architecture (and so the preprocessing) is read from it."""
    spec = M.DinoSpec(checkpoint=str(release_file(key, tmp_path)), random_init=False)
    concrete = M.concrete_dino(spec)
    assert concrete.name == MODELS[key]["timm_name"] and concrete.preprocess == "official"
    loaded = M.load_dino(spec, cache=False)
    assert loaded.identity["weights"].startswith("file-") and loaded.image_size == 224
    assert_official(loaded, images, MODELS[key])


@pytest.mark.integration
def test_release_file_by_name_in_the_models_dir_and_torch_hub_cache(images, models_dir, tmp_path, monkeypatch):
    key = "dinov2_vits14"
    name = MODELS[key]["timm_name"]
    release_file(key, models_dir / "dino")
    spec = M.DinoSpec(name=name, random_init=False)
    assert M.weights_available(spec) == (True, "")
    assert_official(M.load_dino(spec, cache=False), images, MODELS[key])
    # where torch.hub.load('facebookresearch/dinov2', ...) leaves it
    (models_dir / "dino" / MODELS[key]["release_file"]).unlink()
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    hub = Path(torch.hub.get_dir()) / "checkpoints"
    hub.mkdir(parents=True)
    release_file(key, hub)
    assert M.weights_available(spec) == (True, "")
    assert_official(M.load_dino(spec, cache=False), images, MODELS[key])


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("key", ["dinov2_vitb14_reg", "dinov3_vitb16"])
def test_official_vit_base_release_files(key, images, tmp_path):
    """The issue's base models: vit_base_patch14_reg4_dinov2 and vit_base_patch16_dinov3."""
    loaded = M.load_dino(M.DinoSpec(checkpoint=str(release_file(key, tmp_path)), random_init=False), cache=False)
    assert loaded.identity["name"] == MODELS[key]["timm_name"] and loaded.embed_dim == 768
    assert_official(loaded, images, MODELS[key])


# --------------------------------------------------------------------------- timm's files and hub cache


def timm_state_dict(key: str, tmp_path: Path) -> dict:
    """What timm's own files of the model hold: the release converted by timm, at timm's native size."""
    import timm

    from fiftyone_nola.core.models.dino_weights import load_dino_weights

    name = MODELS[key]["timm_name"]
    m = timm.create_model(name, pretrained=False, num_classes=0)
    load_dino_weights(m, release_file(key, tmp_path), name)
    return {k: v.contiguous() for k, v in m.state_dict().items()}


@pytest.mark.integration
@pytest.mark.parametrize("key", ["dinov2_vits14_reg", "dinov3_vits16"])
def test_timm_safetensors_in_the_models_dir(key, images, models_dir, tmp_path):
    from safetensors.torch import save_file

    name = MODELS[key]["timm_name"]
    folder = models_dir / "dino" / name
    folder.mkdir()
    save_file(timm_state_dict(key, tmp_path), str(folder / "model.safetensors"))
    loaded = M.load_dino(M.DinoSpec(name=name, random_init=False), cache=False)
    assert loaded.identity["weights"].startswith("file-")
    assert_official(loaded, images, MODELS[key])


@pytest.mark.integration
def test_huggingface_hub_cache_offline(images, tmp_path):
    """timm's hub repo (timm/vit_small_patch14_dinov2.lvd142m) as huggingface_hub caches it, offline."""
    key = "dinov2_vits14"
    paths = golden_image_paths(GOLDEN)
    out = dino_features_from_offline_hub_cache(
        tmp_path, MODELS[key]["timm_name"], timm_state_dict(key, tmp_path), paths
    )
    assert out["ok"] == [True, ""] and out["weights"] == "hub"
    assert_reference_features(out["features"], golden_features(GOLDEN, MODELS[key]))


# --------------------------------------------------------------------------- the bound separates


@pytest.mark.integration
def test_timms_own_position_resample_is_a_different_network(images, tmp_path):
    """timm's set_input_size (antialiased bicubic) instead of the official interpolation fails."""
    from timm.layers import resample_abs_pos_embed

    key = "dinov2_vits14"
    loaded = M.load_dino(M.DinoSpec(checkpoint=str(release_file(key, tmp_path)), random_init=False), cache=False)
    native = make_weights(MODELS[key], "dinov2")["pos_embed"]  # 1 + 37x37 positions, as released
    with torch.no_grad():
        loaded.model.pos_embed.copy_(resample_abs_pos_embed(native, new_size=(16, 16), num_prefix_tokens=1))
    x = torch.stack([loaded.transform(im) for im in images])
    with torch.no_grad():
        f = loaded.encode_image(x).numpy()
    ref = golden_features(GOLDEN, MODELS[key])
    cos = (f * ref).sum(1) / np.linalg.norm(f, axis=1) / np.linalg.norm(ref, axis=1)
    assert cos.min() < 0.999999 or np.abs(f - ref).max() > 1e-4
