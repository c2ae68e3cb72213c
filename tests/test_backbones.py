"""The backbones a user would choose today, on tiny random models (no images read).

SigLIP 2 (timm ViT tower: no class token, attention pooling; sigmoid scoring; a Hugging Face
sentencepiece tokenizer), PE-Core / EVA-02 (timm Eva tower: class token, RoPE) and DINOv2 / DINOv3:
loading, identity, scoring, tokenizers, prompt tuning through the forward pass, and refusals
before any work. Same-weights comparisons with the reference implementations are in
test_siglip_faithful.py and test_dinov2_faithful.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fiftyone_nola.core import models as M
from fiftyone_nola.core import prompt_tuning as pt
from fiftyone_nola.core import zeroshot as zs
from fiftyone_nola.core.arrays import softmax
from fiftyone_nola.core.errors import InvalidInputError, ModelNotFoundError
from fiftyone_nola.core.models.presets import PRESETS, get_preset

# --------------------------------------------------------------------------- scoring


def _unit_rows(n, d, seed):
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_softmax_scoring_is_bit_identical_to_the_clip_formula():
    emb, W = _unit_rows(50, 16, 0) * 3.0, _unit_rows(7, 16, 1)
    old = softmax(zs.zeroshot_logits(emb, W, 100.0)).astype(np.float32)
    assert np.array_equal(zs.class_probs(emb, W), old)
    assert np.array_equal(zs.class_probs(emb, W, M.Scoring("softmax", 100.0)), old)
    labels, conf, probs = zs.zeroshot_predict(emb, W)
    assert np.array_equal(probs, old) and np.array_equal(labels, old.argmax(1))


def test_sigmoid_scoring_is_normalised_sigmoid_with_the_models_scale_and_bias():
    emb, W = _unit_rows(40, 16, 2), _unit_rows(5, 16, 3)
    s = M.Scoring("sigmoid", 117.0, -12.5)
    p = zs.class_probs(emb, W, s)
    sig = 1.0 / (1.0 + np.exp(-(117.0 * (emb.astype(np.float64) @ W.T.astype(np.float64)) - 12.5)))
    np.testing.assert_allclose(p, sig / sig.sum(1, keepdims=True), rtol=2e-4, atol=1e-6)
    assert np.allclose(p.sum(1), 1.0, atol=1e-5)
    labels, conf, _ = zs.zeroshot_predict(emb, W, scoring=s)
    assert np.array_equal(labels, (emb @ W.T).argmax(1))  # the argmax is SigLIP's own (monotone)
    # far below zero (every sigmoid underflows in fp32) it stays finite: softmax of the logits
    far = M.Scoring("sigmoid", 10.0, -200.0)
    q = zs.class_probs(emb, W, far)
    assert np.all(np.isfinite(q))
    np.testing.assert_allclose(q, softmax(10.0 * (emb @ W.T)), atol=1e-5)


def test_sigmoid_scoring_keeps_missing_rows_missing():
    emb, W = _unit_rows(4, 8, 4), _unit_rows(3, 8, 5)
    emb[1] = np.nan
    labels, conf, probs = zs.zeroshot_predict(emb, W, scoring=M.Scoring("sigmoid", 10.0, -5.0))
    assert labels[1] == -1 and np.isnan(conf[1]) and np.all(np.isfinite(np.delete(probs, 1, 0)))


def test_cdul_scores_use_the_models_scoring():
    from fiftyone_nola.core.cdul import global_scores

    emb, W = _unit_rows(6, 8, 6), _unit_rows(4, 8, 7)
    s = M.Scoring("sigmoid", 20.0, -3.0)
    np.testing.assert_allclose(global_scores(emb, W, scoring=s), zs.class_probs(emb, W, s), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(global_scores(emb, W), zs.class_probs(emb, W), rtol=1e-4, atol=1e-9)


# --------------------------------------------------------------------------- CLIP identity


def test_each_clip_records_its_scoring_and_sigmoid_keys_never_mix(tiny_clip, tiny_siglip_spec):
    sig = M.load_clip(tiny_siglip_spec)
    assert sig.identity["scoring"] == "sigmoid" and sig.key.endswith("-sigmoid")
    assert sig.key == M.spec_key(tiny_siglip_spec)
    # open_clip's initial values (init_logit_scale log(1/0.07), the config's init_logit_bias -10)
    assert M.model_scoring(sig.model) == M.Scoring("sigmoid", pytest.approx(1 / 0.07, rel=1e-5), -10.0)
    # the default (OpenAI-layout) CLIP keeps the key its stores were written under
    assert tiny_clip.identity["scoring"] == "softmax" and tiny_clip.key == "clip-nola-tiny-clip-random-init-seed0"
    assert M.clip_scoring(M.tiny_clip_spec()) == M.Scoring("softmax", 100.0)


def test_architectures_get_their_own_tag_and_preprocessing():
    # 'openai' (the default) on an architecture without it means the architecture's own tag
    assert M.pretrained_tag(M.ClipSpec("PE-Core-B-16")) == "meta"
    assert M.pretrained_tag(M.ClipSpec("ViT-B-16-SigLIP2")) == "webli"
    assert M.pretrained_tag(M.ClipSpec("ViT-B-32")) == "openai"
    assert M.spec_key(M.ClipSpec("PE-Core-B-16", random_init=True)) == "clip-PE-Core-B-16-random-init-seed0"
    from fiftyone_nola.core.models.clip import _preprocess_overrides, clip_source

    spec = M.ClipSpec("ViT-B-16-SigLIP2", random_init=True)
    over = _preprocess_overrides(spec, clip_source(spec))
    assert over == {
        "image_mean": (0.5, 0.5, 0.5),
        "image_std": (0.5, 0.5, 0.5),
        "image_interpolation": "bicubic",
        "image_resize_mode": "squash",
    }


def test_timm_towers_load_with_their_width(tiny_siglip_spec, tiny_pe_spec):
    for spec in (tiny_siglip_spec, tiny_pe_spec):
        m = M.load_clip(spec)
        with torch.no_grad():
            f = m.encode_image(torch.zeros(2, 3, m.image_size, m.image_size))
        assert m.embed_dim == 32 == f.shape[1]


# --------------------------------------------------------------------------- tokenizers


def test_huggingface_tokenizer_from_the_models_dir(tiny_siglip_spec):
    """The SigLIP 2 path: a sentencepiece (Gemma-style) tokenizer from <models_dir>/clip/<arch>/tokenizer."""
    assert M.hf_tokenizer_name(tiny_siglip_spec.arch) == "fiftyone-nola/tiny-sentencepiece"
    assert M.tokenizer_available(tiny_siglip_spec) == (True, "")
    clip = M.load_clip(tiny_siglip_spec)
    tokens = clip.tokenizer(["a photo of a cat.", "a ship at sea"])
    assert tokens.shape == (2, 16) and tokens.dtype == torch.long
    assert 0 < int(tokens.max()) < 120 and int(tokens[0, -1]) == 0  # right-padded to the context length
    emb = zs.encode_texts(clip, ["a photo of a cat.", "a ship at sea", "a photo of a cat."])
    assert emb.shape == (3, 32) and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(emb[0], emb[2], atol=1e-6)


def test_missing_huggingface_tokenizer_says_where_to_put_it(tiny_siglip_spec, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))
    spec = M.ClipSpec(tiny_siglip_spec.arch, None, random_init=True, models_dir=str(tmp_path))
    ok, why = M.tokenizer_available(spec)
    assert not ok
    assert str(M.tokenizer_dir(spec)) in why and "fiftyone-nola/tiny-sentencepiece" in why and "tokenizer.json" in why
    # the same words if it were used anyway (not before any work: validation stops it first)
    with pytest.raises(ModelNotFoundError, match="tokenizer"):
        M.load_clip(spec, cache=False).tokenizer(["a cat"])
    # open_clip's own BPE (OpenAI CLIP, PE-Core, EVA-02) needs nothing
    assert M.tokenizer_available(M.ClipSpec("PE-Core-B-16", random_init=True)) == (True, "")
    assert M.hf_tokenizer_name("EVA02-B-16") is None
    # the offline facts of open_clip 3.3: SigLIP 2 (Gemma) and MetaCLIP 2 (XLM-V) tokenize on the hub
    assert M.hf_tokenizer_name("ViT-B-16-SigLIP2") == "timm/ViT-B-16-SigLIP2"
    assert M.hf_tokenizer_name("ViT-H-14-worldwide") == "facebook/xlm-v-base"
    ok, why = M.tokenizer_available(M.ClipSpec("ViT-H-14-worldwide", random_init=True, models_dir=str(tmp_path)))
    assert not ok and "facebook/xlm-v-base" in why


def test_validation_reports_the_missing_tokenizer_before_any_work(tiny_siglip_spec, tmp_path, monkeypatch):
    from fiftyone_nola.stages.validation.checks import check_clip

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = M.ClipSpec(tiny_siglip_spec.arch, None, random_init=True, models_dir=str(tmp_path))
    problems = check_clip(spec)
    assert len(problems) == 1 and problems[0].error and str(M.tokenizer_dir(spec)) in problems[0].message
    assert check_clip(spec, text=False) == []  # embedding images needs no tokenizer
    assert check_clip(tiny_siglip_spec) == []


# --------------------------------------------------------------------------- prompt tuning


def _lift_layer_scale(visual: nn.Module) -> None:
    """Random init leaves Eva's layer scale at 1e-5 (blocks ~ identity): make the blocks count."""
    with torch.no_grad():
        for n, p in visual.named_parameters():
            if n.endswith(("gamma_1", "gamma_2")):
                p.fill_(0.5)


