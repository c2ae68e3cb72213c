"""Transductive labeling: the algorithms on synthetic vectors (seconds, no FiftyOne), the
safeguard on real stored vectors, and the stage on a small FiftyOne dataset with tiny models."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from fiftyone_nola.core.errors import InvalidInputError
from fiftyone_nola.core.transductive import (
    TransductiveConfig,
    knn_graph,
    label,
    presence_check,
    stata,
    text_prior,
    transclip,
    zlap,
    zlap_probabilities,
)
from fiftyone_nola.core.transductive.zlap import laplacian


def _unit(a):
    return (a / np.linalg.norm(a, axis=1, keepdims=True)).astype(np.float32)


def _clustered(n=400, d=128, c=6, seed=0, present=None, text_noise=4.0):
    """Clustered unit vectors with per-dimension noise, noisy class text embeddings."""
    rng = np.random.default_rng(seed)
    centers = _unit(rng.standard_normal((c, d)))
    classes = np.arange(c) if present is None else np.asarray(present)
    y = rng.choice(classes, n)
    scale = np.exp(rng.uniform(np.log(0.02), np.log(0.3), d))
    x = _unit(centers[y] + scale * rng.standard_normal((n, d)))
    text = _unit(centers + text_noise * rng.standard_normal((c, d)) / np.sqrt(d))
    return x, y, text


def _acc(p, y):
    return float((np.asarray(p).argmax(axis=1) == y).mean())


# --------------------------------------------------------------------------- kNN graph


def test_exact_graph_is_the_brute_force_top_k_without_self():
    x, _, _ = _clustered(n=200)
    g = knn_graph(x, 3, search="exact")
    s = x @ x.T
    np.fill_diagonal(s, -np.inf)
    assert g.exact and g.indices.shape == (200, 3) and g.sims.dtype == np.float32
    np.testing.assert_array_equal(g.indices, np.argsort(-s, axis=1)[:, :3])
    np.testing.assert_allclose(g.sims, np.take_along_axis(s, g.indices, 1), atol=1e-6)


def test_graph_with_duplicates_and_tiny_inputs():
    x = _unit(np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]))
    g = knn_graph(x, 2, search="exact")
    assert not (g.indices == np.arange(4)[:, None]).any()  # never itself, even tied with a duplicate
    assert g.indices[0, 0] == 1 and g.indices[1, 0] == 0
    one = knn_graph(x[:2], 5, search="exact")  # fewer rows than k: every other row
    assert one.indices.shape == (2, 1) and one.indices[0, 0] == 1


def test_ivf_graph_is_close_to_exact_with_memory_o_n_k():
    x, _, _ = _clustered(n=3000, d=32, c=8, seed=1)
    exact = knn_graph(x, 3, search="exact")
    approx = knn_graph(x, 3, search="ivf", nprobe=4)
    assert not approx.exact and approx.indices.shape == (3000, 3)
    assert (approx.indices >= 0).all() and not (approx.indices == np.arange(3000)[:, None]).any()
    recall = np.mean([len(set(a) & set(b)) / 3 for a, b in zip(exact.indices, approx.indices)])
    assert recall > 0.9
    # auto: exact up to exact_max vectors, ivf above
    assert knn_graph(x, 3, exact_max=3000).exact and not knn_graph(x, 3, exact_max=2999).exact


# --------------------------------------------------------------------------- solvers


def test_transclip_and_stata_improve_on_the_prior_and_return_probabilities():
    x, y, text = _clustered()
    prior = text_prior(x, text)
    g = knn_graph(x, 3, search="exact")
    for z in (transclip(x, prior, g), stata(x, prior, g, text), stata(x, prior, g, None)):
        assert z.shape == prior.shape and np.all(z >= 0)
        np.testing.assert_allclose(z.sum(axis=1), 1.0, atol=1e-9)
        assert _acc(z, y) > _acc(prior, y) + 0.05


def test_kl_weight_zero_forgets_the_prior_and_iterations_zero_is_the_prior_reweighted():
    x, y, text = _clustered(seed=3)
    prior = text_prior(x, text)
    g = knn_graph(x, 3, search="exact")
    none = transclip(x, prior, g, TransductiveConfig(iterations=0, z_steps=0))
    np.testing.assert_allclose(none, prior)
    free = transclip(x, prior, g, TransductiveConfig(kl_weight=0.0))
    assert not np.allclose(free, transclip(x, prior, g))


def test_stata_keeps_absent_classes_empty_where_transclip_fills_them():
    """2 of 6 classes present: StatA's anchored Gaussians of the absent classes take no more
    samples than the prior gives them; accuracy does not fall below the prior's."""
    x, y, text = _clustered(n=300, present=[1, 4], seed=2)
    prior = text_prior(x, text)
    g = knn_graph(x, 3, search="exact")
    z = stata(x, prior, g, text)
    absent = ~np.isin(np.arange(6), [1, 4])
    assert (
        np.bincount(z.argmax(1), minlength=6)[absent].sum() <= np.bincount(prior.argmax(1), minlength=6)[absent].sum()
    )
    assert _acc(z, y) >= _acc(prior, y)


