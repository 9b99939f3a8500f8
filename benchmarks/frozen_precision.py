#!/usr/bin/env python
"""Frozen stacks in fp32 (``same``), bf16 and int8: the last stackwise phase's step time, the frozen weights' bytes
and the final validation loss.

    python -m benchmarks.frozen_precision            # ~3.5 min on 2 idle cores; merges into results/latest.json
    python -m benchmarks.frozen_precision --quick    # ~1 min, merges into results/quick.json

The benchmark rack (4 stacks x 2 blocks) trained stackwise with ``prefix: frozen`` and the elastic layout on 2
ranks, each pinned to its own core (``benchmarks/pinned.py``), once per ``training.frozen_precision``
(``same``, ``bf16``, ``int8``; the full run repeats the three, interleaved, twice). Phases are short except the
last (3 frozen stacks + 1 training stack), which is long enough for a steady median ``train/step_time_s``
(its first ``WARMUP`` steps dropped). Reported per setting:

* ``last_phase_step_s``: the median steady step of the last phase (over the repetitions' steps);
* ``frozen_weight_bytes``: the bytes of the 3 frozen stacks' weights in that precision. The trainer only logs
  them rounded to 0.01 MB, so this process builds the same rack and converts its frozen blocks with
  ``stackwise_ds.parallel.precision.converted_copy`` exactly as ``apply_frozen_precision`` does, and counts
  ``module_bytes`` (parameters and persistent buffers: int8 weights plus their fp32 scales, norms kept). The
  logged figure (``logged_frozen_mb``, summed over the stages that logged it) is kept beside it as a check;
* ``frozen_forward_ms``: one micro-batch through the 3 frozen stacks' converted copies, timed in this process on
  one pinned core with one thread (the frozen forward alone, without the training stack's work around it);
* ``final_val_loss``: the last phase's closing validation loss (through the frozen stacks in that precision);
* ``last_phase_rss_mb``: resident memory at the last phase's end, the larger rank (``results.json``). At this
  rack's size (4.7 MB of frozen fp32 weights against ~600 MB of torch and DeepSpeed) it shows little.

Targets (issue 19): int8 frozen weights <= 0.3x their fp32 bytes, and a frozen forward no slower than fp32; both
are reported as measured, with ``met`` flags. On CPU the fp32 runs use int8's dequantize-then-matmul path
(``int8_matmul``), so int8 saves memory there, not time.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

from benchmarks.common import (
    MODEL,
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

CORES = [0, 1]
SETTINGS = ("same", "bf16", "int8")
FULL = {"steps": [12, 12, 12, 48], "reps": 2}
QUICK = {"steps": [2, 2, 2, 8], "reps": 1}
WARMUP = 2  # steps of the last phase left out of its median
FORWARD_REPEATS = 20  # timed micro-batches of the in-process frozen forward (after 3 untimed)
INT8_BYTES_TARGET = 0.3
LOGGED = re.compile(r"frozen layers [\d, ]+ run in \w+ \(weights ([\d.]+) MB instead of ([\d.]+) MB\)")


def run_values(precision: str, steps: list[int], out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)  # a leftover checkpoint would make it resume
    return {**MODEL, "parallel.pipeline_stages": 2, "parallel.phase_layout": "elastic",
            "training.training_architecture": "stackwise", "training.prefix": "frozen",
            "training.frozen_precision": precision, "training.steps_per_phase": steps,
            "training.warmup_steps": 1, "training.eval_interval": 0, "training.eval_batches": 4,
            "training.save_interval": 0, "training.output_dir": str(out)}


def ratio(a: float, b: float) -> float:
    """a / b rounded for the report; nan when b is not positive (a run that measured nothing)."""
    return round(a / b, 3) if b > 0 else float("nan")


def logged_frozen_mb(log: str, stages: int) -> list[float] | None:
    """[converted, full] MB of the frozen layers as the last phase's stages logged them (one line per stage that
    holds frozen layers, from its first replica; the last phase's lines come last); None when none did."""
    lines = LOGGED.findall(log)[-stages:]
    if not lines:
        return None
    return [round(sum(float(pair[i]) for pair in lines), 2) for i in (0, 1)]


