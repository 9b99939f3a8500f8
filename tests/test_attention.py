"""Attention modules and Block: shapes, masking, references, validation, dtype safety, training."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from stackwise_ds.config import ArchitectureConfig, ConfigError, KernelAttentionConfig, MLAConfig, ModelConfig
from stackwise_ds.model.attention import (
    ATTENTION_MODES,
    ATTENTION_TYPES,
    KernelAttention,
    MultiHeadAttention,
    MultiHeadLatentAttention,
    apply_rope,
    build_attention,
)
from stackwise_ds.model.block import Block, RMSNorm, SwiGLU

D, D_FF, H = 32, 64, 4
ALL_CASES = [(t, m) for t in ATTENTION_TYPES for m in ATTENTION_MODES]


def model_config(attention_type: str = "gqa", attention_mode: str = "causal", **fields) -> ModelConfig:
    """A small ModelConfig (d_model D, d_ff D_FF, H heads): ``mla_*`` and ``kernel_*`` fields go to those sections,
    ``n_blocks`` (default 1) is the rack's depth, which scales the residual projections' init."""
    mla = {key.removeprefix("mla_"): fields.pop(key) for key in list(fields) if key.startswith("mla_")}
    kernel = {key.removeprefix("kernel_"): fields.pop(key) for key in list(fields) if key.startswith("kernel_")}
    depth = ArchitectureConfig(n_stacks=fields.pop("n_blocks", 1), blocks_per_stack=1)
    values = dict(d_model=D, d_ff=D_FF, n_heads=H, attention_type=attention_type, attention_mode=attention_mode)
    return ModelConfig(**{**values, **fields}, architecture=depth, mla=MLAConfig(**mla),
                       kernel=KernelAttentionConfig(**kernel))


def make_block(attention_type: str, attention_mode: str = "causal", dtype: torch.dtype = torch.float64,
               **overrides) -> Block:
    """A small Block; gqa/kernel get 2 kv heads, mla a small latent, kernel a chunk of 8."""
    fields = dict(max_seq_len=64, mla_kv_lora_rank=16, mla_rope_head_dim=4, kernel_chunk_size=8, init_std=0.1)
    fields.update(overrides)
    fields.setdefault("n_kv_heads", 2 if attention_type in ("gqa", "kernel") else None)
    return Block(model_config(attention_type, attention_mode, **fields)).to(dtype)


# ---------------------------------------------------------------------------- naive references (O(T^2))


def rope_tables(dim: int, seq_len: int, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """HF Llama tables in float64, written independently of the module."""
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    angles = torch.arange(seq_len, dtype=torch.float64)[:, None] * inv_freq[None, :]
    emb = torch.cat((angles, angles), dim=-1)
    return emb.cos(), emb.sin()


def rope(x: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:  # [B, H, T, d]
    cos, sin = rope_tables(x.shape[-1], x.shape[-2], theta)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


def heads(t: torch.Tensor, n: int) -> torch.Tensor:  # [B, T, n*d] -> [B, n, T, d]
    return t.view(t.shape[0], t.shape[1], n, -1).transpose(1, 2)


def naive_kernel_attention(attn: KernelAttention, x: torch.Tensor) -> torch.Tensor:
    """out_i = sum_j (R phi(q_i) . R phi(k_j)) v_j / (sum_j phi(q_i) . phi(k_j) + eps), as full T x T matrices."""
    phi = {"elu": lambda t: F.elu(t) + 1.0, "relu": lambda t: F.relu(t) + 1e-6}[attn.feature_map]
    rep = attn.n_heads // attn.n_kv_heads
    q = phi(heads(attn.q_proj(x), attn.n_heads))
    k = phi(heads(attn.k_proj(x), attn.n_kv_heads)).repeat_interleave(rep, dim=1)
    v = heads(attn.v_proj(x), attn.n_kv_heads).repeat_interleave(rep, dim=1)
    num = rope(q) @ rope(k).transpose(-2, -1)  # [B, H, T, T]
    den = q @ k.transpose(-2, -1)
    if attn.causal:
        keep = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).tril()
        num, den = num.masked_fill(~keep, 0.0), den.masked_fill(~keep, 0.0)
    y = (num @ v) / (den.sum(-1, keepdim=True) + attn.eps)
    return attn.o_proj(y.transpose(1, 2).flatten(2))


def naive_mla(attn: MultiHeadLatentAttention, x: torch.Tensor) -> torch.Tensor:
    """DeepSeek-V2 MLA written out with an explicit softmax."""
    hd, r, n = attn.head_dim, attn.rope_head_dim, attn.n_heads
    q = heads(attn.q_proj(x), n)
    q = torch.cat((q[..., :hd], rope(q[..., hd:])), dim=-1)
    latent = attn.kv_a_proj(x)
    k_pe = rope(latent[:, None, :, attn.kv_lora_rank:])  # [B, 1, T, r]
    kv = heads(attn.kv_b_proj(attn.kv_a_norm(latent[..., :attn.kv_lora_rank])), n)
    k = torch.cat((kv[..., :hd], k_pe.expand(-1, n, -1, -1)), dim=-1)
    scores = q @ k.transpose(-2, -1) / math.sqrt(hd + r)
    if attn.causal:
        scores = scores.masked_fill(~torch.ones_like(scores, dtype=torch.bool).tril(), float("-inf"))
    y = scores.softmax(-1) @ kv[..., hd:]
    return attn.o_proj(y.transpose(1, 2).flatten(2))


# ---------------------------------------------------------------------------- shapes and masking


@pytest.mark.parametrize("attention_type,attention_mode", ALL_CASES)
def test_block_output_shape(attention_type, attention_mode):
    block = make_block(attention_type, attention_mode, dtype=torch.float32)
    y = block(torch.randn(3, 19, D))
    assert y.shape == (3, 19, D)
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("attention_type", ATTENTION_TYPES)
def test_causal_mode_never_sees_the_future(attention_type):
    torch.manual_seed(0)
    block = make_block(attention_type, "causal")
    x = torch.randn(2, 24, D, dtype=torch.float64)
    changed = x.clone()
    t = 13  # mid-chunk for the kernel's chunk of 8
    changed[:, t:] = torch.randn(2, 24 - t, D, dtype=torch.float64)
    y, y_changed = block(x), block(changed)
    torch.testing.assert_close(y_changed[:, :t], y[:, :t], atol=1e-6, rtol=0)
    assert (y_changed[:, t:] - y[:, t:]).abs().max() > 1e-3


@pytest.mark.parametrize("attention_type", ATTENTION_TYPES)
def test_bidirectional_mode_sees_the_future(attention_type):
    torch.manual_seed(0)
    block = make_block(attention_type, "bidirectional")
    x = torch.randn(2, 24, D, dtype=torch.float64)
    changed = x.clone()
    changed[:, 13:] = torch.randn(2, 11, D, dtype=torch.float64)
    assert (block(changed)[:, :13] - block(x)[:, :13]).abs().amin(dim=-1).min() > 1e-6  # every early position


@pytest.mark.parametrize("attention_mode", ATTENTION_MODES)
def test_gqa_with_all_kv_heads_is_exactly_mha(attention_mode):
    torch.manual_seed(0)
    mha = make_block("mha", attention_mode, dtype=torch.float32)
    gqa = make_block("gqa", attention_mode, dtype=torch.float32, n_kv_heads=H)
    gqa.load_state_dict(mha.state_dict())
    x = torch.randn(2, 20, D)
    assert torch.equal(gqa(x), mha(x))


def test_gqa_shares_each_kv_head_across_its_query_group():
    torch.manual_seed(0)
    attn = MultiHeadAttention(model_config(n_kv_heads=2, max_seq_len=64)).double()
    # Expand the kv heads into an equivalent MHA: query heads 0,1 use kv head 0; heads 2,3 kv head 1.
    mha = MultiHeadAttention(model_config(n_kv_heads=H, max_seq_len=64)).double()
    mha.load_state_dict({**attn.state_dict(),
                         "k_proj.weight": attn.k_proj.weight.view(2, 1, -1, D).expand(2, 2, -1, D).reshape(D, D),
                         "v_proj.weight": attn.v_proj.weight.view(2, 1, -1, D).expand(2, 2, -1, D).reshape(D, D)})
    x = torch.randn(2, 20, D, dtype=torch.float64)
    torch.testing.assert_close(attn(x), mha(x))


@pytest.mark.parametrize("causal", [True, False])
def test_sdpa_grouped_heads_equal_the_repeated_kv_path(causal):
    from stackwise_ds.model.attention import SDPA_HAS_GQA, grouped_attention

    assert SDPA_HAS_GQA, "torch >= 2.5 has enable_gqa"
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, n, 12, 8, generator=gen, dtype=torch.float64) for n in (6, 2, 2))
    native = grouped_attention(q, k, v, native=True, is_causal=causal)
    repeated = grouped_attention(q, k, v, native=False, is_causal=causal)
    expected = F.scaled_dot_product_attention(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1),
                                              is_causal=causal)
    assert torch.allclose(native, repeated, atol=1e-12) and torch.equal(repeated, expected)


def test_grouped_heads_go_native_where_flash_attention_takes_them():
    from stackwise_ds.model.attention import native_gqa

    assert native_gqa("cuda", torch.bfloat16, 4) and native_gqa("cuda", torch.float16, 2)
    assert not native_gqa("cuda", torch.float32, 4), "fp32 on CUDA: the memory-efficient kernel refuses groups"
    assert not native_gqa("cpu", torch.bfloat16, 4), "CPU's flash kernel refuses groups"
    assert not native_gqa("cuda", torch.bfloat16, 1), "no groups: plain MHA"


def test_gqa_block_matches_hugging_face_llama_decoder_layer():
    """Names, shapes, RoPE convention, GQA grouping and norms all map 1:1 onto LlamaDecoderLayer."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=D, intermediate_size=D_FF, num_attention_heads=H, num_key_value_heads=2,
                         rms_norm_eps=1e-5, max_position_embeddings=64, attn_implementation="eager")
    layer = LlamaDecoderLayer(config, layer_idx=0).double().eval()
    block = make_block("gqa", "causal")
    hf_names = {"attn_norm": "input_layernorm", "attn": "self_attn", "ffn_norm": "post_attention_layernorm",
                "ffn": "mlp"}
    layer.load_state_dict({hf_names[k.split(".")[0]] + k[k.index("."):]: v for k, v in block.state_dict().items()})
    x = torch.randn(2, 20, D, dtype=torch.float64)
    positions = torch.arange(20)[None]
    mask = torch.full((20, 20), float("-inf"), dtype=torch.float64).triu(1)[None, None]
    out = layer(x, attention_mask=mask, position_ids=positions,
                position_embeddings=LlamaRotaryEmbedding(config).double()(x, positions))
    out = out[0] if isinstance(out, tuple) else out
    torch.testing.assert_close(block(x), out, atol=1e-7, rtol=0)  # tables differ only by float32 rounding


