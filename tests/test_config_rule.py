"""One config rule from the App form to the library: every path passes what the user set and nothing
else (0 included), each default lives in the library's config, and a run recorded before the
configs were nested stays up to date."""

import json
import os
from types import SimpleNamespace

import pytest

from fiftyone_nola.cli import auto_label_config, build_parser
from fiftyone_nola.core.config import as_data, given
from fiftyone_nola.core.dino_labeler import DinoLabelerConfig
from fiftyone_nola.core.embed import EmbedConfig
from fiftyone_nola.core.models import ClipSpec, DinoSpec
from fiftyone_nola.core.prompt_tuning import TuneConfig
from fiftyone_nola.pipeline import AutoLabelConfig
from fiftyone_nola.stages.cdul import MultiLabelConfig
from fiftyone_nola.stages.corrections import CorrectionsConfig
from fiftyone_nola.stages.nola import ZeroShotConfig
from operators import embeddings as op_embed
from operators import labeling as op_label
from operators import multilabel as op_multi
from operators import pipeline as op_pipe
from operators import review as op_review


def _ctx(**params):
    return SimpleNamespace(params=params)


def _cli(*argv):
    args = build_parser().parse_args(["auto-label", "--images", "x", "--classes", "a,b", *argv])
    clip = given(ClipSpec, arch=args.clip_arch, pretrained=args.clip_pretrained, models_dir=args.models_dir)
    return auto_label_config(args, clip, DinoSpec())


def test_cli_passes_only_what_the_user_set():
    assert _cli() == AutoLabelConfig(clip=ClipSpec(), dino=DinoSpec())
    cfg = _cli(
        "--epochs",
        "3",
        "--tune-max-samples",
        "0",
        "--workers",
        "0",
        "--no-tune",
        "--max-descriptions",
        "5",
        "--templates",
        "simple",
        "--no-templates",
    )
    assert cfg.tune == TuneConfig(epochs=3, max_samples=0)  # 0: all samples, not "fit the hardware"
    assert cfg.embed == EmbedConfig(num_workers=0) and cfg.skip_tuning
    assert cfg.zeroshot == ZeroShotConfig(max_descriptions_per_class=5, templates="simple", include_templates=False)


def test_cli_models_dir_is_a_value_not_the_environment(monkeypatch):
    monkeypatch.delenv("NOLA_MODELS_DIR", raising=False)
    cfg = _cli("--models-dir", "/somewhere/models")
    assert cfg.clip.models_dir == "/somewhere/models"
    assert "NOLA_MODELS_DIR" not in os.environ


def test_operator_params_given_or_not():
    """Blank params are the library's defaults; 0 and False are values."""
    assert op_pipe.config(_ctx()) == AutoLabelConfig()
    assert op_label.zeroshot_config(_ctx()) == ZeroShotConfig()
    assert op_label.dino_labeler_config(_ctx()) == DinoLabelerConfig()
    assert op_label.tune_config(_ctx()) == TuneConfig()
    assert op_multi._config(_ctx()) == MultiLabelConfig()
    assert op_embed._config(_ctx()) == EmbedConfig()
    assert op_review.corrections_config(_ctx()) == CorrectionsConfig()

    assert op_label.tune_config(_ctx(max_samples=0)).max_samples == 0
    assert op_embed._config(_ctx(num_workers=0, draft_decode=False)) == EmbedConfig(num_workers=0, draft_decode=False)
    assert op_multi._config(_ctx(grid=0, threshold_t=0.0)).crop.grid == 0  # reported by validation, not replaced
    cfg = op_pipe.config(_ctx(tune=False, epochs=2, use_llm=False, descriptions_file=""))
    assert cfg.skip_tuning and cfg.tune.epochs == 2 and cfg.zeroshot == ZeroShotConfig()
    assert op_review.corrections_config(_ctx(tune=False)).skip_tuning


def test_delegated_params_mean_the_same():
    """A delegated run gets the params as JSON: the same config as the Python call."""
    params = {"epochs": 1, "tune": False, "use_llm": False, "templates": "simple", "device": "cpu", "gt_field": ""}
    assert op_pipe.config(_ctx(**json.loads(json.dumps(params)))) == op_pipe.config(_ctx(**params))
    params = {"max_samples": 0, "batch_size": 4}
    assert op_label.tune_config(_ctx(**json.loads(json.dumps(params)))) == TuneConfig(max_samples=0, batch_size=4)


