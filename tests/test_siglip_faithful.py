"""SigLIP 2 through our loader (open_clip + timm) = Hugging Face transformers' SigLIP 2, same weights.

The reference is ``transformers.Siglip2Model`` (the implementation Google's SigLIP 2 checkpoints
are published for on the Hugging Face hub). Random weights of our model (open_clip's
``ViT-B-16-SigLIP2`` architecture; in CI a tiny one of the same layout, ``nola-tiny-siglip2``) are
converted to Siglip2Model's layout, key by key (below); both run on the same pixels and the same
token ids (the Gemma tokenizer is not available offline: text towers are compared on ids). Image
and text features must agree to min cosine >= 0.99999, and so must the sigmoid logits
(``logit_scale.exp() * cos + logit_bias``) and our normalised sigmoid scores.

timm builds SigLIP's vision MLPs with exact GELU; SigLIP was trained with the tanh approximation
(big_vision's ``nn.gelu``), which transformers uses: our loader switches the vision tower to it.
The exact-GELU tower is 4e-4 off on the real-size model, beyond ``MAX_ABS`` (checked below).

Siglip2Model is the NaFlex variant: it takes flattened 16x16 patches and resizes its position
table to each image's patch grid; with the table stored at the grid used (14x14 at 224 px) that
resize is the identity, which the test relies on and checks (the fixed-resolution model).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fiftyone_nola.core import models as M
from fiftyone_nola.core import zeroshot as zs

MIN_COS, MAX_ABS = 0.99999, 1e-4

pytest.importorskip("transformers")


def _split_qkv(w: torch.Tensor, prefix: str, kind: str) -> dict:
    q, k, v = w.chunk(3, dim=0)
    return {f"{prefix}.q_proj.{kind}": q, f"{prefix}.k_proj.{kind}": k, f"{prefix}.v_proj.{kind}": v}


def convert(model) -> dict:
    """Our open_clip SigLIP 2 state dict in ``transformers.Siglip2Model``'s layout."""
    sd = {k: v.detach().float() for k, v in model.state_dict().items()}
    out = {"logit_scale": sd["logit_scale"].reshape(1), "logit_bias": sd["logit_bias"].reshape(1)}
    hv, ht = "vision_model", "text_model"
    w = sd["visual.trunk.patch_embed.proj.weight"]
    # HF patches are flattened as (row, column, channel) within the patch
    out[f"{hv}.embeddings.patch_embedding.weight"] = w.permute(0, 2, 3, 1).reshape(w.shape[0], -1)
    out[f"{hv}.embeddings.patch_embedding.bias"] = sd["visual.trunk.patch_embed.proj.bias"]
    out[f"{hv}.embeddings.position_embedding.weight"] = sd["visual.trunk.pos_embed"][0]
    n_vis = 1 + max(int(k.split(".")[3]) for k in sd if k.startswith("visual.trunk.blocks."))
    for i in range(n_vis):
        a, b = f"visual.trunk.blocks.{i}", f"{hv}.encoder.layers.{i}"
        for kind in ("weight", "bias"):
            out[f"{b}.layer_norm1.{kind}"] = sd[f"{a}.norm1.{kind}"]
            out[f"{b}.layer_norm2.{kind}"] = sd[f"{a}.norm2.{kind}"]
            out.update(_split_qkv(sd[f"{a}.attn.qkv.{kind}"], f"{b}.self_attn", kind))
            out[f"{b}.self_attn.out_proj.{kind}"] = sd[f"{a}.attn.proj.{kind}"]
            out[f"{b}.mlp.fc1.{kind}"] = sd[f"{a}.mlp.fc1.{kind}"]
            out[f"{b}.mlp.fc2.{kind}"] = sd[f"{a}.mlp.fc2.{kind}"]
    p, h = "visual.trunk.attn_pool", f"{hv}.head"
    out[f"{h}.probe"] = sd[f"{p}.latent"]
    for kind in ("weight", "bias"):
        out[f"{hv}.post_layernorm.{kind}"] = sd[f"visual.trunk.norm.{kind}"]
        out[f"{h}.attention.in_proj_{kind}"] = torch.cat([sd[f"{p}.q.{kind}"], sd[f"{p}.kv.{kind}"]])
        out[f"{h}.attention.out_proj.{kind}"] = sd[f"{p}.proj.{kind}"]
        out[f"{h}.layernorm.{kind}"] = sd[f"{p}.norm.{kind}"]
        out[f"{h}.mlp.fc1.{kind}"] = sd[f"{p}.mlp.fc1.{kind}"]
        out[f"{h}.mlp.fc2.{kind}"] = sd[f"{p}.mlp.fc2.{kind}"]
    out[f"{ht}.embeddings.token_embedding.weight"] = sd["text.token_embedding.weight"]
    out[f"{ht}.embeddings.position_embedding.weight"] = sd["text.positional_embedding"]
    n_txt = 1 + max(int(k.split(".")[3]) for k in sd if k.startswith("text.transformer.resblocks."))
    for i in range(n_txt):
        a, b = f"text.transformer.resblocks.{i}", f"{ht}.encoder.layers.{i}"
        out.update(_split_qkv(sd[f"{a}.attn.in_proj_weight"], f"{b}.self_attn", "weight"))
        out.update(_split_qkv(sd[f"{a}.attn.in_proj_bias"], f"{b}.self_attn", "bias"))
        for kind in ("weight", "bias"):
            out[f"{b}.layer_norm1.{kind}"] = sd[f"{a}.ln_1.{kind}"]
            out[f"{b}.layer_norm2.{kind}"] = sd[f"{a}.ln_2.{kind}"]
            out[f"{b}.self_attn.out_proj.{kind}"] = sd[f"{a}.attn.out_proj.{kind}"]
            out[f"{b}.mlp.fc1.{kind}"] = sd[f"{a}.mlp.c_fc.{kind}"]
            out[f"{b}.mlp.fc2.{kind}"] = sd[f"{a}.mlp.c_proj.{kind}"]
            out[f"{ht}.final_layer_norm.{kind}"] = sd[f"text.ln_final.{kind}"]
            out[f"{ht}.head.{kind}"] = sd[f"text.text_projection.{kind}"]
    return out


