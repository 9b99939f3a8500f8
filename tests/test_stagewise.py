"""Stackwise and blockwise training through stage-level freezing: real multi-process runs on CPU.

``stackwise_run`` uses the fixed layout (one stage per stack, forward-only and relay stages);
the other runs use the default elastic layout (tests/test_elastic.py covers it in depth).

Weights are read back from the checkpoint written at the end of every phase and compared
with the deterministic initial weights of the same config.
"""

import shutil

import pytest
import torch

from launch_utils import TINY, layer_state, rack_of, relative_close, results, run_training, scalars, state
from stackwise_ds.config import StackWiseConfig, apply_overrides

pytestmark = pytest.mark.multiprocess  # every test here launches training processes

STEPS = 4


def initial_rack(*overrides):
    raw = apply_overrides({}, [*TINY, *overrides])
    return rack_of(StackWiseConfig.from_dict(raw))


def block_layer(stack_id, block_id, blocks_per_stack=2):
    return 1 + stack_id * blocks_per_stack + block_id


def block_init(rack, stack_id, block_id):
    return rack.stacks[stack_id].blocks[block_id].state_dict()


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def stackwise_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("stackwise")
    run_training(2, out, "training.training_architecture=stackwise", f"training.steps_per_phase={STEPS}",
                 "training.save_interval=2", "model.tie_embeddings=false", "parallel.phase_layout=fixed")
    return out


def test_stackwise_phases_freeze_earlier_and_keep_later_dormant(stackwise_run):
    init = initial_rack("model.tie_embeddings=false")
    end0, end1 = STEPS, 2 * STEPS
    for b in range(2):
        after0 = layer_state(stackwise_run, end0, block_layer(0, b))
        after1 = layer_state(stackwise_run, end1, block_layer(0, b))
        assert not same(after0, block_init(init, 0, b)), "stack 0 did not train in its phase"
        assert same(after1, after0), "stack 0 moved after its phase"
        dormant = layer_state(stackwise_run, end0, block_layer(1, b))
        assert same(dormant, block_init(init, 1, b)), "stack 1 changed before its phase"
        assert not same(layer_state(stackwise_run, end1, block_layer(1, b)), dormant), "stack 1 did not train"
    # an untied embedding trains with the first stack only
    emb0, emb1 = layer_state(stackwise_run, end0, 0), layer_state(stackwise_run, end1, 0)
    assert not torch.equal(emb0["embedding.weight"], init.embedding.weight.detach())
    assert torch.equal(emb0["embedding.weight"], emb1["embedding.weight"])


