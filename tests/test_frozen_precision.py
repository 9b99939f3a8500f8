"""Frozen stacks in bf16 or int8 (training.frozen_precision / stack_precision, issue 19 item 1).

Fast tier: the converted forward against fp32, the converted weights' bytes, the full-precision
weights a converted layer keeps (bit for bit, out of resident memory), the planner's memory
estimate, the config checks. Multiprocess: a real 2-rank stackwise run with int8 frozen stacks.
"""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F

from launch_utils import TINY, layer_state, relative_close, results, run_training
from stackwise_ds.config import ConfigError, StackWiseConfig, apply_overrides
from stackwise_ds.enums import FrozenPrecision
from stackwise_ds.layout import layer_units
from stackwise_ds.model import build_block
from stackwise_ds.parallel import precision
from stackwise_ds.parallel.precision import FrozenCompute, converted_copy, int8_matmul, module_bytes, quantize_int8
from stackwise_ds.parallel.roles import FROZEN, RoleGate
from stackwise_ds.phases import plan_phases
from stackwise_ds.placement import layout_for

INT8, BF16, SAME = FrozenPrecision.INT8, FrozenPrecision.BF16, FrozenPrecision.SAME
# Stated tolerances (relative L2 error against the fp32 forward, on a random input):
INT8_UPDATE_RTOL = 0.03  # int8: of the block's update out - x (what its weights contribute)
BF16_OUTPUT_RTOL = 0.01  # bf16: of the output (the residual stream itself is rounded to bf16)


def tiny_config(**training) -> StackWiseConfig:
    raw = apply_overrides({}, TINY)
    raw["training"].update(training)
    return StackWiseConfig.from_dict(raw)


def block(init_std: float = 0.02, d_model: int = 64):
    model = StackWiseConfig.from_dict({"model": {"d_model": d_model, "n_heads": 4, "n_kv_heads": 2,
                                                 "max_seq_len": 64, "init_std": init_std},
                                       "data": {"seq_len": 32}}).model
    return build_block(model, 0, 0, seed=0)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


# ----------------------------------------------------------------------------- forward and bytes

@pytest.mark.parametrize("init_std", [0.02, 0.2])  # at init, and with weights 10x larger (as after training)
def test_int8_block_forward_matches_fp32(init_std):
    layer = block(init_std)
    x = torch.randn(2, 32, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, out = layer(x), converted_copy(layer, INT8)(x)
    assert out.dtype == torch.float32
    assert relative(out - x, ref - x) < INT8_UPDATE_RTOL
    assert not torch.equal(out, ref)  # it is the int8 path, not the fp32 weights


@pytest.mark.parametrize("init_std", [0.02, 0.2])
def test_bf16_block_forward_matches_fp32_and_keeps_the_activation_dtype(init_std):
    layer = block(init_std)
    x = torch.randn(2, 32, 64, generator=torch.Generator().manual_seed(0))
    compute = converted_copy(layer, BF16)
    with torch.no_grad():
        ref, out = layer(x), compute(x)
    assert out.dtype == torch.float32, "the pipeline's activations must keep their dtype"
    assert {p.dtype for p in compute.parameters()} == {torch.bfloat16}
    assert relative(out, ref) < BF16_OUTPUT_RTOL
    assert not torch.equal(out, ref)


def test_converted_weight_bytes():
    layer = block(d_model=128)
    full = module_bytes(layer)
    assert module_bytes(converted_copy(layer, INT8)) <= 0.3 * full
    assert module_bytes(converted_copy(layer, BF16)) == full // 2
    assert module_bytes(layer) == full, "converting makes a copy: the layer itself is unchanged"


def test_int8_quantization_is_per_output_channel_and_the_fallback_matmul_agrees(monkeypatch):
    w = torch.randn(48, 64, generator=torch.Generator().manual_seed(1)) * torch.linspace(0.01, 3, 48)[:, None]
    q, scales = quantize_int8(w)
    assert q.dtype == torch.int8 and scales.shape == (48,)
    assert q.abs().amax(dim=1).eq(127).all(), "every row uses its whole int8 range (its own scale)"
    assert ((q.float() * scales[:, None] - w).abs() <= scales[:, None] / 2 + 1e-7).all()
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(2))
    on_this_cpu, has_bf16_units = int8_matmul(x, q, scales), precision.cpu_has_bf16_matmul()
    assert on_this_cpu.dtype == torch.float32 and relative(on_this_cpu, x @ w.T) < 0.01
    monkeypatch.setattr(precision, "cpu_has_bf16_matmul", lambda: False)
    dequantized = int8_matmul(x, q, scales)
    assert relative(dequantized, x @ w.T) < 0.01
    assert torch.equal(dequantized, F.linear(x, q.float()) * scales), "without bf16 units: the exact fp32 dequantize"
    if has_bf16_units:  # fp32 activations go through a bf16 matmul (about 0.3x the fp32 one's time)
        assert not torch.equal(on_this_cpu, dequantized)
    packed = int8_matmul(x.bfloat16(), q, scales)  # bf16: torch's packed int8 kernel
    assert precision._PACKED_MM_WORKS[("cpu", torch.bfloat16)], "torch's int8 kernel runs on CPU in bf16"
    monkeypatch.setitem(precision._PACKED_MM_WORKS, ("cpu", torch.bfloat16), False)
    fallback = int8_matmul(x.bfloat16(), q, scales)
    assert packed.dtype == fallback.dtype == torch.bfloat16
    assert relative(packed.float(), fallback.float()) < 0.01


