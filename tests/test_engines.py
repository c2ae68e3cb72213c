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
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import cifar_files
from fiftyone_nola.core import cdul as ml
from fiftyone_nola.core import cpu_isa, engine_choice, engines
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


def test_settings_resolve_to_auto_or_an_explicit_engine(monkeypatch):
    monkeypatch.delenv("NOLA_ENGINE", raising=False)
    monkeypatch.setattr(engines, "openvino_available", lambda: True)
    monkeypatch.setenv("NOLA_CPU_ISA", "avx2")
    assert engines.resolve("auto", "auto", "cpu").tag == "auto-auto"  # measured by engine_choice
    assert engines.resolve("auto", "fp32", "cpu").tag == "auto-fp32"
    assert engines.resolve("openvino", "auto", "cpu").tag == "openvino-fp32"
    with pytest.warns(engines.EngineFallbackWarning, match="no native bf16"):
        assert engines.resolve("openvino", "bf16", "cpu").tag == "openvino-fp32"
    assert engines.resolve("auto", "int8", "cpu").tag == "openvino-int8"  # explicit: no check
    assert engines.resolve("torch", "auto", "cpu").tag == "torch-fp32"
    monkeypatch.setenv("NOLA_CPU_ISA", "amx")
    assert engines.resolve("openvino", "auto", "cpu").tag == "openvino-bf16"
    assert engines.resolve("auto", "bf16", "cpu").tag == "openvino-bf16"
    monkeypatch.setenv("NOLA_ENGINE", "torch")  # the CLI's --engine torch: no measurement at all
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

    monkeypatch.setattr(engines, "_convert_fp32", boom)
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
    assert 1 <= meta["calibration_images"] <= len(files) and meta["ir"] == "int8"
    out, _ = embed_filepaths(tiny_clip, files, EmbedConfig(num_workers=0, engine="openvino", precision="int8"))
    assert _cos(out, ref).min() >= 0.9


@pytest.mark.integration
@needs_ov
def test_tuned_model_and_crop_scores_match_pytorch(tiny_clip, files, monkeypatch):
    # engine="openvino" runs bf16 where the CPU has it natively: this test is the fp32 branch on
    # any CPU; test_tuned_model_in_bf16_keeps_the_labels is the other
    monkeypatch.setenv("NOLA_CPU_ISA", "avx2")
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

    # auto: measured on these images, an engine kept only if its labels match PyTorch fp32's
    monkeypatch.delenv("NOLA_ENGINE", raising=False)
    monkeypatch.setenv("NOLA_ENGINE_MIN_IMAGES", "0")
    out, _ = pt.predict_tuned(model, files, 4, 0, "cpu")
    measured = model.last_engine.measured
    assert measured["images"] == len(files) - len(files[::3]) and measured["choice"] == model.last_engine.tag
    assert measured["candidates"]["openvino-fp32"]["label_agreement"] == 1.0
    assert (out.argmax(1) == ref.argmax(1)).all()
    cfg.engine = "auto"
    loc, _ = ml.local_clip_scores(tiny_clip, files[:4], W, cfg)
    assert np.array_equal(np.nanargmax(loc, -1), np.nanargmax(loc_ref, -1))
    crop_choice = next(engines.cache_root().glob("choices/*crop-labels*.json"))
    assert json.loads(crop_choice.read_text())["candidates"]["openvino-fp32"]["label_agreement"] == 1.0


