#!/usr/bin/env python
"""Quality at equal wall-clock: does stage-wise training reach end-to-end quality sooner?

    python -m benchmarks.quality            # ~55 min on 2 idle cores; merges "quality" into results/latest.json
    python -m benchmarks.quality --quick    # mechanics only (tiny budget, 1 seed) -> results/quick.json

Every run is a real 2-rank job on the embedded default data, each rank pinned to its own core
(``benchmarks/pinned.py``), on the elastic layout with ``parallel.pipeline_stages: 1``: rackwise
then runs at its fastest on 2 ranks (2 data-parallel replicas), and each stage-wise phase takes
whatever plan the planner predicts fastest. The modes:

* ``rackwise``: ``R`` steps (the budget; the rack is small, so it sees ~150 tokens per parameter);
* ``stackwise_frozen_fresh``, ``stackwise_frozen_copy``: greedy stacking (earlier stacks frozen),
  new stacks fresh or copied from the one before;
* ``stackwise_train_copy``: progressive stacking (``prefix: train``) with copy_previous;
* ``blockwise``: one block a phase, frozen prefix, copy_previous;
* ``<best>+joint``: the stage-wise mode with the lowest loss at the budget, its phases shortened
  to 75 % of the budget and a closing joint (end-to-end) phase of 25 % of R.

Equal wall-clock: a mode's steps per phase are chosen so that its predicted training time
(the planner's per-phase step cost relative to a rackwise step) equals R rackwise steps.
The prediction is imperfect (start-up, phase changes, small phases), so every figure is read off
the measured clock instead: validation loss is logged with its wall time since launch, the
budget ``W`` is rackwise's mean launch-to-exit time, and

* ``val_loss_at_equal_wall``: the last validation loss at or before ``W`` (mean, sd over seeds);
* ``wall_to_rackwise_final_loss``: seconds until the seed-mean curve first reaches rackwise's
  final mean validation loss (linear between evaluations), over rackwise's own time (null
  when never reached).

Runs go seed-major (every mode of seed 0, then seed 1, ...) so slow drifts of the machine spread
over all modes. The learning rate is the default for every mode: nothing is tuned per mode.
"""

from __future__ import annotations

import itertools
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.common import RESULTS_DIR, build_config, launch, load_average, merge_results, read_scalars, section_cli
from benchmarks.flops import step_flops_schedule

CORES = [0, 1]
# A rack small enough that rackwise sees ~150 tokens per parameter within the hour: 4 stacks x 2
# blocks of width 16, large micro-batches (a CPU step's cost is mostly fixed overhead, so more
# tokens per step buy convergence almost for free) and a learning rate suited to the width; the
# same rate for every mode. Byte-level loss on this data never truly flattens in an hour: see
# ``budget.rackwise_last_quarter_gain`` and ``rackwise_last_quarter_share_of_drop``.
MODEL = {
    "model.d_model": 16, "model.n_heads": 2, "model.max_seq_len": 64,
    "model.architecture.n_stacks": 4, "model.architecture.blocks_per_stack": 2,
    "data.seq_len": 64, "training.micro_batch_size": 32, "training.gradient_accumulation_steps": 1,
    "training.lr": 0.01, "training.progress_bar": False, "parallel.pipeline_stages": 1,
    "parallel.phase_layout": "elastic",
}
STAGEWISE = {"stackwise": {"training.training_architecture": "stackwise"},
             "blockwise": {"training.training_architecture": "blockwise"}}
MODES = {
    "rackwise": {"training.training_architecture": "rackwise"},
    "stackwise_frozen_fresh": {**STAGEWISE["stackwise"], "training.growth_operator": "fresh"},
    "stackwise_frozen_copy": {**STAGEWISE["stackwise"], "training.growth_operator": "copy_last"},
    "stackwise_train_copy": {**STAGEWISE["stackwise"], "training.growth_operator": "copy_last",
                             "training.prefix": "train"},
    "blockwise": {**STAGEWISE["blockwise"], "training.growth_operator": "copy_last"},
}
JOINT = "+joint"
JOINT_FRACTION = 0.25  # share of R given to the closing joint phase of '<best>+joint'
EVALS = 12             # validations spread over a run (besides those at phase ends)
EVAL_BATCHES = 8
WARMUP_FRACTION = 0.05  # of each phase's steps