def test_int8_takes_cublas_for_a_cuda_training_batch_and_the_packed_kernel_for_cpu_and_decoding(monkeypatch):
    from stackwise_ds.parallel.precision import BF16_MATMUL, CUDA_PACKED_MAX_ROWS, DEQUANTIZE, PACKED, int8_path

    monkeypatch.setattr(precision, "_PACKED_MM_WORKS", {})
    bf16 = torch.bfloat16
    assert int8_path("cuda", bf16, 8 * 512) == DEQUANTIZE, "a micro-batch on CUDA: bf16 dequantize + cuBLAS"
    assert int8_path("cuda", bf16, CUDA_PACKED_MAX_ROWS + 1) == DEQUANTIZE
    assert int8_path("cuda", bf16, CUDA_PACKED_MAX_ROWS) == int8_path("cuda", bf16, 1) == PACKED, "decoding"
    assert int8_path("cpu", bf16, 8 * 512) == PACKED, "on CPU the packed kernel beats dequantizing"
    assert int8_path("cuda", torch.float32, 8 * 512) == DEQUANTIZE
    monkeypatch.setattr(precision, "cpu_has_bf16_matmul", lambda: True)
    assert int8_path("cpu", torch.float32, 64) == BF16_MATMUL
    monkeypatch.setattr(precision, "cpu_has_bf16_matmul", lambda: False)
    assert int8_path("cpu", torch.float32, 64) == DEQUANTIZE
    precision._PACKED_MM_WORKS[("cuda", bf16)] = False  # an older torch without the CUDA kernel
    assert int8_path("cuda", bf16, 1) == DEQUANTIZE


def test_each_block_takes_its_stacks_precision():
    """Blocks (also blockwise units) run in their stack's entry; embedding, norm and head never convert."""
    units = layer_units(2, 2)  # embedding, stack 0 blocks (1, 2), stack 1 blocks (3, 4), norm, head
    assert precision.layer_precisions(units, [INT8, SAME]) == {1: INT8, 2: INT8}
    assert precision.layer_precisions(units, [BF16, INT8]) == {1: BF16, 2: BF16, 3: INT8, 4: INT8}
    assert precision.layer_precisions(units, None) == {}


# ----------------------------------------------------------------------------- full-precision weights kept

def test_converted_layer_keeps_its_full_precision_weights_bit_for_bit():
    layer = block(0.2)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    params = list(layer.parameters())
    gate = RoleGate(layer, FROZEN)
    gate.frozen_compute = FrozenCompute(layer, INT8, torch.device("cpu"))
    x = torch.randn(2, 32, 64)
    assert list(layer.parameters()) == params, "same Parameter objects (optimizer, names, roles unchanged)"
    after = layer.state_dict()  # what DeepSpeed writes into the layer's checkpoint file
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    with torch.no_grad():
        assert torch.equal(gate(x), gate.frozen_compute.compute(x))
        assert relative(gate(x) - x, layer(x) - x) < INT8_UPDATE_RTOL


def test_loading_new_weights_into_a_converted_layer_converts_again():
    layer, other = block(0.2), block(0.02)
    compute = FrozenCompute(layer, INT8, torch.device("cpu"))
    x = torch.randn(2, 32, 64)
    with torch.no_grad():
        stale = compute(x)
        layer.load_state_dict(other.state_dict())  # e.g. a checkpoint loaded after the engine was built
        fresh = compute(x)
        assert relative(fresh - x, other(x) - x) < INT8_UPDATE_RTOL
    assert not torch.allclose(stale, fresh)


