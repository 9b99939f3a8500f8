"""Rewrite a checkpoint for another pipeline layout (M stages x D data-parallel), optimizer included.

Why not DeepSpeed's universal checkpoint: the trainer resumes through the ordinary
``engine.load_checkpoint`` (no ``checkpoint.load_universal`` in its DeepSpeed config), and in
stackwise/blockwise phases the frozen and relay stages have no optimizer and write no ZeRO
shard, which ``ds_to_universal`` does not expect. So this module writes the regular files a run
with the new layout would have saved itself:

1. ``layer_XX-model_states.pt`` are per layer, layout-free: copied as they are.
2. ZeRO-1 shards (``[bf16_]zero_pp_rank_{d}_mp_rank_{s}_optim_states.pt``) are unflattened into
   per-parameter fp32 master weights and optimizer tensors (exp_avg, exp_avg_sq) keyed by Rack
   name, using each stage's ``param_shapes`` (optimizer order), then re-flattened for each new
   stage (parameter order of the new PipelineModule, groups by hyper-parameters in order of first
   appearance, as the trainer's optimizer factory builds them, then split to equal counts across
   stages as the engine does), padded to 2 x D and split in D.
3. ``mp_rank_{s}_model_states.pt`` (engine state) is rebuilt per new stage: ``param_shapes``,
   per-group lists of the LR scheduler, dp/mp world sizes, ``checkpoint_parallel_dimensions``.
4. ``<out>/results.json`` is the run's, so the resumed run's history keeps the losses before the tag.
5. ``stackwise_state.json`` and ``<out>/config.yaml`` get ``parallel.pipeline_stages = M`` (and
   ``training.output_dir``; ``gradient_accumulation_steps`` is rescaled to keep the global batch).

A stage gets an optimizer shard iff it holds a parameter that had optimizer state. The tied
embedding/head weight trains on a stage iff a local use of it trains: the LM head always trains
when the weight does; the embedding lookup trains when the first block trains (phases.py's rule).

Limits: ZeRO stage 1 (fp32 or bf16 master weights) only -- ZeRO-0 keeps a plain torch optimizer
state without parameter names and is refused; ``round_robin_gradients``, ``parameter_alignment``
and elastic ZeRO checkpoints are refused; tensor parallelism is not used by this project.
"""

from __future__ import annotations

import copy
import json
import shutil
import warnings
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import ModelConfig, StackWiseConfig, TrainingConfig
from ..data.tokenizer import TOKENIZER_FILE
from ..enums import LayoutKind
from ..layout import UnitKind
from ..parallel.param_groups import equal_group_splits
from .files import (
    MOMENTS_FILE_RE,
    CheckpointError,
    TrainingState,
    engine_state_file,
    json_text,
    mark_complete,
    zero_shard_file,
)
from .layers import (
    TIED_PREFIX,
    file_layers,
    pipe_name,
    pipe_to_rack_names,
    rack_name,
    rack_shapes,
    stage_layers,
    unit_keys,
    units_of,
)
from .locate import LAYER_FILE_RE, CheckpointRef, resolve_checkpoint

BASE, FP32, PADDINGS = "base_optimizer_state", "single_partition_of_fp32_groups", "group_paddings"
ALIGN_PADDINGS = "param_alignment_paddings"
RESULTS_FILE = "results.json"  # the trainer's run summary in <output_dir>
ALIGNMENT_FACTOR = 2  # DeepSpeed's nccl_start_alignment_factor: flat groups are padded to 2 x dp


@dataclass
class ParamState:
    """One parameter's optimizer state, independent of any layout."""

    fp32: torch.Tensor  # master weight, flattened
    tensors: dict[str, torch.Tensor]  # per-element state (exp_avg, exp_avg_sq), flattened
    scalars: dict[str, Any]  # per-group state (step)
    hyper: dict[str, Any]  # the group's hyper-parameters (lr, weight_decay, betas, ...)


