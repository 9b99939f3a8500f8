"""stackwise-plan: what a launch would do, from the trainer's own planner, before launching it.

Fast: the plan is pure arithmetic over the config (no DeepSpeed engine, no data); one test starts the installed
console script to show it imports no DeepSpeed and answers in seconds.
"""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stackwise_ds.checkpoint import files as ckpt
from stackwise_ds.config import ConfigError, StackWiseConfig, apply_overrides
from stackwise_ds.layout import layer_units
from stackwise_ds.phases import plan_phases
from stackwise_ds.placement import LayoutError, plan_phase_layouts
from stackwise_ds.plan import build_plan, describe_layers, main, render

STACKWISE = ["training.training_architecture=stackwise", "training.steps_per_phase=[10, 20, 30, 40]",
             "model.architecture.n_stacks=4", "training.joint_steps=5"]


def config_of(tmp_path, *overrides) -> StackWiseConfig:
    return StackWiseConfig.from_dict(apply_overrides({}, [f"training.output_dir={tmp_path / 'run'}", *overrides]))


def test_each_phase_gets_the_trainers_layout_memory_cost_and_its_steps_tokens_and_flops(tmp_path):
    config = config_of(tmp_path, *STACKWISE, "parallel.pipeline_stages=2")
    plan = build_plan(config, world_size=4, bf16=False)
    phases = plan_phases(config)
    layouts = plan_phase_layouts(phases, layer_units(4, 2), config, 4, False)  # what the trainer plans at start
    assert [p["label"] for p in plan["phases"]] == [
        "phase 1/5 stack 1/4", "phase 2/5 stack 2/4", "phase 3/5 stack 3/4", "phase 4/5 stack 4/4", "phase 5/5 joint"]
    tokens_per_step = 8 * 2 * 2 * 256  # micro-batch x accumulation x (4 ranks / 2 stages) x seq_len
    for entry, phase, layout in zip(plan["phases"], phases, layouts, strict=True):
        assert entry["layout"] == {"kind": layout.kind, "pipeline_stages": layout.pipeline_stages,
                                   "data_parallel": layout.data_parallel,
                                   "micro_batches": layout.gradient_accumulation_steps}
        assert [layer["layer"] for layer in entry["layers"]] == list(layout.live)
        assert entry["memory_per_rank_mb"] == max(layout.stage_memory_mb)
        assert entry["predicted_step_vs_rackwise"] == layout.predicted_vs_rackwise
        assert entry["steps"] == phase.steps and entry["tokens"] == phase.steps * tokens_per_step
    roles = {layer["unit"]: layer["role"] for layer in plan["phases"][2]["layers"]}
    assert roles == {"embedding": "frozen", "stack 1 block 1": "frozen", "stack 1 block 2": "frozen",
                     "stack 2 block 1": "frozen", "stack 2 block 2": "frozen", "stack 3 block 1": "train",
                     "stack 3 block 2": "train", "norm": "train", "head": "train"}
    flops = [entry["training_flops"] / entry["steps"] for entry in plan["phases"]]
    assert flops == sorted(flops) and flops[3] < flops[4], "each phase adds a frozen stack; the joint one trains all"
    totals = plan["totals"]
    assert totals["steps"] == 105 and totals["tokens"] == 105 * tokens_per_step
    assert totals["predicted_time_vs_rackwise"] == pytest.approx(
        sum(e["steps"] * e["predicted_step_vs_rackwise"] for e in plan["phases"]) / 105)
    joint_is_rackwise = sum(e["training_flops"] for e in plan["phases"]) / (105 * flops[4])
    assert totals["training_flops_vs_rackwise"] == pytest.approx(joint_is_rackwise) and joint_is_rackwise < 0.7


def test_the_text_shows_each_stage_roles_memory_and_the_totals(tmp_path):
    config = config_of(tmp_path, *STACKWISE, "parallel.max_rank_memory_mb=500")
    text = render(build_plan(config, world_size=2, bf16=False), blocks_per_stack=2)
    assert "phase 4/5 stack 4/4: 40 steps" in text
    assert "stage 0 (" in text and "embedding, stacks 1-3 frozen; stack 4, norm, head train" in text
    assert "(parallel.max_rank_memory_mb 500)" in text and "x a rackwise step" in text
    assert "totals: 105 steps" in text and "x a rackwise run of the same 105 steps" in text
    layers = [{"layer": i, "unit": u, "role": r} for i, u, r in [(3, "stack 2 block 1", "frozen"),
                                                                   (4, "stack 2 block 2", "train")]]
    assert describe_layers(layers, blocks_per_stack=2) == "stack 2 block 1 frozen; stack 2 block 2 train"


@pytest.mark.parametrize("overrides, world, refusal", [
    (["training.growth_operater=fresh"], 2, ConfigError),
    (["parallel.pipeline_stages=2"], 3, ConfigError),
    (["training.training_architecture=stackwise", "parallel.max_rank_memory_mb=1"], 2, LayoutError),
])
def test_it_refuses_what_the_launch_refuses_with_the_same_message(overrides, world, refusal, tmp_path, capsys):
    """The launch's own checks, in the launch's order: the config, the world size, every phase's placement."""
    sets = [arg for item in [f"training.output_dir={tmp_path}", *overrides] for arg in ("--set", item)]
    assert main([*sets, "--world-size", str(world)]) == 2
    with pytest.raises(refusal) as launch:  # what the trainer runs before training
        config = StackWiseConfig.from_dict(apply_overrides({}, [f"training.output_dir={tmp_path}", *overrides]))
        config.validate_world_size(world)
        plan_phase_layouts(plan_phases(config), layer_units(2, 2), config, world, False)
    captured = capsys.readouterr()
    assert captured.err == f"stackwise-plan: error: {launch.value}\n" and captured.out == ""


