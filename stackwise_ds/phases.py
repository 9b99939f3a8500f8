"""Training phases and the role of every unit in each phase.

A phase trains the whole rack (``rackwise``, or a closing ``joint`` phase) or grows a
stage-wise run to its next depth: ``training.depth_schedule`` lists the active units (stacks in
``stackwise``, blocks in ``blockwise``) per phase, by default one more each phase. During a
phase, the units it adds TRAIN; the units that were already active are FROZEN (forward only,
no grad) with ``training.prefix: frozen``, or keep training with ``prefix: train``
(progressive stacking); units beyond the active count are DORMANT (not placed, identity), and
the final norm and the LM head TRAIN. ``training.frozen_stacks`` freeze those stacks in every
phase (any mode); a frozen layer after a trained one passes the gradient back
(``layout.resolve_frozen``). These roles are plain strings so the parallel layer can map them
onto pipeline stages without importing training code.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import ConfigError, ModelConfig, StackWiseConfig, TrainingConfig
from .enums import Choice, Prefix, TrainingArchitecture
from .growth_order import growth_order
from .layout import DORMANT, FROZEN, TRAIN, LayerUnit, UnitKind, layer_units, resolve_frozen


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
    active: int | None = None  # units (stacks for kind "stack", blocks for "block") active in this phase
    new_from: int = 0  # first unit this phase adds: units [new_from, active) are new, those before were active
    prefix_trains: bool = False  # the units active before this phase train too (training.prefix: train)
    untied_head: bool = False  # a tied rack's LM head trains as its own copy of the frozen embedding
    added: tuple[int, ...] | None = None  # the units this phase adds (None: new_from .. active-1); the other active
    # units are the old ones, wherever the growth operator moved them (copy_middle, interleave)
    interleave_every: int = 1  # growth_operator 'interleave': its spacing (training.interleave_every)
    frozen_stacks: frozenset[int] = frozenset()  # stacks frozen in every phase (training.frozen_stacks)
    blocks_only: bool = False  # the embedding, final norm and LM head frozen (training.blocks_only)

    @property
    def unit(self) -> int | None:
        """The newest (deepest) active unit: stack index, or global block index."""
        return None if self.active is None else self.active - 1

    @property
    def n_units(self) -> int:
        return self.n_stacks if self.kind == PhaseKind.STACK else self.n_stacks * self.blocks_per_stack

    @property
    def name(self) -> str:
        """Human label for logs and the progress bar, e.g. 'stack 2/4' or 'stacks 2-4/4'."""
        if self.kind not in (PhaseKind.STACK, PhaseKind.BLOCK):
            return self.kind
        if self.active - self.new_from > 1:
            return f"{self.kind}s {self.new_from + 1}-{self.active}/{self.n_units}"
        if self.kind == PhaseKind.STACK:
            return f"stack {self.active}/{self.n_stacks}"
        stack, block = divmod(self.unit, self.blocks_per_stack)
        return f"block {self.active}/{self.n_units} (stack {stack + 1}, block {block + 1})"

    @property
    def grows(self) -> bool:
        """Whether this phase adds units to ones that trained before (a growth step of the run)."""
        return self.stage_wise and self.new_from > 0

    @property
    def trains_everything(self) -> bool:
        return self.kind in (PhaseKind.RACK, PhaseKind.JOINT)

    def block_role(self, stack_id: int, block_id: int) -> str:
        """Role of block ``block_id`` of stack ``stack_id`` in this phase (before ``resolve_frozen``)."""
        role = self._unit_block_role(stack_id, block_id)
        return FROZEN if role == TRAIN and stack_id in self.frozen_stacks else role

    def _unit_block_role(self, stack_id: int, block_id: int) -> str:
        if self.trains_everything:
            return TRAIN
        position = stack_id if self.kind == PhaseKind.STACK else stack_id * self.blocks_per_stack + block_id
        if position >= self.active:
            return DORMANT
        return TRAIN if self.prefix_trains or position in self.added_units else FROZEN

    @property
    def added_units(self) -> tuple[int, ...]:
        """The units this phase adds (all active ones in the first phase)."""
        return tuple(range(self.new_from, self.active)) if self.added is None else self.added

    @property
    def embedding_role(self) -> str:
        """The embedding trains in the first phase (and in every phase when the prefix trains);
        otherwise its lookup is frozen compute afterwards.

        A tied embedding still learns through the LM head, which always trains, unless the phase
        unties the head (``untied_head``, training.freeze_embedding).
        """
        if self.blocks_only:
            return FROZEN
        return TRAIN if self.trains_everything or self.new_from == 0 or self.prefix_trains else FROZEN

    @property
    def stage_wise(self) -> bool:
        """A stackwise or blockwise phase: the phases an elastic layout re-places."""
        return self.kind in (PhaseKind.STACK, PhaseKind.BLOCK)

    def unit_role(self, unit: LayerUnit) -> str:
        """Role of one pipeline layer in this phase; the final norm and LM head train unless ``blocks_only``."""
        if unit.kind == UnitKind.BLOCK:
            return self.block_role(unit.stack_id, unit.block_id)
        if unit.kind == UnitKind.EMBEDDING:
            return self.embedding_role
        return FROZEN if self.blocks_only else TRAIN

    def layer_roles(self, units: list[LayerUnit]) -> list[str]:
        """Every pipeline layer's role; a frozen layer after a trained one is FROZEN_BACKPROP."""
        return resolve_frozen([self.unit_role(unit) for unit in units])


