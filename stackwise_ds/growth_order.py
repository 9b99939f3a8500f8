"""Growth operators as arithmetic: where each unit of a grown stage-wise run starts, and which units are added.

No torch, no training code: ``phases.py`` reads the added units (a phase trains those, and freezes the old units
wherever they now sit under ``training.prefix: frozen``), ``training/growth.py`` copies the weights.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from .enums import GrowthOperator

# How positions 0..new-1 of a growth from ``old`` units start: (the old unit each position starts as, None for
# its own seeded init; the positions holding added units). A new operator is one more entry.
GrowthOrder = tuple[list[int | None], range | list[int]]


def _fresh(old: int, new: int) -> GrowthOrder:
    return [*range(old), *[None] * (new - old)], range(old, new)


def _copy_last(old: int, new: int) -> GrowthOrder:
    return [*range(old), *[old - 1] * (new - old)], range(old, new)


def _copy_all(old: int, new: int) -> GrowthOrder:
    return [j % old for j in range(new)], range(old, new)


def _copy_middle(old: int, new: int) -> GrowthOrder:
    """MIDAS order, e.g. 4 -> 6: [0, 1, 2, 1, 2, 3]; 1 -> 3: [0, 0, 0]; 3 -> 4: [0, 1, 1, 2]. The added units
    are the inserted copies (4 -> 6: positions 3, 4); the old units after the middle move up."""
    width = min(new - old, old)
    start = (old - width) // 2
    end = start + width
    copies = (list(range(start, end)) * -(-(new - old) // width))[:new - old]
    return [*range(end), *copies, *range(end, old)], range(end, end + new - old)


def _interleave(old: int, new: int, every: int) -> GrowthOrder:
    """LLaMA Pro's block expansion: after every ``every``-th old unit comes a copy of it, e.g. 2 -> 4 with every 1:
    [0, 0, 1, 1] (added: positions 1, 3); 4 -> 6 with every 2: [0, 1, 1, 2, 3, 3] (added: 2, 5)."""
    if new - old > old // every:
        raise ValueError(f"growth_operator 'interleave' inserts at most one copy per {every} old units: {old} units "
                         f"grow to at most {old + old // every}, not {new}")
    order, added = [], []
    for unit in range(old):
        order.append(unit)
        if (unit + 1) % every == 0 and len(added) < new - old:
            added.append(len(order))
            order.append(unit)
    return order, added


OPERATORS: dict[GrowthOperator, Callable[..., GrowthOrder]] = {
    GrowthOperator.FRESH: _fresh, GrowthOperator.COPY_LAST: _copy_last,
    GrowthOperator.COPY_ALL: _copy_all, GrowthOperator.COPY_MIDDLE: _copy_middle,
    GrowthOperator.INTERLEAVE: _interleave,
}


def growth_order(old: int, new: int, operator: GrowthOperator, every: int = 1) -> GrowthOrder:
    """``operator``'s order of a growth from ``old`` to ``new`` units (no growth: every unit in place, none added);
    ``every``: interleave's spacing (training.interleave_every)."""
    if new <= old or old == 0:
        return list(range(new)), []
    if operator not in OPERATORS:
        raise ValueError(f"unknown growth operator {operator!r}")
    build = partial(OPERATORS[operator], every=every) if operator == GrowthOperator.INTERLEAVE else OPERATORS[operator]
    return build(old, new)


