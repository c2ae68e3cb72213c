"""Review helpers: flagging, calibration, status tags, corrections kept apart, export rules."""

import numpy as np
import pytest

from fiftyone_nola.core.errors import InvalidInputError
from fiftyone_nola.stages import review
from fiftyone_nola.stages.export import export_accepted


@pytest.fixture
def labelled(make_dataset):
    import fiftyone as fo

    from conftest import cifar_files

    pairs = cifar_files(per_class=1, classes=["cat", "dog", "ship", "truck"])
    ds = make_dataset([p for p, _ in pairs] * 2, [c for _, c in pairs] * 2)
    confs = [0.9, 0.2, 0.6, 0.95, 0.4, 0.8, 0.1, 0.7]
    preds = ["cat", "cat", "ship", "truck", "dog", "dog", "ship", "truck"]
    ds.set_values("nola", [fo.Classification(label=p, confidence=c) for p, c in zip(preds, confs)])
    return ds


def test_reliability_curve_hand_values():
    conf = np.array([0.05, 0.15, 0.95, 0.92, np.nan])
    correct = np.array([0, 1, 1, 0, 1])
    c = review.reliability_curve(conf, correct, bins=10)
    assert c["count"][0] == 1 and c["count"][1] == 1 and c["count"][9] == 2
    assert c["accuracy"][9] == 0.5 and np.isclose(c["mean_confidence"][9], 0.935)
    expected = (1 * 0.05 + 1 * abs(0.15 - 1) + 2 * abs(0.935 - 0.5)) / 4
    assert np.isclose(c["ece"], expected)


@pytest.mark.integration
def test_flag_threshold_and_bottom_k(labelled):
    s = review.flag_for_review(labelled, "nola", threshold=0.5)
    assert s["flagged"] == 3  # 0.2, 0.4, 0.1
    s = review.flag_for_review(labelled, "nola", bottom_k_per_class=1)
    flagged = set(labelled.match_tags(review.REVIEW_TAG).values("nola.confidence"))
    assert flagged == {0.2, 0.1, 0.4, 0.7} and s["flagged"] == 4
    with pytest.raises(InvalidInputError):
        review.flag_for_review(labelled, "nola")
    with pytest.raises(InvalidInputError, match="does not exist"):
        review.flag_for_review(labelled, "nope", threshold=0.5)


@pytest.mark.integration
def test_class_table_and_views(labelled):
    table = {r["class"]: r for r in review.class_table(labelled, "nola", "ground_truth")}
    assert table["cat"]["count"] == 2 and np.isclose(table["cat"]["mean_confidence"], 0.55)
    assert table["cat"]["accuracy"] == 0.5
    views = review.save_review_views(labelled, "nola", threshold=0.5, compare_fields=("nola", "ground_truth"))
    assert len(labelled.load_saved_view(review.VIEW_LOW_CONFIDENCE)) == 3
    assert len(labelled.load_saved_view(review.VIEW_DISAGREE)) == 2  # samples 1 and 4
    first = labelled.load_saved_view(review.VIEW_LEAST_CONFIDENT).first()
    assert first.nola.label == "cat" and first.nola.confidence == 0.2
    assert len(views) == 3


@pytest.mark.integration
def test_corrections_never_touch_model_field_and_win_at_export(labelled, tmp_path):
    low = labelled.match({"nola.confidence": {"$lt": 0.3}})
    review.correct_label(low, "dog", classes=["cat", "dog", "ship", "truck"])
    with pytest.raises(InvalidInputError, match="not one of"):
        review.correct_label(low, "unicorn", classes=["cat", "dog"])
    assert sorted(labelled.values("nola.label")).count("cat") == 2  # model labels unchanged
    review.set_status(labelled.match({"nola.confidence": 0.4}), "rejected")
    rep = export_accepted(labelled, str(tmp_path / "out"), "nola", min_confidence=0.65)
    # accepted: the 2 corrected; above 0.65 and not rejected: 0.9, 0.95, 0.8, 0.7
    assert rep["exported"] == 6 and rep["left_out"]["rejected"] == 1
    assert rep["left_out"]["below confidence"] == 1  # 0.6
    assert len(list((tmp_path / "out" / "dog").glob("*.jpg"))) == 3  # 2 corrections + 1 prediction
    with pytest.raises(InvalidInputError, match="not empty"):
        export_accepted(labelled, str(tmp_path / "out"), "nola", min_confidence=0.5)
    assert not labelled.has_sample_field("nola_export_label")  # the temporary field is gone


@pytest.mark.integration
def test_export_refuses_nothing_and_bad_format(labelled, tmp_path):
    with pytest.raises(InvalidInputError, match="Nothing to export"):
        export_accepted(labelled, str(tmp_path / "a"), "nola")
    with pytest.raises(InvalidInputError, match="format"):
        export_accepted(labelled, str(tmp_path / "b"), "nola", format="xml")


@pytest.mark.integration
def test_export_never_writes_outside_the_directory(labelled, tmp_path):
    from fiftyone_nola.stages.export import safe_folder_name

    assert safe_folder_name("../evil") == ".._evil" and safe_folder_name("..") == "_.._"
    review.correct_label(labelled.limit(2), "../../escape")
    out = tmp_path / "deep" / "out"
    rep = export_accepted(labelled, str(out), "nola")
    assert rep["exported"] == 2 and rep["renamed_labels"] == {"../../escape": ".._.._escape"}
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert written and all(out in p.parents for p in written)
