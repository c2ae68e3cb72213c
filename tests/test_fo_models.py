"""The tuned model as a FiftyOne model: apply_model / compute_embeddings agree with the library."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import fiftyone_nola
from conftest import cifar_files
from fiftyone_nola.core import prompt_tuning as pt
from fiftyone_nola.core.data import load_image
from fiftyone_nola.core.errors import IndexMismatchError, InvalidInputError
from fiftyone_nola.core.models import tiny_clip_spec
from fiftyone_nola.stages.fo_models import NolaTunedModel

CLASSES = [f"class{i}" for i in range(5)]


pytestmark = pytest.mark.integration  # real CIFAR-10 images


@pytest.fixture(scope="module")
def model_dir(tiny_clip, tmp_path_factory):
    """A saved tuned model whose head rows are centred features of real images, so labels and
    confidences vary per image (a random head on the tiny CLIP predicts one class)."""
    m = pt.PromptedClassifier.from_clip(tiny_clip, np.zeros((len(CLASSES), tiny_clip.embed_dim)), n_prompts=2)
    paths = [p for p, _ in cifar_files(per_class=1)]
    with torch.inference_mode():
        f = m.features(torch.stack([pt.weak_transform(m.image_size, m.mean, m.std)(load_image(p)) for p in paths]))
        m.head.weight.copy_(f[: len(CLASSES)] - f.mean(0))
    d = tmp_path_factory.mktemp("tuned")
    pt.save_tuned(d, m, CLASSES, tiny_clip.identity)
    return d


@pytest.fixture
def images(make_dataset):
    return make_dataset([p for p, _ in cifar_files(per_class=2)])


def test_load_model_is_a_fiftyone_model(model_dir):
    import fiftyone.core.models as fom

    model = fiftyone_nola.load_model(model_dir, clip=tiny_clip_spec(), device="cpu")
    assert isinstance(model, NolaTunedModel)
    assert isinstance(model, fom.Model) and isinstance(model, fom.EmbeddingsMixin)
    assert model.has_embeddings and model.media_type == "image" and model.classes == CLASSES


def test_apply_model_gives_the_labels_of_predict(model_dir, images):
    fiftyone_nola.predict(
        images,
        str(model_dir),
        clip=tiny_clip_spec(),
        label_field="lib",
        device="cpu",
        config=fiftyone_nola.PredictConfig(num_workers=0, engine="torch"),
    )
    model = fiftyone_nola.load_model(model_dir, clip=tiny_clip_spec(), device="cpu")
    images.apply_model(model, "fo", batch_size=7, num_workers=0)
    lib, fo = images.values("lib"), images.values("fo")
    assert len({c.label for c in fo}) > 1  # a non-trivial check: several classes predicted
    assert [c.label for c in lib] == [c.label for c in fo]
    np.testing.assert_allclose([c.confidence for c in fo], [c.confidence for c in lib], atol=1e-5)

    images.apply_model(model, "fo_logits", batch_size=4, num_workers=0, store_logits=True)
    assert images.first()["fo_logits"].logits.shape == (len(CLASSES),)


def test_compute_embeddings_gives_the_tuned_features(model_dir, images):
    model = fiftyone_nola.load_model(model_dir, clip=tiny_clip_spec(), device="cpu")
    emb = images.compute_embeddings(model, batch_size=8, num_workers=0)
    x = torch.stack([model.transforms(load_image(p)) for p in images.values("filepath")])
    with torch.inference_mode():
        want = model.tuned.features(x).numpy()
    assert emb.shape == want.shape
    np.testing.assert_allclose(emb, want, atol=1e-5)


def test_predict_on_single_images_and_unreadable_files(model_dir, images, tmp_path):
    model = fiftyone_nola.load_model(model_dir, clip=tiny_clip_spec(), device="cpu")
    path = images.first().filepath
    arr = np.asarray(load_image(path))
    assert model.predict(arr).label == model.predict_all([load_image(path)])[0].label
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image")
    images.add_sample(__import__("fiftyone").Sample(filepath=str(bad)))
    images.apply_model(model, "fo", batch_size=4, num_workers=0)
    assert images.count("fo") == len(images) - 1  # only the broken file has no label


def test_another_clip_or_class_list_is_refused(model_dir, tmp_path):
    with pytest.raises(IndexMismatchError, match="classes"):
        fiftyone_nola.load_model(model_dir, clip=tiny_clip_spec(), classes=CLASSES[::-1], device="cpu")
    other = tmp_path / "other"
    other.mkdir()
    for f in (pt.TUNED_NAME, pt.META_NAME):
        (other / f).write_bytes((model_dir / f).read_bytes())
    meta = json.loads((other / pt.META_NAME).read_text())
    meta["clip_identity"]["key"] = "clip-ViT-L-14-openai"
    (other / pt.META_NAME).write_text(json.dumps(meta))
    with pytest.raises(IndexMismatchError, match="CLIP"):
        fiftyone_nola.load_model(other, clip=tiny_clip_spec(), device="cpu")
    with pytest.raises(InvalidInputError, match="no tuned model"):
        fiftyone_nola.load_model(tmp_path, clip=tiny_clip_spec(), device="cpu")


def test_cdul_head_as_a_fiftyone_model(images, tmp_path):
    from fiftyone_nola.core import cdul as ml
    from fiftyone_nola.core.embed import EmbedConfig
    from fiftyone_nola.core.models import tiny_dino_spec
    from fiftyone_nola.stages.cdul import MultiLabelConfig

    embed = EmbedConfig(batch_size=8, num_workers=0, device="cpu")
    fiftyone_nola.compute_embeddings(images, "clip", tiny_clip_spec(), None, embed)
    _, feats = fiftyone_nola.load_embeddings(images, tiny_clip_spec())  # what the stage trains on
    torch.manual_seed(0)
    head = ml.MultiLabelHead(feats.shape[1], len(CLASSES))
    with torch.no_grad():
        head.net.weight.mul_(20)
    path = tmp_path / "classifier.pt"
    ml.save_classifier(path, head, CLASSES)
    cfg = MultiLabelConfig(clip=tiny_clip_spec(), embed=embed, device="cpu", max_labels=3)
    scores = ml.predict_multilabel(head, feats)
    positives = ml.decide_labels(scores, cfg.rule, ratio=cfg.ratio, max_labels=cfg.max_labels)

    model = fiftyone_nola.load_multilabel_model(path, cfg)
    images.apply_model(model, "cdul_fo", batch_size=8, num_workers=0)
    got = images.values("cdul_fo")
    for row, pos, labels in zip(scores, positives, got):
        want = [CLASSES[i] for i in np.argsort(-row) if pos[i]]
        assert [c.label for c in labels.classifications] == want
        np.testing.assert_allclose(
            [c.confidence for c in labels.classifications], sorted(row[pos], reverse=True), atol=1e-5
        )
    assert len({len(x.classifications) for x in got}) > 1  # label sets of several sizes
    np.testing.assert_allclose(images.compute_embeddings(model, batch_size=8, num_workers=0), feats, atol=1e-5)

    with pytest.raises(IndexMismatchError, match="classes"):
        fiftyone_nola.load_multilabel_model(path, cfg, classes=CLASSES[::-1])
    ml.save_classifier(path, head, CLASSES, {"model_keys": ["clip-ViT-B-32-openai"]})  # same width
    with pytest.raises(IndexMismatchError, match="features"):
        fiftyone_nola.load_multilabel_model(path, cfg)
    with pytest.raises(IndexMismatchError, match="features"):
        fiftyone_nola.load_multilabel_model(
            path, MultiLabelConfig(clip=tiny_clip_spec(), dino=tiny_dino_spec(), device="cpu")
        )
