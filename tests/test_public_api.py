"""`fiftyone_nola` is the public API: every stage function and its config, cheap to import."""

import subprocess
import sys

import pytest

import fiftyone_nola as nola


@pytest.mark.parametrize("name", sorted(nola._LAZY))
def test_every_public_name_resolves_to_its_home(name):
    obj = getattr(nola, name)
    assert obj.__module__.startswith(f"fiftyone_nola.{nola._LAZY[name]}")


def test_every_stage_config_is_public():
    for config in (
        "AutoLabelConfig",
        "MultiLabelConfig",
        "EmbedConfig",
        "ZeroShotConfig",
        "DescribeConfig",
        "DinoLabelerConfig",
        "TuneConfig",
        "PredictConfig",
        "CropConfig",
        "TrainConfig",
        "CorrectionsConfig",
        "RayEmbedConfig",
        "AuditConfig",
        "TransductiveConfig",
    ):
        assert config in nola.__all__ and isinstance(getattr(nola, config), type)


def test_importing_the_package_loads_neither_fiftyone_nor_torch():
    code = "import sys, fiftyone_nola; print(sorted(m for m in ('fiftyone', 'torch') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_an_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'zero_shoot'"):
        nola.zero_shoot  # noqa: B018