@dataclass
class SourceOptimizer:
    """Everything read from the old layout's engine and optimizer files."""

    params: "OrderedDict[str, ParamState]" = field(default_factory=OrderedDict)  # by Rack name
    model_states: list[dict] = field(default_factory=list)  # mp_rank files, per old stage
    optim_template: dict | None = None  # one old optimizer_state_dict (global keys: loss scaler, ...)
    bf16_files: bool = False  # file prefix "bf16_" (DeepSpeed writes it whenever bf16 is on)
    bf16_optimizer: bool = False  # BF16_Optimizer layout (no ZeRO keys), else DeepSpeedZeroOptimizer
    schedulers: dict[str, tuple[dict, int]] = field(default_factory=dict)  # group signature -> (sched, idx)


# ----------------------------------------------------------------------------- public API


def reshard(checkpoint: str | Path, out_dir: str | Path, pipeline_stages: int, data_parallel: int = 1,
            tag: str | None = None) -> Path:
    """Write tag ``tag`` (default: newest complete) of ``checkpoint`` as ``out_dir`` (a new output_dir)
    for ``pipeline_stages`` stages x ``data_parallel`` replicas; returns the new tag folder."""
    ref = resolve_checkpoint(checkpoint, tag)
    old_config = ref.config
    new_config = new_layout_config(old_config, pipeline_stages, data_parallel, source_micro_batches(ref), Path(out_dir))
    out_ckpt = Path(out_dir) / "checkpoints"
    target = out_ckpt / ref.tag
    if target.exists() and any(target.iterdir()):
        raise CheckpointError(f"{target} already exists: pick an empty OUT_DIR (reshard never overwrites)")
    source = read_source(ref)
    target.mkdir(parents=True, exist_ok=True)
    copy_layer_files(ref, target)
    write_stages(source, new_config.model, new_config.training, target, pipeline_stages, data_parallel)
    run_config = with_run_model(new_config, ref)
    run_config.to_yaml(Path(out_dir) / "config.yaml")
    copy_results(ref, Path(out_dir))
    # the files now follow the fixed layout of new_config: no recorded elastic layout to match on resume
    state = TrainingState(**{**asdict(ref.state), "config": run_config.to_dict(), "layout": {}})
    mark_complete(out_ckpt, ref.tag, state)  # last: the tag is complete only once everything is there
    return target


def with_run_model(config: StackWiseConfig, ref: CheckpointRef) -> StackWiseConfig:
    """``config`` with the run's own model settings: a tied run whose tag holds an untied head (``untied_head``,
    read as untied by the tools) keeps resuming under its own tied config."""
    run = copy.deepcopy(config)
    run.model.tie_embeddings = StackWiseConfig.from_dict(ref.state.config).model.tie_embeddings
    return run


def new_layout_config(config: StackWiseConfig, stages: int, dp: int, samples: int, out_dir: Path) -> StackWiseConfig:
    """The run config for the new layout (fixed: a resharded stage-wise run continues on the fixed
    pipeline of ``stages`` stages); the global batch of ``samples`` micro-batches stays when it can."""
    if dp <= 0:
        raise CheckpointError(f"--data-parallel must be positive, got {dp}")
    raw = config.to_dict()
    raw["parallel"]["pipeline_stages"] = stages
    raw["parallel"]["phase_layout"] = LayoutKind.FIXED.value
    raw["training"]["output_dir"] = str(out_dir)
    t = raw["training"]
    if samples % dp == 0:
        t["gradient_accumulation_steps"] = samples // dp
    else:
        warnings.warn(f"{samples} micro-batches per step do not divide among {dp} replicas: "
                      f"gradient_accumulation_steps stays {t['gradient_accumulation_steps']}, so the global batch "
                      "changes and the resumed run will not continue the same loss curve", stacklevel=2)
    return StackWiseConfig.from_dict(raw)  # validates that the stages divide n_stacks


def source_micro_batches(ref: CheckpointRef) -> int:
    """Micro-batches per optimizer step of the saved layout, summed over its replicas."""
    if ref.state.layout:  # an elastic phase's own data-parallel degree and accumulation
        return ref.state.layout["gradient_accumulation_steps"] * ref.state.layout["data_parallel"]
    path = ref.path / engine_state_file(0)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {ref.path} is partial: {path.name} is missing; use another tag")
    return ref.config.training.gradient_accumulation_steps * int(_load(path).get("dp_world_size", 1))


