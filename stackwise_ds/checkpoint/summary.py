"""A readable summary of a checkpoint: tags, progress, the rack's units and what trained when."""

from __future__ import annotations

from pathlib import Path

from ..config import ModelConfig, StackWiseConfig
from ..layout import TRAIN, LayerUnit, UnitKind
from ..phases import Phase, plan_phases
from ..placement import PhaseLayout
from .files import STATE_FILE, unreadable_files
from .layers import file_layers, rack_shapes, stage_layers, units_of
from .locate import CheckpointRef, list_tags, read_latest, resolve_checkpoint, source_frozen_stacks, split_path


def describe(path: str | Path, tag: str | None = None) -> str:
    """The summary of tag ``tag`` (default: newest complete) of the checkpoint at ``path``, as text."""
    ref = resolve_checkpoint(path, tag)
    config, checkpoint_dir = ref.config, split_path(path)[0]
    phases = plan_phases(config, tuple(source_frozen_stacks(checkpoint_dir.parent, config.training.freeze_source)))
    sections = [tags_section(checkpoint_dir, ref), run_section(ref, config, phases),
                model_section(config.model), units_section(ref, config, phases)]
    return "\n\n".join(sections)


def tags_section(checkpoint_dir: Path, ref: CheckpointRef) -> str:
    latest = read_latest(checkpoint_dir)
    lines = [f"checkpoint {checkpoint_dir}  (showing tag {ref.tag})", "tags:"]
    for tag, complete in list_tags(checkpoint_dir):
        notes = ["complete" if complete else f"INCOMPLETE: no {STATE_FILE} (interrupted save, never resumed from)"]
        if tag == latest:
            notes.append("latest")
        lines.append(f"  {tag:<20} {', '.join(notes)}")
    return "\n".join(lines)


def run_section(ref: CheckpointRef, config: StackWiseConfig, phases: list[Phase]) -> str:
    state = ref.state
    t = config.training
    lines = [f"training: {state.training_architecture} ({t.objective}), {len(phases)} phase(s), "
             f"zero stage {config.parallel.zero_stage}, phase layout {config.parallel.phase_layout}",
             f"progress: {progress_line(state.phase_index, state.phase_step, phases)}",
             f"step {state.global_step}, consumed samples {state.consumed_samples}"]
    if state.layout:  # stages x data-parallel as the phase that saved it ran (the world size is not in the config)
        lines.append(f"saved with layout {PhaseLayout.from_dict(state.layout).describe()}")
    else:
        lines.append(f"parallel.pipeline_stages {config.parallel.pipeline_stages or 'unset'}")
    for record in state.finished_phases:
        index = record.get("index")
        label = f"{index + 1}/{len(phases)}" if isinstance(index, int) else "?"
        lines.append(f"  finished phase {label} {record.get('name')}: steps "
                     f"{record.get('start_global_step')}..{record.get('end_global_step')}, val loss "
                     f"{_fmt(record.get('val_loss_before'))} -> {_fmt(record.get('val_loss_after'))}")
        if record.get("layout"):
            lines.append(f"    layout {PhaseLayout.from_dict(record['layout']).describe()}")
    return "\n".join(lines)


def progress_line(phase_index: int, phase_step: int, phases: list[Phase]) -> str:
    """Where the run stands, its phases numbered as the training log numbers them ('phase 2/4 stack 2/4')."""
    if phase_index >= len(phases):
        return "all phases finished"
    phase = phases[phase_index]
    label = f"phase {phase_index + 1}/{len(phases)} {phase.name}"
    if phase_step == 0:
        return f"{label} not started yet"
    return f"in {label}, step {phase_step}/{phase.steps}"


def model_section(m: ModelConfig) -> str:
    kv = m.n_kv_heads or m.n_heads
    total = sum(s.numel() for s in rack_shapes(m).values())
    return (f"model: d_model {m.d_model}, heads {m.n_heads} (kv {kv}), attention {m.attention_type} "
            f"{m.attention_mode}, d_ff {m.resolved_d_ff}, vocab {m.vocab_size}, max_seq_len {m.max_seq_len}, "
            f"{'tied' if m.tie_embeddings else 'untied'} embeddings{', frozen up-proj' if m.freeze_up_proj else ''}\n"
            f"rack: {m.architecture.n_stacks} stacks x {m.architecture.blocks_per_stack} blocks, "
            f"{total:,} parameters")


def units_section(ref: CheckpointRef, config: StackWiseConfig, phases: list[Phase]) -> str:
    units, shapes = units_of(config.model), rack_shapes(config.model)
    stage_of = {layer: str(s) for s, layers in enumerate(stage_layers(config.model, config.pipeline_stages))
                for layer in layers}
    if ref.state.layout:  # the placement of the phase that saved this tag ('-': not placed, dormant)
        saved = PhaseLayout.from_dict(ref.state.layout)
        stage_of = {layer: str(saved.stage_of(layer)) if layer in saved.live else "-" for layer in stage_of}
    status = {layer: _file_status(ref.layer_file(layer)) for layer in file_layers(config.model)}
    done = {r.get("index") for r in ref.state.finished_phases}
    current = ref.state.phase_index if ref.state.phase_step > 0 else None
    rows = [("layer", "unit", "params", "stage", "file", "trained in phases (* = in progress)")]
    for layer, unit in enumerate(units):
        count = sum(s.numel() for n, s in shapes.items() if n.startswith(unit.rack_prefix))
        tied_head = unit.kind == UnitKind.HEAD and config.model.tie_embeddings
        trained = [f"{p.index + 1}" + ("*" if p.index == current else "") for p in phases
                   if unit_trains(unit, p) and (p.index in done or p.index == current)]
        rows.append((str(layer), unit_label(unit), "(tied)" if tied_head else f"{count:,}",
                     stage_of[layer], "-" if tied_head else status.get(layer, "MISSING"),
                     ", ".join(trained) or "none yet"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    if config.model.tie_embeddings:
        lines.append("(a tied embedding also learns through the LM head in every phase)")
    return "\n".join(lines)


def _file_status(path: Path) -> str:
    """'ok', 'MISSING' or 'CORRUPT' (every zip CRC checked: a truncated file is not 'ok')."""
    if not path.is_file():
        return "MISSING"
    return "CORRUPT" if unreadable_files([path]) else "ok"


def unit_trains(unit: LayerUnit, phase: Phase) -> bool:
    return phase.unit_role(unit) == TRAIN


def unit_label(unit: LayerUnit) -> str:
    if unit.kind == UnitKind.BLOCK:
        return f"stack {unit.stack_id} block {unit.block_id}"
    return {UnitKind.EMBEDDING: "embedding", UnitKind.NORM: "final norm", UnitKind.HEAD: "lm_head"}[unit.kind]


def _fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else "n/a"
