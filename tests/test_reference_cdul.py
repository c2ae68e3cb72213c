"""Faithfulness of the CDUL classifier training to the reproduction study's code, on golden values.

CDUL has no official code; the reference is the reproduction study github.com/cs-mshah/CDUL
(arXiv 2405.11574) at commit cac809f86171 (cac809f86171f73e0e9c0c48cb6d538143157afb).
``tests/golden/cdul_reference.json`` was written by a throwaway script kept outside this repo:
it pulled ``Trainer.fit``, ``Trainer.early_stopping``, ``Trainer.train`` and
``Trainer.save_checkpoint`` out of ``src/train.py`` with ``ast`` and ran them unmodified in a
sandbox namespace, with the real ``torchmetrics.regression.KLDivergence`` loss (as
``cfg.train.loss`` instantiates it) and the real ``torch.optim.Adam``. Stubs stood in for what
is not the method: the VOC data pipeline (an in-memory loader, batch order
``torch.randperm(N, Generator seeded 0)`` per epoch, pseudo-label cache in a dict written by
``update_pseudo_labels``), ResNet-101 (a tiny ``nn.Linear`` head on seeded features, or a table
of logits), wandb / loguru / tqdm, ``validation`` and ``resume_checkpoint``; early stopping
(which reads ground truth) was off. Inputs are stored in the JSON; the JSON's ``command``
field records the versions and command. No reproduction code is part of this repository.

Cases:

* ``loss_and_label_step``  ``Trainer.train`` for one epoch of one batch with labels refined in it:
                           the training loss KL(softmax(logits) || y/Σy), its gradient w.r.t. the
                           logits, the label loss KL(y/Σy || softmax) and its gradient w.r.t. y,
                           and the refined labels sigmoid(logit(y) − psi(y)·grad).
* ``training_run``         ``Trainer.fit`` for 6 epochs (warm-up 2, labels refined every 2nd epoch,
                           batch 4, Adam lr 1e-2): head weights, labels and mean loss after every epoch.
* ``schedules``            ``Trainer.fit``'s label-update epochs for the two shipped configs
                           (configs/config.yaml, configs/experiment/voc2012.yaml) and a toy one.

Not matched on purpose (see README, differences): the CLIP logit scale of the initial labels
(100, where the reproduction divides by log 100), the head on cached features and its optimiser
settings, and the ground-truth early stopping.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fiftyone_nola.core import cdul as ml
from fiftyone_nola.core.config import resolve

GOLDEN = json.loads((Path(__file__).parent / "golden" / "cdul_reference.json").read_text())
CASES = GOLDEN["cases"]
PAPER_CFG = GOLDEN["train_config"]["configs/experiment/voc2012.yaml"]


def test_golden_provenance():
    assert GOLDEN["commit"].startswith("cac809f86171")
    assert "Trainer.train" in GOLDEN["extracted"]["src/train.py"]
    assert PAPER_CFG["loss"]["_target_"] == "torchmetrics.regression.KLDivergence"


def test_training_loss_and_its_gradient_match_reference():
    case = CASES["loss_and_label_step"]
    logits = torch.tensor(case["logits"], dtype=torch.float32, requires_grad=True)
    y = torch.tensor(case["labels"], dtype=torch.float32)
    loss = ml.per_sample_loss(logits, y, "kl").mean()
    loss.backward()
    assert loss.item() == pytest.approx(case["loss"], abs=1e-6)
    np.testing.assert_allclose(logits.grad.numpy(), np.array(case["grad_logits"]), atol=1e-6)


def test_label_gradient_matches_reference():
    case = CASES["loss_and_label_step"]
    logits = torch.tensor(case["logits"], dtype=torch.float64)
    y = torch.tensor(case["labels"], dtype=torch.float64)
    label_loss = ml.per_sample_label_loss(logits, y, "kl").mean()
    assert label_loss.item() == pytest.approx(case["label_loss"], abs=1e-6)
    # The reference differentiates the batch-mean loss: ours is per sample, so divide by B.
    grad = ml.label_gradient(logits, y, "kl") / case["batch_size"]
    np.testing.assert_allclose(grad.numpy(), np.array(case["label_grad"]), atol=1e-6)


def test_label_step_matches_reference():
    case = CASES["loss_and_label_step"]
    logits = torch.tensor(case["logits"], dtype=torch.float64)
    y = np.array(case["labels"])
    grad = ml.label_gradient(logits, torch.from_numpy(y), "kl").numpy()
    # label_lr = 1/B reproduces the reference's step on its batch-mean gradient.
    new = ml.label_update(y, grad, 1.0 / case["batch_size"], sigma=case["sigma"])
    np.testing.assert_allclose(new, np.array(case["labels_after"]), atol=1e-6)
    assert not np.allclose(new, y, atol=1e-3)  # the step is large enough to be checked


@pytest.mark.parametrize("snap", CASES["training_run"]["per_epoch"], ids=lambda s: f"epoch{s['epoch']}")
def test_training_run_matches_reference_epoch_by_epoch(snap):
    run = CASES["training_run"]
    x = np.array(run["features"], dtype=np.float32)
    y = np.array(run["labels"], dtype=np.float32)
    cfg = ml.TrainConfig(
        epochs=snap["epoch"],
        lr=run["lr"],
        batch_size=run["batch_size"],
        update_every=run["update_every"],
        warmup=run["warmup"],
        label_lr=1.0 / run["batch_size"],
        seed=run["seed"],
        device="cpu",
    )
    model, refined, hist = ml.train_multilabel_classifier(x, y, cfg)
    if snap["epoch"] == 1:  # same start: the reference built nn.Linear right after manual_seed(seed)
        torch.manual_seed(run["seed"])
        init = torch.nn.Linear(x.shape[1], y.shape[1])
        np.testing.assert_allclose(init.weight.detach().numpy(), np.array(run["init"]["weight"]), atol=1e-7)
    updated = [s["epoch"] for s in run["per_epoch"][: snap["epoch"]] if s["labels_updated"]]
    assert hist["update_epochs"] == updated
    assert hist["loss"][-1] == pytest.approx(snap["mean_loss"], abs=1e-6)
    np.testing.assert_allclose(model.net.weight.detach().numpy(), np.array(snap["weight"]), atol=1e-5)
    np.testing.assert_allclose(model.net.bias.detach().numpy(), np.array(snap["bias"]), atol=1e-5)
    np.testing.assert_allclose(refined, np.array(snap["labels"]), atol=1e-6)


def test_training_run_refines_labels_in_the_last_epoch_too():
    """As in the reference: labels refined in the final epoch are returned, not trained on."""
    run = CASES["training_run"]
    last = run["per_epoch"][-1]
    assert last["labels_updated"] and last["epoch"] == run["epochs"]
    assert not np.allclose(last["labels"], run["per_epoch"][-2]["labels"])


@pytest.mark.parametrize("name", sorted(CASES["schedules"]))
def test_label_update_epochs_match_reference(name):
    s = CASES["schedules"][name]
    cfg = ml.TrainConfig(
        epochs=s["max_epochs"],
        warmup=s["warmup"],
        update_every=s["pseudo_update_frequency"],
        batch_size=2,
        device="cpu",
    )
    assert cfg.update_epochs() == s["update_epochs"]
    x = np.eye(2, 3, dtype=np.float32)
    _, _, hist = ml.train_multilabel_classifier(x, np.full((2, 2), 0.5, np.float32), cfg)
    assert hist["update_epochs"] == s["update_epochs"]


def test_defaults_are_the_reproductions_formulation_and_schedule():
    cfg = resolve(ml.TrainConfig(), torch.device("cuda"))  # a GPU's defaults: the paper's
    assert cfg.loss == "kl"
    assert (cfg.epochs, cfg.update_every, cfg.warmup) == (
        PAPER_CFG["max_epochs"],
        PAPER_CFG["pseudo_update_frequency"],
        PAPER_CFG["warmup"],
    )
    assert cfg.update_epochs() == CASES["schedules"]["experiment/voc2012.yaml"]["update_epochs"]
    assert cfg.label_sigma == PAPER_CFG["sigma"]
    assert cfg.label_lr == pytest.approx(1.0 / PAPER_CFG["batch_size"])  # its batch-mean gradient
    assert PAPER_CFG["optimizer"]["_target_"] == "torch.optim.Adam" and cfg.weight_decay == 0.0


def test_hardware_fitted_schedule_is_described():
    cpu = resolve(ml.TrainConfig(), "cpu")
    assert (cpu.epochs, cpu.update_every, cpu.warmup) == (30, 3, 3) and cpu.device == "cpu"
    paper = resolve(ml.TrainConfig(), torch.device("cuda"))
    assert len(cpu.update_epochs()) == len(paper.update_epochs())  # same shape, shorter
    line = ml.schedule_message(cpu)
    assert "cpu" in line and "30 epochs" in line and "100/10/10 runs on a GPU" in line
    assert resolve(ml.TrainConfig(epochs=7), "cpu").epochs == 7
    assert resolve(ml.TrainConfig(update_every=0, warmup=0), "cpu").update_epochs() == []  # 0 is kept
    gpu = resolve(ml.TrainConfig(), torch.device("cuda"))
    assert (gpu.epochs, gpu.update_every, gpu.warmup) == (100, 10, 10) and gpu.device == "cuda"
    line = ml.schedule_message(gpu)
    assert "paper's" in line and "20, 30, 40, ..., 100" in line


# ------------------------------------------------------------------------------------------
# The ranking score: what mAP and the decision rules see


def _shifted(model, v, b0):
    """The same head plus a per-image constant ``v·x + b0`` added to every class's logit."""
    other = ml.MultiLabelHead(model.in_features, model.num_classes)
    other.load_state_dict(model.state_dict())
    with torch.no_grad():
        other.net.weight += torch.as_tensor(v)[None, :]
        other.net.bias += b0
    other.score = model.score
    return other


