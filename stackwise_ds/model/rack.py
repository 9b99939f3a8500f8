"""The Rack: token embedding -> Stacks of Blocks -> final RMSNorm -> LM head.

Parameter names are stable and independent of any pipeline split:
``embedding.weight``, ``stacks.{i}.blocks.{j}.attn.q_proj.weight``, ``norm.weight``,
``lm_head.weight`` (the same tensor as ``embedding.weight`` when tied).

Initialisation is seeded per module from (seed, position), not by construction
order, so a pipeline stage that builds only its own blocks gets bit-identical
weights to the full rack built in one process.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import nn

from ..config import ModelConfig
from .block import Block, RMSNorm
from .stack import Stack


@contextlib.contextmanager
def seeded(seed: int):
    """Run a block of code under its own CPU RNG seed, restoring the caller's RNG afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def every_module(name: str) -> bool:
    return True


def on_device_unless(materialize: bool):
    """Build real tensors, or, when ``materialize`` is false, shape-only ones on the meta device.

    A pipeline stage materializes only the modules it holds: the rest of the Rack costs
    no memory and no init time, yet every name and shape stays where it is."""
    return contextlib.nullcontext() if materialize else torch.device("meta")


def module_seed(seed: int, *position: int) -> int:
    """A distinct, layout-independent seed for the module at ``position`` (e.g. (stack, block))."""
    value = seed * 1_000_003
    for index in position:
        value = value * 1_009 + index + 1
    return value % (2**63 - 1)


@dataclass
class DecodeCache:
    """What incremental decoding keeps between calls of ``Rack.decode``."""

    layers: list[dict] = field(default_factory=list)
    """One attention cache per block, in rack order (K/V, MLA latent, or kernel state; see attention.py)."""
    length: int = 0
    """Positions already decoded: the next call's tokens start at this position."""


class Rack(nn.Module):
    """The token embedding, ``stacks`` and the LM head; ``build_rack`` builds one from a ``ModelConfig``, stacks
    included. ``seed`` and ``materialize`` as there."""

    def __init__(self, stacks: Iterable[Stack], vocab_size: int, d_model: int, tie_embeddings: bool = True,
                 norm_eps: float = 1e-5, init_std: float = 0.02, seed: int = 0,
                 materialize: Callable[[str], bool] = every_module):
        super().__init__()
        if vocab_size <= 0 or d_model <= 0:
            raise ValueError(f"vocab_size ({vocab_size}) and d_model ({d_model}) must be positive")
        self.vocab_size, self.d_model, self.tie_embeddings = vocab_size, d_model, tie_embeddings
        with seeded(module_seed(seed, 10_000)), on_device_unless(materialize("embedding")):
            self.embedding = make_embedding(vocab_size, d_model, init_std)
        self.stacks = nn.ModuleList(stacks)
        with on_device_unless(materialize("norm")):
            self.norm = RMSNorm(d_model, norm_eps)
        with seeded(module_seed(seed, 10_001)), on_device_unless(materialize("lm_head")):
            self.lm_head = make_lm_head(self.embedding if self.tie_embeddings else None, vocab_size, d_model,
                                        init_std)

    @property
    def blocks(self) -> list[Block]:
        return [block for stack in self.stacks for block in stack.blocks]

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # [B, T] int -> [B, T, V]
        x = self.embedding(input_ids)
        for stack in self.stacks:
            x = stack(x)
        return self.lm_head(self.norm(x))

    def new_cache(self) -> DecodeCache:
        """An empty cache for ``decode`` (one per sequence batch being generated)."""
        return DecodeCache([{} for _ in self.blocks])

    def decode(self, input_ids: torch.Tensor, cache: DecodeCache) -> torch.Tensor:  # [B, T] -> [B, T, V]
        """Inference forward of the next T tokens after the ``cache.length`` already decoded.

        Logits equal ``forward`` on the whole sequence so far, restricted to the new positions
        (causal racks only); the cache is updated in place. Prefill with the prompt, then feed one token
        at a time. Training never calls this: ``forward`` is the pipeline's path.
        """
        if len(cache.layers) != len(self.blocks):
            raise ValueError(f"the cache holds {len(cache.layers)} layers but this rack has {len(self.blocks)} "
                             "blocks: build it with this rack's new_cache()")
        x = self.embedding(input_ids)
        caches = iter(cache.layers)
        for stack in self.stacks:
            x = stack.decode(x, [next(caches) for _ in stack.blocks], cache.length)
        cache.length += input_ids.shape[1]
        return self.lm_head(self.norm(x))

    def get_parameter_count(self, trainable_only: bool = False) -> int:
        """Unique parameters (a tied embedding counts once)."""
        params = {id(p): p for p in self.parameters() if p.requires_grad or not trainable_only}
        return sum(p.numel() for p in params.values())


def make_embedding(vocab_size: int, d_model: int, init_std: float) -> nn.Embedding:
    embedding = nn.Embedding(vocab_size, d_model)
    nn.init.normal_(embedding.weight, mean=0.0, std=init_std)
    return embedding


def make_lm_head(tied_to: nn.Embedding | None, vocab_size: int, d_model: int, init_std: float) -> nn.Linear:
    head = nn.Linear(d_model, vocab_size, bias=False)
    if tied_to is not None:
        head.weight = tied_to.weight  # one Parameter: the head and the embedding are the same matrix
    else:
        nn.init.normal_(head.weight, mean=0.0, std=init_std)
    return head


def untie_lm_head(rack: Rack) -> None:
    """Give a tied rack's LM head its own Parameter, a copy of the embedding's current weight (a greedy run's
    phases after the first train the head alone and keep the embedding frozen)."""
    if rack.tie_embeddings:
        weight = rack.embedding.weight
        rack.lm_head.weight = nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad)
        rack.tie_embeddings = False


def block_name(stack_id: int, block_id: int) -> str:
    return f"stacks.{stack_id}.blocks.{block_id}"


def build_block(model: ModelConfig, stack_id: int, block_id: int, seed: int,
                materialize: Callable[[str], bool] = every_module) -> Block:
    """Block ``block_id`` of stack ``stack_id``, initialised from its own seed."""
    with seeded(module_seed(seed, stack_id, block_id)), on_device_unless(materialize(block_name(stack_id, block_id))):
        block = Block(model)
    if model.compile:
        block.compile()  # in place: the module, its parameter names and state_dict stay the same
    return block


def build_stack(model: ModelConfig, stack_id: int, seed: int,
                materialize: Callable[[str], bool] = every_module) -> Stack:
    blocks = [build_block(model, stack_id, j, seed, materialize) for j in range(model.architecture.blocks_per_stack)]
    return Stack(blocks, stack_id)


def build_rack(model: ModelConfig, seed: int = 0, materialize: Callable[[str], bool] = every_module) -> Rack:
    """The Rack of ``model``. ``materialize(name)`` says which modules ("embedding", "norm",
    "lm_head", "stacks.{i}.blocks.{j}") get real weights; the others are built on the meta
    device. Each real module is bit-identical to the same module of a fully materialized Rack."""
    model.validate()  # before the loop: a rack of no stacks would build no Block to validate it
    stacks = [build_stack(model, i, seed, materialize) for i in range(model.architecture.n_stacks)]
    return Rack(stacks, model.vocab_size, model.d_model, model.tie_embeddings, norm_eps=model.norm_eps,
                init_std=model.init_std, seed=seed, materialize=materialize)