@pytest.fixture(params=["open_clip_vit", "siglip2_timm_vit", "pe_core_timm_eva"])
def tower(request, tiny_clip, tiny_siglip_spec, tiny_pe_spec):
    clip = {
        "open_clip_vit": lambda: tiny_clip,
        "siglip2_timm_vit": lambda: M.load_clip(tiny_siglip_spec),
        "pe_core_timm_eva": lambda: M.load_clip(tiny_pe_spec),
    }[request.param]()
    import copy

    visual = copy.deepcopy(clip.model.visual).eval()
    _lift_layer_scale(visual)
    kind = {"open_clip_vit": "open_clip", "siglip2_timm_vit": "timm_vit", "pe_core_timm_eva": "timm_eva"}
    return visual, clip.image_size, kind[request.param]


def test_prompted_tower_is_the_towers_own_forward_without_prompts(tower):
    visual, size, kind = tower
    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(0))
    pv0 = pt.PromptedVisual(visual, n_prompts=0)
    assert pv0.kind == kind
    with torch.no_grad():
        assert torch.equal(pv0(x), visual(x))  # its head, its normalisation, its pooling


def test_prompts_change_the_pooled_output_and_only_trainables_move(tower):
    visual, size, kind = tower
    x = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(1))
    W = np.random.default_rng(0).standard_normal((3, 32)).astype(np.float32)
    model = pt.PromptedClassifier(visual, W, n_prompts=4, seed=0)
    with torch.no_grad():
        base = visual(x)
        prompted = model.features(x)
    assert prompted.shape == base.shape
    assert (prompted - base).abs().max() > 1e-4 * base.abs().max()
    trainable = set(model.trainable_names)
    assert "visual.prompts" in trainable and "head.weight" in trainable
    assert any(".norm" in n or "ln_" in n for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = pt.make_optimizer(model, pt.TuneConfig(lr=1e-2))
    model.train()
    loss = nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 2, 0]))
    loss.backward()
    opt.step()
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert "visual.prompts" in moved and "head.weight" in moved
    assert moved <= trainable, sorted(moved - trainable)[:5]
    frozen = [n for n, p in model.named_parameters() if n not in trainable]
    assert frozen and all(not dict(model.named_parameters())[n].requires_grad for n in frozen)


