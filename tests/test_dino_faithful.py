"""DINO as the official NoLA code runs it: same weights in -> same features, same labeler input.

``tests/golden/dino_reference.json`` was written by a throwaway script kept outside this repo
(no official code is part of this repository). It exported ``vision_transformer.py`` and
``utils.py`` of github.com/facebookresearch/dino at commit 7c446df5b9f4
(7c446df5b9f45747937fb0d72314eb9f7b66930a) unmodified into a scratch directory, built
``vision_transformer.vit_small(patch_size=16, num_classes=0)`` and ``vit_base(patch_size=16,
num_classes=0)`` (what ``hubconf.dino_vits16`` / ``dino_vitb16`` build; NoLA's labeler is
``dino_vitb16`` with ``head = Identity``), filled them with deterministic random weights (the
rule and seed are in the JSON: numpy ``default_rng(seed)``, one tensor per state-dict key in the
stored order), saved those as the official release files (a plain state dict ``torch.save``d as
``dino_deitsmall16_pretrain.pth`` / ``dino_vitbase16_pretrain.pth``), loaded them back the way
hubconf does (``torch.load`` + strict ``load_state_dict``) and ran the official ``forward`` (CLS
token after the final norm, not normalised) in float32 on the CPU over four real images of
``../shared/data`` (paths and sha256 in the JSON), each opened with PIL, converted to RGB (dassl's
``read_image``) and preprocessed by NoLA's ``te_transform`` (fazliimam/NoLA @ ffd99acda629,
utils/model_utils.py: Resize(224, bicubic), CenterCrop(224), RGB, ToTensor, Normalize with CLIP's
mean/std). torch 2.14.1 / numpy 2.4.6.

Here the same weights are regenerated from the rule, written in each format users have (the
official release file, an official full checkpoint, timm's model.safetensors / pytorch_model.bin,
a huggingface_hub cache read offline) and loaded through ``models.load_dino``; the features must
equal the official ones (min cosine >= 0.999999, max abs diff <= 1e-4).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import (
    assert_reference_features,
    dino_features_from_offline_hub_cache,
    golden_entries,
    golden_features,
    golden_image_paths,
    golden_rgb_images,
)
from fiftyone_nola.core import models as M
from fiftyone_nola.core.errors import IndexMismatchError, InvalidInputError, ModelNotFoundError

GOLDEN = json.loads((Path(__file__).parent / "golden" / "dino_reference.json").read_text())
SMALL = GOLDEN["models"]["vit_small16"]
BASE = GOLDEN["models"]["vit_base16"]
SMALL_NAME = "vit_small_patch16_224.dino"
BASE_NAME = "vit_base_patch16_224.dino"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def make_weights(model: dict) -> dict:
    """The golden weights, regenerated from the rule stored in the JSON."""
    rng = np.random.default_rng(model["seed"])
    out = {}
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
        out[key] = torch.from_numpy(a.astype(np.float32))
    return out


def te_transform():
    """NoLA's te_transform, built here from torchvision (the reference preprocessing)."""
    from PIL import Image
    from torchvision import transforms

    return transforms.Compose(
        [
            transforms.Resize(224, interpolation=Image.BICUBIC),
            transforms.CenterCrop(224),
            lambda image: image.convert("RGB"),
            transforms.ToTensor(),
            transforms.Normalize(CLIP_MEAN, CLIP_STD),
        ]
    )


def features(loaded, images) -> np.ndarray:
    x = torch.stack([loaded.transform(im) for im in images])
    with torch.no_grad():
        return loaded.encode_image(x).numpy()


def assert_official(f, model: dict) -> None:
    assert_reference_features(f, golden_features(GOLDEN, model))


@pytest.fixture(scope="module")
def small_sd():
    return make_weights(SMALL)


@pytest.fixture(scope="module")
def images():
    return golden_rgb_images(GOLDEN)


def timm_state_dict(sd: dict) -> dict:
    """What timm's own files of the model hold: its state dict, in timm's key order."""
    import timm

    m = timm.create_model(SMALL_NAME, pretrained=False, num_classes=0)
    m.load_state_dict(sd, strict=True)
    return {k: v.contiguous() for k, v in m.state_dict().items()}


# --------------------------------------------------------------------------- provenance


