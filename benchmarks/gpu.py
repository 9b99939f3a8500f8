#!/usr/bin/env python
"""bf16 tokens/s and model FLOPs utilisation of rackwise training on one GPU.

    python -m benchmarks.gpu                   # -> benchmarks/results/gpu.json
    python -m benchmarks.gpu --steps 60 --micro-batch-size 16 --grad-accum 4

Trains the ~124M rack (32k BPE vocabulary) of ``launch/rackwise_125m_gpu.yaml`` end to end with the real trainer
(``launch/train.py``, one process, ``parallel.pipeline_stages=1``, bf16 with fp32 master
weights), drops the warm-up steps, and turns the median ``train/step_time_s`` into tokens/s
and MFU = (6·N + 12·L·T·d) · tokens/s / peak, the peak being dense bf16 without sparsity
(989 TFLOP/s on an H100 SXM). Needs CUDA; refuses to run without it.

``--cpu-smoke`` runs the same plumbing with a tiny fp32 rack on CPU (written under /tmp, never
to gpu.json): a check of this script, not a measurement.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import REPO, RESULTS_DIR, median, read_scalars, steady_step_times

CONFIG = REPO / "launch" / "rackwise_125m_gpu.yaml"
H100_SXM_BF16_DENSE_TFLOPS = 989.0  # the design contract's reference peak (NVIDIA H100 SXM datasheet, no sparsity)
# Dense bf16 peaks of other devices, matched on the CUDA device name, so the MFU against the
# device's own peak is reported beside the one against an H100 SXM.
DEVICE_PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.0, "H200": 989.0, "GH200": 989.0, "A100": 312.0,
                      "L40S": 362.0, "A10G": 70.0}
TINY_CPU_MODEL = {"model.d_model": 64, "model.n_heads": 4, "model.n_kv_heads": 4, "model.d_ff": 256,
                  "model.max_seq_len": 64, "data.seq_len": 64,
                  "model.architecture.n_stacks": 2, "model.architecture.blocks_per_stack": 1,
                  "training.micro_batch_size": 2, "training.gradient_accumulation_steps": 2,
                  "training.precision": "fp32", "data.max_files": 40}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="bf16 tokens/s and MFU of rackwise pp=1 on one GPU")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps to run (default 40)")
    parser.add_argument("--warmup", type=int, default=10,
                        help="first steps left out (CUDA/cuBLAS autotuning, allocator growth; default 10)")
    parser.add_argument("--micro-batch-size", type=int, default=None, help="override training.micro_batch_size")
    parser.add_argument("--grad-accum", type=int, default=None, help="override training.gradient_accumulation_steps")
    parser.add_argument("--max-bytes", type=int, default=None,
                        help="read at most this much text (data.max_bytes; a shorter BPE build, e.g. in gpu_check.sh)")
    parser.add_argument("--out", default=str(RESULTS_DIR / "gpu.json"))
    parser.add_argument("--cpu-smoke", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args()


def require_cuda() -> None:
    import torch

    if not torch.cuda.is_available():
        sys.exit("benchmarks/gpu.py: no CUDA device is visible (torch.cuda.is_available() is False), so there is "
                 "no GPU figure to measure. Run it on a machine with an NVIDIA GPU and a CUDA build of torch.")


def run_values(args: argparse.Namespace, output_dir: Path) -> dict:
    values = {"parallel.pipeline_stages": 1, "training.training_architecture": "rackwise",
              "training.max_steps": args.steps, "training.eval_interval": 0, "training.eval_batches": 1,
              "training.save_interval": 0, "training.log_interval": args.steps, "training.progress_bar": False,
              "training.precision": "bf16", "training.output_dir": str(output_dir)}
    if args.micro_batch_size:
        values["training.micro_batch_size"] = args.micro_batch_size
    if args.grad_accum:
        values["training.gradient_accumulation_steps"] = args.grad_accum
    if args.max_bytes:
        values["data.max_bytes"] = args.max_bytes
    if args.cpu_smoke:
        values.update(TINY_CPU_MODEL)
    return values


def resolved_config(values: dict):
    from benchmarks.common import overrides_list
    from stackwise_ds.config import StackWiseConfig

    return StackWiseConfig.from_yaml(CONFIG, overrides=overrides_list(values))


def device_info(cpu_smoke: bool) -> dict:
    import torch

    if cpu_smoke:
        return {"device": "cpu (smoke test, not a measurement)", "peak_tflops_device": None}
    name = torch.cuda.get_device_name(0)
    peak = next((p for key, p in DEVICE_PEAK_TFLOPS.items() if key in name), None)
    return {"device": name, "peak_tflops_device": peak, "cuda": torch.version.cuda,
            "gpu_memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)}


def measure(args: argparse.Namespace, output_dir: Path) -> dict:
    from benchmarks.flops import training_flops_per_token
    from stackwise_ds.model import build_rack

    values = run_values(args, output_dir)
    config = resolved_config(values)
    run = launch_with_config(values)
    step_s = median(steady_step_times(output_dir, args.warmup + 1))
    t = config.training
    tokens_per_step = t.micro_batch_size * t.gradient_accumulation_steps * config.data.seq_len
    tokens_per_s = tokens_per_step / step_s
    flops_per_token = training_flops_per_token(config)
    achieved_tflops = flops_per_token * tokens_per_s / 1e12
    cuda_mb = [v for _, v, _ in read_scalars(output_dir, "memory/stage0_cuda_mb")]
    return {"tokens_per_s": tokens_per_s, "mfu_vs_h100_sxm_bf16": achieved_tflops / H100_SXM_BF16_DENSE_TFLOPS,
            "achieved_model_tflops": achieved_tflops, "median_step_s": step_s, "tokens_per_step": tokens_per_step,
            "parameters": build_rack(config.model, config.training.seed).get_parameter_count(),
            "flops_per_token": flops_per_token, "peak_cuda_mb": max(cuda_mb) if cuda_mb else None,
            "steps": args.steps, "warmup_steps_dropped": args.warmup, "run_wall_s": run.wall_s,
            "config": {"yaml": str(CONFIG.relative_to(REPO)), "overrides": values}}


def launch_with_config(values: dict):
    """``python launch/train.py --config launch/rackwise_125m_gpu.yaml --set ...`` (one process, one GPU)."""
    import subprocess

    from benchmarks.common import RunOutcome, bench_env, overrides_list

    sets = [arg for item in overrides_list(values) for arg in ("--set", item)]
    command = [sys.executable, str(REPO / "launch" / "train.py"), "--config", str(CONFIG), *sets]
    env = bench_env(threads=8)  # host-side threads only matter for data collation on a GPU run
    start = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"training run failed ({done.returncode}):\n{(done.stdout + done.stderr)[-4000:]}")
    return RunOutcome(Path(values["training.output_dir"]), time.perf_counter() - start, done.stdout)


def main() -> None:
    args = parse_args()
    if not args.cpu_smoke:
        require_cuda()
    if args.steps <= args.warmup + 2:
        sys.exit(f"--steps ({args.steps}) must exceed --warmup ({args.warmup}) by at least 3 to leave steps to time")
    import torch

    work = Path(tempfile.mkdtemp(prefix="stackwise_gpu_bench_"))
    result = {**device_info(args.cpu_smoke), **measure(args, work / "run"), "torch": torch.__version__,
              "measured_at": time.strftime("%Y-%m-%d %H:%M:%S")}
    if result["peak_tflops_device"]:
        result["mfu_vs_device_peak"] = result["achieved_model_tflops"] / result["peak_tflops_device"]
    out = Path(args.out) if not args.cpu_smoke else work / "gpu_smoke.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    headline = ("device", "tokens_per_s", "mfu_vs_h100_sxm_bf16", "median_step_s")
    print(json.dumps({k: result[k] for k in headline}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
