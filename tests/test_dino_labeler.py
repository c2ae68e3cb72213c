"""Stage 2: confident picks, the DINO labeling MLP, persistence, and a stage 1+2 simulation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fiftyone_nola.core.dino_labeler import (
    DinoLabelerConfig,
    dino_pseudo_labels,
    label_all,
    load_labeler,
    save_labeler,
    select_confident,
    topk_per_class,
    train_labeler,
)
from fiftyone_nola.core.errors import IndexMismatchError, InvalidInputError, ModelNotFoundError
from fiftyone_nola.core.zeroshot import cde_weights, zeroshot_predict

FAST = DinoLabelerConfig(epochs=10)


def test_topk_per_class():
    assert topk_per_class(100, 10) == 16
    assert topk_per_class(1000, 10) == 20
    assert topk_per_class(1_000_000, 2) == 100_000  # no upper cap
    with pytest.raises(InvalidInputError):
        topk_per_class(10, 0)


# ---- select_confident: hand cases


def _sel(rows, k):
    s = select_confident(np.array(rows, dtype=float), k)
    return s.indices.tolist(), s.labels.tolist(), s


def test_top1_sorted_and_truncated():
    rows = [[0.7, 0.2, 0.1], [0.9, 0.05, 0.05], [0.8, 0.1, 0.1], [0.1, 0.6, 0.3], [0.2, 0.2, 0.6]]
    idx, lab, s = _sel(rows, 2)
    assert (idx, lab) == ([1, 2, 3, 4], [0, 0, 1, 2])
    assert s.counts == {0: 2, 1: 1, 2: 1} and s.ranks == {0: 1, 1: 1, 2: 1} and s.warnings == []


def test_fallback_top2_and_dedup_keeps_earlier_class():
    # class 2 is nobody's top-1: it takes the samples with it as top-2, by their top-2 probability
    # (rows 1, 0), but both were already picked by classes 0 and 1, which come first.
    rows = [[0.6, 0.1, 0.3], [0.1, 0.5, 0.4], [0.7, 0.2, 0.1]]
    idx, lab, s = _sel(rows, 5)
    assert (idx, lab) == ([2, 0, 1], [0, 0, 1])
    assert s.ranks[2] == 2 and s.counts[2] == 0
    assert any("class 2" in w for w in s.warnings)


def test_fallback_class_with_lower_index_takes_the_sample():
    # As the official drop_duplicates(keep="first"): class 0 (fallback, visited first) keeps them.
    rows = [[0.3, 0.6, 0.1], [0.2, 0.1, 0.7]]
    idx, lab, s = _sel(rows, 5)
    assert (idx, lab) == ([0, 1], [0, 0])
    assert s.counts == {0: 2, 1: 0, 2: 0}


def test_fallback_top3():
    rows = [[0.5, 0.3, 0.05, 0.15], [0.1, 0.6, 0.25, 0.05], [0.2, 0.1, 0.6, 0.1], [0.9, 0.05, 0.03, 0.02]]
    idx, lab, s = _sel(rows, 1)
    assert (idx, lab) == ([3, 1, 2, 0], [0, 1, 2, 3])
    assert s.ranks == {0: 1, 1: 1, 2: 1, 3: 3}


def test_class_never_in_top3_is_reported():
    idx, lab, s = _sel([[0.4, 0.3, 0.2, 0.1], [0.5, 0.3, 0.15, 0.05]], 3)
    assert s.ranks[3] == 0 and s.counts[3] == 0
    assert any(w.startswith("class 3") for w in s.warnings)
    assert 3 not in lab


def test_ties_are_deterministic():
    # equal confidence: lower sample index first
    idx, lab, _ = _sel([[0.6, 0.4]] * 3, 2)
    assert (idx, lab) == ([0, 1], [0, 0])
    # equal class probabilities: the lower class ranks first
    idx, lab, s = _sel([[0.5, 0.5]], 1)
    assert (idx, lab) == ([0], [0]) and s.ranks == {0: 1, 1: 2}


def test_nan_rows_never_picked():
    idx, lab, _ = _sel([[np.nan, np.nan], [0.2, 0.8], [0.9, 0.1]], 4)
    assert 0 not in idx and sorted(idx) == [1, 2]


def test_select_rejects_bad_input():
    with pytest.raises(InvalidInputError):
        select_confident(np.ones((3, 2)), 0)
    with pytest.raises(InvalidInputError):
        select_confident(np.ones(3), 1)


# ---- select_confident: properties

_probs = st.tuples(st.integers(1, 25), st.integers(1, 6)).flatmap(
    lambda s: hnp.arrays(np.float64, s, elements=st.sampled_from([0.0, 0.1, 0.25, 0.5, 0.7, 1.0]) | st.floats(0, 1))
)


@settings(max_examples=150, deadline=None)
@given(probs=_probs, k=st.integers(1, 6))
def test_selection_properties(probs, k):
    s = select_confident(probs, k)
    assert len(set(s.indices.tolist())) == len(s.indices)
    for i, c in zip(s.indices, s.labels):
        assert np.sum(probs[i] > probs[i, c]) < 3  # the label is among the sample's top 3
    for c in range(probs.shape[1]):
        assert s.counts[c] == int(np.sum(s.labels == c)) <= k
    again = select_confident(probs, k)
    assert again.indices.tolist() == s.indices.tolist() and again.labels.tolist() == s.labels.tolist()


# ---- training and labeling


def _blobs(n_per=20, c=3, f=8, seed=0, sep=4.0):
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(c), n_per)
    centers = rng.normal(size=(c, f))
    centers *= sep / np.linalg.norm(centers, axis=1, keepdims=True)
    return (centers[y] + rng.normal(size=(len(y), f)) * 0.5).astype(np.float32), y


def test_train_labeler_deterministic_and_leaves_global_rng():
    x, y = _blobs()
    idx = np.arange(0, len(x), 2)
    state, threads = torch.get_rng_state(), torch.get_num_threads()
    a = train_labeler(x, idx, y[idx], 3, FAST)
    assert torch.equal(state, torch.get_rng_state()) and torch.get_num_threads() == threads
    b = train_labeler(x, idx, y[idx], 3, FAST)
    c = train_labeler(x, idx, y[idx], 3, DinoLabelerConfig(epochs=10, seed=1))
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k])
    assert not torch.equal(a.state_dict()["mlp.0.weight"], c.state_dict()["mlp.0.weight"])
    assert (label_all(a, x).argmax(1) == y).mean() > 0.9
    with torch.inference_mode():  # callers inside inference mode still get a trained network
        d = train_labeler(x, idx, y[idx], 3, FAST)
    assert torch.equal(a.state_dict()["mlp.2.weight"], d.state_dict()["mlp.2.weight"])


def test_train_labeler_rejects_bad_training_set():
    x, y = _blobs()
    with pytest.raises(InvalidInputError):
        train_labeler(x, [], [], 3, FAST)
    with pytest.raises(InvalidInputError):
        train_labeler(x, [0, 1], [0, 3], 3, FAST)
    with pytest.raises(InvalidInputError):
        train_labeler(x, [0, 999], [0, 1], 3, FAST)
    x[0] = np.nan
    with pytest.raises(InvalidInputError):
        train_labeler(x, [0, 1], [0, 1], 3, FAST)


def test_label_all_nan_rows_and_batching():
    x, y = _blobs()
    mlp = train_labeler(x, np.arange(len(x)), y, 3, FAST)
    x[[2, 5]] = np.nan
    p = label_all(mlp, x)
    assert np.isnan(p[[2, 5]]).all()
    ok = np.isfinite(p).all(axis=1)
    assert ok.sum() == len(x) - 2
    np.testing.assert_allclose(p[ok].sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(label_all(mlp, x, batch_size=7), p, atol=1e-6)


def test_save_load_round_trip(tmp_path):
    x, y = _blobs()
    mlp = train_labeler(x, np.arange(len(x)), y, 3, FAST)
    classes = ["cat", "dog", "fish"]
    path = save_labeler(tmp_path / "sub" / "labeler.pt", mlp, classes, {"k": 16, "dino": "vit"})
    loaded = load_labeler(path, classes)
    np.testing.assert_array_equal(label_all(loaded, x), label_all(mlp, x))
    assert loaded.meta == {"k": 16, "dino": "vit"} and loaded.classes == classes
    with pytest.raises(IndexMismatchError):
        load_labeler(path, ["cat", "dog", "bird"])
    with pytest.raises(IndexMismatchError):
        load_labeler(path, ["dog", "cat", "fish"])
    with pytest.raises(ModelNotFoundError):
        load_labeler(tmp_path / "missing.pt", classes)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(IndexMismatchError):
        load_labeler(tmp_path / "junk.pt", classes)
    with pytest.raises(InvalidInputError):
        save_labeler(tmp_path / "x.pt", mlp, ["cat", "dog"])
    with pytest.raises(InvalidInputError):
        save_labeler(tmp_path / "x.pt", mlp, classes, {"bad": object()})


# ---- one-call stage 2


def test_dino_pseudo_labels_nan_rows_k_and_progress():
    x, y = _blobs(n_per=30)
    probs = np.eye(3)[y] * 0.6 + 0.4 / 3
    probs[0] = np.nan  # no CLIP score
    x[1] = np.nan  # no DINO features
    calls = []
    r = dino_pseudo_labels(probs, x, DinoLabelerConfig(epochs=5), progress=lambda d, t, m: calls.append((d, t)))
    assert r.k == 16 and calls[-1] == (5, 5)
    assert 0 not in r.selected_indices and 1 not in r.selected_indices
    assert r.labels[1] == -1 and np.isnan(r.confidence[1]) and r.labels[0] >= 0
    assert (r.labels[2:] == y[2:]).mean() > 0.9
    assert r.counts == {c: 16 for c in range(3)}
    r = dino_pseudo_labels(probs, x, DinoLabelerConfig(epochs=2, k=3))
    assert r.k == 3 and len(r.selected_indices) == 9
    with pytest.raises(InvalidInputError):
        dino_pseudo_labels(probs[:5], x, FAST)


def test_trusted_labels_override_picks():
    x, y = _blobs(n_per=20)
    probs = np.eye(3)[y] * 0.6 + 0.4 / 3
    probs[0] = [0.1, 0.8, 0.1]  # zero-shot is sure sample 0 (truly class 0) is class 1
    probs[0] += 0.05  # and surest of all, so it is picked for class 1
    r = dino_pseudo_labels(probs, x, DinoLabelerConfig(epochs=5, k=4))
    assert dict(zip(r.selected_indices.tolist(), r.selected_labels.tolist()))[0] == 1
    trusted = {0: 0, 45: 1}  # reviewer: sample 0 is class 0; sample 45 (class 2 region) is class 1
    r = dino_pseudo_labels(probs, x, DinoLabelerConfig(epochs=5, k=4), trusted=trusted)
    pairs = list(zip(r.selected_indices.tolist(), r.selected_labels.tolist()))
    assert (0, 0) in pairs and (0, 1) not in pairs and (45, 1) in pairs
    assert len(r.selected_indices) == len(set(r.selected_indices.tolist()))
    with pytest.raises(InvalidInputError):
        dino_pseudo_labels(probs, x, FAST, trusted={999: 0})
    with pytest.raises(InvalidInputError):
        dino_pseudo_labels(probs, x, FAST, trusted={0: 7})


# ---- stages 1 + 2 on synthetic embeddings


def _simulation(seed, n_per=100, c=5, d=32, f=16):
    """CLIP-like: images only weakly aligned with their class text. DINO-like: tight clusters."""
    rng = np.random.default_rng(seed)
    t = rng.normal(size=(c, d))
    t /= np.linalg.norm(t, axis=1, keepdims=True)
    w = cde_weights([t[k] + 0.3 * rng.normal(size=(4, d)) / np.sqrt(d) for k in range(c)])
    y = rng.permutation(np.repeat(np.arange(c), n_per))
    clip_img = 0.3 * t[y] + rng.normal(size=(len(y), d)) / np.sqrt(d)
    centers = rng.normal(size=(c, f))
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    dino = (4 * centers[y] + 0.5 * rng.normal(size=(len(y), f))).astype(np.float32)
    noise = rng.normal(size=(len(y), f)).astype(np.float32)
    return y, w, clip_img, dino, noise


def test_dino_labeler_beats_zero_shot_only_when_dino_has_signal():
    y, w, clip_img, dino, noise = _simulation(seed=0)
    zs_labels, _, zs_probs = zeroshot_predict(clip_img, w)
    zs_acc = (zs_labels == y).mean()
    assert 0.4 < zs_acc < 0.85  # weak but real zero-shot signal
    good = dino_pseudo_labels(zs_probs, dino, DinoLabelerConfig(seed=0))
    bad = dino_pseudo_labels(zs_probs, noise, DinoLabelerConfig(seed=0))
    assert (good.labels == y).mean() > zs_acc + 0.15
    assert (bad.labels == y).mean() < zs_acc
