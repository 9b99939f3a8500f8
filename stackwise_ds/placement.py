"""Where every layer of a phase runs: the fixed layout and the elastic phase layout. No DeepSpeed import.

A **fixed** layout is one pipeline for the whole run: ``parallel.pipeline_stages`` stages cut at
stack boundaries, every layer placed, dormant units kept as identity relays. Rackwise runs and
the closing joint phase always use it, and stage-wise phases do with ``phase_layout: fixed``.

An **elastic** layout is chosen per stackwise/blockwise phase. Only the *live* layers are
placed -- embedding, the frozen units before the active one, the active unit, final norm, LM head;
dormant units are not built at all -- and they are re-partitioned over every rank: pipeline depth
``p`` (a divisor of the world size, so DeepSpeed's grid covers every rank), data-parallel degree
``world / p``, stage boundaries at block granularity. The global batch stays the run's
(``micro_batch_size x gradient_accumulation_steps x world / pipeline_stages``); each replica runs
``global / (micro x dp)`` micro-batches.

Cost model (per micro-batch, FLOPs; the same convention as ``benchmarks/flops.py``): a layer's
forward is 2 FLOPs per weight-matrix multiply-accumulate plus 4·T·d per token of attention
(4·d·d_head for kernel attention); a training layer costs forward + backward = 3x its forward, a
frozen one after a trained layer 2x (forward + its input's gradient, no weight gradient), a frozen one
before every trained layer 1x (no_grad), a dormant one nothing. A stage's cost is the sum of its layers'; a
step of ``m`` micro-batches over stage costs ``c_s`` takes about ``sum(c_s) + (m - 1) * max(c_s)``
(fill and drain, then the slowest stage sets the pace). Among the layouts that fit the memory
bound, the plan with the lowest predicted step time wins (ties: the shallower pipeline). With
``training.stack_cache: disk`` a phase's frozen prefix stays on the first stage, where the cache reads it
instead of running it, and costs nothing, unless no such placement fits (``cached_prefix_seconds`` predicts
whether reading it is cheaper than running it at all; the cache warns when it is not).
Communication is not modelled: on GPUs inside a node it is small next to compute for these
activation sizes; ``benchmarks/`` reports predicted against measured step times.

Memory model (bytes on one rank, an estimate for the bound ``parallel.max_rank_memory_mb``):
every placed layer holds its weights; a training layer also holds its gradients, its share of
the optimizer state (AdamW moments, plus fp32 master weights under bf16) divided by the
data-parallel degree under ZeRO-1, and the activations of the micro-batches in flight
(``min(m, p - s)`` on stage ``s`` under 1F1B). Frozen layers hold weights only: no gradient,
no optimizer state, and no stashed activations unless the gradient passes through them (after a
trained layer); a frozen block's weights count in its stack's frozen precision
(``training.frozen_precision`` / ``stack_precision``): 2 bytes a parameter in bf16, 1 + 4/d_model
in int8 (the int8 weight and one fp32 scale per output channel).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from functools import lru_cache

from .config import ModelConfig, StackWiseConfig
from .enums import AttentionType, FrozenPrecision, LayoutKind, StackCache
from .layout import DORMANT, FROZEN, FROZEN_BACKPROP, NOT_TRAINED, TRAIN, LayerUnit, cached_boundary, stage_boundaries

ELASTIC, FIXED = LayoutKind.ELASTIC, LayoutKind.FIXED
# The FLOP convention shared with benchmarks/flops.py: forward + backward = 3 forwards,
# forward + the input's gradient only (a frozen layer the gradient passes through) = 2, forward only under no_grad = 1,
# skipped = 0; attention QK^T (2·T·d) + AV (2·T·d) per token
# per block, the whole T x T counted even when causal.
ROLE_FACTOR = {TRAIN: 3.0, FROZEN_BACKPROP: 2.0, FROZEN: 1.0, DORMANT: 0.0}
ATTN_FLOPS_PER_TD = 4
MB = 2**20
# The stack cache's break-even, per rank: the rate a frozen forward runs at, and the rate windows come from the cache
# (its file, mostly from the page cache, then to the device). Orders of magnitude, not measurements: reading pays
# for a deep prefix on a slow device (a CPU) and rarely on a GPU, whose forward outruns any read.
FROZEN_FORWARD_FLOPS_PER_S = {"cuda": 2e14, "cpu": 5e10}
CACHE_READ_BYTES_PER_S = {"cuda": 5e9, "cpu": 5e9}


@dataclass(frozen=True)
class LayerCost:
    """One pipeline layer's forward FLOPs per micro-batch, parameters and stashed activation bytes."""

    forward_flops: float
    params: int
    activation_bytes: float  # kept per in-flight micro-batch when the layer trains