@dataclass(frozen=True)
class QualityPlan:
    rack_steps: int          # R: the rackwise budget in steps
    seeds: tuple[int, ...]


PLANS = {"full": QualityPlan(rack_steps=1100, seeds=(0, 1, 2)), "quick": QualityPlan(rack_steps=60, seeds=(0,))}


# ----------------------------------------------------------------------------- step budgets

def predicted_phase_costs(values: dict) -> list[float]:
    """Each phase's predicted step time relative to a rackwise step (the planner's own model)."""
    from stackwise_ds.layout import layer_units
    from stackwise_ds.phases import plan_phases
    from stackwise_ds.placement import layout_for

    config = build_config(values)
    arch = config.model.architecture
    units = layer_units(arch.n_stacks, arch.blocks_per_stack)
    return [layout_for(p.layer_roles(units), config, len(CORES), False, p.stage_wise).predicted_vs_rackwise
            for p in plan_phases(config)]


def mode_steps(mode: str, rack_steps: int) -> dict:
    """The step settings that spend R rackwise steps' predicted time in ``mode``."""
    base = mode.removesuffix(JOINT)
    if base == "rackwise":
        return {"training.max_steps": rack_steps}
    costs = predicted_phase_costs({**MODEL, **MODES[base], "training.steps_per_phase": 1})
    joint = round(JOINT_FRACTION * rack_steps) if mode.endswith(JOINT) else 0
    per_phase = max(2, round((rack_steps - joint) / sum(costs)))
    return {"training.steps_per_phase": per_phase, "training.joint_steps": joint}


