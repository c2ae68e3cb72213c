import pytest
import torch

from fiftyone_nola.core import models
from fiftyone_nola.core.errors import ModelNotFoundError


def test_tiny_models_embed(tiny_clip, tiny_dino):
    x = torch.randn(3, 3, tiny_clip.image_size, tiny_clip.image_size)
    assert tiny_clip.encode_image(x).shape == (3, tiny_clip.embed_dim)
    y = torch.randn(3, 3, tiny_dino.image_size, tiny_dino.image_size)
    assert tiny_dino.encode_image(y).shape == (3, tiny_dino.embed_dim)
    assert tiny_dino.image_size == 32  # the tiny ViT's own input size, not timm's 224 default


def test_random_init_is_deterministic_across_loads():
    a = models.load_clip(models.tiny_clip_spec(), cache=False)
    b = models.load_clip(models.tiny_clip_spec(), cache=False)
    assert a is not b
    for pa, pb in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(pa, pb)
    assert a.key == b.key == models.spec_key(models.tiny_clip_spec())


def test_spec_key_matches_loaded_key(tiny_dino):
    assert models.spec_key(models.tiny_dino_spec()) == tiny_dino.key
    assert "random-init" in tiny_dino.key


def test_missing_checkpoint_file_is_clear(tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        models.load_clip(models.ClipSpec(arch="ViT-B-32", pretrained=str(missing), random_init=False))
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        models.load_dino(models.DinoSpec(checkpoint=str(missing), random_init=False))


def test_unknown_architecture_is_clear():
    with pytest.raises(ModelNotFoundError, match="Unknown CLIP architecture"):
        models.load_clip(models.ClipSpec(arch="ViT-Nope", random_init=True))
    with pytest.raises(ModelNotFoundError, match="Unknown timm model"):
        models.load_dino(models.DinoSpec(name="not_a_model", random_init=True))


def test_local_clip_checkpoint_from_models_dir(tmp_path, monkeypatch, tiny_clip):
    # An offline user drops weights into the documented layout: they are found and identified.
    d = tmp_path / "models" / "clip" / models.TINY_CLIP_ARCH
    d.mkdir(parents=True)
    sd = {k: v + 1.0 if v.is_floating_point() else v for k, v in tiny_clip.model.state_dict().items()}
    torch.save(sd, d / "mytag.pt")
    monkeypatch.setenv("NOLA_MODELS_DIR", str(tmp_path / "models"))
    spec = models.ClipSpec(arch=models.TINY_CLIP_ARCH, pretrained="mytag", random_init=False)
    loaded = models.load_clip(spec)
    assert loaded.identity["random_init"] is False
    assert "file-" in loaded.key and loaded.key == models.spec_key(spec)
    w = dict(loaded.model.named_parameters())["visual.conv1.weight"]
    w0 = dict(tiny_clip.model.named_parameters())["visual.conv1.weight"]
    assert torch.allclose(w, w0 + 1.0)


def test_local_dino_checkpoint(tmp_path, tiny_dino):
    import timm

    base = timm.create_model("vit_tiny_patch16_224", num_classes=0)
    ck = tmp_path / "dino.pth"
    torch.save(base.state_dict(), ck)
    spec = models.DinoSpec(name="vit_tiny_patch16_224", checkpoint=str(ck), random_init=False)
    loaded = models.load_dino(spec)
    assert not loaded.identity["random_init"]
    for (k, a), (_, b) in zip(loaded.model.state_dict().items(), base.state_dict().items()):
        assert torch.equal(a, b), k


def test_offline_weights_report_where_to_put_them(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("NOLA_MODELS_DIR", str(tmp_path))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    ok, why = models.weights_available(models.ClipSpec(random_init=False))
    assert not ok and str(tmp_path / "clip" / "ViT-B-32" / "openai.pt") in why
    ok, why = models.weights_available(models.DinoSpec(name="vit_base_patch16_224.dino", random_init=False))
    assert not ok and "vit_base_patch16_224.dino.safetensors" in why
    assert models.weights_available(models.ClipSpec(random_init=True)) == (True, "")


def test_env_random_init(monkeypatch):
    monkeypatch.setenv("NOLA_RANDOM_INIT", "1")
    assert models.ClipSpec().random_init and models.DinoSpec().random_init
    monkeypatch.setenv("NOLA_RANDOM_INIT", "0")
    assert not models.ClipSpec().random_init


def test_auto_dino_fits_the_hardware():
    from fiftyone_nola.core.device import hardware_profile

    auto = models.concrete_dino(models.DinoSpec(random_init=True))
    assert auto.name == hardware_profile().dino_model
    assert models.spec_key(models.DinoSpec(random_init=True)) == models.spec_key(auto)
    explicit = models.DinoSpec(name="vit_base_patch16_224.dino", random_init=True)
    assert models.concrete_dino(explicit) is explicit


def test_models_are_loaded_once_per_process():
    models.clear_model_cache()
    a = models.load_clip(models.tiny_clip_spec())
    assert models.load_clip(models.tiny_clip_spec()) is a
    d = models.load_dino(models.tiny_dino_spec())
    assert models.load_dino(models.tiny_dino_spec()) is d and models.load_clip(models.tiny_clip_spec()) is a
    models.clear_model_cache()
    assert models.load_clip(models.tiny_clip_spec()) is not a
