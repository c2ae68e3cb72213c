"""Prompt tuning (NoLA stage 3) on the tiny random CLIP and real CIFAR-10 images."""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode

from conftest import cifar_files
from fiftyone_nola.core import prompt_tuning as pt
from fiftyone_nola.core.config import resolve
from fiftyone_nola.core.errors import EmptyViewError, IndexMismatchError, InvalidInputError
from fiftyone_nola.logs import lines_to


def _cfg(**kw):
    base = dict(epochs=2, batch_size=8, num_workers=0, device="cpu", seed=0)
    base.update(kw)
    return pt.TuneConfig(**base)


def _states_equal(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # The tiny model is ~10x faster on one thread when the 2 cores are shared: intra-op
    # threads then spin against each other. Results are compared at equal thread counts.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def cifar():
    """40 real CIFAR images, their true classes (used only as a learnable teacher) and names."""
    pairs = cifar_files(per_class=4)
    names = sorted({c for _, c in pairs})
    paths = [p for p, _ in pairs]
    labels = np.array([names.index(c) for _, c in pairs], dtype=np.int64)
    return paths, labels, names


@pytest.fixture(scope="module")
def W(tiny_clip):
    rng = np.random.RandomState(0)
    w = rng.randn(10, tiny_clip.embed_dim).astype(np.float32)
    return w / np.linalg.norm(w, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def batch(tiny_clip, cifar):
    paths = cifar[0][:6]
    return torch.stack([tiny_clip.transform(Image.open(p).convert("RGB")) for p in paths])


@pytest.fixture(scope="module")
def run2(tiny_clip, cifar, W):
    """The reference uninterrupted 2-epoch run (teacher = true class, a learnable target)."""
    paths, labels, names = cifar
    logs = []
    with lines_to(logs.append):
        res = pt.tune(tiny_clip, paths, labels, W, _cfg(), classes=names)
    return res, logs


@pytest.mark.integration
def test_zero_prompts_reproduce_encode_image_exactly(tiny_clip, batch, W):
    m = pt.PromptedClassifier.from_clip(tiny_clip, W, n_prompts=0).eval()
    with torch.no_grad():
        assert torch.equal(m.visual(batch), tiny_clip.model.encode_image(batch))


@pytest.mark.integration
def test_prompts_change_output_and_use_vpt_init(tiny_clip, batch, W):
    m = pt.PromptedClassifier.from_clip(tiny_clip, W, n_prompts=16).eval()
    width = tiny_clip.model.visual.class_embedding.shape[0]
    bound = (6.0 / (3 * 16 * 16 + width)) ** 0.5  # NoLA code: 16x16 whatever the patch size
    assert m.visual.prompts.shape == (1, 16, width)
    assert m.visual.prompts.abs().max() <= bound and m.visual.prompts.abs().max() > bound / 2
    with torch.no_grad():
        out = m.visual(batch)
        ref = tiny_clip.model.encode_image(batch)
    assert out.shape == ref.shape
    assert not torch.allclose(out, ref, atol=1e-4)
    # Same seed, same prompts: the init is deterministic.
    m2 = pt.PromptedClassifier.from_clip(tiny_clip, W, n_prompts=16)
    assert torch.equal(m.visual.prompts, m2.visual.prompts)


def test_trainable_parameters_are_prompts_layernorms_and_head(tiny_clip, W):
    before = {n: p.requires_grad for n, p in tiny_clip.model.named_parameters()}
    m = pt.PromptedClassifier.from_clip(tiny_clip, W, n_prompts=16)
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    lns = {
        f"visual.tower.{mn}.{pn}"
        for mn in (
            "ln_pre",
            "ln_post",
            "transformer.resblocks.0.ln_1",
            "transformer.resblocks.0.ln_2",
            "transformer.resblocks.1.ln_1",
            "transformer.resblocks.1.ln_2",
        )
        for pn in ("weight", "bias")
    }
    assert trainable == {"visual.prompts", "head.weight"} | lns
    assert set(m.trainable_state_dict()) == trainable
    assert m.head.bias is None
    # The caller's CLIP is untouched (the tower is copied).
    assert {n: p.requires_grad for n, p in tiny_clip.model.named_parameters()} == before
    assert m.visual.tower is not tiny_clip.model.visual


@pytest.mark.integration
def test_head_init_is_the_official_cde_adapter(tiny_clip, batch, W):
    """Logits start as ``W @ f`` on the raw image embedding (official ``cde_adapter``): the
    zero-shot argmax, at the temperature of the feature norm rather than CLIP's 100."""
    m = pt.PromptedClassifier.from_clip(tiny_clip, W, n_prompts=0).eval()
    with torch.no_grad():
        logits = m(batch)
        f = tiny_clip.model.encode_image(batch)
        zs = 100.0 * (f / f.norm(dim=-1, keepdim=True)) @ torch.from_numpy(W).T
    torch.testing.assert_close(logits, f @ torch.from_numpy(W).T, rtol=1e-5, atol=1e-5)
    assert torch.equal(logits.argmax(1), zs.argmax(1))
    torch.testing.assert_close(m.head.weight.detach(), torch.from_numpy(W))


@pytest.mark.integration
def test_transforms(tiny_clip, cifar):
    img = Image.open(cifar[0][0]).convert("RGB")
    mean, std = pt.clip_mean_std(tiny_clip.model)
    weak = pt.weak_transform(tiny_clip.image_size, mean, std)
    torch.testing.assert_close(weak(img), tiny_clip.transform(img))
    strong = pt.strong_transform(tiny_clip.image_size, mean, std)
    torch.manual_seed(0)
    a, b = strong(img), strong(img)
    assert a.shape == (3, 32, 32) and not torch.equal(a, b)
    names = [type(t).__name__ for t in strong.transforms]
    assert names == [
        "RandomResizedCrop",
        "RandomHorizontalFlip",
        "RandomApply",
        "RandomPerspective",
        "ColorJitter",
        "_RandomGaussianBlur",
        "ToTensor",
        "Normalize",
    ]
    assert strong.transforms[0].scale == (0.2, 1.0)
    # The official strong view: bilinear crop (torchvision's default), bicubic perspective.
    assert strong.transforms[0].interpolation == InterpolationMode.BILINEAR
    assert strong.transforms[3].interpolation == InterpolationMode.BICUBIC


@pytest.mark.integration
def test_tune_lowers_loss_and_logs_epochs(run2, cifar):
    res, logs = run2
    loss = res.history["loss"]
    assert len(loss) == 2 and all(np.isfinite(loss))
    assert loss[1] < loss[0]
    assert res.selected_epoch == 2 and res.start_epoch == 0
    assert sum("epoch " in m and "loss" in m for m in logs) == 2
    assert len(res.train_indices) == len(cifar[0]) and res.failed == []
    assert res.seconds > 0


@pytest.mark.integration
def test_tune_is_reproducible(run2, tiny_clip, cifar, W):
    paths, labels, names = cifar
    again = pt.tune(tiny_clip, paths, labels, W, _cfg(), classes=names)
    assert _states_equal(again.model.trainable_state_dict(), run2[0].model.trainable_state_dict())
    assert again.history["loss"] == run2[0].history["loss"]
    # A different seed gives a different run.
    other = pt.tune(tiny_clip, paths, labels, W, _cfg(epochs=1, seed=1), classes=names)
    assert other.history["loss"][0] != run2[0].history["loss"][0]


@pytest.mark.integration
def test_tune_is_reproducible_with_a_worker(tiny_clip, cifar, W):
    paths, labels, names = cifar
    runs = [
        pt.tune(tiny_clip, paths[:16], labels[:16], W, _cfg(epochs=1, num_workers=1), classes=names) for _ in range(2)
    ]
    assert _states_equal(runs[0].model.trainable_state_dict(), runs[1].model.trainable_state_dict())


@pytest.mark.integration
def test_resume_equals_uninterrupted_run(run2, tiny_clip, cifar, W, tmp_path, caplog):
    paths, labels, names = cifar
    first = pt.tune(tiny_clip, paths, labels, W, _cfg(epochs=1), tmp_path, classes=names)
    assert first.history["loss"] == run2[0].history["loss"][:1]
    with caplog.at_level(logging.INFO, logger="fiftyone_nola"):
        resumed = pt.tune(tiny_clip, paths, labels, W, _cfg(epochs=2), tmp_path, classes=names)
    assert resumed.start_epoch == 1 and "resuming" in caplog.text
    assert resumed.history["loss"] == run2[0].history["loss"]
    assert _states_equal(resumed.model.trainable_state_dict(), run2[0].model.trainable_state_dict())
    # Nothing left to do: the finished checkpoint is returned as is.
    done = pt.tune(tiny_clip, paths, labels, W, _cfg(epochs=2), tmp_path, classes=names)
    assert done.start_epoch == 2 and done.selected_epoch == 2
    assert _states_equal(done.model.trainable_state_dict(), run2[0].model.trainable_state_dict())


@pytest.mark.integration
def test_resume_keeps_the_teacher_agreement_choice(tiny_clip, cifar, W, tmp_path):
    paths, labels, names = cifar
    teacher = (labels >= 5).astype(np.int64)
    cfg = dict(selection="teacher_agreement", holdout_fraction=0.25)
    full = pt.tune(tiny_clip, paths, teacher, W, _cfg(epochs=3, **cfg), classes=names)
    pt.tune(tiny_clip, paths, teacher, W, _cfg(epochs=2, **cfg), tmp_path, classes=names)
    resumed = pt.tune(tiny_clip, paths, teacher, W, _cfg(epochs=3, **cfg), tmp_path, classes=names)
    assert resumed.start_epoch == 2
    assert resumed.history["agreement"] == full.history["agreement"]
    assert resumed.selected_epoch == full.selected_epoch
    assert _states_equal(resumed.model.trainable_state_dict(), full.model.trainable_state_dict())


@pytest.mark.integration
def test_tune_leaves_the_callers_rng_alone(tiny_clip, cifar, W):
    paths, labels, names = cifar
    torch.manual_seed(123)
    np.random.seed(123)
    expected = (torch.rand(3), np.random.rand(3))
    torch.manual_seed(123)
    np.random.seed(123)
    pt.tune(tiny_clip, paths[:8], labels[:8], W, _cfg(epochs=1), classes=names)
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1])


