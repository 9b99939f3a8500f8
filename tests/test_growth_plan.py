"""Growth without processes: depth schedules, growth operators by Rack name, the LR schedule over a
grown run, and the config's checks. The multi-process behaviour is in test_growth.py."""

import math

import pytest

from stackwise_ds.config import ConfigError, StackWiseConfig, apply_overrides
from stackwise_ds.layout import DORMANT, FROZEN, FROZEN_BACKPROP, TRAIN, layer_units
from stackwise_ds.phases import plan_phases
from stackwise_ds.training.growth import added_units, phase_layer_sources, phase_zeroed_layers, unit_sources
from stackwise_ds.training.lr import lr_multiplier, phase_lr_lambda


def config(*overrides):
    return StackWiseConfig.from_dict(apply_overrides({}, list(overrides)))


STACKWISE_4 = ["model.architecture.n_stacks=4", "model.architecture.blocks_per_stack=2",
               "training.training_architecture=stackwise"]


@pytest.mark.parametrize("operator,old,new,expected", [
    ("copy_all", 1, 4, [0, 0, 0, 0]), ("copy_all", 2, 4, [0, 1, 0, 1]), ("copy_all", 3, 8, [0, 1, 2, 0, 1, 2, 0, 1]),
    ("copy_last", 2, 4, [0, 1, 1, 1]), ("copy_last", 3, 4, [0, 1, 2, 2]),
    ("copy_middle", 4, 6, [0, 1, 2, 1, 2, 3]), ("copy_middle", 3, 4, [0, 1, 1, 2]),
    ("copy_middle", 2, 4, [0, 1, 0, 1]), ("copy_middle", 1, 3, [0, 0, 0]),
    ("copy_middle", 3, 9, [0, 1, 2, 0, 1, 2, 0, 1, 2]),
    ("fresh", 2, 4, [0, 1, 2, 3]),
])
def test_growth_operators_order_the_old_units(operator, old, new, expected):
    sources = unit_sources(old, new, operator)
    assert [sources.get(position, position) for position in range(new)] == expected


@pytest.mark.parametrize("operator,old,new,added", [
    ("fresh", 2, 4, [2, 3]), ("copy_last", 2, 4, [2, 3]), ("copy_all", 2, 5, [2, 3, 4]),
    ("copy_middle", 3, 4, [2]),  # [0, 1, 1', 2]: the copy of 1 is added, old unit 2 moves up to 3
    ("copy_middle", 4, 6, [3, 4]),  # [0, 1, 2, 1', 2', 3]
    ("copy_middle", 1, 3, [1, 2]), ("copy_all", 0, 2, []), ("copy_last", 3, 3, []),
])
def test_each_operator_names_the_units_it_adds(operator, old, new, added):
    assert added_units(old, new, operator) == added


def test_copy_all_and_copy_middle_by_rack_name():
    """The layer map the placement reads files through, in Rack parameter names."""
    names = {}
    for operator, depths in (("copy_all", "[2, 4]"), ("copy_middle", "[3, 4]")):
        cfg = config(*STACKWISE_4, f"training.depth_schedule={depths}", "training.steps_per_phase=[2, 2]",
                     f"training.growth_operator={operator}", "training.prefix=train")
        units = layer_units(4, 2)
        grow = plan_phases(cfg)[1]
        names[operator] = {units[dst].rack_prefix: units[src].rack_prefix
                           for dst, src in phase_layer_sources(units, grow, operator).items()}
        assert phase_layer_sources(units, plan_phases(cfg)[0], operator) == {}, "the first phase copies nothing"
    assert names["copy_all"] == {
        "stacks.2.blocks.0.": "stacks.0.blocks.0.", "stacks.2.blocks.1.": "stacks.0.blocks.1.",
        "stacks.3.blocks.0.": "stacks.1.blocks.0.", "stacks.3.blocks.1.": "stacks.1.blocks.1."}
    assert names["copy_middle"] == {
        "stacks.2.blocks.0.": "stacks.1.blocks.0.", "stacks.2.blocks.1.": "stacks.1.blocks.1.",
        "stacks.3.blocks.0.": "stacks.2.blocks.0.", "stacks.3.blocks.1.": "stacks.2.blocks.1."}


