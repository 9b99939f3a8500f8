"""The elastic planner (pure Python): which layers a phase places, where, and what it predicts."""

import itertools
import random

import pytest

from launch_utils import TINY
from stackwise_ds.config import StackWiseConfig, apply_overrides
from stackwise_ds.layout import DORMANT, FROZEN, TRAIN, layer_units
from stackwise_ds.phases import plan_phases
from stackwise_ds.placement import (
    LayerCost,
    LayoutError,
    PhaseLayout,
    Resources,
    _balanced_starts,
    elastic_layout,
    fixed_layout,
    layout_for,
    plan_phase_layouts,
)


def config(*overrides):
    return StackWiseConfig.from_dict(apply_overrides({}, [*TINY, *overrides]))


def phase_layouts(cfg, world_size):
    arch = cfg.model.architecture
    units = layer_units(arch.n_stacks, arch.blocks_per_stack)
    return [layout_for(p.layer_roles(units), cfg, world_size, False, elastic=True) for p in plan_phases(cfg)]


def test_elastic_places_only_live_layers_and_keeps_the_global_batch():
    cfg = config("model.architecture.n_stacks=4", "training.training_architecture=stackwise",
                 "parallel.pipeline_stages=2")
    layouts = phase_layouts(cfg, 4)
    n_blocks = 8
    for k, lay in enumerate(layouts):
        live_blocks = [i for i in lay.live if 1 <= i <= n_blocks]
        assert live_blocks == list(range(1, 1 + 2 * (k + 1))), "embedding, units 0..k, norm, head only"
        assert {0, n_blocks + 1, n_blocks + 2} <= set(lay.live)
        assert 4 % lay.pipeline_stages == 0 and lay.data_parallel * lay.pipeline_stages == 4
        global_batch = cfg.training.micro_batch_size * lay.gradient_accumulation_steps * lay.data_parallel
        assert global_batch == 2 * 2 * 2  # micro x accumulation x (world / pipeline_stages) of the run
    # without a memory bound pure data parallelism wins, and the live part grows phase by phase
    assert [lay.pipeline_stages for lay in layouts] == [1, 1, 1, 1]
    predicted = [lay.predicted_vs_rackwise for lay in layouts]
    assert predicted == sorted(predicted) and predicted[-1] < 0.5


def test_memory_bound_deepens_the_pipeline_and_is_respected():
    cfg = config("model.architecture.n_stacks=4", "training.training_architecture=stackwise",
                 "parallel.pipeline_stages=2", "parallel.max_rank_memory_mb=2.0")
    layouts = phase_layouts(cfg, 4)
    assert layouts[0].pipeline_stages == 1 and layouts[-1].pipeline_stages == 2
    assert all(max(lay.stage_memory_mb) <= 2.0 for lay in layouts)
    with pytest.raises(LayoutError, match=r"parallel.max_rank_memory_mb=0.5.*raise the bound"):
        phase_layouts(config("training.training_architecture=stackwise", "parallel.max_rank_memory_mb=0.5"), 2)


def test_a_bound_only_a_later_phase_exceeds_is_found_at_start_naming_the_phase():
    """The trainer plans every phase before training: phase 1 (2.43 MB) fits 2.5 MB, phase 2 (2.62 MB)
    does not, so the run stops before phase 1 trains, naming phase 2."""
    cfg = config("training.training_architecture=stackwise", "parallel.max_rank_memory_mb=2.5")
    cfg.validate_world_size(1)  # as the trainer does first: one rank, a pipeline of depth 1
    units = layer_units(2, 2)
    phases = plan_phases(cfg)
    assert len(plan_phase_layouts(phases[:1], units, cfg, 1, False)) == 1
    with pytest.raises(LayoutError, match=r"phase 2 \(stack 2/2\) cannot be placed: .*max_rank_memory_mb=2.5"):
        plan_phase_layouts(phases, units, cfg, 1, False)