def test_the_pipeline_config_resolves_in_one_call():
    import torch

    from fiftyone_nola.core.config import resolve
    from fiftyone_nola.core.device import hardware_profile
    from fiftyone_nola.stages.reuse import tune_config

    cpu = torch.device("cpu")
    prof = hardware_profile(cpu)
    full = resolve(AutoLabelConfig(tune=TuneConfig(epochs=3)), cpu)
    assert full.tune.epochs == 3 and full.tune.batch_size == prof.tune_batch_size
    # "all samples" (0) stays 0 for training (resolving again keeps it) and is recorded as the
    # runs before the nested configs recorded it: None
    everything = tune_config(AutoLabelConfig(tune=TuneConfig(max_samples=0)), cpu)
    assert resolve(everything, cpu).max_samples == 0 and everything.sample_cap is None
    assert everything.as_recorded().max_samples is None
    assert tune_config(AutoLabelConfig(), cpu).max_samples == prof.tune_max_samples


def _legacy_runs(config, device):
    """The run configs ``auto_label`` recorded before the stage configs were nested (flat fields
    tune_epochs / tune_batch_size / tune_max_samples, TuneConfig.for_hardware)."""
    from fiftyone_nola.core.device import hardware_profile

    prof = hardware_profile(device)
    zs = config.zeroshot
    zeroshot = ZeroShotConfig(
        clip=config.clip,
        descriptions_file=zs.descriptions_file,
        use_llm=zs.use_llm,
        llm_model=zs.llm_model,
        llm_host=zs.llm_host,
        device=config.device,
        templates=zs.templates,
        include_templates=zs.include_templates,
        max_descriptions_per_class=zs.max_descriptions_per_class,
    )
    dino = {
        "labeler": DinoLabelerConfig(device=config.device),
        "dino": config.dino,
        "zeroshot_field": config.zeroshot_field,
        "trusted_field": None,
    }
    tune = TuneConfig(
        epochs=config.tune.epochs,
        batch_size=config.tune.batch_size,
        max_samples=config.tune.max_samples or None,
        num_workers=prof.num_workers,
        device=str(device),
    )
    return {
        "zeroshot": zeroshot,
        "dino": dino,
        "tune": {"tune": tune, "clip": config.clip, "teacher_field": config.dino_field},
    }


def test_run_configs_recorded_before_the_nesting_are_still_up_to_date(monkeypatch):
    import torch

    from fiftyone_nola.stages import reuse, runs
    from fiftyone_nola.stages.nola import dino_run_config

    cpu = torch.device("cpu")
    cfg = AutoLabelConfig(
        clip=ClipSpec(models_dir="/weights"),
        zeroshot=ZeroShotConfig(descriptions_file="d.json"),
        tune=TuneConfig(epochs=1, batch_size=8, max_samples=0),
        device="cpu",
    )
    old = _legacy_runs(cfg, cpu)
    old["zeroshot"].clip = ClipSpec()  # recorded before --models-dir was a spec field: None
    stored = {k: {"config": as_data(v)} for k, v in old.items()}
    monkeypatch.setattr(runs, "get_run", lambda samples, key: stored[key])
    assert reuse.up_to_date(None, "zeroshot", reuse.zeroshot_config(cfg))
    labeler = DinoLabelerConfig(device=cfg.device)
    assert reuse.up_to_date(None, "dino", dino_run_config(labeler, cfg.dino, cfg.zeroshot_field))
    assert reuse.up_to_date(
        None,
        "tune",
        {"tune": reuse.tune_config(cfg, cpu).as_recorded(), "clip": cfg.clip, "teacher_field": cfg.dino_field},
    )
    # a changed setting is not up to date
    assert not reuse.up_to_date(
        None,
        "tune",
        {
            "tune": reuse.tune_config(
                AutoLabelConfig(tune=TuneConfig(epochs=2, batch_size=8, max_samples=0), device="cpu"), cpu
            ).as_recorded(),
            "clip": cfg.clip,
            "teacher_field": cfg.dino_field,
        },
    )


