#!/usr/bin/env python
"""Quality at equal wall-clock: does stage-wise training reach the best end-to-end run's quality sooner?

    python -m benchmarks.quality                                  # "long" budget -> latest.json "quality"
    python -m benchmarks.quality --budget compute_limited         # -> latest.json "quality_compute_limited"
    python -m benchmarks.quality --quick [--budget compute_limited]   # mechanics only -> results/quick*
    python -m benchmarks.quality --estimate --budget compute_limited  # 2 short runs: predicted study time

Two budgets, the same modes, the same keys:

* ``long`` (latest.json -> ``quality``): the small rack (width 16, 4 stacks x 2 blocks) for 1100
  rackwise steps, ~136 tokens per non-embedding parameter (121 per parameter of any kind): far past
  compute-optimal, where end-to-end training has long stopped learning fast;
* ``compute_limited`` (latest.json -> ``quality_compute_limited``): a wider rack (width 48,
  4 stacks x 2 blocks) given 20 tokens per non-embedding parameter (Chinchilla's ratio; Gstack's 7B
  run saw ~43), so it stops while still learning fast.

Every run is a real 2-rank job on the embedded default data, each rank pinned to its own core
(``benchmarks/pinned.py``), on the elastic layout with ``parallel.pipeline_stages: 1``: rackwise
then runs at its fastest on 2 ranks (2 data-parallel replicas), and each stage-wise phase takes
whatever plan the planner predicts fastest. The modes (``MODES``):

* ``rackwise``: ``R`` steps (the budget), one cosine schedule;
* ``rackwise_wsd``: the same with warmup-stable-decay, the schedule every growth mode uses (the same
  ``decay_fraction`` and warmup fraction);
* ``doubling`` (Gong et al. 2019): depths 1, 2, 4 in equal shares of the steps, new stacks copy the
  whole smaller model (``copy_all``), one continuous WSD schedule, AdamW moments carried;
* ``midas`` (Saunshi et al. 2024): depths 1, 2, 3, 4 in equal shares, copies of the middle stacks
  inserted in the middle (``copy_middle``), continuous WSD, moments carried;
* ``doubling_identity``, ``midas_identity``: the same with ``growth_init: identity`` (the added
  stacks' o_proj and down_proj start at zero, as LLaMA Pro / bert2BERT / MSG, so a growth leaves the
  function and the loss where they were);
* ``grow_late`` (Bu et al. 2025, arXiv 2511.04981): depth 2 for 80 % of the steps, then one growth
  to 4 stacks by ``copy_all`` (a factor 2: a smaller shock than x4) with ``growth_init: identity``,
  continuous WSD, moments carried.

Left out, because they add nothing here (their figures stay in ``results/quality_cosine_baseline.json``,
the study before this one, same long budget): ``progressive`` (midas's depths with every phase
restarting warmup, cosine and AdamW: behind midas in wall and FLOPs in that study and in issue 26's,
and the schedule's share of that is now measured directly by rackwise against rackwise_wsd);
``grow_once`` ([1, 4] at 75 %, copy init: the slowest growth mode in both studies, 1.18x and 1.11x;
``grow_late`` is its function-preserving, smaller-factor form); ``greedy`` (a frozen prefix never
reached rackwise's loss: a memory mode, not a time-to-quality one).

The baseline is whichever of ``rackwise`` and ``rackwise_wsd`` ends lower (seed-mean final validation
loss). Equal wall-clock: a mode's steps, split over its phases by the mode's shares, are chosen so
that its predicted training time (the planner's per-phase step cost relative to a rackwise step)
equals R rackwise steps. The prediction is imperfect (start-up, phase changes, small phases), so
every figure is read off the measured clock instead: validation loss is logged with its wall time
since launch, the budget ``W`` is the baseline's mean launch-to-exit time, and

* ``val_loss_at_equal_wall``: the last validation loss at or before ``W`` (mean, sd over seeds);
* ``wall_to_baseline_final_loss``: seconds until the seed-mean curve first reaches the baseline's
  final mean validation loss (linear between evaluations), over the baseline's own time to it
  (null when never reached); per seed (each seed against the same seed's baseline) under
  ``detail``; ``flops_to_baseline_final_loss``: the same point in training FLOPs (benchmarks/flops.py);
* ``wall_to_rackwise_final_loss``, ``flops_to_rackwise_final_loss``: the same against rackwise
  (cosine), the old keys;
* ``best_stagewise``: the growth mode with the lowest wall ratio, and whether it meets issue 26's
  goal (<= 0.8x the baseline's wall).

``budget.tokens_per_parameter`` counts non-embedding parameters (every parameter but the token
embedding, which the LM head shares); ``budget.tokens_per_parameter_all`` counts them all. The warmup
is 5 % of each schedule (the run's, for rackwise and the continuous growth modes), WSD decays over
the last 20 % everywhere. Runs go seed-major (every mode of seed 0, then seed 1, ...) so slow drifts
of the machine spread over all modes. One learning rate per rack, the same for every mode: nothing
is tuned per mode.

How to run it (2 idle cores, nothing else running; needs ``pip install -e '.[plots]'``, checked first;
each command merges its section into ``results/latest.json`` and writes its table and two plots,
validation loss against wall-clock and against FLOPs, ``results/latest_{section}_val_loss_vs_{wall,flops}.png``):

    python -m benchmarks.quality --estimate --budget compute_limited  # ~1.5 min: check the estimate below
    python -m benchmarks.quality                           # ~28 min (7 modes x 3 seeds, 75-85 s a run)
    python -m benchmarks.quality --budget compute_limited  # ~56 min (139-154 s a run)

The two studies may run in either order, but never beside anything else (the wall ratios are the
figures). Every run is kept in ``<work dir>/<section>/runs.json`` as it ends; ``--summarise-only`` rebuilds
the section from it. Check ``detail.<mode>.start_up_s`` afterwards: every run's launch to its step-0
validation should be about the same (6-8 s on 2026-12-07); one far above the rest took a one-off cost.

How the compute-limited rack was chosen (2026-12-07, 2 pinned ranks): at 20 tokens per non-embedding
parameter the steps grow with the parameters, and a CPU step's time grows with them too, so the
study's wall grows faster than the rack. Short ``rackwise_wsd`` runs (60 and 240 steps, 12
validations each, as ``--estimate`` does) gave

* width 64 (427,072 non-embedding parameters, 2085 steps): 0.19-0.21 s a step, ~430 s a rackwise run,
  a study of ~2.8 hours: too large;
* width 48 (222,000 parameters, 1083 steps, ``COMPUTE_LIMITED_MODEL``): 15.4 s + 0.147 s a step with
  the other agents idle (load ~1.8), 13.7 s + 0.124 s a step in a second measurement (``--estimate``):
  a rackwise run of 148-174 s, and with the growth runs overrunning rackwise's wall by the long
  study's 1.15x, 3 seeds x (2 + 5 x 1.15) rackwise walls = 57-68 minutes. The next width with 4 heads,
  52, jumps to d_ff 192 and ~326,000 parameters (1592 steps): ~1.8 hours by the same fit, not
  measured. So width 48 is the largest of this shape (4 stacks x 2 blocks) within about an hour.

``--quick`` runs one seed for a few dozen steps and writes only ``results/quick*`` (git-ignored):
mechanics, not figures (measured: 2.2 min for the long budget, 3.7 min for the compute-limited one,
which included building the all-reduce op once for the virtualenv, ~50 s).
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import math
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.common import (
    RESULTS_DIR,
    build_config,
    launch,
    load_average,
    merge_results,
    read_scalars,
    section_cli,
    warm_torch_extensions,
)
from benchmarks.flops import step_flops_schedule

CORES = [0, 1]
# A rack small enough that rackwise sees ~120 tokens per parameter within ~25 minutes: 4 stacks x 2
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
# The compute-limited rack: the same shape and tokens per step, wider; the learning rate interpolated
# log-linearly in width between the long rack's (0.01 at width 16) and the trainer's default (1e-3,
# width 256), untuned.
COMPUTE_LIMITED_MODEL = {**MODEL, "model.d_model": 48, "model.n_heads": 4, "training.lr": 0.004}

WSD = {"training.lr_decay": "wsd", "training.decay_fraction": 0.2}
# The growth recipe of the literature: one schedule over the run, moments kept across growths.
GROWTH = {"training.training_architecture": "stackwise", "training.prefix": "train",
          "training.lr_schedule": "continuous", **WSD, "training.optimizer_across_phases": "carry"}
IDENTITY = {"training.growth_init": "identity"}
DOUBLING = {**GROWTH, "training.depth_schedule": [1, 2, 4], "training.growth_operator": "copy_all"}
MIDAS = {**GROWTH, "training.growth_operator": "copy_middle"}


@dataclass(frozen=True)
class Mode:
    values: dict           # config overrides (besides the rack and the step counts)
    shares: tuple = ()     # each phase's share of the mode's steps; () = equal phases


MODES = {
    "rackwise": Mode({"training.training_architecture": "rackwise", "training.lr_decay": "cosine"}),
    "rackwise_wsd": Mode({"training.training_architecture": "rackwise", **WSD}),
    "doubling": Mode(DOUBLING),
    "doubling_identity": Mode({**DOUBLING, **IDENTITY}),
    "midas": Mode(MIDAS),
    "midas_identity": Mode({**MIDAS, **IDENTITY}),
    "grow_late": Mode({**GROWTH, **IDENTITY, "training.depth_schedule": [2, 4],
                       "training.growth_operator": "copy_all"}, shares=(0.8, 0.2)),
}
BASELINES = ("rackwise", "rackwise_wsd")  # the end-to-end runs; the baseline is the one that ends lower
GOAL_WALL_RATIO = 0.8  # issue 26: a stage-wise mode reaches the baseline's final loss in <= 0.8x its wall
EVALS = 12             # validations spread over a run (besides those at phase ends)
EVAL_BATCHES = 8
WARMUP_FRACTION = 0.05  # of each schedule's steps


@dataclass(frozen=True)
class QualityPlan:
    section: str                       # its key in results/latest.json
    model: dict                        # the rack (config overrides)
    seeds: tuple[int, ...]
    rack_steps: int = 0                # R, the rackwise budget in steps, given directly, or
    tokens_per_parameter: float = 0.0  # R from tokens per non-embedding parameter

    def steps(self) -> int:
        if self.rack_steps:
            return self.rack_steps
        return rack_steps_for(self.tokens_per_parameter, parameter_counts(self.model)["non_embedding"],
                              tokens_per_rackwise_step(self.model))


PLANS = {
    "long": {"full": QualityPlan("quality", MODEL, (0, 1, 2), rack_steps=1100),
             "quick": QualityPlan("quality", MODEL, (0,), rack_steps=60)},
    "compute_limited": {
        "full": QualityPlan("quality_compute_limited", COMPUTE_LIMITED_MODEL, (0, 1, 2), tokens_per_parameter=20),
        "quick": QualityPlan("quality_compute_limited", COMPUTE_LIMITED_MODEL, (0,), tokens_per_parameter=1.0)},
}


# ----------------------------------------------------------------------------- budget arithmetic

def tokens_per_rackwise_step(model: dict, ranks: int = len(CORES)) -> int:
    """Tokens in one rackwise optimizer step: pipeline_stages 1 makes every rank a data-parallel replica."""
    return model["training.micro_batch_size"] * model["training.gradient_accumulation_steps"] * \
        model["data.seq_len"] * ranks


def parameter_counts(model: dict) -> dict[str, int]:
    """Unique parameters of the rack: ``all``, and ``non_embedding`` (without the token embedding and,
    when untied, the LM head: Kaplan et al.'s N)."""
    from stackwise_ds.model import build_rack

    rack = build_rack(build_config(model).model)
    embedding = rack.embedding.weight.numel()
    head = 0 if rack.lm_head.weight is rack.embedding.weight else rack.lm_head.weight.numel()
    total = rack.get_parameter_count()
    return {"all": total, "non_embedding": total - embedding - head}


def rack_steps_for(tokens_per_parameter: float, parameters: int, tokens_per_step: int) -> int:
    """The most rackwise steps that stay within ``tokens_per_parameter``."""
    steps = math.floor(tokens_per_parameter * parameters / tokens_per_step)
    if steps < 1:
        raise ValueError(f"{tokens_per_parameter} tokens per parameter of {parameters} parameters is less than one "
                         f"step of {tokens_per_step} tokens: raise tokens_per_parameter or widen the rack")
    return steps


def tokens_per_parameter(steps: int, tokens_per_step: int, parameters: int) -> float:
    return steps * tokens_per_step / parameters


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


def mode_steps(mode: str, model: dict, rack_steps: int) -> dict:
    """The step settings that spend R rackwise steps' predicted time in ``mode``: total steps S split
    by the mode's shares, with sum(S * share * cost) = R."""
    if MODES[mode].values["training.training_architecture"] == "rackwise":
        return {"training.max_steps": rack_steps}
    costs = predicted_phase_costs({**model, **MODES[mode].values, "training.steps_per_phase": 1})
    shares = MODES[mode].shares or (1 / len(costs),) * len(costs)
    total = rack_steps / sum(share * cost for share, cost in zip(shares, costs, strict=True))
    return {"training.steps_per_phase": [max(2, round(total * share)) for share in shares]}


def run_values(mode: str, seed: int, model: dict, rack_steps: int, out: Path) -> dict:
    values = {**model, **MODES[mode].values, **mode_steps(mode, model, rack_steps)}
    total = len(step_flops_schedule(build_config(values)))
    return {**values, "training.seed": seed, "training.output_dir": str(out), "training.save_interval": 0,
            "training.eval_batches": EVAL_BATCHES, "training.eval_interval": max(1, total // EVALS),
            "training.log_interval": 50,
            "training.warmup_steps": max(2, round(WARMUP_FRACTION * schedule_steps(values, total)))}


def schedule_steps(values: dict, total: int) -> int:
    """Steps of one learning-rate schedule: the run's, or the shortest phase's when every phase restarts it."""
    per_phase = values.get("training.lr_schedule", "per_phase") == "per_phase"
    return min(values.get("training.steps_per_phase", [total])) if per_phase else total


# ----------------------------------------------------------------------------- running

def run_mode(mode: str, seed: int, plan: QualityPlan, rack_steps: int, work: Path, log) -> dict:
    out = work / plan.section / f"{mode}_seed{seed}"
    shutil.rmtree(out, ignore_errors=True)  # a leftover checkpoint would make it resume
    values = run_values(mode, seed, plan.model, rack_steps, out)
    launched_at = time.time()
    wall = launch(values, n_procs=len(CORES), cores=CORES, timeout_s=1800).wall_s
    log(f"  {mode} seed {seed}: {wall:.0f} s (load {load_average()})")
    return {"wall_s": wall, "curve": read_curve(out, values, launched_at),
            "steps": mode_steps(mode, plan.model, rack_steps)}


def read_curve(out: Path, values: dict, launched_at: float) -> list[dict]:
    """Validation points: global step, seconds since launch, training FLOPs so far, loss."""
    schedule = step_flops_schedule(build_config(values))
    points = sorted(read_scalars(out, "val/loss"), key=lambda p: p[2])  # wall order: a phase's end and the
    # next one's start share a step (with copy_previous their losses differ)
    return [{"step": step, "wall_s": wall - launched_at, "flops": sum(schedule[:step]), "val_loss": loss}
            for step, loss, wall in points]


def measure_quality(plan: QualityPlan, work: Path, log) -> dict:
    rack_steps = plan.steps()
    log(f"{plan.section}: rackwise {rack_steps} steps, {len(MODES)} modes x {len(plan.seeds)} seeds")
    warm_torch_extensions()  # not in the first run's start-up (it would inflate the baseline's wall)
    runs: dict[str, list[dict]] = {mode: [] for mode in MODES}
    for seed in plan.seeds:
        for mode in MODES:
            runs[mode].append(run_mode(mode, seed, plan, rack_steps, work, log))
            raw_runs_path(plan, work).write_text(json.dumps(runs))  # what a crash after this run would keep
    return summarise(runs, plan, rack_steps)


def raw_runs_path(plan: QualityPlan, work: Path) -> Path:
    """Every measured run of a study (wall, curve, steps), kept in the work folder: ``--summarise-only``
    rebuilds the section from it without training again."""
    return work / plan.section / "runs.json"


def require_plotting() -> None:
    """Fail before an hour of runs, not after them: the study ends by drawing its plots."""
    if importlib.util.find_spec("matplotlib") is None:
        raise SystemExit("benchmarks.quality draws its plots with matplotlib, which is not installed: "
                         "pip install -e '.[plots]'")


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


def final_loss(mode_runs: list[dict]) -> float:
    """The seed-mean validation loss of the last evaluation."""
    return mean_curve(mode_runs)[-1][1]


def choose_baseline(runs: dict[str, list[dict]]) -> str:
    """The end-to-end mode that ends lower (the first of BASELINES on a tie)."""
    return min(BASELINES, key=lambda mode: final_loss(runs[mode]))


def reach_ratios(runs: dict[str, list[dict]], reference: str) -> dict:
    """Every mode's wall-clock and FLOPs until its seed-mean curve reaches ``reference``'s final seed-mean
    loss, over ``reference``'s own (None: never reached)."""
    target = final_loss(runs[reference])
    ref_s = first_reach(mean_curve(runs[reference]), target)
    ref_flops = first_reach(mean_curve(runs[reference], "flops"), target)
    seconds = {mode: first_reach(mean_curve(r), target) for mode, r in runs.items()}
    flops = {mode: first_reach(mean_curve(r, "flops"), target) for mode, r in runs.items()}
    return {"target": target, "reference_s": ref_s, "reference_flops": ref_flops,
            "seconds": {m: None if s is None else round(s, 1) for m, s in seconds.items()},
            "wall": {m: _over(s, ref_s) for m, s in seconds.items()},
            "flops": {m: _over(f, ref_flops) for m, f in flops.items()}}


def _over(value: float | None, reference: float) -> float | None:
    return None if value is None else round(value / reference, 3)


def per_seed_wall_ratios(runs: dict[str, list[dict]], reference: str) -> dict[str, list[float | None]]:
    """Seed by seed: each mode's wall to the same seed's ``reference`` final loss, over that run's own."""
    n_seeds = len(runs[reference])
    per_seed = [reach_ratios({m: [r[i]] for m, r in runs.items()}, reference)["wall"] for i in range(n_seeds)]
    return {mode: [seed[mode] for seed in per_seed] for mode in runs}


def best_stagewise(wall_ratios: dict, flops_ratios: dict) -> dict:
    """The growth mode that reaches the baseline's final loss in the least wall-clock, against the goal."""
    reached = {m: r for m, r in wall_ratios.items() if m not in BASELINES and r is not None}
    if not reached:
        return {"mode": None, "wall_to_baseline_final_loss": None, "flops_to_baseline_final_loss": None,
                "goal_wall_ratio": GOAL_WALL_RATIO, "goal_met": False}
    mode = min(reached, key=reached.get)
    return {"mode": mode, "wall_to_baseline_final_loss": reached[mode],
            "flops_to_baseline_final_loss": flops_ratios[mode], "goal_wall_ratio": GOAL_WALL_RATIO,
            "goal_met": reached[mode] <= GOAL_WALL_RATIO}


def summarise(runs: dict[str, list[dict]], plan: QualityPlan, rack_steps: int) -> dict:
    baseline = choose_baseline(runs)
    vs_baseline, vs_rackwise = reach_ratios(runs, baseline), reach_ratios(runs, "rackwise")
    budget_s = statistics.mean(r["wall_s"] for r in runs[baseline])
    per_seed = per_seed_wall_ratios(runs, baseline)
    return {
        "baseline": baseline,
        "wall_to_baseline_final_loss": vs_baseline["wall"],
        "flops_to_baseline_final_loss": vs_baseline["flops"],
        "wall_to_rackwise_final_loss": vs_rackwise["wall"],
        "flops_to_rackwise_final_loss": vs_rackwise["flops"],
        "best_stagewise": best_stagewise(vs_baseline["wall"], vs_baseline["flops"]),
        "final_val_loss": {mode: _spread(loss_at(r, math.inf)) for mode, r in runs.items()},
        "val_loss_at_equal_wall": {mode: _spread(loss_at(r, budget_s)) for mode, r in runs.items()},
        "budget": budget_summary(runs, plan, rack_steps, baseline, vs_baseline, vs_rackwise, budget_s),
        "detail": {mode: run_detail(mode_runs, budget_s, vs_baseline["seconds"][mode], per_seed[mode],
                                    vs_rackwise["seconds"][mode]) for mode, mode_runs in runs.items()},
    }


def _spread(loss: tuple[float, float, list[float]]) -> dict:
    mean, sd, seeds = loss
    return {"mean": round(mean, 4), "sd": round(sd, 4), "seeds": [round(s, 4) for s in seeds]}


def budget_summary(runs: dict, plan: QualityPlan, rack_steps: int, baseline: str, vs_baseline: dict,
                   vs_rackwise: dict, budget_s: float) -> dict:
    counts, step_tokens = parameter_counts(plan.model), tokens_per_rackwise_step(plan.model)
    base_curve = mean_curve(runs[baseline])
    return {
        "wall_s": round(budget_s, 1), "rackwise_steps": rack_steps, "seeds": list(plan.seeds),
        "baseline_final_mean_val_loss": round(vs_baseline["target"], 4),
        "baseline_time_to_it_s": round(vs_baseline["reference_s"], 1),
        "rackwise_final_mean_val_loss": round(vs_rackwise["target"], 4),
        "rackwise_time_to_it_s": round(vs_rackwise["reference_s"], 1),
        "baseline_last_quarter_gain": round(last_quarter_gain(base_curve), 4),
        "baseline_last_quarter_share_of_drop": round(last_quarter_share_of_drop(base_curve), 4),
        "rackwise_last_quarter_gain": round(last_quarter_gain(mean_curve(runs["rackwise"])), 4),
        "rackwise_last_quarter_share_of_drop": round(last_quarter_share_of_drop(mean_curve(runs["rackwise"])), 4),
        "parameters": counts["all"], "non_embedding_parameters": counts["non_embedding"],
        "tokens_per_rackwise_step": step_tokens,
        "tokens_per_parameter": round(tokens_per_parameter(rack_steps, step_tokens, counts["non_embedding"]), 2),
        "tokens_per_parameter_all": round(tokens_per_parameter(rack_steps, step_tokens, counts["all"]), 2),
        "tokens_per_parameter_counts": "non-embedding parameters (all but the token embedding, tied to the head)",
        "rackwise_tokens_per_parameter": round(tokens_per_parameter(rack_steps, step_tokens, counts["all"])),
        "ranks": len(CORES), "pinned_cores": CORES, "model": plan.model,
        "warmup_fraction": WARMUP_FRACTION, "decay_fraction": WSD["training.decay_fraction"],
        "modes": {m: {**mode.values, "shares": list(mode.shares)} for m, mode in MODES.items()},
        "best_stagewise": best_stagewise(vs_baseline["wall"], vs_baseline["flops"])["mode"],
    }


def run_detail(mode_runs: list[dict], budget_s: float, to_baseline_s: float | None, per_seed: list,
               to_rackwise_s: float | None) -> dict:
    wall = statistics.mean(r["wall_s"] for r in mode_runs)
    return {"steps": mode_runs[0]["steps"], "run_wall_s": round(wall, 1),
            "run_wall_vs_budget": round(wall / budget_s, 3),
            "start_up_s": [round(r["curve"][0]["wall_s"], 1) for r in mode_runs],  # launch to the step-0 validation
            "seconds_to_baseline_final_loss": to_baseline_s,
            "wall_to_baseline_final_loss_per_seed": per_seed,
            "seconds_to_rackwise_final_loss": to_rackwise_s,
            "curves": [r["curve"] for r in mode_runs]}


def last_quarter_drop(curve: list[tuple[float, float]]) -> float:
    """How far the loss fell from the last evaluation at 3/4 of the run's wall-clock to the end."""
    end_wall, end_loss = curve[-1]
    earlier = [loss for wall, loss in curve if wall <= 0.75 * end_wall]
    return earlier[-1] - end_loss if earlier else float("nan")


def last_quarter_gain(curve: list[tuple[float, float]]) -> float:
    """How much the loss still fell over the last quarter of the run (relative): ~0 = flattened."""
    return last_quarter_drop(curve) / curve[-1][1]


def last_quarter_share_of_drop(curve: list[tuple[float, float]]) -> float:
    """The part of the whole loss drop (first evaluation to last) made in the last quarter."""
    return last_quarter_drop(curve) / (curve[0][1] - curve[-1][1])


# ----------------------------------------------------------------------------- study-time estimate

ESTIMATE_STEPS = (60, 240)  # two short rackwise runs: their walls give start-up and seconds per step
# Growth runs' launch-to-exit wall over rackwise's at equal predicted time, in the committed long study
# (run_wall_vs_budget 1.10 .. 1.19: phase changes, phase-end validations, the planner's error).
STAGEWISE_OVERRUN = 1.15


def fit_line(points: list[tuple[float, float]]) -> tuple[float, float]:
    """(intercept, slope) of the straight line through two (x, y) points."""
    (x0, y0), (x1, y1) = points
    slope = (y1 - y0) / (x1 - x0)
    return y0 - slope * x0, slope


def study_seconds(rackwise_wall_s: float, n_seeds: int) -> float:
    """A study's predicted wall: every mode once per seed, growth modes overrunning rackwise's wall."""
    return n_seeds * sum(rackwise_wall_s * (1.0 if m in BASELINES else STAGEWISE_OVERRUN) for m in MODES)


def estimate_study(plan: QualityPlan, work: Path, log) -> dict:
    """Predict a study's wall from two short rackwise_wsd runs of its rack (12 validations each, as the study)."""
    points = []
    warm_torch_extensions()
    for steps in ESTIMATE_STEPS:
        out = work / "quality_estimate" / f"{plan.section}_{steps}"
        shutil.rmtree(out, ignore_errors=True)
        values = run_values("rackwise_wsd", 0, plan.model, steps, out)
        points.append((steps, launch(values, n_procs=len(CORES), cores=CORES, timeout_s=1800).wall_s))
        log(f"  {steps} steps: {points[-1][1]:.1f} s (load {load_average()})")
    start_up, step_s = fit_line(points)
    if step_s <= 0:
        raise RuntimeError(f"the short runs' walls {points} do not grow with the steps: a one-off cost (another job, "
                           "a rebuild) landed in the first; run --estimate again on idle cores")
    rack_steps = plan.steps()
    rack_wall = start_up + step_s * rack_steps
    return {"section": plan.section, "short_runs": points, "start_up_s": round(start_up, 1),
            "step_s": round(step_s, 4), "rackwise_steps": rack_steps, "rackwise_wall_s": round(rack_wall, 1),
            "study_minutes": round(study_seconds(rack_wall, len(plan.seeds)) / 60, 1), "load": load_average()}


# ----------------------------------------------------------------------------- report

def quality_table(q: dict) -> str:
    b = q["budget"]
    lines = [f"Budget: rackwise {b['rackwise_steps']} steps = {b['wall_s']:.0f} s launch to exit (the baseline, "
             f"{q['baseline']}: mean of {len(b['seeds'])} seeds; {b['non_embedding_parameters']} non-embedding "
             f"parameters, {b['tokens_per_parameter']:.1f} tokens per non-embedding parameter, "
             f"{b['tokens_per_parameter_all']:.1f} per parameter); the baseline's final mean val loss "
             f"{b['baseline_final_mean_val_loss']:.3f}, still falling {100 * b['baseline_last_quarter_gain']:.1f} % "
             f"over its last quarter ({100 * b['baseline_last_quarter_share_of_drop']:.1f} % of its whole drop); "
             f"rackwise (cosine) ends at {b['rackwise_final_mean_val_loss']:.3f}.", "",
             f"| mode | final val loss | val loss at equal wall | wall to {q['baseline']}'s final loss | "
             "FLOPs to it | per seed (wall) | wall to rackwise's (cosine) | run wall / budget | steps |",
             "|---|---|---|---|---|---|---|---|---|"]
    for mode, final in q["final_val_loss"].items():
        at_wall, d = q["val_loss_at_equal_wall"][mode], q["detail"][mode]
        steps = ", ".join(f"{k.split('.')[-1]} {s}" for k, s in d["steps"].items() if s)
        seeds = " / ".join(_ratio(r) for r in d["wall_to_baseline_final_loss_per_seed"])
        lines.append(f"| {mode} | {final['mean']:.3f} ± {final['sd']:.3f} | {at_wall['mean']:.3f} ± {at_wall['sd']:.3f}"
                     f" | {_ratio(q['wall_to_baseline_final_loss'][mode])} | "
                     f"{_ratio(q['flops_to_baseline_final_loss'][mode])} | {seeds} | "
                     f"{_ratio(q['wall_to_rackwise_final_loss'][mode])} | {d['run_wall_vs_budget']:.2f} | {steps} |")
    best = q["best_stagewise"]
    lines += ["", f"Best stage-wise mode: {best['mode']} at {_ratio(best['wall_to_baseline_final_loss'])}x the "
              f"baseline's wall (goal <= {best['goal_wall_ratio']}: {'met' if best['goal_met'] else 'not met'})."]
    return "\n".join(lines) + "\n"


def _ratio(value: float | None) -> str:
    return "never" if value is None else f"{value:.2f}"


def add_arguments(parser) -> None:
    parser.add_argument("--budget", choices=sorted(PLANS), default="long",
                        help="long (latest.json 'quality') or compute_limited ('quality_compute_limited')")
    parser.add_argument("--summarise-only", action="store_true",
                        help="rebuild the section from the runs a finished study kept (work dir runs.json)")
    parser.add_argument("--estimate", action="store_true",
                        help="2 short runs of the budget's rack: predicted study minutes (writes results/quick*)")


def main() -> None:
    args, name, log = section_cli(__doc__.splitlines()[0], add_arguments)
    plan = PLANS[args.budget]["quick" if args.quick else "full"]
    if args.estimate:
        estimate = estimate_study(PLANS[args.budget]["full"], Path(args.work_dir), log)
        (RESULTS_DIR / f"quick_estimate_{plan.section}.json").write_text(json.dumps(estimate, indent=1))
        print(json.dumps(estimate, indent=1))
        return
    require_plotting()
    start = time.perf_counter()
    if args.summarise_only:
        runs = json.loads(raw_runs_path(plan, Path(args.work_dir)).read_text())
        quality = summarise(runs, plan, plan.steps())
    else:
        quality = measure_quality(plan, Path(args.work_dir), log)
        quality["budget"]["study_seconds"] = round(time.perf_counter() - start, 1)
    from benchmarks.plots import plot_quality

    quality["plots"] = [str(Path(p).relative_to(RESULTS_DIR.parents[1]))
                        for p in plot_quality(quality, RESULTS_DIR / f"{name}_{plan.section}")]
    merge_results(name, {plan.section: quality}, plan.section, quality_table(quality))


if __name__ == "__main__":
    main()
