"""Stage-wise DeepSpeed pipeline engine: train one unit per phase, freeze what is before it.

Design note
===========

API. ``build_engine(pipe_module, ds_config, layer_roles, optimizer_factory, lr_lambda=None)``
takes one role per pipeline layer -- ``"train"``, ``"frozen"`` (forward under no_grad) or
``"dormant"`` (identity) -- or ``None`` (everything trains: rackwise, DeepSpeed's own behaviour),
and returns a ``StageWiseEngine`` (a ``PipelineEngine``) for this phase. Stage roles follow
(``roles.make_plan``): *forward-only* stages before the first train stage, *relay* stages (all
dormant) after it, *backprop* stages after it (frozen layers the gradient passes through: forward with
autograd, backward for the input's gradient only, no optimizer), *train* stages. A ``"frozen"`` layer
after a train layer becomes ``"frozen_backprop"`` (``layout.resolve_frozen``): frozen anywhere.
Layers are gated by wrapping their ``PipelineModule.forward_funcs`` entries in ``roles.RoleGate``:
parameter names, registered submodules and per-layer checkpoint files are untouched, so ``pipe.py`` marks nothing -- any
``PipelineModule`` works (tied layers are ``TiedLayerSpec``; the head's ``forward_fn`` partial
is looked through to find its parameters). ``requires_grad`` is set per phase, never widened
beyond a parameter's own setting (e.g. a fixed random projection stays frozen).

Instructions (``schedule.StageWiseTrainSchedule``). Forward-only stages stream
``[Load|Recv] -> Forward (no_grad) -> Send`` per micro-batch and never get a BackwardPass,
SendGrad, RecvGrad, ReduceGrads or OptimizerStep. Train and relay stages run DeepSpeed's 1F1B
``TrainSchedule`` as a sub-pipeline that starts at the first train stage; that stage receives
activations that do not require grad and sends no gradient back. Relays run the same p2p
instructions, but their ForwardPass/BackwardPass hand activation/gradient on unchanged.
Backprop stages run the 1F1B instructions of a train stage with their own backward (no optimizer).
Stages without optimizer end the batch with ``CountStep`` (step counters) instead of the
reductions and ``OptimizerStep``. Deadlock-freedom under blocking send/recv is argued in
schedule.py and checked for every layout up to 5 stages in tests/test_frozen_engine.py.

Optimizers. Only train stages get one: ``optimizer_factory(named_train_params)``, wrapped by
DeepSpeed as configured (ZeRO-1 over the stage's data-parallel replicas, BF16_Optimizer, ...).
Elsewhere DeepSpeed would build a ZeRO/BF16 wrapper around a dummy optimizer; the engine
declines (``_configure_zero_optimizer``/``_configure_bf16_optimizer`` return ``None``), so those
stages hold no optimizer state and write no optimizer shard; ``load_checkpoint`` there skips
DeepSpeed's optimizer epilogue (ZeRO shards, fp32 refresh), which would call into ``None``.

Tied weights. DeepSpeed keeps one copy per stage using a ``TiedLayerSpec`` key, with one tie
group per data-parallel slice (``PipelineModule.tied_comms``). Per key and phase: if every copy
trains, DeepSpeed's all-reduce of the tied gradients (``ReduceTiedGrads``) keeps the copies
identical; if exactly one copy trains (the LM head while the embedding lookup is frozen
compute), that copy's stage owns the weight -- only its optimizer has it -- and after its step
it broadcasts the weight to the other copies (``SyncTiedWeights``, issued on every stage).

Gradient clipping. DeepSpeed computes the clipping norm inside the optimizer step and sums it
over ``mpu.get_model_parallel_group()``, which for a pipeline is every stage of the
data-parallel slice (ZeRO-1: ``DeepSpeedZeroOptimizer.get_grad_norm_direct`` sums squared
partition norms over the data-parallel group, then over that group, once per param group,
skipping parameters flagged ``ds_pipe_replicated``; BF16: ``get_global_norm_of_tensors``, once).
Stages without optimizer never enter it, so train stages get an ``mpu`` (``_TrainGroupGrid``)
whose model-parallel group is the train stages of their slice: exactly the ranks holding train
parameters -- no hang, nothing left out. ``ds_pipe_replicated`` is reset each phase so a tied
weight counts once, on its owner (DeepSpeed flags every copy but stage 0's, wrong once only the
head trains). Without ZeRO in fp32, DeepSpeed's ``clip_grad_norm_`` counts model-parallel rank 0
(= stage 0) only and tied copies twice, so ``clip_fp32_gradients`` is replaced by the same global
norm over the train group. Because ZeRO reduces once per param group, ``build_engine`` first
splits groups (same hyperparameters) so every train stage has the same count, then checks it
(an error, never a hang, if a stage has too few parameters to split).

Frozen precision. Once the engine has placed the module on its device, frozen layers that
``rack_to_pipeline`` gave a bf16/int8 precision get a converted forward (``roles.apply_frozen_precision``,
``precision.py``); their own full-precision Parameters stay registered, so checkpoints are unchanged.

Rebuilding. Each phase calls ``build_engine`` again on the same module; the previous engine is
destroyed first (its ZeRO gradient hooks and module forward hooks would keep firing into a dead
optimizer, and its flat buffer would stay alive through frozen parameters). Process groups are
created once per rank set and reused; p2p and tie groups come from the module and are reused.

DeepSpeed internals relied on (0.19.8): ``PipelineEngine._INSTRUCTION_MAP`` (class-level map of
functions, rebuilt below), the ``_exec_*`` instruction methods, ``_train_schedule``,
``_exec_schedule``, ``pipe_buffers``/``grad_layer``, ``_configure_zero_optimizer`` and
``_configure_bf16_optimizer`` (called with ``None`` when there is no client optimizer),
``clip_fp32_gradients``, ``_load_checkpoint``, ``module_forward_{pre,post}_hook`` handles,
``_backward_prologue``/``_backward_prologue_per_tensor`` (the hooks DeepSpeedEngine.forward puts on outputs),
``loss`` (the last stage's micro-batch loss),
``DeepSpeedZeroOptimizer.bit16_groups``, the bf16 optimizer's ``param._hp_grad``,
``PipelineModule.forward_funcs``/``tied_comms``/``parts``/
``_grid``/``_layer_specs``/``is_checkpointable_results_interval``, ``ds_pipe_replicated``.

Limits. Frozen/dormant layers are never activation-checkpointed (a gate is not an ``nn.Module``);
with reentrant checkpointing a train stage keeps its input requiring grad. ``save_checkpoint(...,
exclude_frozen_parameters=True)`` still writes gated layers whole. A tied key with several
training and some frozen copies is rejected.
"""

