"""A run's start-up: distributed init, the output dir's checks, lock and preparation, the peer watchdog."""

from __future__ import annotations

import socket
import uuid
from pathlib import Path
from typing import Callable

from ..checkpoint import files as ckpt
from ..config import ParallelConfig
from ..parallel import distributed
from ..parallel.watchdog import PeerWatchdog
from .output_lock import OutputDirLock
from .save_errors import write_probe


def start_distributed(parallel: ParallelConfig, output_dir: Path) -> tuple[int, int]:
    """(rank, world size), once the process group is up and ``output_dir`` is known usable by every rank."""
    rank, world_size = distributed.init_distributed(int(parallel.collective_timeout_s))
    check_writable(output_dir)  # on every rank, before anything waits for anyone
    if world_size > 1:
        check_shared_output_dir(output_dir, rank)
    return rank, world_size


def check_writable(directory: Path) -> None:
    """Fail early, with the fix, when ``directory`` (or its existing checkpoints/, found otherwise only
    at the first save) cannot hold this run's outputs."""
    for where in (directory, directory / "checkpoints"):
        if where != directory and not where.is_dir():
            continue
        try:
            where.mkdir(parents=True, exist_ok=True)
            write_probe(where, n_bytes=2)
        except OSError as exc:
            raise PermissionError(f"{where} (under training.output_dir) is not writable ({exc.strerror}): "
                                  "make it writable (chmod u+w) or choose a training.output_dir you can write to"
                                  ) from exc


def check_shared_output_dir(directory: Path, rank: int) -> None:
    """Collective: every rank must see the files rank 0 writes in ``directory``.

    Checkpoints are written by every rank into one folder and resumed from it, so on several
    nodes the output dir must be on a filesystem they all mount; otherwise each node would keep
    a part of every checkpoint. Fails on every rank, naming the ranks and hosts that miss it."""
    token = distributed.broadcast_object(uuid.uuid4().hex if rank == 0 else None)
    probe = directory / f".shared_probe_{token}"
    if rank == 0:
        probe.write_text(token)
    distributed.barrier()
    try:
        seen = probe.read_text() == token
    except OSError:
        seen = False
    blind = [f"rank {r} on {host}" for r, (ok, host) in enumerate(distributed.all_gather_objects(
        (seen, socket.gethostname()))) if not ok]
    distributed.barrier()  # everyone has looked before the probe goes
    if rank == 0:
        probe.unlink(missing_ok=True)
    if blind:
        raise PermissionError(
            f"training.output_dir {directory} is not shared between the nodes: {', '.join(blind)} cannot see "
            "the files rank 0 writes there, so no checkpoint would be whole; put training.output_dir on a "
            "filesystem every node mounts (NFS, Lustre, ...) at the same path")


def lock_output_dir(output_dir: Path, rank: int, world_size: int) -> OutputDirLock:
    """Rank 0 takes the output dir's lock; a refusal is raised on every rank, naming the holder."""
    lock, outcome = OutputDirLock(output_dir), None
    if rank == 0:
        try:
            outcome = ("notice", lock.acquire())
        except ckpt.CheckpointError as exc:
            outcome = ("refused", str(exc))
    if world_size > 1:
        outcome = distributed.broadcast_object(outcome)
    kind, text = outcome
    if kind == "refused":
        raise ckpt.CheckpointError(text)
    if text and rank == 0:
        print(text, flush=True)
    return lock


def start_watchdog(output_dir: Path, rank: int, world_size: int, peer_timeout_s: float) -> PeerWatchdog | None:
    """Collective: the watchdog that stops this rank when a peer dies (none on a single rank)."""
    if world_size == 1:
        return None
    run_id = distributed.broadcast_object(uuid.uuid4().hex[:12] if rank == 0 else None)
    return PeerWatchdog(output_dir / ".heartbeat" / run_id, rank, world_size, timeout_s=peer_timeout_s).start()


def prepare_output_dir(output_dir: Path, rank: int, write_config: Callable[[Path], None] | None) -> None:
    """Collective: rank 0 creates checkpoints/ and has ``write_config`` (the run config's ``to_yaml``) write
    config.yaml (None: keeps it)."""
    if rank == 0:
        (output_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        if write_config is not None:
            write_config(output_dir / "config.yaml")
    distributed.barrier()
