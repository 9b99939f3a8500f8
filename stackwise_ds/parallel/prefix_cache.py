"""The frozen prefix of the first stage, read from a store of activations instead of run (the stack cache).

``install_prefix_cache`` replaces the ``forward_funcs`` entries of pipeline layers ``0 .. boundary`` (all
frozen, all on this stage) with one ``CachedPrefix`` (at layer 0) and pass-throughs (the rest). Its input
is ``(input_ids [B, T], window_ids [B])`` from a stream ``with_window_ids``: rows whose window the store
holds are read, the others run through the prefix's own frozen gates (its bf16/int8 compute included)
and are written. Plain ``input_ids`` (validation) always run the prefix. The output is what layer
``boundary`` would hand on, hidden [B, T, D], so nothing after it, nor the pipeline's messages, changes.

The store is any object with ``get(ids, out) -> (hit mask, rows in its storage dtype)``, ``put(ids, rows)``,
``dtype`` and ``corrupt`` (``training.activation_store.ActivationStore``). Rows read go through a reusable host
buffer (``HostStaging``), pinned on CUDA so that the copy to the device is asynchronous, and are converted to the
stage's dtype on the device; missed rows are computed there, stored (one copy to the host) and handed on as they
are. Every entry stays a ``RoleGate`` over its own layer, so per-layer checkpoint files and the next phase's
``apply_layer_roles`` see the layers.
"""

from __future__ import annotations

import numpy as np
import torch

from ..layout import FROZEN
from .pipe import local_start
from .roles import RoleGate, unwrap


class HostStaging:
    """A reusable host buffer for the rows read from a store, on the way to ``device``.

    On CUDA it is pinned, so the copy to the device runs asynchronously (``non_blocking``) straight from it; the
    next read into it first waits for that copy to have left. On CPU the rows are already where they go."""

    def __init__(self, device: torch.device):
        self.device = device
        self.pinned = device.type == "cuda"
        self.buffer: torch.Tensor | None = None
        self.copied = None  # CUDA event: the last copy out of the buffer is done

    def rows(self, n: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A host tensor [>= n, *shape] of ``dtype`` to read into (its former rows are no longer needed)."""
        if self.copied is not None:
            self.copied.synchronize()
        buffer = self.buffer
        if buffer is None or buffer.shape[0] < n or tuple(buffer.shape[1:]) != shape or buffer.dtype != dtype:
            self.buffer = torch.empty((n, *shape), dtype=dtype, pin_memory=self.pinned)
        return self.buffer

    def to_device(self, rows: torch.Tensor) -> torch.Tensor:
        if not self.pinned:
            return rows
        moved = rows.to(self.device, non_blocking=True)
        self.copied = torch.cuda.Event()
        self.copied.record()
        return moved


class CachedPrefix(RoleGate):
    """Layer 0's entry: the prefix's output [B, T, D] for a micro-batch, from the store where it can."""

    def __init__(self, gates: list[RoleGate], store, d_model: int):
        super().__init__(unwrap(gates[0]), FROZEN)
        self.gates = gates  # the frozen gates of layers 0 .. boundary, in order
        self.store = store
        self.d_model = d_model
        self.read = self.computed = 0  # windows served from the store / run through the prefix
        self.staging: HostStaging | None = None

    def __call__(self, inputs):
        if torch.is_tensor(inputs):
            return self.run_prefix(inputs)
        tokens, window_ids = inputs
        ids = window_ids.cpu().numpy()
        device, dtype = tokens.device, self.activation_dtype
        if self.staging is None:
            self.staging = HostStaging(device)
        shape = (tokens.shape[1], self.d_model)
        hit, cached = self.store.get(ids, out=self.staging.rows(len(ids), shape, self.store.dtype))
        out = torch.empty((len(ids), *shape), device=device, dtype=dtype)
        if hit.any():  # converted on the device, from the storage dtype
            out.index_copy_(0, _positions(hit, device), self.staging.to_device(cached).to(dtype))
        if not hit.all():
            missed = _positions(~hit, device)
            fresh = self.run_prefix(tokens.index_select(0, missed))
            self.store.put(ids[~hit], fresh)
            out.index_copy_(0, missed, fresh.to(dtype))
        self.read += int(hit.sum())
        self.computed += int((~hit).sum())
        return out

    def run_prefix(self, hidden):
        with torch.no_grad():
            for gate in self.gates:
                hidden = gate(hidden)
        return hidden

    @property
    def activation_dtype(self) -> torch.dtype:
        return next(self.layer.parameters()).dtype  # the stage's dtype: fp32, or bf16 on GPU runs


def _positions(mask: np.ndarray, device: torch.device) -> torch.Tensor:
    """The indices where ``mask`` holds, as a tensor on ``device`` (for index_copy_ / index_select)."""
    return torch.from_numpy(np.flatnonzero(mask)).to(device)


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