def test_golden_provenance():
    assert GOLDEN["dino_commit"] == "7c446df5b9f45747937fb0d72314eb9f7b66930a"
    assert GOLDEN["nola_commit"].startswith("ffd99acda629")
    assert SMALL["release_file"] == M.DINO_RELEASE_FILES[SMALL_NAME]
    assert BASE["release_file"] == M.DINO_RELEASE_FILES[BASE_NAME]


@pytest.mark.integration
def test_golden_images_are_the_stored_ones():
    for p, im in golden_entries(GOLDEN):
        assert hashlib.sha256(p.read_bytes()).hexdigest() == im["sha256"], p


# --------------------------------------------------------------------------- preprocessing


@pytest.mark.integration
def test_nola_preprocessing_equals_te_transform(images, small_sd, tmp_path):
    path = tmp_path / SMALL["release_file"]
    torch.save(small_sd, path)
    loaded = M.load_dino(M.DinoSpec(checkpoint=str(path), random_init=False), cache=False)
    assert loaded.identity["preprocess"] == "nola" and loaded.image_size == 224
    ref = te_transform()
    for im in images:
        ours = loaded.transform(im)
        assert torch.equal(ours, ref(im))
    # The old behaviour is an option, with its own store key.
    timm_pre = M.load_dino(M.DinoSpec(checkpoint=str(path), random_init=False, preprocess="timm"), cache=False)
    assert not torch.allclose(timm_pre.transform(images[0]), ref(images[0]), atol=1e-3)
    assert timm_pre.key != loaded.key and "nola" in loaded.key


@pytest.mark.integration
def test_real_loader_path_gives_the_official_features(small_sd, tmp_path):
    """Files -> our decoder and DataLoader -> DINO: the official features (exact JPEG decode)."""
    from fiftyone_nola.core.embed import EmbedConfig, embed_filepaths

    path = tmp_path / SMALL["release_file"]
    torch.save(small_sd, path)
    loaded = M.load_dino(M.DinoSpec(checkpoint=str(path), random_init=False), cache=False)
    out, failures = embed_filepaths(
        loaded,
        [str(p) for p in golden_image_paths(GOLDEN)],
        EmbedConfig(batch_size=4, num_workers=0, device="cpu", draft_decode=False),
    )
    assert not failures
    assert_official(out, SMALL)


def test_preprocess_option_is_validated(tmp_path):
    with pytest.raises(InvalidInputError, match="nola"):
        M.load_dino(M.DinoSpec(name=M.TINY_DINO_NAME, random_init=True, preprocess="clip"), cache=False)
    with pytest.raises(InvalidInputError, match="nola"):
        M.spec_key(M.DinoSpec(name=M.TINY_DINO_NAME, random_init=True, preprocess="imagenet"))


# --------------------------------------------------------------------------- weight formats


@pytest.mark.integration
def test_official_release_file(images, small_sd, tmp_path, models_dir):
    path = tmp_path / SMALL["release_file"]
    torch.save(small_sd, path)
    # checkpoint=: the architecture is read from the file when the name is "auto"
    spec = M.DinoSpec(checkpoint=str(path), random_init=False)
    assert M.concrete_dino(spec).name == SMALL_NAME
    loaded = M.load_dino(spec, cache=False)
    assert loaded.identity["name"] == SMALL_NAME and loaded.identity["weights"].startswith("file-")
    assert_official(features(loaded, images), SMALL)
    # the models dir, under the official file name
    os.replace(path, models_dir / "dino" / SMALL["release_file"])
    spec = M.DinoSpec(name=SMALL_NAME, random_init=False)
    assert M.weights_available(spec) == (True, "")
    assert_official(features(M.load_dino(spec, cache=False), images), SMALL)


@pytest.mark.integration
def test_official_full_checkpoint_uses_the_teacher(images, small_sd, tmp_path):
    teacher = {f"backbone.{k}": v for k, v in small_sd.items()}
    teacher["head.mlp.0.weight"] = torch.zeros(8, 384)  # the DINOHead: not part of the backbone
    student = {f"module.backbone.{k}": v + 0.5 for k, v in small_sd.items()}
    path = tmp_path / "dino_deitsmall16_pretrain_full_checkpoint.pth"
    torch.save({"student": student, "teacher": teacher, "epoch": 100}, path)
    loaded = M.load_dino(M.DinoSpec(checkpoint=str(path), random_init=False), cache=False)
    assert_official(features(loaded, images), SMALL)


