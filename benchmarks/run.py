#!/usr/bin/env python
"""StackWise-DS CPU benchmarks: every figure of DESIGN.md's "Figures to reach" that a CPU can measure.

    python -m benchmarks.run            # full run (~54 min on 2 idle cores) -> benchmarks/results/latest.json
    python -m benchmarks.run --quick    # smoke run (~12 min)               -> benchmarks/results/quick.json

Writes the JSON, two PNGs (validation loss vs FLOPs and vs training time) and a markdown
table next to it. Real training runs go through ``launch/train.py`` (the trainer, with
DeepSpeed); the baseline is ``benchmarks/plain_torch.py``. Scratch outputs go to
``--work-dir`` (default /tmp/stackwise_bench). docs/benchmarks.md says how to read them.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

from benchmarks.common import DEFAULT_WORK_DIR, MODEL, RESULTS_DIR, TORCH_THREADS, load_average
from benchmarks.elastic import FULL_STEPS, QUICK_STEPS, measure_elastic
from benchmarks.frozen_precision import FULL as FROZEN_FULL
from benchmarks.frozen_precision import QUICK as FROZEN_QUICK
from benchmarks.frozen_precision import frozen_precision_table, measure_frozen_precision
from benchmarks.modes import ModesPlan, measure_modes
from benchmarks.plots import plot_modes, plot_quality
from benchmarks.quality import PLANS as QUALITY_PLANS
from benchmarks.quality import measure_quality, quality_table
from benchmarks.report import markdown_table
from benchmarks.stack_cache import FULL_BYTES, QUICK_BYTES, measure_stack_cache, stack_cache_table
from benchmarks.timing import TimingPlan, measure_pipeline, measure_throughput
from stackwise_ds.checkpoint.files import json_text

# Full: 3 interleaved repetitions (a median needs 3), 20 timed steps of which 5 warm up
# (allocator, autograd graph caches and the first LR steps settle within ~3 steps).
# Quick: one repetition of everything, shorter runs, one seed.
PLANS = {
    "full": dict(timing=TimingPlan(steps=20, warmup=5, reps=3),
                 modes=ModesPlan(budget_steps=64, seeds=(0, 1, 2), warmup_steps=5)),
    "quick": dict(timing=TimingPlan(steps=8, warmup=3, reps=1),
                  modes=ModesPlan(budget_steps=16, seeds=(0,), warmup_steps=2)),
}


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


def section(name: str, fn, meta: dict):
    log(f"{name} (load {load_average()})")
    start = time.perf_counter()
    result = fn()
    meta["sections"][name] = {"seconds": round(time.perf_counter() - start, 1), "load_after": load_average()}
    return result


def machine_meta(kind: str) -> dict:
    import deepspeed
    import torch

    return {"kind": kind, "started": time.strftime("%Y-%m-%d %H:%M:%S"), "cpu_count": os.cpu_count(),
            "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "deepspeed": deepspeed.__version__, "torch_threads_per_process": TORCH_THREADS,
            "model": MODEL, "load_at_start": load_average(), "sections": {}}


def run(kind: str, work: Path) -> dict:
    plan = PLANS[kind]
    meta = machine_meta(kind)
    os.environ.setdefault("STACKWISE_DS_CACHE", str(work / "cache"))
    start = time.perf_counter()
    throughput = section("trainer vs plain torch, stackwise vs rackwise",
                         lambda: measure_throughput(plan["timing"], work, log), meta)
    pipeline = section("pipeline pp=2 vs pp=1",
                       lambda: measure_pipeline(plan["timing"], work,
                                                throughput["detail"]["components_median_s"], log), meta)
    modes = section("modes at equal FLOPs", lambda: measure_modes(plan["modes"], work, log), meta)
    elastic = section("elastic vs fixed phase layout, 2 pinned ranks",
                      lambda: measure_elastic(QUICK_STEPS if kind == "quick" else FULL_STEPS, work, log), meta)
    frozen = section("frozen stacks in fp32, bf16 and int8, 2 pinned ranks",
                     lambda: measure_frozen_precision(FROZEN_QUICK if kind == "quick" else FROZEN_FULL, work, log),
                     meta)
    cache = section("stack cache off vs disk, greedy with phase_data repeat, 2 pinned ranks",
                    lambda: measure_stack_cache(QUICK_BYTES if kind == "quick" else FULL_BYTES, work, log), meta)
    quality = section("quality at equal wall-clock, 2 pinned ranks",
                      lambda: measure_quality(QUALITY_PLANS["long"][kind], work, log), meta)
    meta["total_seconds"] = round(time.perf_counter() - start, 1)
    return {**assemble(meta, throughput, pipeline, modes), **elastic, "frozen_precision": frozen,
            "stack_cache": cache, "quality": quality}


def assemble(meta: dict, throughput: dict, pipeline: dict, modes: dict) -> dict:
    """Headline numbers at the top level; everything they were computed from under ``*_detail``."""
    result = {key: value for key, value in throughput.items() if key != "detail"}
    result.update({key: value for key, value in pipeline.items() if key != "detail"})
    result.update({key: value for key, value in modes.items() if key != "modes_detail"})
    result["peak_rss_mb"] = {**modes["peak_rss_mb"],
                             **{f"rackwise_pp2_stage{s}": v for s, v in _pp2_rss(pipeline).items()}}
    result["throughput_detail"] = throughput["detail"]
    result["pipeline_detail"] = pipeline["detail"]
    result["modes_detail"] = modes["modes_detail"]
    result["meta"] = meta
    return result


def _pp2_rss(pipeline: dict) -> dict[int, float]:
    reps = pipeline["detail"]["per_rep"]
    stages = reps[0]["pp2"]["peak_rss_mb"]
    return {int(tag.split("stage")[1].split("_")[0]): max(r["pp2"]["peak_rss_mb"][tag] for r in reps) for tag in stages}


def main() -> None:
    parser = argparse.ArgumentParser(description="StackWise-DS CPU benchmarks")
    parser.add_argument("--quick", action="store_true", help="smoke run, about 12 minutes -> results/quick.json")
    parser.add_argument("--work-dir", default=str(DEFAULT_WORK_DIR), help="scratch training outputs")
    args = parser.parse_args()
    kind = "quick" if args.quick else "full"
    name = "quick" if args.quick else "latest"
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    result = run(kind, Path(args.work_dir))
    result["plots"] = [str(Path(p).relative_to(RESULTS_DIR.parents[1]))
                       for p in plot_modes(result, RESULTS_DIR / name)]
    result["quality"]["plots"] = [str(Path(p).relative_to(RESULTS_DIR.parents[1]))
                                  for p in plot_quality(result["quality"], RESULTS_DIR / f"{name}_quality")]
    (RESULTS_DIR / f"{name}_quality_table.md").write_text(quality_table(result["quality"]))
    (RESULTS_DIR / f"{name}_frozen_precision_table.md").write_text(frozen_precision_table(result["frozen_precision"]))
    (RESULTS_DIR / f"{name}_stack_cache_table.md").write_text(stack_cache_table(result["stack_cache"]))
    (RESULTS_DIR / f"{name}.json").write_text(json_text(result, indent=1))
    (RESULTS_DIR / f"{name}_table.md").write_text(markdown_table(result))
    log(f"wrote {RESULTS_DIR / f'{name}.json'} in {result['meta']['total_seconds']:.0f} s")
    print(markdown_table(result))


if __name__ == "__main__":
    main()