def mapping_of(address: int) -> str:
    """The /proc/self/maps line of the memory mapping holding ``address``."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            low, high = (int(v, 16) for v in line.split()[0].split("-"))
            if low <= address < high:
                return line.strip()
    return ""


def test_full_precision_weights_move_to_a_mapped_unlinked_file():
    """Out of resident memory: each Parameter's storage is a private map of a deleted spill file
    (pages are read only when a checkpoint save reads them), not anonymous memory."""
    layer = block(d_model=128)
    anonymous = mapping_of(layer.attn.q_proj.weight.data_ptr())
    assert "stackwise_frozen_" not in anonymous
    FrozenCompute(layer, INT8, torch.device("cpu"))
    for name, p in layer.named_parameters():
        where = mapping_of(p.data_ptr())
        assert "stackwise_frozen_" in where and where.endswith("(deleted)"), (name, where)


# ----------------------------------------------------------------------------- planner

def last_phase_memory(config: StackWiseConfig, world_size: int = 2):
    units = layer_units(config.model.architecture.n_stacks, config.model.architecture.blocks_per_stack)
    roles = plan_phases(config)[-1].layer_roles(units)
    return layout_for(roles, config, world_size, False, elastic=True)


def test_planner_memory_estimate_shrinks_with_the_frozen_precision():
    extra = {"training_architecture": "stackwise"}
    sizes = {p: sum(last_phase_memory(tiny_config(**extra, frozen_precision=p.value)).stage_memory_mb)
             for p in (SAME, BF16, INT8)}
    assert sizes[SAME] > sizes[BF16] > sizes[INT8]
    per_stack = sum(last_phase_memory(tiny_config(**extra, stack_precision=["int8", "same"])).stage_memory_mb)
    assert per_stack == pytest.approx(sizes[INT8]), "the last phase freezes stack 0 only: its precision counts"
    first = plan_phases(tiny_config(**extra))[0]
    units = layer_units(2, 2)
    assert layout_for(first.layer_roles(units), tiny_config(**extra, frozen_precision="int8"), 2, False, True) \
        == layout_for(first.layer_roles(units), tiny_config(**extra), 2, False, True), "nothing frozen: no change"


def test_planner_fits_a_memory_bound_only_int8_meets():
    extra = {"training_architecture": "stackwise"}
    same = last_phase_memory(tiny_config(**extra))
    int8 = last_phase_memory(tiny_config(**extra, frozen_precision="int8"))
    assert same.pipeline_stages == int8.pipeline_stages == 1
    bound = (max(same.stage_memory_mb) + max(int8.stage_memory_mb)) / 2
    bounded = {"parallel": {"max_rank_memory_mb": bound}}
    raw = apply_overrides({}, TINY)
    raw["training"].update(extra)
    raw.update(bounded)
    assert last_phase_memory(StackWiseConfig.from_dict(raw)).pipeline_stages == 2, "full precision needs 2 stages"
    raw["training"]["frozen_precision"] = "int8"
    assert last_phase_memory(StackWiseConfig.from_dict(raw)).pipeline_stages == 1, "int8 fits on one"


# ----------------------------------------------------------------------------- config

def test_config_parses_per_stack_precision_and_writes_plain_strings():
    config = tiny_config(training_architecture="stackwise", stack_precision=["int8", "bf16"])
    assert config.stack_frozen_precisions() == [INT8, BF16]
    assert config.to_dict()["training"]["stack_precision"] == ["int8", "bf16"]
    assert all(type(v) is str for v in config.to_dict()["training"]["stack_precision"])
    assert tiny_config(training_architecture="stackwise", frozen_precision="bf16").stack_frozen_precisions() == \
        [BF16, BF16]
    assert tiny_config().stack_frozen_precisions() == [SAME, SAME]
    assert StackWiseConfig.from_dict(config.to_dict()).stack_frozen_precisions() == [INT8, BF16]


@pytest.mark.parametrize("training, message", [
    ({"training_architecture": "stackwise", "frozen_precision": "fp8"},
     r"training.frozen_precision is 'fp8' but must be one of: same, bf16, int8"),
    ({"training_architecture": "stackwise", "stack_precision": ["int8"]},
     r"training.stack_precision has 1 entries for 2 stacks: give one of same, bf16, int8 per stack"),
    ({"training_architecture": "stackwise", "stack_precision": ["int4", "same"]},
     r"training.stack_precision is 'int4' but must be one of: same, bf16, int8"),
    ({"frozen_precision": "int8"}, r"training.frozen_precision .* freezes none \(training_architecture 'rackwise'"),
    ({"training_architecture": "stackwise", "prefix": "train", "stack_precision": ["bf16", "same"]},
     r"training.stack_precision .* freezes none .*prefix 'train'"),
])
def test_config_rejects_bad_frozen_precision(training, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config(**training)


def test_python_built_stack_precision_is_checked_too():
    config = tiny_config(training_architecture="stackwise")
    config.training.stack_precision = ["int8", "int3"]
    with pytest.raises(ConfigError, match=r"training.stack_precision\[1\] is 'int3'"):
        config.validate()


# ----------------------------------------------------------------------------- a real run

STEPS = 4


@pytest.mark.multiprocess
def test_int8_frozen_stackwise_run_trains_and_checkpoints_full_precision(tmp_path):
    """2 ranks, 2 stacks, phase 2 freezes stack 0 in int8 on the fixed pipeline (the trained stack turns
    frozen in place), then a joint phase trains it again from its full-precision weights; a run with
    frozen_precision 'same' is the reference."""
    common = ["training.training_architecture=stackwise", f"training.steps_per_phase={STEPS}",
              "training.save_interval=2", "training.eval_interval=0", "parallel.phase_layout=fixed",
              "training.joint_steps=2"]
    converted = run_training(2, tmp_path / "int8", *common, "training.frozen_precision=int8")
    assert "[stackwise] stage 0: frozen layers 1, 2 run in int8" in converted.stdout
    assert "run in" not in run_training(2, tmp_path / "same", *common).stdout
    int8, same = results(tmp_path / "int8")["phases"], results(tmp_path / "same")["phases"]
    assert int8[0]["losses"] == same[0]["losses"], "phase 1 freezes nothing: the same run, bit for bit"
    assert int8[1]["losses"] != same[1]["losses"], "phase 2 runs stack 0 in int8"
    assert relative_close(int8[1]["losses"], same[1]["losses"], 0.02)
    assert int8[1]["val_loss_after"] < int8[1]["val_loss_before"], "the int8 run trains"
    end0 = STEPS
    for b in range(2):  # stack 0's blocks: every later checkpoint holds its phase-end weights, bit for bit
        at_end = layer_state(tmp_path / "int8", end0, 1 + b)
        assert all(v.dtype == torch.float32 for v in at_end.values())
        for step in (end0 + 2, 2 * STEPS):  # a mid-phase save and the phase-end save of phase 2
            later = layer_state(tmp_path / "int8", step, 1 + b)
            assert later.keys() == at_end.keys() and all(torch.equal(later[k], at_end[k]) for k in at_end)
        assert not torch.equal(layer_state(tmp_path / "int8", 2 * STEPS, 3 + b)["attn.q_proj.weight"],
                               layer_state(tmp_path / "int8", end0, 3 + b)["attn.q_proj.weight"]), "stack 1 trains"
        joint = layer_state(tmp_path / "int8", 2 * STEPS + 2, 1 + b)
        assert not torch.equal(joint["attn.q_proj.weight"], at_end["attn.q_proj.weight"]), "joint: stack 0 trains"
    assert [p["kind"] for p in int8] == ["stack", "stack", "joint"]
    assert int8[2]["val_loss_after"] < int8[2]["val_loss_before"]


@pytest.mark.multiprocess
def test_per_stack_precision_on_the_elastic_layout_resumes_mid_phase_bit_for_bit(tmp_path):
    """3 stacks on the elastic layout (frozen stacks re-placed from the phase-end files, then converted):
    stack 0 int8, stack 1 bf16. A resume from the middle of the last phase converts the same weights
    again: the same losses, bit for bit, and the frozen stacks' files are still their phase ends'."""
    args = ["training.training_architecture=stackwise", "training.steps_per_phase=2", "training.save_interval=1",
            "training.eval_interval=0", "model.architecture.n_stacks=3", "model.architecture.blocks_per_stack=1",
            "training.stack_precision=[int8, bf16, same]"]
    run = tmp_path / "run"
    first = run_training(2, run, *args)
    assert "frozen layers 1 run in int8" in first.stdout and "frozen layers 1, 2 run in bf16, int8" in first.stdout
    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step00000006")  # died after step 5, mid phase 3
    shutil.rmtree(resumed / "tensorboard")
    proc = run_training(2, resumed, *args)
    assert "step00000005" in proc.stdout
    assert results(resumed)["losses"] == results(run)["losses"]
    for stack, end in ((0, 2), (1, 4)):  # layer 1 + stack (one block per stack)
        at_end = layer_state(run, end, 1 + stack)
        for out in (run, resumed):
            final = layer_state(out, 6, 1 + stack)
            assert all(torch.equal(final[k], at_end[k]) for k in at_end), (stack, out)
