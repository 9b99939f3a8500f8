"""Elastic phase layout on real multi-process runs: each stage-wise phase places only its live layers,
re-partitioned over every rank, and trains exactly as the fixed pipeline does.

Two 4-rank stackwise runs (elastic and fixed, same global batch) are shared by most assertions;
an 8-phase blockwise run checks that re-forming the pipeline leaks neither process groups nor memory.
"""

import pytest
import torch

from launch_utils import TINY, rack_of, relative_close, results, run_training, scalars, state
from stackwise_ds.checkpoint import consolidate
from stackwise_ds.checkpoint.summary import describe
from stackwise_ds.config import StackWiseConfig, apply_overrides

pytestmark = pytest.mark.multiprocess  # every test here launches training processes

STEPS = 3
# 4 stacks on 4 ranks. The memory bound makes the first phase fit one rank (pure data parallelism)
# but not the last, which the planner splits over 2 stages x 2 replicas.
STACKWISE_4 = ["model.architecture.n_stacks=4", "training.training_architecture=stackwise",
               f"training.steps_per_phase={STEPS}", "parallel.pipeline_stages=2", "parallel.max_rank_memory_mb=2.0",
               "training.save_interval=2", "training.growth_operator=copy_last"]


@pytest.fixture(scope="module")
def elastic_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("elastic")
    run_training(4, out, *STACKWISE_4)
    return out


@pytest.fixture(scope="module")
def fixed_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fixed")
    run_training(4, out, *STACKWISE_4, "parallel.phase_layout=fixed")
    return out


def layouts(output_dir):
    return [record["layout"] for record in state(output_dir)["finished_phases"]]


def test_recorded_plans_differ_between_first_and_last_phase(elastic_run):
    plans = layouts(elastic_run)
    assert len(plans) == 4 and all(p["kind"] == "elastic" for p in plans)
    first, last = plans[0], plans[-1]
    assert (first["pipeline_stages"], first["data_parallel"]) == (1, 4)
    assert (last["pipeline_stages"], last["data_parallel"]) == (2, 2)
    assert first["live"] == [0, 1, 2, 9, 10], "phase 0 places embedding, stack 0, norm and head only"
    assert last["live"] == list(range(11))
    assert all(max(p["stage_memory_mb"]) <= 2.0 for p in plans)
    assert [v for _, v in scalars(elastic_run, "layout/pipeline_stages")] == [p["pipeline_stages"] for p in plans]
    assert "elastic: 2 stage(s) x 2 data-parallel" in describe(elastic_run)


def test_elastic_losses_equal_the_fixed_pipeline(elastic_run, fixed_run):
    """Same global batch, other placement: the same losses in every phase. Both runs use
    copy_last, which the fixed run reads into its standing pipeline and the elastic one into a new one, both
    from the layer files of the previous phase's end (wherever stack k-1 was placed): a lost copy would show here."""
    assert all(p["kind"] == "fixed" and p["pipeline_stages"] == 2 for p in layouts(fixed_run))
    elastic, fixed = results(elastic_run), results(fixed_run)
    for e, f in zip(elastic["phases"], fixed["phases"], strict=True):
        assert relative_close(e["losses"], f["losses"], 1e-5), (e["name"], e["losses"], f["losses"])
    assert relative_close([v for _, v in elastic["val_history"]], [v for _, v in fixed["val_history"]], 1e-5)


def test_tied_copies_stay_identical(elastic_run):
    tags = sorted((elastic_run / "checkpoints").glob("step*"))
    assert len(tags) >= 4
    assert all(state(elastic_run, tag.name)["tied_weight_max_abs_diff"] == 0.0 for tag in tags)


def test_checkpoints_stay_canonical(elastic_run, fixed_run, tmp_path):
    """Every tag holds every layer: dormant ones at their initial weights; the end of the run
    consolidates to the same Rack as the fixed pipeline's."""
    tag0 = elastic_run / "checkpoints" / f"step{STEPS:08d}"  # end of phase 0: stacks 1-3 dormant
    init = rack_of(StackWiseConfig.from_dict(apply_overrides({}, [*TINY, *STACKWISE_4])))
    for layer, (stack, block) in ((3, (1, 0)), (10 - 2, (3, 1))):
        saved = torch.load(tag0 / f"layer_{layer:02d}-model_states.pt", weights_only=True)
        expected = init.stacks[stack].blocks[block].state_dict()
        assert saved.keys() == expected.keys() and all(torch.equal(saved[k], expected[k]) for k in saved)
    consolidate(elastic_run, tmp_path / "elastic.safetensors")
    consolidate(fixed_run, tmp_path / "fixed.safetensors")
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "elastic.safetensors"), load_file(tmp_path / "fixed.safetensors")
    assert a.keys() == b.keys()
    # summation order differs between layouts; Adam updates are ~lr = 1e-3 a step, so 1e-5 still
    # tells a misplaced or stale layer apart
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-5) for k in a)