@dataclass(frozen=True)
class Resources:
    """What a layout is planned for: ranks, batch geometry, precision, ZeRO, the memory bound."""

    world_size: int
    n_stacks: int
    blocks_per_stack: int
    pipeline_stages: int  # the run's fixed depth: sets the global batch and the fixed layout
    micro_batch_size: int
    gradient_accumulation_steps: int  # at the fixed layout
    bf16: bool = False
    zero_stage: int = 1
    max_rank_memory_mb: float | None = None
    frozen_bytes_per_param: tuple[float, ...] = ()  # per pipeline layer while frozen; () or 0: the weights' own
    cache_frozen_prefix: bool = False  # training.stack_cache 'disk': a frozen prefix on stage 0 is read, not run

    @property
    def global_batch(self) -> int:
        return self.micro_batch_size * self.gradient_accumulation_steps * (self.world_size // self.pipeline_stages)


@dataclass(frozen=True)
class PhaseLayout:
    """How one phase is placed; identical on every rank, recorded in checkpoints and logs."""

    kind: LayoutKind
    pipeline_stages: int
    data_parallel: int
    gradient_accumulation_steps: int  # micro-batches per replica per step
    parts: tuple[int, ...]  # pipeline-layer index where each stage starts, then the layer count
    live: tuple[int, ...]  # pipeline layers that are built (the others are identity placeholders)
    stage_flops: tuple[float, ...]  # per micro-batch
    stage_memory_mb: tuple[float, ...]
    predicted_step_flops: float
    predicted_vs_rackwise: float  # predicted step time over a rackwise step on the fixed layout

    def stage_of(self, layer: int) -> int:
        return next(s for s in range(self.pipeline_stages) if self.parts[s] <= layer < self.parts[s + 1])

    def stage_layers(self, stage: int) -> list[int]:
        """The live layers stage ``stage`` holds."""
        return [i for i in self.live if self.parts[stage] <= i < self.parts[stage + 1]]

    def rack_modules(self, stage: int, units: list[LayerUnit], tie_embeddings: bool) -> set[str]:
        """Rack module names ("embedding", "stacks.0.blocks.1", ...) stage ``stage`` holds."""
        names = {units[i].rack_prefix.rstrip(".") for i in self.stage_layers(stage)}
        if tie_embeddings and "lm_head" in names:
            names.add("embedding")  # a tied LM head is the embedding module itself
        return names

    def describe(self) -> str:
        """One line for logs, e.g. 'elastic: 2 stages x 2 data-parallel, 4 micro-batches, stages [0-3 | 4-9]'."""
        stages = " | ".join(_span(self.stage_layers(s)) for s in range(self.pipeline_stages))
        return (f"{self.kind}: {self.pipeline_stages} stage(s) x {self.data_parallel} data-parallel, "
                f"{self.gradient_accumulation_steps} micro-batches/step, layers [{stages}], "
                f"predicted step {self.predicted_vs_rackwise:.2f}x rackwise")

    def to_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_dict(cls, raw: dict) -> "PhaseLayout":
        tuples = {k: tuple(v) for k, v in raw.items() if isinstance(v, list)}
        return cls(**{**raw, **tuples})

    def same_placement(self, other: "PhaseLayout | None") -> bool:
        """Whether ``other`` places the same layers on the same ranks (costs may differ)."""
        def key(lay: PhaseLayout):
            return lay.kind, lay.pipeline_stages, lay.data_parallel, lay.parts, lay.live
        return other is not None and key(self) == key(other)


def _span(layers: list[int]) -> str:
    """Layer indices as ranges: [0, 1, 2, 7, 8] -> '0-2,7-8'."""
    runs: list[list[int]] = []
    for layer in layers:
        if runs and layer == runs[-1][-1] + 1:
            runs[-1].append(layer)
        else:
            runs.append([layer])
    return ",".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs)


