"""Pure-PyTorch model: Block -> Stack -> Rack. Never imports deepspeed or torch.distributed."""

from .block import Block, RMSNorm, SwiGLU
from .rack import Rack, build_block, build_rack, build_stack, create_rack_from_config, untie_lm_head
from .stack import Stack, set_block_trainable

__all__ = ["Block", "RMSNorm", "SwiGLU", "Stack", "Rack", "build_block", "build_stack", "build_rack",
           "create_rack_from_config", "set_block_trainable", "untie_lm_head"]
