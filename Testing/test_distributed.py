"""DistributedDataParallel training with 2 CPU processes (gloo): identical weights, one bundle."""

from __future__ import annotations

import os
import socket

import numpy as np
import torch
import torch.multiprocessing as mp

from HeadCTMoLRELib.training import distributed, train


def test_shard_gives_every_rank_the_same_number_of_samples():
    order = np.arange(7)
    parts = [distributed.shard(order, distributed.DistributedContext(rank=r, world_size=3)) for r in range(3)]
    assert [len(p) for p in parts] == [3, 3, 3]
    assert sorted(np.concatenate(parts).tolist()) == sorted(np.resize(order, 9).tolist())
    assert np.array_equal(distributed.shard(order, distributed.DistributedContext()), order)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world_size: int, port: int, csv_path: str, start: str, out_dir: str, cache: str) -> None:
    from safetensors.torch import save_file

    from HeadCTMoLRELib.model import classifier as model
    from test_train import tiny_config

    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    result = train.fit(csv_path, start, out_dir, tiny_config(max_epochs=2, grad_accum_steps=1), cache_dir=cache)
    weights = {k: v.contiguous() for k, v in model.trainable_state_dict(result.model).items()}
    save_file(weights, os.path.join(os.path.dirname(out_dir), f"rank{rank}.safetensors"))


def test_two_gloo_processes_train_identical_weights_and_write_one_bundle(tmp_path):
    from safetensors.torch import load_file

    from test_data import write_toy_dataset
    from test_train import make_start_bundle

    csv_path = write_toy_dataset(tmp_path / "cases", 8, splits=("train", "val", "train"))
    start = make_start_bundle(tmp_path / "start")
    out_dir = tmp_path / "runs" / "ddp"
    mp.spawn(_rank_main, args=(2, _free_port(), str(csv_path), str(start), str(out_dir), str(tmp_path / "cache")),
             nprocs=2, join=True)
    rank0, rank1 = (load_file(str(tmp_path / "runs" / f"rank{r}.safetensors")) for r in (0, 1))
    assert rank0.keys() == rank1.keys() and all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    start_weights = load_file(str(start / "weights" / "adapters.safetensors"))
    assert any(not torch.equal(start_weights[k], rank0[k]) for k in rank0)  # it trained
    assert sorted(p.name for p in out_dir.iterdir()) == ["checkpoint", "history.json", "model"]
    from HeadCTMoLRELib.model import bundle

    assert bundle.load_bundle(out_dir / "model").manifest["training"]["world_size"] == 2
