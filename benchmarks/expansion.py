#!/usr/bin/env python
"""Expanding a pretrained rack (LLaMA Pro) against fine-tuning it, on a new corpus: continual pretraining.

    python -m benchmarks.expansion            # ~15 min on 2 idle cores; merges "expansion" into results/latest.json
    python -m benchmarks.expansion --quick    # mechanics only (tiny budget, 1 seed) -> results/quick.json

Corpus A is the embedded default (the standard library's Python sources); corpus B is the standard library's
non-Python text (its .txt, .rst and .html files: documentation, test data, licences), copied into the work dir. A
base rack (4 stacks of 1 block) trains on A; then every arm continues from its final weights (``init_from``) on B
for the same steps, data and learning rate, 2 ranks each pinned to a core:

* ``full``: full fine-tuning, everything trains;
* ``top``: only the top stack (and the final norm and head) trains: ``frozen_stacks: [0, 1, 2]``;
* ``expand``: LLaMA Pro's block expansion, 4 -> 6 stacks with a copy after every 2nd (``init_growth: interleave``,
  ``interleave_every: 2``, ``growth_init: identity``: the copies start as the identity), only the copies train
  (``freeze_source``, ``blocks_only``: the originals, embedding, norm and head stay frozen);
* ``expand_int8``: the same with the frozen originals held and run in int8 (``frozen_precision: int8``).

Reported per arm (mean and sd over seeds, which set the continuation's data order): the validation loss on B
(learning), on A and its increase over the base's (forgetting; measured with ``stackwise-eval``'s library on
A's own validation windows), the optimizer state (bytes in the checkpoint's shards, summed over ranks) and the
gradient buffers (4 bytes a trained parameter; ZeRO-1 keeps them whole on each replica), and the median step time.
The goal (DESIGN.md): expansion within 3 % of full fine-tuning's loss on B, at most half its loss increase on A,
and at most 0.5x its optimizer state.
"""

from __future__ import annotations

import shutil
import statistics
import sysconfig
import time
from pathlib import Path

from benchmarks.common import (
    MODEL,
    launch,
    merge_results,
    optimizer_state_bytes,
    read_results,
    section_cli,
    steady_step_times,
    warm_torch_extensions,
)

CORES = [0, 1]
BASE_SEED = 42  # training.seed's default: the base's weights, data order and validation split
BASE_MODEL = {**MODEL, "model.architecture.n_stacks": 4, "model.architecture.blocks_per_stack": 1,
              "parallel.pipeline_stages": 1, "training.eval_interval": 0, "training.eval_batches": 16,
              "training.save_interval": 0, "training.log_interval": 10, "data.max_bytes": 6_000_000}
ARMS = {
    "full": {},
    "top": {"training.frozen_stacks": [0, 1, 2]},
    "expand": {"model.architecture.n_stacks": 6, "training.init_growth": "interleave", "training.interleave_every": 2,
               "training.growth_init": "identity", "training.freeze_source": True, "training.blocks_only": True},
}
ARMS["expand_int8"] = {**ARMS["expand"], "training.frozen_precision": "int8"}
PLANS = {"full": {"base_steps": 500, "steps": 200, "seeds": [1, 2, 3]},
         "quick": {"base_steps": 20, "steps": 10, "seeds": [1]}}
CORPUS_B_SUFFIXES = (".txt", ".rst", ".html")


def corpus_b(work: Path) -> Path:
    """The standard library's non-Python text files, copied into one folder (sorted names, so the same order)."""
    root, folder = Path(sysconfig.get_paths()["stdlib"]), work / "corpus_b"
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in CORPUS_B_SUFFIXES
                   and "site-packages" not in p.parts)
    for i, path in enumerate(files):
        shutil.copyfile(path, folder / f"{i:04d}_{path.name}")
    return folder


