"""Running `train.fit` under ``torchrun`` (one process per GPU or CPU worker, one or many nodes).

``torchrun --nproc_per_node N [--nnodes M ...] -m HeadCTMoLRELib.cli train ...`` sets RANK, WORLD_SIZE and
LOCAL_RANK (and MASTER_ADDR / MASTER_PORT); `init_from_env` then joins the process group (NCCL on CUDA,
gloo on CPU) and picks ``cuda:LOCAL_RANK``. Without those variables everything is a no-op and the
context describes a single process. The training loop wraps the model in DistributedDataParallel,
shards each epoch's sample list with `shard`, validates on rank 0, and only rank 0 writes files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np


@dataclass
class DistributedContext:
    """rank / world_size / local_rank of this process, its torch device, and whether a process group
    is active (``enabled``). ``is_main`` is rank 0, the only one that writes files."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: object = None
    enabled: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_from_env(device_request: str = "auto") -> DistributedContext:
    """Join the process group described by torchrun's environment (if any) and choose the device.

    ``device_request``: "auto", "cpu", "cuda"...; under torchrun with CUDA each process takes
    ``cuda:LOCAL_RANK``. Returns the context; call `cleanup` at the end.
    """
    import torch
    import torch.distributed as dist

    from ..inference import select_device

    world_size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    device = select_device(device_request)
    if world_size <= 1:
        return DistributedContext(device=device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world_size)
    return DistributedContext(rank=rank, world_size=world_size, local_rank=local_rank, device=device, enabled=True)


def wrap_model(model, context: DistributedContext):
    """DistributedDataParallel around ``model`` when a group is active (every trainable parameter is
    used in each forward, so find_unused_parameters stays off); the model itself otherwise."""
    if not context.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [context.device.index] if context.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=False)


def unwrap(model):
    return getattr(model, "module", model)


def shard(indices: np.ndarray, context: DistributedContext) -> np.ndarray:
    """This rank's part of an epoch's sample list: padded (wrapping around) to a multiple of the world
    size so that every rank runs the same number of steps, then every world_size-th element."""
    if context.world_size <= 1 or len(indices) == 0:
        return indices
    padded_length = -(-len(indices) // context.world_size) * context.world_size
    padded = np.resize(indices, padded_length)
    return padded[context.rank::context.world_size]


def barrier(context: DistributedContext) -> None:
    if context.enabled:
        import torch.distributed as dist

        dist.barrier()


def any_rank(flag: bool, context: DistributedContext) -> bool:
    """True on every rank when ``flag`` is True on any rank (so all ranks stop at the same step)."""
    if not context.enabled:
        return bool(flag)
    import torch
    import torch.distributed as dist

    value = torch.tensor([1.0 if flag else 0.0], device=context.device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


def broadcast_from_main(obj, context: DistributedContext):
    """Rank 0's ``obj`` (a JSON-able value) on every rank; sent as JSON bytes (no pickle)."""
    if not context.enabled:
        return obj
    import json

    import torch
    import torch.distributed as dist

    payload = json.dumps(obj).encode("utf-8") if context.is_main else b""
    length = torch.tensor([len(payload)], dtype=torch.int64, device=context.device)
    dist.broadcast(length, src=0)
    buffer = torch.zeros(int(length.item()), dtype=torch.uint8, device=context.device)
    if context.is_main:
        buffer.copy_(torch.frombuffer(bytearray(payload), dtype=torch.uint8))
    dist.broadcast(buffer, src=0)
    return json.loads(bytes(buffer.cpu().tolist()).decode("utf-8"))


def cleanup(context: DistributedContext) -> None:
    """Leave and destroy the process group (after a final barrier)."""
    if context.enabled:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
