"""Shared pieces of the CPU benchmarks: the benchmark rack, the FLOP model, launching real
training runs and reading their TensorBoard scalars back.

Everything here is imported by ``benchmarks/run.py`` (the orchestrator) and by
``benchmarks/plain_torch.py`` (the plain PyTorch worker), so both sides train exactly
the same model on exactly the same batches.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from stackwise_ds.checkpoint.files import json_text

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "launch" / "train.py"
PINNED = REPO / "benchmarks" / "pinned.py"
RESULTS_DIR = REPO / "benchmarks" / "results"
DEFAULT_WORK_DIR = Path("/tmp/stackwise_bench")

# One torch thread per process everywhere: the machine has 2 cores shared with other jobs, and a
# 2-thread OpenMP team stalls badly whenever another process takes one core (steps seen to swing
# 0.3 s .. 15 s). One thread per process keeps every side of a ratio on the same footing.
TORCH_THREADS = 1

# The benchmark rack: small enough that ~a dozen training runs fit in 30 minutes on 2 cores,
# big enough that matrix work (not Python overhead) dominates a step. 4 stacks x 2 blocks so
# stackwise (4 phases) and blockwise (8 phases) differ; seq 128 with 8 x 4 micro-batches
# = 4096 tokens per optimizer step.
MODEL = {
    "model.d_model": 128, "model.n_heads": 4, "model.max_seq_len": 128,
    "model.architecture.n_stacks": 4, "model.architecture.blocks_per_stack": 2,
    "data.seq_len": 128,
    "training.micro_batch_size": 8, "training.gradient_accumulation_steps": 4,
    "training.progress_bar": False,
}


def overrides_list(values: dict) -> list[str]:
    """``{"a.b": 1}`` -> ``["a.b=1"]`` in the YAML syntax ``--set`` parses (lists as [x,y])."""
    def render(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if v is None:
            return "null"
        if isinstance(v, (list, tuple)):
            return "[" + ",".join(render(x) for x in v) + "]"
        return str(v)
    return [f"{key}={render(value)}" for key, value in values.items()]


def build_config(values: dict):
    """The StackWiseConfig that ``launch/train.py --set ...`` would resolve for ``values``."""
    from stackwise_ds.config import StackWiseConfig, apply_overrides

    return StackWiseConfig.from_dict(apply_overrides({}, overrides_list(values)))


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


# Benchmark runs build torch's JIT ops (DeepSpeed's CPU all-reduce) in a folder of this virtualenv's own: in the
# shared default folder (~/.cache/torch_extensions) a run from another checkout's virtualenv (tests, other
# benchmarks) rebuilds the op for itself, and this one's next run rebuilds it back, 20-50 s landing in the
# start-up of whichever timed run comes next (seen in the quality study's runs).
TORCH_EXTENSIONS_DIR = Path(sys.prefix) / "torch_extensions"


def bench_env(threads: int = TORCH_THREADS) -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(threads),
           "MKL_NUM_THREADS": str(threads)}
    env.setdefault("STACKWISE_DS_CACHE", str(DEFAULT_WORK_DIR / "cache"))
    env.setdefault("TORCH_EXTENSIONS_DIR", str(TORCH_EXTENSIONS_DIR))
    return env


def warm_torch_extensions() -> None:
    """Build (or just load) DeepSpeed's CPU shared-memory all-reduce op here, before any timed run.

    The build (20-50 s, once per virtualenv: ``TORCH_EXTENSIONS_DIR``) would otherwise land in the start-up of a
    section's first timed run. Nothing to do off CPU."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(TORCH_EXTENSIONS_DIR))  # where bench_env's runs look
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if accelerator.device_name() == "cpu":
        accelerator.create_op_builder("ShareMemCommBuilder").load(verbose=False)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ----------------------------------------------------------------------------- launching runs

@dataclass
class RunOutcome:
    output_dir: Path
    wall_s: float
    log: str


def train_command(values: dict, n_procs: int, cores: list[int] | None) -> tuple[list[str], dict]:
    """``python launch/train.py`` (1 process) or ``deepspeed --num_gpus N`` (N processes).

    With ``cores`` every rank is pinned to one core by ``benchmarks/pinned.py`` (the deepspeed
    launcher's own ``--bind_cores_to_rank`` needs numactl, which this machine lacks).
    """
    env = bench_env()
    script = str(TRAIN)
    if cores is not None:
        env["BENCH_CORES"] = ",".join(map(str, cores))
        script = str(PINNED)
    sets = [arg for item in overrides_list(values) for arg in ("--set", item)]
    if n_procs == 1:
        return [sys.executable, script, *sets], env
    launcher = str(Path(sys.executable).with_name("deepspeed"))
    return [launcher, "--num_gpus", str(n_procs), "--master_port", str(free_port()), script, *sets], env


