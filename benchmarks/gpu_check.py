#!/usr/bin/env python3
"""The steps of ``benchmarks/gpu_check.sh`` (one GPU check, one results file), and their assembly.

    python3 -m benchmarks.gpu_check preflight --dir D [--cpu-smoke]                    # versions; exit 1: stop
    python3 -m benchmarks.gpu_check step NAME --dir D --work W --limit S [--cpu-smoke]  # one step -> D/NAME.json
    python3 -m benchmarks.gpu_check assemble --dir D --out FILE [--cpu-smoke]           # every record -> FILE

``--dir`` holds the records and every log (``$OUT`` or ``benchmarks/results``), ``--work`` the runs themselves
(checkpoints, the stack cache: gigabytes, deleted by gpu_check.sh). Steps (each records ``passed``, its figures and
any error; a failing step does not stop the next):

* ``int8_kernel``: an int8 frozen layer's matmul (``precision.int8_matmul``) on CUDA with bf16 activations, at a
  training micro-batch's rows, against the bf16 matmul: the path it takes (``int8_path``: dequantize to bf16 for
  cuBLAS above ``CUDA_PACKED_MAX_ROWS`` rows), its error, both timings; torch's packed kernel is timed beside them.
  It fails above ``INT8_MAX_VS_BF16``;
* ``stackwise_same``: a bf16 stackwise run (``prefix: frozen``), elastic layout, world size 1 over NCCL through the
  launcher (``deepspeed --num_gpus 1 launch/train.py``); the backend DeepSpeed reports is recorded, and each phase
  change's engine start (re-placement, engine, process groups; ``engine_start_s`` in results.json);
* ``stackwise_int8``: the same run with ``training.frozen_precision`` int8 (``bf16`` would repeat ``same`` on a
  bf16 run: not run);
* ``gpu_mfu``: ``python3 -m benchmarks.gpu`` (the ~124M rack's bf16 tokens/s and MFU), short;
* ``stack_cache``: a greedy run with ``phase_data: repeat`` and 2 epochs a phase, ``stack_cache`` off and disk
  (its default storage, the activations' own dtype).

``--cpu-smoke`` runs every step with tiny fp32 runs on CPU (gloo, not NCCL): a check of the plumbing, not a
measurement.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

from benchmarks.common import REPO, TRAIN, bench_env, free_port, median, overrides_list, read_results
from benchmarks.common import steady_step_times as step_times
from benchmarks.frozen_precision import logged_frozen_mb

STEPS = ("int8_kernel", "stackwise_same", "stackwise_int8", "gpu_mfu", "stack_cache")
# What a world of one GPU cannot exercise: said in the file, never claimed as verified.
NOT_TESTED_ON_ONE_GPU = [
    "pipeline sends and receives between stages over NCCL (one rank: every phase is one stage)",
    "relay stages (a dormant stage passing activations and gradients on)",
    "the tied-weight broadcast and all-reduce between the embedding's and the head's stages",
    "process groups and NCCL communicators re-created across ranks at a phase change (here for one rank only)",
]
# A rack whose blocks are matrix-bound on a GPU (8 blocks of width 1024, ~100M parameters in blocks), byte tokens
# (no tokenizer to train), 32k tokens a step; 4 MB of the stdlib source keeps the data build short.
GPU_RUN = {"model.d_model": 1024, "model.n_heads": 16, "model.max_seq_len": 512,
           "model.architecture.n_stacks": 4, "model.architecture.blocks_per_stack": 2, "data.seq_len": 512,
           "training.micro_batch_size": 16, "training.gradient_accumulation_steps": 4, "training.precision": "bf16",
           "data.max_bytes": 4_000_000, "training.steps_per_phase": 20}
CPU_RUN = {"model.d_model": 64, "model.n_heads": 4, "model.max_seq_len": 64,
           "model.architecture.n_stacks": 2, "model.architecture.blocks_per_stack": 1, "data.seq_len": 64,
           "training.micro_batch_size": 2, "training.gradient_accumulation_steps": 2, "training.precision": "fp32",
           "data.max_bytes": 200_000, "training.steps_per_phase": 4}
COMMON = {"training.training_architecture": "stackwise", "training.prefix": "frozen",
          "parallel.phase_layout": "elastic", "training.warmup_steps": 2, "training.eval_interval": 0,
          "training.eval_batches": 4, "training.save_interval": 0, "training.progress_bar": False}
# a split of ~20 (GPU: 64 windows of 512 a step; 68 held out fill the 4 x 16 validation windows) / ~15 (CPU) steps
# an epoch; on the GPU the fp32 cache takes ~2.7 GB of disk under the work folder
CACHE_BYTES = {"gpu": 700_000, "cpu": 4_000}
WARMUP = 3  # first steps of a phase left out of its median (CUDA autotuning, allocator growth)
INT8_REL_TOLERANCE = 0.03
INT8_MAX_VS_BF16 = 1.2  # an int8 frozen layer's matmul may take at most this times the bf16 one (issue 27)


@dataclasses.dataclass
class Context:
    work: Path  # the runs' output dirs
    logs: Path  # the records dir: every log goes there
    limit_s: float
    cpu_smoke: bool

    @property
    def run(self) -> dict:
        return {**COMMON, **(CPU_RUN if self.cpu_smoke else GPU_RUN)}


# ----------------------------------------------------------------------------- processes


class StepTimeout(RuntimeError):
    pass


def run_logged(command: list[str], env: dict, log_path: Path, limit_s: float) -> str:
    """Run ``command`` in its own session (so a timeout ends the launcher and its ranks alike); its output."""
    with open(log_path, "w") as log:
        child = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                 start_new_session=True)
        def on_term(*_):  # gpu_check.sh's timeout ends this helper: end the run's session with it
            _kill(child)
            sys.exit(143)
        signal.signal(signal.SIGTERM, on_term)
        try:
            rc = child.wait(timeout=max(limit_s, 1))
        except subprocess.TimeoutExpired:
            _kill(child)
            raise StepTimeout(f"still running after {limit_s:.0f} s: stopped") from None
    text = log_path.read_text(errors="replace")
    if rc != 0:
        raise RuntimeError(f"exit {rc}: {' '.join(command[:4])} ...\n{text[-3000:]}")
    return text


def _kill(child: subprocess.Popen) -> None:
    try:
        os.killpg(child.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    child.wait()


def train_on_one_device(values: dict, ctx: Context, name: str, verbose: bool = False) -> tuple[Path, str, float]:
    """``deepspeed --num_gpus 1 launch/train.py --set ...``: (output dir, log, wall seconds)."""
    out = ctx.work / name
    values = {**values, "training.output_dir": str(out)}
    launcher = Path(sys.executable).with_name("deepspeed")  # this interpreter's, else the one on PATH
    launcher = str(launcher) if launcher.exists() else (shutil.which("deepspeed") or "deepspeed")
    sets = [arg for item in overrides_list(values) for arg in ("--set", item)]
    command = [launcher, "--num_gpus", "1", "--master_port", str(free_port()), str(TRAIN), *sets]
    env = bench_env(threads=1 if ctx.cpu_smoke else 8)
    if verbose:
        env["STACKWISE_VERBOSE"] = "1"  # DeepSpeed's own INFO lines name the backend
    start = time.perf_counter()
    log = run_logged(command, env, ctx.logs / f"{name}.train.log", ctx.limit_s)
    return out, log, time.perf_counter() - start


# ----------------------------------------------------------------------------- figures of a run


def run_figures(out: Path, values: dict, log: str, wall_s: float) -> dict:
    """Per phase the median step and tokens/s; the final validation loss; the frozen layers' logged MB."""
    tokens = values["training.micro_batch_size"] * values["training.gradient_accumulation_steps"] * \
        values["data.seq_len"]
    phases = []
    for phase in read_results(out)["phases"]:
        first, last = phase["start_global_step"] + 1, phase["end_global_step"]
        steps = step_times(out, first + min(WARMUP, max(last - first - 1, 0)), last)
        step_s = median(steps)
        phases.append({"phase": phase["name"], "median_step_s": round(step_s, 5),
                       "tokens_per_s": round(tokens / step_s, 1) if step_s > 0 else None,
                       "val_loss_after": phase["val_loss_after"], "stages": phase["layout"]["pipeline_stages"],
                       "engine_start_s": phase.get("engine_start_s")})
    last = phases[-1]
    changes = [p["engine_start_s"] for p in phases[1:] if p["engine_start_s"] is not None]
    return {"final_val_loss": last["val_loss_after"], "last_phase_step_s": last["median_step_s"],
            "last_phase_tokens_per_s": last["tokens_per_s"], "tokens_per_step": tokens, "phases": phases,
            "phase_change_s": round(median(changes), 3) if changes else None,
            "frozen_logged_mb": logged_frozen_mb(log, last["stages"]), "run_wall_s": round(wall_s, 1)}