from __future__ import annotations

import copy
import os
import weakref
from collections import Counter
from dataclasses import dataclass
from typing import Callable

from .compat import check_deepspeed

check_deepspeed()  # before the imports below: a DeepSpeed lacking the internals used here fails now, saying so

import torch
from deepspeed import comm as dist
from deepspeed import set_optimizer_flags
from deepspeed.comm import pg_utils
from deepspeed.runtime.config import DeepSpeedConfig
from deepspeed.runtime.pipe.engine import PipelineEngine
from deepspeed.runtime.pipe.module import PipelineModule, TiedLayerSpec
from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
from torch import nn

from ..layout import UnitKind
from .distributed import all_gather_objects
from .param_groups import equal_group_splits
from .pipe import local_start
from .precision import describe_frozen
from .roles import (
    BACKPROP,
    FORWARD_ONLY,
    RELAY,
    TRAIN,
    TRAIN_STAGE,
    RolePlan,
    StageRole,
    apply_frozen_precision,
    apply_layer_roles,
    layer_parameters,
    make_plan,
)
from .schedule import CountStep, StageWiseTrainSchedule, SyncTiedWeights

ALLREDUCE, BROADCAST, UNTRAINED = "allreduce", "broadcast", "untrained"

OptimizerFactory = Callable[[list[tuple[str, nn.Parameter]]], torch.optim.Optimizer]


# ----------------------------------------------------------------------------- public API