@pytest.mark.integration
@pytest.mark.parametrize(
    "fmt,layout",
    [
        ("model.safetensors", "models_dir_folder"),
        ("pytorch_model.bin", "models_dir_folder"),
        ("model.safetensors", "checkpoint_folder"),
        ("model.safetensors", "models_dir_flat"),
    ],
)
def test_timm_files(images, small_sd, tmp_path, models_dir, fmt, layout):
    from safetensors.torch import save_file

    sd = timm_state_dict(small_sd)
    if layout == "models_dir_folder":  # <models_dir>/dino/<timm name>/<file>, as in the hub repo
        folder = models_dir / "dino" / SMALL_NAME
    else:
        folder = tmp_path / "timm_repo"
    folder.mkdir(parents=True)
    path = folder / fmt
    save_file(sd, str(path)) if fmt.endswith(".safetensors") else torch.save(sd, path)
    if layout == "models_dir_flat":  # <models_dir>/dino/<timm name>.<suffix>
        os.replace(path, models_dir / "dino" / f"{SMALL_NAME}{path.suffix}")
        spec = M.DinoSpec(name=SMALL_NAME, random_init=False)
    elif layout == "checkpoint_folder":
        spec = M.DinoSpec(checkpoint=str(folder), random_init=False)
    else:
        spec = M.DinoSpec(name=SMALL_NAME, random_init=False)
    loaded = M.load_dino(spec, cache=False)
    assert loaded.identity["name"] == SMALL_NAME and loaded.identity["weights"].startswith("file-")
    assert_official(features(loaded, images), SMALL)


@pytest.mark.integration
def test_huggingface_hub_cache_offline(small_sd, tmp_path):
    """A cache as huggingface_hub leaves it, read with HF_HUB_OFFLINE=1 (fresh process: the hub
    client reads these variables at import)."""
    out = dino_features_from_offline_hub_cache(
        tmp_path, SMALL_NAME, timm_state_dict(small_sd), golden_image_paths(GOLDEN)
    )
    assert out["ok"] == [True, ""] and out["weights"] == "hub"
    assert_official(out["features"], SMALL)


@pytest.mark.integration
@pytest.mark.slow
def test_official_vit_base_release_file(tmp_path):
    """NoLA's own labeler backbone (dino_vitb16), from its release file, architecture read from it."""
    path = tmp_path / BASE["release_file"]
    torch.save(make_weights(BASE), path)
    loaded = M.load_dino(M.DinoSpec(checkpoint=str(path), random_init=False), cache=False)
    assert loaded.identity["name"] == BASE_NAME and loaded.embed_dim == 768
    assert_official(features(loaded, golden_rgb_images(GOLDEN)), BASE)


def test_wrong_architecture_names_the_files_one(small_sd, tmp_path):
    path = tmp_path / SMALL["release_file"]
    torch.save(small_sd, path)
    with pytest.raises(ModelNotFoundError, match=f"It holds {SMALL_NAME}"):
        M.load_dino(M.DinoSpec(name=BASE_NAME, checkpoint=str(path), random_init=False), cache=False)


def _torchscript(path):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.script(torch.nn.Linear(2, 2)).save(str(path))


@pytest.mark.parametrize("kind", ["torchscript", "pickled_module", "garbage", "npz", "empty_folder", "no_tensors"])
def test_other_formats_get_one_clear_error(tmp_path, kind):
    if kind == "torchscript":
        path = tmp_path / "ViT-B-32.pt"
        _torchscript(path)
    elif kind == "pickled_module":
        path = tmp_path / "model.pth"
        torch.save(torch.nn.Linear(2, 2), path)
    elif kind == "garbage":
        path = tmp_path / "pytorch_model.bin"
        path.write_bytes(b"not a checkpoint" * 64)
    elif kind == "npz":
        path = tmp_path / "weights.npz"
        np.savez(path, a=np.zeros(3))
    elif kind == "empty_folder":
        path = tmp_path / "repo"
        path.mkdir()
    else:
        path = tmp_path / "config.pth"
        torch.save({"epoch": 3, "args": "x"}, path)
    spec = M.DinoSpec(name=SMALL_NAME, checkpoint=str(path), random_init=False)
    with pytest.raises(ModelNotFoundError) as e:
        M.load_dino(spec, cache=False)
    msg = str(e.value)
    assert "Accepted:" in msg and "dino_deitsmall16_pretrain.pth" in msg and "model.safetensors" in msg, msg
    # auto: the architecture cannot be read from such a file, and the error is the same kind
    with pytest.raises(ModelNotFoundError, match="Accepted:"):
        M.load_dino(M.DinoSpec(checkpoint=str(path), random_init=False), cache=False)