def test_stackwise_optimizer_state_holds_only_active_unit_and_head(stackwise_run):
    """Phase 1 (stack 1 active): stage 0 is forward-only and writes no optimizer shard; stage 1's
    optimizer covers exactly stack 1 + final norm + untied head."""
    tag = stackwise_run / "checkpoints" / f"step{2 * STEPS:08d}"
    assert not (tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt").exists()
    shard = torch.load(tag / "zero_pp_rank_0_mp_rank_01_optim_states.pt", weights_only=False)
    fp32 = shard["optimizer_state_dict"]["single_partition_of_fp32_groups"]
    rack = initial_rack("model.tie_embeddings=false")
    expected = sum(p.numel() for p in rack.stacks[1].parameters()) + rack.norm.weight.numel() \
        + rack.lm_head.weight.numel()
    assert sum(t.numel() for t in fp32) == expected


def test_stackwise_phase_bookkeeping_and_validation(stackwise_run):
    res = results(stackwise_run)
    assert [p["name"] for p in res["phases"]] == ["stack 1/2", "stack 2/2"]
    for phase in res["phases"]:
        assert len(phase["losses"]) == STEPS
        assert phase["val_loss_after"] < phase["val_loss_before"], phase
    assert [v for _, v in scalars(stackwise_run, "train/phase")][0] == 0.0
    assert {v for _, v in scalars(stackwise_run, "train/active_stack")} == {0.0, 1.0}
    assert scalars(stackwise_run, "train/loss_phase1")
    assert state(stackwise_run)["phase_index"] == 2


def test_blockwise_tied_two_stages(tmp_path):
    # freeze_embedding=false: the tied weight on a frozen first stage and a training last stage (the old greedy mode)
    run_training(2, tmp_path, "training.training_architecture=blockwise", "training.steps_per_phase=2",
                 "training.eval_interval=0", "training.freeze_embedding=false")
    init = initial_rack()
    res = results(tmp_path)
    assert len(res["phases"]) == 4
    ends = [2, 4, 6, 8]
    blocks = [(0, 0), (0, 1), (1, 0), (1, 1)]
    for k, end in enumerate(ends):
        for g, (s, b) in enumerate(blocks):
            weights = layer_state(tmp_path, end, block_layer(s, b))
            if g > k:
                assert same(weights, block_init(init, s, b)), f"block {g} moved before its phase {k}"
            elif g == k:
                assert not same(weights, block_init(init, s, b)), f"block {g} did not train in phase {k}"
            else:
                assert same(weights, layer_state(tmp_path, ends[g], block_layer(s, b))), f"block {g} moved in phase {k}"
        assert state(tmp_path, f"step{end:08d}")["tied_weight_max_abs_diff"] == 0.0
    # the tied embedding/head keeps learning through the head in every phase
    embedding_at = {step: layer_state(tmp_path, step, 0)["embedding.weight"] for step in (2, 8)}
    assert not torch.equal(embedding_at[2], embedding_at[8])


def test_stackwise_four_ranks_with_joint_phase_and_copy_init(tmp_path):
    # stack 1 gets learning rate 0, so after its phase it still equals what it was copied from
    run_training(4, tmp_path, "training.training_architecture=stackwise", "training.steps_per_phase=2",
                 "training.joint_steps=2", "training.growth_operator=copy_last", "training.eval_interval=0",
                 "training.stack_lr_scale=[1.0, 0.0]")
    res = results(tmp_path)
    assert [p["kind"] for p in res["phases"]] == ["stack", "stack", "joint"]
    init = initial_rack()
    for b in range(2):
        copied = layer_state(tmp_path, 4, block_layer(1, b))
        assert same(copied, layer_state(tmp_path, 2, block_layer(0, b))), "stack 1 did not start as a copy of stack 0"
        assert not same(copied, block_init(init, 1, b))
    assert state(tmp_path)["tied_weight_max_abs_diff"] == 0.0
    # joint phase: every stage has an optimizer again, sharded over 2 replicas
    tag = tmp_path / "checkpoints" / "step00000006"
    assert len(list(tag.glob("zero_pp_rank_*_optim_states.pt"))) == 4


def test_stackwise_pp1_single_process(tmp_path):
    run_training(1, tmp_path, "training.training_architecture=stackwise", "training.steps_per_phase=3",
                 "parallel.pipeline_stages=1", "training.eval_interval=0")
    assert [len(p["losses"]) for p in results(tmp_path)["phases"]] == [3, 3]


def test_stackwise_resume_mid_phase(stackwise_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(stackwise_run, out)
    # the job died after step 6 (mid phase 1): drop later checkpoints and outputs
    shutil.rmtree(out / "checkpoints" / f"step{2 * STEPS:08d}")
    shutil.rmtree(out / "tensorboard")
    proc = run_training(2, out, "training.training_architecture=stackwise", f"training.steps_per_phase={STEPS}",
                        "training.save_interval=2", "model.tie_embeddings=false", "parallel.phase_layout=fixed")
    assert "step00000006" in proc.stdout
    resumed = results(out)["phases"]  # the history up to step 6 comes from results.json, the rest is retrained
    assert [p["name"] for p in resumed] == ["stack 1/2", "stack 2/2"]
    assert [p["losses"] for p in resumed] == [p["losses"] for p in results(stackwise_run)["phases"]]
    assert results(out)["losses"] == results(stackwise_run)["losses"]


def test_a_resume_past_a_lowered_step_budget_says_the_phase_ends(stackwise_run, tmp_path):
    """Resumed at step 6 (2 steps into phase 2) with steps_per_phase 1: the phase has nothing left to train, and
    the log says so plainly instead of 'steps 2..1'."""
    out = tmp_path / "run"
    shutil.copytree(stackwise_run, out)
    shutil.rmtree(out / "checkpoints" / f"step{2 * STEPS:08d}")
    proc = run_training(2, out, "training.training_architecture=stackwise", "training.steps_per_phase=1",
                        "training.save_interval=2", "model.tie_embeddings=false", "parallel.phase_layout=fixed")
    assert "resuming from" in proc.stdout and "steps 2..1" not in proc.stdout
    assert ("phase 2/2 stack 2/2: it already ran 2 steps and its budget is now 1 (training.steps_per_phase): "
            "no steps left to train") in proc.stdout
    assert results(out)["phases"][1]["losses"] == results(stackwise_run)["phases"][1]["losses"][:2]


def test_activation_checkpointing_gives_the_same_stackwise_run(stackwise_run, tmp_path):
    """parallel.activation_checkpoint_interval=1 (blocks only: the embedding's stage has no input
    requiring grad) recomputes the same forward: same losses as the run without it, frozen and
    relay stages included."""
    run_training(2, tmp_path, "training.training_architecture=stackwise", f"training.steps_per_phase={STEPS}",
                 "training.save_interval=2", "model.tie_embeddings=false", "parallel.phase_layout=fixed",
                 "parallel.activation_checkpoint_interval=1")
    assert relative_close(results(tmp_path)["losses"], results(stackwise_run)["losses"], 1e-6)