def build_engine(pipe_module: PipelineModule, ds_config: dict, layer_roles: dict[int, str] | None,
                 optimizer_factory: OptimizerFactory,
                 lr_lambda: Callable[[int], float] | None = None) -> "StageWiseEngine":
    """A pipeline engine for one phase. Collective: every rank calls it with the same roles.

    ``layer_roles`` maps every pipeline layer index to ``"train" | "frozen" | "dormant"``
    (``None``: everything trains). ``optimizer_factory`` receives this stage's trainable
    ``(name, parameter)`` pairs (pipe-module names) and is called only on train stages.
    ``lr_lambda`` (optional) becomes a ``LambdaLR`` over that optimizer. An engine built
    earlier on ``pipe_module`` is destroyed first and must not be used again.
    """
    if not isinstance(pipe_module, PipelineModule):
        raise TypeError(f"build_engine needs a deepspeed PipelineModule, got {type(pipe_module).__name__}")
    _retire_previous_engine(pipe_module)
    grid = pipe_module._grid
    plan = make_plan(layer_roles, list(pipe_module.parts))
    apply_layer_roles(pipe_module, plan)
    tied_syncs = _plan_tied_weights(pipe_module, plan)
    stage_role = plan.stage_roles[grid.get_stage_id()]
    named = [(name, p) for name, p in pipe_module.named_parameters() if p.requires_grad]
    _check_trainable(stage_role, named)
    optimizer = optimizer_factory(named) if stage_role == TRAIN_STAGE else None
    _equalise_param_groups(optimizer)
    config = copy.deepcopy(ds_config)
    train_group = _train_group(grid, plan)
    mpu = _TrainGroupGrid(grid, train_group) if stage_role == TRAIN_STAGE else grid
    config_class = DeepSpeedConfig(config, mpu)
    set_optimizer_flags(config_class, pipe_module)
    scheduler = _lambda_lr(lr_lambda) if optimizer is not None and lr_lambda is not None else None
    engine = StageWiseEngine(plan=plan, tied_syncs=tied_syncs, train_group=train_group,
                             args=None, model=pipe_module, optimizer=optimizer,
                             model_parameters=[p for _, p in named], lr_scheduler=scheduler,
                             mpu=mpu, config=config, config_class=config_class)
    engine._configure_python_gc()
    # after the engine moved the module to its device: frozen layers get their bf16/int8 forward
    engine.frozen_weight_bytes = apply_frozen_precision(pipe_module)
    if engine.frozen_weight_bytes and grid.get_data_parallel_id() == 0:
        print("[stackwise] " + describe_frozen(grid.get_stage_id(), engine.frozen_weight_bytes,
                                               pipe_module.frozen_precision), flush=True)
    pipe_module._stagewise_engine = weakref.ref(engine)
    _check_zero_param_groups(engine)
    return engine