@pytest.fixture(scope="module")
def blockwise_run(tmp_path_factory):
    # from phase 2 on the untied head (training.freeze_embedding) holds its own weights and moments: 1.8 MB
    # fits the first 4 phases on one rank, not the last 4
    out = tmp_path_factory.mktemp("blockwise")
    run_training(2, out, "model.architecture.blocks_per_stack=4", "training.training_architecture=blockwise",
                 "training.steps_per_phase=2", "parallel.max_rank_memory_mb=1.8", "training.eval_interval=0",
                 "training.save_interval=0")
    return out


def test_reforming_leaks_no_process_groups_or_memory(blockwise_run):
    phases = results(blockwise_run)["phases"]
    depths = [p["layout"]["pipeline_stages"] for p in phases]
    assert len(phases) == 8 and depths == [1, 1, 1, 1, 2, 2, 2, 2], "the pipeline must be re-formed mid-run"
    for depth in (1, 2):  # the same layout shape needs the same groups, phase after phase
        counts = {p["process_groups"] for p in phases if p["layout"]["pipeline_stages"] == depth}
        assert len(counts) == 1, f"process groups grow across phases: {[p['process_groups'] for p in phases]}"
    groups = results(blockwise_run)["process_groups"]
    assert groups["after"] == groups["before"], groups
    rss = [p["rss_mb"] for p in phases]
    assert rss[-1] - rss[4] < 25 and rss[3] - rss[0] < 25, f"resident memory grows across phases: {rss}"


def test_reshard_moves_an_elastic_mid_phase_checkpoint_to_the_fixed_pipeline(elastic_run, tmp_path):
    """Step 10 is mid phase 3, saved by 2 stages x 2 replicas at block boundaries; resharded to the fixed
    2-stage pipeline it resumes there and continues the same losses."""
    from stackwise_ds.checkpoint import reshard

    tag = f"step{3 * STEPS + 1:08d}"
    assert state(elastic_run, tag)["layout"]["parts"] != [0, 5, 11]  # not the fixed stack split
    out = tmp_path / "fixed"
    reshard(elastic_run / "checkpoints" / tag, out, pipeline_stages=2, data_parallel=2)
    run_training(4, out, *STACKWISE_4, "parallel.phase_layout=fixed")
    continued, reference = results(out)["phases"], results(elastic_run)["phases"]
    # reshard carries results.json: the history before step 10 comes along, the rest is trained again
    assert [p["name"] for p in continued] == [p["name"] for p in reference]
    assert relative_close(continued[-1]["losses"], reference[3]["losses"], 1e-5)


def test_resume_at_a_phase_boundary_keeps_copy_previous(elastic_run, tmp_path):
    """Killed right after phase 1's last checkpoint: the re-run starts stack 2 as a copy of stack 1
    (read from that checkpoint) exactly as the uninterrupted run did, and continues bitwise."""
    import shutil

    out = tmp_path / "run"
    shutil.copytree(elastic_run, out)
    for tag in (out / "checkpoints").glob("step*"):
        if int(tag.name[4:]) > 2 * STEPS:
            shutil.rmtree(tag)
    run_training(4, out, *STACKWISE_4)
    resumed, reference = results(out)["phases"], results(elastic_run)["phases"]
    assert [p["name"] for p in resumed] == [p["name"] for p in reference]  # phases 0-1 from the history
    assert [p["losses"] for p in resumed] == [p["losses"] for p in reference]
    assert resumed[2]["val_loss_before"] == reference[2]["val_loss_before"]


def test_mid_phase_resume_with_another_world_size_is_refused(elastic_run, tmp_path):
    """Mid-phase optimizer files belong to the saved layout: 2 ranks cannot continue a 4-rank phase;
    every rank says so, names both layouts and the reshard command, and nothing is deleted."""
    import shutil

    out = tmp_path / "run"
    shutil.copytree(elastic_run, out)
    for tag in (out / "checkpoints").glob("step*"):
        if int(tag.name[4:]) > 3 * STEPS + 1:
            shutil.rmtree(tag)
    kept = sorted(p.name for p in (out / "checkpoints").rglob("*"))
    proc = run_training(2, out, *STACKWISE_4, "parallel.max_rank_memory_mb=3.0", expect_ok=False)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if "was saved mid-phase with the layout" in line]
    assert len(errors) == 2, proc.stderr[-3000:]
    assert "2 stage(s) x 2 data-parallel" in errors[0] and "stackwise-reshard" in errors[0]
    assert sorted(p.name for p in (out / "checkpoints").rglob("*")) == kept
