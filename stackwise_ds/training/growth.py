"""Growth operators: where the units of a grown stage-wise run take their weights from.

A phase that grows the run from ``m`` to ``n`` active units (``training.depth_schedule``) starts
its units from the previous phase's end; ``training.growth_operator`` says which old unit each
position copies:

* ``fresh``: new units keep their own seeded initialisation, old ones stay in place;
* ``copy_last``: every new unit copies unit ``m - 1`` (stacking one at a time, "copy previous");
* ``copy_all`` (Gstack, Du et al. 2024): new unit ``j`` copies unit ``j mod m``, i.e. the whole
  small model is repeated;
* ``copy_middle`` (MIDAS, Saunshi et al. 2024): the middle ``min(n - m, m)`` units are repeated
  right after themselves until the model holds ``n`` units; the units after the middle move up;
* ``interleave`` (LLaMA Pro, Wu et al. 2024): after every ``training.interleave_every``-th old unit
  comes a copy of it, e.g. 2 -> 4 with every 1: ``[0, 0', 1, 1']``; the old units move up.

Each operator says two things (``stackwise_ds.growth_order.OPERATORS``, pure arithmetic): the old
unit every position starts as, and which positions hold *added* units (the others hold old units,
maybe moved up: copy_middle's and interleave's later units).
``unit_sources`` is the first as a map position -> source unit; ``layer_sources`` turns it into
pipeline layers, which every placement reads from the per-layer files of the previous phase's end
(moment files too, with ``optimizer_across_phases: carry``), so a copy needs no live transfer and
continuing and resuming at a phase boundary are the same code path.

``training.growth_init: identity`` then zeroes the added units' ``RESIDUAL_WRITERS`` (attention
``o_proj`` and SwiGLU ``down_proj``; ``phase_zeroed_layers``), and their carried moments: a pre-norm
block writing zero into the residual stream is the identity, so the grown rack computes exactly what
the smaller one did (LLaMA Pro's block expansion, Wu et al. 2024).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ..enums import GrowthInit, GrowthOperator
from ..growth_order import growth_order
from ..layout import LayerUnit, UnitKind
from ..model.block import RESIDUAL_WRITERS
from ..phases import Phase, PhaseKind


def unit_sources(old: int, new: int, operator: GrowthOperator, every: int = 1) -> dict[int, int]:
    """Position -> the old unit it starts as, for the positions that do not keep their own weights."""
    order, _ = growth_order(old, new, operator, every)
    return {position: source for position, source in enumerate(order) if source not in (None, position)}


def added_units(old: int, new: int, operator: GrowthOperator, every: int = 1) -> list[int]:
    """The positions that hold the units a growth from ``old`` to ``new`` adds (what growth_init 'identity' zeroes)."""
    return list(growth_order(old, new, operator, every)[1])


def phase_layer_sources(units: list[LayerUnit], phase: Phase, operator: GrowthOperator) -> dict[int, int]:
    """Pipeline layer -> layer whose weights it starts ``phase`` with (empty unless the phase grows)."""
    if not phase.grows:
        return {}
    return layer_sources(units, phase, unit_sources(phase.new_from, phase.active, operator, phase.interleave_every))


def phase_zeroed_layers(units: list[LayerUnit], phase: Phase, operator: GrowthOperator,
                        growth_init: GrowthInit) -> frozenset[int]:
    """The pipeline layers whose residual writers start ``phase`` at zero: every block of the units it adds, under
    growth_init 'identity' (empty unless the phase grows)."""
    if not phase.grows or growth_init != GrowthInit.IDENTITY:
        return frozenset()
    layers = unit_layers(units, phase)
    added = added_units(phase.new_from, phase.active, operator, phase.interleave_every)
    return frozenset(layer for unit in added for layer in layers[unit])


def unit_layers(units: list[LayerUnit], phase: Phase) -> list[list[int]]:
    """Unit -> its pipeline layers, in block order: every block of a stack (stackwise), or the block itself."""
    index = {(u.stack_id, u.block_id): i for i, u in enumerate(units) if u.kind == UnitKind.BLOCK}
    if phase.kind == PhaseKind.STACK:
        return [[index[(s, b)] for b in range(phase.blocks_per_stack)] for s in range(phase.n_stacks)]
    return [[index[divmod(block, phase.blocks_per_stack)]] for block in range(phase.n_units)]


def layer_sources(units: list[LayerUnit], phase: Phase, by_unit: dict[int, int]) -> dict[int, int]:
    """A unit map in pipeline layers: block b of a stack copies block b of its source stack (stackwise)."""
    layers = unit_layers(units, phase)
    return {dst_layer: src_layer for dst, src in by_unit.items()
            for dst_layer, src_layer in zip(layers[dst], layers[src], strict=True)}


def zero_residual_writers(modules: dict[int, nn.Module], layers: Iterable[int]) -> None:
    """Zero the residual writers of the blocks of ``modules`` (pipeline layer -> Block) among ``layers``, in place
    (the parameters' version bumps, so a converted frozen copy follows)."""
    with torch.no_grad():
        for layer in sorted(set(layers) & modules.keys()):
            parameters = dict(modules[layer].named_parameters())
            for name in RESIDUAL_WRITERS:
                parameters[name].zero_()


def zeroed_residual_writers(state: dict) -> dict:
    """A Block's state (its layer file: key -> tensor) or its moments (key -> {moment: tensor}) with the residual
    writers' entries at zero; the other entries are shared, not copied."""
    def zeros(value):
        return {k: zeros(v) for k, v in value.items()} if isinstance(value, dict) else torch.zeros_like(value)

    return {key: zeros(value) if key in RESIDUAL_WRITERS else value for key, value in state.items()}