class StageWiseEngine(PipelineEngine):
    """``PipelineEngine`` that executes ``StageWiseTrainSchedule`` for a ``RolePlan``.

    Build it with :func:`build_engine`. ``stage_role`` is ``"forward_only" | "relay" |
    "train"``; ``executed_instructions`` counts the pipeline instructions run on this rank.
    """

    def __init__(self, *args, plan: RolePlan, tied_syncs: list["TiedSync"], train_group, **kwargs):
        # Set before DeepSpeedEngine.__init__, which calls the overridden _configure_* methods.
        self.plan = plan
        self.tied_syncs = tied_syncs
        self.train_group = train_group
        self.executed_instructions: Counter[str] = Counter()
        self._layer_grad_norms: dict[int, float] = {}
        # Whether the coming steps record per-layer gradient norms (the step loop asks for them on the steps that
        # log them only): each costs a host read of the device's results.
        self.record_grad_norms = True
        super().__init__(*args, **kwargs)
        self._trained_params = [p for p in self.module.parameters() if p.requires_grad]
        self._destroyed = False
        self.stage_role = plan.stage_roles[self.stage_id]
        # Input gradients are only wanted where they are sent back; reentrant activation
        # checkpointing needs a grad-requiring input to record the checkpointed segment at all.
        self._input_requires_grad = plan.sends_grad(self.stage_id) or (
            self.stage_role == TRAIN_STAGE and self._reentrant_activation_checkpointing())

    # ------------------------------------------------------------------ construction hooks

    def _configure_zero_optimizer(self, optimizer):
        # DeepSpeed asks for a ZeRO wrapper even without a client optimizer (and then rejects the
        # DummyOptim it makes up): a stage without train parameters simply has no optimizer.
        return None if optimizer is None else super()._configure_zero_optimizer(optimizer)

    def _configure_bf16_optimizer(self, optimizer):
        return None if optimizer is None else super()._configure_bf16_optimizer(optimizer)

    # ------------------------------------------------------------------ schedule

    def _train_schedule(self):
        return StageWiseTrainSchedule(micro_batches=self.micro_batches, stages=self.num_stages,
                                      stage_id=self.stage_id, plan=self.plan)

    def _exec_schedule(self, pipe_schedule):
        super()._exec_schedule(_CountingSchedule(pipe_schedule, self.executed_instructions))

    # ------------------------------------------------------------------ instructions

    def _exec_recv_activations(self, buffer_id):
        super()._exec_recv_activations(buffer_id)
        if not self._input_requires_grad:
            for tensor in _as_tuple(self.pipe_buffers['inputs'][buffer_id]):
                tensor.requires_grad_(False)

    def _exec_forward_pass(self, buffer_id):
        if self.stage_role == RELAY:
            self.pipe_buffers['outputs'][buffer_id] = self.pipe_buffers['inputs'][buffer_id]
        elif self.stage_role == FORWARD_ONLY:
            with torch.no_grad():
                super()._exec_forward_pass(buffer_id)
        else:
            super()._exec_forward_pass(buffer_id)

    def _exec_backward_pass(self, buffer_id):
        if self.stage_role == RELAY:
            return self._relay_gradient(buffer_id)
        if self.stage_role == BACKPROP:
            return self._backprop_through_frozen(buffer_id)
        return super()._exec_backward_pass(buffer_id)

    def _backprop_through_frozen(self, buffer_id):
        """A stage of frozen layers behind a train stage: autograd yields its input's gradient only (its parameters
        require none), which ``_exec_send_grads`` sends on. DeepSpeed's own backward needs an optimizer."""
        if self.is_last_stage():
            # as DeepSpeedEngine.backward scales it (no loss scaler in fp32/bf16): a micro-batch is 1/gas of a step
            (self.loss / self.gradient_accumulation_steps()).backward()
            return
        outputs = [t for t in _as_tuple(self.pipe_buffers['outputs'][buffer_id]) if t.is_floating_point()]
        torch.autograd.backward(outputs, grad_tensors=list(_as_tuple(self.grad_layer)))  # already 1/gas of the step
        self.pipe_buffers['output_tensors'][buffer_id] = None
        self.pipe_buffers['outputs'][buffer_id] = None

    def _relay_gradient(self, buffer_id):
        """Hand the received output gradient on as the input gradient ``_exec_send_grads`` sends."""
        inputs = _as_tuple(self.pipe_buffers['inputs'][buffer_id])
        floats = [t for t in inputs if t.is_floating_point()]
        for tensor, grad in zip(floats, _as_tuple(self.grad_layer), strict=True):
            tensor.grad = grad.clone()
        self.pipe_buffers['outputs'][buffer_id] = None

    def _backward_prologue(self):
        # DeepSpeedEngine.forward hooks every forward's outputs to run this (and the per-tensor scaling below) when
        # their backward starts: optimizer bookkeeping, and a refusal of any backward but engine.backward. A stage
        # without optimizer (backprop) runs its own backward, scaled once, as _backprop_through_frozen says.
        if self.optimizer is not None:
            super()._backward_prologue()

    def _backward_prologue_per_tensor(self, grad):
        return grad if self.optimizer is None else super()._backward_prologue_per_tensor(grad)

    def _exec_reduce_grads(self):
        self._record_layer_grad_norms()
        super()._exec_reduce_grads()

    def _exec_reduce_tied_grads(self):
        # ZeRO-2+ is rejected by PipelineEngine, so no partitioned-gradient epilogue is needed.
        for sync in self.tied_syncs:
            if sync.mode != ALLREDUCE:
                continue
            for weight in sync.weights:
                grad = weight._hp_grad if self.using_bf16_optimizer else weight.grad
                if grad is not None:
                    dist.all_reduce(grad, group=sync.group)

    def _exec_sync_tied_weights(self):
        for sync in self.tied_syncs:
            if sync.mode == BROADCAST:
                for weight in sync.weights:
                    dist.broadcast(weight.data, src=sync.owner_rank, group=sync.group)

    def _exec_count_step(self):
        # What _take_model_step does to the counters on train stages (default checkpoint tags,
        # logging and monitors read them).
        self.global_steps += 1
        self.global_samples += self.train_batch_size()

    # ------------------------------------------------------------------ monitoring

    def layer_grad_norms(self) -> dict[int, float]:
        """Last step's gradient L2 norm per local train layer (pipeline layer index): this
        replica's accumulated gradient, before data-parallel averaging and clipping; empty after a step that
        did not record them (``record_grad_norms`` false)."""
        return dict(self._layer_grad_norms)

    def stack_grad_norms(self, n_stacks: int) -> list[float]:
        """``layer_grad_norms`` combined per stack, -1.0 for stacks with no trained block here.

        Needs ``module.units`` (pipe.py's ``LayerUnit`` list: ``kind``, ``stack_id``)."""
        units = getattr(self.module, 'units', None)
        squares = [-1.0] * n_stacks
        for layer, norm in self._layer_grad_norms.items():
            unit = units[layer] if units is not None else None
            if unit is not None and getattr(unit, 'kind', None) == UnitKind.BLOCK:
                squares[unit.stack_id] = max(squares[unit.stack_id], 0.0) + norm**2
        return [s**0.5 if s >= 0 else -1.0 for s in squares]

    def _record_layer_grad_norms(self):
        """On a step that wants them (``record_grad_norms``): every train layer's gradient norm from one batched
        ``torch._foreach_norm`` and one host read for all layers (a read waits for the device's queued work)."""
        self._layer_grad_norms = {}
        if not self.record_grad_norms:
            return
        layers, counts, grads = [], [], []  # train layers here, their gradient counts, all their gradients
        for offset, entry in enumerate(self.module.forward_funcs):
            layer = local_start(self.module) + offset
            if self.plan.layer_roles[layer] != TRAIN:
                continue
            found = [g for g in (_accumulated_grad(p) for p in layer_parameters(entry) if p.requires_grad)
                     if g is not None]
            if found:
                layers.append(layer)
                counts.append(len(found))
                grads.extend(g.detach() if g.dtype == torch.float32 else g.detach().float() for g in found)
        self._layer_grad_norms = dict(zip(layers, grouped_norms(grads, counts), strict=True))

    # ------------------------------------------------------------------ clipping, checkpoints

    def clip_fp32_gradients(self):
        """fp32 without ZeRO: clip by the norm over all train parameters of the pipeline."""
        params = [p for p in self.module.parameters() if p.grad is not None]
        if not params:
            return
        owned = [p.grad.detach().float() for p in params if not getattr(p, 'ds_pipe_replicated', False)]
        norms = [torch.linalg.vector_norm(g) for g in owned] or [torch.zeros((), device=params[0].device)]
        total_sq = torch.stack(norms).pow(2).sum()
        if pg_utils.is_parallel(self.train_group):
            dist.all_reduce(total_sq, group=self.train_group)
        total_norm = total_sq.sqrt()
        coef = torch.clamp(self.gradient_clipping() / (total_norm + 1e-6), max=1.0)
        for p in params:
            p.grad.detach().mul_(coef.to(p.grad.dtype))
        self._global_grad_norm = total_norm.item()

    def load_checkpoint(self, load_dir, tag=None, **kwargs):
        """DeepSpeed's ``load_checkpoint``; without an optimizer only its ``_load_checkpoint`` part.

        Everything ``load_checkpoint`` adds around ``_load_checkpoint`` concerns the optimizer
        (ZeRO shards, refreshing fp32 masters after a module-only load, offload): on a stage
        without one DeepSpeed would call into ``None``. Layer weights, step counters and client
        state load the same way on every stage.
        """
        if self.optimizer is not None:
            return super().load_checkpoint(load_dir, tag, **kwargs)
        if tag is None:
            latest = os.path.join(load_dir, "latest_universal" if self.load_universal_checkpoint() else "latest")
            if not os.path.isfile(latest):
                return None, None
            with open(latest) as fd:
                tag = fd.read().strip()
        return self._load_checkpoint(load_dir, tag, **kwargs)

    def destroy(self):
        """Detach this engine from the (reused) module: hooks, optimizer hooks, flat buffers.

        Runs once: a second run (e.g. from ``__del__``) would clear the hp-param links and
        storage of the *next* engine's optimizer, which owns the same parameters by then.
        """
        if self.__dict__.get('_destroyed', True):
            return
        self._destroyed = True
        had_zero = self.optimizer is not None and self.zero_optimization()
        super().destroy()
        for name in ('module_forward_pre_hook', 'module_forward_post_hook'):
            handle = self.__dict__.get(name)
            if handle is not None:
                handle.remove()
                self.__dict__[name] = None
        if had_zero:
            _own_storage(self._trained_params)