def test_eva_rope_gives_prompts_no_rotary_position(tiny_pe_spec):
    """Without counting the prompts as prefix, the rotary table would not fit the sequence."""
    import copy

    visual = copy.deepcopy(M.load_clip(tiny_pe_spec).model.visual).eval()
    pv = pt.PromptedVisual(visual, n_prompts=3)
    attn = [m for m in visual.trunk.blocks.modules() if isinstance(getattr(m, "num_prefix_tokens", None), int)]
    assert attn and all(m.num_prefix_tokens == 1 for m in attn)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        pv(x)
    assert all(m.num_prefix_tokens == 1 for m in attn)  # restored after the forward
    from fiftyone_nola.core.prompt_tuning import model as ptm

    with pytest.raises(RuntimeError), torch.no_grad(), ptm._prompts_as_prefix(visual.trunk, 0):
        t = visual.trunk
        h, rope = t._pos_embed(t.patch_embed(x))
        h = pv._insert(t.norm_pre(h))
        t.blocks[0](h, rope=rope)


def test_towers_without_a_token_sequence_are_refused():
    import open_clip

    rn = open_clip.create_model("RN50", pretrained=None).visual
    with pytest.raises(InvalidInputError, match="ViT vision tower"):
        pt.PromptedVisual(rn, n_prompts=4)
    for arch in ("RN50", "convnext_base", "MobileCLIP-S1"):
        ok, why = M.prompt_support(arch)
        assert not ok and arch in why
    for arch in ("ViT-B-32", "ViT-B-16-SigLIP2", "ViT-SO400M-14-SigLIP2", "PE-Core-B-16", "EVA02-B-16"):
        assert M.prompt_support(arch) == (True, ""), arch
    assert M.prompt_support("ViT-H-14-worldwide") == (True, "")  # MetaCLIP 2: open_clip's own ViT


