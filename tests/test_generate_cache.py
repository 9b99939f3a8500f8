"""Incremental decoding: Rack.decode with a cache gives the full forward's logits, and sample() with
the cache gives the uncached path's tokens, for every attention type, across chunks and the window slide."""

from __future__ import annotations

import pytest
import torch

from launch_utils import rack_of
from stackwise_ds.checkpoint.generate import CachedLogits, UncachedLogits, sample
from stackwise_ds.config import StackWiseConfig
from stackwise_ds.model.rack import DecodeCache

VOCAB, MAX_SEQ_LEN, CHUNK = 64, 32, 8
# (attention_type, kernel feature map, mla q_lora_rank): every cache kind, both kernel maps, both MLA query paths
CASES = [("mha", "elu", 0), ("gqa", "elu", 0), ("mla", "elu", 0), ("mla", "elu", 8), ("kernel", "elu", 0),
         ("kernel", "relu", 0)]
IDS = [f"{t}-{f}-q{q}" for t, f, q in CASES]
ATOL = 1e-5


def tiny_rack(attention_type: str = "mha", feature_map: str = "elu", q_lora_rank: int = 0,
              attention_mode: str = "causal"):
    """2 stacks x 1 block, d_model 32, fp32, eval mode; init_std 0.1 so the logits are far from uniform."""
    n_kv_heads = 2 if attention_type in ("gqa", "kernel") else None
    config = {
        "model": {"vocab_size": VOCAB, "d_model": 32, "n_heads": 4, "n_kv_heads": n_kv_heads,
                  "max_seq_len": MAX_SEQ_LEN, "attention_type": attention_type, "attention_mode": attention_mode,
                  "init_std": 0.1, "architecture": {"n_stacks": 2, "blocks_per_stack": 1},
                  "kernel": {"chunk_size": CHUNK, "feature_map": feature_map},
                  "mla": {"kv_lora_rank": 16, "q_lora_rank": q_lora_rank, "rope_head_dim": 4}},
        "data": {"seq_len": MAX_SEQ_LEN},
        "training": {"objective": "causal_lm" if attention_mode == "causal" else "masked_lm"},
    }
    return rack_of(StackWiseConfig.from_dict(config), seed=1).eval()