def arm_values(arm: str, base: Path, data_b: Path, steps: int, seed: int, out: Path) -> dict:
    return {**BASE_MODEL, "data.source": "text_files", "data.paths": [str(data_b)], "data.max_bytes": None,
            "training.init_from": str(base), "training.max_steps": steps, "training.seed": seed,
            "training.warmup_steps": max(1, steps // 20), "training.output_dir": str(out), **ARMS[arm]}


def measure_arm(arm: str, base: Path, data_b: Path, plan: dict, seed: int, work: Path) -> dict:
    from stackwise_ds.checkpoint import evaluate

    out = work / f"{arm}_seed{seed}"
    shutil.rmtree(out, ignore_errors=True)
    run = launch(arm_values(arm, base, data_b, plan["steps"], seed, out), n_procs=2, cores=CORES)
    phase = read_results(out)["phases"][0]
    tag = sorted((out / "checkpoints").glob("step*"))[-1]
    trained = sum(p.numel() for p in _trained_parameters(out))
    return {"val_loss_b": phase["val_loss_after"], "val_loss_b_before": phase["val_loss_before"],
            "val_loss_a": evaluate(out, overrides=_corpus_a_overrides()).loss,
            "optimizer_bytes": optimizer_state_bytes(tag)["total"], "gradient_bytes": 4 * trained,
            "trained_parameters": trained, "step_time_s": statistics.median(steady_step_times(out, 3)),
            "wall_s": round(run.wall_s, 1)}


def _corpus_a_overrides() -> list[str]:
    """The base's data and seed: corpus A's validation windows exactly as the base held them out (the split follows
    training.seed, which differs per continuation)."""
    return ["data.source=stdlib", "data.paths=[]", f"data.max_bytes={BASE_MODEL['data.max_bytes']}",
            f"training.seed={BASE_SEED}"]


def _trained_parameters(run: Path):
    """The parameters the run's arm trains, from its final config: the roles of its one phase."""
    import torch

    from stackwise_ds.config import StackWiseConfig
    from stackwise_ds.layout import TRAIN, layer_units
    from stackwise_ds.model import build_rack
    from stackwise_ds.phases import plan_phases
    from stackwise_ds.training.init_weights import source_frozen_stacks

    config = StackWiseConfig.from_yaml(run / "config.yaml")
    arch = config.model.architecture
    units = layer_units(arch.n_stacks, arch.blocks_per_stack)
    roles = plan_phases(config, tuple(source_frozen_stacks(run, config.training)))[0].layer_roles(units)
    with torch.device("meta"):
        rack = build_rack(config.model, config.training.seed)
    return [p for i, unit in enumerate(units) if roles[i] == TRAIN
            for p in rack.get_submodule(unit.rack_prefix.rstrip(".")).parameters()]


def summarise(arms: dict[str, list[dict]], base_loss_a: float) -> dict:
    summary = {}
    for arm, runs in arms.items():
        row = {}
        for key in runs[0]:
            values = [run[key] for run in runs]
            row[key] = round(statistics.mean(values), 5)
            row[f"{key}_sd"] = round(statistics.stdev(values), 5) if len(values) > 1 else 0.0
        row["forgetting"] = round(row["val_loss_a"] - base_loss_a, 5)
        summary[arm] = row
    full = summary["full"]
    for row in summary.values():
        row["val_loss_b_vs_full"] = round(row["val_loss_b"] / full["val_loss_b"], 4)
        row["forgetting_vs_full"] = round(row["forgetting"] / full["forgetting"], 4) if full["forgetting"] else None
        row["optimizer_vs_full"] = round(row["optimizer_bytes"] / full["optimizer_bytes"], 4)
    return summary


def measure_expansion(plan: dict, work: Path, log) -> dict:
    from stackwise_ds.checkpoint import evaluate

    warm_torch_extensions()
    work.mkdir(parents=True, exist_ok=True)
    data_b = corpus_b(work)
    base = work / "base"
    shutil.rmtree(base, ignore_errors=True)
    log(f"base: {plan['base_steps']} steps on corpus A")
    launch({**BASE_MODEL, "training.max_steps": plan["base_steps"], "training.output_dir": str(base)},
           n_procs=2, cores=CORES)
    base_loss_a = evaluate(base, overrides=_corpus_a_overrides()).loss  # the same measure as every arm's
    arms: dict[str, list[dict]] = {arm: [] for arm in ARMS}
    for seed in plan["seeds"]:  # seed-major: slow drifts of the machine spread over every arm
        for arm in ARMS:
            log(f"{arm} seed {seed}")
            arms[arm].append(measure_arm(arm, base, data_b, plan, seed, work))
    return {"budget": {**plan, "base_val_loss_a": base_loss_a, "corpus_b_files": len(list(data_b.iterdir())),
                       "ranks": 2, "pinned_cores": CORES},
            "arms": summarise(arms, base_loss_a), "runs": arms}


def expansion_table(expansion: dict) -> str:
    lines = ["| arm | val loss B (vs full) | val loss A | forgetting (vs full) | optimizer MB (vs full) | grads MB | "
             "step s |", "|---|---|---|---|---|---|---|"]
    for arm, row in expansion["arms"].items():
        lines.append(f"| {arm} | {row['val_loss_b']:.4f} ({row['val_loss_b_vs_full']:.3f}) | {row['val_loss_a']:.4f} | "
                     f"{row['forgetting']:+.4f} ({row['forgetting_vs_full']}) | "
                     f"{row['optimizer_bytes'] / 2**20:.2f} ({row['optimizer_vs_full']:.3f}) | "
                     f"{row['gradient_bytes'] / 2**20:.2f} | {row['step_time_s']:.3f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    args, name, log = section_cli(__doc__.splitlines()[0])
    start = time.perf_counter()
    expansion = measure_expansion(PLANS["quick" if args.quick else "full"], Path(args.work_dir) / "expansion", log)
    expansion["budget"]["study_seconds"] = round(time.perf_counter() - start, 1)
    merge_results(name, {"expansion": expansion}, "expansion", expansion_table(expansion))


if __name__ == "__main__":
    main()
