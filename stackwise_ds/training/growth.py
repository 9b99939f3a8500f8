"""Growth operators: where the units of a grown stage-wise run take their weights from.

A phase that grows the run from ``m`` to ``n`` active units (``training.depth_schedule``) starts
its units from the previous phase's end; ``training.growth_operator`` says which old unit each
position copies:

* ``fresh``: new units keep their own seeded initialisation, old ones stay in place;
* ``copy_last``: every new unit copies unit ``m - 1`` (stacking one at a time, "copy previous");
* ``copy_all`` (Gstack, Du et al. 2024): new unit ``j`` copies unit ``j mod m``, i.e. the whole
  small model is repeated;
* ``copy_middle`` (MIDAS, Saunshi et al. 2024): the middle ``min(n - m, m)`` units are repeated
  right after themselves until the model holds ``n`` units; the units after the middle move up.

The result is a map position -> source unit over unit indices; ``layer_sources`` turns it into
pipeline layers, which every placement reads from the per-layer files of the previous phase's end
(moment files too, with ``optimizer_across_phases: carry``), so a copy needs no live transfer and
continuing and resuming at a phase boundary are the same code path.
"""

from __future__ import annotations

from ..enums import GrowthOperator
from ..layout import LayerUnit, UnitKind
from ..phases import Phase, PhaseKind


def unit_sources(old: int, new: int, operator: GrowthOperator) -> dict[int, int]:
    """Position -> the old unit it starts as, for the positions that do not keep their own weights."""
    if new <= old or old == 0 or operator == GrowthOperator.FRESH:
        return {}
    if operator == GrowthOperator.COPY_LAST:
        order = [*range(old), *[old - 1] * (new - old)]
    elif operator == GrowthOperator.COPY_ALL:
        order = [j % old for j in range(new)]
    elif operator == GrowthOperator.COPY_MIDDLE:
        order = _middle_copies(old, new)
    else:
        raise ValueError(f"unknown growth operator {operator!r}")
    return {position: source for position, source in enumerate(order) if position != source}


def _middle_copies(old: int, new: int) -> list[int]:
    """MIDAS order, e.g. 4 -> 6: [0, 1, 2, 1, 2, 3]; 1 -> 3: [0, 0, 0]; 3 -> 4: [0, 1, 1, 2]."""
    width = min(new - old, old)
    start = (old - width) // 2
    middle = list(range(start, start + width))
    copies = (middle * -(-(new - old) // width))[:new - old]
    return [*range(start + width), *copies, *range(start + width, old)]


def phase_layer_sources(units: list[LayerUnit], phase: Phase, operator: GrowthOperator) -> dict[int, int]:
    """Pipeline layer -> layer whose weights it starts ``phase`` with (empty unless the phase grows)."""
    if not phase.grows:
        return {}
    return layer_sources(units, phase, unit_sources(phase.new_from, phase.active, operator))


def layer_sources(units: list[LayerUnit], phase: Phase, by_unit: dict[int, int]) -> dict[int, int]:
    """A unit map in pipeline layers: every block of a stack (stackwise), or the block itself."""
    index = {(u.stack_id, u.block_id): i for i, u in enumerate(units) if u.kind == UnitKind.BLOCK}
    if phase.kind == PhaseKind.STACK:
        return {index[(dst, b)]: index[(src, b)] for dst, src in by_unit.items()
                for b in range(phase.blocks_per_stack)}
    return {index[divmod(dst, phase.blocks_per_stack)]: index[divmod(src, phase.blocks_per_stack)]
            for dst, src in by_unit.items()}
