"""Rack and Stack: shapes, stable names, tying, seeded layout-independent init, freezing, overfitting."""

from pathlib import Path

import pytest
import torch

from launch_utils import rack_of
from stackwise_ds.config import ArchitectureConfig, ModelConfig, StackWiseConfig
from stackwise_ds.layout import TRAIN, layer_units
from stackwise_ds.model import Block, Rack, Stack, build_block, build_rack, create_rack_from_config
from stackwise_ds.placement import layout_for

TINY = {"model": {"d_model": 32, "n_heads": 4, "n_kv_heads": 2, "max_seq_len": 64,
                  "architecture": {"n_stacks": 2, "blocks_per_stack": 2}}}


def tiny(**model_overrides):
    raw = {"model": {**TINY["model"], **model_overrides}, "data": {"seq_len": 32}}
    return StackWiseConfig.from_dict(raw)


def test_rack_forward_shape_and_structure():
    rack = rack_of(tiny())
    logits = rack(torch.randint(0, 258, (3, 10)))
    assert logits.shape == (3, 10, 258)
    assert len(rack.stacks) == 2 and all(len(s.blocks) == 2 for s in rack.stacks)
    assert isinstance(rack.stacks[1].blocks[0], Block) and isinstance(rack.stacks[0], Stack)


def test_parameter_names_are_stable():
    names = {n for n, _ in rack_of(tiny()).named_parameters()}
    assert "stacks.1.blocks.0.attn.q_proj.weight" in names
    assert "stacks.0.blocks.1.ffn.down_proj.weight" in names
    assert "embedding.weight" in names and "norm.weight" in names


def test_tied_embeddings_share_storage_and_untied_do_not():
    tied = rack_of(tiny())
    assert tied.lm_head.weight is tied.embedding.weight
    assert tied.lm_head.weight.data_ptr() == tied.embedding.weight.data_ptr()
    untied = rack_of(tiny(tie_embeddings=False))
    assert untied.lm_head.weight.data_ptr() != untied.embedding.weight.data_ptr()
    # a tied rack counts the shared matrix once
    assert untied.get_parameter_count() - tied.get_parameter_count() == 258 * 32


def test_init_is_seeded_per_module_not_by_construction_order():
    config = tiny()
    rack = rack_of(config)
    alone = build_block(config.model, stack_id=1, block_id=1, seed=config.training.seed)
    for a, b in zip(alone.state_dict().values(), rack.stacks[1].blocks[1].state_dict().values(), strict=True):
        assert torch.equal(a, b)
    other_seed = rack_of(config, seed=config.training.seed + 1)
    assert not torch.equal(other_seed.stacks[0].blocks[0].attn.q_proj.weight,
                           rack.stacks[0].blocks[0].attn.q_proj.weight)
    # blocks differ from one another
    assert not torch.equal(rack.stacks[0].blocks[0].attn.q_proj.weight, rack.stacks[0].blocks[1].attn.q_proj.weight)


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("stage", [0, 1])
def test_a_stage_materializes_only_its_own_modules_bit_identical_to_the_full_rack(stage, tie):
    config = tiny(tie_embeddings=tie, attention_type="mla", n_kv_heads=4)
    arch = config.model.architecture
    units = layer_units(arch.n_stacks, arch.blocks_per_stack)
    layout = layout_for([TRAIN] * len(units), config, 2, False, elastic=False)
    local = layout.rack_modules(stage, units, tie)
    full = rack_of(config)
    part = rack_of(config, materialize=local.__contains__)
    stage_blocks = {f"stacks.{stage}.blocks.{b}" for b in range(arch.blocks_per_stack)}
    edge = {0: {"embedding"}, 1: {"norm", "lm_head"} | ({"embedding"} if tie else set())}[stage]
    assert local == stage_blocks | edge
    full_state = full.state_dict()
    for name, tensor in part.state_dict().items():
        owner = "embedding.weight" if tie and name == "lm_head.weight" else name  # one shared Parameter
        mine = any(owner.startswith(module + ".") for module in local)
        assert tensor.is_meta != mine, name
        if mine:
            assert torch.equal(tensor, full_state[name]), name
    assert part.get_parameter_count() == full.get_parameter_count()  # shapes and names all still there


def test_stack_freeze_unfreeze_keeps_fixed_up_projection_frozen():
    rack = rack_of(tiny(freeze_up_proj=True))
    stack = rack.stacks[0].freeze()
    assert not any(p.requires_grad for p in stack.parameters())
    stack.unfreeze()
    for block in stack.blocks:
        assert not block.ffn.up_proj.weight.requires_grad
        assert block.ffn.gate_proj.weight.requires_grad and block.attn.q_proj.weight.requires_grad