def last_phase_figures(out: Path) -> dict:
    phase = read_results(out)["phases"][-1]
    steps = steady_step_times(out, phase["start_global_step"] + 1 + WARMUP, phase["end_global_step"])
    return {"step_times": steps, "val_loss": phase["val_loss_after"], "rss_mb": phase.get("rss_mb"),
            "stages": phase["layout"]["pipeline_stages"]}


# ----------------------------------------------------------------------------- in-process: bytes and forward


def frozen_blocks():
    """The blocks of the stacks frozen in the last phase (all but the last), as the rack is built (seeded init)."""
    from stackwise_ds.model import build_rack

    config = build_config(MODEL)
    rack = build_rack(config.model, config.training.seed).eval()
    return [block for stack in list(rack.stacks)[:-1] for block in stack.blocks], config


def converted(blocks, precision: str):
    from stackwise_ds.enums import FrozenPrecision
    from stackwise_ds.parallel.precision import converted_copy

    if precision == "same":
        return blocks
    return [converted_copy(block, FrozenPrecision(precision)) for block in blocks]


def frozen_bytes(blocks, precision: str) -> int:
    from stackwise_ds.parallel.precision import module_bytes

    return sum(module_bytes(block) for block in converted(blocks, precision))


def frozen_forward_ms(blocks, precision: str, config) -> float:
    """Median ms of one micro-batch [micro_batch_size, seq_len, d_model] through the converted frozen blocks."""
    import torch

    layers = converted(blocks, precision)
    x = torch.randn(config.training.micro_batch_size, config.data.seq_len, config.model.d_model,
                    generator=torch.Generator().manual_seed(0))
    times = []
    with torch.no_grad():
        for i in range(3 + FORWARD_REPEATS):
            start = time.perf_counter()
            h = x
            for layer in layers:
                h = layer(h)
            if i >= 3:
                times.append((time.perf_counter() - start) * 1e3)
    return median(times)


def in_process_figures() -> dict:
    """Bytes and the forward alone, on one core with one thread (affinity and threads restored after)."""
    import torch

    affinity, threads = os.sched_getaffinity(0), torch.get_num_threads()
    os.sched_setaffinity(0, {CORES[0]})
    torch.set_num_threads(1)
    try:
        blocks, config = frozen_blocks()
        return {p: {"bytes": frozen_bytes(blocks, p), "forward_ms": frozen_forward_ms(blocks, p, config)}
                for p in SETTINGS}
    finally:
        torch.set_num_threads(threads)
        os.sched_setaffinity(0, affinity)


# ----------------------------------------------------------------------------- the section


def measure_frozen_precision(plan: dict, work: Path, log) -> dict:
    steps, runs = plan["steps"], {p: [] for p in SETTINGS}
    warm_torch_extensions()  # not in the first run's start-up
    logged, walls = {}, {p: [] for p in SETTINGS}
    for rep in range(plan["reps"]):
        for precision in SETTINGS:
            out = work / f"frozen_precision_{precision}_{rep}"
            log(f"  frozen_precision={precision} rep {rep} (load {load_average()})")
            outcome = launch(run_values(precision, steps, out), n_procs=2, cores=CORES)
            walls[precision].append(round(outcome.wall_s, 1))
            runs[precision].append(last_phase_figures(out))
            logged[precision] = logged_frozen_mb(outcome.log, runs[precision][-1]["stages"])
    local = in_process_figures()
    return summarise(runs, local, logged, walls, steps)


