import pytest
import torch

from fiftyone_nola import device as dev
from fiftyone_nola.errors import InvalidInputError


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