# PipelineEngine dispatches through a class-level map of *function objects*, so overriding an
# _exec_* method is not enough: rebuild the map from this class's methods of the same names.
StageWiseEngine._INSTRUCTION_MAP = {
    **{instr: getattr(StageWiseEngine, fn.__name__) for instr, fn in PipelineEngine._INSTRUCTION_MAP.items()},
    SyncTiedWeights: StageWiseEngine._exec_sync_tied_weights,
    CountStep: StageWiseEngine._exec_count_step,
}


# ----------------------------------------------------------------------------- tied weights

@dataclass
class TiedSync:
    """How one tied key's local copy stays identical to the others this phase."""

    key: str
    mode: str  # ALLREDUCE (all copies train) | BROADCAST (one owner trains) | UNTRAINED
    weights: list[torch.Tensor]
    group: object  # the tie group of this data-parallel slice
    owner_rank: int  # global rank holding the copy that counts (norm) and broadcasts


def _plan_tied_weights(module: PipelineModule, plan: RolePlan) -> list[TiedSync]:
    grid = module._grid
    syncs = []
    for key, comm in module.tied_comms.items():
        layers = [i for i, spec in enumerate(module._layer_specs)
                  if isinstance(spec, TiedLayerSpec) and spec.key == key]
        stages = sorted({plan.stage_of(i) for i in layers})
        trained = sorted({plan.stage_of(i) for i in layers if plan.layer_roles[i] == TRAIN})
        if trained == stages:
            mode, owner = ALLREDUCE, stages[0]
        elif not trained:
            mode, owner = UNTRAINED, stages[0]
        elif len(trained) == 1:
            mode, owner = BROADCAST, trained[0]
        else:
            raise NotImplementedError(f"tied key {key!r}: copies on stages {trained} train and others do not; "
                                      "only all or exactly one training copy is supported")
        weights = [module._recursive_getattr(comm['module'], attr) for attr in comm['weight_attr']]
        for weight in weights:
            # The clipping norm counts a tied weight on its owner only.
            weight.ds_pipe_replicated = grid.get_stage_id() != owner
        syncs.append(TiedSync(key, mode, weights, comm['group'], grid.stage_to_global(owner)))
    return syncs


