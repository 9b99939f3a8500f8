"""Validation loss of every training mode at an equal budget of training FLOPs, several seeds.

Rackwise gets ``budget_steps`` steps; every other mode gets the number of steps per phase
whose FLOPs (``flops.py``: trained units 3x forward, frozen 1x, dormant 0) add up to the
same budget. Runs go two at a time, one torch thread each (the machine has 2 cores), in
seed-major order so the pairs that share the machine mix modes.
"""

from __future__ import annotations

import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from .common import (
    MODEL,
    build_config,
    load_average,
    optimizer_state_bytes,
    read_results,
    read_scalars,
    start_background,
)
from .flops import step_flops_schedule

MODES = ("rackwise", "stackwise", "stackwise_joint", "blockwise")
JOINT_FRACTION = 0.25   # share of the budget the closing joint phase gets in 'stackwise_joint'
EVAL_POINTS = 6         # validations spread over a run (besides those at phase ends), for the curves
EVAL_BATCHES = 8        # 8 x 8 sequences x 128 tokens = 8k validation tokens per evaluation
LOG_INTERVAL = 5        # memory / grad-norm logging, often enough to see every phase's peak
MB = 2**20


@dataclass(frozen=True)
class ModesPlan:
    budget_steps: int      # rackwise steps; the FLOP budget every mode gets
    seeds: tuple[int, ...]
    warmup_steps: int      # per phase; small enough for the shortest (blockwise) phase
    parallel_jobs: int = 2


