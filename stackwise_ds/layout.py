"""Which pipeline layer is which part of the Rack, and where stages start. No DeepSpeed import.

Pipeline layers, in order: 0 the embedding, 1..n_blocks the Blocks stack by stack, then the
final norm, then the LM head (the tied embedding module when tied, so it has no file of its own
in a checkpoint). Shared by the pipeline builder, the trainer and the checkpoint tools.
"""

from __future__ import annotations

from dataclasses import dataclass

from .enums import Choice

TIED_KEY = "embed"  # DeepSpeed TiedLayerSpec key of the embedding / LM head


class LayerRole(Choice):
    """Role of a pipeline layer in a phase: trains; frozen before every trained layer (forward only, under no_grad);
    frozen after a trained one (forward with autograd for its input only: the gradient passes through to the trained
    layers before it, its weights get none); or skipped (identity)."""

    TRAIN = "train"
    FROZEN = "frozen"
    FROZEN_BACKPROP = "frozen_backprop"
    DORMANT = "dormant"


TRAIN, FROZEN, DORMANT = LayerRole.TRAIN, LayerRole.FROZEN, LayerRole.DORMANT
FROZEN_BACKPROP = LayerRole.FROZEN_BACKPROP
NOT_TRAINED = (FROZEN, FROZEN_BACKPROP)


def resolve_frozen(roles: list[str]) -> list[LayerRole]:
    """Say which frozen layers the gradient must pass through: a frozen layer after the first trained one becomes
    FROZEN_BACKPROP (its no_grad forward would cut the gradient path of the trained layers before it); one before
    every trained layer stays FROZEN (nothing upstream needs a gradient). Idempotent."""
    roles = [LayerRole(r) for r in roles]
    first_train = next((i for i, r in enumerate(roles) if r == TRAIN), len(roles))
    return [(FROZEN_BACKPROP if i > first_train else FROZEN) if r in NOT_TRAINED else r
            for i, r in enumerate(roles)]


class UnitKind(Choice):
    """What part of the Rack a pipeline layer is."""

    EMBEDDING = "embedding"
    BLOCK = "block"
    NORM = "norm"
    HEAD = "head"


@dataclass(frozen=True)
class LayerUnit:
    """What a pipeline layer is, in Rack terms."""

    kind: UnitKind
    stack_id: int | None = None
    block_id: int | None = None

    @property
    def rack_prefix(self) -> str:
        """The stable Rack parameter-name prefix of this layer's own parameters."""
        return {UnitKind.EMBEDDING: "embedding.", UnitKind.NORM: "norm.", UnitKind.HEAD: "lm_head.",
                UnitKind.BLOCK: f"stacks.{self.stack_id}.blocks.{self.block_id}."}[self.kind]


def layer_units(n_stacks: int, blocks_per_stack: int) -> list[LayerUnit]:
    blocks = [LayerUnit(UnitKind.BLOCK, s, b) for s in range(n_stacks) for b in range(blocks_per_stack)]
    return [LayerUnit(UnitKind.EMBEDDING), *blocks, LayerUnit(UnitKind.NORM), LayerUnit(UnitKind.HEAD)]


def stage_boundaries(n_stacks: int, blocks_per_stack: int, stages: int) -> list[int]:
    """Layer index where each stage starts, plus the end: stage s holds whole stacks only."""
    if stages <= 0 or n_stacks % stages:
        raise ValueError(f"pipeline stages ({stages}) must divide n_stacks ({n_stacks})")
    blocks_per_stage = n_stacks // stages * blocks_per_stack
    n_layers = n_stacks * blocks_per_stack + 3
    return [0] + [1 + s * blocks_per_stage for s in range(1, stages)] + [n_layers]


def cached_boundary(layer_roles: list[str]) -> int | None:
    """The last layer of the frozen run from the embedding (layer 0) on, when it holds at least one block: the
    prefix whose output ``training.stack_cache`` keeps; None when the phase has none."""
    boundary = -1
    while boundary + 1 < len(layer_roles) and layer_roles[boundary + 1] == FROZEN:
        boundary += 1
    return boundary if boundary >= 1 else None
