"""``training.growth_init: identity``: the units a growth adds start as growth_operator says, then their blocks'
attention o_proj and SwiGLU down_proj are zero, so the grown rack computes exactly what the smaller one did.

In-process: every operator's growth applied to a Rack through the functions the trainer uses (layer sources,
zeroed layers, zeroing), the init_from path, and the carried moments. One real run shows the validation loss
unchanged across a growth.
"""

from __future__ import annotations

import math

import pytest
import torch

from launch_utils import layer_state, rack_of, results, run_training, scrambled_rack
from stackwise_ds.checkpoint.consolidation import save_consolidated
from stackwise_ds.checkpoint.layers import file_layers, rack_name, units_of
from stackwise_ds.config import ConfigError, StackWiseConfig, apply_overrides
from stackwise_ds.layout import UnitKind, layer_units
from stackwise_ds.model.block import RESIDUAL_WRITERS
from stackwise_ds.phases import plan_phases
from stackwise_ds.training.growth import (
    added_units,
    phase_layer_sources,
    phase_zeroed_layers,
    zero_residual_writers,
)
from stackwise_ds.training.init_weights import initial_weights
from stackwise_ds.training.moments import carried_payloads

SMALL = ["model.d_model=32", "model.n_heads=2", "model.n_kv_heads=1", "model.max_seq_len=16", "data.seq_len=16",
         "model.vocab_size=64", "model.tie_embeddings=false", "model.mla.kv_lora_rank=16", "model.mla.rope_head_dim=8"]
OPERATORS = ["fresh", "copy_last", "copy_all", "copy_middle"]


def config(*overrides: str) -> StackWiseConfig:
    return StackWiseConfig.from_dict(apply_overrides({}, [*SMALL, *overrides]))


def logits(rack, n_blocks: int) -> torch.Tensor:
    """The rack with only its first ``n_blocks`` blocks active (the later ones dormant: identity), [2, 12, V]."""
    ids = torch.arange(24).reshape(2, 12) % rack.vocab_size
    with torch.no_grad():
        x = rack.embedding(ids)
        for block in rack.blocks[:n_blocks]:
            x = block(x)
        return rack.lm_head(rack.norm(x))


def layer_modules(rack, units) -> dict[int, torch.nn.Module]:
    """Pipeline layer -> the rack's Block, as ``local_layer_modules`` gives a stage's layers."""
    return {i: rack.get_submodule(unit.rack_prefix[:-1]) for i, unit in enumerate(units) if unit.kind == UnitKind.BLOCK}


def layer_states(rack, units) -> dict[int, dict]:
    """Pipeline layer -> a copy of its block's state."""
    return {layer: {k: v.clone() for k, v in m.state_dict().items()} for layer, m in layer_modules(rack, units).items()}


def grow(rack, units, phase, operator: str, growth_init: str) -> tuple[dict, frozenset]:
    """Start ``phase``'s layers as the trainer does: each layer takes its source's weights, then the zeroed layers'
    residual writers go to zero. Returns (the layer sources, the zeroed layers)."""
    modules = layer_modules(rack, units)
    sources, before = phase_layer_sources(units, phase, operator), layer_states(rack, units)
    for layer, source in sources.items():
        modules[layer].load_state_dict(before[source])
    zeroed = phase_zeroed_layers(units, phase, operator, growth_init)
    zero_residual_writers(modules, zeroed)
    return sources, zeroed


@pytest.mark.parametrize("architecture,depths,per_phase", [("stackwise", "[1, 3]", 2), ("blockwise", "[3, 6]", 1),
                                                           ("stackwise", "[2, 3]", 2)])
@pytest.mark.parametrize("operator", OPERATORS)
def test_identity_growth_keeps_the_logits_for_every_operator(operator, architecture, depths, per_phase):
    """After the growth the rack's logits are the smaller rack's; the added blocks' residual writers are zero and
    every other tensor is what the operator says (its source's, or its own)."""
    cfg = config("model.architecture.n_stacks=3", "model.architecture.blocks_per_stack=2", "training.prefix=train",
                 f"training.training_architecture={architecture}", f"training.depth_schedule={depths}",
                 "training.steps_per_phase=[1, 1]", f"training.growth_operator={operator}",
                 "training.growth_init=identity")
    phase, units = plan_phases(cfg)[1], layer_units(3, 2)
    rack = scrambled_rack(cfg)
    before = layer_states(rack, units)
    smaller = logits(rack, phase.new_from * per_phase)
    sources, zeroed = grow(rack, units, phase, operator, cfg.training.growth_init)
    torch.testing.assert_close(logits(rack, phase.active * per_phase), smaller, rtol=1e-6, atol=1e-6)
    expected_zeroed = {layer for unit in added_units(phase.new_from, phase.active, operator)
                       for layer in range(1 + unit * per_phase, 1 + (unit + 1) * per_phase)}
    assert zeroed == expected_zeroed and zeroed
    for layer, module in layer_modules(rack, units).items():
        source = before[sources.get(layer, layer)]
        for key, value in module.state_dict().items():
            want = torch.zeros_like(value) if layer in zeroed and key in RESIDUAL_WRITERS else source[key]
            assert torch.equal(value, want), (layer, key)


