"""The CPU inference engine (core/engines.py): same outputs as PyTorch, cached conversions,
fallback to PyTorch, and stores that never mix engines by accident.

Tolerances (tiny random-init models, real CIFAR images): OpenVINO fp32 vs PyTorch fp32 min
cosine >= 0.99999 and max |difference| <= 1e-4 (embeddings) / 1e-4 (tuned-model
probabilities, same argmax); int8 min cosine >= 0.9 here (random tiny weights; int8 accuracy
on real architectures is what benchmarks/embeddings.py reports). Tests check correctness only.
"""

import copy
import importlib.util
import json
import shutil
import warnings

import numpy as np
import pytest
import torch

from conftest import cifar_files
from fiftyone_nola.core import cdul as ml
from fiftyone_nola.core import engines
from fiftyone_nola.core import prompt_tuning as pt
from fiftyone_nola.core.embed import EmbedConfig, embed_filepaths, engine_module, prepare_encoder
from fiftyone_nola.core.errors import IndexMismatchError, InvalidInputError
from fiftyone_nola.core.models import tiny_clip_spec
from fiftyone_nola.stages.embeddings import compute_embeddings, open_index

HAVE_OV = importlib.util.find_spec("openvino") is not None
needs_ov = pytest.mark.skipif(not HAVE_OV, reason="openvino is not installed (pip install '.[openvino]')")
TORCH = EmbedConfig(batch_size=4, num_workers=0, engine="torch", precision="fp32")
OV = EmbedConfig(batch_size=4, num_workers=0, engine="openvino", precision="fp32")


@pytest.fixture(scope="module")
def files():
    return [p for p, _ in cifar_files(per_class=1)]


@pytest.fixture(autouse=True)
def _fresh_warnings(monkeypatch):
    monkeypatch.setattr(engines, "_WARNED", set())


def _cos(a, b):
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


# ----------------------------------------------------------------------------- choice


def test_auto_picks_openvino_bf16_only_with_native_bf16(monkeypatch):
    monkeypatch.delenv("NOLA_ENGINE", raising=False)
    monkeypatch.setattr(engines, "openvino_available", lambda: True)
    monkeypatch.setenv("NOLA_CPU_BF16", "1")
    assert engines.resolve("auto", "auto", "cpu").tag == "openvino-bf16"
    monkeypatch.setenv("NOLA_CPU_BF16", "0")  # OpenVINO fp32 measured at parity there
    assert engines.resolve("auto", "auto", "cpu").tag == "torch-fp32"
    assert engines.resolve("openvino", "auto", "cpu").tag == "openvino-fp32"
    with pytest.warns(engines.EngineFallbackWarning, match="no native bf16"):
        assert engines.resolve("openvino", "bf16", "cpu").tag == "openvino-fp32"
    assert engines.resolve("auto", "int8", "cpu").tag == "openvino-int8"  # opt-in only
    assert engines.resolve("torch", "auto", "cpu").tag == "torch-fp32"
    monkeypatch.setenv("NOLA_ENGINE", "torch")  # the CLI's --engine torch
    assert engines.resolve("auto", "auto", "cpu").tag == "torch-fp32"
    with pytest.raises(InvalidInputError, match="int8"):
        engines.resolve("torch", "int8", "cpu")
    with pytest.raises(InvalidInputError, match="engine must be"):
        engines.resolve("onnx", "auto", "cpu")


def test_auto_without_openvino_is_pytorch_silently_explicit_request_warns(monkeypatch):
    monkeypatch.delenv("NOLA_ENGINE", raising=False)

    def missing():
        raise ImportError("No module named 'openvino'")

    monkeypatch.setattr(engines, "_import_openvino", missing)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert engines.resolve("auto", "auto", "cpu").tag == "torch-fp32"
    with pytest.warns(engines.EngineFallbackWarning, match="not installed"):
        assert engines.resolve("openvino", "fp32", "cpu").tag == "torch-fp32"


@pytest.mark.integration
def test_missing_openvino_falls_back_to_pytorch_with_one_warning(monkeypatch, tiny_clip, files):
    def missing():
        raise ImportError("No module named 'openvino'")

    monkeypatch.setattr(engines, "_import_openvino", missing)
    ref, _ = embed_filepaths(tiny_clip, files, TORCH)
    with pytest.warns(engines.EngineFallbackWarning) as record:
        out, _ = embed_filepaths(tiny_clip, files, OV)
        embed_filepaths(tiny_clip, files, OV)
    assert len(record) == 1 and "PyTorch" in str(record[0].message)
    np.testing.assert_array_equal(out, ref)