# ----------------------------------------------------------------------------- steps


def step_int8_kernel(ctx: Context) -> dict:
    import torch
    import torch.nn.functional as F

    from stackwise_ds.parallel import precision

    device = torch.device("cpu" if ctx.cpu_smoke else "cuda")
    n, d_in, d_out = (64, 64, 256) if ctx.cpu_smoke else (8192, 1024, 4096)  # a micro-batch of 16 x 512 tokens
    gen = torch.Generator(device="cpu").manual_seed(0)
    weight = (torch.randn(d_out, d_in, generator=gen) * 0.02).to(device)
    x = torch.randn(n, d_in, generator=gen).to(device=device, dtype=torch.bfloat16)
    q, scales = precision.quantize_int8(weight)
    q, scales, bf16_weight = q.to(device), scales.to(device), weight.to(torch.bfloat16)
    out = precision.int8_matmul(x, q, scales)
    reference = F.linear(x, bf16_weight)
    rel = float((out.float() - reference.float()).norm() / reference.float().norm())
    figures = {"device": str(device), "shape": [n, d_in, d_out], "rel_err_vs_bf16_matmul": round(rel, 5),
               "path": precision.int8_path(device.type, torch.bfloat16, n),
               "int8_ms": _time_ms(lambda: precision.int8_matmul(x, q, scales), device),
               "bf16_ms": _time_ms(lambda: F.linear(x, bf16_weight), device)}
    try:  # torch's packed kernel at the same rows: what int8 took here before issue 27
        figures["packed_kernel_ms"] = _time_ms(lambda: torch._weight_int8pack_mm(x, q, scales.to(x.dtype)), device)
    except (AttributeError, RuntimeError, NotImplementedError) as exc:
        figures["packed_kernel_ms"] = f"did not run: {exc}"[:200]
    figures["int8_vs_bf16_time"] = round(figures["int8_ms"] / figures["bf16_ms"], 3)
    problems = []
    if rel > INT8_REL_TOLERANCE:
        problems.append(f"relative error {rel:.4f} > {INT8_REL_TOLERANCE}")
    if not ctx.cpu_smoke and figures["int8_vs_bf16_time"] > INT8_MAX_VS_BF16:
        problems.append(f"int8 takes {figures['int8_vs_bf16_time']}x the bf16 matmul (> {INT8_MAX_VS_BF16}x)")
    return {"figures": figures, "problems": problems}