def copy_layer_files(ref: CheckpointRef, target: Path) -> None:
    for layer in file_layers(ref.config.model):
        if not ref.layer_file(layer).is_file():
            raise CheckpointError(f"checkpoint {ref.path} is partial: {ref.layer_file(layer).name} is missing; "
                                  "use another tag")
    for path in sorted(ref.path.iterdir()):
        # layout-free files travel as they are: the tokenizer, and the phase end's per-layer optimizer moments
        if LAYER_FILE_RE.match(path.name) or MOMENTS_FILE_RE.match(path.name) or path.name == TOKENIZER_FILE:
            shutil.copy2(path, target / path.name)


def copy_results(ref: CheckpointRef, out_dir: Path) -> None:
    """The run's results.json (its loss history) into ``out_dir``, so the resumed run's summary continues it;
    the resumed trainer keeps the history up to the tag's step. A checkpoint without one (a tag copied
    alone) has none to carry."""
    source = ref.checkpoint_dir.parent / RESULTS_FILE
    try:
        results = json.loads(source.read_text())
    except (OSError, ValueError):
        return
    results["output_dir"] = str(out_dir)
    (out_dir / RESULTS_FILE).write_text(json_text(results, indent=2))  # an older run's NaN as null


# ----------------------------------------------------------------------------- reading the old layout


def read_source(ref: CheckpointRef) -> SourceOptimizer:
    """The optimizer state of every parameter of ``ref``, under its Rack name, with what the engines saved."""
    config = ref.config
    names = pipe_to_rack_names(config.model)
    source = SourceOptimizer()
    stage = 0
    while (ref.path / engine_state_file(stage)).is_file():
        model_state = _load(ref.path / engine_state_file(stage))
        source.model_states.append(model_state)
        _check_supported(model_state, ref.path, stage)
        if model_state.get("param_shapes") is not None:
            read_stage_optimizer(ref, stage, model_state, names, source)
        stage += 1
    saved_stages = ref.state.layout.get("pipeline_stages", config.pipeline_stages)  # elastic: the phase's own
    if stage != saved_stages:
        raise CheckpointError(f"checkpoint {ref.path} is partial: {stage} engine files (mp_rank_XX_model_states.pt) "
                              f"for {saved_stages} pipeline stages; use another tag")
    return source


def _check_supported(model_state: dict, where: Path, stage: int) -> None:
    if model_state.get("param_shapes") is None and model_state.get("optimizer") is not None:
        raise CheckpointError(
            f"stage {stage} of {where} holds a ZeRO-0 optimizer state, which names no parameters, so it cannot "
            "be re-partitioned: train with parallel.zero_stage=1 (the default) to get reshardable checkpoints")
    zero = (model_state.get("ds_config") or {}).get("zero_optimization") or {}
    for option in ("round_robin_gradients", "parameter_alignment", "elastic_checkpoint"):
        if zero.get(option):
            raise CheckpointError(f"{where} was saved with zero_optimization.{option}=true, which reshard does "
                                  f"not support: train without it")


def read_stage_optimizer(ref: CheckpointRef, stage: int, model_state: dict, names: dict[str, str],
                         source: SourceOptimizer) -> None:
    shards = [_load(path)["optimizer_state_dict"] for path in optimizer_files(ref, stage, model_state, source)]
    source.optim_template = source.optim_template or shards[0]
    source.bf16_optimizer = "zero_stage" not in shards[0]
    for group, shapes in enumerate(model_state["param_shapes"]):
        hyper = {k: v for k, v in shards[0][BASE]["param_groups"][group].items() if k != "params"}
        signature = group_signature(hyper)
        if model_state.get("lr_scheduler") is not None:
            source.schedulers.setdefault(signature, (model_state["lr_scheduler"], group))
        fp32, tensors, scalars = merge_partitions(shards, group)
        offset = 0
        for pipe_param, shape in shapes.items():
            numel = int(torch.Size(shape).numel())
            rack = names.get(pipe_param)
            if rack is None:
                raise CheckpointError(f"optimizer of stage {stage} in {ref.path} holds '{pipe_param}', which is not "
                                      "a parameter of this rack: the files come from another architecture")
            if rack not in source.params:  # a tied weight is in every stage holding it; the copies are equal
                source.params[rack] = ParamState(
                    fp32=fp32[offset:offset + numel].clone(),
                    tensors={k: v[offset:offset + numel].clone() for k, v in tensors.items()},
                    scalars=scalars, hyper=hyper)
            offset += numel
        if offset != fp32.numel():
            raise CheckpointError(f"optimizer of stage {stage} in {ref.path}: group {group} holds {fp32.numel()} "
                                  f"values but its parameters {offset}; the shards are inconsistent")