def test_zlap_laplacian_is_symmetric_and_scores_rank_classes():
    x, y, text = _clustered(seed=4)
    g = knn_graph(x, 4, search="exact")
    L = laplacian(g, x @ text.T, 5, 5.0, 0.3)
    assert abs(L - L.T).max() < 1e-12 and np.allclose(L.diagonal(), 1.0)
    res = zlap(g, x @ text.T)
    assert res.scores.shape == (len(x), 6) and res.nodes.shape == (len(x) + 6, 6)
    assert _acc(res.scores, y) > _acc(text_prior(x, text), y)
    p = zlap_probabilities(res.scores, text_prior(x, text))
    np.testing.assert_allclose(p.sum(axis=1), 1.0)
    assert np.array_equal(p.argmax(1), res.scores.argmax(1))


def test_zlap_probabilities_fall_back_to_the_prior_without_positive_scores():
    prior = np.array([[0.2, 0.8], [0.6, 0.4]])
    p = zlap_probabilities(np.array([[0.0, 0.0], [-1.0, 3.0]]), prior)
    np.testing.assert_allclose(p, [[0.2, 0.8], [0.0, 1.0]])


def test_presence_check_restricts_or_falls_back():
    prior = np.eye(4)[[0] * 50 + [1] * 40 + [2] * 30 + [3] * 2] * 0.9 + 0.025
    probs = np.roll(prior, 1, axis=1)  # the method moved every sample to the next class
    p, info = presence_check(probs, prior, 0.25, 0.5)
    # class 3 (2 samples, < 0.25 x 50) is absent: only its own prior samples may take it
    assert not info["fell_back"] and info["present"] == 3
    assert (p.argmax(1)[:120] != 3).all()
    few = np.eye(4)[[0] * 50 + [1] * 3 + [2] * 2 + [3] * 1] * 0.9 + 0.025
    p, info = presence_check(np.roll(few, 1, axis=1), few, 0.25, 0.5)
    assert info["fell_back"] and np.array_equal(p, few)


def test_label_dispatches_and_checks_its_inputs():
    x, y, text = _clustered(n=120)
    prior = text_prior(x, text)
    for cfg, name in (
        (TransductiveConfig(), "stata"),
        (TransductiveConfig(safeguard=False), "transclip"),
        (TransductiveConfig(method="zlap"), "zlap+presence"),
        (TransductiveConfig(method="zlap", safeguard=False), "zlap"),
    ):
        res = label(x, prior, cfg, text, x @ text.T)
        assert res.info["method"] == name and res.info["graph"] == "exact"
        assert res.probs.shape == prior.shape and res.probs.dtype == np.float32
    with pytest.raises(InvalidInputError, match="text_sims"):
        label(x, prior, TransductiveConfig(method="zlap"), text)
    with pytest.raises(InvalidInputError, match="N×C"):
        label(x, prior[:10], TransductiveConfig(), text)
    with pytest.raises(InvalidInputError, match="finite"):
        label(np.full_like(x, np.nan), prior)
    with pytest.raises(InvalidInputError, match="method"):
        label(x, prior, TransductiveConfig(method="lp"))


def test_config_problems_name_every_bad_setting():
    bad = TransductiveConfig(method="x", features="y", transclip_k=0, zlap_k=1, zlap_alpha=1.0, kl_weight=-1)
    text = "; ".join(bad.problems())
    for name in ("method", "features", "transclip_k", "zlap_k", "zlap_alpha", "kl_weight"):
        assert name in text
    assert TransductiveConfig().problems() == []
    assert TransductiveConfig().k == 3 and TransductiveConfig(method="zlap").k == 5
    assert TransductiveConfig(iterations=0).problems() == []  # 0 is a value


def test_progress_is_reported():
    x, _, text = _clustered(n=100)
    seen = []
    label(x, text_prior(x, text), TransductiveConfig(), text, progress=lambda d, t, m: seen.append((d, t, m)))
    assert any("kNN" in m for *_, m in seen) and seen[-1][0] == seen[-1][1]


# --------------------------------------------------------------------------- on real stored vectors


