"""Data-parallel prompt tuning: 2 gloo processes under torchrun train what one process trains.

The DDP runs are real ``torchrun --nproc-per-node=2`` launches of this file (its ``__main__``
part is the worker); the single-process references run in the test process. Sampler and
sharding properties are checked in-process.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO, cifar_files
from fiftyone_nola.core import distributed as dt
from fiftyone_nola.core import prompt_tuning as pt
from fiftyone_nola.logs import lines_to

pytestmark = pytest.mark.slow

EPOCHS_FIRST, EPOCHS_RESUMED = 2, 3


def _cfg(epochs: int) -> pt.TuneConfig:
    # 30 images, 6 held aside for teacher_agreement: 24 to train = 3 global batches of 8 (4 per
    # rank); holdout sharding, agreement reduction and best-epoch selection are all exercised.
    return pt.TuneConfig(
        epochs=epochs,
        batch_size=8,
        num_workers=0,
        device="cpu",
        seed=0,
        selection="teacher_agreement",
        holdout_fraction=0.2,
    )


def _ragged_cfg() -> pt.TuneConfig:
    # 6 images < batch 8: one ragged global batch per epoch, 3 images per rank, one of them
    # unreadable, so the ranks hold 3 and 2 usable images: gradients must be count-weighted.
    return pt.TuneConfig(epochs=2, batch_size=8, num_workers=0, device="cpu", seed=0)


def _ragged_inputs(root, paths, teacher):
    return paths[:5] + [str(Path(root) / "broken.jpg")], teacher[:6]


def _data(embed_dim: int):
    pairs = cifar_files(per_class=3)
    names = sorted({c for _, c in pairs})
    paths = [p for p, _ in pairs]
    teacher = np.array([names.index(c) for _, c in pairs], dtype=np.int64)
    rng = np.random.RandomState(0)
    W = rng.randn(10, embed_dim).astype(np.float32)
    return paths, teacher, names, W / np.linalg.norm(W, axis=1, keepdims=True)


# --------------------------------------------------------------------------- worker (torchrun)


def _worker(out_dir: str, ckpt_dir: str) -> None:
    """One torchrun rank: tune 2 epochs, then resume to 3, recording loads, logs and saves."""
    from fiftyone_nola.core.models import load_clip, tiny_clip_spec

    torch.set_num_threads(1)
    ctx = dt.init_distributed(device="cpu")
    assert ctx.world_size == 2 and ctx.backend == "gloo"
    loaded, saves = [], []
    real_save, real_getitem = torch.save, pt._KeyedImageDataset.__getitem__

    def counting_save(obj, f, *a, **k):
        if isinstance(f, (str, os.PathLike)):  # not the in-memory saves of object collectives
            saves.append(str(f))
        return real_save(obj, f, *a, **k)

    def recording_getitem(self, key):
        loaded.append([int(k) for k in key])
        return real_getitem(self, key)

    torch.save = counting_save
    pt._KeyedImageDataset.__getitem__ = recording_getitem
    clip = load_clip(tiny_clip_spec())
    paths, teacher, names, W = _data(clip.embed_dim)
    for epochs in (EPOCHS_FIRST, EPOCHS_RESUMED):
        logs = []
        del loaded[:], saves[:]
        # A fresh tune call: all it knows of the first one is what rank 0 reads from the file.
        with lines_to(logs.append):
            res = pt.tune(clip, paths, teacher, W, _cfg(epochs), ckpt_dir, classes=names)
        out = Path(out_dir)
        real_save(
            {
                "state": res.model.trainable_state_dict(),
                "history": res.history,
                "selected": res.selected_epoch,
                "start": res.start_epoch,
                "world": res.world_size,
                "loaded": list(loaded),
                "saves": len(saves),
                "logs": logs,
            },
            out / f"rank{ctx.rank}_{epochs}.pt",
        )
        if ctx.is_main:
            shutil.copy(Path(ckpt_dir) / pt.CHECKPOINT_NAME, out / f"checkpoint_{epochs}.pt")
        dt.barrier(ctx)
    rpaths, rteacher = _ragged_inputs(out_dir, paths, teacher)
    res = pt.tune(clip, rpaths, rteacher, W, _ragged_cfg(), classes=names)
    real_save(
        {"state": res.model.trainable_state_dict(), "history": res.history, "failed": res.failed},
        Path(out_dir) / f"rank{ctx.rank}_ragged.pt",
    )
    dt.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(out_dir: Path, ckpt_dir: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=1",
        "--nproc-per-node=2",
        "--master-addr=127.0.0.1",
        f"--master-port={_free_port()}",
        __file__,
        str(out_dir),
        str(ckpt_dir),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


# --------------------------------------------------------------------------- the DDP runs


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_clip):
    """DDP: 2 epochs, then resumed to 3; single process: the same, on its own checkpoint."""
    root = tmp_path_factory.mktemp("ddp")
    single_ckpt = root / "single_ckpt"
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    _torchrun(root, root / "ddp_ckpt")
    paths, teacher, names, W = _data(tiny_clip.embed_dim)
    out = {}
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for epochs in (EPOCHS_FIRST, EPOCHS_RESUMED):
            ranks = [torch.load(root / f"rank{r}_{epochs}.pt", weights_only=False) for r in (0, 1)]
            ddp_state = torch.load(root / f"checkpoint_{epochs}.pt", weights_only=True)
            single = pt.tune(tiny_clip, paths, teacher, W, _cfg(epochs), single_ckpt, classes=names)
            single_state = torch.load(single_ckpt / pt.CHECKPOINT_NAME, weights_only=True)
            out[epochs] = (ranks, ddp_state, single, single_state)
        rpaths, rteacher = _ragged_inputs(root, paths, teacher)
        ranks = [torch.load(root / f"rank{r}_ragged.pt", weights_only=False) for r in (0, 1)]
        out["ragged"] = ranks, pt.tune(tiny_clip, rpaths, rteacher, W, _ragged_cfg(), classes=names)
    finally:
        torch.set_num_threads(n)
    return out


def _assert_close_states(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.integration
@pytest.mark.parametrize("epochs", [EPOCHS_FIRST, EPOCHS_RESUMED])
def test_ddp_matches_single_process(runs, epochs):
    ranks, ddp_ckpt, single, single_ckpt = runs[epochs]
    # Both ranks end with the same model, which is the single-process one.
    assert all(torch.equal(ranks[0]["state"][k], ranks[1]["state"][k]) for k in ranks[0]["state"])
    _assert_close_states(ranks[0]["state"], single.model.trainable_state_dict())
    # The last epoch's parameters too (teacher_agreement may have kept an earlier one).
    _assert_close_states(ddp_ckpt["model"], single_ckpt["model"])
    for r in ranks:
        assert r["world"] == 2 and r["selected"] == single.selected_epoch
        np.testing.assert_allclose(r["history"]["loss"], single.history["loss"], rtol=1e-5)
        assert r["history"]["agreement"] == single.history["agreement"]
    assert len(single.history["loss"]) == epochs


@pytest.mark.integration
def test_uneven_rank_shares_weigh_gradients_by_image_count(runs):
    ranks, single = runs["ragged"]
    assert single.failed and [i for i, _ in single.failed] == [5]
    for r in ranks:
        _assert_close_states(r["state"], single.model.trainable_state_dict())
        np.testing.assert_allclose(r["history"]["loss"], single.history["loss"], rtol=1e-5)
        assert r["failed"] == single.failed  # rank 1's failure is known to rank 0 too


@pytest.mark.integration
def test_ddp_resume_continues_from_the_checkpoint(runs):
    ranks, ddp_ckpt, _, _ = runs[EPOCHS_RESUMED]
    assert [r["start"] for r in ranks] == [EPOCHS_FIRST] * 2
    assert ddp_ckpt["epoch"] == EPOCHS_RESUMED
    # Only the new epoch was loaded, on each rank.
    assert {e for r in ranks for e, _ in r["loaded"]} == {EPOCHS_FIRST}
    assert any("resuming" in m for m in ranks[0]["logs"])


@pytest.mark.integration
def test_only_rank0_writes_checkpoints_and_logs(runs):
    for epochs, started in ((EPOCHS_FIRST, 0), (EPOCHS_RESUMED, EPOCHS_FIRST)):
        ranks = runs[epochs][0]
        assert ranks[0]["saves"] == epochs - started and ranks[1]["saves"] == 0
        assert ranks[0]["logs"] and ranks[1]["logs"] == []


@pytest.mark.integration
def test_ranks_load_disjoint_halves_of_each_global_batch(runs):
    ranks, _, single, _ = runs[EPOCHS_FIRST]
    sampler = dt.EpochBatchSampler(len(single.train_indices), 8, seed=0, drop_last=True)
    for epoch in range(EPOCHS_FIRST):
        sampler.set_epoch(epoch)
        per_rank = [[i for e, i in r["loaded"] if e == epoch] for r in ranks]
        assert not set(per_rank[0]) & set(per_rank[1])
        expected = np.concatenate(sampler.global_batches())
        assert sorted(per_rank[0] + per_rank[1]) == sorted(expected.tolist())
        assert len(set(expected.tolist())) == len(single.train_indices)  # 24 = 3 full batches


@pytest.mark.integration
def test_torchrun_tune_command_labels_the_dataset(tmp_path):
    import fiftyone as fo

    from fiftyone_nola.cli import main

    pairs = cifar_files(per_class=2, classes=["cat", "dog", "ship"])
    tiny = ["--clip-arch", "nola-tiny-clip", "--clip-pretrained", "", "--random-init"]
    name = f"ddp-cli-{os.getpid()}"
    try:
        ds = fo.Dataset(name)
        ds.add_samples([fo.Sample(filepath=p) for p, _ in pairs], progress=False)
        assert (
            main(
                [
                    "auto-label",
                    "--dataset",
                    name,
                    "--classes",
                    "cat,dog,ship",
                    "--no-tune",
                    "--dino",
                    "nola_tiny_vit",
                    "--workers",
                    "0",
                    *tiny,
                ]
            )
            == 0
        )
        out = tmp_path / "summary.json"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes=1",
            "--nproc-per-node=2",
            "--master-addr=127.0.0.1",
            f"--master-port={_free_port()}",
            "-m",
            "fiftyone_nola",
            "tune",
            "--dataset",
            name,
            "--epochs",
            "2",
            "--batch-size",
            "4",
            "--workers",
            "0",
            "--device",
            "cpu",
            "--json",
            str(out),
            *tiny,
        ]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        summary = json.loads(out.read_text())
        assert summary["tune"]["selected_epoch"] == 2 and summary["predict"]["labelled"] == 6
        assert proc.stdout.count("epoch 2/2: loss") == 1  # rank 0 alone logs
        assert "over 2 processes (2 each)" in proc.stdout
        ds.reload()  # the field was added by another process
        assert ds.count("nola.label") == 6
    finally:
        if name in fo.list_datasets():
            fo.delete_dataset(name)


# --------------------------------------------------------------------------- in-process


@pytest.mark.parametrize("n,batch,world,drop", [(24, 8, 2, True), (23, 8, 3, False), (5, 8, 2, False)])
def test_sampler_shards_are_the_single_process_batches(n, batch, world, drop):
    single = dt.EpochBatchSampler(n, batch, seed=3, drop_last=drop)
    shards = [dt.EpochBatchSampler(n, batch, seed=3, drop_last=drop, rank=r, world_size=world) for r in range(world)]
    for epoch in (0, 1):
        for s in [single, *shards]:
            s.set_epoch(epoch)
        steps = list(zip(single, *shards))
        assert len(steps) == len(list(single)) == len(single) == len(shards[0])
        for whole, *parts in steps:
            assert [k for p in parts for k in p] == whole  # rank order = batch order
            assert max(map(len, parts)) - min(map(len, parts)) <= 1
        assert all(e == epoch for whole, *_ in steps for e, _ in whole)
    single.set_epoch(0)
    first = [i for b in single for _, i in b]
    single.set_epoch(1)
    assert first != [i for b in single for _, i in b]  # a new shuffle every epoch


def test_shard_slice_covers_everything_once():
    for n in (0, 1, 7, 8):
        for world in (1, 2, 3):
            parts = [list(range(n))[dt.shard_slice(n, r, world)] for r in range(world)]
            assert sum(parts, []) == list(range(n))


@pytest.mark.integration
def test_augmentation_is_a_function_of_seed_epoch_and_index(tiny_clip):
    paths = [p for p, _ in cifar_files(per_class=1)][:3]
    mean, std = pt.clip_mean_std(tiny_clip.model)
    ds = pt._KeyedImageDataset(paths, pt.strong_transform(32, mean, std), seed=0)
    torch.manual_seed(1)
    a = ds[(0, 2)][1]
    torch.manual_seed(2)
    ds[(0, 1)]
    assert torch.equal(ds[(0, 2)][1], a)  # neither the global RNG nor item order matters
    assert not torch.equal(ds[(1, 2)][1], a)
    assert not torch.equal(pt._KeyedImageDataset(paths, ds.transform, seed=1)[(0, 2)][1], a)


def test_single_process_helpers_are_no_ops():
    ctx = dt.context()
    assert not ctx.enabled and ctx.is_main and ctx.world_size == 1
    assert dt.init_distributed(device="cpu") == ctx  # no torchrun environment
    t = torch.ones(3)
    assert dt.all_reduce_sum(ctx, t) is t and torch.equal(t, torch.ones(3))
    assert dt.sum_over_ranks(ctx, 2, 3.5) == (2.0, 3.5)
    assert dt.broadcast_object(ctx, {"a": 1}) == {"a": 1}
    assert dt.run_on_main(ctx, lambda: 7) == 7
    assert ctx.device_for(torch.device("cuda")) == torch.device("cuda")


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])
    print(json.dumps({"rank": os.environ.get("RANK"), "ok": True}), flush=True)
    # Everything is written and the process group destroyed: skip interpreter finalization, where
    # gloo's worker threads occasionally abort the process ("terminate called without an active
    # exception", SIGABRT, seen once in a clean-clone run) after a rank's work is done.
    os._exit(0)