def run_values(mode: str, seed: int, rack_steps: int, out: Path) -> dict:
    steps = mode_steps(mode, rack_steps)
    phase_steps = steps.get("training.max_steps") or steps["training.steps_per_phase"]
    total = len(step_flops_schedule(build_config({**MODEL, **MODES[mode.removesuffix(JOINT)], **steps})))
    return {**MODEL, **MODES[mode.removesuffix(JOINT)], **steps, "training.seed": seed,
            "training.output_dir": str(out), "training.save_interval": 0, "training.eval_batches": EVAL_BATCHES,
            "training.eval_interval": max(1, total // EVALS), "training.log_interval": 50,
            "training.warmup_steps": max(2, round(WARMUP_FRACTION * phase_steps))}


# ----------------------------------------------------------------------------- running

def run_mode(mode: str, seed: int, plan: QualityPlan, work: Path, log) -> dict:
    out = work / "quality" / f"{mode}_seed{seed}"
    shutil.rmtree(out, ignore_errors=True)  # a leftover checkpoint would make it resume
    values = run_values(mode, seed, plan.rack_steps, out)
    launched_at = time.time()
    wall = launch(values, n_procs=len(CORES), cores=CORES, timeout_s=1800).wall_s
    log(f"  {mode} seed {seed}: {wall:.0f} s (load {load_average()})")
    return {"wall_s": wall, "curve": read_curve(out, values, launched_at), "steps": mode_steps(mode, plan.rack_steps)}


def read_curve(out: Path, values: dict, launched_at: float) -> list[dict]:
    """Validation points: global step, seconds since launch, training FLOPs so far, loss."""
    schedule = step_flops_schedule(build_config(values))
    points = sorted(read_scalars(out, "val/loss"), key=lambda p: p[2])  # wall order: a phase's end and the
    # next one's start share a step (with copy_previous their losses differ)
    return [{"step": step, "wall_s": wall - launched_at, "flops": sum(schedule[:step]), "val_loss": loss}
            for step, loss, wall in points]


def measure_quality(plan: QualityPlan, work: Path, log) -> dict:
    runs: dict[str, list[dict]] = {mode: [] for mode in MODES}
    for seed in plan.seeds:
        for mode in MODES:
            runs[mode].append(run_mode(mode, seed, plan, work, log))
    budget_s = statistics.mean(r["wall_s"] for r in runs["rackwise"])
    best = min((m for m in MODES if m != "rackwise"), key=lambda m: loss_at(runs[m], budget_s)[0])
    log(f"  best stage-wise mode at the budget: {best}; adding a closing joint phase")
    runs[best + JOINT] = [run_mode(best + JOINT, seed, plan, work, log) for seed in plan.seeds]
    return summarise(runs, plan, budget_s, best)


# ----------------------------------------------------------------------------- reading the curves

def loss_at(mode_runs: list[dict], wall_s: float) -> tuple[float, float, list[float]]:
    """(mean, sd, per seed) of the last validation loss at or before ``wall_s``."""
    per_seed = []
    for run in mode_runs:
        reached = [p["val_loss"] for p in run["curve"] if p["wall_s"] <= wall_s]
        per_seed.append(reached[-1] if reached else float("nan"))
    sd = statistics.stdev(per_seed) if len(per_seed) > 1 else 0.0
    return statistics.mean(per_seed), sd, per_seed


def mean_curve(mode_runs: list[dict]) -> list[tuple[float, float]]:
    """(wall, loss) averaged over seeds point by point (the seeds evaluate at the same steps)."""
    n = min(len(r["curve"]) for r in mode_runs)
    return [(statistics.mean(r["curve"][i]["wall_s"] for r in mode_runs),
             statistics.mean(r["curve"][i]["val_loss"] for r in mode_runs)) for i in range(n)]


def first_reach(curve: list[tuple[float, float]], target: float) -> float | None:
    """Seconds at which ``curve`` first gets to ``target`` or below, linear between points."""
    for (w0, l0), (w1, l1) in itertools.pairwise(curve):
        if l1 <= target:
            if l0 <= target:
                return w0
            return w0 + (w1 - w0) * (l0 - target) / (l0 - l1)
    return curve[0][0] if curve and curve[0][1] <= target else None


def summarise(runs: dict[str, list[dict]], plan: QualityPlan, budget_s: float, best: str) -> dict:
    rack_curve, parameters = mean_curve(runs["rackwise"]), parameter_count()
    target = rack_curve[-1][1]
    rack_time = first_reach(rack_curve, target)
    at_wall, to_target, reach_s = {}, {}, {}
    for mode, mode_runs in runs.items():
        mean, sd, seeds = loss_at(mode_runs, budget_s)
        at_wall[mode] = {"mean": round(mean, 4), "sd": round(sd, 4), "seeds": [round(s, 4) for s in seeds]}
        reach = first_reach(mean_curve(mode_runs), target)
        reach_s[mode] = None if reach is None else round(reach, 1)
        to_target[mode] = None if reach is None else round(reach / rack_time, 3)
    return {
        "val_loss_at_equal_wall": at_wall,
        "wall_to_rackwise_final_loss": to_target,
        "budget": {"wall_s": round(budget_s, 1), "rackwise_steps": plan.rack_steps, "seeds": list(plan.seeds),
                   "rackwise_final_mean_val_loss": round(target, 4), "rackwise_time_to_it_s": round(rack_time, 1),
                   "rackwise_last_quarter_gain": round(last_quarter_gain(rack_curve), 4),
                   "rackwise_last_quarter_share_of_drop": round(last_quarter_share_of_drop(rack_curve), 4),
                   "parameters": parameters, "rackwise_tokens_per_parameter":
                       round(plan.rack_steps * tokens_per_rackwise_step() / parameters),
                   "ranks": len(CORES), "pinned_cores": CORES, "model": MODEL, "modes": MODES,
                   "joint_fraction": JOINT_FRACTION, "best_stagewise": best},
        "detail": {mode: {"steps": mode_runs[0]["steps"],
                          "run_wall_s": round(statistics.mean(r["wall_s"] for r in mode_runs), 1),
                          "run_wall_vs_budget": round(statistics.mean(r["wall_s"] for r in mode_runs) / budget_s, 3),
                          "seconds_to_rackwise_final_loss": reach_s[mode],
                          "curves": [r["curve"] for r in mode_runs]} for mode, mode_runs in runs.items()},
    }


def last_quarter_drop(curve: list[tuple[float, float]]) -> float:
    """How far the loss fell from the last evaluation at 3/4 of the run's wall-clock to the end."""
    end_wall, end_loss = curve[-1]
    earlier = [loss for wall, loss in curve if wall <= 0.75 * end_wall]
    return earlier[-1] - end_loss if earlier else float("nan")


def last_quarter_gain(curve: list[tuple[float, float]]) -> float:
    """How much rackwise's loss still fell over the last quarter of its run (relative): ~0 = flattened."""
    return last_quarter_drop(curve) / curve[-1][1]


def last_quarter_share_of_drop(curve: list[tuple[float, float]]) -> float:
    """The part of rackwise's whole loss drop (first evaluation to last) made in its last quarter."""
    return last_quarter_drop(curve) / (curve[0][1] - curve[-1][1])


def parameter_count() -> int:
    from stackwise_ds.model.rack import create_rack_from_config

    return sum(p.numel() for p in create_rack_from_config(build_config(MODEL)).parameters())


def tokens_per_rackwise_step() -> int:
    """Tokens in one rackwise optimizer step: pipeline_stages 1 makes every rank a data-parallel replica."""
    return MODEL["training.micro_batch_size"] * MODEL["training.gradient_accumulation_steps"] * \
        MODEL["data.seq_len"] * len(CORES)


# ----------------------------------------------------------------------------- report

def quality_table(q: dict) -> str:
    b = q["budget"]
    lines = [f"Budget: rackwise {b['rackwise_steps']} steps = {b['wall_s']:.0f} s launch to exit (mean of "
             f"{len(b['seeds'])} seeds, {b['parameters']} parameters, {b['rackwise_tokens_per_parameter']} tokens "
             f"per parameter); rackwise's final mean val loss {b['rackwise_final_mean_val_loss']:.3f}, still falling "
             f"{100 * b['rackwise_last_quarter_gain']:.1f} % over its last quarter "
             f"({100 * b['rackwise_last_quarter_share_of_drop']:.1f} % of its whole drop).", "",
             "| mode | val loss at equal wall (mean ± sd) | wall to rackwise's final loss (× rackwise) | "
             "run wall / budget | steps |", "|---|---|---|---|---|"]
    for mode, v in q["val_loss_at_equal_wall"].items():
        ratio = q["wall_to_rackwise_final_loss"][mode]
        d = q["detail"][mode]
        steps = ", ".join(f"{k.split('.')[-1]} {s}" for k, s in d["steps"].items() if s)
        lines.append(f"| {mode} | {v['mean']:.3f} ± {v['sd']:.3f} | {'never' if ratio is None else f'{ratio:.2f}'} | "
                     f"{d['run_wall_vs_budget']:.2f} | {steps} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    args, name, log = section_cli(__doc__.splitlines()[0])
    start = time.perf_counter()
    quality = measure_quality(PLANS["quick" if args.quick else "full"], Path(args.work_dir), log)
    quality["budget"]["study_seconds"] = round(time.perf_counter() - start, 1)
    from benchmarks.plots import plot_quality

    quality["plots"] = [str(Path(p).relative_to(RESULTS_DIR.parents[1]))
                        for p in plot_quality(quality, RESULTS_DIR / f"{name}_quality")]
    merge_results(name, {"quality": quality}, "quality", quality_table(quality))


if __name__ == "__main__":
    main()