def launch(values: dict, n_procs: int = 1, cores: list[int] | None = None, timeout_s: int = 900) -> RunOutcome:
    """Run one real training job to completion; raise with its log tail if it fails."""
    command, env = train_command(values, n_procs, cores)
    start = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout_s)
    wall = time.perf_counter() - start
    log = done.stdout + done.stderr
    if done.returncode != 0:
        raise RuntimeError(f"training run failed ({done.returncode}): {' '.join(command)}\n{log[-4000:]}")
    return RunOutcome(Path(values["training.output_dir"]), wall, log)


def start_background(values: dict) -> tuple[subprocess.Popen, float]:
    """Start one single-process training run without waiting (used to run 2 jobs side by side)."""
    command, env = train_command(values, 1, None)
    log = open(Path(values["training.output_dir"]).with_suffix(".log"), "w")
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT), time.perf_counter()


def run_module(module: str, args: list[str], timeout_s: int = 900) -> str:
    """``python -m <module> ARGS`` from the repository root (so ``benchmarks`` is importable)."""
    env = bench_env()
    done = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout_s)
    if done.returncode != 0:
        raise RuntimeError(f"{module} failed ({done.returncode}):\n{(done.stdout + done.stderr)[-4000:]}")
    return done.stdout


# ----------------------------------------------------------------------------- reading outputs

def read_scalars(output_dir: Path, tag: str) -> list[tuple[int, float, float]]:
    """``(step, value, wall_time)`` of one TensorBoard scalar series, in step order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(output_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    if tag not in events.Tags()["scalars"]:
        return []
    return sorted((e.step, e.value, e.wall_time) for e in events.Scalars(tag))


def scalar_tags(output_dir: Path) -> list[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(output_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    return list(events.Tags()["scalars"])


def read_results(output_dir: Path) -> dict:
    return json.loads((output_dir / "results.json").read_text())


def steady_step_times(output_dir: Path, first_step: int, last_step: int | None = None) -> list[float]:
    """``train/step_time_s`` of global steps ``first_step..last_step`` (1-based, inclusive)."""
    series = read_scalars(output_dir, "train/step_time_s")
    return [v for step, v, _ in series if step >= first_step and (last_step is None or step <= last_step)]


def optimizer_state_bytes(checkpoint_tag_dir: Path) -> dict[str, int]:
    """Bytes of optimizer state in one checkpoint tag, summed over every rank's shard.

    ``moments``: AdamW's exp_avg + exp_avg_sq; ``master``: ZeRO-1's fp32 partition
    (``single_partition_of_fp32_groups``; a separate fp32 copy even in fp32 training);
    ``total``: every tensor in the optimizer state dict.
    """
    import torch

    totals = {"moments": 0, "master": 0, "total": 0, "shards": 0}
    for shard in sorted(checkpoint_tag_dir.glob("*optim_states.pt")):
        state = torch.load(shard, map_location="cpu", weights_only=False)["optimizer_state_dict"]
        totals["shards"] += 1
        for per_param in state.get("base_optimizer_state", {}).get("state", {}).values():
            totals["moments"] += sum(t.numel() * t.element_size() for k, t in per_param.items()
                                     if k in ("exp_avg", "exp_avg_sq"))
        totals["master"] += sum(t.numel() * t.element_size() for t in state.get("single_partition_of_fp32_groups", []))
        totals["total"] += _tensor_bytes(state)
    return totals


def _tensor_bytes(obj) -> int:
    import torch

    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# ----------------------------------------------------------------------------- standalone sections

def section_cli(description: str, add_arguments: Callable[[argparse.ArgumentParser], None] | None = None
                ) -> tuple[argparse.Namespace, str, Callable[[str], None]]:
    """(--quick/--work-dir arguments and any ``add_arguments`` adds, results name 'quick' or 'latest', a
    timestamped logger) of a benchmark section run on its own (elastic.py, quality.py)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--work-dir", default=str(DEFAULT_WORK_DIR))
    if add_arguments is not None:
        add_arguments(parser)
    args = parser.parse_args()
    return args, "quick" if args.quick else "latest", lambda m: print(f"[bench {time.strftime('%H:%M:%S')}] {m}",
                                                                       flush=True)


def merge_results(name: str, update: dict, table_suffix: str, table: str) -> None:
    """Merge ``update`` into results/{name}.json (keeping the other sections), write its markdown table."""
    path = RESULTS_DIR / f"{name}.json"
    merged = json.loads(path.read_text()) if path.exists() else {}
    merged.update(update)
    path.write_text(json_text(merged, indent=1))  # strict JSON: a ratio with nothing to divide is null
    (RESULTS_DIR / f"{name}_{table_suffix}_table.md").write_text(table)
    print(table)



def write_labelled(out: Path, label: str, record: dict) -> None:
    """Merge ``record`` under ``label`` into the JSON file ``out`` (a before/after pair of one measurement)."""
    merged = json.loads(out.read_text()) if out.exists() else {}
    merged[label] = record
    out.write_text(json.dumps(merged, indent=1))
    print(json.dumps(record, indent=1))
    print(f"wrote {out}")