@pytest.mark.integration
@needs_ov
def test_tuned_model_in_bf16_keeps_the_labels(tiny_clip, files, monkeypatch):
    """The bf16 branch (a CPU with avx512_bf16 or AMX): OpenVINO's bf16 hint on the fp32 IR. On a
    CPU without native bf16 OpenVINO runs it in fp32, so the bound is bf16's, met either way."""
    monkeypatch.setenv("NOLA_CPU_ISA", "avx512_bf16")
    rng = np.random.RandomState(1)
    W = rng.randn(4, tiny_clip.embed_dim).astype(np.float32)
    W /= np.linalg.norm(W, axis=1, keepdims=True)
    model = pt.PromptedClassifier.from_clip(tiny_clip, W, n_prompts=4)
    ref, _ = pt.predict_tuned(model, files, 4, 0, "cpu", engine="torch")
    out, _ = pt.predict_tuned(model, files, 4, 0, "cpu", engine="openvino")
    assert model.last_engine.tag == "openvino-bf16"
    assert np.abs(out - ref).max() <= 0.05  # probabilities; bf16 keeps 8 bits of mantissa
    margin = np.sort(ref, 1)[:, -1] - np.sort(ref, 1)[:, -2]
    clear = margin > 0.05
    assert (out.argmax(1) == ref.argmax(1))[clear].all()


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
def test_int8_is_calibrated_once_per_model_not_per_dataset(tiny_clip, files, tmp_path, monkeypatch):
    """A second dataset reuses the int8 model (before: NNCF ran again for every new set of
    images, most of int8's end-to-end time); its meta.json says which images calibrated it."""
    from fiftyone_nola.core.embed import calibration_images

    monkeypatch.setenv("NOLA_HOME", str(tmp_path))
    choice = engines.EngineChoice("openvino", "int8")
    module = engine_module(tiny_clip)
    shape = (3, tiny_clip.image_size, tiny_clip.image_size)
    calib = [calibration_images(chunk, tiny_clip.transform, n=2) for chunk in (files[:2], files[2:4])]
    a, _ = engines.load_engine_model(module, tiny_clip.identity, shape, choice, calibration=calib[0])
    before = engines.CONVERSIONS["count"]
    engines.clear_loaded()
    other, _ = engines.load_engine_model(module, tiny_clip.identity, shape, choice, calibration=calib[1])
    assert other.path == a.path and engines.CONVERSIONS["count"] == before
    meta = json.loads((a.path / "meta.json").read_text())
    assert meta["calibration"] == calib[0].fingerprint and meta["calibration_images"] == 2
    fp32, _ = engines.load_engine_model(
        module, tiny_clip.identity, shape, engines.EngineChoice("openvino", "fp32"), calibration=calib[1]
    )
    assert "calibration" not in json.loads((fp32.path / "meta.json").read_text())


# ----------------------------------------------------------------------------- auto: measured choice


def test_cpu_isa_is_the_best_flag_and_the_override_wins(monkeypatch):
    flags = {"sse4_2", "avx", "avx2", "fma"}
    assert cpu_isa.isa_from_flags(set()) == "generic"
    assert cpu_isa.isa_from_flags(flags) == "avx2"
    assert cpu_isa.isa_from_flags(flags | {"avx512f"}) == "avx512"
    assert cpu_isa.isa_from_flags(flags | {"avx_vnni"}) == "avx_vnni"
    assert cpu_isa.isa_from_flags(flags | {"avx512f", "avx512_vnni"}) == "avx512_vnni"
    assert cpu_isa.isa_from_flags(flags | {"avx512f", "avx512_vnni", "avx512_bf16"}) == "avx512_bf16"
    assert cpu_isa.isa_from_flags(flags | {"avx512f", "avx512_vnni", "avx512_bf16", "amx_tile"}) == "amx"
    monkeypatch.setenv("NOLA_CPU_ISA", "AMX")
    assert cpu_isa.cpu_isa() == "amx" and engines.cpu_native_bf16()
    monkeypatch.setenv("NOLA_CPU_ISA", "avx512_vnni")
    assert not engines.cpu_native_bf16()
    monkeypatch.setenv("NOLA_CPU_ISA", "pentium")
    with pytest.raises(InvalidInputError, match="NOLA_CPU_ISA"):
        cpu_isa.cpu_isa()


