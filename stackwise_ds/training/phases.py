"""Training phases and the role of every unit in each phase.

A phase trains one unit: the whole rack (``rackwise``), one stack (``stackwise``),
one block (``blockwise``), or the whole rack again in a closing ``joint`` phase.
During a phase, units before the active one are FROZEN (forward only, no grad) with
``training.prefix: frozen``, or keep training with ``prefix: train`` (progressive
stacking); units after it are DORMANT (identity, no compute), and the active unit, the
final norm and the LM head TRAIN. These roles are plain strings so the parallel layer
can map them onto pipeline stages without importing training code.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import StackWiseConfig
from ..enums import Choice, Prefix, TrainingArchitecture
from ..layout import DORMANT, FROZEN, TRAIN, LayerUnit, UnitKind  # noqa: F401 - re-exported


class PhaseKind(Choice):
    """What a phase trains: the whole rack, one stack, one block, or the whole rack again at the end."""

    RACK = "rack"
    STACK = "stack"
    BLOCK = "block"
    JOINT = "joint"


@dataclass(frozen=True)
class Phase:
    index: int
    kind: PhaseKind
    steps: int
    n_stacks: int
    blocks_per_stack: int
    unit: int | None = None  # active stack (kind "stack") or global block index (kind "block")
    prefix_trains: bool = False  # units before the active one train too (training.prefix: train)

    @property
    def name(self) -> str:
        """Human label for logs and the progress bar, e.g. 'stack 2/4'."""
        if self.kind == PhaseKind.STACK:
            return f"stack {self.unit + 1}/{self.n_stacks}"
        if self.kind == PhaseKind.BLOCK:
            stack, block = divmod(self.unit, self.blocks_per_stack)
            return f"block {self.unit + 1}/{self.n_stacks * self.blocks_per_stack} (stack {stack + 1}, block {block + 1})"
        return self.kind

    @property
    def trains_everything(self) -> bool:
        return self.kind in (PhaseKind.RACK, PhaseKind.JOINT)

    def block_role(self, stack_id: int, block_id: int) -> str:
        """Role of block ``block_id`` of stack ``stack_id`` in this phase."""
        if self.trains_everything:
            return TRAIN
        position = stack_id if self.kind == PhaseKind.STACK else stack_id * self.blocks_per_stack + block_id
        if position < self.unit:
            return TRAIN if self.prefix_trains else FROZEN
        return TRAIN if position == self.unit else DORMANT

    @property
    def embedding_role(self) -> str:
        """The embedding trains with the first unit (and with every unit when the prefix trains);
        otherwise its lookup is frozen compute afterwards.

        A tied embedding still learns through the LM head, which always trains.
        """
        return TRAIN if self.trains_everything or self.unit == 0 or self.prefix_trains else FROZEN

    @property
    def stage_wise(self) -> bool:
        """A stackwise or blockwise phase: the phases an elastic layout re-places."""
        return self.kind in (PhaseKind.STACK, PhaseKind.BLOCK)

    def unit_role(self, unit: LayerUnit) -> str:
        """Role of one pipeline layer in this phase; the final norm and LM head always train."""
        if unit.kind == UnitKind.BLOCK:
            return self.block_role(unit.stack_id, unit.block_id)
        if unit.kind == UnitKind.EMBEDDING:
            return self.embedding_role
        return TRAIN

    def layer_roles(self, units: list[LayerUnit]) -> list[str]:
        return [self.unit_role(unit) for unit in units]


def plan_phases(config: StackWiseConfig) -> list[Phase]:
    """The ordered phases of a run, the optional joint phase last."""
    t, arch = config.training, config.model.architecture
    shape = dict(n_stacks=arch.n_stacks, blocks_per_stack=arch.blocks_per_stack)
    if t.training_architecture == TrainingArchitecture.RACKWISE:
        return [Phase(0, PhaseKind.RACK, t.max_steps, **shape)]
    kind = PhaseKind.STACK if t.training_architecture == TrainingArchitecture.STACKWISE else PhaseKind.BLOCK
    n = config.n_phases
    steps = t.steps_per_phase if isinstance(t.steps_per_phase, list) else [t.steps_per_phase] * n
    prefix_trains = t.prefix == Prefix.TRAIN
    phases = [Phase(i, kind, steps[i], unit=i, prefix_trains=prefix_trains, **shape) for i in range(n)]
    if t.joint_steps > 0:
        phases.append(Phase(n, PhaseKind.JOINT, t.joint_steps, **shape))
    return phases
