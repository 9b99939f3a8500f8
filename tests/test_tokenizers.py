"""Tokenizers: byte, a BPE trained on the run's training split, a local Hugging Face tokenizer folder;
the tokenizer travelling through checkpoints, consolidated files and the Hugging Face export."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from launch_utils import REPO, rack_of, results, run_training
from stackwise_ds.checkpoint.consolidation import TOKENIZER_KEY, consolidate, save_consolidated
from stackwise_ds.checkpoint.files import CheckpointError
from stackwise_ds.checkpoint.generate import generate_text
from stackwise_ds.checkpoint.hf import export_hf, import_hf
from stackwise_ds.config import StackWiseConfig
from stackwise_ds.data import (
    TOKENIZER_FILE,
    ByteTokenizer,
    TokenizerError,
    build_datasets,
    load_tokenizer_json,
    make_tokenizer,
)
from stackwise_ds.data.build import describe_bundle
from stackwise_ds.training.data_setup import print_data_summary

# Emoji (incl. a ZWJ sequence), CJK, combining marks, RTL, control characters, a BOM, odd spaces.
UNICODE = ["héllo wörld", "日本語のテキスト 中文", "e\u0301 a\u0308\u0323 \u0915\u094d\u0937",
           "🎉👩‍👩‍👧 🏳️‍🌈", "\x00\x01\x07\t\r\n\x1b[0m\x7f", "\ufeffπ≈3.14 \u00a0\u2003x",
           "مرحبا שלום", "  leading and trailing  ", ""]
WORDS_PER_DOC = 40


def corpus(folder: Path, n_docs: int = 60, seed: int = 0) -> list[str]:
    """Text files, each one repeating a random word of its own (so a word is in one split only)."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    words = []
    for i in range(n_docs):
        word = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(7))
        words.append(word)
        (folder / f"doc{i:03d}.txt").write_text(f"{word} = {i} # 中文 🎉\n" + f"{word} " * WORDS_PER_DOC + "\n")
    return words


def bpe_bundle(tmp_path: Path, cache: str, vocab_size: int = 2000):
    return build_datasets(source="text_files", paths=[str(tmp_path / "docs")], seq_len=32, val_fraction=0.2,
                          seed=3, cache_dir=str(tmp_path / cache), tokenizer="bpe", vocab_size=vocab_size)