@pytest.mark.parametrize(
    "isa, demo, large, huge",
    [
        ("avx2", [], [], ["fp32"]),
        ("avx512_vnni", [], ["int8", "fp32"], ["int8", "fp32"]),
        ("avx512_bf16", [], ["bf16", "fp32"], ["int8", "bf16", "fp32"]),
        ("amx", [], ["bf16", "fp32"], ["int8", "bf16", "fp32"]),
    ],
)
def test_a_first_measurement_is_made_only_where_it_pays_back(isa, demo, large, huge, monkeypatch):
    """1,000 images (the demo) repay no conversion on any CPU; 3,000 repay the candidates of the
    fp32 IR where bf16 is native and int8 where it is the only fast one; int8's own conversion
    beside bf16 waits for a far larger job."""
    monkeypatch.setenv("NOLA_CPU_ISA", isa)
    precisions = cpu_isa.candidate_precisions(isa)
    order, why = engine_choice.first_measurement(precisions, 1000)
    assert order == demo and "too few to pay for measuring the engines" in why and "expected from about" in why
    assert engine_choice.first_measurement(precisions, 3000)[0] == large
    assert engine_choice.first_measurement(precisions, 10**6)[0] == huge
    # after bf16 measured 3.9x (more than int8's prior), int8 is not worth converting for any job
    assert engine_choice.first_measurement(precisions, 10**6, measured_speedup=3.9)[0] == []
    monkeypatch.setenv("NOLA_ENGINE_MIN_IMAGES", "0")
    assert set(engine_choice.first_measurement(precisions, 1)[0]) == set(precisions)


class _FakeEngine:
    """Stands in for a converted model: PyTorch's outputs (int8: ``int8_noise`` added)."""

    def __init__(self, module, precision, int8_noise):
        self.module, self.precision, self.noise = module, precision, int8_noise
        self.meta = {"conversion_seconds": 1.0}

    def __call__(self, x):
        y = self.module(x)
        return (
            y + self.noise * torch.randn(y.shape, generator=torch.Generator().manual_seed(0))
            if self.precision == "int8"
            else y
        )


MS = {"torch": 10.0, "fp32": 8.0, "bf16": 4.0, "int8": 2.0}  # simulated ms per image


def _simulate(monkeypatch, int8_noise=0.0):
    """Fake conversions and timings (tests never time anything); returns the precisions loaded."""
    loaded = []

    def load(module, identity, input_size, choice, calibration=None, root=None, threads=None, log=print):
        if choice.engine != "openvino":
            return None, choice
        loaded.append(choice.precision)
        return _FakeEngine(module, choice.precision, int8_noise), choice

    def timed(fns, batches):
        with torch.inference_mode():
            return {
                n: (torch.cat([fn(b) for b in batches]).numpy(), MS[getattr(fn, "precision", "torch")] / 1e3)
                for n, fn in fns.items()
            }

    monkeypatch.setattr(engines, "load_engine_model", load)
    monkeypatch.setattr(engine_choice, "_timed", timed)
    return loaded


def _probe(n=24, forwards=10**6, agree=None):
    x = torch.randn(n + 8, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    return engine_choice.Probe(
        agree or engine_choice.embedding_agreement(),
        "embeddings",
        forwards,
        8,
        check=lambda n=None: x[8:][:n],
        calibration=lambda: [x[:8]],
    )


def _small_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 16)).eval()