@pytest.mark.parametrize("operator", OPERATORS)
def test_copy_growth_changes_the_logits(operator):
    """The same growths under growth_init 'copy' (the default) do change the function: what identity prevents."""
    cfg = config("model.architecture.n_stacks=3", "training.training_architecture=stackwise", "training.prefix=train",
                 "training.depth_schedule=[2, 3]", "training.steps_per_phase=[1, 1]",
                 f"training.growth_operator={operator}")
    assert cfg.training.growth_init == "copy"
    phase, units = plan_phases(cfg)[1], layer_units(3, 2)
    rack = scrambled_rack(cfg)
    smaller = logits(rack, 4)
    _, zeroed = grow(rack, units, phase, operator, cfg.training.growth_init)
    assert not zeroed and not torch.allclose(logits(rack, 6), smaller, atol=1e-3)


@pytest.mark.parametrize("attention_type", ["mha", "gqa", "mla", "kernel"])
def test_a_zeroed_block_is_the_identity_for_every_attention_type(attention_type):
    heads = "model.n_kv_heads=null" if attention_type in ("mha", "mla") else "model.n_kv_heads=1"
    cfg = config(f"model.attention_type={attention_type}", heads, "model.architecture.n_stacks=2",
                 "training.training_architecture=stackwise", "training.depth_schedule=[1, 2]",
                 "training.steps_per_phase=[1, 1]", "training.growth_init=identity")
    rack, units = scrambled_rack(cfg), layer_units(2, 2)
    smaller = logits(rack, 2)
    grow(rack, units, plan_phases(cfg)[1], "copy_last", "identity")
    torch.testing.assert_close(logits(rack, 4), smaller, rtol=1e-6, atol=1e-6)
    for block in rack.stacks[1].blocks:
        assert not block.attn.o_proj.weight.any() and not block.ffn.down_proj.weight.any()
        assert block.attn.o_proj.weight.requires_grad, "a zeroed matrix still trains"


def test_only_a_growing_phase_zeroes():
    cfg = config("model.architecture.n_stacks=2", "training.training_architecture=stackwise",
                 "training.steps_per_phase=1", "training.growth_init=identity", "training.joint_steps=1")
    phases, units = plan_phases(cfg), layer_units(2, 2)
    assert [bool(phase_zeroed_layers(units, p, "copy_all", "identity")) for p in phases] == [False, True, False]


def test_growth_init_is_validated():
    with pytest.raises(ConfigError, match="training.growth_init is 'zero' but must be one of: copy, identity"):
        config("training.growth_init=zero")


# ----------------------------------------------------------------------------- init_from


def rack_from_layer_files(folder, cfg: StackWiseConfig):
    """The Rack whose weights are the layer files in ``folder`` (an untied rack: every layer has a file)."""
    units, state = units_of(cfg.model), {}
    for layer in file_layers(cfg.model):
        for key, value in torch.load(folder / f"layer_{layer:02d}-model_states.pt", weights_only=True).items():
            state[rack_name(units[layer], key)] = value
    rack = rack_of(cfg)
    rack.load_state_dict(state)
    return rack.eval()


@pytest.mark.parametrize("init_growth", ["stack", "fresh"])
def test_identity_growth_from_init_from_keeps_the_sources_logits(tmp_path, init_growth):
    """A 2-stack source grown to 4 stacks: stacks 2, 3 are added (their residual writers zero, the rest as
    init_growth says), stacks 0, 1 are the source's, and the grown rack's logits are the source's."""
    source_cfg = config("model.architecture.n_stacks=2")
    source = scrambled_rack(source_cfg)
    path = save_consolidated(dict(source.state_dict()), source_cfg, tmp_path / "source.safetensors")
    target = config("model.architecture.n_stacks=4", f"training.init_from={path}",
                    f"training.init_growth={init_growth}", "training.growth_init=identity")
    assert "o_proj and down_proj zeroed" in initial_weights(target, tmp_path / "init")
    grown = rack_from_layer_files(tmp_path / "init", target)
    torch.testing.assert_close(logits(grown, 8), logits(source, 4), rtol=1e-6, atol=1e-6)
    seeded = rack_of(target)
    for stack in (2, 3):
        for block, grown_block in enumerate(grown.stacks[stack].blocks):
            start = (source.stacks[stack % 2] if init_growth == "stack" else seeded.stacks[stack]).blocks[block]
            for key, value in grown_block.state_dict().items():
                want = torch.zeros_like(value) if key in RESIDUAL_WRITERS else start.state_dict()[key]
                assert torch.equal(value, want), (stack, block, key)
    assert all(torch.equal(a, b) for a, b in zip(grown.stacks[:2].parameters(), source.stacks.parameters(),
                                                  strict=True)), "the source's stacks are not added: kept as they are"