# ----------------------------------------------------------------------------- costs

def layer_costs(model: ModelConfig, seq_len: int, micro_batch: int, bf16: bool = False) -> list[LayerCost]:
    """Cost of every pipeline layer (embedding, blocks, norm, head) for one micro-batch."""
    tokens = micro_batch * seq_len
    d, vocab = model.d_model, model.vocab_size
    act_bytes = 2 if bf16 else 4
    block_params, block_matrix = _block_params(model)
    d_head = d // model.n_heads
    attn = ATTN_FLOPS_PER_TD * (d_head if model.attention_type == AttentionType.KERNEL else seq_len) * d
    block = LayerCost(tokens * (2 * block_matrix + attn), block_params,
                      tokens * (6 * d + 3 * model.resolved_d_ff) * act_bytes
                      + (0 if model.attention_type == AttentionType.KERNEL
                         else micro_batch * model.n_heads * seq_len**2 * act_bytes))
    embedding = LayerCost(tokens * d, vocab * d, 0.0)
    norm = LayerCost(5 * tokens * d, d, tokens * d * act_bytes)
    head = LayerCost(2 * tokens * d * vocab + 5 * tokens * vocab, 0 if model.tie_embeddings else vocab * d,
                     2 * tokens * vocab * 4)  # fp32 logits and their gradient
    return [embedding, *[block] * model.n_blocks, norm, head]


def cached_prefix_seconds(model: ModelConfig, seq_len: int, boundary: int, bytes_per_value: int,
                          device_type: str) -> tuple[float, float]:
    """Predicted (read, recompute) seconds per window for the frozen prefix of pipeline layers 0..``boundary``:
    reading its output [seq_len, d_model] from the stack cache against running its forward on ``device_type``."""
    flops = sum(cost.forward_flops for cost in layer_costs(model, seq_len, micro_batch=1)[:boundary + 1])
    read_s = seq_len * model.d_model * bytes_per_value / CACHE_READ_BYTES_PER_S[device_type]
    return read_s, flops / FROZEN_FORWARD_FLOPS_PER_S[device_type]


_BLOCK_PARAMS: dict[str, tuple[int, int]] = {}


def _block_params(model: ModelConfig) -> tuple[int, int]:
    """(all, matrix) parameters of one Block, counted on a meta-device build (no memory); cached."""
    import torch

    from .model import build_block

    key = json.dumps(asdict(model), sort_keys=True)
    if key not in _BLOCK_PARAMS:
        with torch.device("meta"):
            params = list(build_block(model, 0, 0, seed=0).parameters())
        _BLOCK_PARAMS[key] = (sum(p.numel() for p in params), sum(p.numel() for p in params if p.dim() >= 2))
    return _BLOCK_PARAMS[key]


# ----------------------------------------------------------------------------- layouts

