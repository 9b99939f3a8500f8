"""The frozen prefix of the first stage, read from a store of activations instead of run (the stack cache).

``install_prefix_cache`` replaces the ``forward_funcs`` entries of pipeline layers ``0 .. boundary`` (all
frozen, all on this stage) with one ``CachedPrefix`` (at layer 0) and pass-throughs (the rest). Its input
is ``(input_ids [B, T], window_ids [B])`` from a stream ``with_window_ids``: rows whose window the store
holds are read, the others run through the prefix's own frozen gates (its bf16/int8 compute included)
and are written. Plain ``input_ids`` (validation) always run the prefix. The output is what layer
``boundary`` would hand on, hidden [B, T, D], so nothing after it, nor the pipeline's messages, changes.

The store is any object with ``get(ids) -> (hit mask, float32 rows)``, ``put(ids, rows)`` and
``round_trip(rows)`` (``training.activation_store.ActivationStore``). Every entry stays a ``RoleGate`` over
its own layer, so per-layer checkpoint files and the next phase's ``apply_layer_roles`` see the layers.
"""

from __future__ import annotations

import numpy as np
import torch

from ..layout import FROZEN
from .pipe import local_start
from .roles import RoleGate, unwrap


class CachedPrefix(RoleGate):
    """Layer 0's entry: the prefix's output [B, T, D] for a micro-batch, from the store where it can."""

    def __init__(self, gates: list[RoleGate], store, d_model: int):
        super().__init__(unwrap(gates[0]), FROZEN)
        self.gates = gates  # the frozen gates of layers 0 .. boundary, in order
        self.store = store
        self.d_model = d_model
        self.read = self.computed = 0  # windows served from the store / run through the prefix

    def __call__(self, inputs):
        if torch.is_tensor(inputs):
            return self.run_prefix(inputs)
        tokens, window_ids = inputs
        ids = window_ids.cpu().numpy()
        hit, cached = self.store.get(ids)  # float32 on the CPU
        rows = torch.empty((len(ids), *tokens.shape[1:], self.d_model))
        if hit.any():
            rows[torch.from_numpy(hit)] = cached
        if not hit.all():
            miss = ~hit
            fresh = self.run_prefix(tokens[torch.from_numpy(miss).to(tokens.device)])
            self.store.put(ids[miss], fresh)
            rows[torch.from_numpy(miss)] = self.store.round_trip(fresh)  # as a later read returns it
        self.read += int(hit.sum())
        self.computed += int((~hit).sum())
        return rows.to(tokens.device, self.activation_dtype)

    def run_prefix(self, hidden):
        with torch.no_grad():
            for gate in self.gates:
                hidden = gate(hidden)
        return hidden

    @property
    def activation_dtype(self) -> torch.dtype:
        return next(self.layer.parameters()).dtype  # the stage's dtype: fp32, or bf16 on GPU runs


class PassThrough(RoleGate):
    """Layers 1 .. boundary's entries while cached: ``CachedPrefix`` ran them already."""

    def __init__(self, gate: RoleGate):
        super().__init__(unwrap(gate), FROZEN)

    def __call__(self, inputs):
        return inputs


def install_prefix_cache(module, boundary: int, store, d_model: int) -> CachedPrefix:
    """Serve layers 0 .. ``boundary`` of ``module`` (this rank's stage, which must start at layer 0 and hold
    them, each gated frozen by ``apply_layer_roles``) from ``store``."""
    gates = module.forward_funcs[:boundary + 1]
    if local_start(module) != 0 or len(gates) != boundary + 1 or not all(
            isinstance(g, RoleGate) and g.role == FROZEN for g in gates):
        raise ValueError(f"the stack cache needs pipeline layers 0..{boundary} frozen on this stage")
    cached = CachedPrefix(list(gates), store, d_model)
    module.forward_funcs[0] = cached
    for offset in range(1, boundary + 1):
        module.forward_funcs[offset] = PassThrough(gates[offset])
    return cached


def advance_store(module, old_boundary: int, new_boundary: int, old_store, new_store, ids: np.ndarray,
                  chunk: int) -> int:
    """Run layers ``old_boundary + 1 .. new_boundary`` (frozen, on this stage) once over the windows ``ids`` of
    ``old_store`` and keep their outputs in ``new_store``; returns the windows advanced."""
    gates = module.forward_funcs[old_boundary + 1:new_boundary + 1]
    weight = next(unwrap(module.forward_funcs[0]).parameters())  # where and in what the stage computes
    device, dtype = weight.device, weight.dtype
    done = 0
    with torch.no_grad():
        for start in range(0, len(ids), chunk):
            hit, hidden = old_store.get(ids[start:start + chunk])
            if not hit.any():
                continue
            hidden = hidden.to(device, dtype)
            for gate in gates:
                hidden = gate(hidden)
            new_store.put(ids[start:start + chunk][hit], hidden)
            done += int(hit.sum())
    return done
