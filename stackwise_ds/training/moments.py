"""Optimizer moments across phases (``training.optimizer_across_phases: carry``), as per-layer files."""

from __future__ import annotations

from pathlib import Path

import torch

from ..checkpoint import files as ckpt
from ..layout import TRAIN, LayerUnit
from ..parallel.optimizer_state import layer_moments, set_layer_moments
from .layer_files import local_layer_modules, renamed_state, verify_on_every_rank


def save_moments(engine, pipe, tag_dir: Path) -> None:
    """Collective: the phase end's per-layer moments, written by one rank per layer."""
    for layer, payload in layer_moments(engine, local_layer_modules(pipe)).items():
        torch.save(payload, tag_dir / ckpt.moments_file_name(layer))


def carry_moments(engine, pipe, tag_dir: Path, units: list[LayerUnit], trained: list, sources: dict[int, int],
                  tied: bool) -> None:
    """Start this phase's optimizer from the moments the previous phase's end wrote in ``tag_dir`` (the
    newest tag): each layer that trains takes those of the layer it starts as (``sources``), if that one
    trained (``trained``: the previous phase's role of every layer of ``units``). Continuing and resuming at
    a phase boundary both read the files, bit for bit alike. ``tied``: the tied weight (layer 0's file)
    trained through the previous phase's head."""
    modules = local_layer_modules(pipe)
    files = {}
    for layer, module in modules.items():
        source = sources.get(layer, layer)
        if any(p.requires_grad for p in module.parameters()) and (trained[source] == TRAIN or
                                                                   (source == 0 and tied)):
            files[layer] = tag_dir / ckpt.moments_file_name(source)
    verify_on_every_rank(sorted(set(files.values())), tag_dir)
    payloads = {layer: torch.load(path, map_location="cpu", weights_only=True) for layer, path in files.items()}
    for layer in payloads:  # an untied head's moments start as the tied matrix's, named as the embedding's
        moments = payloads[layer]["moments"]
        payloads[layer]["moments"] = renamed_state(moments, units[sources.get(layer, layer)], units[layer])
    set_layer_moments(engine, modules, payloads)