def _time_ms(fn, device, repeats: int = 20) -> float:
    import torch

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()
    for _ in range(5):  # first calls: kernel selection, JIT, allocator
        fn()
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return round((time.perf_counter() - start) / repeats * 1e3, 4)


def stackwise_step(precision_name: str):
    def step(ctx: Context) -> dict:
        values = {**ctx.run, "training.frozen_precision": precision_name}
        verbose = precision_name == "same"
        out, log, wall = train_on_one_device(values, ctx, f"stackwise_{precision_name}", verbose=verbose)
        figures = run_figures(out, values, log, wall)
        problems = []
        if verbose:
            backends = sorted(set(re.findall(r"with backend (\w+)", log)))
            figures["backend"] = backends
            if not ctx.cpu_smoke and backends != ["nccl"]:
                problems.append(f"backend {backends}, expected ['nccl']")
        if precision_name == "int8" and figures["frozen_logged_mb"] is None:
            problems.append("no stage logged a frozen int8 conversion")
        return {"figures": figures, "problems": problems}
    return step


def step_gpu_mfu(ctx: Context) -> dict:
    args = ["--cpu-smoke", "--steps", "6", "--warmup", "2"] if ctx.cpu_smoke else \
        ["--steps", "30", "--warmup", "10", "--max-bytes", "8000000"]
    out = ctx.work / "gpu.json"
    command = [sys.executable, "-m", "benchmarks.gpu", *args, "--out", str(out)]
    log = run_logged(command, bench_env(threads=8), ctx.logs / "gpu_mfu.train.log", ctx.limit_s)
    wrote = re.findall(r"^wrote (.+)$", log, flags=re.MULTILINE)
    result = json.loads(Path(wrote[-1]).read_text())
    keep = ("device", "tokens_per_s", "mfu_vs_h100_sxm_bf16", "mfu_vs_device_peak", "median_step_s",
            "achieved_model_tflops", "parameters", "peak_cuda_mb", "steps", "warmup_steps_dropped", "run_wall_s")
    return {"figures": {k: result.get(k) for k in keep}, "problems": []}


