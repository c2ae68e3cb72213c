"""CDUL multi-label stage: crops, aggregation, decision rules, classifier, evaluation."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image

from conftest import COCO_DIR
from fiftyone_nola.core import cdul as ml
from fiftyone_nola.core.arrays import l2_normalize, softmax
from fiftyone_nola.core.errors import IndexMismatchError, InvalidInputError, ModelNotFoundError

# ------------------------------------------------------------------------------------------
# grid


def test_grid_boxes_tile_without_overlap():
    boxes = ml.grid_boxes(100, 50, grid=3)
    assert len(boxes) == 9
    assert boxes[0] == (0, 0, 33, 16) and boxes[-1] == (66, 32, 99, 48)
    cover = np.zeros((50, 100), dtype=int)
    for left, top, right, bottom in boxes:
        assert (right - left, bottom - top) == (33, 16)
        cover[top:bottom, left:right] += 1
    assert cover.max() == 1  # non-overlapping
    assert cover.sum() == 9 * 33 * 16


def test_grid_boxes_smaller_than_grid():
    assert ml.grid_boxes(2, 2, 3) == [(0, 0, 1, 1), (1, 0, 2, 1), (0, 1, 1, 2), (1, 1, 2, 2)]
    assert ml.grid_boxes(1, 1, 3) == [(0, 0, 1, 1)]
    assert len(ml.grid_boxes(2, 10, 3)) == 6  # 2 columns × 3 rows
    assert ml.grid_boxes(7, 5, 1) == [(0, 0, 7, 5)]
    with pytest.raises(InvalidInputError):
        ml.grid_boxes(0, 5)
    with pytest.raises(InvalidInputError):
        ml.grid_boxes(5, 5, grid=0)


# ------------------------------------------------------------------------------------------
# global scores and aggregation, pinned to hand-computed values


def test_global_scores_hand_values():
    w = np.array([[1, 0], [0, 1]], dtype=np.float32)
    emb = np.array([[2, 0], [0, 0], [np.nan, 1], [3, 3]], dtype=np.float32)
    s = ml.global_scores(emb, w, logit_scale=1.0)
    e = math.e
    np.testing.assert_allclose(s[0], [e / (e + 1), 1 / (e + 1)], rtol=1e-6)
    np.testing.assert_allclose(s[1], [0.5, 0.5])  # zero embedding: uniform, not NaN
    assert np.isnan(s[2]).all()
    np.testing.assert_allclose(s[3], [0.5, 0.5], rtol=1e-6)
    with pytest.raises(InvalidInputError):
        ml.global_scores(emb, np.ones((2, 3), np.float32))


G1 = np.array([[0.6, 0.3, 0.1]], dtype=np.float32)
L1 = np.array([[[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.5, 0.45, 0.05]]], dtype=np.float32)


@pytest.mark.parametrize(
    "t, expected",
    [
        (0.0, [0.7, 0.5, 0.1]),  # plain max: alpha = [.8, .7, .1]
        (0.75, [0.7, 0.2, 0.075]),  # only class 0 reaches t; others fall back to beta
        (0.9, [0.4, 0.2, 0.075]),  # nothing reaches t: beta = [.2, .1, .05]
    ],
)
def test_aggregate_avg_hand_values(t, expected):
    np.testing.assert_allclose(ml.aggregate_scores(G1, L1, t=t), [expected], atol=1e-6)


def test_local_only_and_lambda_hand_values():
    np.testing.assert_allclose(ml.local_only(L1, t=0.0), [[0.8, 0.7, 0.1]], atol=1e-6)
    np.testing.assert_allclose(ml.local_only(L1, t=0.75), [[0.8, 0.1, 0.05]], atol=1e-6)
    # |g - l| = [.2, .4, 0]
    y = ml.aggregate_scores(G1, L1, mode="lambda", lam=0.25)
    np.testing.assert_allclose(y, [[0.75, 0.6, 0.1]], atol=1e-6)
    y = ml.aggregate_scores(G1, L1, mode="lambda", lam=0.5)
    np.testing.assert_allclose(y, [[0.8, 0.7, 0.1]], atol=1e-6)  # = max(g, l)
    with pytest.raises(InvalidInputError):
        ml.aggregate_scores(G1, L1, mode="lambda", lam=0.8)
    with pytest.raises(InvalidInputError):
        ml.aggregate_scores(G1, L1, mode="median")


def test_aggregate_ignores_nan_crops_and_handles_zeros():
    nan_crop = np.full((1, 1, 3), np.nan, dtype=np.float32)
    with_missing = np.concatenate([L1, nan_crop, nan_crop], axis=1)
    np.testing.assert_allclose(ml.aggregate_scores(G1, with_missing, t=0.75), ml.aggregate_scores(G1, L1, t=0.75))
    # No valid crop at all: the global score alone; no global score: the local one alone.
    np.testing.assert_allclose(ml.aggregate_scores(G1, np.full((1, 9, 3), np.nan)), G1)
    np.testing.assert_allclose(ml.aggregate_scores(np.full((1, 3), np.nan), L1), [[0.8, 0.7, 0.1]], atol=1e-6)
    both_missing = ml.aggregate_scores(np.full((1, 3), np.nan), np.full((1, 9, 3), np.nan))
    assert np.isnan(both_missing).all()
    zeros = ml.aggregate_scores(np.zeros((2, 4)), np.zeros((2, 9, 4)), t=0.2)
    assert zeros.shape == (2, 4) and np.all(zeros == 0)
    with pytest.raises(InvalidInputError):
        ml.aggregate_scores(G1, np.zeros((1, 9, 4)))


def test_small_object_recovered_by_local_crops():
    """CDUL's claim in miniature: a class visible in 1 of 9 crops, weak globally."""
    rng = np.random.default_rng(0)
    n, c, g = 400, 6, 9
    main = rng.integers(1, c, n)
    small = rng.random(n) < 0.5  # class 0: a small object, present in half the images
    glog = rng.normal(0, 1, (n, c))
    glog[np.arange(n), main] += 4.0
    glog[:, 0] += 0.5 * small  # weak global evidence
    llog = rng.normal(0, 1, (n, g, c))
    llog[np.arange(n), :, main] += 4.0
    crop = rng.integers(0, g, n)
    llog[np.arange(n)[small], crop[small], 0] += 8.0  # strong, in a single crop
    glob, loc = softmax(glog), softmax(llog)
    truth = np.zeros((n, c), dtype=bool)
    truth[:, 0] = small
    truth[np.arange(n), main] = True

    ap_global = ml.average_precision_per_class(truth, glob)[0]
    ap_agg = ml.average_precision_per_class(truth, ml.aggregate_scores(glob, loc))[0]
    assert ap_global < 0.8
    assert ap_agg > 0.95 and ap_agg > ap_global + 0.15
    assert ml.mean_average_precision(truth, ml.aggregate_scores(glob, loc)) > ml.mean_average_precision(truth, glob)


