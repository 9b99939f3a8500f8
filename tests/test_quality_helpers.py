"""The pure helpers of the quality study (benchmarks/quality.py): baseline choice, ratio keys, budget
arithmetic and the mode table (no run is started; curves are made up)."""

from pathlib import Path

import pytest

from benchmarks import quality
from benchmarks.common import build_config
from benchmarks.quality import (
    BASELINES,
    COMPUTE_LIMITED_MODEL,
    MODEL,
    MODES,
    PLANS,
    choose_baseline,
    fit_line,
    mode_steps,
    parameter_counts,
    per_seed_wall_ratios,
    predicted_phase_costs,
    rack_steps_for,
    reach_ratios,
    run_values,
    study_seconds,
    summarise,
    tokens_per_parameter,
    tokens_per_rackwise_step,
)


def run(losses: list[float], seconds_per_eval: float = 10.0, flops_per_eval: float = 1e9, wall_s=None) -> dict:
    """A made-up run: an evaluation every ``seconds_per_eval`` (and ``flops_per_eval``) with these losses."""
    curve = [{"step": 10 * i, "wall_s": seconds_per_eval * i, "flops": flops_per_eval * i, "val_loss": loss}
             for i, loss in enumerate(losses)]
    return {"wall_s": wall_s or seconds_per_eval * len(losses), "curve": curve, "steps": {"training.max_steps": 1}}


def study(**finals: list[float]) -> dict[str, list[dict]]:
    """Every mode of the table, one run per seed: a mode's seed i falls linearly from 4.0 to finals[mode][i]
    over 5 evaluations (modes not named end at 3.0)."""
    n_seeds = len(next(iter(finals.values())))
    return {mode: [run([4.0 - (4.0 - end) * k / 4 for k in range(5)])
                   for end in finals.get(mode, [3.0] * n_seeds)] for mode in MODES}


def test_the_baseline_is_the_end_to_end_run_that_ends_lower():
    assert choose_baseline(study(rackwise=[2.0, 2.2], rackwise_wsd=[2.1, 2.0])) == "rackwise_wsd"
    assert choose_baseline(study(rackwise=[2.0, 2.0], rackwise_wsd=[2.1, 2.0])) == "rackwise"
    assert choose_baseline(study(rackwise=[2.0], rackwise_wsd=[2.0])) == "rackwise"  # a tie keeps the first
    # a growth mode that ends lowest is compared, never chosen as the baseline
    assert choose_baseline(study(rackwise=[2.0], rackwise_wsd=[2.1], doubling=[1.0])) == "rackwise"


def test_ratios_are_wall_and_flops_to_the_references_final_loss_over_its_own():
    runs = {"rackwise": [run([3.0, 2.5, 2.0], seconds_per_eval=10.0, flops_per_eval=4.0)],  # reaches 2.0 at 20 s
            "rackwise_wsd": [run([3.0, 2.0, 1.5], seconds_per_eval=10.0, flops_per_eval=4.0)],  # at 10 s
            "doubling": [run([3.0, 2.6, 2.2, 1.8], seconds_per_eval=5.0, flops_per_eval=1.0)],  # 2.0 at 12.5 s
            "midas": [run([3.0, 2.9], seconds_per_eval=10.0)]}  # never
    to_rackwise = reach_ratios(runs, "rackwise")
    assert to_rackwise["target"] == 2.0 and to_rackwise["reference_s"] == 20.0
    assert to_rackwise["wall"] == {"rackwise": 1.0, "rackwise_wsd": 0.5, "doubling": 0.625, "midas": None}
    assert to_rackwise["flops"] == {"rackwise": 1.0, "rackwise_wsd": 0.5, "doubling": 0.312, "midas": None}
    assert to_rackwise["seconds"]["doubling"] == 12.5
    to_wsd = reach_ratios(runs, "rackwise_wsd")  # 1.5 at 20 s: only rackwise_wsd gets there
    assert to_wsd["wall"] == {"rackwise": None, "rackwise_wsd": 1.0, "doubling": None, "midas": None}


def test_per_seed_ratios_compare_each_seed_with_the_same_seeds_reference():
    runs = {"rackwise": [run([3.0, 2.0]), run([3.0, 2.5])],
            "doubling": [run([3.0, 2.0], seconds_per_eval=8.0), run([3.0, 2.0], seconds_per_eval=8.0)]}
    # seed 0: doubling reaches 2.0 at 8 s (rackwise at 10 s); seed 1: 2.5 at 4 s (rackwise at 10 s)
    assert per_seed_wall_ratios(runs, "rackwise") == {"rackwise": [1.0, 1.0], "doubling": [0.8, 0.4]}


