"""A pre-norm transformer Block: x + attn(norm(x)), then x + SwiGLU(norm(x)).

Submodule names follow Hugging Face Llama so a checkpoint exports 1:1:
``attn_norm`` -> input_layernorm, ``attn`` -> self_attn, ``ffn_norm`` -> post_attention_layernorm,
``ffn`` -> mlp (gate_proj / up_proj / down_proj).

Pure PyTorch: never imports deepspeed or torch.distributed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .attention import RMSNorm, build_attention

__all__ = ["RESIDUAL_WRITERS", "Block", "RMSNorm", "SwiGLU"]

# A Block's two matrices that write into the residual stream (its state_dict keys, for every attention type):
# with both at zero, the pre-norm block is the identity.
RESIDUAL_WRITERS = ("attn.o_proj.weight", "ffn.down_proj.weight")


class SwiGLU(nn.Module):
    """Gated feed-forward (Llama MLP): down(silu(gate(x)) * up(x)), [B, T, D] -> [B, T, D]."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        d_model, d_ff, freeze_up_proj = config.d_model, config.resolved_d_ff, config.freeze_up_proj
        self.gate_proj = nn.Linear(d_model, d_ff, bias=False)
        self.up_proj = nn.Linear(d_model, d_ff, bias=False)
        self.down_proj = nn.Linear(d_ff, d_model, bias=False)
        # A frozen up_proj is a fixed random projection: the gate and down projections still learn.
        self.freeze_up_proj = freeze_up_proj
        if freeze_up_proj:
            self.up_proj.weight.requires_grad = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # hidden: [B, T, d_ff]


class Block(nn.Module):
    """One transformer block of ``config`` (nanoGPT's ``Block(config)``). It validates the config first: every rule
    of the model lives in ``ModelConfig.validate``, so a Block never exists with a layout the rules refuse."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        config.validate()
        # The residual projections' init shrinks with the depth of the whole rack (GPT-2), not of one stack.
        self.init_std, self.n_layers_total = config.init_std, config.n_blocks
        self.attn_norm = RMSNorm(config.d_model, config.norm_eps)
        self.attn = build_attention(config)
        self.ffn_norm = RMSNorm(config.d_model, config.norm_eps)
        self.ffn = SwiGLU(config)
        self.drop = nn.Dropout(config.dropout)  # residual dropout
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """GPT-2 init from the current RNG: Linear ~ N(0, init_std), norms = 1, and the two projections
        that write into the residual stream (attn.o_proj, ffn.down_proj) scaled by 1/sqrt(2 * n_layers_total)
        so the residual variance does not grow with depth."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, mean=0.0, std=self.init_std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        residual_std = self.init_std / math.sqrt(2 * self.n_layers_total)
        nn.init.normal_(self.attn.o_proj.weight, mean=0.0, std=residual_std)
        nn.init.normal_(self.ffn.down_proj.weight, mean=0.0, std=residual_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, d_model] -> [B, T, d_model]
        x = x + self.drop(self.attn(self.attn_norm(x)))
        x = x + self.drop(self.ffn(self.ffn_norm(x)))
        return x

    def decode(self, x: torch.Tensor, cache: dict, start_pos: int) -> torch.Tensor:  # [B, T, D] -> [B, T, D]
        """Inference forward of positions start_pos.. with this block's attention cache (see attention.py)."""
        x = x + self.drop(self.attn.decode(self.attn_norm(x), cache, start_pos))
        return x + self.drop(self.ffn(self.ffn_norm(x)))