# ------------------------------------------------------------------------------------------
# decision rules


S = np.array([[0.8, 0.6, 0.45, 0.0], [0.2, 0.2, 0.2, 0.2], [0.0, 0.0, 0.0, 0.0], [0.9, 0.05, 0.4, np.nan]])


@pytest.mark.parametrize(
    "rule, kwargs, expected",
    [
        ("relative", {}, [[1, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0], [1, 0, 0, 0]]),
        ("relative", {"max_labels": 2}, [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0]]),
        # round(1.85) = 2, round(0.8) = 1, round(1.35) = 1 (NaN counts as 0)
        ("expected_count", {}, [[1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0]]),
        # row 1 passes nothing: its best class is kept anyway (min_labels=1)
        ("threshold", {"threshold": 0.5}, [[1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0]]),
        ("threshold", {"threshold": 0.5, "min_labels": 0}, [[1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0]]),
        ("topk", {"k": 2}, [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [1, 0, 1, 0]]),
        ("topk", {"k": 4}, [[1, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0], [1, 1, 1, 0]]),
    ],
)
def test_decide_labels_hand_arrays(rule, kwargs, expected):
    out = ml.decide_labels(S, rule, **kwargs)
    assert out.dtype == bool
    np.testing.assert_array_equal(out, np.array(expected, dtype=bool))