@pytest.fixture(scope="module")
def cifar_vectors(tmp_path_factory):
    """CLIP vectors stored by the embedding stage (tiny random CLIP) for 12 CIFAR-10 images per class
    (the committed set's 6: copies would add near-duplicate vectors, a different test)."""
    import uuid

    import fiftyone as fo

    from conftest import DATA_PER_CLASS, cifar_files
    from fiftyone_nola.core.embed import EmbedConfig
    from fiftyone_nola.core.models import tiny_clip_spec
    from fiftyone_nola.stages.embeddings import compute_embeddings
    from fiftyone_nola.stages.stage import load_embeddings

    ds = fo.Dataset(f"nola-test-{uuid.uuid4().hex[:10]}")
    ds.add_samples([fo.Sample(filepath=p) for p, _ in cifar_files(per_class=min(12, DATA_PER_CLASS))], progress=False)
    try:
        compute_embeddings(ds, "clip", tiny_clip_spec(), config=EmbedConfig(batch_size=32, num_workers=0))
        return load_embeddings(ds, tiny_clip_spec())[1]
    finally:
        ds.delete()


@pytest.mark.integration
def test_safeguard_on_two_of_ten_classes_of_real_stored_vectors(cifar_vectors):
    """Random-weight CLIP vectors carry no CIFAR class, so accuracy against folder labels would
    be meaningless. The classes are instead 10 k-means clusters of the real stored vectors, and
    the text prior is each cluster's centre plus noise (zero-shot ~0.87 on all 10 classes, about
    CLIP ViT-B on CIFAR-10). On datasets holding 2 of the 10 classes (the 6 largest pairs) the
    safeguarded methods never fall below zero-shot accuracy; plain ZLaP collapses (the failure
    StatA reports), and its safeguard catches it."""
    import faiss

    x = cifar_vectors
    km = faiss.Kmeans(x.shape[1], 10, niter=25, seed=1, spherical=True)
    km.train(x)
    truth = km.index.search(x, 1)[1][:, 0]
    rng = np.random.default_rng(0)
    mean = x.mean(axis=0)
    cen = km.centroids - mean
    noise = 0.5 * np.linalg.norm(cen, axis=1, keepdims=True) * rng.standard_normal(cen.shape) / np.sqrt(x.shape[1])
    text = _unit(cen + noise + mean)
    assert 0.75 < _acc(text_prior(x, text), truth) < 0.95
    pairs = sorted(itertools.combinations(range(10), 2), key=lambda ab: -np.isin(truth, ab).sum())[:6]
    plain_zlap_worst = 1.0
    for ab in pairs:
        sub = np.isin(truth, ab)
        xs, ys = x[sub], truth[sub]
        prior = text_prior(xs, text)
        zs = _acc(prior, ys)
        for cfg in (TransductiveConfig(), TransductiveConfig(method="zlap")):
            assert _acc(label(xs, prior, cfg, text, xs @ text.T).probs, ys) >= zs, (ab, cfg.method)
        plain = label(xs, prior, TransductiveConfig(method="zlap", safeguard=False), text, xs @ text.T)
        plain_zlap_worst = min(plain_zlap_worst, _acc(plain.probs, ys) - zs)
    assert plain_zlap_worst < -0.3


# --------------------------------------------------------------------------- the stage


@pytest.fixture
def labelled_cifar(cifar_dataset):
    """40 CIFAR images with tiny CLIP/DINO vectors stored and the zero-shot stage run."""
    from fiftyone_nola.core.embed import EmbedConfig
    from fiftyone_nola.core.models import tiny_clip_spec, tiny_dino_spec
    from fiftyone_nola.stages.embeddings import compute_embeddings
    from fiftyone_nola.stages.nola import ZeroShotConfig, zero_shot

    compute_embeddings(
        cifar_dataset, "both", tiny_clip_spec(), tiny_dino_spec(), EmbedConfig(batch_size=16, num_workers=0)
    )
    zero_shot(cifar_dataset, _CLASSES, ZeroShotConfig(clip=tiny_clip_spec()))
    return cifar_dataset


