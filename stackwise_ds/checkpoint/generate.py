"""Sample text from a trained causal rack with the byte-level tokenizer."""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import StackWiseConfig
from ..data import ByteTokenizer
from ..model import Rack
from .consolidation import load_rack_with_config


class GenerationError(ValueError):
    """A rack that cannot generate text left to right; the message says why."""


def check_causal(config: StackWiseConfig) -> None:
    if config.model.attention_mode != "causal":
        raise GenerationError(
            f"this rack uses model.attention_mode '{config.model.attention_mode}' (a masked LM): every position "
            "sees the whole sequence, so it cannot generate left to right; sample from a causal_lm run")


@torch.no_grad()
def sample(rack: Rack, input_ids: torch.Tensor, max_new_tokens: int, max_seq_len: int, temperature: float = 1.0,
           top_k: int | None = None, generator: torch.Generator | None = None,
           stop_id: int | None = None) -> torch.Tensor:
    """Append up to ``max_new_tokens`` sampled ids to ``input_ids`` [1, T]; temperature 0 means greedy.

    There is no KV cache: each step re-runs the last ``max_seq_len`` tokens (fine for small racks).
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k <= 0:
        raise ValueError(f"top_k must be positive, got {top_k}")
    ids = input_ids
    for _ in range(max_new_tokens):
        logits = rack(ids[:, -max_seq_len:])[:, -1].float()  # [1, V]
        next_id = pick(logits, temperature, top_k, generator)
        ids = torch.cat([ids, next_id], dim=1)
        if stop_id is not None and int(next_id) == stop_id:
            break
    return ids


def pick(logits: torch.Tensor, temperature: float, top_k: int | None, generator) -> torch.Tensor:
    if temperature == 0:
        return logits.argmax(-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)


def generate_text(source: str | Path, prompt: str, max_new_tokens: int = 200, temperature: float = 0.8,
                  top_k: int | None = 50, seed: int = 0, tag: str | None = None) -> str:
    """Prompt + sampled continuation from a checkpoint or consolidated file (byte tokenizer)."""
    rack, config = load_rack_with_config(source, tag)
    check_causal(config)
    tokenizer = ByteTokenizer()
    if config.model.vocab_size < tokenizer.vocab_size:
        raise GenerationError(f"the rack's vocabulary ({config.model.vocab_size}) is smaller than the byte "
                              f"tokenizer's ({tokenizer.vocab_size}): it was not trained on byte tokens")
    ids = torch.tensor([tokenizer.encode(prompt) or [tokenizer.eos_id]], dtype=torch.long)
    generator = torch.Generator().manual_seed(seed)
    out = sample(rack, ids, max_new_tokens, config.model.max_seq_len, temperature, top_k, generator,
                 stop_id=tokenizer.eos_id)
    return prompt + tokenizer.decode(out[0, ids.shape[1]:].tolist())
