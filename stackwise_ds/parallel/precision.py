"""Frozen layers in a lower precision: bf16, or weight-only int8 with per-output-channel scales.

A frozen layer never changes during its phase, so its forward can run on a converted copy (role FROZEN:
forward only, no gradient; role FROZEN_BACKPROP: the gradient of its input passes back through the
converted copy, in bf16 through the bf16 weights, in int8 through the dequantized weight, and no weight
gradient is ever computed) (``training.frozen_precision`` / ``training.stack_precision``):

* ``bf16``: the copy's weights are bf16 and its forward runs in bf16; the input is cast to bf16 and
  the output back to the input's dtype, so the activations between pipeline layers keep theirs.
* ``int8``: every ``nn.Linear`` of the copy becomes an ``Int8WeightOnlyLinear`` (int8 weights, one
  fp32 scale per output channel, symmetric); norms and the activations keep their dtype. With bf16
  activations the matmul is torch's own ``torch._weight_int8pack_mm`` (what torchao's int8
  weight-only path calls) on CPU and for decoding on CUDA, while a CUDA training batch dequantizes to
  bf16 for cuBLAS; with fp32 activations it is a bf16 matmul of the int8 values on a CPU with
  bf16 matrix units, else (or where the packed op is missing or refuses the device) a
  dequantize-then-matmul (see ``int8_path`` and ``int8_matmul``).

Checkpoints keep the full-precision weights: the layer module itself stays registered in the
PipelineModule with the same Parameters (names, ``requires_grad``, optimizer membership unchanged);
only their storage moves to a file-backed, copy-on-write memory map of an unlinked file under
``$TMPDIR`` (``tempfile.gettempdir()``), which takes no resident memory until read. Its
``state_dict`` is therefore the exact full-precision weights (DeepSpeed's layer files, phase-end
tags, consolidation and export read those), and a layer that trains again (a closing joint phase
on the same pipeline) trains on them. The converted copy follows its layer: when the layer's
Parameters are written (a checkpoint load), the copy is rebuilt before the next forward.

Model files stay pure PyTorch: this module wraps their modules from outside.
"""

from __future__ import annotations

import copy
import functools
import os
import tempfile

import torch
import torch.nn.functional as F
from torch import nn

from ..enums import FrozenPrecision

INT8_MAX = 127
# (device type, dtype) -> whether torch._weight_int8pack_mm runs there; decided once per pair.
_PACKED_MM_WORKS: dict[tuple[str, torch.dtype], bool] = {}
# The paths of int8_matmul (int8_path picks one).
PACKED, BF16_MATMUL, DEQUANTIZE = "packed", "bf16_matmul", "dequantize"
# Rows (tokens) above which a CUDA int8 matmul dequantizes to bf16 for cuBLAS instead of taking the packed kernel:
# torch's CUDA _weight_int8pack_mm computes each output in one fp32 thread, without tensor cores, which suits
# decoding a few rows and falls far behind a bf16 tensor-core matmul on a training micro-batch.
CUDA_PACKED_MAX_ROWS = 16


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: weight [out, in] ~= q [out, in] * scales[:, None] (fp32)."""
    w = weight.detach().float()
    scales = (w.abs().amax(dim=1) / INT8_MAX).clamp_min(torch.finfo(torch.float32).tiny)
    q = torch.round(w / scales[:, None]).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q.contiguous(), scales


@functools.cache
def cpu_has_bf16_matmul() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (AVX512-BF16 or AMX): there a bf16 matmul takes about
    0.3x the fp32 one (measured, torch 2.13), elsewhere it is emulated and slower than fp32."""
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in ("_is_avx512_bf16_supported",
                                                                         "_is_amx_tile_supported"))