def hf_siglip2(model, image_size: int):
    """A ``transformers.Siglip2Model`` of ``model``'s shape, holding its converted weights."""
    from transformers import Siglip2Config, Siglip2Model

    t, v = model.text, model.visual.trunk
    patch = v.patch_embed.patch_size[0]
    cfg = Siglip2Config(
        text_config=dict(
            vocab_size=t.vocab_size,
            hidden_size=t.width,
            intermediate_size=t.transformer.resblocks[0].mlp.c_fc.out_features,
            num_hidden_layers=len(t.transformer.resblocks),
            num_attention_heads=t.heads,
            max_position_embeddings=t.context_length,
            projection_size=t.text_projection.out_features,
            pad_token_id=0,
            bos_token_id=2,
            eos_token_id=1,
        ),
        vision_config=dict(
            hidden_size=v.embed_dim,
            intermediate_size=v.blocks[0].mlp.fc1.out_features,
            num_hidden_layers=len(v.blocks),
            num_attention_heads=v.blocks[0].attn.num_heads,
            patch_size=patch,
            num_patches=(image_size // patch) ** 2,
        ),
    )
    hf = Siglip2Model(cfg).eval()
    missing, unexpected = hf.load_state_dict(convert(model), strict=False)
    assert not unexpected, unexpected
    assert not [k for k in missing if "position_ids" not in k], missing
    return hf


def _features(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def hf_image_features(hf, x: torch.Tensor, patch: int) -> torch.Tensor:
    """Siglip2Model's image features of normalised images ``x`` (B, 3, H, W): its NaFlex input."""
    return _features(hf.get_image_features(**_hf_pixels(x, patch)))


def _min_cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.double(), b.double()).min())