def test_decide_labels_default_is_relative_and_validates():
    np.testing.assert_array_equal(ml.decide_labels(S), ml.decide_labels(S, "relative", ratio=0.5))
    # Scale-free: multiplying the scores does not change the default decision.
    np.testing.assert_array_equal(ml.decide_labels(S * 0.01), ml.decide_labels(S))
    with pytest.raises(InvalidInputError):
        ml.decide_labels(S, "vote")
    with pytest.raises(InvalidInputError):
        ml.decide_labels(S, ratio=1.5)
    assert ml.decide_labels(np.zeros((0, 3))).shape == (0, 3)


# ------------------------------------------------------------------------------------------
# label update


def test_label_update_hand_values():
    y = np.array([0.5, 0.9, 0.2, 0.1])
    grad = np.array([1.0, -2.0, 0.3, 0.0])
    # psi(.5) = 0.398942; sigmoid(0 - 1 * 0.398942) = 0.401566
    np.testing.assert_allclose(ml.label_update(y[:1], grad[:1], 1.0), [0.4015665], atol=1e-6)
    # psi(.9) = 0.368270; sigmoid(ln 9 + 0.5 * 0.368270 * 2) = 0.928608
    np.testing.assert_allclose(ml.label_update(y[1:2], grad[1:2], 0.5), [0.9286076], atol=1e-6)
    # psi(.2) = 0.381388; sigmoid(ln .25 - 2 * 0.381388 * 0.3) = 0.165878
    np.testing.assert_allclose(ml.label_update(y[2:3], grad[2:3], 2.0), [0.1658780], atol=1e-6)
    np.testing.assert_allclose(ml.label_update(y[3:], grad[3:], 5.0), [0.1], atol=1e-6)
    np.testing.assert_allclose(ml.psi(np.array([0.5, 0.0])), [0.3989423, 0.3520653], atol=1e-6)


def test_label_update_moves_uncertain_labels_most():
    y = np.array([0.5, 0.95, 0.05])
    new = ml.label_update(y, np.array([1.0, 1.0, -1.0]), 0.5)
    change = np.abs(new - y)
    assert change[0] > change[1] and change[0] > change[2]


# ------------------------------------------------------------------------------------------
# evaluation


def test_average_precision_hand_case_and_no_positives():
    y = np.array([[1, 0, 0], [0, 1, 0], [1, 0, 0], [0, 0, 0]], dtype=bool)
    s = np.tile(np.array([[0.9], [0.8], [0.7], [0.1]]), (1, 3))
    ap = ml.average_precision_per_class(y, s)
    # class 0: hits at ranks 1 and 3 -> (1 + 2/3) / 2; class 1: hit at rank 2 -> 1/2
    np.testing.assert_allclose(ap[:2], [5 / 6, 0.5])
    assert np.isnan(ap[2])
    m, n = ml.mean_average_precision(y, s, return_count=True)
    assert n == 2 and m == pytest.approx((5 / 6 + 0.5) / 2)
    assert ml.mean_average_precision(y, s) == pytest.approx(m)
    # NaN scores leave that sample out of the class's AP: here the miss at rank 2.
    s2 = s.copy()
    s2[1, 0] = np.nan
    assert ml.average_precision_per_class(y, s2)[0] == pytest.approx(1.0)
    assert math.isnan(ml.mean_average_precision(np.zeros((3, 2), bool), np.ones((3, 2))))


def test_precision_recall_hand_case():
    y = np.array([[1, 0, 0], [1, 1, 0], [0, 0, 0]], dtype=bool)
    p = np.array([[1, 1, 0], [0, 1, 0], [0, 0, 1]], dtype=bool)
    r = ml.precision_recall_at(y, p)
    # tp = [1, 1, 0], fp = [0, 1, 1], fn = [1, 0, 0]; class 2 has no positives
    assert r["micro_precision"] == pytest.approx(2 / 4)
    assert r["micro_recall"] == pytest.approx(2 / 3)
    assert r["micro_f1"] == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))
    assert r["macro_precision"] == pytest.approx(0.75)
    assert r["macro_recall"] == pytest.approx(0.75)
    assert r["macro_f1"] == pytest.approx(0.75)
    assert r["classes_evaluated"] == 2
    assert all(type(v) in (float, int) for v in r.values())