def optimizer_files(ref: CheckpointRef, stage: int, model_state: dict, source: SourceOptimizer) -> list[Path]:
    dp = int(model_state.get("dp_world_size", 1))
    files = []
    for rank in range(dp):
        found = [ref.path / zero_shard_file(rank, stage, bf16) for bf16 in (False, True)]
        found = [p for p in found if p.is_file()]
        if not found:
            raise CheckpointError(
                f"checkpoint {ref.path} is partial: the optimizer shard of stage {stage}, data-parallel rank {rank} "
                f"({zero_shard_file(rank, stage)}) is missing; use another tag")
        source.bf16_files = found[0].name.startswith("bf16_")
        files.append(found[0])
    return files


def merge_partitions(shards: list[dict], group: int) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, Any]]:
    """One group's flat fp32 weights and optimizer tensors over all data-parallel partitions, unpadded.

    Padding sits only at the end of the flat group, so trimming each partition to its real length
    and concatenating restores the flat group. DeepSpeedZeroOptimizer saves its fp32 partition
    already trimmed, BF16_Optimizer saves it padded (``group_paddings`` says by how much); the
    optimizer tensors are padded in both.
    """
    fp32_parts, tensor_parts, scalars = [], {}, {}
    for shard in shards:
        base = shard[BASE]
        if not isinstance(base, dict):
            raise CheckpointError("elastic ZeRO checkpoints are not supported by reshard: train without "
                                  "zero_optimization.elastic_checkpoint")
        state = base["state"].get(group, base["state"].get(str(group), {}))
        fp32 = shard[FP32][group].reshape(-1)
        lean = fp32.numel() - (0 if "zero_stage" in shard else int(shard[PADDINGS][group]))
        if any(shard.get(ALIGN_PADDINGS, [[]] * (group + 1))[group]):
            raise CheckpointError("checkpoint uses zero_optimization.parameter_alignment, which reshard does not "
                                  "support: train without it")
        fp32_parts.append(fp32[:lean].float())
        for key, value in state.items():
            if torch.is_tensor(value) and value.dim() > 0:
                tensor_parts.setdefault(key, []).append(value.reshape(-1)[:lean])
            else:
                scalars[key] = value
    tensors = {k: torch.cat(v) for k, v in tensor_parts.items()}
    return torch.cat(fp32_parts), tensors, scalars


def group_signature(hyper: dict[str, Any]) -> str:
    """Parameters share a new group iff their old groups had the same hyper-parameters."""
    return json.dumps(hyper, sort_keys=True, default=repr)


# ----------------------------------------------------------------------------- writing the new layout


@dataclass
class NewGroup:
    hyper: dict[str, Any]
    signature: str
    params: list[tuple[str, str, torch.Size]] = field(default_factory=list)  # (pipe name, rack name, shape)


