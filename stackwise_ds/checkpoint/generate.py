"""Sample text from a trained causal rack with the tokenizer it was trained with."""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import ModelConfig
from ..enums import AttentionMode
from ..model import Rack
from ..model.rack import DecodeCache
from .consolidation import load_rack_with_config


class GenerationError(ValueError):
    """A rack that cannot generate text left to right; the message says why."""


def check_causal(model: ModelConfig) -> None:
    if model.attention_mode != AttentionMode.CAUSAL:
        raise GenerationError(
            f"this rack uses model.attention_mode '{model.attention_mode}' (a masked LM): every position "
            "sees the whole sequence, so it cannot generate left to right; sample from a causal_lm run")


@torch.no_grad()
def sample(rack: Rack, input_ids: torch.Tensor, max_new_tokens: int, max_seq_len: int, temperature: float = 1.0,
           top_k: int | None = None, generator: torch.Generator | None = None,
           stop_id: int | None = None, use_cache: bool = True) -> torch.Tensor:
    """Append up to ``max_new_tokens`` sampled ids to ``input_ids`` [1, T]; temperature 0 means greedy.

    Each step conditions on the last ``max_seq_len`` tokens. With ``use_cache`` the prompt is run once
    and each new token costs one position (``CachedLogits``); without, every step re-runs the window.
    Both give the same logits up to float rounding.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k <= 0:
        raise ValueError(f"top_k must be positive, got {top_k}")
    next_logits = CachedLogits(rack, max_seq_len) if use_cache else UncachedLogits(rack, max_seq_len)
    ids = input_ids
    for _ in range(max_new_tokens):
        logits = next_logits(ids)  # [1, V]
        next_id = pick(logits, temperature, top_k, generator)
        ids = torch.cat([ids, next_id], dim=1)
        if stop_id is not None and int(next_id) == stop_id:
            break
    return ids


class UncachedLogits:
    """Next-token logits [B, V] of ``ids`` [B, T]: a full forward of the last ``max_seq_len`` tokens each call."""

    def __init__(self, rack: Rack, max_seq_len: int):
        self.rack, self.max_seq_len = rack, max_seq_len

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        return self.rack(ids[:, -self.max_seq_len:])[:, -1].float()


class CachedLogits(UncachedLogits):
    """The same logits from a decode cache: ``ids`` must extend the previous call's ids.

    The first call prefills the window; later calls run only the tokens added since. Once ``ids``
    is longer than ``max_seq_len`` the window slides: every cached state has seen the token that just
    left it, so the window is prefilled afresh at each such step (as costly as the uncached path,
    but exactly its semantics: the model conditions on the last ``max_seq_len`` tokens only).
    """

    def __init__(self, rack: Rack, max_seq_len: int):
        super().__init__(rack, max_seq_len)
        self.cache: DecodeCache | None = None
        self.prefills = 0  # windows run from an empty cache (1 until the window slides)

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        if self.cache is None or ids.shape[1] > self.max_seq_len:
            self.cache, self.prefills = self.rack.new_cache(), self.prefills + 1
            return self.rack.decode(ids[:, -self.max_seq_len:], self.cache)[:, -1].float()
        if ids.shape[1] <= self.cache.length:
            raise ValueError(f"ids ({ids.shape[1]} tokens) must extend the {self.cache.length} already decoded: "
                             "use a new CachedLogits for a new sequence")
        return self.rack.decode(ids[:, self.cache.length:], self.cache)[:, -1].float()


def pick(logits: torch.Tensor, temperature: float, top_k: int | None, generator) -> torch.Tensor:
    if temperature == 0:
        return logits.argmax(-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)


def generate_text(source: str | Path, prompt: str, max_new_tokens: int = 200, temperature: float = 0.8,
                  top_k: int | None = 50, seed: int = 0, tag: str | None = None,
                  tokenizer_path: str | Path | None = None) -> str:
    """Prompt + sampled continuation from a checkpoint or consolidated file, in the run's tokenizer
    (the checkpoint tag's tokenizer.json, or the consolidated file's metadata), or in the tokenizer.json
    (or folder holding one) at ``tokenizer_path`` for a model that carries none."""
    from ..data.tokenizer import load_tokenizer_file
    from .consolidation import load_run_tokenizer

    rack, config = load_rack_with_config(source, tag)
    check_causal(config.model)
    if tokenizer_path is None:
        tokenizer = load_run_tokenizer(source, tag, config)
    else:
        tokenizer = load_tokenizer_file(tokenizer_path)
    if config.model.vocab_size < tokenizer.vocab_size:
        raise GenerationError(f"the rack's vocabulary ({config.model.vocab_size}) is smaller than its "
                              f"tokenizer's ({tokenizer.vocab_size}): it was not trained with this tokenizer")
    ids = torch.tensor([tokenizer.encode(prompt) or [tokenizer.eos_id]], dtype=torch.long)
    generator = torch.Generator().manual_seed(seed)
    out = sample(rack, ids, max_new_tokens, config.model.max_seq_len, temperature, top_k, generator,
                 stop_id=tokenizer.eos_id)
    return prompt + tokenizer.decode(out[0, ids.shape[1]:].tolist())
