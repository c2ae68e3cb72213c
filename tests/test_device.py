import pytest
import torch

from fiftyone_nola.core import device as dev
from fiftyone_nola.core.errors import InvalidInputError


def test_resolve_device_cpu_here():
    assert dev.resolve_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        assert dev.resolve_device().type in {"cpu", "mps"}
        with pytest.raises(InvalidInputError, match="CUDA is not available"):
            dev.resolve_device("cuda")


def test_amp_policy():
    cpu = torch.device("cpu")
    assert dev.amp_dtype(cpu, "auto") is None  # fp32 on CPU by default
    assert dev.amp_dtype(cpu, "bf16") is torch.bfloat16
    assert dev.amp_dtype(torch.device("cuda"), "fp32") is None
    with pytest.raises(InvalidInputError):
        dev.amp_dtype(cpu, "int3")
    assert dev.grad_scaler(cpu, torch.bfloat16) is None
    assert not dev.pin_memory(cpu) and dev.pin_memory(torch.device("cuda"))


def test_bf16_autocast_on_cpu_runs_matmul_in_bf16():
    cpu = torch.device("cpu")
    a, b = torch.randn(4, 8), torch.randn(8, 3)
    with dev.autocast(cpu, torch.bfloat16):
        out = a @ b
    assert out.dtype == torch.bfloat16
    assert torch.allclose(out.float(), a @ b, atol=0.1, rtol=0.05)
    with dev.autocast(cpu, None):
        assert (a @ b).dtype == torch.float32


def test_hardware_profile_cpu_vs_gpu():
    cpu = dev.hardware_profile(torch.device("cpu"))
    gpu = dev.hardware_profile(torch.device("cuda"))
    assert gpu.tune_epochs == 50 and gpu.tune_batch_size == 512 and gpu.tune_max_samples is None
    assert cpu.tune_epochs < gpu.tune_epochs and cpu.tune_max_samples is not None
    assert "tuning" in cpu.describe()


def test_compile_policy():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not dev.should_compile(cpu, 10**6)  # compile costs more than it saves on a CPU
    assert dev.should_compile(cuda, dev.COMPILE_MIN_ITEMS)
    assert not dev.should_compile(cuda, dev.COMPILE_MIN_ITEMS - 1)  # cannot pay back
    assert dev.should_compile(cpu, 1, "on") and not dev.should_compile(cuda, 10**6, "off")
    with pytest.raises(InvalidInputError, match="compile must be one of"):
        dev.should_compile(cpu, 1, "yes")


@pytest.mark.integration
def test_compiled_embedding_matches_eager(tiny_clip, tmp_path, monkeypatch):
    """compile="on" really routes batches through torch.compile and changes no vector."""
    import numpy as np

    from conftest import cifar_files
    from fiftyone_nola.core.embed import EmbedConfig, embed_filepaths

    files = [p for p, _ in cifar_files(per_class=1)][:6]
    calls = []
    real = torch.compile

    def spy(fn, **kw):
        calls.append(kw)
        return real(fn, **kw)

    monkeypatch.setattr(torch, "compile", spy)
    # The eager backend exercises the compile wrapper without a C++ toolchain build in tests.
    monkeypatch.setenv("NOLA_COMPILE_BACKEND", "eager")
    base = EmbedConfig(batch_size=4, num_workers=0, device="cpu")
    plain, _ = embed_filepaths(tiny_clip, files, base)
    assert calls == []
    compiled, _ = embed_filepaths(tiny_clip, files, EmbedConfig(**{**base.__dict__, "compile": "on"}))
    assert calls and calls[0]["backend"] == "eager"
    np.testing.assert_allclose(compiled, plain, atol=1e-6)


def test_resolve_fills_only_unset_fields_and_keeps_zero():
    from dataclasses import dataclass, field
    from typing import Optional

    from fiftyone_nola.core.config import resolve

    @dataclass
    class Inner:
        epochs: Optional[int] = None

        def hardware_defaults(self, profile):
            return {"epochs": profile.tune_epochs}

    @dataclass
    class Outer:
        batch: Optional[int] = None
        inner: Inner = field(default_factory=Inner)

        def hardware_defaults(self, profile):
            return {"batch": profile.tune_batch_size}

    cpu = torch.device("cpu")
    out = resolve(Outer(), cpu)
    assert (out.batch, out.inner.epochs) == (32, 2)
    kept = resolve(Outer(batch=0, inner=Inner(epochs=0)), cpu)
    assert (kept.batch, kept.inner.epochs) == (0, 0)
    plain = Outer(batch=5, inner=Inner(epochs=7))
    assert resolve(plain, cpu) is plain
