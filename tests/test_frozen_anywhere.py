"""Frozen anywhere (issue 25 part 1): a frozen stack after a trained one passes the gradient back.

Real launches on CPU ranks: a frozen last stack on 2 stages against the run where that stack trains at learning
rate 0; a frozen middle and last stage (the LM head frozen too) on 3 stages against one process; bf16/int8 frozen
stacks behind trained ones; a stackwise elastic run whose frozen stack sits between trained ones, resumed mid-phase
and at a phase boundary.
"""

from __future__ import annotations

import pytest
import torch

from launch_utils import layer_state, relative_close, results, resumed_copy, run_training, scalars

pytestmark = pytest.mark.multiprocess

NO_DECAY = ["training.grad_clip=0", "training.weight_decay=0", "training.save_interval=2"]
# 3 stacks of 2 blocks: layer 0 the embedding, 1-2 stack 0, 3-4 stack 1, 5-6 stack 2, 7 the norm, 8 the head
THREE_STACKS_FROZEN_TAIL = ["model.architecture.n_stacks=3", "training.frozen_stacks=[1,2]",
                            "training.blocks_only=true", "model.tie_embeddings=false", "training.save_interval=2",
                            "training.log_interval=1"]
ELASTIC_RUN = ["model.architecture.n_stacks=3", "training.training_architecture=stackwise", "training.prefix=train",
               "training.steps_per_phase=2", "training.save_interval=1", "training.keep_checkpoints=0",
               "training.eval_interval=0", "parallel.max_rank_memory_mb=4.0", *NO_DECAY[:2]]
ELASTIC = [*ELASTIC_RUN, "training.frozen_stacks=[1]"]


def _same_layers(run_a, step_a, run_b, step_b, layers) -> bool:
    for layer in layers:
        a, b = layer_state(run_a, step_a, layer), layer_state(run_b, step_b, layer)
        if a.keys() != b.keys() or not all(torch.equal(a[k], b[k]) for k in a):
            return False
    return True


@pytest.fixture(scope="module")
def frozen_last(tmp_path_factory):
    out = tmp_path_factory.mktemp("frozen_last")
    run_training(2, out, "training.frozen_stacks=[1]", *NO_DECAY)
    return out


@pytest.fixture(scope="module")
def frozen_tail_pp3(tmp_path_factory):
    out = tmp_path_factory.mktemp("frozen_tail_pp3")
    run_training(3, out, "parallel.pipeline_stages=3", *THREE_STACKS_FROZEN_TAIL)
    return out


@pytest.fixture(scope="module")
def elastic_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("elastic_frozen_middle")
    run_training(2, out, *ELASTIC)
    return out


def test_a_frozen_last_stack_equals_training_it_at_lr_zero(frozen_last, tmp_path):
    reference = tmp_path / "lr0"
    run_training(2, reference, "training.stack_lr_scale=[1,0]", *NO_DECAY)
    assert relative_close(results(frozen_last)["losses"], results(reference)["losses"], 1e-5)
    # stack 1 (layers 3-4) never moves; stack 0 (layers 1-2) trains through it, as in the reference
    assert _same_layers(frozen_last, 6, frozen_last, 2, [3, 4])
    assert _same_layers(frozen_last, 6, reference, 6, [3, 4])
    assert not _same_layers(frozen_last, 6, frozen_last, 2, [1, 2])
    for layer in (1, 2):
        ours, theirs = layer_state(frozen_last, 6, layer), layer_state(reference, 6, layer)
        assert all(torch.allclose(ours[k], theirs[k], rtol=1e-5, atol=1e-6) for k in ours)
    # the frozen stack's stage holds optimizer state for the norm (and the tied head's copy) only
    shard = "zero_pp_rank_0_mp_rank_01_optim_states.pt"
    frozen_bytes = (frozen_last / "checkpoints" / "step00000006" / shard).stat().st_size
    assert frozen_bytes < 0.5 * (reference / "checkpoints" / "step00000006" / shard).stat().st_size


def test_frozen_middle_and_last_stages_backpropagate_like_one_process(frozen_tail_pp3, tmp_path):
    """Stage 1 (stack 1) and stage 2 (stack 2, norm, head: computes the loss) are all frozen: backprop stages."""
    single = tmp_path / "pp1"
    run_training(1, single, "parallel.pipeline_stages=1", *THREE_STACKS_FROZEN_TAIL)
    assert relative_close(results(frozen_tail_pp3)["losses"], results(single)["losses"], 1e-5)
    grad_norms = [[v for _, v in scalars(run, "grad_norm/stack0")] for run in (frozen_tail_pp3, single)]
    assert relative_close(*grad_norms, 1e-5), grad_norms  # the gradient reaching stack 0 is scaled alike
    assert not _same_layers(frozen_tail_pp3, 6, frozen_tail_pp3, 2, [1, 2])
    assert _same_layers(frozen_tail_pp3, 6, frozen_tail_pp3, 2, [3, 4, 5, 6, 7, 8])
    tag = frozen_tail_pp3 / "checkpoints" / "step00000006"
    assert sorted(p.name for p in tag.glob("*optim_states.pt")) == ["zero_pp_rank_0_mp_rank_00_optim_states.pt"]


def test_bf16_and_int8_frozen_stacks_behind_a_trained_one(frozen_tail_pp3, tmp_path):
    """Stack 1 in bf16 and stack 2 in int8, both after the trained stack 0: the input gradient goes through the
    converted weights (int8: dequantized), and checkpoints keep the exact full-precision weights."""
    low = tmp_path / "lowp"
    run_training(1, low, "parallel.pipeline_stages=1", "training.stack_precision=[same,bf16,int8]",
                 *THREE_STACKS_FROZEN_TAIL)
    losses, full = results(low)["losses"], results(frozen_tail_pp3)["losses"]
    assert losses != full and relative_close(losses, full, 0.02)
    assert losses[-1] < losses[0]
    assert _same_layers(low, 6, frozen_tail_pp3, 6, [3, 4, 5, 6])


def test_elastic_frozen_middle_stack_between_trained_ones(elastic_run, tmp_path):
    phases = results(elastic_run)["phases"]
    # the last phase spreads over 2 stages, the frozen stack 1 (layers 3-4) across their boundary
    assert phases[2]["layout"]["pipeline_stages"] == 2 and phases[2]["layout"]["parts"] == [0, 4, 9]
    reference = tmp_path / "lr0"
    # stack 1 trains in the reference: it needs more memory than the bound (its placement may differ, its losses not)
    run_training(2, reference, *ELASTIC_RUN, "training.stack_lr_scale=[1,0,1]", "parallel.max_rank_memory_mb=null")
    assert relative_close(results(elastic_run)["losses"], results(reference)["losses"], 1e-5)
    assert _same_layers(elastic_run, 6, elastic_run, 1, [3, 4])  # frozen from the first step to the last
    assert not _same_layers(elastic_run, 6, elastic_run, 4, [1, 2])  # stack 0 trains through it in phase 3


@pytest.mark.parametrize("kept_step", [3, 4], ids=["mid_phase", "phase_boundary"])
def test_resume_with_a_frozen_middle_stack_is_bitwise(elastic_run, tmp_path, kept_step):
    resumed = resumed_copy(elastic_run, tmp_path, kept_step)
    run_training(2, resumed, *ELASTIC)
    assert results(resumed)["losses"] == results(elastic_run)["losses"]  # the history up to kept_step, then rerun
    assert _same_layers(resumed, 6, elastic_run, 6, range(8))  # the tied head has no file of its own