def test_json_is_one_object_with_one_entry_per_phase(tmp_path, capsys):
    sets = ["--set", f"training.output_dir={tmp_path}", "--set", "training.training_architecture=blockwise"]
    assert main([*sets, "--world-size", "2", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out, parse_constant=lambda name: pytest.fail(name))
    assert len(plan["phases"]) == 4 and plan["totals"]["steps"] == 4 * 75
    assert {"layout", "stages", "layers", "memory_per_rank_mb", "predicted_step_vs_rackwise", "steps", "tokens",
            "training_flops"} <= set(plan["phases"][0])


def saved_run(tmp_path, config: StackWiseConfig, phase_index: int, phase_step: int, world: int) -> Path:
    """A complete checkpoint tag of ``config`` in phase ``phase_index`` after ``phase_step`` steps."""
    config.validate_world_size(world)
    layout = plan_phase_layouts(plan_phases(config), layer_units(4, 2), config, world, False)[phase_index]
    state = ckpt.TrainingState(phase_index=phase_index, phase_step=phase_step, global_step=12,
                               training_architecture="stackwise", layout=layout.to_dict(), config=config.to_dict())
    checkpoints = Path(config.training.output_dir) / "checkpoints"
    (checkpoints / "step00000012").mkdir(parents=True)
    ckpt.mark_complete(checkpoints, "step00000012", state)
    return checkpoints


def test_a_run_with_a_checkpoint_is_planned_from_where_it_resumes_and_a_changed_setting_is_refused(tmp_path, capsys):
    config = config_of(tmp_path, *STACKWISE)
    checkpoints = saved_run(tmp_path, config, phase_index=1, phase_step=2, world=2)
    plan = build_plan(config_of(tmp_path, *STACKWISE), world_size=2, bf16=False)
    assert plan["resume"]["checkpoint"] == str(checkpoints / "step00000012")
    assert [p["label"] for p in plan["phases"]][0] == "phase 2/5 stack 2/4" and len(plan["phases"]) == 4
    assert plan["phases"][0]["steps"] == 18 and plan["phases"][0]["steps_done_before"] == 2
    assert "it resumes at phase 2, step 2" in render(plan, 2)
    sets = [arg for item in [f"training.output_dir={tmp_path / 'run'}", *STACKWISE, "training.lr=0.5"]
            for arg in ("--set", item)]
    assert main([*sets, "--world-size", "2"]) == 2
    assert "cannot continue with (training.lr: checkpoint 0.001 vs config 0.5)" in capsys.readouterr().err
    assert main([*sets[:-2], "--world-size", "4"]) == 2  # mid-phase on another world size: another layout
    assert "was saved mid-phase with the layout" in capsys.readouterr().err


@pytest.mark.multiprocess
def test_the_installed_command_imports_no_deepspeed_and_answers_in_seconds(tmp_path):
    script = Path(sys.executable).with_name("stackwise-plan")
    start = time.perf_counter()
    shown = subprocess.run([str(script), "--world-size", "8", "--config", "launch/stackwise.yaml", "--set",
                            f"training.output_dir={tmp_path}"], capture_output=True, text=True,
                           cwd=Path(__file__).resolve().parents[1])
    assert shown.returncode == 0 and "phase 5/5 joint" in shown.stdout, shown.stderr
    assert time.perf_counter() - start < 30
    probe = ("import sys; from stackwise_ds.plan import main; main(['--world-size', '8', '--config', "
             f"'launch/stackwise.yaml', '--set', 'training.output_dir={tmp_path}']); "
             "assert 'deepspeed' not in sys.modules, 'imported deepspeed'")
    quiet = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                           cwd=Path(__file__).resolve().parents[1])
    assert quiet.returncode == 0, quiet.stderr


def test_freeze_source_plans_the_stacks_the_source_will_fill_as_frozen(tmp_path):
    """A LLaMA Pro expansion (2 source stacks interleaved with 2 copies; the originals, embedding and head frozen) is
    planned before its initial weights exist: the source's config alone says which stacks come from it."""
    from stackwise_ds.checkpoint import save_consolidated
    from stackwise_ds.model import build_rack

    source = config_of(tmp_path, "model.architecture.n_stacks=2")
    weights = save_consolidated(dict(build_rack(source.model).state_dict()), source, tmp_path / "source.safetensors")
    config = config_of(tmp_path, "model.architecture.n_stacks=4", f"training.init_from={weights}",
                       "training.init_growth=interleave", "training.growth_init=identity",
                       "training.freeze_source=true", "training.blocks_only=true")
    layers = build_plan(config, world_size=2, bf16=False)["phases"][0]["layers"]
    roles = {layer["unit"]: layer["role"] for layer in layers}
    assert {unit: role for unit, role in roles.items() if unit.startswith("stack")} == {
        "stack 1 block 1": "frozen", "stack 1 block 2": "frozen", "stack 2 block 1": "train",
        "stack 2 block 2": "train", "stack 3 block 1": "frozen_backprop", "stack 3 block 2": "frozen_backprop",
        "stack 4 block 1": "train", "stack 4 block 2": "train"}
