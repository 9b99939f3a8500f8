"""The pure helpers of the frozen-precision and stack-cache benchmark sections (no run is started)."""

import math
import re

import pytest

from benchmarks import gpu_check
from benchmarks.common import REPO
from benchmarks.frozen_precision import frozen_blocks, frozen_bytes, logged_frozen_mb, ratio
from benchmarks.stack_cache import epoch_steps


def test_ratio_rounds_and_refuses_an_empty_denominator():
    assert ratio(1.0, 3.0) == 0.333
    assert math.isnan(ratio(1.0, 0.0))


def test_logged_frozen_mb_sums_the_last_phases_stage_lines_only():
    log = "\n".join([
        "[stackwise] stage 0: frozen layers 1, 2 run in int8 (weights 0.10 MB instead of 0.38 MB)",  # phase 1
        "[stackwise] stage 0: frozen layers 1, 2 run in int8 (weights 0.10 MB instead of 0.38 MB)",  # last phase
        "[stackwise] stage 1: frozen layers 3, 4 run in int8 (weights 0.11 MB instead of 0.39 MB)",
    ])
    assert logged_frozen_mb(log, stages=2) == [0.21, 0.77]
    assert logged_frozen_mb(log, stages=1) == [0.11, 0.39]
    assert logged_frozen_mb("no frozen layers here", stages=1) is None


def test_epoch_steps_counts_a_partial_last_step_and_refuses_a_split_smaller_than_a_batch():
    assert epoch_steps(64, 32) == 2
    assert epoch_steps(65, 32) == 3
    with pytest.raises(ValueError, match="cannot fill one batch"):
        epoch_steps(31, 32)


def test_frozen_bytes_of_the_benchmark_rack_shrink_as_the_trainer_converts_them():
    blocks, _ = frozen_blocks()
    fp32, bf16, int8 = (frozen_bytes(blocks, p) for p in ("same", "bf16", "int8"))
    assert bf16 == fp32 // 2
    assert int8 / fp32 <= 0.3


def test_gpu_check_shell_runs_every_step_of_the_helper_in_its_order():
    script = (REPO / "benchmarks" / "gpu_check.sh").read_text()
    listed = re.search(r"^STEPS=\(\n(.*?)^\)", script, flags=re.MULTILINE | re.DOTALL).group(1)
    assert [line.split()[0].strip('"') for line in listed.strip().splitlines()] == list(gpu_check.STEPS)


def test_gpu_check_records_a_killed_step_and_compares_the_precisions(tmp_path):
    (tmp_path / "gpu_mfu.rc").write_text("124\n")
    (tmp_path / "gpu_mfu.log").write_text("building the BPE ...")
    (tmp_path / "stack_cache.skipped").write_text("not started: out of time")
    killed, skipped = gpu_check.step_record(tmp_path, "gpu_mfu"), gpu_check.step_record(tmp_path, "stack_cache")
    assert killed["passed"] is False and "timed out" in killed["error"] and "BPE" in killed["log_tail"]
    assert skipped == {"passed": None, "skipped": "not started: out of time"}
    steps = {"stackwise_same": {"figures": {"last_phase_step_s": 0.2, "final_val_loss": 2.0}},
             "stackwise_int8": {"figures": {"last_phase_step_s": 0.25, "final_val_loss": 2.01}},
             "gpu_mfu": killed}
    summary = gpu_check.summary(steps)
    assert summary["int8_step_vs_same"] == 1.25 and summary["int8_val_loss_delta"] == 0.01
    assert "bf16_step_vs_same" not in summary and summary["gpu_tokens_per_s"] is None


def test_gpu_check_runs_offline_with_python3_and_writes_where_out_says():
    script = (REPO / "benchmarks" / "gpu_check.sh").read_text()
    assert 'PYTHON=${PYTHON:-python3}' in script and "export HF_HUB_OFFLINE=1" in script
    commands = [line for line in script.splitlines() if not line.lstrip().startswith("#")]
    plain = [line for line in commands if re.search(r"(^|\s)python\s", line)]
    assert not plain, "python3 only: a node may have no plain python"
    assert 'RESULTS=${OUT:-benchmarks/results}' in script and 'RESULTS=${OUT:-${TMPDIR:-/tmp}}' in script
    assert "pip install --quiet --no-index --no-deps --upgrade --target" in script
    assert "stackwise_bf16" not in gpu_check.STEPS, "on a bf16 run it repeats stackwise_same"
    assert len(gpu_check.NOT_TESTED_ON_ONE_GPU) == 4