# ----------------------------------------------------------------------------- groups, checks

class _TrainGroupGrid:
    """The module's grid, with the model-parallel group narrowed to this slice's train stages.

    DeepSpeed's optimizers reduce the clipping norm (and fp16 overflow flags) over
    ``get_model_parallel_group()``; ranks, names and all other groups stay the grid's.
    """

    def __init__(self, grid, train_group):
        self._grid = grid
        self._train_group = train_group

    def get_model_parallel_group(self):
        return self._train_group

    def __getattr__(self, name):
        return getattr(self.__dict__['_grid'], name)


_GROUPS: dict[tuple[int, ...], object] = {}


def _train_group(grid, plan: RolePlan):
    """This rank's group of train-stage ranks (same data-parallel index). Collective."""
    if plan.train_stages == list(range(plan.num_stages)):
        return grid.get_model_parallel_group()
    mine = None
    for dp in range(grid.get_data_parallel_world_size()):
        ranks = tuple(grid.stage_to_global(s, data=dp) for s in plan.train_stages)
        if ranks not in _GROUPS:  # every rank creates the same groups in the same order
            _GROUPS[ranks] = dist.new_group(ranks=list(ranks))
        if grid.get_global_rank() in ranks:
            mine = _GROUPS[ranks]
    return mine


def forget_process_groups() -> None:
    """Drop the cached train groups; call after their process groups were destroyed."""
    _GROUPS.clear()


