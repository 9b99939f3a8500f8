"""Learning-rate schedules, as multipliers of the peak ``training.lr``.

``lr_multiplier`` is one schedule over ``total`` steps: linear warmup, then cosine decay to the
floor, or warmup-stable-decay (WSD: the peak until the last ``decay_fraction`` of the steps, then a
linear decay to the floor). ``phase_lr_lambda`` places a phase in it: with ``lr_schedule:
per_phase`` every phase runs its own schedule; with ``continuous`` the run has one schedule over
all phases' steps (one warmup in all), and each phase reads it from its first global step, with
an optional short re-warm after a growth that starts from a fraction of the scheduled value.
"""

from __future__ import annotations

import math
from typing import Callable

from ..config import TrainingConfig
from ..enums import LrDecay, LrSchedule
from ..phases import Phase


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, min_ratio: float) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step`` (0-based) of a phase."""
    return lr_multiplier(step, total_steps, warmup_steps, min_ratio)


def lr_multiplier(step: int, total_steps: int, warmup_steps: int, min_ratio: float, decay: LrDecay = LrDecay.COSINE,
                  decay_fraction: float = 0.2) -> float:
    """Multiplier of the peak learning rate at step ``step`` (0-based) of a ``total_steps`` schedule."""
    warmup_steps = min(warmup_steps, max(total_steps - 1, 0))
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if decay == LrDecay.WSD:
        decay_steps = max(round(total_steps * decay_fraction), 1)
        progress = min(max(step - (total_steps - decay_steps) + 1, 0) / decay_steps, 1.0)  # the last step at the floor
        return 1.0 - (1.0 - min_ratio) * progress
    decay_steps = max(total_steps - warmup_steps, 1)
    progress = min((step - warmup_steps) / decay_steps, 1.0)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def phase_lr_lambda(phase: Phase, phases: list[Phase], training: TrainingConfig) -> Callable[[int], float]:
    """The multiplier at step ``s`` of ``phase`` (the engine's LambdaLR counts from the phase start)."""
    t = training
    if t.lr_schedule != LrSchedule.CONTINUOUS:
        return lambda s: lr_multiplier(s, phase.steps, t.warmup_steps, t.min_lr_ratio, t.lr_decay, t.decay_fraction)
    start = sum(p.steps for p in phases[:phase.index])
    total = sum(p.steps for p in phases)
    rewarm = t.growth_warmup_steps if phase.grows else 0

    def multiplier(s: int) -> float:
        scheduled = lr_multiplier(start + s, total, t.warmup_steps, t.min_lr_ratio, t.lr_decay, t.decay_fraction)
        if s >= rewarm:
            return scheduled
        return scheduled * (t.growth_warmup_start + (1.0 - t.growth_warmup_start) * s / rewarm)

    return multiplier