def stage_parameters(model: ModelConfig, layers: range) -> list[tuple[str, str, torch.Size]]:
    """(pipe name, Rack name, shape) of a stage's parameters in PipelineModule.named_parameters() order.

    ``tied_modules`` is registered in PipelineModule.__init__, before the numbered layers, so a
    tied weight comes first on every stage holding one of its uses.
    """
    units, shapes = units_of(model), rack_shapes(model)
    tied = model.tie_embeddings
    out = []
    if tied and any(units[i].kind in (UnitKind.EMBEDDING, UnitKind.HEAD) for i in layers):
        out.append((TIED_PREFIX + "embedding.weight", "embedding.weight", shapes["embedding.weight"]))
    for layer in layers:
        unit = units[layer]
        if tied and unit.kind in (UnitKind.EMBEDDING, UnitKind.HEAD):
            continue
        for key in unit_keys(model, unit):
            rack = rack_name(unit, key)
            out.append((pipe_name(model, layer, key), rack, shapes[rack]))
    return out


def stage_groups(model: ModelConfig, layers: range, source: SourceOptimizer) -> list[NewGroup]:
    """The optimizer groups of a new stage: its trained parameters, grouped by hyper-parameters."""
    groups: dict[str, NewGroup] = {}
    for pipe_param, rack, shape in stage_parameters(model, layers):
        if not trains_here(model, rack, layers, source):
            continue
        state = source.params[rack]
        signature = group_signature(state.hyper)
        groups.setdefault(signature, NewGroup(state.hyper, signature)).params.append((pipe_param, rack, shape))
    return list(groups.values())


def trains_here(model: ModelConfig, rack: str, layers: range, source: SourceOptimizer) -> bool:
    if rack not in source.params:
        return False
    if not (model.tie_embeddings and rack == "embedding.weight"):
        return True
    units = units_of(model)
    holds_head = any(units[i].kind == UnitKind.HEAD for i in layers)
    first_block = next(n for n in rack_shapes(model) if n.startswith("stacks.0.blocks.0."))
    return holds_head or first_block in source.params


def equalised_groups(per_stage: list[list[NewGroup]]) -> list[list[NewGroup]]:
    """Split groups as the engine will (``equal_group_splits``): every stage with an optimizer
    gets as many groups as the one with most, or the new run could not load its shard."""
    target = max((len(groups) for groups in per_stage), default=0)
    out = []
    for groups in per_stage:
        groups = list(groups)
        for index, keep in equal_group_splits([len(g.params) for g in groups], target if groups else 0):
            split = groups[index]
            groups[index] = NewGroup(split.hyper, split.signature, split.params[:keep])
            groups.append(NewGroup(split.hyper, split.signature, split.params[keep:]))
        out.append(groups)
    return out


def write_stages(source: SourceOptimizer, model: ModelConfig, training: TrainingConfig, target: Path, stages: int,
                 dp: int) -> None:
    template = source.model_states[0]
    per_stage = equalised_groups([stage_groups(model, layers, source) for layers in stage_layers(model, stages)])
    for stage, groups in enumerate(per_stage):
        model_state = engine_state(template, groups, source, training, stages, dp)
        torch.save(model_state, target / engine_state_file(stage))
        if not groups:
            continue  # a stage without trained parameters has no optimizer, hence no shard
        if source.optim_template is None:
            raise CheckpointError("stage parameters train but the checkpoint holds no optimizer state")
        for rank in range(dp):
            shard = optimizer_shard(groups, source, rank, dp)
            torch.save({"optimizer_state_dict": shard, "ds_config": model_state["ds_config"],
                        "ds_version": model_state.get("ds_version")},
                       target / zero_shard_file(rank, stage, source.bf16_files))


def engine_state(template: dict, groups: list[NewGroup], source: SourceOptimizer, training: TrainingConfig,
                 stages: int, dp: int) -> dict:
    """The mp_rank file of a new stage: the old engine state with layout-dependent fields rebuilt."""
    state = {k: v for k, v in template.items()}
    has_optimizer = bool(groups)
    state["param_shapes"] = ([OrderedDict((p, s) for p, _, s in g.params) for g in groups]
                             if has_optimizer else None)
    state["shared_params"] = {} if has_optimizer else None
    state["optimizer"] = None
    state["lr_scheduler"] = scheduler_state(groups, source) if has_optimizer else None
    state["dp_world_size"], state["mp_world_size"] = dp, stages
    if "checkpoint_parallel_dimensions" in state:
        state["checkpoint_parallel_dimensions"] = {**state["checkpoint_parallel_dimensions"], "pp_degree": stages}
    state["ds_config"] = layout_ds_config(template.get("ds_config") or {}, training, dp)
    return state