@pytest.mark.integration
def test_checkpoint_for_other_classes_or_model_is_refused(tiny_clip, cifar, W, tmp_path):
    paths, labels, names = cifar
    pt.tune(tiny_clip, paths[:8], labels[:8], W, _cfg(epochs=1), tmp_path, classes=names)
    other = names[::-1]
    with pytest.raises(IndexMismatchError, match="classes"):
        pt.tune(tiny_clip, paths[:8], labels[:8], W, _cfg(epochs=2), tmp_path, classes=other)
    fake = dataclasses.replace(tiny_clip, identity={**tiny_clip.identity, "key": "clip-other"})
    with pytest.raises(IndexMismatchError, match="CLIP"):
        pt.tune(fake, paths[:8], labels[:8], W, _cfg(epochs=2), tmp_path, classes=names)
    with pytest.raises(IndexMismatchError, match="config"):
        pt.tune(tiny_clip, paths[:8], labels[:8], W, _cfg(epochs=2, lr=1e-3), tmp_path, classes=names)


@pytest.mark.integration
def test_save_load_round_trip(run2, tiny_clip, cifar, tmp_path):
    paths, _, names = cifar
    model = run2[0].model
    pt.save_tuned(tmp_path, model, names, tiny_clip.identity, _cfg(), {"note": "test"})
    assert (tmp_path / "tuned.pt").is_file() and (tmp_path / "meta.json").is_file()
    loaded = pt.load_tuned(tmp_path, tiny_clip, classes=names)
    kw = dict(batch_size=16, num_workers=0, device="cpu")
    p1, f1 = pt.predict_tuned(model, paths, **kw)
    p2, f2 = pt.predict_tuned(loaded, paths, **kw)
    assert p1.shape == (len(paths), 10) and p1.dtype == np.float32 and f1 == f2 == []
    np.testing.assert_array_equal(p1, p2)
    np.testing.assert_allclose(p1.sum(1), 1.0, rtol=1e-5)
    with pytest.raises(IndexMismatchError):
        pt.load_tuned(tmp_path, tiny_clip, classes=names[:-1] + ["zebra"])
    fake = dataclasses.replace(tiny_clip, identity={**tiny_clip.identity, "key": "clip-other"})
    with pytest.raises(IndexMismatchError):
        pt.load_tuned(tmp_path, fake)


