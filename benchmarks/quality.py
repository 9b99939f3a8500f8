#!/usr/bin/env python
"""Quality at equal wall-clock: does stage-wise training reach end-to-end quality sooner?

    python -m benchmarks.quality            # ~55 min on 2 idle cores; merges "quality" into results/latest.json
    python -m benchmarks.quality --quick    # mechanics only (tiny budget, 1 seed) -> results/quick.json

Every run is a real 2-rank job on the embedded default data, each rank pinned to its own core
(``benchmarks/pinned.py``), on the elastic layout with ``parallel.pipeline_stages: 1``: rackwise
then runs at its fastest on 2 ranks (2 data-parallel replicas), and each stage-wise phase takes
whatever plan the planner predicts fastest. The modes:

* ``rackwise``: ``R`` steps (the budget; the rack is small, so it sees ~120 tokens per parameter),
  one cosine schedule;
* ``progressive``: today's progressive stacking, the baseline: 4 equal phases (depth 1, 2, 3, 4),
  every active stack trains (``prefix: train``), a new stack copies the last one, and every phase
  restarts warmup, cosine and AdamW;
* ``grow_once`` (Bu 2025, with Gstack's operator): depth 1 for 75 % of the steps, then one growth to
  4 stacks copying the whole small model (``copy_all``), one continuous warmup-stable-decay schedule
  and the AdamW moments carried across the growth;
* ``doubling`` (Gong et al. 2019): depths 1, 2, 4 in equal shares of the steps, ``copy_all``,
  continuous WSD, moments carried;
* ``midas`` (Saunshi et al. 2024): depths 1, 2, 3, 4 in equal shares, copies of the middle stacks
  inserted in the middle (``copy_middle``), continuous WSD, moments carried;
* ``greedy``: greedy stacking (earlier stacks frozen, ``prefix: frozen``), a new stack copies the
  last one; from phase 1 on the embedding freezes with the prefix and the LM head trains as an
  untied copy. (The old greedy, its embedding tied to the head and training, is
  ``stackwise_frozen_copy`` in ``results/quality_before_growth.json``, the same budget.)

Equal wall-clock: a mode's steps, split over its phases by the mode's shares, are chosen so that
its predicted training time (the planner's per-phase step cost relative to a rackwise step)
equals R rackwise steps.
The prediction is imperfect (start-up, phase changes, small phases), so every figure is read off
the measured clock instead: validation loss is logged with its wall time since launch, the
budget ``W`` is rackwise's mean launch-to-exit time, and

* ``val_loss_at_equal_wall``: the last validation loss at or before ``W`` (mean, sd over seeds);
* ``wall_to_rackwise_final_loss``: seconds until the seed-mean curve first reaches rackwise's
  final mean validation loss (linear between evaluations), over rackwise's own time (null
  when never reached);
* ``flops_to_rackwise_final_loss``: the same point counted in training FLOPs (benchmarks/flops.py),
  over rackwise's FLOPs to it.

The warmup is 5 % of each schedule: of every phase with ``lr_schedule: per_phase``, of the whole
run with ``continuous``. Runs go seed-major (every mode of seed 0, then seed 1, ...) so slow drifts
of the machine spread over all modes. The learning rate is the default for every mode: nothing is tuned per mode.
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
PROGRESSIVE = {"training.training_architecture": "stackwise", "training.prefix": "train"}
# The growth recipe of the literature: one schedule over the run, moments kept across growths.
ONE_SCHEDULE = {"training.lr_schedule": "continuous", "training.lr_decay": "wsd",
                "training.optimizer_across_phases": "carry"}
GREEDY = {"training.training_architecture": "stackwise", "training.prefix": "frozen",
          "training.growth_operator": "copy_last"}


@dataclass(frozen=True)
class Mode:
    values: dict           # config overrides (besides MODEL and the step counts)
    shares: tuple = ()     # each phase's share of the mode's steps; () = equal phases


MODES = {
    "rackwise": Mode({"training.training_architecture": "rackwise"}),
    "progressive": Mode({**PROGRESSIVE, "training.growth_operator": "copy_last"}),
    "grow_once": Mode({**PROGRESSIVE, **ONE_SCHEDULE, "training.depth_schedule": [1, 4],
                       "training.growth_operator": "copy_all"}, shares=(0.75, 0.25)),
    "doubling": Mode({**PROGRESSIVE, **ONE_SCHEDULE, "training.depth_schedule": [1, 2, 4],
                      "training.growth_operator": "copy_all"}),
    "midas": Mode({**PROGRESSIVE, **ONE_SCHEDULE, "training.growth_operator": "copy_middle"}),
    "greedy": Mode(GREEDY),
}
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
    """The step settings that spend R rackwise steps' predicted time in ``mode``: total steps S split
    by the mode's shares, with sum(S * share * cost) = R."""
    if mode == "rackwise":
        return {"training.max_steps": rack_steps}
    costs = predicted_phase_costs({**MODEL, **MODES[mode].values, "training.steps_per_phase": 1})
    shares = MODES[mode].shares or (1 / len(costs),) * len(costs)
    total = rack_steps / sum(share * cost for share, cost in zip(shares, costs, strict=True))
    return {"training.steps_per_phase": [max(2, round(total * share)) for share in shares]}