def step_stack_cache(ctx: Context) -> dict:
    from stackwise_ds.config import TrainingConfig

    if "stack_cache" not in {f.name for f in dataclasses.fields(TrainingConfig)}:
        return {"skipped": "this checkout has no training.stack_cache"}
    from benchmarks.stack_cache import EPOCHS, epoch_steps, training_windows, yaml_string

    base = {**ctx.run, "training.phase_data": "repeat", "data.val_fraction": 0.05,
            "data.max_bytes": CACHE_BYTES["cpu" if ctx.cpu_smoke else "gpu"]}
    windows = training_windows(base)
    epoch = epoch_steps(windows, base["training.micro_batch_size"] * base["training.gradient_accumulation_steps"])
    base["training.steps_per_phase"] = EPOCHS * epoch
    figures, losses = {"training_windows": windows, "epoch_steps": epoch}, {}
    for cache in ("off", "disk"):
        values = {**base, "training.stack_cache": yaml_string(cache)}
        out, log, wall = train_on_one_device(values, ctx, f"stack_cache_{cache}")
        figures[cache] = run_figures(out, values, log, wall)
        figures[cache]["cache_log"] = [line for line in log.splitlines() if "stack cache" in line.lower()][:5]
        losses[cache] = read_results(out)["losses"]
    figures["wall_vs_off"] = round(figures["disk"]["run_wall_s"] / figures["off"]["run_wall_s"], 3)
    figures["losses_bitwise_equal"] = losses["off"] == losses["disk"]
    return {"figures": figures, "problems": []}


STEP_FUNCTIONS = {"int8_kernel": step_int8_kernel, "stackwise_same": stackwise_step("same"),
                  "stackwise_int8": stackwise_step("int8"), "gpu_mfu": step_gpu_mfu, "stack_cache": step_stack_cache}


def run_step(name: str, ctx: Context) -> dict:
    start = time.perf_counter()
    try:
        record = STEP_FUNCTIONS[name](ctx)
        record["passed"] = None if "skipped" in record else not record["problems"]
        record["error"] = "; ".join(record.pop("problems", [])) or None
    except Exception as exc:  # a failing step is a record, not the end of the check
        record = {"passed": False, "error": f"{type(exc).__name__}: {exc}"[-4000:],
                  "traceback": traceback.format_exc()[-3000:]}
    record["seconds"] = round(time.perf_counter() - start, 1)
    return record


# ----------------------------------------------------------------------------- assembly


def step_record(directory: Path, name: str) -> dict:
    """The step's own record, else what the shell left: skipped for time, or killed/crashed with its log tail."""
    own = directory / f"{name}.json"
    if own.exists():
        return json.loads(own.read_text())
    skipped = directory / f"{name}.skipped"
    if skipped.exists():
        return {"passed": None, "skipped": skipped.read_text().strip()}
    rc_file, log_file = directory / f"{name}.rc", directory / f"{name}.log"
    rc = rc_file.read_text().strip() if rc_file.exists() else "?"
    why = "timed out (gpu_check.sh's limit for the step)" if rc in ("124", "137") else f"exit {rc}, no record"
    tail = log_file.read_text(errors="replace")[-3000:] if log_file.exists() else ""
    return {"passed": False, "error": why, "log_tail": tail}


def summary(steps: dict) -> dict:
    """Cross-step figures: int8/bf16 against same (step time, final val loss)."""
    def fig(name, key):
        return (steps.get(name) or {}).get("figures", {}).get(key)
    out = {}
    same_step, same_loss = fig("stackwise_same", "last_phase_step_s"), fig("stackwise_same", "final_val_loss")
    out["phase_change_s"] = fig("stackwise_same", "phase_change_s")
    out["int8_matmul_vs_bf16"] = fig("int8_kernel", "int8_vs_bf16_time")
    for p in ("int8",):
        step, loss = fig(f"stackwise_{p}", "last_phase_step_s"), fig(f"stackwise_{p}", "final_val_loss")
        if step and same_step:
            out[f"{p}_step_vs_same"] = round(step / same_step, 3)
        if loss is not None and same_loss is not None:
            out[f"{p}_val_loss_delta"] = round(loss - same_loss, 4)
    for key in ("tokens_per_s", "mfu_vs_h100_sxm_bf16", "mfu_vs_device_peak"):
        out[f"gpu_{key}"] = fig("gpu_mfu", key)
    out["stack_cache_wall_vs_off"] = fig("stack_cache", "wall_vs_off")
    return out


