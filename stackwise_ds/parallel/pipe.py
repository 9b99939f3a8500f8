"""The one place a Rack becomes a ``deepspeed.pipe.PipelineModule`` (GPT-NeoX style thin adapters).

Pipeline layers, in order::

    0                 embedding            (TiedLayerSpec "embed" when tied)
    1 .. n_blocks     the Rack's Blocks, stack by stack
    n_blocks + 1      final RMSNorm
    n_blocks + 2      LM head              (the tied "embed" module's weight, or its own Linear)

Stage boundaries come from the phase's ``PhaseLayout`` (``stackwise_ds.placement``): stack
boundaries on the fixed layout, block boundaries on an elastic one; never DeepSpeed's
parameter-count guess. A layer the layout does not place (a dormant unit of an elastic phase) is
an identity function: it has no parameters, no memory and no file, yet every other layer keeps
its index, so parameter names and per-layer checkpoint files mean the same in every layout.
Between stages travels one tensor, the hidden state [B, T, D].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
from deepspeed.runtime.pipe.topology import PipeDataParallelTopology
from torch import nn

from ..console import deepspeed_prints
from ..enums import FrozenPrecision
from ..layout import TIED_KEY, LayerUnit, UnitKind, layer_units
from ..model import Block, Rack
from ..placement import PhaseLayout
from .precision import layer_precisions

PARTITION_PREFIX = "stacks:"


class EmbeddingPipe(nn.Module):
    """Token ids [B, T] -> hidden [B, T, D]; wraps the Rack's own embedding (same Parameter)."""

    def __init__(self, embedding: nn.Embedding):
        super().__init__()
        self.embedding = embedding

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embedding(input_ids)


def tied_head_forward(embed: EmbeddingPipe, hidden: torch.Tensor) -> torch.Tensor:
    """The LM head of a tied rack: hidden [B, T, D] @ embedding.T -> logits [B, T, V]."""
    return F.linear(hidden, embed.embedding.weight)


class HeadPipe(nn.Module):
    """Untied LM head: wraps the Rack's own Linear."""

    def __init__(self, lm_head: nn.Linear):
        super().__init__()
        self.lm_head = lm_head

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)


def unplaced_layer(hidden: torch.Tensor) -> torch.Tensor:
    """Stands for a layer the phase's layout does not place (dormant): identity, nothing built."""
    return hidden


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross entropy over positions whose label is not -100 (masked LM marks the rest so)."""
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=-100)


class RackPipelineModule(PipelineModule):
    """PipelineModule partitioned at explicit layer boundaries (``partition_method='stacks:0,5,9'``)."""

    def __init__(self, *args, units: list[LayerUnit], frozen_precision: dict[int, FrozenPrecision] | None = None,
                 **kwargs):
        self.units = units  # plain list and dict: safe to set before nn.Module.__init__
        self.frozen_precision = frozen_precision or {}  # pipeline layer -> its precision while frozen
        super().__init__(*args, **kwargs)

    def _partition_layers(self, method: str = "uniform") -> None:
        if not method.startswith(PARTITION_PREFIX):
            return super()._partition_layers(method)
        self.parts = [int(x) for x in method[len(PARTITION_PREFIX):].split(",")]
        if len(self.parts) != self.num_stages + 1:
            raise ValueError(f"{len(self.parts) - 1} stage boundaries given for {self.num_stages} stages")
        stage_id = self._topo.get_coord(self.global_rank).pipe
        self._set_bounds(start=self.parts[stage_id], stop=self.parts[stage_id + 1])

    def _synchronize_tied_weights(self) -> None:
        # DeepSpeed broadcasts the tied Parameter with autograd on: c10d::broadcast_ then sits in the
        # weight's history and torch warns in every backward ("may lead to silently incorrect
        # behavior"). A copy between ranks is not part of the model's function: no autograd.
        with torch.no_grad():
            super()._synchronize_tied_weights()


# DeepSpeed keeps these facts of a PipelineModule in private attributes (listed in compat.py);
# code outside stackwise_ds/parallel reads them through these functions only.

def data_parallel_rank(pipe: PipelineModule) -> int:
    """This rank's data-parallel replica index in ``pipe``'s grid."""
    return pipe._grid.get_data_parallel_id()


def stage_to_global(pipe: PipelineModule, stage: int) -> int:
    """The global rank running pipeline stage ``stage`` in this rank's data-parallel slice."""
    return pipe._grid.stage_to_global(stage_id=stage)


