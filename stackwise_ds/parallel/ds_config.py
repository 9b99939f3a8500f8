"""The DeepSpeed JSON: a template from ds_configs/ filled from the run config by one function.

Batch sizes, clipping, precision and ZeRO stage come from the run YAML. A template may
set them too, but only to the same values: a contradiction is an error, never a silent
override, so the YAML stays the one place a user reads the run's settings.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..config import BF16_WITHOUT_ZERO, ConfigError, ParallelConfig, TrainingConfig
from ..enums import Precision

TEMPLATE_DIR = Path(__file__).resolve().parents[2] / "ds_configs"


def resolve_precision(precision: Precision) -> Precision:
    """'auto' means bf16 where a CUDA device is present, fp32 on CPU."""
    if precision == Precision.AUTO:
        return Precision.BF16 if torch.cuda.is_available() else Precision.FP32
    return Precision(precision)


def uses_tf32(precision: Precision, cuda: bool) -> bool:
    """Whether a run's fp32 matmuls run on TF32 tensor cores: fp32 training on CUDA (full fp32 matmuls there run
    on the CUDA cores at a fraction of the speed; TF32 rounds the inputs to 10 mantissa bits and accumulates in
    fp32). 'auto' on CUDA is bf16, and CPUs have no TF32."""
    return cuda and Precision(precision) == Precision.FP32


def configure_fp32_matmuls(precision: Precision) -> bool:
    """Turn TF32 on for this process where ``uses_tf32``; returns whether it did."""
    if not uses_tf32(precision, torch.cuda.is_available()):
        return False
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):  # torch >= 2.9
        matmul.fp32_precision = "tf32"
    else:
        matmul.allow_tf32 = True
    return True


def template_path(training: TrainingConfig, parallel: ParallelConfig) -> Path:
    choice = parallel.ds_config
    if choice != "auto":
        return Path(choice)
    name = "gpu_bf16.json" if resolve_precision(training.precision) == Precision.BF16 else "cpu_fp32.json"
    return TEMPLATE_DIR / name


def load_template(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"DeepSpeed template {path} does not exist: set parallel.ds_config to 'auto' "
                          "or to an existing JSON file")
    try:
        template = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"DeepSpeed template {path} is not valid JSON: {exc}") from exc
    if not isinstance(template, dict):
        raise ConfigError(f"DeepSpeed template {path} holds a JSON {type(template).__name__}, not an object: "
                          "write a DeepSpeed config object ({...}) or set parallel.ds_config to 'auto'")
    template.pop("_comment", None)
    return template


def build_ds_config(t: TrainingConfig, parallel: ParallelConfig, data_parallel_size: int,
                    gradient_accumulation_steps: int | None = None) -> dict[str, Any]:
    """The DeepSpeed config dict for this run and data-parallel degree.

    ``gradient_accumulation_steps`` (default: the run's) is the micro-batches per replica of an
    elastic phase, which keeps the global batch while the data-parallel degree changes."""
    path = template_path(t, parallel)
    ds = load_template(path)
    bf16 = resolve_precision(t.precision) == Precision.BF16
    accumulation = gradient_accumulation_steps or t.gradient_accumulation_steps
    filled = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": t.micro_batch_size * accumulation * data_parallel_size,
        "gradient_clipping": t.grad_clip,
        "zero_optimization.stage": parallel.zero_stage,
        "bf16.enabled": bf16,
        "pipeline.activation_checkpoint_interval": parallel.activation_checkpoint_interval,
    }
    for dotted, value in filled.items():
        _set_checked(ds, dotted, value, path)
    if bf16 and parallel.zero_stage == 0 and accumulates_in_fp32(ds):
        raise ConfigError(f"{BF16_WITHOUT_ZERO} (DeepSpeed template {path} accumulates gradients in fp32)")
    if bf16 and ds.get("fp16", {}).get("enabled"):
        raise ConfigError(f"DeepSpeed template {path} enables fp16 while training.precision is bf16: "
                          "remove the fp16 section")
    for owned in ("optimizer", "scheduler"):
        if owned in ds:
            raise ConfigError(f"DeepSpeed template {path} has an '{owned}' section: the trainer builds the "
                              "optimizer and learning-rate schedule per phase from training.*; remove it")
    return ds


def accumulates_in_fp32(ds: dict[str, Any]) -> bool:
    """Whether a DeepSpeed config accumulates gradients in fp32 (unset: in the weights' dtype)."""
    dtype = ds.get("data_types", {}).get("grad_accum_dtype")
    return str(dtype).lower() in ("fp32", "float32", "float", "torch.float32")


def _set_checked(ds: dict[str, Any], dotted: str, value: Any, path: Path) -> None:
    *parents, key = dotted.split(".")
    node = ds
    for part in parents:
        node = node.setdefault(part, {})
    if key in node and node[key] != value:
        raise ConfigError(
            f"DeepSpeed template {path} sets {dotted} = {node[key]!r} but the run config gives {value!r}: "
            f"remove {dotted} from the template (the run YAML owns it) or make the two agree")
    node[key] = value
