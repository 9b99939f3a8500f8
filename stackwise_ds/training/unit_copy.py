"""``new_unit_init: copy_previous``: start a stack (or block) as a copy of the one before it.

The two units may live on different pipeline stages, so the copy is a point-to-point
transfer between the two stages of the same data-parallel slice; ranks holding
neither unit do nothing.
"""

from __future__ import annotations

import bisect

import torch

from ..layout import UnitKind
from ..parallel.pipe import stage_to_global
from .phases import Phase, PhaseKind


def copy_previous_unit(pipe, phase: Phase) -> None:
    """In memory, on a pipeline that stays in place from the previous phase."""
    for src_layer, dst_layer in unit_layer_pairs(pipe.units, phase):
        _copy_layer(pipe, src_layer, dst_layer)


def unit_layer_pairs(units, phase: Phase) -> list[tuple[int, int]]:
    """(source, destination) pipeline-layer indices of the blocks ``copy_previous`` copies at the
    start of ``phase`` (none for the first unit or a whole-rack phase)."""
    if not phase.stage_wise or phase.unit == 0:
        return []
    index = {(u.stack_id, u.block_id): i for i, u in enumerate(units) if u.kind == UnitKind.BLOCK}
    if phase.kind == PhaseKind.STACK:
        return [(index[(phase.unit - 1, b)], index[(phase.unit, b)]) for b in range(phase.blocks_per_stack)]
    src = divmod(phase.unit - 1, phase.blocks_per_stack)
    dst = divmod(phase.unit, phase.blocks_per_stack)
    return [(index[src], index[dst])]


def _stage_of(parts: list[int], layer: int) -> int:
    return bisect.bisect_right(parts, layer) - 1


def _local_tensors(pipe, layer: int) -> list[torch.Tensor]:
    return list(pipe._modules[str(layer)].state_dict().values())


@torch.no_grad()
def _copy_layer(pipe, src_layer: int, dst_layer: int) -> None:
    import deepspeed.comm as dist

    src_stage, dst_stage = _stage_of(pipe.parts, src_layer), _stage_of(pipe.parts, dst_layer)
    me = pipe.stage_id
    if me not in (src_stage, dst_stage):
        return
    if src_stage == dst_stage:
        for dst, src in zip(_local_tensors(pipe, dst_layer), _local_tensors(pipe, src_layer)):
            dst.copy_(src)
        return
    if me == src_stage:
        peer = stage_to_global(pipe, dst_stage)
        for tensor in _local_tensors(pipe, src_layer):
            dist.send(tensor.contiguous(), peer)
    else:
        peer = stage_to_global(pipe, src_stage)
        for tensor in _local_tensors(pipe, dst_layer):
            buffer = torch.empty_like(tensor)
            dist.recv(buffer, peer)
            tensor.copy_(buffer)