def scheduler_state(groups: list[NewGroup], source: SourceOptimizer) -> dict | None:
    """The LR scheduler state of a new stage: per-group lists taken from an old group of the same kind."""
    if not source.schedulers:
        return None
    first_sched, _ = next(iter(source.schedulers.values()))
    n_old = len(first_sched.get("base_lrs", []))
    state = copy.deepcopy(first_sched)
    for key, value in first_sched.items():
        if isinstance(value, list) and len(value) == n_old:
            state[key] = [source.schedulers[g.signature][0][key][source.schedulers[g.signature][1]]
                          if g.signature in source.schedulers else value[0] for g in groups]
    return state


def layout_ds_config(ds_config: dict, t: TrainingConfig, dp: int) -> dict:
    ds = copy.deepcopy(ds_config)
    ds["train_micro_batch_size_per_gpu"] = t.micro_batch_size
    ds["gradient_accumulation_steps"] = t.gradient_accumulation_steps
    ds["train_batch_size"] = t.micro_batch_size * t.gradient_accumulation_steps * dp
    return ds


def optimizer_shard(groups: list[NewGroup], source: SourceOptimizer, rank: int, dp: int) -> dict:
    """The optimizer_state_dict of data-parallel rank ``rank`` of a new stage, as DeepSpeed saves it."""
    from deepspeed.utils.tensor_fragment import fragment_address

    template = source.optim_template
    state, param_groups, fp32_parts, paddings, mappings = {}, [], [], [], []
    for index, group in enumerate(groups):
        params = [source.params[rack] for _, rack, _ in group.params]
        flat_fp32 = torch.cat([p.fp32 for p in params])
        numel = flat_fp32.numel()
        size = -(-numel // (ALIGNMENT_FACTOR * dp)) * ALIGNMENT_FACTOR  # partition size after padding
        start = rank * size
        lean = max(0, min(size, numel - start))
        group_state = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in params[0].scalars.items()}
        for key in params[0].tensors:
            flat = torch.cat([p.tensors[key] for p in params])
            group_state[key] = _padded(flat[start:start + lean], size)
        state[index] = group_state
        param_groups.append({**group.hyper, "params": [index]})
        fp32 = flat_fp32[start:start + lean].clone()
        fp32_parts.append(_padded(fp32, size) if source.bf16_optimizer else fp32)
        paddings.append(size - lean)
        mappings.append(slice_mappings(group, start, size, fragment_address))
    shard = {k: v for k, v in template.items() if k not in (BASE, FP32, PADDINGS, ALIGN_PADDINGS)}
    shard[BASE] = {"state": state, "param_groups": param_groups}
    shard[FP32] = fp32_parts
    shard[PADDINGS] = paddings
    if ALIGN_PADDINGS in template:
        shard[ALIGN_PADDINGS] = [[0] * len(g.params) for g in groups]
    shard["partition_count"] = [dp] * len(groups)
    shard["param_slice_mappings"] = mappings
    return shard


def slice_mappings(group: NewGroup, start: int, size: int, fragment_address) -> "OrderedDict[str, Any]":
    """Where each parameter's fragment sits in this partition (DeepSpeed's ``param_slice_mappings``)."""
    mapping, offset = OrderedDict(), 0
    for pipe_param, _, shape in group.params:
        numel = int(torch.Size(shape).numel())
        lo, hi = max(offset, start), min(offset + numel, start + size)
        if lo < hi:
            mapping[pipe_param] = fragment_address(numel=hi - lo, start=lo - start)
        offset += numel
    return mapping


def _padded(tensor: torch.Tensor, size: int) -> torch.Tensor:
    out = torch.zeros(size, dtype=tensor.dtype)
    out[:tensor.numel()] = tensor
    return out


def _load(path: Path) -> dict:
    # DeepSpeed's engine/optimizer files pickle Python objects (loss scaler, fragment addresses).
    return torch.load(path, map_location="cpu", weights_only=False)