@pytest.mark.integration
def test_conversion_failure_falls_back_to_pytorch(monkeypatch, tiny_clip, files, tmp_path):
    if not HAVE_OV:
        monkeypatch.setattr(engines, "openvino_available", lambda: True)
        monkeypatch.setattr(engines, "_import_openvino", lambda: object())
    monkeypatch.setenv("NOLA_HOME", str(tmp_path))

    def boom(*a, **k):
        raise RuntimeError("trace check failed")

    monkeypatch.setattr(engines, "_convert", boom)
    with pytest.warns(engines.EngineFallbackWarning, match="trace check failed.*PyTorch"):
        encode, choice = prepare_encoder(tiny_clip, OV, files)
    assert choice.tag == "torch-fp32"
    ref, _ = embed_filepaths(tiny_clip, files, TORCH)
    out, _ = embed_filepaths(tiny_clip, files, OV)
    np.testing.assert_array_equal(out, ref)
    assert not list((tmp_path / "engines").glob("*/model.xml"))  # nothing half-written kept


# ----------------------------------------------------------------------------- outputs


@pytest.mark.integration
@needs_ov
@pytest.mark.parametrize("family", ["clip", "dino"])
def test_openvino_fp32_matches_pytorch(family, tiny_clip, tiny_dino, files):
    model = tiny_clip if family == "clip" else tiny_dino
    ref, _ = embed_filepaths(model, files, TORCH)
    out, _ = embed_filepaths(model, files, OV)
    assert _cos(out, ref).min() >= 0.99999
    assert np.abs(out - ref).max() <= 1e-4


@pytest.mark.integration
@needs_ov
def test_openvino_int8_is_calibrated_and_close(tiny_clip, files):
    ref, _ = embed_filepaths(tiny_clip, files, TORCH)
    encode, choice = prepare_encoder(tiny_clip, EmbedConfig(num_workers=0, engine="openvino", precision="int8"), files)
    assert choice.tag == "openvino-int8"
    meta = engines.json.loads((encode.path / "meta.json").read_text())
    assert meta["calibration_images"] == len(files) and meta["ir"] == "int8"
    out, _ = embed_filepaths(tiny_clip, files, EmbedConfig(num_workers=0, engine="openvino", precision="int8"))
    assert _cos(out, ref).min() >= 0.9


@pytest.mark.integration
@needs_ov
def test_tuned_model_and_crop_scores_match_pytorch(tiny_clip, files):
    rng = np.random.RandomState(0)
    W = rng.randn(4, tiny_clip.embed_dim).astype(np.float32)
    W /= np.linalg.norm(W, axis=1, keepdims=True)
    model = pt.PromptedClassifier.from_clip(tiny_clip, W, n_prompts=4)
    with torch.no_grad():  # not the zero-shot head: the prompts and head have moved
        model.head.weight.mul_(3.0)
    ref, _ = pt.predict_tuned(model, files, 4, 0, "cpu", engine="torch")
    out, _ = pt.predict_tuned(model, files, 4, 0, "cpu", engine="openvino")
    assert model.last_engine.tag == "openvino-fp32"
    assert np.abs(out - ref).max() <= 1e-4
    assert (out.argmax(1) == ref.argmax(1)).all()
    cfg = ml.CropConfig(grid=2, batch_size=4, num_workers=0, engine="torch")
    loc_ref, _ = ml.local_clip_scores(tiny_clip, files[:4], W, cfg)
    cfg.engine = "openvino"
    loc, _ = ml.local_clip_scores(tiny_clip, files[:4], W, cfg)
    assert np.nanmax(np.abs(loc - loc_ref)) <= 1e-4


# ----------------------------------------------------------------------------- cache


