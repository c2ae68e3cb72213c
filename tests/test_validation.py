"""Inputs are checked before any work: every mistake is reported at once, in seconds, naming the
input, and nothing is created or written (no dataset, no store, no run record, NOLA_HOME as before).
The same through the CLI, the Python API and the operators (execution and the App form)."""

import json
import logging
import os
import shutil
import time
from pathlib import Path

import pytest
import yaml

from conftest import CIFAR10_CLASSES, REPO, cifar_files, data_classes
from fiftyone_nola.cli import main

PLUGIN = yaml.safe_load((REPO / "fiftyone.yml").read_text())["name"]
CLASS_LIST = data_classes(CIFAR10_CLASSES)  # CIFAR-10 on ../shared
CLASSES = ",".join(CLASS_LIST)
THREE = data_classes(["cat", "dog", "ship"])
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
TINY_OP = {
    "clip_arch": "nola-tiny-clip",
    "clip_pretrained": "",
    "random_init": True,
    "dino_model": "nola_tiny_vit",
    "device": "cpu",
}
LIMIT_S = 10.0


@pytest.fixture(scope="module", autouse=True)
def warm_imports():
    """Process start-up (importing torch, FiftyOne, timm, starting the database) is paid by any
    command; the timings below measure the check itself, from the call to the message."""
    import fiftyone as fo
    import timm  # noqa: F401
    import torch  # noqa: F401

    from fiftyone_nola.stages.fo_io import connect_database

    connect_database()
    fo.list_datasets()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """200 real images, 20 per class, in class subfolders."""
    d = tmp_path_factory.mktemp("imgs200")
    for c in CLASS_LIST:
        (d / c).mkdir()
    for f, c in cifar_files(per_class=20, classes=CLASS_LIST):
        shutil.copy(f, d / c / Path(f).name)
    return d


