"""Regroup a rack's blocks into another number of stacks without changing its function.

A Rack runs its blocks in order whatever the grouping, so ``n x b`` blocks become ``m x (n b / m)``
by renaming tensors only: global block g = i * b + j goes to stack g // b', block g % b'. Nothing
is re-initialised or rescaled (per-module seeds and the residual-projection init scale only matter
for a fresh init; here every tensor is moved as it is). Config keys that no longer fit the new
stack count (``parallel.pipeline_stages``, ``training.stack_lr_scale``, a per-phase
``training.steps_per_phase`` list of a stackwise run) are changed, and each change is reported.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch

from ..config import ConfigError, StackWiseConfig
from ..enums import TrainingArchitecture
from .consolidation import find_run_tokenizer, load_rack_state, save_consolidated


def restacked_name(name: str, old_bps: int, new_bps: int) -> str:
    """``stacks.i.blocks.j.rest`` under the new grouping; other names are kept."""
    if not name.startswith("stacks."):
        return name
    _, stack, _, block, rest = name.split(".", 4)
    new_stack, new_block = divmod(int(stack) * old_bps + int(block), new_bps)
    return f"stacks.{new_stack}.blocks.{new_block}.{rest}"


def restacked_config(config: StackWiseConfig, n_stacks: int) -> tuple[StackWiseConfig, list[str]]:
    """The config with ``n_stacks`` stacks of the same blocks, and a line per other key changed to fit."""
    arch = config.model.architecture
    total = arch.n_stacks * arch.blocks_per_stack
    if n_stacks <= 0 or total % n_stacks:
        raise ConfigError(f"--n-stacks {n_stacks} does not divide the rack's {total} blocks "
                          f"({arch.n_stacks} stacks x {arch.blocks_per_stack}): use one of "
                          f"{[s for s in range(1, total + 1) if total % s == 0]}")
    raw = config.to_dict()
    raw["model"]["architecture"] = {"n_stacks": n_stacks, "blocks_per_stack": total // n_stacks}
    changes = [f"model.architecture: {arch.n_stacks} x {arch.blocks_per_stack} -> {n_stacks} x {total // n_stacks}"]
    changes += _fit_other_keys(raw, n_stacks)
    return StackWiseConfig.from_dict(raw), changes


def _fit_other_keys(raw: dict, n_stacks: int) -> list[str]:
    """Reset the keys whose values were sized for the old stack count."""
    changes = []
    parallel, training = raw["parallel"], raw["training"]
    if parallel["pipeline_stages"] is not None and n_stacks % parallel["pipeline_stages"]:
        changes.append(f"parallel.pipeline_stages: {parallel['pipeline_stages']} -> None (= n_stacks; it must "
                       "divide n_stacks)")
        parallel["pipeline_stages"] = None
    if training["stack_lr_scale"] is not None and len(training["stack_lr_scale"]) != n_stacks:
        changes.append(f"training.stack_lr_scale: {training['stack_lr_scale']} -> None (one multiplier per stack; "
                       "set new ones if you need them)")
        training["stack_lr_scale"] = None
    steps = training["steps_per_phase"]
    stackwise = training["training_architecture"] == TrainingArchitecture.STACKWISE
    if isinstance(steps, list) and stackwise and len(steps) != n_stacks:
        changes.append(f"training.steps_per_phase: {steps} -> {steps[0]} (one value for every phase)")
        training["steps_per_phase"] = steps[0]
    return changes


def restack_state(state: dict[str, torch.Tensor], old_bps: int, new_bps: int) -> "OrderedDict[str, torch.Tensor]":
    """The same tensors under the new grouping's names, in Rack order (stack by stack)."""
    return OrderedDict((restacked_name(n, old_bps, new_bps), t) for n, t in state.items())


def restack(source: str | Path, out: str | Path, n_stacks: int, tag: str | None = None) -> tuple[Path, list[str]]:
    """Write ``out`` (.safetensors): the rack of ``source`` (a consolidated file or a checkpoint) with its
    blocks regrouped into ``n_stacks`` stacks; returns the path and the config changes made."""
    state, config = load_rack_state(source, tag)
    new_config, changes = restacked_config(config, n_stacks)
    old_bps = config.model.architecture.blocks_per_stack
    new_state = restack_state(state, old_bps, new_config.model.architecture.blocks_per_stack)
    tokenizer = find_run_tokenizer(source, tag, config.data, config.model)  # the function changes, the tokens do not
    return save_consolidated(new_state, new_config, out, tokenizer), changes
