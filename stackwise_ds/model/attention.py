"""Attention modules: MHA/GQA (Llama layout), MLA (DeepSeek-V2) and kernel (linear) attention.

Every module maps x [B, T, D] -> [B, T, D]. Sequences are fixed-length and packed, so
positions are always 0..T-1 and there is no padding mask; ``attention_mode`` is either
"causal" (position i sees j <= i) or "bidirectional" (every position sees every position).

RoPE follows the Hugging Face Llama "rotate_half" convention (head_dim split into two
halves) so that q_proj/k_proj weights export to a LlamaAttention 1:1.

Every module is built from the model's config section (``Attention(config)``, as nanoGPT's
``Block(config)``), which ``ModelConfig.validate`` has checked: head counts, widths and ranks
are not re-checked here.

Pure PyTorch: never imports deepspeed or torch.distributed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..enums import AttentionMode, AttentionType, KernelFeatureMap

ATTENTION_TYPES = AttentionType.values()
ATTENTION_MODES = AttentionMode.values()


# ---------------------------------------------------------------------------- validation


def check_seq_len(seq_len: int, max_seq_len: int) -> None:
    if seq_len > max_seq_len:
        raise ValueError(f"sequence length ({seq_len}) is longer than max_seq_len ({max_seq_len}): "
                         "raise model.max_seq_len or shorten data.seq_len")



# ---------------------------------------------------------------------------- shared layers


class RMSNorm(nn.Module):
    """Root-mean-square norm (HF LlamaRMSNorm): statistics in float32, result cast back (bf16-safe).

    Defined here because MLA needs it; ``stackwise_ds.model.block`` re-exports it.
    """

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., dim] -> [..., dim]
        dtype = x.dtype
        x32 = x.float()  # bf16 has too few mantissa bits for a stable mean of squares
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class RotaryEmbedding(nn.Module):
    """cos/sin tables [max_seq_len, dim] for RoPE, HF Llama layout: emb = cat(freqs, freqs).

    The tables are non-persistent buffers (never in a state_dict / checkpoint), always held in
    float32 and cast to the activation dtype at use.
    """

    def __init__(self, dim: int, max_seq_len: int, theta: float = 10000.0):
        super().__init__()
        self.dim, self.max_seq_len, self.theta = dim, max_seq_len, theta
        self.register_buffer("cos_cached", torch.empty(0), persistent=False)
        self.register_buffer("sin_cached", torch.empty(0), persistent=False)
        self._build_tables(torch.device("cpu"))

    def _build_tables(self, device: torch.device) -> None:
        # Angles in float32: in bf16, position * inv_freq loses all precision beyond a few hundred tokens.
        inv_freq = 1.0 / (self.theta ** (torch.arange(0, self.dim, 2, device=device, dtype=torch.float32) / self.dim))
        positions = torch.arange(self.max_seq_len, device=device, dtype=torch.float32)
        freqs = torch.outer(positions, inv_freq)  # [max_seq_len, dim/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [max_seq_len, dim]
        self.cos_cached, self.sin_cached = emb.cos(), emb.sin()

    def _apply(self, fn, *args, **kwargs):
        # Module.to(torch.bfloat16) casts every floating buffer; rebuild the tables in float32 on the
        # (possibly new) device instead, so a bf16 round trip never degrades them.
        super()._apply(fn, *args, **kwargs)
        self._build_tables(self.cos_cached.device)
        return self

    def forward(self, seq_len: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin for positions 0..seq_len-1, each [seq_len, dim] in ``dtype``."""
        check_seq_len(seq_len, self.max_seq_len)
        return self.cos_cached[:seq_len].to(dtype), self.sin_cached[:seq_len].to(dtype)

    def window(self, start: int, seq_len: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin for positions start..start+seq_len-1 (incremental decoding), each [seq_len, dim]."""
        check_seq_len(start + seq_len, self.max_seq_len)
        end = start + seq_len
        return self.cos_cached[start:end].to(dtype), self.sin_cached[start:end].to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, H, T, dim] by position; cos/sin [T, dim] broadcast over batch and heads."""
    return x * cos + rotate_half(x) * sin


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[B, Hkv, T, d] -> [B, Hkv * n_rep, T, d]; kv head j serves query heads j*n_rep..(j+1)*n_rep-1 (as Llama)."""
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


# SDPA shares grouped K/V heads itself (enable_gqa) from torch 2.5 on, without n_rep copies of K and V.
SDPA_HAS_GQA = tuple(int(part) for part in torch.__version__.split(".")[:2]) >= (2, 5)


def native_gqa(device_type: str, dtype: torch.dtype, n_rep: int) -> bool:
    """Whether grouped heads go to SDPA as they are (enable_gqa) rather than repeated: where torch has it and the
    kernel it picks accepts them, flash attention (CUDA, bf16/fp16). CPU's flash kernel and CUDA's memory-efficient
    one (fp32) refuse grouped heads, and SDPA would fall back to its math kernel (slower, T x T memory)."""
    return n_rep > 1 and SDPA_HAS_GQA and device_type == "cuda" and dtype in (torch.bfloat16, torch.float16)


def grouped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, native: bool, **sdpa) -> torch.Tensor:
    """SDPA of q [B, H, T, d] against grouped k, v [B, Hkv, S, d] (H = Hkv * n_rep), Llama's grouping; ``native``:
    through enable_gqa (see ``native_gqa``), else on repeated K/V."""
    if native:
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True, **sdpa)
    n_rep = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, repeat_kv(k, n_rep), repeat_kv(v, n_rep), **sdpa)


# ---------------------------------------------------------------------------- incremental decoding
#
# ``decode(x, cache, start_pos)`` is the inference-only path of every attention module: x [B, T, D] holds
# the tokens at positions start_pos..start_pos+T-1, ``cache`` (a dict, one per layer, empty at the start)
# holds what the earlier positions left behind and is updated in place. Training never calls it: the
# plain forward stays as it is.

LayerCache = dict  # str -> torch.Tensor; the keys belong to the attention module that fills it


def check_decodable(module: nn.Module) -> None:
    if not module.causal:
        raise ValueError(f"{type(module).__name__} is bidirectional: every position sees later ones, so it cannot "
                         "decode token by token; use a causal rack (model.attention_mode: causal)")


def append_cache(cache: LayerCache, name: str, new: torch.Tensor, dim: int = 2) -> torch.Tensor:
    """cache[name] = cat(cache[name], new) along ``dim`` (the sequence axis); returns the whole tensor."""
    full = new if name not in cache else torch.cat((cache[name], new), dim=dim)
    cache[name] = full
    return full


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start_pos: int,
                     scale: float | None = None) -> torch.Tensor:
    """SDPA of T new queries (positions start_pos..) against all S = start_pos + T cached keys, causally.

    q [B, H, T, dq], k [B, H, S, dq], v [B, H, S, dv] -> [B, H, T, dv]. Without earlier positions this is
    the training forward's is_causal call; one new query sees every key, so it needs no mask.
    """
    n_new = q.shape[2]
    if start_pos == 0 or n_new == 1:
        return F.scaled_dot_product_attention(q, k, v, is_causal=n_new > 1, scale=scale)
    # query i sits at position start_pos + i and sees keys 0..start_pos + i: [T, S] boolean mask
    mask = torch.ones(n_new, k.shape[2], dtype=torch.bool, device=q.device).tril(diagonal=start_pos)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def split_heads(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """[B, T, H * d] -> [B, H, T, d]."""
    batch, seq_len, _ = x.shape
    return x.view(batch, seq_len, n_heads, -1).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[B, H, T, d] -> [B, T, H * d]."""
    batch, n_heads, seq_len, head_dim = x.shape
    return x.transpose(1, 2).reshape(batch, seq_len, n_heads * head_dim)


# ---------------------------------------------------------------------------- MHA / GQA


def add_qkvo_projections(module: nn.Module, config: ModelConfig) -> None:
    """q/k/v/o projections with HF Llama's names and shapes (so a Llama export maps 1:1)."""
    d_model, q_width = config.d_model, config.n_heads * config.head_dim
    kv_width = config.resolved_n_kv_heads * config.head_dim  # GQA: fewer key/value heads than query heads
    module.q_proj = nn.Linear(d_model, q_width, bias=False)
    module.k_proj = nn.Linear(d_model, kv_width, bias=False)
    module.v_proj = nn.Linear(d_model, kv_width, bias=False)
    module.o_proj = nn.Linear(q_width, d_model, bias=False)


def head_layout(module: nn.Module, config: ModelConfig) -> None:
    """The head counts, widths and mask every attention module reads at each call."""
    module.n_heads, module.n_kv_heads, module.head_dim = config.n_heads, config.resolved_n_kv_heads, config.head_dim
    module.causal = config.attention_mode == AttentionMode.CAUSAL


class MultiHeadAttention(nn.Module):
    """Softmax attention with Llama parameter names and shapes; GQA when n_kv_heads < n_heads.

    With n_kv_heads == n_heads no kv head is repeated, so 'gqa' runs exactly the 'mha' computation.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        head_layout(self, config)
        self.dropout = config.dropout
        add_qkvo_projections(self, config)
        self.rotary = RotaryEmbedding(self.head_dim, config.max_seq_len, config.rope_theta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, D] -> [B, T, D]
        cos, sin = self.rotary(x.shape[1], x.dtype)
        q = apply_rope(split_heads(self.q_proj(x), self.n_heads), cos, sin)  # [B, H, T, hd]
        k = apply_rope(split_heads(self.k_proj(x), self.n_kv_heads), cos, sin)  # [B, Hkv, T, hd]
        v = split_heads(self.v_proj(x), self.n_kv_heads)  # [B, Hkv, T, hd]
        native = native_gqa(x.device.type, x.dtype, self.n_heads // self.n_kv_heads)
        y = grouped_attention(q, k, v, native, is_causal=self.causal, dropout_p=self.dropout if self.training else 0.0)
        return self.o_proj(merge_heads(y))

    def decode(self, x: torch.Tensor, cache: LayerCache, start_pos: int) -> torch.Tensor:  # [B, T, D] -> [B, T, D]
        """Inference forward of positions start_pos.. with a K/V cache (keys cached after RoPE)."""
        check_decodable(self)
        cos, sin = self.rotary.window(start_pos, x.shape[1], x.dtype)
        q = apply_rope(split_heads(self.q_proj(x), self.n_heads), cos, sin)  # [B, H, T, hd]
        k = append_cache(cache, "k", apply_rope(split_heads(self.k_proj(x), self.n_kv_heads), cos, sin))
        v = append_cache(cache, "v", split_heads(self.v_proj(x), self.n_kv_heads))  # [B, Hkv, S, hd]
        n_rep = self.n_heads // self.n_kv_heads
        y = causal_attention(q, repeat_kv(k, n_rep), repeat_kv(v, n_rep), start_pos)
        return self.o_proj(merge_heads(y))


# ---------------------------------------------------------------------------- MLA


class MultiHeadLatentAttention(nn.Module):
    """DeepSeek-V2 multi-head latent attention.

    K and V are rebuilt per head from one shared latent c_kv [B, T, kv_lora_rank]; positions reach
    the scores only through a decoupled RoPE part: a per-head q_pe and ONE key k_pe shared by all
    heads (it comes straight from kv_a_proj, not from the latent). Per head:
        q = cat(q_nope [hd], q_pe [r]),  k = cat(k_nope [hd], k_pe [r]),  v [hd],  scale 1/sqrt(hd + r)
    with hd = d_model // n_heads and r = rope_head_dim.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        d_model, n_heads, norm_eps = config.d_model, config.n_heads, config.norm_eps
        mla = config.mla
        kv_lora_rank, q_lora_rank, rope_head_dim = mla.kv_lora_rank, mla.q_lora_rank, mla.rope_head_dim
        head_layout(self, config)  # n_kv_heads comes out as n_heads: MLA rebuilds K/V per head from its latent
        self.dropout = config.dropout
        self.kv_lora_rank, self.q_lora_rank, self.rope_head_dim = kv_lora_rank, q_lora_rank, rope_head_dim
        q_head_dim = self.head_dim + rope_head_dim
        self.softmax_scale = 1.0 / math.sqrt(q_head_dim)

        if q_lora_rank > 0:  # queries through their own low-rank bottleneck
            self.q_a_proj = nn.Linear(d_model, q_lora_rank, bias=False)
            self.q_a_norm = RMSNorm(q_lora_rank, norm_eps)
            self.q_b_proj = nn.Linear(q_lora_rank, n_heads * q_head_dim, bias=False)
        else:
            self.q_proj = nn.Linear(d_model, n_heads * q_head_dim, bias=False)
        self.kv_a_proj = nn.Linear(d_model, kv_lora_rank + rope_head_dim, bias=False)
        self.kv_a_norm = RMSNorm(kv_lora_rank, norm_eps)
        self.kv_b_proj = nn.Linear(kv_lora_rank, n_heads * 2 * self.head_dim, bias=False)
        self.o_proj = nn.Linear(n_heads * self.head_dim, d_model, bias=False)
        self.rotary = RotaryEmbedding(rope_head_dim, config.max_seq_len, config.rope_theta)

    def queries(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, D] -> [B, H, T, hd + r]
        q = self.q_b_proj(self.q_a_norm(self.q_a_proj(x))) if self.q_lora_rank > 0 else self.q_proj(x)
        return split_heads(q, self.n_heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, D] -> [B, T, D]
        cos, sin = self.rotary(x.shape[1], x.dtype)
        q_nope, q_pe = self.queries(x).split([self.head_dim, self.rope_head_dim], dim=-1)
        q = torch.cat((q_nope, apply_rope(q_pe, cos, sin)), dim=-1)  # [B, H, T, hd + r]

        c_kv, k_pe = self.kv_a_proj(x).split([self.kv_lora_rank, self.rope_head_dim], dim=-1)
        k_pe = apply_rope(k_pe.unsqueeze(1), cos, sin)  # [B, 1, T, r]: one RoPE key shared by all heads
        kv = split_heads(self.kv_b_proj(self.kv_a_norm(c_kv)), self.n_heads)  # [B, H, T, 2 * hd]
        k_nope, v = kv.split([self.head_dim, self.head_dim], dim=-1)
        k = torch.cat((k_nope, k_pe.expand(-1, self.n_heads, -1, -1)), dim=-1)  # [B, H, T, hd + r]

        # v is narrower than q/k (hd vs hd + r); SDPA handles that (via a backend that allows it).
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal, scale=self.softmax_scale,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.o_proj(merge_heads(y))  # [B, T, H * hd] -> [B, T, D]

    def decode(self, x: torch.Tensor, cache: LayerCache, start_pos: int) -> torch.Tensor:  # [B, T, D] -> [B, T, D]
        """Inference forward of positions start_pos.. caching only the normed latent and the RoPE key.

        The cache holds c_kv [B, S, kv_lora_rank] and k_pe [B, 1, S, r] (MLA's memory saving); per-head
        K/V are re-expanded from it at each call, row by row exactly as the full forward does.
        """
        check_decodable(self)
        cos, sin = self.rotary.window(start_pos, x.shape[1], x.dtype)
        q_nope, q_pe = self.queries(x).split([self.head_dim, self.rope_head_dim], dim=-1)
        q = torch.cat((q_nope, apply_rope(q_pe, cos, sin)), dim=-1)  # [B, H, T, hd + r]

        c_kv, k_pe = self.kv_a_proj(x).split([self.kv_lora_rank, self.rope_head_dim], dim=-1)
        c_kv = append_cache(cache, "c_kv", self.kv_a_norm(c_kv), dim=1)  # [B, S, kv_lora_rank]
        k_pe = append_cache(cache, "k_pe", apply_rope(k_pe.unsqueeze(1), cos, sin))  # [B, 1, S, r]
        k_nope, v = split_heads(self.kv_b_proj(c_kv), self.n_heads).split([self.head_dim, self.head_dim], dim=-1)
        k = torch.cat((k_nope, k_pe.expand(-1, self.n_heads, -1, -1)), dim=-1)  # [B, H, S, hd + r]
        y = causal_attention(q, k, v, start_pos, scale=self.softmax_scale)
        return self.o_proj(merge_heads(y))


# ---------------------------------------------------------------------------- kernel (linear) attention


def elu_feature_map(x: torch.Tensor) -> torch.Tensor:
    return F.elu(x) + 1.0  # > 0 everywhere, ~linear for x > 0


def relu_feature_map(x: torch.Tensor) -> torch.Tensor:
    return F.relu(x) + 1e-6  # the offset keeps phi(q) . phi(k) > 0 when all features are clipped


# Positive feature maps phi, so that phi(q) . phi(k) > 0 can normalise like softmax weights.
FEATURE_MAPS = {KernelFeatureMap.ELU: elu_feature_map, KernelFeatureMap.RELU: relu_feature_map}


class KernelAttention(nn.Module):
    """Linear attention (Katharopoulos et al. 2020) with RoPE in the numerator only (RoFormer recipe).

        out_i = sum_j (R_i phi(q_i) . R_j phi(k_j)) v_j / (sum_j phi(q_i) . phi(k_j) + eps)

    with j <= i (causal) or all j (bidirectional); R_i is the RoPE rotation at position i.
    Why RoPE only in the numerator: rotated features can have negative dot products, so a rotated
    denominator could approach zero or change sign; the un-rotated phi(q) . phi(k) stays positive.
    Without RoPE the bidirectional mode would be blind to token order entirely.

    Causal mode is a chunked scan, O(T) in time and memory: inside a chunk of C positions a masked
    C x C product, across chunks the running state S = sum phi_R(k) v^T [B, H, d, d] and
    z = sum phi(k) [B, H, d]. Accumulation runs in float32 (or wider, when the input is float64).
    There are no attention probabilities, so ``dropout`` is not used here (the Block's residual
    dropout still applies).
    """

    eps = 1e-6  # keeps the denominator away from zero when the features are tiny (relu map)

    def __init__(self, config: ModelConfig):
        super().__init__()
        head_layout(self, config)
        self.feature_map, self.chunk_size = config.kernel.feature_map, config.kernel.chunk_size
        self.phi = FEATURE_MAPS[self.feature_map]
        add_qkvo_projections(self, config)
        self.rotary = RotaryEmbedding(self.head_dim, config.max_seq_len, config.rope_theta)

    def features(self, x: torch.Tensor, cos: torch.Tensor,
                 sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """phi(q), phi(k), their RoPE rotations and v, each [B, H, T, d] in cos's (compute) dtype."""
        compute_dtype, n_rep = cos.dtype, self.n_heads // self.n_kv_heads
        q = self.phi(split_heads(self.q_proj(x), self.n_heads).to(compute_dtype))  # [B, H, T, d]
        k = self.phi(repeat_kv(split_heads(self.k_proj(x), self.n_kv_heads), n_rep).to(compute_dtype))
        v = repeat_kv(split_heads(self.v_proj(x), self.n_kv_heads), n_rep).to(compute_dtype)
        return q, k, apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, D] -> [B, T, D]
        compute_dtype = torch.promote_types(x.dtype, torch.float32)  # bf16 sums over T would drift
        cos, sin = self.rotary(x.shape[1], compute_dtype)
        q, k, q_rot, k_rot, v = self.features(x, cos, sin)
        with torch.autocast(device_type=x.device.type, enabled=False):  # autocast would redo the sums in bf16
            if self.causal:
                num, den = self.causal_terms(q, k, q_rot, k_rot, v)
            else:
                num = q_rot @ (k_rot.transpose(-2, -1) @ v)  # [B, H, T, d] @ [B, H, d, d]
                den = (q * k.sum(dim=2, keepdim=True)).sum(-1)  # phi(q_i) . z, [B, H, T]
            y = num / (den.unsqueeze(-1) + self.eps)
        return self.o_proj(merge_heads(y.to(x.dtype)))

    def decode(self, x: torch.Tensor, cache: LayerCache, start_pos: int) -> torch.Tensor:  # [B, T, D] -> [B, T, D]
        """Inference forward of positions start_pos.. from the recurrent state the earlier positions left.

        The cache holds kv = sum_j R_j phi(k_j) v_j^T [B, H, d, d] and z = sum_j phi(k_j) [B, H, d], in the
        compute dtype: the same running sums the chunked scan carries across chunks, so its size does
        not grow with the sequence.
        """
        check_decodable(self)
        compute_dtype = torch.promote_types(x.dtype, torch.float32)
        cos, sin = self.rotary.window(start_pos, x.shape[1], compute_dtype)
        q, k, q_rot, k_rot, v = self.features(x, cos, sin)
        with torch.autocast(device_type=x.device.type, enabled=False):
            num, den = self.decode_terms(q, k, q_rot, k_rot, v, cache)
            y = num / (den.unsqueeze(-1) + self.eps)
        return self.o_proj(merge_heads(y.to(x.dtype)))

    def decode_terms(self, q: torch.Tensor, k: torch.Tensor, q_rot: torch.Tensor, k_rot: torch.Tensor,
                     v: torch.Tensor, cache: LayerCache) -> tuple[torch.Tensor, torch.Tensor]:
        """Numerator [B, H, T, d] and denominator [B, H, T] of T new positions given the cached state."""
        if q.shape[2] == 1:  # one token: fold it into the state, then read the state (j <= i includes i)
            kv, z = update_kernel_state(cache, k, k_rot, v)
            return q_rot @ kv, (q * z.unsqueeze(2)).sum(-1)
        num, den = self.causal_terms(q, k, q_rot, k_rot, v)  # the new positions among themselves
        if "kv" in cache:  # plus everything before them, as the scan adds the state entering a chunk
            num = num + q_rot @ cache["kv"]
            den = den + (q * cache["z"].unsqueeze(2)).sum(-1)
        update_kernel_state(cache, k, k_rot, v)
        return num, den

    def causal_terms(self, q: torch.Tensor, k: torch.Tensor, q_rot: torch.Tensor, k_rot: torch.Tensor,
                     v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Numerator [B, H, T, d] and denominator [B, H, T] of causal linear attention, chunk by chunk."""
        seq_len, size = q.shape[2], self.chunk_size
        n_chunks = -(-seq_len // size)
        pad = n_chunks * size - seq_len  # zero features at the end: they only reach the dropped padded queries

        def chunked(t: torch.Tensor) -> torch.Tensor:  # [B, H, T, d] -> [B, H, N, C, d]
            t = F.pad(t, (0, 0, 0, pad))
            return t.view(*t.shape[:2], n_chunks, size, t.shape[-1])

        q, k, q_rot, k_rot, v = map(chunked, (q, k, q_rot, k_rot, v))

        # State entering each chunk = sum over all earlier chunks (exclusive prefix over N).
        kv_per_chunk = k_rot.transpose(-2, -1) @ v  # [B, H, N, d, d]
        kv_prev = exclusive_cumsum(kv_per_chunk, dim=2)  # [B, H, N, d, d]
        z_prev = exclusive_cumsum(k.sum(dim=3), dim=2)  # [B, H, N, d]

        # Within a chunk: masked C x C scores for the numerator; running key sums for the denominator.
        mask = torch.ones(size, size, dtype=torch.bool, device=q.device).tril()
        scores = (q_rot @ k_rot.transpose(-2, -1)).masked_fill(~mask, 0.0)  # [B, H, N, C, C]
        num = q_rot @ kv_prev + scores @ v  # [B, H, N, C, d]
        z = z_prev.unsqueeze(3) + k.cumsum(dim=3)  # [B, H, N, C, d]: sum of phi(k_j) for j <= i
        den = (q * z).sum(-1)  # [B, H, N, C]

        batch, heads = q.shape[:2]
        num = num.reshape(batch, heads, n_chunks * size, -1)[:, :, :seq_len]
        den = den.reshape(batch, heads, n_chunks * size)[:, :, :seq_len]
        return num, den


def update_kernel_state(cache: LayerCache, k: torch.Tensor, k_rot: torch.Tensor,
                        v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Add T positions (k, k_rot, v [B, H, T, d]) to cache["kv"] [B, H, d, d] and cache["z"] [B, H, d]."""
    kv, z = k_rot.transpose(-2, -1) @ v, k.sum(dim=2)
    if "kv" in cache:
        kv, z = cache["kv"] + kv, cache["z"] + z
    cache["kv"], cache["z"] = kv, z
    return kv, z


def exclusive_cumsum(x: torch.Tensor, dim: int) -> torch.Tensor:
    """out[n] = sum of x[:n] along ``dim`` (zero at n = 0); shifting avoids the cancellation of cumsum - x."""
    total = x.cumsum(dim)
    zero = torch.zeros_like(x.narrow(dim, 0, 1))
    return torch.cat((zero, total.narrow(dim, 0, x.shape[dim] - 1)), dim=dim)


# ---------------------------------------------------------------------------- factory


ATTENTION_CLASSES = {AttentionType.MHA: MultiHeadAttention, AttentionType.GQA: MultiHeadAttention,
                     AttentionType.MLA: MultiHeadLatentAttention, AttentionType.KERNEL: KernelAttention}


def build_attention(config: ModelConfig) -> nn.Module:
    """The attention module of ``config.attention_type`` for a validated config; x [B, T, D] -> [B, T, D]."""
    return ATTENTION_CLASSES[config.attention_type](config)