def fixed_layout(roles: list[str], costs: list[LayerCost], res: Resources) -> PhaseLayout:
    """The run's one pipeline: ``pipeline_stages`` stages at stack boundaries, every layer placed."""
    parts = tuple(stage_boundaries(res.n_stacks, res.blocks_per_stack, res.pipeline_stages))
    live = tuple(range(len(roles)))
    return _evaluate(FIXED, parts, live, roles, costs, res, res.world_size // res.pipeline_stages)


def elastic_layout(roles: list[str], costs: list[LayerCost], res: Resources) -> PhaseLayout:
    """The fastest predicted placement of the live (non-dormant) layers that fits the memory bound.

    Under ``res.cache_frozen_prefix`` a phase's frozen prefix (``layout.cached_boundary``) is kept on the first
    stage, where the stack cache serves it, and counts no compute; only when no such placement fits does the
    prefix spread (that phase then runs it)."""
    live = tuple(i for i, role in enumerate(roles) if role != DORMANT)
    boundary = cached_boundary(roles) if res.cache_frozen_prefix else None
    candidates, smallest = _elastic_candidates(live, roles, costs, res, boundary)
    if not candidates and boundary is not None:
        candidates, smallest = _elastic_candidates(live, roles, costs, res, None)
    if not candidates and smallest is None:
        raise LayoutError(
            f"no pipeline depth can place this phase's {len(live)} live layers on {res.world_size} rank(s): a depth "
            f"must divide the world size, be at most the live layer count, and leave a data-parallel degree that "
            f"splits the global batch of {res.global_batch} sequences into whole micro-batches of "
            f"{res.micro_batch_size}; raise training.gradient_accumulation_steps, launch fewer ranks, "
            "or set parallel.phase_layout=fixed")
    if not candidates:
        raise LayoutError(
            f"no placement of this phase's {len(live)} live layers on {res.world_size} rank(s) fits "
            f"parallel.max_rank_memory_mb={res.max_rank_memory_mb}: an even split over {smallest.pipeline_stages} "
            f"stage(s) needs about {max(smallest.stage_memory_mb):.1f} MB on its fullest rank; raise the bound, "
            "launch more ranks, lower training.micro_batch_size, or set parallel.phase_layout=fixed")
    return min(candidates, key=lambda lay: (lay.predicted_step_flops, lay.pipeline_stages))


def _elastic_candidates(live, roles, costs, res: Resources, cached: int | None):
    """(the balanced placement of every usable depth that fits, the even split needing least memory of those that
    do not); ``cached``: layers 0..cached stay on stage 0 and cost nothing."""
    candidates, smallest = [], None
    for p in (p for p in range(1, res.world_size + 1) if res.world_size % p == 0 and p <= len(live)):
        dp = res.world_size // p
        if res.global_batch % (res.micro_batch_size * dp):
            continue  # this data-parallel degree cannot split the global batch into whole micro-batches
        starts = _balanced_starts(live, roles, costs, res, p, dp, cached)
        if starts is None:
            even = _parts(live, _even_starts(live, p), len(roles))
            fallback = _evaluate(ELASTIC, even, live, roles, costs, res, dp)
            smallest = min(smallest or fallback, fallback, key=lambda lay: max(lay.stage_memory_mb))
            continue
        candidates.append(_evaluate(ELASTIC, _parts(live, starts, len(roles)), live, roles, costs, res, dp, cached))
    return candidates, smallest


def _layer_flops(costs, roles, cached: int | None = None) -> list[float]:
    """Per micro-batch FLOPs of every pipeline layer in its role; a cached prefix (layers 0..cached) is read."""
    return [0.0 if cached is not None and i <= cached else c.forward_flops * ROLE_FACTOR[roles[i]]
            for i, c in enumerate(costs)]


class LayoutError(ValueError):
    """No layout satisfies the constraints; the message says which and what to change."""


def _parts(live: tuple[int, ...], starts: list[int], n_layers: int) -> tuple[int, ...]:
    """Stage start indices (into ``live``) -> pipeline-layer boundaries; stage 0 starts at layer 0."""
    return (0, *(live[j] for j in starts[1:]), n_layers)


def _even_starts(live: tuple[int, ...], p: int) -> list[int]:
    return [len(live) * s // p for s in range(p)]


def _balanced_starts(live, roles, costs, res: Resources, p: int, dp: int,
                     cached: int | None = None) -> list[int] | None:
    """Split ``live`` into ``p`` contiguous non-empty stages minimising the slowest stage's cost,
    each within the memory bound (``cached``: layers 0..cached on the first stage); returns the index (into
    ``live``) where each stage starts."""
    n = len(live)
    m = res.global_batch // (res.micro_batch_size * dp)
    flops = _layer_flops(costs, roles, cached)
    cost = [flops[i] for i in live]
    first_stop = 1 if cached is None else live.index(cached) + 1  # stage 0 ends no earlier

    @lru_cache(maxsize=None)
    def best(stage: int, first: int) -> tuple[float, tuple[int, ...]] | None:
        """(slowest stage cost, starts) for live[first:] on stages stage..p-1."""
        if stage == p - 1:
            return (sum(cost[first:]), (first,)) if _fits(live[first:], stage, roles, costs, res, p, dp, m) else None
        result = None
        for stop in range(max(first + 1, first_stop if stage == 0 else 0), n - (p - 1 - stage) + 1):
            if not _fits(live[first:stop], stage, roles, costs, res, p, dp, m):
                break  # a longer stage only needs more memory
            rest = best(stage + 1, stop)
            if rest is None:
                continue
            slowest = max(sum(cost[first:stop]), rest[0])
            if result is None or slowest < result[0]:
                result = (slowest, (first, *rest[1]))
        return result

    found = best(0, 0)
    return None if found is None else list(found[1])


def _fits(layers, stage, roles, costs, res: Resources, p, dp, m) -> bool:
    if res.max_rank_memory_mb is None:
        return True
    return _stage_memory_mb(layers, stage, roles, costs, res, p, dp, m) <= res.max_rank_memory_mb


def _stage_memory_mb(layers, stage, roles, costs, res: Resources, p, dp, m) -> float:
    weight_bytes = 2 if res.bf16 else 4
    optimizer_bytes = 8 + (4 if res.bf16 else 0)  # AdamW moments (+ fp32 master weights)
    shard = dp if res.zero_stage >= 1 else 1
    in_flight = min(m, p - stage)
    total = 0.0
    frozen_bytes = res.frozen_bytes_per_param
    for i in layers:
        c = costs[i]
        total += c.params * (frozen_bytes[i] if roles[i] in NOT_TRAINED and frozen_bytes and frozen_bytes[i]
                             else weight_bytes)
        if roles[i] == TRAIN:
            total += c.params * (4 + optimizer_bytes / shard)
        if roles[i] in (TRAIN, FROZEN_BACKPROP):  # both keep their inputs for the backward pass
            total += in_flight * c.activation_bytes
    return total / MB


def _evaluate(kind, parts, live, roles, costs, res: Resources, dp: int, cached: int | None = None) -> PhaseLayout:
    p = len(parts) - 1
    m = res.global_batch // (res.micro_batch_size * dp)
    stage_sets = [[i for i in live if parts[s] <= i < parts[s + 1]] for s in range(p)]
    layer_flops = _layer_flops(costs, roles, cached)
    flops = tuple(sum(layer_flops[i] for i in layers) for layers in stage_sets)
    memory = tuple(round(_stage_memory_mb(layers, s, roles, costs, res, p, dp, m), 3)
                   for s, layers in enumerate(stage_sets))
    step = pipeline_step_flops(flops, m)
    rack = rackwise_step_flops(costs, res)
    return PhaseLayout(kind, p, dp, m, tuple(parts), tuple(live), flops, memory, step, step / rack)


def pipeline_step_flops(stage_flops, micro_batches: int) -> float:
    """Predicted critical path of one step: fill and drain through every stage, then the slowest paces."""
    return sum(stage_flops) + (micro_batches - 1) * max(stage_flops)


def rackwise_step_flops(costs: list[LayerCost], res: Resources) -> float:
    """The reference: every layer training on the fixed layout (stack-aligned, ``pipeline_stages`` deep)."""
    bounds = stage_boundaries(res.n_stacks, res.blocks_per_stack, res.pipeline_stages)
    flops = [sum(ROLE_FACTOR[TRAIN] * costs[i].forward_flops for i in range(bounds[s], bounds[s + 1]))
             for s in range(res.pipeline_stages)]
    return pipeline_step_flops(flops, res.gradient_accumulation_steps)


# ----------------------------------------------------------------------------- from a run config

def run_resources(config: StackWiseConfig, world_size: int, bf16: bool) -> Resources:
    t, arch = config.training, config.model.architecture
    return Resources(world_size=world_size, n_stacks=arch.n_stacks, blocks_per_stack=arch.blocks_per_stack,
                     pipeline_stages=config.pipeline_stages, micro_batch_size=t.micro_batch_size,
                     gradient_accumulation_steps=t.gradient_accumulation_steps, bf16=bf16,
                     zero_stage=config.parallel.zero_stage, max_rank_memory_mb=config.parallel.max_rank_memory_mb,
                     frozen_bytes_per_param=frozen_bytes_per_param(config.model, config.stack_frozen_precisions()),
                     cache_frozen_prefix=t.stack_cache == StackCache.DISK)


def frozen_bytes_per_param(model: ModelConfig, precisions: list[FrozenPrecision]) -> tuple[float, ...]:
    """Bytes per parameter of each pipeline layer while frozen: its stack's frozen precision for blocks,
    0 (the weights' own bytes) for 'same' and for the embedding, norm and head."""
    bytes_of = {FrozenPrecision.SAME: 0.0, FrozenPrecision.BF16: 2.0,
                FrozenPrecision.INT8: 1.0 + 4.0 / model.d_model}
    per_stack = model.architecture.blocks_per_stack
    blocks = [bytes_of[precisions[b // per_stack]] for b in range(model.n_blocks)]
    return (0.0, *blocks, 0.0, 0.0)


def plan_phase_layouts(phases, units: list[LayerUnit], config: StackWiseConfig, world_size: int,
                       bf16: bool) -> list[PhaseLayout]:
    """The layout of each of ``phases`` (``phases.Phase``): elastic for stage-wise phases under
    ``phase_layout: elastic``, else the fixed pipeline. Deterministic, so the trainer plans every phase
    at start and a phase that cannot be placed stops the run before any training; the error names it."""
    layouts = []
    for phase in phases:
        elastic = phase.stage_wise and config.parallel.phase_layout == ELASTIC
        # an untied head holds its own weights, gradients and moments
        planned = replace(config, model=replace(config.model, tie_embeddings=False)) if phase.untied_head else config
        try:
            layouts.append(layout_for(phase.layer_roles(units), planned, world_size, bf16, elastic))
        except LayoutError as exc:
            raise LayoutError(f"phase {phase.index + 1} ({phase.name}) cannot be placed: {exc}") from exc
    return layouts


def layout_for(roles: list[str], config: StackWiseConfig, world_size: int, bf16: bool,
               elastic: bool) -> PhaseLayout:
    """The layout of a phase whose pipeline layers have ``roles``: elastic or the run's fixed pipeline."""
    res = run_resources(config, world_size, bf16)
    costs = layer_costs(config.model, config.data.seq_len, res.micro_batch_size, bf16)
    return elastic_layout(roles, costs, res) if elastic else fixed_layout(roles, costs, res)


# ----------------------------------------------------------------------------- estimates for stackwise-plan

def step_training_flops(roles: list[str], config: StackWiseConfig, world_size: int, bf16: bool) -> float:
    """Training FLOPs of one optimizer step of a phase whose pipeline layers have ``roles``, in the planner's model
    (``layer_costs``, each layer times its role's factor), over every micro-batch of the run's global batch. A
    prefix the stack cache serves still counts: these are the FLOPs of the training, not of its critical path."""
    res = run_resources(config, world_size, bf16)
    costs = layer_costs(config.model, config.data.seq_len, res.micro_batch_size, bf16)
    return sum(_layer_flops(costs, roles)) * res.global_batch / res.micro_batch_size