# ---------------------------------------------------------------------------- kernel attention


@pytest.mark.parametrize("attention_mode", ATTENTION_MODES)
@pytest.mark.parametrize("feature_map", ["elu", "relu"])
def test_kernel_attention_matches_naive_quadratic_reference(attention_mode, feature_map):
    torch.manual_seed(0)
    attn = KernelAttention(model_config("kernel", attention_mode, n_kv_heads=2, kernel_feature_map=feature_map,
                                        kernel_chunk_size=8, max_seq_len=64))
    x = torch.randn(2, 37, D)  # 37 is not a multiple of the chunk size
    expected = naive_kernel_attention(attn, x)
    assert expected.abs().mean() > 1e-2  # a meaningful scale for the tolerance below
    torch.testing.assert_close(attn(x), expected, atol=1e-5, rtol=0)
    # float64: only the module's float32 RoPE tables differ from the reference's float64 ones
    torch.testing.assert_close(attn.double()(x.double()), naive_kernel_attention(attn, x.double()),
                               atol=1e-7, rtol=0)


def test_kernel_attention_result_does_not_depend_on_chunk_size():
    torch.manual_seed(0)
    x = torch.randn(2, 37, D, dtype=torch.float64)
    reference = KernelAttention(model_config("kernel", kernel_chunk_size=1, max_seq_len=64)).double()
    for chunk_size in (5, 8, 37, 64):
        attn = KernelAttention(model_config("kernel", kernel_chunk_size=chunk_size, max_seq_len=64)).double()
        attn.load_state_dict(reference.state_dict())
        torch.testing.assert_close(attn(x), reference(x), atol=1e-10, rtol=0)