@pytest.mark.integration
def test_bf16_training_step_close_to_fp32(tiny_clip, batch, W, cifar):
    m = pt.PromptedClassifier.from_clip(tiny_clip, W, n_prompts=16)
    y = torch.arange(len(batch)) % 10
    losses = {}
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        m.zero_grad()
        with pt.dev.autocast(torch.device("cpu"), dtype):
            logits = m(batch)
        loss = torch.nn.functional.cross_entropy(logits.float(), y, label_smoothing=0.1)
        loss.backward()
        assert m.visual.prompts.grad is not None and torch.isfinite(m.visual.prompts.grad).all()
        losses[name] = loss.item()
    assert abs(losses["bf16"] - losses["fp32"]) < 0.05 * losses["fp32"]
    paths, labels, names = cifar
    res = pt.tune(tiny_clip, paths[:16], labels[:16], W, _cfg(epochs=1, precision="bf16"), classes=names)
    ref = pt.tune(tiny_clip, paths[:16], labels[:16], W, _cfg(epochs=1), classes=names)
    assert np.isfinite(res.history["loss"][0])
    assert abs(res.history["loss"][0] - ref.history["loss"][0]) < 0.1 * ref.history["loss"][0]


@pytest.mark.integration
def test_unlabelled_images_are_never_loaded(tiny_clip, cifar, W, tmp_path):
    paths, labels, names = cifar
    missing = [str(tmp_path / f"gone{i}.jpg") for i in range(3)]
    all_paths = paths[:12] + missing
    teacher = np.concatenate([labels[:12], [-1, -1, -1]])
    teacher[0] = -1
    res = pt.tune(tiny_clip, all_paths, teacher, W, _cfg(epochs=1), classes=names)
    assert res.failed == []  # the missing files carry -1, so they are skipped, not read
    assert sorted(res.train_indices.tolist()) == list(range(1, 12))
    with pytest.raises(EmptyViewError, match="all -1"):
        pt.tune(tiny_clip, missing, [-1, -1, -1], W, _cfg(epochs=1), classes=names)