def test_balanced_partition_is_optimal():
    """The stage split minimises the slowest stage: checked against every split of random costs."""
    rng = random.Random(0)
    for _ in range(30):
        n, p = rng.randint(3, 8), rng.randint(1, 3)
        roles = [rng.choice([TRAIN, FROZEN]) for _ in range(n)]
        roles.sort(key=lambda r: r == TRAIN)  # frozen layers come first
        costs = [LayerCost(rng.uniform(1, 10), 1, 0.0) for _ in range(n)]
        res = Resources(world_size=p, n_stacks=1, blocks_per_stack=1, pipeline_stages=1, micro_batch_size=1,
                        gradient_accumulation_steps=p)
        live = tuple(range(n))
        weight = [c.forward_flops * (3 if r == TRAIN else 1) for c, r in zip(costs, roles, strict=True)]
        starts = _balanced_starts(live, roles, costs, res, p, 1)
        bounds = [*starts, n]
        found = max(sum(weight[bounds[s]:bounds[s + 1]]) for s in range(p))
        best = min(max(sum(weight[a:b]) for a, b in zip((0, *cut), (*cut, n), strict=True))
                   for cut in itertools.combinations(range(1, n), p - 1))
        assert found == pytest.approx(best)


def test_fixed_layout_is_the_run_pipeline_and_round_trips():
    cfg = config("training.training_architecture=stackwise")
    units = layer_units(2, 2)
    phase = plan_phases(cfg)[0]
    lay = layout_for(phase.layer_roles(units), cfg, 2, False, elastic=False)
    assert (lay.kind, lay.pipeline_stages, lay.parts, lay.live) == ("fixed", 2, (0, 3, 7), tuple(range(7)))
    assert PhaseLayout.from_dict(lay.to_dict()) == lay
    assert lay.same_placement(layout_for(plan_phases(cfg)[1].layer_roles(units), cfg, 2, False, elastic=False))
    # dormant layers of an elastic layout are not placed anywhere
    roles = [TRAIN if u.kind != "block" or u.stack_id == 0 else DORMANT for u in units]
    elastic = elastic_layout(roles, [LayerCost(1.0, 1, 0.0)] * len(units),
                             Resources(2, 2, 2, 2, 2, 2))
    assert elastic.live == (0, 1, 2, 5, 6) and fixed_layout(roles, [LayerCost(1.0, 1, 0.0)] * len(units),
                                                            Resources(2, 2, 2, 2, 2, 2)).live == tuple(range(7))


def test_no_usable_depth_is_a_layout_error():
    """4 ranks, 3 live layers: depths 1 and 2 leave 4 or 2 replicas for a global batch of one micro-batch."""
    res = Resources(world_size=4, n_stacks=1, blocks_per_stack=1, pipeline_stages=4, micro_batch_size=2,
                    gradient_accumulation_steps=1)
    costs = [LayerCost(1.0, 1, 0.0)] * 4
    with pytest.raises(LayoutError, match=r"no pipeline depth can place this phase's 3 live layers on 4 rank"):
        elastic_layout([TRAIN, DORMANT, TRAIN, TRAIN], costs, res)


def test_with_the_stack_cache_a_frozen_prefix_stays_on_the_first_stage_and_costs_nothing():
    """Under a bound that forces 4 stages, the plain planner spreads the frozen prefix of phases 3 and 4 over
    two stages (the cache could not serve it); with stack_cache 'disk' it keeps it on stage 0, predicted free."""
    def plans(cache):
        return phase_layouts(config("model.architecture.n_stacks=4", "training.training_architecture=stackwise",
                                    "parallel.pipeline_stages=2", "parallel.max_rank_memory_mb=1.6",
                                    f"training.stack_cache={cache}"), 4)

    plain, cached = plans("off"), plans("disk")
    prefix_ends = {2: 4, 3: 6}  # phase index -> last frozen layer (embedding 0, blocks 1..8: 2 a stack)
    for phase, end in prefix_ends.items():
        assert plain[phase].stage_of(end) > 0, "the cost-balanced plan spreads the prefix"
        assert cached[phase].stage_of(end) == 0 and cached[phase].pipeline_stages == 4
        assert max(cached[phase].stage_memory_mb) <= 1.6
        assert cached[phase].stage_flops[0] < plain[phase].stage_flops[0], "a cached prefix is read, not run"
        assert cached[phase].predicted_vs_rackwise < plain[phase].predicted_vs_rackwise
    assert cached[0] == plain[0], "phase 1 trains the embedding: nothing to cache"
    # a bound no prefix-on-stage-0 plan meets: the planner spreads the prefix as without the cache
    tight = config("model.architecture.n_stacks=4", "training.training_architecture=stackwise",
                   "parallel.pipeline_stages=2", "parallel.max_rank_memory_mb=1.5", "training.stack_cache=disk")
    assert phase_layouts(tight, 4)[3].stage_of(6) > 0