def test_prompt_tuning_is_refused_at_validation_before_any_stage(tmp_path):
    """auto_label on a ResNet CLIP stops in the validation pass: no dataset is created from --images."""
    import fiftyone as fo
    from PIL import Image

    from conftest import tiny_pipeline_config
    from fiftyone_nola.stages.validation import Target, check_auto_label

    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i in range(3):
        Image.new("RGB", (16, 16), (i * 60, 10, 10)).save(imgs / f"{i}.jpg")
    target = Target(images_dir=str(imgs), dataset_name="nola-backbones-refused")
    resnet = M.ClipSpec("RN50", random_init=True)
    report = check_auto_label(target, ["a", "b"], tiny_pipeline_config(descriptions_file=None, clip=resnet))
    assert not report.ok
    assert any("ResNet" in p.message and p.input == "clip_arch" for p in report.errors), report.errors
    assert not fo.dataset_exists("nola-backbones-refused")
    cfg = tiny_pipeline_config(descriptions_file=None, clip=resnet, skip_tuning=True)
    assert not any("ResNet" in p.message for p in check_auto_label(target, ["a", "b"], cfg).errors)


def test_weak_view_follows_the_towers_resize(tiny_siglip_spec):
    from PIL import Image

    m = pt.PromptedClassifier(M.load_clip(tiny_siglip_spec).model.visual, np.eye(3, 32, dtype=np.float32))
    assert (m.resize_mode, m.interpolation) == ("shortest", "bicubic")  # no tag: open_clip's default
    squash = pt.weak_transform(32, (0.5,) * 3, (0.5,) * 3, "squash", "bicubic")
    crop = pt.weak_transform(32, (0.5,) * 3, (0.5,) * 3)
    img = Image.new("RGB", (64, 32), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 16, 32))  # a blue strip the centre crop cuts off
    assert squash(img)[2].max() > 0.9 and crop(img)[2].max() < -0.9


# --------------------------------------------------------------------------- DINOv2 / DINOv3


@pytest.mark.parametrize(
    "name,generation,size",
    [(M.TINY_DINO_NAME, "dino", 32), (M.TINY_DINOV2_NAME, "dinov2", 28), (M.TINY_DINOV3_NAME, "dinov3", 32)],
)
def test_dino_generations_get_their_preprocessing(name, generation, size):
    spec = M.DinoSpec(name=name, random_init=True)
    assert M.dino_generation(name) == generation
    assert spec.preprocess == ("nola" if generation == "dino" else "official")
    loaded = M.load_dino(spec, cache=False)
    assert loaded.image_size == size and loaded.identity["preprocess"] == spec.preprocess
    from PIL import Image

    x = loaded.transform(Image.new("RGB", (50, 40), (10, 200, 30)))
    assert tuple(x.shape) == (3, size, size)
    with torch.no_grad():
        assert loaded.encode_image(x[None]).shape == (1, 48)


def test_default_dino_spec_is_unchanged():
    """Run records hold DinoSpec's repr: the default must read as it always did (preprocess='nola')."""
    assert "preprocess='nola'" in repr(M.DinoSpec())
    assert M.DinoSpec(name="vit_small_patch14_dinov2.lvd142m").preprocess == "official"
    assert M.DinoSpec(name="vit_base_patch16_dinov3.lvd1689m", preprocess="nola").preprocess == "nola"


