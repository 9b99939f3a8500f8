"""Pure-PyTorch model: Block -> Stack -> Rack. Never imports deepspeed or torch.distributed.

The modules take the model's own config section (``Block(config)``, ``build_rack(model, seed)``);
``create_rack_from_config`` is the one door for a whole run config as a plain dict.
"""

from typing import Any, Callable

from ..config import StackWiseConfig
from .block import Block, RMSNorm, SwiGLU
from .rack import Rack, build_block, build_rack, build_stack, every_module, untie_lm_head
from .stack import Stack, set_block_trainable


def create_rack_from_config(config_dict: dict[str, Any], materialize: Callable[[str], bool] = every_module) -> Rack:
    """The Rack of a whole run config given as a plain dict (YAML's shape): parsed and validated once, then
    ``build_rack(model, training.seed)``."""
    config = StackWiseConfig.from_dict(config_dict)
    return build_rack(config.model, config.training.seed, materialize)


__all__ = ["Block", "RMSNorm", "SwiGLU", "Stack", "Rack", "build_block", "build_stack", "build_rack",
           "create_rack_from_config", "set_block_trainable", "untie_lm_head"]
