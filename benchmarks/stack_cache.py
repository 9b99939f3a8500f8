#!/usr/bin/env python
"""Whole-run wall-clock of a 4-stack greedy run whose phases repeat the same windows, with and without the stack
cache (the frozen prefix's activations kept on disk).

    python -m benchmarks.stack_cache            # ~2 min on 2 idle cores; merges into results/latest.json
    python -m benchmarks.stack_cache --quick    # ~45 s, merges into results/quick.json

The benchmark rack (4 stacks x 2 blocks) trained stackwise with ``prefix: frozen`` (the frozen embedding and
prefix of greedy stacking), the elastic layout on 2 ranks each pinned to its own core (``benchmarks/pinned.py``),
``training.phase_data: repeat`` (every phase trains on the same windows from the order's first one, as classical
layer-wise training does) and 2 epochs per phase: the training split is cut with ``data.max_bytes`` so that an
epoch is a few dozen steps, its size read from the same data build the runs use (``load_bundle``) and the steps
per phase set to ``ceil(2 x windows / global batch)``. The same run goes once with ``training.stack_cache: off``
and once with ``disk`` (``stack_cache_dtype: fp32``, exact). Reported:

* ``wall_vs_off``: launch-to-exit wall-clock of the cached run over the uncached one (start-up, validations,
  phase changes and the cache's own passes included), with the ratio after start-up beside it;
* per phase and run, the median steady ``train/step_time_s`` of each of its two epochs (the first ``WARMUP``
  steps of each dropped): phase 1's second epoch and every step of phases 2 and 3 read the cache, so a cached
  later phase's step should cost about the training stack's alone;
* ``losses_bitwise_equal``: whether the two runs' training losses are bit for bit the same (fp32 storage promises
  it), and the cache's own log lines (``[stackwise] ... stack cache ...``, e.g. a fall back to computing).
"""

from __future__ import annotations

import math
import os
import shutil
import time
from pathlib import Path

from benchmarks.common import (
    MODEL,
    bench_env,
    build_config,
    launch,
    load_average,
    median,
    merge_results,
    read_results,
    section_cli,
    steady_step_times,
    warm_torch_extensions,
)
from benchmarks.elastic import startup_s

CORES = [0, 1]
SETTINGS = ("off", "disk")
EPOCHS = 2  # per phase
FULL_BYTES, QUICK_BYTES = 110_000, 30_000  # raw text read: ~24 and ~6 steps an epoch at 32 windows of 128 a step
VAL_FRACTION = 0.05  # a tiny split still keeps a few validation micro-batches
WARMUP = 2  # steps of each epoch left out of its median


def base_values(max_bytes: int) -> dict:
    return {**MODEL, "parallel.pipeline_stages": 2, "parallel.phase_layout": "elastic",
            "training.training_architecture": "stackwise", "training.prefix": "frozen",
            "training.phase_data": "repeat", "training.warmup_steps": 1, "training.eval_interval": 0,
            "training.eval_batches": 4, "training.save_interval": 0,
            "data.max_bytes": max_bytes, "data.val_fraction": VAL_FRACTION}


def global_batch(values: dict) -> int:
    """Samples a step: micro-batch x micro-batches (the elastic layout keeps it in every phase)."""
    return values["training.micro_batch_size"] * values["training.gradient_accumulation_steps"]


def epoch_steps(train_windows: int, batch: int) -> int:
    """Steps of one epoch of ``train_windows`` at ``batch`` windows a step (a partial last step counts)."""
    if train_windows < batch:
        raise ValueError(f"{train_windows} training windows cannot fill one batch of {batch}")
    return math.ceil(train_windows / batch)


def training_windows(values: dict) -> int:
    """Windows in the training split of this data, built (or read) where the runs will read it."""
    from stackwise_ds.training.data_setup import load_bundle

    os.environ.setdefault("STACKWISE_DS_CACHE", bench_env()["STACKWISE_DS_CACHE"])
    return len(load_bundle(build_config(values)).train)


def yaml_string(value: str) -> str:
    """A --set value that YAML reads as this string: a bare off/on/yes/no is a boolean in YAML 1.1."""
    return f"'{value}'"


def run_values(base: dict, cache: str, steps: int, out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)  # a leftover checkpoint (or cache) would make it resume
    return {**base, "training.stack_cache": yaml_string(cache), "training.stack_cache_dtype": "fp32",
            "training.steps_per_phase": steps, "training.output_dir": str(out)}