def test_kernel_attention_in_bf16_accumulates_in_float32():
    torch.manual_seed(0)
    attn = KernelAttention(model_config("kernel", n_kv_heads=2, kernel_chunk_size=16, max_seq_len=512))
    x = torch.randn(1, 512, D)
    expected = naive_kernel_attention(attn, x)
    y = attn.to(torch.bfloat16)(x.to(torch.bfloat16))
    assert y.dtype == torch.bfloat16
    assert (y.float() - expected).abs().max() < 0.05 * expected.abs().max()


# ---------------------------------------------------------------------------- MLA


@pytest.mark.parametrize("attention_mode", ATTENTION_MODES)
def test_mla_matches_naive_reference(attention_mode):
    torch.manual_seed(0)
    config = model_config("mla", attention_mode, mla_kv_lora_rank=16, mla_rope_head_dim=4, max_seq_len=64)
    attn = MultiHeadLatentAttention(config).double()
    x = torch.randn(2, 21, D, dtype=torch.float64)
    torch.testing.assert_close(attn(x), naive_mla(attn, x))


def test_mla_parameter_shapes():
    hd, r, rank, q_rank = D // H, 4, 16, 8
    attn = MultiHeadLatentAttention(model_config("mla", mla_kv_lora_rank=rank, mla_q_lora_rank=q_rank,
                                                 mla_rope_head_dim=r))
    shapes = {name: tuple(p.shape) for name, p in attn.named_parameters()}
    assert shapes == {
        "q_a_proj.weight": (q_rank, D), "q_a_norm.weight": (q_rank,), "q_b_proj.weight": (H * (hd + r), q_rank),
        "kv_a_proj.weight": (rank + r, D), "kv_a_norm.weight": (rank,), "kv_b_proj.weight": (H * 2 * hd, rank),
        "o_proj.weight": (D, H * hd),
    }
    direct = MultiHeadLatentAttention(model_config("mla", mla_kv_lora_rank=rank, mla_rope_head_dim=r))
    assert tuple(direct.q_proj.weight.shape) == (H * (hd + r), D) and not hasattr(direct, "q_a_proj")


