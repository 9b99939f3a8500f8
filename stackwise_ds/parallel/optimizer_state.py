"""AdamW moments per pipeline layer, whatever the sharding: the optimizer's hand-over between phases.

With ``training.optimizer_across_phases: carry``, the end of a phase writes, next to each layer
file, the full (unsharded) moments of the layer's trainable parameters and the optimizer's step
count; the next phase, on whatever layout and ZeRO-1 partitioning it builds, puts them back into
its own optimizer, for each layer from the file of the layer it starts as (a grown unit takes its
source's moments). This is DeepSpeed's universal-checkpoint idea (per-parameter fp32 state,
independent of the partitioning) applied at every phase change.

Three optimizer shapes are handled: DeepSpeed's ZeRO-1 and BF16 wrappers, whose base AdamW holds one
flat fp32 partition per param group (read and written per parameter through DeepSpeed's
``safe_get/set_full_optimizer_state``, which all-reduce over the stage's data-parallel group), and a
plain ``torch.optim.AdamW`` (fp32 without ZeRO), read and written per parameter. The flat partitions
share one step count, so a parameter that starts a phase without moments (a fresh unit) gets zero
moments and the group's carried step; the plain optimizer keeps each parameter's own count.
"""

from __future__ import annotations

import torch
from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
from deepspeed.utils import safe_get_full_optimizer_state, safe_set_full_optimizer_state
from torch import nn

MOMENTS = ("exp_avg", "exp_avg_sq")


def layer_moments(engine, modules: dict[int, nn.Module]) -> dict[int, dict]:
    """``{layer: {"step": n, "moments": {param name: {"exp_avg": t, "exp_avg_sq": t}}}}`` for the layers
    whose file this rank writes (data-parallel rank 0; one stage per tied weight). Collective over each
    stage's data-parallel group: every rank of the stage calls it."""
    optimizer = engine.optimizer
    if optimizer is None:
        return {}
    step, payloads = optimizer_step(optimizer), {}
    for layer in sorted(modules):
        named = [(name, p) for name, p in modules[layer].named_parameters() if p.requires_grad]
        moments = {name: _full_moments(optimizer, p) for name, p in named}
        moments = {name: value for name, value in moments.items() if value is not None}
        if moments and engine.grid.get_data_parallel_id() == 0 and _writes_weight(engine, named):
            payloads[layer] = {"step": step, "moments": moments}
    return payloads


def set_layer_moments(engine, modules: dict[int, nn.Module], payloads: dict[int, dict]) -> int:
    """Put ``payloads`` (layer -> what ``layer_moments`` wrote for the layer it starts as) into this
    rank's fresh optimizer, before its first step. Returns the parameters given moments."""
    optimizer = engine.optimizer
    if optimizer is None or not payloads:
        return 0
    step = max(payload["step"] for payload in payloads.values())
    wrapped = _wraps_flat_partitions(optimizer)
    if wrapped:
        _start_flat_states(optimizer, step)
    count = 0
    for layer, payload in payloads.items():
        for name, param in modules[layer].named_parameters():
            value = payload["moments"].get(name)
            if value is None or not param.requires_grad:
                continue
            if wrapped:
                _link_fragment(optimizer, param)
                for key in MOMENTS:
                    safe_set_full_optimizer_state(param, value[key].to(param.device), key)
            else:
                optimizer.state[param] = {"step": torch.tensor(float(payload["step"])),
                                          **{key: value[key].to(param.device).clone() for key in MOMENTS}}
            count += 1
    return count


def optimizer_step(optimizer) -> int:
    """Steps the optimizer has taken (0 before its first)."""
    base = optimizer.optimizer if _wraps_flat_partitions(optimizer) else optimizer
    steps = [int(state["step"]) for state in base.state.values() if "step" in state]
    return max(steps, default=0)


def _wraps_flat_partitions(optimizer) -> bool:
    """DeepSpeed's ZeRO-1/2 and BF16 optimizers (flat fp32 partitions linked to each parameter)."""
    return isinstance(optimizer, (DeepSpeedZeroOptimizer, BF16_Optimizer))


def _full_moments(optimizer, param: nn.Parameter) -> dict[str, torch.Tensor] | None:
    if _wraps_flat_partitions(optimizer):
        if not hasattr(param, "_hp_mapping"):
            return None
        _link_fragment(optimizer, param)
        return {key: safe_get_full_optimizer_state(param, key).detach().cpu().clone() for key in MOMENTS}
    state = optimizer.state.get(param)
    if not state or any(key not in state for key in MOMENTS):
        return None
    return {key: state[key].detach().cpu().clone() for key in MOMENTS}


def _start_flat_states(optimizer, step: int) -> None:
    """Zero moments and the carried step for every flat partition of the base AdamW (which creates them
    at its first step otherwise); ``set_layer_moments`` then fills each parameter's fragment of them."""
    base = optimizer.optimizer
    for group in base.param_groups:
        for flat in group["params"]:
            base.state[flat] = {"step": torch.tensor(float(step)),
                                **{key: torch.zeros_like(flat, memory_format=torch.preserve_format)
                                   for key in MOMENTS}}


def _link_fragment(optimizer, param: nn.Parameter) -> None:
    """Point ``param``'s fragment at the base optimizer's state of its flat partition.

    DeepSpeed links every group's fragments after stepping the first group only (0.19.8,
    ``_lazy_init_hp_params_optimizer_state``), so the fragments of later groups miss their moments;
    linking here, per parameter, is right whenever the states exist."""
    mapping = param._hp_mapping
    if mapping is None:  # the parameter lies wholly in another replica's partition
        return
    base = optimizer.optimizer
    flat = base.param_groups[mapping.param_group_index]["params"][0]
    mapping.set_optim_state_fragment(flat, base.state[flat])


def _writes_weight(engine, named: list[tuple[str, nn.Parameter]]) -> bool:
    """A tied weight trained on several stages has equal moments on each: only its owner writes them."""
    params = {id(p) for _, p in named}
    for sync in engine.tied_syncs:
        if any(id(weight) in params for weight in sync.weights):
            return engine.global_rank == sync.owner_rank
    return True
