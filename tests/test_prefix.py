"""``training.prefix: train`` (progressive stacking): the units before the active one keep training.

The role plan is checked purely; a real 2-rank stackwise run on the default elastic layout shows
stack 0 still changing in phase 1 (with ``prefix: frozen`` it is bit-identical, see
tests/test_stagewise.py), and a mid-phase resume continuing it bitwise.
"""

import shutil

import pytest
import torch

from launch_utils import TINY, layer_state, rack_of, results, run_training, state
from stackwise_ds.config import ConfigError, StackWiseConfig, apply_overrides
from stackwise_ds.layout import DORMANT, FROZEN, TRAIN, layer_units
from stackwise_ds.phases import plan_phases
from stackwise_ds.placement import layout_for

STEPS = 4
RUN = ("training.training_architecture=stackwise", f"training.steps_per_phase={STEPS}", "training.save_interval=2",
       "model.tie_embeddings=false", "training.prefix=train", "training.growth_operator=copy_last")


def config(*overrides) -> StackWiseConfig:
    return StackWiseConfig.from_dict(apply_overrides({}, [*TINY, *overrides]))


def roles(cfg: StackWiseConfig, phase_index: int) -> list[str]:
    arch = cfg.model.architecture
    return plan_phases(cfg)[phase_index].layer_roles(layer_units(arch.n_stacks, arch.blocks_per_stack))


@pytest.mark.parametrize("architecture", ["stackwise", "blockwise"])
def test_prefix_train_trains_every_placed_unit_and_frozen_freezes_them(architecture):
    base = (f"training.training_architecture={architecture}", "model.architecture.n_stacks=3")
    trained, frozen = config(*base, "training.prefix=train"), config(*base)
    last = len(plan_phases(trained)) - 1
    for k in range(last + 1):
        live_train = [r for r in roles(trained, k) if r != DORMANT]
        assert set(live_train) == {TRAIN}, (k, roles(trained, k))
        # the same layers are live in both; 'frozen' freezes the embedding and every earlier unit
        assert [r == DORMANT for r in roles(trained, k)] == [r == DORMANT for r in roles(frozen, k)]
    # what trains with the prefix = what trains or is frozen without it
    assert roles(frozen, last).count(FROZEN) > 0
    assert roles(frozen, last).count(FROZEN) + roles(frozen, last).count(TRAIN) == roles(trained, last).count(TRAIN)


def test_elastic_plan_balances_several_training_units():
    """Last phase of 4 stacks on 2 ranks: with the prefix training, every live layer costs 3x,
    so the planner's predicted step is the rackwise one, well above the frozen prefix's."""
    arch = ("training.training_architecture=stackwise", "model.architecture.n_stacks=4", "parallel.pipeline_stages=2")
    trained, frozen = config(*arch, "training.prefix=train"), config(*arch)
    plans = [layout_for(roles(c, 3), c, 2, False, True) for c in (trained, frozen)]
    assert plans[0].predicted_step_flops > plans[1].predicted_step_flops


def test_prefix_is_validated():
    with pytest.raises(ConfigError, match="training.prefix"):
        config("training.prefix=thaw")


@pytest.fixture(scope="module")
def prefix_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("prefix_train")
    run_training(2, out, *RUN)
    return out


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.multiprocess
def test_prefix_train_keeps_training_earlier_stacks(prefix_run):
    init = rack_of(config(*RUN))
    end0, end1 = STEPS, 2 * STEPS
    for layer in (1, 2):  # stack 0's blocks
        assert not same(layer_state(prefix_run, end1, layer), layer_state(prefix_run, end0, layer)), \
            "stack 0 did not train in phase 1"
    for b, layer in enumerate((3, 4)):  # stack 1: dormant through phase 0, then a copy of stack 0 that trains
        assert same(layer_state(prefix_run, end0, layer), init.stacks[1].blocks[b].state_dict())
        assert not same(layer_state(prefix_run, end1, layer), layer_state(prefix_run, end0, layer - 2))
    embedding = [layer_state(prefix_run, step, 0)["embedding.weight"] for step in (end0, end1)]
    assert not torch.equal(*embedding), "the untied embedding froze after phase 0"
    phases = results(prefix_run)["phases"]
    assert all(p["val_loss_after"] < p["val_loss_before"] for p in phases), phases
    assert state(prefix_run)["config"]["training"]["prefix"] == "train"


@pytest.mark.multiprocess
def test_prefix_train_resumes_mid_phase_bitwise(prefix_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(prefix_run, out)
    # the job died after step 6 (mid phase 1): its last tag and TensorBoard files are gone
    shutil.rmtree(out / "checkpoints" / f"step{2 * STEPS:08d}")
    shutil.rmtree(out / "tensorboard")
    proc = run_training(2, out, *RUN)
    assert "step00000006" in proc.stdout
    assert results(out)["losses"] == results(prefix_run)["losses"]
    for layer in range(6):
        assert same(layer_state(out, 2 * STEPS, layer), layer_state(prefix_run, 2 * STEPS, layer)), layer
