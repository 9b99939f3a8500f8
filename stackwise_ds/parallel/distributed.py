"""Process-group bootstrap and the few collectives the trainer needs outside DeepSpeed's engine."""

from __future__ import annotations

import glob
import os
import socket
import sys
from datetime import timedelta

import torch

from ..console import deepspeed_prints


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
    if torch.cuda.is_available():
        # Before the first collective (the barrier below): NCCL binds a communicator to the device current when
        # it is made; left to device 0, every rank of a node would make its own there.
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        with deepspeed_prints():  # on CPU: "DeepSpeed deepspeed.ops.comm... built successfully"
            deepspeed.init_distributed(timeout=timedelta(seconds=timeout_s))
        unlink_shared_memory_buffer(dist.get_rank())
    return dist.get_rank(), dist.get_world_size()


def unlink_shared_memory_buffer(rank: int) -> None:
    """Remove this rank's name of DeepSpeed's CPU all-reduce buffer from /dev/shm.

    On CPU, DeepSpeed maps a ~70 MB shared-memory buffer per rank, named
    ``deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>``, and never unlinks it: every run
    (a killed one too) would leave its buffers in /dev/shm, i.e. in RAM, until reboot. Each rank
    maps all peers' buffers during ``init_distributed``, so after a barrier the names can go;
    the memory itself lives on until the last process holding a mapping exits.
    """
    import deepspeed.comm as dist

    dist.barrier()
    port = os.environ.get("MASTER_PORT", "")
    for path in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_{rank}"):
        try:
            os.unlink(path)
        except OSError:
            pass  # already gone; nothing to free


def exit_process(code: int) -> None:
    """Leave the process with ``code``, skipping interpreter teardown.

    On success the process group is destroyed first (the caller has passed its last
    collective). Then ``os._exit``: Python's normal teardown destroys torch's gloo/TCPStore
    objects in no defined order against their C++ threads and can abort a rank that finished
    its work ("terminate called without an active exception", SIGABRT), which the launcher
    reports as a failed job. No barrier here: if a peer failed at the very end, this rank must
    not wait for it for the whole collective timeout.
    """
    if code == 0:
        destroy_distributed()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def destroy_distributed() -> None:
    """Destroy the default process group, a local operation (no collective)."""
    import torch.distributed as tdist

    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()


def live_process_groups() -> list:
    """Every process group this rank is a member of, the default group included."""
    from torch.distributed import distributed_c10d

    return list(distributed_c10d._world.pg_map)


def destroy_process_groups_except(keep: list) -> int:
    """Destroy this rank's process groups that are not in ``keep`` (a local operation); returns how many.

    DeepSpeed creates a dozen groups per PipelineModule (grid, tied weights) and never frees them:
    re-forming the pipeline at every phase would otherwise leak communicators, threads and RAM
    (DeepSpeed issues #4589, #7204)."""
    import torch.distributed as tdist

    kept = {id(group) for group in keep}
    doomed = [group for group in live_process_groups()
              if id(group) not in kept and group is not tdist.GroupMember.WORLD]
    for group in doomed:
        tdist.destroy_process_group(group)
    return len(doomed)


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