def test_dinov3_file_with_attention_biases_needs_the_qkvb_model(tmp_path):
    from fiftyone_nola.core.models.dino_weights import load_dino_weights

    sd = {"storage_tokens": torch.zeros(1, 4, 48), "blocks.0.attn.qkv.bias": torch.ones(144)}
    model = M.load_dino(M.DinoSpec(name=M.TINY_DINOV3_NAME, random_init=True), cache=False).model
    path = tmp_path / "dinov3.pth"
    torch.save(sd, path)
    with pytest.raises(ModelNotFoundError, match="_qkvb"):
        load_dino_weights(model, path, "vit_small_patch16_dinov3.lvd1689m")


# --------------------------------------------------------------------------- presets


def test_presets_name_buildable_models():
    import open_clip
    import timm

    assert {"paper", "fast-cpu", "best"} <= set(PRESETS)
    for p in PRESETS.values():
        assert p.clip_arch in open_clip.list_models() and p.clip_pretrained in open_clip.list_pretrained_tags_by_model(
            p.clip_arch
        )
        assert timm.is_model(p.dino) and p.dino in timm.list_pretrained(p.dino)
        assert M.prompt_support(p.clip_arch) == (True, "")
        assert 85 < p.zeroshot_cifar10 < 100 and p.zeroshot_source
    paper = get_preset("paper")
    assert paper.clip_spec() == M.ClipSpec() and paper.dino_spec().preprocess == "nola"
    assert get_preset("fast-cpu").dino_spec().preprocess == "official"
    with pytest.raises(InvalidInputError, match="paper"):
        get_preset("fastest")


def test_cli_preset_fills_only_what_is_not_named():
    from fiftyone_nola import cli
    from fiftyone_nola.cli_args import build_parser

    def specs(*argv):
        return cli._specs(build_parser().parse_args(["auto-label", "--images", "x", "--classes", "a,b", *argv]))

    clip, dino = specs("--preset", "fast-cpu", "--random-init")
    assert (clip.arch, clip.pretrained, dino.name) == ("ViT-B-32-256", "datacomp_s34b_b86k", PRESETS["fast-cpu"].dino)
    assert clip.random_init and dino.random_init and dino.preprocess == "official"
    clip, dino = specs("--preset", "best", "--clip-arch", "PE-Core-B-16", "--dino", "vit_small_patch14_dinov2.lvd142m")
    assert (clip.arch, clip.pretrained, dino.name) == ("PE-Core-B-16", "openai", "vit_small_patch14_dinov2.lvd142m")
    assert M.pretrained_tag(clip) == "meta"
    clip, dino = specs("--preset", "best")
    assert (clip.arch, dino.name) == ("ViT-SO400M-14-SigLIP2", "vit_large_patch16_dinov3.lvd1689m")


# --------------------------------------------------------------------------- CPU engine


@pytest.mark.slow
def test_the_cpu_engine_converts_the_new_towers(tiny_siglip_spec, tiny_pe_spec):
    """OpenVINO converts the timm towers (SigLIP 2 ViT, PE-Core Eva with RoPE), DINOv2 / DINOv3 and
    a prompted SigLIP 2 classifier, with the same outputs (engines.py falls back with one warning
    where it cannot; here none is needed)."""
    import warnings

    pytest.importorskip("openvino")
    from fiftyone_nola.core import engines
    from fiftyone_nola.core.embed import engine_module

    choice = engines.resolve("openvino", "fp32", "cpu")
    siglip = M.load_clip(tiny_siglip_spec)
    tuned = pt.PromptedClassifier(siglip.model.visual, np.eye(3, 32, dtype=np.float32), n_prompts=4).eval()
    cases = [
        (engine_module(siglip), siglip.identity, 32, siglip.encode_image),
        (engine_module(pe := M.load_clip(tiny_pe_spec)), pe.identity, 32, pe.encode_image),
        (tuned, {"family": "nola-tuned", "key": "tuned-test-siglip"}, 32, tuned),
    ]
    for name in (M.TINY_DINOV2_NAME, M.TINY_DINOV3_NAME):
        d = M.load_dino(M.DinoSpec(name=name, random_init=True))
        cases.append((engine_module(d), d.identity, d.image_size, d.encode_image))
    for module, identity, size, ref in cases:
        with warnings.catch_warnings():
            warnings.simplefilter("error", engines.EngineFallbackWarning)
            runner, _ = engines.load_engine_model(module, identity, (3, size, size), choice)
        x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            want = (ref or module)(x)
        np.testing.assert_allclose(np.asarray(runner(x)), want.numpy(), atol=1e-4, rtol=1e-3)