# ----------------------------------------------------------------------------- carried moments


def test_carried_moments_of_the_zeroed_matrices_start_at_zero(tmp_path):
    """copy_last 1 -> 2 stacks: stack 1's layers take stack 0's moment files; under identity their residual
    writers' moments are zero, every other moment is the source's (and the source layers keep theirs)."""
    units = layer_units(2, 2)
    cfg = config("model.architecture.n_stacks=2", "training.training_architecture=stackwise",
                 "training.depth_schedule=[1, 2]", "training.steps_per_phase=[1, 1]",
                 "training.growth_operator=copy_last", "training.prefix=train", "training.growth_init=identity")
    phase = plan_phases(cfg)[1]
    sources = phase_layer_sources(units, phase, "copy_last")
    zeroed = phase_zeroed_layers(units, phase, "copy_last", "identity")
    assert sources == {3: 1, 4: 2} and zeroed == {3, 4}
    block = rack_of(cfg).stacks[0].blocks[0]
    generator = torch.Generator().manual_seed(0)
    for layer in (1, 2):
        moments = {name: {m: torch.rand(p.shape, generator=generator) + 0.1 for m in ("exp_avg", "exp_avg_sq")}
                   for name, p in block.named_parameters()}
        torch.save({"step": 7, "moments": moments}, tmp_path / f"layer_{layer:02d}-optim_moments.pt")
    files = {layer: tmp_path / f"layer_{sources.get(layer, layer):02d}-optim_moments.pt" for layer in (1, 2, 3, 4)}
    payloads = carried_payloads(files, units, sources, zeroed)
    for layer in (1, 2, 3, 4):
        saved = torch.load(files[layer], weights_only=True)["moments"]
        assert payloads[layer]["step"] == 7
        for name, moments in payloads[layer]["moments"].items():
            for key, value in moments.items():
                if layer in zeroed and name in RESIDUAL_WRITERS:
                    assert value.shape == saved[name][key].shape and not value.any(), (layer, name, key)
                else:
                    assert torch.equal(value, saved[name][key]) and value.min() > 0, (layer, name, key)


# ----------------------------------------------------------------------------- a real run


@pytest.mark.multiprocess
def test_identity_growth_leaves_the_validation_loss_unchanged_in_a_real_run(tmp_path):
    """Stackwise 1 -> 2 stacks with copy_last, the optimizer carried, on one process and the fixed layout (the
    standing pipeline re-reads the grown layers): phase 2 starts at phase 1's final validation loss, and the zeroed
    matrices start at zero and train away from it."""
    run_training(1, tmp_path, "training.training_architecture=stackwise", "training.depth_schedule=[1, 2]",
                 "training.steps_per_phase=[2, 2]", "training.growth_operator=copy_last", "training.prefix=train",
                 "training.growth_init=identity", "training.optimizer_across_phases=carry",
                 "parallel.phase_layout=fixed", "training.save_interval=0", "training.eval_interval=0")
    first, second = results(tmp_path)["phases"]
    assert math.isfinite(first["val_loss_after"]) and first["val_loss_after"] != first["val_loss_before"]
    assert abs(second["val_loss_before"] - first["val_loss_after"]) <= 1e-6 * first["val_loss_after"], (first, second)
    stack1 = [layer_state(tmp_path, 4, layer) for layer in (3, 4)]  # stacks.1.blocks.0/1 at the run's end
    assert all(state[name].any() for state in stack1 for name in RESIDUAL_WRITERS), "the zeroed matrices train"


@pytest.mark.parametrize("architecture,depths,per_phase", [("stackwise", "[2, 3]", 2), ("blockwise", "[3, 6]", 1)])
def test_identity_interleave_keeps_the_logits(architecture, depths, per_phase):
    """LLaMA Pro's expansion: the inserted copies write nothing into the residual stream, so the function stays."""
    test_identity_growth_keeps_the_logits_for_every_operator("interleave", architecture, depths, per_phase)
