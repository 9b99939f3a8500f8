"""Checkpoint tools (tools/*.py, stackwise_ds.checkpoint) on real multi-process DeepSpeed checkpoints.

Two runs are made once per module with tests/_tools_worker.py (stock deepspeed.initialize on our
pipeline, ZeRO-1, clipping on): 2 stages x 1 replica (tied embeddings, gqa) and 1 stage x 2
replicas (untied, mha). Each saves a checkpoint after 3 steps, the logits of a fixed batch, and
the losses of 3 more steps: what a resume from that checkpoint must reproduce.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch
import yaml

from launch_utils import REPO, free_port, rack_of, relative_close, scrambled_rack
from stackwise_ds import tools_cli
from stackwise_ds.checkpoint import consolidate, load_rack, read_consolidated
from stackwise_ds.checkpoint.consolidation import save_consolidated
from stackwise_ds.checkpoint.files import STATE_FILE, CheckpointError
from stackwise_ds.checkpoint.generate import GenerationError, generate_text
from stackwise_ds.checkpoint.hf import ExportError, export_hf, import_hf
from stackwise_ds.checkpoint.resharding import reshard
from stackwise_ds.config import ConfigError, StackWiseConfig

WORKER = REPO / "tests" / "_tools_worker.py"
TAG = "step00000003"
BASE = {"data": {"seq_len": 16}, "training": {"grad_clip": 0.05, "lr": 0.01}}


def model(**overrides) -> dict:
    arch = overrides.pop("architecture", {"n_stacks": 2, "blocks_per_stack": 1})
    return {"d_model": 32, "n_heads": 4, "max_seq_len": 32, "architecture": arch, **overrides}


TIED_GQA = {**BASE, "model": model(attention_type="gqa", n_kv_heads=2, tie_embeddings=True)}
UNTIED_MHA = {**BASE, "model": model(attention_type="mha", tie_embeddings=False)}
# Per-stack learning rates: stage 0 (embedding + stack 0) builds 2 optimizer groups, stage 1
# (stack 1 + norm + head) 4, so the engine splits stage 0's groups to 4 (equal ZeRO collectives).
LR_SCALED = {**BASE, "model": model(attention_type="gqa", n_kv_heads=2, tie_embeddings=True),
             "training": {**BASE["training"], "stack_lr_scale": [1.0, 0.5]}}


# ----------------------------------------------------------------------------- helpers


def run_worker(n_procs: int, spec: dict, work: Path) -> dict:
    """Run the worker under the deepspeed launcher; returns its result JSON."""
    work.mkdir(parents=True, exist_ok=True)
    spec = {**spec, "result": str(work / "result.json")}
    (work / "spec.json").write_text(json.dumps(spec))
    launcher = str(Path(sys.executable).with_name("deepspeed"))
    command = [launcher, "--num_gpus", str(n_procs), "--master_port", str(free_port()), str(WORKER),
               str(work / "spec.json")]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if result.returncode != 0:
        raise AssertionError(f"worker failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return json.loads((work / "result.json").read_text())


def run_tool(name: str, *args: str, expect_ok: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, str(REPO / "tools" / f"{name}.py"), *map(str, args)], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    if expect_ok and result.returncode != 0:
        raise AssertionError(f"tools/{name}.py failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def train_and_save(tmp_path_factory, name: str, n_procs: int, stages: int, config: dict) -> dict:
    out = tmp_path_factory.mktemp(name)
    spec = {"stages": stages, "config": config, "output_dir": str(out / "run"), "save_tag": TAG,
            "train_steps": 3, "continue_steps": 3, "logits": str(out / "logits.pt")}
    result = run_worker(n_procs, spec, out / "work")
    return {"dir": out / "run", "logits": torch.load(out / "logits.pt"), "continued": result["continued"],
            "config": config, "stages": stages, "n_procs": n_procs}


def resume(run: dict, checkpoint_dir: Path, stages: int, n_procs: int, work: Path) -> list[float]:
    spec = {"stages": stages, "config": run["config"], "output_dir": str(work / "run"),
            "load_dir": str(checkpoint_dir), "load_tag": TAG, "train_steps": 3}
    return run_worker(n_procs, spec, work)["losses"]


def logits_of(rack, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return rack(input_ids).float()


def config_for(**model_overrides) -> StackWiseConfig:
    raw = {"model": model(**model_overrides), "data": {"seq_len": 16}}
    if model_overrides.get("attention_mode") == "bidirectional":
        raw["training"] = {"objective": "masked_lm"}
    return StackWiseConfig.from_dict(raw)


@pytest.fixture(scope="module")
def pp2_run(tmp_path_factory):
    """2 pipeline stages x 1 replica, tied embeddings, gqa."""
    return train_and_save(tmp_path_factory, "pp2", n_procs=2, stages=2, config=TIED_GQA)


@pytest.fixture(scope="module")
def pp1_run(tmp_path_factory):
    """1 pipeline stage x 2 data-parallel replicas (ZeRO-1 shards), untied, mha."""
    return train_and_save(tmp_path_factory, "pp1", n_procs=2, stages=1, config=UNTIED_MHA)


@pytest.fixture(scope="module")
def lr_scaled_run(tmp_path_factory):
    """2 pipeline stages, per-stack learning rates: optimizer groups split by the engine."""
    return train_and_save(tmp_path_factory, "lr_scaled", n_procs=2, stages=2, config=LR_SCALED)


# ----------------------------------------------------------------------------- consolidate / load


@pytest.mark.multiprocess
@pytest.mark.parametrize("run_name", ["pp2_run", "pp1_run"])
def test_consolidated_rack_gives_the_pipeline_logits(run_name, request, tmp_path):
    run = request.getfixturevalue(run_name)
    out = tmp_path / "model.safetensors"
    if run_name == "pp2_run":
        run_tool("consolidate", run["dir"] / "checkpoints", out, "--tag", TAG)
    else:
        consolidate(run["dir"] / "checkpoints" / TAG, out)
    state, config = read_consolidated(out)
    assert config.to_dict()["model"] == StackWiseConfig.from_dict(run["config"]).to_dict()["model"]
    tied = run["config"]["model"]["tie_embeddings"]
    assert ("lm_head.weight" in state) != tied  # a tied head is stored once, as embedding.weight
    reference = run["logits"]
    for source in (out, run["dir"], run["dir"] / "checkpoints" / TAG):  # file, output_dir, tag folder
        rack = load_rack(source)
        assert (rack.lm_head.weight is rack.embedding.weight) == tied
        assert torch.allclose(logits_of(rack, reference["input_ids"]), reference["logits"], atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- reshard


@pytest.mark.multiprocess
def test_reshard_two_stages_to_one_stage_two_replicas_resumes_identically(pp2_run, tmp_path):
    out = tmp_path / "pp1"
    run_tool("reshard", pp2_run["dir"] / "checkpoints", out, "--pipeline-stages", 1, "--data-parallel", 2)
    tag_dir = out / "checkpoints" / TAG
    assert sorted(p.name for p in tag_dir.glob("*_states.pt")) == [
        "layer_00-model_states.pt", "layer_01-model_states.pt", "layer_02-model_states.pt",
        "layer_03-model_states.pt", "mp_rank_00_model_states.pt",
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    state = json.loads((tag_dir / STATE_FILE).read_text())
    assert state["config"]["parallel"]["pipeline_stages"] == 1 and state["global_step"] == 3
    assert yaml.safe_load((out / "config.yaml").read_text())["parallel"]["pipeline_stages"] == 1
    assert (out / "checkpoints" / "latest").read_text().strip() == TAG
    losses = resume(pp2_run, out / "checkpoints", stages=1, n_procs=2, work=tmp_path / "resume")
    assert relative_close(losses, pp2_run["continued"], rtol=1e-5), (losses, pp2_run["continued"])


@pytest.mark.multiprocess
def test_reshard_carries_the_runs_results_over(pp2_run, tmp_path):
    copy_tag(pp2_run, tmp_path / "run")
    history = {"losses": [3.0, 2.5, 2.25], "val_history": [[3, 2.4]], "phases": [], "output_dir": "elsewhere"}
    (tmp_path / "run" / "results.json").write_text(json.dumps(history))
    reshard(tmp_path / "run", tmp_path / "pp1", 1, 2)
    carried = json.loads((tmp_path / "pp1" / "results.json").read_text())
    assert carried == {**history, "output_dir": str(tmp_path / "pp1")}


@pytest.mark.multiprocess
def test_reshard_one_stage_to_two_stages_resumes_identically(pp1_run, tmp_path):
    out = tmp_path / "pp2"
    run_tool("reshard", pp1_run["dir"], out, "--pipeline-stages", 2)
    tag_dir = out / "checkpoints" / TAG
    assert sorted(p.name for p in tag_dir.glob("*optim_states.pt")) == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_0_mp_rank_01_optim_states.pt"]
    losses = resume(pp1_run, out / "checkpoints", stages=2, n_procs=2, work=tmp_path / "resume")
    assert relative_close(losses, pp1_run["continued"], rtol=1e-5), (losses, pp1_run["continued"])


def group_sizes(checkpoint: Path, stage: int) -> list[int]:
    engine = torch.load(checkpoint / "checkpoints" / TAG / f"mp_rank_{stage:02d}_model_states.pt", weights_only=False)
    return [len(group) for group in engine["param_shapes"]]


@pytest.mark.multiprocess
def test_reshard_rebuilds_the_engines_split_optimizer_groups(lr_scaled_run, tmp_path):
    assert len(group_sizes(lr_scaled_run["dir"], 0)) == len(group_sizes(lr_scaled_run["dir"], 1)) == 4
    reshard(lr_scaled_run["dir"], tmp_path / "one", pipeline_stages=1)
    losses = resume(lr_scaled_run, tmp_path / "one" / "checkpoints", stages=1, n_procs=1, work=tmp_path / "r1")
    assert relative_close(losses, lr_scaled_run["continued"], rtol=1e-5), (losses, lr_scaled_run["continued"])
    reshard(tmp_path / "one", tmp_path / "two", pipeline_stages=2)
    assert group_sizes(tmp_path / "two", 0) == group_sizes(lr_scaled_run["dir"], 0)
    assert group_sizes(tmp_path / "two", 1) == group_sizes(lr_scaled_run["dir"], 1)
    losses = resume(lr_scaled_run, tmp_path / "two" / "checkpoints", stages=2, n_procs=2, work=tmp_path / "r2")
    assert relative_close(losses, lr_scaled_run["continued"], rtol=1e-5), (losses, lr_scaled_run["continued"])


@pytest.mark.multiprocess
def test_reshard_handles_stages_without_optimizer(pp2_run, tmp_path):
    """A stackwise phase > 0: stage 0 (embedding + stack 0) is forward-only and saved no optimizer shard;
    the tied weight trains through the LM head on stage 1 only."""
    source = tmp_path / "src" / "checkpoints"
    shutil.copytree(pp2_run["dir"] / "checkpoints" / TAG, source / TAG)
    (source / TAG / "zero_pp_rank_0_mp_rank_00_optim_states.pt").unlink()
    engine = torch.load(source / TAG / "mp_rank_00_model_states.pt", weights_only=False)
    torch.save({**engine, "param_shapes": None, "lr_scheduler": None}, source / TAG / "mp_rank_00_model_states.pt")

    def optimized(checkpoint: Path, stage: int):
        shapes = torch.load(checkpoint / "checkpoints" / TAG / f"mp_rank_{stage:02d}_model_states.pt",
                            weights_only=False)["param_shapes"]
        return None if shapes is None else [name for group in shapes for name in group]

    reshard(source, tmp_path / "one", pipeline_stages=1)
    names = optimized(tmp_path / "one", 0)
    assert "tied_modules.embed.embedding.weight" in names and "2.attn.q_proj.weight" in names
    assert not any(name.startswith("1.") for name in names)  # stack 0 was frozen: no optimizer state
    reshard(tmp_path / "one", tmp_path / "two", pipeline_stages=2)
    assert optimized(tmp_path / "two", 0) is None  # the embedding lookup does not train: no optimizer there
    assert sorted(p.name for p in (tmp_path / "two" / "checkpoints" / TAG).glob("*optim_states.pt")) == [
        "zero_pp_rank_0_mp_rank_01_optim_states.pt"]
    assert optimized(tmp_path / "two", 1) == optimized(pp2_run["dir"], 1)


@pytest.mark.multiprocess
def test_reshard_refuses_a_layout_that_splits_a_stack(pp2_run, tmp_path):
    with pytest.raises(ConfigError, match="must divide model.architecture.n_stacks"):
        reshard(pp2_run["dir"], tmp_path / "x", pipeline_stages=3)


# ----------------------------------------------------------------------------- Hugging Face


@pytest.mark.parametrize("attention,tied", [("mha", True), ("mha", False), ("gqa", True), ("gqa", False)])
def test_export_hf_loads_in_transformers_with_the_same_logits(attention, tied, tmp_path):
    from transformers import LlamaForCausalLM

    config = config_for(attention_type=attention, n_kv_heads=2 if attention == "gqa" else None,
                        tie_embeddings=tied, rope_theta=500.0, norm_eps=1e-6, freeze_up_proj=True,
                        architecture={"n_stacks": 2, "blocks_per_stack": 2})
    rack = scrambled_rack(config)
    source = save_consolidated(dict(rack.state_dict()), config, tmp_path / "rack.safetensors")
    export_hf(source, tmp_path / "hf")
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert hf.config.num_key_value_heads == (2 if attention == "gqa" else 4)
    assert hf.config.tie_word_embeddings == tied
    ids = torch.randint(0, 258, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs = hf(ids).logits
    assert torch.allclose(theirs, logits_of(rack, ids), atol=1e-4, rtol=0)


@pytest.mark.multiprocess
def test_export_hf_tool_from_a_pipeline_checkpoint(pp2_run, tmp_path):
    from transformers import LlamaForCausalLM

    run_tool("export_hf", pp2_run["dir"], tmp_path / "hf")
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    reference = pp2_run["logits"]
    with torch.no_grad():
        logits = hf(reference["input_ids"]).logits
    assert torch.allclose(logits, reference["logits"], atol=1e-4, rtol=0)


@pytest.mark.multiprocess
def test_import_hf_gives_the_same_logits(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    hf_config = LlamaConfig(vocab_size=300, hidden_size=48, intermediate_size=96, num_hidden_layers=4,
                            num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=64,
                            rms_norm_eps=1e-6, tie_word_embeddings=False, initializer_range=0.2)
    hf = LlamaForCausalLM(hf_config).eval()
    with torch.no_grad():  # non-trivial norms, so that a swapped norm would show
        for name, param in hf.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
    hf.save_pretrained(tmp_path / "llama")
    run_tool("import_hf", tmp_path / "llama", tmp_path / "rack.safetensors", "--n-stacks", 2)
    rack = load_rack(tmp_path / "rack.safetensors")
    assert len(rack.stacks) == 2 and len(rack.stacks[0].blocks) == 2
    ids = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        theirs = hf(ids).logits
    assert torch.allclose(logits_of(rack, ids), theirs, atol=1e-4, rtol=0)
    with pytest.raises(ConfigError, match="does not divide the model's 4 layers"):
        import_hf(tmp_path / "llama", tmp_path / "x.safetensors", n_stacks=3)


@pytest.mark.parametrize("overrides,feature", [
    ({"attention_type": "kernel"}, "kernel"),
    ({"attention_type": "mla"}, "MLA"),
    ({"attention_mode": "bidirectional"}, "bidirectional"),
])
def test_export_hf_refuses_what_llama_cannot_compute(overrides, feature, tmp_path):
    config = config_for(**overrides)
    source = save_consolidated(dict(rack_of(config).state_dict()), config, tmp_path / "r.safetensors")
    with pytest.raises(ExportError, match=feature):
        export_hf(source, tmp_path / "hf")
    assert not (tmp_path / "hf" / "model.safetensors").exists()


# ----------------------------------------------------------------------------- clear errors


@pytest.mark.multiprocess
def test_missing_checkpoint_dir_is_a_clear_error(tmp_path):
    result = run_tool("consolidate", tmp_path / "nowhere", tmp_path / "m.safetensors", expect_ok=False)
    assert result.returncode == 2 and "does not exist" in result.stderr and "Traceback" not in result.stderr


def copy_tag(run: dict, tmp_path: Path) -> Path:
    checkpoints = tmp_path / "checkpoints"
    shutil.copytree(run["dir"] / "checkpoints" / TAG, checkpoints / TAG)
    return checkpoints


@pytest.mark.multiprocess
def test_tag_without_state_file_is_incomplete(pp2_run, tmp_path):
    checkpoints = copy_tag(pp2_run, tmp_path)
    (checkpoints / TAG / STATE_FILE).unlink()
    with pytest.raises(CheckpointError, match="no complete checkpoint.*interrupted"):
        load_rack(checkpoints)
    with pytest.raises(CheckpointError, match="incomplete: it has no stackwise_state.json"):
        load_rack(checkpoints / TAG)


@pytest.mark.multiprocess
def test_missing_layer_file_is_a_partial_checkpoint(pp2_run, tmp_path):
    checkpoints = copy_tag(pp2_run, tmp_path)
    (checkpoints / TAG / "layer_02-model_states.pt").unlink()
    with pytest.raises(CheckpointError, match="partial: layer_02-model_states.pt"):
        consolidate(checkpoints, tmp_path / "m.safetensors")


@pytest.mark.multiprocess
def test_truncated_layer_file_is_reported_by_inspect_consolidate_and_generate(pp2_run, tmp_path):
    checkpoints = copy_tag(pp2_run, tmp_path)
    layer_file = checkpoints / TAG / "layer_02-model_states.pt"
    layer_file.write_bytes(layer_file.read_bytes()[:-200])  # a copy cut short
    rows = run_tool("inspect_checkpoint", checkpoints).stdout.splitlines()
    assert any(row.startswith("2 ") and "CORRUPT" in row for row in rows), rows
    for tool, extra in (("consolidate", [tmp_path / "m.safetensors"]), ("generate", ["--prompt", "x"])):
        result = run_tool(tool, checkpoints, *extra, expect_ok=False)
        assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
        assert re.search(r"is corrupt: layer_02-model_states.pt is (corrupt|unreadable)", result.stderr), result.stderr


@pytest.mark.multiprocess
def test_checkpoint_of_another_architecture_is_refused(pp2_run, tmp_path):
    other = StackWiseConfig.from_dict({**TIED_GQA, "model": {**TIED_GQA["model"], "d_model": 64}})
    with pytest.raises(CheckpointError, match="another architecture.*model.d_model: checkpoint 32 vs config 64"):
        load_rack(pp2_run["dir"], model=other.model)
    out = tmp_path / "m.safetensors"
    consolidate(pp2_run["dir"], out)
    with pytest.raises(CheckpointError, match="another architecture"):
        load_rack(out, model=other.model)


def test_generate_refuses_a_bidirectional_rack(tmp_path):
    config = config_for(attention_mode="bidirectional")
    source = save_consolidated(dict(rack_of(config).state_dict()), config, tmp_path / "r.safetensors")
    with pytest.raises(GenerationError, match="bidirectional"):
        generate_text(source, "hello")


# ----------------------------------------------------------------------------- inspect / generate


@pytest.mark.multiprocess
def test_inspect_lists_units_progress_and_incomplete_tags(pp2_run, tmp_path):
    shutil.copytree(pp2_run["dir"], tmp_path / "run")
    broken = tmp_path / "run" / "checkpoints" / "step00000009"
    shutil.copytree(tmp_path / "run" / "checkpoints" / TAG, broken)
    (broken / STATE_FILE).unlink()
    text = run_tool("inspect_checkpoint", tmp_path / "run").stdout
    assert re.search(r"step00000003 +complete, latest", text) and re.search(r"step00000009 +INCOMPLETE", text)
    assert text.startswith("checkpoint ")  # DeepSpeed's log lines go to stderr
    max_steps = StackWiseConfig().training.max_steps  # the worker keeps the default step budget
    assert f"in phase 1/1 rack, step 3/{max_steps}" in text and "consumed samples 12" in text  # the log's numbering
    rows = {re.split(r"\s{2,}", line)[1]: line for line in text.splitlines() if line[:1].isdigit()}
    assert set(rows) == {"embedding", "stack 0 block 0", "stack 1 block 0", "final norm", "lm_head"}
    assert "15,424" in rows["stack 1 block 0"] and rows["stack 1 block 0"].rstrip().endswith("1*")
    assert "pipeline stage(s)" not in text and "parallel.pipeline_stages 2" in text  # saved with no layout


def test_inspect_shows_stages_times_data_parallel_and_numbers_phases_as_the_log_does():
    """A stackwise tag of a 2-stack rack saved on 1 stage x 2 replicas: not '2 pipeline stage(s)', and phase 2 of
    2 is 'phase 2/2', as the training log numbers it (it was 'phase 1')."""
    from types import SimpleNamespace

    from stackwise_ds.checkpoint.files import TrainingState
    from stackwise_ds.checkpoint.summary import run_section
    from stackwise_ds.layout import layer_units
    from stackwise_ds.phases import plan_phases
    from stackwise_ds.placement import plan_phase_layouts

    config = StackWiseConfig.from_dict({"training": {"training_architecture": "stackwise"}})
    phases = plan_phases(config)
    layouts = plan_phase_layouts(phases, layer_units(2, 2), config, world_size=2, bf16=False)
    state = TrainingState(phase_index=1, phase_step=3, layout=layouts[1].to_dict(), training_architecture="stackwise",
                          finished_phases=[{"index": 0, "name": "stack 1/2", "val_loss_after": None}])
    text = run_section(SimpleNamespace(state=state), config, phases)
    assert "saved with layout elastic: 1 stage(s) x 2 data-parallel" in text and "pipeline stage(s)" not in text
    assert "in phase 2/2 stack 2/2, step 3/" in text and "finished phase 1/2 stack 1/2" in text


@pytest.mark.multiprocess
def test_generate_tool_continues_the_prompt(pp2_run):
    greedy = run_tool("generate", pp2_run["dir"], "--prompt", "def f(", "--max-new-tokens", "8",
                      "--temperature", "0").stdout
    assert greedy.startswith("def f(")
    assert greedy.rstrip("\n") == generate_text(pp2_run["dir"], "def f(", max_new_tokens=8, temperature=0.0)
    sampled = generate_text(pp2_run["dir"], "x", max_new_tokens=8, temperature=1.0, top_k=5, seed=3)
    assert sampled.startswith("x") and sampled == generate_text(pp2_run["dir"], "x", 8, 1.0, 5, seed=3)


def test_param_groups_split_the_largest_until_every_stage_has_as_many():
    from stackwise_ds.parallel.param_groups import equal_group_splits

    assert equal_group_splits([6, 2], 4) == [(0, 3), (0, 1)]  # 6 -> 3 + 3, then the first 3 -> 1 + 2
    assert equal_group_splits([1, 1], 3) == [] and equal_group_splits([4], 1) == []


@pytest.mark.multiprocess
def test_the_checkpoint_tools_import_no_pipeline_engine():
    """The offline tools (reshard included) split param groups as the engine does without importing it."""
    probe = ("import importlib, sys\n"
             "for name in ('consolidation', 'generate', 'hf', 'resharding', 'restack', 'summary', 'cli'):\n"
             "    importlib.import_module('stackwise_ds.checkpoint.' + name)\n"
             "assert 'deepspeed.runtime.pipe.engine' not in sys.modules, 'the pipeline engine was imported'")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# ----------------------------------------------------------------------------- console scripts

CONSOLE_SCRIPTS = {"stackwise-consolidate": tools_cli.consolidate_main, "stackwise-reshard": tools_cli.reshard_main,
                   "stackwise-export-hf": tools_cli.export_hf_main, "stackwise-import-hf": tools_cli.import_hf_main,
                   "stackwise-restack": tools_cli.restack_main, "stackwise-inspect": tools_cli.inspect_main,
                   "stackwise-generate": tools_cli.generate_main, "stackwise-eval": tools_cli.eval_main,
                   "stackwise-plan": tools_cli.plan_main}


def test_console_scripts_are_installed_and_run_the_tool_mains():
    installed = {ep.name: ep for ep in entry_points(group="console_scripts") if ep.name.startswith("stackwise-")}
    assert set(installed) == set(CONSOLE_SCRIPTS), \
        "reinstall the package (pip install -e .); a stale stackwise_ds.egg-info/ in the checkout hides the new one"
    for name, main in CONSOLE_SCRIPTS.items():
        assert installed[name].load() is main, name


@pytest.mark.multiprocess
def test_a_console_script_runs_from_the_environment(tmp_path):
    script = Path(sys.executable).with_name("stackwise-inspect")
    usage = subprocess.run([script, "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert usage.returncode == 0 and usage.stdout.startswith("usage: stackwise-inspect"), usage.stderr
    assert "Summarise a checkpoint" in usage.stdout