# ---------------------------------------------------------------------------- RoPE


def test_rope_scores_depend_only_on_relative_position():
    torch.manual_seed(0)
    attn = MultiHeadAttention(model_config(max_seq_len=64))
    cos, sin = attn.rotary(64, torch.float32)
    q = apply_rope(torch.randn(attn.head_dim).expand(1, 1, 64, -1), cos, sin)[0, 0]  # same vector everywhere
    k = apply_rope(torch.randn(attn.head_dim).expand(1, 1, 64, -1), cos, sin)[0, 0]
    for shift in (1, 17, 40):
        torch.testing.assert_close(q[3] @ k[7], q[3 + shift] @ k[7 + shift], atol=1e-5, rtol=0)
        torch.testing.assert_close(q[9] @ k[2], q[9 + shift] @ k[2 + shift], atol=1e-5, rtol=0)
    assert abs(q[3] @ k[7] - q[3] @ k[8]) > 1e-3  # ... and does depend on it


def test_rope_tables_stay_float32_and_out_of_the_state_dict():
    block = make_block("mla", dtype=torch.bfloat16)
    assert block.attn.rotary.cos_cached.dtype == torch.float32
    assert not any("cached" in key for key in block.state_dict())
    cos, _ = block.attn.rotary(10, torch.bfloat16)
    assert cos.dtype == torch.bfloat16
    # a bf16 round trip does not leave rounded tables behind
    torch.testing.assert_close(block.float().attn.rotary.cos_cached, rope_tables(4, 64)[0].float())