def test_rack_casts_to_bf16():
    rack = rack_of(tiny()).to(torch.bfloat16)
    logits = rack(torch.randint(0, 258, (2, 8)))
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()


def test_sequence_longer_than_max_seq_len_is_refused():
    rack = rack_of(tiny())
    with pytest.raises(ValueError, match="max_seq_len"):
        rack(torch.randint(0, 258, (1, 65)))


def test_rack_rejects_bad_sizes():
    with pytest.raises(ValueError, match="must be positive"):
        Rack([], vocab_size=0, d_model=8)
    with pytest.raises(ValueError, match="model.vocab_size must be positive, got 0"):
        build_rack(ModelConfig(vocab_size=0, d_model=8, n_heads=2))
    with pytest.raises(ValueError, match="model.architecture.n_stacks must be positive, got 0"):
        build_rack(ModelConfig(d_model=8, n_heads=2, architecture=ArchitectureConfig(n_stacks=0)))
    with pytest.raises(ValueError, match="has no blocks"):
        Stack([], stack_id=0)


@pytest.mark.parametrize("attention_type", ["gqa", "kernel"])
def test_tiny_rack_overfits_one_batch(attention_type):
    torch.manual_seed(0)
    rack = rack_of(tiny(attention_type=attention_type, d_model=64))
    batch = torch.randint(0, 258, (4, 33))
    inputs, labels = batch[:, :-1], batch[:, 1:]
    optimizer = torch.optim.AdamW(rack.parameters(), lr=3e-3)
    losses = []
    for _ in range(300):
        loss = torch.nn.functional.cross_entropy(rack(inputs).reshape(-1, 258), labels.reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if loss.item() < 0.1 * losses[0]:
            break
    assert losses[-1] < 0.1 * losses[0], f"{attention_type}: {losses[0]:.3f} -> {losses[-1]:.3f}"


def _losses_of_three_adamw_steps(config: StackWiseConfig) -> tuple[list[float], Rack]:
    rack = rack_of(config)
    optimizer = torch.optim.AdamW(rack.parameters(), lr=1e-2)
    tokens = torch.randint(0, config.model.vocab_size, (2, config.data.seq_len + 1),
                           generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(3):
        logits = rack(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses, rack


@pytest.mark.multiprocess  # torch.compile's inductor runs the C++ compiler in processes of its own
def test_compiled_blocks_train_to_the_losses_of_eager_ones():
    from torch._dynamo.utils import counters

    raw = {"model": {"d_model": 32, "n_heads": 4, "n_kv_heads": 2, "max_seq_len": 16,
                     "architecture": {"n_stacks": 1, "blocks_per_stack": 2}}, "data": {"seq_len": 16}}
    eager, eager_rack = _losses_of_three_adamw_steps(StackWiseConfig.from_dict(raw))
    raw["model"]["compile"] = True
    counters.clear()
    compiled, compiled_rack = _losses_of_three_adamw_steps(StackWiseConfig.from_dict(raw))
    assert counters["stats"]["unique_graphs"] >= 1, "dynamo compiled the blocks' forward"
    assert compiled == pytest.approx(eager, rel=1e-4) and compiled[-1] < compiled[0]
    assert list(compiled_rack.state_dict()) == list(eager_rack.state_dict()), "names and checkpoints unchanged"


def test_a_run_may_resume_with_compile_switched():
    from stackwise_ds.checkpoint.files import CheckpointError, check_same_architecture

    saved = StackWiseConfig().to_dict()["model"]
    check_same_architecture(saved, {**saved, "compile": True}, where="run")
    check_same_architecture({k: v for k, v in saved.items() if k != "compile"}, saved, where="run")  # older run
    with pytest.raises(CheckpointError, match="model.d_model"):
        check_same_architecture(saved, {**saved, "d_model": 512}, where="run")


def test_a_plain_dict_config_builds_the_same_rack_as_its_model_section():
    config = tiny()
    from_dict = create_rack_from_config(config.to_dict())
    assert all(torch.equal(a, b) for a, b in zip(from_dict.state_dict().values(),
                                                  build_rack(config.model, config.training.seed).state_dict().values(),
                                                  strict=True))
    assert not torch.equal(from_dict.embedding.weight, build_rack(config.model, seed=0).embedding.weight)


def test_the_model_modules_take_the_model_section_alone():
    """Block, Stack, Rack and attention see ModelConfig only, never the whole run config (no god object)."""
    import ast

    import stackwise_ds.model as model_package

    folder = Path(model_package.__file__).parent
    for module in ("attention.py", "block.py", "stack.py", "rack.py"):
        tree = ast.parse((folder / module).read_text())
        imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                    and node.module == "config" for alias in node.names}
        assert imported <= {"ModelConfig"}, (module, imported)