@pytest.mark.integration
def test_corrupt_image_is_skipped(tiny_clip, cifar, W, tmp_path):
    paths, labels, names = cifar
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    all_paths = paths[:8] + [str(bad)]
    teacher = np.concatenate([labels[:8], [3]])
    res = pt.tune(tiny_clip, all_paths, teacher, W, _cfg(epochs=1, batch_size=3), classes=names)
    assert [i for i, _ in res.failed] == [8]
    assert np.isfinite(res.history["loss"][0])
    probs, failed = pt.predict_tuned(res.model, all_paths, batch_size=4, num_workers=0, device="cpu")
    assert [i for i, _ in failed] == [8]
    assert np.isnan(probs[8]).all() and np.isfinite(probs[:8]).all()


@pytest.mark.integration
def test_teacher_agreement_selection_uses_no_ground_truth(tiny_clip, cifar, W):
    paths, labels, names = cifar
    assert not any(k in ("ground_truth", "gt", "labels") for k in inspect.signature(pt.tune).parameters)
    # A learnable, non-uniform teacher unrelated to the true classes (which never enter).
    teacher = (labels >= 7).astype(np.int64)
    cfg = _cfg(epochs=3, selection="teacher_agreement", holdout_fraction=0.25)
    res = pt.tune(tiny_clip, paths, teacher, W, cfg, classes=names)
    agree = res.history["agreement"]
    hold = res.holdout_indices
    assert len(hold) == 10 and not set(hold) & set(res.train_indices)
    assert np.bincount(teacher[hold]).tolist() == [7, 3]  # stratified by teacher label
    assert len(agree) == 3 and all(0.0 <= a <= 1.0 for a in agree)
    best = max(agree)
    assert res.selected_epoch == max(i + 1 for i, a in enumerate(agree) if a == best)
    # The kept model's agreement with the *teacher* on the held-aside images is the recorded one.
    probs, _ = pt.predict_tuned(res.model, [paths[i] for i in hold], num_workers=0, device="cpu")
    assert (probs.argmax(1) == teacher[hold]).mean() == pytest.approx(agree[res.selected_epoch - 1])
    # Ground truth is no input at all: a rerun with the same teacher labels, whatever the true
    # classes are, selects the same epoch with the same agreement curve.
    again = pt.tune(tiny_clip, paths, teacher, W, cfg, classes=names)
    assert again.selected_epoch == res.selected_epoch
    assert again.history["agreement"] == agree and again.history["loss"] == res.history["loss"]