# --------------------------------------------------------------------------- the store keeps raw vectors


def test_store_recovers_raw_vectors(tmp_path):
    from fiftyone_nola.core.index import EmbeddingIndex

    rng = np.random.default_rng(0)
    raw = (rng.standard_normal((30, 16)) * rng.uniform(0.1, 40, (30, 1))).astype(np.float32)
    raw[3] = 0.0
    ids = [f"s{i}" for i in range(30)]
    ix = EmbeddingIndex.create(tmp_path / "ix", 16, {"model_key": "m"})
    ix.add(ids[:20], raw[:20])
    ix.checkpoint()  # replayed from the chunk
    ix = EmbeddingIndex.open(tmp_path / "ix")
    ix.add(ids[20:], raw[20:])
    ix.add(["s5"], raw[5] * 3)  # upsert
    ix.remove(["s7"])
    ix.save()
    ix = EmbeddingIndex.open(tmp_path / "ix")
    want = raw.copy()
    want[5] *= 3
    got, found = ix.get_raw(ids)
    assert found.tolist() == [i != 7 for i in range(30)]
    np.testing.assert_allclose(got, np.delete(want, 7, axis=0), rtol=1e-6, atol=1e-6)
    unit, _ = ix.get(ids)  # search stays cosine on unit rows
    assert np.allclose(np.linalg.norm(np.delete(unit, 3, axis=0), axis=1), 1.0, atol=1e-6)
    scores, hits = ix.search(raw[10] * 100, 1)
    assert hits[0] == ["s10"] and scores[0, 0] == pytest.approx(1.0, abs=1e-5)


def _strip_norms(path: Path) -> None:
    """Make a store look like one written before norms were stored."""
    meta = json.loads((path / "meta.json").read_text())
    (path / meta["files"].pop("norms")).unlink()
    (path / "meta.json").write_text(json.dumps(meta))


def test_store_without_norms_refuses_raw_reads(tmp_path):
    from fiftyone_nola.core.index import EmbeddingIndex

    ix = EmbeddingIndex.create(tmp_path / "ix", 4, {"model_key": "m"})
    ix.add(["a", "b"], np.array([[3.0, 4, 0, 0], [0, 0, 1, 0]], np.float32))
    ix.save()
    _strip_norms(tmp_path / "ix")
    ix = EmbeddingIndex.open(tmp_path / "ix")
    assert sorted(ix.missing_norms()) == ["a", "b"]
    with pytest.raises(IndexMismatchError, match="raw vectors cannot be recovered"):
        ix.get_raw(["a"])
    ix.get(["a"])  # unit rows and search still work
    ix.add(["a"], np.array([[6.0, 8, 0, 0]], np.float32))  # re-embedded rows get their norm
    np.testing.assert_allclose(ix.get_raw(["a"])[0], [[6, 8, 0, 0]], rtol=1e-6)
    assert ix.missing_norms() == ["b"]


# --------------------------------------------------------------------------- what the labeler gets


def _raw_cls(spec, paths) -> np.ndarray:
    from fiftyone_nola.core.data import load_image

    loaded = M.load_dino(spec, cache=False)
    x = torch.stack([loaded.transform(load_image(p)) for p in paths])
    with torch.no_grad():
        return loaded.encode_image(x).numpy()


@pytest.mark.integration
@pytest.mark.parametrize("features_opt", ["raw", "normalized"])
def test_dino_labels_feeds_the_labeler_raw_cls_features(cifar_dataset, monkeypatch, features_opt):
    """Real images -> compute_embeddings -> store -> dino_labels -> train_labeler: the MLP trains
    on the raw CLS features of NoLA-preprocessed images (default), unit rows only if asked."""
    from fiftyone_nola.core import dino_labeler as dl
    from fiftyone_nola.core.embed import EmbedConfig
    from fiftyone_nola.stages import fo_io
    from fiftyone_nola.stages.embeddings import compute_embeddings
    from fiftyone_nola.stages.nola import ZeroShotConfig, dino_labels, zero_shot

    clip, dino = M.tiny_clip_spec(), M.tiny_dino_spec()
    assert dino.preprocess == "nola"
    compute_embeddings(cifar_dataset, "both", clip, dino, EmbedConfig(batch_size=16, num_workers=0, device="cpu"))
    zero_shot(cifar_dataset, ["cat", "dog", "ship"], ZeroShotConfig(clip=clip), "zs")
    seen = {}
    real_train = dl.train_labeler

    def spy(features, indices, labels, n_classes, config=None, progress=None):
        seen["features"], seen["indices"] = np.array(features), np.array(indices)
        return real_train(features, indices, labels, n_classes, config)

    monkeypatch.setattr(dl, "train_labeler", spy)
    cfg = dl.DinoLabelerConfig(epochs=1, features=features_opt)
    dino_labels(cifar_dataset, "zs", dino, cfg, label_field="dino")
    ids, paths = fo_io.ids_and_paths(cifar_dataset)
    want = _raw_cls(dino, paths)
    norms = np.linalg.norm(want, axis=1)
    assert not np.allclose(norms, 1.0, atol=0.1)  # raw features are not unit rows
    if features_opt == "raw":
        np.testing.assert_allclose(seen["features"], want, rtol=1e-5, atol=1e-5)
    else:
        np.testing.assert_allclose(seen["features"], want / norms[:, None], rtol=1e-5, atol=1e-6)
    assert len(seen["indices"]) > 0


