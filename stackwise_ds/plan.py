"""``stackwise-plan``: what a run would do on N ranks, printed before it is launched.

    stackwise-plan [--config RUN.yaml] [--set key=value ...] --world-size N [--json]

The config is built as ``launch/train.py`` builds it; then, as the launch does before it trains: the pipeline
depth is fixed for the world size (``validate_world_size``), the checkpoint it would resume from is found and
checked against the config (``training.resume``), and every remaining phase is placed by the trainer's own
planner (``placement.plan_phase_layouts``). So it refuses what the launch would refuse at that point, with the
same message. Per phase it prints the layout (stages x data-parallel, micro-batches, the live layers and their
roles), the estimated memory per rank against ``parallel.max_rank_memory_mb``, the predicted step cost relative
to a rackwise step, and the steps, tokens and training FLOPs; then the totals. No DeepSpeed import, no engine,
no data read (the data's own checks, e.g. a split too small for a global batch, come at launch).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path
from typing import Any

from .config import StackWiseConfig
from .enums import Precision
from .layout import TRAIN, LayerUnit, UnitKind, layer_units
from .phases import Phase, plan_phases
from .placement import PhaseLayout, plan_phase_layouts, step_training_flops


def build_plan(config: StackWiseConfig, world_size: int, bf16: bool) -> dict[str, Any]:
    """The plan of a launch of ``config`` on ``world_size`` ranks, as one JSON-ready dict (``phases``: one entry
    per phase still to run). Raises what the launch raises for a config, world size or checkpoint it refuses."""
    from .checkpoint.files import check_resumable_changes
    from .training.init_weights import planned_source_stacks
    from .training.resume import check_resumed_layout, find_resume_point

    config.validate_world_size(world_size)
    checkpoint_dir = Path(config.training.output_dir) / "checkpoints"
    start = find_resume_point(checkpoint_dir, config.training, config.to_dict(), rank=0)
    phases = plan_phases(config, tuple(planned_source_stacks(config)))
    remaining = phases[start.state.phase_index:]
    units = layer_units(config.model.architecture.n_stacks, config.model.architecture.blocks_per_stack)
    layouts = plan_phase_layouts(remaining, units, config, world_size, bf16)
    if start.saved_config is not None and remaining:
        check_resumable_changes(start.saved_config, config.to_dict(), checkpoint_dir / start.tag)
    if start.tag is not None and start.state.phase_step and remaining:
        check_resumed_layout(layouts[0], start.state, checkpoint_dir / start.tag, world_size)
    done_steps = [start.state.phase_step] + [0] * (len(remaining) - 1)
    entries = [_phase_entry(phase, layout, units, config, world_size, bf16, len(phases), done)
               for phase, layout, done in zip(remaining, layouts, done_steps, strict=True)]
    return {"world_size": world_size, "precision": "bf16" if bf16 else "fp32",
            "precision_setting": str(config.training.precision),
            "training_architecture": str(config.training.training_architecture),
            "global_batch": entries[0]["global_batch"] if entries else None, "seq_len": config.data.seq_len,
            "max_rank_memory_mb": config.parallel.max_rank_memory_mb,
            "resume": _resume_entry(start, checkpoint_dir, phases), "phases": entries,
            "totals": _totals(entries, config, world_size, bf16, units)}


def _phase_entry(phase: Phase, layout: PhaseLayout, units: list[LayerUnit], config: StackWiseConfig,
                 world_size: int, bf16: bool, n_phases: int, done: int) -> dict[str, Any]:
    roles = phase.layer_roles(units)
    global_batch = config.training.micro_batch_size * layout.gradient_accumulation_steps * layout.data_parallel
    steps = max(phase.steps - done, 0)
    step_flops = step_training_flops(roles, config, world_size, bf16)
    return {"index": phase.index + 1, "label": f"phase {phase.index + 1}/{n_phases} {phase.name}",
            "name": phase.name, "kind": str(phase.kind), "steps": steps, "steps_done_before": done,
            "layout": {"kind": str(layout.kind), "pipeline_stages": layout.pipeline_stages,
                       "data_parallel": layout.data_parallel, "micro_batches": layout.gradient_accumulation_steps},
            "stages": [{"stage": s, "layers": layout.stage_layers(s), "memory_mb": layout.stage_memory_mb[s]}
                       for s in range(layout.pipeline_stages)],
            "layers": [{"layer": i, "unit": unit_label(units[i]), "role": str(roles[i]), "stage": layout.stage_of(i)}
                       for i in layout.live],
            "memory_per_rank_mb": max(layout.stage_memory_mb),
            "predicted_step_vs_rackwise": layout.predicted_vs_rackwise, "global_batch": global_batch,
            "tokens": steps * global_batch * config.data.seq_len, "training_flops": steps * step_flops}


def _totals(entries: list[dict], config: StackWiseConfig, world_size: int, bf16: bool,
            units: list[LayerUnit]) -> dict[str, Any]:
    """The remaining phases together, and against a rackwise run of the same steps (its step is 1.0 by
    definition; its FLOPs every layer trained)."""
    steps = sum(e["steps"] for e in entries)
    flops = sum(e["training_flops"] for e in entries)
    rackwise_flops = steps * step_training_flops([TRAIN] * len(units), config, world_size, bf16)
    weighted = sum(e["steps"] * e["predicted_step_vs_rackwise"] for e in entries)
    return {"steps": steps, "tokens": sum(e["tokens"] for e in entries), "training_flops": flops,
            "predicted_time_vs_rackwise": weighted / steps if steps else None,
            "training_flops_vs_rackwise": flops / rackwise_flops if rackwise_flops else None}


def _resume_entry(start, checkpoint_dir: Path, phases: list[Phase]) -> dict[str, Any] | None:
    if start.tag is None:
        return None
    return {"checkpoint": str(checkpoint_dir / start.tag), "phase_index": start.state.phase_index + 1,
            "phase_step": start.state.phase_step, "global_step": start.state.global_step,
            "finished": start.state.phase_index >= len(phases)}


# ----------------------------------------------------------------------------- text

def unit_label(unit: LayerUnit) -> str:
    """A pipeline layer as part of the Rack; stacks and blocks numbered from 1, as phase names number them."""
    if unit.kind == UnitKind.BLOCK:
        return f"stack {unit.stack_id + 1} block {unit.block_id + 1}"
    return {UnitKind.EMBEDDING: "embedding", UnitKind.NORM: "norm", UnitKind.HEAD: "head"}[unit.kind]


def describe_layers(layers: list[dict], blocks_per_stack: int) -> str:
    """One stage's layers grouped by role, e.g. 'embedding, stacks 1-2 frozen; stack 3, norm, head train'."""
    groups: list[tuple[str, list[dict]]] = []
    for layer in layers:
        if groups and groups[-1][0] == layer["role"]:
            groups[-1][1].append(layer)
        else:
            groups.append((layer["role"], [layer]))
    return "; ".join(f"{', '.join(_spans(group, blocks_per_stack))} {role}" for role, group in groups)


