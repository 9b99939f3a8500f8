"""``parallel.zero_stage: 0`` (no optimizer sharding) with the shipped templates: a stackwise run on
the elastic layout trains, and a mid-phase resume restores its (unsharded) optimizer exactly; with bf16, which
DeepSpeed cannot accumulate in fp32 without ZeRO, every rank stops at once with the fix."""

import shutil

import pytest

from launch_utils import results, run_training
from test_reliability import expect_error_on_every_rank

pytestmark = pytest.mark.multiprocess  # every test here launches training processes

RUN = ("training.training_architecture=stackwise", "training.steps_per_phase=4", "training.save_interval=2",
       "training.eval_interval=0", "parallel.zero_stage=0")


def test_zero_stage_0_trains_and_resumes_mid_phase_bitwise(tmp_path):
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    run_training(2, reference, *RUN)
    losses = results(reference)["losses"]
    assert len(losses) == 8 and losses[-1] < losses[0]
    tag = reference / "checkpoints" / "step00000006"
    assert not list(tag.glob("zero_pp_rank_*")), "ZeRO stage 0 wrote ZeRO optimizer shards"
    shutil.copytree(reference, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step00000008")  # the job died after step 6, mid phase 2
    proc = run_training(2, resumed, *RUN)
    assert "step00000006" in proc.stdout
    assert results(resumed)["losses"] == losses  # Adam moments restored: a fresh optimizer would differ


def test_bf16_without_zero_stops_every_rank_with_the_fix_and_no_hang(tmp_path):
    proc = run_training(2, tmp_path, "training.precision=bf16", "parallel.zero_stage=0", expect_ok=False,
                        timeout=120)
    expect_error_on_every_rank(proc, 2, r"training.precision bf16 .* needs parallel.zero_stage 1")
    assert "Traceback" not in proc.stdout + proc.stderr and not (tmp_path / "checkpoints").exists()