@pytest.mark.integration
@needs_ov
def test_cache_is_reused_and_rebuilt_when_weights_change(tiny_clip, files, tmp_path, monkeypatch):
    monkeypatch.setenv("NOLA_HOME", str(tmp_path))
    choice = engines.EngineChoice("openvino", "fp32")
    module = engine_module(tiny_clip)
    shape = (3, tiny_clip.image_size, tiny_clip.image_size)
    logs = []
    before = engines.CONVERSIONS["count"]
    first, _ = engines.load_engine_model(module, tiny_clip.identity, shape, choice, log=logs.append)
    assert engines.CONVERSIONS["count"] == before + 1 and len(logs) == 1 and "converted" in logs[0]
    engines.clear_loaded()  # as a new process: only the on-disk cache is left
    again, _ = engines.load_engine_model(module, tiny_clip.identity, shape, choice, log=logs.append)
    assert engines.CONVERSIONS["count"] == before + 1 and len(logs) == 1  # printed once
    assert again.path == first.path
    changed = copy.deepcopy(module)
    with torch.no_grad():
        next(changed.parameters()).add_(0.01)
    other, _ = engines.load_engine_model(changed, tiny_clip.identity, shape, choice, log=logs.append)
    assert engines.CONVERSIONS["count"] == before + 2 and other.path != first.path
    x = torch.randn(3, *shape)
    with torch.no_grad():
        np.testing.assert_allclose(other(x).numpy(), changed(x).numpy(), atol=1e-4)
    assert not [p for p in (tmp_path / "engines").iterdir() if p.name.startswith(".")]  # no temp left
    shutil.rmtree(first.path)  # a deleted entry is rebuilt, not an error
    engines.clear_loaded()
    engines.load_engine_model(module, tiny_clip.identity, shape, choice, log=logs.append)
    assert engines.CONVERSIONS["count"] == before + 3


# ----------------------------------------------------------------------------- stores


@pytest.mark.integration
def test_store_records_its_engine_and_refuses_to_mix(make_dataset, files, monkeypatch):
    import fiftyone as fo

    ds = make_dataset(files[:5])
    compute_embeddings(ds, "clip", tiny_clip_spec(), config=TORCH)
    meta = open_index(ds, tiny_clip_spec()).meta
    assert meta["engine"]["engine"] == "torch" and meta["engine"]["precision"] == "fp32"
    assert meta["engines_used"] == ["torch-fp32"] and meta["mixed_engines"] is False

    ds.add_samples([fo.Sample(filepath=files[5])])
    bf16 = EmbedConfig(batch_size=4, num_workers=0, engine="torch", precision="bf16")
    with pytest.raises(IndexMismatchError, match="torch fp32.*allow_mixed_engines"):
        compute_embeddings(ds, "clip", tiny_clip_spec(), config=bf16)
    assert len(open_index(ds, tiny_clip_spec())) == 5  # nothing added

    # all settings on auto: the store's own engine extends it
    monkeypatch.delenv("NOLA_ENGINE", raising=False)
    auto = EmbedConfig(batch_size=4, num_workers=0)
    out = compute_embeddings(ds, "clip", tiny_clip_spec(), config=auto)["clip"]
    assert out["embedded"] == 1 and out["inference"]["engine"] == "torch"
    assert open_index(ds, tiny_clip_spec()).meta["engines_used"] == ["torch-fp32"]

    ds.add_samples([fo.Sample(filepath=files[6])])
    mixed = EmbedConfig(batch_size=4, num_workers=0, engine="torch", precision="bf16", allow_mixed_engines=True)
    compute_embeddings(ds, "clip", tiny_clip_spec(), config=mixed)
    meta = open_index(ds, tiny_clip_spec()).meta
    assert meta["mixed_engines"] is True and meta["engines_used"] == ["torch-fp32", "torch-bf16"]
    assert meta["count"] == 7


@pytest.mark.integration
@needs_ov
def test_int8_cache_is_keyed_by_its_calibration_images(tiny_clip, files, tmp_path, monkeypatch):
    from fiftyone_nola.core.embed import calibration_images

    monkeypatch.setenv("NOLA_HOME", str(tmp_path))
    choice = engines.EngineChoice("openvino", "int8")
    module = engine_module(tiny_clip)
    shape = (3, tiny_clip.image_size, tiny_clip.image_size)
    calib = [calibration_images(chunk, tiny_clip.transform, n=2) for chunk in (files[:2], files[2:4])]
    a, _ = engines.load_engine_model(module, tiny_clip.identity, shape, choice, calibration=calib[0])
    engines.clear_loaded()
    same, _ = engines.load_engine_model(module, tiny_clip.identity, shape, choice, calibration=calib[0])
    engines.clear_loaded()
    other, _ = engines.load_engine_model(module, tiny_clip.identity, shape, choice, calibration=calib[1])
    assert same.path == a.path and other.path != a.path
    fp32, _ = engines.load_engine_model(
        module, tiny_clip.identity, shape, engines.EngineChoice("openvino", "fp32"), calibration=calib[1]
    )
    assert "calibration" not in json.loads((fp32.path / "meta.json").read_text())