def test_a_section_has_the_baseline_keys_the_old_keys_and_the_identity_modes():
    runs = study(rackwise=[2.0, 2.1], rackwise_wsd=[1.9, 1.9], doubling_identity=[1.7, 1.7], grow_late=[3.5, 3.5])
    section = summarise(runs, PLANS["long"]["quick"], rack_steps=60)
    assert section["baseline"] == "rackwise_wsd"
    for key in ("wall_to_baseline_final_loss", "flops_to_baseline_final_loss", "wall_to_rackwise_final_loss",
                "flops_to_rackwise_final_loss", "final_val_loss", "val_loss_at_equal_wall"):
        assert set(section[key]) == set(MODES), key
    assert {"doubling_identity", "midas_identity", "grow_late"} <= set(MODES)
    assert section["wall_to_baseline_final_loss"]["rackwise_wsd"] == 1.0
    assert section["wall_to_baseline_final_loss"]["grow_late"] is None
    assert section["wall_to_rackwise_final_loss"]["rackwise"] == 1.0
    # doubling_identity falls from 4.0 to 1.7 over 40 s: 1.9 at 36.5 s, rackwise_wsd's own time to it is 40 s
    assert section["wall_to_baseline_final_loss"]["doubling_identity"] == pytest.approx(0.913, abs=1e-3)
    assert section["best_stagewise"] == {"mode": "doubling_identity", "wall_to_baseline_final_loss": 0.913,
                                         "flops_to_baseline_final_loss": 0.913, "goal_wall_ratio": 0.8,
                                         "goal_met": False}
    budget = section["budget"]
    assert budget["baseline_final_mean_val_loss"] == 1.9 and budget["rackwise_final_mean_val_loss"] == 2.05
    assert budget["tokens_per_parameter"] == round(60 * 4096 / budget["non_embedding_parameters"], 2)
    assert section["detail"]["doubling_identity"]["wall_to_baseline_final_loss_per_seed"] == [0.913, 0.913]
    assert section["detail"]["grow_late"]["start_up_s"] == [0.0, 0.0]  # each run's first validation
    assert "never" in quality.quality_table(section) and "not met" in quality.quality_table(section)


def test_budget_arithmetic_counts_tokens_per_non_embedding_parameter():
    assert tokens_per_rackwise_step(MODEL) == 32 * 64 * 2  # micro-batch x sequence x 2 data-parallel ranks
    counts = parameter_counts(MODEL)
    assert counts["all"] - counts["non_embedding"] == 258 * 16  # the tied embedding / LM head
    assert rack_steps_for(20, 427_072, 4096) == 2085
    assert tokens_per_parameter(2085, 4096, 427_072) <= 20 < tokens_per_parameter(2086, 4096, 427_072)
    with pytest.raises(ValueError, match="less than one step"):
        rack_steps_for(0.001, 1000, 4096)


def test_the_compute_limited_plan_stays_at_or_under_20_tokens_per_parameter_and_the_long_one_does_not():
    limited, long = PLANS["compute_limited"]["full"], PLANS["long"]["full"]
    per_parameter = {plan.section: tokens_per_parameter(plan.steps(), tokens_per_rackwise_step(plan.model),
                                                        parameter_counts(plan.model)["non_embedding"])
                     for plan in (limited, long)}
    assert 19 < per_parameter["quality_compute_limited"] <= 20
    assert per_parameter["quality"] > 100
    assert limited.seeds == long.seeds == (0, 1, 2)
    assert {plan.section for budget in PLANS.values() for plan in budget.values()} == \
        {"quality", "quality_compute_limited"}


@pytest.mark.parametrize("model", [MODEL, COMPUTE_LIMITED_MODEL], ids=["long", "compute_limited"])
def test_every_mode_is_a_valid_config_and_spends_the_rackwise_budgets_predicted_time(model):
    rack_steps = 1000
    for mode in MODES:
        values = run_values(mode, 0, model, rack_steps, Path("/tmp/unused"))
        build_config(values)  # raises on a bad combination
        steps = mode_steps(mode, model, rack_steps)
        if mode in BASELINES:
            assert steps == {"training.max_steps": rack_steps}
            continue
        costs = predicted_phase_costs({**model, **MODES[mode].values, "training.steps_per_phase": 1})
        spent = sum(s * c for s, c in zip(steps["training.steps_per_phase"], costs, strict=True))
        assert spent == pytest.approx(rack_steps, rel=0.01), mode


def test_the_mode_table_differs_only_where_its_names_say():
    values = {mode: m.values for mode, m in MODES.items()}
    assert values["rackwise"]["training.lr_decay"] == "cosine"
    wsd = {k: v for k, v in values["rackwise_wsd"].items() if k != "training.training_architecture"}
    for mode in MODES:
        if mode != "rackwise":  # every other mode decays the same way
            assert {k: values[mode][k] for k in wsd} == wsd, mode
    for copy in ("doubling", "midas"):
        assert values[f"{copy}_identity"] == {**values[copy], "training.growth_init": "identity"}
        assert "training.growth_init" not in values[copy]
    assert MODES["grow_late"].shares == (0.8, 0.2)
    assert values["grow_late"]["training.depth_schedule"] == [2, 4]
    assert values["grow_late"]["training.growth_init"] == "identity"
    assert values["grow_late"]["training.growth_operator"] == "copy_all"
    # nothing tuned per mode: no mode sets the learning rate or the batch
    assert not any(k in v for v in values.values() for k in ("training.lr", "training.micro_batch_size"))


def test_every_mode_warms_up_over_the_same_share_of_its_schedule():
    for mode in MODES:
        values = run_values(mode, 0, MODEL, 1100, Path("/tmp/unused"))
        total = values.get("training.max_steps") or sum(values["training.steps_per_phase"])
        assert values["training.warmup_steps"] / total == pytest.approx(quality.WARMUP_FRACTION, abs=0.002), mode


def test_the_study_time_estimate_fits_start_up_and_step_time():
    assert fit_line([(60, 20.0), (240, 38.0)]) == pytest.approx((14.0, 0.1))
    n_growth = len(MODES) - len(BASELINES)
    assert study_seconds(100.0, 3) == pytest.approx(3 * (2 * 100.0 + n_growth * 100.0 * quality.STAGEWISE_OVERRUN))