def local_start(pipe: PipelineModule) -> int:
    """Pipeline-layer index of the first layer this rank's stage holds."""
    return pipe._local_start


def check_materialized(rack: Rack, names: set[str], stage: int) -> None:
    """A stage cannot train modules that only exist as shapes (meta device): say so, not crash in .to()."""
    for name in sorted(names):
        if any(p.is_meta for p in rack.get_submodule(name).parameters()):
            raise ValueError(f"the Rack's '{name}' was built on the meta device but pipeline stage {stage} "
                             "holds it: build the Rack with every module of this stage materialized "
                             "(build_rack(config.model, seed) builds them all)")


def pipeline_topology(stages: int, world_size: int) -> PipeDataParallelTopology:
    if world_size % stages:
        raise ValueError(f"world size {world_size} is not a multiple of {stages} pipeline stages")
    return PipeDataParallelTopology(num_pp=stages, num_dp=world_size // stages)


def stage_of_rank(rank: int, stages: int, world_size: int) -> int:
    """The pipeline stage ``rank`` runs, in DeepSpeed's (pipe, data) rank order."""
    return pipeline_topology(stages, world_size).get_coord(rank).pipe


def rack_to_pipeline(rack: Rack, layout: PhaseLayout, world_size: int, activation_checkpoint_interval: int = 0,
                     stack_precision: list[FrozenPrecision] | None = None) -> RackPipelineModule:
    """Wrap ``rack``'s own modules (same Parameters) into the pipeline ``layout`` describes.

    Only the modules of this rank's stage need real weights: the rest may stay on the meta
    device (see ``PhaseLayout.rack_modules``), DeepSpeed never touches them. ``stack_precision``
    (one per stack, ``StackWiseConfig.stack_frozen_precisions``) is the precision each stack's
    blocks run in whenever a phase freezes them (``precision.py``; applied by ``build_engine``)."""
    import deepspeed.comm as dist

    units = layer_units(len(rack.stacks), len(rack.stacks[0].blocks))
    stages = layout.pipeline_stages
    stage = stage_of_rank(dist.get_rank(), stages, world_size)
    check_materialized(rack, layout.rack_modules(stage, units, rack.tie_embeddings), stage)
    layers = [_layer_spec(rack, unit) if index in layout.live else unplaced_layer
              for index, unit in enumerate(units)]
    with deepspeed_prints():  # DeepSpeed prints its seed settings and topology on rank 0
        pipe = RackPipelineModule(
            layers=layers, topology=pipeline_topology(stages, world_size), loss_fn=lm_loss,
            partition_method=PARTITION_PREFIX + ",".join(map(str, layout.parts)),
            activation_checkpoint_interval=activation_checkpoint_interval, units=units,
            frozen_precision=layer_precisions(units, stack_precision),
            # Only blocks: DeepSpeed's reentrant checkpoint of the embedding (token ids in, nothing
            # requiring grad) would return an output without grad_fn and cut the first stage's backward.
            checkpointable_layers=[Block.__name__],
        )
    return pipe


def _layer_spec(rack: Rack, unit: LayerUnit):
    """The pipeline entry of one Rack unit (GPT-NeoX style: the Rack's own modules, thin wrappers)."""
    if unit.kind == UnitKind.BLOCK:
        return rack.stacks[unit.stack_id].blocks[unit.block_id]
    if unit.kind == UnitKind.NORM:
        return rack.norm
    if rack.tie_embeddings:
        forward = {"forward_fn": tied_head_forward} if unit.kind == UnitKind.HEAD else {}
        return TiedLayerSpec(TIED_KEY, EmbeddingPipe, rack.embedding, tied_weight_attr="embedding.weight", **forward)
    if unit.kind == UnitKind.EMBEDDING:
        return LayerSpec(EmbeddingPipe, rack.embedding)
    return LayerSpec(HeadPipe, rack.lm_head)
