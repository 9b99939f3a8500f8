"""training.init_from (start from existing weights), depth growth (init_growth) and tools/restack.py.

Two real 2-rank runs are shared between assertions: a rackwise run started from a tiny Hugging Face
Llama folder (then exported back to Hugging Face), and a stackwise run grown from a 2-stack
consolidated file to 4 stacks. The rest calls the library directly.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from launch_utils import REPO, rack_of, results, run_training, scrambled_rack
from stackwise_ds.checkpoint import load_rack
from stackwise_ds.checkpoint.consolidation import read_consolidated, save_consolidated
from stackwise_ds.checkpoint.files import CheckpointError
from stackwise_ds.checkpoint.hf import export_hf
from stackwise_ds.checkpoint.locate import list_tags
from stackwise_ds.checkpoint.restack import restack
from stackwise_ds.config import ConfigError, StackWiseConfig, apply_overrides
from stackwise_ds.data.tokenizer import train_bpe
from stackwise_ds.training.init_weights import check_run_tokenizer, initial_weights

SMALL = ["model.d_model=64", "model.n_heads=4", "model.n_kv_heads=2", "model.max_seq_len=64", "data.seq_len=32"]
# the Llama of the Hugging Face test, as StackWise model keys
LLAMA_KEYS = ["model.vocab_size=300", "model.d_ff=96", "model.norm_eps=1e-6", "model.tie_embeddings=false",
              "model.architecture.n_stacks=2", "model.architecture.blocks_per_stack=2"]


def config(*overrides: str) -> StackWiseConfig:
    return StackWiseConfig.from_dict(apply_overrides({}, [*SMALL, *overrides]))


def source_file(tmp_path, *overrides: str, seed: int = 0):
    """A consolidated file of a scrambled rack; returns (path, its Rack state)."""
    cfg = config(*overrides)
    state = dict(scrambled_rack(cfg, seed).state_dict())
    return save_consolidated(state, cfg, tmp_path / f"source{seed}.safetensors"), state


def layer_file(folder, layer: int) -> dict:
    return torch.load(folder / f"layer_{layer:02d}-model_states.pt", weights_only=True)


def block_of(state: dict, stack: int, block: int) -> dict:
    prefix = f"stacks.{stack}.blocks.{block}."
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- growth (library)


@pytest.mark.parametrize("growth", ["stack", "fresh"])
def test_growth_fills_each_target_stack_as_the_rule_says(growth, tmp_path):
    src, state = source_file(tmp_path, "model.architecture.n_stacks=2", "model.tie_embeddings=false")
    target = config("model.architecture.n_stacks=4", "model.tie_embeddings=false", f"training.init_from={src}",
                    f"training.init_growth={growth}")
    summary = initial_weights(target, tmp_path / "init")
    assert "2 -> 4 stacks" in summary
    seeded = rack_of(target)
    for stack in range(4):
        for block in range(2):
            got = layer_file(tmp_path / "init", 1 + 2 * stack + block)
            if stack < 2 or growth == "stack":
                assert same(got, block_of(state, stack % 2, block)), (stack, block)
            else:
                assert same(got, seeded.stacks[stack].blocks[block].state_dict()), (stack, block)
    assert torch.equal(layer_file(tmp_path / "init", 0)["embedding.weight"], state["embedding.weight"])
    assert torch.equal(layer_file(tmp_path / "init", 9)["weight"], state["norm.weight"])
    assert torch.equal(layer_file(tmp_path / "init", 10)["lm_head.weight"], state["lm_head.weight"])


def test_each_rank_writes_only_its_share(tmp_path):
    src, _ = source_file(tmp_path, "model.architecture.n_stacks=2")
    target = config("model.architecture.n_stacks=2", f"training.init_from={src}")  # tied: layers 0..5, no head file
    initial_weights(target, tmp_path / "init", rank=1, world_size=2)
    assert sorted(p.name[:8] for p in (tmp_path / "init").iterdir()) == ["layer_01", "layer_03", "layer_05"]


def test_a_shape_mismatch_names_the_tensor_and_both_shapes(tmp_path):
    src, _ = source_file(tmp_path, "model.architecture.n_stacks=2")  # gqa: 2 key/value heads of 16
    target = config("model.architecture.n_stacks=2", "model.n_kv_heads=4", f"training.init_from={src}")
    with pytest.raises(ConfigError) as error:
        initial_weights(target, tmp_path / "init")
    message = str(error.value)
    assert "stacks.0.blocks.0.attn.k_proj.weight: source (32, 64) vs target (64, 64)" in message
    assert "model.n_kv_heads: source 2 vs config 4" in message
    assert not (tmp_path / "init").exists(), "nothing may be written before the check"


@pytest.mark.parametrize("overrides,expected", [
    (["model.architecture.n_stacks=1"], "the source has 2 stacks x 2 blocks, the config 1 x 2"),
    (["model.architecture.n_stacks=4", "model.architecture.blocks_per_stack=1"],
     "the source has 2 stacks x 2 blocks, the config 4 x 1"),
])
def test_fewer_stacks_or_other_blocks_per_stack_are_refused(overrides, expected, tmp_path):
    src, _ = source_file(tmp_path, "model.architecture.n_stacks=2")
    with pytest.raises(ConfigError) as error:
        initial_weights(config(*overrides, f"training.init_from={src}"), tmp_path / "init")
    assert expected in str(error.value) and "stackwise-restack" in str(error.value)


def test_init_growth_is_validated_and_init_from_expands_home():
    with pytest.raises(ConfigError, match="training.init_growth is 'deep' but must be one of: stack, fresh"):
        config("training.init_growth=deep")
    assert config("training.init_from=~/model.safetensors").training.init_from.startswith(str(Path.home()))


# ----------------------------------------------------------------------------- restack


@pytest.mark.multiprocess
def test_restack_round_trip_is_exact_and_keeps_the_function(tmp_path):
    src, state = source_file(tmp_path, "model.architecture.n_stacks=4", "parallel.pipeline_stages=4",
                             "model.tie_embeddings=false")
    command = [sys.executable, str(REPO / "tools" / "restack.py"), str(src), str(tmp_path / "2x4.safetensors"),
               "--n-stacks", "2"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "changed parallel.pipeline_stages: 4 -> None" in result.stdout
    mid_state, mid_config = read_consolidated(tmp_path / "2x4.safetensors")
    assert (mid_config.model.architecture.n_stacks, mid_config.model.architecture.blocks_per_stack) == (2, 4)
    assert torch.equal(mid_state["stacks.1.blocks.1.attn.q_proj.weight"], state["stacks.2.blocks.1.attn.q_proj.weight"])
    back, changes = restack(tmp_path / "2x4.safetensors", tmp_path / "4x2.safetensors", n_stacks=4)
    back_state, back_config = read_consolidated(back)
    assert back_config.model.architecture.n_stacks == 4 and changes == ["model.architecture: 2 x 4 -> 4 x 2"]
    assert back_state.keys() == state.keys() and all(torch.equal(back_state[k], state[k]) for k in state)
    ids = torch.randint(0, 258, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        reference = load_rack(src)(ids)
        assert torch.allclose(load_rack(tmp_path / "2x4.safetensors")(ids), reference, atol=1e-5, rtol=0)
        assert torch.allclose(load_rack(back)(ids), reference, atol=1e-5, rtol=0)


def test_restack_refuses_a_count_that_does_not_divide_the_blocks(tmp_path):
    src, _ = source_file(tmp_path, "model.architecture.n_stacks=4")
    with pytest.raises(ConfigError, match=r"--n-stacks 3 does not divide the rack's 8 blocks .*\[1, 2, 4, 8\]"):
        restack(src, tmp_path / "x.safetensors", n_stacks=3)


# ----------------------------------------------------------------------------- bad sources, tokenizers (library)


def test_what_is_not_a_source_is_named_with_what_is_accepted(tmp_path):
    accepted = "another run's output dir, its checkpoints/ folder or a tag, a consolidated .safetensors file"
    fake = tmp_path / "model.safetensors"
    fake.write_bytes(b"PK\x03\x04 a zip archive, not safetensors" * 100)
    with pytest.raises(CheckpointError, match=rf"{fake} is not a readable safetensors file \(.*\): it is truncated"):
        initial_weights(config(f"training.init_from={fake}"), tmp_path / "out")
    pt_file = tmp_path / "layer_00-model_states.pt"
    torch.save({}, pt_file)
    with pytest.raises(CheckpointError, match=rf"{pt_file} is a \.pt file, which is not a source: give {accepted}"):
        initial_weights(config(f"training.init_from={pt_file}"), tmp_path / "out")
    hf_without_config = tmp_path / "hf"
    hf_without_config.mkdir()
    (hf_without_config / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="holds model.safetensors but no config.json: a Hugging Face folder"):
        initial_weights(config(f"training.init_from={hf_without_config}"), tmp_path / "out")
    own = tmp_path / "run"
    own.mkdir()
    with pytest.raises(CheckpointError, match=rf"{own} is this run's own training.output_dir: .*give {accepted}"):
        initial_weights(config(f"training.init_from={own}", f"training.output_dir={own}"), own / "initial_weights")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=rf"{tmp_path / 'empty'} holds no checkpoint tag and no Hugging Face"):
        initial_weights(config(f"training.init_from={tmp_path / 'empty'}"), tmp_path / "out")


def test_a_source_trained_with_another_tokenizer_is_refused_naming_both(tmp_path):
    bpe = train_bpe(lambda: ["def main(x):\n    return x + 1\n"] * 50, 300)
    cfg = config("model.vocab_size=300")
    source = save_consolidated(dict(scrambled_rack(cfg).state_dict()), cfg, tmp_path / "bpe.safetensors", bpe)
    n = bpe.vocab_size
    with pytest.raises(ConfigError, match=rf"bpe.safetensors was trained with a {n}-token tokenizer but "
                                          r"data.tokenizer 'byte' is a 258-token byte tokenizer"):
        initial_weights(config("model.vocab_size=300", f"training.init_from={source}"), tmp_path / "a")
    same = bpe.save(tmp_path / "tok" / "tokenizer.json")
    initial_weights(config("model.vocab_size=300", f"training.init_from={source}", f"data.tokenizer={same}"),
                    tmp_path / "b")
    # data.tokenizer 'bpe' is trained with the data: checked then, against the source's tokenizer kept here
    out = tmp_path / "c"
    initial_weights(config("model.vocab_size=300", f"training.init_from={source}", "data.tokenizer=bpe"), out)
    check_run_tokenizer(out, str(source), bpe, "bpe")
    other = train_bpe(lambda: ["completely different text, other merges\n"] * 50, 300)
    saved = out / "tokenizer.json"
    with pytest.raises(ConfigError, match=rf"{source} was trained with a {n}-token tokenizer but data.tokenizer "
                                          rf"'bpe' is a {other.vocab_size}-token tokenizer: .*\({saved}\)"):
        check_run_tokenizer(out, str(source), other, "bpe")


# ----------------------------------------------------------------------------- Hugging Face Llama -> run -> export


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A tiny GQA Llama with untied embeddings and non-trivial norms, saved with save_pretrained."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    hf_config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                            rms_norm_eps=1e-6, tie_word_embeddings=False, initializer_range=0.2)
    hf = LlamaForCausalLM(hf_config).eval()
    with torch.no_grad():
        for name, param in hf.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
    folder = tmp_path_factory.mktemp("llama") / "hf"
    hf.save_pretrained(folder)
    return hf, folder


@pytest.fixture(scope="module")
def llama_run(llama, tmp_path_factory):
    """A 2-stage rackwise run from the Llama folder (1 step at lr 1e-9), exported back to Hugging Face."""
    out = tmp_path_factory.mktemp("llama_run")
    run = run_training(2, out / "run", *LLAMA_KEYS, f"training.init_from={llama[1]}", "training.max_steps=1",
                       "training.lr=1e-9", "parallel.pipeline_stages=2")
    export_hf(out / "run", out / "hf")  # the export_hf command line itself is tested in test_tools.py
    return {"dir": out / "run", "export": out / "hf", "stdout": run.stdout}


@pytest.mark.multiprocess
def test_a_run_from_a_hugging_face_folder_exports_the_same_model(llama, llama_run):
    from transformers import LlamaForCausalLM

    hf, _ = llama
    exported = load_file(str(llama_run["export"] / "model.safetensors"))
    original = dict(hf.named_parameters())
    assert exported.keys() == original.keys()
    assert max((exported[n] - p.detach()).abs().max().item() for n, p in original.items()) <= 1e-6
    ids = torch.randint(0, 300, (2, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        theirs = LlamaForCausalLM.from_pretrained(llama_run["export"]).eval()(ids).logits
        assert torch.allclose(theirs, hf(ids).logits, atol=1e-4, rtol=0)
    assert "training.init_from: initial weights from" in llama_run["stdout"]
    assert "[stackwise] data: packed windows " in llama_run["stdout"]  # one line on the data, rank 0 only
    assert llama_run["stdout"].count("tokenizer: the byte tokenizer (258 ids)") == 1


@pytest.mark.multiprocess
def test_the_initial_weights_folder_is_never_a_checkpoint(llama_run):
    assert (llama_run["dir"] / "initial_weights" / "layer_00-model_states.pt").is_file()
    assert [tag for tag, _ in list_tags(llama_run["dir"] / "checkpoints")] == ["step00000001"]
    assert [tag for tag, _ in list_tags(llama_run["dir"])] == []


# ----------------------------------------------------------------------------- stackwise growth in the trainer


@pytest.fixture(scope="module")
def stackwise_run(tmp_path_factory):
    """Stackwise, elastic, 4 stacks x 1 block grown from a 2-stack source, 1 step per phase; on 2 ranks
    with parallel.pipeline_stages unset (the default depth n_stacks=4 would not fit: 2 is chosen)."""
    out = tmp_path_factory.mktemp("stackwise_init")
    cfg = config("model.architecture.n_stacks=2", "model.architecture.blocks_per_stack=1")
    state = dict(scrambled_rack(cfg, seed=5).state_dict())
    src = save_consolidated(state, cfg, out / "source.safetensors")
    overrides = ["training.training_architecture=stackwise", "training.steps_per_phase=1", "training.lr=1e-9",
                 "model.architecture.n_stacks=4", "model.architecture.blocks_per_stack=1",
                 f"training.init_from={src}"]
    run_training(2, out / "run", *overrides)
    return {"dir": out / "run", "state": state, "overrides": overrides}


@pytest.mark.multiprocess
def test_a_stackwise_run_keeps_the_sources_dormant_stacks(stackwise_run):
    assert yaml.safe_load((stackwise_run["dir"] / "config.yaml").read_text())["parallel"]["pipeline_stages"] == 2
    first = stackwise_run["dir"] / "checkpoints" / "step00000001"  # end of phase 0: stacks 1..3 not placed yet
    seeded = rack_of(config("model.architecture.n_stacks=4", "model.architecture.blocks_per_stack=1"))
    for stack in (1, 2, 3):
        got = layer_file(first, 1 + stack)
        assert same(got, block_of(stackwise_run["state"], stack % 2, 0)), f"stack {stack} != source stack {stack % 2}"
        assert not same(got, seeded.stacks[stack].blocks[0].state_dict())
    embedding = layer_file(first, 0)["embedding.weight"]  # tied, trained 1 step at lr 1e-9
    assert torch.allclose(embedding, stackwise_run["state"]["embedding.weight"], atol=1e-6, rtol=0)


@pytest.mark.multiprocess
def test_resume_wins_over_init_from(stackwise_run):
    again = run_training(1, stackwise_run["dir"], *stackwise_run["overrides"], "parallel.pipeline_stages=1")
    assert "resume wins, training.init_from" in again.stdout
    assert "already holds the finished run" in again.stdout
    refused = run_training(1, stackwise_run["dir"], *stackwise_run["overrides"], "parallel.pipeline_stages=1",
                           "training.resume=false", expect_ok=False)
    assert refused.returncode == 2 and "training.resume is false" in refused.stderr + refused.stdout
    assert "resume wins" not in refused.stdout  # only the error: init_from is not what stops the run


@pytest.mark.multiprocess
def test_the_trainer_refuses_a_mismatched_source_before_training(stackwise_run, tmp_path):
    src = stackwise_run["dir"].parent / "source.safetensors"
    result = run_training(1, tmp_path / "run", "model.n_kv_heads=4", "model.architecture.n_stacks=2",
                          "parallel.pipeline_stages=1",
                          "model.architecture.blocks_per_stack=1", f"training.init_from={src}", expect_ok=False)
    assert result.returncode == 2
    assert "stacks.0.blocks.0.attn.k_proj.weight: source (32, 64) vs target (64, 64)" in result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


# ------------------------------------------------------------------- LLaMA Pro: expand a Llama, train the copies

EXPANSION = [*LLAMA_KEYS, "model.architecture.n_stacks=6", "model.architecture.blocks_per_stack=1",
             "training.init_growth=interleave", "training.interleave_every=2", "training.growth_init=identity",
             "training.freeze_source=true", "training.blocks_only=true", "parallel.pipeline_stages=2",
             "training.max_steps=4", "training.lr=3e-3"]


@pytest.mark.multiprocess
def test_expanding_a_llama_trains_only_the_inserted_layers_and_exports_for_transformers(llama, llama_run, tmp_path):
    """4 Llama layers -> 6 ([0, 1, 1', 2, 3, 3']): the copies start with zero o_proj/down_proj, so the expanded model
    begins at the Llama's validation loss; only they train (the originals, embedding, norm and head frozen); the
    export loads in transformers, whose layers 0, 1, 3, 4 are the Llama's 0-3 exactly."""
    from transformers import LlamaForCausalLM

    hf, folder = llama
    run = run_training(2, tmp_path / "run", *EXPANSION, f"training.init_from={folder}")
    assert "0<-0, 1<-1, 2<-1, 3<-2, 4<-3, 5<-3" in run.stdout
    phase = results(tmp_path / "run")["phases"][0]
    original = results(llama_run["dir"])["phases"][0]["val_loss_before"]  # the same data and windows
    assert abs(phase["val_loss_before"] - original) <= 1e-5 * original
    assert phase["val_loss_after"] < phase["val_loss_before"]
    export_hf(tmp_path / "run", tmp_path / "hf")
    exported = load_file(str(tmp_path / "hf" / "model.safetensors"))
    source = {n: p.detach() for n, p in hf.named_parameters()}
    for new, old in ((0, 0), (1, 1), (3, 2), (4, 3)):
        for name in [n for n in source if n.startswith(f"model.layers.{old}.")]:
            assert torch.equal(exported[name.replace(f"layers.{old}.", f"layers.{new}.")], source[name]), name
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(exported[name], source[name]), name
    for inserted in (2, 5):  # trained from zero
        assert exported[f"model.layers.{inserted}.self_attn.o_proj.weight"].abs().max() > 0
    model = LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert model.config.num_hidden_layers == 6
    out = model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 7)
