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

from ..enums import AttentionMode, AttentionType
from .attention import RMSNorm, build_attention, check_positive

__all__ = ["RESIDUAL_WRITERS", "Block", "RMSNorm", "SwiGLU"]

# A Block's two matrices that write into the residual stream (its state_dict keys, for every attention type):
# with both at zero, the pre-norm block is the identity.
RESIDUAL_WRITERS = ("attn.o_proj.weight", "ffn.down_proj.weight")


class SwiGLU(nn.Module):
    """Gated feed-forward (Llama MLP): down(silu(gate(x)) * up(x)), [B, T, D] -> [B, T, D]."""

    def __init__(self, d_model: int, d_ff: int, freeze_up_proj: bool = False):
        super().__init__()
        check_positive("d_model", d_model)
        check_positive("d_ff", d_ff)
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
    def __init__(self, d_model: int, d_ff: int, n_heads: int, n_kv_heads: int | None = None,
                 attention_type: str = AttentionType.MHA, attention_mode: str = AttentionMode.CAUSAL, *,
                 max_seq_len: int = 2048, rope_theta: float = 10000.0, norm_eps: float = 1e-5,
                 dropout: float = 0.0, freeze_up_proj: bool = False,
                 mla_kv_lora_rank: int = 64, mla_q_lora_rank: int = 0, mla_rope_head_dim: int = 16,
                 kernel_feature_map: str = "elu", kernel_chunk_size: int = 64,
                 init_std: float = 0.02, n_layers_total: int = 1):
        super().__init__()
        check_positive("d_model", d_model)
        check_positive("d_ff", d_ff)
        check_positive("init_std", init_std)
        check_positive("n_layers_total", n_layers_total)
        self.init_std, self.n_layers_total = init_std, n_layers_total
        self.attn_norm = RMSNorm(d_model, norm_eps)
        self.attn = build_attention(
            attention_type, d_model, n_heads, n_kv_heads, attention_mode,
            max_seq_len=max_seq_len, rope_theta=rope_theta, dropout=dropout,
            mla_kv_lora_rank=mla_kv_lora_rank, mla_q_lora_rank=mla_q_lora_rank,
            mla_rope_head_dim=mla_rope_head_dim, kernel_feature_map=kernel_feature_map,
            kernel_chunk_size=kernel_chunk_size, norm_eps=norm_eps,
        )
        self.ffn_norm = RMSNorm(d_model, norm_eps)
        self.ffn = SwiGLU(d_model, d_ff, freeze_up_proj)
        self.drop = nn.Dropout(dropout)  # residual dropout; build_attention has checked 0 <= dropout < 1
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
