#!/usr/bin/env python
"""Wall-clock of whole stage-wise runs on a multi-rank pipeline: elastic vs fixed layout vs rackwise.

    python -m benchmarks.elastic            # ~7 min on 2 idle cores; merges into results/latest.json
    python -m benchmarks.elastic --quick    # fewer steps, merges into results/quick.json

The benchmark rack (4 stacks x 2 blocks) on 2 ranks, each pinned to its own core
(``benchmarks/pinned.py``) so that a rank behaves like a GPU of its own: an idle rank's core is
not lent to a busy one. Every run trains the same total number of steps: rackwise ``4 S`` steps
on the fixed 2-stage pipeline; stackwise ``S`` steps a phase (4 phases), elastic and fixed;
blockwise ``S / 2`` a phase (8 phases), elastic and fixed (S = 24). Whole-run wall-clock (launch to
exit, start-up, validation, phase changes and phase-end checkpoints included) gives the headline
ratios; the start-up before the first step (launcher, imports, DeepSpeed and data, ~12 s here, the
same for every run) is reported too, with the ratios of the time after it. Per phase, the measured
median step time is set against the planner's prediction (``predicted_vs_rackwise`` x the measured
rackwise step time).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from benchmarks.common import (
    MODEL,
    launch,
    load_average,
    median,
    merge_results,
    read_results,
    read_scalars,
    section_cli,
    steady_step_times,
)

CORES = [0, 1]
RUNS = {  # name -> (training_architecture, phase_layout, steps per phase as a fraction of S)
    "rackwise": ("rackwise", "fixed", 4.0),
    "stackwise_elastic": ("stackwise", "elastic", 1.0),
    "stackwise_fixed": ("stackwise", "fixed", 1.0),
    "blockwise_elastic": ("blockwise", "elastic", 0.5),
    "blockwise_fixed": ("blockwise", "fixed", 0.5),
}
FULL_STEPS, QUICK_STEPS = 24, 4  # S: steps of a stackwise phase
WARMUP = 2  # steps of each phase left out of its median (allocator and autograd caches settle)


def run_values(name: str, steps: int, out: Path) -> dict:
    arch, layout, fraction = RUNS[name]
    shutil.rmtree(out, ignore_errors=True)  # a leftover checkpoint would make it resume
    n = int(steps * fraction)
    return {**MODEL, "parallel.pipeline_stages": 2, "parallel.phase_layout": layout,
            "training.training_architecture": arch, "training.max_steps": n, "training.steps_per_phase": n,
            "training.warmup_steps": 1, "training.eval_interval": 0, "training.eval_batches": 2,
            "training.save_interval": 0, "training.output_dir": str(out)}


def phase_rows(out: Path, rack_step_s: float) -> list[dict]:
    rows = []
    for phase in read_results(out)["phases"]:
        first = phase["start_global_step"] + 1
        measured = median(steady_step_times(out, first + WARMUP, phase["end_global_step"]))
        layout = phase["layout"]
        predicted = layout["predicted_vs_rackwise"] * rack_step_s
        rows.append({"phase": phase["name"], "pipeline_stages": layout["pipeline_stages"],
                     "data_parallel": layout["data_parallel"], "micro_batches": layout["gradient_accumulation_steps"],
                     "live_layers": layout["live"], "parts": layout["parts"],
                     "predicted_step_s": round(predicted, 4), "measured_step_s": round(measured, 4),
                     "measured_vs_predicted": round(measured / predicted, 3)})
    return rows


def startup_s(out: Path, launched_at: float) -> float:
    """Seconds from launch to the start of the first step (same work in every run)."""
    _, first_step_s, first_step_end = read_scalars(out, "train/step_time_s")[0]
    return first_step_end - first_step_s - launched_at


def measure_elastic(steps: int, work: Path, log) -> dict:
    walls, startups, outs = {}, {}, {}
    for name in RUNS:
        out = outs[name] = work / f"elastic_{name}"
        log(f"  {name} (load {load_average()})")
        launched_at = time.time()
        walls[name] = launch(run_values(name, steps, out), n_procs=2, cores=CORES).wall_s
        startups[name] = startup_s(out, launched_at)
    rack_step = median(steady_step_times(outs["rackwise"], WARMUP + 1))
    per_phase = {name: phase_rows(outs[name], rack_step) for name in RUNS if name != "rackwise"}

    def ratio(a: str, b: str) -> float:
        return round(walls[a] / walls[b], 3)

    def after(a: str, b: str) -> float:  # the ratio of the time after start-up
        return round((walls[a] - startups[a]) / (walls[b] - startups[b]), 3)

    return {
        "stagewise_elastic_vs_rackwise_wall": ratio("stackwise_elastic", "rackwise"),
        "stagewise_elastic_vs_fixed_wall": ratio("stackwise_elastic", "stackwise_fixed"),
        "blockwise_elastic_vs_rackwise_wall": ratio("blockwise_elastic", "rackwise"),
        "blockwise_elastic_vs_fixed_wall": ratio("blockwise_elastic", "blockwise_fixed"),
        "elastic_detail": {"steps_rackwise": 4 * steps, "ranks": 2, "pinned_cores": CORES,
                           "rackwise_step_s": round(rack_step, 4),
                           "run_wall_s": {k: round(v, 1) for k, v in walls.items()},
                           "startup_s": {k: round(v, 1) for k, v in startups.items()},
                           "after_startup_ratios": {
                               "stagewise_elastic_vs_rackwise": after("stackwise_elastic", "rackwise"),
                               "stagewise_elastic_vs_fixed": after("stackwise_elastic", "stackwise_fixed"),
                               "blockwise_elastic_vs_rackwise": after("blockwise_elastic", "rackwise"),
                               "blockwise_elastic_vs_fixed": after("blockwise_elastic", "blockwise_fixed")},
                           "per_phase": per_phase, "load_after": load_average()},
    }


def elastic_table(r: dict) -> str:
    """Markdown: the headline ratios, then per phase of the elastic runs the plan and its prediction."""
    d = r["elastic_detail"]
    lines = ["| figure | measured | target |", "|---|---|---|"]
    for key, target, limit in (("stagewise_elastic_vs_rackwise_wall", "≤ 0.45 (ideal ≈ 0.35–0.4)", 0.45),
                               ("stagewise_elastic_vs_fixed_wall", "≤ 0.75", 0.75),
                               ("blockwise_elastic_vs_rackwise_wall", "(report)", None),
                               ("blockwise_elastic_vs_fixed_wall", "(report)", None)):
        mark = "" if limit is None else (" ✅" if r[key] <= limit else " ❌")
        lines.append(f"| `{key}` | {r[key]:.3f}{mark} | {target} |")
    lines += ["", f"Whole runs, seconds: {d['run_wall_s']}; start-up before the first step: {d['startup_s']}; "
              f"ratios after start-up: {d['after_startup_ratios']} (rackwise step {d['rackwise_step_s']:.3f} s)", "",
              "| run | phase | stages × dp | micro-batches | predicted s/step | measured s/step "
              "| measured / predicted |",
              "|---|---|---|---|---|---|---|"]
    for name in ("stackwise_elastic", "blockwise_elastic"):
        for row in d["per_phase"][name]:
            lines.append(f"| {name} | {row['phase']} | {row['pipeline_stages']} × {row['data_parallel']} | "
                         f"{row['micro_batches']} | {row['predicted_step_s']:.3f} | {row['measured_step_s']:.3f} | "
                         f"{row['measured_vs_predicted']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    args, name, log = section_cli(__doc__.splitlines()[0])
    result = measure_elastic(QUICK_STEPS if args.quick else FULL_STEPS, Path(args.work_dir), log)
    merge_results(name, result, "elastic", elastic_table(result))


if __name__ == "__main__":
    main()