def random_ids(length: int, seed: int = 0, batch: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- Rack.decode vs forward


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("prompt_len", [3, CHUNK + 5], ids=["prompt<chunk", "prompt>chunk"])
@torch.no_grad()
def test_decode_logits_equal_full_forward_at_every_step(case, prompt_len):
    """Prefill, then one token per call, then a multi-token call starting mid-sequence (crossing a chunk)."""
    rack, ids = tiny_rack(*case), random_ids(MAX_SEQ_LEN, batch=2)
    full = rack(ids)  # [2, T, V]
    cache = rack.new_cache()
    torch.testing.assert_close(rack.decode(ids[:, :prompt_len], cache), full[:, :prompt_len], atol=ATOL, rtol=0)
    for pos in range(prompt_len, prompt_len + 6):
        step = rack.decode(ids[:, pos:pos + 1], cache)
        torch.testing.assert_close(step, full[:, pos:pos + 1], atol=ATOL, rtol=0, msg=f"position {pos}")
    start = prompt_len + 6
    torch.testing.assert_close(rack.decode(ids[:, start:], cache), full[:, start:], atol=ATOL, rtol=0)
    assert cache.length == MAX_SEQ_LEN


@torch.no_grad()
def test_decode_caches_keys_per_position_but_kernel_state_stays_constant_size():
    mha, kernel, ids = tiny_rack("gqa"), tiny_rack("kernel"), random_ids(12)
    mha_cache, kernel_cache = mha.new_cache(), kernel.new_cache()
    mha.decode(ids[:, :10], mha_cache), kernel.decode(ids[:, :10], kernel_cache)
    state_shape = kernel_cache.layers[0]["kv"].shape
    mha.decode(ids[:, 10:12], mha_cache), kernel.decode(ids[:, 10:12], kernel_cache)
    assert mha_cache.layers[0]["k"].shape == (1, 2, 12, 8)  # [B, Hkv, S, hd]: post-RoPE keys, one per position
    assert kernel_cache.layers[0]["kv"].shape == state_shape == (1, 4, 8, 8)  # [B, H, d, d], independent of S


@torch.no_grad()
def test_decode_refuses_a_bidirectional_rack_and_positions_past_max_seq_len():
    with pytest.raises(ValueError, match="bidirectional.*attention_mode: causal"):
        bidirectional = tiny_rack("mha", attention_mode="bidirectional")
        bidirectional.decode(random_ids(4), bidirectional.new_cache())
    rack = tiny_rack()
    cache = rack.new_cache()
    rack.decode(random_ids(MAX_SEQ_LEN), cache)
    with pytest.raises(ValueError, match=rf"\({MAX_SEQ_LEN + 1}\) is longer than max_seq_len \({MAX_SEQ_LEN}\)"):
        rack.decode(random_ids(1), cache)
    with pytest.raises(ValueError, match="new_cache"):
        rack.decode(random_ids(1), DecodeCache([{}]))  # one layer for a rack of two blocks


# ----------------------------------------------------------------------------- sample(): cached vs uncached


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("prompt_len", [3, CHUNK + 5], ids=["prompt<chunk", "prompt>chunk"])
def test_greedy_sample_with_cache_equals_uncached_across_the_window_slide(case, prompt_len):
    rack, prompt = tiny_rack(*case), random_ids(prompt_len, seed=prompt_len)
    new_tokens = MAX_SEQ_LEN + 8 - prompt_len  # the last 8 steps condition on a sliding window
    cached = sample(rack, prompt, new_tokens, MAX_SEQ_LEN, temperature=0.0)
    uncached = sample(rack, prompt, new_tokens, MAX_SEQ_LEN, temperature=0.0, use_cache=False)
    assert cached.shape == (1, MAX_SEQ_LEN + 8)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("case", CASES, ids=IDS)
@torch.no_grad()
def test_cached_next_token_logits_equal_a_full_forward_at_every_step(case):
    """Feeds the same growing sequence to both: prompt > chunk, then past max_seq_len (slide)."""
    rack, ids = tiny_rack(*case), random_ids(MAX_SEQ_LEN + 6, seed=7)
    cached, uncached = CachedLogits(rack, MAX_SEQ_LEN), UncachedLogits(rack, MAX_SEQ_LEN)
    for length in range(CHUNK + 3, ids.shape[1] + 1):
        torch.testing.assert_close(cached(ids[:, :length]), uncached(ids[:, :length]), atol=ATOL, rtol=0,
                                   msg=f"sequence length {length}")
    assert cached.prefills == 1 + 6  # one prompt prefill, then one per slid window


def test_sampling_with_temperature_and_top_k_draws_the_same_tokens_with_and_without_cache():
    rack, prompt = tiny_rack("gqa"), random_ids(5)
    draw = dict(temperature=1.0, top_k=10)
    cached = sample(rack, prompt, 20, MAX_SEQ_LEN, generator=torch.Generator().manual_seed(3), **draw)
    uncached = sample(rack, prompt, 20, MAX_SEQ_LEN, generator=torch.Generator().manual_seed(3), use_cache=False,
                      **draw)
    assert torch.equal(cached, uncached)


# ----------------------------------------------------------------------------- the work the cache saves


def positions_run(rack, prompt: torch.Tensor, new_tokens: int, use_cache: bool) -> int:
    """Token positions the rack embeds while sampling: the work done, independent of timing."""
    seen = []
    hook = rack.embedding.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[1]))
    try:
        sample(rack, prompt, new_tokens, MAX_SEQ_LEN, temperature=0.0, use_cache=use_cache)
    finally:
        hook.remove()
    return sum(seen)


@pytest.mark.parametrize("attention_type", ["gqa", "kernel"])
def test_cache_runs_each_new_token_once_until_the_window_slides(attention_type):
    rack = tiny_rack(attention_type)
    # 5 prompt tokens + 19 new: the prompt once, then one position per step (the last token is never run)
    assert positions_run(rack, random_ids(5), 20, use_cache=True) == 5 + 19
    assert positions_run(rack, random_ids(5), 20, use_cache=False) == sum(range(5, 25))
    # 30 + 6 new with max_seq_len 32: prefill 30, two single steps, then the window slides 3 times
    assert positions_run(rack, random_ids(30), 6, use_cache=True) == 30 + 1 + 1 + 3 * MAX_SEQ_LEN