@pytest.mark.integration
def test_online_teacher_fn_sees_weak_view(tiny_clip, cifar, W):
    paths, labels, names = cifar
    seen = []

    def teacher_fn(weak):
        seen.append(tuple(weak.shape))
        return torch.zeros(len(weak), dtype=torch.long)

    res = pt.tune(tiny_clip, paths[:12], pt.OnlineTeacher(teacher_fn), W, _cfg(epochs=1, batch_size=4), classes=names)
    assert seen == [(4, 3, 32, 32)] * 3
    assert len(res.history["loss"]) == 1
    with pytest.raises(InvalidInputError):
        pt.tune(tiny_clip, paths[:4], None, W, _cfg(epochs=1), classes=names)


@pytest.mark.integration
def test_stratified_subset_and_max_samples(tiny_clip, cifar, W):
    labels = np.repeat(np.arange(4), [40, 30, 20, 10])
    idx = np.arange(100)
    a = pt.stratified_subset(idx, labels, 20, seed=0)
    assert np.array_equal(a, pt.stratified_subset(idx, labels, 20, seed=0))
    assert np.bincount(labels[a]).tolist() == [8, 6, 4, 2]
    paths, teacher, names = cifar
    res = pt.tune(tiny_clip, paths, teacher, W, _cfg(epochs=1, max_samples=20), classes=names)
    assert len(res.train_indices) == 20
    assert np.bincount(teacher[res.train_indices], minlength=10).tolist() == [2] * 10


def test_config_fits_the_hardware_and_validates():
    prof = pt.dev.hardware_profile(torch.device("cpu"))
    cfg = resolve(pt.TuneConfig(), "cpu")
    assert (cfg.epochs, cfg.batch_size, cfg.max_samples, cfg.num_workers, cfg.device) == (
        prof.tune_epochs,
        prof.tune_batch_size,
        prof.tune_max_samples,
        prof.num_workers,
        "cpu",
    )
    assert cfg.sample_cap == prof.tune_max_samples
    # What the stages record as the run config (the dataclass repr) is what for_hardware gave,
    # so tuned models stored by the previous version stay up to date.
    assert repr(cfg) == (
        f"TuneConfig(epochs={prof.tune_epochs}, batch_size={prof.tune_batch_size}, lr=0.004, "
        f"weight_decay=0.01, betas=(0.9, 0.999), n_prompts=16, label_smoothing=0.1, "
        f"precision='auto', seed=0, max_samples={prof.tune_max_samples}, "
        f"num_workers={prof.num_workers}, device='cpu', selection='fixed', holdout_fraction=0.1)"
    )
    assert pt.TuneConfig.from_dict(cfg.to_dict()) == cfg
    # A GPU gets the official schedule on every sample (resolving needs no GPU).
    gpu = resolve(pt.TuneConfig(), torch.device("cuda"))
    assert (gpu.epochs, gpu.batch_size, gpu.max_samples, gpu.sample_cap) == (50, 512, None, None)
    d = pt.TuneConfig()
    assert (d.lr, d.weight_decay, d.n_prompts, d.label_smoothing) == (4e-3, 0.01, 16, 0.1)
    with pytest.raises(InvalidInputError):
        pt.TuneConfig(selection="best_on_test")
    with pytest.raises(InvalidInputError):
        pt.TuneConfig(max_samples=-1)