def test_ranking_score_is_what_the_kl_loss_determines():
    """The KL loss cannot see a per-image shift of all logits, so the score must not either.

    Softmax scores are invariant to it; sigmoid scores (what the head returned before) change
    with it and re-rank images across each class, so mAP would depend on an untrained quantity.
    """
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 6)).astype(np.float32)
    pres = rng.random((60, 4)) < 0.4
    y = np.where(pres, 0.8, 0.1).astype(np.float32)
    model, _, _ = ml.train_multilabel_classifier(x, y, ml.TrainConfig(epochs=5, update_every=0, lr=1e-2, device="cpu"))
    assert model.score == "softmax"
    shifted = _shifted(model, 3.0 * rng.normal(size=6).astype(np.float32), 1.5)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    with torch.no_grad():
        l1, l2 = ml.per_sample_loss(model(xt), yt, "kl"), ml.per_sample_loss(shifted(xt), yt, "kl")
    np.testing.assert_allclose(l1.numpy(), l2.numpy(), atol=1e-5)  # same loss: same training signal
    s1, s2 = ml.predict_multilabel(model, x), ml.predict_multilabel(shifted, x)
    np.testing.assert_allclose(s1, s2, atol=1e-6)
    np.testing.assert_allclose(s1.sum(1), 1.0, atol=1e-5)
    assert ml.mean_average_precision(pres, s1) == pytest.approx(ml.mean_average_precision(pres, s2))
    sig1 = ml.predict_multilabel(model, x, score="sigmoid")
    sig2 = ml.predict_multilabel(shifted, x, score="sigmoid")
    assert abs(ml.mean_average_precision(pres, sig1) - ml.mean_average_precision(pres, sig2)) > 0.01


def test_bce_heads_rank_by_sigmoid_and_the_score_survives_save_load(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(20, 5)).astype(np.float32)
    y = rng.uniform(0.05, 0.95, size=(20, 3)).astype(np.float32)
    for loss, score in (("kl", "softmax"), ("bce", "sigmoid")):
        model, _, _ = ml.train_multilabel_classifier(x, y, ml.TrainConfig(epochs=2, loss=loss, device="cpu"))
        assert ml.head_score(model) == score
        path = tmp_path / f"{loss}.pt"
        meta = ml.save_classifier(path, model, ["a", "b", "c"])
        loaded, info = ml.load_classifier(path)
        assert info["score"] == score and ml.head_score(loaded) == score
        np.testing.assert_allclose(ml.predict_multilabel(loaded, x), ml.predict_multilabel(model, x), atol=1e-7)
    # A head saved before the score was recorded keeps its sigmoid scores.
    info = json.loads(meta.read_text())
    del info["score"]
    meta.write_text(json.dumps(info))
    assert ml.head_score(ml.load_classifier(path)[0]) == "sigmoid"
