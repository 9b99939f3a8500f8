"""A Stack: an ordered group of Blocks, the unit of stackwise training and of pipeline stages."""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from .block import Block


class Stack(nn.Module):
    def __init__(self, blocks: Iterable[Block], stack_id: int):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.stack_id = stack_id
        if len(self.blocks) == 0:
            raise ValueError(f"stack {stack_id} has no blocks: set model.architecture.blocks_per_stack >= 1")

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, D] -> [B, T, D]
        for block in self.blocks:
            x = block(x)
        return x

    def decode(self, x: torch.Tensor, caches: list[dict], start_pos: int) -> torch.Tensor:  # [B, T, D]
        """Inference forward of positions start_pos..; ``caches`` holds one attention cache per block."""
        if len(caches) != len(self.blocks):
            raise ValueError(f"stack {self.stack_id} has {len(self.blocks)} blocks but got {len(caches)} caches: "
                             "build the cache with Rack.new_cache()")
        for block, cache in zip(self.blocks, caches, strict=True):
            x = block.decode(x, cache, start_pos)
        return x

    def freeze(self) -> "Stack":
        for block in self.blocks:
            set_block_trainable(block, False)
        return self

    def unfreeze(self) -> "Stack":
        for block in self.blocks:
            set_block_trainable(block, True)
        return self


def set_block_trainable(block: Block, trainable: bool) -> None:
    """Switch a block's parameters on or off, keeping fixed-by-design weights (freeze_up_proj) frozen."""
    for param in block.parameters():
        param.requires_grad = trainable
    if getattr(block.ffn, "freeze_up_proj", False):
        block.ffn.up_proj.weight.requires_grad = False