def test_blockwise_growth_maps_blocks_across_stacks():
    cfg = config(*STACKWISE_4, "training.training_architecture=blockwise", "training.depth_schedule=[2, 8]",
                 "training.steps_per_phase=[1, 1]", "training.growth_operator=copy_all", "training.prefix=train")
    units = layer_units(4, 2)
    sources = phase_layer_sources(units, plan_phases(cfg)[1], "copy_all")
    assert {units[d].rack_prefix: units[s].rack_prefix for d, s in sources.items()}["stacks.3.blocks.1."] == \
        "stacks.0.blocks.1."  # block 7 = 7 mod 2 -> block 1


def test_depth_schedule_roles():
    frozen = plan_phases(config(*STACKWISE_4, "training.depth_schedule=[1, 4]", "training.steps_per_phase=[6, 2]"))
    assert [(p.name, p.steps) for p in frozen] == [("stack 1/4", 6), ("stacks 2-4/4", 2)]
    units = layer_units(4, 2)
    blocks = [role for unit, role in zip(units, frozen[1].layer_roles(units), strict=True) if unit.kind == "block"]
    assert blocks == [FROZEN] * 2 + [TRAIN] * 6, "the units trained before freeze, the added ones train"
    assert frozen[0].layer_roles(units)[3:9] == [DORMANT] * 6
    train = plan_phases(config(*STACKWISE_4, "training.depth_schedule=[1, 2, 4]", "training.steps_per_phase=2",
                               "training.prefix=train"))
    assert [p.name for p in train] == ["stack 1/4", "stack 2/4", "stacks 3-4/4"]
    assert set(train[2].layer_roles(units)) == {TRAIN}
    default = plan_phases(config(*STACKWISE_4))
    assert [(p.new_from, p.active) for p in default] == [(0, 1), (1, 2), (2, 3), (3, 4)], "one new unit a phase"


def lrs_over_run(*overrides):
    cfg = config(*STACKWISE_4, *overrides)
    phases = plan_phases(cfg)
    return [phase_lr_lambda(phase, phases, cfg.training)(s) for phase in phases for s in range(phase.steps)]


def test_continuous_schedule_warms_up_once_and_decays_over_the_whole_run():
    run = lrs_over_run("training.depth_schedule=[1, 4]", "training.steps_per_phase=[30, 10]", "training.warmup_steps=5",
                       "training.lr_schedule=continuous", "training.lr_decay=wsd", "training.decay_fraction=0.2")
    rises = [i for i in range(1, len(run)) if run[i] > run[i - 1]]
    assert rises == [1, 2, 3, 4], "one warmup, at the start of the run"
    assert run[30] == run[29] == 1.0, "the growth does not restart the schedule"
    assert run == [lr_multiplier(s, 40, 5, 0.1, "wsd", 0.2) for s in range(40)], "one schedule over all phases"
    assert run[5:32] == [1.0] * 27 and run[32] < 1.0, "WSD: stable until its last 20 % (8 steps)"
    assert math.isclose(run[-1], 0.1), "and decays to the floor at the last step"
    per_phase = lrs_over_run("training.depth_schedule=[1, 4]", "training.steps_per_phase=[30, 10]",
                             "training.warmup_steps=5")
    assert per_phase[30] == 1 / 5, "per_phase restarts warmup at each phase (today's behaviour)"


def test_growth_rewarm_starts_from_a_fraction_of_the_scheduled_lr():
    run = lrs_over_run("training.depth_schedule=[1, 4]", "training.steps_per_phase=[30, 10]", "training.warmup_steps=5",
                       "training.lr_schedule=continuous", "training.growth_warmup_steps=4",
                       "training.growth_warmup_start=0.25")
    plain = lrs_over_run("training.depth_schedule=[1, 4]", "training.steps_per_phase=[30, 10]",
                         "training.warmup_steps=5", "training.lr_schedule=continuous")
    assert run[:30] == plain[:30]
    assert [run[30 + s] / plain[30 + s] for s in range(5)] == pytest.approx([0.25, 0.4375, 0.625, 0.8125, 1.0])