def summarise(runs: dict, local: dict, logged: dict, walls: dict, steps: list[int]) -> dict:
    per = {}
    for p in SETTINGS:
        per[p] = {"last_phase_step_s": round(median([s for r in runs[p] for s in r["step_times"]]), 4),
                  "final_val_loss": round(median([r["val_loss"] for r in runs[p]]), 4),
                  "final_val_loss_per_rep": [r["val_loss"] for r in runs[p]],
                  "frozen_weight_bytes": local[p]["bytes"], "logged_frozen_mb": logged[p],
                  "frozen_forward_ms": round(local[p]["forward_ms"], 3),
                  "last_phase_rss_mb": max((round(r["rss_mb"], 1) for r in runs[p] if r["rss_mb"] is not None),
                                           default=None),
                  "run_wall_s": walls[p], "last_phase_steps_timed": [len(r["step_times"]) for r in runs[p]]}
    same, int8, bf16 = per["same"], per["int8"], per["bf16"]
    result = {
        "int8_bytes_vs_fp32": ratio(int8["frozen_weight_bytes"], same["frozen_weight_bytes"]),
        "bf16_bytes_vs_fp32": ratio(bf16["frozen_weight_bytes"], same["frozen_weight_bytes"]),
        "int8_step_vs_fp32": ratio(int8["last_phase_step_s"], same["last_phase_step_s"]),
        "bf16_step_vs_fp32": ratio(bf16["last_phase_step_s"], same["last_phase_step_s"]),
        "int8_forward_vs_fp32": ratio(int8["frozen_forward_ms"], same["frozen_forward_ms"]),
        "bf16_forward_vs_fp32": ratio(bf16["frozen_forward_ms"], same["frozen_forward_ms"]),
        "int8_val_loss_delta": round(int8["final_val_loss"] - same["final_val_loss"], 4),
        "bf16_val_loss_delta": round(bf16["final_val_loss"] - same["final_val_loss"], 4),
    }
    result["targets"] = {
        "int8_bytes_le_0.3x_fp32": {"met": result["int8_bytes_vs_fp32"] <= INT8_BYTES_TARGET},
        "int8_frozen_forward_no_slower_than_fp32": {"met": result["int8_forward_vs_fp32"] <= 1.0,
                                                    "step_met": result["int8_step_vs_fp32"] <= 1.0},
    }
    result["settings"] = per
    result["setup"] = {"steps_per_phase": steps, "reps": len(runs["same"]), "ranks": 2, "pinned_cores": CORES,
                       "layout": "elastic", "warmup_steps_dropped": WARMUP, "forward_repeats": FORWARD_REPEATS,
                       "load_after": load_average()}
    return result


def frozen_precision_table(r: dict) -> str:
    lines = ["| setting | last-phase step s | × fp32 | frozen weight bytes | × fp32 | frozen forward ms | × fp32 "
             "| final val loss | Δ vs fp32 | rss MB (last phase end) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    same = r["settings"]["same"]
    for p in SETTINGS:
        s = r["settings"][p]
        cells = [p]
        for key, fmt in (("last_phase_step_s", ".4f"), ("frozen_weight_bytes", ","), ("frozen_forward_ms", ".2f")):
            cells += [format(s[key], fmt), str(ratio(s[key], same[key]))]
        cells += [f"{s['final_val_loss']:.4f}", f"{s['final_val_loss'] - same['final_val_loss']:+.4f}",
                  str(s["last_phase_rss_mb"])]
        lines.append("| " + " | ".join(cells) + " |")
    t = r["targets"]
    lines += ["", f"Targets: int8 bytes ≤ 0.3× fp32: {'met' if t['int8_bytes_le_0.3x_fp32']['met'] else 'NOT met'}; "
              f"int8 frozen forward no slower than fp32: "
              f"{'met' if t['int8_frozen_forward_no_slower_than_fp32']['met'] else 'NOT met'} (forward alone), "
              f"{'met' if t['int8_frozen_forward_no_slower_than_fp32']['step_met'] else 'NOT met'} (whole step)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    args, name, log = section_cli(__doc__.splitlines()[0])
    result = measure_frozen_precision(QUICK if args.quick else FULL, Path(args.work_dir), log)
    merge_results(name, {"frozen_precision": result}, "frozen_precision", frozen_precision_table(result))


if __name__ == "__main__":
    main()
