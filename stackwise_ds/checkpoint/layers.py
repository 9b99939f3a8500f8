"""Names of the same weights in three places: pipeline layer files, the PipelineModule, the Rack.

* layer file ``layer_XX-model_states.pt``: the layer module's own state dict (``attn.q_proj.weight``
  for a Block, ``weight`` for the final norm, ``embedding.weight`` / ``lm_head.weight`` for the
  EmbeddingPipe / HeadPipe wrappers). A tied LM head has no file: it is layer 0's module.
* PipelineModule parameter names (optimizer shards, ``param_shapes``): ``{layer}.{key}``, and
  ``tied_modules.embed.{key}`` for the tied embedding, whichever stage holds it.
* Rack names: ``LayerUnit.rack_prefix`` + the key relative to the Rack module.

Layer indices and names do not depend on the number of stages, which is what makes layer
files copyable between layouts.
"""

from __future__ import annotations

import json
from collections import OrderedDict

import torch

from ..config import ModelConfig, section_dict
from ..layout import TIED_KEY, LayerUnit, UnitKind, layer_units, stage_boundaries
from .files import CheckpointError, unreadable_files
from .locate import CheckpointRef

TIED_PREFIX = f"tied_modules.{TIED_KEY}."
WRAPPED = (UnitKind.EMBEDDING, UnitKind.HEAD)  # units stored through a wrapper whose attribute is the Rack name


def units_of(model: ModelConfig) -> list[LayerUnit]:
    arch = model.architecture
    return layer_units(arch.n_stacks, arch.blocks_per_stack)


def rack_name(unit: LayerUnit, key: str) -> str:
    """Rack name of ``key`` from the layer file of ``unit``."""
    return key if unit.kind in WRAPPED else unit.rack_prefix + key


def layer_key(unit: LayerUnit, name: str) -> str:
    """Inverse of :func:`rack_name`: the key inside the layer file."""
    return name if unit.kind in WRAPPED else name[len(unit.rack_prefix):]


def file_layers(model: ModelConfig) -> list[int]:
    """Layer indices that have a layer file: all but a tied LM head."""
    units = units_of(model)
    tied = model.tie_embeddings
    return [i for i, unit in enumerate(units) if not (tied and unit.kind == UnitKind.HEAD)]


def pipe_name(model: ModelConfig, layer: int, key: str) -> str:
    """PipelineModule parameter name of ``key`` of layer ``layer``."""
    if model.tie_embeddings and layer == 0:
        return TIED_PREFIX + key
    return f"{layer}.{key}"


def pipe_to_rack_names(model: ModelConfig) -> dict[str, str]:
    """Every PipelineModule parameter name (all stages) -> its Rack name."""
    units = units_of(model)
    mapping = {}
    for layer, unit in enumerate(units):
        for key in unit_keys(model, unit):
            mapping[pipe_name(model, layer, key)] = rack_name(unit, key)
    return mapping


def unit_keys(model: ModelConfig, unit: LayerUnit) -> list[str]:
    """Layer-file keys of ``unit`` for this architecture, in the layer module's parameter order."""
    return [layer_key(unit, n) for n in rack_shapes(model) if n.startswith(unit.rack_prefix)]


_SHAPES_CACHE: dict[str, "OrderedDict[str, torch.Size]"] = {}


def rack_shapes(model: ModelConfig) -> "OrderedDict[str, torch.Size]":
    """Rack parameter name -> shape, in Rack order (a tied head appears once, as ``embedding.weight``).

    Built on the meta device: no memory, no init cost; cached per model config.
    """
    from ..model import build_rack

    key = json.dumps(section_dict(model), sort_keys=True)
    if key not in _SHAPES_CACHE:
        with torch.device("meta"):
            rack = build_rack(model)
        _SHAPES_CACHE[key] = OrderedDict((n, p.shape) for n, p in rack.named_parameters())
    return _SHAPES_CACHE[key]


def stage_layers(model: ModelConfig, stages: int) -> list[range]:
    arch = model.architecture
    bounds = stage_boundaries(arch.n_stacks, arch.blocks_per_stack, stages)
    return [range(bounds[s], bounds[s + 1]) for s in range(stages)]


def read_layer_file(ref: CheckpointRef, layer: int) -> dict[str, torch.Tensor]:
    path = ref.layer_file(layer)
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint {ref.path} is partial: {path.name} (pipeline layer {layer}) is missing although "
            f"{ref.path.name} is marked complete; the files were moved or deleted: use another tag")
    problems = unreadable_files([path])  # a truncated or bit-flipped file: say so, not a zip traceback
    if problems:
        raise CheckpointError(f"checkpoint {ref.path} is corrupt: {problems[0]} (pipeline layer {layer}); "
                              "use another tag (stackwise-inspect lists them)")
    return torch.load(path, map_location="cpu", weights_only=True)


def read_rack_state(ref: CheckpointRef, model: ModelConfig | None = None) -> "OrderedDict[str, torch.Tensor]":
    """Every weight of the checkpoint under its Rack name (a tied head only as ``embedding.weight``).

    ``model`` (default: the checkpoint's own) is the architecture the caller expects; a checkpoint
    of another architecture is refused with the differing keys named.
    """
    saved = ref.config.model
    if model is not None:
        check_architecture(saved, model, ref.path)
    units = units_of(saved)
    state: OrderedDict[str, torch.Tensor] = OrderedDict()
    for layer in file_layers(saved):
        unit = units[layer]
        for key, tensor in read_layer_file(ref, layer).items():
            state[rack_name(unit, key)] = tensor
    check_shapes(state, saved, str(ref.path))
    return state


def check_architecture(saved: ModelConfig, wanted: ModelConfig, where) -> None:
    from .files import check_same_architecture

    check_same_architecture(section_dict(saved), section_dict(wanted), where)


def check_shapes(state: dict[str, torch.Tensor], model: ModelConfig, where: str) -> None:
    """Refuse weights that do not fit the Rack of ``model``, naming the first mismatches."""
    expected = rack_shapes(model)
    missing = [n for n in expected if n not in state]
    unexpected = [n for n in state if n not in expected]
    wrong = [f"{n}: {tuple(state[n].shape)} vs {tuple(s)}" for n, s in expected.items()
             if n in state and tuple(state[n].shape) != tuple(s)]
    if missing or unexpected or wrong:
        details = "; ".join(filter(None, [
            f"missing {missing[:3]}" if missing else "", f"unexpected {unexpected[:3]}" if unexpected else "",
            f"wrong shapes {wrong[:3]}" if wrong else ""]))
        raise CheckpointError(f"weights in {where} do not fit the rack of its config ({details}): the files come "
                              "from another architecture or were edited; use the config they were trained with")