@pytest.mark.parametrize(
    "isa, candidates, winner, winner_if_int8_disagrees",
    [
        ("generic", ["fp32"], "openvino-fp32", "openvino-fp32"),
        ("avx2", ["fp32"], "openvino-fp32", "openvino-fp32"),
        ("avx512", ["fp32"], "openvino-fp32", "openvino-fp32"),
        ("avx_vnni", ["int8", "fp32"], "openvino-int8", "openvino-fp32"),
        ("avx512_vnni", ["int8", "fp32"], "openvino-int8", "openvino-fp32"),
        ("avx512_bf16", ["int8", "bf16", "fp32"], "openvino-int8", "openvino-bf16"),
        ("amx", ["int8", "bf16", "fp32"], "openvino-int8", "openvino-bf16"),
    ],
)
def test_each_cpu_measures_its_candidates_and_picks_the_fastest_that_agrees(
    isa, candidates, winner, winner_if_int8_disagrees, monkeypatch, tmp_path
):
    monkeypatch.setenv("NOLA_CPU_ISA", isa)
    auto = engines.EngineChoice("auto", "auto")
    for noise, expected, root in ((0.0, winner, tmp_path / "a"), (1.0, winner_if_int8_disagrees, tmp_path / "b")):
        loaded = _simulate(monkeypatch, int8_noise=noise)
        logs = []
        _, choice = engine_choice.select(_small_model(), {"key": "m"}, (3, 8, 8), auto, _probe(), root, logs.append)
        assert loaded[: len(candidates)] == candidates  # measured: exactly what this CPU offers
        assert choice.tag == expected and choice.measured["choice"] == expected
        assert set(choice.measured["candidates"]) == {"torch-fp32", *(f"openvino-{p}" for p in candidates)}
        assert len(logs) == 1 and logs[0].startswith(f"[engine] auto chose {expected}")
        if noise and "int8" in candidates:
            assert "refused: min cosine" in logs[0]
    # only fp32 asked for: int8/bf16 never measured
    loaded = _simulate(monkeypatch)
    _, choice = engine_choice.select(
        _small_model(), {"key": "m"}, (3, 8, 8), engines.EngineChoice("auto", "fp32"), _probe(), tmp_path / "c"
    )
    assert loaded == ["fp32", "fp32"] and choice.tag == "openvino-fp32"  # measured, then loaded


def test_speed_table_and_pay_back_rule(monkeypatch, tmp_path):
    """New weights of a measured architecture: nothing converted when no engine was faster, only
    the faster ones checked otherwise; a small job runs PyTorch and records nothing."""
    monkeypatch.setenv("NOLA_CPU_ISA", "avx512_vnni")
    auto = engines.EngineChoice("auto", "auto")
    loaded = _simulate(monkeypatch)
    runner, choice = engine_choice.select(_small_model(0), {"key": "m"}, (3, 8, 8), auto, _probe(forwards=10), tmp_path)
    assert choice.tag == "torch-fp32" and "too few" in choice.reason and not loaded
    assert not (tmp_path / "choices").exists()
    engine_choice.select(_small_model(0), {"key": "m"}, (3, 8, 8), auto, _probe(), tmp_path)  # measures
    assert loaded == ["int8", "fp32", "int8"] and len(list((tmp_path / "speed").iterdir())) == 1
    loaded.clear()
    before = engine_choice.MEASUREMENTS["count"]
    _, choice = engine_choice.select(_small_model(1), {"key": "m"}, (3, 8, 8), auto, _probe(), tmp_path)
    assert loaded == ["int8", "fp32", "int8"] and choice.tag == "openvino-int8"  # the faster ones only
    assert engine_choice.MEASUREMENTS["count"] == before + 1 and len(list((tmp_path / "choices").iterdir())) == 2
    # a job too small to pay for converting and checking new weights: PyTorch, nothing recorded
    _, choice = engine_choice.select(_small_model(2), {"key": "m"}, (3, 8, 8), auto, _probe(forwards=50), tmp_path)
    assert choice.tag == "torch-fp32" and "would save" in choice.reason
    # PyTorch measured fastest: later weights convert nothing
    MS.update(torch=1.0)
    try:
        loaded = _simulate(monkeypatch)
        _, first = engine_choice.select(_small_model(3), {"key": "n"}, (3, 8, 8), auto, _probe(), tmp_path / "t")
        loaded.clear()
        _, later = engine_choice.select(_small_model(4), {"key": "n"}, (3, 8, 8), auto, _probe(), tmp_path / "t")
    finally:
        MS.update(torch=10.0)
    assert first.tag == later.tag == "torch-fp32" and not loaded
    assert later.measured["decided_by"] == "speed table"