def epoch_medians(out: Path, epoch: int) -> list[dict]:
    """Per phase: the median steady step of each epoch (steps [start + e*epoch, start + (e+1)*epoch))."""
    rows = []
    for phase in read_results(out)["phases"]:
        start, end = phase["start_global_step"], phase["end_global_step"]
        medians = []
        for e in range(EPOCHS):
            first, last = start + e * epoch + 1, min(start + (e + 1) * epoch, end)
            medians.append(round(median(steady_step_times(out, first + WARMUP, last)), 4))
        rows.append({"phase": phase["name"], "epoch_step_s": medians, "val_loss_after": phase["val_loss_after"]})
    return rows


def cache_lines(log: str) -> list[str]:
    return [line.strip() for line in log.splitlines() if "stack cache" in line.lower()][:10]


def measure_stack_cache(max_bytes: int, work: Path, log) -> dict:
    base = base_values(max_bytes)
    warm_torch_extensions()  # not in the first run's start-up
    windows = training_windows(base)
    epoch = epoch_steps(windows, global_batch(base))
    steps = EPOCHS * epoch
    log(f"  {windows} training windows: {epoch} steps an epoch, {steps} a phase")
    walls, startups, outs, lines = {}, {}, {}, {}
    for cache in SETTINGS:
        out = outs[cache] = work / f"stack_cache_{cache}"
        log(f"  stack_cache={cache} (load {load_average()})")
        launched_at = time.time()
        outcome = launch(run_values(base, cache, steps, out), n_procs=2, cores=CORES)
        walls[cache], startups[cache] = outcome.wall_s, startup_s(out, launched_at)
        lines[cache] = cache_lines(outcome.log)
    losses = {cache: read_results(outs[cache])["losses"] for cache in SETTINGS}
    return {
        "wall_vs_off": round(walls["disk"] / walls["off"], 3),
        "wall_vs_off_after_startup": round((walls["disk"] - startups["disk"]) / (walls["off"] - startups["off"]), 3),
        "losses_bitwise_equal": losses["off"] == losses["disk"],
        "run_wall_s": {k: round(v, 1) for k, v in walls.items()},
        "startup_s": {k: round(v, 1) for k, v in startups.items()},
        "per_phase": {cache: epoch_medians(outs[cache], epoch) for cache in SETTINGS},
        "cache_log": lines["disk"],
        "setup": {"training_windows": windows, "global_batch": global_batch(base), "epoch_steps": epoch,
                  "steps_per_phase": steps, "data_max_bytes": max_bytes, "stack_cache_dtype": "fp32",
                  "ranks": 2, "pinned_cores": CORES, "layout": "elastic", "phase_data": "repeat",
                  "warmup_steps_dropped_per_epoch": WARMUP, "load_after": load_average()},
    }


def stack_cache_table(r: dict) -> str:
    s = r["setup"]
    lines = [f"Whole run: off {r['run_wall_s']['off']} s, disk {r['run_wall_s']['disk']} s -> `wall_vs_off` "
             f"{r['wall_vs_off']:.3f} ({r['wall_vs_off_after_startup']:.3f} after start-up); losses bitwise equal: "
             f"{r['losses_bitwise_equal']}; {s['training_windows']} windows, {s['epoch_steps']} steps an epoch, "
             f"{s['steps_per_phase']} a phase.", "",
             "| phase | off: epoch 1 s/step | off: epoch 2 | disk: epoch 1 | disk: epoch 2 |", "|---|---|---|---|---|"]
    for off, disk in zip(r["per_phase"]["off"], r["per_phase"]["disk"], strict=True):
        lines.append(f"| {off['phase']} | {off['epoch_step_s'][0]:.4f} | {off['epoch_step_s'][1]:.4f} | "
                     f"{disk['epoch_step_s'][0]:.4f} | {disk['epoch_step_s'][1]:.4f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    args, name, log = section_cli(__doc__.splitlines()[0])
    result = measure_stack_cache(QUICK_BYTES if args.quick else FULL_BYTES, Path(args.work_dir), log)
    merge_results(name, {"stack_cache": result}, "stack_cache", stack_cache_table(result))


if __name__ == "__main__":
    main()