@pytest.mark.parametrize("attention_type,attention_mode", ALL_CASES)
def test_bf16_forward_is_finite(attention_type, attention_mode):
    torch.manual_seed(0)
    block = make_block(attention_type, attention_mode, dtype=torch.bfloat16)
    y = block(torch.randn(2, 40, D, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()


def test_rmsnorm_matches_formula_and_keeps_dtype():
    norm = RMSNorm(D, eps=1e-5)
    nn.init.normal_(norm.weight)
    x = torch.randn(3, D) * 5
    expected = norm.weight * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)
    torch.testing.assert_close(norm(x), expected)
    assert norm.to(torch.bfloat16)(x.to(torch.bfloat16)).dtype == torch.bfloat16


# ---------------------------------------------------------------------------- parameters and init


def test_freeze_up_proj_keeps_only_up_proj_frozen():
    block = make_block("gqa", dtype=torch.float32, freeze_up_proj=True)
    frozen = [name for name, p in block.named_parameters() if not p.requires_grad]
    assert frozen == ["ffn.up_proj.weight"]
    before = block.ffn.up_proj.weight.clone()
    block.reset_parameters()
    assert not block.ffn.up_proj.weight.requires_grad and not torch.equal(before, block.ffn.up_proj.weight)
    block(torch.randn(2, 10, D)).square().sum().backward()
    assert block.ffn.up_proj.weight.grad is None
    assert all(p.grad is not None for name, p in block.named_parameters() if name != "ffn.up_proj.weight")
    assert not SwiGLU(model_config()).freeze_up_proj and SwiGLU(model_config()).up_proj.weight.requires_grad


def test_reset_parameters_uses_gpt2_init():
    torch.manual_seed(0)
    config = model_config(d_model=256, d_ff=512, n_heads=8, n_kv_heads=2, init_std=0.02, n_blocks=8)
    block = Block(config)
    nn.init.zeros_(block.attn_norm.weight)
    torch.manual_seed(1)
    block.reset_parameters()
    assert torch.equal(block.attn_norm.weight, torch.ones(256)) and torch.equal(block.ffn_norm.weight, torch.ones(256))
    for name in ("attn.q_proj", "attn.k_proj", "attn.v_proj", "ffn.gate_proj", "ffn.up_proj"):
        assert abs(block.get_submodule(name).weight.std().item() - 0.02) < 0.002, name
    for name in ("attn.o_proj", "ffn.down_proj"):  # residual projections: 0.02 / sqrt(2 * 8)
        assert abs(block.get_submodule(name).weight.std().item() - 0.005) < 0.0005, name
    torch.manual_seed(1)
    again = Block(config)
    torch.manual_seed(1)
    again.reset_parameters()
    assert all(torch.equal(a, b) for a, b in zip(block.state_dict().values(), again.state_dict().values(), strict=True))


# ---------------------------------------------------------------------------- validation


@pytest.mark.parametrize("fields,match", [
    ({"d_model": 100, "n_heads": 3}, r"model.d_model \(100\) must be divisible by model.n_heads \(3\): pick n_heads"),
    ({"n_kv_heads": 3}, r"model.n_heads \(4\) must be divisible by model.n_kv_heads \(3\): pick n_kv_heads"),
    ({"n_kv_heads": 8}, r"model.n_heads \(4\) must be divisible by model.n_kv_heads \(8\)"),
    ({"attention_type": "mha", "n_kv_heads": 2}, r"'mha' uses one key/value head per query head.*use 'gqa'"),
    ({"attention_type": "mla", "n_kv_heads": 2}, r"'mla' uses one key/value head per query head"),
    ({"attention_type": "flash"}, r"^model.attention_type is 'flash' but must be one of: mha, gqa, mla, kernel"),
    ({"attention_mode": "sideways"}, r"^model.attention_mode is 'sideways' but must be one of: causal, bidirectional"),
    ({"d_model": 0}, r"model.d_model must be positive, got 0"),
    ({"d_ff": 0}, r"model.d_ff must be positive, got 0"),
    ({"n_heads": 0}, r"model.n_heads must be positive, got 0"),
    ({"n_heads": -4}, r"model.n_heads must be positive, got -4"),
    ({"n_kv_heads": 0}, r"model.n_kv_heads must be positive, got 0"),
    ({"max_seq_len": 0}, r"model.max_seq_len must be positive, got 0"),
    ({"rope_theta": 0.0}, r"model.rope_theta must be positive, got 0.0"),
    ({"norm_eps": 0.0}, r"model.norm_eps must be positive, got 0.0"),
    ({"init_std": 0.0}, r"model.init_std must be positive, got 0.0"),
    ({"n_blocks": 0}, r"model.architecture.n_stacks must be positive, got 0"),
    ({"dropout": 1.0}, r"model.dropout \(1.0\) must be in \[0, 1\)"),
    ({"dropout": -0.1}, r"model.dropout \(-0.1\) must be in \[0, 1\)"),
    ({"d_model": 12}, r"model.d_model / model.n_heads \(3\) must be even for RoPE.*choose d_model and n_heads"),
    ({"d_model": 12, "attention_type": "kernel"}, r"model.d_model / model.n_heads \(3\) must be even for RoPE"),
    ({"attention_type": "mla", "mla_rope_head_dim": 5}, r"model.mla.rope_head_dim \(5\) must be even for RoPE"),
    ({"attention_type": "mla", "mla_rope_head_dim": 0}, r"model.mla.rope_head_dim must be positive, got 0"),
    ({"attention_type": "mla", "mla_kv_lora_rank": 0}, r"model.mla.kv_lora_rank must be positive, got 0"),
    ({"attention_type": "mla", "mla_q_lora_rank": -1}, r"model.mla.q_lora_rank \(-1\) must be >= 0: use 0 to project"),
    ({"attention_type": "kernel", "kernel_chunk_size": 0}, r"model.kernel.chunk_size must be positive, got 0"),
    ({"attention_type": "kernel", "kernel_feature_map": "softmax"},
     r"^model.kernel.feature_map is 'softmax' but must be one of: elu, relu"),
])
def test_invalid_configuration_raises_a_helpful_error(fields, match):
    """Every model rule lives in ModelConfig.validate; a Block checks its config with it before building anything."""
    config = model_config(**fields)
    with pytest.raises(ConfigError, match=match):
        config.validate()
    with pytest.raises(ConfigError, match=match):
        Block(config)


def test_build_attention_builds_the_module_of_each_type():
    expected = {"mha": MultiHeadAttention, "gqa": MultiHeadAttention, "mla": MultiHeadLatentAttention,
                "kernel": KernelAttention}
    assert set(expected) == set(ATTENTION_TYPES)
    for attention_type, cls in expected.items():
        assert type(build_attention(model_config(attention_type, max_seq_len=64))) is cls
    with pytest.raises(ConfigError, match="^model.attention_type is 'linear' but must be one of: mha, gqa, mla, kern"):
        model_config("linear").validate()


@pytest.mark.parametrize("attention_type", ATTENTION_TYPES)
def test_sequence_longer_than_max_seq_len_raises(attention_type):
    block = make_block(attention_type, dtype=torch.float32, max_seq_len=16)
    block(torch.randn(1, 16, D))  # exactly max_seq_len is fine
    with pytest.raises(ValueError, match=r"sequence length \(17\) is longer than max_seq_len \(16\): "
                                         r"raise model.max_seq_len or shorten data.seq_len"):
        block(torch.randn(1, 17, D))


# ---------------------------------------------------------------------------- training


class TinyLM(nn.Module):
    def __init__(self, vocab: int, attention_type: str, n_blocks: int = 2):
        super().__init__()
        self.embedding = nn.Embedding(vocab, D)
        nn.init.normal_(self.embedding.weight, std=0.02)
        self.blocks = nn.ModuleList(
            Block(model_config(attention_type, n_kv_heads=2, max_seq_len=32, kernel_chunk_size=8, n_blocks=n_blocks))
            for _ in range(n_blocks))
        self.norm = RMSNorm(D)
        self.head = nn.Linear(D, vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # [B, T] -> [B, T, vocab]
        x = self.embedding(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


@pytest.mark.parametrize("attention_type", ["gqa", "kernel"])
def test_tiny_block_stack_overfits_one_batch(attention_type):
    torch.manual_seed(0)
    vocab = 32
    model = TinyLM(vocab, attention_type)
    tokens = torch.randint(0, vocab, (4, 17))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(200):
        loss = F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if loss.item() < 0.1 * losses[0]:  # overfitted: ~15 of the 200 steps allowed
            break
    assert losses[-1] < 0.1 * losses[0], (losses[0], losses[-1])