@pytest.mark.parametrize("overrides,message", [
    (["training.depth_schedule=[2, 1, 4]"], "strictly increasing"),
    (["training.depth_schedule=[1, 3]"], "ending at the model's 4 stacks"),
    (["training.depth_schedule=[1, 4]", "training.steps_per_phase=[1, 2, 3]"], "one number per depth_schedule entry"),
    (["training.training_architecture=rackwise", "training.depth_schedule=[1, 4]"], "rackwise"),
    (["training.growth_operator=copy_best"], "copy_last, copy_all, copy_middle"),
    (["training.growth_operator=interleave", "training.depth_schedule=[1, 4]"], "1 units grow to at most 2"),
    (["training.growth_operator=interleave", "training.interleave_every=0"], "interleave_every"),
    (["training.lr_decay=linear"], "cosine, wsd"),
    (["training.decay_fraction=0"], "decay_fraction"),
    (["training.growth_warmup_steps=5"], "needs training.lr_schedule 'continuous'"),
    (["training.optimizer_across_phases=keep"], "restart, carry"),
])
def test_growth_settings_are_checked(overrides, message):
    with pytest.raises(ConfigError, match=message):
        config(*STACKWISE_4, *overrides)


def test_new_unit_init_migrates_to_growth_operator():
    with pytest.warns(DeprecationWarning, match="growth_operator: copy_last"):
        assert config(*STACKWISE_4, "training.new_unit_init=copy_previous").training.growth_operator == "copy_last"
    with pytest.raises(ConfigError, match="keep only the new key"):
        config("training.new_unit_init=copy_previous", "training.growth_operator=copy_all")


@pytest.mark.parametrize("old,new,every,order,added", [
    (2, 4, 1, [0, 0, 1, 1], [1, 3]), (4, 6, 2, [0, 1, 1, 2, 3, 3], [2, 5]), (3, 4, 1, [0, 0, 1, 2], [1]),
    (1, 2, 1, [0, 0], [1]),
])
def test_interleave_inserts_a_copy_after_every_kth_old_unit(old, new, every, order, added):
    sources = unit_sources(old, new, "interleave", every)
    assert [sources.get(position, position) for position in range(new)] == order
    assert added_units(old, new, "interleave", every) == added


def test_interleave_with_a_frozen_prefix_trains_only_the_copies_by_rack_name():
    """2 -> 4 stacks, [0, 0', 1, 1']: the old stacks freeze where they now sit (stack 2 after the trained copy 0'
    passes the gradient back), the copies train and start as their originals."""
    cfg = config(*STACKWISE_4, "training.depth_schedule=[2, 4]", "training.steps_per_phase=[2, 2]",
                 "training.growth_operator=interleave", "training.growth_init=identity")
    units, grow = layer_units(4, 2), plan_phases(cfg)[1]
    roles = {units[i].rack_prefix: role for i, role in enumerate(grow.layer_roles(units))}
    assert [roles[f"stacks.{s}.blocks.0."] for s in range(4)] == [FROZEN, TRAIN, FROZEN_BACKPROP, TRAIN]
    assert roles["embedding."] == FROZEN and roles["norm."] == roles["lm_head."] == TRAIN
    copies = {units[dst].rack_prefix: units[src].rack_prefix
              for dst, src in phase_layer_sources(units, grow, "interleave").items()}
    assert copies == {"stacks.1.blocks.0.": "stacks.0.blocks.0.", "stacks.1.blocks.1.": "stacks.0.blocks.1.",
                      "stacks.2.blocks.0.": "stacks.1.blocks.0.", "stacks.2.blocks.1.": "stacks.1.blocks.1.",
                      "stacks.3.blocks.0.": "stacks.1.blocks.0.", "stacks.3.blocks.1.": "stacks.1.blocks.1."}
    zeroed = {units[i].rack_prefix for i in phase_zeroed_layers(units, grow, "interleave", "identity")}
    assert zeroed == {"stacks.1.blocks.0.", "stacks.1.blocks.1.", "stacks.3.blocks.0.", "stacks.3.blocks.1."}