# ------------------------------------------------------------------------------------------
# CLIP crops on real images with the tiny model


@pytest.fixture(scope="module")
def coco_files():
    imgs = COCO_DIR / "images"
    if not imgs.is_dir():
        pytest.skip(f"real images not found at {COCO_DIR}")
    return [str(p) for p in sorted(imgs.glob("*.jpg"))[:6]]


@pytest.fixture(scope="module")
def class_weights(tiny_clip):
    classes = (COCO_DIR / "classes.txt").read_text().split("\n")[:12]
    with torch.no_grad():
        t = tiny_clip.model.encode_text(tiny_clip.tokenizer([f"a photo of a {c}" for c in classes]))
    return l2_normalize(t.numpy())


def _counting(clip):
    calls = []

    def encode(x):
        calls.append(int(x.shape[0]))
        return clip.model.encode_image(x)

    return dataclasses.replace(clip, encode_image=encode), calls


@pytest.mark.integration
def test_local_clip_scores_real_images_batched(tiny_clip, coco_files, class_weights):
    clip, calls = _counting(tiny_clip)
    seen = []
    cfg = ml.CropConfig(batch_size=4, num_workers=1, precision="fp32")
    s, failed = ml.local_clip_scores(clip, coco_files, class_weights, cfg, progress=lambda d, t, m: seen.append((d, t)))
    assert s.shape == (6, 9, 12) and s.dtype == np.float32 and failed == []
    np.testing.assert_allclose(s.sum(-1), 1.0, atol=1e-5)
    assert sum(calls) == 6 * 9 and len(calls) == 2  # crops of 4 + 2 images per forward
    assert seen[-1] == (6, 6)
    # Crops see different content, so their scores differ.
    assert np.abs(s[:, 0] - s[:, 8]).max() > 1e-4


@pytest.mark.integration  # reads COCO images in this process (num_workers=0)
def test_local_clip_scores_bf16_agrees_with_fp32(tiny_clip, coco_files, class_weights):
    files = coco_files[:3]
    fp32, _ = ml.local_clip_scores(tiny_clip, files, class_weights, ml.CropConfig(num_workers=0, precision="fp32"))
    bf16, _ = ml.local_clip_scores(tiny_clip, files, class_weights, ml.CropConfig(num_workers=0, precision="bf16"))
    assert np.isfinite(bf16).all()
    np.testing.assert_allclose(bf16.sum(-1), 1.0, atol=1e-5)
    assert np.abs(bf16 - fp32).max() < 0.15  # logit scale 100 magnifies bf16 rounding
    assert (bf16.argmax(-1) == fp32.argmax(-1)).mean() >= 0.8


@pytest.mark.integration  # reads COCO images in this process (num_workers=0)
def test_local_clip_scores_bad_and_tiny_images(tiny_clip, coco_files, class_weights, tmp_path):
    bad = tmp_path / "corrupt.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    tiny = tmp_path / "tiny.png"
    Image.new("RGB", (2, 2), (200, 10, 10)).save(tiny)
    files = [coco_files[0], str(bad), str(tmp_path / "missing.jpg"), str(tiny)]
    s, failed = ml.local_clip_scores(tiny_clip, files, class_weights, ml.CropConfig(num_workers=0))
    assert [i for i, _ in failed] == [1, 2]
    assert "unreadable" in failed[0][1] and "missing" in failed[1][1]
    assert np.isnan(s[1]).all() and np.isnan(s[2]).all()
    assert np.isfinite(s[0]).all()
    # 2×2 image: four 1×1 tiles scored, the other five slots missing.
    assert np.isfinite(s[3, :4]).all() and np.isnan(s[3, 4:]).all()
    agg = ml.aggregate_scores(np.full((4, 12), 1 / 12, np.float32), s)
    assert np.isfinite(agg[[0, 1, 2, 3]]).all()  # failed rows fall back to the global scores
    labels = ml.decide_labels(agg)
    assert labels.sum(1).min() >= 1


