"""Stage 1: CDE weights, text encoding and zero-shot scoring."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from fiftyone_nola.core.errors import InvalidInputError
from fiftyone_nola.core.zeroshot import (
    build_class_weights,
    cde_weights,
    encode_texts,
    softmax,
    zeroshot_logits,
    zeroshot_predict,
)


def test_cde_weights_hand_computed():
    # class 0: (3,0) and (0,4) normalise to the axes, mean (.5,.5) -> (1,1)/sqrt2
    # class 1: a single text keeps its direction; class 2: the scale of a text does not matter
    w = cde_weights(
        [np.array([[3.0, 0.0], [0.0, 4.0]]), np.array([[0.0, -2.0]]), np.array([[1.0, 0.0], [100.0, 0.0], [0.0, 0.1]])]
    )
    s = 1 / np.sqrt(2)
    expected = np.array([[s, s], [0.0, -1.0], [2 / np.sqrt(5), 1 / np.sqrt(5)]])
    np.testing.assert_allclose(w, expected, atol=1e-6)
    assert w.dtype == np.float32


@pytest.mark.parametrize(
    "bad",
    [
        [np.ones((2, 3)), np.zeros((0, 3))],  # a class without texts
        [],  # no classes
        [np.ones((2, 3)), np.ones((2, 4))],  # widths differ
        [np.array([[1.0, 0.0], [-1.0, 0.0]])],  # texts cancel out
        [np.array([[np.nan, 0.0]])],
    ],
)
def test_cde_weights_rejects(bad):
    with pytest.raises(InvalidInputError):
        cde_weights(bad)


def test_encode_texts_normalised_and_deterministic(tiny_clip):
    texts = ["a photo of a cat.", "a photo of a dog.", "a blurry photo of a truck.", "a cat"]
    a = encode_texts(tiny_clip, texts, device="cpu")
    b = encode_texts(tiny_clip, texts, batch_size=1, device="cpu")
    assert a.shape == (4, tiny_clip.embed_dim) and a.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(a, b, atol=1e-5)
    np.testing.assert_array_equal(a, encode_texts(tiny_clip, texts, device="cpu"))
    assert encode_texts(tiny_clip, [], device="cpu").shape == (0, tiny_clip.embed_dim)


def test_build_class_weights_dict_and_lists(tiny_clip):
    classes = ["cat", "dog"]
    texts = {"cat": ["a photo of a cat.", "a small furry pet"], "dog": ["a photo of a dog.", "a small furry pet"]}
    w = build_class_weights(tiny_clip, texts, classes, device="cpu")
    w2 = build_class_weights(tiny_clip, [texts["cat"], texts["dog"]], classes, batch_size=1, device="cpu")
    expected = cde_weights([encode_texts(tiny_clip, texts[c], device="cpu") for c in classes])
    assert w.shape == (2, tiny_clip.embed_dim)
    np.testing.assert_allclose(w, expected, atol=1e-5)
    np.testing.assert_allclose(w, w2, atol=1e-5)
    with pytest.raises(InvalidInputError):
        build_class_weights(tiny_clip, {"cat": ["x"]}, classes, device="cpu")
    with pytest.raises(InvalidInputError):
        build_class_weights(tiny_clip, {"cat": ["x"], "dog": []}, classes, device="cpu")
    with pytest.raises(InvalidInputError):
        build_class_weights(tiny_clip, [["x"]], classes, device="cpu")


def test_zeroshot_probabilities():
    rng = np.random.default_rng(0)
    w = cde_weights([rng.normal(size=(3, 8)) for _ in range(4)])
    img = rng.normal(size=(20, 8)) * 5
    labels, conf, probs = zeroshot_predict(img, w)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    cos = (img / np.linalg.norm(img, axis=1, keepdims=True)) @ w.T
    assert labels.tolist() == cos.argmax(axis=1).tolist()
    np.testing.assert_allclose(conf, probs.max(axis=1))
    np.testing.assert_allclose(zeroshot_logits(img, w, logit_scale=1.0), cos, atol=1e-5)


def test_softmax_stable():
    p = softmax(np.array([[1e4, 1e4 - 1.0, -1e4], [0.0, 0.0, 0.0]]))
    assert np.isfinite(p).all()
    np.testing.assert_allclose(p[1], 1 / 3, atol=1e-6)
    assert p[0, 0] == pytest.approx(1 / (1 + np.exp(-1.0)), abs=1e-6)


def test_nan_and_zero_rows(caplog):
    rng = np.random.default_rng(1)
    w = cde_weights([rng.normal(size=(2, 4)) for _ in range(3)])
    img = rng.normal(size=(4, 4))
    img[1] = np.nan
    img[3] = 0.0
    with caplog.at_level(logging.WARNING):
        labels, conf, probs = zeroshot_predict(img, w)
    assert "2 of 4" in caplog.text
    assert np.isnan(probs[[1, 3]]).all() and np.isfinite(probs[[0, 2]]).all()
    assert labels.tolist()[1] == -1 and labels.tolist()[3] == -1 and np.isnan(conf[[1, 3]]).all()


def test_width_mismatch():
    with pytest.raises(InvalidInputError):
        zeroshot_logits(np.ones((2, 3)), np.ones((4, 5)))


def test_trimmed_text_encoding_equals_full_77_token_encoding(tiny_clip):
    """Stopping each batch at its last end-of-text token changes nothing CLIP pools (causal mask)."""
    import torch

    from fiftyone_nola.core import zeroshot as zsm

    texts = ["a cat", "a photo of a very small dog sitting on a red sofa in the sun", "ship", "x " * 30]
    ours = zsm.encode_texts(tiny_clip, texts, batch_size=3)
    with torch.inference_mode():
        full = tiny_clip.model.encode_text(tiny_clip.tokenizer(texts)).float()
    full = torch.nn.functional.normalize(full, dim=-1).numpy()
    assert zsm._can_trim(tiny_clip.model)
    assert np.allclose(ours, full, atol=1e-5)


def test_cached_and_direct_class_weights_are_one_computation(tiny_clip, tmp_path, monkeypatch):
    """The pipeline's cached path and build_class_weights give the same matrix for the same texts
    (repeats included), and the cache encodes each distinct text once."""
    from fiftyone_nola.core.models import tiny_clip_spec
    from fiftyone_nola.core.text_cache import class_weights_from_texts

    monkeypatch.setenv("NOLA_HOME", str(tmp_path))
    texts = {"cat": ["a cat", "a cat", "whiskers"], "dog": ["a dog", "a cat"]}
    direct = build_class_weights(tiny_clip, texts, ["cat", "dog"], device="cpu")
    cached, info = class_weights_from_texts(tiny_clip_spec(), texts, ["cat", "dog"], device="cpu")
    np.testing.assert_allclose(cached, direct, atol=1e-6)
    assert info["encoded"] == 3  # "a cat", "whiskers", "a dog"
    with pytest.raises(InvalidInputError, match="no texts"):
        class_weights_from_texts(tiny_clip_spec(), {"cat": ["x"], "dog": []}, ["cat", "dog"])