def test_int8_left_out_for_a_mid_size_job_is_measured_by_a_large_one(monkeypatch, tmp_path):
    """With AMX a 3,000-image job converts the fp32 IR only (bf16 repays it, int8's calibration
    does not); the same weights on a 10^6-image job measure again with int8, and the speed table
    then holds every candidate."""
    monkeypatch.setenv("NOLA_CPU_ISA", "amx")
    auto = engines.EngineChoice("auto", "auto")
    loaded = _simulate(monkeypatch)
    logs: list = []
    _, mid = engine_choice.select(
        _small_model(), {"key": "m"}, (3, 8, 8), auto, _probe(forwards=3000), tmp_path, logs.append
    )
    assert "int8" not in loaded and mid.tag == "openvino-bf16"
    assert "int8 not measured: not expected to repay its conversion on 3000 forward passes" in logs[0]
    loaded.clear()
    _, again = engine_choice.select(_small_model(), {"key": "m"}, (3, 8, 8), auto, _probe(forwards=3000), tmp_path)
    assert again.tag == "openvino-bf16" and loaded == ["bf16"]  # reused: nothing measured
    loaded.clear()
    _, large = engine_choice.select(_small_model(), {"key": "m"}, (3, 8, 8), auto, _probe(), tmp_path, logs.append)
    assert "measuring again with int8" in logs[1] and large.tag == "openvino-int8" and loaded[0] == "int8"
    speed = json.loads(next((tmp_path / "speed").iterdir()).read_text())
    assert set(speed["s_per_image"]) == {"torch-fp32", "openvino-fp32", "openvino-bf16", "openvino-int8"}


def test_new_weights_of_an_architecture_timed_without_int8_keep_int8_for_a_large_job(monkeypatch, tmp_path):
    """A re-tuned model (same architecture, new weights) decided from the speed table on a
    mid-size job records int8 as not measured, so a later large job on those weights measures it
    (it recorded nothing, and int8 was never measured for them)."""
    monkeypatch.setenv("NOLA_CPU_ISA", "amx")
    auto = engines.EngineChoice("auto", "auto")
    loaded = _simulate(monkeypatch)
    engine_choice.select(_small_model(0), {"key": "m"}, (3, 8, 8), auto, _probe(forwards=3000), tmp_path)
    _, retuned = engine_choice.select(_small_model(1), {"key": "m"}, (3, 8, 8), auto, _probe(forwards=3000), tmp_path)
    assert "int8" not in loaded and retuned.tag == "openvino-bf16"
    logs: list = []
    _, large = engine_choice.select(_small_model(1), {"key": "m"}, (3, 8, 8), auto, _probe(), tmp_path, logs.append)
    assert any("measuring again with int8" in line for line in logs) and large.tag == "openvino-int8"


def test_a_reused_int8_choice_is_checked_again_on_each_large_job(monkeypatch, tmp_path):
    """int8 was calibrated and checked on an earlier job's images: a later large job checks it on
    its own images and runs the next candidate when they disagree; a small job is not delayed."""
    monkeypatch.setenv("NOLA_CPU_ISA", "avx512_vnni")
    auto = engines.EngineChoice("auto", "auto")

    def choose(probe, logs=None):
        return engine_choice.select(
            _small_model(), {"key": "m"}, (3, 8, 8), auto, probe, tmp_path, ([] if logs is None else logs).append
        )

    _simulate(monkeypatch)
    assert choose(_probe())[1].tag == "openvino-int8"  # measured: int8 agrees on these images
    _, again = choose(_probe())
    assert again.tag == "openvino-int8" and again.measured["spot_check"]["passed"]
    assert again.measured["spot_check"]["images"] == 24  # min(SPOT_CHECK_IMAGES, the 24 check images)
    _simulate(monkeypatch, int8_noise=1.0)  # another job whose images int8 gets wrong
    logs: list = []
    _, other = choose(_probe(), logs)
    assert other.tag == "openvino-fp32" and other.measured["measured_choice"] == "openvino-int8"
    assert other.measured["spot_check"]["passed"] is False and "int8 disagrees" in logs[-1]
    _, small = choose(_probe(forwards=10))
    assert small.tag == "openvino-int8" and "spot_check" not in small.measured


