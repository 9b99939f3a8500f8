"""Growth on real multi-process runs: optimizer state carried across phases and layouts, one LR
schedule over a grown run, and the copy operators' weights read back by Rack name.

Four small 2-rank runs are shared by the assertions: a rackwise reference, a stackwise run that
trains the whole rack in its one phase and then a joint phase with ``optimizer_across_phases: carry``
(which must therefore *be* the rackwise run, across a re-placement and ZeRO-1 re-sharding), and two
growing runs (copy_all and copy_middle).
"""


import pytest
import torch

from launch_utils import layer_state, relative_close, results, resumed_copy, run_training, scalars, state
from stackwise_ds.training.lr import lr_multiplier

pytestmark = pytest.mark.multiprocess

STEPS = 3
CARRY = ["training.optimizer_across_phases=carry", "training.lr_schedule=continuous"]
# stackwise, the whole rack active in its only phase, then a joint phase: with the optimizer carried
# and one schedule, this is the rackwise run of 2 x STEPS steps
WHOLE_THEN_JOINT = ["training.training_architecture=stackwise", "training.depth_schedule=[2]",
                    f"training.steps_per_phase={STEPS}", f"training.joint_steps={STEPS}", "training.save_interval=2",
                    *CARRY]


@pytest.fixture(scope="module")
def rackwise_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("rackwise")
    run_training(2, out, f"training.max_steps={2 * STEPS}", "training.save_interval=2")
    return out


@pytest.fixture(scope="module")
def carry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("carry")
    run_training(2, out, *WHOLE_THEN_JOINT)
    return out


def optimizer_step_saved_by_deepspeed(run, step):
    """The base AdamW's step count in DeepSpeed's own ZeRO shard of the tag (not our moment files)."""
    shard = torch.load(run / "checkpoints" / f"step{step:08d}" / "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                       weights_only=False)["optimizer_state_dict"]
    return {int(s["step"]) for s in shard["base_optimizer_state"]["state"].values()}


def test_carried_optimizer_across_a_layout_change_is_the_uninterrupted_run(carry_run, rackwise_run):
    """Phase 1 runs on its elastic layout (1 stage x 2 replicas: ZeRO-1 shards over 2), the joint phase
    on the fixed 2-stage pipeline (no sharding): the AdamW moments and step count cross both, so
    every loss equals the rackwise run's (to summation order). A lost moment, a restarted step count
    or a restarted warmup would each show at the joint phase's first step."""
    plans = [p["layout"] for p in state(carry_run)["finished_phases"]]
    assert [(p["pipeline_stages"], p["data_parallel"]) for p in plans] == [(1, 2), (2, 1)]
    carried, reference = results(carry_run), results(rackwise_run)
    assert len(carried["losses"]) == 2 * STEPS
    assert relative_close(carried["losses"], reference["losses"], 1e-5), (carried["losses"], reference["losses"])
    assert optimizer_step_saved_by_deepspeed(carry_run, 2 * STEPS) == {2 * STEPS}
    moments = torch.load(carry_run / "checkpoints" / f"step{STEPS:08d}" / "layer_01-optim_moments.pt",
                         weights_only=True)
    assert moments["step"] == STEPS and set(moments["moments"]["attn.q_proj.weight"]) == {"exp_avg", "exp_avg_sq"}


def test_continuous_lr_warms_up_once_across_phases(carry_run, rackwise_run):
    lrs = [v for _, v in scalars(carry_run, "train/lr")]
    # each step logs the rate it trained with: one warmup and one decay over both phases' steps
    expected = [1e-3 * lr_multiplier(s, 2 * STEPS, 2, 0.1) for s in range(2 * STEPS)]
    assert relative_close(lrs, expected, 1e-6), lrs
    assert relative_close(lrs, [v for _, v in scalars(rackwise_run, "train/lr")], 1e-6)


@pytest.mark.parametrize("kept", [STEPS, STEPS + 1], ids=["phase_boundary", "mid_phase"])
def test_resume_with_carry_is_bitwise(carry_run, tmp_path, kept):
    """Killed after the phase end (the joint phase reads the moment files as the uninterrupted run did)
    or mid-way through the joint phase (DeepSpeed's own optimizer files): the same losses, bit for bit."""
    out = resumed_copy(carry_run, tmp_path, kept)
    run_training(2, out, *WHOLE_THEN_JOINT)
    assert [step for step, _ in scalars(out, "train/loss")] == list(range(kept + 1, 2 * STEPS + 1)), "resumed"
    assert results(out)["losses"] == results(carry_run)["losses"]


GROWING = ["training.training_architecture=stackwise", "model.architecture.blocks_per_stack=1",
           "parallel.pipeline_stages=2", "training.prefix=train", "training.save_interval=0", *CARRY,
           "training.lr_decay=wsd"]


@pytest.mark.parametrize("operator,stacks,depths,copies", [
    ("copy_all", 4, "[2, 4]", {2: 0, 3: 1}),  # Gstack: stack j starts as stack j mod 2
    ("copy_middle", 4, "[3, 4]", {2: 1, 3: 2}),  # MIDAS: a copy of the middle stack 1 goes after it, stack 2 moves up
])
def test_grown_stacks_start_as_their_sources(tmp_path, operator, stacks, depths, copies):
    """Stacks with a zero learning-rate scale keep the weights they start the growth with, so the run's
    last tag shows each copy by Rack name (layer 1 + s holds stacks.s.blocks.0); the moments came along."""
    scales = [1.0 if s not in copies else 0.0 for s in range(stacks)]
    run_training(2, tmp_path, *GROWING, f"model.architecture.n_stacks={stacks}", f"training.depth_schedule={depths}",
                 "training.steps_per_phase=[2, 1]", f"training.growth_operator={operator}",
                 f"training.stack_lr_scale={scales}")
    for stack, source in copies.items():
        grown, before = layer_state(tmp_path, 3, 1 + stack), layer_state(tmp_path, 2, 1 + source)
        assert grown.keys() == before.keys()
        assert all(torch.equal(grown[k], before[k]) for k in grown), (stack, source)
        assert not torch.equal(grown["attn.q_proj.weight"], layer_state(tmp_path, 2, 1 + stack)["attn.q_proj.weight"])
    assert optimizer_step_saved_by_deepspeed(tmp_path, 3) == {3}, "the growth kept the optimizer's step count"


def test_reshard_carries_the_moment_files(carry_run, tmp_path):
    """The moments are per layer and layout-free: a resharded phase-end tag keeps them as they are."""
    from stackwise_ds.checkpoint import reshard

    tag = carry_run / "checkpoints" / f"step{STEPS:08d}"
    reshard(tag, tmp_path / "pp2", pipeline_stages=2, data_parallel=1)
    moved = sorted(p.name for p in (tmp_path / "pp2" / "checkpoints").glob("step*/layer_*-optim_moments.pt"))
    assert moved and moved == sorted(p.name for p in tag.glob("layer_*-optim_moments.pt"))