def int8_path(device_type: str, dtype: torch.dtype, rows: int) -> str:
    """Which path ``int8_matmul`` takes for ``rows`` activations of ``dtype`` on ``device_type``."""
    if dtype == torch.float32 and device_type == "cpu" and cpu_has_bf16_matmul():
        return BF16_MATMUL
    packed_runs = _PACKED_MM_WORKS.get((device_type, dtype), True) and hasattr(torch, "_weight_int8pack_mm")
    if dtype == torch.bfloat16 and packed_runs and not (device_type == "cuda" and rows > CUDA_PACKED_MAX_ROWS):
        return PACKED
    return DEQUANTIZE


def int8_matmul(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [N, in] @ (q * scales[:, None]).T -> [N, out] in x's dtype.

    bf16 activations take torch's packed int8 kernel on CPU, and on CUDA for up to ``CUDA_PACKED_MAX_ROWS`` rows
    (decoding); a CUDA training batch dequantizes the int8 values to bf16 (exact) for a cuBLAS matmul, scaled after.
    fp32 activations (CPU runs) cannot use the packed kernel: it has no fast fp32 path (about 30x slower than the
    fp32 matmul, and with bf16 inputs no faster than fp32 on CPU, measured with torch 2.13). On a CPU with bf16
    matrix units the int8 values (exact in bf16) meet a bf16 copy of the input in a bf16 matmul, scaled back in fp32
    (about 0.3x the fp32 matmul's time); elsewhere the weight is dequantized per call for the fp32 matmul."""
    path = int8_path(x.device.type, x.dtype, x.shape[0])
    scales = scales.to(x.dtype)
    if path == BF16_MATMUL:
        return F.linear(x.to(torch.bfloat16), q.to(torch.bfloat16)).float() * scales
    if path == PACKED:
        key = (x.device.type, x.dtype)
        try:
            out = torch._weight_int8pack_mm(x.contiguous(), q, scales)
            _PACKED_MM_WORKS[key] = True
            return out
        except (RuntimeError, NotImplementedError):
            _PACKED_MM_WORKS[key] = False  # e.g. an older torch without this device's kernel
    return F.linear(x, q.to(x.dtype)) * scales


class _Int8Linear(torch.autograd.Function):
    """``int8_matmul`` for a frozen layer the gradient passes through (role frozen_backprop): the backward computes
    the input's gradient through the dequantized weight (as QLoRA does) and never a weight gradient."""

    @staticmethod
    def forward(ctx, x, q, scales):  # x [N, in] -> [N, out]
        ctx.save_for_backward(q, scales)
        return int8_matmul(x, q, scales)

    @staticmethod
    def backward(ctx, grad_out):  # [N, out] -> [N, in]: grad_out @ (q * scales[:, None])
        q, scales = ctx.saved_tensors
        return (grad_out * scales.to(grad_out.dtype)) @ q.to(grad_out.dtype), None, None


class Int8WeightOnlyLinear(nn.Module):
    """A frozen ``nn.Linear`` with int8 weights and per-output-channel scales (no parameters, buffers only)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        q, scales = quantize_int8(linear.weight)
        self.register_buffer("weight_int8", q)
        self.register_buffer("scales", scales)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in] -> [..., out]
        flat = x.reshape(-1, self.in_features)
        if torch.is_grad_enabled() and flat.requires_grad:
            out = _Int8Linear.apply(flat, self.weight_int8, self.scales)
        else:
            out = int8_matmul(flat, self.weight_int8, self.scales)
        out = out.reshape(*x.shape[:-1], self.out_features)
        return out if self.bias is None else out + self.bias.to(out.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weight-only"


class Bf16Forward(nn.Module):
    """Runs ``module`` (already bf16) on a bf16 copy of the input; returns the input's dtype."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x.to(torch.bfloat16)).to(x.dtype)


def converts(layer: nn.Module, precision: FrozenPrecision) -> bool:
    """Whether ``precision`` changes how ``layer`` is held (bf16 does not for weights already in bf16)."""
    if precision == FrozenPrecision.SAME:
        return False
    return precision == FrozenPrecision.INT8 or any(p.dtype != torch.bfloat16 for p in layer.parameters())


def converted_copy(layer: nn.Module, precision: FrozenPrecision) -> nn.Module:
    """A forward-only copy of ``layer`` in ``precision`` (bf16 or int8), on the layer's device."""
    compute = copy.deepcopy(layer).requires_grad_(False)
    if precision == FrozenPrecision.BF16:
        return Bf16Forward(compute.to(torch.bfloat16))
    if precision != FrozenPrecision.INT8:
        raise ValueError(f"no conversion for frozen precision {precision!r}")
    _replace_linears(compute)
    return compute


def _replace_linears(module: nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.Linear):
            setattr(module, name, Int8WeightOnlyLinear(child))
        else:
            _replace_linears(child)


def module_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and persistent buffers (its weights, not e.g. RoPE tables)."""
    persistent = module.state_dict(keep_vars=True).values()
    return sum(t.numel() * t.element_size() for t in persistent)


def offload_to_mapped_file(layer: nn.Module, spill_dir: str | None = None) -> None:
    """Move ``layer``'s Parameters into a copy-on-write memory map of an unlinked temporary file.

    The values are bit for bit the same (a ``torch.save``/``torch.load`` round trip), the
    Parameter objects too; only the storage changes, and it takes no resident memory until read."""
    params = dict(layer.named_parameters())
    if not params:
        return
    fd, path = tempfile.mkstemp(prefix="stackwise_frozen_", suffix=".pt", dir=spill_dir)
    os.close(fd)
    try:
        torch.save({name: p.detach().cpu() for name, p in params.items()}, path)
        mapped = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    finally:
        os.unlink(path)  # the mapping keeps the data until the tensors are freed; nothing is left on disk
    with torch.no_grad():
        for name, p in params.items():
            p.data = mapped[name]


class FrozenCompute:
    """The converted forward of one frozen layer; rebuilt when the layer's Parameters were written."""

    def __init__(self, layer: nn.Module, precision: FrozenPrecision, device: torch.device):
        self.layer, self.precision, self.device = layer, precision, device
        self.full_bytes = module_bytes(layer)
        self._convert()

    def _convert(self) -> None:
        self.compute = converted_copy(self.layer, self.precision).to(self.device)
        offload_to_mapped_file(self.layer)
        self._versions = self._param_versions()

    def _param_versions(self) -> list[int]:
        return [p._version for p in self.layer.parameters()]

    @property
    def converted_bytes(self) -> int:
        return module_bytes(self.compute)

    def __call__(self, inputs: torch.Tensor) -> torch.Tensor:
        if self._param_versions() != self._versions:  # loaded anew (e.g. a checkpoint): convert again
            self._convert()
        return self.compute(inputs)


def describe_frozen(stage: int, sizes: dict[int, tuple[int, int]], precisions: dict[int, FrozenPrecision]) -> str:
    """One log line, e.g. 'stage 0: frozen layers 1, 2 run in int8 (weights 0.10 MB instead of 0.39 MB)'."""
    kinds = ", ".join(sorted({str(precisions[layer]) for layer in sizes}))
    full, converted = (sum(pair[i] for pair in sizes.values()) / 2**20 for i in (0, 1))
    return (f"stage {stage}: frozen layers {', '.join(map(str, sorted(sizes)))} run in {kinds} "
            f"(weights {converted:.2f} MB instead of {full:.2f} MB)")


def layer_precisions(units, stack_precisions: list[FrozenPrecision] | None) -> dict[int, FrozenPrecision]:
    """Pipeline layer -> the precision it runs in while frozen: its stack's, for blocks; others stay."""
    if not stack_precisions:
        return {}
    return {index: FrozenPrecision(stack_precisions[unit.stack_id]) for index, unit in enumerate(units)
            if unit.stack_id is not None and stack_precisions[unit.stack_id] != FrozenPrecision.SAME}
