"""What a run measures and keeps: results.json's history, per-stage statistics, resource usage."""

from __future__ import annotations

import json
import os
import resource
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import files as ckpt
from ..parallel import distributed
from .monitor import Monitor


class RunHistory:
    """The whole run's history (results.json): per-step losses, validations and finished phases."""

    def __init__(self, output_dir: Path):
        self.path = output_dir / "results.json"
        self.results: dict[str, Any] = {"phases": [], "losses": [], "val_history": [], "output_dir": str(output_dir)}

    def take_over(self, global_step: int) -> None:
        """Take over the history of results.json up to the checkpoint being resumed (steps after it are redone)."""
        try:
            saved = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return  # no history (a run killed before its first checkpoint, or an older version): start anew
        if len(saved.get("losses", [])) < global_step:
            return  # a history older than the checkpoint (written by an older version): not continued
        self.results["losses"] = saved["losses"][:global_step]
        self.results["val_history"] = [entry for entry in saved.get("val_history", []) if entry[0] <= global_step]
        self.results["phases"] = [p for p in saved.get("phases", []) if p.get("end_global_step", 1e18) <= global_step]

    def write(self, state: ckpt.TrainingState, complete: bool) -> None:
        """Rank 0: results.json, the whole run's history so far (also at every checkpoint, so a
        resumed run continues it instead of starting a new one)."""
        self.results.update(global_step=state.global_step, finished_phases=state.finished_phases, complete=complete)
        ckpt.write_json_atomic(self.path, self.results)

    def losses_since(self, global_step: int) -> list[float]:
        return list(self.results["losses"][global_step:])

    def add_loss(self, loss: float) -> None:
        self.results["losses"].append(loss)

    def add_validation(self, step: int, loss: float) -> None:
        self.results["val_history"].append((step, loss))

    def val_loss_at(self, step: int) -> float:
        return val_loss_at(self.results["val_history"], step)

    def add_phase(self, record: dict[str, Any]) -> None:
        self.results["phases"].append(record)


def val_loss_at(history: list, step: int) -> float:
    """The last validation loss recorded at ``step`` (a phase's first: its predecessor's last comes before it)."""
    return next((loss for at, loss in reversed(history) if at == step), float("nan"))


def mean_validation_loss(batch_losses: list[float]) -> float:
    """Collective: the mean of every rank's validation micro-batch losses (each the mean over its labelled
    tokens), as a run reports it whatever the ranks' shares; a rank without a process group is the world."""
    total, count = sum_over_ranks([sum(batch_losses), len(batch_losses)])
    return total / max(count, 1)


def sum_over_ranks(values: list[float]) -> list[float]:
    """Collective: ``values`` (same length on every rank) summed over the ranks; local without a process group."""
    import torch.distributed as tdist

    if not tdist.is_initialized():
        return list(values)
    return [sum(column) for column in zip(*distributed.all_gather_floats(values), strict=True)]
def format_loss(loss: float | None) -> str:
    """A loss as the log prints it: 'n/a' for none (no validation split; results.json holds null)."""
    return "n/a" if loss is None or loss != loss else f"{loss:.4f}"


def log_stage_stats(monitor: Monitor, engine, stage: int, n_stacks: int, step: int) -> None:
    """Memory and per-stack gradient norm of every stage, gathered to rank 0.

    A stack's norm is taken on each replica's own accumulated gradient, before the
    data-parallel average and before clipping (ZeRO keeps only shards afterwards), and
    logged as the mean over replicas."""
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    cuda_mb = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0
    grad_norms = engine.stack_grad_norms(n_stacks)
    gathered = distributed.all_gather_floats([stage, rss_mb, cuda_mb, *grad_norms])
    for s in sorted({int(row[0]) for row in gathered}):  # over a stage's replicas, the peak matters
        replicas = [row for row in gathered if int(row[0]) == s]
        monitor.scalars({f"memory/stage{s}_rss_mb": max(r[1] for r in replicas),
                         f"memory/stage{s}_cuda_mb": max(r[2] for r in replicas)}, step)
    for stack_id in range(len(grad_norms)):  # mean over the replicas that hold the stack
        norms = [r[3 + stack_id] for r in gathered if r[3 + stack_id] >= 0]
        if norms:
            monitor.scalar(f"grad_norm/stack{stack_id}", sum(norms) / len(norms), step)


def resource_usage() -> dict[str, float]:
    """Live process groups and resident memory, the largest over ranks (leak checks across phases)."""
    rows = distributed.all_gather_floats([len(distributed.live_process_groups()), current_rss_mb()])
    return {"process_groups": int(max(r[0] for r in rows)), "rss_mb": max(r[1] for r in rows)}


def count_process_groups() -> int:
    """The most process groups any rank holds (collective)."""
    return int(max(row[0] for row in distributed.all_gather_floats([len(distributed.live_process_groups())])))


def current_rss_mb() -> float:
    """Resident memory of this process now (not the peak)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:  # not Linux: the peak is the best there is
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