def test_a_failing_measurement_runs_pytorch_with_one_warning(monkeypatch, tmp_path):
    monkeypatch.setenv("NOLA_CPU_ISA", "avx2")
    _simulate(monkeypatch)

    def unreadable(n=None):
        raise OSError("disk gone")

    probe = engine_choice.Probe(engine_choice.embedding_agreement(), "embeddings", 10**6, 8, check=unreadable)
    with pytest.warns(engines.EngineFallbackWarning, match="measuring failed.*disk gone"):
        runner, choice = engine_choice.select(
            _small_model(), {"key": "m"}, (3, 8, 8), engines.EngineChoice("auto", "auto"), probe, tmp_path
        )
    assert runner is None and choice.tag == "torch-fp32" and not (tmp_path / "choices").exists()


def _outlier_model(outlier: float) -> torch.nn.Module:
    """A random conv net whose hidden channel 0 carries a huge constant feeding a 1x1 conv:
    per-tensor int8 of that conv's input leaves every other channel a few steps (SmoothQuant
    only rescales MatMul inputs), while fp32 ignores channel 0 (its weights are zero)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 32, 4, stride=4),
        torch.nn.ReLU(),
        torch.nn.Conv2d(32, 32, 1),
        torch.nn.Flatten(),
        torch.nn.Linear(32 * 64, 16),
    )
    with torch.no_grad():
        net[0].bias[0] = outlier
        net[2].weight[:, 0] = 0
    return net.eval()


def _tensor_probe(x: torch.Tensor, forwards: int = 10**6) -> engine_choice.Probe:
    """Embeddings checked on ``x[64:]``, int8 calibrated on ``x[:64]``, for a large job."""
    return engine_choice.Probe(
        engine_choice.embedding_agreement(),
        "embeddings",
        forwards,
        32,
        check=lambda n=None: x[64:][:n],
        calibration=lambda: [x[:64]],
    )


@pytest.fixture(scope="module")
def outlier_run(tmp_path_factory):
    """The outlier model chosen for once, as on an avx512_vnni CPU (int8 is a candidate)."""
    root = tmp_path_factory.mktemp("engines")
    x = torch.nn.functional.interpolate(
        torch.randn(192, 3, 4, 4, generator=torch.Generator().manual_seed(1)), size=32, mode="bilinear"
    )
    module = _outlier_model(1000.0)
    logs: list = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NOLA_CPU_ISA", "avx512_vnni")
        probe = _tensor_probe(x)
        runner, choice = engine_choice.select(
            module, {"key": "outlier"}, (3, 32, 32), engines.EngineChoice("auto", "auto"), probe, root, logs.append
        )
    return {"root": root, "x": x, "module": module, "choice": choice, "logs": logs, "runner": runner}


@needs_ov
def test_agreement_check_refuses_an_int8_model_ruined_by_an_outlier_channel(outlier_run):
    choice, logs = outlier_run["choice"], outlier_run["logs"]
    int8 = choice.measured["candidates"]["openvino-int8"]
    assert int8["passed"] is False and int8["min_cosine"] < engine_choice.MIN_COSINE["int8"]
    assert choice.tag in ("torch-fp32", "openvino-fp32")  # whichever was faster: both agree
    assert choice.measured["candidates"]["openvino-fp32"]["passed"] is True
    said = [m for m in logs if m.startswith("[engine] auto chose")]
    assert len(said) == 1 and "openvino-int8" in said[0] and "refused: min cosine" in said[0]
    assert choice.measured["images"] == 128


@needs_ov
def test_choice_is_reused_by_a_second_process_and_remade_for_new_weights(outlier_run, tmp_path):
    root, module, x = outlier_run["root"], outlier_run["module"], outlier_run["x"]
    torch.save(module.state_dict(), tmp_path / "w.pt")
    torch.save(x, tmp_path / "x.pt")
    child = f"""
