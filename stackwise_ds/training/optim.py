"""The per-stage optimizer: AdamW over this stage's trainable parameters.

Weight decay on matrices only (not norms); ``training.stack_lr_scale`` multiplies the
learning rate of each stack's blocks. Groups are formed by (lr scale, decay) in order of
first appearance; the engine then splits them (``parallel.param_groups.equal_group_splits``) until
every train stage has as many groups as the one with most. The reshard tool applies both rules.
"""

from __future__ import annotations

import torch

from ..config import TrainingConfig
from ..layout import LayerUnit, UnitKind


def make_optimizer(named_params: list[tuple[str, torch.nn.Parameter]], training: TrainingConfig,
                   units: list[LayerUnit]) -> torch.optim.Optimizer:
    """``named_params`` are pipeline-module names (``'<layer index>.<param>'``); ``units`` maps layers to the Rack."""
    groups: dict[tuple[float, float], list[torch.nn.Parameter]] = {}
    for name, param in named_params:
        scale = lr_scale(name, training, units)
        decay = training.weight_decay if param.dim() >= 2 else 0.0
        groups.setdefault((scale, decay), []).append(param)
    param_groups = [{"params": params, "lr": training.lr * scale, "weight_decay": decay}
                    for (scale, decay), params in groups.items()]
    return torch.optim.AdamW(param_groups, lr=training.lr, betas=tuple(training.adam_betas), eps=1e-8)


def lr_scale(pipe_param_name: str, training: TrainingConfig, units: list[LayerUnit]) -> float:
    if training.stack_lr_scale is None:
        return 1.0
    layer = pipe_param_name.split(".", 1)[0]
    if layer.isdigit() and units[int(layer)].kind == UnitKind.BLOCK:
        return training.stack_lr_scale[units[int(layer)].stack_id]
    return 1.0  # embedding, final norm and head
