"""Per-layer checkpoint files as the hand-over between phase layouts.

A pipeline placed anew (the first phase of a process, or an elastic phase) fills its local layers
from the per-layer files of the newest checkpoint: ``layer_XX-model_states.pt`` means the same
layer in every layout, so a rank reads exactly the layers it now holds, wherever they lived
before. Continuing into a phase and resuming at its start are one code path, bit for bit.
Layers an elastic phase does not place (dormant units) still get their files at every save,
written from their initial weights, so every tag holds the whole Rack for the checkpoint tools.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from ..checkpoint import files as ckpt
from ..layout import LayerUnit
from ..model import Rack, build_block
from ..parallel import distributed
from ..parallel.pipe import local_start
from ..parallel.roles import unwrap


def layer_path(tag_dir: Path, layer: int) -> Path:
    return tag_dir / ckpt.layer_file_name(layer)


def local_layer_modules(pipe) -> dict[int, torch.nn.Module]:
    """Pipeline-layer index -> module for this stage's layers that own a file; a tied embedding held
    only through the LM head counts as layer 0 (its file), so no broadcast is needed after loading."""
    layers = [unwrap(entry) for entry in pipe.forward_funcs]  # a phase's engine gates frozen/dormant layers
    modules = {local_start(pipe) + offset: layer for offset, layer in enumerate(layers)
               if isinstance(layer, torch.nn.Module)}
    for module in pipe.tied_modules.values():
        if module not in modules.values():
            modules[0] = module
    return modules


def load_layers(pipe, tag_dir: Path, sources: dict[int, int] | None = None) -> None:
    """Fill this rank's layers from ``tag_dir``; ``sources`` maps a layer to the layer whose file it
    takes instead of its own (a growth operator's copy). Collective: a bad file fails every rank alike."""
    sources = sources or {}
    modules = local_layer_modules(pipe)
    files = {layer: layer_path(tag_dir, sources.get(layer, layer)) for layer in modules}
    verify_on_every_rank(sorted(set(files.values())), tag_dir)
    with torch.no_grad():
        for layer, module in modules.items():
            device = next(module.parameters()).device
            state = torch.load(files[layer], map_location=device, weights_only=True)
            module.load_state_dict(renamed_state(state, pipe.units[sources.get(layer, layer)], pipe.units[layer]))


def renamed_state(state: dict, source: LayerUnit, target: LayerUnit) -> dict:
    """A layer file's (or its moments') keys for a module of another kind: the embedding's matrix
    (``embedding.weight``) as an untied LM head's (``lm_head.weight``). Blocks copy blocks under the same keys."""
    if source.kind == target.kind:
        return state
    return {target.rack_prefix + key[len(source.rack_prefix):]: value for key, value in state.items()}


def verify_on_every_rank(files: list[Path], tag_dir: Path) -> None:
    """Collective: check the files this rank is about to load and fail on every rank alike, naming
    each rank's problems, before any rank starts loading (a rank failing half-way through a load
    would leave its peers waiting in a collective)."""
    problems = distributed.all_gather_objects(ckpt.unreadable_files(files))
    failed = [f"rank {rank}: {', '.join(texts)}" for rank, texts in enumerate(problems) if texts]
    if failed:
        raise ckpt.CheckpointError(
            f"checkpoint {tag_dir} cannot be loaded ({'; '.join(failed)[:800]}): it is corrupt or incomplete; "
            "delete that folder to resume from an earlier checkpoint, or use a new training.output_dir")


def save_unplaced_layers(tag_dir: Path, unplaced: list[int], units, rack: Rack | None, model, seed: int,
                         rank: int, world_size: int, source_dir: Path | None = None) -> None:
    """Write the files of the blocks a phase does not place, spread over the ranks.

    They hold the weights the unit starts its own phase from: the file of ``source_dir`` (the newest
    checkpoint, or the initial weights of ``training.init_from``: a layer not placed yet has never
    changed), else the given Rack's when this rank has them materialized, else the seeded
    initialisation (bit-identical to a full build)."""
    for layer in unplaced[rank::world_size]:
        if source_dir is not None:
            copy_layer_file(source_dir, tag_dir, layer)
            continue
        unit = units[layer]
        block = rack.stacks[unit.stack_id].blocks[unit.block_id] if rack is not None else None
        if block is None or any(p.is_meta for p in block.parameters()):
            block = build_block(model, unit.stack_id, unit.block_id, seed)
        tag_dir.mkdir(parents=True, exist_ok=True)
        torch.save({k: v.detach().clone().cpu() for k, v in block.state_dict().items()}, layer_path(tag_dir, layer))


def copy_layer_file(source_dir: Path, tag_dir: Path, layer: int) -> None:
    """Copy one layer file (a no-op when a tag is re-saved over itself)."""
    src, dst = layer_path(source_dir, layer), layer_path(tag_dir, layer)
    if src.resolve() == dst.resolve():
        return
    tag_dir.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)