def environment() -> dict:
    import torch

    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}
    try:
        import deepspeed

        info["deepspeed"] = deepspeed.__version__
    except Exception as exc:  # the check still reports the rest
        info["deepspeed"] = f"not importable: {exc}"
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout
    except OSError:  # no git on the node: the copied checkout says nothing
        commit = ""
    info["commit"] = commit.strip() or None
    return info


def assemble(directory: Path, out: Path, cpu_smoke: bool, total_s: float) -> dict:
    steps = {name: step_record(directory, name) for name in STEPS}
    result = {"kind": "cpu smoke (not a measurement)" if cpu_smoke else "gpu", "measured_at": time.strftime(
        "%Y-%m-%d %H:%M:%S"), "total_limit_s": total_s, **environment(), "passed": {
        name: record.get("passed") for name, record in steps.items()}, "summary": summary(steps),
        "not_tested_on_one_gpu": NOT_TESTED_ON_ONE_GPU,
        "nccl": "the backend of a world of one: no collective moved data between GPUs, so NCCL is not verified",
        "preflight": _read_json(directory / "preflight.json"), "steps": steps}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    return result


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def _version_of(module: str) -> str:
    """The version of an importable module, or why it cannot be imported."""
    import importlib

    try:
        return str(getattr(importlib.import_module(module), "__version__", "importable"))
    except Exception as exc:  # any import failure is what the preflight reports
        return f"NOT importable: {type(exc).__name__}: {exc}"[:300]


def preflight(records: Path, cpu_smoke: bool) -> int:
    """Print python, torch, CUDA, NCCL, DeepSpeed and datasets versions; 1 (stop) when one the check needs is
    missing: a GPU run without CUDA or NCCL, or a package that does not import."""
    import torch

    cuda = torch.cuda.is_available()
    info = {"python": sys.version.split()[0], "torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "cuda_available": cuda, "gpus": torch.cuda.device_count() if cuda else 0,
            "device": torch.cuda.get_device_name(0) if cuda else "cpu",
            "nccl": ".".join(map(str, torch.cuda.nccl.version())) if cuda and torch.distributed.is_nccl_available()
            else None}
    info.update({module: _version_of(module) for module in ("deepspeed", "datasets", "stackwise_ds")})
    problems = [f"{module}: {info[module]}" for module in ("deepspeed", "datasets", "stackwise_ds")
                if info[module].startswith("NOT")]
    if not problems:
        from stackwise_ds.parallel.compat import check_deepspeed

        try:
            check_deepspeed()
        except Exception as exc:  # its message names the versions and the fix
            problems.append(str(exc))
    if not cpu_smoke and not cuda:
        problems.append("CUDA is not available (torch.cuda.is_available() is False): a CUDA build of torch and a "
                        "visible GPU are needed (or run --cpu-smoke)")
    elif not cpu_smoke and info["nccl"] is None:
        problems.append("this torch has no NCCL: DeepSpeed's GPU backend needs it")
    for key, value in info.items():
        print(f"[preflight] {key}: {value}")
    (records / "preflight.json").write_text(json.dumps({**info, "problems": problems}, indent=1))
    for problem in problems:
        print(f"[preflight] STOP: {problem}")
    return 1 if problems else 0


def main() -> None:
    parser = argparse.ArgumentParser(description="steps of benchmarks/gpu_check.sh")
    parser.add_argument("command", choices=("preflight", "step", "assemble"))
    parser.add_argument("name", nargs="?", choices=STEPS)
    parser.add_argument("--dir", type=Path, required=True, help="the records and logs")
    parser.add_argument("--work", type=Path, help="where a step's runs go (their checkpoints, the stack cache)")
    parser.add_argument("--limit", type=float, default=300.0, help="seconds this step may take")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--total-limit", type=float, default=0.0)
    parser.add_argument("--cpu-smoke", action="store_true")
    args = parser.parse_args()
    if args.command == "preflight":
        sys.exit(preflight(args.dir, args.cpu_smoke))
    if args.command == "step":
        work = (args.work or args.dir / "work") / args.name
        work.mkdir(parents=True, exist_ok=True)
        record = run_step(args.name, Context(work, args.dir, args.limit, args.cpu_smoke))
        (args.dir / f"{args.name}.json").write_text(json.dumps(record, indent=1))
        print(json.dumps({k: record.get(k) for k in ("passed", "error", "skipped", "seconds")}))
        sys.exit(0 if record["passed"] is not False else 1)
    result = assemble(args.dir, args.out, args.cpu_smoke, args.total_limit)
    print(json.dumps({"passed": result["passed"], "summary": result["summary"]}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
