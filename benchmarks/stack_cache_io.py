#!/usr/bin/env python
"""The stack cache's own cost per window on this machine: serving a micro-batch from the store, and a miss.

    python -m benchmarks.stack_cache_io --label before   # ~20 s; merges into results/stack_cache_io.json

A store of ``WINDOWS`` windows of [T, D] activations (the ~124M rack's geometry, T 1024, D 768) in a temporary
folder (its file in the page cache, as on a node whose RAM holds it), served through the cache's own gate
(``install_prefix_cache``) in front of a prefix that costs nothing (a lookup), so that only the cache's work is
timed: ``hit_ms_per_window`` (read, checksum, hand to the stage in fp32), ``miss_ms_per_window`` (write and
hand back), per storage dtype. One process, one thread; on a GPU the same path adds the host-to-device copy.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from benchmarks.common import RESULTS_DIR, write_labelled

T, D, WINDOWS, BATCH, REPEATS = 1024, 768, 64, 8, 5


class Lookup(nn.Module):
    """A prefix that costs (almost) nothing: token ids [B, T] -> [B, T, D] by a table lookup."""

    def __init__(self):
        super().__init__()
        self.table = nn.Parameter(torch.randn(256, D))

    def forward(self, tokens):
        return self.table[tokens % 256]


class Stage:
    def __init__(self, layer):
        from stackwise_ds.parallel.roles import FROZEN, RoleGate

        self.forward_funcs = [RoleGate(layer, FROZEN), RoleGate(nn.Identity(), FROZEN)]
        self._local_start = 0


def time_gate(dtype: str, folder: Path) -> dict:
    from stackwise_ds.enums import CacheDtype
    from stackwise_ds.parallel.prefix_cache import install_prefix_cache
    from stackwise_ds.training.activation_store import ActivationStore, StoreMeta, create_store

    meta = StoreMeta("bench", 1, WINDOWS, WINDOWS, T, D, CacheDtype(dtype))
    create_store(folder / dtype, meta)
    gate = install_prefix_cache(Stage(Lookup()), 1, ActivationStore.open(folder / dtype), D)
    tokens = torch.randint(0, 256, (BATCH, T))
    batches = [torch.arange(start, start + BATCH) for start in range(0, WINDOWS, BATCH)]
    start = time.perf_counter()
    for ids in batches:  # every window once: misses
        gate((tokens, ids))
    miss = (time.perf_counter() - start) / WINDOWS
    start = time.perf_counter()
    for _ in range(REPEATS):
        for ids in batches:
            gate((tokens, ids))
    hit = (time.perf_counter() - start) / (WINDOWS * REPEATS)
    return {"hit_ms_per_window": round(hit * 1e3, 3), "miss_ms_per_window": round(miss * 1e3, 3),
            "window_mb": round(T * D * np.dtype(np.float32 if dtype == "fp32" else np.uint16).itemsize / 2**20, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--label", required=True)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "stack_cache_io.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as folder:
        record = {"measured_at": time.strftime("%Y-%m-%d %H:%M:%S"), "T": T, "D": D, "batch": BATCH,
                  **{dtype: time_gate(dtype, Path(folder)) for dtype in ("fp32", "bf16")}}
    write_labelled(args.out, args.label, record)


if __name__ == "__main__":
    main()