def mode_values(mode: str, seed: int, plan: ModesPlan, output_dir: Path, steps: dict) -> dict:
    arch = "stackwise" if mode == "stackwise_joint" else mode
    values = {**MODEL, "parallel.pipeline_stages": 1, "training.training_architecture": arch,
              "training.seed": seed, "training.output_dir": str(output_dir),
              "training.warmup_steps": plan.warmup_steps, "training.save_interval": 0,
              "training.eval_batches": EVAL_BATCHES, "training.log_interval": LOG_INTERVAL,
              # Stacking literature: a new unit starting as a copy of the previous one learns faster
              # (the setting of launch/stackwise.yaml).
              "training.growth_operator": "copy_last"}
    values.update(steps)
    values["training.eval_interval"] = max(1, _total_steps(values) // EVAL_POINTS)
    return values


def _total_steps(values: dict) -> int:
    return len(step_flops_schedule(build_config(values)))


def budget_steps(plan: ModesPlan) -> tuple[dict[str, dict], float]:
    """(per mode, the step settings that spend the rackwise FLOP budget; the budget in FLOPs)."""
    def schedule(**extra):
        return step_flops_schedule(build_config({**MODEL, **extra}))

    rack_step = schedule(**{"training.training_architecture": "rackwise", "training.max_steps": 1})[0]
    budget = plan.budget_steps * rack_step
    stack_one_each = sum(schedule(**{"training.training_architecture": "stackwise", "training.steps_per_phase": 1}))
    block_one_each = sum(schedule(**{"training.training_architecture": "blockwise", "training.steps_per_phase": 1}))
    joint = round(JOINT_FRACTION * plan.budget_steps)
    return {
        "rackwise": {"training.max_steps": plan.budget_steps},
        "stackwise": {"training.steps_per_phase": round(budget / stack_one_each)},
        "stackwise_joint": {"training.steps_per_phase": round((budget - joint * rack_step) / stack_one_each),
                            "training.joint_steps": joint},
        "blockwise": {"training.steps_per_phase": round(budget / block_one_each)},
    }, budget


# ----------------------------------------------------------------------------- running

def run_jobs(jobs: list[tuple[str, int, dict]], parallel: int, log) -> dict[tuple[str, int], float]:
    """Run single-process training jobs ``parallel`` at a time; returns each one's wall seconds."""
    pending, running, walls = list(jobs), {}, {}
    while pending or running:
        while pending and len(running) < parallel:
            mode, seed, values = pending.pop(0)
            running[(mode, seed)] = (*start_background(values), values)
        time.sleep(0.5)
        for key, (proc, start, values) in list(running.items()):
            if proc.poll() is None:
                continue
            del running[key]
            walls[key] = time.perf_counter() - start
            if proc.returncode != 0:
                tail = Path(values["training.output_dir"]).with_suffix(".log").read_text()[-4000:]
                raise RuntimeError(f"{key} failed ({proc.returncode}):\n{tail}")
            log(f"  {key[0]} seed {key[1]}: {walls[key]:.0f} s  (load {load_average()})")
    return walls


def measure_modes(plan: ModesPlan, work: Path, log) -> dict:
    steps, budget = budget_steps(plan)
    jobs = []
    for seed in plan.seeds:
        for mode in MODES:
            out = work / "modes" / f"{mode}_seed{seed}"
            shutil.rmtree(out, ignore_errors=True)
            out.parent.mkdir(parents=True, exist_ok=True)
            jobs.append((mode, seed, mode_values(mode, seed, plan, out, steps[mode])))
    walls = run_jobs(jobs, plan.parallel_jobs, log)
    runs = {(mode, seed): collect_run(values, walls[(mode, seed)], with_memory=seed == plan.seeds[0])
            for mode, seed, values in jobs}
    return summarise_modes(runs, plan, steps, budget)


# ----------------------------------------------------------------------------- reading a run back

def collect_run(values: dict, wall_s: float, with_memory: bool) -> dict:
    out = Path(values["training.output_dir"])
    results = read_results(out)
    schedule = step_flops_schedule(build_config(values))
    step_times = {step: v for step, v, _ in read_scalars(out, "train/step_time_s")}
    curve = [{"step": step, "val_loss": loss, "flops": sum(schedule[:step]),
              "train_time_s": sum(t for s, t in step_times.items() if s <= step)}
             for step, loss in results["val_history"]]
    run = {"final_val_loss": results["val_history"][-1][1], "curve": curve, "run_wall_s": wall_s,
           "train_time_s": sum(step_times.values()), "flops": sum(schedule),
           "phase_steps": [p["steps"] for p in results["phases"]]}
    if with_memory:
        run.update(memory_per_phase(out, results["phases"]))
    return run


def memory_per_phase(out: Path, phases: list[dict]) -> dict:
    """Peak RSS logged during each phase and the optimizer state in each phase-end checkpoint."""
    from stackwise_ds.checkpoint.files import tag_for

    rss = read_scalars(out, "memory/stage0_rss_mb")
    per_phase = []
    for p in phases:
        in_phase = [v for step, v, _ in rss if p["start_global_step"] < step <= p["end_global_step"]]
        state = optimizer_state_bytes(out / "checkpoints" / tag_for(p["end_global_step"]))
        per_phase.append({"phase": p["name"], "peak_rss_mb": max(in_phase) if in_phase else None,
                          "optimizer_state_mb": state["total"] / MB, "adam_moments_mb": state["moments"] / MB,
                          "fp32_master_mb": state["master"] / MB,
                          "trainable_params": state["moments"] // 8})  # 2 fp32 moments per parameter
    return {"memory": per_phase}


def summarise_modes(runs: dict, plan: ModesPlan, steps: dict, budget: float) -> dict:
    val_loss, val_seeds, val_std, rss, opt, opt_phase, detail = {}, {}, {}, {}, {}, {}, {}
    for mode in MODES:
        mode_runs = [runs[(mode, seed)] for seed in plan.seeds]
        finals = [r["final_val_loss"] for r in mode_runs]
        val_loss[mode] = statistics.mean(finals)
        val_seeds[mode] = finals
        val_std[mode] = statistics.stdev(finals) if len(finals) > 1 else 0.0
        memory = mode_runs[0]["memory"]
        rss[mode] = max(m["peak_rss_mb"] for m in memory if m["peak_rss_mb"] is not None)
        opt[mode] = max(m["optimizer_state_mb"] for m in memory)
        opt_phase[mode] = memory
        detail[mode] = {"steps": steps[mode], "flops": mode_runs[0]["flops"],
                        "flops_vs_budget": mode_runs[0]["flops"] / budget,
                        "phase_steps": mode_runs[0]["phase_steps"],
                        "train_time_s": statistics.mean(r["train_time_s"] for r in mode_runs),
                        "run_wall_s": statistics.mean(r["run_wall_s"] for r in mode_runs),
                        "curves": [r["curve"] for r in mode_runs]}
    return {"val_loss": val_loss, "val_loss_std": val_std, "val_loss_seeds": val_seeds, "peak_rss_mb": rss,
            "optimizer_state_mb": opt, "memory_per_phase": opt_phase,
            "modes_detail": {"budget_flops": budget, "budget_rackwise_steps": plan.budget_steps,
                             "seeds": list(plan.seeds), "joint_fraction": JOINT_FRACTION,
                             "warmup_steps": plan.warmup_steps, "per_mode": detail}}
