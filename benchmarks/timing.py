"""Step-time sections: trainer vs plain PyTorch, stackwise vs rackwise vs ideal, pp=2 vs pp=1.

Every ratio comes from runs interleaved in one benchmark invocation: repetition r runs each
kind once, in an order rotated by r (so slow drifts of the shared machine's load fall on
every kind alike), and a ratio is taken between medians over repetitions of each kind's
steady-state median step time (warm-up steps dropped).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from .common import MODEL, launch, load_average, median, read_scalars, run_module, steady_step_times

PLAIN = "benchmarks.plain_torch"


@dataclass(frozen=True)
class TimingPlan:
    steps: int   # optimizer steps timed per run (warm-up included)
    warmup: int  # first steps of a run (or of the measured phase) left out
    reps: int    # interleaved repetitions of each kind


def timing_values(output_dir: Path, **extra) -> dict:
    """A run that measures steps only: validation and checkpoints just at phase ends, tiny eval."""
    shutil.rmtree(output_dir, ignore_errors=True)  # a leftover checkpoint would make it resume
    return {**MODEL, "training.eval_interval": 0, "training.eval_batches": 1, "training.save_interval": 0,
            "training.output_dir": str(output_dir), **extra}


def tokens_per_step() -> int:
    return MODEL["training.micro_batch_size"] * MODEL["training.gradient_accumulation_steps"] * MODEL["data.seq_len"]


# ----------------------------------------------------------------------------- trainer vs plain vs stackwise

def run_rackwise(plan: TimingPlan, out: Path) -> dict:
    values = timing_values(out, **{"parallel.pipeline_stages": 1, "training.training_architecture": "rackwise",
                                   "training.max_steps": plan.steps})
    run = launch(values)
    times = steady_step_times(out, plan.warmup + 1)
    losses = read_scalars(out, "train/loss")
    # Wall clock between step-end events also counts the trainer's per-step bookkeeping
    # (TensorBoard writes, the periodic memory/grad-norm gather) that step_time_s leaves out.
    wall = [w for step, _, w in losses if step >= plan.warmup]
    per_step_wall = (wall[-1] - wall[0]) / (len(wall) - 1)
    return {"step_s": median(times), "wall_per_step_s": per_step_wall, "first_loss": losses[0][1],
            "run_wall_s": run.wall_s}


def run_plain(plan: TimingPlan, out: Path) -> dict:
    values = {**MODEL, "training.max_steps": plan.steps}
    out.parent.mkdir(parents=True, exist_ok=True)
    run_module(PLAIN, ["--values", json.dumps(values), "--steps", str(plan.steps), "--out", str(out)])
    data = json.loads(out.read_text())
    return {"step_s": median(data["step_times"][plan.warmup:]), "first_loss": data["losses"][0],
            "components_s": data["components"], "ideal_s": data["ideal"]}


def run_stackwise_last(plan: TimingPlan, out: Path) -> dict:
    """Stackwise with one step in every phase but the last, which is timed."""
    n_stacks = MODEL["model.architecture.n_stacks"]
    values = timing_values(out, **{"parallel.pipeline_stages": 1, "training.training_architecture": "stackwise",
                                   "training.steps_per_phase": [1] * (n_stacks - 1) + [plan.steps]})
    launch(values)
    times = steady_step_times(out, (n_stacks - 1) + plan.warmup + 1)
    return {"step_s": median(times)}


def measure_throughput(plan: TimingPlan, work: Path, log) -> dict:
    kinds = {"rackwise": run_rackwise, "plain": run_plain, "stackwise_last": run_stackwise_last}
    reps: list[dict] = []
    for r in range(plan.reps):
        names = list(kinds)
        order = names[r % len(names):] + names[:r % len(names)]
        rep = {}
        for name in order:
            out = work / "throughput" / f"rep{r}_{name}"
            rep[name] = kinds[name](plan, out.with_suffix(".json") if name == "plain" else out)
            log(f"  rep {r} {name}: {rep[name]['step_s']:.3f} s/step  (load {load_average()})")
        reps.append(rep)
    return summarise_throughput(reps)


def summarise_throughput(reps: list[dict]) -> dict:
    med = {k: median([r[k]["step_s"] for r in reps]) for k in ("rackwise", "plain", "stackwise_last")}
    ideal_stack = median([r["plain"]["ideal_s"]["stackwise_last_phase"] for r in reps])
    ideal_rack = median([r["plain"]["ideal_s"]["rackwise"] for r in reps])
    components = {k: median([r["plain"]["components_s"][k] for r in reps]) for k in reps[0]["plain"]["components_s"]}
    tokens = tokens_per_step()
    return {
        "rackwise_vs_plain_torch_tokens_per_s": med["plain"] / med["rackwise"],
        "stackwise_last_phase_vs_rackwise_step_time": med["stackwise_last"] / med["rackwise"],
        "stackwise_step_time_vs_ideal": med["stackwise_last"] / ideal_stack,
        "detail": {
            "tokens_per_step": tokens,
            "median_step_s": med,
            "tokens_per_s": {k: tokens / v for k, v in med.items()},
            "rackwise_wall_per_step_s": median([r["rackwise"]["wall_per_step_s"] for r in reps]),
            "rackwise_vs_plain_including_bookkeeping": med["plain"] / median(
                [r["rackwise"]["wall_per_step_s"] for r in reps]),
            "ideal_step_s": {"stackwise_last_phase": ideal_stack, "rackwise_from_components": ideal_rack},
            "plain_loop_vs_its_components": med["plain"] / ideal_rack,
            "first_step_loss": {"trainer": reps[0]["rackwise"]["first_loss"], "plain": reps[0]["plain"]["first_loss"]},
            "per_rep_ratio_rackwise_vs_plain": [r["plain"]["step_s"] / r["rackwise"]["step_s"] for r in reps],
            "per_rep_ratio_stackwise_vs_ideal": [
                r["stackwise_last"]["step_s"] / r["plain"]["ideal_s"]["stackwise_last_phase"] for r in reps],
            "components_median_s": components,
            "per_rep": reps,
        },
    }


# ----------------------------------------------------------------------------- pipeline pp=2 vs pp=1

def run_pipeline(plan: TimingPlan, out: Path, stages: int, cores: list[int]) -> dict:
    values = timing_values(out, **{"parallel.pipeline_stages": stages, "training.training_architecture": "rackwise",
                                   "training.max_steps": plan.steps, "training.log_interval": plan.steps})
    launch(values, n_procs=stages, cores=cores)
    rss = {tag: max(v for _, v, _ in read_scalars(out, tag))
           for tag in (f"memory/stage{s}_rss_mb" for s in range(stages))}
    return {"step_s": median(steady_step_times(out, plan.warmup + 1)), "peak_rss_mb": rss}


def measure_pipeline(plan: TimingPlan, work: Path, components: dict | None, log) -> dict:
    """Same global batch on 1 rank (1 core) and on 2 ranks as 2 stages (1 core each)."""
    reps = []
    for r in range(plan.reps):
        rep = {}
        # pp=1 alternates cores so neither core's background load decides the result.
        layouts = [("pp1", 1, [r % 2]), ("pp2", 2, [0, 1])]
        for name, stages, cores in (layouts if r % 2 == 0 else layouts[::-1]):
            rep[name] = run_pipeline(plan, work / "pipeline" / f"rep{r}_{name}", stages, cores)
            log(f"  rep {r} {name}: {rep[name]['step_s']:.3f} s/step  (load {load_average()})")
        reps.append(rep)
    return summarise_pipeline(reps, components)


def summarise_pipeline(reps: list[dict], components: dict | None) -> dict:
    p, m = 2, MODEL["training.gradient_accumulation_steps"]
    t1 = median([r["pp1"]["step_s"] for r in reps])
    t2 = median([r["pp2"]["step_s"] for r in reps])
    speedup = t1 / t2
    result = {
        "pipeline_pp2_vs_pp1_tokens_per_s": speedup,
        "pipeline_bubble": {
            "p": p, "m": m,
            "formula_1f1b": (p - 1) / (m + p - 1),
            # Share of the 2 cores' time not spent on the pp=1 work: bubble + imbalance + p2p cost.
            "measured": 1 - speedup / p,
            "stage_imbalance": stage_imbalance(components, p) if components else None,
        },
        "detail": {"median_step_s": {"pp1": t1, "pp2": t2}, "per_rep": reps},
    }
    b = result["pipeline_bubble"]
    # 1F1B with unequal stages: (m + p - 1) slots of the slowest stage's per-micro-batch work.
    if b["stage_imbalance"]:
        b["predicted_speedup_1f1b_with_imbalance"] = p * m / ((m + p - 1) * b["stage_imbalance"])
    return result


def stage_imbalance(c: dict, p: int) -> float:
    """Slowest stage's per-micro-batch work over the mean, from the plain-torch piece timings."""
    n_stacks = MODEL["model.architecture.n_stacks"]
    per = n_stacks // p
    work = []
    for s in range(p):
        stacks = sum(c[f"stack{i}_fwdbwd_inputgrad"] for i in range(s * per, (s + 1) * per))
        extra = c["fetch"] + c["embed_fwd"] if s == 0 else 0.0
        extra += c["head_fwdbwd"] if s == p - 1 else 0.0
        work.append(stacks + extra)
    return max(work) / (sum(work) / p)
