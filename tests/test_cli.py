"""The shell commands: the main job on real images, and one clear message per bad setup state."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO, cifar_files, data_classes
from fiftyone_nola.cli import main

CLASSES = data_classes(["cat", "dog", "ship"])
TINY = [
    "--clip-arch",
    "nola-tiny-clip",
    "--clip-pretrained",
    "",
    "--dino",
    "nola_tiny_vit",
    "--random-init",
    "--workers",
    "0",
]


@pytest.fixture
def image_dir(tmp_path):
    d = tmp_path / "imgs"
    for p, c in cifar_files(per_class=2, classes=CLASSES):
        (d / c).mkdir(parents=True, exist_ok=True)
        shutil.copy(p, d / c / os.path.basename(p))
    return d


@pytest.mark.integration
def test_auto_label_command_runs_end_to_end(image_dir, tmp_path, capsys):
    import fiftyone as fo

    out = tmp_path / "summary.json"
    name = f"cli-test-{os.getpid()}"
    try:
        code = main(
            [
                "auto-label",
                "--images",
                str(image_dir),
                "--classes",
                ",".join(CLASSES),
                "--dataset",
                name,
                "--gt-from-subfolders",
                "ground_truth",
                "--epochs",
                "1",
                "--json",
                str(out),
                *TINY,
            ]
        )
        assert code == 0
        text = capsys.readouterr().out
        assert "RANDOMLY INITIALISED" in text and "== auto-label summary ==" in text
        s = json.loads(out.read_text())
        assert set(s["evaluation"]) == {"nola_zeroshot", "nola_dino", "nola"}
        assert fo.load_dataset(name).count("nola.label") == 6
    finally:
        if name in fo.list_datasets():
            fo.delete_dataset(name)


def test_unknown_dataset_is_one_clear_message(capsys):
    assert main(["auto-label", "--dataset", "no-such-dataset-xyz", "--classes", "a,b", *TINY]) == 2
    err = capsys.readouterr().err
    assert "No dataset named 'no-such-dataset-xyz'" in err and "Traceback" not in err


@pytest.mark.integration
def test_missing_model_file_is_one_clear_message(image_dir, capsys):
    assert (
        main(
            [
                "auto-label",
                "--images",
                str(image_dir),
                "--classes",
                "cat,dog",
                "--clip-pretrained",
                "/no/such/clip.pt",
                "--workers",
                "0",
            ]
        )
        == 2
    )
    assert "/no/such/clip.pt does not exist" in capsys.readouterr().err


@pytest.mark.integration
def test_bad_class_list_is_one_clear_message(image_dir, capsys):
    assert main(["auto-label", "--images", str(image_dir), "--classes", "cat,cat", *TINY]) == 2
    assert "Duplicate class names" in capsys.readouterr().err


@pytest.mark.slow
def test_unreachable_database_is_one_clear_message():
    env = dict(os.environ, FIFTYONE_DATABASE_URI="mongodb://127.0.0.1:9/?serverSelectionTimeoutMS=1500")
    r = subprocess.run(
        [sys.executable, "-m", "fiftyone_nola", "auto-label", "--dataset", "x", "--classes", "a,b", *TINY],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Could not reach the MongoDB at FIFTYONE_DATABASE_URI" in r.stderr
    assert "Traceback" not in r.stderr


def test_engine_flags_land_in_every_inference_config_not_the_environment(monkeypatch):
    """--engine / --engine-precision are config values (embedding, prediction, CDUL crops), so a
    CLI call never changes what other in-process callers run."""
    from fiftyone_nola.cli import _embed_config, _engine, auto_label_config
    from fiftyone_nola.cli_args import build_parser
    from fiftyone_nola.core.models import ClipSpec, DinoSpec
    from fiftyone_nola.pipeline import AutoLabelConfig

    monkeypatch.delenv("NOLA_ENGINE", raising=False)
    base = ["auto-label", "--images", "x", "--classes", "a,b"]
    args = build_parser().parse_args(base + ["--engine", "openvino", "--engine-precision", "int8"])
    cfg = auto_label_config(args, ClipSpec(), DinoSpec())
    assert (cfg.embed.engine, cfg.embed.precision) == ("openvino", "int8")
    assert (cfg.predict.engine, cfg.predict.precision) == ("openvino", "int8")
    plain = auto_label_config(build_parser().parse_args(base), ClipSpec(), DinoSpec())
    assert plain.embed == AutoLabelConfig().embed and plain.predict == AutoLabelConfig().predict
    ml = build_parser().parse_args(["embed", "--images", "x", "--engine", "torch"])
    assert _embed_config(ml).engine == "torch" and _engine(ml)["precision"] is None
    assert "NOLA_ENGINE" not in os.environ