def plan_phases(config: StackWiseConfig, source_stacks: tuple[int, ...] = ()) -> list[Phase]:
    """The ordered phases of a run, the optional joint phase last; ``source_stacks`` (training.freeze_source: the
    stacks that came from init_from) freeze with training.frozen_stacks."""
    t, arch = config.training, config.model.architecture
    untie = unties_head(config.model, t)
    shape = dict(n_stacks=arch.n_stacks, blocks_per_stack=arch.blocks_per_stack,
                 frozen_stacks=frozenset(t.frozen_stacks) | frozenset(source_stacks), blocks_only=t.blocks_only)
    if t.training_architecture == TrainingArchitecture.RACKWISE:
        return _checked([Phase(0, PhaseKind.RACK, t.max_steps, **shape)])
    kind = PhaseKind.STACK if t.training_architecture == TrainingArchitecture.STACKWISE else PhaseKind.BLOCK
    n = config.n_phases
    depths = t.depth_schedule if t.depth_schedule is not None else list(range(1, n + 1))
    steps = t.steps_per_phase if isinstance(t.steps_per_phase, list) else [t.steps_per_phase] * n
    prefix_trains = t.prefix == Prefix.TRAIN
    added = [None] + [tuple(growth_order(old, new, t.growth_operator, t.interleave_every)[1])
                      for old, new in zip(depths, depths[1:], strict=False)]
    phases = [Phase(i, kind, steps[i], active=depths[i], new_from=depths[i - 1] if i else 0, added=added[i],
                    interleave_every=t.interleave_every, prefix_trains=prefix_trains, untied_head=untie and i > 0,
                    **shape) for i in range(n)]
    if t.joint_steps > 0:  # once untied, the head stays its own matrix
        phases.append(Phase(n, PhaseKind.JOINT, t.joint_steps, untied_head=untie and n > 1, **shape))
    return _checked(phases)


def _checked(phases: list[Phase]) -> list[Phase]:
    """Refuse a phase in which nothing trains (every unit it places frozen), naming the settings to change."""
    units = layer_units(phases[0].n_stacks, phases[0].blocks_per_stack)
    for phase in phases:
        if TRAIN not in phase.layer_roles(units):
            raise ConfigError(f"phase {phase.index + 1} ({phase.name}) trains nothing: every unit it places is frozen "
                              "(training.frozen_stacks, freeze_source and blocks_only); unfreeze a stack it trains or "
                              "set training.blocks_only=false")
    return phases


def unties_head(model: ModelConfig, t: TrainingConfig) -> bool:
    """Whether a stage-wise run's phases after the first freeze the embedding and train an untied copy of a
    tied LM head (``prefix: frozen`` with ``freeze_embedding``): the tied head would drag the embedding,
    and with it the input of the frozen units."""
    return model.tie_embeddings and t.prefix == Prefix.FROZEN and t.freeze_embedding and not t.blocks_only