_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.mark.integration
def test_stage_writes_a_recorded_classification_field(labelled_cifar):
    from fiftyone_nola.core.models import tiny_clip_spec
    from fiftyone_nola.stages import runs
    from fiftyone_nola.stages.artifacts import aligned, stage_dir
    from fiftyone_nola.stages.nola import load_class_weights
    from fiftyone_nola.stages.stage import load_embeddings
    from fiftyone_nola.stages.transductive import transductive_labels

    ds = labelled_cifar
    seen = []
    s = transductive_labels(ds, progress=lambda d, t, m: seen.append(m))
    n = len(ds)
    assert s["field"] == "nola_transductive" and s["labelled"] == n and s["method"] == "stata"
    assert ds.count("nola_transductive.label") == n
    conf = np.array(ds.values("nola_transductive.confidence"))
    assert np.all((conf > 0) & (conf <= 1))
    assert set(ds.distinct("nola_transductive.label")) <= set(_CLASSES)
    run = runs.get_run(ds, "nola_transductive")
    assert run["method"] == "nola.transductive" and run["results"]["changed"] == s["changed"]
    assert run["config"]["zeroshot_field"] == "nola_zeroshot" and run["config"]["init_field"] is None
    assert seen and any("StatA" in m for m in seen)
    # the stored probabilities are the core algorithm's on the stored vectors and class weights
    ids, x = load_embeddings(ds, tiny_clip_spec())
    W, _ = load_class_weights(ds)
    ref = label(x, text_prior(x, W), TransductiveConfig(), W).probs
    np.testing.assert_allclose(aligned(stage_dir(ds, "nola_transductive"), "probs", ids), ref, atol=1e-6)


@pytest.mark.integration
def test_stage_starts_from_another_fields_predictions(labelled_cifar):
    import fiftyone as fo

    from fiftyone_nola.stages.transductive import initial_predictions, transductive_labels

    ds = labelled_cifar
    ids = ds.values("id")
    stored = initial_predictions(ds, "nola_zeroshot", ids, _CLASSES)  # the stage's stored probs
    assert np.allclose(stored.sum(axis=1), 1, atol=1e-4)
    # a field no stage wrote: its label and confidence
    labs, confs = ds.values("nola_zeroshot.label"), ds.values("nola_zeroshot.confidence")
    ds.set_values("manual", [fo.Classification(label=lab, confidence=c) for lab, c in zip(labs, confs)])
    manual = initial_predictions(ds, "manual", ids, _CLASSES)
    assert np.array_equal(manual.argmax(axis=1), stored.argmax(axis=1))
    np.testing.assert_allclose(manual.max(axis=1), confs, atol=1e-6)
    cfg = TransductiveConfig(safeguard=False)
    s = transductive_labels(ds, config=cfg, init_field="manual", label_field="refined")
    assert s["labelled"] == len(ds) and s["method"] == "transclip"
    with pytest.raises(InvalidInputError, match="ZLaP"):
        transductive_labels(ds, config=TransductiveConfig(method="zlap"), init_field="manual")


@pytest.mark.integration
def test_stage_on_dino_features_and_with_zlap(labelled_cifar):
    from fiftyone_nola.core.errors import IndexMismatchError
    from fiftyone_nola.core.models import tiny_dino_spec
    from fiftyone_nola.stages.transductive import transductive_labels

    ds = labelled_cifar
    s = transductive_labels(ds, config=TransductiveConfig(features="dino"), dino=tiny_dino_spec(), label_field="t_dino")
    assert s["labelled"] == len(ds)
    z = transductive_labels(ds, _CLASSES, TransductiveConfig(method="zlap"), label_field="t_zlap")
    assert z["labelled"] == len(ds) and z["method"] == "zlap+presence"
    with pytest.raises(IndexMismatchError):
        transductive_labels(ds, ["cat", "dog"])


@pytest.mark.integration
def test_stage_skips_samples_without_embeddings(labelled_cifar):
    import fiftyone as fo

    from fiftyone_nola.stages.transductive import transductive_labels

    ds = labelled_cifar
    n = len(ds)
    new = fo.Sample(filepath=ds.first().filepath)  # added after the embeddings: no stored vector
    ds.add_sample(new)
    s = transductive_labels(ds)
    assert s["labelled"] == n and s["skipped"] == 1
    assert ds[new.id]["nola_transductive"] is None


def test_a_sigmoid_clip_s_prior_is_its_zero_shot_scores():
    """With a SigLIP (sigmoid scoring) the prior is what its zero-shot stage wrote (normalised
    sigmoid at the learnt scale and bias), not a softmax at 100, which would rank classes alike
    but give other confidences (the transductive terms weigh the prior by them)."""
    from fiftyone_nola.core.models.scoring import Scoring
    from fiftyone_nola.core.zeroshot import class_probs

    x, _, text = _clustered(n=50)
    siglip = Scoring("sigmoid", 12.0, -10.0)
    prior = text_prior(x, text, scoring=siglip)
    np.testing.assert_allclose(prior, class_probs(x, text, siglip), rtol=1e-5, atol=1e-6)
    assert prior.dtype == np.float64 and np.allclose(prior.sum(axis=1), 1.0)
    assert not np.allclose(prior, text_prior(x, text))  # the softmax at 100 is another prior
    np.testing.assert_allclose(text_prior(x, text, scoring=Scoring()), text_prior(x, text))