@pytest.mark.integration
def test_local_clip_scores_rejects_wrong_weights(tiny_clip, coco_files):
    with pytest.raises(InvalidInputError):
        ml.local_clip_scores(tiny_clip, coco_files[:1], np.ones((3, 5), np.float32))


# ------------------------------------------------------------------------------------------
# classifier


def _synthetic(n=240, f=16, c=4, seed=0):
    rng = np.random.default_rng(seed)
    pres = rng.random((n, c)) < 0.4
    pres[np.arange(n), rng.integers(0, c, n)] = True
    x = pres.astype(np.float32) @ rng.normal(size=(c, f)) + 0.3 * rng.normal(size=(n, f))
    return x.astype(np.float32), pres


@pytest.mark.parametrize("loss, hidden", [("kl", 0), ("bce", 0), ("kl", 32)])
def test_training_loss_decreases_on_separable_features(loss, hidden):
    x, pres = _synthetic()
    y = np.where(pres, 0.8, 0.1).astype(np.float32)
    cfg = ml.TrainConfig(loss=loss, hidden=hidden, epochs=30, lr=1e-2, update_every=0)
    model, refined, hist = ml.train_multilabel_classifier(x, y, cfg)
    assert len(hist["loss"]) == 30 and hist["update_epochs"] == []
    assert hist["loss"][-1] < 0.7 * hist["loss"][0]
    np.testing.assert_allclose(refined, y)  # no update epochs: labels untouched
    pred = ml.predict_multilabel(model, x)
    assert pred.shape == pres.shape and ((pred >= 0) & (pred <= 1)).all()
    assert ml.mean_average_precision(pres, pred) > 0.9


def test_training_is_deterministic_and_skips_bad_rows():
    x, pres = _synthetic(n=100)
    y = np.where(pres, 0.7, 0.2).astype(np.float32)
    x[3] = np.nan
    y[5] = 0.0  # all-zero soft label row: clamped, loss stays finite
    cfg = ml.TrainConfig(epochs=6, update_every=3, warmup=0)
    m1, r1, h1 = ml.train_multilabel_classifier(x, y, cfg)
    m2, r2, h2 = ml.train_multilabel_classifier(x, y, cfg)
    assert h1["loss"] == h2["loss"] and np.array_equal(r1, r2, equal_nan=True)
    assert h1["n_skipped"] == 1 and h1["n_train"] == 99 and np.isfinite(h1["loss"]).all()
    assert np.isnan(r1[3]).all() and np.isfinite(np.delete(r1, 3, axis=0)).all()
    assert np.isnan(ml.predict_multilabel(m1, x)[3]).all()
    with pytest.raises(InvalidInputError):
        ml.train_multilabel_classifier(x, y, ml.TrainConfig(loss="mse"))


@pytest.mark.parametrize("loss", ["kl", "bce"])
def test_label_update_epoch_follows_the_loss_gradient(loss):
    x, pres = _synthetic(n=160, seed=1)
    rng = np.random.default_rng(1)
    y = np.where(pres, 0.8, 0.1).astype(np.float32)
    corrupt = pres & (rng.random(pres.shape) < 0.2)
    y[corrupt] = 0.2  # missed positives: the classifier, trained on all, disagrees
    # One batch per epoch, so epoch 20's update uses the predictions of the 19-epoch model.
    base = dict(loss=loss, lr=1e-2, update_every=20, warmup=0, label_lr=1.0, batch_size=len(x))
    model19, before, h = ml.train_multilabel_classifier(x, y, ml.TrainConfig(epochs=19, **base))
    assert h["update_epochs"] == [] and np.allclose(before, y)
    _, after, h = ml.train_multilabel_classifier(x, y, ml.TrainConfig(epochs=20, **base))
    assert h["update_epochs"] == [20] and h["label_change"][0] > 0
    # The update was taken with the predictions of epoch 20's forward pass, before its step.
    with torch.no_grad():
        logits = model19(torch.from_numpy(x))
    grad = ml.label_gradient(logits, torch.from_numpy(y), loss).numpy()
    np.testing.assert_allclose(after, ml.label_update(y, grad, 1.0), atol=1e-6)
    moved = np.abs(grad) > 1e-3
    assert moved.mean() > 0.5
    assert np.all(np.sign(after - y)[moved] == -np.sign(grad[moved]))
    # Missed positives move up, towards what the classifier learnt from the other images.
    assert (after - y)[corrupt].mean() > 0


