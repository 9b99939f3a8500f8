"""Optimizer moments across phases (``training.optimizer_across_phases: carry``), as per-layer files."""

from __future__ import annotations

from pathlib import Path

import torch

from ..checkpoint import files as ckpt
from ..layout import TRAIN, LayerUnit
from ..parallel.optimizer_state import layer_moments, set_layer_moments
from .growth import zeroed_residual_writers
from .layer_files import local_layer_modules, renamed_state, verify_on_every_rank


def save_moments(engine, pipe, tag_dir: Path) -> None:
    """Collective: the phase end's per-layer moments, written by one rank per layer."""
    for layer, payload in layer_moments(engine, local_layer_modules(pipe)).items():
        torch.save(payload, tag_dir / ckpt.moments_file_name(layer))


def carry_moments(engine, pipe, tag_dir: Path, units: list[LayerUnit], trained: list, sources: dict[int, int],
                  tied: bool, zeroed: frozenset[int] = frozenset()) -> None:
    """Start this phase's optimizer from the moments the previous phase's end wrote in ``tag_dir`` (the
    newest tag): each layer that trains takes those of the layer it starts as (``sources``), if that one
    trained (``trained``: the previous phase's role of every layer of ``units``). Continuing and resuming at
    a phase boundary both read the files, bit for bit alike. ``tied``: the tied weight (layer 0's file)
    trained through the previous phase's head. The layers ``zeroed`` (growth_init 'identity') start their
    zeroed residual writers with zero moments."""
    modules = local_layer_modules(pipe)
    files = {}
    for layer, module in modules.items():
        source = sources.get(layer, layer)
        if any(p.requires_grad for p in module.parameters()) and (trained[source] == TRAIN or
                                                                   (source == 0 and tied)):
            files[layer] = tag_dir / ckpt.moments_file_name(source)
    verify_on_every_rank(sorted(set(files.values())), tag_dir)
    set_layer_moments(engine, modules, carried_payloads(files, units, sources, zeroed))


def carried_payloads(files: dict[int, Path], units: list[LayerUnit], sources: dict[int, int],
                     zeroed: frozenset[int] = frozenset()) -> dict[int, dict]:
    """Layer -> the moments it starts with, read from its source's file (``files``): an untied head's are the
    tied matrix's, named as the embedding's; a layer of ``zeroed`` has zero moments for its residual writers."""
    payloads = {layer: torch.load(path, map_location="cpu", weights_only=True) for layer, path in files.items()}
    for layer, payload in payloads.items():
        moments = renamed_state(payload["moments"], units[sources.get(layer, layer)], units[layer])
        payload["moments"] = zeroed_residual_writers(moments) if layer in zeroed else moments
    return payloads