def test_resolve_keeps_user_set_zeros_and_all_samples_means_all():
    prof = pt.dev.hardware_profile(torch.device("cpu"))
    mine = resolve(pt.TuneConfig(epochs=3, max_samples=pt.ALL_SAMPLES, num_workers=0), "cpu")
    assert (mine.epochs, mine.max_samples, mine.num_workers) == (3, 0, 0)
    assert (mine.batch_size, mine.device) == (prof.tune_batch_size, "cpu")
    assert mine.sample_cap is None
    labels = np.arange(600) % 3
    train, hold = pt.train._split(labels, 600, mine)
    assert len(train) == 600 and len(hold) == 0
    capped = resolve(pt.TuneConfig(max_samples=30), "cpu")
    assert len(pt.train._split(labels, 600, capped)[0]) == 30
    # Resolving a resolved config changes nothing, so a stage may resolve what it was handed.
    assert resolve(mine, "cpu") == mine


def test_all_samples_is_stored_as_before_and_checkpoints_still_match():
    """Run records, checkpoints and meta.json store "all samples" as max_samples=None, as the
    runs made before ALL_SAMPLES existed did; a GPU's fitted None and an explicit 0 are one key."""
    everything = resolve(pt.TuneConfig(max_samples=pt.ALL_SAMPLES), "cpu")
    assert everything.as_recorded().max_samples is None
    assert everything.as_recorded() == dataclasses.replace(everything, max_samples=None)
    assert everything.resume_key()["max_samples"] is None
    gpu = resolve(pt.TuneConfig(device="cpu"), torch.device("cuda"))
    assert gpu.resume_key() == dataclasses.replace(gpu, max_samples=0).resume_key()
    capped = resolve(pt.TuneConfig(max_samples=30), "cpu")
    assert capped.as_recorded() == capped


def test_weight_decay_spares_biases(tiny_clip, W):
    m = pt.PromptedClassifier.from_clip(tiny_clip, W)
    groups = pt._param_groups(m, 0.01)
    names = {id(p): n for n, p in m.named_parameters()}
    assert all(not names[id(p)].endswith("bias") for p in groups[0]["params"])
    assert all(names[id(p)].endswith("bias") for p in groups[1]["params"])
    assert groups[1]["weight_decay"] == 0.0 and groups[0]["weight_decay"] == 0.01


def test_a_model_tuned_with_the_old_head_is_refused(tiny_clip, W, tmp_path):
    """0.1 saved ``logit_scale * W`` heads for normalised features: loading one now would give
    wrong logits, so it is refused with what to do."""
    m = pt.PromptedClassifier.from_clip(tiny_clip, W, n_prompts=2)
    classes = [f"c{i}" for i in range(W.shape[0])]
    pt.save_tuned(tmp_path, m, classes, tiny_clip.identity)
    assert pt.load_tuned(tmp_path, tiny_clip, classes).num_classes == W.shape[0]
    meta = json.loads((tmp_path / pt.META_NAME).read_text())
    del meta["head"]
    (tmp_path / pt.META_NAME).write_text(json.dumps(meta))
    with pytest.raises(IndexMismatchError, match="Re-run prompt tuning"):
        pt.load_tuned(tmp_path, tiny_clip, classes)