def test_save_load_round_trip(tmp_path):
    x, pres = _synthetic(n=80)
    y = np.where(pres, 0.8, 0.1).astype(np.float32)
    classes = ["cat", "dog", "car", "tree"]
    for hidden in (0, 8):
        model, _, _ = ml.train_multilabel_classifier(x, y, ml.TrainConfig(hidden=hidden, epochs=3, update_every=0))
        path = tmp_path / f"head{hidden}.pt"
        meta_path = ml.save_classifier(path, model, classes, {"features": "clip"})
        info = json.loads(meta_path.read_text())
        assert info["classes"] == classes and info["hidden"] == hidden
        assert info["in_features"] == 16 and info["config"]["epochs"] == 3
        assert info["meta"] == {"features": "clip"}
        loaded, info2 = ml.load_classifier(path, classes=classes)
        np.testing.assert_array_equal(ml.predict_multilabel(loaded, x), ml.predict_multilabel(model, x))
        assert ml.load_classifier(path)[1] == info2
    with pytest.raises(IndexMismatchError, match="differing names"):
        ml.load_classifier(tmp_path / "head0.pt", classes=["cat", "dog", "car", "bus"])
    with pytest.raises(IndexMismatchError, match="different order"):
        ml.load_classifier(tmp_path / "head0.pt", classes=["dog", "cat", "car", "tree"])
    with pytest.raises(ModelNotFoundError):
        ml.load_classifier(tmp_path / "nothing.pt")
    with pytest.raises(InvalidInputError):
        ml.save_classifier(tmp_path / "x.pt", model, classes[:3])


# ------------------------------------------------------------------------------------------
# properties

_unit = st.floats(0.0, 1.0, allow_nan=False, width=32)


@settings(max_examples=60, deadline=None)
@given(
    data=st.data(),
    n=st.integers(1, 4),
    c=st.integers(1, 5),
    g=st.integers(1, 9),
    t=st.floats(0.0, 0.5),
    lam=st.floats(0.0, 0.5),
    mode=st.sampled_from(["avg", "lambda"]),
)
def test_aggregate_bounded_and_monotone_in_global(data, n, c, g, t, lam, mode):
    g1 = data.draw(arrays(np.float32, (n, c), elements=_unit))
    bump = data.draw(arrays(np.float32, (n, c), elements=_unit))
    loc = data.draw(arrays(np.float32, (n, g, c), elements=_unit))
    g2 = np.minimum(g1 + bump, 1.0)
    y1 = ml.aggregate_scores(g1, loc, t=t, mode=mode, lam=lam)
    y2 = ml.aggregate_scores(g2, loc, t=t, mode=mode, lam=lam)
    assert ((y1 >= 0) & (y1 <= 1)).all()
    assert (y2 >= y1 - 1e-6).all()


@settings(max_examples=60, deadline=None)
@given(y=arrays(np.float64, st.integers(1, 20), elements=st.floats(0.0, 1.0)), data=st.data(), lr=st.floats(0.0, 100.0))
def test_label_update_stays_inside_unit_interval(y, data, lr):
    grad = data.draw(arrays(np.float64, y.shape, elements=st.floats(-1e6, 1e6)))
    new = ml.label_update(y, grad, lr)
    assert np.isfinite(new).all() and ((new > 0) & (new < 1)).all()