@pytest.fixture
def files(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"cat": ["a small pet",')
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps({CLASS_LIST[3]: ["a small furry pet"], CLASS_LIST[5]: ["a loyal pet"]}))
    return {"bad": str(bad), "partial": str(partial)}


def _home_state() -> dict:
    """Every file a job wrote under NOLA_HOME. Locks are not outputs: a job takes its dataset's
    lock before its checks (so a second job checks what the first one left), and keeps it."""
    root = Path(os.environ["NOLA_HOME"])
    if not root.exists():
        return {}
    files = [p for p in root.rglob("*") if p.is_file() and not p.name.endswith((".lock", ".lock.holder.json"))]
    return {str(p): p.stat().st_mtime_ns for p in files}


def _db_state(ds=None) -> dict:
    import fiftyone as fo

    out = {"datasets": sorted(fo.list_datasets())}
    if ds is not None:
        ds.reload()
        out.update(
            fields=sorted(ds.get_field_schema()), runs=sorted(ds.list_runs()), n=len(ds), tags=ds.count_sample_tags()
        )
    return out


@pytest.fixture
def no_embedding(monkeypatch):
    """Fail loudly if any image is embedded (the expensive work validation must precede)."""
    import sys

    import fiftyone_nola.core.embed as embed_mod
    import fiftyone_nola.stages.embeddings  # noqa: F401  (import before patching: it binds the name)

    def boom(*a, **k):
        raise AssertionError("an embedding started before the inputs were checked")

    real = embed_mod.iter_embeddings
    for name, mod in list(sys.modules.items()):
        if name.startswith("fiftyone_nola") and getattr(mod, "iter_embeddings", None) is real:
            monkeypatch.setattr(mod, "iter_embeddings", boom)


def _cli(args, capsys, ds=None):
    """Run the CLI in-process; return (exit code, stdout, stderr, seconds), checking nothing changed."""
    db0, home0 = _db_state(ds), _home_state()
    t0 = time.perf_counter()
    code = main(args)
    secs = time.perf_counter() - t0
    out, err = capsys.readouterr()
    assert _db_state(ds) == db0, "the database changed"
    assert _home_state() == home0, "NOLA_HOME changed"
    assert "[embeddings] started" not in out and "[embed:" not in out
    return code, out, err, secs


@pytest.fixture
def dataset(folder, make_dataset):
    """The 200 images as an existing dataset with ground truth."""
    paths = sorted(folder.rglob("*.jpg"))
    return make_dataset([str(p) for p in paths], [p.parent.name for p in paths])


# --------------------------------------------------------------------------- CLI: the mistakes


@pytest.mark.integration
@pytest.mark.parametrize(
    "case", ["malformed_descriptions", "unknown_clip", "one_class", "partial_descriptions", "gt_on_new_folder"]
)
def test_cli_mistake_on_a_new_folder_fails_fast_and_creates_nothing(case, folder, files, capsys, no_embedding):
    name = f"val-{case}"
    args = {
        "malformed_descriptions": (
            ["--classes", CLASSES, "--descriptions", files["bad"]],
            "--descriptions",
            "not valid JSON",
        ),
        "unknown_clip": (
            ["--classes", CLASSES, "--clip-arch", "ViT-B-99"],
            "--clip-arch",
            "unknown CLIP architecture 'ViT-B-99'",
        ),
        "one_class": (["--classes", "cat"], "--classes", "Need at least 2 classes"),
        "partial_descriptions": (
            ["--classes", CLASSES, "--descriptions", files["partial"]],
            "--descriptions",
            "covers 2 of 10 classes",
        ),
        "gt_on_new_folder": (
            ["--classes", CLASSES, "--gt-field", "nonexistent"],
            "--gt-field",
            "'nonexistent' does not exist",
        ),
    }[case]
    extra, flag, text = args
    tiny = [a for a in TINY] if case != "unknown_clip" else TINY[2:]
    code, out, err, secs = _cli(["auto-label", "--images", str(folder), "--dataset", name, *tiny, *extra], capsys)
    assert code == 2
    assert f"{flag}: " in err and text in err, err
    assert "Traceback" not in err
    assert secs < LIMIT_S, secs


@pytest.mark.integration
def test_cli_reports_every_problem_together(folder, files, tmp_path, capsys, no_embedding):
    code, _, err, secs = _cli(
        [
            "auto-label",
            "--images",
            str(folder),
            "--classes",
            "cat,,Cat",
            "--descriptions",
            files["bad"],
            "--clip-arch",
            "ViT-B-99",
            "--device",
            "cuda:7",
            "--epochs",
            "0",
            "--json",
            files["bad"] + "/s.json",
            "--dino",
            "not_a_timm_model",
            "--random-init",
            "--workers",
            "-1",
        ],
        capsys,
    )
    assert code == 2 and secs < LIMIT_S
    for flag in ("--classes", "--descriptions", "--clip-arch", "--device", "--epochs", "--json", "--dino", "--workers"):
        assert f"- {flag}: " in err, (flag, err)
    assert err.count("->") >= 8  # each says what to do


@pytest.mark.integration
def test_cli_unknown_template_set(folder, capsys, no_embedding):
    code, _, err, secs = _cli(
        ["auto-label", "--images", str(folder), "--classes", CLASSES, "--templates", "nonesuch", *TINY], capsys
    )
    assert code == 2 and secs < LIMIT_S
    assert "--templates: Unknown template set 'nonesuch'" in err


@pytest.mark.integration
def test_cli_gt_field_missing_on_existing_dataset(dataset, capsys, no_embedding):
    code, _, err, secs = _cli(
        ["auto-label", "--dataset", dataset.name, "--classes", CLASSES, "--gt-field", "nonexistent", *TINY],
        capsys,
        ds=dataset,
    )
    assert code == 2 and secs < LIMIT_S
    assert "--gt-field: field 'nonexistent' does not exist" in err and "ground_truth" in err


@pytest.mark.integration
def test_cli_partial_descriptions_run_when_fallback_allowed(folder, files, capsys, no_embedding):
    """With --allow-template-fallback the lacking classes are a warning, and --check passes."""
    code, out, err, _ = _cli(
        [
            "auto-label",
            "--images",
            str(folder),
            "--dataset",
            "val-fallback",
            "--classes",
            CLASSES,
            "--descriptions",
            files["partial"],
            "--allow-template-fallback",
            "--check",
            *TINY,
        ],
        capsys,
    )
    assert code == 0, err
    assert "covers 2 of 10 classes" in out and "as allowed" in out


@pytest.mark.integration
def test_cli_missing_weights_is_an_error_unless_random_init_asked(folder, capsys, no_embedding, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("NOLA_MODELS_DIR", str(tmp_path / "models"))
    code, _, err, secs = _cli(
        [
            "auto-label",
            "--images",
            str(folder),
            "--classes",
            CLASSES,
            "--dino",
            "vit_small_patch16_224.dino",
            "--workers",
            "0",
        ],
        capsys,
    )
    assert code == 2 and secs < LIMIT_S
    assert "--dino: " in err and "--fallback-random-init" in err


@pytest.mark.integration
def test_check_prints_the_plan_and_writes_nothing(folder, capsys, no_embedding):
    code, out, err, secs = _cli(
        [
            "auto-label",
            "--images",
            str(folder),
            "--dataset",
            "val-check",
            "--classes",
            CLASSES,
            "--gt-from-subfolders",
            "ground_truth",
            *TINY,
            "--check",
        ],
        capsys,
    )
    assert code == 0, err
    assert "plan: 200 samples (200 new), 10 classes" in out
    for stage in ("embeddings:clip", "embeddings:dino", "zeroshot", "dino_labeler", "prompt_tuning", "predict"):
        assert stage in out
    assert "estimated time" in out and "disk for the stores" in out and "inputs OK" in out
    assert secs < LIMIT_S


@pytest.mark.integration
def test_gt_labels_outside_the_class_list_are_named(folder, capsys, no_embedding):
    code, out, err, _ = _cli(
        [
            "auto-label",
            "--images",
            str(folder),
            "--dataset",
            "val-outside",
            "--classes",
            ",".join(THREE),
            "--gt-from-subfolders",
            "ground_truth",
            *TINY,
            "--check",
        ],
        capsys,
    )
    assert code == 0, err
    assert "7 label(s) in 'ground_truth' are outside the class list" in out and repr(CLASS_LIST[-1]) in out
    code, _, err, _ = _cli(
        [
            "auto-label",
            "--images",
            str(folder),
            "--classes",
            "okapi,narwhal",
            "--gt-from-subfolders",
            "ground_truth",
            *TINY,
        ],
        capsys,
    )
    assert code == 2 and "none of the labels in 'ground_truth' is in the class list" in err


@pytest.mark.integration
def test_embed_and_multilabel_commands_check_first(folder, files, capsys, no_embedding):
    code, _, err, _ = _cli(["embed", "--images", str(folder), "--index-type", "annoy", *TINY], capsys)
    assert code == 2 and "--index-type: unknown index type 'annoy'" in err
    code, _, err, _ = _cli(
        [
            "auto-label-multilabel",
            "--images",
            str(folder),
            "--classes",
            "cat,dog",
            "--descriptions",
            files["bad"],
            "--grid",
            "0",
            *TINY,
        ],
        capsys,
    )
    assert code == 2 and "--descriptions: " in err and "--grid: " in err


# --------------------------------------------------------------------------- Python API


@pytest.mark.integration
def test_python_api_raises_one_validation_error_and_writes_nothing(dataset, files, no_embedding, caplog):
    from fiftyone_nola import ValidationError, auto_label, validate
    from fiftyone_nola.core.dino_labeler import DinoLabelerConfig
    from fiftyone_nola.core.models import tiny_clip_spec, tiny_dino_spec
    from fiftyone_nola.pipeline import AutoLabelConfig
    from fiftyone_nola.stages.nola import ZeroShotConfig

    cfg = AutoLabelConfig(
        clip=tiny_clip_spec(),
        dino=tiny_dino_spec(),
        zeroshot=ZeroShotConfig(descriptions_file=files["partial"]),
        gt_field="ground_truth",
        tuned_field="ground_truth",
        dino_labeler=DinoLabelerConfig(epochs=0),
    )
    db0, home0 = _db_state(dataset), _home_state()
    caplog.set_level(logging.INFO, logger="fiftyone_nola")
    with pytest.raises(ValidationError) as e:
        auto_label(dataset, CLASSES, cfg)
    assert set(e.value.inputs) == {"descriptions_file", "gt_field", "dino_epochs"}
    assert "also an output field" in str(e.value)
    assert not any("started" in m for m in caplog.messages)
    assert _db_state(dataset) == db0 and _home_state() == home0

    ok = AutoLabelConfig(clip=tiny_clip_spec(), dino=tiny_dino_spec(), gt_field="ground_truth")
    report = validate(dataset, CLASSES, ok)
    assert report.ok, report.errors
    assert [s["action"] for s in report.plan["stages"]][:2] == ["run", "run"]
    assert report.plan["disk_bytes"] > 0 and report.plan["seconds"] > 0
    assert _db_state(dataset) == db0 and _home_state() == home0


@pytest.mark.integration
def test_multilabel_schedule_settings_are_checked(dataset, no_embedding):
    from fiftyone_nola.core.cdul import CropConfig, TrainConfig
    from fiftyone_nola.core.models import tiny_clip_spec
    from fiftyone_nola.stages.cdul import MultiLabelConfig
    from fiftyone_nola.stages.validation import Target, check_multilabel

    bad = MultiLabelConfig(
        clip=tiny_clip_spec(), train=TrainConfig(update_every=-1, warmup=-2), crop=CropConfig(grid=0)
    )
    r = check_multilabel(Target(samples=dataset), CLASSES, bad)
    assert {p.input for p in r.errors} >= {"label_update_every", "label_warmup", "grid"}
    ok = MultiLabelConfig(clip=tiny_clip_spec(), train=TrainConfig(update_every=0, warmup=0))
    assert check_multilabel(Target(samples=dataset), CLASSES, ok).ok


@pytest.mark.integration
def test_empty_view_is_reported(dataset, no_embedding):
    from fiftyone_nola import validate
    from fiftyone_nola.core.models import tiny_clip_spec, tiny_dino_spec
    from fiftyone_nola.pipeline import AutoLabelConfig

    r = validate(
        dataset.match_tags("nothing-has-this"), CLASSES, AutoLabelConfig(clip=tiny_clip_spec(), dino=tiny_dino_spec())
    )
    assert not r.ok and "holds no samples" in r.errors[0].message


# --------------------------------------------------------------------------- operators


def _run_op(name, dataset, **params):
    """``foo.execute_operator`` refuses (nothing runs); the validation errors by input name."""
    import asyncio

    import fiftyone.operators as foo
    from fiftyone.operators.executor import ExecutionError, ExecutionResult, _parse_ctx, prepare_operator_executor

    ctx = {"dataset": dataset, "params": params}
    with pytest.raises(ExecutionError, match="Validation error"):
        foo.execute_operator(f"{PLUGIN}/{name}", ctx=ctx)
    # FiftyOne's own preparation step, which execute_operator and the App run first, holds them all.
    res = asyncio.run(prepare_operator_executor(f"{PLUGIN}/{name}", _parse_ctx(ctx=ctx)))
    assert isinstance(res, ExecutionResult) and res.error == "Validation error"
    return res


def _errors(res) -> dict:
    return {e.path.lstrip("."): e.reason for e in res.validation_ctx.errors}


@pytest.mark.integration
def test_operators_refuse_bad_inputs_before_running(dataset, files, no_embedding):
    db0, home0 = _db_state(dataset), _home_state()
    t0 = time.perf_counter()
    errs = _errors(
        _run_op(
            "auto_label",
            dataset,
            classes="cat",
            descriptions_file=files["bad"],
            gt_field="nonexistent",
            **{**TINY_OP, "clip_arch": "ViT-B-99"},
        )
    )
    assert time.perf_counter() - t0 < LIMIT_S
    assert "Need at least 2 classes" in errs["classes"]
    assert "not valid JSON" in errs["descriptions_file"]
    assert "unknown CLIP architecture" in errs["clip_arch"]
    assert "gt_field" in errs

    errs = _errors(_run_op("zero_shot", dataset, classes=CLASSES, descriptions_file=files["partial"], **TINY_OP))
    assert "covers 2 of 10 classes" in errs["descriptions_file"]
    errs = _errors(_run_op("compute_embeddings", dataset, family="both", batch_size=0, **TINY_OP))
    assert "batch size must be >= 1" in errs["batch_size"]
    errs = _errors(_run_op("dino_labels", dataset, **TINY_OP))
    assert "zero-shot stage has not been run" in errs["zeroshot_field"]
    errs = _errors(_run_op("export_accepted", dataset, label_field="nola", export_dir=files["bad"] + "/out"))
    assert "export_dir" in errs and "label_field" in errs
    errs = _errors(_run_op("multilabel_pseudo_labels", dataset, classes="cat, dog", grid=0, **TINY_OP))
    assert "grid" in errs
    assert _db_state(dataset) == db0 and _home_state() == home0


@pytest.mark.integration
def test_form_shows_the_problem_next_to_its_input(dataset, files):
    import fiftyone.operators as foo
    from fiftyone.operators.executor import ExecutionContext

    op = foo.get_operator(f"{PLUGIN}/auto_label")
    params = {"classes": "cat, cat", "descriptions_file": files["bad"], **TINY_OP}
    form = op.resolve_input(ExecutionContext(request_params={"dataset_name": dataset.name, "params": params}))
    props = form.type.properties
    assert props["classes"].invalid and "Duplicate class names" in props["classes"].error_message
    assert props["descriptions_file"].invalid and "not valid JSON" in props["descriptions_file"].error_message
    assert not props["clip_arch"].invalid

    good = {"classes": CLASSES, **TINY_OP}
    form = op.resolve_input(ExecutionContext(request_params={"dataset_name": dataset.name, "params": good}))
    assert not any(p.invalid for p in form.type.properties.values())


@pytest.mark.integration
def test_tune_command_checks_its_dataset_first(dataset, capsys):
    code, _, err, secs = _cli(
        ["tune", "--dataset", dataset.name, "--epochs", "0", *TINY[:4], "--random-init"], capsys, ds=dataset
    )
    assert code == 2 and secs < LIMIT_S
    assert "--dataset: the zero-shot stage has not been run" in err and "--epochs: " in err


@pytest.mark.integration
@pytest.mark.slow
def test_shell_exit_code_is_2_with_the_message(folder, files):
    """The real command line: exit status 2, the input named on stderr, no traceback."""
    import subprocess
    import sys

    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "fiftyone_nola",
            "auto-label",
            "--images",
            str(folder),
            "--classes",
            CLASSES,
            "--descriptions",
            files["bad"],
            *TINY,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2, r.stderr[-2000:]
    assert "--descriptions: " in r.stderr and "not valid JSON" in r.stderr and "Traceback" not in r.stderr
    assert "[embeddings] started" not in r.stdout


def test_engine_and_precision_are_checked_with_the_other_embedding_settings():
    from fiftyone_nola.core.embed import EmbedConfig
    from fiftyone_nola.stages.validation.jobs import check_embed_config

    assert check_embed_config(EmbedConfig(engine="openvino", precision="int8"), check_device_too=False) == []
    bad = check_embed_config(EmbedConfig(engine="onnx"), check_device_too=False)
    assert [(p.input, "use one of auto, torch, openvino" in p.render()) for p in bad] == [("engine", True)]
    bad = check_embed_config(EmbedConfig(engine="torch", precision="int8"), check_device_too=False)
    assert [p.input for p in bad] == ["precision"] and "int8" in bad[0].render()


def test_engine_form_fields_default_to_the_config_and_pass_only_what_was_set():
    from types import SimpleNamespace

    from fiftyone_nola.core.embed import EmbedConfig
    from operators.embeddings import _config

    assert _config(SimpleNamespace(params={})) == EmbedConfig()
    cfg = _config(SimpleNamespace(params={"engine": "openvino", "precision": "int8"}))
    assert (cfg.engine, cfg.precision) == ("openvino", "int8")


@pytest.mark.integration
def test_value_bounds_are_declared_once_and_every_door_applies_them(dataset, no_embedding, capsys):
    """Epochs were <= 10,000 in the validation pass, <= 100,000 in the CLI's `tune` and the forms:
    the bounds live on the config fields now, and the CLI, the forms and the validation read them."""
    from fiftyone_nola.cli import main
    from fiftyone_nola.core.config import bounds
    from fiftyone_nola.core.models import tiny_clip_spec, tiny_dino_spec
    from fiftyone_nola.core.prompt_tuning import TuneConfig
    from fiftyone_nola.pipeline import AutoLabelConfig
    from fiftyone_nola.stages.validation import Target, check_auto_label

    too_many = bounds(TuneConfig, "epochs").hi + 1
    cfg = AutoLabelConfig(clip=tiny_clip_spec(), dino=tiny_dino_spec(), tune=TuneConfig(epochs=too_many))
    assert "tune_epochs" in {p.input for p in check_auto_label(Target(samples=dataset), CLASSES, cfg).errors}
    code = main(["tune", "--dataset", dataset.name, "--epochs", str(too_many), "--check", "--device", "cpu"])
    assert code == 2 and "tune_epochs" in capsys.readouterr().err
    errs = _errors(_run_op("dino_labels", dataset, epochs=0, **TINY_OP))
    assert "epochs" in errs