import json, torch
from fiftyone_nola.core import engine_choice, engines
net = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 4, stride=4), torch.nn.ReLU(), torch.nn.Conv2d(32, 32, 1),
                          torch.nn.Flatten(), torch.nn.Linear(32 * 64, 16)).eval()
net.load_state_dict(torch.load({str(tmp_path / "w.pt")!r}))
x = torch.load({str(tmp_path / "x.pt")!r})
probe = engine_choice.Probe(engine_choice.embedding_agreement(), "embeddings", 10**6, 32,
                            check=lambda n=None: x[64:][:n], calibration=lambda: [x[:64]])
logs = []
runner, choice = engine_choice.select(net, {{"key": "outlier"}}, (3, 32, 32), engines.EngineChoice("auto", "auto"),
                                      probe, {str(root)!r}, logs.append)
print(json.dumps({{"tag": choice.tag, "measurements": engine_choice.MEASUREMENTS["count"],
                  "conversions": engines.CONVERSIONS["count"], "logs": logs, "measured": choice.measured}}))
"""
    env = {**os.environ, "NOLA_CPU_ISA": "avx512_vnni", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["tag"] == outlier_run["choice"].tag and got["measurements"] == 0 and got["conversions"] == 0
    assert got["measured"]["candidates"] == outlier_run["choice"].measured["candidates"]
    assert len(got["logs"]) == 1 and got["logs"][0].startswith("[engine] auto: ")  # said once, not re-measured

    changed = copy.deepcopy(module)
    with torch.no_grad():
        changed[4].weight.mul_(1.5)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NOLA_CPU_ISA", "avx512_vnni")  # the choice is keyed by the CPU
        old = engine_choice.choice_file(module, {"key": "outlier"}, (3, 32, 32), "embeddings", ["fp32", "int8"], root)
        new = engine_choice.choice_file(changed, {"key": "outlier"}, (3, 32, 32), "embeddings", ["fp32", "int8"], root)
        assert old.is_file() and new != old and not new.is_file()
        # A job whose gain repays any conversion: at 10^6 forwards, whether it did depended on the
        # tiny net's measured speeds (0.011 vs 0.014 ms), and no choice was written when it did not.
        probe = _tensor_probe(x, forwards=10**9)
        engine_choice.select(
            changed, {"key": "outlier"}, (3, 32, 32), engines.EngineChoice("auto", "auto"), probe, root
        )
    assert new.is_file()  # decided again for the new weights


@pytest.mark.integration
@needs_ov
def test_store_records_how_auto_chose(make_dataset, files, monkeypatch):
    monkeypatch.delenv("NOLA_ENGINE", raising=False)
    monkeypatch.setenv("NOLA_ENGINE_MIN_IMAGES", "0")
    monkeypatch.setenv("NOLA_CPU_ISA", "avx2")
    for made in ("choices", "speed"):  # measured afresh here, whatever other tests measured
        shutil.rmtree(engines.cache_root() / made, ignore_errors=True)
    ds = make_dataset(files[:6])
    cfg = EmbedConfig(batch_size=4, num_workers=0)
    out = compute_embeddings(ds, "clip", tiny_clip_spec(), config=cfg, classes=["airplane", "cat", "ship"])["clip"]
    meta = open_index(ds, tiny_clip_spec()).meta
    auto = meta["engine"]["auto"]
    assert auto["choice"] == f"{meta['engine']['engine']}-{meta['engine']['precision']}"
    assert auto["images"] == 4 and auto["cpu"]["isa"] == "avx2" and auto["decided_by"] == "measurement"
    assert set(auto["candidates"]) == {"torch-fp32", "openvino-fp32"}
    assert auto["candidates"]["openvino-fp32"]["zero_shot_top1_agreement"] == 1.0  # the classes were checked
    assert out["inference"]["engine"] == meta["engine"]["engine"]