def _spans(layers: list[dict], blocks_per_stack: int) -> list[str]:
    """Consecutive layers as Rack parts: whole stacks as 'stack 2' / 'stacks 1-3', a part of one as its blocks."""
    spans: list[str] = []
    blocks = [layer["layer"] for layer in layers if layer["unit"].startswith("stack ")]
    if layers[0]["unit"] == "embedding":
        spans.append("embedding")
    spans += _block_spans(blocks, blocks_per_stack)
    spans += [layer["unit"] for layer in layers if layer["unit"] in ("norm", "head")]
    return spans


def _block_spans(blocks: list[int], per_stack: int) -> list[str]:
    """Pipeline layers of blocks (1 + stack * per_stack + block) as 'stacks 1-2', 'stack 3 blocks 1-2'."""
    by_stack: dict[int, list[int]] = {}
    for layer in blocks:
        stack, block = divmod(layer - 1, per_stack)
        by_stack.setdefault(stack + 1, []).append(block + 1)
    whole = [s for s, held in by_stack.items() if len(held) == per_stack]
    spans = [f"stacks {whole[0]}-{whole[-1]}" if len(whole) > 1 else f"stack {whole[0]}"] if whole else []
    for stack, held in by_stack.items():
        if stack not in whole:
            spans.append(f"stack {stack} block{'s' if len(held) > 1 else ''} "
                         f"{held[0]}{f'-{held[-1]}' if len(held) > 1 else ''}")
    return spans