def test_where_weights_are_looked_up_never_retrains_the_dino_labeler_or_tuning(monkeypatch):
    """The DINO and tuning runs hold their specs nested (recorded as repr strings): a new
    ``--models-dir`` for the same weights keeps them up to date, as it does for zero-shot."""
    import dataclasses

    import torch

    from fiftyone_nola.stages import reuse, runs
    from fiftyone_nola.stages.nola import dino_run_config, tune_run_config

    cpu = torch.device("cpu")
    cfg = AutoLabelConfig(tune=TuneConfig(epochs=1, batch_size=8, max_samples=0), device="cpu")
    moved = dataclasses.replace(
        cfg,
        clip=dataclasses.replace(cfg.clip, models_dir="/new/place"),
        dino=dataclasses.replace(cfg.dino, models_dir="/new/place"),
    )
    labeler = DinoLabelerConfig(device=cfg.device)
    recorded = {
        "dino": dino_run_config(labeler, cfg.dino, cfg.zeroshot_field),
        "tune": tune_run_config(reuse.tune_config(cfg, cpu), cfg.clip, cfg.dino_field),
    }
    stored = {k: {"config": as_data(v)} for k, v in recorded.items()}
    monkeypatch.setattr(runs, "get_run", lambda samples, key: stored[key])
    assert reuse.up_to_date(None, "dino", dino_run_config(labeler, moved.dino, cfg.zeroshot_field))
    assert reuse.up_to_date(None, "tune", tune_run_config(reuse.tune_config(cfg, cpu), moved.clip, cfg.dino_field))
    other = dataclasses.replace(cfg.clip, arch="ViT-B-16")  # other weights: not up to date
    assert not reuse.up_to_date(None, "tune", tune_run_config(reuse.tune_config(cfg, cpu), other, cfg.dino_field))


@pytest.mark.integration
@pytest.mark.parametrize(
    "name,build",
    [
        ("auto_label", op_pipe.config),
        ("zero_shot", op_label.zeroshot_config),
        ("dino_labels", op_label.dino_labeler_config),
        ("tune_prompts", op_label.tune_config),
        ("compute_embeddings", op_embed._config),
        ("multilabel_pseudo_labels", op_multi._config),
        ("retrain_with_corrections", op_review.corrections_config),
    ],
)
def test_each_form_default_is_the_library_default(name, build, make_dataset):
    """The App form's defaults, sent back, give the config of no params at all: the library's."""
    import fiftyone.operators as foo
    from fiftyone.operators.executor import ExecutionContext

    from conftest import cifar_files, data_classes

    pairs = cifar_files(per_class=1, classes=data_classes(["cat", "dog"]))
    ds = make_dataset([p for p, _ in pairs], [c for _, c in pairs])
    plugin = __import__("yaml").safe_load((__import__("conftest").REPO / "fiftyone.yml").read_text())["name"]
    op = foo.get_operator(f"{plugin}/{name}")
    form = op.resolve_input(ExecutionContext(request_params={"dataset_name": ds.name, "params": {}}))
    # gt_field: the form offers the dataset's first label field, a choice of the dataset's, not a default
    defaults = {
        k: p.default
        for k, p in form.type.properties.items()
        if getattr(p, "default", None) is not None and k != "gt_field"
    }
    assert build(_ctx(**defaults)) == build(_ctx())


def test_multilabel_run_config_keeps_its_recorded_shape():
    """The pseudo-label stage records its nested crop/train settings under their old flat names,
    so a dataset labeled before the nesting stays up to date; a changed new setting still counts."""
    from fiftyone_nola.core.cdul import CropConfig, TrainConfig
    from fiftyone_nola.stages.cdul import recorded_config

    cfg = MultiLabelConfig(
        crop=CropConfig(grid=2, batch_size=4, num_workers=0), train=TrainConfig(epochs=2), device="cpu"
    )
    rec = recorded_config(cfg)
    flat = {
        "grid": 2,
        "crop_batch_size": 4,
        "num_workers": 0,
        "train_epochs": 2,
        "label_update_every": None,
        "label_warmup": None,
        "embed": None,
        "device": "cpu",
    }
    assert {k: rec[k] for k in flat} == flat and "crop" not in rec and "train" not in rec
    old_fields = {
        "clip",
        "dino",
        "embed",
        "descriptions_file",
        "allow_template_fallback",
        "use_llm",
        "single_template",
        "grid",
        "threshold_t",
        "aggregation",
        "lam",
        "rule",
        "ratio",
        "max_labels",
        "crop_batch_size",
        "num_workers",
        "train_epochs",
        "label_update_every",
        "label_warmup",
        "device",
        "pseudo_field",
        "pred_field",
        "gt_field",
    }
    assert set(rec) == old_fields
    changed = recorded_config(MultiLabelConfig(crop=CropConfig(batch_size=16, engine="torch")))
    assert changed["crop"] == {"engine": "torch"}
    assert MultiLabelConfig().crop.batch_size == 16  # the stage's own default, as before
