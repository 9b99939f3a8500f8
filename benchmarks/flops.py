"""Training FLOPs per optimizer step, per phase of each mode.

Convention (Kaplan/PaLM): a forward pass costs 2 FLOPs per multiply-accumulate of every
weight matrix, plus 4·T·d per token per block for attention (QKᵀ and AV, the full T×T
counted even when causal); a backward pass costs twice the forward. Per phase, a unit
that trains costs forward + backward (3×), a frozen unit forward only (1×), a dormant unit
nothing. The embedding lookup is free; the LM head always trains. These ratios decide how
many steps each mode gets at an equal budget, so only their relative sizes matter.
"""

from __future__ import annotations

from dataclasses import dataclass

from stackwise_ds.layout import TRAIN
from stackwise_ds.placement import ATTN_FLOPS_PER_TD, ROLE_FACTOR  # the planner's convention, one home

TRAIN_FACTOR = ROLE_FACTOR[TRAIN]  # forward (1) + backward (2: gradients w.r.t. activations and weights)


@dataclass(frozen=True)
class ForwardCost:
    """Forward FLOPs per token: one entry per block (global order), and the LM head."""

    blocks: list[float]
    head: float


def forward_cost(config) -> ForwardCost:
    """Forward FLOPs per token of every block and of the head, counted on the real modules."""
    from stackwise_ds.model import build_rack

    rack = build_rack(config.model, config.training.seed)
    seq_len, d = config.data.seq_len, config.model.d_model
    blocks = [2 * _matrix_params(block) + ATTN_FLOPS_PER_TD * seq_len * d for block in rack.blocks]
    head = 2 * rack.lm_head.weight.numel()
    return ForwardCost(blocks, float(head))


def _matrix_params(module) -> int:
    """Weights that are multiplied with activations (matrices; norms and biases are negligible)."""
    return sum(p.numel() for p in module.parameters() if p.dim() >= 2)


def phase_step_flops(config, phase, cost: ForwardCost) -> float:
    """FLOPs of one optimizer step of ``phase`` (tokens per step x per-token cost)."""
    bps = config.model.architecture.blocks_per_stack
    per_token = TRAIN_FACTOR * cost.head
    for index, block_cost in enumerate(cost.blocks):
        role = phase.block_role(*divmod(index, bps))
        per_token += ROLE_FACTOR[role] * block_cost
    t = config.training
    return per_token * t.micro_batch_size * t.gradient_accumulation_steps * config.data.seq_len


def step_flops_schedule(config) -> list[float]:
    """FLOPs of every optimizer step of a run, in order (global step g -> entry g-1)."""
    from stackwise_ds.phases import plan_phases

    cost = forward_cost(config)
    schedule: list[float] = []
    for phase in plan_phases(config):
        schedule.extend([phase_step_flops(config, phase, cost)] * phase.steps)
    return schedule


def training_flops_per_token(config) -> float:
    """Whole-rack training FLOPs per token: 6·N (N unique parameters) + 12·L·T·d for attention.

    The same count as the per-phase model for a rackwise step (norm weights aside); used for
    model FLOPs utilisation on a GPU.
    """
    from stackwise_ds.model import build_rack

    rack = build_rack(config.model, config.training.seed)
    n_blocks, seq_len, d = len(rack.blocks), config.data.seq_len, config.model.d_model
    return 6 * rack.get_parameter_count() + TRAIN_FACTOR * ATTN_FLOPS_PER_TD * n_blocks * seq_len * d