@pytest.mark.integration
def test_old_dino_store_without_norms_is_reembedded(cifar_dataset):
    from fiftyone_nola.core.embed import EmbedConfig
    from fiftyone_nola.stages.embeddings import compute_embeddings, index_path, load_embeddings

    dino = M.tiny_dino_spec()
    cfg = EmbedConfig(batch_size=16, num_workers=0, device="cpu")
    compute_embeddings(cifar_dataset, "dino", dino=dino, config=cfg)
    path = Path(index_path(cifar_dataset, dino))
    _strip_norms(path)
    with pytest.raises(IndexMismatchError, match="compute_embeddings"):
        load_embeddings(cifar_dataset, dino, raw=True)
    s = compute_embeddings(cifar_dataset, "dino", dino=dino, config=cfg)
    assert s["dino"]["embedded"] == len(cifar_dataset)
    _, raw = load_embeddings(cifar_dataset, dino, raw=True)
    assert np.isfinite(raw).all()


@pytest.mark.integration
def test_dino_labels_reproduces_official_train_taal(make_dataset):
    """The official train_taal golden (tests/golden/nola_reference.json), through dino_labels:
    features stored in the DINO store as the embedding stage stores them are read back and
    trained on as they were given (raw), giving the official network."""
    import fiftyone as fo

    from conftest import cifar_files
    from fiftyone_nola.core import dino_labeler as dl
    from fiftyone_nola.core.index import EmbeddingIndex
    from fiftyone_nola.stages import fo_io
    from fiftyone_nola.stages.artifacts import save_array_bundle, stage_dir
    from fiftyone_nola.stages.embeddings import index_path
    from fiftyone_nola.stages.nola import dino_labels

    case = json.loads((Path(__file__).parent / "golden" / "nola_reference.json").read_text())["cases"]["train_taal"]
    x = np.array(case["features"], dtype=np.float32)
    y = np.array(case["labels"])
    classes = ["c0", "c1", "c2"]
    ds = make_dataset([p for p, _ in cifar_files(per_class=5)][: len(x)])
    ids, _ = fo_io.ids_and_paths(ds)
    dino = M.tiny_dino_spec()
    ix = EmbeddingIndex.create(index_path(ds, dino), x.shape[1], {"model_key": M.spec_key(dino)})
    ix.add(ids, x, ["fp"] * len(ids))  # what EmbedJob does with the model's output
    ix.save()
    probs = np.full((len(ids), 3), 1 / 3, dtype=np.float32)
    save_array_bundle(stage_dir(ds, "zs"), ids, {"probs": probs}, {"classes": classes})
    # Every sample trusted with its golden label: the training set is the golden one, in order.
    by_id = dict(zip(ids, y))
    for s in ds.iter_samples(autosave=True):
        s["reviewed"] = fo.Classification(label=classes[by_id[s.id]])
    cfg = dl.DinoLabelerConfig(
        hidden=case["hidden"], epochs=case["epochs"], batch_size=case["batch_size"], seed=case["seed"]
    )
    dino_labels(ds, "zs", dino, cfg, label_field="dino", trusted_field="reviewed")
    mlp = dl.load_labeler(stage_dir(ds, "dino") / "labeler", classes)
    with torch.no_grad():
        got = mlp(torch.tensor(case["probe"], dtype=torch.float32)).numpy()
    np.testing.assert_allclose(got, np.array(case["probe_logits_trained"]), atol=1e-3)
