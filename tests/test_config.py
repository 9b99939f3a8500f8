"""Config: strict loading, round trips, overrides, legacy migration and validation messages."""

import json

import pytest
import yaml

from stackwise_ds.config import ConfigError, StackWiseConfig, apply_overrides
from stackwise_ds.enums import LayoutKind, Precision, TokenizerKind, TrainingArchitecture
from stackwise_ds.parallel.ds_config import build_ds_config


def write_yaml(tmp_path, payload, name="run.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(payload))
    return path


def test_defaults_round_trip_exactly():
    config = StackWiseConfig()
    assert StackWiseConfig.from_dict(config.to_dict()) == config
    assert StackWiseConfig.from_dict(config.to_dict()).to_dict() == config.to_dict()


def test_yaml_round_trip_preserves_every_value(tmp_path):
    raw = {"model": {"d_model": 64, "n_heads": 4, "n_kv_heads": 2, "attention_type": "gqa",
                     "architecture": {"n_stacks": 4, "blocks_per_stack": 3}, "mla": {"kv_lora_rank": 16}},
           "training": {"training_architecture": "stackwise", "steps_per_phase": [5, 6, 7, 8], "lr": 3e-4,
                        "seed": 7, "output_dir": str(tmp_path / "out")},
           "data": {"seq_len": 32, "max_files": 3},
           "parallel": {"pipeline_stages": 2}}
    config = StackWiseConfig.from_yaml(write_yaml(tmp_path, raw))
    config.to_yaml(tmp_path / "again.yaml")
    again = StackWiseConfig.from_yaml(tmp_path / "again.yaml")
    assert again == config
    assert again.model.architecture.blocks_per_stack == 3
    assert again.training.steps_per_phase == [5, 6, 7, 8]
    assert again.model.mla.kv_lora_rank == 16 and again.parallel.pipeline_stages == 2


def test_closed_sets_load_as_enums_and_save_as_plain_strings(tmp_path):
    config = StackWiseConfig.from_dict({"training": {"training_architecture": "blockwise"},
                                        "data": {"tokenizer": "bpe"}, "parallel": {"phase_layout": "fixed"}})
    assert config.training.training_architecture is TrainingArchitecture.BLOCKWISE
    assert config.data.tokenizer is TokenizerKind.BPE and config.parallel.phase_layout is LayoutKind.FIXED
    assert config.training.training_architecture == "blockwise" and f"{config.training.objective}" == "causal_lm"
    text = yaml.safe_dump(config.to_dict())  # SafeDumper refuses any str subclass: plain strings only
    assert "training_architecture: blockwise" in text and "tokenizer: bpe" in text and "phase_layout: fixed" in text
    assert json.loads(json.dumps(config.to_dict())) == yaml.safe_load(text)
    path = StackWiseConfig.from_dict({"data": {"tokenizer": str(tmp_path / "tok.json")}}).data.tokenizer
    assert type(path) is str  # a tokenizer path stays a path
    with pytest.raises(ConfigError, match="training.objective is 'mlm' but must be one of: causal_lm, masked_lm"):
        StackWiseConfig.from_dict({"training": {"objective": "mlm"}})


@pytest.mark.parametrize("raw, fragment", [
    ({"model": {"d_modle": 64}}, "unknown key 'd_modle' in model"),
    ({"model": {"architecture": {"stacks": 2}}}, "unknown key 'stacks' in model.architecture"),
    ({"trainin": {}}, "unknown key 'trainin' in the top level"),
    ({"parallel": {"zero": 1}}, "unknown key 'zero' in parallel"),
])
def test_unknown_keys_name_key_and_section(raw, fragment):
    with pytest.raises(ConfigError, match=fragment):
        StackWiseConfig.from_dict(raw)


@pytest.mark.parametrize("raw, advice", [
    ({"training": {"growth_operater": "fresh"}}, "did you mean 'training.growth_operator' or 'training.growth_init'?"),
    ({"training": {"seq_len": 64}}, "did you mean 'data.seq_len'?"),  # the key of another section
    ({"trainin": {}}, "did you mean 'training'?"),
    ({"model": {"zzz": 1}}, "the keys of model are in the config reference, docs/config.md"),
])
def test_an_unknown_key_gets_the_closest_keys_in_one_short_line(raw, advice):
    with pytest.raises(ConfigError) as error:
        StackWiseConfig.from_dict(raw)
    assert str(error.value).endswith(advice) and len(str(error.value)) < 160


@pytest.mark.parametrize("raw, fragment", [
    ({"model": {"d_model": "big"}}, "model.d_model' must be an integer"),
    ({"model": {"d_model": 64.0}}, "model.d_model' must be an integer"),
    ({"training": {"lr": "fast"}}, "training.lr' must be a number"),
    ({"model": {"tie_embeddings": "yes"}}, "model.tie_embeddings' must be true or false"),
    ({"training": {"steps_per_phase": "ten"}}, "training.steps_per_phase"),
    ({"model": {"architecture": 3}}, "section 'model.architecture' must be a mapping"),
])
def test_ill_typed_values_are_errors(raw, fragment):
    with pytest.raises(ConfigError, match=fragment):
        StackWiseConfig.from_dict(raw)


def test_floats_accept_ints_and_yaml_exponent_strings():
    config = StackWiseConfig.from_dict({"training": {"lr": "1e-3", "grad_clip": 2}})
    assert config.training.lr == 1e-3 and isinstance(config.training.grad_clip, float)


def test_overrides_beat_yaml_which_beats_defaults(tmp_path):
    path = write_yaml(tmp_path, {"training": {"max_steps": 10, "lr": 0.01}})
    config = StackWiseConfig.from_yaml(path, overrides=["training.max_steps=20", "model.architecture.n_stacks=4",
                                                        "training.steps_per_phase=[1, 2, 3, 4]"])
    assert config.training.max_steps == 20  # override beats YAML
    assert config.training.lr == 0.01  # YAML beats default
    assert config.training.warmup_steps == StackWiseConfig().training.warmup_steps  # default kept
    assert config.model.architecture.n_stacks == 4 and config.training.steps_per_phase == [1, 2, 3, 4]


def test_bad_override_and_override_of_unknown_key(tmp_path):
    path = write_yaml(tmp_path, {})
    with pytest.raises(ConfigError, match="not of the form section.key=value"):
        StackWiseConfig.from_yaml(path, overrides=["training.max_steps"])
    with pytest.raises(ConfigError, match="unknown key 'max_stepz' in training"):
        StackWiseConfig.from_yaml(path, overrides=["training.max_stepz=3"])


def test_missing_and_malformed_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        StackWiseConfig.from_yaml(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        StackWiseConfig.from_yaml(bad)


@pytest.mark.parametrize("old_mode, new_mode", [("layerwise", "blockwise"), ("blockwise", "stackwise"),
                                                ("fused", "rackwise")])
def test_legacy_training_mode_is_migrated_with_warning(old_mode, new_mode):
    with pytest.warns(DeprecationWarning, match="training.mode' is deprecated: write 'training.training_architecture"):
        config = StackWiseConfig.from_dict({"training": {"mode": old_mode}})
    assert config.training.training_architecture == new_mode


def test_legacy_block_size_and_sections_are_migrated():
    with pytest.warns(DeprecationWarning, match="model.architecture.blocks_per_stack"):
        config = StackWiseConfig.from_dict({"training": {"mode": "blockwise", "block_size": 3, "total_blocks": 4}})
    assert config.model.architecture.blocks_per_stack == 3 and config.model.architecture.n_stacks == 4
    with pytest.warns(DeprecationWarning, match="layerwise_training"):
        config = StackWiseConfig.from_dict({"layerwise_training": {"enabled": True, "steps_per_layer": 12}})
    assert config.training.training_architecture == "blockwise" and config.training.steps_per_phase == 12
    with pytest.warns(DeprecationWarning, match="blockwise_training"):
        config = StackWiseConfig.from_dict({"blockwise_training": {"block_size": 2}})
    assert config.training.training_architecture == "stackwise"
    assert config.model.architecture.blocks_per_stack == 2


def test_legacy_and_new_key_in_conflict_is_an_error():
    with pytest.raises(ConfigError, match="keep only the new key"):
        StackWiseConfig.from_dict({"training": {"mode": "fused", "training_architecture": "stackwise"}})
    with pytest.raises(ConfigError, match="training.mode 'sideways' is unknown"):
        StackWiseConfig.from_dict({"training": {"mode": "sideways"}})


@pytest.mark.parametrize("raw, fragment", [
    ({"model": {"d_model": 100, "n_heads": 3}}, r"d_model \(100\) must be divisible by model.n_heads \(3\)"),
    ({"model": {"n_heads": 8, "n_kv_heads": 3}}, r"n_heads \(8\) must be divisible by model.n_kv_heads \(3\)"),
    ({"model": {"attention_type": "flash"}},
     "model.attention_type is 'flash' but must be one of: mha, gqa, mla, kernel"),
    ({"model": {"attention_mode": "sideways"}}, "model.attention_mode is 'sideways'"),
    ({"model": {"kernel": {"feature_map": "tanh"}}},
     "model.kernel.feature_map is 'tanh' but must be one of: elu, relu"),
    ({"model": {"d_model": 0}}, "model.d_model must be positive"),
    ({"model": {"attention_type": "mla", "n_kv_heads": 2}}, "remove n_kv_heads, or use 'gqa' or 'kernel'"),
    ({"model": {"architecture": {"n_stacks": -1}}}, "n_stacks must be positive"),
    ({"data": {"seq_len": 2048}, "model": {"max_seq_len": 1024}},
     r"data.seq_len \(2048\) is longer than model.max_seq_len \(1024\): raise model.max_seq_len"),
    ({"training": {"objective": "masked_lm"}}, "needs model.attention_mode 'bidirectional'"),
    ({"model": {"attention_mode": "bidirectional"}}, "needs model.attention_mode 'causal'"),
    ({"model": {"architecture": {"n_stacks": 3}}, "parallel": {"pipeline_stages": 2}},
     r"pipeline_stages \(2\) must divide model.architecture.n_stacks \(3\).*use one of \[1, 3\]"),
    ({"parallel": {"zero_stage": 2}}, "DeepSpeed refuses ZeRO-2/3 with pipeline"),
    ({"training": {"precision": "bf16"}, "parallel": {"zero_stage": 0}},
     "training.precision bf16 .* needs parallel.zero_stage 1: .*; set parallel.zero_stage 1 .*or training.precision "
     "fp32"),
    ({"training": {"training_architecture": "stackwise", "steps_per_phase": [1, 2, 3]}},
     "lists 3 values but stackwise training has 2 phases"),
    ({"training": {"training_architecture": "layerwise"}}, "training_architecture is 'layerwise'"),
    ({"data": {"source": "text_files"}}, "data.paths is empty"),
    ({"training": {"stack_lr_scale": [1.0]}}, "stack_lr_scale has 1 values for 2 stacks"),
    ({"training": {"eval_batches": -1}}, r"training.eval_batches must be >= 0, got -1"),
    ({"training": {"stack_lr_scale": [1.0, -0.5]}}, "negative multiplier, which would ascend the loss"),
    ({"training": {"min_lr_ratio": 1.5}}, r"min_lr_ratio \(1.5\) must be in \[0, 1\]"),
    ({"training": {"warmup_steps": -2}}, "training.warmup_steps must be >= 0"),
    ({"training": {"weight_decay": -0.1}}, "training.weight_decay must be >= 0"),
    ({"training": {"grad_clip": -1.0}}, "training.grad_clip must be >= 0"),
    ({"training": {"lr": 0}}, "training.lr must be positive"),
    ({"parallel": {"collective_timeout_s": 0.5}}, r"collective_timeout_s \(0.5\) must be >= 1 second"),
    ({"parallel": {"phase_layout": "stretchy"}},
     "parallel.phase_layout is 'stretchy' but must be one of: elastic, fixed"),
    ({"parallel": {"max_rank_memory_mb": 0}}, "parallel.max_rank_memory_mb must be positive"),
    ({"training": {"keep_checkpoints": -1}}, r"training.keep_checkpoints must be >= 0, got -1.*0 or null keeps all"),
])
def test_validation_messages_say_how_to_fix(raw, fragment):
    with pytest.raises(ConfigError, match=fragment):
        StackWiseConfig.from_dict(raw)


def test_world_size_must_fit_pipeline():
    config = StackWiseConfig.from_dict({"model": {"architecture": {"n_stacks": 4}}, "parallel": {"pipeline_stages": 2}})
    assert config.validate_world_size(4) == 2
    with pytest.raises(ConfigError, match=r"world size 3 is not a multiple of parallel.pipeline_stages \(2\): "
                                          r"set parallel.pipeline_stages to one of \[1\]"):
        config.validate_world_size(3)


@pytest.mark.parametrize("n_stacks, world_size, depth", [(4, 3, 1), (4, 2, 2), (4, 8, 4), (2, 2, 2), (6, 4, 2)])
def test_unset_pipeline_depth_is_the_largest_that_divides_stacks_and_world(n_stacks, world_size, depth):
    config = StackWiseConfig.from_dict({"model": {"architecture": {"n_stacks": n_stacks}}})
    assert config.validate_world_size(world_size) == world_size // depth
    assert config.parallel.pipeline_stages == depth and config.to_dict()["parallel"]["pipeline_stages"] == depth


def test_ds_config_is_filled_from_yaml_and_contradictions_fail(tmp_path):
    config = StackWiseConfig.from_dict({"training": {"micro_batch_size": 2, "gradient_accumulation_steps": 3,
                                                     "grad_clip": 0.5, "precision": "fp32"}})
    ds = build_ds_config(config.training, config.parallel, data_parallel_size=2)
    assert ds["train_batch_size"] == 12 and ds["train_micro_batch_size_per_gpu"] == 2
    assert ds["gradient_accumulation_steps"] == 3 and ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"]["stage"] == 1 and ds["bf16"]["enabled"] is False

    template = tmp_path / "ds.json"
    template.write_text(json.dumps({"train_micro_batch_size_per_gpu": 4}))
    clash = StackWiseConfig.from_dict({"training": {"micro_batch_size": 2}, "parallel": {"ds_config": str(template)}})
    with pytest.raises(ConfigError, match="sets train_micro_batch_size_per_gpu = 4 but the run config gives 2"):
        build_ds_config(clash.training, clash.parallel, 1)
    template.write_text(json.dumps({"train_micro_batch_size_per_gpu": 2, "optimizer": {"type": "Adam"}}))
    with pytest.raises(ConfigError, match="has an 'optimizer' section"):
        build_ds_config(clash.training, clash.parallel, 1)


def test_bf16_without_zero_is_refused_where_the_template_accumulates_in_fp32(tmp_path):
    """DeepSpeed builds no optimizer for bf16 weights with fp32 gradient accumulation without ZeRO: a template that
    does so is refused with the fix; one that accumulates in bf16 (DeepSpeed's BF16_Optimizer) is passed on."""
    template = tmp_path / "ds.json"
    run = {"training": {"precision": "bf16"}, "parallel": {"zero_stage": 0, "ds_config": str(template)}}
    for accumulation, refused in (("fp32", True), ("float32", True), ("bf16", False), (None, False)):
        template.write_text(json.dumps({} if accumulation is None else {"data_types": {"grad_accum_dtype":
                                                                                         accumulation}}))
        config = StackWiseConfig.from_dict(run)
        if refused:
            with pytest.raises(ConfigError, match=f"needs parallel.zero_stage 1.*template {template} accumulates"):
                build_ds_config(config.training, config.parallel, 1)
        else:
            assert build_ds_config(config.training, config.parallel, 1)["bf16"]["enabled"] is True
    shipped = StackWiseConfig.from_dict({"training": {"precision": "bf16"}, "parallel": {"zero_stage": 1}})
    assert build_ds_config(shipped.training, shipped.parallel, 1)["data_types"]["grad_accum_dtype"] == "fp32"


def test_tf32_is_for_fp32_runs_on_cuda_only():
    from stackwise_ds.parallel.ds_config import configure_fp32_matmuls, uses_tf32

    assert uses_tf32(Precision.FP32, cuda=True)
    assert not uses_tf32(Precision.BF16, cuda=True) and not uses_tf32(Precision.FP32, cuda=False)
    assert not uses_tf32("fp32", cuda=False)
    assert configure_fp32_matmuls(Precision.BF16) is False  # bf16 runs keep fp32 matmuls exact, on any machine


def test_user_paths_are_expanded(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    config = StackWiseConfig.from_dict({"training": {"output_dir": "~/runs/a"},
                                        "data": {"source": "text_files", "paths": ["~/corpus"], "cache_dir": "~/c"}})
    assert config.training.output_dir == str(tmp_path / "runs" / "a")
    assert config.data.paths == [str(tmp_path / "corpus")] and config.data.cache_dir == str(tmp_path / "c")


def test_malformed_override_value_and_non_object_ds_config(tmp_path):
    with pytest.raises(ConfigError, match=r"--set training.steps_per_phase=\[1, 2: the value is not valid YAML"):
        apply_overrides({}, ["training.steps_per_phase=[1, 2"])
    template = tmp_path / "ds.json"
    template.write_text("[1, 2]")
    config = StackWiseConfig.from_dict({"parallel": {"ds_config": str(template)}})
    with pytest.raises(ConfigError, match="holds a JSON list, not an object"):
        build_ds_config(config.training, config.parallel, 1)


def test_resume_of_a_checkpoint_older_than_a_setting_compares_with_the_default(tmp_path):
    """A checkpoint written before ``training.prefix`` existed resumes with the default and
    refuses any other value, naming the default it was trained with."""
    from stackwise_ds.checkpoint.files import CheckpointError, check_resumable_changes

    saved = StackWiseConfig().to_dict()
    del saved["training"]["prefix"]
    current = StackWiseConfig().to_dict()
    check_resumable_changes(saved, current, tmp_path)
    current["training"]["prefix"] = "train"
    with pytest.raises(CheckpointError, match="training.prefix: checkpoint 'frozen' vs config 'train'"):
        check_resumable_changes(saved, current, tmp_path)
