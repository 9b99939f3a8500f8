"""Layer roles of one training phase, the stage roles they imply, and the layer gates that enforce them.

Layer roles (``stackwise_ds.layout.LayerRole``, the same as ``stackwise_ds.phases``):

* ``"train"``   -- normal forward with autograd; parameters go to this stage's optimizer.
* ``"frozen"``  -- before every train layer: forward under ``torch.no_grad()``; parameters never get a gradient.
* ``"frozen_backprop"`` -- after a train layer: forward with autograd, so the gradient of its input reaches the
  train layers before it, but its parameters do not require grad (no weight gradient, no optimizer state).
  ``make_plan`` turns a ``"frozen"`` layer that sits after a train layer into this role (``layout.resolve_frozen``).
* ``"dormant"`` -- identity: the layer's input is returned unchanged, nothing is computed.

The last stage computes the loss: it must train or backpropagate (hold a train or frozen_backprop layer).

Stage roles (``StageRole``, a type of its own), derived from the layer roles and the partition
(``PipelineModule.parts``):

* ``"forward_only"`` -- every stage before the first stage that holds a train layer: streams
  its micro-batches forward under no_grad, never receives or sends a gradient, no optimizer.
* ``"relay"``        -- an all-dormant stage after the first train stage: forwards activations
  and gradients unchanged, computes nothing, no optimizer.
* ``"backprop"``     -- a stage after the first train stage whose layers are frozen_backprop (and dormant):
  1F1B forward/backward like a train stage, but its backward computes only its input's gradient, which it
  sends on; no optimizer, no gradient buffers, no ZeRO partition.
* ``"train"``        -- a stage holding train layers: 1F1B forward/backward and an optimizer over
  its train parameters. It sends its input's gradient back only when an earlier stage trains.

Layers are gated by wrapping the entries of ``PipelineModule.forward_funcs`` (not the registered
submodules, so parameter names and per-layer checkpoint files are unchanged) in ``RoleGate``. A
``PipelineModule`` needs no cooperation from its layers: ``apply_layer_roles`` does it all.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from ..enums import Choice
from ..layout import DORMANT, FROZEN, FROZEN_BACKPROP, NOT_TRAINED, TRAIN, LayerRole, resolve_frozen
from .pipe import local_start
from .precision import FrozenCompute, converts

__all__ = ["DORMANT", "FROZEN", "FROZEN_BACKPROP", "TRAIN", "LayerRole",  # the layer roles, re-exported
           "StageRole", "FORWARD_ONLY", "RELAY", "BACKPROP", "TRAIN_STAGE", "RolePlan", "make_plan", "RoleGate",
           "unwrap", "layer_parameters", "apply_layer_roles", "apply_frozen_precision"]


class StageRole(Choice):
    """What a pipeline stage does in a phase (see the module docstring)."""

    FORWARD_ONLY = "forward_only"
    RELAY = "relay"
    BACKPROP = "backprop"
    TRAIN = "train"


FORWARD_ONLY, RELAY, TRAIN_STAGE = StageRole.FORWARD_ONLY, StageRole.RELAY, StageRole.TRAIN
BACKPROP = StageRole.BACKPROP

# Attribute remembering a parameter's own trainability (e.g. a fixed random projection) the
# first time roles are applied, so that phases only ever narrow it, never widen it.
_BASE_REQUIRES_GRAD = "_stagewise_base_requires_grad"


@dataclass(frozen=True)
class RolePlan:
    """The role of every pipeline layer and stage in one phase (identical on every rank)."""

    layer_roles: tuple[LayerRole, ...]
    parts: tuple[int, ...]  # stage s holds layers parts[s] .. parts[s+1]-1
    stage_roles: tuple[StageRole, ...]

    @property
    def num_stages(self) -> int:
        return len(self.stage_roles)

    @property
    def first_train_stage(self) -> int:
        return self.stage_roles.index(TRAIN_STAGE)

    @property
    def train_stages(self) -> list[int]:
        return [s for s, role in enumerate(self.stage_roles) if role == TRAIN_STAGE]

    @property
    def trains_everything(self) -> bool:
        return all(role == TRAIN for role in self.layer_roles)

    def stage_layers(self, stage: int) -> range:
        return range(self.parts[stage], self.parts[stage + 1])

    def stage_of(self, layer: int) -> int:
        return next(s for s in range(self.num_stages) if layer in self.stage_layers(s))

    def sends_grad(self, stage: int) -> bool:
        """Whether ``stage`` sends the gradient of its input to ``stage - 1``."""
        return self.stage_roles[stage] != FORWARD_ONLY and stage > self.first_train_stage


def make_plan(layer_roles: dict[int, str] | None, parts: list[int]) -> RolePlan:
    """Validate ``layer_roles`` (``None``: everything trains) and derive the stage roles."""
    num_layers = parts[-1]
    if layer_roles is None:
        roles = (TRAIN,) * num_layers
    else:
        missing = sorted(set(range(num_layers)) - set(layer_roles))
        extra = sorted(set(layer_roles) - set(range(num_layers)))
        if missing or extra:
            raise ValueError(f"layer_roles must name each of the {num_layers} pipeline layers exactly: "
                             f"missing {missing}, unknown {extra}")
        bad = {i: r for i, r in layer_roles.items() if r not in LayerRole.values()}
        if bad:
            raise ValueError(f"unknown layer roles {bad}: use one of {LayerRole.values()}")
        roles = tuple(resolve_frozen([layer_roles[i] for i in range(num_layers)]))
    trained = [i for i, r in enumerate(roles) if r == TRAIN]
    if not trained:
        raise ValueError("no pipeline layer has role 'train': nothing to optimize in this phase")
    stage_roles = tuple(_stage_role(roles[parts[s]:parts[s + 1]], parts[s] > min(trained))
                        for s in range(len(parts) - 1))
    if stage_roles[-1] not in (TRAIN_STAGE, BACKPROP):
        raise ValueError("the last pipeline stage computes the loss: it must hold a 'train' layer or a frozen one "
                         "after a train layer (the final norm and LM head are not dormant)")
    return RolePlan(roles, tuple(parts), stage_roles)


def _stage_role(roles: tuple[LayerRole, ...], after_first_train_layer: bool) -> StageRole:
    if TRAIN in roles:
        return TRAIN_STAGE
    if not after_first_train_layer:
        return FORWARD_ONLY
    return BACKPROP if FROZEN_BACKPROP in roles else RELAY


class RoleGate:
    """A ``forward_funcs`` entry running its layer as FROZEN (no_grad), FROZEN_BACKPROP (autograd, for the input's
    gradient only: the layer's parameters do not require grad) or DORMANT (identity).

    Attribute access falls through to the wrapped layer, so DeepSpeed's per-layer
    ``state_dict``/``load_state_dict`` checkpointing sees the layer itself. Train layers are
    never wrapped.
    """

    def __init__(self, layer, role: LayerRole):
        if role == TRAIN:
            raise ValueError("RoleGate wraps frozen or dormant layers, not 'train' ones")
        self.layer = layer
        self.role = role
        self.frozen_compute: FrozenCompute | None = None  # a frozen layer's converted forward, if any

    def __call__(self, inputs):
        if self.role == DORMANT:
            return inputs
        compute = self.frozen_compute or self.layer
        if self.role == FROZEN_BACKPROP:
            return compute(inputs)
        with torch.no_grad():
            return compute(inputs)

    def __getattr__(self, name):
        if name == "layer":  # not set yet (e.g. during unpickling): avoid infinite recursion
            raise AttributeError(name)
        return getattr(self.layer, name)

    def __repr__(self) -> str:
        return f"RoleGate({self.role}, {self.layer!r})"


def unwrap(entry):
    return entry.layer if isinstance(entry, RoleGate) else entry


def layer_parameters(entry) -> list[nn.Parameter]:
    """Parameters a ``forward_funcs`` entry uses: a module's own, or those of the modules bound
    into a ``partial`` (how ``TiedLayerSpec(forward_fn=...)`` layers are stored)."""
    entry = unwrap(entry)
    if isinstance(entry, nn.Module):
        return list(entry.parameters())
    if isinstance(entry, partial):
        bound = [*entry.args, *entry.keywords.values()]
        return [p for m in bound if isinstance(m, nn.Module) for p in m.parameters()]
    return []


def apply_layer_roles(module, plan: RolePlan) -> None:
    """Gate this stage's layers and set ``requires_grad`` for ``plan`` (replaces earlier roles).

    A parameter trains iff some local layer using it trains and it was trainable to begin
    with; a tied weight used by a frozen and a train layer on one stage therefore trains
    (through the train use only, since the frozen use runs under no_grad).
    """
    start = local_start(module)
    trainable: dict[int, bool] = {}
    for offset, entry in enumerate(module.forward_funcs):
        layer = unwrap(entry)
        role = plan.layer_roles[start + offset]
        module.forward_funcs[offset] = layer if role == TRAIN else RoleGate(layer, role)
        for param in layer_parameters(layer):
            trainable[id(param)] = trainable.get(id(param), False) or role == TRAIN
    for param in module.parameters():
        if not hasattr(param, _BASE_REQUIRES_GRAD):
            setattr(param, _BASE_REQUIRES_GRAD, param.requires_grad)
        param.requires_grad_(getattr(param, _BASE_REQUIRES_GRAD) and trainable.get(id(param), False))
        param.grad = None
    # PipelineModule caches which layer blocks it checkpoints; the gates changed the answer.
    module.is_checkpointable_results_interval = None


def apply_frozen_precision(module) -> dict[int, tuple[int, int]]:
    """Give this stage's frozen layers their converted forward (``module.frozen_precision``: pipeline
    layer -> precision, set by ``rack_to_pipeline``); returns layer -> (full, converted) weight bytes.

    Call it once the engine has placed the module on its device: the copy is made there, and the
    layer's own full-precision weights then move to a file-backed map (see ``precision.py``)."""
    precisions = getattr(module, "frozen_precision", None) or {}
    start, sizes = local_start(module), {}
    for offset, entry in enumerate(module.forward_funcs):
        precision = precisions.get(start + offset)
        if precision is None or not isinstance(entry, RoleGate) or entry.role not in NOT_TRAINED:
            continue
        if not converts(entry.layer, precision):  # bf16 weights (a bf16 run) in bf16: nothing to gain
            continue
        device = next(entry.layer.parameters()).device
        entry.frozen_compute = FrozenCompute(entry.layer, precision, device)
        sizes[start + offset] = (entry.frozen_compute.full_bytes, entry.frozen_compute.converted_bytes)
    return sizes
