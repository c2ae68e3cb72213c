"""The "faiss" FiftyOne Brain similarity backend over EmbeddingIndex, on real image samples."""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import pytest

from conftest import cifar_files

fob = pytest.importorskip("fiftyone.brain")

from fiftyone_nola.core.errors import IndexMismatchError, InvalidInputError  # noqa: E402
from fiftyone_nola.core.index import EmbeddingIndex  # noqa: E402
from fiftyone_nola.stages.brain_backend import (  # noqa: E402
    CONFIG_CLS,
    FaissSimilarityConfig,
    FaissSimilarityIndex,
    compute_faiss_similarity,
    register_faiss_backend,
)

DIM = 16


def unit(x):
    x = np.asarray(x, dtype=np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def nearest(emb, ids, q, k):
    sims = unit(emb) @ unit(q)
    return [ids[j] for j in np.argsort(-sims, kind="stable")[:k]]


@pytest.fixture
def ds_emb(make_dataset):
    files = [p for p, _ in cifar_files(per_class=2)]
    ds = make_dataset(files)
    emb = np.random.default_rng(0).normal(size=(len(ds), DIM)).astype(np.float32)
    return ds, emb, ds.values("id")


def _key():
    return f"sim_{uuid.uuid4().hex[:6]}"


def test_register_is_idempotent():
    register_faiss_backend()
    register_faiss_backend()
    entry = fob.brain_config.similarity_backends["faiss"]
    assert entry["config_cls"] == CONFIG_CLS
    assert "sklearn" in fob.brain_config.similarity_backends


@pytest.mark.integration  # reads CIFAR images
def test_compute_sort_and_reload(ds_emb):
    ds, emb, ids = ds_emb
    register_faiss_backend()
    key = _key()
    res = fob.compute_similarity(ds, backend="faiss", embeddings=emb, brain_key=key)
    assert isinstance(res, FaissSimilarityIndex) and res.total_index_size == len(ds)
    assert res.config.owns_index and Path(res.config.index_path).name == key
    assert str(ds._doc.id) in res.config.index_path

    q = ids[3]
    view = ds.sort_by_similarity(q, k=5, brain_key=key)
    assert view.values("id") == nearest(emb, ids, emb[3], 5)
    assert view.values("id")[0] == q

    # by vector, least similar, and a distance field
    v = res.sort_by_similarity(emb[7], k=4, dist_field="d")
    assert v.values("id") == nearest(emb, ids, emb[7], 4)
    np.testing.assert_allclose(v.values("d"), 1 - np.sort(unit(emb) @ unit(emb[7]))[::-1][:4], atol=1e-5)
    far = res.sort_by_similarity(q, k=3, reverse=True)
    assert far.values("id") == nearest(emb, ids, -emb[3], 3)

    # restricted to a view
    sub = ds.skip(10)
    with res.use_view(sub):
        got = res.sort_by_similarity(q, k=3).values("id")
    assert got == nearest(emb[10:], ids[10:], emb[3], 3)

    # the run reloads in a fresh results object, from its config alone
    loaded = ds.load_brain_results(key, cache=False)
    assert isinstance(loaded, FaissSimilarityIndex) and loaded.total_index_size == len(ds)
    info = ds.get_brain_info(key)
    assert info.config.method == "faiss" and info.config.cls == CONFIG_CLS
    e, sids, lids = loaded.get_embeddings(sample_ids=[ids[1], ids[0]])
    np.testing.assert_allclose(e, unit(emb[[1, 0]]), atol=1e-6)
    assert list(sids) == [ids[1], ids[0]] and lids is None
    assert loaded.sort_by_similarity(q, k=5).values("id") == nearest(emb, ids, emb[3], 5)

    # deleting the run removes the index it owns
    path = Path(loaded.config.index_path)
    assert (path / "meta.json").exists()
    ds.delete_brain_run(key)
    assert not path.exists()


@pytest.mark.integration  # reads CIFAR images
def test_add_remove_get(ds_emb):
    ds, emb, ids = ds_emb
    key = _key()
    res = fob.compute_similarity(ds[:12], backend=FaissSimilarityConfig, embeddings=emb[:12], brain_key=key)
    assert res.total_index_size == 12
    res.add_to_index(emb[12:], ids[12:])
    assert res.total_index_size == len(ds)
    new = np.random.default_rng(5).normal(size=(1, DIM)).astype(np.float32)
    res.add_to_index(new, [ids[0]], overwrite=False)  # kept old
    np.testing.assert_allclose(res.get_embeddings(ids[0])[0], unit(emb[:1]), atol=1e-6)
    res.add_to_index(new, [ids[0]])  # overwrite
    np.testing.assert_allclose(res.get_embeddings(ids[0])[0], unit(new), atol=1e-6)
    with pytest.raises(ValueError):
        res.add_to_index(new, [ids[0]], overwrite=False, allow_existing=False)

    res.remove_from_index(sample_ids=ids[:2])
    assert res.total_index_size == len(ds) - 2
    with pytest.raises(ValueError):
        res.remove_from_index(sample_ids=[ids[0]], allow_missing=False)
    e, sids, _ = res.get_embeddings()
    assert len(e) == len(sids) == len(ds) - 2 and set(sids) == set(ids[2:])
    with pytest.raises(ValueError):
        res.get_embeddings(sample_ids=[ids[0]], allow_missing=False)
    top = res.sort_by_similarity(emb[5], k=3).values("id")
    assert ids[0] not in top and top == nearest(emb[2:], ids[2:], emb[5], 3)

    # changes are on disk: a fresh load sees them
    loaded = ds.load_brain_results(key, cache=False)
    assert loaded.total_index_size == len(ds) - 2
    assert EmbeddingIndex.open(loaded.config.index_path).has(ids[:3]).tolist() == [False, False, True]


@pytest.mark.integration  # reads CIFAR images
def test_existing_index_is_reused_not_reembedded(ds_emb, tmp_path):
    ds, emb, ids = ds_emb
    path = tmp_path / "stage-index"
    ix = EmbeddingIndex.create(path, DIM, {"model_key": "clip-test"}, index_type="hnsw")
    ix.add(ids, emb)
    ix.save()
    key = _key()
    res = compute_faiss_similarity(ds, path, key)
    assert res.total_index_size == len(ds) and not res.config.owns_index
    assert ds.sort_by_similarity(ids[4], k=6, brain_key=key).values("id") == nearest(emb, ids, emb[4], 6)
    # the embedding stage adds more vectors later: reload() picks them up
    ix.add(["000000000000000000000000"], np.random.default_rng(9).normal(size=(1, DIM)))
    ix.save()
    res.reload()
    assert res.total_index_size == len(ds) + 1
    ds.delete_brain_run(key)
    assert (path / "meta.json").exists()  # never deletes an index it did not create

    with pytest.raises(InvalidInputError, match="another dataset"):
        other = EmbeddingIndex.create(tmp_path / "other", DIM, {})
        other.add(["ffffffffffffffffffffffff"], emb[:1])
        other.save()
        compute_faiss_similarity(ds, tmp_path / "other", _key())


class _Prompts:
    """Minimal FiftyOne model that embeds text prompts to fixed vectors."""

    def __init__(self, table):
        import fiftyone.core.models as fom

        class M(fom.Model, fom.PromptMixin):
            media_type = "image"
            ragged_batches = False
            transforms = None
            preprocess = False
            can_embed_prompts = True

            def predict(self, arg):
                raise NotImplementedError

            def embed_prompt(self, arg):
                return table[arg]

        self.model = M()


@pytest.mark.integration  # reads CIFAR images
def test_text_query_with_prompt_model(ds_emb):
    ds, emb, ids = ds_emb
    t = np.random.default_rng(2).normal(size=DIM).astype(np.float32)
    model = _Prompts({"a cat": t}).model
    key = _key()
    res = fob.compute_similarity(ds, backend=FaissSimilarityConfig, embeddings=emb, brain_key=key, model=model)
    assert res.supports_prompts
    assert res.sort_by_similarity("a cat", k=4).values("id") == nearest(emb, ids, t, 4)


@pytest.mark.integration  # reads CIFAR images
def test_text_query_with_nola_clip(ds_emb, tiny_clip, tmp_path):
    import torch

    ds, _, ids = ds_emb
    dim = tiny_clip.embed_dim
    emb = np.random.default_rng(3).normal(size=(len(ids), dim)).astype(np.float32)
    path = tmp_path / "clip-index"
    ix = EmbeddingIndex.create(path, dim, {"model_key": tiny_clip.key})
    ix.add(ids, emb)
    ix.save()
    key = _key()
    res = compute_faiss_similarity(ds, path, key, model=tiny_clip)
    assert res.supports_prompts and res.config.clip_spec is not None
    with torch.no_grad():
        t = tiny_clip.model.encode_text(tiny_clip.tokenizer(["a photo of a dog"])).float().numpy()[0]
    want = nearest(emb, ids, t, 5)
    assert ds.sort_by_similarity("a photo of a dog", k=5, brain_key=key).values("id") == want
    # a later session rebuilds the text encoder from the stored ClipSpec
    loaded = ds.load_brain_results(key, cache=False)
    assert loaded.supports_prompts and loaded.config.clip_spec["arch"] == tiny_clip.spec.arch
    assert loaded.sort_by_similarity("a photo of a dog", k=5).values("id") == want
    with pytest.raises(IndexMismatchError):
        bad = EmbeddingIndex.create(tmp_path / "bad", dim, {"model_key": "some-other-model"})
        bad.add(ids[:1], emb[:1])
        bad.save()
        compute_faiss_similarity(ds, tmp_path / "bad", _key(), model=tiny_clip)


@pytest.mark.integration  # reads CIFAR images
def test_duplicates(ds_emb):
    ds, emb, ids = ds_emb
    emb = emb.copy()
    emb[1] = emb[0] + 1e-3  # a near-duplicate pair
    res = fob.compute_similarity(ds, backend=FaissSimilarityConfig, embeddings=emb, brain_key=_key())
    res.find_duplicates(thresh=1e-3)
    assert len(res.duplicate_ids) == 1 and set(res.duplicate_ids) < {ids[0], ids[1]}
    assert res.neighbors_map


@pytest.mark.integration  # reads CIFAR images
def test_env_var_registration(ds_emb, monkeypatch):
    # The documented environment variables, parsed by a fresh BrainConfig exactly as at import.
    from fiftyone.brain.config import BrainConfig

    monkeypatch.delenv("FIFTYONE_BRAIN_CONFIG_PATH", raising=False)
    monkeypatch.setenv("FIFTYONE_BRAIN_SIMILARITY_BACKENDS", "*,faiss")
    monkeypatch.setenv("FIFTYONE_BRAIN_SIMILARITY_FAISS_CONFIG_CLS", CONFIG_CLS)
    monkeypatch.setenv("FIFTYONE_BRAIN_SIMILARITY_FAISS_INDEX_TYPE", "hnsw")
    cfg = BrainConfig()
    assert cfg.similarity_backends["faiss"] == {"config_cls": CONFIG_CLS, "index_type": "hnsw"}
    assert "sklearn" in cfg.similarity_backends
    monkeypatch.setattr(fob, "brain_config", cfg)

    ds, emb, ids = ds_emb
    key = _key()
    res = fob.compute_similarity(ds, backend="faiss", embeddings=emb, brain_key=key)
    assert isinstance(res, FaissSimilarityIndex) and res.config.index_type == "hnsw"
    assert res.index.meta["index_type"] == "hnsw"
    assert ds.sort_by_similarity(ids[2], k=3, brain_key=key).values("id") == nearest(emb, ids, emb[2], 3)