def hf_tokenizer_folder(folder: Path, with_eos: bool = True) -> Path:
    """A Hugging Face tokenizer made here (no hub): a small byte-level BPE, saved with save_pretrained."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    specials = ["<pad>", "</s>", "<mask>"] if with_eos else ["<pad>"]
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 20, trainer=trainer)
    kwargs = {"eos_token": "</s>", "mask_token": "<mask>"} if with_eos else {}
    PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", **kwargs).save_pretrained(str(folder))
    return folder


# ----------------------------------------------------------------------------- unit tests


def test_bpe_is_deterministic_and_never_sees_the_validation_text(tmp_path):
    words = corpus(tmp_path / "docs")
    first, second = bpe_bundle(tmp_path, "c1"), bpe_bundle(tmp_path, "c2")
    json_a = (first.cache_path / TOKENIZER_FILE).read_bytes()
    assert json_a == (second.cache_path / TOKENIZER_FILE).read_bytes()
    assert first.tokenizer.vocab_size <= 2000 and first.tokenizer.eos_id == 0 and first.tokenizer.mask_id == 1
    vocab = first.tokenizer.core.get_vocab()
    val_text = first.tokenizer.decode(first.val.windows[first.val.rows].reshape(-1).tolist())
    train_text = first.tokenizer.decode(first.train.windows[first.train.rows].reshape(-1).tolist())
    val_words = [w for w in words if w in val_text]
    train_words = [w for w in words if w in train_text]
    assert val_words and train_words and not set(val_words) & set(train_words)
    # A word seen 40 times in training becomes one token; a validation word never does.
    assert sum("Ġ" + w in vocab for w in train_words) >= len(train_words) // 2
    assert not [w for w in val_words if "Ġ" + w in vocab or w in vocab]
    assert first.n_tokens < sum(len(p.read_bytes()) for p in (tmp_path / "docs").iterdir())  # it compresses


def test_encode_decode_round_trips_unicode_for_every_kind(tmp_path):
    corpus(tmp_path / "docs")
    folder = hf_tokenizer_folder(tmp_path / "hf_tok")
    tokenizers = {"byte": ByteTokenizer(), "bpe": bpe_bundle(tmp_path, "c", vocab_size=400).tokenizer,
                  "folder": make_tokenizer(str(folder), vocab_size=300),
                  "file": make_tokenizer(str(folder / TOKENIZER_FILE))}
    assert tokenizers["folder"].eos_id == tokenizers["folder"].core.token_to_id("</s>")
    assert tokenizers["folder"].mask_id == tokenizers["folder"].core.token_to_id("<mask>")
    for kind, tok in tokenizers.items():
        for text in UNICODE:
            ids = tok.encode(text)
            assert tok.decode(ids) == text, (kind, text)
            assert tok.encode_to_array(text).tolist() == ids
        reloaded = load_tokenizer_json(tok.to_json(), eos_token=tok.eos_token, mask_token=tok.mask_token)
        assert reloaded.encode(UNICODE[3]) == tok.encode(UNICODE[3]) and reloaded.eos_id == tok.eos_id
    # The byte tokenizer's tokenizers-JSON form has the very same ids, specials at 256/257.
    from tokenizers import Tokenizer

    as_hf = Tokenizer.from_str(ByteTokenizer().to_json())
    for text in UNICODE:
        assert as_hf.encode(text).ids == list(text.encode("utf-8"))
    assert as_hf.token_to_id("<|endoftext|>") == 256 and as_hf.token_to_id("<|mask|>") == 257


def test_tokenizer_errors_name_the_problem_and_the_fix(tmp_path):
    folder = hf_tokenizer_folder(tmp_path / "hf_tok")
    size = make_tokenizer(str(folder)).vocab_size
    assert 258 < size <= 300
    with pytest.raises(TokenizerError, match=rf"model.vocab_size \(100\) is smaller than the tokenizer's {size} "
                                             rf"tokens: set model.vocab_size >= {size}"):
        make_tokenizer(str(folder), vocab_size=100)
    with pytest.raises(TokenizerError, match=r"model.vocab_size \(200\) is smaller than the 258 ids.*>= 258"):
        corpus(tmp_path / "docs")
        bpe_bundle(tmp_path, "c", vocab_size=200)
    no_eos = hf_tokenizer_folder(tmp_path / "no_eos", with_eos=False)
    with pytest.raises(TokenizerError, match="declares no end-of-document token"):
        make_tokenizer(str(no_eos))
    with pytest.raises(TokenizerError, match="neither 'byte', 'bpe' nor an existing tokenizer.json"):
        make_tokenizer(str(tmp_path / "missing"))


def test_a_truncated_tokenizer_json_is_named_with_the_parse_error(tmp_path):
    folder = hf_tokenizer_folder(tmp_path / "hf_tok")
    text = (folder / TOKENIZER_FILE).read_text()
    (folder / TOKENIZER_FILE).write_text(text[: len(text) // 2])  # a copy cut short
    with pytest.raises(TokenizerError, match=rf"{folder / TOKENIZER_FILE} is not a readable tokenizer.json "
                                             r"\(EOF while parsing"):
        make_tokenizer(str(folder))
    with pytest.raises(TokenizerError, match="cached.json is not a readable tokenizer.json"):
        load_tokenizer_json("{", "cached.json")


def test_the_data_summary_line_and_a_bpe_short_of_its_vocabulary(tmp_path, capsys):
    corpus(tmp_path / "docs", n_docs=20)
    built = bpe_bundle(tmp_path, "c", vocab_size=100_000)
    reached = built.tokenizer.vocab_size
    assert reached < 100_000
    config = StackWiseConfig.from_dict({"data": {"tokenizer": "bpe"}, "model": {"vocab_size": 100_000}})
    print_data_summary(config.data, config.model, bpe_bundle(tmp_path, "c", vocab_size=100_000))
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"[stackwise] data: packed windows loaded from cache entry {built.cache_path} (")
    assert f"tokenizer: a {reached:,}-token BPE trained on the training split" in lines[0]
    assert lines[1].startswith(f"[stackwise] warning: the BPE reached only {reached:,} of model.vocab_size 100,000 ")
    assert f"set model.vocab_size={reached}" in lines[1] and len(lines) == 2
    assert "built into cache entry" in describe_bundle(built, "bpe", reached)[0]
    assert len(describe_bundle(built, "bpe", reached)) == 1  # no warning when the BPE fills the vocabulary


def test_generate_refuses_a_model_without_tokenizer_unless_given_one(tmp_path, capsys):
    folder = hf_tokenizer_folder(tmp_path / "hf_tok")
    config = StackWiseConfig.from_dict({"model": {"vocab_size": 300, "d_model": 32, "n_heads": 4, "max_seq_len": 32},
                                       "data": {"seq_len": 16}})
    rack = rack_of(config)
    source = save_consolidated(dict(rack.state_dict()), config, tmp_path / "imported.safetensors")  # no tokenizer
    with pytest.raises(CheckpointError, match=r"carries no tokenizer .*300 ids.*--tokenizer PATH"):
        generate_text(source, "the fox", max_new_tokens=4, temperature=0)
    from stackwise_ds.tools_cli import generate_main

    assert generate_main([str(source), "--prompt", "the fox", "--max-new-tokens", "4", "--temperature", "0",
                          "--tokenizer", str(folder)]) == 0
    out = capsys.readouterr().out
    assert out == generate_text(source, "the fox", 4, 0, tokenizer_path=folder) + "\n"
    assert out.startswith("the fox")


def test_tokenizer_path_expands_the_home_directory(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    hf_tokenizer_folder(tmp_path / "tok")
    config = StackWiseConfig.from_dict({"data": {"tokenizer": "~/tok"}})
    assert config.data.tokenizer == str(tmp_path / "tok")
    assert make_tokenizer(config.data.tokenizer).eos_id == make_tokenizer(str(tmp_path / "tok")).eos_id
    assert StackWiseConfig.from_dict({"data": {"tokenizer": "bpe"}}).data.tokenizer == "bpe"


# ----------------------------------------------------------------------------- runs and tools


def run_tool(name: str, *args) -> str:
    result = subprocess.run([sys.executable, str(REPO / "tools" / f"{name}.py"), *map(str, args)], cwd=REPO,
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, f"tools/{name}.py failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.fixture(scope="module")
def byte_run(tiny_rackwise_run):
    """The byte-tokenizer run of tests/conftest.py (2 stages, 6 steps), shared with test_rackwise.py."""
    return tiny_rackwise_run


@pytest.fixture(scope="module")
def bpe_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run_bpe")
    run_training(2, out, "data.tokenizer=bpe", "model.vocab_size=512", "training.max_steps=12", "training.lr=0.003")
    return out


@pytest.mark.multiprocess
def test_bpe_run_trains_and_leaves_its_tokenizer_everywhere(bpe_run):
    out = bpe_run
    losses = results(out)["losses"]
    assert len(losses) == 12 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.05, losses
    saved = (out / TOKENIZER_FILE).read_text()
    tokenizer = load_tokenizer_json(saved)
    assert tokenizer.vocab_size == 512 and tokenizer.eos_id == 0
    tag = (out / "checkpoints" / "latest").read_text().strip()
    assert (out / "checkpoints" / tag / TOKENIZER_FILE).read_text() == saved


@pytest.mark.multiprocess
def test_eval_of_a_bpe_run_rebuilds_its_split_and_reads_other_text_with_its_bpe(bpe_run, tmp_path):
    from stackwise_ds.checkpoint.evaluation import evaluate

    final = results(bpe_run)["phases"][-1]["val_loss_after"]
    assert evaluate(bpe_run).loss == pytest.approx(final, abs=1e-6)
    # an empty data cache: the 'bpe' data build runs again (split, BPE training, packing) to the same windows
    rebuilt = evaluate(bpe_run, overrides=[f"data.cache_dir={tmp_path / 'cache'}"])
    assert rebuilt.loss == pytest.approx(final, abs=1e-6) and rebuilt.cache_entry.startswith(str(tmp_path))
    text = tmp_path / "text" / "a.txt"
    text.parent.mkdir()
    text.write_text("".join(f"def f{i}(a, b):\n    return a * {i} + b\n\n" for i in range(3000)))
    other = evaluate(bpe_run, overrides=["data.source=text_files", f"data.paths=[{text.parent}]"])  # no new BPE
    assert other.windows == 4 and abs(other.loss - final) > 0.01


@pytest.mark.multiprocess
@pytest.mark.parametrize("kind", ["byte", "bpe"])
def test_transformers_generate_on_the_export_equals_tools_generate(kind, request, tmp_path):
    from safetensors import safe_open
    from transformers import AutoTokenizer, LlamaForCausalLM

    out = request.getfixturevalue(f"{kind}_run")
    export_hf(out, tmp_path / "hf")
    consolidate(out, tmp_path / "rack.safetensors")
    prompt = "def main(x):\n    "
    ours = run_tool("generate", out, "--prompt", prompt, "--temperature", "0", "--max-new-tokens", 24)
    from_file = generate_text(tmp_path / "rack.safetensors", prompt, max_new_tokens=24, temperature=0) + "\n"
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")  # from the export folder alone
    model = LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=24, do_sample=False)
    theirs = prompt + tokenizer.decode(generated[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert ours == from_file == theirs + "\n"  # print() adds the newline
    assert len(generated[0]) > inputs["input_ids"].shape[1]
    expected_ids = ByteTokenizer().encode(prompt) if kind == "byte" else load_tokenizer_json(
        (out / TOKENIZER_FILE).read_text()).encode(prompt)
    assert inputs["input_ids"][0].tolist() == expected_ids
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id == (256 if kind == "byte" else 0)
    # import_hf keeps the export's tokenizer: the imported file generates the same text.
    import_hf(tmp_path / "hf", tmp_path / "imported.safetensors", n_stacks=2)
    with safe_open(str(tmp_path / "imported.safetensors"), framework="pt") as handle:
        carried = load_tokenizer_json(handle.metadata()[TOKENIZER_KEY])
    assert carried.encode(prompt) == expected_ids
    assert generate_text(tmp_path / "imported.safetensors", prompt, max_new_tokens=24, temperature=0) + "\n" == ours
