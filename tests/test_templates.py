"""Template sets for the class description embedding: presets, auto, files, and every entry point."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fiftyone_nola.core import templates as tp
from fiftyone_nola.core.errors import InvalidInputError

CIFAR10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def test_auto_is_the_official_choice_for_the_closest_case():
    # CIFAR10_local's 18 templates for CIFAR-10's classes (any case/spacing), else ImageNet's 7.
    name, t = tp.resolve_templates("auto", [c.upper() for c in CIFAR10])
    assert name == "cifar10" and len(t) == 18 and t[0] == "a photo of a {}."
    name, t = tp.resolve_templates(None, ["cat", "dog"])
    assert name == "imagenet" and set(t) == set(tp.CLIP_TEMPLATES_7)


def test_presets_are_the_official_sets():
    p = tp.presets()
    assert len(p["imagenet80"]) == 80 and p["none"] == () and p["simple"] == ("a photo of a {}.",)
    assert p["cifar100"][0] == "a photo of a {}" and set(p["cifar100"][1:]) == set(tp.CLIP_TEMPLATES)
    assert {
        k: len(v) for k, v in p.items() if k in ("satellite", "textures", "flowers", "pets", "cars", "sun397", "ucf101")
    } == {"satellite": 6, "textures": 8, "flowers": 1, "pets": 2, "cars": 9, "sun397": 2, "ucf101": 48}
    assert all(t.count("{}") == 1 for ts in p.values() for t in ts)


def test_template_files_and_errors(tmp_path):
    j = tmp_path / "t.json"
    j.write_text(json.dumps(["a drawing of a {}.", "a {} seen from above"]))
    assert tp.resolve_templates(str(j)) == (f"file:{j}", ("a drawing of a {}.", "a {} seen from above"))
    txt = tmp_path / "t.txt"
    txt.write_text("# mine\na drawing of a {}.\n\n")
    assert tp.resolve_templates(str(txt))[1] == ("a drawing of a {}.",)
    with pytest.raises(InvalidInputError, match="Unknown template set 'imagenet-80'.*imagenet80"):
        tp.resolve_templates("imagenet-80")
    txt.write_text("a drawing of a cat\n")
    with pytest.raises(InvalidInputError, match=r"exactly one '\{\}'"):
        tp.resolve_templates(str(txt))
    j.write_text("{oops")
    with pytest.raises(InvalidInputError, match="not valid JSON"):
        tp.resolve_templates(str(j))


@pytest.mark.integration
def test_zero_shot_uses_the_chosen_set(cifar_dataset):
    """The stored class weights are the CDE of descriptions + the chosen templates."""
    from fiftyone_nola.core.embed import EmbedConfig
    from fiftyone_nola.core.models import tiny_clip_spec
    from fiftyone_nola.core.text_cache import class_weights_from_texts
    from fiftyone_nola.stages.embeddings import compute_embeddings
    from fiftyone_nola.stages.nola import ZeroShotConfig, load_class_weights, zero_shot

    classes = ["cat", "dog", "ship"]
    compute_embeddings(cifar_dataset, "clip", tiny_clip_spec(), config=EmbedConfig(num_workers=0))
    for templates, field, want in (
        ("auto", "zs_auto", tp.CLIP_TEMPLATES_7),
        ("simple", "zs_simple", ("a photo of a {}.",)),
    ):
        s = zero_shot(cifar_dataset, classes, ZeroShotConfig(clip=tiny_clip_spec(), templates=templates), field)
        assert s["templates"] == ("imagenet" if templates == "auto" else templates)
        W, _ = load_class_weights(cifar_dataset, field, classes)
        ref, _ = class_weights_from_texts(tiny_clip_spec(), {c: [t.format(c) for t in want] for c in classes}, classes)
        np.testing.assert_allclose(W, ref, atol=1e-6)


def test_cli_and_operator_forms_offer_the_presets():
    from fiftyone_nola.cli import auto_label_config, build_parser
    from fiftyone_nola.core.models import ClipSpec, DinoSpec
    from fiftyone_nola.stages.nola import ZeroShotConfig

    base = ["auto-label", "--images", "x", "--classes", "a,b"]
    args = build_parser().parse_args(base + ["--templates", "satellite"])
    assert auto_label_config(args, ClipSpec(), DinoSpec()).zeroshot.templates == "satellite"
    # not given: the flag passes nothing and the one default (the library's "auto") applies
    args = build_parser().parse_args(base)
    assert args.templates is None
    assert auto_label_config(args, ClipSpec(), DinoSpec()).zeroshot.templates == ZeroShotConfig().templates == "auto"