def run_values(mode: str, seed: int, rack_steps: int, out: Path) -> dict:
    values = {**MODEL, **MODES[mode].values, **mode_steps(mode, rack_steps)}
    total = len(step_flops_schedule(build_config(values)))
    per_phase = values.get("training.lr_schedule", "per_phase") == "per_phase"
    schedule_steps = min(values.get("training.steps_per_phase", [total])) if per_phase else total
    return {**values, "training.seed": seed, "training.output_dir": str(out), "training.save_interval": 0,
            "training.eval_batches": EVAL_BATCHES, "training.eval_interval": max(1, total // EVALS),
            "training.log_interval": 50, "training.warmup_steps": max(2, round(WARMUP_FRACTION * schedule_steps))}


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
    return summarise(runs, plan, budget_s)


# ----------------------------------------------------------------------------- reading the curves

def loss_at(mode_runs: list[dict], wall_s: float) -> tuple[float, float, list[float]]:
    """(mean, sd, per seed) of the last validation loss at or before ``wall_s``."""
    per_seed = []
    for run in mode_runs:
        reached = [p["val_loss"] for p in run["curve"] if p["wall_s"] <= wall_s]
        per_seed.append(reached[-1] if reached else float("nan"))
    sd = statistics.stdev(per_seed) if len(per_seed) > 1 else 0.0
    return statistics.mean(per_seed), sd, per_seed


def mean_curve(mode_runs: list[dict], x_key: str = "wall_s") -> list[tuple[float, float]]:
    """(wall or FLOPs, loss) averaged over seeds point by point (the seeds evaluate at the same steps)."""
    n = min(len(r["curve"]) for r in mode_runs)
    return [(statistics.mean(r["curve"][i][x_key] for r in mode_runs),
             statistics.mean(r["curve"][i]["val_loss"] for r in mode_runs)) for i in range(n)]


def first_reach(curve: list[tuple[float, float]], target: float) -> float | None:
    """Where (seconds or FLOPs) ``curve`` first gets to ``target`` or below, linear between points."""
    for (w0, l0), (w1, l1) in itertools.pairwise(curve):
        if l1 <= target:
            if l0 <= target:
                return w0
            return w0 + (w1 - w0) * (l0 - target) / (l0 - l1)
    return curve[0][0] if curve and curve[0][1] <= target else None


def summarise(runs: dict[str, list[dict]], plan: QualityPlan, budget_s: float) -> dict:
    rack_curve, parameters = mean_curve(runs["rackwise"]), parameter_count()
    target = rack_curve[-1][1]
    rack_time = first_reach(rack_curve, target)
    rack_flops = first_reach(mean_curve(runs["rackwise"], "flops"), target)
    at_wall, to_target, reach_s, flops_to_target = {}, {}, {}, {}
    for mode, mode_runs in runs.items():
        mean, sd, seeds = loss_at(mode_runs, budget_s)
        at_wall[mode] = {"mean": round(mean, 4), "sd": round(sd, 4), "seeds": [round(s, 4) for s in seeds]}
        reach = first_reach(mean_curve(mode_runs), target)
        reach_s[mode] = None if reach is None else round(reach, 1)
        to_target[mode] = None if reach is None else round(reach / rack_time, 3)
        flops = first_reach(mean_curve(mode_runs, "flops"), target)
        flops_to_target[mode] = None if flops is None else round(flops / rack_flops, 3)
    stagewise = {m: r for m, r in to_target.items() if m != "rackwise" and r is not None}
    return {
        "val_loss_at_equal_wall": at_wall,
        "wall_to_rackwise_final_loss": to_target,
        "flops_to_rackwise_final_loss": flops_to_target,
        "budget": {"wall_s": round(budget_s, 1), "rackwise_steps": plan.rack_steps, "seeds": list(plan.seeds),
                   "rackwise_final_mean_val_loss": round(target, 4), "rackwise_time_to_it_s": round(rack_time, 1),
                   "rackwise_last_quarter_gain": round(last_quarter_gain(rack_curve), 4),
                   "rackwise_last_quarter_share_of_drop": round(last_quarter_share_of_drop(rack_curve), 4),
                   "parameters": parameters, "rackwise_tokens_per_parameter":
                       round(plan.rack_steps * tokens_per_rackwise_step() / parameters),
                   "ranks": len(CORES), "pinned_cores": CORES, "model": MODEL,
                   "modes": {m: {**mode.values, "shares": list(mode.shares)} for m, mode in MODES.items()},
                   "best_stagewise": min(stagewise, key=stagewise.get) if stagewise else None},
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
             "FLOPs to it (× rackwise) | run wall / budget | steps |", "|---|---|---|---|---|---|"]
    for mode, v in q["val_loss_at_equal_wall"].items():
        wall, flops = q["wall_to_rackwise_final_loss"][mode], q["flops_to_rackwise_final_loss"][mode]
        d = q["detail"][mode]
        steps = ", ".join(f"{k.split('.')[-1]} {s}" for k, s in d["steps"].items() if s)
        lines.append(f"| {mode} | {v['mean']:.3f} ± {v['sd']:.3f} | {_ratio(wall)} | {_ratio(flops)} | "
                     f"{d['run_wall_vs_budget']:.2f} | {steps} |")
    return "\n".join(lines) + "\n"


def _ratio(value: float | None) -> str:
    return "never" if value is None else f"{value:.2f}"


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