def render(plan: dict[str, Any], blocks_per_stack: int) -> str:
    """The plan as text: a header, one paragraph per phase, the totals."""
    lines = [_header(plan)]
    bound = plan["max_rank_memory_mb"]
    for entry in plan["phases"]:
        layout = entry["layout"]
        lines += ["", f"{entry['label']}: {entry['steps']:,} steps" + _done(entry) + f", {entry['tokens']:,} tokens, "
                  f"{entry['training_flops']:.3g} training FLOPs",
                  f"  layout {layout['kind']}: {layout['pipeline_stages']} stage(s) x {layout['data_parallel']} "
                  f"data-parallel, {layout['micro_batches']} micro-batch(es) a step on each replica"]
        for stage in entry["stages"]:
            held = [layer for layer in entry["layers"] if layer["stage"] == stage["stage"]]
            lines.append(f"  stage {stage['stage']} ({stage['memory_mb']:.1f} MB a rank): "
                         f"{describe_layers(held, blocks_per_stack)}")
        limit = f"parallel.max_rank_memory_mb {bound:g}" if bound is not None else "no parallel.max_rank_memory_mb"
        lines.append(f"  memory per rank: {entry['memory_per_rank_mb']:.1f} MB at most ({limit})")
        lines.append(f"  predicted step: {entry['predicted_step_vs_rackwise']:.2f}x a rackwise step")
    lines += ["", _totals_line(plan["totals"])]
    return "\n".join(lines)


def _header(plan: dict[str, Any]) -> str:
    auto = " (training.precision 'auto' on this machine)" if plan["precision_setting"] == "auto" else ""
    line = (f"stackwise-plan: {plan['training_architecture']} on {plan['world_size']} rank(s), {plan['precision']}"
            f"{auto}, {len(plan['phases'])} phase(s) to run; a step is {plan['global_batch'] or 0:,} sequences of "
            f"{plan['seq_len']} tokens")
    resume = plan["resume"]
    if resume is not None:
        where = ("the run is finished: nothing to train" if resume["finished"] else
                 f"it resumes at phase {resume['phase_index']}, step {resume['phase_step']}")
        line += f"\n{resume['checkpoint']} exists: {where}"
    return line


def _done(entry: dict[str, Any]) -> str:
    return f" (after the {entry['steps_done_before']} it ran before the resume)" if entry["steps_done_before"] else ""


def _totals_line(totals: dict[str, Any]) -> str:
    if not totals["steps"]:
        return "totals: no steps to train"
    return (f"totals: {totals['steps']:,} steps, {totals['tokens']:,} tokens, {totals['training_flops']:.3g} training "
            f"FLOPs ({totals['training_flops_vs_rackwise']:.2f}x a rackwise run's); predicted time "
            f"{totals['predicted_time_vs_rackwise']:.2f}x a rackwise run of the same {totals['steps']:,} steps "
            "(start-up and phase changes not included)")


# ----------------------------------------------------------------------------- command line

def main(argv: list[str] | None = None) -> int:
    from .checkpoint.cli import USER_ERRORS
    from .parallel.ds_config import resolve_precision
    from .training.run import add_config_arguments, load_config

    parser = argparse.ArgumentParser(prog="stackwise-plan", description=__doc__.split("\n\n")[0].strip("`"))
    add_config_arguments(parser)
    parser.add_argument("--world-size", type=int, required=True, help="ranks the run would be launched on")
    parser.add_argument("--json", action="store_true", help="print the plan as one JSON object")
    args = parser.parse_args(argv)
    try:
        if args.world_size < 1:
            raise ValueError(f"--world-size must be at least 1, got {args.world_size}")
        config = load_config(args)
        with contextlib.redirect_stdout(sys.stderr):  # a note the resume check prints stays out of the plan
            plan = build_plan(config, args.world_size, resolve_precision(config.training.precision) == Precision.BF16)
    except USER_ERRORS as exc:
        print(f"stackwise-plan: error: {exc}", file=sys.stderr, flush=True)
        return 2
    blocks = config.model.architecture.blocks_per_stack
    print(json.dumps(plan, indent=1) if args.json else render(plan, blocks), flush=True)
    return 0