def _check_trainable(stage_role: StageRole, named) -> None:
    """Collective: fail on every rank alike, before any rank builds an optimizer over nothing."""
    layout = all_gather_objects((stage_role, sum(p.numel() for _, p in named)))
    empty = sorted(rank for rank, (role, numel) in enumerate(layout) if role == TRAIN_STAGE and numel == 0)
    if empty:
        raise ValueError(f"ranks {empty} hold 'train' layers without trainable parameters")


def _equalise_param_groups(optimizer: torch.optim.Optimizer | None) -> None:
    """Collective. Give every train stage the same number of param groups (see
    ``_check_zero_param_groups`` and ``equal_group_splits``). Stages that hold different stacks
    under per-stack learning rates naturally build different group counts."""
    counts = all_gather_objects(None if optimizer is None else len(optimizer.param_groups))
    target = max((c for c in counts if c is not None), default=0)
    if optimizer is None:
        return
    for group, keep in equal_group_splits([len(g["params"]) for g in optimizer.param_groups], target):
        split = optimizer.param_groups[group]
        moved = split["params"][keep:]
        split["params"] = split["params"][:keep]
        optimizer.add_param_group({**{k: v for k, v in split.items() if k != "params"}, "params": moved})


def _check_zero_param_groups(engine: "StageWiseEngine") -> None:
    """Collective. ZeRO-1/2 all-reduce the clipping norm once *per param group* across the train
    stages, so differing group counts would pair unrelated collectives and hang."""
    opt = engine.optimizer
    groups = [len(g) for g in opt.bit16_groups] if isinstance(opt, DeepSpeedZeroOptimizer) else None
    layout = all_gather_objects(groups)
    counts = {len(g) for g in layout if g is not None}
    if len(counts) > 1 or any(0 in g for g in layout if g is not None):
        raise ValueError(f"ZeRO needs the same number of non-empty optimizer param groups on every train stage; "
                         f"sizes per rank: {layout}. Make optimizer_factory group parameters the same way "
                         "on every stage (e.g. one group, or decay/no-decay present on each stage)")


# ----------------------------------------------------------------------------- helpers

def _lambda_lr(lr_lambda: Callable[[int], float]):
    """DeepSpeed calls a callable ``lr_scheduler`` with the client optimizer it wrapped."""
    return lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)


def _retire_previous_engine(module: PipelineModule) -> None:
    ref = getattr(module, '_stagewise_engine', None)
    previous = ref() if ref is not None else None
    if previous is not None:
        previous.destroy()
    module._stagewise_engine = None


def _own_storage(params: list[nn.Parameter]) -> None:
    """Give parameters that are views into a retired ZeRO flat buffer their own storage, so the
    buffer (a whole stage's weights) is freed instead of kept alive by frozen parameters."""
    with torch.no_grad():
        for p in params:
            if p.untyped_storage().nbytes() > p.numel() * p.element_size():
                p.data = p.data.clone()


def grouped_norms(tensors: list[torch.Tensor], counts: list[int]) -> list[float]:
    """L2 norms of consecutive groups of ``tensors`` (``counts[i]`` tensors in group i, in order), from one batched
    ``torch._foreach_norm`` and one host read; fp32 tensors on one device."""
    if not tensors:
        return [0.0] * len(counts)
    squares = torch.stack(torch._foreach_norm(tensors)).square()  # [tensors]
    group = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts)).to(squares.device)
    return torch.zeros(len(counts), device=squares.device).index_add_(0, group, squares).sqrt().tolist()


def _accumulated_grad(p: nn.Parameter):
    """Where DeepSpeed accumulates a parameter's gradient before the reduction (optimizer-dependent)."""
    for attr in ('grad', 'grad_accum', '_hp_grad'):
        grad = getattr(p, attr, None)
        if grad is not None:
            return grad
    return None


def _as_tuple(value) -> tuple:
    return value if isinstance(value, (tuple, list)) else (value,)


class _CountingSchedule:
    """Passes a schedule through, counting its instructions by type name."""

    def __init__(self, schedule, counter: Counter):
        self.schedule = schedule
        self.counter = counter

    def num_pipe_buffers(self):
        return self.schedule.num_pipe_buffers()

    def __iter__(self):
        for cmds in self.schedule:
            self.counter.update(type(cmd).__name__ for cmd in cmds)
            yield cmds
