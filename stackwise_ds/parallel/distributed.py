"""Process-group bootstrap and the few collectives the trainer needs outside DeepSpeed's engine."""

from __future__ import annotations

import os
import socket
from datetime import timedelta

import torch


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_distributed(timeout_s: int = 600) -> tuple[int, int]:
    """Start torch.distributed through DeepSpeed; return (rank, world size).

    Under the ``deepspeed`` launcher the environment already names rank, world size and
    master; a plain ``python launch/train.py`` gets a world of one on a free local port.
    The backend is DeepSpeed's choice for the accelerator it finds (nccl on GPUs, gloo on CPU).
    """
    import deepspeed
    import deepspeed.comm as dist

    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    if not dist.is_initialized():
        deepspeed.init_distributed(timeout=timedelta(seconds=timeout_s))
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return dist.get_rank(), dist.get_world_size()


def barrier() -> None:
    import deepspeed.comm as dist

    if dist.is_initialized():
        dist.barrier()


def all_gather_floats(values: list[float]) -> list[list[float]]:
    """Gather a short list of floats from every rank (same length everywhere) -> [world][len]."""
    import deepspeed.comm as dist
    from deepspeed.accelerator import get_accelerator

    device = get_accelerator().current_device_name()
    local = torch.tensor(values, dtype=torch.float64, device=device)
    gathered = [torch.zeros_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, local)
    return [g.tolist() for g in gathered]


def broadcast_object(obj, src: int = 0):
    """Rank ``src``'s Python object on every rank (small objects only)."""
    import torch.distributed as tdist

    holder = [obj]
    tdist.broadcast_object_list(holder, src=src)
    return holder[0]


def all_gather_objects(obj) -> list:
    """Every rank's small Python object, in rank order."""
    import torch.distributed as tdist

    gathered = [None] * tdist.get_world_size()
    tdist.all_gather_object(gathered, obj)
    return gathered