def _perturb_norms(model) -> None:
    """Random init sets every LayerNorm to (1, 0): give them values so the mapping of each is tested."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ("norm" in n or "ln_" in n) and p.ndim == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
            elif n.endswith(".bias") or n.endswith("attn_pool.latent"):
                p.add_(0.02 * torch.randn(p.shape, generator=g))


def assert_same_siglip(loaded: M.LoadedModel) -> None:
    model = loaded.model
    _perturb_norms(model)
    size, patch = loaded.image_size, model.visual.trunk.patch_embed.patch_size[0]
    hf = hf_siglip2(model, size)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 3, size, size, generator=g)
    ids = torch.randint(3, model.text.vocab_size, (4, model.text.context_length), generator=g)
    ids[:, -3:] = 0  # padded tail as the tokenizer leaves it (SigLIP pools the last position)
    with torch.no_grad():
        ours_img, ours_txt = loaded.encode_image(x), model.encode_text(ids)
        ref_img, ref_txt = hf_image_features(hf, x, patch), _features(hf.get_text_features(input_ids=ids))
        ref_logits = hf(input_ids=ids, **_hf_pixels(x, patch)).logits_per_image
    assert ours_img.shape == ref_img.shape and ours_txt.shape == ref_txt.shape
    for name, ours, ref in (("image", ours_img, ref_img), ("text", ours_txt, ref_txt)):
        cos, diff = _min_cos(ours, ref), float((ours - ref).abs().max())
        assert cos >= MIN_COS and diff <= MAX_ABS, f"{name} features: min cos {cos:.10f}, max diff {diff:.2e}"
    # the scores: our sigmoid scoring reads the same scale and bias and gives HF's logits
    scoring = M.model_scoring(model)
    assert scoring.kind == "sigmoid"
    cos = F.normalize(ours_img, dim=-1) @ F.normalize(ours_txt, dim=-1).T
    ours_logits = cos * scoring.logit_scale + scoring.logit_bias
    np.testing.assert_allclose(ours_logits.numpy(), ref_logits.numpy(), rtol=1e-4, atol=1e-4)
    probs = zs.class_probs(ours_img.numpy(), F.normalize(ours_txt, dim=-1).numpy(), scoring)
    ref_probs = torch.softmax(F.logsigmoid(ref_logits.double()), dim=-1).numpy()
    np.testing.assert_allclose(probs, ref_probs, rtol=1e-3, atol=1e-6)
    return hf


def _hf_pixels(x: torch.Tensor, patch: int) -> dict:
    b, c, h, w = x.shape
    nh, nw = h // patch, w // patch
    patches = x.reshape(b, c, nh, patch, nw, patch).permute(0, 2, 4, 3, 5, 1).reshape(b, nh * nw, -1)
    return {
        "pixel_values": patches,
        "pixel_attention_mask": torch.ones(b, nh * nw, dtype=torch.long),
        "spatial_shapes": torch.tensor([[nh, nw]] * b),
    }


def test_tiny_siglip2_matches_transformers_siglip2(tiny_siglip_spec):
    loaded = M.load_clip(tiny_siglip_spec, cache=False)
    assert loaded.identity["activation"] == "gelu_tanh"
    assert_same_siglip(loaded)


@pytest.mark.slow
def test_vit_b_16_siglip2_matches_transformers_siglip2():
    """The real-size architecture (open_clip ``ViT-B-16-SigLIP2``: 12+12 layers, 256k vocabulary)."""
    loaded = M.load_clip(M.ClipSpec("ViT-B-16-SigLIP2", random_init=True), cache=False)
    assert loaded.image_size == 224 and loaded.key.endswith("-sigmoid")
    hf = assert_same_siglip(loaded)
    # the tolerance separates timm's exact-GELU tower (what open_clip alone builds) from SigLIP's
    for m in loaded.model.visual.modules():
        if isinstance(m, torch.nn.GELU):
            m.approximate = "none"
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = float((loaded.encode_image(x) - hf_image_features(hf, x, 16)).abs().max())
    assert diff > MAX_ABS
